//! The WIT glue that makes this crate the default policy component: convert
//! the WIT records, call the plain Rust policy, convert back. No logic here.

wit_bindgen::generate!({ world: "policy", path: "../wit" });

// The world's `use types.{…}` already brings Cluster, Model, Plan,
// WaitingRequest, StageLoad and PolicyInfo into scope.
use crate::{LinkLatency, ModelShape, NodeId, NodeResources, Waiting};
use ringlet::scheduler::types::Stage;

struct DefaultPolicy;

impl Guest for DefaultPolicy {
    fn info() -> PolicyInfo {
        PolicyInfo {
            name: "memory-weighted".into(),
            version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    fn place(cluster: Cluster, model: Model) -> Result<Plan, String> {
        let nodes: Vec<NodeResources> = cluster
            .nodes
            .iter()
            .map(|n| NodeResources {
                id: NodeId(n.id),
                memory_budget_bytes: n.memory_budget_bytes,
                compute_score: n.compute_score,
            })
            .collect();
        let links: Vec<LinkLatency> = cluster
            .links
            .iter()
            .map(|l| LinkLatency {
                from: NodeId(l.from),
                to: NodeId(l.to),
                latency_micros: l.latency_micros,
            })
            .collect();
        let shape = ModelShape::new(
            model.layer_bytes,
            model.embedding_bytes,
            model.head_bytes,
            model.tied_embeddings,
        );
        let plan = crate::place_default(&nodes, &links, &shape).map_err(|e| e.to_string())?;
        Ok(Plan {
            stages: plan
                .stages
                .iter()
                .map(|s| Stage {
                    node: s.node.0,
                    start: s.layers.start,
                    end: s.layers.end,
                })
                .collect(),
        })
    }

    fn schedule(queue: Vec<WaitingRequest>, stages: Vec<StageLoad>) -> Vec<u64> {
        let queue: Vec<Waiting> = queue
            .iter()
            .map(|w| Waiting {
                id: w.id,
                prompt_tokens: w.prompt_tokens,
                max_tokens: w.max_tokens,
                waited_millis: w.waited_millis,
            })
            .collect();
        let stages: Vec<crate::StageLoad> = stages
            .iter()
            .map(|s| crate::StageLoad {
                in_flight: s.in_flight,
                limit: s.limit,
            })
            .collect();
        crate::schedule_fifo(&queue, &stages)
    }
}

export!(DefaultPolicy);
