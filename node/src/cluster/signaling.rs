//! Signaling for WebRTC links: which nodes this one was told of and by
//! whom (a member linked to them, so a relay), the attempts in progress,
//! and what to do with each signal that arrives. Plain state: the actor
//! does the IO it decides on.
//!
//! Rules: only the node with the lower id offers (the higher one sends an
//! `Invite`), so two offers never cross; one attempt per peer at a time; a
//! failed attempt waits [`RTC_RETRY_MS`] before the next; a relay passes
//! on only its own link peer's signals, only to a member, so a relayed
//! signal comes from a member the relay authenticated, and the receiver
//! learns of the sender (and its address) from it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use scheduler::NodeId;
use tokio::sync::oneshot;

use super::protocol::{Signal, SignalBody};
use crate::limits::{MAX_SDP_BYTES, RTC_RETRY_MS};

/// Which transports a node links with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LinkMode {
    /// TCP, and WebRTC to a node whose TCP dial fails or times out.
    #[default]
    Auto,
    /// TCP only.
    Tcp,
    /// WebRTC to every node learned of through a peer (`--peer` addresses
    /// are still dialed over TCP: they bootstrap signaling).
    Webrtc,
}

/// A node this one was told of.
struct Told {
    address: String,
    /// The member that told us: it is linked to the node.
    by: NodeId,
}

/// A WebRTC attempt in progress.
struct Attempt {
    session: u64,
    /// Where the answer goes, while the offering end waits for it.
    answer: Option<oneshot::Sender<String>>,
}

/// Why the last attempt to a peer failed, and when to try again.
pub(super) struct Failure {
    pub address: String,
    pub reason: String,
    retry_at: Instant,
}

/// What to do about a node this one should link to.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Start {
    /// Offer, in a new session.
    Offer { session: u64 },
    /// Ask it to offer.
    Invite,
}

/// What to do with a signal that arrived.
#[derive(Debug)]
pub(super) enum Action {
    /// Pass it on to `to`, a member.
    Forward,
    /// Answer this offer.
    Answer { sdp: String },
    /// Offer to the sender, in a new session (it invited us).
    Offer { session: u64 },
    /// Nothing to do (a duplicate, or an attempt already over).
    Nothing,
    /// Refused: warn once with this, and tell the sender when `tell`.
    Refuse { reason: String, tell: bool },
    /// A signal to relay to a node not linked here (one that just left,
    /// most often): the sender is told, and nothing is wrong here.
    CannotRelay { reason: String },
}

pub(super) struct Signaling {
    pub me: NodeId,
    pub mode: LinkMode,
    told: HashMap<NodeId, Told>,
    attempts: HashMap<NodeId, Attempt>,
    pub failures: HashMap<NodeId, Failure>,
}

impl Signaling {
    pub fn new(me: NodeId, mode: LinkMode) -> Self {
        Self {
            me,
            mode,
            told: HashMap::new(),
            attempts: HashMap::new(),
            failures: HashMap::new(),
        }
    }

    /// `by`, a member, told us that `node` is reached at `address`.
    pub fn told(&mut self, node: NodeId, address: String, by: NodeId) {
        if node != self.me && node != by {
            self.told.insert(node, Told { address, by });
        }
    }

    /// The node told of at `address`, if any.
    pub fn node_at(&self, address: &str) -> Option<NodeId> {
        self.told
            .iter()
            .find(|(_, t)| t.address == address)
            .map(|(node, _)| *node)
    }

    pub fn address_of(&self, node: NodeId) -> Option<&str> {
        self.told.get(&node).map(|t| t.address.as_str())
    }

    /// The member to send signals for `node` through: the one that told
    /// us of it while it is linked, else any member but `node`.
    pub fn relay_for(&self, node: NodeId, members: &[NodeId]) -> Option<NodeId> {
        let told_by = self.told.get(&node).map(|t| t.by);
        told_by
            .filter(|by| members.contains(by))
            .or_else(|| members.iter().copied().find(|m| *m != node))
    }

