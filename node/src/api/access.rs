//! Who may use the API: `/v1/*` (but not the node-to-node `/v1/ring/*`
//! routes, which the link handshake and the cluster secret guard) needs
//! `Authorization: Bearer KEY` with one of the node's API keys (or its
//! admin token). A node with no key serves its API to its own machine
//! only when it listens on a network address, unless started with
//! `--open-api`. `/healthz` and the dashboard's files stay open.
//!
//! The routes that change the cluster answer to the admin token alone
//! (`admin.rs`), which the dashboard sends in place of the API key; this
//! layer only counts their failures.
//!
//! Failed attempts (wrong API keys and admin tokens; a request without
//! one guesses nothing) are counted per client address: past
//! [`AUTH_FAILURES_PER_WINDOW`] in [`AUTH_FAILURE_WINDOW_SECS`], every
//! authenticated request from that address gets 429 until the window ends,
//! right key or not, so guessing gains nothing.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{AdminToken, ApiError, AppState};
use crate::limits::{AUTH_FAILURE_WINDOW_SECS, AUTH_FAILURES_PER_WINDOW, MAX_TRACKED_AUTH_CLIENTS};

/// The API's keys and the rule for a node without any.
#[derive(Clone, Default)]
pub struct ApiAccess {
    keys: Arc<[Arc<str>]>,
    /// No key, and serving every address anyway (`--open-api`, or a
    /// loopback listen address, which only this machine reaches).
    open: bool,
    failures: Arc<Mutex<Failures>>,
}

impl std::fmt::Debug for ApiAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiAccess")
            .field("keys", &self.keys.len())
            .field("open", &self.open)
            .finish_non_exhaustive()
    }
}

impl ApiAccess {
    /// `keys` (empty ones ignored); `open` lets every address in when
    /// there are none.
    pub fn new(keys: &[String], open: bool) -> Self {
        let keys: Vec<Arc<str>> = keys
            .iter()
            .map(|k| k.trim())
            .filter(|k| !k.is_empty())
            .map(Arc::from)
            .collect();
        Self {
            keys: keys.into(),
            open,
            failures: Arc::default(),
        }
    }

    /// Everyone in, no key: for in-process tests and loopback nodes.
    pub fn open() -> Self {
        Self::new(&[], true)
    }

    pub fn requires_key(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Whether `request` may go on.
    fn check(
        &self,
        admin: Option<&AdminToken>,
        client: Option<IpAddr>,
        bearer: Option<&str>,
        now: Instant,
    ) -> Result<(), ApiError> {
        if self.keys.is_empty() {
            return if self.open || client.is_none_or(|ip| ip.is_loopback()) {
                Ok(())
            } else {
                Err(ApiError::LocalOnly)
            };
        }
        let client = client.unwrap_or(IpAddr::from([0, 0, 0, 0]));
        self.not_blocked(client, now)?;
        let matches = |secret: &[u8]| bearer.is_some_and(|b| same_secret(b.as_bytes(), secret));
        let known = self.keys.iter().any(|k| matches(k.as_bytes()))
            || admin.is_some_and(|a| matches(a.as_bytes()));
        if known {
            return Ok(());
        }
        // A request without a key is no guess: only wrong keys count.
        if bearer.is_some() {
            self.record_failure(client, now);
        }
        Err(ApiError::ApiKey {
            given: bearer.is_some(),
        })
    }

    /// 429 while `client` failed too often lately.
    fn not_blocked(&self, client: IpAddr, now: Instant) -> Result<(), ApiError> {
        let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        match failures.blocked(client, now) {
            Some(retry_after) => Err(ApiError::TooManyFailedAttempts {
                retry_after_secs: retry_after.as_secs().max(1),
            }),
            None => Ok(()),
        }
    }

    fn record_failure(&self, client: IpAddr, now: Instant) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        failures.record(client, now);
    }
}

/// Failed attempts per client address, in fixed windows.
#[derive(Default)]
struct Failures {
    by_client: HashMap<IpAddr, (Instant, u32)>,
}

impl Failures {
    fn window() -> Duration {
        Duration::from_secs(AUTH_FAILURE_WINDOW_SECS)
    }

    /// How long `client` must wait, if it failed too often lately.
    fn blocked(&self, client: IpAddr, now: Instant) -> Option<Duration> {
        let (start, count) = self.by_client.get(&client)?;
        let end = *start + Self::window();
        (*count >= AUTH_FAILURES_PER_WINDOW && now < end).then(|| end - now)
    }

    fn record(&mut self, client: IpAddr, now: Instant) {
        if self.by_client.len() >= MAX_TRACKED_AUTH_CLIENTS && !self.by_client.contains_key(&client)
        {
            // Forget windows that ended; if none did, the oldest.
            self.by_client
                .retain(|_, (start, _)| now < *start + Self::window());
            if self.by_client.len() >= MAX_TRACKED_AUTH_CLIENTS
                && let Some(oldest) = self
                    .by_client
                    .iter()
                    .min_by_key(|(_, (start, _))| *start)
                    .map(|(ip, _)| *ip)
            {
                self.by_client.remove(&oldest);
            }
        }
        let entry = self.by_client.entry(client).or_insert((now, 0));
        if now >= entry.0 + Self::window() {
            *entry = (now, 0);
        }
        entry.1 += 1;
        if entry.1 == AUTH_FAILURES_PER_WINDOW {
            tracing::warn!(%client, "{AUTH_FAILURES_PER_WINDOW} failed API key attempts; refusing this address for the rest of {AUTH_FAILURE_WINDOW_SECS} s");
        }
    }
}

