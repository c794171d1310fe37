//! The cluster page: every node, its layers, memory and links, and the
//! ring drawn as a circle of layer ranges. It follows `Shared::cluster`,
//! which the node's event feed keeps current.

use api_types::{
    ClusterView, LinkView, NodeId, NodeView, NotJoinedView, PlanState, RecoveryView, StageView,
};
use leptos::prelude::*;

use crate::{Shared, format};

#[component]
pub fn ClusterPage() -> impl IntoView {
    let shared = expect_context::<Shared>();
    view! {
        <h1>"Cluster"</h1>
        <p class="subtitle">"The nodes pooling their memory, and which layers each one holds."</p>
        {move || {
            shared
                .cluster_error
                .get()
                .map(|error| view! { <div class="notice error">{error}</div> })
        }}
        {move || match shared.cluster.get() {
            None => view! { <div class="panel muted">"Asking the node…"</div> }.into_any(),
            Some(view) => cluster_view(&view).into_any(),
        }}
        <crate::members::MembersPanel />
    }
}

fn cluster_view(view: &ClusterView) -> impl IntoView + use<> {
    let stages = view
        .plan
        .as_ref()
        .map(|p| p.stages.clone())
        .unwrap_or_default();
    let layers = stages.last().map_or(0, |s| s.layers.end);
    let plan_state = match view.plan.as_ref() {
        Some(plan) if plan.state == PlanState::Active => format!("active · epoch {}", plan.epoch),
        Some(plan) => format!("loading · epoch {}", plan.epoch),
        None => "none yet".into(),
    };
    let (policy, policy_version) = view
        .policy
        .as_ref()
        .map(|p| {
            (
                p.policy.name.clone(),
                format!("version {}", p.policy.version),
            )
        })
        .unwrap_or_default();
    let model = view
        .model
        .as_ref()
        .map(|m| m.name.clone())
        .unwrap_or_default();
    let mut nodes = view.nodes.clone();
    // Ring order first, then the nodes the plan leaves out.
    nodes.sort_by_key(|n| {
        stages
            .iter()
            .position(|s| s.node == n.id)
            .unwrap_or(usize::MAX)
    });
    let names = view.nodes.clone();
    let name_of = move |id: NodeId| node_name(&names, id);
    let links = view.links.clone();
    let (me, leader) = (view.node, view.leader);
    view! {
        <div class="grid stats">
            <Stat label="Nodes" value=view.nodes.len().to_string() hint="in this cluster" />
            <Stat label="Model" value=model hint=format!("{layers} layers") />
            <Stat label="Plan" value=format!("{} stages", stages.len()) hint=plan_state />
            <Stat label="Policy" value=policy hint=policy_version />
        </div>
        {view
            .plan_error
            .clone()
            .map(|error| view! { <div class="notice warning">{error}</div> })}
        {view
            .stage_error
            .clone()
            .map(|error| {
                view! {
                    <div class="notice error">
                        {format!(
                            "This node's stage was lost ({error}); it holds no layers until it is restarted.",
                        )}
                    </div>
                }
            })}
        <div class="panel ring-panel">
            {ring(&stages, &view.nodes)}
            <div>
                <h2>"Which layers where"</h2>
                {legend(&stages, &view.nodes)}
                {layer_strip(&stages, &view.nodes)}
            </div>
        </div>
        <div class="grid two section">
            {nodes
                .iter()
                .map(|node| {
                    node_card(node, &stages, Some(node.id) == me, Some(node.id) == leader)
                })
                .collect_view()}
        </div>
        <div class="panel section">
            <h2>"Links"</h2>
            {if links.is_empty() {
                view! { <p class="muted">"No links: this node is alone."</p> }.into_any()
            } else {
                view! {
                    <table class="data" data-testid="links">
                        <thead>
                            <tr>
                                <th>"From"</th>
                                <th>"To"</th>
                                <th>"Transport"</th>
                                <th>"Latency (round trip)"</th>
                                <th>"Bandwidth"</th>
                            </tr>
                        </thead>
                        <tbody>
                            {links
                                .iter()
                                .map(|link| {
                                    view! {
                                        <tr>
                                            <td>{name_of(link.from)}</td>
                                            <td>{name_of(link.to)}</td>
                                            <td data-testid="link-transport">
                                                {transport(link)}
                                            </td>
                                            <td>
                                                {link
                                                    .rtt_ms
                                                    .map_or("measuring…".into(), |ms| format!("{ms:.2} ms"))}
                                            </td>
                                            <td>
                                                {link
                                                    .bandwidth_bytes_per_second
                                                    .map_or("measuring…".into(), format::bandwidth)}
                                            </td>
                                        </tr>
                                    }
                                })
                                .collect_view()}
                        </tbody>
                    </table>
                }
                    .into_any()
            }}
        </div>
        {(!view.recoveries.is_empty()).then(|| recoveries(&view.recoveries))}
        {(!view.not_joined.is_empty()).then(|| not_joined(&view.not_joined))}
    }
}

