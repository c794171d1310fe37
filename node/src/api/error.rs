//! API errors in OpenAI's JSON shape (`api_types::ErrorBody`):
//! `{"error": {"message", "type", "param", "code"}}` with a fitting status.
//!
//! Handlers return `Result<_, ApiError>` and use `?` on the errors they
//! meet. A 5xx that is the node's own fault ([`ApiError::Internal`] and
//! the like) tells the client only a request id to quote; the text goes to
//! the log. Errors are logged once, by the request layer
//! (`request_id.rs`), from the [`ErrorReport`] each response carries.

use std::fmt;

use api_types::{ErrorBody, ErrorDetail, ErrorType};
use axum::Json;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::admin::Admin;
use super::request_id;
use crate::cluster::SetPolicyError;
use crate::cluster::protocol::{PROTOCOL_VERSION, UPGRADE_TOKEN};
use crate::engine::SubmitError;
use crate::limits::MAX_PEER_RANGE_READS;
use crate::policy::PolicyError;
use crate::prompt::PromptError;

/// Why a request failed. `describe` says what each variant
/// becomes: status, message, `param` and `code`.
#[derive(Debug)]
pub enum ApiError {
    /// The request is wrong as sent (400), at `param` if one field is.
    InvalidRequest {
        message: String,
        param: Option<String>,
    },
    /// The body could not be read: too large, or cut off.
    UnreadableBody(BytesRejection),
    /// The body is JSON but not an object.
    NotAnObject,
    /// The body is not valid JSON, or not of the endpoint's shape, at
    /// `path` (`.` for the whole body).
    BadJson {
        path: String,
        error: serde_json::Error,
    },
    ModelNotFound {
        model: String,
        available: Vec<String>,
    },
    /// A download asked for a model nodes cannot fetch by name.
    NotInCatalogue {
        name: String,
        known: Vec<String>,
    },
    /// The prompt plus the completion asked for exceed the context.
    ContextLengthExceeded {
        context_tokens: usize,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Prompt(PromptError),
    Submit(SubmitError),
    /// The cluster has no active plan.
    ClusterNotReady {
        reason: String,
    },
    /// The generation failed after it started, for a reason the cluster
    /// gives in words for users (a node left, say).
    GenerationFailed {
        reason: String,
    },
    Policy(SetPolicyError),
    /// An admin change on a node started without an admin token.
    AdminDisabled(Admin),
    /// An admin change with a wrong token (`given`) or none.
    AdminToken {
        change: Admin,
        given: bool,
    },
    /// The API needs a key: none was sent (`given` false) or it is wrong.
    ApiKey {
        given: bool,
    },
    /// A node with no API key that listens on the network answers only
    /// its own machine.
    LocalOnly,
    /// Too many failed key attempts from this address lately.
    TooManyFailedAttempts {
        retry_after_secs: u64,
    },
    NoRoute {
        path: String,
    },
    MethodNotAllowed {
        path: String,
    },
    /// A peer asked for model bytes this node does not hold (or for a
    /// file it does not serve).
    NotHeld {
        etag: String,
    },
    /// A request for model files without a valid peer pass: not a node
    /// of this cluster.
    NotAPeer,
    /// Peers are reading as many ranges from this node as it sends at once.
    PeerReadsBusy,
    /// A peer's `Range` for model bytes is not one range this node sends.
    BadRange {
        reason: String,
    },
    /// `/v1/ring/link` without the link's `Upgrade` header.
    UpgradeRequired,
    /// A peer speaking another protocol version (`None`: it sent none).
    ProtocolMismatch {
        theirs: Option<u32>,
    },
    /// The node's own failure; `detail` is for the log only.
    Internal {
        detail: String,
    },
}

/// What the request layer logs about a failed request, carried in the
/// response's extensions: the whole text, internal detail included.
#[derive(Debug, Clone)]
pub(crate) struct ErrorReport {
    pub kind: ErrorType,
    pub code: Option<&'static str>,
    pub detail: String,
}

/// An error as the client sees it.
struct Described {
    status: StatusCode,
    /// The whole text: the client's message, unless `internal`.
    message: String,
    /// The text is the node's internal detail: the client gets a request
    /// id instead, the log the text.
    internal: bool,
    param: Option<String>,
    code: Option<&'static str>,
}

impl Described {
    fn new(status: StatusCode, message: String) -> Self {
        Self {
            status,
            message,
            internal: false,
            param: None,
            code: None,
        }
    }

    fn internal(detail: String) -> Self {
        Self {
            internal: true,
            ..Self::new(StatusCode::INTERNAL_SERVER_ERROR, detail)
        }
    }

    fn param(self, param: &str) -> Self {
        Self {
            param: Some(param.to_string()),
            ..self
        }
    }

