//! The policy transitions: a change made here (an upload, a reset, a
//! fallback after a fault) or arriving from a peer is installed on the
//! policy thread, then applied in revision order and passed on.

use bytes::Bytes;
use scheduler::NodeId;
use tokio::sync::oneshot;

use super::Cluster;
use crate::cluster::policy_sync::{Installed, capped_warning};
use crate::cluster::protocol::{AdminProof, Frame, PolicyRevision};
use crate::cluster::{ClusterEvent, PolicyStatus};
use crate::policy::{Change, Fault, PolicyError, PolicyView};

impl Cluster {
    /// An upload (or reset) through this node's API.
    pub(super) fn set_policy(
        &mut self,
        wasm: Option<Vec<u8>>,
        reply: oneshot::Sender<Result<PolicyStatus, PolicyError>>,
    ) {
        let change = match wasm {
            Some(_) => Change::Upload {
                cluster: self.membership.policy_cluster(),
                model: self.policy_model.clone(),
            },
            // Back to the built-in policy: nothing to check or keep.
            None => Change::Fallback,
        };
        let revision = self.policy_sync.next_revision(self.me());
        let proof = self.admin_proof(&super::trust::policy_change(revision, wasm.as_deref()));
        self.install_policy(
            revision,
            wasm.map(Bytes::from),
            change,
            Some(reply),
            None,
            proof,
        );
    }

    /// The active policy failed here; this node runs the fallback already.
    /// Every node follows, as with any change.
    pub(super) fn on_policy_fault(&mut self, fault: Fault) {
        if fault.failed.sha256 != self.policy_sync.status.policy.sha256 {
            return; // a policy already replaced
        }
        let warning = capped_warning(format!(
            "policy {} ({}) failed and was replaced by {}: {}",
            fault.failed.name,
            fault
                .failed
                .sha256
                .get(..12)
                .unwrap_or(&fault.failed.sha256),
            fault.now_active.name,
            fault.error
        ));
        tracing::warn!("{warning}");
        // A fallback is this node's own decision, not an admin's: peers
        // take it without authorization only when it is to the built-in
        // policy (see `on_policy_frame`).
        let revision = self.policy_sync.next_revision(self.me());
        self.install_policy(
            revision,
            fault.now_active_wasm,
            Change::Fallback,
            None,
            Some(warning),
            None,
        );
    }

    /// Installs a change on the policy thread; the outcome comes back as
    /// [`ClusterEvent::PolicyInstalled`].
    pub(super) fn install_policy(
        &self,
        revision: PolicyRevision,
        wasm: Option<Bytes>,
        change: Change,
        reply: Option<oneshot::Sender<Result<PolicyStatus, PolicyError>>>,
        warning: Option<String>,
        proof: Option<AdminProof>,
    ) {
        let policy = self.policy.clone();
        let events = self.events_tx.clone();
        tokio::spawn(async move {
            let result = policy.install(wasm.clone(), revision, change).await;
            let _ = events
                .send(ClusterEvent::PolicyInstalled {
                    revision,
                    wasm,
                    result,
                    warning,
                    proof,
                    reply,
                })
                .await;
        });
    }

    pub(super) fn policy_installed(
        &mut self,
        revision: PolicyRevision,
        wasm: Option<Bytes>,
        result: Result<PolicyView, PolicyError>,
        warning: Option<String>,
        proof: Option<AdminProof>,
        reply: Option<oneshot::Sender<Result<PolicyStatus, PolicyError>>>,
    ) {
        let answer = |reply: Option<oneshot::Sender<_>>, result| {
            if let Some(reply) = reply {
                let _ = reply.send(result);
            }
        };
        let view = match result {
            Ok(view) => view,
            Err(error) => {
                if reply.is_none() && error != PolicyError::Outdated {
                    tracing::error!(revision = revision.counter, %error, "cannot run the cluster's new policy; keeping the current one");
                }
                answer(reply, Err(error));
                return;
            }
        };
        let me = self.me();
        match self
            .policy_sync
            .installed(revision, wasm, view, warning, proof, me)
        {
            Installed::Superseded(status) => answer(reply, Ok(status)),
            Installed::Applied { tell_peers } => {
                let status = &self.policy_sync.status;
                tracing::info!(
                    policy = %status.policy.name,
                    version = %status.policy.version,
                    sha256 = %status.policy.sha256,
                    "scheduling policy changed (revision {})",
                    revision.counter
                );
                if tell_peers {
                    for frame in self.policy_sync.frames() {
                        self.membership.broadcast(&frame);
                    }
                }
                // Published before the answer, so that whoever changed the
                // policy reads the change back at once.
                self.publish();
                answer(reply, Ok(self.policy_sync.status.clone()));
                // The new policy decides the placement from now on.
                self.planning.replan_soon();
            }
        }
    }

    /// A policy message or chunk from a peer, through policy sync: a
    /// complete, newer change is installed here.
    pub(super) fn on_policy_frame(&mut self, from: NodeId, frame: Frame) {
        let outcome = match frame {
            Frame::Policy(message) => self.policy_sync.on_message(from, message),
            Frame::PolicyChunk {
                revision,
                offset,
                data,
            } => self.policy_sync.on_chunk(from, revision, offset, &data),
            _ => Ok(None),
        };
        match outcome {
            Ok(None) => {}
            Ok(Some(adoption)) => {
                // A node's own fallback to the built-in policy after a
                // failure needs no admin; every other change does.
                let fallback_to_built_in = adoption.wasm.is_none() && adoption.warning.is_some();
                let change =
                    super::trust::policy_change(adoption.revision, adoption.wasm.as_deref());
                if !fallback_to_built_in
                    && !self.authorized(
                        "a policy change",
                        &change,
                        adoption.revision.origin,
                        from,
                        adoption.proof.as_ref(),
                        true,
                    )
                {
                    return;
                }
                self.policy_sync.accepted(adoption.revision);
                tracing::info!(peer = %self.membership.name_of(from), revision = adoption.revision.counter, "the cluster's policy changed; installing it");
                self.install_policy(
                    adoption.revision,
                    adoption.wasm,
                    adoption.change,
                    None,
                    adoption.warning,
                    adoption.proof,
                );
            }
            Err(problem) => {
                tracing::warn!(peer = %self.membership.name_of(from), "{problem}");
            }
        }
    }
}
