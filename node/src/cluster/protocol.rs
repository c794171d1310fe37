//! The link protocol between nodes.
//!
//! A link is a TCP connection that started as an HTTP request to
//! `GET /v1/ring/link` on a node's API port and was upgraded. The two
//! nodes then run a Noise handshake that proves both hold the cluster
//! secret ([`super::secure`]), and from then on every frame travels
//! encrypted. Both sides send a [`Frame::Hello`] and after that any
//! frames, in both directions. A frame is a 4-byte big-endian length
//! followed by that many bytes of [postcard](https://docs.rs/postcard)
//! encoding of [`Frame`]; on the wire that stream is cut into encrypted
//! records. A frame longer than [`MAX_FRAME_BYTES`], or one that does not
//! decode, closes the link.
//!
//! Activations travel as little-endian f32 (`dtype` says so, so a later
//! version can send f16 without ambiguity).

// Fields of `Hello` and `NodeStatus` that the HTTP API's cluster view shows
// too: defined once, in `api_types`.
pub use api_types::{LinkTransport, ModelAvailability, ModelIdentity, ModelState, Resources};
use kernels::{LayerRange, SequenceId, TokenLogprobs};
use scheduler::NodeId;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bumped whenever frames change incompatibly; peers must match exactly.
pub const PROTOCOL_VERSION: u32 = 15;

/// The HTTP `Upgrade` token of a link.
pub const UPGRADE_TOKEN: &str = "ringlet-link";

/// The HTTP header carrying [`PROTOCOL_VERSION`] on the upgrade request.
pub const VERSION_HEADER: &str = "ringlet-protocol";

pub use super::admin_proof::AdminProof;
pub use crate::limits::{BANDWIDTH_SAMPLE_MIN_BYTES, MAX_FRAME_BYTES, PROBE_BYTES};
pub use crate::stage::{BatchTag, Sample};

/// A plan's number; each new plan has a higher one.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub struct Epoch(pub u64);

/// What a node says about itself when a link opens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u32,
    pub node: NodeId,
    pub name: String,
    /// The cluster name (`--cluster`): links between clusters are refused.
    pub cluster: String,
    /// The address of the node's API (and link) port, as peers reach it.
    pub address: String,
    pub resources: Resources,
    /// The model the node serves and the fingerprint of its file.
    pub model: ModelIdentity,
    /// Nodes this node is linked to, so that a newcomer can link to them.
    pub peers: Vec<PeerAddress>,
    /// When the node first served in an active plan (unix ms, the plan's
    /// activation as its leader stamped it); `None` before. The earliest
    /// leads, so a newcomer cannot take over a running cluster.
    pub serving_since_ms: Option<u64>,
    /// The STUN and TURN servers this node uses for WebRTC links; a node
    /// started without any adopts its peers', so nodes that join later
    /// use them too.
    pub ice_servers: Vec<IceServer>,
    /// On a WebRTC link: the DTLS certificate fingerprints of the offering
    /// and the answering end, as the sender's session negotiated them. The
    /// receiver checks they are the ones it negotiated, so the encrypted
    /// link and the data channel under it end at the same two nodes.
    pub dtls_fingerprints: Option<DtlsFingerprints>,
}

/// A STUN or TURN server (`stun:HOST:PORT`, `turn:HOST:PORT`).
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct IceServer {
    pub url: String,
    pub username: String,
    pub credential: String,
}

impl std::fmt::Debug for IceServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The credential stays out of logs.
        f.debug_struct("IceServer")
            .field("url", &self.url)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// Both ends' DTLS fingerprints (`sha-256 AB:CD:..`) on a WebRTC link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DtlsFingerprints {
    pub offerer: String,
    pub answerer: String,
}

