//! Policy sync: which policy change is in force here, the highest one
//! seen, the uploaded component to hand to peers, and a component on its
//! way from a peer in chunks. Changes are ordered by [`PolicyRevision`]:
//! the highest wins everywhere. Installing is the policy host's work; this
//! only decides what to install and what to tell peers.

use bytes::Bytes;
use scheduler::NodeId;

use super::PolicyStatus;
use super::protocol::{AdminProof, Frame, PolicyMessage, PolicyRevision};
use crate::limits::{MAX_POLICY_BYTES, POLICY_CHUNK_BYTES, POLICY_TEXT_BYTES};
use crate::policy::{Change, PolicyView};

/// An uploaded policy on its way from a peer.
struct IncomingPolicy {
    from: NodeId,
    message: PolicyMessage,
    size: usize,
    data: Vec<u8>,
}

/// A peer's change, complete, to install here.
#[derive(Debug)]
pub(super) struct Adoption {
    pub revision: PolicyRevision,
    pub wasm: Option<Bytes>,
    pub change: Change,
    pub warning: Option<String>,
    /// The admin's authorization, for the actor to check.
    pub proof: Option<AdminProof>,
}

/// What an install that finished means here.
#[derive(Debug)]
pub(super) enum Installed {
    /// It is in force now; changes made here go on to every peer.
    Applied { tell_peers: bool },
    /// A newer change was applied meanwhile; this one is not in force.
    Superseded(PolicyStatus),
}

pub(super) struct PolicySync {
    /// The policy change in force here, and the highest one seen or made.
    revision: PolicyRevision,
    highest: PolicyRevision,
    /// The uploaded component in force, for new peers (`None`: built-in).
    wasm: Option<Bytes>,
    /// The admin's authorization of the change in force, passed on to
    /// new peers with it.
    proof: Option<AdminProof>,
    incoming: Option<IncomingPolicy>,
    pub status: PolicyStatus,
}

impl PolicySync {
    pub fn new(built_in: PolicyView) -> Self {
        Self {
            revision: PolicyRevision::default(),
            highest: PolicyRevision::default(),
            wasm: None,
            proof: None,
            incoming: None,
            status: PolicyStatus {
                policy: built_in,
                revision: 0,
                changed_by: None,
                warning: None,
            },
        }
    }

    /// The revision of a change made here.
    pub fn next_revision(&mut self, me: NodeId) -> PolicyRevision {
        self.highest = PolicyRevision {
            counter: self.highest.counter.saturating_add(1),
            origin: me,
        };
        self.highest
    }

    /// True once any change was made (a new peer must hear of it).
    pub fn changed(&self) -> bool {
        self.revision != PolicyRevision::default()
    }

    /// The frames that tell a peer the policy in force: the message, then
    /// the component in chunks (which share this node's one copy of it).
    pub fn frames(&self) -> Vec<Frame> {
        let mut frames = vec![Frame::Policy(PolicyMessage {
            revision: self.revision,
            wasm_bytes: self
                .wasm
                .as_ref()
                .map(|w| u32::try_from(w.len()).unwrap_or(u32::MAX)),
            warning: self.status.warning.clone(),
            proof: self.proof.clone(),
        })];
        if let Some(wasm) = &self.wasm {
            for offset in (0..wasm.len()).step_by(POLICY_CHUNK_BYTES) {
                let end = (offset + POLICY_CHUNK_BYTES).min(wasm.len());
                frames.push(Frame::PolicyChunk {
                    revision: self.revision,
                    offset: u32::try_from(offset).unwrap_or(u32::MAX),
                    data: wasm.slice(offset..end),
                });
            }
        }
        frames
    }

