//! A stage: one shard of the model on its own thread, fed jobs in order.
//!
//! The stage that holds the model's last layer also samples: it keeps one
//! [`Sampler`] per sequence, so a token, not a vocabulary of logits, is what
//! leaves it. Where its output goes (the next stage, the request's owner,
//! near or far) is the business of whoever runs the stage: the engine for a
//! model held whole in this process, the cluster in serve mode. Each job
//! carries that owner's route (`R`), which the stage hands back untouched
//! with the job's output, through the `emit` function it was started with.
//!
//! A stage batches: each step takes every forward job waiting for it (up
//! to `STEP_TOKEN_BUDGET` rows and the micro-batch size), so one pass over
//! the weights serves the next token of every running sequence, and new
//! sequences join at the next step. Jobs that left one step together
//! carry a [`BatchTag`], and a stage that has some of a batch waits a
//! moment for the rest, so batches do not fall apart on the way.
//!
//! A stage also says how it is doing ([`StageProgress`]): the step it is
//! running and how long steps of each kind take here, so that a stage that
//! stopped making progress (a deadlocked thread) is told apart from a slow
//! one without a fixed timeout.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use std::collections::VecDeque;

use kernels::{
    Grammars, LayerRange, Sampler, SamplingParams, SequenceId, SequenceStep, Shard, ShardInput,
    ShardOutput, Tensor, TokenLogprobs,
};
use tokio::sync::mpsc;

use crate::limits::{
    BATCH_GATHER_LIMIT_MS, MAX_ACTIVE_SEQUENCES, MAX_NODES, STAGE_QUEUE_LEN, STAGE_STALL_FACTOR,
    STAGE_STALL_SLACK_MS, STEP_TOKEN_BUDGET,
};

/// Whether the last stage samples after this job, and with what. Also part
/// of the link protocol (`ForwardFrame`): changing it changes
/// `PROTOCOL_VERSION`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Sample {
    /// A prompt chunk that is not the last: fill the KV cache only.
    No,
    /// The first token sampled in this plan: create the sequence's
    /// sampler, which has already drawn `drawn` tokens (more than 0 when a
    /// request resumes on a new plan after a node was lost). Its penalties
    /// look at `prompt` and `generated`, and its grammar replays
    /// `generated`; they are sent only when the parameters need them.
    Start {
        /// Boxed: jobs stay small (this is sent once per request).
        params: Box<SamplingParams>,
        drawn: u64,
        prompt: Vec<u32>,
        generated: Vec<u32>,
    },
    /// A later token: use the sequence's sampler.
    Continue,
}

/// Jobs (or tokens) that left one step together: `size` of them carry the
/// same `id`, and whoever takes them next takes them together. Part of
/// the link protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BatchTag {
    pub id: u64,
    pub size: u32,
}

impl BatchTag {
    /// A tag for `size` jobs (`None` for a single one: nothing to wait for).
    pub fn for_size(size: usize) -> Option<Self> {
        (size > 1).then(|| Self {
            id: rand::random(),
            size: u32::try_from(size).unwrap_or(u32::MAX),
        })
    }
}

/// Tags the outputs of one step: the hidden states going on (all to the
/// next stage) as one batch, and the tokens as one batch per owner
/// (`owner_of` a route).
pub fn tag_batches<R, K: Eq + std::hash::Hash>(
    outputs: &mut [StageOutput<R>],
    owner_of: impl Fn(&R) -> K,
) {
    let onward = outputs
        .iter()
        .filter(|o| matches!(o, StageOutput::Next { .. }))
        .count();
    let onward_tag = BatchTag::for_size(onward);
    let mut tokens: HashMap<K, usize> = HashMap::new();
    for output in outputs.iter() {
        if let StageOutput::Done {
            route,
            result: StageResult::Token { .. },
            ..
        } = output
        {
            *tokens.entry(owner_of(route)).or_default() += 1;
        }
    }
    let token_tags: HashMap<K, Option<BatchTag>> = tokens
        .into_iter()
        .map(|(owner, n)| (owner, BatchTag::for_size(n)))
        .collect();
    for output in outputs.iter_mut() {
        match output {
            StageOutput::Next { batch, .. } => *batch = onward_tag,
            StageOutput::Done {
                route,
                result: StageResult::Token { batch, .. },
                ..
            } => *batch = token_tags.get(&owner_of(route)).copied().flatten(),
            StageOutput::Done { .. } => {}
        }
    }
}

