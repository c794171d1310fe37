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
//! The coordinator runs on its own thread with its own small runtime, so the
//! engine outlives any one caller's runtime (tests share one engine).

pub mod stage;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use kernels::{LayerRange, SamplingParams, SequenceId, Shard, ShardInput};
use serde::Serialize;
use tokio::sync::{mpsc, watch};

use crate::limits::{ENGINE_QUEUE_LEN, MAX_ACTIVE_SEQUENCES, PREFILL_CHUNK_TOKENS};
use stage::{Sample, StageJob, StageResult};

/// One generation, as the API layer hands it over.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    /// Identifies the request in logs and in the KV caches of every stage.
    pub id: SequenceId,
    pub prompt: Vec<u32>,
    /// Most tokens to generate; clamped to what the context has left.
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Keep going past end-of-generation tokens (benchmarks).
    pub ignore_eos: bool,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model ended its turn (or, in the API layer, a stop sequence).
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
}

/// What the engine tells a request's owner, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerationEvent {
    Token(u32),
    Finished {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed {
        message: String,
    },
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
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    #[error("the server is busy: {queued} requests are already waiting; retry shortly")]
    Busy { queued: usize },
    #[error("the inference engine has stopped")]
    Stopped,
}

/// What a caller needs to know about the model the engine serves.
#[derive(Debug, Clone)]
pub struct EngineModel {
    pub context_length: usize,
    pub stop_tokens: BTreeSet<u32>,
    pub layers: LayerRange,
    pub weight_bytes: u64,
}

struct Submission {
    request: GenerationRequest,
    events: mpsc::Sender<GenerationEvent>,
}

/// A cheap, cloneable handle to a running engine.
#[derive(Clone)]
pub struct EngineHandle {
    submissions: mpsc::Sender<Submission>,
    stats: watch::Receiver<EngineStats>,
    model: Arc<EngineModel>,
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle")
            .field("model", &self.model)
            .finish()
    }
}

impl EngineHandle {
    pub fn model(&self) -> &EngineModel {
        &self.model
    }

    /// Current counters; `changed()` on the receiver waits for the next update.
    pub fn stats(&self) -> watch::Receiver<EngineStats> {
        self.stats.clone()
    }

    /// Queues a generation. Events arrive on the returned receiver; dropping
    /// it cancels the generation at its next step.
    pub fn submit(
        &self,
        mut request: GenerationRequest,
    ) -> Result<mpsc::Receiver<GenerationEvent>, SubmitError> {
        let room = self
            .model
            .context_length
            .saturating_sub(request.prompt.len());
        request.max_tokens = request.max_tokens.min(room);
        // One slot per possible token plus the final event, so the engine
        // never waits on a slow reader: the bound is the context length.
        let (events, receiver) = mpsc::channel(request.max_tokens + 2);
        self.submissions
            .try_send(Submission { request, events })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => SubmitError::Busy {
                    queued: ENGINE_QUEUE_LEN,
                },
                mpsc::error::TrySendError::Closed(_) => SubmitError::Stopped,
            })?;
        Ok(receiver)
    }
}

/// The threads of a running engine. Dropping every [`EngineHandle`] stops it.
pub struct Engine {
    pub handle: EngineHandle,
    threads: Vec<JoinHandle<()>>,
}

