//! WebRTC links as the actor runs them: when to try one, relaying and
//! answering signals, and the tasks that open a session and then run the
//! link over its data channel ([`crate::cluster::rtc`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use scheduler::NodeId;
use tokio::sync::{mpsc, oneshot};

use super::Cluster;
use crate::cluster::ClusterEvent;
use crate::cluster::link::{self, LinkContext};
use crate::cluster::protocol::{Frame, Hello, IceServer, Signal, SignalBody};
use crate::cluster::rtc::{RtcConfig, RtcError, RtcStream, Session};
use crate::cluster::signaling::{Action, LinkMode, Start};
use crate::limits::{LINK_FAREWELL_MS, RTC_ANSWER_TIMEOUT_MS};

impl Cluster {
    /// A link to `peer` came up: what it told of its own peers (a relay
    /// for signals to them) and the ICE servers it shared are kept.
    pub(super) fn peer_linked(
        &mut self,
        peer: NodeId,
        told: Vec<(NodeId, String)>,
        servers: &[IceServer],
    ) {
        for (node, address) in told {
            self.signaling.told(node, address, peer);
        }
        self.signaling.linked(peer);
        let me = self.me();
        self.membership.relinked(me, peer);
        let adopted = self.membership.adopt_ice_servers(servers);
        if !adopted.is_empty() {
            let urls: Vec<&str> = adopted.iter().map(|s| s.url.as_str()).collect();
            tracing::info!(peer = %peer, servers = ?urls, "using the STUN/TURN servers a peer shared");
        }
    }

    /// With `--link webrtc`, an address learned of through a peer is
    /// linked over WebRTC rather than dialed: the node there.
    pub(super) fn webrtc_instead_of_tcp(&self, address: &str) -> Option<NodeId> {
        if self.signaling.mode != LinkMode::Webrtc || self.membership.is_configured(address) {
            return None;
        }
        self.signaling.node_at(address)
    }

    /// A TCP dial to `address` failed: if a known node is there, try
    /// WebRTC (unless `--link tcp`).
    pub(super) fn tcp_dial_failed(&mut self, address: &str) {
        if let Some(node) = self.signaling.node_at(address)
            && !self.membership.members.contains_key(&node)
        {
            self.want_webrtc(node);
        }
    }

    /// Starts a WebRTC link to `node` if none is under way: this node
    /// offers if its id is the lower, else invites `node` to.
    pub(super) fn want_webrtc(&mut self, node: NodeId) {
        if self.membership.members.contains_key(&node) {
            return;
        }
        let members: Vec<NodeId> = self.membership.members.keys().copied().collect();
        if self.signaling.relay_for(node, &members).is_none() {
            tracing::debug!(peer = %node, "no linked node can pass WebRTC signals to the node; not trying");
            return;
        }
        match self.signaling.want(node, Instant::now()) {
            Some(Start::Offer { session }) => self.spawn_offer(node, session),
            Some(Start::Invite) => {
                tracing::debug!(peer = %node, "asking a peer to offer a WebRTC link");
                self.send_signal(Signal {
                    from: self.me(),
                    to: node,
                    session: 0,
                    address: String::new(),
                    body: SignalBody::Invite,
                });
            }
            None => {}
        }
    }

    /// Sends a signal to its node: directly if linked, else through a
    /// member that is linked to it.
    pub(super) fn send_signal(&mut self, signal: Signal) {
        let to = signal.to;
        if self.membership.members.contains_key(&to) {
            self.membership.send_to(to, Frame::Signal(signal));
            return;
        }
        let members: Vec<NodeId> = self.membership.members.keys().copied().collect();
        match self.signaling.relay_for(to, &members) {
            Some(relay) => {
                self.membership.send_to(relay, Frame::Signal(signal));
            }
            None => tracing::debug!(peer = %to, "no linked node to relay a signal through"),
        }
    }

