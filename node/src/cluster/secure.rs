//! The link's security: a Noise handshake that proves both ends hold the
//! cluster secret (and shows each end's long-term key), then every frame
//! encrypted and authenticated.
//!
//! Protocol: `Noise_XXpsk0_25519_ChaChaPoly_BLAKE2s` (snow). The
//! pre-shared key, derived from the cluster secret, is mixed in before the
//! first message, so the first message already proves the dialer holds
//! it: an accepting node answers nothing of value to a dialer without it,
//! and the dialer learns from the second message whether the node it
//! reached holds it too. The third message completes the mutual proof of
//! the static keys.
//!
//! Handshake messages travel as a 2-byte big-endian length and the Noise
//! message. A zero length is a refusal: "your first message did not prove
//! the key", so the dialer can say why it was turned away.
//!
//! After the handshake, the plaintext stream of length-prefixed frames
//! ([`protocol::encode`]) is cut into records of at most
//! [`RECORD_PLAINTEXT_BYTES`]; each record goes as a 2-byte length and its
//! ChaCha20-Poly1305 ciphertext under the direction's key, with a counter
//! nonce per direction. A record that fails authentication (a flipped bit,
//! a replay, a record out of order) ends the link.

use std::sync::Arc;
use std::time::{Duration, Instant};

use snow::StatelessTransportState;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::protocol::{self, Frame, FrameError, PROTOCOL_VERSION};
use crate::identity::{ClusterSecret, NOISE_PARAMS, NodeKey};
use crate::limits::MAX_FRAME_BYTES;

/// Noise's largest message, less the authentication tag.
const RECORD_PLAINTEXT_BYTES: usize = 65535 - TAG_BYTES;
const TAG_BYTES: usize = 16;
/// Handshake messages are small: two keys, tags and a one-byte payload.
const HANDSHAKE_MESSAGE_MAX_BYTES: usize = 256;

/// What the handshake's payloads carry: whether frames go in plaintext
/// after it (a test and benchmark switch; both ends must agree).
const FRAMES_ENCRYPTED: u8 = 1;
const FRAMES_PLAINTEXT: u8 = 0;

/// The secrets a link needs, shared by all links of a node.
#[derive(Clone)]
pub struct LinkKeys {
    pub node: NodeKey,
    pub psk: [u8; 32],
    /// Frames in plaintext after the handshake (`--insecure-plaintext-links`).
    pub plaintext_frames: bool,
}

impl std::fmt::Debug for LinkKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkKeys")
            .field("node", &self.node)
            .field("plaintext_frames", &self.plaintext_frames)
            .finish_non_exhaustive()
    }
}

impl LinkKeys {
    pub fn new(node: NodeKey, secret: &ClusterSecret, plaintext_frames: bool) -> Self {
        Self {
            node,
            psk: secret.link_key(),
            plaintext_frames,
        }
    }
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The peer does not hold this cluster's key (or we do not hold its).
    #[error("it does not hold this cluster's key")]
    WrongKey,
    #[error("{0}")]
    Protocol(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl HandshakeError {
    /// True when the failure says the peer is not of this cluster, as
    /// opposed to a network problem.
    pub fn is_wrong_key(&self) -> bool {
        matches!(self, HandshakeError::WrongKey)
    }
}

/// An authenticated link's two directions.
pub struct Session {
    /// The peer's long-term public key, as the handshake proved it.
    pub peer_key: Vec<u8>,
    /// The first 8 bytes of the Noise handshake hash: the same at both
    /// ends, and another in every other session (it covers both ends'
    /// ephemeral keys). Two links to one peer that one side dialed are
    /// told apart by it, the same way at both ends.
    pub binding: u64,
    pub reader: SecureReader,
    pub writer: SecureWriter,
}

fn noise_error(error: snow::Error) -> HandshakeError {
    HandshakeError::Protocol(format!("noise: {error}"))
}

fn builder<'a>(
    keys: &'a LinkKeys,
    prologue: &'a [u8],
) -> Result<snow::Builder<'a>, HandshakeError> {
    let params = NOISE_PARAMS.parse().map_err(noise_error)?;
    snow::Builder::new(params)
        .local_private_key(&keys.node.private)
        .and_then(|b| b.psk(0, &keys.psk))
        .and_then(|b| b.prologue(prologue))
        .map_err(noise_error)
}

