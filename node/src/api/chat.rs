//! `POST /v1/chat/completions`, streaming (SSE) and not.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use api_types::{
    AssistantMessage, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice,
    ChoiceLogprobs, ChunkChoice, Delta, FunctionCall, FunctionCallDelta, MessageContent, Object,
    RequestMessage, ResponseFormat, Role, StopField, Tool, ToolCall, ToolCallDelta, ToolChoice,
    ToolChoiceMode, TopLogprob, Usage,
};
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream};
use kernels::{ChatMessage, Constraint, SamplingParams, SequenceId};
use rand::Rng;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::{AppState, ServedModel};
use crate::engine::{FinishReason, GenerationRequest};
use crate::limits::{
    MAX_GRAMMAR_BYTES, MAX_LOGIT_BIAS_TOKENS, MAX_MESSAGES, MAX_STOP_SEQUENCE_BYTES,
    MAX_STOP_SEQUENCES, MAX_TOOLS, SSE_KEEP_ALIVE_SECS,
};
use crate::text::{TextEvent, TextStream, TokenLogprob};
use crate::tools::{CallableFunction, ToolCallParser, ToolEvent, ToolFormat, forced_call};

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
    /// With tools the model may call: how it writes calls.
    pub tool_format: Option<ToolFormat>,
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
        Ok(
            stream_response(text, response, prepared.include_usage, prepared.tool_format)
                .into_response(),
        )
    } else {
        collect_response(text, response, prepared.tool_format)
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
    let tools = check_tools(request.tools.as_deref())?;
    let choice = tool_choice(request.tool_choice.as_ref(), tools.as_ref())?;
    let format = ToolFormat::of(model.prompt.template());
    // With `none`, the model is not told of the tools at all.
    let offered = tools.filter(|_| !matches!(choice, ToolUse::None));
    let mut sampling = sampling;
    sampling.constraint = match (&choice, request.response_format) {
        (
            ToolUse::Forced(_),
            Some(ResponseFormat::JsonObject | ResponseFormat::JsonSchema { .. }),
        ) => {
            return Err(ApiError::invalid_param(
                "response_format",
                "`response_format` cannot be combined with a forced tool call (`tool_choice` `required` or a named function); the call's arguments already follow the function's schema.",
            ));
        }
        (ToolUse::Forced(functions), _) => Some(forced_call(format, functions)),
        (_, response_format) => response_constraint(response_format)?,
    };
    if let Some(constraint) = &sampling.constraint {
        compile(&model, constraint, &choice).await?;
    }
    let tool_format = match choice {
        ToolUse::Forced(_) => Some(format),
        // An answer held to `response_format` is that JSON, never a call.
        ToolUse::Auto if sampling.constraint.is_none() => Some(format),
        _ => None,
    };

    let for_prompt = Arc::clone(&model);
    let prompt = tokio::task::spawn_blocking(move || {
        for_prompt
            .prompt
            .tokens_with_tools(&messages, offered.as_ref().map(|t| &t.json))
    })
    .await??;
    let max_tokens = completion_budget(requested_max, prompt.len(), model.prompt.context_length())?;
    Ok(PreparedChat {
        model,
        prompt,
        max_tokens,
        sampling,
        stops,
        stream,
        include_usage,
        tool_format,
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
        constraint: None,
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

/// The tools of a request, checked, and as the chat template reads them.
#[derive(Debug)]
pub(crate) struct OfferedTools {
    functions: Vec<CallableFunction>,
    /// The `tools` list as JSON, for the template.
    json: serde_json::Value,
}

/// Checks `tools`: functions, each named, parameters an object schema.
fn check_tools(tools: Option<&[Tool]>) -> Result<Option<OfferedTools>, ApiError> {
    let Some(tools) = tools else {
        return Ok(None);
    };
    if tools.len() > MAX_TOOLS {
        return Err(ApiError::invalid_param(
            "tools",
            format!(
                "At most {MAX_TOOLS} tools are accepted, got {}.",
                tools.len()
            ),
        ));
    }
    let mut functions = Vec::with_capacity(tools.len());
    for (i, tool) in tools.iter().enumerate() {
        if tool.kind != "function" {
            return Err(ApiError::invalid_param(
                &format!("tools[{i}].type"),
                format!(
                    "Tools of type `{}` are not supported; use `function`.",
                    tool.kind
                ),
            ));
        }
        let name = &tool.function.name;
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(ApiError::invalid_param(
                &format!("tools[{i}].function.name"),
                format!(
                    "A function name must be 1 to 64 letters, digits, underscores or dashes; got {name:?}."
                ),
            ));
        }
        if let Some(parameters) = &tool.function.parameters
            && !parameters.is_object()
        {
            return Err(ApiError::invalid_param(
                &format!("tools[{i}].function.parameters"),
                "`parameters` must be a JSON schema object.",
            ));
        }
        functions.push(CallableFunction {
            name: name.clone(),
            parameters: tool.function.parameters.clone(),
        });
    }
    let json =
        serde_json::to_value(tools).map_err(|e| ApiError::invalid_param("tools", e.to_string()))?;
    Ok(Some(OfferedTools { functions, json }))
}

/// What `tool_choice` asks of the model.
#[derive(Debug, Clone)]
enum ToolUse {
    /// No tools, or `none`: the model is not offered them.
    None,
    /// `auto`: it may call them.
    Auto,
    /// `required` or a named function: it must call one of these.
    Forced(Vec<CallableFunction>),
}

fn tool_choice(
    choice: Option<&ToolChoice>,
    tools: Option<&OfferedTools>,
) -> Result<ToolUse, ApiError> {
    let Some(tools) = tools.filter(|t| !t.functions.is_empty()) else {
        return match choice {
            None | Some(ToolChoice::Mode(ToolChoiceMode::None | ToolChoiceMode::Auto)) => {
                Ok(ToolUse::None)
            }
            Some(_) => Err(ApiError::invalid_param(
                "tool_choice",
                "`tool_choice` names a call to make, but `tools` is empty or missing.",
            )),
        };
    };
    match choice {
        None | Some(ToolChoice::Mode(ToolChoiceMode::Auto)) => Ok(ToolUse::Auto),
        Some(ToolChoice::Mode(ToolChoiceMode::None)) => Ok(ToolUse::None),
        Some(ToolChoice::Mode(ToolChoiceMode::Required)) => {
            Ok(ToolUse::Forced(tools.functions.clone()))
        }
        Some(ToolChoice::Function(named)) => {
            let wanted = &named.function.name;
            match tools.functions.iter().find(|f| &f.name == wanted) {
                Some(function) => Ok(ToolUse::Forced(vec![function.clone()])),
                None => Err(ApiError::invalid_param(
                    "tool_choice.function.name",
                    format!(
                        "`tool_choice` names {wanted:?}, which is not among `tools` ({}).",
                        tools
                            .functions
                            .iter()
                            .map(|f| f.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )),
            }
        }
    }
}

/// The grammar `response_format` asks for.
fn response_constraint(format: Option<ResponseFormat>) -> Result<Option<Constraint>, ApiError> {
    match format {
        None | Some(ResponseFormat::Text) => Ok(None),
        Some(ResponseFormat::JsonObject) => {
            Ok(Some(Constraint::JsonSchema(r#"{"type": "object"}"#.into())))
        }
        Some(ResponseFormat::JsonSchema { json_schema }) => match json_schema.schema {
            Some(schema) if schema.is_object() => {
                Ok(Some(Constraint::JsonSchema(schema.to_string())))
            }
            Some(_) => Err(ApiError::invalid_param(
                "response_format.json_schema.schema",
                "`schema` must be a JSON schema object.",
            )),
            None => Err(ApiError::invalid_param(
                "response_format.json_schema.schema",
                "`json_schema` needs a `schema`.",
            )),
        },
    }
}

/// Compiles a request's grammar once here, so that a schema the engine
/// cannot use is a 400 naming the part at fault rather than a failure at
/// the last stage.
async fn compile(
    model: &ServedModel,
    constraint: &Constraint,
    tools: &ToolUse,
) -> Result<(), ApiError> {
    let grammars = Arc::clone(model.prompt.grammars());
    let (field, size) = match constraint {
        Constraint::Lark(grammar) => ("tools", grammar.len()),
        Constraint::JsonSchema(schema) => ("response_format.json_schema.schema", schema.len()),
    };
    if size > MAX_GRAMMAR_BYTES {
        return Err(ApiError::invalid_param(
            field,
            format!("The schemas come to {size} bytes; at most {MAX_GRAMMAR_BYTES} are accepted."),
        ));
    }
    // The whole grammar once; only when it fails, each function's schema
    // alone, to name the one at fault.
    let mut checks: Vec<(String, Constraint)> = vec![(field.into(), constraint.clone())];
    if let ToolUse::Forced(functions) = tools {
        for (i, function) in functions.iter().enumerate() {
            if let Some(parameters) = &function.parameters {
                checks.push((
                    format!("tools[{i}].function.parameters"),
                    Constraint::JsonSchema(parameters.to_string()),
                ));
            }
        }
    }
    let started = std::time::Instant::now();
    let failed = tokio::task::spawn_blocking(move || {
        let mut checks = checks.into_iter();
        let (field, whole) = checks.next()?;
        let error = grammars.matcher(&whole).err()?;
        Some(
            checks
                .find_map(|(field, c)| grammars.matcher(&c).err().map(|e| (field, e)))
                .unwrap_or((field, error)),
        )
    })
    .await
    .map_err(|e| ApiError::internal(format!("the grammar check stopped: {e}")))?;
    tracing::debug!(
        compile_ms = started.elapsed().as_secs_f64() * 1e3,
        "grammar compiled"
    );
    match failed {
        None => Ok(()),
        Some((field, error)) => Err(ApiError::invalid_param(
            &field,
            format!("The schema cannot be used for constrained decoding: {error}"),
        )),
    }
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
            let mut converted = ChatMessage::new(template_role(message.role), content);
            if message.role == Role::Tool {
                let Some(id) = message.tool_call_id.filter(|id| !id.is_empty()) else {
                    return Err(ApiError::invalid_param(
                        &format!("messages[{i}].tool_call_id"),
                        "A `tool` message needs the `tool_call_id` of the call it answers.",
                    ));
                };
                converted.tool_call_id = Some(id);
            }
            converted.name = message.name;
            for (j, call) in message.tool_calls.into_iter().flatten().enumerate() {
                if message.role != Role::Assistant {
                    return Err(ApiError::invalid_param(
                        &format!("messages[{i}].tool_calls"),
                        "Only assistant messages carry `tool_calls`.",
                    ));
                }
                // Templates read the arguments as an object, as
                // transformers passes them; clients send JSON text.
                let arguments =
                    match serde_json::from_str::<serde_json::Value>(&call.function.arguments) {
                        Ok(value) => value,
                        Err(_) => {
                            return Err(ApiError::invalid_param(
                                &format!("messages[{i}].tool_calls[{j}].function.arguments"),
                                "`arguments` must be JSON text.",
                            ));
                        }
                    };
                converted.tool_calls.push(serde_json::json!({
                    "id": call.id,
                    "type": call.kind,
                    "function": {"name": call.function.name, "arguments": arguments},
                }));
            }
            Ok(converted)
        })
        .collect()
}

/// Tokens to generate: what was asked if it fits the context, else (when
/// nothing was asked) `usize::MAX`, which the engine bounds by what the
/// context and the KV cache hold.
pub(crate) fn completion_budget(
    requested: Option<(&str, u64)>,
    prompt_tokens: usize,
    context: usize,
) -> Result<usize, ApiError> {
    let Some((_, n)) = requested else {
        // As many as the context and the KV cache hold: the engine knows.
        return Ok(usize::MAX);
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
            // The token's own bytes, even a part of a character's: joined,
            // the tokens' bytes give the answer's text.
            let bytes = tokenizer.token_text_bytes(token);
            TopLogprob {
                token: String::from_utf8_lossy(&bytes).into_owned(),
                bytes: Some(bytes),
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
    tool_format: Option<ToolFormat>,
) -> Result<Json<ChatCompletion>, ApiError> {
    let whole = text
        .collect()
        .await
        .map_err(|reason| ApiError::GenerationFailed { reason })?;
    let logprobs = meta.logprobs(whole.logprobs);
    let (content, tool_calls) = match tool_format {
        Some(format) => {
            let mut parser = ToolCallParser::new(format);
            let mut events = parser.push(&whole.text);
            events.extend(parser.finish());
            assemble(events)
        }
        None => (whole.text, Vec::new()),
    };
    let finish_reason = finish_reason(whole.reason, !tool_calls.is_empty());
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
                // Null when the model only called tools, as OpenAI's is.
                content: (!content.is_empty() || tool_calls.is_empty()).then_some(content),
                tool_calls: (!tool_calls.is_empty()).then_some(tool_calls),
            },
            logprobs,
            finish_reason,
        }],
        usage: usage(whole.prompt_tokens, whole.completion_tokens),
    }))
}

/// `tool_calls` when the model ended its turn having called tools.
fn finish_reason(reason: FinishReason, called: bool) -> api_types::FinishReason {
    match reason {
        FinishReason::Stop if called => api_types::FinishReason::ToolCalls,
        other => other.into(),
    }
}

/// The content and whole calls that parser events add up to.
fn assemble(events: Vec<ToolEvent>) -> (String, Vec<ToolCall>) {
    let mut content = String::new();
    let mut calls: Vec<ToolCall> = Vec::new();
    for event in events {
        match event {
            ToolEvent::Content(text) => content.push_str(&text),
            ToolEvent::CallStart { id, name, .. } => calls.push(ToolCall {
                id,
                kind: "function".into(),
                function: FunctionCall {
                    name,
                    arguments: String::new(),
                },
            }),
            ToolEvent::Arguments { index, fragment } => {
                if let Some(call) = calls.get_mut(index as usize) {
                    call.function.arguments.push_str(&fragment);
                }
            }
        }
    }
    (content, calls)
}

/// A chunk's delta for parser events: their text as content, their calls
/// in OpenAI's incremental shape (index, id, type and name first, then
/// pieces of the arguments). `None` when they add nothing.
fn tool_delta(events: Vec<ToolEvent>) -> Option<Delta> {
    let mut content: Option<String> = None;
    let mut calls: Vec<ToolCallDelta> = Vec::new();
    for event in events {
        match event {
            ToolEvent::Content(text) => content.get_or_insert_with(String::new).push_str(&text),
            ToolEvent::CallStart { index, id, name } => calls.push(ToolCallDelta {
                index,
                id: Some(id),
                kind: Some("function".into()),
                function: FunctionCallDelta {
                    name: Some(name),
                    arguments: Some(String::new()),
                },
            }),
            ToolEvent::Arguments { index, fragment } => match calls.last_mut() {
                // One entry per call and chunk: the arguments join the
                // entry that began the call.
                Some(last) if last.index == index => last
                    .function
                    .arguments
                    .get_or_insert_with(String::new)
                    .push_str(&fragment),
                _ => calls.push(ToolCallDelta {
                    index,
                    id: None,
                    kind: None,
                    function: FunctionCallDelta {
                        name: None,
                        arguments: Some(fragment),
                    },
                }),
            },
        }
    }
    (content.is_some() || !calls.is_empty()).then(|| Delta {
        role: None,
        content,
        tool_calls: (!calls.is_empty()).then_some(calls),
    })
}

/// Where an SSE stream is.
enum Phase {
    Role,
    Content,
    Usage(Usage),
    Done,
    End,
}

/// A streamed answer's text, read for tool calls when tools were offered.
struct StreamedText {
    text: TextStream,
    tools: Option<ToolCallParser>,
    /// Log probabilities of text the parser holds back, sent with the
    /// next chunk.
    held_logprobs: Vec<TokenLogprob>,
}

fn stream_response(
    text: TextStream,
    meta: ResponseMeta,
    include_usage: bool,
    tool_format: Option<ToolFormat>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    // With include_usage, every chunk carries `"usage": null` and one last
    // chunk with no choices carries the totals, as OpenAI streams do.
    let usage_field = include_usage.then_some(None);
    let streamed = StreamedText {
        text,
        tools: tool_format.map(ToolCallParser::new),
        held_logprobs: Vec::new(),
    };
    let events = stream::unfold(
        (streamed, meta, Phase::Role, VecDeque::new()),
        move |(mut streamed, meta, mut phase, mut queue)| async move {
            loop {
                if let Some(event) = queue.pop_front() {
                    return Some((Ok(event), (streamed, meta, phase, queue)));
                }
                phase = match phase {
                    Phase::Role => {
                        let delta = Delta {
                            role: Some(Role::Assistant),
                            content: Some(String::new()),
                            tool_calls: None,
                        };
                        queue.push_back(chunk_event(&meta, delta, None, None, usage_field));
                        Phase::Content
                    }
                    Phase::Content => match streamed.text.next().await {
                        Some(TextEvent::Delta {
                            text: piece,
                            logprobs,
                        }) => {
                            let delta = match &mut streamed.tools {
                                Some(parser) => tool_delta(parser.push(&piece)),
                                None => Some(Delta {
                                    role: None,
                                    content: Some(piece),
                                    tool_calls: None,
                                }),
                            };
                            streamed.held_logprobs.extend(logprobs);
                            if let Some(delta) = delta {
                                let logprobs =
                                    meta.logprobs(std::mem::take(&mut streamed.held_logprobs));
                                queue.push_back(chunk_event(
                                    &meta,
                                    delta,
                                    logprobs,
                                    None,
                                    usage_field,
                                ));
                            }
                            Phase::Content
                        }
                        Some(TextEvent::Finished {
                            reason,
                            prompt_tokens,
                            completion_tokens,
                        }) => {
                            let mut called = false;
                            // Held text's log probabilities go with the
                            // last piece of text, or else the finish chunk.
                            let mut held = None;
                            if let Some(parser) = &mut streamed.tools {
                                let rest = tool_delta(parser.finish());
                                called = parser.calls() > 0;
                                held = meta
                                    .logprobs(std::mem::take(&mut streamed.held_logprobs))
                                    .filter(|l| !l.content.is_empty());
                                if let Some(delta) = rest {
                                    queue.push_back(chunk_event(
                                        &meta,
                                        delta,
                                        held.take(),
                                        None,
                                        usage_field,
                                    ));
                                }
                            }
                            let finish = finish_reason(reason, called);
                            queue.push_back(chunk_event(
                                &meta,
                                Delta::default(),
                                held,
                                Some(finish),
                                usage_field,
                            ));
                            if include_usage {
                                Phase::Usage(usage(prompt_tokens, completion_tokens))
                            } else {
                                Phase::Done
                            }
                        }
                        Some(TextEvent::Failed(reason)) => {
                            let error = ApiError::GenerationFailed { reason };
                            // Through a `Value`, whose keys are sorted, as this
                            // event has always been written.
                            let json = serde_json::to_value(error.body(None)).unwrap_or_default();
                            queue.push_back(Event::default().data(json.to_string()));
                            Phase::End
                        }
                        None => return None,
                    },
                    Phase::Usage(usage) => {
                        let json =
                            serde_json::to_string(&meta.chunk(Vec::new(), Some(Some(usage))))
                                .unwrap_or_default();
                        queue.push_back(Event::default().data(json));
                        Phase::Done
                    }
                    Phase::Done => {
                        queue.push_back(Event::default().data("[DONE]"));
                        Phase::End
                    }
                    Phase::End => return None,
                };
            }
        },
    );
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(SSE_KEEP_ALIVE_SECS)))
}

fn chunk_event(
    meta: &ResponseMeta,
    delta: Delta,
    logprobs: Option<ChoiceLogprobs>,
    finish_reason: Option<api_types::FinishReason>,
    usage: Option<Option<Usage>>,
) -> Event {
    let choice = ChunkChoice {
        index: 0,
        delta,
        logprobs,
        finish_reason,
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
        Role::Tool => "tool",
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
