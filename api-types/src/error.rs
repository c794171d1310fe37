//! OpenAI's error body, which every failed request of the API gets:
//! `{"error": {"message", "type", "param", "code"}}`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// What went wrong, in a sentence for people.
    pub message: String,
    #[serde(rename = "type")]
    pub kind: ErrorType,
    /// The request field at fault, if one is (`messages[0].content`).
    pub param: Option<String>,
    /// A stable machine-readable code, e.g. `model_not_found`.
    pub code: Option<String>,
}

/// OpenAI's error `type`: the class of the failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorType {
    /// The request cannot be served as sent (every 4xx).
    InvalidRequestError,
    /// The node cannot serve it now but may soon (503): busy, no plan yet.
    ServiceUnavailableError,
    /// The node failed (500); the message names a request id to quote.
    ServerError,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a failed expectation is the report

    use super::*;

    #[test]
    fn errors_have_openais_shape() {
        let body = ErrorBody {
            error: ErrorDetail {
                message: "busy".into(),
                kind: ErrorType::ServiceUnavailableError,
                param: None,
                code: Some("server_busy".into()),
            },
        };
        let json = r#"{"error":{"message":"busy","type":"service_unavailable_error","param":null,"code":"server_busy"}}"#;
        assert_eq!(serde_json::to_string(&body).unwrap(), json);
        assert_eq!(serde_json::from_str::<ErrorBody>(json).unwrap(), body);
    }
}
