//! The admin token: changes to the cluster (its policy, the models on its
//! nodes) need `Authorization: Bearer <TOKEN>` with the node's token.

use axum::http::HeaderMap;

use super::access::{bearer, same_secret};
use super::{ApiError, AppState};

/// What an admin request changes, for its error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admin {
    Policy,
    Models,
    Switch,
    Membership,
}

impl Admin {
    pub(super) fn changes(self) -> &'static str {
        match self {
            Admin::Policy => "policy changes",
            Admin::Models => "model downloads",
            Admin::Switch => "model switches",
            Admin::Membership => "invitations and removals of nodes",
        }
    }

    pub(super) fn disabled_code(self) -> &'static str {
        match self {
            Admin::Policy => "policy_changes_disabled",
            Admin::Models => "model_downloads_disabled",
            Admin::Switch => "model_switches_disabled",
            Admin::Membership => "membership_changes_disabled",
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
    let given = bearer(headers);
    match given {
        Some(token) if same_secret(token.as_bytes(), expected.as_bytes()) => Ok(()),
        _ => Err(ApiError::AdminToken {
            change,
            given: given.is_some(),
        }),
    }
}