    fn code(self, code: &'static str) -> Self {
        Self {
            code: Some(code),
            ..self
        }
    }
}

impl ApiError {
    pub fn invalid_request(message: impl Into<String>) -> Self {
        ApiError::InvalidRequest {
            message: message.into(),
            param: None,
        }
    }

    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        ApiError::InvalidRequest {
            message: message.into(),
            param: Some(param.to_string()),
        }
    }

    pub fn internal(detail: impl Into<String>) -> Self {
        ApiError::Internal {
            detail: detail.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.describe().status
    }

    pub fn kind(&self) -> ErrorType {
        error_type(self.status())
    }

    /// The body the client gets. Internal detail is replaced by the
    /// request id, which finds it in the log.
    pub fn body(&self, request_id: Option<&str>) -> ErrorBody {
        let described = self.describe();
        let message = match (described.internal, request_id) {
            (false, _) => described.message,
            (true, Some(id)) => format!("internal error; quote request id {id}"),
            (true, None) => "internal error".to_string(),
        };
        ErrorBody {
            error: ErrorDetail {
                message,
                kind: error_type(described.status),
                param: described.param,
                code: described.code.map(str::to_string),
            },
        }
    }

    /// Status, message, `param` and `code` of each error.
    fn describe(&self) -> Described {
        match self {
            Self::InvalidRequest { message, param } => Described {
                param: param.clone(),
                ..Described::new(StatusCode::BAD_REQUEST, message.clone())
            },
            Self::UnreadableBody(rejection) => Described::new(
                rejection.status(),
                format!("Cannot read the request body: {}", rejection.body_text()),
            ),
            Self::NotAnObject => Described::new(
                StatusCode::BAD_REQUEST,
                "The request body must be a JSON object, like {\"model\": \"...\", \"messages\": [...]}."
                    .into(),
            ),
            Self::BadJson { path, error } => match error.classify() {
                serde_json::error::Category::Data if path != "." => Described::new(
                    StatusCode::BAD_REQUEST,
                    format!("Invalid value for `{path}`: {error}"),
                )
                .param(path),
                serde_json::error::Category::Data => Described::new(
                    StatusCode::BAD_REQUEST,
                    format!("Invalid request: {error}"),
                ),
                _ => Described::new(
                    StatusCode::BAD_REQUEST,
                    format!("The request body is not valid JSON: {error}"),
                ),
            },
            Self::ModelNotFound { model, available } => Described::new(
                StatusCode::NOT_FOUND,
                format!(
                    "The model `{model}` does not exist on this node. Available models: {}.",
                    available.join(", ")
                ),
            )
            .param("model")
            .code("model_not_found"),
            Self::NotInCatalogue { name, known } => Described::new(
                StatusCode::NOT_FOUND,
                format!(
                    "`{name}` is not in ringlet's catalogue, so nodes cannot fetch it by name; \
                     known models: {}. Copy another GGUF file to each node and start it with \
                     --model PATH.",
                    known.join(", ")
                ),
            )
            .param("model")
            .code("model_not_found"),
            Self::ContextLengthExceeded {
                context_tokens,
                prompt_tokens,
                completion_tokens,
            } => Described::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "This model's maximum context length is {context_tokens} tokens. However, you \
                     requested {} tokens ({prompt_tokens} in the messages, {completion_tokens} in \
                     the completion). Please reduce the length of the messages or completion.",
                    prompt_tokens.saturating_add(*completion_tokens)
                ),
            )
            .param("messages")
            .code("context_length_exceeded"),
            Self::Prompt(error @ PromptError::TooLong { .. }) => {
                Described::new(StatusCode::BAD_REQUEST, error.to_string())
                    .param("messages")
                    .code("context_length_exceeded")
            }
            Self::Prompt(error @ PromptError::Template(_)) => {
                Described::new(StatusCode::BAD_REQUEST, error.to_string()).param("messages")
            }
            Self::Prompt(error @ PromptError::Tokenize(_)) => Described::internal(error.to_string()),
            Self::Submit(error @ SubmitError::Busy) => {
                Described::new(StatusCode::SERVICE_UNAVAILABLE, error.to_string())
                    .code("server_busy")
            }
            Self::Submit(
                error @ (SubmitError::TooLarge { .. } | SubmitError::TooLargeForCluster { .. }),
            ) => {
                Described::new(StatusCode::BAD_REQUEST, error.to_string()).param("max_tokens")
            }
            Self::Submit(error @ SubmitError::Stopped) => Described::internal(error.to_string()),
            Self::ClusterNotReady { reason } => Described::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("The cluster cannot serve requests now: {reason}"),
            )
            .code("cluster_not_ready"),
            Self::GenerationFailed { reason } => Described::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("Generation failed: {reason}"),
            ),
            Self::Policy(error) => describe_policy_error(error),
            Self::AdminDisabled(change) => Described::new(
                StatusCode::FORBIDDEN,
                format!(
                    "This node does not accept {}: it was started without an admin token. \
                     Restart it with --admin-token <TOKEN> (or RINGLET_ADMIN_TOKEN) to allow them.",
                    change.changes()
                ),
            )
            .code(change.disabled_code()),
            Self::AdminToken { change, given } => Described::new(
                StatusCode::UNAUTHORIZED,
                if *given {
                    "The admin token is wrong.".to_string()
                } else {
                    format!(
                        "{} need the node's admin token: send `Authorization: Bearer <TOKEN>`.",
                        capitalized(change.changes())
                    )
                },
            )
            .code("invalid_admin_token"),
            Self::ApiKey { given } => Described::new(
                StatusCode::UNAUTHORIZED,
                if *given {
                    "The API key is wrong. Check the key the node was started with (--api-key, --api-key-file or RINGLET_API_KEY).".to_string()
                } else {
                    "This node requires an API key: send `Authorization: Bearer <KEY>` (the openai client's api_key).".to_string()
                },
            )
            .code("invalid_api_key"),
            Self::LocalOnly => Described::new(
                StatusCode::FORBIDDEN,
                "This node answers API requests from its own machine only, because it has no API key. \
                 Restart it with --api-key <KEY> (or RINGLET_API_KEY) and send `Authorization: Bearer <KEY>`, \
                 or with --open-api to let anyone who reaches it use it without a key."
                    .to_string(),
            )
            .code("api_key_required"),
            Self::TooManyFailedAttempts { retry_after_secs } => Described::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "Too many failed API key attempts from this address; try again in {retry_after_secs} s."
                ),
            )
            .code("rate_limit_exceeded"),
            Self::NotAPeer => Described::new(
                StatusCode::FORBIDDEN,
                "Model files are served to this cluster's nodes only (the request must prove the cluster secret)."
                    .to_string(),
            )
            .code("not_a_cluster_node"),
            Self::NoRoute { path } => Described::new(
                StatusCode::NOT_FOUND,
                format!(
                    "No route for {path}. The OpenAI-compatible API is under /v1 (see /v1/models)."
                ),
            )
            .code("not_found"),
            Self::MethodNotAllowed { path } => Described::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{path} does not accept this HTTP method."),
            ),
            Self::NotHeld { etag } => Described::new(
                StatusCode::NOT_FOUND,
                format!("This node holds no such bytes of a model file with ETag {etag}; ask another node or the Hub."),
            )
            .code("not_held"),
            Self::PeerReadsBusy => Described::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("This node has been sending {MAX_PEER_RANGE_READS} ranges of model files to peers for a while; ask another node or the Hub."),
            )
            .code("busy"),
            Self::BadRange { reason } => Described::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                format!("The Range header is not one this node serves: {reason}."),
            )
            .code("bad_range"),
            Self::UpgradeRequired => Described::new(
                StatusCode::UPGRADE_REQUIRED,
                format!("/v1/ring/link is for ringlet nodes: send `Upgrade: {UPGRADE_TOKEN}`."),
            ),
            Self::ProtocolMismatch { theirs } => {
                let theirs = theirs.map_or_else(|| "no".to_string(), |v| v.to_string());
                Described::new(
                    StatusCode::CONFLICT,
                    format!(
                        "this node speaks ringlet protocol {PROTOCOL_VERSION}, the peer speaks \
                         {theirs}; run the same ringlet version on every node"
                    ),
                )
                .code("protocol_mismatch")
            }
            Self::Internal { detail } => Described::internal(detail.clone()),
        }
    }
}