/// Work for a stage. `R` is the route of whoever runs the stage, handed
/// back with the output (`()` for the engine's own stage).
#[derive(Debug)]
pub enum StageJob<R = ()> {
    /// Run the shard over tokens `position..position + n` of `sequence`.
    Forward {
        sequence: SequenceId,
        position: usize,
        input: ShardInput,
        sample: Sample,
        /// Run each token as a step of its own: a replay of tokens that
        /// were first decoded one at a time, so that every one gets the
        /// bits it got then (a step of several tokens sums attention in
        /// another order).
        token_by_token: bool,
        route: R,
        /// When the previous stage's output was ready, or the owner's
        /// coordinator sent a decode step (Unix µs), for the hop time.
        sent_at: Option<u64>,
        /// The batch this job left its last step with, if any.
        batch: Option<BatchTag>,
    },
    /// Forget `sequence`: free its KV cache and sampler.
    Release { sequence: SequenceId },
}

impl<R: Copy> StageJob<R> {
    /// The sequence and route of a forward job (`None` for a release).
    pub fn forward_route(&self) -> Option<(SequenceId, R)> {
        match self {
            StageJob::Forward {
                sequence, route, ..
            } => Some((*sequence, *route)),
            StageJob::Release { .. } => None,
        }
    }
}

/// What a stage reports to a request's owner.
#[derive(Debug)]
pub enum StageResult {
    Token {
        sequence: SequenceId,
        token: u32,
        /// When the request asked for log probabilities.
        logprobs: Option<TokenLogprobs>,
        /// The tokens of this owner's sequences sampled in the same step:
        /// the owner sends their next steps together.
        batch: Option<BatchTag>,
    },
    /// A prompt chunk went through every layer; send the next.
    ChunkDone { sequence: SequenceId },
    Failed {
        sequence: SequenceId,
        message: String,
    },
    /// The plan the sequence ran on is gone and a new one is active: its
    /// owner sends its whole history again (only the cluster says this).
    Resume { sequence: SequenceId },
}

impl StageResult {
    pub fn sequence(&self) -> SequenceId {
        match self {
            StageResult::Token { sequence, .. }
            | StageResult::ChunkDone { sequence }
            | StageResult::Failed { sequence, .. }
            | StageResult::Resume { sequence } => *sequence,
        }
    }
}

/// What leaves a stage, with the route of the job it came from.
#[derive(Debug)]
pub enum StageOutput<R> {
    /// Hidden states for the stage after this one.
    Next {
        sequence: SequenceId,
        position: usize,
        hidden: Tensor,
        sample: Sample,
        token_by_token: bool,
        route: R,
        /// When the hidden states were ready (Unix µs).
        ready_at: u64,
        /// Set by [`tag_batches`].
        batch: Option<BatchTag>,
    },
    /// A result for the request's owner.
    Done {
        route: R,
        result: StageResult,
        /// When the result was ready (Unix µs).
        ready_at: u64,
    },
}

/// How a stage is doing, shared with whoever runs it: the step running
/// now (since when, over how many tokens) and the typical time of a
/// decode step and of a prompt token here, measured as it runs.
#[derive(Debug)]
pub struct StageProgress {
    /// When times below are measured from.
    base: Instant,
    /// Microseconds after `base` at which the running step started, plus
    /// one; 0 while no step runs.
    busy_since: AtomicU64,
    busy_tokens: AtomicU64,
    busy_token_by_token: AtomicU64,
    /// Moving averages, in microseconds (0 until a step measured it): a
    /// one-token step, and a token of a prompt chunk.
    decode_micros: AtomicU64,
    prefill_token_micros: AtomicU64,
    /// The stage thread ended (it stops only when its node lets it go, or
    /// on a bug).
    ended: AtomicU64,
}

impl StageProgress {
    fn new() -> Self {
        Self {
            base: Instant::now(),
            busy_since: AtomicU64::new(0),
            busy_tokens: AtomicU64::new(0),
            busy_token_by_token: AtomicU64::new(0),
            decode_micros: AtomicU64::new(0),
            prefill_token_micros: AtomicU64::new(0),
            ended: AtomicU64::new(0),
        }
    }

