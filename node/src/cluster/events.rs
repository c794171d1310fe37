//! The events the cluster actor handles: everything that changes cluster
//! state arrives as one of these, in order, on one bounded queue.

use std::sync::Arc;

use tokio::sync::oneshot;

use super::PolicyStatus;
use super::SwitchedModel;
use super::discovery;
use super::link::{self, LinkId, LinkSender};
use super::membership::Refusal;
use super::protocol::{self, Frame, Hello, PolicyRevision};
use super::routing::Route;
use super::secure::LinkKeys;
use crate::model_store::CatalogueEntry;
use crate::policy::{Placed, PolicyError, PolicyView};
use crate::stage::{StageJob, StageOutput};
use scheduler::NodeId;

/// Why a link ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LinkEnd {
    /// The peer keeps another link to this node (the two dialed each
    /// other at once): when this link is the member's, the member stays
    /// while that link comes up.
    PeerKeptAnother,
    /// The peer said goodbye (it is stopping, or refused the link), why.
    Goodbye(String),
    /// It failed or was closed; the reason is for the log.
    Closed(String),
}

impl From<String> for LinkEnd {
    fn from(reason: String) -> Self {
        Self::Closed(reason)
    }
}

impl From<&str> for LinkEnd {
    fn from(reason: &str) -> Self {
        Self::Closed(reason.to_string())
    }
}

/// Events the cluster actor handles, in arrival order.
pub(crate) enum ClusterEvent {
    /// A link finished its handshake; answer whether to keep it.
    LinkUp {
        hello: Box<Hello>,
        /// The long-term public key the handshake proved.
        key: Vec<u8>,
        /// The keys (and so the cluster secret) the handshake used.
        keys: Arc<LinkKeys>,
        sender: LinkSender,
        accepted: oneshot::Sender<Result<(), Refusal>>,
    },
    /// A link's handshake failed: `wrong_key` when the peer does not
    /// hold this cluster's secret, else a network or protocol problem.
    Refused {
        /// The address dialed, or the address the connection came from.
        address: String,
        dialed: bool,
        reason: String,
        wrong_key: bool,
    },
    LinkDown {
        node: NodeId,
        link: LinkId,
        end: LinkEnd,
    },
    LinkRtt {
        node: NodeId,
        rtt_micros: u64,
    },
    LinkBandwidth {
        node: NodeId,
        bytes_per_second: u64,
    },
    /// The policy answered placement number `generation`.
    Placed {
        generation: u64,
        placed: Placed,
    },
    /// Someone asked this node to change the cluster's policy (`None`: back
    /// to the built-in one).
    SetPolicy {
        wasm: Option<Vec<u8>>,
        reply: oneshot::Sender<Result<PolicyStatus, PolicyError>>,
    },
    /// mDNS resolved another node's advertisement.
    Discovered {
        fullname: String,
        peer: discovery::PeerAdvert,
        verdict: discovery::Verdict,
    },
    /// A node withdrew its advertisement (it stopped).
    Withdrawn {
        fullname: String,
    },
    /// Someone asked this node to fetch a catalogue model onto every node
    /// that lacks it; the reply names those nodes.
    FetchModel {
        entry: &'static CatalogueEntry,
        reply: oneshot::Sender<Vec<String>>,
    },
    /// An admin asked this node to switch the cluster to `model`; the reply
    /// names the nodes told.
    SwitchModel {
        model: String,
        reply: oneshot::Sender<Vec<String>>,
    },
    /// An admin asked for the join token.
    Invite {
        reply: oneshot::Sender<crate::identity::JoinToken>,
    },
    /// An admin asked to remove a node and rotate the cluster secret.
    RotateSecret {
        removed: Option<NodeId>,
        reply: oneshot::Sender<Result<super::Rotated, String>>,
    },
    /// This node opened the model it was asked to switch to (or failed).
    ModelOpened {
        model: String,
        result: Result<SwitchedModel, String>,
    },
    /// The policy thread finished installing revision `revision`.
    PolicyInstalled {
        revision: PolicyRevision,
        wasm: Option<bytes::Bytes>,
        result: Result<PolicyView, PolicyError>,
        /// Why the change happened, when a failing policy was replaced.
        warning: Option<String>,
        /// The admin's authorization of the change, to pass on.
        proof: Option<protocol::AdminProof>,
        /// Whom to answer, when the change started here from the API.
        reply: Option<oneshot::Sender<Result<PolicyStatus, PolicyError>>>,
    },
    Frame {
        from: NodeId,
        frame: Frame,
    },
    /// Outputs of one step of this node's stage that the hops (see
    /// [`super::hops`]) left to the actor, tagged with their batches.
    FromStage(Vec<StageOutput<Route>>),
    /// A job from a peer for this node's stage, whose queue the hops found
    /// full or closed.
    ForStage(StageJob<Route>),
    /// A job the hops took could not go on.
    HopFailed {
        route: Route,
        sequence: kernels::SequenceId,
        failure: super::hops::HopFailure,
    },
    /// This node's shard for plan `epoch` finished loading (or failed).
    ShardLoaded {
        epoch: protocol::Epoch,
        result: Result<kernels::Shard, String>,
    },
    /// A dial attempt ended: `failed` when no connection could be made
    /// (refused or timed out), which WebRTC may get around.
    DialEnded {
        address: String,
        failed: bool,
    },
    /// A WebRTC session task has a signal to send.
    SignalOut(protocol::Signal),
    /// A WebRTC attempt ended: its link runs (`error` is `None`) or it
    /// failed.
    WebrtcEnded {
        node: NodeId,
        session: u64,
        error: Option<String>,
        /// The failure was ICE finding no path (not an attempt cut short).
        no_path: bool,
    },
    /// An accepted connection to hand to a link task.
    Accept {
        stream: link::AcceptedStream,
        remote: std::net::SocketAddr,
    },
}

impl ClusterEvent {
    /// Whether this event only moves requests along (a job, a token, a
    /// stage's outputs): it changes neither the view nor what the hops
    /// read, so the actor publishes neither after it.
    pub fn moves_requests(&self) -> bool {
        match self {
            ClusterEvent::FromStage(_)
            | ClusterEvent::ForStage(_)
            | ClusterEvent::HopFailed { .. } => true,
            ClusterEvent::Frame { frame, .. } => matches!(
                frame,
                Frame::Forward(_)
                    | Frame::Token { .. }
                    | Frame::ChunkDone { .. }
                    | Frame::Failed { .. }
                    | Frame::Interrupted { .. }
                    | Frame::Release { .. }
            ),
            _ => false,
        }
    }
}
