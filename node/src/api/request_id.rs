//! Every HTTP request gets an id, and its errors are logged once, with it.
//!
//! The layers, outermost first: a client's `x-request-id` is kept when it
//! is sane (at most [`MAX_REQUEST_ID_BYTES`] of letters, digits and
//! `-_.:`) and dropped otherwise; tower-http's `SetRequestId` makes a UUID
//! for a request without one; tower-http's `Trace` opens a `request` span
//! with the id, method and path, so everything a handler logs carries
//! them, and logs each failed request once, when its response is ready:
//! status, type, code and the whole error text (the [`ErrorReport`] that
//! [`ApiError`](super::ApiError) leaves in the response), internal detail
//! included; `PropagateRequestId` returns the id in the response's
//! `x-request-id`; innermost, the id is made [`current`] for the handler,
//! so that an internal error's body can name it.

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderName, Response};
use axum::middleware::{self, Next};
use tower::ServiceBuilder;
use tower_http::classify::ServerErrorsFailureClass;
use tower_http::request_id::{
    MakeRequestUuid, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::{DefaultOnResponse, OnResponse, TraceLayer};
use tracing::Span;

use super::error::ErrorReport;
use crate::limits::MAX_REQUEST_ID_BYTES;

/// The header that carries the id, both ways.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

tokio::task_local! {
    /// The id of the request whose handler runs in this task.
    static CURRENT: String;
}

/// The id of the request being handled, inside the API's layers.
pub fn current() -> Option<String> {
    CURRENT.try_with(Clone::clone).ok()
}

/// Wraps `router` in the request-id, tracing and error-logging layers.
pub fn layers<S: Clone + Send + Sync + 'static>(router: Router<S>) -> Router<S> {
    router.layer(
        ServiceBuilder::new()
            .layer(middleware::map_request(drop_unusable_id))
            .layer(SetRequestIdLayer::new(REQUEST_ID_HEADER, MakeRequestUuid))
            .layer(
                TraceLayer::new_for_http()
                    .make_span_with(request_span)
                    .on_response(log_response)
                    .on_failure(log_failure),
            )
            .layer(PropagateRequestIdLayer::new(REQUEST_ID_HEADER))
            .layer(middleware::from_fn(with_current_id)),
    )
}

/// Removes a client's request id unless it is one value of a sane length
/// and alphabet, so that the node makes its own.
async fn drop_unusable_id(mut request: Request) -> Request {
    let headers = request.headers();
    let mut values = headers.get_all(&REQUEST_ID_HEADER).iter();
    let sane = match (values.next(), values.next()) {
        (Some(value), None) => is_sane(value.as_bytes()),
        (None, _) => true,
        (Some(_), Some(_)) => false,
    };
    if !sane {
        request.headers_mut().remove(&REQUEST_ID_HEADER);
    }
    request
}

