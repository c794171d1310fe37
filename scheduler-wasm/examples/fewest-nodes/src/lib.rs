//! A ringlet scheduling policy: the fewest nodes that hold the model,
//! fastest first.
//!
//! Placement: nodes sorted by compute score (fastest first), then the
//! shortest prefix of that list whose memory budgets hold the whole model,
//! each node filled with as many layers as it holds before the next one
//! starts. A small, fast cluster inside a big one keeps activations off
//! the network.
//!
//! Scheduling: shortest job first (prompt plus most tokens to generate),
//! as many as the busiest stage has room for.
//!
//! Build: `cargo build --release --target wasm32-wasip2`, then upload
//! `target/wasm32-wasip2/release/fewest_nodes.wasm` to a node.

wit_bindgen::generate!({ world: "policy", path: "../../../wit" });

use ringlet::scheduler::types::{Node, Stage};

struct FewestNodes;

impl Guest for FewestNodes {
    fn info() -> PolicyInfo {
        PolicyInfo {
            name: "fewest-nodes".into(),
            version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    fn place(cluster: Cluster, model: Model) -> Result<Plan, String> {
        let mut nodes = cluster.nodes;
        nodes.sort_by(|a, b| {
            b.compute_score
                .total_cmp(&a.compute_score)
                .then(a.id.cmp(&b.id))
        });
        for count in 1..=nodes.len() {
            if let Some(stages) = fill(&nodes[..count], &model) {
                return Ok(Plan { stages });
            }
        }
        let total: u64 = nodes.iter().map(|n| n.memory_budget_bytes).sum();
        Err(format!(
            "the model does not fit: {} nodes offer {} MiB together",
            nodes.len(),
            total >> 20
        ))
    }

    fn schedule(queue: Vec<WaitingRequest>, stages: Vec<StageLoad>) -> Vec<u64> {
        let room = stages
            .iter()
            .map(|s| s.limit.saturating_sub(s.in_flight))
            .min()
            .unwrap_or(0);
        let mut queue = queue;
        queue.sort_by_key(|w| (u64::from(w.prompt_tokens) + u64::from(w.max_tokens), w.id));
        queue.iter().take(room as usize).map(|w| w.id).collect()
    }
}

/// Fills `nodes` in order, each with as many layers as its budget holds;
/// `None` when they do not hold every layer. A node that would hold none is
/// left out.
fn fill(nodes: &[Node], model: &Model) -> Option<Vec<Stage>> {
    let layers = model.layer_bytes.len();
    let mut stages = Vec::new();
    let mut next = 0usize;
    for node in nodes {
        if next == layers {
            break;
        }
        let start = next;
        let mut used = if start == 0 { model.embedding_bytes } else { 0 };
        while next < layers {
            let mut needed = used + model.layer_bytes[next];
            if next + 1 == layers {
                // The last layer brings the head; tied to the embedding, it
                // costs nothing more on a node that holds both.
                let shared = start == 0 && model.tied_embeddings;
                needed += if shared {
                    model.head_bytes.saturating_sub(model.embedding_bytes)
                } else {
                    model.head_bytes
                };
            }
            if needed > node.memory_budget_bytes {
                break;
            }
            used = needed;
            next += 1;
        }
        if next > start {
            stages.push(Stage {
                node: node.id,
                start: start as u32,
                end: next as u32,
            });
        }
    }
    (next == layers).then_some(stages)
}

export!(FewestNodes);