    /// A change from a peer: adopted when newer than ours. An uploaded
    /// component follows in chunks; `Err` says why the message is refused.
    pub fn on_message(
        &mut self,
        from: NodeId,
        message: PolicyMessage,
    ) -> Result<Option<Adoption>, String> {
        let older_than_incoming = self
            .incoming
            .as_ref()
            .is_some_and(|i| message.revision < i.message.revision);
        if message.revision <= self.revision || older_than_incoming {
            return Ok(None);
        }
        match message.wasm_bytes.map(|b| b as usize) {
            None => {
                self.incoming = None;
                Ok(Some(self.adopt(message, None)))
            }
            Some(size) if size == 0 || size > MAX_POLICY_BYTES => Err(format!(
                "ignoring a policy of an impossible size ({size} bytes)"
            )),
            Some(size) => {
                self.incoming = Some(IncomingPolicy {
                    from,
                    message,
                    size,
                    data: Vec::with_capacity(size),
                });
                Ok(None)
            }
        }
    }

    /// A chunk of the component a peer is sending: the change once it is
    /// complete; `Err` when the transfer broke (it is dropped).
    pub fn on_chunk(
        &mut self,
        from: NodeId,
        revision: PolicyRevision,
        offset: u32,
        data: &[u8],
    ) -> Result<Option<Adoption>, String> {
        let Some(incoming) = &mut self.incoming else {
            return Ok(None);
        };
        if incoming.from != from || incoming.message.revision != revision {
            return Ok(None);
        }
        if offset as usize != incoming.data.len()
            || incoming.data.len() + data.len() > incoming.size
        {
            self.incoming = None;
            return Err("a policy transfer arrived out of order; dropping it".into());
        }
        incoming.data.extend_from_slice(data);
        if incoming.data.len() < incoming.size {
            return Ok(None);
        }
        Ok(self
            .incoming
            .take()
            .map(|complete| self.adopt(complete.message, Some(Bytes::from(complete.data)))))
    }

    /// A peer's change, complete. The actor checks its authorization
    /// before installing it; only then does it count as seen
    /// ([`Self::accepted`]), so a refused change cannot push the revision
    /// counter.
    fn adopt(&mut self, message: PolicyMessage, wasm: Option<Bytes>) -> Adoption {
        // A change that replaced a failing policy says why; it ends a
        // fallback chain here as it did there.
        let change = if message.warning.is_some() || wasm.is_none() {
            Change::Fallback
        } else {
            Change::Propagated
        };
        Adoption {
            revision: message.revision,
            wasm,
            change,
            warning: message.warning.map(capped_warning),
            proof: message.proof,
        }
    }

    /// A peer's change passed the checks: later changes made here go past
    /// it.
    pub fn accepted(&mut self, revision: PolicyRevision) {
        self.highest = self.highest.max(revision);
    }

    /// A peer left: a transfer from it will not finish.
    pub fn forget(&mut self, node: NodeId) {
        if self.incoming.as_ref().is_some_and(|i| i.from == node) {
            self.incoming = None;
        }
    }

    /// Revision `revision` is installed on the policy thread as `view`.
    /// Installs finish in order there, but their events may arrive here out
    /// of order: a newer one already applied wins.
    pub fn installed(
        &mut self,
        revision: PolicyRevision,
        wasm: Option<Bytes>,
        view: PolicyView,
        warning: Option<String>,
        proof: Option<AdminProof>,
        me: NodeId,
    ) -> Installed {
        let status = PolicyStatus {
            policy: view,
            revision: revision.counter,
            changed_by: Some(super::view_id(revision.origin)),
            warning,
        };
        if revision < self.revision {
            return Installed::Superseded(status);
        }
        self.revision = revision;
        self.highest = self.highest.max(revision);
        self.wasm = wasm;
        self.proof = proof;
        self.status = status;
        Installed::Applied {
            tell_peers: revision.origin == me,
        }
    }
}

