//! What the cluster trusts: the admin's authorization on cluster changes
//! (checked here for every change a peer passes on) and the cluster
//! secret, which an admin rotates to remove a node.

use std::sync::Arc;

use scheduler::NodeId;
use sha2::{Digest, Sha256};

use super::Cluster;
use crate::cluster::Rotated;
use crate::cluster::admin_proof::{self, AdminProof};
use crate::cluster::protocol::{Frame, PolicyRevision};
use crate::cluster::secure::LinkKeys;
use crate::identity::{ClusterSecret, JoinToken};

/// The change a policy proof covers: the revision and the component.
pub(super) fn policy_change(revision: PolicyRevision, wasm: Option<&[u8]>) -> String {
    let component = wasm.map_or_else(|| "built-in".to_string(), digest);
    format!(
        "policy\0{}\0{}\0{component}",
        revision.counter, revision.origin.0
    )
}

pub(super) fn switch_change(model: &str) -> String {
    format!("switch-model\0{model}")
}

pub(super) fn fetch_change(name: &str) -> String {
    format!("fetch-model\0{name}")
}

fn rotate_change(removed: Option<NodeId>, secret: &[u8]) -> String {
    let removed = removed.map_or_else(|| "none".to_string(), |n| n.0.to_string());
    format!("rotate-secret\0{removed}\0{}", digest(secret))
}

/// A digest written into a change's text: what the proof binds.
fn digest(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(bytes))
}

impl Cluster {
    /// The admin's authorization of `change`, made here: the API already
    /// checked the admin's token.
    pub(super) fn admin_proof(&self, change: &str) -> Option<AdminProof> {
        self.admin
            .as_ref()
            .map(|key| key.prove(change, self.me(), crate::unix_seconds()))
    }

    /// Whether `what` (a change asked for by `origin`, passed on by `from`)
    /// carries a valid admin authorization; logs a refusal.
    pub(super) fn authorized(
        &mut self,
        what: &str,
        change: &str,
        origin: NodeId,
        from: NodeId,
        proof: Option<&AdminProof>,
        replayable: bool,
    ) -> bool {
        match admin_proof::check(self.admin.as_mut(), change, origin, proof, replayable) {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(
                    peer = %self.membership.name_of(from),
                    "refused {what} from a peer: {error}"
                );
                false
            }
        }
    }

    /// The token an admin hands to a new machine.
    pub(super) fn invite(&self) -> JoinToken {
        self.identity.token()
    }

    /// An admin removes `removed` (if any) and rotates the secret: every
    /// other member gets the new one over its (authenticated, encrypted)
    /// link, with the admin's authorization.
    pub(super) fn rotate_secret(&mut self, removed: Option<NodeId>) -> Result<Rotated, String> {
        let removed_name = match removed {
            Some(node) if node == self.me() => {
                return Err("a node cannot remove itself; ask an admin on another node".into());
            }
            Some(node) => Some(
                self.membership
                    .members
                    .get(&node)
                    .map(|m| m.hello.name.clone())
                    .ok_or_else(|| format!("no node {node} is linked to this one"))?,
            ),
            None => None,
        };
        let secret = ClusterSecret::random();
        let proof = self.admin_proof(&rotate_change(removed, secret.bytes()));
        let frame = Frame::RotateSecret {
            removed,
            secret: secret.bytes().to_vec(),
            proof,
        };
        // Stored here first: a secret this node could not keep must not
        // reach the others, which would then refuse this node's links.
        self.apply_rotation(secret, removed)?;
        let mut told = vec![self.membership.me.name.clone()];
        for (id, member) in &self.membership.members {
            if Some(*id) != removed {
                member.link.send(frame.clone());
                told.push(member.hello.name.clone());
            }
        }
        tracing::info!(removed = ?removed_name, nodes = ?told, "rotated the cluster secret");
        Ok(Rotated {
            removed: removed_name,
            told,
            token: self.identity.token().to_string(),
        })
    }

    /// A peer passed on an admin's rotation.
    pub(super) fn on_rotation(
        &mut self,
        from: NodeId,
        removed: Option<NodeId>,
        secret: &[u8],
        proof: Option<&AdminProof>,
    ) {
        let change = rotate_change(removed, secret);
        if !self.authorized(
            "a rotation of the cluster secret",
            &change,
            from,
            from,
            proof,
            false,
        ) {
            return;
        }
        let Some(secret) = ClusterSecret::from_bytes(secret) else {
            tracing::warn!(
                "refused a rotation of the cluster secret: the secret has the wrong length"
            );
            return;
        };
        if removed == Some(self.me()) {
            // Never sent to the removed node; a peer that did is wrong.
            return;
        }
        match self.apply_rotation(secret, removed) {
            Ok(()) => tracing::info!(
                removed = ?removed.map(|n| self.membership.name_of(n)),
                "the cluster secret was rotated by an admin"
            ),
            Err(error) => tracing::error!(%error, "cannot store the new cluster secret"),
        }
    }

    /// Stores the new secret, links from now on with it, and closes the
    /// link to the removed node (which cannot link again: it lacks the
    /// new secret).
    fn apply_rotation(
        &mut self,
        secret: ClusterSecret,
        removed: Option<NodeId>,
    ) -> Result<(), String> {
        self.identity
            .store_secret(secret)
            .map_err(|error| format!("{error:#}"))?;
        self.peer_pass.rotate(&self.identity.secret);
        self.keys = Arc::new(LinkKeys::new(
            self.identity.key.clone(),
            &self.identity.secret,
            self.keys.plaintext_frames,
        ));
        if let Some(node) = removed {
            self.membership.forget_node(node);
        }
        Ok(())
    }
}
