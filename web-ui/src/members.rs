//! Who may join, for an admin: the join token that admits a new machine,
//! and removing a node, which gives every other node a new cluster secret
//! so the old token admits no one. Shown on the cluster page.

use api_types::NodeView;
use leptos::prelude::*;

use crate::{Shared, admin};

#[component]
pub fn MembersPanel() -> impl IntoView {
    let shared = expect_context::<Shared>();
    let token = RwSignal::new(admin::stored_token());
    let outcome = RwSignal::new(None::<admin::Outcome>);
    let join_token = RwSignal::new(None::<String>);
    let removing = RwSignal::new(String::new());

    let show_token = move |_| {
        let token = token.get_untracked();
        outcome.set(None);
        leptos::task::spawn_local(async move {
            match admin::send("GET", "/v1/cluster/invite", &token, None).await {
                Ok(body) => {
                    let invite: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                    join_token.set(invite["token"].as_str().map(str::to_string));
                }
                Err(error) => outcome.set(Some(Err(error))),
            }
        });
    };
    let remove = move |_| {
        let (token, node) = (token.get_untracked(), removing.get_untracked());
        if node.is_empty() {
            outcome.set(Some(Err("Choose the node to remove first.".into())));
            return;
        }
        outcome.set(None);
        leptos::task::spawn_local(async move {
            let url = format!("/v1/cluster/nodes/{node}");
            let answer = admin::send("DELETE", &url, &token, None).await.map(|body| {
                let rotated: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                join_token.set(rotated["token"].as_str().map(str::to_string));
                format!(
                    "Removed {}. The cluster has a new secret: the old join token admits no one; the new one is below.",
                    rotated["removed"].as_str().unwrap_or("the node")
                )
            });
            outcome.set(Some(answer));
        });
    };
    let others = move || -> Vec<NodeView> {
        shared
            .cluster
            .get()
            .map(|view| {
                view.nodes
                    .into_iter()
                    .filter(|n| n.status != "self")
                    .collect()
            })
            .unwrap_or_default()
    };

    view! {
        <div class="panel section" data-testid="members">
            <h2>"Members"</h2>
            <p class="muted">
                "Only machines holding this cluster's secret can join, and every link between nodes is encrypted. "
                "Hand a new machine the join token ("<code>"ringlet --join TOKEN"</code>", or "
                <code>"ringlet invite"</code>" on a node). Removing a node rotates the secret."
            </p>
            {admin::token_field(token)}
            <div class="row">
                <button class="btn" data-testid="show-join-token" on:click=show_token>
                    "Show join token"
                </button>
                <select
                    class="inline"
                    data-testid="remove-node"
                    on:change=move |ev| removing.set(event_target_value(&ev))
                >
                    <option value="">"Node to remove…"</option>
                    {move || {
                        others()
                            .into_iter()
                            .map(|n| {
                                let id = format!("{:016x}", n.id.0);
                                view! { <option value=id>{n.name.clone()}</option> }
                            })
                            .collect_view()
                    }}
                </select>
                <button class="btn danger" data-testid="remove" on:click=remove>
                    "Remove and rotate the secret"
                </button>
            </div>
            {move || outcome.get().map(|o| admin::notice(o, "", "members-outcome"))}
            {move || {
                join_token
                    .get()
                    .map(|t| {
                        view! {
                            <div class="join-token">
                                <span class="muted">"On the new machine:"</span>
                                <code data-testid="join-token">{format!("ringlet --join {t}")}</code>
                            </div>
                        }
                    })
            }}
        </div>
    }
}
