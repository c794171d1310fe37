//! The cluster: which nodes are linked, which layers each holds, and where
//! every activation and token goes next.
//!
//! One actor task ([`actor`]) owns all cluster state and is fed by
//! [`ClusterEvent`]s ([`events`]): links opening and closing, frames from
//! peers, jobs from this node's request coordinator, outputs of this node's
//! stage, and timers. Nothing else mutates cluster state; others read the
//! published [`ClusterView`] ([`view`]). The actor's state is split by
//! concern, each part a plain struct that decides and returns outcomes:
//! [`membership`] (peers, addresses, admission, the leader, link
//! measurements), [`planning`] (plans, epochs, re-plan timing, this node's
//! stage), [`routing`] (requests owned and hosted here, where each job goes,
//! and the wire form of jobs and results), [`policy_sync`] (policy
//! revisions and their transfer) and [`status`] (what this node reports
//! about itself). The actor does the IO they decide on and writes each
//! transition that crosses concerns once.
//!
//! Planning: the most senior node among those serving the same model file
//! (the one that has served longest in an active plan; the smallest id
//! among equals) is the leader. After membership settles it asks the
//! scheduling policy (a Wasm component, see [`crate::policy`]) for a
//! placement, sends the checked plan (with a higher epoch) to every node,
//! waits until each has loaded its layers, and then declares the plan
//! active. Requests only run on an active plan. A request caught by a
//! change of plan (a node of the plan lost: its link closed, it fell
//! silent, or its stage stopped making progress; or a re-plan) is not
//! failed: its owner keeps its history and feeds it again once a new plan
//! is active ([`recovery`] records each such loss); only when no plan
//! comes within `--recovery-wait` does it fail, naming the lost node.
//!
//! The policy is the same on every node: a change (an upload, a return to
//! the built-in one, a fallback after a failure) gets a
//! [`protocol::PolicyRevision`]
//! and is sent to every peer, and to each new one when it links; the
//! highest revision wins everywhere. Nodes report what they measure of
//! their links and how many requests their stage carries every second
//! ([`protocol::NodeStatus`]), so the leader can hand the policy the
//! latency and bandwidth between every pair.

mod actor;
pub mod admin_proof;
pub mod discovery;
mod events;
mod hops;
pub mod link;
mod membership;
mod planning;
mod policy_sync;
pub mod protocol;
mod recovery;
pub mod resources;
mod routing;
pub mod rtc;
pub mod secure;
mod signaling;
mod status;
mod view;

pub(crate) use events::ClusterEvent;
pub use signaling::LinkMode;

use std::sync::Arc;

use kernels::{Device, LayerRange, ModelFile};
use scheduler::NodeId;
use tokio::sync::{mpsc, oneshot, watch};

use crate::engine::PipelineEnds;
use crate::limits::{CLUSTER_EVENT_QUEUE_LEN, POLICY_CHANGE_TIMEOUT_SECS};
use crate::model_store::{CatalogueEntry, Downloads, ModelStore};
use crate::policy::{Faults, PolicyError, PolicyHandle, StageLoad};
use protocol::Resources;

/// A model a node opened to switch to: what the cluster actor swaps in.
pub struct SwitchedModel {
    /// The name API clients use.
    pub name: String,
    pub file: Arc<ModelFile>,
    pub grammars: Arc<kernels::Grammars>,
    pub hub_files: Option<Arc<crate::hub::HubFiles>>,
    /// Points this node's engine and API at the model; the actor calls it
    /// when it swaps the model in, and drops it when a newer switch came.
    pub commit: Box<dyn FnOnce() + Send>,
}

/// Opens the model a switch names (fetching its header from the Hub, or
/// from the peers given as HOST:PORT); the error is said in words.
pub type ModelOpener = Arc<
    dyn Fn(
            String,
            Vec<String>,
        ) -> futures_util::future::BoxFuture<'static, Result<SwitchedModel, String>>
        + Send
        + Sync,
>;

