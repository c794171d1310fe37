//! A stage: one shard of the model on its own thread, fed jobs in order.
//!
//! The stage that holds the model's last layer also samples: it keeps one
//! [`Sampler`] per sequence, so a token, not a vocabulary of logits, is what
//! leaves it.

use std::collections::HashMap;
use std::thread::JoinHandle;

use kernels::{Sampler, SamplingParams, SequenceId, Shard, ShardInput, ShardOutput};
use tokio::sync::mpsc;

/// Whether the last stage samples after this job, and with what.
#[derive(Debug, Clone)]
pub enum Sample {
    /// A prompt chunk that is not the last: fill the KV cache only.
    No,
    /// The first token of a sequence: create its sampler.
    Start(SamplingParams),
    /// A later token: use the sequence's sampler.
    Continue,
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
    },
    /// Forget `sequence`: free its KV cache and sampler.
    Release { sequence: SequenceId },
}

/// What the last stage reports back to the coordinator.
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

/// Starts a thread that runs `shard` over the jobs it receives until the
/// job channel closes.
pub fn spawn(
    shard: Shard,
    jobs: mpsc::Receiver<StageJob>,
    results: mpsc::Sender<StageResult>,
) -> std::io::Result<JoinHandle<()>> {
    let name = format!("ringlet-stage-{}", shard.range());
    std::thread::Builder::new()
        .name(name)
        .spawn(move || run(shard, jobs, results))
}

fn run(mut shard: Shard, mut jobs: mpsc::Receiver<StageJob>, results: mpsc::Sender<StageResult>) {
    let mut samplers: HashMap<SequenceId, Sampler> = HashMap::new();
    while let Some(job) = jobs.blocking_recv() {
        let (sequence, position, input, sample) = match job {
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
            } => (sequence, position, input, sample),
        };
        // A panic here is a bug; it fails this request, not the node.
        let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            step(&mut shard, &mut samplers, sequence, position, input, sample)
        }));
        let result = match stepped {
            Ok(Ok(result)) => result,
            Ok(Err(message)) => fail(&mut shard, &mut samplers, sequence, message),
            Err(panic) => {
                let message = format!(
                    "internal error in stage {}: {}",
                    shard.range(),
                    panic_message(panic.as_ref())
                );
                tracing::error!(%message, "a stage step panicked");
                fail(&mut shard, &mut samplers, sequence, message)
            }
        };
        if results.blocking_send(result).is_err() {
            break; // the coordinator is gone: the node is shutting down
        }
    }
    tracing::debug!(range = %shard.range(), "stage stopped");
}

fn fail(
    shard: &mut Shard,
    samplers: &mut HashMap<SequenceId, Sampler>,
    sequence: SequenceId,
    message: String,
) -> StageResult {
    shard.release(sequence);
    samplers.remove(&sequence);
    StageResult::Failed { sequence, message }
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
) -> Result<StageResult, String> {
    let output = shard
        .forward(sequence, position, input)
        .map_err(|e| e.to_string())?;
    let ShardOutput::Logits(logits) = output else {
        return Err(format!(
            "stage {} produced hidden states but has no next stage",
            shard.range()
        ));
    };
    let sampler = match sample {
        Sample::No => return Ok(StageResult::ChunkDone { sequence }),
        Sample::Start(params) => {
            let sampler = Sampler::new(&params).map_err(|e| e.to_string())?;
            samplers.entry(sequence).insert_entry(sampler).into_mut()
        }
        Sample::Continue => samplers
            .get_mut(&sequence)
            .ok_or_else(|| format!("sequence {sequence} has no sampler on this stage"))?,
    };
    let token = sampler.sample(&logits).map_err(|e| e.to_string())?;
    Ok(StageResult::Token { sequence, token })
}
