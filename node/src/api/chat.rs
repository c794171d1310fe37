//! `POST /v1/chat/completions`, streaming (SSE) and not.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use api_types::{
    AssistantMessage, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice,
    ChoiceLogprobs, ChunkChoice, Delta, MessageContent, Object, RequestMessage, Role, StopField,
    TopLogprob, Usage,
};
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream};
use kernels::{ChatMessage, SamplingParams, SequenceId};
use rand::Rng;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::{AppState, ServedModel};
use crate::engine::{FinishReason, GenerationRequest};
use crate::limits::{
    MAX_LOGIT_BIAS_TOKENS, MAX_MESSAGES, MAX_STOP_SEQUENCE_BYTES, MAX_STOP_SEQUENCES,
    SSE_KEEP_ALIVE_SECS,
};
use crate::text::{TextEvent, TextStream, TokenLogprob};

/// A request that passed validation, ready for the engine.
#[derive(Debug)]
pub(crate) struct PreparedChat {
    /// The model the request was checked against (a switch may replace the
    /// node's while it runs).
    pub model: Arc<ServedModel>,
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stops: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
}

/// Waits, at most `--recovery-wait`, until the cluster has an active
/// plan: a request that arrives while a plan loads, or while the cluster
/// recovers from a lost node, is served when it is ready rather than
/// refused at once.
pub(crate) async fn wait_for_plan(cluster: &crate::cluster::ClusterHandle) -> Result<(), ApiError> {
    let mut views = cluster.watch();
    let ready = async {
        views
            .wait_for(|view| view.active_plan().is_some())
            .await
            .is_ok()
    };
    let wait = cluster.recovery_wait();
    match tokio::time::timeout(wait, ready).await {
        Ok(true) => Ok(()),
        _ => Err(ApiError::ClusterNotReady {
            reason: format!(
                "{} (waited {} s, --recovery-wait)",
                cluster.view().not_ready_reason(),
                wait.as_secs()
            ),
        }),
    }
}

pub async fn chat_completions(
    State(state): State<AppState>,
    // A rejection as a value, so that it leaves as an `ApiError`.
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: ChatCompletionRequest = parse_json(&body?)?;
    let prepared = prepare(&state, request).await?;
    if let Some(cluster) = &state.cluster {
        wait_for_plan(cluster).await?;
    }

    let id = SequenceId(rand::rng().random());
    let response = ResponseMeta::new(
        format!("chatcmpl-{id}"),
        &prepared.model,
        prepared.sampling.logprobs.is_some(),
    );
    let prompt_tokens = prepared.prompt.len();
    let generation = state.engine.submit(GenerationRequest {
        id,
        prompt: prepared.prompt,
        max_tokens: prepared.max_tokens,
        sampling: prepared.sampling,
        ignore_eos: false,
    })?;
    let text = TextStream::new(
        generation,
        prepared.model.prompt.tokenizer().clone(),
        prepared.stops,
        prompt_tokens,
    );
    if prepared.stream {
        Ok(stream_response(text, response, prepared.include_usage).into_response())
    } else {
        collect_response(text, response)
            .await
            .map(IntoResponse::into_response)
    }
}

/// Parses JSON, naming the field at fault when a value has the wrong type.
pub(crate) fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    // serde would read a struct from an array too; requests are objects.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(match serde_json::from_slice::<serde_json::Value>(body) {
            Ok(_) => ApiError::NotAnObject,
            Err(error) => ApiError::BadJson {
                path: ".".into(),
                error,
            },
        });
    }
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    Ok(serde_path_to_error::deserialize(&mut deserializer)?)
}

/// Checks every field and turns the conversation into prompt tokens.
pub(crate) async fn prepare(
    state: &AppState,
    request: ChatCompletionRequest,
) -> Result<PreparedChat, ApiError> {
    let model = served_model(state, &request.model)?;
    if let Some(n) = request.n.filter(|&n| n != 1) {
        return Err(ApiError::invalid_param(
            "n",
            format!("Only n = 1 is supported, got {n}."),
        ));
    }
    let requested_max = match (request.max_completion_tokens, request.max_tokens) {
        (Some(n), _) => Some(("max_completion_tokens", n)),
        (None, Some(n)) => Some(("max_tokens", n)),
        (None, None) => None,
    };
    if let Some((param, 0)) = requested_max {
        return Err(ApiError::invalid_param(
            param,
            format!("`{param}` must be at least 1."),
        ));
    }
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
            logprobs: chat_logprobs(&request)?,
        },
        model.prompt.tokenizer().vocab_size(),
    )?;
    let stops = stop_sequences(request.stop)?;
    let stream = request.stream.unwrap_or(false);
    let include_usage = request
        .stream_options
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    let messages = chat_messages(request.messages)?;

    let for_prompt = Arc::clone(&model);
    let prompt = tokio::task::spawn_blocking(move || for_prompt.prompt.tokens(&messages)).await??;
    let max_tokens = completion_budget(requested_max, prompt.len(), model.prompt.context_length())?;
    Ok(PreparedChat {
        model,
        prompt,
        max_tokens,
        sampling,
        stops,
        stream,
        include_usage,
    })
}