/// WebRTC signaling between two nodes that cannot reach each other over
/// TCP, relayed by a node linked to both. The relay forwards only what
/// its own link peer sends as `from`, to `to` if it is linked to it; so
/// `from` is a member the relay authenticated (and the link on the data
/// channel proves it again with the cluster's key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signal {
    pub from: NodeId,
    pub to: NodeId,
    /// Chosen by the offering end; names the attempt.
    pub session: u64,
    /// Where `from` is reached (its API address), as the relay knows it:
    /// the relay sets it, so the receiver learns of a node that joined
    /// after it did.
    pub address: String,
    pub body: SignalBody,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SignalBody {
    /// From the node with the higher id: please offer (only the lower id
    /// offers, so two offers never cross).
    Invite,
    /// The session description with every ICE candidate gathered in it.
    Offer {
        sdp: String,
    },
    Answer {
        sdp: String,
    },
    /// The attempt is over at the sender; the reason is for the log.
    Refuse {
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerAddress {
    pub node: NodeId,
    pub address: String,
}

/// One node's layers in a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanStage {
    pub node: NodeId,
    /// Where the node is reached, so that every node can link to every
    /// stage before the plan starts.
    pub address: String,
    pub layers: LayerRange,
}

/// The whole placement, in ring order, as the leader decided it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanMessage {
    pub epoch: Epoch,
    pub leader: NodeId,
    pub model: ModelIdentity,
    pub stages: Vec<PlanStage>,
}

/// Tokens or hidden states for a stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Payload {
    Tokens(Vec<u32>),
    Hidden {
        /// Rows (tokens) and columns (hidden size).
        tokens: u32,
        hidden: u32,
        dtype: WireDType,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireDType {
    /// Little-endian IEEE f32.
    F32,
}

/// Work for the stage at `stage` of plan `epoch`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForwardFrame {
    /// The request: the key of its KV cache on every stage and of its
    /// bookkeeping at the owner.
    pub request: SequenceId,
    /// The node that owns the request and receives its tokens.
    pub owner: NodeId,
    pub epoch: Epoch,
    pub stage: u32,
    /// Position of the first of the payload's tokens in the sequence.
    pub position: u32,
    pub payload: Payload,
    pub sample: Sample,
    /// Run each token as a step of its own (a resumed request's generated
    /// tokens, replayed as they were decoded).
    pub token_by_token: bool,
    /// When the previous stage's output was ready, or the owner sent a
    /// decode step (Unix µs; 0 unknown): the next stage measures the hop.
    pub sent_at: u64,
    /// The jobs that left the same step (or the owner's round) with this
    /// one: the stage takes them together.
    pub batch: Option<BatchTag>,
}

/// Orders policy changes across the cluster: a higher revision replaces a
/// lower one everywhere, so every node ends with the latest change. Ties of
/// the counter (two uploads at once) go to the higher node id.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub struct PolicyRevision {
    pub counter: u64,
    pub origin: NodeId,
}

/// The cluster's scheduling policy changed. An uploaded component of
/// `wasm_bytes` follows in [`Frame::PolicyChunk`]s; `None` means the
/// built-in policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyMessage {
    pub revision: PolicyRevision,
    pub wasm_bytes: Option<u32>,
    /// Set when the change replaced a policy that failed: why.
    pub warning: Option<String>,
    /// The admin's authorization, from the node where the admin acted;
    /// `None` only for a fallback to the built-in policy after a failure.
    pub proof: Option<AdminProof>,
}

/// What one node measured of its link to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkMeasurement {
    pub to: NodeId,
    /// Round-trip time of the last heartbeat.
    pub rtt_micros: u64,
    /// Bytes per second received from `to` in large frames; 0 if none yet.
    pub bandwidth_bytes_per_second: u64,
    pub transport: LinkTransport,
    /// How long a WebRTC link took to open (ICE and DTLS).
    pub handshake_micros: Option<u64>,
}

/// A node's periodic report to its peers, for placement and scheduling.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Requests going through this node's stage now, from every owner.
    pub in_flight: u32,
    pub links: Vec<LinkMeasurement>,
    /// Memory the machine has available now.
    pub memory_available_bytes: u64,
    /// The node process's resident memory.
    pub rss_bytes: u64,
    /// The catalogue's models on this node, and the model it serves.
    pub models: Vec<ModelAvailability>,
    /// As in [`Hello::serving_since_ms`], which it can change after.
    pub serving_since_ms: Option<u64>,
    /// KV cache the requests this node owns reserve, in tokens (prompt
    /// plus `max_tokens` each): every stage holds that many for them.
    pub kv_reserved_tokens: u64,
    /// Bytes this node's stage has for KV cache (its memory budget less
    /// its weights, at most its `--kv-cache`); `None` without a stage.
    pub stage_kv_budget_bytes: Option<u64>,
}

