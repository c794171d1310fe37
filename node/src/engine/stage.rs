//! A stage: one shard of the model on its own thread, fed jobs in order.
//!
//! The stage that holds the model's last layer also samples: it keeps one
//! [`Sampler`] per sequence, so a token, not a vocabulary of logits, is what
//! leaves it. Where its output goes (the next stage, the request's owner,
//! near or far) is the caller's business: the stage hands every output to
//! the `emit` function it was started with.

use std::collections::HashMap;
use std::thread::JoinHandle;

use kernels::{
    LayerRange, Sampler, SamplingParams, SequenceId, Shard, ShardInput, ShardOutput, Tensor,
};
use tokio::sync::mpsc;

/// Whether the last stage samples after this job, and with what.
#[derive(Debug, Clone, PartialEq)]
pub enum Sample {
    /// A prompt chunk that is not the last: fill the KV cache only.
    No,
    /// The first token of a sequence: create its sampler.
    Start(SamplingParams),
    /// A later token: use the sequence's sampler.
    Continue,
}

/// Where a job belongs: which node owns the request, under which plan,
/// and which stage of that plan the job is for. Opaque to the stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Route {
    pub owner: u64,
    pub epoch: u64,
    pub stage: u32,
}

/// Work for a stage.
#[derive(Debug)]
pub enum StageJob {
    /// Run the shard over tokens `position..position + n` of `sequence`.
    Forward {
        sequence: SequenceId,
        position: usize,
        input: ShardInput,
        sample: Sample,
        route: Route,
    },
    /// Forget `sequence`: free its KV cache and sampler.
    Release { sequence: SequenceId },
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

/// What leaves a stage.
#[derive(Debug)]
pub enum StageOutput {
    /// Hidden states for the next stage (`route.stage` is already the
    /// next stage's index).
    Next {
        sequence: SequenceId,
        position: usize,
        hidden: Tensor,
        sample: Sample,
        route: Route,
    },
    /// A result for the owner named in `route`.
    Done { route: Route, result: StageResult },
}

/// Starts a thread that runs `shard` over the jobs it receives until the
/// job channel closes or `emit` returns false (its receiver is gone).
pub fn spawn(
    shard: Shard,
    jobs: mpsc::Receiver<StageJob>,
    emit: impl FnMut(StageOutput) -> bool + Send + 'static,
) -> std::io::Result<JoinHandle<()>> {
    let name = format!("ringlet-stage-{}", shard.range());
    std::thread::Builder::new()
        .name(name)
        .spawn(move || run(shard, jobs, emit))
}

fn run(
    mut shard: Shard,
    mut jobs: mpsc::Receiver<StageJob>,
    mut emit: impl FnMut(StageOutput) -> bool,
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
            step(
                &mut shard,
                &mut samplers,
                sequence,
                position,
                input,
                sample,
                route,
            )
        }));
        let output = match stepped {
            Ok(Ok(output)) => output,
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

fn fail(
    shard: &mut Shard,
    samplers: &mut HashMap<SequenceId, Sampler>,
    sequence: SequenceId,
    route: Route,
    message: String,
) -> StageOutput {
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

fn step(
    shard: &mut Shard,
    samplers: &mut HashMap<SequenceId, Sampler>,
    sequence: SequenceId,
    position: usize,
    input: ShardInput,
    sample: Sample,
    route: Route,
) -> Result<StageOutput, String> {
    let range: LayerRange = shard.range();
    let logits = match shard
        .forward(sequence, position, input)
        .map_err(|e| e.to_string())?
    {
        ShardOutput::Hidden(hidden) => {
            let next = Route {
                stage: route.stage + 1,
                ..route
            };
            return Ok(StageOutput::Next {
                sequence,
                position,
                hidden,
                sample,
                route: next,
            });
        }
        ShardOutput::Logits(logits) => logits,
    };
    let sampler = match sample {
        Sample::No => {
            return Ok(StageOutput::Done {
                route,
                result: StageResult::ChunkDone { sequence },
            });
        }
        Sample::Start(params) => {
            let sampler = Sampler::new(&params).map_err(|e| e.to_string())?;
            samplers.entry(sequence).insert_entry(sampler).into_mut()
        }
        Sample::Continue => samplers
            .get_mut(&sequence)
            .ok_or_else(|| format!("sequence {sequence} has no sampler on stage {range}"))?,
    };
    let token = sampler.sample(&logits).map_err(|e| e.to_string())?;
    Ok(StageOutput::Done {
        route,
        result: StageResult::Token { sequence, token },
    })
}