/// The model served now, if it is the one a request names.
pub(crate) fn served_model(
    state: &AppState,
    requested: &str,
) -> Result<Arc<ServedModel>, ApiError> {
    let model = state.model.get();
    if requested == model.name {
        Ok(model)
    } else {
        Err(ApiError::ModelNotFound {
            model: requested.to_string(),
            available: vec![model.name.clone()],
        })
    }
}

/// Chat's `logprobs` (a flag) and `top_logprobs` (how many alternatives).
fn chat_logprobs(request: &ChatCompletionRequest) -> Result<Option<usize>, ApiError> {
    match (request.logprobs, request.top_logprobs) {
        (Some(true), top) => Ok(Some(
            usize::try_from(top.unwrap_or(0)).unwrap_or(usize::MAX),
        )),
        (_, Some(_)) => Err(ApiError::invalid_param(
            "top_logprobs",
            "`top_logprobs` needs `logprobs` set to true.",
        )),
        _ => Ok(None),
    }
}

/// The sampling fields of chat and of legacy completions, as sent.
pub(crate) struct SamplingFields<'a> {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<u64>,
    pub seed: Option<i64>,
    pub min_p: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub logit_bias: Option<&'a std::collections::BTreeMap<String, f64>>,
    /// How many alternatives to report with each token's log
    /// probability; `None` reports none.
    pub logprobs: Option<usize>,
}

/// OpenAI's sampling defaults (temperature 1, top_p 1, no penalties),
/// checked.
pub(crate) fn sampling_params(
    fields: SamplingFields<'_>,
    vocab_size: usize,
) -> Result<SamplingParams, ApiError> {
    let sampling = SamplingParams {
        temperature: fields.temperature.unwrap_or(1.0),
        top_p: fields.top_p.unwrap_or(1.0),
        top_k: fields
            .top_k
            .map(|k| usize::try_from(k).unwrap_or(usize::MAX)),
        // Without a seed each request samples differently, as OpenAI does.
        seed: fields
            .seed
            .map_or_else(|| rand::rng().random(), |s| s as u64),
        min_p: fields.min_p.unwrap_or(0.0),
        presence_penalty: fields.presence_penalty.unwrap_or(0.0),
        frequency_penalty: fields.frequency_penalty.unwrap_or(0.0),
        repetition_penalty: fields.repetition_penalty.unwrap_or(1.0),
        logit_bias: logit_bias(fields.logit_bias, vocab_size)?,
        logprobs: fields.logprobs,
    };
    match sampling.validate() {
        Ok(()) => Ok(sampling),
        Err(kernels::KernelError::BadSampling {
            name,
            value,
            allowed,
        }) => Err(ApiError::invalid_param(
            name,
            format!("`{name}` must be {allowed}, got {value}."),
        )),
        Err(other) => Err(ApiError::invalid_request(other.to_string())),
    }
}

/// `logit_bias` keys are token ids, written as strings.
fn logit_bias(
    bias: Option<&std::collections::BTreeMap<String, f64>>,
    vocab_size: usize,
) -> Result<Vec<(u32, f64)>, ApiError> {
    let Some(bias) = bias else {
        return Ok(Vec::new());
    };
    if bias.len() > MAX_LOGIT_BIAS_TOKENS {
        return Err(ApiError::invalid_param(
            "logit_bias",
            format!(
                "`logit_bias` may name at most {MAX_LOGIT_BIAS_TOKENS} tokens, got {}.",
                bias.len()
            ),
        ));
    }
    bias.iter()
        .map(|(key, &value)| match key.parse::<u32>() {
            Ok(token) if (token as usize) < vocab_size => Ok((token, value)),
            _ => Err(ApiError::invalid_param(
                "logit_bias",
                format!(
                    "`logit_bias` keys are token ids from 0 to {}; got {key:?}.",
                    vocab_size.saturating_sub(1)
                ),
            )),
        })
        .collect()
}

