//! Links between nodes: opening one (dial or accept), the Noise handshake
//! that proves both ends hold the cluster secret ([`super::secure`]), the
//! Hello exchange, and the two tasks that then carry encrypted frames (a
//! reader and a writer with a heartbeat). Every wait has a timeout; a bad
//! or unauthentic frame closes the link with one warning; the node goes
//! on serving.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use scheduler::NodeId;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc, oneshot, watch};

use super::ClusterEvent;
use super::events::LinkEnd;
use super::hops::Hops;
use super::membership::Refusal;
use super::protocol::{
    Frame, FrameError, Hello, LinkTransport, PROTOCOL_VERSION, UPGRADE_TOKEN, VERSION_HEADER,
};
use super::secure::{self, HandshakeError, LinkKeys, SecureReader, SecureWriter};
use crate::limits::{
    HEARTBEAT_INTERVAL_MS, HEARTBEAT_TIMEOUT_MS, KEPT_LINK_WAIT_MS, LINK_CONNECT_TIMEOUT_MS,
    LINK_FAREWELL_MS, LINK_HANDSHAKE_TIMEOUT_MS, LINK_QUEUE_LEN, LINK_WRITE_TIMEOUT_MS,
    PROBE_BYTES, UPGRADE_REFUSAL_BODY_BYTES, UPGRADE_REFUSAL_BODY_MS, UPGRADE_RESPONSE_MAX_BYTES,
};

/// Distinguishes the links to one peer over time (a reconnect is a new link).
pub type LinkId = u64;

/// An accepted connection after the HTTP upgrade.
pub type AcceptedStream = hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>;

static NEXT_LINK_ID: AtomicU64 = AtomicU64::new(1);

/// The sending side of an open link, held by the cluster actor.
#[derive(Debug, Clone)]
pub struct LinkSender {
    pub id: LinkId,
    /// True when this node dialed the link.
    pub dialed: bool,
    /// The peer's address as seen from here (dialed, or connected from).
    pub observed_address: String,
    /// What carries the link.
    pub transport: LinkTransport,
    /// How long a WebRTC link took to open.
    pub handshake: Option<Duration>,
    /// The session's binding ([`secure::Session::binding`]): the same at
    /// both ends of this link.
    pub binding: u64,
    frames: mpsc::Sender<Frame>,
    close: Arc<Notify>,
    /// This node is stopping: write what is queued, then close.
    leave: Arc<Notify>,
    /// When a frame from the peer was last read (any frame, heartbeats
    /// included), for telling a silent peer from a busy one.
    heard: Arc<Heard>,
}

/// The time a link last read a frame, shared by its reader and the actor.
#[derive(Debug)]
pub struct Heard {
    since: std::time::Instant,
    millis: std::sync::atomic::AtomicU64,
}

