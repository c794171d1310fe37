//! WebRTC links: a peer connection with one negotiated, reliable, ordered
//! data channel (id 0, so there is no open round trip), turned into a byte
//! stream that [`super::link::run`] runs exactly as it runs a TCP
//! connection: the Noise handshake, the Hello, heartbeats and frames.
//!
//! The stream's bytes travel in data-channel messages of at most
//! [`RTC_MESSAGE_BYTES`]; the link's length prefixes put frames back
//! together, so a frame of any size crosses. The data channel's send
//! buffer is bounded ([`RTC_SEND_BUFFER_BYTES`]) and the pipe to the link
//! too ([`RTC_PIPE_BYTES`]): a slow peer holds the writer back, as a full
//! socket does, and the link's write timeout closes a stuck link.
//!
//! ICE candidates are gathered completely before a description is sent
//! (host, server-reflexive from `--stun`, relayed from `--turn`), so one
//! offer and one answer carry everything; signaling ([`super::signaling`])
//! relays them through a node both ends are linked to.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::{Notify, watch};
use webrtc::data_channel::{DataChannel, DataChannelEvent, RTCDataChannelInit};
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCConfigurationBuilder,
    RTCIceCandidateType, RTCIceGatheringState, RTCIceServer, RTCPeerConnectionState,
    RTCSessionDescription, SettingEngineBuilder,
};

use super::protocol::{DtlsFingerprints, IceServer, LinkTransport};
use crate::limits::{
    MAX_SDP_BYTES, RTC_CONNECT_TIMEOUT_MS, RTC_DRAIN_TIMEOUT_MS, RTC_GATHER_TIMEOUT_MS,
    RTC_MESSAGE_BYTES, RTC_PIPE_BYTES, RTC_SEND_BUFFER_BYTES,
};

/// How this node opens WebRTC links.
#[derive(Debug, Clone)]
pub struct RtcConfig {
    /// STUN and TURN servers (this node's own, then those peers shared).
    pub ice_servers: Vec<IceServer>,
    /// Where the UDP sockets bind: the IP the node listens on, port 0
    /// (`0.0.0.0` means every interface but loopback).
    pub udp_bind: String,
}

/// Why a WebRTC link did not open. The words say what to do.
#[derive(Debug, thiserror::Error)]
pub enum RtcError {
    #[error("the session description is not usable: {0}")]
    BadDescription(String),
    #[error("WebRTC failed: {0}")]
    Stack(String),
    /// ICE found no path between the two nodes.
    #[error("{0}")]
    NoPath(String),
    /// The attempt ended before ICE began (no answer, called off).
    #[error("{0}")]
    Abandoned(String),
}

impl RtcError {
    /// Whether the two nodes were found to have no path between them (as
    /// opposed to an attempt that could not be made).
    pub fn no_path(&self) -> bool {
        matches!(self, RtcError::NoPath(_))
    }
}

fn stack(error: webrtc::error::Error) -> RtcError {
    RtcError::Stack(error.to_string())
}

/// Which end of the session this node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Offerer,
    Answerer,
}

/// A data channel that opened, as a byte stream for the link.
pub struct RtcStream {
    pub stream: DuplexStream,
    pub fingerprints: DtlsFingerprints,
    pub transport: LinkTransport,
    /// From the start of the session to the open channel.
    pub handshake: Duration,
    /// Moves the stream's bytes to and from the channel; it ends after the
    /// stream does, once what the link wrote last is acknowledged (at
    /// most [`RTC_DRAIN_TIMEOUT_MS`] later) and the connection is closed.
    pub pump: tokio::task::JoinHandle<()>,
}

/// What the connection's event handler tells the session.
struct Events {
    gathered: Notify,
    state: watch::Sender<RTCPeerConnectionState>,
}

struct Handler(Arc<Events>);

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            self.0.gathered.notify_one();
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        self.0.state.send_replace(state);
    }
}

