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
//! Planning: the node with the smallest id among those serving the same
//! model file is the leader. After membership settles it asks the
//! scheduling policy (a Wasm component, see [`crate::policy`]) for a
//! placement, sends the checked plan (with a higher epoch) to every node,
//! waits until each has loaded its layers, and then declares the plan
//! active. Requests only run on an active plan; a request caught by a
//! change fails with a clear error.
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
pub mod discovery;
mod events;
pub mod link;
mod membership;
mod planning;
mod policy_sync;
pub mod protocol;
pub mod resources;
mod routing;
mod status;
mod view;

pub(crate) use events::ClusterEvent;

use std::path::PathBuf;
use std::sync::Arc;

use kernels::{Device, LayerRange, ModelFile};
use scheduler::NodeId;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

use crate::engine::PipelineEnds;
use crate::limits::{CLUSTER_EVENT_QUEUE_LEN, POLICY_CHANGE_TIMEOUT_SECS};
use crate::model_store::{CatalogueEntry, Downloads, ModelStore};
use crate::policy::{Faults, PolicyError, PolicyHandle, PolicyView, StageLoad};
use protocol::{ModelAvailability, ModelIdentity, Resources};

/// Everything a node brings to the cluster.
pub struct ClusterConfig {
    pub me: NodeId,
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
    pub model_path: PathBuf,
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
    let channels = actor::Channels {
        events_tx: events_tx.clone(),
        events: events_rx,
        view: view_tx,
    };
    let actor = actor::Cluster::new(config, model, pipeline, channels, discovery.flatten());
    tokio::spawn(actor.run());
    ClusterHandle {
        events: events_tx,
        view: view_rx,
    }
}

// ---------------------------------------------------------------------------
// The view: what `GET /v1/cluster` returns
// ---------------------------------------------------------------------------

/// Node ids as 16 hex digits in JSON: a u64 number would lose precision in
/// JavaScript clients.
mod hex_id {
    use scheduler::NodeId;
    use serde::Serializer;

    pub fn serialize<S: Serializer>(id: &NodeId, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(id)
    }

    pub mod option {
        use super::*;

        pub fn serialize<S: Serializer>(id: &Option<NodeId>, s: S) -> Result<S::Ok, S::Error> {
            match id {
                Some(id) => s.collect_str(id),
                None => s.serialize_none(),
            }
        }
    }
}

/// The cluster as one node sees it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ClusterView {
    /// This node.
    #[serde(with = "hex_id::option")]
    pub node: Option<NodeId>,
    #[serde(with = "hex_id::option")]
    pub leader: Option<NodeId>,
    pub model: Option<ModelIdentity>,
    pub nodes: Vec<NodeView>,
    pub links: Vec<LinkView>,
    pub plan: Option<PlanView>,
    /// Why there is no usable plan, when there is none.
    pub plan_error: Option<String>,
    /// The scheduling policy this node runs.
    pub policy: Option<PolicyStatus>,
    /// Nodes found on the network that this node does not join, and why.
    pub not_joined: Vec<NotJoinedView>,
}

/// A node discovery found but this node does not join.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NotJoinedView {
    #[serde(with = "hex_id")]
    pub node: NodeId,
    pub name: String,
    pub addresses: Vec<String>,
    pub cluster: String,
    pub protocol_version: u32,
    pub reason: String,
}

/// The active scheduling policy, as `GET /v1/cluster/policy` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PolicyStatus {
    #[serde(flatten)]
    pub policy: PolicyView,
    /// Numbers the cluster's policy changes (higher is newer; a refused
    /// upload uses a number up). Equal on every node once the last change
    /// has reached it.
    pub revision: u64,
    /// The node where the last change happened (none for the start).
    #[serde(with = "hex_id::option")]
    pub changed_by: Option<NodeId>,
    /// Set when a policy failed and the cluster fell back from it.
    pub warning: Option<String>,
}

impl ClusterView {
    /// The active plan, if requests can run now.
    pub fn active_plan(&self) -> Option<&PlanView> {
        self.plan.as_ref().filter(|p| p.state == PlanState::Active)
    }

    /// Why requests cannot run now, in words for an API error.
    pub fn not_ready_reason(&self) -> String {
        match (&self.plan, &self.plan_error) {
            (_, Some(error)) => error.clone(),
            (Some(plan), None) if plan.state == PlanState::Loading => {
                format!(
                    "the cluster is loading plan {} ({} stages); retry in a moment",
                    plan.epoch,
                    plan.stages.len()
                )
            }
            _ => "the cluster has no plan yet; retry in a moment".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeView {
    #[serde(with = "hex_id")]
    pub id: NodeId,
    pub name: String,
    pub address: String,
    /// `self`, `linked`, or why the node is not used.
    pub status: String,
    /// Device, memory (available memory as last reported) and compute.
    #[serde(flatten)]
    pub resources: Resources,
    pub model: ModelIdentity,
    /// The layers it holds in the current plan.
    pub layers: Option<LayerRange>,
    /// The weight bytes it reported holding for the current plan.
    pub weight_bytes: Option<u64>,
    /// The node process's resident memory.
    pub rss_bytes: Option<u64>,
    /// The peak of it (only for this node).
    pub peak_rss_bytes: Option<u64>,
    /// The catalogue's models on the node, and the model it serves.
    pub models: Vec<ModelAvailability>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LinkView {
    #[serde(with = "hex_id")]
    pub from: NodeId,
    #[serde(with = "hex_id")]
    pub to: NodeId,
    /// Round-trip time of the last heartbeat, in milliseconds.
    pub rtt_ms: Option<f64>,
    /// Bytes per second `from` received from `to` in large frames.
    pub bandwidth_bytes_per_second: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PlanState {
    Loading,
    Active,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlanView {
    pub epoch: u64,
    #[serde(with = "hex_id")]
    pub leader: NodeId,
    pub state: PlanState,
    pub stages: Vec<StageView>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StageView {
    #[serde(with = "hex_id")]
    pub node: NodeId,
    pub layers: LayerRange,
    pub weight_bytes: Option<u64>,
    /// Requests going through the stage now, from every node.
    pub in_flight: u32,
}