    fn micros_now(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    fn step_started(&self, tokens: usize, token_by_token: bool) {
        self.busy_tokens.store(tokens as u64, Ordering::Relaxed);
        self.busy_token_by_token
            .store(u64::from(token_by_token), Ordering::Relaxed);
        self.busy_since
            .store(self.micros_now() + 1, Ordering::Release);
    }

    /// Ends the running step; returns how long it took, in microseconds
    /// (`None` for an empty step, or one the process was frozen in).
    fn step_ended(&self, tokens: usize, token_by_token: bool) -> Option<u64> {
        let started = self.busy_since.swap(0, Ordering::AcqRel);
        if started == 0 || tokens == 0 {
            return None;
        }
        let took = self.micros_now().saturating_sub(started - 1);
        // A batched step of several sequences' rows is measured per row,
        // as a prompt chunk is: a row costs about what a prompt token does.
        let (average, sample) = if tokens == 1 || token_by_token {
            (&self.decode_micros, took / tokens as u64)
        } else {
            (&self.prefill_token_micros, took / tokens as u64)
        };
        let old = average.load(Ordering::Relaxed);
        // A quarter of each new step: it follows a change of load within
        // a few steps and one odd step moves it little.
        let new = if old == 0 {
            sample
        } else {
            (3 * old + sample) / 4
        };
        average.store(new.max(1), Ordering::Relaxed);
        Some(took)
    }

    /// The process was frozen: the running step's time counts from now.
    pub fn restart_clock(&self) {
        let now = self.micros_now() + 1;
        let _ = self
            .busy_since
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |since| {
                (since != 0).then_some(now)
            });
    }

    /// Why the stage counts as lost, if it does: its thread ended, or its
    /// step has run far longer than steps of its size take here. A stage
    /// that has measured nothing yet (its first steps read the weights
    /// from disk) is not judged.
    pub fn stalled(&self) -> Option<String> {
        if self.ended.load(Ordering::Acquire) != 0 {
            return Some("its stage thread stopped".into());
        }
        let started = self.busy_since.load(Ordering::Acquire);
        if started == 0 {
            return None;
        }
        let running = Duration::from_micros(self.micros_now().saturating_sub(started - 1));
        let tokens = self.busy_tokens.load(Ordering::Relaxed).max(1);
        let decode = self.decode_micros.load(Ordering::Relaxed);
        let prefill = self.prefill_token_micros.load(Ordering::Relaxed);
        let one_by_one = tokens == 1 || self.busy_token_by_token.load(Ordering::Relaxed) != 0;
        // A prompt token never costs more than a decode step, so without
        // a prefill measure the decode one bounds it from above; and a
        // short chunk costs at least a decode step, whatever the long
        // chunks' per-token time says.
        let expected_micros = if one_by_one || prefill == 0 {
            decode.saturating_mul(tokens)
        } else {
            decode.max(prefill.saturating_mul(tokens))
        };
        if expected_micros == 0 {
            return None;
        }
        let expected = Duration::from_micros(expected_micros);
        let limit = expected.saturating_mul(STAGE_STALL_FACTOR)
            + Duration::from_millis(STAGE_STALL_SLACK_MS);
        (running > limit).then(|| {
            format!(
                "its step over {tokens} tokens has run {} ms where {} ms is usual",
                running.as_millis(),
                expected.as_millis().max(1)
            )
        })
    }
}

/// A fault a test asks a stage to have (`RINGLET_TEST_STAGE_FAULT`), to
/// show what the cluster does when a stage thread hangs or dies for real.
/// Never set outside tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestFault {
    /// After this many steps, the thread blocks forever, as a deadlock.
    HangAfter(u64),
    /// After this many steps, the thread ends, as a panic outside a step.
    ExitAfter(u64),
}

impl TestFault {
    /// `hang-after:N` or `exit-after:N` from `RINGLET_TEST_STAGE_FAULT`.
    pub fn from_env() -> Option<Self> {
        let value = std::env::var("RINGLET_TEST_STAGE_FAULT").ok()?;
        let (kind, steps) = value.split_once(':')?;
        let steps = steps.parse().ok()?;
        let fault = match kind {
            "hang-after" => TestFault::HangAfter(steps),
            "exit-after" => TestFault::ExitAfter(steps),
            _ => return None,
        };
        tracing::warn!(
            ?fault,
            "RINGLET_TEST_STAGE_FAULT is set: this node's stage will fail on purpose"
        );
        Some(fault)
    }
}

