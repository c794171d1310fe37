//! ringlet's default placement policy: which node holds which contiguous
//! layers of the model.
//!
//! This crate is pure logic (no IO, no clock, no randomness) so that the
//! same code runs natively in the node today and as a WebAssembly
//! component behind `wit/` tomorrow, and so that it is tested on the host.
//!
//! The policy, [`plan_memory_weighted`], gives each node a contiguous range
//! of layers whose bytes are proportional to its memory budget, never more
//! than the budget, and leaves out nodes that cannot hold one layer.
//! [`validate`] checks any plan (from this policy or another) against the
//! cluster and the model. [`place_default`] adds the ring order
//! ([`order_by_latency`]) and [`schedule_fifo`] picks which waiting requests
//! start. [`contract`] is the WIT contract as plain Rust: its records,
//! the conversions to and from any generated bindings (written once, used
//! by the node and by this crate's component), and the built-in policy
//! over them. Built for `wasm32`, the crate is also the default policy
//! component (`component.rs`, the WIT glue).

#[cfg(target_arch = "wasm32")]
mod component;
pub mod contract;

use std::fmt;

use serde::{Deserialize, Serialize};

/// Identifies a node in the cluster.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
pub struct NodeId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A half-open range `[start, end)` of transformer layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Layers {
    pub start: u32,
    pub end: u32,
}

impl Layers {
    pub fn len(&self) -> u32 {
        self.end.saturating_sub(self.start)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Display for Layers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.start, self.end)
    }
}

/// KV cache the built-in placement keeps room for beside the weights on
/// every stage, in tokens of each layer the stage holds (at most the
/// model's context): enough for a short conversation on the smallest
/// stage. The nodes admit requests by what each stage really has left
/// (its memory budget less its weights); this only keeps a placement
/// from filling a budget with weights alone.
pub const KV_RESERVE_TOKENS: u32 = 256;

/// What placement needs to know about a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeResources {
    pub id: NodeId,
    /// Bytes of memory the node offers for weights and KV cache.
    pub memory_budget_bytes: u64,
    /// Relative compute speed (higher is faster); informational here.
    pub compute_score: f64,
}

/// What placement needs to know about a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelShape {
    /// Weight bytes of each transformer layer, in order.
    pub layer_bytes: Vec<u64>,
    /// KV-cache bytes reserved per layer on the node that holds it.
    pub kv_reserve_bytes_per_layer: u64,
    /// Held by the node with the first layer (the token embedding).
    pub first_bytes: u64,
    /// Held by the node with the last layer (output norm and projection).
    pub last_bytes: u64,
    /// Counted in both `first_bytes` and `last_bytes` but held once when
    /// one node has both ends (tied embeddings).
    pub shared_ends_bytes: u64,
}

impl ModelShape {
    /// The shape of a model whose layers take `layer_bytes`, with the token
    /// embedding on the first stage and the head on the last; with tied
    /// embeddings the head is the embedding, held once by a single stage.
    pub fn new(
        layer_bytes: Vec<u64>,
        embedding_bytes: u64,
        head_bytes: u64,
        tied_embeddings: bool,
    ) -> Self {
        Self {
            layer_bytes,
            kv_reserve_bytes_per_layer: 0,
            first_bytes: embedding_bytes,
            last_bytes: head_bytes,
            shared_ends_bytes: if tied_embeddings { embedding_bytes } else { 0 },
        }
    }

    /// The same model with room for `bytes` of KV cache kept beside each
    /// layer.
    pub fn with_kv_reserve(self, bytes: u64) -> Self {
        Self {
            kv_reserve_bytes_per_layer: bytes,
            ..self
        }
    }

    pub fn n_layers(&self) -> u32 {
        self.layer_bytes.len() as u32
    }

