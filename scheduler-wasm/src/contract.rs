//! The policy contract (`wit/scheduler.wit`) as plain Rust, and the one
//! place where it meets the policy's own types.
//!
//! A record here mirrors a WIT record field for field. Both sides of the
//! contract generate their own Rust types from the WIT file (the node with
//! wasmtime's `bindgen!`, a policy with `wit_bindgen::generate!`); the
//! [`contract_conversions!`](crate::contract_conversions) macro converts
//! between those and these, so each side writes no conversion of its own.
//! The functions below ([`place`], [`schedule`], [`check_plan`]) are the
//! built-in policy and the plan check over the contract's types.

use crate::{
    Layers, LinkLatency, ModelShape, NodeId, NodeResources, PlanError, PlanViolation, Waiting,
};

/// A node that can hold layers (WIT `node`).
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub id: u64,
    pub name: String,
    pub device: String,
    pub memory_budget_bytes: u64,
    pub compute_score: f64,
}

/// What one node measured of its link to another (WIT `link`).
#[derive(Debug, Clone, PartialEq)]
pub struct Link {
    pub from: u64,
    pub to: u64,
    pub latency_micros: u64,
    pub bandwidth_bytes_per_second: u64,
}

/// The nodes to place on and their links (WIT `cluster`).
#[derive(Debug, Clone, PartialEq)]
pub struct Cluster {
    pub nodes: Vec<Node>,
    pub links: Vec<Link>,
}

/// What placement needs to know of the model (WIT `model`).
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    pub layer_count: u32,
    pub layer_bytes: Vec<u64>,
    pub embedding_bytes: u64,
    pub head_bytes: u64,
    pub tied_embeddings: bool,
    pub kv_bytes_per_token_per_layer: u64,
    pub context_length: u32,
}

/// One node's layers `[start, end)` (WIT `stage`).
#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    pub node: u64,
    pub start: u32,
    pub end: u32,
}

/// Stages in ring order (WIT `plan`).
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub stages: Vec<Stage>,
}

/// A request waiting to start (WIT `waiting-request`).
#[derive(Debug, Clone, PartialEq)]
pub struct WaitingRequest {
    pub id: u64,
    pub prompt_tokens: u32,
    pub max_tokens: u32,
    pub waited_millis: u64,
}

/// How busy one stage is (WIT `stage-load`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StageLoad {
    pub node: u64,
    pub in_flight: u32,
    pub limit: u32,
}

/// A policy's name and version (WIT `policy-info`).
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyInfo {
    pub name: String,
    pub version: String,
}

/// `From` conversions, both ways, between the contract's records here and
/// the types a WIT bindings generator made from `wit/scheduler.wit`.
/// Invoke it with the path of the generated `types` interface module, in
/// the crate that holds the generated types:
///
/// ```ignore
/// scheduler::contract_conversions!(ringlet::scheduler::types);
/// ```
#[macro_export]
macro_rules! contract_conversions {
    ($($wit:ident)::+) => {
        $crate::contract_conversions!(@record $($wit)::+::Node, $crate::contract::Node,
            [id, name, device, memory_budget_bytes, compute_score], []);
        $crate::contract_conversions!(@record $($wit)::+::Link, $crate::contract::Link,
            [from, to, latency_micros, bandwidth_bytes_per_second], []);
        $crate::contract_conversions!(@record $($wit)::+::Cluster, $crate::contract::Cluster,
            [], [nodes, links]);
        $crate::contract_conversions!(@record $($wit)::+::Model, $crate::contract::Model,
            [layer_count, layer_bytes, embedding_bytes, head_bytes, tied_embeddings,
             kv_bytes_per_token_per_layer, context_length], []);
        $crate::contract_conversions!(@record $($wit)::+::Stage, $crate::contract::Stage,
            [node, start, end], []);
        $crate::contract_conversions!(@record $($wit)::+::Plan, $crate::contract::Plan,
            [], [stages]);
        $crate::contract_conversions!(@record $($wit)::+::WaitingRequest,
            $crate::contract::WaitingRequest,
            [id, prompt_tokens, max_tokens, waited_millis], []);
        $crate::contract_conversions!(@record $($wit)::+::StageLoad, $crate::contract::StageLoad,
            [node, in_flight, limit], []);
        $crate::contract_conversions!(@record $($wit)::+::PolicyInfo, $crate::contract::PolicyInfo,
            [name, version], []);
    };
    // Plain fields move as they are; lists of records convert each element.
    (@record $wit:ty, $ours:ty, [$($field:ident),*], [$($list:ident),*]) => {
        impl ::core::convert::From<$wit> for $ours {
            fn from(value: $wit) -> Self {
                Self {
                    $($field: value.$field,)*
                    $($list: value.$list.into_iter().map(::core::convert::Into::into).collect(),)*
                }
            }
        }
        impl ::core::convert::From<$ours> for $wit {
            fn from(value: $ours) -> Self {
                Self {
                    $($field: value.$field,)*
                    $($list: value.$list.into_iter().map(::core::convert::Into::into).collect(),)*
                }
            }
        }
    };
}

