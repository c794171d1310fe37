//! `ringlet run`: one answer in the terminal, streamed to stdout.

use std::io::{Read, Write};
use std::time::Instant;

use anyhow::{Context, bail};
use kernels::{ChatMessage, SamplingParams, SequenceId};
use rand::Rng;

use crate::cli::RunArgs;
use crate::engine::{Engine, GenerationRequest};
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
    };
    sampling.validate()?;

    let runtime = args.runtime.resolve()?;
    let model = LoadedModel::load_whole(&runtime, &args.model).await?;
    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(ChatMessage::new("system", system.clone()));
    }
    messages.push(ChatMessage::new("user", prompt));
    let text = model.template.render(&messages, true)?;
    let prompt_ids = model.tokenizer.encode(&text)?;
    let context_length = model.file.config().context_length;
    if prompt_ids.len() >= context_length {
        bail!(
            "the prompt is {} tokens; this model's context holds {context_length}",
            prompt_ids.len()
        );
    }
    let tokenizer = model.tokenizer.clone();
    let engine = Engine::start_local(model.shard, tokenizer.stop_tokens().clone())?;

    let started = Instant::now();
    let events = engine.handle.submit(GenerationRequest {
        id: SequenceId(rand::rng().random()),
        prompt: prompt_ids.clone(),
        max_tokens: args.max_tokens,
        sampling,
        ignore_eos: false,
    })?;
    let mut stream = TextStream::new(events, tokenizer, Vec::new(), prompt_ids.len());
    let mut stdout = std::io::stdout().lock();
    let mut first_token_at = None;
    loop {
        match stream.next().await {
            Some(TextEvent::Delta(piece)) => {
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
                let decode_seconds = first.elapsed().as_secs_f64();
                let rate = if decode_seconds > 0.0 {
                    completion_tokens.saturating_sub(1) as f64 / decode_seconds
                } else {
                    0.0
                };
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
