//! `POST /v1/completions`: OpenAI's legacy completions, a prompt (text or
//! token ids, one or several) continued as plain text, whole or streamed,
//! with `echo`, `stop` and legacy `logprobs`. No chat template: the
//! prompt is tokenized as it is (with the model's BOS token, as llama.cpp
//! does). Several prompts run at once, one choice each.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use api_types::{
    Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, Object, PromptField, Usage,
};
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use futures_util::stream::{self, Stream};
use kernels::{SamplingParams, SequenceId, Tokenizer};
use rand::Rng;

use super::chat::{
    SamplingFields, completion_budget, parse_json, sampling_params, stop_sequences, usage,
    wait_for_plan,
};
use super::error::ApiError;
use super::{AppState, ServedModel};
use crate::engine::{FinishReason, GenerationRequest};
use crate::limits::{MAX_COMPLETION_PROMPTS, SSE_KEEP_ALIVE_SECS};
use crate::text::{TextEvent, TextStream, TokenLogprob};

/// OpenAI's default `max_tokens` for completions.
const DEFAULT_MAX_TOKENS: u64 = 16;

/// One prompt, ready for the engine.
struct PreparedPrompt {
    tokens: Vec<u32>,
    /// The prompt's text, given back first with `echo`.
    echo: Option<String>,
    max_tokens: usize,
}

/// A request that passed validation.
struct PreparedCompletion {
    model: Arc<ServedModel>,
    prompts: Vec<PreparedPrompt>,
    sampling: SamplingParams,
    stops: Vec<String>,
    stream: bool,
    include_usage: bool,
}

pub async fn completions(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: CompletionRequest = parse_json(&body?)?;
    let prepared = prepare(&state, request).await?;
    if let Some(cluster) = &state.cluster {
        wait_for_plan(cluster).await?;
    }
    let tokenizer = Arc::clone(prepared.model.prompt.tokenizer());
    let mut choices = Vec::with_capacity(prepared.prompts.len());
    for prompt in prepared.prompts {
        let prompt_tokens = prompt.tokens.len();
        // A failure here drops the streams already started, which cancels
        // their generations.
        let generation = state.engine.submit(GenerationRequest {
            id: SequenceId(rand::rng().random()),
            prompt: prompt.tokens,
            max_tokens: prompt.max_tokens,
            sampling: prepared.sampling.clone(),
            ignore_eos: false,
        })?;
        let text = TextStream::new(
            generation,
            Arc::clone(&tokenizer),
            prepared.stops.clone(),
            prompt_tokens,
        );
        choices.push((text, prompt.echo));
    }
    let meta = Meta {
        id: format!("cmpl-{}", SequenceId(rand::rng().random())),
        created: crate::unix_seconds(),
        model: prepared.model.name.clone(),
        system_fingerprint: prepared.model.system_fingerprint.clone(),
        logprobs: prepared.sampling.logprobs.is_some().then_some(tokenizer),
    };
    if prepared.stream {
        Ok(stream_response(choices, meta, prepared.include_usage).into_response())
    } else {
        collect_response(choices, meta)
            .await
            .map(IntoResponse::into_response)
    }
}

