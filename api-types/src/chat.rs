//! OpenAI chat completions: what clients send to `POST
//! /v1/chat/completions` and what they get back, whole or as a stream of
//! chunks. Field names and shapes follow
//! <https://platform.openai.com/docs/api-reference/chat>.

use serde::{Deserialize, Serialize};

use crate::models::Object;

// ---------------------------------------------------------------------------
// Request
// ---------------------------------------------------------------------------

/// `POST /v1/chat/completions` body. Unknown fields are accepted and
/// ignored, as OpenAI-compatible servers do, so that clients sending
/// options ringlet does not act on (`user`, `metadata`, ...) still work.
/// Options left out are not written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<RequestMessage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// Not in OpenAI's API; llama.cpp, vLLM and Ollama accept it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<StopField>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u64>,
    /// Report each generated token's log probability.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<bool>,
    /// With `logprobs`, also this many likeliest alternatives (0 to 20).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f64>,
    /// Not in OpenAI's API; `transformers`, llama.cpp and vLLM accept it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f64>,
    /// Not in OpenAI's API; llama.cpp and vLLM accept it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f64>,
    /// Token id (as a string, as OpenAI's JSON has it) to a bias from -100
    /// to 100 added to its logit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logit_bias: Option<std::collections::BTreeMap<String, f64>>,
    /// Functions the model may call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Tool>>,
    /// `none`, `auto` (the default with tools), `required`, or one named
    /// function.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<ToolChoice>,
    /// Accepted; a forced call is one call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel_tool_calls: Option<bool>,
    /// `text`, `json_object` or `json_schema`: the answer is constrained
    /// to match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<ResponseFormat>,
}

