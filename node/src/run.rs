//! `ringlet run`: one answer in the terminal, streamed to stdout.

use std::io::{Read, Write};
use std::time::Instant;

use anyhow::{Context, bail};
use kernels::{ChatMessage, SamplingParams, SequenceId};
use rand::Rng;

use crate::cli::RunArgs;
use crate::engine::{Engine, GenerationRequest, decode_rate};
use crate::loaded_model::LoadedModel;
use crate::text::{TextEvent, TextStream};

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let prompt = if args.prompt == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read the prompt from standard input")?;
        text
    } else {
        args.prompt.clone()
    };
    if prompt.trim().is_empty() {
        bail!("the prompt is empty; pass --prompt \"your question\"");
    }
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: args.seed.unwrap_or_else(|| rand::rng().random()),
        ..SamplingParams::default()
    };
    sampling.validate()?;

    let runtime = args.runtime.resolve()?;
    let model = LoadedModel::load_whole(&runtime, &args.model).await?;
    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(ChatMessage::new("system", system.clone()));
    }
    messages.push(ChatMessage::new("user", prompt));
    let prompt_ids = model.prompt.tokens(&messages)?;
    let tokenizer = model.prompt.tokenizer().clone();
    let engine = Engine::start_local(
        model.shard,
        &model.prompt,
        runtime.kv_cache_bytes,
        runtime.prefill_chunk_tokens,
    )?;

    let started = Instant::now();
    let generation = engine.handle.submit(GenerationRequest {
        id: SequenceId(rand::rng().random()),
        prompt: prompt_ids.clone(),
        max_tokens: args.max_tokens,
        sampling,
        ignore_eos: false,
    })?;
    let mut stream = TextStream::new(generation, tokenizer, Vec::new(), prompt_ids.len());
    let mut stdout = std::io::stdout().lock();
    let mut first_token_at = None;
    loop {
        match stream.next().await {
            Some(TextEvent::Delta { text: piece, .. }) => {
                first_token_at.get_or_insert_with(Instant::now);
                stdout
                    .write_all(piece.as_bytes())
                    .context("cannot write to stdout")?;
                stdout.flush().context("cannot write to stdout")?;
            }
            Some(TextEvent::Finished {
                completion_tokens,
                reason,
                ..
            }) => {
                writeln!(stdout).context("cannot write to stdout")?;
                let first = first_token_at.unwrap_or_else(Instant::now);
                let rate = decode_rate(completion_tokens, first.elapsed().as_secs_f64());
                eprintln!(
                    "[{completion_tokens} tokens, first after {} ms, {rate:.1} tok/s, finished: {reason:?}]",
                    (first - started).as_millis()
                );
                break;
            }
            Some(TextEvent::Failed(message)) => bail!("generation failed: {message}"),
            None => bail!("generation ended without a result"),
        }
    }
    drop(stream);
    tokio::task::spawn_blocking(move || engine.shutdown())
        .await
        .ok();
    Ok(())
}