/// A peer connection with its data channel, before the channel opens.
pub struct Session {
    pc: Arc<dyn PeerConnection>,
    channel: Arc<dyn DataChannel>,
    events: Arc<Events>,
    role: Role,
    started: Instant,
    /// Whether TURN servers were configured (for the words of a failure).
    has_turn: bool,
}

impl Session {
    async fn new(config: &RtcConfig, role: Role) -> Result<Session, RtcError> {
        let servers = config
            .ice_servers
            .iter()
            .map(|server| RTCIceServer {
                urls: vec![server.url.clone()],
                username: server.username.clone(),
                credential: server.credential.clone(),
            })
            .collect();
        let (state, _) = watch::channel(RTCPeerConnectionState::New);
        let events = Arc::new(Events {
            gathered: Notify::new(),
            state,
        });
        let configuration = RTCConfigurationBuilder::new().with_ice_servers(servers);
        // Host candidates are the node's addresses, never mDNS names: no
        // multicast socket (which fails on a host without a route for
        // multicast) and no `.local` lookups.
        let settings = SettingEngineBuilder::new()
            .with_multicast_dns_mode(rtc_ice::mdns::MulticastDnsMode::Disabled)
            .build();
        let pc = PeerConnectionBuilder::new()
            .with_configuration(configuration.build())
            .with_setting_engine(settings)
            .with_handler(Arc::new(Handler(Arc::clone(&events))))
            .with_udp_addrs(vec![config.udp_bind.clone()])
            .with_data_channel_send_buffer_limit(RTC_SEND_BUFFER_BYTES)
            .build()
            .await
            .map_err(stack)?;
        let pc: Arc<dyn PeerConnection> = Arc::new(pc);
        // Negotiated on both ends with the same id: no in-band open.
        let init = RTCDataChannelInit {
            ordered: true,
            negotiated: Some(0),
            ..Default::default()
        };
        let channel = pc
            .create_data_channel("ringlet-link", Some(init))
            .await
            .map_err(stack)?;
        Ok(Session {
            pc,
            channel,
            events,
            role,
            started: Instant::now(),
            has_turn: config
                .ice_servers
                .iter()
                .any(|s| s.url.starts_with("turn:") || s.url.starts_with("turns:")),
        })
    }

    /// Waits until candidates are gathered (or the gathering time is up)
    /// and returns the local description with them.
    async fn gathered_description(&self) -> Result<String, RtcError> {
        let gathered = self.events.gathered.notified();
        let _ = tokio::time::timeout(Duration::from_millis(RTC_GATHER_TIMEOUT_MS), gathered).await;
        self.pc
            .local_description()
            .await
            .map(|d| d.sdp)
            .ok_or_else(|| RtcError::Stack("no local description".into()))
    }

    /// Starts a session as the offering end; returns it and the offer.
    pub async fn offer(config: &RtcConfig) -> Result<(Session, String), RtcError> {
        let session = Session::new(config, Role::Offerer).await?;
        let offer = session.pc.create_offer(None).await.map_err(stack)?;
        session
            .pc
            .set_local_description(offer)
            .await
            .map_err(stack)?;
        let sdp = session.gathered_description().await?;
        Ok((session, sdp))
    }

    /// Starts a session answering `offer`; returns it and the answer.
    pub async fn answer(config: &RtcConfig, offer: String) -> Result<(Session, String), RtcError> {
        check_description(&offer)?;
        let description = RTCSessionDescription::offer(offer)
            .map_err(|e| RtcError::BadDescription(e.to_string()))?;
        let session = Session::new(config, Role::Answerer).await?;
        session
            .pc
            .set_remote_description(description)
            .await
            .map_err(|e| RtcError::BadDescription(e.to_string()))?;
        let answer = session.pc.create_answer(None).await.map_err(stack)?;
        session
            .pc
            .set_local_description(answer)
            .await
            .map_err(stack)?;
        let sdp = session.gathered_description().await?;
        Ok((session, sdp))
    }