pub(crate) fn stop_sequences(stop: Option<StopField>) -> Result<Vec<String>, ApiError> {
    let stops = stop.map(StopField::into_vec).unwrap_or_default();
    if stops.len() > MAX_STOP_SEQUENCES {
        return Err(ApiError::invalid_param(
            "stop",
            format!(
                "At most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {}.",
                stops.len()
            ),
        ));
    }
    if stops.iter().any(|s| s.len() > MAX_STOP_SEQUENCE_BYTES) {
        return Err(ApiError::invalid_param(
            "stop",
            format!("Each stop sequence must be at most {MAX_STOP_SEQUENCE_BYTES} bytes."),
        ));
    }
    Ok(stops)
}

/// Request messages as chat-template messages: text content only.
fn chat_messages(messages: Vec<RequestMessage>) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "`messages` must contain at least one message.",
        ));
    }
    if messages.len() > MAX_MESSAGES {
        return Err(ApiError::invalid_param(
            "messages",
            format!(
                "`messages` has {} messages; at most {MAX_MESSAGES} are accepted.",
                messages.len()
            ),
        ));
    }
    messages
        .into_iter()
        .enumerate()
        .map(|(i, message)| {
            let content = match message.content {
                None => String::new(),
                Some(MessageContent::Text(text)) => text,
                Some(MessageContent::Parts(parts)) => parts
                    .into_iter()
                    .map(|part| match (part.kind.as_str(), part.text) {
                        ("text", Some(text)) => Ok(text),
                        (kind, _) => Err(ApiError::invalid_param(
                            &format!("messages[{i}].content"),
                            format!("Content parts of type `{kind}` are not supported; send text."),
                        )),
                    })
                    .collect::<Result<String, ApiError>>()?,
            };
            Ok(ChatMessage::new(template_role(message.role), content))
        })
        .collect()
}

/// Tokens to generate: what was asked if it fits the context, else all the
/// context has left when nothing was asked.
pub(crate) fn completion_budget(
    requested: Option<(&str, u64)>,
    prompt_tokens: usize,
    context: usize,
) -> Result<usize, ApiError> {
    let Some((_, n)) = requested else {
        return Ok(context - prompt_tokens);
    };
    let n = usize::try_from(n).unwrap_or(usize::MAX);
    let total = prompt_tokens.saturating_add(n);
    if total > context {
        return Err(ApiError::ContextLengthExceeded {
            context_tokens: context,
            prompt_tokens,
            completion_tokens: n,
        });
    }
    Ok(n)
}

/// The fields every response and chunk of one completion share (chat or
/// legacy).
pub(crate) struct ResponseMeta {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    /// With log probabilities asked for, the tokenizer that names tokens.
    pub logprobs: Option<Arc<kernels::Tokenizer>>,
}

impl ResponseMeta {
    pub fn new(id: String, model: &ServedModel, logprobs: bool) -> Self {
        Self {
            id,
            created: crate::unix_seconds(),
            model: model.name.clone(),
            system_fingerprint: model.system_fingerprint.clone(),
            logprobs: logprobs.then(|| Arc::clone(model.prompt.tokenizer())),
        }
    }

    /// Tokens' log probabilities as the API writes them; `None` when the
    /// request did not ask.
    fn logprobs(&self, tokens: Vec<TokenLogprob>) -> Option<ChoiceLogprobs> {
        let tokenizer = self.logprobs.as_ref()?;
        let named = |token: u32, logprob: f32| {
            let text = tokenizer.token_text(token);
            TopLogprob {
                bytes: Some(text.as_bytes().to_vec()),
                token: text,
                logprob: f64::from(logprob),
            }
        };
        let content = tokens
            .into_iter()
            .map(|t| {
                let chosen = named(t.token, t.logprobs.logprob);
                api_types::TokenLogprob {
                    token: chosen.token,
                    logprob: chosen.logprob,
                    bytes: chosen.bytes,
                    top_logprobs: t
                        .logprobs
                        .top
                        .iter()
                        .map(|&(token, logprob)| named(token, logprob))
                        .collect(),
                }
            })
            .collect();
        Some(ChoiceLogprobs { content })
    }

    fn chunk(
        &self,
        choices: Vec<ChunkChoice>,
        usage: Option<Option<Usage>>,
    ) -> ChatCompletionChunk {
        ChatCompletionChunk {
            id: self.id.clone(),
            object: Object::ChatCompletionChunk,
            created: self.created,
            model: self.model.clone(),
            system_fingerprint: self.system_fingerprint.clone(),
            choices,
            usage,
        }
    }
}