/// Every message a link carries. No catch-all: an unknown variant is a
/// decode error, which closes the link.
// The Hello is the largest variant and goes once per link: boxing it would
// save a few hundred bytes per queued frame at the cost of churn everywhere.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Frame {
    Hello(Hello),
    /// Sent every heartbeat interval; the peer answers with `HeartbeatAck`.
    Heartbeat {
        sent_at_micros: u64,
    },
    HeartbeatAck {
        sent_at_micros: u64,
    },
    /// The leader's new plan: load your layers, then say `PlanReady`.
    Plan(PlanMessage),
    PlanReady {
        epoch: Epoch,
        node: NodeId,
        weight_bytes: u64,
    },
    PlanFailed {
        epoch: Epoch,
        node: NodeId,
        error: String,
    },
    /// The plan's epoch is not newer than one the node already followed
    /// (from an earlier leader); the leader should plan again past it.
    PlanStale {
        epoch: Epoch,
        highest: Epoch,
    },
    /// Every stage is ready: requests may use this plan. Carries the weight
    /// bytes each node reported.
    PlanActive {
        epoch: Epoch,
        weights: Vec<(NodeId, u64)>,
        /// When the leader activated it (unix ms): every node of the plan
        /// that served in none before serves since then.
        since_ms: u64,
    },
    Forward(ForwardFrame),
    /// From the last stage to the owner. Results carry the epoch of the
    /// plan the job ran on, so that the owner of a request resumed on a
    /// newer plan drops what the old one still sends.
    Token {
        request: SequenceId,
        epoch: Epoch,
        token: u32,
        /// When the request asked for log probabilities.
        logprobs: Option<TokenLogprobs>,
        /// When the last stage had the token (Unix µs; 0 unknown): the
        /// owner measures the hop back.
        sent_at: u64,
        /// The owner's tokens sampled in the same step: their next steps
        /// go out together.
        batch: Option<BatchTag>,
    },
    /// A prompt chunk went through every stage; the owner sends the next.
    ChunkDone {
        request: SequenceId,
        epoch: Epoch,
    },
    /// From any stage to the owner: the request cannot go on.
    Failed {
        request: SequenceId,
        epoch: Epoch,
        error: String,
    },
    /// From any node to the owner: the job could not go on because the plan
    /// it ran on is gone here (a stage's node left, or a new plan came);
    /// the owner replays the request once a new plan is active.
    Interrupted {
        request: SequenceId,
        epoch: Epoch,
        reason: String,
    },
    /// The sender's stage of plan `epoch` stopped making progress or its
    /// thread ended: every node treats it as lost, as if the node had left,
    /// and the leader plans without it.
    StageLost {
        epoch: Epoch,
        reason: String,
    },
    /// The sender has heard nothing from `node`, a stage of the plan, for
    /// far longer than its heartbeats allow, and closed its link: a node
    /// that has not heard from it either closes its link too.
    PeerSilent {
        node: NodeId,
    },
    /// To the leader: the sender lost its link to `node`, a stage of plan
    /// `epoch`, so the plan cannot carry the sender's requests; the leader
    /// plans again (the sender links anew before it reports ready).
    PlanBroken {
        epoch: Epoch,
        node: NodeId,
        reason: String,
    },
    /// From the owner to every stage: forget the request.
    Release {
        request: SequenceId,
    },
    /// The sender is leaving; the reason is for the log.
    Bye {
        reason: String,
    },
    /// The sender keeps another link to the receiver (the two dialed each
    /// other at once) and closes this one; it stays a member. The
    /// receiver waits a bounded while for that other link instead of
    /// counting the sender as lost.
    LinkReplaced,
    /// Sent once when a link opens, so that the receiver measures the
    /// link's bandwidth before any activations flow. Ignored otherwise.
    Probe {
        #[serde(with = "serde_bytes")]
        padding: Vec<u8>,
    },
    NodeStatus(NodeStatus),
    Policy(PolicyMessage),
    /// Bytes `offset..offset + data.len()` of revision `revision`'s
    /// component, in order.
    PolicyChunk {
        revision: PolicyRevision,
        offset: u32,
        data: bytes::Bytes,
    },
    /// Fetch this catalogue model into your model cache unless it is there.
    FetchModel {
        name: String,
        proof: Option<AdminProof>,
    },
    /// Serve this model from now on (a catalogue name, a path, or a Hub
    /// repository `ORG/REPO[:QUANT][@REVISION]`): an admin switched the
    /// cluster.
    SwitchModel {
        model: String,
        proof: Option<AdminProof>,
    },
    /// An admin removed `removed` from the cluster: the cluster's secret
    /// is `secret` from now on (the removed node is not told it), and
    /// links to the removed node close.
    RotateSecret {
        removed: Option<NodeId>,
        #[serde(with = "serde_bytes")]
        secret: Vec<u8>,
        proof: Option<AdminProof>,
    },
    /// The sender serves this model now, after a switch.
    ModelChanged {
        identity: ModelIdentity,
    },
    /// WebRTC signaling, to this node or through it.
    Signal(Signal),
    /// To the leader: the sender cannot link to `node` (neither TCP nor
    /// WebRTC found a path between them), so no plan can hold both; the
    /// leader leaves one of them out until they link.
    Unreachable {
        node: NodeId,
        reason: String,
    },
}