/// A function the model may call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tool {
    /// `function`, the only kind there is.
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionDefinition,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionDefinition {
    /// Read as empty when missing, so that the error names the field.
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// A JSON schema of the arguments object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// `tool_choice`: a mode, or one function to call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ToolChoice {
    Mode(ToolChoiceMode),
    Function(NamedToolChoice),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ToolChoiceMode {
    None,
    Auto,
    Required,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedToolChoice {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionName,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionName {
    pub name: String,
}

/// `response_format`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaFormat },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JsonSchemaFormat {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// A call the model made (in an answer) or made earlier (in a request's
/// assistant message).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    /// `function`.
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    /// The arguments as JSON text.
    pub arguments: String,
}

/// A piece of a streamed call: the first for each call has its index, id,
/// type and name; later ones add to its arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCallDelta {
    pub index: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub function: FunctionCallDelta,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionCallDelta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamOptions {
    /// One last chunk carries the token counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_usage: Option<bool>,
}

/// One stop sequence or several.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

impl StopField {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            StopField::One(s) => vec![s],
            StopField::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    /// OpenAI's newer name for system instructions.
    Developer,
    User,
    Assistant,
    /// A tool's result, answering the call `tool_call_id`.
    Tool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestMessage {
    pub role: Role,
    /// A string, an array of content parts, or null (an assistant turn
    /// that only called tools).
    #[serde(default)]
    pub content: Option<MessageContent>,
    /// An assistant turn's calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// A tool message: the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// A part of a message; ringlet reads parts of `type` `text`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

// ---------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model ended its turn, or a stop sequence came.
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
    /// The model called tools.
    ToolCalls,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

impl Usage {
    pub fn new(prompt_tokens: u64, completion_tokens: u64) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// A whole answer (`stream` false).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletion {
    pub id: String,
    /// [`Object::ChatCompletion`].
    pub object: Object,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    pub choices: Vec<Choice>,
    pub usage: Usage,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    pub index: u32,
    pub message: AssistantMessage,
    /// Null unless the request asked for `logprobs`.
    pub logprobs: Option<ChoiceLogprobs>,
    pub finish_reason: FinishReason,
}

/// The log probabilities of a choice's tokens (or of a chunk's).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChoiceLogprobs {
    pub content: Vec<TokenLogprob>,
}

/// One generated token: its text, log probability, UTF-8 bytes (a token
/// may hold part of a character) and the likeliest alternatives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f64,
    pub bytes: Option<Vec<u8>>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f64,
    pub bytes: Option<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssistantMessage {
    /// [`Role::Assistant`].
    pub role: Role,
    /// Null when the model only called tools.
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
}

/// One server-sent event of a streamed answer (`stream` true): the first
/// has the role, then one per piece of text, then one with the finish
/// reason; with `stream_options.include_usage`, every chunk has
/// `"usage": null` and one last chunk without choices has the counts.
///
/// When read, the fields the dashboard does not need (`id`, `object`,
/// `created`, `model`, `system_fingerprint`) may be missing, as some
/// OpenAI-compatible servers leave them out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionChunk {
    #[serde(default)]
    pub id: String,
    /// [`Object::ChatCompletionChunk`].
    #[serde(default = "chunk_object")]
    pub object: Object,
    #[serde(default)]
    pub created: u64,
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub system_fingerprint: String,
    pub choices: Vec<ChunkChoice>,
    /// Present (as null until the last chunk) when the client asked for
    /// `stream_options.include_usage`. Read back, null and absent are
    /// both `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

fn chunk_object() -> Object {
    Object::ChatCompletionChunk
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChunkChoice {
    pub index: u32,
    pub delta: Delta,
    /// Null unless the request asked for `logprobs`: then those of the
    /// tokens whose text this chunk carries.
    #[serde(default)]
    pub logprobs: Option<ChoiceLogprobs>,
    pub finish_reason: Option<FinishReason>,
}

/// What a chunk adds to the answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a failed expectation is the report

    use super::*;

    #[test]
    fn a_request_writes_only_what_is_set_and_reads_what_clients_send() {
        let request = ChatCompletionRequest {
            model: "smollm2-135m".into(),
            messages: vec![RequestMessage {
                role: Role::User,
                content: Some(MessageContent::Text("hi".into())),
                tool_calls: None,
                tool_call_id: None,
                name: None,
            }],
            stream: Some(true),
            stream_options: Some(StreamOptions {
                include_usage: Some(true),
            }),
            max_tokens: Some(512),
            ..ChatCompletionRequest::default()
        };
        let json = concat!(
            r#"{"model":"smollm2-135m","messages":[{"role":"user","content":"hi"}],"#,
            r#""stream":true,"stream_options":{"include_usage":true},"max_tokens":512}"#,
        );
        assert_eq!(serde_json::to_string(&request).unwrap(), json);
        assert_eq!(
            serde_json::from_str::<ChatCompletionRequest>(json).unwrap(),
            request
        );

        let client = r#"{"model":"m","messages":[{"role":"developer","content":[{"type":"text","text":"a"}]},
            {"role":"assistant","content":null}],"stop":"x","user":"ignored"}"#;
        let read: ChatCompletionRequest = serde_json::from_str(client).unwrap();
        assert_eq!(read.messages[0].role, Role::Developer);
        assert_eq!(
            read.messages[0].content,
            Some(MessageContent::Parts(vec![ContentPart {
                kind: "text".into(),
                text: Some("a".into())
            }]))
        );
        assert_eq!(read.messages[1].content, None);
        assert_eq!(read.stop.map(StopField::into_vec), Some(vec!["x".into()]));
    }

    #[test]
    fn answers_are_written_as_always() {
        let completion = ChatCompletion {
            id: "chatcmpl-1".into(),
            object: Object::ChatCompletion,
            created: 7,
            model: "m".into(),
            system_fingerprint: "fp".into(),
            choices: vec![Choice {
                index: 0,
                message: AssistantMessage {
                    role: Role::Assistant,
                    content: Some("Hello".into()),
                    tool_calls: None,
                },
                logprobs: None,
                finish_reason: FinishReason::Length,
            }],
            usage: Usage::new(3, 2),
        };
        let json = concat!(
            r#"{"id":"chatcmpl-1","object":"chat.completion","created":7,"model":"m","#,
            r#""system_fingerprint":"fp","choices":[{"index":0,"message":{"role":"assistant","#,
            r#""content":"Hello"},"logprobs":null,"finish_reason":"length"}],"#,
            r#""usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#,
        );
        assert_eq!(serde_json::to_string(&completion).unwrap(), json);
        assert_eq!(
            serde_json::from_str::<ChatCompletion>(json).unwrap(),
            completion
        );
    }

    #[test]
    fn chunks_are_written_as_always_and_read_leniently() {
        let chunk = |delta, finish_reason, usage| ChatCompletionChunk {
            id: "chatcmpl-1".into(),
            object: Object::ChatCompletionChunk,
            created: 7,
            model: "m".into(),
            system_fingerprint: "fp".into(),
            choices: vec![ChunkChoice {
                index: 0,
                delta,
                logprobs: None,
                finish_reason,
            }],
            usage,
        };
        let head = r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":7,"model":"m","system_fingerprint":"fp","#;
        let first = chunk(
            Delta {
                role: Some(Role::Assistant),
                content: Some(String::new()),
                tool_calls: None,
            },
            None,
            Some(None),
        );
        let json = format!(
            r#"{head}"choices":[{{"index":0,"delta":{{"role":"assistant","content":""}},"logprobs":null,"finish_reason":null}}],"usage":null}}"#
        );
        assert_eq!(serde_json::to_string(&first).unwrap(), json);
        let last = chunk(Delta::default(), Some(FinishReason::Stop), None);
        let json = format!(
            r#"{head}"choices":[{{"index":0,"delta":{{}},"logprobs":null,"finish_reason":"stop"}}]}}"#
        );
        assert_eq!(serde_json::to_string(&last).unwrap(), json);
        assert_eq!(
            serde_json::from_str::<ChatCompletionChunk>(&json).unwrap(),
            last
        );

        // Only what the dashboard reads.
        let bare = r#"{"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}"#;
        let read: ChatCompletionChunk = serde_json::from_str(bare).unwrap();
        assert_eq!(read.object, Object::ChatCompletionChunk);
        assert_eq!(read.choices[0].delta.content.as_deref(), Some("Hi"));
        let counted =
            r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#;
        let read: ChatCompletionChunk = serde_json::from_str(counted).unwrap();
        assert_eq!(read.usage, Some(Some(Usage::new(3, 2))));
    }
}
