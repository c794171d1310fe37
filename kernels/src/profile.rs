//! Where the time of forward steps goes, per kind of op. Off unless the
//! node turns it on (`ringlet bench --profile`); when off, an op costs one
//! relaxed atomic load.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// The kinds of work in a forward step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A whole step, for the time not spent in any op below.
    Step,
    /// Quantized matrix products in the attention (Q, K, V, output).
    AttentionMatmul,
    /// Quantized matrix products in the MLP (gate, up, down).
    MlpMatmul,
    /// The output head (vocabulary logits).
    Head,
    /// RoPE, the KV-cache append and attention over the cache.
    Attention,
    /// RMS norms.
    Norm,
    /// SwiGLU and the residual additions.
    Elementwise,
    /// Embedding lookup.
    Embed,
}

impl Op {
    pub const ALL: [Op; 8] = [
        Op::Step,
        Op::AttentionMatmul,
        Op::MlpMatmul,
        Op::Head,
        Op::Attention,
        Op::Norm,
        Op::Elementwise,
        Op::Embed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::Step => "whole step",
            Op::AttentionMatmul => "matmul: attention Q, K, V, O",
            Op::MlpMatmul => "matmul: MLP gate, up, down",
            Op::Head => "matmul: output head",
            Op::Attention => "attention (RoPE, cache, scores, softmax, sum)",
            Op::Norm => "RMS norm",
            Op::Elementwise => "SwiGLU and residual adds",
            Op::Embed => "embedding lookup",
        }
    }
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];
static CALLS: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];

/// Starts (or stops) measuring.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// The time and number of calls of each op since the last call, resetting
/// them.
pub fn take() -> Vec<(Op, u64, u64)> {
    Op::ALL
        .iter()
        .enumerate()
        .map(|(i, op)| {
            (
                *op,
                NANOS[i].swap(0, Ordering::Relaxed),
                CALLS[i].swap(0, Ordering::Relaxed),
            )
        })
        .collect()
}

/// Measures until dropped.
pub(crate) struct Span {
    op: Op,
    started: Option<Instant>,
}

pub(crate) fn span(op: Op) -> Span {
    Span {
        op,
        started: ENABLED.load(Ordering::Relaxed).then(Instant::now),
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some(started) = self.started {
            // `Op::ALL` lists the ops in declaration order.
            let i = self.op as usize;
            let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
            NANOS[i].fetch_add(nanos, Ordering::Relaxed);
            CALLS[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_are_listed_in_declaration_order() {
        for (i, op) in Op::ALL.iter().enumerate() {
            assert_eq!(*op as usize, i, "{op:?}");
        }
    }
}