impl Heard {
    fn new() -> Self {
        Self {
            since: std::time::Instant::now(),
            millis: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn now(&self) {
        let millis = u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.millis.store(millis, Ordering::Relaxed);
    }

    /// How long ago the last frame was read.
    pub fn silent_for(&self) -> Duration {
        let last = Duration::from_millis(self.millis.load(Ordering::Relaxed));
        self.since.elapsed().saturating_sub(last)
    }
}

impl LinkSender {
    /// How long the peer has sent nothing on this link.
    pub fn silent_for(&self) -> Duration {
        self.heard.silent_for()
    }

    /// This node was frozen: the peer's silence counts from now.
    pub fn heard_now(&self) {
        self.heard.now();
    }

    /// Queues a frame. A full queue means the peer stopped reading: the
    /// link is closed and false returned, as for a link already gone.
    pub fn send(&self, frame: Frame) -> bool {
        match self.frames.try_send(frame) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(
                    link = self.id,
                    "a link fell {LINK_QUEUE_LEN} frames behind; closing it"
                );
                self.close();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Closes the link; its `LinkDown` follows.
    pub fn close(&self) {
        self.close.notify_one();
    }

    /// This node is stopping: the link writes the frames queued so far (a
    /// goodbye) and closes, with no `LinkDown`.
    pub fn leave(&self) {
        self.leave.notify_one();
    }

    /// This node keeps another link to the same peer: the peer is told so
    /// (and keeps this node as a member), and closes this link when it
    /// reads it. Without room in the queue to say it, the link just closes.
    pub fn replace(&self) {
        if self.frames.try_send(Frame::LinkReplaced).is_err() {
            self.close();
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// No TCP connection could be opened (refused, unreachable, or no
    /// answer in time): a NAT or firewall may be in the way.
    #[error("cannot connect to {address}: {reason}")]
    NoConnection { address: String, reason: String },
    #[error("cannot connect to {address}: {reason}")]
    Connect { address: String, reason: String },
    #[error("{address} refused the link: {reason}")]
    Refused { address: String, reason: String },
    #[error("handshake with {peer} failed: {reason}")]
    Handshake { peer: String, reason: String },
}

/// Opens a link to the node whose API listens at `address` (HOST:PORT).
pub async fn dial(address: &str) -> Result<TcpStream, LinkError> {
    let connect = |reason: String| LinkError::Connect {
        address: address.to_string(),
        reason,
    };
    let no_connection = |reason: String| LinkError::NoConnection {
        address: address.to_string(),
        reason,
    };
    let timeout = Duration::from_millis(LINK_CONNECT_TIMEOUT_MS);
    let mut stream = tokio::time::timeout(timeout, TcpStream::connect(address))
        .await
        .map_err(|_| no_connection(format!("no answer within {LINK_CONNECT_TIMEOUT_MS} ms")))?
        .map_err(|e| no_connection(e.to_string()))?;
    let _ = stream.set_nodelay(true);
    let request = format!(
        "GET /v1/ring/link HTTP/1.1\r\nHost: {address}\r\nConnection: Upgrade\r\nUpgrade: {UPGRADE_TOKEN}\r\n{VERSION_HEADER}: {PROTOCOL_VERSION}\r\n\r\n"
    );
    let exchange = async {
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| connect(e.to_string()))?;
        read_upgrade_response(&mut stream, address).await
    };
    tokio::time::timeout(Duration::from_millis(LINK_HANDSHAKE_TIMEOUT_MS), exchange)
        .await
        .map_err(|_| connect("no upgrade response in time".into()))??;
    Ok(stream)
}

/// Reads the HTTP response head byte by byte (so no link bytes are
/// consumed) and accepts only `101 Switching Protocols`.
async fn read_upgrade_response(stream: &mut TcpStream, address: &str) -> Result<(), LinkError> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= UPGRADE_RESPONSE_MAX_BYTES {
            return Err(LinkError::Refused {
                address: address.into(),
                reason: "the response head is too long".into(),
            });
        }
        let byte = stream.read_u8().await.map_err(|e| LinkError::Connect {
            address: address.into(),
            reason: e.to_string(),
        })?;
        head.push(byte);
    }
    let head = String::from_utf8_lossy(&head);
    if head.starts_with("HTTP/1.1 101") {
        return Ok(());
    }
    // Refusals carry a JSON body explaining why; read a little of it.
    let mut body = vec![0u8; UPGRADE_REFUSAL_BODY_BYTES];
    let n = tokio::time::timeout(
        Duration::from_millis(UPGRADE_REFUSAL_BODY_MS),
        stream.read(&mut body),
    )
    .await
    .ok()
    .and_then(Result::ok)
    .unwrap_or(0);
    let status = head.lines().next().unwrap_or_default().to_string();
    let detail = String::from_utf8_lossy(&body[..n]).to_string();
    Err(LinkError::Refused {
        address: address.into(),
        reason: format!("{status} {detail}").trim().to_string(),
    })
}

/// What a link needs from the node that runs it.
pub(crate) struct LinkContext {
    pub me: NodeId,
    pub events: mpsc::Sender<ClusterEvent>,
    pub observed_address: String,
    /// This node's key and the cluster's, as they are when the link opens.
    pub keys: Arc<LinkKeys>,
    pub transport: LinkTransport,
    /// How long a WebRTC link took to open.
    pub handshake: Option<Duration>,
    /// Where the reader hands jobs for this node's stage.
    pub hops: Arc<Hops>,
    /// The node's open links, which this one joins after the Hellos.
    pub open_links: OpenLinks,
}

impl LinkContext {
    /// The context of a TCP link.
    pub fn tcp(
        me: NodeId,
        events: mpsc::Sender<ClusterEvent>,
        observed_address: String,
        keys: Arc<LinkKeys>,
        hops: Arc<Hops>,
        open_links: OpenLinks,
    ) -> Self {
        Self {
            me,
            events,
            observed_address,
            keys,
            transport: LinkTransport::Tcp,
            handshake: None,
            hops,
            open_links,
        }
    }
}

/// Counts the links that may still have something to write or a peer
/// to hear from: a stopping node waits for the count to reach zero, so
/// that its goodbyes are read before the process exits.
#[derive(Debug, Clone)]
pub struct OpenLinks(Arc<watch::Sender<()>>);

/// Held by a link from its handshake until it closes.
#[derive(Debug)]
pub struct OpenLink {
    _counted: watch::Receiver<()>,
}

impl OpenLinks {
    pub fn new() -> Self {
        Self(Arc::new(watch::channel(()).0))
    }

    pub fn hold(&self) -> OpenLink {
        OpenLink {
            _counted: self.0.subscribe(),
        }
    }

    /// Resolves once no link holds an [`OpenLink`].
    pub async fn all_closed(&self) {
        self.0.closed().await;
    }

    /// How many links hold one now.
    pub fn count(&self) -> usize {
        self.0.receiver_count()
    }
}

impl Default for OpenLinks {
    fn default() -> Self {
        Self::new()
    }
}

/// Runs a link until it closes: handshake, registration with the cluster
/// actor, then frames both ways. `hello` is ours. Returns, for a link the
/// actor admitted, its place among the open links, which the caller
/// holds while the transport under `stream` still has bytes to deliver.
pub(crate) async fn run<S>(
    stream: S,
    hello: Hello,
    dialed: bool,
    context: LinkContext,
) -> Option<OpenLink>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (reader, writer) = tokio::io::split(stream);
    let id = NEXT_LINK_ID.fetch_add(1, Ordering::Relaxed);
    let started = std::time::Instant::now();
    let proven = tokio::time::timeout(
        Duration::from_millis(LINK_HANDSHAKE_TIMEOUT_MS),
        secure::handshake(reader, writer, &context.keys, dialed),
    )
    .await
    .unwrap_or_else(|_| {
        Err(HandshakeError::Protocol(format!(
            "no handshake within {LINK_HANDSHAKE_TIMEOUT_MS} ms"
        )))
    });
    let session = match proven {
        Ok(session) => session,
        Err(error) => {
            // The actor logs refusals once per peer; other failures are
            // the network's and are retried.
            let refused = ClusterEvent::Refused {
                address: context.observed_address.clone(),
                dialed,
                reason: error.to_string(),
                wrong_key: error.is_wrong_key(),
            };
            let _ = context.events.send(refused).await;
            return None;
        }
    };
    let secure::Session {
        peer_key,
        binding,
        mut reader,
        mut writer,
    } = session;
    if peer_key == context.keys.node.public {
        tracing::warn!(
            peer = %context.observed_address,
            "a node has this node's own key: each node on a machine needs its own --config-dir"
        );
        return None;
    }
    let theirs = match exchange_hellos(&mut reader, &mut writer, hello, context.me).await {
        Ok(theirs) => theirs,
        Err(error) => {
            tracing::warn!(%error, "link handshake failed");
            return None;
        }
    };
    let peer = theirs.node;
    tracing::debug!(
        peer = %context.observed_address,
        micros = started.elapsed().as_micros() as u64,
        "link handshake done (Noise and Hello)"
    );
    let (frames_tx, frames_rx) = mpsc::channel(LINK_QUEUE_LEN);
    let close = Arc::new(Notify::new());
    let leave = Arc::new(Notify::new());
    let sender = LinkSender {
        id,
        dialed,
        observed_address: context.observed_address.clone(),
        transport: context.transport,
        handshake: context.handshake,
        binding,
        frames: frames_tx.clone(),
        close: Arc::clone(&close),
        leave: Arc::clone(&leave),
        heard: Arc::new(Heard::new()),
    };
    let heard = Arc::clone(&sender.heard);
    // Counted from before the actor can admit it, so that a node stopping
    // meanwhile waits for this link's goodbye too.
    let open = context.open_links.hold();
    let (accept_tx, accept_rx) = oneshot::channel();
    let up = ClusterEvent::LinkUp {
        hello: Box::new(theirs),
        key: peer_key,
        keys: Arc::clone(&context.keys),
        sender,
        accepted: accept_tx,
    };
    let admitted = match context.events.send(up).await {
        Ok(()) => accept_rx.await.unwrap_or(Err(Refusal::Stopping)),
        Err(_) => Err(Refusal::Stopping),
    };
    if let Err(refusal) = admitted {
        drop(open);
        say_refused(reader, writer, &refusal).await;
        return None;
    }
    let (finish_writing, finish) = oneshot::channel();
    let mut writer_task = tokio::spawn(write_loop(writer, frames_rx, finish));
    // The peer measures the link's bandwidth on this before real traffic.
    // Not through a TURN relay: there both ends' probes, and those of every
    // other link to the same node, arrive at once through one relay, and
    // the lost datagrams held every link's heartbeats back long enough to
    // kill it (seen in the NAT lab); the relay's bandwidth is then
    // measured on the first large activations instead.
    if context.transport != LinkTransport::WebrtcTurn {
        let _ = frames_tx.try_send(Frame::Probe {
            padding: vec![0; PROBE_BYTES],
        });
    }
    // Boxed, so that a node stopping can go on with it (below) and then
    // let go of the reader.
    let mut reading = Box::pin(read_loop(&mut reader, peer, &frames_tx, &context, &heard));
    let end = tokio::select! {
        end = &mut reading => Some(end),
        () = close.notified() => Some(LinkEnd::from("closed by this node")),
        // The node is stopping and its actor with it: nobody to tell.
        () = leave.notified() => None,
    };
    let Some(end) = end else {
        // The goodbye is queued: the writer writes the queue out and ends.
        // Meanwhile the read loop goes on where it was, in the middle of a
        // frame perhaps (the peer's first frame is a 1 MiB probe): left
        // there, the next read would start inside it and fail at once.
        let _ = finish_writing.send(());
        let deadline = farewell_deadline();
        let at_frame_end = tokio::time::timeout_at(deadline, &mut reading)
            .await
            .is_ok();
        drop(reading);
        if at_frame_end {
            say_goodbye(&mut writer_task, &mut reader, deadline).await;
        }
        writer_task.abort();
        return Some(open);
    };
    drop(reading);
    let peer_kept_another = end == LinkEnd::PeerKeptAnother;
    let _ = context
        .events
        .send(ClusterEvent::LinkDown {
            node: peer,
            link: id,
            end,
        })
        .await;
    if peer_kept_another {
        // The peer reads this link until it closes: what this node sends
        // on it until the kept link takes its place (the actor then lets
        // go of its sender, and the queue ends) still arrives, so no
        // request's frames are lost in between. At most as long as the
        // member waits for the kept link.
        drop(frames_tx);
        let kept = tokio::time::timeout(Duration::from_millis(KEPT_LINK_WAIT_MS), &mut writer_task);
        tokio::select! {
            _ = kept => {}
            // The node stops meanwhile: the member's goodbye is queued here.
            () = leave.notified() => {
                let _ = finish_writing.send(());
                say_goodbye(&mut writer_task, &mut reader, farewell_deadline()).await;
            }
        }
    }
    writer_task.abort();
    Some(open)
}

/// Waits (bounded) for the writer to write out the queue, which ends
/// with the goodbye, then reads until the peer, having read it, closes:
/// closing first with its heartbeats unread would reset the connection,
/// and the reset could discard the goodbye before the peer reads it.
/// `reader` must be at a frame's end.
async fn say_goodbye(
    writer_task: &mut tokio::task::JoinHandle<()>,
    reader: &mut SecureReader,
    deadline: tokio::time::Instant,
) {
    let farewell = async {
        let _ = (&mut *writer_task).await;
        read_until_peer_leaves(reader).await;
    };
    let _ = tokio::time::timeout_at(deadline, farewell).await;
    writer_task.abort();
}

/// When a leaving link gives up on its goodbye: `LINK_FAREWELL_MS` on.
fn farewell_deadline() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_millis(LINK_FAREWELL_MS)
}