impl Frame {
    /// A short name for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Hello(_) => "hello",
            Frame::Heartbeat { .. } => "heartbeat",
            Frame::HeartbeatAck { .. } => "heartbeat-ack",
            Frame::Plan(_) => "plan",
            Frame::PlanReady { .. } => "plan-ready",
            Frame::PlanFailed { .. } => "plan-failed",
            Frame::PlanStale { .. } => "plan-stale",
            Frame::PlanActive { .. } => "plan-active",
            Frame::Forward(_) => "forward",
            Frame::Token { .. } => "token",
            Frame::ChunkDone { .. } => "chunk-done",
            Frame::Failed { .. } => "failed",
            Frame::Interrupted { .. } => "interrupted",
            Frame::StageLost { .. } => "stage-lost",
            Frame::PeerSilent { .. } => "peer-silent",
            Frame::PlanBroken { .. } => "plan-broken",
            Frame::Release { .. } => "release",
            Frame::Bye { .. } => "bye",
            Frame::LinkReplaced => "link-replaced",
            Frame::Probe { .. } => "probe",
            Frame::NodeStatus(_) => "node-status",
            Frame::Policy(_) => "policy",
            Frame::PolicyChunk { .. } => "policy-chunk",
            Frame::FetchModel { .. } => "fetch-model",
            Frame::SwitchModel { .. } => "switch-model",
            Frame::ModelChanged { .. } => "model-changed",
            Frame::RotateSecret { .. } => "rotate-secret",
            Frame::Signal(_) => "signal",
            Frame::Unreachable { .. } => "unreachable",
        }
    }
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("the peer announced a {length}-byte frame; the limit is {MAX_FRAME_BYTES}")]
    TooLong { length: u32 },
    #[error("the frame does not decode: {0}")]
    Malformed(String),
    #[error("the connection closed")]
    Closed,
    /// An encrypted record did not authenticate: altered, replayed, or
    /// out of order.
    #[error("a record failed authentication (altered, replayed or out of order)")]
    Unauthentic,
    /// Nothing more of a frame arrived for this long: the peer or the path
    /// is gone. A long frame that keeps arriving is never silent.
    #[error("nothing arrived for {} ms", .0.as_millis())]
    Silent(std::time::Duration),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Encodes a frame with its length prefix. Frames we build are small or
/// bounded by the prefill chunk, but check anyway: a too-long frame would
/// close the link at the peer.
pub fn encode(frame: &Frame) -> Result<Vec<u8>, FrameError> {
    let body = postcard::to_stdvec(frame).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let length = u32::try_from(body.len()).unwrap_or(u32::MAX);
    if length > MAX_FRAME_BYTES {
        return Err(FrameError::TooLong { length });
    }
    let mut bytes = Vec::with_capacity(4 + body.len());
    bytes.extend_from_slice(&length.to_be_bytes());
    bytes.extend_from_slice(&body);
    Ok(bytes)
}

pub fn decode(body: &[u8]) -> Result<Frame, FrameError> {
    let (frame, rest) = postcard::take_from_bytes::<Frame>(body)
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::Malformed(format!(
            "{} bytes after the frame",
            rest.len()
        )));
    }
    Ok(frame)
}

/// Reads one frame. The length is checked before anything is allocated.
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Frame, FrameError> {
    read_frame_timed(reader).await.map(|(frame, _)| frame)
}