/// OpenAI's `type`, from the status: every 4xx is the request's fault, a
/// 503 says "not now", any other 5xx is the node's fault.
fn error_type(status: StatusCode) -> ErrorType {
    if status == StatusCode::SERVICE_UNAVAILABLE {
        ErrorType::ServiceUnavailableError
    } else if status.is_server_error() {
        ErrorType::ServerError
    } else {
        ErrorType::InvalidRequestError
    }
}

/// A policy change that did not happen: refused (413 too large, 409
/// outdated, 503 busy, 422 anything wrong with the policy) or not
/// answered in time (503).
fn describe_policy_error(error: &SetPolicyError) -> Described {
    let refusal = match error {
        SetPolicyError::StillRunning => {
            return Described::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("No answer yet: {error}."),
            )
            .code("policy_change_pending");
        }
        SetPolicyError::Refused(refusal) => refusal,
    };
    let status = match refusal {
        PolicyError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        PolicyError::Outdated => StatusCode::CONFLICT,
        PolicyError::Busy | PolicyError::Stopped => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::UNPROCESSABLE_ENTITY,
    };
    let message = match refusal {
        PolicyError::Outdated | PolicyError::Busy | PolicyError::Stopped => {
            format!("The policy was not changed: {refusal}.")
        }
        _ => format!("The policy was refused and nothing changed: {refusal}"),
    };
    Described::new(status, message).code("policy_refused")
}