/// Binds the handshake to this protocol version: a peer speaking another
/// one fails the handshake instead of misreading frames.
fn prologue() -> String {
    format!("ringlet link protocol {PROTOCOL_VERSION}")
}

async fn write_message<W: AsyncWrite + Unpin>(
    writer: &mut W,
    message: &[u8],
) -> std::io::Result<()> {
    let length = u16::try_from(message.len()).unwrap_or(u16::MAX);
    let mut bytes = Vec::with_capacity(2 + message.len());
    bytes.extend_from_slice(&length.to_be_bytes());
    bytes.extend_from_slice(message);
    writer.write_all(&bytes).await?;
    writer.flush().await
}

/// Reads one handshake message; `None` is the peer's refusal.
async fn read_message<R: AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<Option<Vec<u8>>, HandshakeError> {
    let length = usize::from(reader.read_u16().await?);
    if length == 0 {
        return Ok(None);
    }
    if length > HANDSHAKE_MESSAGE_MAX_BYTES {
        return Err(HandshakeError::Protocol(format!(
            "a {length}-byte handshake message; the limit is {HANDSHAKE_MESSAGE_MAX_BYTES}"
        )));
    }
    let mut message = vec![0u8; length];
    reader.read_exact(&mut message).await?;
    Ok(Some(message))
}

fn frames_flag(keys: &LinkKeys) -> u8 {
    if keys.plaintext_frames {
        FRAMES_PLAINTEXT
    } else {
        FRAMES_ENCRYPTED
    }
}

/// Checks that the peer wants frames the way this node does.
fn agree_on_frames(keys: &LinkKeys, payload: &[u8]) -> Result<(), HandshakeError> {
    match payload {
        [flag] if *flag == frames_flag(keys) => Ok(()),
        [FRAMES_PLAINTEXT] => Err(HandshakeError::Protocol(
            "it sends frames in plaintext (--insecure-plaintext-links) and this node does not"
                .into(),
        )),
        [FRAMES_ENCRYPTED] => Err(HandshakeError::Protocol(
            "this node sends frames in plaintext (--insecure-plaintext-links) and it does not"
                .into(),
        )),
        _ => Err(HandshakeError::Protocol(
            "an unknown handshake payload".into(),
        )),
    }
}

/// Runs the handshake as the dialer (`initiator`) or the accepting node.
/// The caller bounds it with a timeout.
pub async fn handshake<R, W>(
    mut reader: R,
    mut writer: W,
    keys: &LinkKeys,
    initiator: bool,
) -> Result<Session, HandshakeError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let prologue = prologue();
    let build = builder(keys, prologue.as_bytes())?;
    let mut state = if initiator {
        build.build_initiator()
    } else {
        build.build_responder()
    }
    .map_err(noise_error)?;
    let mut buffer = [0u8; HANDSHAKE_MESSAGE_MAX_BYTES];
    let mut payload = [0u8; HANDSHAKE_MESSAGE_MAX_BYTES];
    let flag = [frames_flag(keys)];
    // -> psk, e (empty payload, but authenticated by the psk)
    if initiator {
        let n = state.write_message(&[], &mut buffer).map_err(noise_error)?;
        write_message(&mut writer, &buffer[..n]).await?;
    } else {
        let message = read_message(&mut reader).await?.ok_or_else(|| {
            HandshakeError::Protocol("the dialer sent a refusal as its first message".into())
        })?;
        if state.read_message(&message, &mut payload).is_err() {
            // Tell the dialer why, so it can log it; then hang up.
            let _ = write_message(&mut writer, &[]).await;
            return Err(HandshakeError::WrongKey);
        }
    }
    // <- e, ee, s, es (payload: how frames go)
    if initiator {
        let Some(message) = read_message(&mut reader).await? else {
            return Err(HandshakeError::WrongKey);
        };
        let n = state
            .read_message(&message, &mut payload)
            .map_err(|_| HandshakeError::WrongKey)?;
        agree_on_frames(keys, &payload[..n])?;
    } else {
        let n = state
            .write_message(&flag, &mut buffer)
            .map_err(noise_error)?;
        write_message(&mut writer, &buffer[..n]).await?;
    }
    // -> s, se (payload: how frames go)
    if initiator {
        let n = state
            .write_message(&flag, &mut buffer)
            .map_err(noise_error)?;
        write_message(&mut writer, &buffer[..n]).await?;
    } else {
        let message = read_message(&mut reader)
            .await?
            .ok_or_else(|| HandshakeError::Protocol("the dialer refused this node's key".into()))?;
        let n = state
            .read_message(&message, &mut payload)
            .map_err(|_| HandshakeError::WrongKey)?;
        agree_on_frames(keys, &payload[..n])?;
    }
    let peer_key = state
        .get_remote_static()
        .map(<[u8]>::to_vec)
        .ok_or_else(|| HandshakeError::Protocol("no static key after the handshake".into()))?;
    let binding = state
        .get_handshake_hash()
        .first_chunk::<8>()
        .map(|bytes| u64::from_le_bytes(*bytes))
        .ok_or_else(|| HandshakeError::Protocol("a handshake hash under 8 bytes".into()))?;
    let transport = Arc::new(state.into_stateless_transport_mode().map_err(noise_error)?);
    let cipher = (!keys.plaintext_frames).then_some(transport);
    Ok(Session {
        peer_key,
        binding,
        reader: SecureReader {
            inner: Box::new(reader),
            cipher: cipher.clone(),
            nonce: 0,
            plain: Vec::new(),
        },
        writer: SecureWriter {
            inner: Box::new(writer),
            cipher,
            nonce: 0,
            sealed: Vec::new(),
        },
    })
}

