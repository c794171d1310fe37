//! The inference engine: a coordinator that owns every in-flight request
//! and drives its tokens through the stages that hold the model.
//!
//! ```text
//!  HTTP handlers ──submit──▶ coordinator ──StageJob──▶ stage (shard) ─┐
//!        ▲                        ▲                                    │
//!        └──GenerationEvent───────┴────────StageResult (token)─────────┘
//! ```
//!
//! Each active request has exactly one job in flight, so the stage
//! interleaves requests step by step and several generations advance
//! together. A prompt is fed in chunks of [`PREFILL_CHUNK_TOKENS`] so that
//! a long prompt does not stall streams that are already decoding.
//!
//! The coordinator keeps each request's whole history: its prompt and the
//! tokens generated so far. When the cluster loses a node that held a
//! stage, it says [`StageResult::Resume`] once a new plan is active, and
//! the request is fed again from the start on the new stages: the prompt
//! in the same chunks as before, then the generated tokens one step each
//! (as they were decoded), so every stage's KV cache gets the same bits,
//! and the last stage's sampler resumes at the same draw. The client sees
//! a pause and then the tokens an uninterrupted run gives.
//!
//! Which waiting request starts next is the scheduling policy's choice
//! (`schedule` in `wit/scheduler.wit`, see [`Scheduling`]); without one,
//! first come, first served. Whatever it picks, admission stays bounded
//! twice: at most [`MAX_ACTIVE_SEQUENCES`] requests run, and their KV
//! caches, reserved for the prompt plus `max_tokens`, fit: in a cluster,
//! on every stage of the plan beside the other owners' requests
//! ([`KvRoom`], which the cluster publishes), else in the engine's own KV
//! budget. A picked request that does not fit yet waits, and holds back
//! the ones picked after it, so a large request is not overtaken forever.
//! One that could never fit is refused at submission, and one that names
//! no `max_tokens` gets as many as fit beside its prompt.
//!
//! The coordinator runs on its own thread with its own small runtime, so the
//! engine outlives any one caller's runtime (tests share one engine).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;
use std::time::Instant;

use futures_util::future::BoxFuture;
use kernels::{
    KV_PAGE_TOKENS, SamplingParams, SequenceId, Shard, ShardInput, TokenLogprobs, kv_rows_for,
    kv_tokens_within,
};
use scheduler::contract::{StageLoad, WaitingRequest};
use serde::Serialize;
use tokio::sync::{mpsc, watch};

use crate::current::Current;
use crate::limits::{
    BATCH_HOLD_LIMIT_MS, ENGINE_QUEUE_LEN, MAX_ACTIVE_SEQUENCES, PIPELINE_QUEUE_LEN,
    PREFILL_CHUNK_TOKENS, RESULT_QUEUE_LEN, SCHEDULE_WAIT_MS,
};
use crate::prompt::PromptBuilder;
use crate::stage::{self, BatchTag, Sample, StageJob, StageOutput, StageResult};
use crate::stopping::Stopping;

/// One generation, as the API layer hands it over.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    /// Identifies the request in logs and in the KV caches of every stage.
    pub id: SequenceId,
    pub prompt: Vec<u32>,
    /// Most tokens to generate; clamped to what the context has left.
    /// [`usize::MAX`]: as many as the context and the KV cache hold (the
    /// client named no limit).
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Keep going past end-of-generation tokens (benchmarks).
    pub ignore_eos: bool,
}

impl GenerationRequest {
    /// The tokens of KV cache the request reserves: its prompt and
    /// `max_tokens`, in the whole pages the stages' caches allocate.
    fn kv_tokens(&self) -> usize {
        kv_rows_for(self.prompt.len() + self.max_tokens)
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model ended its turn, or the caller stopped at a stop sequence.
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
}

/// What the engine tells a request's owner, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerationEvent {
    Token {
        token: u32,
        /// When the request asked for log probabilities.
        logprobs: Option<TokenLogprobs>,
    },
    Finished {
        reason: FinishReason,
        prompt_tokens: usize,
        /// Tokens delivered as `Token` events (end-of-turn tokens are not).
        completion_tokens: usize,
    },
    Failed {
        message: String,
    },
}

/// A running generation: its events, and a way to end it early.
/// Dropping it cancels the generation at its next step.
#[derive(Debug)]
pub struct Generation {
    pub events: mpsc::Receiver<GenerationEvent>,
    stopped: Arc<AtomicBool>,
}

impl Generation {
    /// Ends the generation on purpose (a stop sequence matched): the engine
    /// counts it as finished, not as abandoned.
    pub fn stop(&mut self) {
        self.stopped.store(true, Ordering::Release);
        self.events.close();
    }
}

