//! The cluster as one node sees it: `GET /v1/cluster`, and each `cluster`
//! event of `GET /v1/cluster/events`.

use serde::{Deserialize, Serialize};

use crate::ids::{LayerRange, NodeId};
use crate::policy::PolicyStatus;

/// The cluster as one node sees it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterView {
    /// This node.
    pub node: Option<NodeId>,
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
    /// Why this node's own stage was lost (its thread stopped or stopped
    /// making progress): it serves no layers until it restarts.
    #[serde(default)]
    pub stage_error: Option<String>,
    /// The latest losses of a plan's node and what became of them, oldest
    /// first.
    #[serde(default)]
    pub recoveries: Vec<RecoveryView>,
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

/// A node of the plan was lost and the cluster planned around it: what
/// was lost, the plan it went on with, how many of this node's requests
/// resumed, and how long they paused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryView {
    /// The node lost (the first, if several went during one recovery).
    pub lost_node: NodeId,
    pub lost_name: String,
    /// How the loss was noticed: its link closed, it fell silent, its
    /// stage stopped making progress.
    pub reason: String,
    /// When it was noticed (unix ms).
    pub at_unix_ms: u64,
    /// `resumed`, or `failed` when the nodes left could not hold the
    /// model within the wait.
    pub outcome: String,
    /// The plan the cluster went on with, as `name layers` per stage.
    pub plan_epoch: Option<u64>,
    pub plan: Vec<String>,
    /// This node's requests that were interrupted and fed again.
    pub resumed_requests: u32,
    /// From the loss being noticed to the new plan being sent, and from
    /// then to every stage having loaded its layers; their sum is the
    /// pause before the requests replay their history.
    pub replan_ms: u64,
    pub load_ms: u64,
    /// What failed, for a recovery that did not resume.
    pub error: Option<String>,
}

/// A node this node does not join: one discovery found in another
/// cluster or speaking another protocol, or one refused at the handshake
/// for lacking the cluster's key (then only its address is known, and the
/// reason says "does not hold this cluster's key").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotJoinedView {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeId>,
    /// Its name, or its address when refused before it said its name.
    pub name: String,
    pub addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_version: Option<u32>,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    pub id: NodeId,
    pub name: String,
    pub address: String,
    /// A short fingerprint of the node's long-term key, which its link
    /// handshake proved (an admin removes a node by its id; the key tells
    /// a node that restarted under another id from a new machine).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key: String,
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkView {
    pub from: NodeId,
    pub to: NodeId,
    /// Round-trip time of the last heartbeat, in milliseconds.
    pub rtt_ms: Option<f64>,
    /// Bytes per second `from` received from `to` in large frames.
    pub bandwidth_bytes_per_second: Option<u64>,
    /// What carries the link.
    #[serde(default)]
    pub transport: LinkTransport,
    /// For a WebRTC link: how long ICE and DTLS took to open it, from the
    /// first signal to the open data channel, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handshake_ms: Option<f64>,
}

/// What carries a link between two nodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LinkTransport {
    /// A TCP connection one node dialed.
    #[default]
    Tcp,
    /// A WebRTC data channel, node to node (through NATs, no relay).
    Webrtc,
    /// A WebRTC data channel relayed by a TURN server.
    WebrtcTurn,
}

