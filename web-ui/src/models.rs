//! The models page: the models the node knows and, per node, whether its
//! file is there, downloading or loaded; fetching a missing one onto every
//! node that lacks it; switching the cluster to another model (a Hugging
//! Face repository, say) without restarting a node.

use api_types::{
    DownloadStarted, KnownModel, KnownModels, ModelAvailability, ModelState, NodeView,
    SwitchStarted,
};
use leptos::prelude::*;

use crate::{Shared, admin, api, format};

#[component]
pub fn ModelsPage() -> impl IntoView {
    let shared = expect_context::<Shared>();
    // Asked again whenever the models the nodes report change: a switch
    // adds one, and moves the "serving" mark.
    let reported = Memo::new(move |_| {
        let mut names: Vec<String> = shared
            .cluster
            .get()
            .map(|view| view.nodes)
            .unwrap_or_default()
            .iter()
            .flat_map(|node| node.models.iter())
            .map(|m| format!("{} {:?}", m.name, m.state))
            .collect();
        names.sort();
        names.dedup();
        names
    });
    let known = LocalResource::new(move || {
        reported.track();
        api::get_json::<KnownModels>("/v1/cluster/models")
    });
    let token = RwSignal::new(admin::stored_token());
    let outcome = RwSignal::new(None::<admin::Outcome>);
    let download = Callback::new(move |model: String| {
        let token = token.get_untracked();
        outcome.set(None);
        leptos::task::spawn_local(async move {
            let url = format!("/v1/cluster/models/{model}/download");
            let answer = admin::send("POST", &url, &token, None).await;
            outcome.set(Some(answer.map(|body| {
                serde_json::from_str::<DownloadStarted>(&body)
                    .map(|started| started.message)
                    .unwrap_or_else(|_| format!("Fetching {model}."))
            })));
        });
    });
    let wanted = RwSignal::new(String::new());
    let switch = move || {
        let token = token.get_untracked();
        let model = wanted.get_untracked().trim().to_string();
        outcome.set(None);
        leptos::task::spawn_local(async move {
            let body = serde_json::json!({ "model": model }).to_string();
            let body = Some(("application/json", wasm_bindgen::JsValue::from_str(&body)));
            let answer = admin::send("POST", "/v1/cluster/models", &token, body).await;
            outcome.set(Some(answer.map(|body| {
                serde_json::from_str::<SwitchStarted>(&body)
                    .map(|started| started.message)
                    .unwrap_or_else(|_| format!("Switching to {model}."))
            })));
        });
    };
    view! {
        <h1>"Models"</h1>
        <p class="subtitle">
            "Models ringlet can fetch by name, and where their files are. Every node serves the same model; "
            "fetch one onto every node ahead of time here, or with "<code>"ringlet pull NAME"</code>" on a node."
        </p>
        {move || outcome.get().map(|o| admin::notice(o, "", "download-outcome"))}
        {move || match known.get() {
            None => view! { <div class="panel muted">"Asking the node…"</div> }.into_any(),
            Some(Err(error)) => view! { <div class="notice error">{error}</div> }.into_any(),
            Some(Ok(known)) => {
                let nodes = shared.cluster.get().map(|c| c.nodes).unwrap_or_default();
                table(&known, &nodes, download).into_any()
            }
        }}
        <div class="panel section" data-testid="switch-panel">
            <h2>"Serve another model"</h2>
            <p class="muted">
                "A Hugging Face repository as "<code>"ORG/REPO:QUANT"</code>" (each node fetches only its layers), "
                "a catalogue name, or a GGUF path every node has. Every node switches without a restart; "
                "requests running then fail and can be retried."
            </p>
            <form class="inline-form" on:submit=move |ev| {
                ev.prevent_default();
                switch();
            }>
                <input
                    type="text"
                    placeholder="bartowski/Qwen2.5-7B-Instruct-GGUF:Q4_K_M"
                    data-testid="switch-model"
                    prop:value=move || wanted.get()
                    on:input=move |ev| wanted.set(event_target_value(&ev))
                />
                <button class="btn primary" type="submit" data-testid="switch" disabled=move || wanted.get().trim().is_empty()>
                    "Fetch and switch"
                </button>
            </form>
        </div>
        <div class="panel section token-panel">
            {admin::token_field(token)}
            <p class="muted">"Downloads and switches change what the nodes store and serve, so they need the admin token."</p>
        </div>
    }
}