    /// A signal came on the link from `link_peer`.
    pub(super) fn on_signal(&mut self, link_peer: NodeId, mut signal: Signal) -> bool {
        let members = &self.membership.members;
        let action = self
            .signaling
            .on_signal(link_peer, &mut signal, |n| members.contains_key(&n));
        match action {
            Action::Forward => {
                let to = signal.to;
                signal.address = self.membership.address_of(link_peer);
                self.membership.send_to(to, Frame::Signal(signal));
            }
            Action::Answer { sdp } => self.spawn_answer(signal.from, signal.session, sdp),
            Action::Offer { session } => self.spawn_offer(signal.from, session),
            Action::Nothing => {}
            Action::CannotRelay { reason } => {
                tracing::debug!(peer = %link_peer, to = %signal.to, "cannot relay a WebRTC signal: {reason}");
                self.refuse_signal(&signal, reason);
            }
            Action::Refuse { reason, tell } => {
                tracing::warn!(peer = %link_peer, from = %signal.from, "refused a WebRTC signal: {reason}");
                if tell {
                    self.refuse_signal(&signal, reason);
                }
            }
        }
        false
    }

    /// Tells the sender of `signal` why it was refused.
    fn refuse_signal(&mut self, signal: &Signal, reason: String) {
        self.send_signal(Signal {
            from: self.me(),
            to: signal.from,
            session: signal.session,
            address: String::new(),
            body: SignalBody::Refuse { reason },
        });
    }

    /// `from` cannot link to `node`: a plan must not hold both. The leader
    /// re-plans without one of them (see `Membership::compatible`).
    pub(super) fn peer_unreachable(&mut self, from: NodeId, node: NodeId, reason: &str) {
        if self.membership.record_unreachable(from, node, reason) {
            tracing::warn!(
                node = %from,
                peer = %node,
                "node {} cannot link to node {}: {reason}; plans leave one of them out until they link",
                self.membership.name_of(from),
                self.membership.name_of(node)
            );
            self.planning.replan_soon();
        }
    }

    /// A WebRTC attempt ended; a failure is said once per reason.
    pub(super) fn webrtc_ended(
        &mut self,
        node: NodeId,
        session: u64,
        error: Option<String>,
        no_path: bool,
    ) -> bool {
        let address = self
            .signaling
            .address_of(node)
            .unwrap_or_default()
            .to_string();
        if let Some(reason) = &error {
            if self.membership.members.contains_key(&node) {
                // Linked some other way meanwhile.
                self.signaling.ended(node, session, None, Instant::now());
                return true;
            }
            if self
                .signaling
                .ended(node, session, error.clone(), Instant::now())
            {
                tracing::warn!(peer = %node, %address, "could not link to the node at {address} over WebRTC: {reason}");
            }
            if no_path {
                // The leader keeps the two of us out of one plan until we
                // link.
                let leader = self.membership.leader();
                let unreachable = Frame::Unreachable {
                    node,
                    reason: reason.clone(),
                };
                self.tell_leader(leader, unreachable);
            }
        } else {
            self.signaling.ended(node, session, None, Instant::now());
        }
        true
    }

    fn rtc_config(&self) -> RtcConfig {
        let ip = self.membership.me.listen.ip();
        RtcConfig {
            ice_servers: self.membership.me.ice_servers.clone(),
            udp_bind: std::net::SocketAddr::new(ip, 0).to_string(),
        }
    }

    /// What a session task needs to run the link once its channel opens.
    fn webrtc_link(&self, node: NodeId) -> (Hello, LinkContext) {
        let address = self
            .signaling
            .address_of(node)
            .unwrap_or_default()
            .to_string();
        let context = LinkContext::tcp(
            self.me(),
            self.events_tx.clone(),
            address,
            Arc::clone(&self.keys),
            Arc::clone(&self.hops),
            self.open_links.clone(),
        );
        (self.membership.hello(), context)
    }