impl Engine {
    /// Starts an engine serving the whole model from one local shard.
    pub fn start_local(shard: Shard, stop_tokens: BTreeSet<u32>) -> std::io::Result<Self> {
        let config = shard.config();
        let model = Arc::new(EngineModel {
            context_length: config.context_length,
            stop_tokens,
            layers: shard.range(),
            weight_bytes: shard.weight_bytes(),
        });
        let (job_tx, job_rx) = mpsc::channel(2 * MAX_ACTIVE_SEQUENCES);
        let (result_tx, result_rx) = mpsc::channel(2 * MAX_ACTIVE_SEQUENCES);
        let (submission_tx, submission_rx) = mpsc::channel(ENGINE_QUEUE_LEN);
        let (stats_tx, stats_rx) = watch::channel(EngineStats::default());

        let stage_thread = stage::spawn(shard, job_rx, result_tx)?;
        let coordinator = Coordinator {
            model: Arc::clone(&model),
            submissions: submission_rx,
            results: result_rx,
            first_stage: job_tx,
            active: HashMap::new(),
            stats: stats_tx,
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
        Ok(Self {
            handle: EngineHandle {
                submissions: submission_tx,
                stats: stats_rx,
                model,
            },
            threads: vec![stage_thread, coordinator_thread],
        })
    }

    /// Stops accepting work and waits for the engine's threads to end.
    pub fn shutdown(self) {
        drop(self.handle);
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

struct ActiveRequest {
    request: GenerationRequest,
    events: mpsc::Sender<GenerationEvent>,
    /// Tokens the stages have been given so far (prompt, then generated).
    fed: usize,
    generated: usize,
    started: Instant,
    first_token_at: Option<Instant>,
}

struct Coordinator {
    model: Arc<EngineModel>,
    submissions: mpsc::Receiver<Submission>,
    results: mpsc::Receiver<StageResult>,
    first_stage: mpsc::Sender<StageJob>,
    active: HashMap<SequenceId, ActiveRequest>,
    stats: watch::Sender<EngineStats>,
}

impl Coordinator {
    async fn run(mut self) {
        loop {
            let room = self.active.len() < MAX_ACTIVE_SEQUENCES;
            tokio::select! {
                // Results first: finishing work frees room for new work.
                biased;
                result = self.results.recv() => match result {
                    Some(result) => self.on_result(result).await,
                    None => break, // the stage stopped
                },
                submission = self.submissions.recv(), if room => match submission {
                    Some(submission) => self.admit(submission).await,
                    None if self.active.is_empty() => break, // every handle dropped
                    None => {}
                },
            }
        }
        tracing::debug!("coordinator stopped");
    }

    async fn admit(&mut self, Submission { request, events }: Submission) {
        if events.is_closed() {
            self.stats.send_modify(|s| s.cancelled += 1);
            return; // the client left while queued
        }
        let id = request.id;
        if request.prompt.is_empty() || request.max_tokens == 0 {
            let _ = events.try_send(GenerationEvent::Finished {
                reason: FinishReason::Length,
                prompt_tokens: request.prompt.len(),
                completion_tokens: 0,
            });
            return;
        }
        tracing::debug!(request = %id, prompt_tokens = request.prompt.len(), max_tokens = request.max_tokens, "generation started");
        self.active.insert(
            id,
            ActiveRequest {
                request,
                events,
                fed: 0,
                generated: 0,
                started: Instant::now(),
                first_token_at: None,
            },
        );
        self.publish_active();
        self.feed_prompt_chunk(id).await;
    }

    /// Sends the next chunk of the prompt; the last chunk asks for a token.
    async fn feed_prompt_chunk(&mut self, id: SequenceId) {
        let Some(active) = self.active.get_mut(&id) else {
            return;
        };
        let prompt = &active.request.prompt;
        let end = (active.fed + PREFILL_CHUNK_TOKENS).min(prompt.len());
        let chunk = prompt[active.fed..end].to_vec();
        let sample = if end == prompt.len() {
            Sample::Start(active.request.sampling.clone())
        } else {
            Sample::No
        };
        let position = active.fed;
        active.fed = end;
        self.send_job(StageJob::Forward {
            sequence: id,
            position,
            input: ShardInput::Tokens(chunk),
            sample,
        })
        .await;
    }

    async fn send_job(&mut self, job: StageJob) {
        if self.first_stage.send(job).await.is_err() {
            tracing::error!("the first stage has stopped; failing every request");
            let ids: Vec<SequenceId> = self.active.keys().copied().collect();
            for id in ids {
                self.fail(id, "the inference stage stopped".into()).await;
            }
        }
    }

    async fn on_result(&mut self, result: StageResult) {
        match result {
            StageResult::ChunkDone { sequence } => self.feed_prompt_chunk(sequence).await,
            StageResult::Token { sequence, token } => self.on_token(sequence, token).await,
            StageResult::Failed { sequence, message } => self.fail(sequence, message).await,
        }
    }

    async fn on_token(&mut self, id: SequenceId, token: u32) {
        let Some(active) = self.active.get_mut(&id) else {
            return;
        };
        active.generated += 1;
        active.first_token_at.get_or_insert_with(Instant::now);
        let is_stop = self.model.stop_tokens.contains(&token) && !active.request.ignore_eos;
        if is_stop {
            self.finish(id, FinishReason::Stop).await;
            return;
        }
        // The channel has room for every token (see `submit`), so a full
        // channel cannot happen; a closed one means the client left.
        if active
            .events
            .try_send(GenerationEvent::Token(token))
            .is_err()
        {
            self.cancel(id).await;
            return;
        }
        if active.generated >= active.request.max_tokens {
            self.finish(id, FinishReason::Length).await;
            return;
        }
        let position = active.fed;
        active.fed += 1;
        self.send_job(StageJob::Forward {
            sequence: id,
            position,
            input: ShardInput::Tokens(vec![token]),
            sample: Sample::Continue,
        })
        .await;
    }

    async fn finish(&mut self, id: SequenceId, reason: FinishReason) {
        let Some(active) = self.remove(id).await else {
            return;
        };
        let prompt_tokens = active.request.prompt.len();
        let completion_tokens = active.generated;
        let _ = active.events.try_send(GenerationEvent::Finished {
            reason,
            prompt_tokens,
            completion_tokens,
        });
        let now = Instant::now();
        let ttft = active.first_token_at.map(|t| t - active.started);
        let decode_seconds = active
            .first_token_at
            .map(|t| (now - t).as_secs_f64())
            .unwrap_or(0.0);
        let decode_tok_per_s = if decode_seconds > 0.0 {
            (completion_tokens.saturating_sub(1)) as f64 / decode_seconds
        } else {
            0.0
        };
        tracing::info!(
            request = %id,
            prompt_tokens,
            completion_tokens,
            ttft_ms = ttft.map_or(0, |d| d.as_millis() as u64),
            decode_tok_per_s = format!("{decode_tok_per_s:.1}"),
            finish = ?reason,
            "generation finished"
        );
        self.stats.send_modify(|s| {
            s.completed += 1;
            s.generated_tokens += completion_tokens as u64;
        });
    }

    async fn cancel(&mut self, id: SequenceId) {
        if let Some(active) = self.remove(id).await {
            tracing::info!(request = %id, completion_tokens = active.generated, "generation cancelled: the client went away");
            self.stats.send_modify(|s| s.cancelled += 1);
        }
    }

    async fn fail(&mut self, id: SequenceId, message: String) {
        if let Some(active) = self.remove(id).await {
            tracing::warn!(request = %id, error = %message, "generation failed");
            let _ = active.events.try_send(GenerationEvent::Failed { message });
            self.stats.send_modify(|s| s.failed += 1);
        }
    }

    /// Forgets a request here and on the stages.
    async fn remove(&mut self, id: SequenceId) -> Option<ActiveRequest> {
        let active = self.active.remove(&id)?;
        let _ = self
            .first_stage
            .send(StageJob::Release { sequence: id })
            .await;
        self.publish_active();
        Some(active)
    }

    fn publish_active(&self) {
        let active = self.active.len();
        self.stats.send_if_modified(|s| {
            let changed = s.active != active;
            s.active = active;
            changed
        });
    }
}
