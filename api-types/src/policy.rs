//! The scheduling policy as people see it: `GET|PUT|DELETE
//! /v1/cluster/policy`, and the view's `policy`.

use serde::{Deserialize, Serialize};

use crate::ids::NodeId;

/// Where a policy came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicySource {
    BuiltIn,
    Uploaded,
}

/// A policy as people see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyView {
    pub name: String,
    pub version: String,
    pub sha256: String,
    pub source: PolicySource,
    pub size_bytes: u64,
}

/// The active scheduling policy, as `GET /v1/cluster/policy` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyStatus {
    #[serde(flatten)]
    pub policy: PolicyView,
    /// Numbers the cluster's policy changes (higher is newer; a refused
    /// upload uses a number up). Equal on every node once the last change
    /// has reached it.
    pub revision: u64,
    /// The node where the last change happened (none for the start).
    pub changed_by: Option<NodeId>,
    /// Set when a policy failed and the cluster fell back from it.
    pub warning: Option<String>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a failed expectation is the report

    use super::*;

    #[test]
    fn a_status_is_the_policy_and_its_revision_side_by_side() {
        let status = PolicyStatus {
            policy: PolicyView {
                name: "fewest-nodes".into(),
                version: "0.2.0".into(),
                sha256: "ab".into(),
                source: PolicySource::Uploaded,
                size_bytes: 70_000,
            },
            revision: 2,
            changed_by: Some(NodeId(0xbeef)),
            warning: Some("x failed".into()),
        };
        let json = concat!(
            r#"{"name":"fewest-nodes","version":"0.2.0","sha256":"ab","source":"uploaded","#,
            r#""size_bytes":70000,"revision":2,"changed_by":"000000000000beef","warning":"x failed"}"#,
        );
        assert_eq!(serde_json::to_string(&status).unwrap(), json);
        assert_eq!(serde_json::from_str::<PolicyStatus>(json).unwrap(), status);
    }
}