/// What carries a link, with a WebRTC link's handshake time.
fn transport(link: &LinkView) -> String {
    match link.handshake_ms {
        Some(ms) => format!("{} (opened in {ms:.0} ms)", link.transport.label()),
        None => link.transport.label().to_string(),
    }
}

/// The latest losses of a node of the plan, newest first: what was lost,
/// the plan the cluster went on with, and how long requests paused.
fn recoveries(recoveries: &[RecoveryView]) -> impl IntoView + use<> {
    let rows: Vec<_> = recoveries
        .iter()
        .rev()
        .map(|recovery| {
            let when = js_sys::Date::new(&(recovery.at_unix_ms as f64).into())
                .to_locale_time_string("default")
                .as_string()
                .unwrap_or_default();
            let outcome = match &recovery.error {
                Some(error) => error.clone(),
                None => format!(
                    "plan {} ({}); {} requests resumed",
                    recovery.plan_epoch.unwrap_or_default(),
                    recovery.plan.join(", "),
                    recovery.resumed_requests
                ),
            };
            let pause = format!(
                "{} ms (re-plan {} ms, load {} ms)",
                recovery.replan_ms + recovery.load_ms,
                recovery.replan_ms,
                recovery.load_ms
            );
            view! {
                <tr>
                    <td>{when}</td>
                    <td><strong>{recovery.lost_name.clone()}</strong></td>
                    <td>{recovery.reason.clone()}</td>
                    <td>{recovery.outcome.clone()}</td>
                    <td>{outcome}</td>
                    <td>{pause}</td>
                </tr>
            }
        })
        .collect();
    view! {
        <div class="panel section" data-testid="recoveries">
            <h2>"Recent recoveries"</h2>
            <p class="muted">
                "A node of the plan was lost; the others planned around it and the answers it carried went on."
            </p>
            <table class="data">
                <thead>
                    <tr>
                        <th>"When"</th>
                        <th>"Node lost"</th>
                        <th>"How"</th>
                        <th>"Outcome"</th>
                        <th>"Went on with"</th>
                        <th>"Pause before replay"</th>
                    </tr>
                </thead>
                <tbody>{rows}</tbody>
            </table>
        </div>
    }
}

/// Nodes discovery found on the network that this cluster does not join.
fn not_joined(peers: &[NotJoinedView]) -> impl IntoView + use<> {
    let rows: Vec<_> = peers
        .iter()
        .map(|peer| {
            view! {
                <tr>
                    <td><strong>{peer.name.clone()}</strong></td>
                    <td class="mono">{peer.addresses.join(", ")}</td>
                    <td>{peer.reason.clone()}</td>
                </tr>
            }
        })
        .collect();
    view! {
        <div class="panel section" data-testid="not-joined">
            <h2>"Seen on the network, not joined"</h2>
            <table class="data">
                <thead>
                    <tr>
                        <th>"Node"</th>
                        <th>"Address"</th>
                        <th>"Why not"</th>
                    </tr>
                </thead>
                <tbody>{rows}</tbody>
            </table>
        </div>
    }
}

