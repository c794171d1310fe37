//! The API key this browser sends, kept in local storage for the node's
//! origin, and the banner that asks for it when the node requires one (or
//! says how to open a node that answers its own machine only).

use leptos::prelude::*;

/// Where the API key is kept, per origin (so per node).
const KEY_ITEM: &str = "ringlet-api-key";

fn local_storage() -> Option<web_sys::Storage> {
    web_sys::window().and_then(|w| w.local_storage().ok().flatten())
}

/// The key to send, if the user gave one.
pub fn stored_key() -> Option<String> {
    local_storage()
        .and_then(|s| s.get_item(KEY_ITEM).ok().flatten())
        .filter(|k| !k.trim().is_empty())
}

fn remember_key(key: &str) {
    if let Some(storage) = local_storage() {
        let _ = storage.set_item(KEY_ITEM, key.trim());
    }
}

/// The node turned the dashboard's API requests away.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The node's own words.
    pub message: String,
    /// A key would help (the node has keys); otherwise the node answers
    /// its own machine only and the message says how to open it.
    pub key_helps: bool,
}

thread_local! {
    /// Set once by the app; the API wrappers report refusals to it.
    static REFUSAL: std::cell::Cell<Option<RwSignal<Option<Refusal>>>> =
        const { std::cell::Cell::new(None) };
}

/// The signal the banner shows; created once, by the app.
pub fn refusal_signal() -> RwSignal<Option<Refusal>> {
    let signal = RwSignal::new(None);
    REFUSAL.with(|cell| cell.set(Some(signal)));
    signal
}

/// Whether the node turned the dashboard away (until the page reloads
/// with a key): the cluster feed stops asking, since every try with a
/// wrong key would count against this address.
pub fn refused() -> bool {
    REFUSAL.with(|cell| cell.get().is_some_and(|s| s.get_untracked().is_some()))
}

/// Reports an answer of the node: a 401 for the API key or a 403 for a
/// node that answers its own machine only raise the banner.
pub fn observe(status: u16, body: &str) {
    let code = serde_json::from_str::<api_types::ErrorBody>(body)
        .ok()
        .and_then(|b| b.error.code);
    let key_helps = match (status, code.as_deref()) {
        (401, Some("invalid_api_key")) => true,
        (403, Some("api_key_required")) => false,
        _ => return,
    };
    let refusal = Refusal {
        message: crate::api::error_message(status, body),
        key_helps,
    };
    REFUSAL.with(|cell| {
        if let Some(signal) = cell.get()
            && signal.get_untracked().as_ref() != Some(&refusal)
        {
            signal.set(Some(refusal));
        }
    });
}

/// Asks for the API key while the node refuses the dashboard.
#[component]
pub fn ApiKeyBanner(refusal: RwSignal<Option<Refusal>>) -> impl IntoView {
    let key = RwSignal::new(String::new());
    let save = move |_| {
        remember_key(&key.get_untracked());
        // Start over with the key: the cluster feed and every page.
        let _ = window().location().reload();
    };
    move || {
        refusal.get().map(|refusal| {
            view! {
                <div class="notice error banner" data-testid="api-key-banner">
                    <p>{refusal.message.clone()}</p>
                    {refusal
                        .key_helps
                        .then(|| {
                            view! {
                                <div class="row">
                                    {crate::admin::secret_field(
                                        "API key",
                                        "the node's --api-key",
                                        "api-key",
                                        key,
                                    )}
                                    <button class="btn primary" data-testid="api-key-save" on:click=save>
                                        "Use this key"
                                    </button>
                                </div>
                            }
                        })}
                </div>
            }
        })
    }
}