/// Counters the engine publishes for health checks and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EngineStats {
    /// Requests being generated now.
    pub active: usize,
    pub completed: u64,
    pub cancelled: u64,
    pub failed: u64,
    pub generated_tokens: u64,
    /// Times a request was fed again on a new plan after a node was lost.
    pub resumed: u64,
    /// Requests waiting to start.
    pub queued: usize,
    /// KV-cache bytes reserved by the active requests.
    pub kv_reserved_bytes: u64,
    /// The engine stopped (its stage died, or the node is stopping); it
    /// serves nothing more.
    pub stopped: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    #[error("the server is busy: {ENGINE_QUEUE_LEN} requests are already waiting; retry shortly")]
    Busy,
    #[error(
        "this request may need {needed_bytes} bytes of KV cache ({tokens} tokens: prompt plus max_tokens, in whole pages of {KV_PAGE_TOKENS}), more than this node's KV budget of {budget_bytes} bytes; lower max_tokens or shorten the prompt"
    )]
    TooLarge {
        tokens: usize,
        needed_bytes: u64,
        budget_bytes: u64,
    },
    #[error(
        "this request may need KV cache for {tokens} tokens (prompt plus max_tokens, in whole pages of {KV_PAGE_TOKENS}), more than the cluster holds for one request: {stage} has room for {capacity_tokens}; lower max_tokens or shorten the prompt, or give that node more --memory-budget or --kv-cache"
    )]
    TooLargeForCluster {
        tokens: usize,
        capacity_tokens: u64,
        /// The stage with the least room, in words.
        stage: String,
    },
    #[error("the inference engine has stopped")]
    Stopped,
}

/// What the engine needs to know about the model it serves.
#[derive(Debug, Clone)]
pub struct EngineModel {
    pub context_length: usize,
    pub stop_tokens: BTreeSet<u32>,
    /// KV-cache bytes one token takes across the layers this engine runs.
    pub kv_bytes_per_token: u64,
    /// KV-cache bytes the active requests may reserve together.
    pub kv_budget_bytes: u64,
    /// Prompt tokens fed per step (`--prefill-chunk`, at most
    /// [`PREFILL_CHUNK_TOKENS`]).
    pub prefill_chunk_tokens: usize,
}

impl EngineModel {
    fn kv_bytes(&self, tokens: usize) -> u64 {
        tokens as u64 * self.kv_bytes_per_token
    }
}

/// Why a request that reserves `tokens` of KV cache (prompt plus
/// `max_tokens`, in whole pages) can never run, however long it waits:
/// it needs more than the tightest stage of the plan holds (`kv_room`),
/// or, without a plan's room, than this engine's own budget.
fn never_fits(tokens: usize, model: &EngineModel, kv_room: Option<&KvRoom>) -> Option<SubmitError> {
    match kv_room {
        Some(kv) => (tokens as u64 > kv.capacity_tokens).then(|| SubmitError::TooLargeForCluster {
            tokens,
            capacity_tokens: kv.capacity_tokens,
            stage: kv.stage.clone(),
        }),
        None => {
            let needed_bytes = model.kv_bytes(tokens);
            (needed_bytes > model.kv_budget_bytes).then_some(SubmitError::TooLarge {
                tokens,
                needed_bytes,
                budget_bytes: model.kv_budget_bytes,
            })
        }
    }
}

/// Room for KV cache on the stages of the cluster's plan, as the cluster
/// knows it. Every request runs through every stage, so a request's
/// tokens (prompt plus `max_tokens`) take room on each; the stage whose
/// KV budget holds the fewest tokens over its layers bounds them all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvRoom {
    /// Tokens the tightest stage holds, for every owner's requests.
    pub capacity_tokens: u64,
    /// That stage, in words (for the error that refuses a request).
    pub stage: String,
    /// Tokens reserved by requests other nodes own, as they last said.
    /// A report is at most a status interval old, so two owners admitting
    /// at once can overcommit a stage for that long: its caches grow
    /// past the budget then, they are not cut.
    pub others_tokens: u64,
}

/// The scheduling policy as the coordinator knows it: which waiting
/// requests start now, in order, given each stage's load. The node's Wasm
/// policy host implements it; the coordinator knows nothing of Wasm.
pub trait AdmissionPolicy: Send + Sync + 'static {
    /// The ids to start, in order; an error is said in words for the log.
    fn schedule(
        &self,
        queue: Vec<WaitingRequest>,
        stages: Vec<StageLoad>,
    ) -> BoxFuture<'static, Result<Vec<u64>, String>>;
}

/// How the coordinator picks which waiting requests start.
#[derive(Debug, Clone)]
pub struct Scheduling<P> {
    /// The node's scheduling policy.
    pub policy: P,
    /// Each stage of the current plan, in ring order, with the requests
    /// going through it from every node (empty while there is no plan).
    pub stages: watch::Receiver<Vec<StageLoad>>,
    /// The plan's room for KV cache (`None` while there is no plan or no
    /// stage has reported its budget: the engine's own budget applies).
    pub kv_room: watch::Receiver<Option<KvRoom>>,
}

/// The policy, stage loads and KV room the coordinator consults.
struct Consulted {
    policy: Arc<dyn AdmissionPolicy>,
    stages: watch::Receiver<Vec<StageLoad>>,
    kv_room: watch::Receiver<Option<KvRoom>>,
}

/// The type of "no policy": the coordinator serves first come, first
/// served by itself.
enum NoPolicy {}

impl AdmissionPolicy for NoPolicy {
    fn schedule(
        &self,
        _: Vec<WaitingRequest>,
        _: Vec<StageLoad>,
    ) -> BoxFuture<'static, Result<Vec<u64>, String>> {
        match *self {}
    }
}

struct Submission {
    request: GenerationRequest,
    events: mpsc::Sender<GenerationEvent>,
    stopped: Arc<AtomicBool>,
    arrived: Instant,
}