impl LinkTransport {
    /// How the dashboard and logs name it.
    pub fn label(self) -> &'static str {
        match self {
            LinkTransport::Tcp => "tcp",
            LinkTransport::Webrtc => "webrtc",
            LinkTransport::WebrtcTurn => "webrtc via TURN",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlanState {
    Loading,
    Active,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanView {
    pub epoch: u64,
    pub leader: NodeId,
    pub state: PlanState,
    pub stages: Vec<StageView>,
    /// Tokens of KV cache the tightest stage holds for the requests of
    /// every owner (its memory budget less its weights, over its layers),
    /// once the stages have said their budgets.
    #[serde(default)]
    pub kv_capacity_tokens: Option<u64>,
    /// Tokens of KV cache the running requests reserve, every owner's
    /// (prompt plus `max_tokens` each): each stage holds that many.
    #[serde(default)]
    pub kv_reserved_tokens: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageView {
    pub node: NodeId,
    pub layers: LayerRange,
    pub weight_bytes: Option<u64>,
    /// Requests going through the stage now, from every node.
    pub in_flight: u32,
}

// ---------------------------------------------------------------------------
// Also fields of the link protocol's frames (`Hello`, `NodeStatus`), encoded
// there with postcard: changing them changes the protocol too.
// ---------------------------------------------------------------------------

/// What a node can contribute.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resources {
    /// `cpu`, `cuda:0`, `metal`.
    pub device: String,
    /// The processor or GPU, for people reading the dashboard.
    pub device_name: String,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    /// What the planner may use for weights on this node.
    pub memory_budget_bytes: u64,
    /// Measured quantized mat-vec throughput, in GFLOP/s.
    pub compute_score: f64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelIdentity {
    pub name: String,
    /// `sha256:…` over the GGUF header and file size.
    pub fingerprint: String,
}

/// Whether a node has a model's file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelAvailability {
    pub name: String,
    pub state: ModelState,
    /// While downloading: bytes so far, of `total_bytes`.
    pub downloaded_bytes: Option<u64>,
    pub total_bytes: Option<u64>,
    /// Why the last download of a missing model failed.
    pub error: Option<String>,
}

impl ModelAvailability {
    pub fn new(name: impl Into<String>, state: ModelState) -> Self {
        Self {
            name: name.into(),
            state,
            downloaded_bytes: None,
            total_bytes: None,
            error: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelState {
    /// The model this node serves.
    Loaded,
    /// In the model cache, complete.
    Present,
    /// Being fetched into the model cache.
    Downloading,
    /// Not in the model cache.
    Missing,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a failed expectation is the report

    use super::*;
    use crate::policy::{PolicySource, PolicyView};

    /// A view with every field set, and its JSON as the node has always
    /// written it (keys in this order, ids as hex strings).
    fn sample() -> (ClusterView, &'static str) {
        let identity = ModelIdentity {
            name: "smollm2-135m".into(),
            fingerprint: "sha256:ab".into(),
        };
        let view = ClusterView {
            node: Some(NodeId(0x2a)),
            leader: Some(NodeId(0x2a)),
            model: Some(identity.clone()),
            nodes: vec![NodeView {
                id: NodeId(0x2a),
                name: "alpha".into(),
                address: "10.0.0.1:52415".into(),
                key: String::new(),
                status: "self".into(),
                resources: Resources {
                    device: "cpu".into(),
                    device_name: "x86".into(),
                    memory_total_bytes: 16,
                    memory_available_bytes: 8,
                    memory_budget_bytes: 4,
                    compute_score: 12.5,
                },
                model: identity,
                layers: Some(LayerRange { start: 0, end: 30 }),
                weight_bytes: Some(90),
                rss_bytes: Some(300),
                peak_rss_bytes: None,
                models: vec![ModelAvailability {
                    downloaded_bytes: Some(1),
                    total_bytes: Some(2),
                    ..ModelAvailability::new("other", ModelState::Downloading)
                }],
            }],
            links: vec![LinkView {
                from: NodeId(0x2a),
                to: NodeId(u64::MAX),
                rtt_ms: Some(0.25),
                bandwidth_bytes_per_second: None,
                transport: LinkTransport::WebrtcTurn,
                handshake_ms: Some(180.0),
            }],
            plan: Some(PlanView {
                epoch: 3,
                leader: NodeId(0x2a),
                state: PlanState::Active,
                stages: vec![StageView {
                    node: NodeId(0x2a),
                    layers: LayerRange { start: 0, end: 30 },
                    weight_bytes: Some(90),
                    in_flight: 1,
                }],
                kv_capacity_tokens: Some(40_000),
                kv_reserved_tokens: 1_200,
            }),
            plan_error: None,
            policy: Some(PolicyStatus {
                policy: PolicyView {
                    name: "memory-weighted".into(),
                    version: "0.1.0".into(),
                    sha256: "cd".into(),
                    source: PolicySource::BuiltIn,
                    size_bytes: 5,
                },
                revision: 0,
                changed_by: None,
                warning: None,
            }),
            not_joined: vec![NotJoinedView {
                node: Some(NodeId(7)),
                name: "beta".into(),
                addresses: vec!["10.0.0.2:52415".into()],
                cluster: Some("other".into()),
                protocol_version: Some(5),
                reason: "another cluster".into(),
            }],
            stage_error: None,
            recoveries: vec![RecoveryView {
                lost_node: NodeId(7),
                lost_name: "beta".into(),
                reason: "its link closed".into(),
                at_unix_ms: 5,
                outcome: "resumed".into(),
                plan_epoch: Some(4),
                plan: vec!["alpha 0..30".into()],
                resumed_requests: 2,
                replan_ms: 3,
                load_ms: 40,
                error: None,
            }],
        };
        let json = concat!(
            r#"{"node":"000000000000002a","leader":"000000000000002a","#,
            r#""model":{"name":"smollm2-135m","fingerprint":"sha256:ab"},"#,
            r#""nodes":[{"id":"000000000000002a","name":"alpha","address":"10.0.0.1:52415","#,
            r#""status":"self","device":"cpu","device_name":"x86","memory_total_bytes":16,"#,
            r#""memory_available_bytes":8,"memory_budget_bytes":4,"compute_score":12.5,"#,
            r#""model":{"name":"smollm2-135m","fingerprint":"sha256:ab"},"#,
            r#""layers":{"start":0,"end":30},"weight_bytes":90,"rss_bytes":300,"#,
            r#""peak_rss_bytes":null,"models":[{"name":"other","state":"downloading","#,
            r#""downloaded_bytes":1,"total_bytes":2,"error":null}]}],"#,
            r#""links":[{"from":"000000000000002a","to":"ffffffffffffffff","rtt_ms":0.25,"#,
            r#""bandwidth_bytes_per_second":null,"transport":"webrtc-turn","handshake_ms":180.0}],"#,
            r#""plan":{"epoch":3,"leader":"000000000000002a","state":"active","#,
            r#""stages":[{"node":"000000000000002a","layers":{"start":0,"end":30},"#,
            r#""weight_bytes":90,"in_flight":1}],"kv_capacity_tokens":40000,"#,
            r#""kv_reserved_tokens":1200},"#,
            r#""plan_error":null,"#,
            r#""policy":{"name":"memory-weighted","version":"0.1.0","sha256":"cd","#,
            r#""source":"built_in","size_bytes":5,"revision":0,"changed_by":null,"warning":null},"#,
            r#""not_joined":[{"node":"0000000000000007","name":"beta","#,
            r#""addresses":["10.0.0.2:52415"],"cluster":"other","protocol_version":5,"#,
            r#""reason":"another cluster"}],"stage_error":null,"#,
            r#""recoveries":[{"lost_node":"0000000000000007","lost_name":"beta","#,
            r#""reason":"its link closed","at_unix_ms":5,"outcome":"resumed","plan_epoch":4,"#,
            r#""plan":["alpha 0..30"],"resumed_requests":2,"replan_ms":3,"load_ms":40,"#,
            r#""error":null}]}"#,
        );
        (view, json)
    }

    #[test]
    fn the_view_is_written_as_always_and_reads_back() {
        let (view, json) = sample();
        assert_eq!(serde_json::to_string(&view).unwrap(), json);
        assert_eq!(serde_json::from_str::<ClusterView>(json).unwrap(), view);
        let empty = ClusterView::default();
        let text = serde_json::to_string(&empty).unwrap();
        assert_eq!(serde_json::from_str::<ClusterView>(&text).unwrap(), empty);
    }

    #[test]
    fn only_an_active_plan_serves() {
        let (mut view, _) = sample();
        assert!(view.active_plan().is_some());
        if let Some(plan) = view.plan.as_mut() {
            plan.state = PlanState::Loading;
        }
        assert!(view.active_plan().is_none());
        assert_eq!(
            view.not_ready_reason(),
            "the cluster is loading plan 3 (1 stages); retry in a moment"
        );
        view.plan_error = Some("the model does not fit".into());
        assert_eq!(view.not_ready_reason(), "the model does not fit");
        assert_eq!(
            ClusterView::default().not_ready_reason(),
            "the cluster has no plan yet; retry in a moment"
        );
    }
}