/// Reads and drops frames until the peer closes, or says goodbye or that
/// it kept another link.
async fn read_until_peer_leaves(reader: &mut SecureReader) {
    while let Ok((frame, _)) = reader.read_frame_timed().await {
        if matches!(frame, Frame::LinkReplaced | Frame::Bye { .. }) {
            break;
        }
    }
}

/// Tells the peer why its link was not kept, then reads until the peer
/// closes (bounded), so that closing here first cannot reset the
/// connection before the peer has read why.
async fn say_refused(mut reader: SecureReader, mut writer: SecureWriter, refusal: &Refusal) {
    let frame = match refusal {
        Refusal::Duplicate => Frame::LinkReplaced,
        refusal => Frame::Bye {
            reason: refusal.to_string(),
        },
    };
    if writer.write_frame(&frame).await.is_err() {
        return;
    }
    let drained = read_until_peer_leaves(&mut reader);
    let _ = tokio::time::timeout(Duration::from_millis(LINK_HANDSHAKE_TIMEOUT_MS), drained).await;
}

/// Sends our Hello and reads theirs, over the proven session.
async fn exchange_hellos(
    reader: &mut SecureReader,
    writer: &mut SecureWriter,
    ours: Hello,
    me: NodeId,
) -> Result<Hello, LinkError> {
    let fail = |reason: String| LinkError::Handshake {
        peer: "peer".into(),
        reason,
    };
    let ours_fingerprints = ours.dtls_fingerprints.clone();
    let exchange = async {
        writer
            .write_frame(&Frame::Hello(ours))
            .await
            .map_err(|e| fail(e.to_string()))?;
        match reader
            .read_frame_timed()
            .await
            .map_err(|e| fail(e.to_string()))?
        {
            (Frame::Hello(theirs), _) => Ok(theirs),
            (other, _) => Err(fail(format!("expected hello, got {}", other.kind()))),
        }
    };
    let theirs = tokio::time::timeout(Duration::from_millis(LINK_HANDSHAKE_TIMEOUT_MS), exchange)
        .await
        .map_err(|_| fail("no hello in time".into()))??;
    if theirs.protocol_version != PROTOCOL_VERSION {
        return Err(LinkError::Handshake {
            peer: theirs.name,
            reason: format!(
                "it speaks protocol {}, this node speaks {PROTOCOL_VERSION}",
                theirs.protocol_version
            ),
        });
    }
    if theirs.dtls_fingerprints != ours_fingerprints {
        return Err(LinkError::Handshake {
            peer: theirs.name,
            reason: format!(
                "the data channel's DTLS fingerprints do not match: the peer negotiated {:?}, this node {:?}",
                theirs.dtls_fingerprints, ours_fingerprints
            ),
        });
    }
    if theirs.node == me {
        return Err(LinkError::Handshake {
            peer: theirs.name,
            reason: "it is this node (a --peer points at itself)".into(),
        });
    }
    Ok(theirs)
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Reads frames until the link fails; returns why it ended. Heartbeats are
/// answered here, jobs for this node's stage go to it when the hops can
/// take them; everything else goes to the cluster actor.
async fn read_loop(
    reader: &mut SecureReader,
    peer: NodeId,
    frames: &mpsc::Sender<Frame>,
    context: &LinkContext,
    heard: &Heard,
) -> LinkEnd {
    let events = &context.events;
    let silence = Duration::from_millis(HEARTBEAT_TIMEOUT_MS);
    loop {
        let frame = match reader.read_frame_heard_within(Some(silence)).await {
            Err(FrameError::Silent(_)) => {
                return format!("nothing heard for {HEARTBEAT_TIMEOUT_MS} ms").into();
            }
            Err(FrameError::Closed) => return "the connection closed".into(),
            // The peer's process died or its machine went away.
            Err(FrameError::Io(error)) => {
                return format!("the connection failed: {error}").into();
            }
            Err(error @ FrameError::Unauthentic) => {
                tracing::warn!(peer = %peer, %error, "closing a link after a frame that failed authentication");
                return format!("a frame failed authentication: {error}").into();
            }
            Err(error) => {
                tracing::warn!(peer = %peer, %error, "closing a link after a bad frame");
                return format!("bad frame: {error}").into();
            }
            Ok((frame, bandwidth)) => {
                heard.now();
                if let Some(bytes_per_second) = bandwidth {
                    let _ = events.try_send(ClusterEvent::LinkBandwidth {
                        node: peer,
                        bytes_per_second,
                    });
                }
                frame
            }
        };
        match frame {
            Frame::Probe { .. } => {}
            Frame::Heartbeat { sent_at_micros } => {
                let _ = frames.try_send(Frame::HeartbeatAck { sent_at_micros });
            }
            Frame::HeartbeatAck { sent_at_micros } => {
                let rtt_micros = now_micros().saturating_sub(sent_at_micros);
                let _ = events.try_send(ClusterEvent::LinkRtt {
                    node: peer,
                    rtt_micros,
                });
            }
            Frame::Bye { reason } => return LinkEnd::Goodbye(reason),
            Frame::LinkReplaced => return LinkEnd::PeerKeptAnother,
            Frame::Hello(_) => {
                tracing::warn!(peer = %peer, "closing a link after a second hello");
                return "protocol violation: a second hello".into();
            }
            frame => {
                let event = match frame {
                    Frame::Forward(forward) => context.hops.take_forward(peer, forward),
                    frame => Some(ClusterEvent::Frame { from: peer, frame }),
                };
                if let Some(event) = event
                    && events.send(event).await.is_err()
                {
                    return "this node is stopping".into();
                }
            }
        }
    }
}

/// Writes queued frames, and a heartbeat every interval, until the queue
/// ends, a write fails or stalls, or `finish` says to write out what is
/// queued and end.
async fn write_loop(
    mut writer: SecureWriter,
    mut frames: mpsc::Receiver<Frame>,
    mut finish: oneshot::Receiver<()>,
) {
    let mut heartbeat = tokio::time::interval(Duration::from_millis(HEARTBEAT_INTERVAL_MS));
    let stall = Duration::from_millis(LINK_WRITE_TIMEOUT_MS);
    let mut finishing = false;
    loop {
        let frame = tokio::select! {
            frame = frames.recv() => match frame {
                Some(frame) => frame,
                None => return,
            },
            // Told to finish, or the link task is gone (aborting this one).
            _ = &mut finish, if !finishing => {
                // Nothing more is queued; what is, is written.
                frames.close();
                finishing = true;
                continue;
            }
            _ = heartbeat.tick(), if !finishing => Frame::Heartbeat { sent_at_micros: now_micros() },
        };
        let written = tokio::time::timeout(stall, writer.write_frame(&frame)).await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::debug!(%error, "link write failed");
                return;
            }
            Err(_) => {
                tracing::warn!("a link write stalled for {LINK_WRITE_TIMEOUT_MS} ms; closing it");
                return;
            }
        }
    }
}