    /// Bytes a node holding `layers` needs.
    pub fn bytes_for(&self, layers: Layers) -> u64 {
        let (start, end) = (
            layers.start as usize,
            (layers.end as usize).min(self.layer_bytes.len()),
        );
        if start >= end {
            return 0;
        }
        let mut bytes: u64 = self.layer_bytes[start..end]
            .iter()
            .map(|b| b + self.kv_reserve_bytes_per_layer)
            .sum();
        let (first, last) = (start == 0, end == self.layer_bytes.len());
        if first {
            bytes += self.first_bytes;
        }
        if last {
            bytes += self.last_bytes;
        }
        if first && last {
            bytes -= self.shared_ends_bytes.min(bytes);
        }
        bytes
    }

    /// Bytes of the whole model on one node.
    pub fn total_bytes(&self) -> u64 {
        self.bytes_for(Layers {
            start: 0,
            end: self.n_layers(),
        })
    }
}

/// One node's part of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stage {
    pub node: NodeId,
    pub layers: Layers,
    /// Bytes the node needs for these layers (weights and KV reserve).
    pub bytes: u64,
}

/// Stages in ring order: activations flow from the first to the last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub stages: Vec<Stage>,
}

/// Why no plan could be made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanError {
    NoNodes,
    EmptyModel,
    /// The model needs more memory than the nodes offer together.
    DoesNotFit {
        needed_bytes: u64,
        available_bytes: u64,
    },
    /// The totals fit, but not in whole layers on these nodes.
    NoLayerSplit {
        needed_bytes: u64,
        available_bytes: u64,
    },
}

/// Bytes for people: `88.1 MiB`, `40.2 GiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlanError::NoNodes => write!(f, "no node can hold even one layer of the model"),
            PlanError::EmptyModel => write!(f, "the model has no layers"),
            PlanError::DoesNotFit {
                needed_bytes,
                available_bytes,
            } => write!(
                f,
                "the model needs {} (weights and room for KV cache) but the cluster's memory budgets add up to {}: {} short; add a node or raise --memory-budget",
                human_bytes(*needed_bytes),
                human_bytes(*available_bytes),
                human_bytes(needed_bytes - available_bytes)
            ),
            PlanError::NoLayerSplit {
                needed_bytes,
                available_bytes,
            } => write!(
                f,
                "the model needs {} and the cluster offers {}, but whole layers do not fit the nodes' budgets; add a node or raise --memory-budget",
                human_bytes(*needed_bytes),
                human_bytes(*available_bytes)
            ),
        }
    }
}

impl std::error::Error for PlanError {}