/// Everything a node brings to the cluster.
pub struct ClusterConfig {
    pub me: NodeId,
    /// This node's key and the cluster secret: links prove both.
    pub identity: crate::identity::Identity,
    /// Frames unencrypted after the handshake (benchmarks and tests).
    pub plaintext_frames: bool,
    /// What requests for peers' model files carry; a rotation renews it.
    pub peer_pass: crate::identity::PeerPass,
    /// The admin token, to authorize the changes an admin makes here and
    /// to check those that come from peers.
    pub admin_token: Option<String>,
    pub name: String,
    /// Only nodes with the same cluster name are joined.
    pub cluster: String,
    /// Advertise this node and look for others with mDNS.
    pub mdns: bool,
    /// Where this node's API (and link) port listens.
    pub listen: std::net::SocketAddr,
    /// Peers to link to (`--peer`), as HOST:PORT.
    pub peers: Vec<String>,
    pub resources: Resources,
    pub model_name: String,
    /// The model's vocabulary for the grammar engine (see
    /// [`crate::prompt::PromptBuilder::grammars`]).
    pub grammars: Arc<kernels::Grammars>,
    /// For a Hub model: fetches the bytes of the layers each plan gives
    /// this node.
    pub hub_files: Option<Arc<crate::hub::HubFiles>>,
    /// The model cache, to tell peers which catalogue models are here.
    pub model_store: ModelStore,
    /// Fetches into the model cache that run in the background.
    pub downloads: Downloads,
    pub device: Device,
    /// The policy thread, shared with the request coordinator.
    pub policy: PolicyHandle,
    /// Failures of uploaded policies, which the cluster falls back from.
    pub policy_faults: Faults,
    /// Where the actor publishes each stage's load for the coordinator.
    pub stage_loads: watch::Sender<Vec<StageLoad>>,
    /// Where the actor publishes the plan's room for KV cache.
    pub kv_room: watch::Sender<Option<crate::engine::KvRoom>>,
    /// The most this node's stage gives to KV cache (`--kv-cache`).
    pub kv_cache_bytes: u64,
    /// Opens another model when the cluster switches.
    pub open_model: ModelOpener,
    /// How long requests interrupted by a lost node wait for a new plan.
    pub recovery_wait: std::time::Duration,
    /// A fault a test asked this node's stage to have.
    pub stage_fault: Option<crate::stage::TestFault>,
    /// Which transports links use (`--link`).
    pub link_mode: LinkMode,
    /// STUN and TURN servers for WebRTC links (`--stun`, `--turn`).
    pub ice_servers: Vec<protocol::IceServer>,
}

/// A rotation of the cluster secret that happened.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Rotated {
    /// The name of the node removed, if one was.
    pub removed: Option<String>,
    /// The nodes that hold the new secret, this one first.
    pub told: Vec<String>,
    /// The new join token (for an admin to hand out).
    pub token: String,
}

/// Why a policy change did not (yet) happen.
#[derive(Debug, thiserror::Error)]
pub enum SetPolicyError {
    #[error(transparent)]
    Refused(PolicyError),
    /// No answer in time: the change may still happen.
    #[error(
        "the change took more than {POLICY_CHANGE_TIMEOUT_SECS} s and may still take effect; check GET /v1/cluster/policy"
    )]
    StillRunning,
}

/// A cheap, cloneable handle to the cluster actor.
#[derive(Clone)]
pub struct ClusterHandle {
    events: mpsc::Sender<ClusterEvent>,
    view: watch::Receiver<ClusterView>,
    recovery_wait: std::time::Duration,
    open_links: link::OpenLinks,
}

impl std::fmt::Debug for ClusterHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterHandle").finish_non_exhaustive()
    }
}

impl ClusterHandle {
    /// The cluster as this node sees it now.
    pub fn view(&self) -> ClusterView {
        self.view.borrow().clone()
    }

    /// How long a request waits for a plan (`--recovery-wait`).
    pub fn recovery_wait(&self) -> std::time::Duration {
        self.recovery_wait
    }

    /// A receiver to wait for changes of the view.
    pub fn watch(&self) -> watch::Receiver<ClusterView> {
        self.view.clone()
    }

