//! `GET /metrics` (Prometheus' text format), and the layer that counts
//! every request by route and status.

use api_types::LinkTransport;
use axum::extract::{MatchedPath, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::metrics::{self, LinkSnapshot, Snapshot};

pub(super) async fn metrics(State(state): State<AppState>) -> Response {
    let stats = state.engine.stats().borrow().clone();
    let links = state
        .cluster
        .as_ref()
        .map(|cluster| {
            let view = cluster.view();
            let name = |id| {
                view.nodes
                    .iter()
                    .find(|n| n.id == id)
                    .map_or_else(|| id.to_string(), |n| n.name.clone())
            };
            view.links
                .iter()
                .filter(|l| Some(l.from) == view.node)
                .map(|l| LinkSnapshot {
                    peer: name(l.to),
                    transport: match l.transport {
                        LinkTransport::Tcp => "tcp",
                        LinkTransport::Webrtc => "webrtc",
                        LinkTransport::WebrtcTurn => "webrtc-turn",
                    },
                    rtt_seconds: l.rtt_ms.map(|ms| ms / 1000.0),
                    bandwidth_bytes_per_second: l.bandwidth_bytes_per_second,
                })
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let text = metrics::global().render(Snapshot {
        active_requests: stats.active,
        queued_requests: stats.queued,
        kv_reserved_bytes: stats.kv_reserved_bytes,
        kv_budget_bytes: state.engine.kv_budget_bytes(),
        cluster_kv: state.engine.kv_room(),
        links: &links,
    });
    ([(CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response()
}

/// Counts each answered request by its route's pattern (`unmatched` for
/// paths no route knows, so that scanning cannot grow the label set) and
/// status.
pub(super) async fn count_requests(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let response = next.run(request).await;
    metrics::global()
        .http_requests
        .get_or_create(&vec![
            ("route", route),
            ("status", response.status().as_u16().to_string()),
        ])
        .inc();
    response
}
