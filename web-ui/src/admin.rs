//! The admin token that cluster changes need, kept for this browser tab.

use leptos::prelude::*;
use wasm_bindgen::JsValue;

use crate::api;

/// Where the admin token is kept for this browser tab.
const TOKEN_KEY: &str = "ringlet-admin-token";

fn session_storage() -> Option<web_sys::Storage> {
    web_sys::window().and_then(|w| w.session_storage().ok().flatten())
}

pub fn stored_token() -> String {
    session_storage()
        .and_then(|s| s.get_item(TOKEN_KEY).ok().flatten())
        .unwrap_or_default()
}

/// Kept for this tab only (session storage), so a reload does not ask again.
fn remember_token(token: &str) {
    if let Some(storage) = session_storage() {
        let _ = storage.set_item(TOKEN_KEY, token);
    }
}

/// What an admin request came to: the node's answer body, or its refusal
/// in its own words.
pub type Outcome = Result<String, String>;

/// Sends an admin request with `token` (remembered for the tab) and an
/// optional body with its content type.
pub async fn send(method: &str, url: &str, token: &str, body: Option<(&str, JsValue)>) -> Outcome {
    remember_token(token);
    let authorization = format!("Bearer {}", token.trim());
    let mut headers = vec![("Authorization", authorization.as_str())];
    if let Some((content_type, _)) = &body {
        headers.push(("Content-Type", content_type));
    }
    let answer = api::send(method, url, &headers, body.as_ref().map(|(_, b)| b)).await?;
    if answer.ok() {
        Ok(answer.body)
    } else {
        Err(answer.error())
    }
}

/// A notice for an outcome whose success is already put in words:
/// green for success, red with the node's words for a refusal.
pub fn notice(outcome: Outcome, class: &'static str, testid: &'static str) -> AnyView {
    let (tone, text) = match outcome {
        Ok(text) => ("success", text),
        Err(text) => ("error", text),
    };
    view! { <div class=format!("notice {tone} {class}") data-testid=testid>{text}</div> }.into_any()
}

/// A password field bound to `token`.
pub fn token_field(token: RwSignal<String>) -> impl IntoView {
    secret_field("Admin token", "the node's --admin-token", "admin-token", token)
}

/// A labelled password field bound to `value`.
pub fn secret_field(
    label: &'static str,
    placeholder: &'static str,
    testid: &'static str,
    value: RwSignal<String>,
) -> impl IntoView {
    view! {
        <label class="field">
            <span>{label}</span>
            <input
                type="password"
                placeholder=placeholder
                data-testid=testid
                prop:value=move || value.get()
                on:input=move |ev| value.set(event_target_value(&ev))
            />
        </label>
    }
}
