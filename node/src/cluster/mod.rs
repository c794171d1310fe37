//! The cluster: which nodes are linked, which layers each holds, and where
//! every activation and token goes next.
//!
//! One actor task ([`actor`]) owns all cluster state and is fed by
//! [`ClusterEvent`]s: links opening and closing, frames from peers, jobs from
//! this node's request coordinator, outputs of this node's stage, and
//! timers. Nothing else mutates cluster state; others read the published
//! [`ClusterView`].
//!
//! Planning: the node with the smallest id among those serving the same
//! model file is the leader. After membership settles it runs the placement
//! policy, sends the plan (with a higher epoch) to every node, waits until
//! each has loaded its layers, and then declares the plan active. Requests
//! only run on an active plan; a request caught by a change fails with a
//! clear error.

mod actor;
pub mod link;
pub mod protocol;
pub mod resources;

use std::path::PathBuf;
use std::sync::Arc;

use kernels::{Device, LayerRange, ModelFile};
use scheduler::NodeId;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

use crate::engine::PipelineEnds;
use crate::engine::stage::StageOutput;
use crate::limits::CLUSTER_EVENT_QUEUE_LEN;
use link::{LinkId, LinkSender};
use protocol::{Frame, Hello, ModelIdentity, Resources};

/// Everything a node brings to the cluster.
pub struct ClusterConfig {
    pub me: NodeId,
    pub name: String,
    /// Where this node's API (and link) port listens.
    pub listen: std::net::SocketAddr,
    /// Peers to link to (`--peer`), as HOST:PORT.
    pub peers: Vec<String>,
    pub resources: Resources,
    pub model_name: String,
    pub model_path: PathBuf,
    pub device: Device,
}

/// Events the cluster actor handles, in arrival order.
pub(crate) enum ClusterEvent {
    /// A link finished its handshake; answer whether to keep it.
    LinkUp {
        hello: Box<Hello>,
        sender: LinkSender,
        accepted: oneshot::Sender<bool>,
    },
    LinkDown {
        node: NodeId,
        link: LinkId,
        reason: String,
    },
    LinkRtt {
        node: NodeId,
        rtt_micros: u64,
    },
    Frame {
        from: NodeId,
        frame: Frame,
    },
    /// An output of this node's stage.
    FromStage(StageOutput),
    /// This node's shard for plan `epoch` finished loading (or failed).
    ShardLoaded {
        epoch: protocol::Epoch,
        result: Result<kernels::Shard, String>,
    },
    /// A dial attempt ended (successfully or not).
    DialEnded {
        address: String,
    },
    /// An accepted connection to hand to a link task.
    Accept {
        stream: link::AcceptedStream,
        remote: std::net::SocketAddr,
    },
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
    let actor = actor::Cluster::new(
        config,
        model,
        pipeline,
        events_tx.clone(),
        events_rx,
        view_tx,
    );
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
#[derive(Debug, Clone, Default, Serialize)]
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

#[derive(Debug, Clone, Serialize)]
pub struct NodeView {
    #[serde(with = "hex_id")]
    pub id: NodeId,
    pub name: String,
    pub address: String,
    /// `self`, `linked`, or why the node is not used.
    pub status: String,
    pub device: String,
    pub device_name: String,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    pub memory_budget_bytes: u64,
    pub compute_score: f64,
    pub model: ModelIdentity,
    /// The layers it holds in the current plan.
    pub layers: Option<LayerRange>,
    /// The weight bytes it reported holding for the current plan.
    pub weight_bytes: Option<u64>,
    /// This process's resident memory (only for this node).
    pub rss_bytes: Option<u64>,
    pub peak_rss_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LinkView {
    #[serde(with = "hex_id")]
    pub from: NodeId,
    #[serde(with = "hex_id")]
    pub to: NodeId,
    /// Round-trip time of the last heartbeat, in milliseconds.
    pub rtt_ms: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PlanState {
    Loading,
    Active,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlanView {
    pub epoch: u64,
    #[serde(with = "hex_id")]
    pub leader: NodeId,
    pub state: PlanState,
    pub stages: Vec<StageView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StageView {
    #[serde(with = "hex_id")]
    pub node: NodeId,
    pub layers: LayerRange,
    pub weight_bytes: Option<u64>,
}