fn capitalized(text: &str) -> String {
    let mut chars = text.chars();
    chars
        .next()
        .map(|first| first.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

impl From<serde_path_to_error::Error<serde_json::Error>> for ApiError {
    fn from(error: serde_path_to_error::Error<serde_json::Error>) -> Self {
        let path = error.path().to_string();
        ApiError::BadJson {
            path,
            error: error.into_inner(),
        }
    }
}

impl From<BytesRejection> for ApiError {
    fn from(rejection: BytesRejection) -> Self {
        ApiError::UnreadableBody(rejection)
    }
}

impl From<PromptError> for ApiError {
    fn from(error: PromptError) -> Self {
        ApiError::Prompt(error)
    }
}

impl From<SubmitError> for ApiError {
    fn from(error: SubmitError) -> Self {
        ApiError::Submit(error)
    }
}

impl From<SetPolicyError> for ApiError {
    fn from(error: SetPolicyError) -> Self {
        ApiError::Policy(error)
    }
}

impl From<tokio::task::JoinError> for ApiError {
    fn from(error: tokio::task::JoinError) -> Self {
        ApiError::internal(format!("a blocking task failed: {error}"))
    }
}

impl From<PolicyError> for ApiError {
    fn from(error: PolicyError) -> Self {
        ApiError::Policy(SetPolicyError::Refused(error))
    }
}

impl fmt::Display for ApiError {
    /// The whole text, internal detail included: for logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe().message)
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let request_id = request_id::current();
        let body = self.body(request_id.as_deref());
        let described = self.describe();
        let report = ErrorReport {
            kind: body.error.kind,
            code: described.code,
            detail: described.message,
        };
        let mut response = (described.status, Json(body)).into_response();
        if let ApiError::AdminToken { .. } | ApiError::ApiKey { .. } = self {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let ApiError::TooManyFailedAttempts { retry_after_secs } = self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
        }
        response.extensions_mut().insert(report);
        response
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a failed expectation is the report

    use super::*;

    #[test]
    fn unavailable_is_not_invalid_and_internal_is_hidden() {
        type Case = (ApiError, StatusCode, ErrorType, Option<&'static str>);
        let cases: Vec<Case> = vec![
            (
                ApiError::Submit(SubmitError::Busy),
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorType::ServiceUnavailableError,
                Some("server_busy"),
            ),
            (
                ApiError::ClusterNotReady {
                    reason: "no plan".into(),
                },
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorType::ServiceUnavailableError,
                Some("cluster_not_ready"),
            ),
            (
                ApiError::Policy(SetPolicyError::StillRunning),
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorType::ServiceUnavailableError,
                Some("policy_change_pending"),
            ),
            (
                PolicyError::Busy.into(),
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorType::ServiceUnavailableError,
                Some("policy_refused"),
            ),
            (
                PolicyError::Outdated.into(),
                StatusCode::CONFLICT,
                ErrorType::InvalidRequestError,
                Some("policy_refused"),
            ),
            (
                ApiError::Submit(SubmitError::Stopped),
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorType::ServerError,
                None,
            ),
            (
                ApiError::AdminToken {
                    change: Admin::Policy,
                    given: false,
                },
                StatusCode::UNAUTHORIZED,
                ErrorType::InvalidRequestError,
                Some("invalid_admin_token"),
            ),
        ];
        for (error, status, kind, code) in cases {
            let body = error.body(Some("r1"));
            assert_eq!(error.status(), status, "{error:?}");
            assert_eq!(body.error.kind, kind, "{error:?}");
            assert_eq!(body.error.code.as_deref(), code, "{error:?}");
        }
        let error = ApiError::internal("the disk is on fire");
        let message = error.body(Some("r1")).error.message;
        assert_eq!(message, "internal error; quote request id r1");
        let message = ApiError::Prompt(PromptError::Tokenize("bad byte".into()))
            .body(None)
            .error
            .message;
        assert_eq!(message, "internal error");
    }

    #[test]
    fn wrong_tokens_ask_for_a_bearer_token() {
        let response = ApiError::AdminToken {
            change: Admin::Models,
            given: true,
        }
        .into_response();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer");
        let report = response.extensions().get::<ErrorReport>().unwrap();
        assert_eq!(report.detail, "The admin token is wrong.");
    }

    #[test]
    fn messages_start_with_a_capital() {
        assert_eq!(capitalized("model downloads"), "Model downloads");
        assert_eq!(capitalized(""), "");
    }
}