    /// The offering end takes the answer.
    pub async fn answered(&self, answer: String) -> Result<(), RtcError> {
        check_description(&answer)?;
        let description = RTCSessionDescription::answer(answer)
            .map_err(|e| RtcError::BadDescription(e.to_string()))?;
        self.pc
            .set_remote_description(description)
            .await
            .map_err(|e| RtcError::BadDescription(e.to_string()))
    }

    /// Waits for the data channel to open and returns the link's stream.
    pub async fn open(self) -> Result<RtcStream, RtcError> {
        let mut state = self.events.state.subscribe();
        let wait_open = async {
            loop {
                match self.channel.poll().await {
                    Some(DataChannelEvent::OnOpen) => return Ok(()),
                    Some(DataChannelEvent::OnClose) | None => {
                        return Err(RtcError::Stack(
                            "the data channel closed before it opened".into(),
                        ));
                    }
                    Some(_) => {}
                }
            }
        };
        let failed = async {
            loop {
                if state.changed().await.is_err() {
                    return;
                }
                let now = *state.borrow();
                if matches!(
                    now,
                    RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed
                ) {
                    return;
                }
            }
        };
        let timeout = Duration::from_millis(RTC_CONNECT_TIMEOUT_MS);
        let opened = tokio::select! {
            opened = tokio::time::timeout(timeout, wait_open) => opened.ok(),
            () = failed => None,
        };
        match opened {
            Some(Ok(())) => {}
            Some(Err(error)) => {
                self.close().await;
                return Err(error);
            }
            None => {
                let reason = self.no_path_reason().await;
                self.close().await;
                return Err(RtcError::NoPath(reason));
            }
        }
        let fingerprints = self.fingerprints().await?;
        let transport = self.transport().await;
        let handshake = self.started.elapsed();
        let (link_end, channel_end) = tokio::io::duplex(RTC_PIPE_BYTES);
        let pump = tokio::spawn(pump(self.pc, self.channel, channel_end));
        Ok(RtcStream {
            stream: link_end,
            fingerprints,
            transport,
            handshake,
            pump,
        })
    }

    /// Both ends' DTLS fingerprints, from the two descriptions.
    async fn fingerprints(&self) -> Result<DtlsFingerprints, RtcError> {
        let local = self.pc.local_description().await.map(|d| d.sdp);
        let remote = self.pc.remote_description().await.map(|d| d.sdp);
        let (Some(local), Some(remote)) = (
            local.as_deref().and_then(fingerprint),
            remote.as_deref().and_then(fingerprint),
        ) else {
            return Err(RtcError::BadDescription(
                "a description has no DTLS fingerprint".into(),
            ));
        };
        Ok(match self.role {
            Role::Offerer => DtlsFingerprints {
                offerer: local,
                answerer: remote,
            },
            Role::Answerer => DtlsFingerprints {
                offerer: remote,
                answerer: local,
            },
        })
    }

    /// Whether the selected candidate pair goes through a TURN server: a
    /// relayed candidate at either end. (The stats report cannot tell: it
    /// does not list the candidates a description carried.)
    async fn transport(&self) -> LinkTransport {
        let Some(sctp) = self.pc.sctp().await else {
            return LinkTransport::Webrtc;
        };
        let ice = sctp.transport().ice_transport();
        match ice.get_selected_candidate_pair().await {
            Ok(Some(pair))
                if pair.local().typ == RTCIceCandidateType::Relay
                    || pair.remote().typ == RTCIceCandidateType::Relay =>
            {
                LinkTransport::WebrtcTurn
            }
            _ => LinkTransport::Webrtc,
        }
    }

    /// Why ICE found no path, in words that say what to do.
    async fn no_path_reason(&self) -> String {
        let remote = self
            .pc
            .remote_description()
            .await
            .map(|d| d.sdp)
            .unwrap_or_default();
        let remote_relay = remote.contains(" typ relay");
        if self.has_turn || remote_relay {
            format!(
                "ICE found no path within {RTC_CONNECT_TIMEOUT_MS} ms, not even through the TURN server; check that it is reachable from both nodes and that --turn-user and --turn-credential are right"
            )
        } else {
            format!(
                "ICE found no path within {RTC_CONNECT_TIMEOUT_MS} ms and no TURN server is configured: a node behind a symmetric NAT (or a firewall that blocks UDP) can only link through one; start a node of the cluster with --turn turn:HOST:PORT --turn-user USER --turn-credential SECRET"
            )
        }
    }