/// A running stage thread and how it is doing.
pub struct Spawned {
    pub thread: JoinHandle<()>,
    pub progress: Arc<StageProgress>,
}

/// Starts a thread that runs `shard` over the jobs it receives until the
/// job channel closes or `emit` returns false (its receiver is gone).
/// `emit` gets the outputs of each step together. With `micro_batches`
/// above 1 (the stages of a ring), a step takes at most that share of the
/// sequences held here, so that the running sequences travel the ring in
/// that many groups and every stage has work.
pub fn spawn<R: Send + 'static>(
    shard: Shard,
    grammars: Arc<Grammars>,
    jobs: mpsc::Receiver<StageJob<R>>,
    micro_batches: usize,
    fault: Option<TestFault>,
    emit: impl FnMut(Vec<StageOutput<R>>) -> bool + Send + 'static,
) -> std::io::Result<Spawned> {
    let name = format!("ringlet-stage-{}", shard.range());
    let progress = Arc::new(StageProgress::new());
    let shared = Arc::clone(&progress);
    let thread = std::thread::Builder::new().name(name).spawn(move || {
        let queue = JobQueue::new(jobs, micro_batches.max(1));
        run(shard, &grammars, queue, &shared, fault, emit);
        shared.ended.store(1, Ordering::Release);
    })?;
    Ok(Spawned { thread, progress })
}

/// What a job's output needs besides the step's result: whose it is and
/// where it goes.
struct OutputOf<R> {
    sequence: SequenceId,
    position: usize,
    token_by_token: bool,
    route: R,
}

/// A forward job taken into a step: its work, where its output goes, and
/// when it was sent.
struct Taken<R> {
    job: Job,
    route: R,
    sent_at: Option<u64>,
}

fn run<R>(
    mut shard: Shard,
    grammars: &Grammars,
    mut queue: JobQueue<R>,
    progress: &StageProgress,
    fault: Option<TestFault>,
    mut emit: impl FnMut(Vec<StageOutput<R>>) -> bool,
) {
    warm_up(&mut shard, progress);
    let mut samplers: HashMap<SequenceId, Sampler> = HashMap::new();
    let mut steps = 0u64;
    while let Some(batch) = queue.next_batch(&mut shard, &mut samplers) {
        let tokens: usize = batch.iter().map(|t| t.job.input.len()).sum();
        let token_by_token = batch.iter().any(|t| t.job.token_by_token);
        match fault {
            Some(TestFault::HangAfter(n)) if steps >= n => {
                tracing::warn!("stage thread hanging on purpose (RINGLET_TEST_STAGE_FAULT)");
                progress.step_started(tokens, token_by_token);
                loop {
                    std::thread::park();
                }
            }
            Some(TestFault::ExitAfter(n)) if steps >= n => {
                tracing::warn!("stage thread ending on purpose (RINGLET_TEST_STAGE_FAULT)");
                return;
            }
            _ => {}
        }
        steps += 1;
        let metrics = crate::metrics::global();
        for taken in &batch {
            if let Some(sent_at) = taken.sent_at.filter(|_| taken.job.input.len() == 1) {
                crate::metrics::observe_hop(&metrics.hop_into_stage, sent_at);
            }
        }
        metrics.step_sequences.observe(batch.len() as f64);
        let (jobs, metas): (Vec<Job>, Vec<OutputOf<R>>) = batch
            .into_iter()
            .map(|t| {
                let meta = OutputOf {
                    sequence: t.job.sequence,
                    position: t.job.position,
                    token_by_token: t.job.token_by_token,
                    route: t.route,
                };
                (t.job, meta)
            })
            .unzip();
        progress.step_started(tokens, token_by_token);
        // A panic here is a bug; it fails this step's requests, not the node.
        let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            step_batch(&mut shard, grammars, &mut samplers, jobs)
        }));
        if let Some(micros) = progress.step_ended(tokens, token_by_token) {
            metrics.stage_step.observe(micros as f64 / 1e6);
            metrics.stage_busy.inc_by(micros as f64 / 1e6);
        }
        let stepped: Vec<Result<Stepped, String>> = match stepped {
            Ok(stepped) => stepped,
            Err(panic) => {
                let message = format!(
                    "internal error in stage {}: {}",
                    shard.range(),
                    panic_message(panic.as_ref())
                );
                tracing::error!(%message, "a stage step panicked");
                metas.iter().map(|_| Err(message.clone())).collect()
            }
        };
        let ready_at = crate::unix_micros();
        let mut sampled = Vec::new();
        let mut outputs = Vec::with_capacity(metas.len());
        for (meta, stepped) in metas.into_iter().zip(stepped) {
            let OutputOf {
                sequence,
                position,
                token_by_token,
                route,
            } = meta;
            outputs.push(match stepped {
                Ok(Stepped::Hidden(hidden, sample)) => StageOutput::Next {
                    sequence,
                    position,
                    hidden,
                    sample,
                    token_by_token,
                    route,
                    ready_at,
                    batch: None,
                },
                Ok(Stepped::Result(result)) => {
                    if matches!(result, StageResult::Token { .. }) {
                        sampled.push(sequence);
                    }
                    StageOutput::Done {
                        route,
                        result,
                        ready_at,
                    }
                }
                Err(message) => fail(&mut shard, &mut samplers, sequence, route, message),
            });
        }
        if !emit(outputs) {
            break; // nobody listens: the node is shutting down
        }
        // With the tokens on their way, the grammars' next masks are
        // computed while the next forward pass runs (on the other stages,
        // or while the owners handle the tokens).
        for sequence in sampled {
            let Some(sampler) = samplers.get_mut(&sequence) else {
                continue;
            };
            // The grammar engine works on a user's schema: a panic in it
            // fails that request (its sampler is gone, so its next step
            // reports it), not the stage.
            let prepared =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sampler.prepare()));
            match prepared {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    tracing::warn!(%sequence, %error, "cannot compute the next token mask ahead; the next step computes it");
                }
                Err(panic) => {
                    tracing::error!(%sequence, panic = %panic_message(panic.as_ref()), "the grammar engine panicked");
                    samplers.remove(&sequence);
                }
            }
        }
    }
    tracing::debug!(range = %shard.range(), "stage stopped");
}