/// Reads frames off a link, decrypting them.
pub struct SecureReader {
    inner: Box<dyn AsyncRead + Unpin + Send>,
    cipher: Option<Arc<StatelessTransportState>>,
    /// The next record's nonce.
    nonce: u64,
    /// Decrypted bytes not yet consumed as frames.
    plain: Vec<u8>,
}

impl SecureReader {
    /// Reads one frame and says how fast it arrived, in bytes per second,
    /// when it is large enough to measure the link by.
    pub async fn read_frame_timed(&mut self) -> Result<(Frame, Option<u64>), FrameError> {
        self.read_frame_heard_within(None).await
    }

    /// As [`read_frame_timed`](Self::read_frame_timed), failing with
    /// [`FrameError::Silent`] once nothing has arrived for `silence`
    /// (`None`: wait for ever). The clock restarts with every record, not
    /// every frame: a frame of a megabyte on a slow or relayed path can
    /// take longer than `silence` to arrive whole, and the heartbeats
    /// behind it wait, yet its records arriving prove the peer alive.
    pub async fn read_frame_heard_within(
        &mut self,
        silence: Option<Duration>,
    ) -> Result<(Frame, Option<u64>), FrameError> {
        let Some(cipher) = self.cipher.clone() else {
            let frame = protocol::read_frame_timed(&mut self.inner);
            return match silence {
                Some(silence) => tokio::time::timeout(silence, frame)
                    .await
                    .map_err(|_| FrameError::Silent(silence))?,
                None => frame.await,
            };
        };
        let mut started = None;
        let length = loop {
            if self.plain.len() >= 4 {
                let mut prefix = [0u8; 4];
                prefix.copy_from_slice(&self.plain[..4]);
                let length = u32::from_be_bytes(prefix);
                if length > MAX_FRAME_BYTES {
                    return Err(FrameError::TooLong { length });
                }
                let length = length as usize;
                if self.plain.len() >= 4 + length {
                    break length;
                }
            }
            let record = self.read_record(&cipher, &mut started);
            let record = match silence {
                // A record cut off by the timeout leaves the stream
                // unusable, and the link is closed for the silence anyway.
                Some(silence) => tokio::time::timeout(silence, record)
                    .await
                    .map_err(|_| FrameError::Silent(silence))
                    .and_then(|read| read),
                None => record.await,
            };
            match record {
                // Part of a frame came and then the end: that is a bad
                // frame, not a clean close.
                Err(FrameError::Closed) if !self.plain.is_empty() => {
                    return Err(FrameError::Malformed(format!(
                        "the link closed in the middle of a frame ({} bytes of it came)",
                        self.plain.len()
                    )));
                }
                result => result?,
            }
        };
        let frame = protocol::decode(&self.plain[4..4 + length]);
        self.plain.drain(..4 + length);
        crate::metrics::global()
            .link_bytes_received
            .inc_by((4 + length) as u64);
        let bytes_per_second = started.and_then(|s: Instant| {
            protocol::bandwidth(u32::try_from(length).unwrap_or(u32::MAX), s.elapsed())
        });
        Ok((frame?, bytes_per_second))
    }

