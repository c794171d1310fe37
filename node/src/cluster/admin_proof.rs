//! An admin's authorization of a cluster-wide change, made on the node
//! where the admin acted and checked by every node that acts on it.
//!
//! Holding the cluster secret makes a node a member: it may link, hold
//! layers and see the activations and tokens that pass through it. It does
//! not make it an admin. Changes to the cluster (its policy, the model it
//! serves, downloads, removing a node) carry an [`AdminProof`]: an
//! HMAC-SHA256 (ring) of the change, the node that asked, a time and a
//! nonce, under a key derived from the admin token. Every node started
//! with the same `--admin-token` checks it; a node without one accepts no
//! admin change from the cluster. A member without the token cannot make
//! a proof, and one it saw cannot be replayed: the time must be recent
//! and each nonce counts once.

use std::collections::{HashSet, VecDeque};

use ring::hmac;
use scheduler::NodeId;
use serde::{Deserialize, Serialize};

use crate::limits::{ADMIN_PROOF_MAX_AGE_SECS, ADMIN_PROOFS_REMEMBERED};

/// The authorization a cluster change carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminProof {
    /// Unix seconds when the admin acted.
    pub issued_at: u64,
    pub nonce: u64,
    #[serde(with = "serde_bytes")]
    pub mac: Vec<u8>,
}

/// Why a change was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("it carries no admin authorization")]
    Missing,
    #[error(
        "this node has no admin token to check it with; start every node with the same --admin-token (or RINGLET_ADMIN_TOKEN)"
    )]
    NoToken,
    #[error("its admin authorization does not verify (another admin token, or an altered change)")]
    Invalid,
    #[error(
        "its admin authorization is {age} s from this node's clock; the limit is {ADMIN_PROOF_MAX_AGE_SECS} s (are the clocks set?)"
    )]
    Stale { age: u64 },
    #[error("its admin authorization was used before (a replay)")]
    Replayed,
}

/// The key that makes and checks proofs, from the admin token.
pub struct AdminKey {
    key: hmac::Key,
    /// Nonces already accepted, oldest first, bounded.
    seen: VecDeque<u64>,
    seen_set: HashSet<u64>,
}

impl std::fmt::Debug for AdminKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminKey(..)")
    }
}

fn message(change: &str, origin: NodeId, issued_at: u64, nonce: u64) -> Vec<u8> {
    let mut bytes = b"ringlet admin change v1\0".to_vec();
    bytes.extend_from_slice(&origin.0.to_be_bytes());
    bytes.extend_from_slice(&issued_at.to_be_bytes());
    bytes.extend_from_slice(&nonce.to_be_bytes());
    bytes.extend_from_slice(change.as_bytes());
    bytes
}

impl AdminKey {
    pub fn from_token(token: &str) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, token.as_bytes()),
            seen: VecDeque::new(),
            seen_set: HashSet::new(),
        }
    }

    /// Authorizes `change`, asked for on node `origin` now.
    pub fn prove(&self, change: &str, origin: NodeId, now: u64) -> AdminProof {
        let nonce = rand::random();
        let tag = hmac::sign(&self.key, &message(change, origin, now, nonce));
        AdminProof {
            issued_at: now,
            nonce,
            mac: tag.as_ref().to_vec(),
        }
    }

    /// Checks a proof of `change` from `origin`; a proof accepted once is
    /// refused after (`replayable` false), except where the same change
    /// is legitimately passed on again (a policy told to a newcomer).
    pub fn check(
        &mut self,
        change: &str,
        origin: NodeId,
        proof: Option<&AdminProof>,
        now: u64,
        replayable: bool,
    ) -> Result<(), ProofError> {
        let proof = proof.ok_or(ProofError::Missing)?;
        hmac::verify(
            &self.key,
            &message(change, origin, proof.issued_at, proof.nonce),
            &proof.mac,
        )
        .map_err(|_| ProofError::Invalid)?;
        if replayable {
            return Ok(());
        }
        let age = now.abs_diff(proof.issued_at);
        if age > ADMIN_PROOF_MAX_AGE_SECS {
            return Err(ProofError::Stale { age });
        }
        if !self.seen_set.insert(proof.nonce) {
            return Err(ProofError::Replayed);
        }
        self.seen.push_back(proof.nonce);
        if self.seen.len() > ADMIN_PROOFS_REMEMBERED
            && let Some(oldest) = self.seen.pop_front()
        {
            self.seen_set.remove(&oldest);
        }
        Ok(())
    }
}

/// Checks with this node's key, or says it has none.
pub fn check(
    key: Option<&mut AdminKey>,
    change: &str,
    origin: NodeId,
    proof: Option<&AdminProof>,
    replayable: bool,
) -> Result<(), ProofError> {
    let key = key.ok_or(ProofError::NoToken)?;
    key.check(change, origin, proof, crate::unix_seconds(), replayable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_bind_the_change_the_node_and_the_token() {
        let mut key = AdminKey::from_token("root");
        let now = 1_000_000;
        let proof = key.prove("switch-model\0m", NodeId(1), now);
        let mut other = AdminKey::from_token("not-root");
        assert_eq!(
            other.check("switch-model\0m", NodeId(1), Some(&proof), now, false),
            Err(ProofError::Invalid)
        );
        assert_eq!(
            key.check("switch-model\0n", NodeId(1), Some(&proof), now, false),
            Err(ProofError::Invalid)
        );
        assert_eq!(
            key.check("switch-model\0m", NodeId(2), Some(&proof), now, false),
            Err(ProofError::Invalid)
        );
        assert_eq!(
            key.check("switch-model\0m", NodeId(1), None, now, false),
            Err(ProofError::Missing)
        );
        assert_eq!(
            key.check("switch-model\0m", NodeId(1), Some(&proof), now + 5, false),
            Ok(())
        );
        assert_eq!(
            key.check("switch-model\0m", NodeId(1), Some(&proof), now + 5, false),
            Err(ProofError::Replayed)
        );
        let old = key.prove("fetch-model\0m", NodeId(1), now);
        assert!(matches!(
            key.check(
                "fetch-model\0m",
                NodeId(1),
                Some(&old),
                now + ADMIN_PROOF_MAX_AGE_SECS + 1,
                false
            ),
            Err(ProofError::Stale { .. })
        ));
        assert_eq!(
            check(None, "x", NodeId(1), Some(&old), false),
            Err(ProofError::NoToken)
        );
    }
}