/// Memory-weighted contiguous placement.
///
/// Nodes keep the order given (the ring order). Each gets the contiguous
/// layers whose bytes (embedding and head included) come closest to its
/// share of the model, in proportion to its budget, so every node fills
/// about the same fraction of its budget, within its budget, and never so few that the
/// nodes after it could not hold the rest. A node that cannot hold one
/// layer, or whose share rounds to nothing, is left out.
pub fn plan_memory_weighted(
    nodes: &[NodeResources],
    model: &ModelShape,
) -> Result<Plan, PlanError> {
    let n_layers = model.n_layers();
    if n_layers == 0 {
        return Err(PlanError::EmptyModel);
    }
    let biggest_layer =
        model.layer_bytes.iter().max().copied().unwrap_or(0) + model.kv_reserve_bytes_per_layer;
    let usable: Vec<&NodeResources> = nodes
        .iter()
        .filter(|n| n.memory_budget_bytes >= biggest_layer)
        .collect();
    if usable.is_empty() {
        return Err(PlanError::NoNodes);
    }
    let needed = model.total_bytes();
    let available: u64 = usable.iter().map(|n| n.memory_budget_bytes).sum();
    if needed > available {
        return Err(PlanError::DoesNotFit {
            needed_bytes: needed,
            available_bytes: available,
        });
    }
    let no_split = PlanError::NoLayerSplit {
        needed_bytes: needed,
        available_bytes: available,
    };
    let sums = ByteSums::new(model);
    // Across several nodes the ends are held separately (a tied embedding
    // twice), so shares are of this total.
    let layers_total: u64 = model
        .layer_bytes
        .iter()
        .map(|b| b + model.kv_reserve_bytes_per_layer)
        .sum();
    let split_total = if usable.len() > 1 {
        layers_total + model.first_bytes + model.last_bytes
    } else {
        needed
    };
    // Bytes held by the stages covering layers 0..end, ends counted apart.
    let bytes_up_to = |end: u32| -> u64 {
        let layers: u64 = model.layer_bytes[..end as usize]
            .iter()
            .map(|b| b + model.kv_reserve_bytes_per_layer)
            .sum();
        layers + model.first_bytes + if end == n_layers { model.last_bytes } else { 0 }
    };

    let mut stages = Vec::new();
    let mut start = 0u32;
    let mut budget_so_far = 0u64;
    for (i, node) in usable.iter().enumerate() {
        budget_so_far += node.memory_budget_bytes;
        let rest = &usable[i + 1..];
        let end = if rest.is_empty() {
            n_layers
        } else {
            // Furthest end this node can hold, and nearest end that leaves
            // the rest coverable by the nodes after it.
            let hi = (start..=n_layers)
                .rev()
                .find(|&e| sums.bytes_for(Layers { start, end: e }) <= node.memory_budget_bytes)
                .unwrap_or(start);
            // The rest covers from `e` on for every `e` past some point:
            // find the first by bisection.
            let (mut below, mut lo) = (start, n_layers);
            if !can_cover(rest, &sums, lo) {
                return Err(no_split);
            }
            if can_cover(rest, &sums, start) {
                lo = start;
            } else {
                while lo - below > 1 {
                    let middle = below + (lo - below) / 2;
                    if can_cover(rest, &sums, middle) {
                        lo = middle;
                    } else {
                        below = middle;
                    }
                }
            }
            if lo > hi {
                return Err(no_split);
            }
            let target = (split_total as f64 * budget_so_far as f64 / available as f64) as u64;
            (lo..=hi)
                .min_by_key(|&e| bytes_up_to(e).abs_diff(target))
                .unwrap_or(lo)
        };
        let layers = Layers { start, end };
        let bytes = sums.bytes_for(layers);
        if bytes > node.memory_budget_bytes {
            return Err(no_split);
        }
        if !layers.is_empty() {
            stages.push(Stage {
                node: node.id,
                layers,
                bytes,
            });
        }
        start = end;
        if start == n_layers {
            break;
        }
    }
    if start != n_layers {
        return Err(no_split);
    }
    Ok(Plan { stages })
}

/// True when `nodes`, in order, can hold layers `from..` to the end: each
/// node from the last backwards takes as many layers as fit, which is the
/// most any assignment of ordered contiguous ranges can cover.
fn can_cover(nodes: &[&NodeResources], sums: &ByteSums, from: u32) -> bool {
    let mut end = sums.model.n_layers();
    for node in nodes.iter().rev() {
        if end <= from {
            break;
        }
        let start = (from..end)
            .find(|&s| sums.bytes_for(Layers { start: s, end }) <= node.memory_budget_bytes)
            .unwrap_or(end);
        end = start;
    }
    end <= from
}

/// [`ModelShape::bytes_for`] in constant time, from prefix sums: planning
/// asks it for many ranges, and must stay cheap for 64 nodes in Wasm.
struct ByteSums<'a> {
    model: &'a ModelShape,
    /// `prefix[k]`: bytes of layers `0..k`, KV reserve included.
    prefix: Vec<u64>,
}

impl<'a> ByteSums<'a> {
    fn new(model: &'a ModelShape) -> Self {
        let mut prefix = Vec::with_capacity(model.layer_bytes.len() + 1);
        prefix.push(0);
        let mut total = 0u64;
        for bytes in &model.layer_bytes {
            total += bytes + model.kv_reserve_bytes_per_layer;
            prefix.push(total);
        }
        Self { model, prefix }
    }