    async fn read_record(
        &mut self,
        cipher: &StatelessTransportState,
        started: &mut Option<Instant>,
    ) -> Result<(), FrameError> {
        let length = match self.inner.read_u16().await {
            Ok(length) => usize::from(length),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(FrameError::Closed);
            }
            Err(e) => return Err(e.into()),
        };
        // The clock starts once the first record's header is in: the
        // time before that is the peer's, not the link's.
        started.get_or_insert_with(Instant::now);
        if length < TAG_BYTES {
            return Err(FrameError::Malformed(format!("a {length}-byte record")));
        }
        let mut sealed = vec![0u8; length];
        self.inner
            .read_exact(&mut sealed)
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => FrameError::Malformed(format!(
                    "truncated: the {length}-byte record ended early"
                )),
                _ => FrameError::Io(e),
            })?;
        let start = self.plain.len();
        self.plain.resize(start + length, 0);
        let n = cipher
            .read_message(self.nonce, &sealed, &mut self.plain[start..])
            .map_err(|_| FrameError::Unauthentic)?;
        self.nonce += 1;
        self.plain.truncate(start + n);
        Ok(())
    }
}

/// Writes frames to a link, encrypting them.
pub struct SecureWriter {
    inner: Box<dyn AsyncWrite + Unpin + Send>,
    cipher: Option<Arc<StatelessTransportState>>,
    /// The next record's nonce.
    nonce: u64,
    /// The records of the frame being written, reused between frames.
    sealed: Vec<u8>,
}

impl SecureWriter {
    pub async fn write_frame(&mut self, frame: &Frame) -> Result<(), FrameError> {
        let plain = protocol::encode(frame)?;
        self.write_stream_bytes(&plain).await?;
        crate::metrics::global()
            .link_bytes_sent
            .inc_by(plain.len() as u64);
        Ok(())
    }

    /// Sends `plain` as part of the stream of length-prefixed frames,
    /// sealed like frames. [`Self::write_frame`] is the way to send; this
    /// lets tests send what no node would (a bad length, garbage) through
    /// an authentic link.
    pub async fn write_stream_bytes(&mut self, plain: &[u8]) -> Result<(), FrameError> {
        let Some(cipher) = &self.cipher else {
            self.inner.write_all(plain).await?;
            return Ok(());
        };
        self.sealed.clear();
        for chunk in plain.chunks(RECORD_PLAINTEXT_BYTES) {
            let start = self.sealed.len();
            self.sealed.resize(start + 2 + chunk.len() + TAG_BYTES, 0);
            let n = cipher
                .write_message(self.nonce, chunk, &mut self.sealed[start + 2..])
                .map_err(|e| FrameError::Malformed(format!("cannot encrypt a record: {e}")))?;
            self.nonce += 1;
            let length = u16::try_from(n).unwrap_or(u16::MAX);
            self.sealed[start..start + 2].copy_from_slice(&length.to_be_bytes());
            self.sealed.truncate(start + 2 + n);
        }
        self.inner.write_all(&self.sealed).await?;
        Ok(())
    }
}

