//! The ringlet dashboard: chat, cluster, models and policy, rendered in
//! the browser by Leptos. It talks to the node that serves it only through
//! the node's HTTP API (`api.rs`).

mod admin;
mod api;
mod chat;
mod cluster;
mod format;
mod markdown;
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

/// Follows the node's cluster feed for the page's lifetime. The browser
/// reconnects by itself after an error.
fn follow_cluster(shared: Shared) {
    let set_error = move |error: Option<String>| {
        if shared.cluster_error.get_untracked() != error {
            shared.cluster_error.set(error);
        }
    };
    let feed = match web_sys::EventSource::new("/v1/cluster/events") {
        Ok(feed) => feed,
        Err(error) => {
            set_error(Some(format!(
                "cannot follow the cluster: {}",
                api::js_error(error)
            )));
            return;
        }
    };
    let on_view =
        Closure::<dyn FnMut(web_sys::MessageEvent)>::new(move |event: web_sys::MessageEvent| {
            let text = event.data().as_string().unwrap_or_default();
            match serde_json::from_str::<ClusterView>(&text) {
                Ok(view) => {
                    if shared.cluster.get_untracked().as_ref() != Some(&view) {
                        shared.cluster.set(Some(view));
                    }
                    set_error(None);
                }
                Err(error) => set_error(Some(format!(
                    "the node sent an unreadable cluster view: {error}"
                ))),
            }
        });
    let on_error = Closure::<dyn FnMut()>::new(move || {
        set_error(Some(
            "Lost the connection to the node; reconnecting…".into(),
        ));
    });
    let listening =
        feed.add_event_listener_with_callback("cluster", on_view.as_ref().unchecked_ref());
    if let Err(error) = listening {
        set_error(Some(format!(
            "cannot follow the cluster: {}",
            api::js_error(error)
        )));
    }
    feed.set_onerror(Some(on_error.as_ref().unchecked_ref()));
    // The feed and its handlers live as long as the page.
    on_view.forget();
    on_error.forget();
    std::mem::forget(feed);
}

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