fn table(
    known: &KnownModels,
    nodes: &[NodeView],
    download: Callback<String>,
) -> impl IntoView + use<> {
    let header: Vec<_> = nodes
        .iter()
        .map(|n| view! { <th>{n.name.clone()}</th> })
        .collect();
    let rows: Vec<_> = known
        .models
        .iter()
        .map(|model| {
            let cells: Vec<_> = nodes
                .iter()
                .map(|node| {
                    let availability = node.models.iter().find(|m| m.name == model.id);
                    view! {
                        <td data-testid="availability" data-node=node.name.clone()>
                            {state_cell(availability)}
                        </td>
                    }
                })
                .collect();
            view! {
                <tr data-testid="model-row" data-model=model.id.clone()>
                    <td>
                        <strong>{model.id.clone()}</strong>
                        {model.served.then(|| view! { <span class="badge" style="margin-left: 8px">"serving"</span> })}
                        <div class="muted">{model.description.clone()}</div>
                    </td>
                    <td>{model.size_bytes.map(format::bytes).unwrap_or_default()}</td>
                    {cells}
                    <td>{download_button(model, nodes, download)}</td>
                </tr>
            }
        })
        .collect();
    view! {
        <div class="panel">
            <table class="data" data-testid="models">
                <thead>
                    <tr>
                        <th>"Model"</th>
                        <th>"Size"</th>
                        {header}
                        <th></th>
                    </tr>
                </thead>
                <tbody>{rows}</tbody>
            </table>
        </div>
    }
}

/// "Download" while some node lacks a catalogue model and none is fetching
/// it already.
fn download_button(
    model: &KnownModel,
    nodes: &[NodeView],
    download: Callback<String>,
) -> Option<impl IntoView + use<>> {
    let states: Vec<ModelState> = nodes
        .iter()
        .map(|node| {
            node.models
                .iter()
                .find(|m| m.name == model.id)
                .map_or(ModelState::Missing, |m| m.state)
        })
        .collect();
    let lacking = states.contains(&ModelState::Missing);
    let busy = states.contains(&ModelState::Downloading);
    (model.downloadable && lacking && !busy).then(|| {
        let id = model.id.clone();
        view! {
            <button class="btn primary" data-testid="download" on:click=move |_| download.run(id.clone())>
                "Download to every node"
            </button>
        }
    })
}

fn state_cell(availability: Option<&ModelAvailability>) -> AnyView {
    let Some(availability) = availability else {
        return view! { <span class="muted">"unknown"</span> }.into_any();
    };
    match availability.state {
        ModelState::Loaded => view! { <span class="badge ok">"loaded"</span> }.into_any(),
        ModelState::Present => view! { <span class="badge plain">"file present"</span> }.into_any(),
        ModelState::Downloading => {
            let done = availability.downloaded_bytes.unwrap_or(0);
            let total = availability.total_bytes.unwrap_or(0);
            let width = format!("width: {}%", format::percent(done, total));
            view! {
                <div data-testid="download-progress">
                    <div class="progress"><div style=width></div></div>
                    <span class="muted">
                        {format!("downloading {} of {}", format::bytes(done), format::bytes(total))}
                    </span>
                </div>
            }
            .into_any()
        }
        ModelState::Missing => match availability.error.clone() {
            Some(error) => view! {
                <div>
                    <span class="badge warn">"failed"</span>
                    <div class="cell-error" data-testid="download-error">{error}</div>
                </div>
            }
            .into_any(),
            None => view! { <span class="muted">"not downloaded"</span> }.into_any(),
        },
    }
}