    /// Makes `wasm` the cluster's policy (`None`: the built-in one). The
    /// upload is compiled and tried on the current cluster first; once it
    /// is active here it goes to every node and the model is re-planned.
    pub async fn set_policy(&self, wasm: Option<Vec<u8>>) -> Result<PolicyStatus, SetPolicyError> {
        let (reply, answer) = oneshot::channel();
        self.events
            .send(ClusterEvent::SetPolicy { wasm, reply })
            .await
            .map_err(|_| SetPolicyError::Refused(PolicyError::Stopped))?;
        let timeout = std::time::Duration::from_secs(POLICY_CHANGE_TIMEOUT_SECS);
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(result)) => result.map_err(SetPolicyError::Refused),
            Ok(Err(_)) => Err(SetPolicyError::Refused(PolicyError::Stopped)),
            Err(_) => Err(SetPolicyError::StillRunning),
        }
    }

    /// Fetches a catalogue model onto every node that lacks it, in the
    /// background; returns the names of the nodes that fetch it. Progress
    /// shows in each node's `models` in the view.
    pub async fn fetch_model(&self, entry: &'static CatalogueEntry) -> Option<Vec<String>> {
        let (reply, answer) = oneshot::channel();
        self.events
            .send(ClusterEvent::FetchModel { entry, reply })
            .await
            .ok()?;
        answer.await.ok()
    }

    /// Switches every node of the cluster to serving `model`; returns the
    /// names of the nodes told (this one first), `None` when the node is
    /// stopping.
    pub async fn switch_model(&self, model: String) -> Option<Vec<String>> {
        let (reply, answer) = oneshot::channel();
        self.events
            .send(ClusterEvent::SwitchModel { model, reply })
            .await
            .ok()?;
        answer.await.ok()
    }

    /// The token that admits a machine to the cluster now.
    pub async fn invite(&self) -> Option<crate::identity::JoinToken> {
        let (reply, answer) = oneshot::channel();
        self.events
            .send(ClusterEvent::Invite { reply })
            .await
            .ok()?;
        answer.await.ok()
    }

    /// Removes `node` from the cluster (`None`: nobody) and gives every
    /// other node a new cluster secret, so that the old token admits no
    /// one. Returns the names of the nodes told, or why not.
    pub async fn rotate_secret(&self, node: Option<NodeId>) -> Result<Rotated, String> {
        let (reply, answer) = oneshot::channel();
        self.events
            .send(ClusterEvent::RotateSecret {
                removed: node,
                reply,
            })
            .await
            .map_err(|_| "the node is stopping".to_string())?;
        answer
            .await
            .map_err(|_| "the node is stopping".to_string())?
    }

    /// Resolves once this node's links are closed. A stopping node's
    /// links first write its goodbye, which tells each peer why it left.
    pub async fn links_closed(&self) {
        self.open_links.all_closed().await;
    }

    /// How many links are open (for the log when a wait runs out).
    pub fn open_links(&self) -> usize {
        self.open_links.count()
    }

    /// Hands an upgraded connection to the cluster; it runs the link.
    pub async fn accept(&self, stream: link::AcceptedStream, remote: std::net::SocketAddr) {
        let _ = self
            .events
            .send(ClusterEvent::Accept { stream, remote })
            .await;
    }
}

/// Starts the cluster actor. It takes the coordinator's pipeline ends:
/// jobs for the first stage come out of `pipeline.jobs`, results for
/// requests owned here go into `pipeline.results`.
pub fn start(
    config: ClusterConfig,
    model: Arc<ModelFile>,
    pipeline: PipelineEnds,
) -> ClusterHandle {
    let (events_tx, events_rx) = mpsc::channel(CLUSTER_EVENT_QUEUE_LEN);
    let (view_tx, view_rx) = watch::channel(ClusterView::default());
    let recovery_wait = config.recovery_wait;
    let discovery = config.mdns.then(|| {
        let advert = discovery::Advertisement {
            node: config.me,
            name: config.name.clone(),
            cluster: config.cluster.clone(),
            listen: config.listen,
        };
        discovery::start(advert, events_tx.clone())
            .inspect_err(|error| {
                tracing::warn!(%error, "mDNS discovery is unavailable; only --peer nodes are joined");
            })
            .ok()
    });
    let open_links = link::OpenLinks::new();
    let channels = actor::Channels {
        events_tx: events_tx.clone(),
        events: events_rx,
        view: view_tx,
        open_links: open_links.clone(),
    };
    let actor = actor::Cluster::new(config, model, pipeline, channels, discovery.flatten());
    tokio::spawn(actor.run());
    ClusterHandle {
        events: events_tx,
        view: view_rx,
        recovery_wait,
        open_links,
    }
}

// ---------------------------------------------------------------------------
// The view: what `GET /v1/cluster` returns
// ---------------------------------------------------------------------------

// The HTTP API's JSON types, defined once for the node and the dashboard.
pub use api_types::{
    ClusterView, LinkTransport, LinkView, NodeView, NotJoinedView, PlanState, PlanView,
    PolicyStatus, RecoveryView, StageView,
};

/// A node's id as the view writes it (the same number, 16 hex digits).
pub(crate) fn view_id(id: NodeId) -> api_types::NodeId {
    api_types::NodeId(id.0)
}

/// A layer range as the view writes it.
pub(crate) fn view_layers(layers: LayerRange) -> api_types::LayerRange {
    let layer = |index: usize| u32::try_from(index).unwrap_or(u32::MAX);
    api_types::LayerRange {
        start: layer(layers.start),
        end: layer(layers.end),
    }
}