fn is_sane(id: &[u8]) -> bool {
    (1..=MAX_REQUEST_ID_BYTES).contains(&id.len())
        && id
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

fn id_of(request: &Request) -> &str {
    request
        .extensions()
        .get::<RequestId>()
        .and_then(|id| id.header_value().to_str().ok())
        .unwrap_or_default()
}

fn request_span(request: &Request) -> Span {
    tracing::info_span!(
        "request",
        id = %id_of(request),
        method = %request.method(),
        path = %request.uri().path(),
    )
}

/// The debug line tower-http writes for every response, and, once per
/// failed request, what failed.
fn log_response(response: &Response<Body>, latency: Duration, span: &Span) {
    DefaultOnResponse::new().on_response(response, latency, span);
    let status = response.status();
    match response.extensions().get::<ErrorReport>() {
        Some(report) if status.is_server_error() => tracing::warn!(
            status = status.as_u16(),
            kind = ?report.kind,
            code = report.code,
            error = %report.detail,
            "request failed"
        ),
        Some(report) => tracing::debug!(
            status = status.as_u16(),
            kind = ?report.kind,
            code = report.code,
            error = %report.detail,
            "request refused"
        ),
        // A 5xx that is no `ApiError` (`/healthz` of a stopped engine).
        None if status.is_server_error() => {
            tracing::warn!(status = status.as_u16(), "request failed");
        }
        None => {}
    }
}

/// A response that failed after its status: its body broke off. Failed
/// statuses are logged by [`log_response`].
fn log_failure(failure: ServerErrorsFailureClass, latency: Duration, _span: &Span) {
    if let ServerErrorsFailureClass::Error(error) = failure {
        tracing::warn!(%error, latency_ms = latency.as_millis(), "response failed");
    }
}

/// Runs the handler with its request's id as [`current`].
async fn with_current_id(request: Request, next: Next) -> axum::response::Response {
    let id = id_of(&request).to_string();
    CURRENT.scope(id, next.run(request)).await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the report

    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use axum::routing::get;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;
    use crate::api::ApiError;
    use crate::engine::SubmitError;

    /// The log, as a test reads it.
    #[derive(Clone, Default)]
    struct Log(Arc<Mutex<Vec<u8>>>);

    impl Write for Log {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("log lock").extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Log {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().expect("log lock")).into_owned()
        }
    }

    fn app() -> Router {
        layers(
            Router::new()
                .route(
                    "/fails",
                    get(|| async { Err::<(), _>(ApiError::internal("the disk is on fire")) }),
                )
                .route(
                    "/busy",
                    get(|| async { Err::<(), _>(ApiError::from(SubmitError::Busy)) }),
                )
                .route("/fine", get(|| async { "fine" })),
        )
    }

    /// Status, `x-request-id` and JSON body of one request.
    async fn send(path: &str, id: Option<&str>) -> (u16, String, serde_json::Value) {
        let mut request = axum::http::Request::get(path);
        if let Some(id) = id {
            request = request.header(&REQUEST_ID_HEADER, id);
        }
        let response = app()
            .oneshot(request.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status().as_u16();
        let id = response.headers()[&REQUEST_ID_HEADER]
            .to_str()
            .unwrap()
            .to_string();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        (status, id, json)
    }

    /// One test, so that no other test registers these callsites first
    /// on a thread without this subscriber: tracing would then cache them
    /// as disabled for every thread.
    #[tokio::test]
    async fn requests_get_ids_and_internal_errors_only_name_theirs() {
        let log = Log::default();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer({
                let log = log.clone();
                move || log.clone()
            })
            .finish();
        let _default = tracing::subscriber::set_default(subscriber);

        // An internal error: the client gets the id, the log the text.
        let (status, id, json) = send("/fails", None).await;
        assert_eq!(status, 500);
        let error = &json["error"];
        assert_eq!(error["type"], "server_error");
        assert_eq!(
            error["message"],
            format!("internal error; quote request id {id}")
        );
        assert!(!json.to_string().contains("disk"), "{json}");
        assert_eq!(id.len(), 36, "a UUID: {id}");
        let text = log.text();
        let failures: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("request failed"))
            .collect();
        assert_eq!(failures.len(), 1, "logged once: {text}");
        assert!(failures[0].contains(&id), "{text}");
        assert!(failures[0].contains("the disk is on fire"), "{text}");
        assert!(failures[0].contains("status=500"), "{text}");

        // A 503 is no invalid request; a sane client id is kept.
        let (status, id, json) = send("/busy", Some("client-42.a:b_c")).await;
        assert_eq!(status, 503);
        assert_eq!(id, "client-42.a:b_c");
        assert_eq!(json["error"]["type"], "service_unavailable_error");
        assert_eq!(json["error"]["code"], "server_busy");
        assert!(log.text().contains("request{id=client-42.a:b_c"));

        // Other ids are replaced, and every request gets its own.
        let long = "a".repeat(MAX_REQUEST_ID_BYTES + 1);
        for insane in ["", "two words", "<script>", long.as_str()] {
            let (status, id, _) = send("/fine", Some(insane)).await;
            assert_eq!(status, 200);
            assert_ne!(id, insane);
            assert_eq!(id.len(), 36, "a UUID: {id}");
        }
        let (_, first, _) = send("/fine", None).await;
        let (_, second, _) = send("/fine", None).await;
        assert_ne!(first, second);
    }
}
