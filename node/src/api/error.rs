//! API errors in OpenAI's JSON shape:
//! `{"error": {"message", "type", "param", "code"}}` with a fitting status.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// An error an API client can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `server_error`, ...
    pub kind: &'static str,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    /// A stable machine-readable code, e.g. `model_not_found`.
    pub code: Option<&'static str>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
pub(crate) struct ErrorDetail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: None,
        }
    }

    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.to_string()),
            ..Self::invalid_request(message)
        }
    }

    pub fn model_not_found(model: &str, available: &[String]) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "The model `{model}` does not exist on this node. Available models: {}.",
                available.join(", ")
            ),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        }
    }

    pub fn context_length_exceeded(message: String) -> Self {
        Self {
            param: Some("messages".into()),
            code: Some("context_length_exceeded"),
            ..Self::invalid_request(message)
        }
    }

    pub fn not_found(path: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "No route for {path}. The OpenAI-compatible API is under /v1 (see /v1/models)."
            ),
            kind: "invalid_request_error",
            param: None,
            code: Some("not_found"),
        }
    }

    pub fn busy(message: String) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message,
            kind: "server_error",
            param: None,
            code: Some("server_busy"),
        }
    }

    pub fn not_ready(reason: String) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: format!("The cluster cannot serve requests now: {reason}"),
            kind: "server_error",
            param: None,
            code: Some("cluster_not_ready"),
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    pub(crate) fn detail(&self) -> ErrorDetail<'_> {
        ErrorDetail {
            message: &self.message,
            kind: self.kind,
            param: self.param.as_deref(),
            code: self.code,
        }
    }

    /// The JSON body, for SSE streams that fail after the status was sent.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({ "error": self.detail() })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = %self.status, message = %self.message, "request failed");
        } else {
            tracing::debug!(status = %self.status, message = %self.message, "request rejected");
        }
        (
            self.status,
            Json(ErrorBody {
                error: self.detail(),
            }),
        )
            .into_response()
    }
}