    async fn close(&self) {
        let _ = self.channel.close().await;
        let _ = self.pc.close().await;
    }
}

/// A description a peer sent must be of bounded size and text.
fn check_description(sdp: &str) -> Result<(), RtcError> {
    if sdp.len() > MAX_SDP_BYTES {
        return Err(RtcError::BadDescription(format!(
            "{} bytes, the limit is {MAX_SDP_BYTES}",
            sdp.len()
        )));
    }
    if !sdp.starts_with("v=0") {
        return Err(RtcError::BadDescription(
            "it does not start with `v=0`".into(),
        ));
    }
    Ok(())
}

/// The DTLS fingerprint line of a description (`sha-256 AB:CD:..`).
pub fn fingerprint(sdp: &str) -> Option<String> {
    sdp.lines()
        .find_map(|line| line.trim().strip_prefix("a=fingerprint:"))
        .map(|f| f.trim().to_ascii_lowercase())
}

/// Moves bytes between the link's pipe and the data channel until either
/// side ends, then closes the peer connection. Two tasks, so that a send
/// waiting for buffer space never stops incoming messages.
async fn pump(pc: Arc<dyn PeerConnection>, channel: Arc<dyn DataChannel>, pipe: DuplexStream) {
    let (mut from_link, mut to_link) = tokio::io::split(pipe);
    let sender = Arc::clone(&channel);
    let mut outgoing = tokio::spawn(async move {
        let mut buffer = vec![0u8; RTC_MESSAGE_BYTES];
        loop {
            let n = match from_link.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if sender.send(BytesMut::from(&buffer[..n])).await.is_err() {
                return;
            }
        }
    });
    let incoming = async {
        loop {
            match channel.poll().await {
                Some(DataChannelEvent::OnMessage(message)) => {
                    if to_link.write_all(&message.data).await.is_err() {
                        return;
                    }
                }
                Some(DataChannelEvent::OnClose) | None => return,
                Some(_) => {}
            }
        }
    };
    let link_ended = tokio::select! {
        () = incoming => {
            outgoing.abort();
            false
        }
        _ = &mut outgoing => true,
    };
    if link_ended {
        // What the link wrote last (a goodbye) is still in SCTP's send
        // buffer: closing now would drop it.
        let drained = async {
            while channel.outstanding_bytes().await.is_ok_and(|n| n > 0) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_millis(RTC_DRAIN_TIMEOUT_MS), drained).await;
    }
    // The link reads the end of its stream; the peer sees the channel close.
    let _ = to_link.shutdown().await;
    let _ = channel.close().await;
    let _ = pc.close().await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn loopback() -> RtcConfig {
        RtcConfig {
            ice_servers: Vec::new(),
            udp_bind: "127.0.0.1:0".into(),
        }
    }

    /// Two sessions in this process, linked over loopback UDP.
    async fn pair() -> (RtcStream, RtcStream) {
        let (offerer, offer) = Session::offer(&loopback()).await.expect("offer");
        let (answerer, answer) = Session::answer(&loopback(), offer).await.expect("answer");
        offerer.answered(answer).await.expect("answered");
        let (a, b) = tokio::join!(offerer.open(), answerer.open());
        (a.expect("offerer open"), b.expect("answerer open"))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bytes_of_any_length_cross_in_order_and_both_ends_agree_on_fingerprints() {
        let (mut a, mut b) = pair().await;
        assert_eq!(a.fingerprints, b.fingerprints);
        assert!(
            a.fingerprints.offerer.starts_with("sha-256 "),
            "{:?}",
            a.fingerprints
        );
        assert_ne!(a.fingerprints.offerer, a.fingerprints.answerer);
        assert_eq!(a.transport, LinkTransport::Webrtc);
        // More than several messages' worth, with a pattern that shows any
        // piece out of order or lost.
        let sent: Vec<u8> = (0..(5 * RTC_MESSAGE_BYTES + 123))
            .map(|i| (i % 251) as u8)
            .collect();
        let writer = {
            let sent = sent.clone();
            tokio::spawn(async move {
                a.stream.write_all(&sent).await.expect("write");
                a
            })
        };
        let mut received = vec![0u8; sent.len()];
        b.stream.read_exact(&mut received).await.expect("read");
        assert_eq!(received, sent);
        // One end closing is the other's end of stream.
        drop(writer.await.expect("writer"));
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(10), b.stream.read_to_end(&mut rest))
            .await
            .expect("the far end sees the close")
            .unwrap_or(0);
        assert_eq!(n, 0);
    }

    fn keys(secret: &crate::identity::ClusterSecret) -> crate::cluster::secure::LinkKeys {
        let dir = std::env::temp_dir().join(format!(
            "ringlet-rtc-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let (identity, _) =
            crate::identity::Identity::load_or_create(&dir, None).expect("identity");
        let _ = std::fs::remove_dir_all(&dir);
        crate::cluster::secure::LinkKeys::new(identity.key, secret, false)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_channel_that_closes_mid_frame_is_a_bad_frame_not_a_clean_close() {
        use crate::cluster::protocol::{Frame, FrameError, encode};
        use crate::cluster::secure::handshake;
        let (a, b) = pair().await;
        let secret = crate::identity::ClusterSecret::random();
        let (ka, kb) = (keys(&secret), keys(&secret));
        let (ar, aw) = tokio::io::split(a.stream);
        let (br, bw) = tokio::io::split(b.stream);
        let (sa, sb) = tokio::join!(handshake(ar, aw, &ka, true), handshake(br, bw, &kb, false));
        let (mut sa, mut sb) = (sa.expect("handshake a"), sb.expect("handshake b"));
        // A whole frame crosses; then half of one, and the channel closes.
        let probe = Frame::Probe {
            padding: vec![7; 3 * RTC_MESSAGE_BYTES],
        };
        sa.writer.write_frame(&probe).await.expect("write");
        assert!(matches!(
            sb.reader.read_frame_timed().await.expect("read").0,
            Frame::Probe { padding } if padding.len() == 3 * RTC_MESSAGE_BYTES
        ));
        let bytes = encode(&probe).expect("encode");
        sa.writer
            .write_stream_bytes(&bytes[..bytes.len() / 2])
            .await
            .expect("write half");
        drop(sa);
        let result = tokio::time::timeout(Duration::from_secs(10), sb.reader.read_frame_timed())
            .await
            .expect("the close arrives");
        assert!(
            matches!(&result, Err(FrameError::Malformed(m)) if m.contains("middle of a frame")),
            "{:?}",
            result.err()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn garbled_descriptions_are_errors() {
        for junk in [
            "",
            "hello",
            "v=0\r\nthis is not sdp",
            &"v=0\n".repeat(10_000),
        ] {
            let result = Session::answer(&loopback(), junk.to_string()).await;
            assert!(
                matches!(result, Err(RtcError::BadDescription(_))),
                "{junk:.20}: {:?}",
                result.err()
            );
        }
        let (offerer, _) = Session::offer(&loopback()).await.expect("offer");
        assert!(offerer.answered("v=0\r\nnonsense".into()).await.is_err());
    }

    #[test]
    fn fingerprints_are_read_from_descriptions() {
        let sdp = "v=0\r\no=- 1 2 IN IP4 0.0.0.0\r\na=fingerprint:SHA-256 AB:CD\r\n";
        assert_eq!(fingerprint(sdp).as_deref(), Some("sha-256 ab:cd"));
        assert_eq!(fingerprint("v=0\r\n"), None);
    }
}