async fn prepare(
    state: &AppState,
    request: CompletionRequest,
) -> Result<PreparedCompletion, ApiError> {
    let model = state.model.get();
    if request.model != model.name {
        return Err(ApiError::ModelNotFound {
            model: request.model,
            available: vec![model.name.clone()],
        });
    }
    for (param, value) in [("n", request.n), ("best_of", request.best_of)] {
        if let Some(n) = value.filter(|&n| n != 1) {
            return Err(ApiError::invalid_param(
                param,
                format!(
                    "Only {param} = 1 is supported, got {n}; send the prompt again for more completions."
                ),
            ));
        }
    }
    if request.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid_param(
            "suffix",
            "`suffix` (text after the completion) is not supported.",
        ));
    }
    let echo = request.echo.unwrap_or(false);
    if echo && request.logprobs.is_some() {
        return Err(ApiError::invalid_param(
            "echo",
            "Log probabilities of the prompt's tokens (`echo` with `logprobs`) are not supported yet; ask for one of them.",
        ));
    }
    let requested = request.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
    if requested == 0 {
        return Err(ApiError::invalid_param(
            "max_tokens",
            "`max_tokens` must be at least 1.",
        ));
    }
    let tokenizer = Arc::clone(model.prompt.tokenizer());
    let vocab_size = tokenizer.vocab_size();
    let sampling = sampling_params(
        SamplingFields {
            temperature: request.temperature,
            top_p: request.top_p,
            top_k: request.top_k,
            seed: request.seed,
            min_p: request.min_p,
            presence_penalty: request.presence_penalty,
            frequency_penalty: request.frequency_penalty,
            repetition_penalty: request.repetition_penalty,
            logit_bias: request.logit_bias.as_ref(),
            logprobs: request
                .logprobs
                .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
        },
        vocab_size,
    )
    .map_err(|e| rename_param(e, "top_logprobs", "logprobs"))?;
    let stops = stop_sequences(request.stop)?;

    let texts = prompt_texts(request.prompt, vocab_size)?;
    let prompts = tokio::task::spawn_blocking(move || tokenize(&tokenizer, texts)).await??;
    let context = model.prompt.context_length();
    let prompts = prompts
        .into_iter()
        .map(|(tokens, text)| {
            let max_tokens =
                completion_budget(Some(("max_tokens", requested)), tokens.len(), context)?;
            Ok(PreparedPrompt {
                echo: echo.then_some(text),
                tokens,
                max_tokens,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(PreparedCompletion {
        model,
        prompts,
        sampling,
        stops,
        stream: request.stream.unwrap_or(false),
        include_usage: request
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
    })
}

/// Completions call `top_logprobs` `logprobs`: an error about the one
/// names the other.
fn rename_param(error: ApiError, from: &str, to: &str) -> ApiError {
    match error {
        ApiError::InvalidRequest {
            message,
            param: Some(param),
        } if param == from => ApiError::InvalidRequest {
            message: message.replace(&format!("`{from}`"), &format!("`{to}`")),
            param: Some(to.to_string()),
        },
        other => other,
    }
}

/// A prompt as sent: text, or token ids checked against the vocabulary.
enum PromptText {
    Text(String),
    Tokens(Vec<u32>),
}

fn prompt_texts(prompt: PromptField, vocab_size: usize) -> Result<Vec<PromptText>, ApiError> {
    let prompts: Vec<PromptText> = match prompt {
        PromptField::Text(text) => vec![PromptText::Text(text)],
        PromptField::Texts(texts) => texts.into_iter().map(PromptText::Text).collect(),
        PromptField::Tokens(tokens) => vec![PromptText::Tokens(tokens)],
        PromptField::TokenLists(lists) => lists.into_iter().map(PromptText::Tokens).collect(),
    };
    if prompts.is_empty() || prompts.len() > MAX_COMPLETION_PROMPTS {
        return Err(ApiError::invalid_param(
            "prompt",
            format!(
                "`prompt` must hold 1 to {MAX_COMPLETION_PROMPTS} prompts, got {}.",
                prompts.len()
            ),
        ));
    }
    for prompt in &prompts {
        match prompt {
            PromptText::Text(text) if text.is_empty() => {
                return Err(ApiError::invalid_param(
                    "prompt",
                    "`prompt` must not be empty.",
                ));
            }
            PromptText::Tokens(tokens) if tokens.is_empty() => {
                return Err(ApiError::invalid_param(
                    "prompt",
                    "`prompt` must not be empty.",
                ));
            }
            PromptText::Tokens(tokens) => {
                if let Some(bad) = tokens.iter().find(|&&t| t as usize >= vocab_size) {
                    return Err(ApiError::invalid_param(
                        "prompt",
                        format!(
                            "Token {bad} is not in the model's vocabulary (ids 0 to {}).",
                            vocab_size.saturating_sub(1)
                        ),
                    ));
                }
            }
            PromptText::Text(_) => {}
        }
    }
    Ok(prompts)
}

/// Each prompt's tokens and text. CPU work: runs off the async workers.
fn tokenize(
    tokenizer: &Tokenizer,
    prompts: Vec<PromptText>,
) -> Result<Vec<(Vec<u32>, String)>, ApiError> {
    prompts
        .into_iter()
        .map(|prompt| match prompt {
            PromptText::Text(text) => tokenizer
                .encode(&text)
                .map(|tokens| (tokens, text))
                .map_err(|e| ApiError::invalid_param("prompt", e.to_string())),
            PromptText::Tokens(tokens) => tokenizer
                .decode(&tokens)
                .map(|text| (tokens, text))
                .map_err(|e| ApiError::invalid_param("prompt", e.to_string())),
        })
        .collect()
}

/// What every response and chunk of one completion share.
struct Meta {
    id: String,
    created: u64,
    model: String,
    system_fingerprint: String,
    /// With log probabilities asked for, the tokenizer that names tokens.
    logprobs: Option<Arc<Tokenizer>>,
}

impl Meta {
    fn completion(
        &self,
        choices: Vec<CompletionChoice>,
        usage: Option<Option<Usage>>,
    ) -> Completion {
        Completion {
            id: self.id.clone(),
            object: Object::TextCompletion,
            created: self.created,
            model: self.model.clone(),
            system_fingerprint: self.system_fingerprint.clone(),
            choices,
            usage,
        }
    }

    /// Tokens' log probabilities in the legacy shape; `offset` is where
    /// the first token's text starts in the choice's text, in characters,
    /// and moves past these tokens.
    fn logprobs(
        &self,
        tokens: Vec<TokenLogprob>,
        offset: &mut usize,
    ) -> Option<CompletionLogprobs> {
        let tokenizer = self.logprobs.as_ref()?;
        let mut out = CompletionLogprobs::default();
        for token in tokens {
            let text = tokenizer.token_text(token.token);
            out.text_offset.push(*offset);
            *offset += text.chars().count();
            out.token_logprobs
                .push(Some(f64::from(token.logprobs.logprob)));
            let top: BTreeMap<String, f64> = token
                .logprobs
                .top
                .iter()
                .map(|&(id, logprob)| (tokenizer.token_text(id), f64::from(logprob)))
                .collect();
            out.top_logprobs.push(Some(top));
            out.tokens.push(text);
        }
        Some(out)
    }
}

async fn collect_response(
    choices: Vec<(TextStream, Option<String>)>,
    meta: Meta,
) -> Result<Json<Completion>, ApiError> {
    let runs = choices.into_iter().map(|(mut text, echo)| async move {
        let mut content = echo.unwrap_or_default();
        let mut logprobs = Vec::new();
        loop {
            match text.next().await {
                Some(TextEvent::Delta {
                    text: piece,
                    logprobs: tokens,
                }) => {
                    content.push_str(&piece);
                    logprobs.extend(tokens);
                }
                Some(TextEvent::Finished {
                    reason,
                    prompt_tokens,
                    completion_tokens,
                }) => {
                    return Ok((content, logprobs, reason, prompt_tokens, completion_tokens));
                }
                Some(TextEvent::Failed(reason)) => {
                    return Err(ApiError::GenerationFailed { reason });
                }
                None => return Err(ApiError::internal("Generation ended without a result.")),
            }
        }
    });
    let results = futures_util::future::try_join_all(runs).await?;
    let (mut prompt_total, mut completion_total) = (0, 0);
    let mut out = Vec::with_capacity(results.len());
    for (index, (text, logprobs, reason, prompt_tokens, completion_tokens)) in
        results.into_iter().enumerate()
    {
        prompt_total += prompt_tokens;
        completion_total += completion_tokens;
        let mut offset = 0;
        out.push(CompletionChoice {
            logprobs: meta.logprobs(logprobs, &mut offset),
            text,
            index: index as u32,
            finish_reason: Some(reason.into()),
        });
    }
    Ok(Json(meta.completion(
        out,
        Some(Some(usage(prompt_total, completion_total))),
    )))
}

/// One choice's events, tagged with its index.
fn choice_events(index: usize, text: TextStream) -> impl Stream<Item = (usize, TextEvent)> + Send {
    stream::unfold(text, |mut text| async move {
        let event = text.next().await?;
        Some((event, text))
    })
    .map(move |event| (index, event))
}

fn stream_response(
    choices: Vec<(TextStream, Option<String>)>,
    meta: Meta,
    include_usage: bool,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let usage_field = include_usage.then_some(None);
    let count = choices.len();
    // The echoed prompts first, then each choice's pieces as they come.
    let mut echoes = Vec::new();
    let mut streams = Vec::new();
    let mut offsets = vec![0usize; count];
    for (index, (text, echo)) in choices.into_iter().enumerate() {
        if let Some(echo) = echo {
            offsets[index] = echo.chars().count();
            echoes.push((index, echo));
        }
        streams.push(Box::pin(choice_events(index, text)));
    }
    let meta = Arc::new(meta);
    let chunk = {
        let meta = Arc::clone(&meta);
        move |index: usize, text: String, logprobs, finish_reason: Option<FinishReason>| {
            let choice = CompletionChoice {
                text,
                index: index as u32,
                logprobs,
                finish_reason: finish_reason.map(Into::into),
            };
            let json = serde_json::to_string(&meta.completion(vec![choice], usage_field))
                .unwrap_or_default();
            Event::default().data(json)
        }
    };
    let head: Vec<Event> = echoes
        .into_iter()
        .map(|(index, echo)| chunk(index, echo, None, None))
        .collect();

    struct Tally {
        offsets: Vec<usize>,
        prompt_tokens: usize,
        completion_tokens: usize,
        failed: bool,
    }
    let tally = Arc::new(std::sync::Mutex::new(Tally {
        offsets,
        prompt_tokens: 0,
        completion_tokens: 0,
        failed: false,
    }));
    let body = {
        let tally = Arc::clone(&tally);
        let meta = Arc::clone(&meta);
        stream::select_all(streams)
            .take_while({
                let tally = Arc::clone(&tally);
                move |_| {
                    let failed = tally.lock().map(|t| t.failed).unwrap_or(true);
                    std::future::ready(!failed)
                }
            })
            .map(move |(index, event)| {
                let mut tally = match tally.lock() {
                    Ok(tally) => tally,
                    Err(poisoned) => poisoned.into_inner(),
                };
                match event {
                    TextEvent::Delta { text, logprobs } => {
                        let logprobs = meta.logprobs(logprobs, &mut tally.offsets[index]);
                        chunk(index, text, logprobs, None)
                    }
                    TextEvent::Finished {
                        reason,
                        prompt_tokens,
                        completion_tokens,
                    } => {
                        tally.prompt_tokens += prompt_tokens;
                        tally.completion_tokens += completion_tokens;
                        chunk(index, String::new(), None, Some(reason))
                    }
                    TextEvent::Failed(reason) => {
                        tally.failed = true;
                        let error = ApiError::GenerationFailed { reason };
                        let json = serde_json::to_value(error.body(None)).unwrap_or_default();
                        Event::default().data(json.to_string())
                    }
                }
            })
    };
    let tail = stream::once({
        let tally = Arc::clone(&tally);
        let meta = Arc::clone(&meta);
        async move {
            let tally = match tally.lock() {
                Ok(tally) => tally,
                Err(poisoned) => poisoned.into_inner(),
            };
            let mut events = Vec::new();
            if !tally.failed {
                if include_usage {
                    let totals = usage(tally.prompt_tokens, tally.completion_tokens);
                    let json =
                        serde_json::to_string(&meta.completion(Vec::new(), Some(Some(totals))))
                            .unwrap_or_default();
                    events.push(Event::default().data(json));
                }
                events.push(Event::default().data("[DONE]"));
            }
            stream::iter(events)
        }
    })
    .flatten();
    let events = stream::iter(head)
        .chain(body)
        .chain(tail)
        .map(Ok::<Event, Infallible>);
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(SSE_KEEP_ALIVE_SECS)))
}