    /// The same as `ModelShape::bytes_for`.
    fn bytes_for(&self, layers: Layers) -> u64 {
        let n = self.model.layer_bytes.len();
        let (start, end) = (layers.start as usize, (layers.end as usize).min(n));
        if start >= end {
            return 0;
        }
        let mut bytes = self.prefix[end] - self.prefix[start];
        let (first, last) = (start == 0, end == n);
        if first {
            bytes += self.model.first_bytes;
        }
        if last {
            bytes += self.model.last_bytes;
        }
        if first && last {
            bytes -= self.model.shared_ends_bytes.min(bytes);
        }
        bytes
    }
}

/// What is known of the latency between two nodes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LinkLatency {
    pub from: NodeId,
    pub to: NodeId,
    pub latency_micros: u64,
}

/// The ring order with a low total latency: starting from the lowest id,
/// always the nearest unvisited node next, then 2-opt reversals while they
/// shorten the ring (at most `n` passes of `n²/2` candidates each, so 64
/// nodes take well under a million steps). A pair's latency is the lower
/// of its two measurements; pairs with none count as very far, so with no
/// measurements at all the order stays by id.
pub fn order_by_latency(nodes: &[NodeResources], links: &[LinkLatency]) -> Vec<NodeResources> {
    const UNKNOWN_MICROS: u64 = 1_000_000_000;
    let mut nodes: Vec<NodeResources> = nodes.to_vec();
    nodes.sort_by_key(|n| n.id);
    let n = nodes.len();
    if n < 3 {
        return nodes;
    }
    let mut latency = vec![UNKNOWN_MICROS; n * n];
    for link in links {
        let from = nodes.binary_search_by_key(&link.from, |n| n.id);
        let to = nodes.binary_search_by_key(&link.to, |n| n.id);
        if let (Ok(a), Ok(b)) = (from, to) {
            let micros = link.latency_micros.min(UNKNOWN_MICROS);
            latency[a * n + b] = latency[a * n + b].min(micros);
            latency[b * n + a] = latency[b * n + a].min(micros);
        }
    }
    let d = |a: usize, b: usize| latency[a * n + b];
    let mut order = vec![0usize];
    let mut left: Vec<usize> = (1..n).collect();
    while !left.is_empty() {
        let last = order[order.len() - 1];
        // Ties go to the lowest id: `left` is in id order.
        let k = (0..left.len())
            .min_by_key(|&k| (d(last, left[k]), k))
            .unwrap_or(0);
        order.push(left.remove(k));
    }
    for _ in 0..n {
        let mut improved = false;
        for i in 1..n - 1 {
            for j in i + 1..n {
                // Reversing order[i..=j] swaps two edges of the ring.
                let (before, after) = (order[i - 1], order[(j + 1) % n]);
                let old = d(before, order[i]) + d(order[j], after);
                let new = d(before, order[j]) + d(order[i], after);
                if new < old {
                    order[i..=j].reverse();
                    improved = true;
                }
            }
        }
        if !improved {
            break;
        }
    }
    order.into_iter().map(|i| nodes[i].clone()).collect()
}

/// The default placement: a low-latency ring order, memory-weighted
/// ranges; if that order cannot hold the model, the order by id.
pub fn place_default(
    nodes: &[NodeResources],
    links: &[LinkLatency],
    model: &ModelShape,
) -> Result<Plan, PlanError> {
    let ordered = order_by_latency(nodes, links);
    plan_memory_weighted(&ordered, model).or_else(|error| {
        let mut by_id = nodes.to_vec();
        by_id.sort_by_key(|n| n.id);
        plan_memory_weighted(&by_id, model).map_err(|_| error)
    })
}

/// A request waiting to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Waiting {
    pub id: u64,
    pub prompt_tokens: u32,
    pub max_tokens: u32,
    pub waited_millis: u64,
}

/// How busy one stage is: requests in flight through it, and its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageLoad {
    pub in_flight: u32,
    pub limit: u32,
}

