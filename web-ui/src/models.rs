//! The models page: the models the node knows and, per node, whether its
//! file is there, downloading or loaded.

use leptos::prelude::*;

use crate::api::{self, KnownModels, NodeView};
use crate::{Shared, format};

#[component]
pub fn ModelsPage() -> impl IntoView {
    let shared = expect_context::<Shared>();
    let known = LocalResource::new(|| api::get_json::<KnownModels>("/v1/cluster/models"));
    view! {
        <h1>"Models"</h1>
        <p class="subtitle">
            "Models ringlet can fetch by name, and where their files are. Every node serves the same model; "
            <code>"ringlet pull NAME"</code> " fetches one ahead of time."
        </p>
        {move || match known.get() {
            None => view! { <div class="panel muted">"Asking the node…"</div> }.into_any(),
            Some(Err(error)) => view! { <div class="notice error">{error}</div> }.into_any(),
            Some(Ok(known)) => {
                let nodes = shared.cluster.get().map(|c| c.nodes).unwrap_or_default();
                table(&known, &nodes).into_any()
            }
        }}
    }
}

fn table(known: &KnownModels, nodes: &[NodeView]) -> impl IntoView + use<> {
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
                    view! { <td data-testid="availability">{state_cell(availability)}</td> }
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
                    </tr>
                </thead>
                <tbody>{rows}</tbody>
            </table>
        </div>
    }
}

fn state_cell(availability: Option<&api::ModelAvailability>) -> AnyView {
    let Some(availability) = availability else {
        return view! { <span class="muted">"unknown"</span> }.into_any();
    };
    match availability.state.as_str() {
        "loaded" => view! { <span class="badge ok">"loaded"</span> }.into_any(),
        "present" => view! { <span class="badge plain">"file present"</span> }.into_any(),
        "downloading" => {
            let done = availability.downloaded_bytes.unwrap_or(0);
            let total = availability.total_bytes.unwrap_or(0);
            let width = format!("width: {}%", format::percent(done, total));
            view! {
                <div>
                    <div class="progress"><div style=width></div></div>
                    <span class="muted">
                        {format!("downloading {} of {}", format::bytes(done), format::bytes(total))}
                    </span>
                </div>
            }
            .into_any()
        }
        _ => view! { <span class="muted">"not downloaded"</span> }.into_any(),
    }
}