/// A cheap, cloneable handle to a running engine.
#[derive(Clone)]
pub struct EngineHandle {
    submissions: mpsc::Sender<Submission>,
    /// Requests submitted and not started (or dropped) yet: in the channel
    /// or in the coordinator's queue. At most [`ENGINE_QUEUE_LEN`].
    waiting: Arc<AtomicUsize>,
    stats: watch::Receiver<EngineStats>,
    model: Current<EngineModel>,
    /// The cluster's room for KV cache, when the engine runs in one.
    kv_room: Option<watch::Receiver<Option<KvRoom>>>,
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle")
            .field("model", &self.model)
            .finish()
    }
}

impl EngineHandle {
    /// Current counters; `changed()` on the receiver waits for the next update.
    pub fn stats(&self) -> watch::Receiver<EngineStats> {
        self.stats.clone()
    }

    /// False once the engine has stopped and can serve nothing more.
    pub fn is_running(&self) -> bool {
        !self.submissions.is_closed() && !self.stats.borrow().stopped
    }

    /// KV-cache bytes the active requests may reserve together.
    pub fn kv_budget_bytes(&self) -> u64 {
        self.model.get().kv_budget_bytes
    }

    /// The cluster's room for KV cache, when the engine runs in one and
    /// its plan's stages have said their budgets.
    pub fn kv_room(&self) -> Option<KvRoom> {
        self.kv_room.as_ref().and_then(|r| r.borrow().clone())
    }

    /// Serves another model from now on (the cluster switched): its context
    /// length, stop tokens and KV size per token.
    pub fn set_model(&self, model: EngineModel) {
        self.model.set(model);
    }

    /// Queues a generation.
    pub fn submit(&self, mut request: GenerationRequest) -> Result<Generation, SubmitError> {
        let model = self.model.get();
        let kv_room = self.kv_room();
        let prompt = request.prompt.len();
        let room = model.context_length.saturating_sub(prompt);
        request.max_tokens = if request.max_tokens == usize::MAX {
            // No limit named: as many as the KV cache holds beside the
            // prompt, as llama.cpp's server bounds a slot by its context
            // (in whole pages, as the caches allocate them).
            let kv_tokens = match &kv_room {
                Some(kv) => usize::try_from(kv.capacity_tokens).unwrap_or(usize::MAX),
                None => usize::try_from(model.kv_budget_bytes / model.kv_bytes_per_token.max(1))
                    .unwrap_or(usize::MAX),
            };
            room.min(kv_tokens_within(kv_tokens).saturating_sub(prompt))
                .max(1)
        } else {
            request.max_tokens.min(room)
        };
        if let Some(error) = never_fits(request.kv_tokens(), &model, kv_room.as_ref()) {
            return Err(error);
        }
        // One slot per possible token plus the final event, so the engine
        // never waits on a slow reader: the bound is the context length.
        let (events, receiver) = mpsc::channel(request.max_tokens + 2);
        let stopped = Arc::new(AtomicBool::new(false));
        let submission = Submission {
            request,
            events,
            stopped: Arc::clone(&stopped),
            arrived: Instant::now(),
        };
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= ENGINE_QUEUE_LEN {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(SubmitError::Busy);
        }
        self.submissions.try_send(submission).map_err(|e| {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            match e {
                mpsc::error::TrySendError::Full(_) => SubmitError::Busy,
                mpsc::error::TrySendError::Closed(_) => SubmitError::Stopped,
            }
        })?;
        Ok(Generation {
            events: receiver,
            stopped,
        })
    }
}

/// Tokens per second over the tokens after the first (whose time is the
/// prefill's), or 0 when there is nothing to measure.
pub fn decode_rate(tokens: usize, seconds_since_first: f64) -> f64 {
    if tokens > 1 && seconds_since_first > 0.0 {
        (tokens - 1) as f64 / seconds_since_first
    } else {
        0.0
    }
}

/// The threads of a running engine. [`shutdown`](Engine::shutdown) stops
/// it, and so does dropping every [`EngineHandle`].
pub struct Engine {
    pub handle: EngineHandle,
    threads: Vec<JoinHandle<()>>,
    /// Set by `shutdown`: handles live on in parts that outlast the HTTP
    /// server (the cluster's model switcher), so their drop cannot be
    /// what stops the coordinator.
    stop: watch::Sender<bool>,
}

/// The far ends of the coordinator's two channels: whoever runs the stages
/// takes jobs from `jobs` and returns results through `results`.
pub struct PipelineEnds {
    pub jobs: mpsc::Receiver<StageJob>,
    pub results: mpsc::Sender<StageResult>,
    /// KV cache the active requests reserve, in tokens (prompt plus
    /// `max_tokens` each), for the cluster to tell the other owners.
    pub reserved_tokens: watch::Receiver<u64>,
}