/// The default scheduling: first come, first served, as many as the
/// busiest stage has room for.
pub fn schedule_fifo(queue: &[Waiting], stages: &[StageLoad]) -> Vec<u64> {
    let room = stages
        .iter()
        .map(|s| s.limit.saturating_sub(s.in_flight))
        .min()
        .unwrap_or(0) as usize;
    let mut queue = queue.to_vec();
    // Stable: requests that waited equally long keep their queue order
    // (ids are random, so they say nothing about arrival).
    queue.sort_by_key(|w| std::cmp::Reverse(w.waited_millis));
    queue.into_iter().take(room).map(|w| w.id).collect()
}

/// Why a plan is unacceptable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanViolation {
    Empty,
    UnknownNode {
        node: NodeId,
    },
    NodeTwice {
        node: NodeId,
    },
    EmptyStage {
        node: NodeId,
    },
    /// Stage `index` starts at `start`, but the previous ended at `expected`.
    Gap {
        index: usize,
        expected: u32,
        start: u32,
    },
    /// The last stage ends before (or after) the model's last layer.
    WrongEnd {
        end: u32,
        n_layers: u32,
    },
    OverBudget {
        node: NodeId,
        bytes: u64,
        budget_bytes: u64,
    },
}

impl fmt::Display for PlanViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlanViolation::Empty => write!(f, "the plan has no stages"),
            PlanViolation::UnknownNode { node } => {
                write!(f, "the plan names node {node}, which is not in the cluster")
            }
            PlanViolation::NodeTwice { node } => write!(f, "the plan gives node {node} two stages"),
            PlanViolation::EmptyStage { node } => {
                write!(f, "the plan gives node {node} an empty layer range")
            }
            PlanViolation::Gap {
                index,
                expected,
                start,
            } if start < expected => {
                write!(
                    f,
                    "layers {start}..{expected} are placed twice: stage {index} starts at layer {start}, but the stages before it already hold up to layer {expected}"
                )
            }
            PlanViolation::Gap {
                index,
                expected,
                start,
            } => {
                write!(
                    f,
                    "layers {expected}..{start} are placed nowhere: stage {index} starts at layer {start}, but the stages before it end at layer {expected}"
                )
            }
            PlanViolation::WrongEnd { end, n_layers } => {
                write!(
                    f,
                    "the plan ends at layer {end}, but the model has {n_layers} layers"
                )
            }
            PlanViolation::OverBudget {
                node,
                bytes,
                budget_bytes,
            } => {
                write!(
                    f,
                    "node {node} would need {bytes} bytes but its budget is {budget_bytes}"
                )
            }
        }
    }
}

impl std::error::Error for PlanViolation {}

