//! A stage: one shard of the model on its own thread, fed jobs in order.
//!
//! The stage that holds the model's last layer also samples: it keeps one
//! [`Sampler`] per sequence, so a token, not a vocabulary of logits, is what
//! leaves it. Where its output goes (the next stage, the request's owner,
//! near or far) is the business of whoever runs the stage: the engine for a
//! model held whole in this process, the cluster in serve mode. Each job
//! carries that owner's route (`R`), which the stage hands back untouched
//! with the job's output, through the `emit` function it was started with.

use std::collections::HashMap;
use std::thread::JoinHandle;

use kernels::{
    LayerRange, Sampler, SamplingParams, SequenceId, Shard, ShardInput, ShardOutput, Tensor,
};
use tokio::sync::mpsc;

/// Whether the last stage samples after this job, and with what. Also part
/// of the link protocol (`ForwardFrame`): changing it changes
/// `PROTOCOL_VERSION`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Sample {
    /// A prompt chunk that is not the last: fill the KV cache only.
    No,
    /// The first token of a sequence: create its sampler.
    Start(SamplingParams),
    /// A later token: use the sequence's sampler.
    Continue,
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
        route: R,
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
    },
    /// A prompt chunk went through every layer; send the next.
    ChunkDone {
        sequence: SequenceId,
    },
    Failed {
        sequence: SequenceId,
        message: String,
    },
}

impl StageResult {
    pub fn sequence(&self) -> SequenceId {
        match self {
            StageResult::Token { sequence, .. }
            | StageResult::ChunkDone { sequence }
            | StageResult::Failed { sequence, .. } => *sequence,
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
        route: R,
    },
    /// A result for the request's owner.
    Done { route: R, result: StageResult },
}

/// Starts a thread that runs `shard` over the jobs it receives until the
/// job channel closes or `emit` returns false (its receiver is gone).
pub fn spawn<R: Send + 'static>(
    shard: Shard,
    jobs: mpsc::Receiver<StageJob<R>>,
    emit: impl FnMut(StageOutput<R>) -> bool + Send + 'static,
) -> std::io::Result<JoinHandle<()>> {
    let name = format!("ringlet-stage-{}", shard.range());
    std::thread::Builder::new()
        .name(name)
        .spawn(move || run(shard, jobs, emit))
}

fn run<R>(
    mut shard: Shard,
    mut jobs: mpsc::Receiver<StageJob<R>>,
    mut emit: impl FnMut(StageOutput<R>) -> bool,
) {
    let mut samplers: HashMap<SequenceId, Sampler> = HashMap::new();
    while let Some(job) = jobs.blocking_recv() {
        let (sequence, position, input, sample, route) = match job {
            StageJob::Release { sequence } => {
                shard.release(sequence);
                samplers.remove(&sequence);
                continue;
            }
            StageJob::Forward {
                sequence,
                position,
                input,
                sample,
                route,
            } => (sequence, position, input, sample, route),
        };
        // A panic here is a bug; it fails this request, not the node.
        let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            step(&mut shard, &mut samplers, sequence, position, input, sample)
        }));
        let output = match stepped {
            Ok(Ok(Stepped::Hidden(hidden, sample))) => StageOutput::Next {
                sequence,
                position,
                hidden,
                sample,
                route,
            },
            Ok(Ok(Stepped::Result(result))) => StageOutput::Done { route, result },
            Ok(Err(message)) => fail(&mut shard, &mut samplers, sequence, route, message),
            Err(panic) => {
                let message = format!(
                    "internal error in stage {}: {}",
                    shard.range(),
                    panic_message(panic.as_ref())
                );
                tracing::error!(%message, "a stage step panicked");
                fail(&mut shard, &mut samplers, sequence, route, message)
            }
        };
        if !emit(output) {
            break; // nobody listens: the node is shutting down
        }
    }
    tracing::debug!(range = %shard.range(), "stage stopped");
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

fn step(
    shard: &mut Shard,
    samplers: &mut HashMap<SequenceId, Sampler>,
    sequence: SequenceId,
    position: usize,
    input: ShardInput,
    sample: Sample,
) -> Result<Stepped, String> {
    let range: LayerRange = shard.range();
    let logits = match shard
        .forward(sequence, position, input)
        .map_err(|e| e.to_string())?
    {
        ShardOutput::Hidden(hidden) => return Ok(Stepped::Hidden(hidden, sample)),
        ShardOutput::Logits(logits) => logits,
    };
    let sampler = match sample {
        Sample::No => return Ok(Stepped::Result(StageResult::ChunkDone { sequence })),
        Sample::Start(params) => {
            let sampler = Sampler::new(&params).map_err(|e| e.to_string())?;
            samplers.entry(sequence).insert_entry(sampler).into_mut()
        }
        Sample::Continue => samplers
            .get_mut(&sequence)
            .ok_or_else(|| format!("sequence {sequence} has no sampler on stage {range}"))?,
    };
    let token = sampler.sample(&logits).map_err(|e| e.to_string())?;
    Ok(Stepped::Result(StageResult::Token { sequence, token }))
}
