//! Times one shard's batched decode step for several batch sizes: the
//! kernel-level ceiling of continuous batching on this host, without the
//! node's scheduling around it. For developers; the product's benchmarks
//! are `ringlet bench`.
//!
//! ```text
//! cargo run --release -p ringlet-kernels --example batch_step -- MODEL.gguf [BATCHES] [STEPS] [THREADS] [PROMPT_TOKENS]
//! ```
//! `BATCHES` is a comma-separated list (default 1,2,4,8,16), `STEPS` the
//! decode steps timed per batch size (default 64), `THREADS` the compute
//! pool's size (default 2), `PROMPT_TOKENS` the prompt's length before the
//! steps (default: one short sentence; `ringlet bench ring`'s chat prompt
//! is about 90). Prints, per batch size, the fastest step's time,
//! the tokens per second it gives and its ratio to one sequence, then
//! where the time of the steps went.

use std::time::Instant;

use kernels::{Device, LayerRange, ModelFile, SequenceId, SequenceStep, ShardInput, ShardOutput};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or("usage: batch_step MODEL.gguf [BATCHES] [STEPS] [THREADS] [PROMPT_TOKENS]")?;
    let batches: Vec<usize> = args
        .next()
        .unwrap_or_else(|| "1,2,4,8,16".into())
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let steps: usize = args.next().map_or(Ok(64), |s| s.parse())?;
    let threads: usize = args.next().map_or(Ok(2), |s| s.parse())?;
    let prompt_tokens: usize = args.next().map_or(Ok(0), |s| s.parse())?;
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()?;
    let model = ModelFile::open(&path)?;
    let n_layers = model.config().n_layers;
    let mut shard = model.load_shard(LayerRange::new(0, n_layers), &Device::Cpu)?;
    let mut prompt = model
        .tokenizer()?
        .encode("The history of computing is a story of")?;
    // A longer prompt, for contexts like a chat's: the sentence repeated.
    let sentence = prompt.clone();
    while prompt.len() < prompt_tokens {
        prompt.extend_from_slice(&sentence);
    }
    prompt.truncate(prompt_tokens.max(sentence.len()));
    println!("{path}: {threads} threads, {steps} steps per batch size");
    println!(
        "batch | step ms (fastest) | tok/s | vs 1 | median step | slowest step, cached tokens"
    );
    let mut one = None;
    for (round, &n) in batches.iter().enumerate() {
        let ids: Vec<SequenceId> = (0..n)
            .map(|i| SequenceId((round * 1000 + i) as u64))
            .collect();
        let mut next: Vec<u32> = Vec::with_capacity(n);
        for &id in &ids {
            let output = shard.forward(id, 0, ShardInput::Tokens(prompt.clone()))?;
            next.push(argmax(output)?);
        }
        let mut times = Vec::with_capacity(steps);
        kernels::profile::take();
        kernels::profile::set_enabled(true);
        for step in 0..steps {
            let batch = ids
                .iter()
                .zip(&next)
                .map(|(&sequence, &token)| SequenceStep {
                    sequence,
                    position: prompt.len() + step,
                    input: ShardInput::Tokens(vec![token]),
                })
                .collect();
            let started = Instant::now();
            let outputs = shard.forward_batch(batch);
            times.push(started.elapsed().as_secs_f64());
            for (token, output) in next.iter_mut().zip(outputs) {
                *token = argmax(output?)?;
            }
        }
        kernels::profile::set_enabled(false);
        let profile = kernels::profile::take();
        for &id in &ids {
            shard.release(id);
        }
        // The slowest step, and the context it ran at: where a step does
        // more than the others (a cache that grows), it shows here.
        let (slowest_step, slowest) = times
            .iter()
            .copied()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap_or_default();
        times.sort_by(f64::total_cmp);
        // The fastest step: on a shared host it is the least disturbed.
        let fastest = times[0];
        let median = times[times.len() / 2];
        let rate = n as f64 / fastest;
        let base = *one.get_or_insert(rate);
        println!(
            "{n:5} | {:17.2} | {rate:5.0} | {:.2} | median {:.2} ms, {:.0} tok/s | {:.2} ms at {} tokens",
            fastest * 1e3,
            rate / base,
            median * 1e3,
            n as f64 / median,
            slowest * 1e3,
            prompt.len() + slowest_step,
        );
        for (op, nanos, calls) in profile {
            if calls > 0 {
                println!(
                    "        {:48} {:8.3} ms/step",
                    op.name(),
                    nanos as f64 / 1e6 / steps as f64
                );
            }
        }
    }
    Ok(())
}

fn argmax(output: ShardOutput) -> Result<u32, Box<dyn std::error::Error>> {
    let ShardOutput::Logits(logits) = output else {
        return Err("the whole model gave hidden states".into());
    };
    let values: Vec<f32> = logits.to_vec1()?;
    let (best, _) = values
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv { (i, v) } else { (bi, bv) }
        });
    Ok(best as u32)
}
