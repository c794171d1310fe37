//! The admin token: changes to the cluster (its policy, the models on its
//! nodes) need `Authorization: Bearer <TOKEN>` with the node's token.

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::{ApiError, AppState};

/// What an admin request changes, for its error messages.
#[derive(Debug, Clone, Copy)]
pub(super) enum Admin {
    Policy,
    Models,
}

impl Admin {
    fn changes(self) -> &'static str {
        match self {
            Admin::Policy => "policy changes",
            Admin::Models => "model downloads",
        }
    }

    fn disabled_code(self) -> &'static str {
        match self {
            Admin::Policy => "policy_changes_disabled",
            Admin::Models => "model_downloads_disabled",
        }
    }
}

/// The refusal, if the request may not make this change: 403 when the
/// node was started without an admin token, 401 when the token is missing
/// or wrong.
pub(super) fn refusal(state: &AppState, headers: &HeaderMap, change: Admin) -> Option<Response> {
    check_token(state, headers, change).err().map(|error| {
        let unauthorized = error.status == StatusCode::UNAUTHORIZED;
        let mut response = error.into_response();
        if unauthorized {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    })
}

fn check_token(state: &AppState, headers: &HeaderMap, change: Admin) -> Result<(), ApiError> {
    let Some(expected) = &state.admin_token else {
        return Err(ApiError {
            status: StatusCode::FORBIDDEN,
            code: Some(change.disabled_code()),
            ..ApiError::invalid_request(format!(
                "This node does not accept {}: it was started without an admin token. Restart \
                 it with --admin-token <TOKEN> (or RINGLET_ADMIN_TOKEN) to allow them.",
                change.changes()
            ))
        });
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    match given {
        Some(token) if same_secret(token.as_bytes(), expected.as_bytes()) => Ok(()),
        _ => Err(ApiError {
            status: StatusCode::UNAUTHORIZED,
            code: Some("invalid_admin_token"),
            ..ApiError::invalid_request(if given.is_some() {
                "The admin token is wrong.".to_string()
            } else {
                format!(
                    "{} need the node's admin token: send `Authorization: Bearer <TOKEN>`.",
                    capitalized(change.changes())
                )
            })
        }),
    }
}

fn capitalized(text: &str) -> String {
    let mut chars = text.chars();
    chars
        .next()
        .map(|first| first.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

/// Compares two secrets in time that depends only on their lengths.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_exactly() {
        assert!(same_secret(b"s3cret", b"s3cret"));
        assert!(!same_secret(b"s3cres", b"s3cret"));
        assert!(!same_secret(b"s3cre", b"s3cret"));
        assert!(!same_secret(b"", b"s3cret"));
    }

    #[test]
    fn messages_start_with_a_capital() {
        assert_eq!(capitalized("model downloads"), "Model downloads");
        assert_eq!(capitalized(""), "");
    }
}
