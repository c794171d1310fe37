//! The admin token that cluster changes need, kept for this browser tab.

use leptos::prelude::*;

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
pub fn remember_token(token: &str) {
    if let Some(storage) = session_storage() {
        let _ = storage.set_item(TOKEN_KEY, token);
    }
}

/// The `Authorization` header value for `token`.
pub fn bearer(token: &str) -> String {
    format!("Bearer {}", token.trim())
}

/// A password field bound to `token`.
pub fn token_field(token: RwSignal<String>) -> impl IntoView {
    view! {
        <label class="field">
            <span>"Admin token"</span>
            <input
                type="password"
                placeholder="the node's --admin-token"
                data-testid="admin-token"
                prop:value=move || token.get()
                on:input=move |ev| token.set(event_target_value(&ev))
            />
        </label>
    }
}
