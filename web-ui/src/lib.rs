//! The ringlet dashboard: chat, cluster, models and policy, rendered in
//! the browser by Leptos. It talks to the node that serves it only through
//! the node's HTTP API (`api.rs`).

mod access;
mod admin;
mod api;
mod chat;
mod cluster;
mod format;
mod markdown;
mod members;
mod models;
mod policy;

use api_types::{ClusterView, PlanState};
use leptos::prelude::*;
use wasm_bindgen::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Page {
    Chat,
    Cluster,
    Models,
    Policy,
}

impl Page {
    const ALL: [Page; 4] = [Page::Chat, Page::Cluster, Page::Models, Page::Policy];

    fn slug(self) -> &'static str {
        match self {
            Page::Chat => "chat",
            Page::Cluster => "cluster",
            Page::Models => "models",
            Page::Policy => "policy",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Page::Chat => "Chat",
            Page::Cluster => "Cluster",
            Page::Models => "Models",
            Page::Policy => "Policy",
        }
    }

    /// The page the address names (`#/cluster`), the chat by default.
    fn current() -> Page {
        let hash = window().location().hash().unwrap_or_default();
        let slug = hash.trim_start_matches('#').trim_start_matches('/');
        Page::ALL
            .into_iter()
            .find(|p| p.slug() == slug)
            .unwrap_or(Page::Chat)
    }
}

/// What the pages share. It lives as long as the app, so a conversation
/// or an upload's answer survives moving between pages.
#[derive(Clone, Copy)]
pub struct Shared {
    /// The cluster view, as the node's `/v1/cluster/events` last sent it.
    pub cluster: RwSignal<Option<ClusterView>>,
    /// Why the feed is down, while it is.
    pub cluster_error: RwSignal<Option<String>>,
    pub chat: chat::ChatState,
}

#[wasm_bindgen(start)]
pub fn start() {
    console_error_panic_hook::set_once();
    leptos::mount::mount_to_body(App);
}

#[component]
fn App() -> impl IntoView {
    let page = RwSignal::new(Page::current());
    let on_hash_change = Closure::<dyn FnMut()>::new(move || page.set(Page::current()));
    window().set_onhashchange(Some(on_hash_change.as_ref().unchecked_ref()));
    // The listener lives as long as the page.
    on_hash_change.forget();

    let shared = Shared {
        cluster: RwSignal::new(None),
        cluster_error: RwSignal::new(None),
        chat: chat::ChatState::new(),
    };
    provide_context(shared);
    let refusal = access::refusal_signal();
    follow_cluster(shared);

    view! {
        <div class="app">
            <header class="top">
                <div class="brand">{logo()}<span>"ringlet"</span></div>
                <nav class="tabs">
                    {Page::ALL
                        .into_iter()
                        .map(|p| {
                            view! {
                                <a
                                    href=format!("#/{}", p.slug())
                                    class:active=move || page.get() == p
                                    data-page=p.slug()
                                >
                                    {p.title()}
                                </a>
                            }
                        })
                        .collect_view()}
                </nav>
                <StatusPill />
            </header>
            <access::ApiKeyBanner refusal=refusal />
            <main>
                {move || match page.get() {
                    Page::Chat => view! { <chat::ChatPage /> }.into_any(),
                    Page::Cluster => view! { <cluster::ClusterPage /> }.into_any(),
                    Page::Models => view! { <models::ModelsPage /> }.into_any(),
                    Page::Policy => view! { <policy::PolicyPage /> }.into_any(),
                }}
            </main>
        </div>
    }
}

/// Follows the node's cluster feed for the page's lifetime, reconnecting
/// after an error. It is read with `fetch` rather than an `EventSource`
/// so that it carries the API key.
fn follow_cluster(shared: Shared) {
    let set_error = move |error: Option<String>| {
        if shared.cluster_error.get_untracked() != error {
            shared.cluster_error.set(error);
        }
    };
    wasm_bindgen_futures::spawn_local(async move {
        loop {
            let followed = api::follow_events("/v1/cluster/events", |event| {
                if event.name != "cluster" {
                    return Ok(true);
                }
                match serde_json::from_str::<ClusterView>(&event.data) {
                    Ok(view) => {
                        if shared.cluster.get_untracked().as_ref() != Some(&view) {
                            shared.cluster.set(Some(view));
                        }
                        set_error(None);
                        Ok(true)
                    }
                    Err(error) => Err(format!(
                        "the node sent an unreadable cluster view: {error}"
                    )),
                }
            })
            .await;
            let error = followed.err().unwrap_or_default();
            if access::refused() {
                // The banner asks for the key; the page reloads with it.
                set_error(Some(error));
                return;
            }
            set_error(Some(format!(
                "Lost the connection to the node ({error}); reconnecting…"
            )));
            api::sleep_ms(RECONNECT_MS).await;
        }
    });
}

/// How long the cluster feed waits before it reconnects.
const RECONNECT_MS: i32 = 2_000;

/// The cluster's state in a word, on every page.
#[component]
fn StatusPill() -> impl IntoView {
    let shared = expect_context::<Shared>();
    let state = move || {
        if shared.cluster_error.get().is_some() {
            return ("bad", "node unreachable".to_string());
        }
        let Some(view) = shared.cluster.get() else {
            return ("", "connecting…".to_string());
        };
        let nodes = view.nodes.len();
        let noun = if nodes == 1 { "node" } else { "nodes" };
        match view.plan.as_ref().map(|p| p.state) {
            Some(PlanState::Active) => ("ok", format!("{nodes} {noun} · ready")),
            Some(PlanState::Loading) => ("warn", format!("{nodes} {noun} · loading")),
            None => ("warn", format!("{nodes} {noun} · no plan")),
        }
    };
    view! {
        <div class="status-pill" data-testid="status">
            <span class=move || format!("dot {}", state().0)></span>
            {move || state().1}
        </div>
    }
}

fn logo() -> impl IntoView {
    view! {
        <svg viewBox="0 0 32 32" aria-hidden="true">
            <circle
                cx="16"
                cy="16"
                r="11"
                fill="none"
                stroke="#6d5dfc"
                stroke-width="6"
                stroke-dasharray="14 3.3"
            />
        </svg>
    }
}