    /// Offers a link to `node` in `session`, waits for the answer, and runs
    /// the link once the channel opens.
    pub(super) fn spawn_offer(&mut self, node: NodeId, session: u64) {
        let (answer_tx, answer_rx) = oneshot::channel();
        self.signaling.await_answer(node, session, answer_tx);
        let config = self.rtc_config();
        let me = self.me();
        let events = self.events_tx.clone();
        let (hello, context) = self.webrtc_link(node);
        if self.signaling.failures.contains_key(&node) {
            // A retry: the failure was said when it happened.
            tracing::debug!(peer = %node, address = %context.observed_address, "offering a WebRTC link again");
        } else {
            tracing::info!(peer = %node, address = %context.observed_address, "offering a WebRTC link");
        }
        tokio::spawn(async move {
            let opened = async {
                let (session_rtc, sdp) = Session::offer(&config).await?;
                let offer = Signal {
                    from: me,
                    to: node,
                    session,
                    address: String::new(),
                    body: SignalBody::Offer { sdp },
                };
                let _ = events.send(ClusterEvent::SignalOut(offer)).await;
                let wait = Duration::from_millis(RTC_ANSWER_TIMEOUT_MS);
                let answer = tokio::time::timeout(wait, answer_rx)
                    .await
                    .map_err(|_| {
                        RtcError::Abandoned(format!(
                            "no answer to the offer within {RTC_ANSWER_TIMEOUT_MS} ms (the relay or the peer may have left)"
                        ))
                    })?
                    .map_err(|_| RtcError::Abandoned("the attempt was called off".into()))?;
                session_rtc.answered(answer).await?;
                session_rtc.open().await
            };
            let opened = opened.await;
            run_link(opened, node, session, true, hello, context, events).await;
        });
    }

    /// Answers `node`'s offer of `session` and runs the link once the
    /// channel opens; a description that cannot be used is refused.
    fn spawn_answer(&mut self, node: NodeId, session: u64, offer: String) {
        let config = self.rtc_config();
        let me = self.me();
        let events = self.events_tx.clone();
        let (hello, context) = self.webrtc_link(node);
        tracing::info!(peer = %node, address = %context.observed_address, "answering a WebRTC offer");
        tokio::spawn(async move {
            let opened = async {
                let (session_rtc, sdp) = match Session::answer(&config, offer).await {
                    Ok(answered) => answered,
                    Err(error) => {
                        let refuse = Signal {
                            from: me,
                            to: node,
                            session,
                            address: String::new(),
                            body: SignalBody::Refuse {
                                reason: error.to_string(),
                            },
                        };
                        let _ = events.send(ClusterEvent::SignalOut(refuse)).await;
                        return Err(error);
                    }
                };
                let answer = Signal {
                    from: me,
                    to: node,
                    session,
                    address: String::new(),
                    body: SignalBody::Answer { sdp },
                };
                let _ = events.send(ClusterEvent::SignalOut(answer)).await;
                session_rtc.open().await
            };
            let opened = opened.await;
            run_link(opened, node, session, false, hello, context, events).await;
        });
    }
}

/// Reports how the attempt ended and, if the channel opened, runs the
/// link over it until it closes.
async fn run_link(
    opened: Result<RtcStream, RtcError>,
    node: NodeId,
    session: u64,
    offered: bool,
    mut hello: Hello,
    mut context: LinkContext,
    events: mpsc::Sender<ClusterEvent>,
) {
    let stream = match opened {
        Ok(stream) => stream,
        Err(error) => {
            let ended = ClusterEvent::WebrtcEnded {
                node,
                session,
                no_path: error.no_path(),
                error: Some(error.to_string()),
            };
            let _ = events.send(ended).await;
            return;
        }
    };
    tracing::info!(
        peer = %node,
        transport = stream.transport.label(),
        handshake_ms = stream.handshake.as_millis() as u64,
        "WebRTC data channel open (ICE and DTLS)"
    );
    let ended = ClusterEvent::WebrtcEnded {
        node,
        session,
        error: None,
        no_path: false,
    };
    let _ = events.send(ended).await;
    hello.dtls_fingerprints = Some(stream.fingerprints);
    context.transport = stream.transport;
    context.handshake = Some(stream.handshake);
    // An admitted link's last words (a stopping node's goodbye) are only
    // out once the pump has handed them to the channel: the link stays
    // counted among the open ones until then.
    let open = link::run(stream.stream, hello, offered, context).await;
    let farewell = Duration::from_millis(LINK_FAREWELL_MS);
    if tokio::time::timeout(farewell, stream.pump).await.is_err() {
        tracing::debug!(peer = %node, "a WebRTC channel took over {LINK_FAREWELL_MS} ms to close");
    }
    drop(open);
}
