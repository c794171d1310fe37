//! `GET /v1/cluster`, its live feed `GET /v1/cluster/events`, and the link
//! upgrade `GET /v1/ring/link`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{StatusCode, header};
use axum::response::Response;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::{Stream, StreamExt};

use super::{ApiError, AppState};
use crate::cluster::ClusterView;
use crate::cluster::protocol::{PROTOCOL_VERSION, UPGRADE_TOKEN, VERSION_HEADER};
use crate::limits::{CLUSTER_EVENTS_INTERVAL_MS, SSE_KEEP_ALIVE_SECS};

/// The cluster as this node sees it: nodes, links, the plan.
pub async fn cluster_view(State(state): State<AppState>) -> Result<Json<ClusterView>, ApiError> {
    let cluster = state.cluster("/v1/cluster")?;
    Ok(Json(cluster.view()))
}

/// The cluster view as server-sent `cluster` events: one at once, then one
/// after each change, at most one per [`CLUSTER_EVENTS_INTERVAL_MS`],
/// until the node begins to stop.
pub async fn cluster_events(
    State(state): State<AppState>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let cluster = state.cluster("/v1/cluster/events")?;
    let mut stopping = state.stopping.clone();
    let mut pace = tokio::time::interval(Duration::from_millis(CLUSTER_EVENTS_INTERVAL_MS));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let start = (cluster.watch(), pace, true);
    let events = futures_util::stream::unfold(start, |(mut views, mut pace, first)| async move {
        pace.tick().await;
        if !first && views.changed().await.is_err() {
            return None; // the cluster actor stopped: the node is stopping
        }
        let view = views.borrow_and_update().clone();
        let event = Event::default()
            .event("cluster")
            .json_data(&view)
            .unwrap_or_else(|error| Event::default().comment(format!("unserializable: {error}")));
        Some((Ok(event), (views, pace, false)))
    })
    .take_until(async move { stopping.wait().await });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(SSE_KEEP_ALIVE_SECS))))
}

/// Upgrades the connection to a node-to-node link.
pub async fn ring_link(
    State(state): State<AppState>,
    mut request: Request,
) -> Result<Response, ApiError> {
    let cluster = state.cluster("/v1/ring/link")?.clone();
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    if !header("upgrade").is_some_and(|u| u.eq_ignore_ascii_case(UPGRADE_TOKEN)) {
        return Err(ApiError::UpgradeRequired);
    }
    let version = header(VERSION_HEADER).and_then(|v| v.parse::<u32>().ok());
    if version != Some(PROTOCOL_VERSION) {
        return Err(ApiError::ProtocolMismatch { theirs: version });
    }
    let remote = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
        .ok_or_else(|| ApiError::internal("the connection has no peer address"))?;
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => {
                cluster
                    .accept(hyper_util::rt::TokioIo::new(upgraded), remote)
                    .await
            }
            Err(error) => tracing::warn!(%error, %remote, "a link upgrade failed"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, UPGRADE_TOKEN)
        .body(Body::empty())
        .map_err(|error| ApiError::internal(format!("cannot build the upgrade: {error}")))
}