/// A stage's incoming jobs: the channel, and the jobs received but not
/// yet run (a step takes the batch it can; the rest wait, in order).
struct JobQueue<R> {
    jobs: mpsc::Receiver<StageJob<R>>,
    pending: VecDeque<StageJob<R>>,
    micro_batches: usize,
    /// Members of each batch received so far, for the batches that still
    /// have members on the way.
    arrived: HashMap<u64, u32>,
    /// Waits for a batch's late members with a deadline (`None` if it
    /// could not be built: the stage then never waits).
    timer: Option<tokio::runtime::Runtime>,
}

impl<R> JobQueue<R> {
    fn new(jobs: mpsc::Receiver<StageJob<R>>, micro_batches: usize) -> Self {
        let timer = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(|error| {
                tracing::warn!(%error, "cannot build the stage's timer; batches are not waited for");
            })
            .ok();
        Self {
            jobs,
            pending: VecDeque::new(),
            micro_batches,
            arrived: HashMap::new(),
            timer,
        }
    }

    fn push(&mut self, job: StageJob<R>) {
        if let StageJob::Forward {
            batch: Some(tag), ..
        } = &job
        {
            if self.arrived.len() > STAGE_QUEUE_LEN {
                self.arrived.clear(); // members that never came: forget them
            }
            let arrived = self.arrived.entry(tag.id).or_default();
            *arrived += 1;
            if *arrived >= tag.size {
                self.arrived.remove(&tag.id);
            }
        }
        self.pending.push_back(job);
    }

    fn drain(&mut self) {
        while let Ok(job) = self.jobs.try_recv() {
            self.push(job);
        }
    }

    /// Members of the batches waiting here that have not arrived yet.
    fn missing(&self) -> u32 {
        let mut seen: Vec<u64> = Vec::new();
        let mut missing = 0;
        for job in &self.pending {
            if let StageJob::Forward {
                batch: Some(tag), ..
            } = job
                && !seen.contains(&tag.id)
            {
                seen.push(tag.id);
                if let Some(&arrived) = self.arrived.get(&tag.id) {
                    missing += tag.size.saturating_sub(arrived);
                }
            }
        }
        missing
    }