    /// This node wants a link to `node` that TCP cannot give: what to do
    /// now, if anything.
    pub fn want(&mut self, node: NodeId, now: Instant) -> Option<Start> {
        if self.mode == LinkMode::Tcp
            || node == self.me
            || !self.told.contains_key(&node)
            || self.attempts.contains_key(&node)
            || self.failures.get(&node).is_some_and(|f| now < f.retry_at)
        {
            return None;
        }
        if self.me < node {
            let session = rand::random();
            self.attempts.insert(
                node,
                Attempt {
                    session,
                    answer: None,
                },
            );
            Some(Start::Offer { session })
        } else {
            // Marked as failed until the peer offers, so that invites go
            // out once per retry interval at most.
            self.failures.insert(
                node,
                Failure {
                    address: self.address_of(node).unwrap_or_default().to_string(),
                    reason: "invited it to offer a WebRTC link; no offer yet".into(),
                    retry_at: now + Duration::from_millis(RTC_RETRY_MS),
                },
            );
            Some(Start::Invite)
        }
    }

    /// The offering end of `session` waits for its answer on `answer`.
    pub fn await_answer(&mut self, node: NodeId, session: u64, answer: oneshot::Sender<String>) {
        if let Some(attempt) = self.attempts.get_mut(&node)
            && attempt.session == session
        {
            attempt.answer = Some(answer);
        }
    }

    /// The attempt `session` to `node` ended: linked (`None`) or failed.
    /// Returns true when the failure is news (to warn once).
    pub fn ended(
        &mut self,
        node: NodeId,
        session: u64,
        error: Option<String>,
        now: Instant,
    ) -> bool {
        let current = self
            .attempts
            .get(&node)
            .is_some_and(|a| a.session == session);
        if current {
            self.attempts.remove(&node);
        }
        match error {
            None => {
                self.failures.remove(&node);
                false
            }
            // Ended here before its task did (refused, or the node left),
            // which accounted for it then.
            Some(_) if !current => false,
            Some(reason) => {
                let news = self.failures.get(&node).is_none_or(|f| f.reason != reason);
                self.failures.insert(
                    node,
                    Failure {
                        address: self.address_of(node).unwrap_or_default().to_string(),
                        reason,
                        retry_at: now + Duration::from_millis(RTC_RETRY_MS),
                    },
                );
                news
            }
        }
    }

    /// A link to `node` is up (over any transport).
    pub fn linked(&mut self, node: NodeId) {
        self.failures.remove(&node);
    }

    /// `node` said goodbye: it left and will link again itself when it
    /// is back, so it is not sought over WebRTC meanwhile.
    pub fn forget(&mut self, node: NodeId) {
        self.told.remove(&node);
        self.attempts.remove(&node);
        self.failures.remove(&node);
    }

