//! Sets of byte ranges: which bytes of a file are on disk, and which of
//! those a shard needs are still missing.

use std::ops::Range;

use serde::{Deserialize, Serialize};

/// Disjoint, non-adjacent, sorted `[start, end)` ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Vec<(u64, u64)>", into = "Vec<(u64, u64)>")]
pub struct RangeSet(Vec<Range<u64>>);

impl RangeSet {
    /// Adds `range`, joining it with the ranges it touches.
    pub fn insert(&mut self, range: Range<u64>) {
        if range.is_empty() {
            return;
        }
        let (mut start, mut end) = (range.start, range.end);
        // Ranges before `first` end before `start`; from `last` on they
        // start after `end`: everything between joins the new range.
        let first = self.0.partition_point(|r| r.end < start);
        let last = self.0.partition_point(|r| r.start <= end);
        if first < last {
            start = start.min(self.0[first].start);
            end = end.max(self.0[last - 1].end);
        }
        self.0.splice(first..last, [start..end]);
    }

    /// The parts of `wanted` not in the set, in order.
    pub fn missing(&self, wanted: &[Range<u64>]) -> Vec<Range<u64>> {
        let mut missing = Vec::new();
        for want in wanted {
            let mut at = want.start;
            let from = self.0.partition_point(|r| r.end <= want.start);
            for have in &self.0[from..] {
                if have.start >= want.end {
                    break;
                }
                if have.start > at {
                    missing.push(at..have.start);
                }
                at = at.max(have.end);
            }
            if at < want.end {
                missing.push(at..want.end);
            }
        }
        missing
    }

    /// True when every byte of `[0, len)` is in the set.
    pub fn covers(&self, len: u64) -> bool {
        len == 0 || self.0.first().is_some_and(|r| r.start == 0 && r.end >= len)
    }

    pub fn bytes(&self) -> u64 {
        total(&self.0)
    }
}

/// Total bytes of `ranges`.
pub fn total(ranges: &[Range<u64>]) -> u64 {
    ranges.iter().map(|r| r.end - r.start).sum()
}

/// `ranges` cut into pieces of at most `most` bytes.
pub fn chunks(ranges: &[Range<u64>], most: u64) -> Vec<Range<u64>> {
    let most = most.max(1);
    ranges
        .iter()
        .flat_map(|r| {
            (r.start..r.end)
                .step_by(most as usize)
                .map(move |start| start..(start + most).min(r.end))
        })
        .collect()
}

impl From<Vec<(u64, u64)>> for RangeSet {
    fn from(pairs: Vec<(u64, u64)>) -> Self {
        let mut set = RangeSet::default();
        for (start, end) in pairs {
            if start < end {
                set.insert(start..end);
            }
        }
        set
    }
}

impl From<RangeSet> for Vec<(u64, u64)> {
    fn from(set: RangeSet) -> Self {
        set.0.into_iter().map(|r| (r.start, r.end)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ranges: &[(u64, u64)]) -> RangeSet {
        RangeSet::from(ranges.to_vec())
    }

    #[test]
    fn inserting_joins_overlapping_and_adjacent_ranges_only() {
        let mut s = set(&[(10, 20), (30, 40), (50, 60)]);
        s.insert(20..30);
        assert_eq!(s, set(&[(10, 40), (50, 60)]));
        s.insert(45..47);
        assert_eq!(s, set(&[(10, 40), (45, 47), (50, 60)]));
        s.insert(0..100);
        assert_eq!(s, set(&[(0, 100)]));
        assert!(s.covers(100) && !s.covers(101));
        s.insert(5..5);
        assert_eq!(s.bytes(), 100);
    }

    #[test]
    fn missing_is_what_wanted_lacks_in_order() {
        let s = set(&[(10, 20), (30, 40)]);
        assert_eq!(s.missing(&[0..50]), vec![0..10, 20..30, 40..50]);
        assert_eq!(s.missing(&[12..18, 25..35]), vec![25..30]);
        assert_eq!(s.missing(&[10..20]), Vec::<Range<u64>>::new());
        assert_eq!(RangeSet::default().missing(&[3..7]), vec![3..7]);
    }

    #[test]
    fn chunks_cut_each_range_and_keep_their_bytes() {
        let cut = chunks(&[0..10, 20..25], 4);
        assert_eq!(cut, vec![0..4, 4..8, 8..10, 20..24, 24..25]);
        assert_eq!(total(&cut), 15);
    }

    #[test]
    fn a_record_round_trips_and_a_bad_one_is_cleaned() {
        let s = set(&[(0, 5), (9, 12)]);
        let json = serde_json::to_string(&s).expect("serializes");
        assert_eq!(json, "[[0,5],[9,12]]");
        assert_eq!(serde_json::from_str::<RangeSet>(&json).expect("parses"), s);
        let messy: RangeSet = serde_json::from_str("[[9,12],[0,5],[4,9],[7,3]]").expect("parses");
        assert_eq!(messy, set(&[(0, 12)]));
    }
}