#[cfg(test)]
impl LinkSender {
    /// A link with no connection behind it, for the cluster's unit tests:
    /// what is sent on it comes out of the returned receiver. Its binding
    /// is its id, so a later link's is larger.
    pub(crate) fn detached(dialed: bool, observed_address: &str) -> (Self, mpsc::Receiver<Frame>) {
        let (frames, receiver) = mpsc::channel(LINK_QUEUE_LEN);
        let id = NEXT_LINK_ID.fetch_add(1, Ordering::Relaxed);
        let sender = Self {
            id,
            dialed,
            observed_address: observed_address.to_string(),
            transport: LinkTransport::Tcp,
            handshake: None,
            binding: id,
            frames,
            close: Arc::new(Notify::new()),
            leave: Arc::new(Notify::new()),
            heard: Arc::new(Heard::new()),
        };
        (sender, receiver)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::membership::tests::hello;
    use crate::cluster::secure::tests::keys;
    use crate::identity::ClusterSecret;
    use kernels::SequenceId;

    const WAIT: Duration = Duration::from_secs(10);

    /// The next event other than a measurement of the link.
    async fn next(events: &mut mpsc::Receiver<ClusterEvent>) -> ClusterEvent {
        loop {
            let event = tokio::time::timeout(WAIT, events.recv())
                .await
                .expect("an event in time")
                .expect("the link is running");
            if !matches!(
                event,
                ClusterEvent::LinkRtt { .. } | ClusterEvent::LinkBandwidth { .. }
            ) {
                return event;
            }
        }
    }

    /// Starts one end of a link over `stream` and admits its peer; the
    /// end's sender and its events.
    async fn end(
        stream: tokio::io::DuplexStream,
        node: u64,
        dialed: bool,
        keys: Arc<LinkKeys>,
        open_links: OpenLinks,
    ) -> (LinkSender, mpsc::Receiver<ClusterEvent>) {
        let (events, mut received) = mpsc::channel(64);
        let context = LinkContext::tcp(
            NodeId(node),
            events,
            "127.0.0.1:1".into(),
            keys,
            Arc::new(Hops::default()),
            open_links,
        );
        tokio::spawn(run(
            stream,
            hello(node, "default", "sha256:a"),
            dialed,
            context,
        ));
        match next(&mut received).await {
            ClusterEvent::LinkUp {
                sender, accepted, ..
            } => {
                accepted
                    .send(Ok(()))
                    .expect("the link waits for its answer");
                (sender, received)
            }
            _ => panic!("expected the link to come up first"),
        }
    }

    #[tokio::test]
    async fn both_ends_of_a_link_share_its_binding_and_another_link_has_another() {
        let secret = ClusterSecret::random();
        let keys_of_3 = Arc::new(keys(&secret, false));
        let keys_of_5 = Arc::new(keys(&secret, false));
        let mut bindings = Vec::new();
        // Node 3 dials node 5 twice, as it would at two of its addresses.
        for _ in 0..2 {
            let (a, b) = tokio::io::duplex(1 << 16);
            let ((dialed, _), (accepted, _)) = tokio::join!(
                end(a, 3, true, Arc::clone(&keys_of_3), OpenLinks::new()),
                end(b, 5, false, Arc::clone(&keys_of_5), OpenLinks::new())
            );
            assert_eq!(dialed.binding, accepted.binding, "one value at both ends");
            bindings.push(dialed.binding);
        }
        assert_ne!(bindings[0], bindings[1], "each session has its own");
    }

    #[tokio::test]
    async fn frames_sent_on_a_replaced_link_until_the_kept_one_takes_over_still_arrive() {
        let secret = ClusterSecret::random();
        let (a, b) = tokio::io::duplex(1 << 20);
        let (ka, kb) = (
            Arc::new(keys(&secret, false)),
            Arc::new(keys(&secret, false)),
        );
        let (a_end, b_end) = tokio::join!(
            end(a, 3, true, ka, OpenLinks::new()),
            end(b, 5, false, kb, OpenLinks::new())
        );
        let ((a_link, mut a_events), (b_link, mut b_events)) = (a_end, b_end);

        // Node 3 keeps another link to node 5 and says so on this one.
        a_link.replace();
        match next(&mut b_events).await {
            ClusterEvent::LinkDown { end, .. } => assert_eq!(end, LinkEnd::PeerKeptAnother),
            _ => panic!("node 5 hears that node 3 kept another link"),
        }

        // Node 5 still sends on this link until its kept link comes up
        // (its actor still holds this sender): node 3 gets the frame.
        assert!(b_link.send(Frame::Release {
            request: SequenceId(9)
        }));
        match next(&mut a_events).await {
            ClusterEvent::Frame {
                frame: Frame::Release { request },
                ..
            } => assert_eq!(request, SequenceId(9)),
            _ => panic!("node 3 reads what node 5 sent after the replacement"),
        }

        // The kept link took over at node 5: its actor lets go of this
        // link, which then closes at both ends.
        drop(b_link);
        match next(&mut a_events).await {
            ClusterEvent::LinkDown { end, .. } => {
                assert!(matches!(end, LinkEnd::Closed(_)), "{end:?}")
            }
            _ => panic!("node 3 sees the replaced link close"),
        }
    }

    #[tokio::test]
    async fn a_stopping_node_writes_its_goodbye_before_its_links_count_as_closed() {
        let secret = ClusterSecret::random();
        let (a, b) = tokio::io::duplex(1 << 20);
        let (ka, kb) = (
            Arc::new(keys(&secret, false)),
            Arc::new(keys(&secret, false)),
        );
        let stopping = OpenLinks::new();
        let (a_end, b_end) = tokio::join!(
            end(a, 3, true, ka, stopping.clone()),
            end(b, 5, false, kb, OpenLinks::new())
        );
        let ((a_link, mut a_events), (_b_link, mut b_events)) = (a_end, b_end);
        // A frame across: node 3's writer runs, and counts.
        assert!(a_link.send(Frame::Release {
            request: SequenceId(1)
        }));
        assert!(matches!(
            next(&mut b_events).await,
            ClusterEvent::Frame {
                frame: Frame::Release { .. },
                ..
            }
        ));
        assert_eq!(stopping.count(), 1, "the admitted link counts");

        // Node 3 stops: its actor queues a goodbye and tells the link to
        // leave. It still holds the link's sender, as it does until it
        // returns: the writer ends all the same.
        assert!(a_link.send(Frame::Bye {
            reason: "the node is stopping".into()
        }));
        a_link.leave();
        tokio::time::timeout(WAIT, stopping.all_closed())
            .await
            .expect("the link wrote its queue and closed");
        assert!(!a_link.send(Frame::Release {
            request: SequenceId(2)
        }));
        match next(&mut b_events).await {
            ClusterEvent::LinkDown { end, .. } => {
                assert_eq!(end, LinkEnd::Goodbye("the node is stopping".into()))
            }
            _ => panic!("node 5 reads the goodbye"),
        }
        // Node 3's actor hears nothing of the link's end.
        while let Ok(event) = a_events.try_recv() {
            assert!(
                !matches!(event, ClusterEvent::LinkDown { .. }),
                "a leaving link reports no LinkDown"
            );
        }
    }
}