/// Compares two secrets in time that depends only on their lengths.
pub(super) fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// The token of an `Authorization: Bearer TOKEN` header.
pub(super) fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
}

/// Routes that need a key: the API and the metrics, not the links and
/// files between nodes, not the health check or the dashboard.
fn guarded(path: &str) -> bool {
    path == "/metrics" || (path.starts_with("/v1/") && !path.starts_with("/v1/ring/"))
}

/// Routes that change the cluster or hand out its secret: the admin token
/// guards them (`admin.rs`), in place of an API key.
fn admin_route(method: &Method, path: &str) -> bool {
    let Some(rest) = path.strip_prefix("/v1/cluster/") else {
        return false;
    };
    rest == "invite" || (*method != Method::GET && *method != Method::HEAD)
}

/// The middleware in front of every route.
pub(super) async fn require_key(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    if !guarded(request.uri().path()) {
        return next.run(request).await;
    }
    let client = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        // An IPv4 client of a dual-stack listener shows as ::ffff:a.b.c.d.
        .map(|c| c.0.ip().to_canonical());
    if admin_route(request.method(), request.uri().path()) {
        let address = client.unwrap_or(IpAddr::from([0, 0, 0, 0]));
        if let Err(error) = state.access.not_blocked(address, Instant::now()) {
            return error.into_response();
        }
        let response = next.run(request).await;
        if response.status() == StatusCode::UNAUTHORIZED {
            state.access.record_failure(address, Instant::now());
        }
        return response;
    }
    let checked = state.access.check(
        state.admin_token.as_ref(),
        client,
        bearer(request.headers()),
        Instant::now(),
    );
    match checked {
        Ok(()) => next.run(request).await,
        Err(error) => error.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAN: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 9));

    #[test]
    fn secrets_compare_exactly() {
        assert!(same_secret(b"s3cret", b"s3cret"));
        assert!(!same_secret(b"s3cres", b"s3cret"));
        assert!(!same_secret(b"s3cre", b"s3cret"));
        assert!(!same_secret(b"", b"s3cret"));
    }

    #[test]
    fn without_a_key_only_this_machine_gets_in_unless_open() {
        let now = Instant::now();
        let closed = ApiAccess::new(&[], false);
        let local = IpAddr::from([127, 0, 0, 1]);
        assert!(closed.check(None, Some(local), None, now).is_ok());
        assert!(matches!(
            closed.check(None, Some(LAN), None, now),
            Err(ApiError::LocalOnly)
        ));
        assert!(ApiAccess::open().check(None, Some(LAN), None, now).is_ok());
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().expect("address");
        assert!(
            closed
                .check(None, Some(mapped.to_canonical()), None, now)
                .is_ok()
        );
    }

    #[test]
    fn keys_and_the_admin_token_open_the_api() {
        let now = Instant::now();
        let access = ApiAccess::new(&["k1".into(), "k2".into()], false);
        let admin = AdminToken::new("root").expect("token");
        for key in ["k1", "k2", "root"] {
            assert!(
                access
                    .check(Some(&admin), Some(LAN), Some(key), now)
                    .is_ok(),
                "{key}"
            );
        }
        assert!(matches!(
            access.check(Some(&admin), Some(LAN), None, now),
            Err(ApiError::ApiKey { given: false })
        ));
        assert!(matches!(
            access.check(Some(&admin), Some(LAN), Some("k3"), now),
            Err(ApiError::ApiKey { given: true })
        ));
    }

    #[test]
    fn cluster_changes_answer_to_the_admin_token() {
        assert!(admin_route(&Method::PUT, "/v1/cluster/policy"));
        assert!(admin_route(&Method::DELETE, "/v1/cluster/nodes/00aa"));
        assert!(admin_route(&Method::GET, "/v1/cluster/invite"));
        assert!(!admin_route(&Method::GET, "/v1/cluster/policy"));
        assert!(!admin_route(&Method::GET, "/v1/cluster"));
        assert!(!admin_route(&Method::POST, "/v1/chat/completions"));
    }

    #[test]
    fn guessing_is_stopped_per_address_for_the_window() {
        let start = Instant::now();
        let access = ApiAccess::new(&["right".into()], false);
        for _ in 0..AUTH_FAILURES_PER_WINDOW {
            assert!(matches!(
                access.check(None, Some(LAN), Some("wrong"), start),
                Err(ApiError::ApiKey { .. })
            ));
        }
        // Blocked now, even with the right key; other addresses are not.
        assert!(matches!(
            access.check(None, Some(LAN), Some("right"), start),
            Err(ApiError::TooManyFailedAttempts { .. })
        ));
        let other = IpAddr::from([10, 0, 0, 10]);
        assert!(
            access
                .check(None, Some(other), Some("right"), start)
                .is_ok()
        );
        let later = start + Failures::window();
        assert!(access.check(None, Some(LAN), Some("right"), later).is_ok());
    }
}