async fn collect_response(
    text: TextStream,
    meta: ResponseMeta,
) -> Result<Json<ChatCompletion>, ApiError> {
    let whole = text
        .collect()
        .await
        .map_err(|reason| ApiError::GenerationFailed { reason })?;
    let logprobs = meta.logprobs(whole.logprobs);
    Ok(Json(ChatCompletion {
        id: meta.id,
        object: Object::ChatCompletion,
        created: meta.created,
        model: meta.model,
        system_fingerprint: meta.system_fingerprint,
        choices: vec![Choice {
            index: 0,
            message: AssistantMessage {
                role: Role::Assistant,
                content: whole.text,
            },
            logprobs,
            finish_reason: whole.reason.into(),
        }],
        usage: usage(whole.prompt_tokens, whole.completion_tokens),
    }))
}

/// Where an SSE stream is.
enum Phase {
    Role,
    Content,
    Usage(Usage),
    Done,
    End,
}

fn stream_response(
    text: TextStream,
    meta: ResponseMeta,
    include_usage: bool,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    // With include_usage, every chunk carries `"usage": null` and one last
    // chunk with no choices carries the totals, as OpenAI streams do.
    let usage_field = include_usage.then_some(None);
    let events = stream::unfold(
        (text, meta, Phase::Role),
        move |(mut text, meta, phase)| async move {
            let (event, next) = match phase {
                Phase::Role => {
                    let delta = Delta {
                        role: Some(Role::Assistant),
                        content: Some(String::new()),
                    };
                    (
                        chunk_event(&meta, delta, None, None, usage_field),
                        Phase::Content,
                    )
                }
                Phase::Content => match text.next().await {
                    Some(TextEvent::Delta {
                        text: piece,
                        logprobs,
                    }) => {
                        let delta = Delta {
                            role: None,
                            content: Some(piece),
                        };
                        let logprobs = meta.logprobs(logprobs);
                        (
                            chunk_event(&meta, delta, logprobs, None, usage_field),
                            Phase::Content,
                        )
                    }
                    Some(TextEvent::Finished {
                        reason,
                        prompt_tokens,
                        completion_tokens,
                    }) => {
                        let next = if include_usage {
                            Phase::Usage(usage(prompt_tokens, completion_tokens))
                        } else {
                            Phase::Done
                        };
                        (
                            chunk_event(&meta, Delta::default(), None, Some(reason), usage_field),
                            next,
                        )
                    }
                    Some(TextEvent::Failed(reason)) => {
                        let error = ApiError::GenerationFailed { reason };
                        // Through a `Value`, whose keys are sorted, as this
                        // event has always been written.
                        let json = serde_json::to_value(error.body(None)).unwrap_or_default();
                        (Event::default().data(json.to_string()), Phase::End)
                    }
                    None => return None,
                },
                Phase::Usage(usage) => {
                    let json = serde_json::to_string(&meta.chunk(Vec::new(), Some(Some(usage))))
                        .unwrap_or_default();
                    (Event::default().data(json), Phase::Done)
                }
                Phase::Done => (Event::default().data("[DONE]"), Phase::End),
                Phase::End => return None,
            };
            Some((Ok(event), (text, meta, next)))
        },
    );
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(SSE_KEEP_ALIVE_SECS)))
}

fn chunk_event(
    meta: &ResponseMeta,
    delta: Delta,
    logprobs: Option<ChoiceLogprobs>,
    finish_reason: Option<FinishReason>,
    usage: Option<Option<Usage>>,
) -> Event {
    let choice = ChunkChoice {
        index: 0,
        delta,
        logprobs,
        finish_reason: finish_reason.map(Into::into),
    };
    let json = serde_json::to_string(&meta.chunk(vec![choice], usage)).unwrap_or_default();
    Event::default().data(json)
}

/// The role name chat templates know.
fn template_role(role: Role) -> &'static str {
    match role {
        Role::System | Role::Developer => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
    }
}

pub(crate) fn usage(prompt_tokens: usize, completion_tokens: usize) -> Usage {
    Usage::new(prompt_tokens as u64, completion_tokens as u64)
}

impl From<FinishReason> for api_types::FinishReason {
    fn from(reason: FinishReason) -> Self {
        match reason {
            FinishReason::Stop => api_types::FinishReason::Stop,
            FinishReason::Length => api_types::FinishReason::Length,
        }
    }
}