#[component]
fn Stat(
    #[prop(into)] label: String,
    #[prop(into)] value: String,
    #[prop(into)] hint: String,
) -> impl IntoView {
    let title = value.clone();
    view! {
        <div class="panel stat">
            <div class="label">{label}</div>
            <div class="value" title=title>{value}</div>
            <div class="hint">{hint}</div>
        </div>
    }
}

fn node_name(nodes: &[NodeView], id: NodeId) -> String {
    nodes
        .iter()
        .find(|n| n.id == id)
        .map_or_else(|| format::short_id(id), |n| n.name.clone())
}

fn layer_text(start: u32, end: u32) -> String {
    let count = end - start;
    let noun = if count == 1 { "layer" } else { "layers" };
    format!("{start}–{} ({count} {noun})", end.saturating_sub(1))
}

/// The ring: one arc per stage, as long as its share of the layers, in
/// ring order clockwise from the top.
pub fn ring(stages: &[StageView], nodes: &[NodeView]) -> impl IntoView + use<> {
    const CENTRE: f64 = 120.0;
    const RADIUS: f64 = 88.0;
    let total = stages.last().map_or(0, |s| s.layers.end).max(1) as f64;
    let point = |degrees: f64| {
        let radians = (degrees - 90.0).to_radians();
        (
            CENTRE + RADIUS * radians.cos(),
            CENTRE + RADIUS * radians.sin(),
        )
    };
    let gap = if stages.len() > 1 { 1.5 } else { 0.0 };
    let arcs: Vec<_> = stages
        .iter()
        .enumerate()
        .map(|(index, stage)| {
            let colour = format::node_colour(index);
            let title = format!(
                "{}: layers {}",
                node_name(nodes, stage.node),
                layer_text(stage.layers.start, stage.layers.end)
            );
            if stages.len() == 1 {
                return view! {
                    <circle cx="120" cy="120" r="88" fill="none" stroke=colour stroke-width="30">
                        <title>{title}</title>
                    </circle>
                }
                .into_any();
            }
            let from = stage.layers.start as f64 / total * 360.0 + gap;
            let to = stage.layers.end as f64 / total * 360.0 - gap;
            let (x0, y0) = point(from);
            let (x1, y1) = point(to);
            let large = if to - from > 180.0 { 1 } else { 0 };
            let path = format!("M {x0:.2} {y0:.2} A {RADIUS} {RADIUS} 0 {large} 1 {x1:.2} {y1:.2}");
            view! {
                <path d=path fill="none" stroke=colour stroke-width="30">
                    <title>{title}</title>
                </path>
            }
            .into_any()
        })
        .collect();
    let empty = stages.is_empty();
    let layers = stages.last().map_or(0, |s| s.layers.end);
    view! {
        <div class="ring" data-testid="ring">
            <svg viewBox="0 0 240 240" role="img" aria-label="The ring of stages">
                <circle cx="120" cy="120" r="88" fill="none" stroke="#e3e6ef" stroke-width="30" />
                {arcs}
                <text x="120" y="116" text-anchor="middle" font-size="30" font-weight="700" fill="#1d2130">
                    {if empty { "–".to_string() } else { layers.to_string() }}
                </text>
                <text x="120" y="140" text-anchor="middle" font-size="13" fill="#6b7185">
                    {if empty {
                        "no plan yet".to_string()
                    } else {
                        let noun = if stages.len() == 1 { "node" } else { "nodes" };
                        format!("layers on {} {noun}", stages.len())
                    }}
                </text>
            </svg>
        </div>
    }
}

pub fn legend(stages: &[StageView], nodes: &[NodeView]) -> impl IntoView + use<> {
    if stages.is_empty() {
        return view! { <p class="muted">"No plan yet: the leader places the model once the nodes have met."</p> }
            .into_any();
    }
    view! {
        <div class="legend" data-testid="stages">
            {stages
                .iter()
                .enumerate()
                .map(|(index, stage)| {
                    let swatch = format!("background: {}", format::node_colour(index));
                    view! {
                        <div class="legend-row" data-testid="stage">
                            <span class="swatch" style=swatch></span>
                            <strong>{node_name(nodes, stage.node)}</strong>
                            <span class="muted">
                                {format!("layers {}", layer_text(stage.layers.start, stage.layers.end))}
                            </span>
                            {stage.weight_bytes.map(|b| view! { <span class="badge plain">{format::bytes(b)}</span> })}
                            {(stage.in_flight > 0)
                                .then(|| view! { <span class="badge">{format!("{} in flight", stage.in_flight)}</span> })}
                        </div>
                    }
                })
                .collect_view()}
        </div>
    }
    .into_any()
}