    /// Forward jobs waiting here.
    fn forwards(&self) -> usize {
        self.pending
            .iter()
            .filter(|j| matches!(j, StageJob::Forward { .. }))
            .count()
    }

    /// How many sequences one step takes: every sequence held here (or
    /// waiting to start), or with micro batches that share of them.
    fn batch_cap(&self, shard: &Shard) -> usize {
        shard
            .sequences()
            .max(self.forwards())
            .div_ceil(self.micro_batches)
            .clamp(1, MAX_ACTIVE_SEQUENCES * MAX_NODES)
    }

    /// The next step's jobs, waiting for one if none is queued; releases
    /// met on the way are done at once. `None` when the channel closed.
    fn next_batch(
        &mut self,
        shard: &mut Shard,
        samplers: &mut HashMap<SequenceId, Sampler>,
    ) -> Option<Vec<Taken<R>>> {
        loop {
            if self.pending.is_empty() {
                let job = self.jobs.blocking_recv()?;
                self.push(job);
            }
            let cap = self.batch_cap(shard);
            self.gather(cap);
            let batch = self.take(cap, shard, samplers);
            if !batch.is_empty() {
                return Some(batch);
            }
        }
    }

    /// Receives what is queued, then waits (a bounded while) for the
    /// missing members of the batches it has and, where this stage is the
    /// whole ring, for every sequence it holds: their owners send their
    /// next jobs within a millisecond or so, and without this wait two
    /// halves of the running sequences would take turns for ever, each
    /// step reading the weights for half of them. (In a ring of several
    /// stages the sequences not here are other micro-batches, on other
    /// stages: they are not waited for.)
    fn gather(&mut self, cap: usize) {
        self.drain();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(BATCH_GATHER_LIMIT_MS);
        while self.forwards() < cap && (self.missing() > 0 || self.micro_batches == 1) {
            let Some(timer) = &self.timer else {
                return;
            };
            let jobs = &mut self.jobs;
            // The timeout is made inside the timer's runtime: it needs
            // its clock.
            let received =
                timer.block_on(async { tokio::time::timeout_at(deadline, jobs.recv()).await });
            match received {
                Ok(Some(job)) => {
                    self.push(job);
                    self.drain();
                }
                Ok(None) | Err(_) => return, // closed, or waited long enough
            }
        }
    }

    /// Takes the jobs of the next step from the front of the queue, in
    /// order: forward jobs up to `cap` sequences and the token budget (a
    /// replay, run token by token, goes alone); a release of a sequence
    /// not in the step is done at once, one of a sequence in it ends the
    /// step (its job runs first).
    fn take(
        &mut self,
        cap: usize,
        shard: &mut Shard,
        samplers: &mut HashMap<SequenceId, Sampler>,
    ) -> Vec<Taken<R>> {
        let mut batch: Vec<Taken<R>> = Vec::new();
        let mut tokens = 0;
        while let Some(front) = self.pending.front() {
            let n = match front {
                StageJob::Release { sequence } => {
                    let sequence = *sequence;
                    if batch.iter().any(|t| t.job.sequence == sequence) {
                        break;
                    }
                    self.pending.pop_front();
                    shard.release(sequence);
                    samplers.remove(&sequence);
                    continue;
                }
                StageJob::Forward {
                    sequence,
                    input,
                    token_by_token,
                    ..
                } => {
                    let n = input.len();
                    let full = batch.len() >= cap || tokens + n > STEP_TOKEN_BUDGET;
                    let alone = *token_by_token || batch.iter().any(|t| t.job.token_by_token);
                    let twice = batch.iter().any(|t| t.job.sequence == *sequence);
                    if !batch.is_empty() && (full || alone || twice) {
                        break;
                    }
                    n
                }
            };
            if let Some(StageJob::Forward {
                sequence,
                position,
                input,
                sample,
                token_by_token,
                route,
                sent_at,
                ..
            }) = self.pending.pop_front()
            {
                tokens += n;
                batch.push(Taken {
                    job: Job {
                        sequence,
                        position,
                        input,
                        sample,
                        token_by_token,
                    },
                    route,
                    sent_at,
                });
            }
        }
        batch
    }
}

/// The sequence id of the warm-up step: never a request's (requests
/// draw random ids; this one is released before any job runs).
const WARM_UP: SequenceId = SequenceId(u64::MAX);