/// A warning about a failed policy, short enough to pass around.
pub(super) fn capped_warning(warning: String) -> String {
    warning.chars().take(2 * POLICY_TEXT_BYTES).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PolicySource;

    fn view(name: &str) -> PolicyView {
        PolicyView {
            name: name.into(),
            version: "1".into(),
            sha256: String::new(),
            source: PolicySource::Uploaded,
            size_bytes: 0,
        }
    }

    fn revision(counter: u64, origin: u64) -> PolicyRevision {
        PolicyRevision {
            counter,
            origin: NodeId(origin),
        }
    }

    fn message(counter: u64, origin: u64, wasm_bytes: Option<u32>) -> PolicyMessage {
        PolicyMessage {
            revision: revision(counter, origin),
            wasm_bytes,
            warning: None,
            proof: None,
        }
    }

    #[test]
    fn the_highest_revision_wins_whatever_the_order() {
        let me = NodeId(1);
        let mut sync = PolicySync::new(view("built-in"));
        assert!(!sync.changed());
        let mine = sync.next_revision(me);
        assert_eq!(mine, revision(1, 1));
        let newer = revision(2, 7);
        assert!(matches!(
            sync.installed(newer, None, view("b"), None, None, me),
            Installed::Applied { tell_peers: false }
        ));
        assert!(matches!(
            sync.installed(mine, None, view("a"), None, None, me),
            Installed::Superseded(_)
        ));
        assert_eq!(sync.status.policy.name, "b");
        assert_eq!(
            sync.next_revision(me),
            revision(3, 1),
            "past every one seen"
        );
        assert!(
            sync.on_message(NodeId(7), message(2, 7, None))
                .expect("ok")
                .is_none(),
            "not newer"
        );
        let adopted = sync
            .on_message(NodeId(7), message(4, 7, None))
            .expect("ok")
            .expect("newer: adopted");
        assert_eq!(adopted.change, Change::Fallback);
        // Ties of the counter go to the higher node id.
        assert!(revision(4, 7) > revision(4, 3));
    }

    #[test]
    fn a_component_arrives_in_order_or_not_at_all() {
        let mut sync = PolicySync::new(view("built-in"));
        let from = NodeId(9);
        assert!(
            sync.on_message(from, message(1, 9, Some(0))).is_err(),
            "empty"
        );
        assert!(
            sync.on_message(from, message(1, 9, Some(u32::MAX)))
                .is_err(),
            "too large"
        );
        assert!(
            sync.on_message(from, message(1, 9, Some(6)))
                .expect("ok")
                .is_none()
        );
        let rev = revision(1, 9);
        assert!(
            sync.on_chunk(NodeId(8), rev, 0, b"abc")
                .expect("ok")
                .is_none(),
            "other peer"
        );
        assert!(sync.on_chunk(from, rev, 0, b"abc").expect("ok").is_none());
        let complete = sync
            .on_chunk(from, rev, 3, b"def")
            .expect("ok")
            .expect("complete");
        assert_eq!(complete.wasm.as_deref(), Some(&b"abcdef"[..]));
        assert_eq!(complete.change, Change::Propagated);

        assert!(
            sync.on_message(from, message(2, 9, Some(6)))
                .expect("ok")
                .is_none()
        );
        assert!(
            sync.on_chunk(from, revision(2, 9), 3, b"def").is_err(),
            "a gap"
        );
        assert!(
            sync.on_chunk(from, revision(2, 9), 0, b"abc")
                .expect("ok")
                .is_none(),
            "the transfer was dropped"
        );
    }

    #[test]
    fn frames_carry_the_component_in_chunks() {
        let me = NodeId(1);
        let mut sync = PolicySync::new(view("built-in"));
        let wasm = Bytes::from(vec![7u8; POLICY_CHUNK_BYTES + 10]);
        let rev = sync.next_revision(me);
        sync.installed(rev, Some(wasm), view("up"), None, None, me);
        let frames = sync.frames();
        assert_eq!(frames.len(), 3, "the message and two chunks");
        assert!(matches!(
            &frames[2],
            Frame::PolicyChunk { offset, data, .. }
                if *offset as usize == POLICY_CHUNK_BYTES && data.len() == 10
        ));
    }
}