impl Engine {
    /// Starts a coordinator for `model`; the caller runs the stages and
    /// connects them to the returned ends. Without `scheduling`, requests
    /// start first come, first served, as the built-in policy does.
    pub fn start<P: AdmissionPolicy>(
        model: EngineModel,
        scheduling: Option<Scheduling<P>>,
    ) -> std::io::Result<(Self, PipelineEnds)> {
        let model = Current::new(model);
        let kv_room = scheduling.as_ref().map(|s| s.kv_room.clone());
        let scheduling = scheduling.map(|s| Consulted {
            policy: Arc::new(s.policy),
            stages: s.stages,
            kv_room: s.kv_room,
        });
        let (reserved_tx, reserved_rx) = watch::channel(0);
        let (job_tx, job_rx) = mpsc::channel(PIPELINE_QUEUE_LEN);
        let (result_tx, result_rx) = mpsc::channel(RESULT_QUEUE_LEN);
        let (submission_tx, submission_rx) = mpsc::channel(ENGINE_QUEUE_LEN);
        let (stats_tx, stats_rx) = watch::channel(EngineStats::default());
        let (stop_tx, stop) = Stopping::new();
        let waiting = Arc::new(AtomicUsize::new(0));
        let coordinator = Coordinator {
            stop,
            model: model.clone(),
            submissions: submission_rx,
            submissions_open: true,
            queue: VecDeque::new(),
            waiting: Arc::clone(&waiting),
            schedule_again: false,
            scheduling,
            results: result_rx,
            first_stage: job_tx,
            active: HashMap::new(),
            held: HashMap::new(),
            stats: stats_tx,
            reserved_tokens: reserved_tx,
        };
        let coordinator_thread = std::thread::Builder::new()
            .name("ringlet-coordinator".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                {
                    Ok(runtime) => runtime.block_on(coordinator.run()),
                    Err(error) => tracing::error!(%error, "cannot start the coordinator runtime"),
                }
            })?;
        let engine = Self {
            handle: EngineHandle {
                submissions: submission_tx,
                waiting,
                stats: stats_rx,
                model,
                kv_room,
            },
            threads: vec![coordinator_thread],
            stop: stop_tx,
        };
        Ok((
            engine,
            PipelineEnds {
                jobs: job_rx,
                results: result_tx,
                reserved_tokens: reserved_rx,
            },
        ))
    }

    /// Starts an engine serving the whole model from one local shard, with
    /// `kv_budget_bytes` for the KV caches of its requests; `prompt` gives
    /// the model's end-of-turn tokens and grammars.
    pub fn start_local(
        shard: Shard,
        prompt: &PromptBuilder,
        kv_budget_bytes: u64,
        prefill_chunk_tokens: usize,
    ) -> std::io::Result<Self> {
        let config = shard.config();
        let grammars = Arc::clone(prompt.grammars());
        let model = EngineModel {
            context_length: config.context_length,
            stop_tokens: prompt.tokenizer().stop_tokens().clone(),
            kv_bytes_per_token: config.kv_bytes_per_token_per_layer() * shard.range().len() as u64,
            kv_budget_bytes,
            prefill_chunk_tokens,
        };
        let (mut engine, ends) = Self::start(model, None::<Scheduling<NoPolicy>>)?;
        let results = ends.results;
        let stage = stage::spawn(shard, grammars, ends.jobs, 1, None, move |mut outputs| {
            // One owner: a step's tokens are one batch.
            stage::tag_batches(&mut outputs, |_| ());
            outputs.into_iter().all(|output| match output {
                StageOutput::Done { result, .. } => results.blocking_send(result).is_ok(),
                StageOutput::Next { sequence, .. } => {
                    // One shard holding the whole model always ends in logits.
                    let message = "the model's last layer is missing from this node".to_string();
                    results
                        .blocking_send(StageResult::Failed { sequence, message })
                        .is_ok()
                }
            })
        })?;
        engine.threads.push(stage.thread);
        Ok(engine)
    }

    /// Stops accepting work, fails what is still waiting or running (the
    /// HTTP server has already given open requests their grace), and waits
    /// for the engine's threads to end.
    pub fn shutdown(self) {
        self.stop.send_replace(true);
        drop(self.handle);
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

struct ActiveRequest {
    request: GenerationRequest,
    events: mpsc::Sender<GenerationEvent>,
    stopped: Arc<AtomicBool>,
    /// KV cache reserved for it: prompt plus `max_tokens`.
    kv_tokens: u64,
    /// Tokens of the history (prompt, then generated) the stages have
    /// been given so far.
    fed: usize,
    /// Tokens generated and delivered to the owner, in order.
    generated: Vec<u32>,
    started: Instant,
    first_token_at: Option<Instant>,
    /// Since when the request is being fed again after a lost node, and
    /// how many tokens it had generated then.
    resuming: Option<(Instant, usize)>,
}

/// How a request left the engine.
enum Outcome {
    Finished(FinishReason),
    /// The owner stopped it on purpose (a stop sequence).
    StoppedByOwner,
    /// The owner went away.
    Abandoned,
    Failed(String),
}

struct Coordinator {
    /// [`Engine::shutdown`]'s signal (never set if the engine is dropped
    /// without it: the handles' drop then stops the coordinator).
    stop: Stopping,
    model: Current<EngineModel>,
    submissions: mpsc::Receiver<Submission>,
    submissions_open: bool,
    /// Requests waiting to start, oldest first.
    queue: VecDeque<Submission>,
    /// Shared with the handles: counts down as requests leave the queue.
    waiting: Arc<AtomicUsize>,
    /// Something changed (a request arrived or ended, a stage's load
    /// changed) since the policy was last asked.
    schedule_again: bool,
    scheduling: Option<Consulted>,
    results: mpsc::Receiver<StageResult>,
    first_stage: mpsc::Sender<StageJob>,
    active: HashMap<SequenceId, ActiveRequest>,
    /// Next steps held back until the rest of their batch's tokens are
    /// back, by the batch's tag id (see [`HeldBatch`]).
    held: HashMap<u64, HeldBatch>,
    stats: watch::Sender<EngineStats>,
    /// The active requests' KV reservations, in tokens.
    reserved_tokens: watch::Sender<u64>,
}

/// A request's next decode step: its last token, at `position`.
struct DecodeStep {
    sequence: SequenceId,
    position: usize,
    token: u32,
}

/// The tokens of a batch that came back so far: the next steps of those
/// sequences wait for the rest (which come at once, unless lost:
/// `BATCH_HOLD_LIMIT_MS` bounds the wait), so that they go to the first
/// stage together and it runs them as one batch again.
struct HeldBatch {
    /// Tokens of the batch not back yet.
    missing: u32,
    steps: Vec<DecodeStep>,
    since: Instant,
}

impl Coordinator {
    async fn run(mut self) {
        let mut stages = self.scheduling.as_ref().map(|s| s.stages.clone());
        let mut kv_room = self.scheduling.as_ref().map(|s| s.kv_room.clone());
        loop {
            let hold_deadline = self.hold_deadline();
            tokio::select! {
                // Results first: finishing work frees room for new work.
                biased;
                result = self.results.recv() => match result {
                    Some(result) => self.on_result(result).await,
                    None => {
                        self.stage_stopped().await;
                        break;
                    }
                },
                () = self.stop.wait() => {
                    let unfinished = self.queue.len() + self.active.len();
                    self.fail_everything(
                        "the node is stopping; send the request again to another node, or once it is back",
                    )
                    .await;
                    tracing::info!(unfinished, "the request coordinator stopped");
                    break;
                }
                // The handles bound what waits (`EngineHandle::waiting`).
                submission = self.submissions.recv(), if self.submissions_open => match submission {
                    Some(submission) => {
                        self.queue.push_back(submission);
                        self.schedule_again = true;
                    }
                    None => self.submissions_open = false,
                },
                changed = changed(&mut stages), if !self.queue.is_empty() => {
                    if changed {
                        self.schedule_again = true;
                    } else {
                        stages = None; // the cluster stopped publishing
                    }
                }
                changed = changed(&mut kv_room), if !self.queue.is_empty() => {
                    if changed {
                        self.schedule_again = true;
                    } else {
                        kv_room = None;
                    }
                }
                () = tokio::time::sleep_until(hold_deadline.unwrap_or_else(tokio::time::Instant::now)), if hold_deadline.is_some() => {
                    self.send_overdue_batches().await;
                }
            }
            // Starting a request can end one at once (its client left), which
            // asks for another round.
            while self.schedule_again {
                self.schedule_again = false;
                self.start_waiting().await;
            }
            if !self.submissions_open && self.active.is_empty() && self.queue.is_empty() {
                break; // every handle dropped and all work done
            }
        }
        tracing::debug!("coordinator stopped");
    }

    /// Asks the policy which waiting requests start, and starts them while
    /// there is room.
    async fn start_waiting(&mut self) {
        self.drop_finished_waiters();
        if self.queue.is_empty() || self.active.len() >= MAX_ACTIVE_SEQUENCES {
            self.publish();
            return;
        }
        let picked = self.pick().await;
        let mut started = 0;
        for id in picked {
            if self.active.len() >= MAX_ACTIVE_SEQUENCES {
                break;
            }
            let Some(index) = self.queue.iter().position(|s| s.request.id.0 == id) else {
                continue; // not waiting (any more): ignored, as the contract says
            };
            if !self.fits(&self.queue[index]) {
                break; // it waits for room, and those picked after it wait too
            }
            if let Some(submission) = self.take_waiting(index) {
                self.start(submission).await;
                started += 1;
            }
        }
        // A policy must not stall the node: with nothing running here, the
        // oldest request starts (it fits: oversized ones were refused),
        // even if other nodes' requests fill a stage.
        if started == 0
            && self.active.is_empty()
            && self.queue.front().is_some_and(|s| self.fits(s))
            && let Some(oldest) = self.take_waiting(0)
        {
            tracing::debug!(request = %oldest.request.id, "nothing runs here and the policy started nothing; starting the oldest request");
            self.start(oldest).await;
        }
        self.publish();
    }

    /// The policy's picks, or first come, first served without one (or when
    /// it fails, with a warning).
    async fn pick(&self) -> Vec<u64> {
        let queue: Vec<WaitingRequest> = self
            .queue
            .iter()
            .map(|s| WaitingRequest {
                id: s.request.id.0,
                prompt_tokens: s.request.prompt.len() as u32,
                max_tokens: s.request.max_tokens as u32,
                waited_millis: s.arrived.elapsed().as_millis() as u64,
            })
            .collect();
        let own = StageLoad {
            node: 0,
            in_flight: self.active.len() as u32,
            limit: MAX_ACTIVE_SEQUENCES as u32,
        };
        let Some(scheduling) = &self.scheduling else {
            return first_come_first_served(&queue, &[own]);
        };
        // A stage carries at least this node's own requests, even before it
        // reports them.
        let stages: Vec<StageLoad> = scheduling
            .stages
            .borrow()
            .iter()
            .map(|s| StageLoad {
                in_flight: s.in_flight.max(own.in_flight),
                ..*s
            })
            .collect();
        if stages.is_empty() {
            // No plan: the requests start and fail at once with the reason.
            return queue.iter().map(|w| w.id).collect();
        }
        // Streams wait while the policy thinks: not for long (it may be
        // busy with a placement or a dry run).
        let asked = scheduling.policy.schedule(queue.clone(), stages.clone());
        match tokio::time::timeout(Duration::from_millis(SCHEDULE_WAIT_MS), asked).await {
            Ok(Ok(picked)) => picked,
            Ok(Err(error)) => {
                tracing::warn!(%error, "no answer from the scheduling policy; starting requests first come, first served");
                first_come_first_served(&queue, &stages)
            }
            Err(_) => {
                tracing::debug!(
                    "the scheduling policy is busy; starting requests first come, first served"
                );
                first_come_first_served(&queue, &stages)
            }
        }
    }

    /// Takes a request out of the queue.
    fn take_waiting(&mut self, index: usize) -> Option<Submission> {
        let submission = self.queue.remove(index)?;
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        Some(submission)
    }

    /// Forgets waiting requests whose client left or that need no work.
    fn drop_finished_waiters(&mut self) {
        let before = self.queue.len();
        let mut kept = VecDeque::with_capacity(self.queue.len());
        let model = self.model.get();
        let kv_room = self
            .scheduling
            .as_ref()
            .and_then(|s| s.kv_room.borrow().clone());
        for submission in self.queue.drain(..) {
            let request = &submission.request;
            if submission.events.is_closed() {
                self.stats.send_modify(|s| s.cancelled += 1);
            } else if request.prompt.is_empty() || request.max_tokens == 0 {
                let _ = submission.events.try_send(GenerationEvent::Finished {
                    reason: FinishReason::Length,
                    prompt_tokens: request.prompt.len(),
                    completion_tokens: 0,
                });
            } else if let Some(error) = never_fits(request.kv_tokens(), &model, kv_room.as_ref()) {
                // It fitted when it came, but the plan changed since (a
                // lost node's layers moved to the others, so each stage
                // holds less KV cache): waiting would hold up every
                // request behind it for ever.
                tracing::info!(request = %request.id, %error, "a waiting request no longer fits the cluster's plan");
                let _ = submission.events.try_send(GenerationEvent::Failed {
                    message: error.to_string(),
                });
            } else {
                kept.push_back(submission);
            }
        }
        self.waiting
            .fetch_sub(before - kept.len(), Ordering::AcqRel);
        self.queue = kept;
    }

    fn reserved_tokens(&self) -> u64 {
        self.active.values().map(|a| a.kv_tokens).sum()
    }

    /// True when the request's KV cache fits beside the active ones': on
    /// every stage of the cluster's plan, beside other owners' requests
    /// too, or else in this engine's own budget.
    fn fits(&self, submission: &Submission) -> bool {
        let needed = submission.request.kv_tokens() as u64;
        let reserved = self.reserved_tokens();
        let room = self
            .scheduling
            .as_ref()
            .and_then(|s| s.kv_room.borrow().clone());
        match room {
            Some(room) => reserved + room.others_tokens + needed <= room.capacity_tokens,
            None => {
                let model = self.model.get();
                model.kv_bytes((reserved + needed) as usize) <= model.kv_budget_bytes
            }
        }
    }

    async fn start(&mut self, submission: Submission) {
        let kv_tokens = submission.request.kv_tokens() as u64;
        let Submission {
            request,
            events,
            stopped,
            ..
        } = submission;
        let id = request.id;
        tracing::info!(request = %id, prompt_tokens = request.prompt.len(), max_tokens = request.max_tokens, "generation started");
        self.active.insert(
            id,
            ActiveRequest {
                request,
                events,
                stopped,
                kv_tokens,
                fed: 0,
                generated: Vec::new(),
                started: Instant::now(),
                first_token_at: None,
                resuming: None,
            },
        );
        self.feed_history(id).await;
    }

    /// Sends the next piece of the request's history: a chunk of the
    /// prompt, or (when it resumes) of the tokens generated so far, fed one
    /// step per token as they were decoded. The last piece asks for a
    /// token, from a sampler that has drawn one per generated token.
    async fn feed_history(&mut self, id: SequenceId) {
        let Some(active) = self.active.get_mut(&id) else {
            return;
        };
        if active.events.is_closed() {
            self.end(id, Outcome::Abandoned).await;
            return;
        }
        let prompt = &active.request.prompt;
        let generated = &active.generated;
        let history = prompt.len() + generated.len();
        let position = active.fed;
        let prefill_chunk = self
            .model
            .get()
            .prefill_chunk_tokens
            .clamp(1, PREFILL_CHUNK_TOKENS);
        let (chunk, token_by_token) = if position < prompt.len() {
            let end = (position + prefill_chunk).min(prompt.len());
            (prompt[position..end].to_vec(), false)
        } else {
            let start = position - prompt.len();
            let end = (start + PREFILL_CHUNK_TOKENS).min(generated.len());
            (generated[start..end].to_vec(), true)
        };
        active.fed += chunk.len();
        let sample = if active.fed == history {
            let params = &active.request.sampling;
            Sample::Start {
                params: Box::new(params.clone()),
                drawn: generated.len() as u64,
                prompt: if params.penalizes_prompt() {
                    prompt.clone()
                } else {
                    Vec::new()
                },
                generated: if params.needs_generated() {
                    generated.clone()
                } else {
                    Vec::new()
                },
            }
        } else {
            Sample::No
        };
        self.send_job(StageJob::Forward {
            sequence: id,
            position,
            input: ShardInput::Tokens(chunk),
            sample,
            token_by_token,
            route: (),
            sent_at: None,
            batch: None,
        })
        .await;
    }

    /// The request's stages were lost and a new plan is active: feed its
    /// history again from the start.
    async fn resume(&mut self, id: SequenceId) {
        let Some(active) = self.active.get_mut(&id) else {
            return;
        };
        tracing::info!(request = %id, generated = active.generated.len(), "resuming the generation on the new plan");
        active.fed = 0;
        active.resuming = Some((Instant::now(), active.generated.len()));
        self.stats.send_modify(|s| s.resumed += 1);
        crate::metrics::global().recoveries.inc();
        self.feed_history(id).await;
    }

    async fn send_job(&mut self, job: StageJob) {
        if self.first_stage.send(job).await.is_err() {
            self.stage_stopped().await;
        }
    }

    async fn on_result(&mut self, result: StageResult) {
        match result {
            StageResult::ChunkDone { sequence } => self.feed_history(sequence).await,
            StageResult::Resume { sequence } => self.resume(sequence).await,
            StageResult::Token {
                sequence,
                token,
                logprobs,
                batch,
            } => {
                let next = self.on_token(sequence, token, logprobs).await;
                self.step_with_batch(next, batch).await;
            }
            StageResult::Failed { sequence, message } => {
                self.end(sequence, Outcome::Failed(message)).await
            }
        }
    }

    /// Delivers a token; returns the request's next step (its position and
    /// token), or `None` when it ended.
    async fn on_token(
        &mut self,
        id: SequenceId,
        token: u32,
        logprobs: Option<TokenLogprobs>,
    ) -> Option<DecodeStep> {
        let active = self.active.get_mut(&id)?;
        active.first_token_at.get_or_insert_with(Instant::now);
        if let Some((since, generated)) = active.resuming.take() {
            tracing::info!(request = %id, replayed_tokens = active.request.prompt.len() + generated, replay_ms = since.elapsed().as_millis() as u64, "generation resumed");
        }
        if self.model.get().stop_tokens.contains(&token) && !active.request.ignore_eos {
            self.end(id, Outcome::Finished(FinishReason::Stop)).await;
            return None;
        }
        // The channel has room for every token (see `submit`), so a full
        // channel cannot happen; a closed one means the owner is done.
        if active
            .events
            .try_send(GenerationEvent::Token { token, logprobs })
            .is_err()
        {
            let outcome = if active.stopped.load(Ordering::Acquire) {
                Outcome::StoppedByOwner
            } else {
                Outcome::Abandoned
            };
            self.end(id, outcome).await;
            return None;
        }
        active.generated.push(token);
        if active.generated.len() >= active.request.max_tokens {
            self.end(id, Outcome::Finished(FinishReason::Length)).await;
            return None;
        }
        let position = active.fed;
        active.fed += 1;
        Some(DecodeStep {
            sequence: id,
            position,
            token,
        })
    }

    /// Sends a request's next step, or holds it until the rest of the
    /// batch its token came back with is back too (see [`HeldBatch`]).
    async fn step_with_batch(&mut self, next: Option<DecodeStep>, batch: Option<BatchTag>) {
        let Some(tag) = batch else {
            if let Some(next) = next {
                self.send_steps(vec![next]).await;
            }
            return;
        };
        let held = self.held.entry(tag.id).or_insert_with(|| HeldBatch {
            missing: tag.size,
            steps: Vec::new(),
            since: Instant::now(),
        });
        held.missing = held.missing.saturating_sub(1);
        held.steps.extend(next);
        if held.missing == 0
            && let Some(held) = self.held.remove(&tag.id)
        {
            self.send_steps(held.steps).await;
        }
    }

    /// When the oldest held batch stops waiting for its missing tokens
    /// (`None` while nothing is held).
    fn hold_deadline(&self) -> Option<tokio::time::Instant> {
        let oldest = self.held.values().map(|h| h.since).min()?;
        Some(tokio::time::Instant::from_std(oldest) + Duration::from_millis(BATCH_HOLD_LIMIT_MS))
    }

    /// Sends the steps of held batches whose missing tokens are overdue.
    async fn send_overdue_batches(&mut self) {
        let limit = Duration::from_millis(BATCH_HOLD_LIMIT_MS);
        let overdue: Vec<u64> = self
            .held
            .iter()
            .filter(|(_, h)| h.since.elapsed() >= limit)
            .map(|(&id, _)| id)
            .collect();
        for id in overdue {
            if let Some(held) = self.held.remove(&id) {
                tracing::debug!(
                    steps = held.steps.len(),
                    missing = held.missing,
                    "a batch's tokens did not all come back; sending the steps it has"
                );
                self.send_steps(held.steps).await;
            }
        }
    }

    /// Sends decode steps to the first stage as one batch. Requests that
    /// ended while their step was held are left out.
    async fn send_steps(&mut self, steps: Vec<DecodeStep>) {
        let steps: Vec<_> = steps
            .into_iter()
            .filter(|step| self.active.contains_key(&step.sequence))
            .collect();
        let batch = BatchTag::for_size(steps.len());
        // The hop from the owner to the first stage counts too.
        let sent_at = Some(crate::unix_micros());
        for DecodeStep {
            sequence,
            position,
            token,
        } in steps
        {
            self.send_job(StageJob::Forward {
                sequence,
                position,
                input: ShardInput::Tokens(vec![token]),
                sample: Sample::Continue,
                token_by_token: false,
                route: (),
                sent_at,
                batch,
            })
            .await;
        }
    }

    /// Forgets a request here and on the stage, tells its owner why, logs
    /// and counts it; the run loop then starts waiting ones if it can.
    async fn end(&mut self, id: SequenceId, outcome: Outcome) {
        let Some(active) = self.active.remove(&id) else {
            return;
        };
        let _ = self
            .first_stage
            .send(StageJob::Release { sequence: id })
            .await;
        let (prompt_tokens, completion_tokens) =
            (active.request.prompt.len(), active.generated.len());
        match outcome {
            Outcome::Finished(reason) => {
                let _ = active.events.try_send(GenerationEvent::Finished {
                    reason,
                    prompt_tokens,
                    completion_tokens,
                });
                log_finished(id, &active, &format!("{reason:?}"));
                self.stats.send_modify(|s| {
                    s.completed += 1;
                    s.generated_tokens += completion_tokens as u64;
                });
            }
            Outcome::StoppedByOwner => {
                log_finished(id, &active, "stop sequence");
                self.stats.send_modify(|s| {
                    s.completed += 1;
                    s.generated_tokens += completion_tokens as u64;
                });
            }
            Outcome::Abandoned => {
                tracing::info!(request = %id, completion_tokens, "generation cancelled: the client went away");
                self.stats.send_modify(|s| s.cancelled += 1);
            }
            Outcome::Failed(message) => {
                tracing::warn!(request = %id, error = %message, "generation failed");
                let _ = active.events.try_send(GenerationEvent::Failed { message });
                self.stats.send_modify(|s| s.failed += 1);
            }
        }
        self.schedule_again = true;
        self.publish();
    }

    /// The stage is gone (it can only die of a bug): fail everything, stop.
    async fn stage_stopped(&mut self) {
        tracing::error!("the inference stage stopped; failing every request");
        self.fail_everything("the inference engine stopped; the node must be restarted")
            .await;
    }

    /// Fails every waiting and running request with `message` and stops
    /// taking submissions.
    async fn fail_everything(&mut self, message: &str) {
        let message = message.to_string();
        self.waiting.fetch_sub(self.queue.len(), Ordering::AcqRel);
        for waiting in self.queue.drain(..) {
            let _ = waiting.events.try_send(GenerationEvent::Failed {
                message: message.clone(),
            });
        }
        let ids: Vec<SequenceId> = self.active.keys().copied().collect();
        for id in ids {
            self.end(id, Outcome::Failed(message.clone())).await;
        }
        self.submissions.close();
        self.submissions_open = false;
        self.stats.send_modify(|s| s.stopped = true);
    }

    fn publish(&self) {
        let active = self.active.len();
        let queued = self.queue.len();
        let reserved_tokens = self.reserved_tokens();
        self.reserved_tokens.send_if_modified(|tokens| {
            let changed = *tokens != reserved_tokens;
            *tokens = reserved_tokens;
            changed
        });
        let kv_reserved_bytes = self.model.get().kv_bytes(reserved_tokens as usize);
        self.stats.send_if_modified(|s| {
            let changed = s.active != active
                || s.queued != queued
                || s.kv_reserved_bytes != kv_reserved_bytes;
            s.active = active;
            s.queued = queued;
            s.kv_reserved_bytes = kv_reserved_bytes;
            changed
        });
    }
}

/// The built-in order, for when there is no policy to ask: the same
/// first come, first served as the default policy.
fn first_come_first_served(queue: &[WaitingRequest], stages: &[StageLoad]) -> Vec<u64> {
    scheduler::contract::schedule(queue, stages)
}

/// Waits for the next change of what the cluster publishes (stage loads,
/// KV room): true when one came, false when there is nothing (more) to
/// watch.
async fn changed<T>(published: &mut Option<watch::Receiver<T>>) -> bool {
    match published {
        Some(published) => published.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

fn log_finished(id: SequenceId, active: &ActiveRequest, finish: &str) {
    let ttft_ms = active
        .first_token_at
        .map_or(0, |t| (t - active.started).as_millis() as u64);
    let since_first = active
        .first_token_at
        .map_or(0.0, |t| t.elapsed().as_secs_f64());
    tracing::info!(
        request = %id,
        prompt_tokens = active.request.prompt.len(),
        completion_tokens = active.generated.len(),
        ttft_ms,
        decode_tok_per_s = format!("{:.1}", decode_rate(active.generated.len(), since_first)),
        finish,
        "generation finished"
    );
}
