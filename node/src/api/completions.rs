//! `POST /v1/completions`: OpenAI's legacy completions, a prompt (text or
//! token ids, one or several) continued as plain text, whole or streamed,
//! with `echo`, `stop` and legacy `logprobs`. No chat template: the
//! prompt is tokenized as it is (with the model's BOS token, as llama.cpp
//! does). Several prompts run at once, one choice each.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::pin::Pin;
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
use futures_util::stream::{self, SelectAll, Stream};
use kernels::{MAX_TOP_LOGPROBS, SamplingParams, SequenceId, Tokenizer};
use rand::Rng;

use super::chat::{
    ResponseMeta, SamplingFields, completion_budget, parse_json, sampling_params, served_model,
    stop_sequences, usage, wait_for_plan,
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
        // The text goes on from the prompt's: decoded after its last tokens.
        let context = crate::text::decoder_context(&prompt.tokens).to_vec();
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
        )
        .continuing(&context);
        choices.push((text, prompt.echo));
    }
    let meta = ResponseMeta::new(
        format!("cmpl-{}", SequenceId(rand::rng().random())),
        &prepared.model,
        prepared.sampling.logprobs.is_some(),
    );
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
    let model = served_model(state, &request.model)?;
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
    if let Some(n) = request.logprobs.filter(|&n| n > MAX_TOP_LOGPROBS as u64) {
        return Err(ApiError::invalid_param(
            "logprobs",
            format!("`logprobs` must be 0 to {MAX_TOP_LOGPROBS}, got {n}."),
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
    )?;
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

/// The legacy answer's shapes.
impl ResponseMeta {
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

    /// Tokens' log probabilities in the legacy shape; `offsets` moves
    /// past these tokens.
    fn legacy_logprobs(
        &self,
        tokens: Vec<TokenLogprob>,
        offsets: &mut TextOffsets,
    ) -> Option<CompletionLogprobs> {
        let tokenizer = self.logprobs.as_ref()?;
        let mut out = CompletionLogprobs::default();
        for token in tokens {
            let text = tokenizer.token_text(token.token);
            let in_text = if tokenizer.is_control(token.token) {
                Vec::new() // its name is not in the text
            } else {
                tokenizer.token_text_bytes(token.token)
            };
            out.text_offset.push(offsets.advance(&in_text));
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

/// Where each token of a choice starts in its text, in characters (the
/// legacy `text_offset`), so that a client can cut the text at its tokens.
/// A token adds the characters its bytes complete: the tokens of a
/// character split over several start where the character does.
#[derive(Debug, Default)]
struct TextOffsets {
    /// Characters of the text before the next token.
    chars: usize,
    /// The bytes of a character that is not complete yet.
    partial: Vec<u8>,
}

impl TextOffsets {
    /// Offsets in a text that starts with `chars` characters (an echoed
    /// prompt).
    fn after(chars: usize) -> Self {
        Self {
            chars,
            partial: Vec::new(),
        }
    }

    /// Where a token of these bytes starts; moves past it.
    fn advance(&mut self, bytes: &[u8]) -> usize {
        let start = self.chars;
        self.partial.extend_from_slice(bytes);
        let mut rest = 0;
        loop {
            match std::str::from_utf8(&self.partial[rest..]) {
                Ok(text) => {
                    self.chars += text.chars().count();
                    rest = self.partial.len();
                    break;
                }
                Err(error) => {
                    let valid = &self.partial[rest..rest + error.valid_up_to()];
                    self.chars += String::from_utf8_lossy(valid).chars().count();
                    rest += error.valid_up_to();
                    match error.error_len() {
                        // Bytes no character can start with: one U+FFFD
                        // in the text, as decoding writes them.
                        Some(invalid) => {
                            self.chars += 1;
                            rest += invalid;
                        }
                        None => break, // a character not complete yet
                    }
                }
            }
        }
        self.partial.drain(..rest);
        start
    }
}

async fn collect_response(
    choices: Vec<(TextStream, Option<String>)>,
    meta: ResponseMeta,
) -> Result<Json<Completion>, ApiError> {
    let runs = choices.into_iter().map(|(text, echo)| async move {
        let whole = text
            .collect()
            .await
            .map_err(|reason| ApiError::GenerationFailed { reason })?;
        Ok::<_, ApiError>((echo, whole))
    });
    let results = futures_util::future::try_join_all(runs).await?;
    let (mut prompt_tokens, mut completion_tokens) = (0, 0);
    let mut out = Vec::with_capacity(results.len());
    for (index, (echo, whole)) in results.into_iter().enumerate() {
        prompt_tokens += whole.prompt_tokens;
        completion_tokens += whole.completion_tokens;
        let echo = echo.unwrap_or_default();
        let mut offsets = TextOffsets::after(echo.chars().count());
        out.push(CompletionChoice {
            logprobs: meta.legacy_logprobs(whole.logprobs, &mut offsets),
            text: echo + &whole.text,
            index: index as u32,
            finish_reason: Some(whole.reason.into()),
        });
    }
    Ok(Json(meta.completion(
        out,
        Some(Some(usage(prompt_tokens, completion_tokens))),
    )))
}

/// One choice's events as a stream, tagged with the choice's index.
type ChoiceEvents = Pin<Box<dyn Stream<Item = (usize, TextEvent)> + Send>>;

fn choice_events(index: usize, text: TextStream) -> ChoiceEvents {
    Box::pin(
        stream::unfold(text, |mut text| async move {
            let event = text.next().await?;
            Some((event, text))
        })
        .map(move |event| (index, event)),
    )
}

/// A streamed legacy completion as it goes: the echoed prompts first, then
/// each choice's pieces as they come, then the usage and `[DONE]`; an
/// error event ends it.
struct Streaming {
    meta: ResponseMeta,
    echoes: VecDeque<(usize, String)>,
    choices: SelectAll<ChoiceEvents>,
    /// Where each choice's next token starts in its text.
    offsets: Vec<TextOffsets>,
    /// Summed over the finished choices, when the client asked for it.
    usage: Option<Usage>,
    /// Nothing more to send: `[DONE]` went, or an error did.
    over: bool,
}

impl Streaming {
    fn chunk(
        &self,
        index: usize,
        text: String,
        logprobs: Option<CompletionLogprobs>,
        finish_reason: Option<FinishReason>,
    ) -> Event {
        let choice = CompletionChoice {
            text,
            index: index as u32,
            logprobs,
            finish_reason: finish_reason.map(Into::into),
        };
        let usage_field = self.usage.is_some().then_some(None);
        let json = serde_json::to_string(&self.meta.completion(vec![choice], usage_field))
            .unwrap_or_default();
        Event::default().data(json)
    }

    async fn next_event(&mut self) -> Option<Event> {
        if self.over {
            return None;
        }
        if let Some((index, echo)) = self.echoes.pop_front() {
            return Some(self.chunk(index, echo, None, None));
        }
        match self.choices.next().await {
            Some((index, TextEvent::Delta { text, logprobs })) => {
                let logprobs = self
                    .meta
                    .legacy_logprobs(logprobs, &mut self.offsets[index]);
                Some(self.chunk(index, text, logprobs, None))
            }
            Some((
                index,
                TextEvent::Finished {
                    reason,
                    prompt_tokens,
                    completion_tokens,
                },
            )) => {
                if let Some(totals) = &mut self.usage {
                    *totals = usage(
                        totals.prompt_tokens as usize + prompt_tokens,
                        totals.completion_tokens as usize + completion_tokens,
                    );
                }
                Some(self.chunk(index, String::new(), None, Some(reason)))
            }
            Some((_, TextEvent::Failed(reason))) => {
                self.over = true;
                let error = ApiError::GenerationFailed { reason };
                let json = serde_json::to_value(error.body(None)).unwrap_or_default();
                Some(Event::default().data(json.to_string()))
            }
            None => match self.usage.take() {
                // Every choice is done: the usage, then `[DONE]`.
                Some(totals) => {
                    let json = serde_json::to_string(
                        &self.meta.completion(Vec::new(), Some(Some(totals))),
                    )
                    .unwrap_or_default();
                    Some(Event::default().data(json))
                }
                None => {
                    self.over = true;
                    Some(Event::default().data("[DONE]"))
                }
            },
        }
    }
}

fn stream_response(
    choices: Vec<(TextStream, Option<String>)>,
    meta: ResponseMeta,
    include_usage: bool,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let mut offsets: Vec<TextOffsets> = choices.iter().map(|_| TextOffsets::default()).collect();
    let mut echoes = VecDeque::new();
    let mut streams = SelectAll::new();
    for (index, (text, echo)) in choices.into_iter().enumerate() {
        if let Some(echo) = echo {
            offsets[index] = TextOffsets::after(echo.chars().count());
            echoes.push_back((index, echo));
        }
        streams.push(choice_events(index, text));
    }
    let streaming = Streaming {
        meta,
        echoes,
        choices: streams,
        offsets,
        usage: include_usage.then(|| usage(0, 0)),
        over: false,
    };
    let events = stream::unfold(streaming, |mut streaming| async move {
        let event = streaming.next_event().await?;
        Some((Ok(event), streaming))
    });
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(SSE_KEEP_ALIVE_SECS)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_offsets_count_the_characters_before_each_token() {
        let mut offsets = TextOffsets::after(3); // an echoed "abc"
        // "😀" in two tokens, then " a": both halves start where it does.
        let starts: Vec<usize> = [&[0xF0, 0x9F][..], &[0x98, 0x80], b" a"]
            .iter()
            .map(|bytes| offsets.advance(bytes))
            .collect();
        assert_eq!(starts, [3, 3, 4]);
        // A control token adds nothing; a byte no character starts with
        // is one U+FFFD, as the text shows it.
        assert_eq!(offsets.advance(&[]), 6);
        assert_eq!(offsets.advance(&[0x80]), 6);
        assert_eq!(offsets.advance(b"b"), 7);
        assert_eq!(offsets.advance(&[]), 8);
    }
}