    /// Decides about a signal that came on the link from `link_peer`.
    /// `is_member` says whether a node is linked to this one.
    pub fn on_signal(
        &mut self,
        link_peer: NodeId,
        signal: &mut Signal,
        is_member: impl Fn(NodeId) -> bool,
    ) -> Action {
        let from = signal.from;
        if signal.to != self.me {
            // Relaying: only for the link's own peer, only to a member.
            if from != link_peer {
                return Action::Refuse {
                    reason: format!(
                        "node {link_peer} asked this node to relay a signal it says is from node {from}; a node relays only its own signals"
                    ),
                    tell: false,
                };
            }
            if !is_member(signal.to) {
                return Action::CannotRelay {
                    reason: format!(
                        "node {} is not linked to node {} (it may have left)",
                        signal.to, self.me
                    ),
                };
            }
            return Action::Forward;
        }
        if from == self.me {
            return Action::Refuse {
                reason: format!(
                    "a WebRTC {} that says it is from this node",
                    body_kind(&signal.body)
                ),
                tell: false,
            };
        }
        if from != link_peer && !signal.address.is_empty() {
            // Relayed: the relay is linked to the sender.
            self.told(from, signal.address.clone(), link_peer);
        }
        match std::mem::replace(&mut signal.body, SignalBody::Invite) {
            SignalBody::Invite => {
                if is_member(from) {
                    return Action::Nothing;
                }
                self.failures.remove(&from);
                match self.want(from, Instant::now()) {
                    Some(Start::Offer { session }) => Action::Offer { session },
                    _ => Action::Nothing,
                }
            }
            SignalBody::Offer { sdp } => {
                if is_member(from) {
                    // Linked meanwhile (over TCP, or an earlier attempt):
                    // the offer is stale.
                    return Action::Nothing;
                }
                if from > self.me {
                    return Action::Refuse {
                        reason: format!(
                            "node {from} offered a WebRTC link, but the node with the lower id offers"
                        ),
                        tell: true,
                    };
                }
                if sdp.len() > MAX_SDP_BYTES {
                    return Action::Refuse {
                        reason: format!(
                            "node {from} sent a {}-byte offer; the limit is {MAX_SDP_BYTES}",
                            sdp.len()
                        ),
                        tell: true,
                    };
                }
                // A new offer replaces an older attempt (the peer gave up
                // on it).
                self.attempts.insert(
                    from,
                    Attempt {
                        session: signal.session,
                        answer: None,
                    },
                );
                self.failures.remove(&from);
                Action::Answer { sdp }
            }
            SignalBody::Answer { sdp } => {
                let waiting = self
                    .attempts
                    .get_mut(&from)
                    .filter(|a| a.session == signal.session)
                    .and_then(|a| a.answer.take());
                match waiting {
                    Some(answer) => {
                        let _ = answer.send(sdp);
                        Action::Nothing
                    }
                    None => Action::Refuse {
                        reason: format!(
                            "a WebRTC answer from node {from} for session {:016x}, which this node is not waiting for",
                            signal.session
                        ),
                        tell: false,
                    },
                }
            }
            SignalBody::Refuse { reason } => {
                let relayed_attempt = self
                    .attempts
                    .iter()
                    .find(|(_, a)| a.session == signal.session)
                    .map(|(&node, _)| node)
                    .filter(|&node| node != from && from == link_peer);
                if let Some(node) = relayed_attempt {
                    // The relay could not pass our signal on. Only the
                    // relay and the node see a session's id.
                    self.attempts.remove(&node);
                    let reason = format!("node {from} could not pass our signal on: {reason}");
                    if self.failures.get(&node).is_none_or(|f| f.reason != reason) {
                        tracing::info!(peer = %node, "no WebRTC link for now: {reason}");
                    }
                    self.failures.insert(
                        node,
                        Failure {
                            address: self.address_of(node).unwrap_or_default().to_string(),
                            reason,
                            retry_at: Instant::now() + Duration::from_millis(RTC_RETRY_MS),
                        },
                    );
                } else if self
                    .attempts
                    .get(&from)
                    .is_some_and(|a| a.session == signal.session)
                {
                    // Dropping the answer's sender ends the waiting task.
                    self.attempts.remove(&from);
                    self.failures.insert(
                        from,
                        Failure {
                            address: self.address_of(from).unwrap_or_default().to_string(),
                            reason: format!("the peer refused the WebRTC link: {reason}"),
                            retry_at: Instant::now() + Duration::from_millis(RTC_RETRY_MS),
                        },
                    );
                    tracing::warn!(peer = %from, %reason, "a peer refused a WebRTC link");
                }
                Action::Nothing
            }
        }
    }
}

