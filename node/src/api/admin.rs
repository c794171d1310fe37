//! The admin token: changes to the cluster (its policy, the models on its
//! nodes) need `Authorization: Bearer <TOKEN>` with the node's token.

use axum::http::{HeaderMap, header};

use super::{ApiError, AppState};

/// What an admin request changes, for its error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admin {
    Policy,
    Models,
    Switch,
}

impl Admin {
    pub(super) fn changes(self) -> &'static str {
        match self {
            Admin::Policy => "policy changes",
            Admin::Models => "model downloads",
            Admin::Switch => "model switches",
        }
    }

    pub(super) fn disabled_code(self) -> &'static str {
        match self {
            Admin::Policy => "policy_changes_disabled",
            Admin::Models => "model_downloads_disabled",
            Admin::Switch => "model_switches_disabled",
        }
    }
}

/// Whether the request may make this change: [`ApiError::AdminDisabled`]
/// (403) when the node was started without an admin token,
/// [`ApiError::AdminToken`] (401) when the token is missing or wrong.
pub(super) fn check(state: &AppState, headers: &HeaderMap, change: Admin) -> Result<(), ApiError> {
    let Some(expected) = &state.admin_token else {
        return Err(ApiError::AdminDisabled(change));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    match given {
        Some(token) if same_secret(token.as_bytes(), expected.as_bytes()) => Ok(()),
        _ => Err(ApiError::AdminToken {
            change,
            given: given.is_some(),
        }),
    }
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
}