/// All layers left to right, coloured by the node that holds them.
fn layer_strip(stages: &[StageView], nodes: &[NodeView]) -> impl IntoView + use<> {
    let total = stages.last().map_or(0, |s| s.layers.end).max(1);
    view! {
        <div class="layer-strip">
            {stages
                .iter()
                .enumerate()
                .map(|(index, stage)| {
                    let share = format::percent(u64::from(stage.layers.len()), u64::from(total));
                    let style = format!("width: {share}%; background: {}", format::node_colour(index));
                    view! {
                        <div style=style title=node_name(nodes, stage.node)>
                            {format!("{}–{}", stage.layers.start, stage.layers.end.saturating_sub(1))}
                        </div>
                    }
                })
                .collect_view()}
        </div>
    }
}

fn node_card(
    node: &NodeView,
    stages: &[StageView],
    me: bool,
    leader: bool,
) -> impl IntoView + use<> {
    let index = stages.iter().position(|s| s.node == node.id);
    let colour = index.map_or("#c9cde0", format::node_colour);
    let in_flight = index.and_then(|i| stages.get(i)).map_or(0, |s| s.in_flight);
    let layers = node.layers.map_or_else(
        || "none in this plan".to_string(),
        |l| layer_text(l.start, l.end),
    );
    let weights = node.weight_bytes.unwrap_or(0);
    let resources = &node.resources;
    let budget = resources.memory_budget_bytes;
    let used = resources
        .memory_total_bytes
        .saturating_sub(resources.memory_available_bytes);
    let device = if resources.device_name.is_empty() {
        resources.device.clone()
    } else {
        format!("{} ({})", resources.device_name, resources.device)
    };
    view! {
        <div class="panel node-card" data-testid="node" data-node=node.name.clone()>
            <h3>
                <span class="swatch" style=format!("background: {colour}")></span>
                {node.name.clone()}
                {me.then(|| view! { <span class="badge">"this node"</span> })}
                {leader.then(|| view! { <span class="badge plain">"leader"</span> })}
                {(node.status != "self" && node.status != "linked")
                    .then(|| view! { <span class="badge warn">{node.status.clone()}</span> })}
            </h3>
            <div class="addr mono">{format!("{} · {}", node.address, format::short_id(node.id))}</div>
            <dl class="kv">
                <dt>"Layers"</dt>
                <dd data-testid="layers">{layers}</dd>
                <dt>"Device"</dt>
                <dd>{device}</dd>
                <dt>"Compute"</dt>
                <dd>{format!("{:.1} GFLOP/s", resources.compute_score)}</dd>
                <dt>"Requests"</dt>
                <dd>{format!("{in_flight} in flight")}</dd>
            </dl>
            <div class="bar-label">
                <span>"Memory budget"</span>
                <span class="muted">
                    {format!("{} weights of {}", format::bytes(weights), format::bytes(budget))}
                </span>
            </div>
            <div class="bar">
                <div style=format!(
                    "width: {}%; background: {colour}",
                    format::percent(weights, budget),
                )></div>
            </div>
            <div class="bar-label">
                <span>"Machine memory"</span>
                <span class="muted">
                    {format!(
                        "{} used of {}",
                        format::bytes(used),
                        format::bytes(resources.memory_total_bytes),
                    )}
                </span>
            </div>
            <div class="bar">
                <div style=format!(
                    "width: {}%; background: #9aa0b5",
                    format::percent(used, resources.memory_total_bytes),
                )></div>
            </div>
            {node
                .rss_bytes
                .map(|rss| {
                    view! {
                        <div class="bar-label">
                            <span>"This process"</span>
                            <span class="muted">{format::bytes(rss)}</span>
                        </div>
                    }
                })}
        </div>
    }
}