/// Keys for the cluster's unit tests.
#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::identity::{ClusterSecret, Identity};
    use kernels::SequenceId;

    /// A fresh node key with `secret`.
    pub(in crate::cluster) fn keys(secret: &ClusterSecret, plaintext: bool) -> LinkKeys {
        let dir = std::env::temp_dir().join(format!(
            "ringlet-secure-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let (identity, _) = Identity::load_or_create(&dir, None).expect("identity");
        let _ = std::fs::remove_dir_all(&dir);
        LinkKeys::new(identity.key, secret, plaintext)
    }

    /// Runs both ends of a handshake over an in-memory pipe.
    async fn pair(
        dialer: &LinkKeys,
        acceptor: &LinkKeys,
    ) -> (
        Result<Session, HandshakeError>,
        Result<Session, HandshakeError>,
    ) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (ar, aw) = tokio::io::split(a);
        let (br, bw) = tokio::io::split(b);
        let (dialer, acceptor) = (dialer.clone(), acceptor.clone());
        let dial = tokio::spawn(async move { handshake(ar, aw, &dialer, true).await });
        let accept = tokio::spawn(async move { handshake(br, bw, &acceptor, false).await });
        (
            dial.await.expect("dialer task"),
            accept.await.expect("acceptor task"),
        )
    }

    fn token(n: u32) -> Frame {
        Frame::Token {
            request: SequenceId(7),
            epoch: crate::cluster::protocol::Epoch(1),
            token: n,
            logprobs: None,
            sent_at: 0,
            batch: None,
        }
    }

    #[tokio::test]
    async fn members_link_and_frames_of_any_size_cross() {
        let secret = ClusterSecret::random();
        let (a, b) = (keys(&secret, false), keys(&secret, false));
        let (dialed, accepted) = pair(&a, &b).await;
        let (mut dialed, mut accepted) = (dialed.expect("dialer"), accepted.expect("acceptor"));
        assert_eq!(dialed.peer_key, b.node.public);
        assert_eq!(accepted.peer_key, a.node.public);
        let big = Frame::Probe {
            padding: (0..200_000u32).map(|i| i as u8).collect(),
        };
        for frame in [token(1), big.clone(), token(2)] {
            dialed.writer.write_frame(&frame).await.expect("write");
            let (got, _) = accepted.reader.read_frame_timed().await.expect("read");
            assert_eq!(got, frame);
            accepted
                .writer
                .write_frame(&frame)
                .await
                .expect("write back");
            let (back, _) = dialed.reader.read_frame_timed().await.expect("read back");
            assert_eq!(back, frame);
        }
    }

    #[tokio::test]
    async fn a_node_without_the_secret_is_refused_on_both_sides() {
        let (member, stranger) = (
            keys(&ClusterSecret::random(), false),
            keys(&ClusterSecret::random(), false),
        );
        let (dialed, accepted) = pair(&stranger, &member).await;
        assert!(matches!(accepted, Err(HandshakeError::WrongKey)));
        assert!(matches!(dialed, Err(HandshakeError::WrongKey)));
        let (dialed, accepted) = pair(&member, &stranger).await;
        assert!(matches!(accepted, Err(HandshakeError::WrongKey)));
        assert!(matches!(dialed, Err(HandshakeError::WrongKey)));
    }

    #[tokio::test]
    async fn both_ends_must_agree_on_plaintext_frames() {
        let secret = ClusterSecret::random();
        let (dialed, accepted) = pair(&keys(&secret, true), &keys(&secret, false)).await;
        assert!(
            matches!(dialed, Err(HandshakeError::Protocol(_))),
            "{:?}",
            dialed.err()
        );
        assert!(accepted.is_err());
    }

    /// Records as they travel, captured from one direction of a link.
    async fn sealed_bytes(frames: &[Frame]) -> (Vec<u8>, Session) {
        let secret = ClusterSecret::random();
        let (dialed, accepted) = pair(&keys(&secret, false), &keys(&secret, false)).await;
        let (dialed, accepted) = (dialed.expect("dialer"), accepted.expect("acceptor"));
        let (sink, mut tap) = tokio::io::duplex(1 << 20);
        let mut writer = SecureWriter {
            inner: Box::new(sink),
            ..dialed.writer
        };
        for frame in frames {
            writer.write_frame(frame).await.expect("write");
        }
        drop(writer);
        let mut bytes = Vec::new();
        tap.read_to_end(&mut bytes).await.expect("tap");
        (bytes, accepted)
    }

    fn reader_over(bytes: Vec<u8>, session: Session) -> SecureReader {
        SecureReader {
            inner: Box::new(std::io::Cursor::new(bytes)),
            ..session.reader
        }
    }

    #[tokio::test]
    async fn a_flipped_bit_or_a_replayed_record_is_refused() {
        let (bytes, session) = sealed_bytes(&[token(1), token(2)]).await;
        let mut flipped = bytes.clone();
        flipped[5] ^= 0x10;
        let mut reader = reader_over(flipped, session);
        assert!(matches!(
            reader.read_frame_timed().await,
            Err(FrameError::Unauthentic)
        ));

        let (bytes, session) = sealed_bytes(&[token(1)]).await;
        let mut replayed = bytes.clone();
        replayed.extend_from_slice(&bytes);
        let mut reader = reader_over(replayed, session);
        assert_eq!(reader.read_frame_timed().await.expect("first").0, token(1));
        assert!(matches!(
            reader.read_frame_timed().await,
            Err(FrameError::Unauthentic)
        ));
    }

    /// The sealed records in `bytes`, each with its 2-byte length.
    fn records(bytes: &[u8]) -> Vec<&[u8]> {
        let mut records = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let length = usize::from(u16::from_be_bytes([bytes[at], bytes[at + 1]]));
            records.push(&bytes[at..at + 2 + length]);
            at += 2 + length;
        }
        records
    }

    /// One poll of `read`, in the test's own task.
    async fn poll_once<F: Future + Unpin>(read: &mut F) -> std::task::Poll<F::Output> {
        std::future::poll_fn(|cx| std::task::Poll::Ready(std::pin::Pin::new(&mut *read).poll(cx)))
            .await
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_frame_that_keeps_arriving_is_heard_and_one_that_stops_is_silent() {
        // On tokio's paused clock, which moves only as the test advances it.
        // A frame of seven records arriving a quarter second apart takes
        // 1.5 s from its first record to its last, more than the second of
        // silence allowed; each record comes well within it.
        let silence = Duration::from_secs(1);
        let gap = Duration::from_millis(250);
        let big = Frame::Probe {
            padding: vec![7; 7 * 65_000],
        };
        let (bytes, session) = sealed_bytes(std::slice::from_ref(&big)).await;
        let records = records(&bytes);
        assert_eq!(records.len(), 7);
        for stopped_after in [None, Some(3)] {
            let (mut feed, pipe) = tokio::io::duplex(1 << 20);
            let mut reader = SecureReader {
                inner: Box::new(pipe),
                cipher: session.reader.cipher.clone(),
                nonce: session.reader.nonce,
                plain: Vec::new(),
            };
            let mut read = Box::pin(reader.read_frame_heard_within(Some(silence)));
            let started = tokio::time::Instant::now();
            let (last, sent) = (records.len() - 1, stopped_after.unwrap_or(records.len()));
            for (i, record) in records[..sent].iter().enumerate() {
                feed.write_all(record).await.expect("feed");
                // The reader takes the record in and waits for the next one.
                match poll_once(&mut read).await {
                    std::task::Poll::Ready(frame) if i == last => {
                        assert_eq!(frame.expect("the whole frame").0, big);
                        assert_eq!(started.elapsed(), gap * 6);
                        assert!(started.elapsed() > silence);
                    }
                    std::task::Poll::Pending if i < last => tokio::time::advance(gap).await,
                    other => panic!("record {i}: {other:?}"),
                }
            }
            if stopped_after.is_some() {
                // The peer sends nothing more, with the pipe held open: the
                // reader hears nothing for just under the silence allowed,
                // then for all of it.
                tokio::time::advance(silence - gap - Duration::from_millis(1)).await;
                assert!(poll_once(&mut read).await.is_pending());
                tokio::time::advance(Duration::from_millis(1)).await;
                let read = poll_once(&mut read).await;
                assert!(
                    matches!(read, std::task::Poll::Ready(Err(FrameError::Silent(s))) if s == silence),
                    "{read:?}"
                );
            }
        }
    }

    #[tokio::test]
    async fn random_and_truncated_handshakes_are_errors_not_panics() {
        let member = keys(&ClusterSecret::random(), false);
        for round in 0..2_000u32 {
            let length = (round % 300) as usize;
            let mut junk: Vec<u8> = (0..length).map(|_| rand::random::<u8>()).collect();
            if round % 3 == 0 && junk.len() >= 2 {
                // A plausible length prefix in front of random bytes.
                let n = u16::try_from(junk.len() - 2).unwrap_or(0);
                junk[..2].copy_from_slice(&n.to_be_bytes());
            }
            let (reader, writer) = (std::io::Cursor::new(junk), tokio::io::sink());
            let result = handshake(reader, writer, &member, round % 2 == 0).await;
            assert!(result.is_err(), "round {round}");
        }
    }
}
