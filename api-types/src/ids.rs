//! Ids and ranges as the HTTP API writes them.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A node's id: the number the node uses everywhere, written in JSON as 16
/// lowercase hex digits, since a JavaScript number would lose the low bits
/// of a u64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub u64);

/// The number of hex digits of a [`NodeId`].
const NODE_ID_DIGITS: usize = 16;

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Text that is not a [`NodeId`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseNodeIdError {
    /// What was given, cut to a few characters.
    pub got: String,
}

impl fmt::Display for ParseNodeIdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "a node id is {NODE_ID_DIGITS} lowercase hex digits, got {:?}",
            self.got
        )
    }
}

impl std::error::Error for ParseNodeIdError {}

impl FromStr for NodeId {
    type Err = ParseNodeIdError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let error = || ParseNodeIdError {
            got: text.chars().take(2 * NODE_ID_DIGITS).collect(),
        };
        // `from_str_radix` alone would also take `+`, upper case and fewer
        // digits: one spelling per id.
        let hex = text.len() == NODE_ID_DIGITS
            && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !hex {
            return Err(error());
        }
        u64::from_str_radix(text, 16)
            .map(NodeId)
            .map_err(|_| error())
    }
}

impl Serialize for NodeId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for NodeId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct HexId;

        impl Visitor<'_> for HexId {
            type Value = NodeId;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a node id: {NODE_ID_DIGITS} lowercase hex digits")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<NodeId, E> {
                text.parse().map_err(E::custom)
            }
        }

        deserializer.deserialize_str(HexId)
    }
}

/// A half-open range `[start, end)` of transformer layers, as
/// `{"start": 0, "end": 15}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LayerRange {
    pub start: u32,
    pub end: u32,
}

impl LayerRange {
    /// The number of layers.
    pub fn len(&self) -> u32 {
        self.end.saturating_sub(self.start)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a failed expectation is the report

    use super::*;

    #[test]
    fn node_ids_are_16_hex_digits_both_ways() {
        for (id, json) in [
            (0, "\"0000000000000000\""),
            (0x2a, "\"000000000000002a\""),
            (0x0123_4567_89ab_cdef, "\"0123456789abcdef\""),
            (u64::MAX, "\"ffffffffffffffff\""),
        ] {
            assert_eq!(serde_json::to_string(&NodeId(id)).unwrap(), json);
            assert_eq!(serde_json::from_str::<NodeId>(json).unwrap(), NodeId(id));
            assert_eq!(NodeId(id).to_string(), json.trim_matches('"'));
        }
    }

    #[test]
    fn other_spellings_are_not_node_ids() {
        for json in [
            "\"\"",
            "\"2a\"",
            "\"000000000000002A\"",
            "\"+00000000000002a\"",
            "\"00000000000000002a\"",
            "\"00000000000000zz\"",
            "42",
            "null",
        ] {
            let result = serde_json::from_str::<NodeId>(json);
            assert!(result.is_err(), "{json} read as {result:?}");
        }
        let error = "2A".parse::<NodeId>().unwrap_err();
        assert_eq!(
            error.to_string(),
            "a node id is 16 lowercase hex digits, got \"2A\""
        );
    }

    #[test]
    fn layer_ranges_are_start_and_end() {
        let range = LayerRange { start: 3, end: 10 };
        let json = serde_json::to_string(&range).unwrap();
        assert_eq!(json, r#"{"start":3,"end":10}"#);
        assert_eq!(serde_json::from_str::<LayerRange>(&json).unwrap(), range);
        assert_eq!(range.len(), 7);
        assert!(LayerRange { start: 4, end: 4 }.is_empty());
    }
}
