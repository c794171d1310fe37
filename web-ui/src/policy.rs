//! The policy page: the active scheduling policy, uploading a new one with
//! the admin token, the plan it makes, and the way back to the built-in
//! one. The node's answers are shown in its own words.

use leptos::prelude::*;
use wasm_bindgen::JsValue;

use crate::{Shared, admin, cluster, format};
use api_types::{PolicySource, PolicyStatus};

#[component]
pub fn PolicyPage() -> impl IntoView {
    let shared = expect_context::<Shared>();
    let token = RwSignal::new(admin::stored_token());
    let outcome = RwSignal::new(None::<admin::Outcome>);
    let working = RwSignal::new(false);
    let file_input = NodeRef::<leptos::html::Input>::new();

    let change = move |method: &'static str, body: Option<JsValue>| {
        let token = token.get_untracked();
        working.set(true);
        outcome.set(None);
        leptos::task::spawn_local(async move {
            let body = body.map(|b| ("application/wasm", b));
            let answer = admin::send(method, "/v1/cluster/policy", &token, body).await;
            let result = answer.map(|body| match serde_json::from_str::<PolicyStatus>(&body) {
                Ok(policy) => format!(
                    "Now active: {} {} (revision {}). Every node takes it up, and the leader re-plans with it.",
                    policy.policy.name, policy.policy.version, policy.revision
                ),
                Err(_) => "The policy changed.".into(),
            });
            outcome.set(Some(result));
            working.set(false);
        });
    };
    let upload = move |_| {
        let file = file_input
            .get()
            .and_then(|input| input.files())
            .and_then(|files| files.get(0));
        match file {
            Some(file) => change("PUT", Some(file.into())),
            None => outcome.set(Some(Err(
                "Choose a .wasm file first: a component built with `cargo build --target wasm32-wasip2`."
                    .into(),
            ))),
        }
    };
    let restore = move |_| change("DELETE", None);

    view! {
        <h1>"Scheduling policy"</h1>
        <p class="subtitle">
            "A WebAssembly component decides which node holds which layers and which request starts next. Replace it while the cluster runs."
        </p>
        <div class="grid two">
            <div class="panel" data-testid="active-policy">
                <h2>"Active policy"</h2>
                {move || match shared.cluster.get().and_then(|c| c.policy) {
                    None => view! { <p class="muted">"Asking the node…"</p> }.into_any(),
                    Some(policy) => active(&policy).into_any(),
                }}
            </div>
            <div class="panel">
                <h2>"Change it"</h2>
                <label class="field">
                    <span>"Policy component (.wasm)"</span>
                    <input type="file" accept=".wasm,application/wasm" node_ref=file_input data-testid="policy-file" />
                </label>
                {admin::token_field(token)}
                <div class="actions">
                    <button class="btn primary" data-testid="upload" disabled=move || working.get() on:click=upload>
                        "Upload and activate"
                    </button>
                    <button class="btn" data-testid="restore" disabled=move || working.get() on:click=restore>
                        "Return to the built-in policy"
                    </button>
                </div>
                {move || outcome.get().map(|o| admin::notice(o, "section", "outcome"))}
            </div>
        </div>
        <div class="panel ring-panel section">
            {move || {
                let view = shared.cluster.get().unwrap_or_default();
                let stages = view.plan.map(|p| p.stages).unwrap_or_default();
                view! {
                    {cluster::ring(&stages, &view.nodes)}
                    <div>
                        <h2>"The plan it made"</h2>
                        {cluster::legend(&stages, &view.nodes)}
                    </div>
                }
            }}
        </div>
    }
}

fn active(policy: &PolicyStatus) -> impl IntoView + use<> {
    let source = match policy.policy.source {
        PolicySource::BuiltIn => "built in",
        PolicySource::Uploaded => "uploaded",
    };
    view! {
        <div>
            <p style="margin: 0 0 12px">
                <strong style="font-size: 20px" data-testid="policy-name">{policy.policy.name.clone()}</strong>
                " "
                <span class="muted">{policy.policy.version.clone()}</span>
                " "
                <span class="badge plain">{source}</span>
            </p>
            {policy
                .warning
                .clone()
                .map(|warning| view! { <div class="notice warning">{warning}</div> })}
            <dl class="kv">
                <dt>"SHA-256"</dt>
                <dd class="mono sha" data-testid="policy-sha">{policy.policy.sha256.clone()}</dd>
                <dt>"Size"</dt>
                <dd>{format::bytes(policy.policy.size_bytes)}</dd>
                <dt>"Revision"</dt>
                <dd>{policy.revision}</dd>
            </dl>
        </div>
    }
}
