//! Typed identifiers shared by the kernels and the wire protocol.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A half-open range `[start, end)` of transformer layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LayerRange {
    pub start: usize,
    pub end: usize,
}

impl LayerRange {
    pub fn new(start: usize, end: usize) -> Self {
        Self { start, end }
    }

    pub fn len(&self) -> usize {
        self.end.saturating_sub(self.start)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True when this range starts the model and so takes token ids.
    pub fn is_first(&self) -> bool {
        self.start == 0
    }

    /// True when this range ends the model of `n_layers` and so returns logits.
    pub fn is_last(&self, n_layers: usize) -> bool {
        self.end == n_layers
    }

    /// Splits `n_layers` into `parts` contiguous ranges whose lengths differ
    /// by at most one. Used by tests and benchmarks; placement proper lives
    /// in the scheduling policy.
    pub fn split_even(n_layers: usize, parts: usize) -> Vec<LayerRange> {
        let parts = parts.clamp(1, n_layers.max(1));
        let base = n_layers / parts;
        let extra = n_layers % parts;
        let mut start = 0;
        (0..parts)
            .map(|i| {
                let len = base + usize::from(i < extra);
                let range = LayerRange::new(start, start + len);
                start += len;
                range
            })
            .collect()
    }
}

impl fmt::Display for LayerRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.start, self.end)
    }
}

/// Names one sequence (one request's tokens) in a shard's KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SequenceId(pub u64);

impl fmt::Display for SequenceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_even_covers_every_layer_once() {
        for n_layers in [1, 2, 7, 30] {
            for parts in 1..=n_layers {
                let ranges = LayerRange::split_even(n_layers, parts);
                assert_eq!(ranges.len(), parts);
                assert_eq!(ranges[0].start, 0);
                assert_eq!(ranges[parts - 1].end, n_layers);
                for pair in ranges.windows(2) {
                    assert_eq!(pair[0].end, pair[1].start);
                }
                let lens: Vec<usize> = ranges.iter().map(LayerRange::len).collect();
                let (min, max) = (lens.iter().min(), lens.iter().max());
                assert!(
                    max.zip(min).is_some_and(|(max, min)| max - min <= 1),
                    "{lens:?}"
                );
            }
        }
    }

    #[test]
    fn first_and_last() {
        let r = LayerRange::new(0, 30);
        assert!(r.is_first() && r.is_last(30));
        let r = LayerRange::new(10, 20);
        assert!(!r.is_first() && !r.is_last(30));
        assert_eq!(r.to_string(), "10..20");
    }
}