impl From<&Node> for NodeResources {
    fn from(node: &Node) -> Self {
        Self {
            id: NodeId(node.id),
            memory_budget_bytes: node.memory_budget_bytes,
            compute_score: node.compute_score,
        }
    }
}

impl From<&Link> for LinkLatency {
    fn from(link: &Link) -> Self {
        Self {
            from: NodeId(link.from),
            to: NodeId(link.to),
            latency_micros: link.latency_micros,
        }
    }
}

impl From<&Model> for ModelShape {
    fn from(model: &Model) -> Self {
        ModelShape::new(
            model.layer_bytes.clone(),
            model.embedding_bytes,
            model.head_bytes,
            model.tied_embeddings,
        )
    }
}

impl From<&WaitingRequest> for Waiting {
    fn from(request: &WaitingRequest) -> Self {
        Self {
            id: request.id,
            prompt_tokens: request.prompt_tokens,
            max_tokens: request.max_tokens,
            waited_millis: request.waited_millis,
        }
    }
}

impl From<&StageLoad> for crate::StageLoad {
    fn from(load: &StageLoad) -> Self {
        Self {
            in_flight: load.in_flight,
            limit: load.limit,
        }
    }
}

impl From<&Stage> for crate::Stage {
    fn from(stage: &Stage) -> Self {
        Self {
            node: NodeId(stage.node),
            layers: Layers {
                start: stage.start,
                end: stage.end,
            },
            bytes: 0,
        }
    }
}

impl From<&crate::Plan> for Plan {
    fn from(plan: &crate::Plan) -> Self {
        Self {
            stages: plan
                .stages
                .iter()
                .map(|s| Stage {
                    node: s.node.0,
                    start: s.layers.start,
                    end: s.layers.end,
                })
                .collect(),
        }
    }
}

/// The built-in placement ([`crate::place_default`]) over the contract's
/// records.
pub fn place(cluster: &Cluster, model: &Model) -> Result<Plan, PlanError> {
    let nodes: Vec<NodeResources> = cluster.nodes.iter().map(Into::into).collect();
    let links: Vec<LinkLatency> = cluster.links.iter().map(Into::into).collect();
    let reserve_tokens = crate::KV_RESERVE_TOKENS.min(model.context_length);
    let shape = ModelShape::from(model).with_kv_reserve(
        model
            .kv_bytes_per_token_per_layer
            .saturating_mul(u64::from(reserve_tokens)),
    );
    crate::place_default(&nodes, &links, &shape).map(|plan| (&plan).into())
}

/// The built-in scheduling ([`crate::schedule_fifo`]) over the contract's
/// records.
pub fn schedule(queue: &[WaitingRequest], stages: &[StageLoad]) -> Vec<u64> {
    let queue: Vec<Waiting> = queue.iter().map(Into::into).collect();
    let stages: Vec<crate::StageLoad> = stages.iter().map(Into::into).collect();
    crate::schedule_fifo(&queue, &stages)
}