fn body_kind(body: &SignalBody) -> &'static str {
    match body {
        SignalBody::Invite => "invitation",
        SignalBody::Offer { .. } => "offer",
        SignalBody::Answer { .. } => "answer",
        SignalBody::Refuse { .. } => "refusal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signal(from: u64, to: u64, session: u64, body: SignalBody) -> Signal {
        Signal {
            from: NodeId(from),
            to: NodeId(to),
            session,
            address: format!("198.51.100.{from}:52415"),
            body,
        }
    }

    #[test]
    fn the_lower_id_offers_and_the_higher_invites_once_per_interval() {
        let now = Instant::now();
        let mut low = Signaling::new(NodeId(1), LinkMode::Auto);
        low.told(NodeId(2), "198.51.100.22:7000".into(), NodeId(9));
        assert!(matches!(
            low.want(NodeId(2), now),
            Some(Start::Offer { .. })
        ));
        assert_eq!(low.want(NodeId(2), now), None, "one attempt at a time");

        let mut high = Signaling::new(NodeId(2), LinkMode::Auto);
        assert_eq!(high.want(NodeId(1), now), None, "not told of it");
        high.told(NodeId(1), "198.51.100.21:7000".into(), NodeId(9));
        assert_eq!(high.want(NodeId(1), now), Some(Start::Invite));
        assert_eq!(high.want(NodeId(1), now), None);
        let later = now + Duration::from_millis(RTC_RETRY_MS);
        assert_eq!(high.want(NodeId(1), later), Some(Start::Invite));
        assert_eq!(high.relay_for(NodeId(1), &[NodeId(9)]), Some(NodeId(9)));
        assert_eq!(
            high.relay_for(NodeId(1), &[NodeId(1), NodeId(5)]),
            Some(NodeId(5))
        );

        let mut tcp = Signaling::new(NodeId(1), LinkMode::Tcp);
        tcp.told(NodeId(2), "198.51.100.22:7000".into(), NodeId(9));
        assert_eq!(tcp.want(NodeId(2), now), None);
    }

    #[test]
    fn relays_forward_only_their_own_peers_signals_to_members() {
        let mut relay = Signaling::new(NodeId(9), LinkMode::Auto);
        let members = |n: NodeId| n == NodeId(1) || n == NodeId(2);
        let mut own = signal(1, 2, 7, SignalBody::Invite);
        assert!(matches!(
            relay.on_signal(NodeId(1), &mut own, members),
            Action::Forward
        ));
        let mut spoofed = signal(3, 2, 7, SignalBody::Invite);
        assert!(matches!(
            relay.on_signal(NodeId(1), &mut spoofed, members),
            Action::Refuse { tell: false, .. }
        ));
        let mut nowhere = signal(1, 4, 7, SignalBody::Invite);
        assert!(matches!(
            relay.on_signal(NodeId(1), &mut nowhere, members),
            Action::CannotRelay { .. }
        ));
    }

    /// Node 1, told of node 2 by member 9, offers to it: the node, the
    /// session, and where the answer would arrive.
    fn offering_to_2(now: Instant) -> (Signaling, u64, oneshot::Receiver<String>) {
        let mut node = Signaling::new(NodeId(1), LinkMode::Auto);
        node.told(NodeId(2), "198.51.100.22:7000".into(), NodeId(9));
        let Some(Start::Offer { session }) = node.want(NodeId(2), now) else {
            panic!("the lower id offers");
        };
        let (tx, rx) = oneshot::channel();
        node.await_answer(NodeId(2), session, tx);
        (node, session, rx)
    }

    #[test]
    fn a_relay_that_cannot_pass_an_offer_on_ends_the_attempt_at_once() {
        let now = Instant::now();
        let (mut node, session, mut rx) = offering_to_2(now);
        // Relay 9 is no longer linked to node 2 and says so.
        let mut refused = signal(
            9,
            1,
            session,
            SignalBody::Refuse {
                reason: "node 2 is not linked to node 9 (it may have left)".into(),
            },
        );
        assert!(matches!(
            node.on_signal(NodeId(9), &mut refused, |_| false),
            Action::Nothing
        ));
        assert!(
            matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Closed)),
            "the offer's task stops waiting for an answer"
        );
        let relay_said = format!("node {} could not pass our signal on", NodeId(9));
        assert!(node.failures[&NodeId(2)].reason.contains(&relay_said));
        // The task's own end says nothing new; the next try waits.
        assert!(!node.ended(NodeId(2), session, Some("called off".into()), now));
        assert!(node.failures[&NodeId(2)].reason.contains(&relay_said));
        assert_eq!(node.want(NodeId(2), now), None);

        // A refusal that a member passes on from a third node is not the
        // relay's word about our session: it changes nothing.
        let due = Instant::now() + Duration::from_millis(RTC_RETRY_MS);
        let Some(Start::Offer { session }) = node.want(NodeId(2), due) else {
            panic!("tried again once the retry is due");
        };
        let mut forged = signal(
            7,
            1,
            session,
            SignalBody::Refuse {
                reason: "no".into(),
            },
        );
        node.on_signal(NodeId(9), &mut forged, |_| false);
        assert!(node.ended(NodeId(2), session, Some("no path".into()), now));
    }

    #[test]
    fn a_node_that_said_goodbye_is_not_sought_over_webrtc() {
        let now = Instant::now();
        let mut node = Signaling::new(NodeId(1), LinkMode::Auto);
        node.told(NodeId(2), "198.51.100.22:7000".into(), NodeId(9));
        node.forget(NodeId(2));
        assert_eq!(node.node_at("198.51.100.22:7000"), None);
        assert_eq!(node.want(NodeId(2), now), None);
        // Back, it signals through a member again, and is learned anew.
        let mut invite = signal(2, 1, 0, SignalBody::Invite);
        assert!(matches!(
            node.on_signal(NodeId(9), &mut invite, |_| false),
            Action::Offer { .. }
        ));
    }

    #[test]
    fn relayed_senders_are_learned_and_unknown_sessions_and_offers_from_the_higher_id_refused() {
        let no_members = |_: NodeId| false;
        let mut node = Signaling::new(NodeId(5), LinkMode::Auto);
        // Relayed by member 9, from a node that joined after this one.
        let mut offer = signal(3, 5, 1, SignalBody::Offer { sdp: "v=0".into() });
        assert!(matches!(
            node.on_signal(NodeId(9), &mut offer, no_members),
            Action::Answer { .. }
        ));
        assert_eq!(node.address_of(NodeId(3)), Some("198.51.100.3:52415"));
        assert_eq!(node.relay_for(NodeId(3), &[NodeId(9)]), Some(NodeId(9)));
        let mut myself = signal(5, 5, 1, SignalBody::Invite);
        assert!(matches!(
            node.on_signal(NodeId(9), &mut myself, no_members),
            Action::Refuse { .. }
        ));
        let mut wrong_way = signal(8, 5, 1, SignalBody::Offer { sdp: "v=0".into() });
        assert!(matches!(
            node.on_signal(NodeId(9), &mut wrong_way, no_members),
            Action::Refuse { tell: true, .. }
        ));
        let mut unknown = signal(3, 5, 2, SignalBody::Answer { sdp: "v=0".into() });
        let action = node.on_signal(NodeId(9), &mut unknown, no_members);
        assert!(
            matches!(&action, Action::Refuse { reason, .. } if reason.contains("not waiting")),
            "{action:?}"
        );
    }

    #[test]
    fn the_answer_reaches_the_waiting_offer_and_failures_wait_to_retry() {
        let now = Instant::now();
        let (mut node, session, mut rx) = offering_to_2(now);
        let mut answer = signal(
            2,
            1,
            session,
            SignalBody::Answer {
                sdp: "v=0 a".into(),
            },
        );
        assert!(matches!(
            node.on_signal(NodeId(9), &mut answer, |_| false),
            Action::Nothing
        ));
        assert_eq!(rx.try_recv().ok().as_deref(), Some("v=0 a"));
        assert!(node.ended(NodeId(2), session, Some("no path".into()), now));
        assert!(
            !node.ended(NodeId(2), session, Some("no path".into()), now),
            "said once"
        );
        assert_eq!(node.want(NodeId(2), now), None);
        let later = now + Duration::from_millis(RTC_RETRY_MS);
        assert!(matches!(
            node.want(NodeId(2), later),
            Some(Start::Offer { .. })
        ));
    }
}
