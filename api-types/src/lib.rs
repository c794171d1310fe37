//! The JSON of ringlet's HTTP API, defined once: the node serializes these
//! types and the dashboard (`web-ui`, built for `wasm32-unknown-unknown`)
//! deserializes the same ones, so the two cannot drift apart.
//!
//! - [`ClusterView`] and what it embeds: `GET /v1/cluster` and each event
//!   of `GET /v1/cluster/events`. [`Resources`], [`ModelIdentity`],
//!   [`ModelAvailability`] and [`ModelState`] are also fields of the link
//!   protocol's frames (the node re-exports them there).
//! - [`PolicyStatus`]: `GET|PUT|DELETE /v1/cluster/policy`.
//! - [`KnownModels`], [`DownloadStarted`]: `/v1/cluster/models`;
//!   [`ModelList`], [`ModelCard`]: `/v1/models`.
//! - The OpenAI chat completion types ([`ChatCompletionRequest`],
//!   [`ChatCompletion`], [`ChatCompletionChunk`]) and OpenAI's error body
//!   ([`ErrorBody`]), as <https://platform.openai.com/docs/api-reference/chat>
//!   names them; the legacy completions ([`CompletionRequest`],
//!   [`Completion`]).
//!
//! Only serde, no IO: what the JSON looks like, and nothing of how it
//! travels. Field order is the JSON's key order; changing it changes the
//! bytes the node sends.

mod chat;
mod cluster;
mod completions;
mod error;
mod ids;
mod models;
mod policy;

pub use chat::{
    AssistantMessage, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice,
    ChoiceLogprobs, ChunkChoice, ContentPart, Delta, FinishReason, FunctionCall, FunctionCallDelta,
    FunctionDefinition, FunctionName, JsonSchemaFormat, MessageContent, NamedToolChoice,
    RequestMessage, ResponseFormat, Role, StopField, StreamOptions, TokenLogprob, Tool, ToolCall,
    ToolCallDelta, ToolChoice, ToolChoiceMode, TopLogprob, Usage,
};
pub use cluster::{
    ClusterView, LinkTransport, LinkView, ModelAvailability, ModelIdentity, ModelState, NodeView,
    NotJoinedView, PlanState, PlanView, RecoveryView, Resources, StageView,
};
pub use completions::{
    Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, PromptField,
};
pub use error::{ErrorBody, ErrorDetail, ErrorType};
pub use ids::{LayerRange, NodeId, ParseNodeIdError};
pub use models::{
    DownloadStarted, KnownModel, KnownModels, ModelCard, ModelList, Object, SwitchModel,
    SwitchStarted,
};
pub use policy::{PolicySource, PolicyStatus, PolicyView};