/// Runs one decode-sized step before any job: the weights are read once
/// (from the page cache, or disk) before a request waits on them, and the
/// stage has a measured step time from its first job on, so even a stage
/// that hangs on its first job is judged.
fn warm_up(shard: &mut Shard, progress: &StageProgress) {
    let input = if shard.takes_tokens() {
        ShardInput::Tokens(vec![0])
    } else {
        match Tensor::zeros(
            (1, shard.config().hidden_size),
            kernels::DType::F32,
            &kernels::Device::Cpu,
        ) {
            Ok(zeros) => ShardInput::Hidden(zeros),
            Err(_) => return,
        }
    };
    progress.step_started(1, false);
    let warmed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        shard.forward(WARM_UP, 0, input).is_ok()
    }));
    progress.step_ended(1, false);
    shard.release(WARM_UP);
    if !matches!(warmed, Ok(true)) {
        tracing::warn!(range = %shard.range(), "the warm-up step failed; this stage's first steps are not judged for progress");
    }
}

fn fail<R>(
    shard: &mut Shard,
    samplers: &mut HashMap<SequenceId, Sampler>,
    sequence: SequenceId,
    route: R,
    message: String,
) -> StageOutput<R> {
    shard.release(sequence);
    samplers.remove(&sequence);
    StageOutput::Done {
        route,
        result: StageResult::Failed { sequence, message },
        ready_at: crate::unix_micros(),
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}

/// What one step gave: hidden states to pass on (with the sampling they
/// carry), or a result for the request's owner.
enum Stepped {
    Hidden(Tensor, Sample),
    Result(StageResult),
}

/// A forward job's work, without its route.
struct Job {
    sequence: SequenceId,
    position: usize,
    input: ShardInput,
    sample: Sample,
    token_by_token: bool,
}

/// Runs a step's jobs: one alone as it asks (a replay token by token),
/// several as one batch through the shard; then samples where the shard
/// gave logits. One result per job, in order.
fn step_batch(
    shard: &mut Shard,
    grammars: &Grammars,
    samplers: &mut HashMap<SequenceId, Sampler>,
    mut jobs: Vec<Job>,
) -> Vec<Result<Stepped, String>> {
    let range = shard.range();
    if jobs.len() == 1
        && jobs[0].token_by_token
        && let Some(job) = jobs.pop()
    {
        let output = forward_token_by_token(shard, job.sequence, job.position, job.input);
        return vec![
            output.and_then(|o| finish(range, grammars, samplers, job.sequence, job.sample, o)),
        ];
    }
    let (steps, rest): (Vec<SequenceStep>, Vec<(SequenceId, Sample)>) = jobs
        .into_iter()
        .map(|job| {
            let step = SequenceStep {
                sequence: job.sequence,
                position: job.position,
                input: job.input,
            };
            (step, (job.sequence, job.sample))
        })
        .unzip();
    shard
        .forward_batch(steps)
        .into_iter()
        .zip(rest)
        .map(|(output, (sequence, sample))| {
            let output = output.map_err(|e| e.to_string())?;
            finish(range, grammars, samplers, sequence, sample, output)
        })
        .collect()
}

/// What a sequence's step gives, from the shard's output: hidden states
/// to pass on, or (from the last stage) a token sampled from the logits.
fn finish(
    range: LayerRange,
    grammars: &Grammars,
    samplers: &mut HashMap<SequenceId, Sampler>,
    sequence: SequenceId,
    sample: Sample,
    output: ShardOutput,
) -> Result<Stepped, String> {
    let logits = match output {
        ShardOutput::Hidden(hidden) => return Ok(Stepped::Hidden(hidden, sample)),
        ShardOutput::Logits(logits) => logits,
    };
    let sampler = match sample {
        Sample::No => return Ok(Stepped::Result(StageResult::ChunkDone { sequence })),
        Sample::Start {
            params,
            drawn,
            prompt,
            generated,
        } => {
            let mut sampler =
                Sampler::resume(&params, drawn, &prompt, &generated).map_err(|e| e.to_string())?;
            if let Some(constraint) = &params.constraint {
                let matcher = grammars.matcher(constraint).map_err(|e| e.to_string())?;
                sampler = sampler
                    .constrain(matcher, &generated)
                    .map_err(|e| e.to_string())?;
            }
            samplers.entry(sequence).insert_entry(sampler).into_mut()
        }
        Sample::Continue => samplers
            .get_mut(&sequence)
            .ok_or_else(|| format!("sequence {sequence} has no sampler on stage {range}"))?,
    };
    let sampled = sampler.sample(&logits).map_err(|e| e.to_string())?;
    Ok(Stepped::Result(StageResult::Token {
        sequence,
        token: sampled.token,
        logprobs: sampled.logprobs,
        batch: None,
    }))
}

/// Runs each token of `input` as a one-token step, as decoding ran them:
/// the hidden states of all of them (for the next stage), or the logits
/// after the last.
fn forward_token_by_token(
    shard: &mut Shard,
    sequence: SequenceId,
    position: usize,
    input: ShardInput,
) -> Result<ShardOutput, String> {
    let rows: Vec<ShardInput> = match input {
        ShardInput::Tokens(tokens) => tokens
            .into_iter()
            .map(|t| ShardInput::Tokens(vec![t]))
            .collect(),
        ShardInput::Hidden(hidden) => {
            let n = hidden.dim(0).map_err(|e| e.to_string())?;
            (0..n)
                .map(|i| hidden.narrow(0, i, 1).map(ShardInput::Hidden))
                .collect::<Result<_, _>>()
                .map_err(|e| e.to_string())?
        }
    };
    let mut hidden = Vec::with_capacity(rows.len());
    let mut last = None;
    for (i, row) in rows.into_iter().enumerate() {
        match shard
            .forward(sequence, position + i, row)
            .map_err(|e| e.to_string())?
        {
            ShardOutput::Hidden(h) => hidden.push(h),
            logits @ ShardOutput::Logits(_) => last = Some(logits),
        }
    }
    if let Some(logits) = last {
        return Ok(logits);
    }
    Tensor::cat(&hidden, 0)
        .map(ShardOutput::Hidden)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stage whose clock started `ago` before now.
    fn progress_started(ago: Duration) -> StageProgress {
        let mut progress = StageProgress::new();
        progress.base = Instant::now().checked_sub(ago).expect("a time in the past");
        progress
    }

    #[test]
    fn a_step_far_slower_than_its_measure_stalls_and_a_long_prefill_does_not() {
        let ago = Duration::from_secs(10);
        // Nothing measured yet: not judged.
        let unmeasured = progress_started(ago);
        unmeasured.busy_since.store(1, Ordering::Release);
        assert_eq!(unmeasured.stalled(), None);

        // A decode step of 1 ms running for 10 s: stalled.
        let decode = progress_started(ago);
        decode.decode_micros.store(1_000, Ordering::Relaxed);
        decode.busy_tokens.store(1, Ordering::Relaxed);
        decode.busy_since.store(1, Ordering::Release);
        assert!(decode.stalled().is_some_and(|why| why.contains("1 tokens")));

        // A 512-token prompt chunk at 10 ms a token, 10 s in: on time.
        let prefill = progress_started(ago);
        prefill.decode_micros.store(20_000, Ordering::Relaxed);
        prefill
            .prefill_token_micros
            .store(10_000, Ordering::Relaxed);
        prefill.busy_tokens.store(512, Ordering::Relaxed);
        prefill.busy_since.store(1, Ordering::Release);
        assert_eq!(prefill.stalled(), None);

        // A frozen process restarts the clock of its running step.
        decode.restart_clock();
        assert_eq!(decode.stalled(), None);

        // A thread that ended is lost, busy or not.
        let ended = StageProgress::new();
        ended.ended.store(1, Ordering::Release);
        assert!(ended.stalled().is_some());
    }

    #[test]
    fn step_times_are_measured_per_token_and_by_kind() {
        let progress = StageProgress::new();
        progress.step_started(1, false);
        progress.step_ended(1, false);
        assert!(progress.decode_micros.load(Ordering::Relaxed) >= 1);
        assert_eq!(progress.prefill_token_micros.load(Ordering::Relaxed), 0);
        progress.step_started(64, false);
        progress.step_ended(64, false);
        assert!(progress.prefill_token_micros.load(Ordering::Relaxed) >= 1);
        assert_eq!(progress.busy_since.load(Ordering::Relaxed), 0, "idle");
    }
}