/// Reads one frame and says how fast its body arrived, in bytes per
/// second, when it is large enough to measure the link by.
pub async fn read_frame_timed<R: AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<(Frame, Option<u64>), FrameError> {
    let mut prefix = [0u8; 4];
    match reader.read_exact(&mut prefix).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let length = u32::from_be_bytes(prefix);
    if length > MAX_FRAME_BYTES {
        return Err(FrameError::TooLong { length });
    }
    let mut body = vec![0u8; length as usize];
    let started = std::time::Instant::now();
    reader
        .read_exact(&mut body)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                FrameError::Malformed(format!("truncated: the {length}-byte frame ended early"))
            }
            _ => FrameError::Io(e),
        })?;
    Ok((decode(&body)?, bandwidth(length, started.elapsed())))
}

/// Bytes per second of a `length`-byte frame whose body took `elapsed` to
/// arrive, when it is large enough to measure the link by.
pub fn bandwidth(length: u32, elapsed: std::time::Duration) -> Option<u64> {
    let seconds = elapsed.as_secs_f64();
    (length >= BANDWIDTH_SAMPLE_MIN_BYTES && seconds > 0.0)
        .then(|| (f64::from(length) / seconds) as u64)
}

pub async fn write_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    frame: &Frame,
) -> Result<(), FrameError> {
    let bytes = encode(frame)?;
    writer.write_all(&bytes).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kernels::SamplingParams;

    fn samples() -> Vec<Frame> {
        let identity = ModelIdentity {
            name: "m".into(),
            fingerprint: "sha256:ab".into(),
        };
        vec![
            Frame::Hello(Hello {
                protocol_version: PROTOCOL_VERSION,
                node: NodeId(7),
                name: "alpha".into(),
                cluster: "default".into(),
                address: "10.0.0.1:52415".into(),
                resources: Resources {
                    device: "cpu".into(),
                    device_name: "x86".into(),
                    memory_total_bytes: 1 << 34,
                    memory_available_bytes: 1 << 33,
                    memory_budget_bytes: 1 << 32,
                    compute_score: 12.5,
                },
                model: identity.clone(),
                peers: vec![PeerAddress {
                    node: NodeId(8),
                    address: "10.0.0.2:52415".into(),
                }],
                serving_since_ms: Some(1_700_000_000_000),
                ice_servers: vec![IceServer {
                    url: "turn:198.51.100.3:3478".into(),
                    username: "ringlet".into(),
                    credential: "secret".into(),
                }],
                dtls_fingerprints: Some(DtlsFingerprints {
                    offerer: "sha-256 ab:cd".into(),
                    answerer: "sha-256 ef:01".into(),
                }),
            }),
            Frame::Signal(Signal {
                from: NodeId(1),
                to: NodeId(2),
                session: 0xfeed,
                address: "198.51.100.21:52415".into(),
                body: SignalBody::Offer {
                    sdp: "v=0\r\n".into(),
                },
            }),
            Frame::Heartbeat { sent_at_micros: 99 },
            Frame::Plan(PlanMessage {
                epoch: Epoch(3),
                leader: NodeId(7),
                model: identity,
                stages: vec![PlanStage {
                    node: NodeId(7),
                    address: "10.0.0.1:52415".into(),
                    layers: LayerRange::new(0, 30),
                }],
            }),
            Frame::Forward(ForwardFrame {
                request: SequenceId(5),
                owner: NodeId(7),
                epoch: Epoch(3),
                stage: 1,
                position: 40,
                payload: Payload::Hidden {
                    tokens: 2,
                    hidden: 2,
                    dtype: WireDType::F32,
                    data: vec![0; 16],
                },
                sample: Sample::Start {
                    params: Box::new(SamplingParams {
                        logprobs: Some(2),
                        repetition_penalty: 1.1,
                        ..SamplingParams::greedy()
                    }),
                    drawn: 3,
                    prompt: vec![1, 2],
                    generated: vec![3],
                },
                token_by_token: true,
                sent_at: 1_700_000_000_000_000,
                batch: None,
            }),
            Frame::Token {
                request: SequenceId(5),
                epoch: Epoch(3),
                token: 42,
                logprobs: Some(TokenLogprobs {
                    logprob: -0.5,
                    top: vec![(42, -0.5), (7, -1.25)],
                }),
                sent_at: 1_700_000_000_000_000,
                batch: None,
            },
            Frame::Interrupted {
                request: SequenceId(5),
                epoch: Epoch(3),
                reason: "node b left".into(),
            },
            Frame::StageLost {
                epoch: Epoch(3),
                reason: "its stage thread stopped".into(),
            },
            Frame::PeerSilent { node: NodeId(8) },
            Frame::PlanBroken {
                epoch: Epoch(3),
                node: NodeId(8),
                reason: "the connection closed".into(),
            },
            Frame::Bye {
                reason: "shutting down".into(),
            },
            Frame::LinkReplaced,
            Frame::Probe {
                padding: vec![7; 300],
            },
            Frame::NodeStatus(NodeStatus {
                in_flight: 3,
                links: vec![LinkMeasurement {
                    to: NodeId(8),
                    rtt_micros: 250,
                    bandwidth_bytes_per_second: 117_000_000,
                    transport: LinkTransport::WebrtcTurn,
                    handshake_micros: Some(180_000),
                }],
                memory_available_bytes: 8 << 30,
                rss_bytes: 300 << 20,
                kv_reserved_tokens: 4_096,
                stage_kv_budget_bytes: Some(64 << 20),
                models: vec![
                    ModelAvailability::new("smollm2-135m", ModelState::Loaded),
                    ModelAvailability {
                        downloaded_bytes: Some(1 << 20),
                        total_bytes: Some(90 << 20),
                        ..ModelAvailability::new("other", ModelState::Downloading)
                    },
                ],
                serving_since_ms: None,
            }),
            Frame::Policy(PolicyMessage {
                revision: PolicyRevision {
                    counter: 2,
                    origin: NodeId(8),
                },
                wasm_bytes: Some(4),
                warning: None,
                proof: Some(AdminProof {
                    issued_at: 1,
                    nonce: 2,
                    mac: vec![3; 32],
                }),
            }),
            Frame::PolicyChunk {
                revision: PolicyRevision {
                    counter: 2,
                    origin: NodeId(8),
                },
                offset: 0,
                data: bytes::Bytes::from_static(b"\0asm"),
            },
            Frame::Policy(PolicyMessage {
                revision: PolicyRevision::default(),
                wasm_bytes: None,
                warning: Some("policy x failed".into()),
                proof: None,
            }),
            Frame::FetchModel {
                name: "smollm2-135m".into(),
                proof: None,
            },
            Frame::SwitchModel {
                model: "org/repo:Q8_0".into(),
                proof: None,
            },
            Frame::RotateSecret {
                removed: Some(NodeId(8)),
                secret: vec![1; 32],
                proof: None,
            },
            Frame::ModelChanged {
                identity: ModelIdentity {
                    name: "org/repo:Q8_0".into(),
                    fingerprint: "sha256:c".into(),
                },
            },
        ]
    }

    #[tokio::test]
    async fn frames_round_trip() {
        for frame in samples() {
            let bytes = encode(&frame).expect("encode");
            let mut reader = bytes.as_slice();
            assert_eq!(read_frame(&mut reader).await.expect("decode"), frame);
            assert!(reader.is_empty());
        }
    }

    #[tokio::test]
    async fn bad_input_is_an_error_value() {
        let good = encode(&Frame::Token {
            request: SequenceId(1),
            epoch: Epoch(1),
            token: 2,
            logprobs: None,
            sent_at: 0,
            batch: None,
        })
        .expect("encode");
        let oversized = (MAX_FRAME_BYTES + 1).to_be_bytes().to_vec();
        let mut truncated = good.clone();
        truncated.truncate(good.len() - 1);
        let mut garbage = 6u32.to_be_bytes().to_vec();
        garbage.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        let mut trailing = (good.len() as u32 - 4 + 2).to_be_bytes().to_vec();
        trailing.extend_from_slice(&good[4..]);
        trailing.extend_from_slice(&[0, 0]);
        type Case = (&'static str, Vec<u8>, fn(&FrameError) -> bool);
        let cases: Vec<Case> = vec![
            ("empty", vec![], |e| matches!(e, FrameError::Closed)),
            ("oversized", oversized, |e| {
                matches!(e, FrameError::TooLong { .. })
            }),
            ("truncated", truncated, |e| {
                matches!(e, FrameError::Malformed(_))
            }),
            ("garbage", garbage, |e| {
                matches!(e, FrameError::Malformed(_))
            }),
            ("trailing bytes", trailing, |e| {
                matches!(e, FrameError::Malformed(_))
            }),
        ];
        for (name, bytes, expected) in cases {
            let mut reader = bytes.as_slice();
            let err = read_frame(&mut reader).await.expect_err(name);
            assert!(expected(&err), "{name}: {err:?}");
        }
    }
}