/// Checks that `plan` covers every layer exactly once with contiguous
/// ranges, on known nodes, one stage per node, each within its budget.
pub fn validate(
    plan: &Plan,
    nodes: &[NodeResources],
    model: &ModelShape,
) -> Result<(), PlanViolation> {
    if plan.stages.is_empty() {
        return Err(PlanViolation::Empty);
    }
    let mut expected = 0u32;
    let mut seen = Vec::new();
    for (index, stage) in plan.stages.iter().enumerate() {
        let node = nodes
            .iter()
            .find(|n| n.id == stage.node)
            .ok_or(PlanViolation::UnknownNode { node: stage.node })?;
        if stage.layers.is_empty() {
            return Err(PlanViolation::EmptyStage { node: stage.node });
        }
        if stage.layers.start != expected {
            return Err(PlanViolation::Gap {
                index,
                expected,
                start: stage.layers.start,
            });
        }
        if seen.contains(&stage.node) {
            return Err(PlanViolation::NodeTwice { node: stage.node });
        }
        seen.push(stage.node);
        let bytes = model.bytes_for(stage.layers);
        if bytes > node.memory_budget_bytes {
            return Err(PlanViolation::OverBudget {
                node: stage.node,
                bytes,
                budget_bytes: node.memory_budget_bytes,
            });
        }
        expected = stage.layers.end;
    }
    if expected != model.n_layers() {
        return Err(PlanViolation::WrongEnd {
            end: expected,
            n_layers: model.n_layers(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// The default model's shape: 30 layers of about 2 MiB, a 28.7 MiB
    /// tied embedding.
    fn smollm() -> ModelShape {
        ModelShape {
            layer_bytes: vec![2_075_904; 30],
            kv_reserve_bytes_per_layer: 0,
            first_bytes: 30_081_024,
            last_bytes: 30_081_024 + 2_304,
            shared_ends_bytes: 30_081_024,
        }
    }

    fn nodes(budgets_mib: &[u64]) -> Vec<NodeResources> {
        budgets_mib
            .iter()
            .enumerate()
            .map(|(i, b)| NodeResources {
                id: NodeId(i as u64 + 1),
                memory_budget_bytes: b * MIB,
                compute_score: 1.0,
            })
            .collect()
    }

    fn ranges(plan: &Plan) -> Vec<(u64, u32, u32)> {
        plan.stages
            .iter()
            .map(|s| (s.node.0, s.layers.start, s.layers.end))
            .collect()
    }

    #[test]
    fn placements() {
        // (budgets in MiB, expected (node, start, end) of each stage)
        type Case<'a> = (&'a [u64], &'a [(u64, u32, u32)]);
        let cases: &[Case] = &[
            (&[200], &[(1, 0, 30)]),
            // Equal budgets, equal bytes: the ends hold the 28.7 MiB embedding
            // and head, so they get fewer layers (about 39 MiB each).
            (&[60, 60, 60], &[(1, 0, 5), (2, 5, 25), (3, 25, 30)]),
            (&[45, 45, 45], &[(1, 0, 5), (2, 5, 25), (3, 25, 30)]),
            // A node too small for one layer gets none.
            (&[100, 1, 100], &[(1, 0, 15), (3, 15, 30)]),
            // A share smaller than the embedding rounds to nothing.
            (&[40, 200], &[(2, 0, 30)]),
            // Tight budgets: as many layers as fit, ends kept thin.
            (
                &[31, 31, 31, 31],
                &[(1, 0, 1), (2, 1, 15), (3, 15, 29), (4, 29, 30)],
            ),
        ];
        for (budgets, expected) in cases {
            let plan = plan_memory_weighted(&nodes(budgets), &smollm()).expect("a plan");
            assert_eq!(ranges(&plan), expected.to_vec(), "budgets {budgets:?}");
            validate(&plan, &nodes(budgets), &smollm()).expect("valid");
        }
    }

    #[test]
    fn rings_follow_low_latency() {
        let nodes = nodes(&[60, 60, 60, 60]);
        let link = |a: u64, b: u64, us: u64| LinkLatency {
            from: NodeId(a),
            to: NodeId(b),
            latency_micros: us,
        };
        // 1 and 3 are close, 2 and 4 are close, the pairs are far apart.
        let links = [
            link(1, 3, 10),
            link(2, 4, 10),
            link(1, 2, 900),
            link(3, 4, 50),
            link(1, 4, 900),
            link(2, 3, 900),
        ];
        let order: Vec<u64> = order_by_latency(&nodes, &links)
            .iter()
            .map(|n| n.id.0)
            .collect();
        assert_eq!(order, vec![1, 3, 4, 2]);
        // No measurements: by id.
        let order: Vec<u64> = order_by_latency(&nodes, &[])
            .iter()
            .map(|n| n.id.0)
            .collect();
        assert_eq!(order, vec![1, 2, 3, 4]);
        // The plan follows that order (the first node's byte share, smaller
        // than the embedding, rounds to nothing).
        let plan = place_default(&nodes, &links, &smollm()).expect("plan");
        validate(&plan, &nodes, &smollm()).expect("valid");
        assert_eq!(
            plan.stages.iter().map(|s| s.node.0).collect::<Vec<_>>(),
            vec![3, 4, 2]
        );
    }

    #[test]
    fn fifo_takes_the_longest_waiting_up_to_the_room() {
        let w = |id: u64, waited: u64| Waiting {
            id,
            prompt_tokens: 10,
            max_tokens: 10,
            waited_millis: waited,
        };
        let queue = [w(1, 5), w(2, 50), w(3, 20)];
        let load = |in_flight: u32| StageLoad {
            in_flight,
            limit: 16,
        };
        assert_eq!(schedule_fifo(&queue, &[load(14)]), vec![2, 3]);
        assert_eq!(schedule_fifo(&queue, &[load(16)]), Vec::<u64>::new());
        assert_eq!(schedule_fifo(&queue, &[load(0)]), vec![2, 3, 1]);
        // The busiest stage decides; no stages means no plan, no room.
        assert_eq!(
            schedule_fifo(&queue, &[load(0), load(15), load(3)]),
            vec![2]
        );
        assert_eq!(schedule_fifo(&queue, &[]), Vec::<u64>::new());
    }

    #[test]
    fn byte_sums_agree_with_the_model() {
        let mut uneven = smollm();
        uneven.layer_bytes = (0..30).map(|i| 1_000_000 + i * 7_919).collect();
        uneven.kv_reserve_bytes_per_layer = 4_096;
        for model in [smollm(), uneven] {
            let sums = ByteSums::new(&model);
            for start in 0..=30 {
                for end in 0..=31 {
                    let layers = Layers { start, end };
                    assert_eq!(sums.bytes_for(layers), model.bytes_for(layers), "{layers}");
                }
            }
        }
    }

    #[test]
    fn rings_of_sixty_four_nodes_order_and_place() {
        // Nodes on a line: the latency between two is their distance, so
        // the shortest ring runs along the line and back (2 × 63 hops).
        let nodes = nodes(&[40; 64]);
        let position = |id: u64| (id * 37) % 64;
        let mut links = Vec::new();
        for a in &nodes {
            for b in &nodes {
                if a.id != b.id {
                    links.push(LinkLatency {
                        from: a.id,
                        to: b.id,
                        latency_micros: 100 * position(a.id.0).abs_diff(position(b.id.0)),
                    });
                }
            }
        }
        let order = order_by_latency(&nodes, &links);
        let mut ids: Vec<u64> = order.iter().map(|n| n.id.0).collect();
        let ring: u64 = (0..64)
            .map(|i| position(ids[i]).abs_diff(position(ids[(i + 1) % 64])))
            .sum();
        assert_eq!(ring, 2 * 63, "{ids:?}");
        ids.sort_unstable();
        assert_eq!(ids, (1..=64).collect::<Vec<_>>());
        let plan = place_default(&nodes, &links, &smollm()).expect("plan");
        validate(&plan, &nodes, &smollm()).expect("valid");
    }

    #[test]
    fn human_bytes_reads_well() {
        assert_eq!(human_bytes(512), "512 bytes");
        assert_eq!(human_bytes(92_360_448), "88.1 MiB");
        assert_eq!(human_bytes(40 << 30), "40.0 GiB");
    }

    #[test]
    fn refusals_name_the_shortfall() {
        let model = smollm();
        let err = plan_memory_weighted(&nodes(&[40]), &model).expect_err("too small");
        assert_eq!(
            err,
            PlanError::DoesNotFit {
                needed_bytes: model.total_bytes(),
                available_bytes: 40 * MIB
            }
        );
        assert!(err.to_string().contains("short"), "{err}");
        assert_eq!(
            plan_memory_weighted(&nodes(&[1, 1]), &model),
            Err(PlanError::NoNodes)
        );
        // 3 × 31 MiB is more than the 88 MiB the model needs on one node,
        // but split, the ends hold the embedding twice: 1 + 15 + 1 layers.
        let err = plan_memory_weighted(&nodes(&[31, 31, 31]), &model).expect_err("no split");
        assert!(matches!(err, PlanError::NoLayerSplit { .. }), "{err:?}");
        let empty = ModelShape {
            layer_bytes: vec![],
            ..smollm()
        };
        assert_eq!(
            plan_memory_weighted(&nodes(&[10]), &empty),
            Err(PlanError::EmptyModel)
        );
    }

    #[test]
    fn every_plan_made_is_valid_and_tight() {
        // Many pseudo-random clusters and models.
        let mut state = 0x2545F4914F6CDD1Du64;
        let mut next = move |m: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % m
        };
        for _ in 0..2000 {
            let n_layers = 1 + next(40) as usize;
            let model = ModelShape {
                layer_bytes: (0..n_layers).map(|_| 1 + next(100)).collect(),
                kv_reserve_bytes_per_layer: next(5),
                first_bytes: next(300),
                last_bytes: next(300),
                shared_ends_bytes: 0,
            };
            let cluster: Vec<NodeResources> = (0..1 + next(6))
                .map(|i| NodeResources {
                    id: NodeId(i),
                    memory_budget_bytes: next(2500),
                    compute_score: 1.0,
                })
                .collect();
            match plan_memory_weighted(&cluster, &model) {
                Ok(plan) => validate(&plan, &cluster, &model).expect("plans are valid"),
                Err(PlanError::DoesNotFit {
                    needed_bytes,
                    available_bytes,
                }) => assert!(needed_bytes > available_bytes),
                Err(PlanError::NoLayerSplit { .. } | PlanError::NoNodes) => {
                    // No ordered contiguous split exists: the greedy cover from
                    // the front fails too.
                    let usable: Vec<&NodeResources> = cluster.iter().collect();
                    assert!(
                        !can_cover(&usable, &ByteSums::new(&model), 0),
                        "a plan was possible: {cluster:?} {model:?}"
                    );
                }
                Err(e) => panic!("unexpected {e}"),
            }
        }
    }

    #[test]
    fn validate_catches_bad_plans() {
        let model = smollm();
        let cluster = nodes(&[50, 100]);
        let stage = |node: u64, start: u32, end: u32| Stage {
            node: NodeId(node),
            layers: Layers { start, end },
            bytes: 0,
        };
        let cases: Vec<(Vec<Stage>, PlanViolation)> = vec![
            (vec![], PlanViolation::Empty),
            (
                vec![stage(9, 0, 30)],
                PlanViolation::UnknownNode { node: NodeId(9) },
            ),
            (
                vec![stage(1, 0, 10), stage(1, 10, 30)],
                PlanViolation::NodeTwice { node: NodeId(1) },
            ),
            (
                vec![stage(1, 0, 0), stage(2, 0, 30)],
                PlanViolation::EmptyStage { node: NodeId(1) },
            ),
            (
                vec![stage(1, 0, 10), stage(2, 12, 30)],
                PlanViolation::Gap {
                    index: 1,
                    expected: 10,
                    start: 12,
                },
            ),
            (
                vec![stage(1, 0, 10), stage(2, 9, 30)],
                PlanViolation::Gap {
                    index: 1,
                    expected: 10,
                    start: 9,
                },
            ),
            (
                vec![stage(1, 0, 10), stage(2, 10, 29)],
                PlanViolation::WrongEnd {
                    end: 29,
                    n_layers: 30,
                },
            ),
            (
                vec![stage(1, 0, 29), stage(2, 29, 30)],
                PlanViolation::OverBudget {
                    node: NodeId(1),
                    bytes: model.bytes_for(Layers { start: 0, end: 29 }),
                    budget_bytes: 50 * MIB,
                },
            ),
        ];
        for (stages, violation) in cases {
            assert_eq!(
                validate(&Plan { stages }, &cluster, &model),
                Err(violation.clone()),
                "{violation}"
            );
        }
        // Gaps say which layers are missing or doubled.
        let gap = |start| {
            PlanViolation::Gap {
                index: 1,
                expected: 10,
                start,
            }
            .to_string()
        };
        assert!(
            gap(12).starts_with("layers 10..12 are placed nowhere"),
            "{}",
            gap(12)
        );
        assert!(
            gap(9).starts_with("layers 9..10 are placed twice"),
            "{}",
            gap(9)
        );
    }
}