/// Checks any policy's plan against the cluster and model it was given
/// ([`crate::validate`]).
pub fn check_plan(plan: &Plan, cluster: &Cluster, model: &Model) -> Result<(), PlanViolation> {
    let nodes: Vec<NodeResources> = cluster.nodes.iter().map(Into::into).collect();
    let plan = crate::Plan {
        stages: plan.stages.iter().map(Into::into).collect(),
    };
    crate::validate(&plan, &nodes, &model.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u64, budget: u64) -> Node {
        Node {
            id,
            name: format!("n{id}"),
            device: "cpu".into(),
            memory_budget_bytes: budget,
            compute_score: 1.0,
        }
    }

    fn cluster() -> Cluster {
        Cluster {
            nodes: vec![node(1, 300), node(2, 100)],
            links: vec![Link {
                from: 1,
                to: 2,
                latency_micros: 80,
                bandwidth_bytes_per_second: 1_000,
            }],
        }
    }

    fn model() -> Model {
        Model {
            layer_count: 4,
            layer_bytes: vec![50; 4],
            embedding_bytes: 20,
            head_bytes: 20,
            tied_embeddings: false,
            // No KV cache: these budgets are for the weights alone.
            kv_bytes_per_token_per_layer: 0,
            context_length: 2048,
        }
    }

    #[test]
    fn the_built_in_placement_keeps_room_for_kv_cache_on_every_stage() {
        // One byte per token and layer: 256 bytes kept beside each layer.
        let model = Model {
            kv_bytes_per_token_per_layer: 1,
            ..model()
        };
        let cluster = |budget: u64| Cluster {
            nodes: vec![node(1, budget), node(2, budget)],
            links: Vec::new(),
        };
        // Two nodes of 150 bytes hold the weights (120 each), not the room.
        assert!(
            place(&cluster(150), &model).is_err(),
            "weights alone must not fill the budgets"
        );
        let plan = place(&cluster(700), &model).expect("placed");
        assert_eq!(plan.stages.len(), 2);
        for stage in &plan.stages {
            let layers = u64::from(stage.end - stage.start);
            let ends = if stage.start == 0 { 20 } else { 0 } + if stage.end == 4 { 20 } else { 0 };
            let weights = layers * 50 + ends;
            assert!(
                700 - weights >= layers * u64::from(crate::KV_RESERVE_TOKENS),
                "stage {stage:?} keeps {} bytes beside {weights} of weights",
                700 - weights
            );
        }
        // A short context bounds the room kept: 16 tokens here.
        let short = Model {
            context_length: 16,
            ..model
        };
        place(&cluster(160), &short).expect("16 bytes a layer fit beside the weights");
    }

    #[test]
    fn the_built_in_policy_places_and_its_plans_pass_the_check() {
        let plan = place(&cluster(), &model()).expect("placed");
        assert_eq!(plan.stages.first().map(|s| s.start), Some(0));
        assert_eq!(plan.stages.last().map(|s| s.end), Some(4));
        check_plan(&plan, &cluster(), &model()).expect("valid");
        let skipping = Plan {
            stages: vec![Stage {
                node: 1,
                start: 1,
                end: 4,
            }],
        };
        assert!(check_plan(&skipping, &cluster(), &model()).is_err());
    }

    #[test]
    fn scheduling_starts_the_longest_waiting_within_the_room() {
        let waiting = |id: u64, waited_millis: u64| WaitingRequest {
            id,
            prompt_tokens: 1,
            max_tokens: 1,
            waited_millis,
        };
        let stages = [StageLoad {
            node: 1,
            in_flight: 14,
            limit: 16,
        }];
        let queue = [waiting(1, 5), waiting(2, 50), waiting(3, 20)];
        assert_eq!(schedule(&queue, &stages), vec![2, 3]);
    }
}
