//! The node's metrics, for `GET /metrics` in Prometheus' text format
//! (prometheus-client). One registry per process: the parts that count
//! (the HTTP layer, text streams, stage threads, link readers and
//! writers) reach it through [`global`], without threading a handle
//! through every constructor; values that already live elsewhere (the
//! engine's KV reservations, the links' RTT) are read at scrape time.

use std::sync::LazyLock;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label pairs, as written.
pub type Labels = Vec<(&'static str, String)>;

/// The `Content-Type` of the text `GET /metrics` answers.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

pub struct Metrics {
    registry: Registry,
    /// Requests answered, by route (its pattern) and status code.
    pub http_requests: Family<Labels, Counter>,
    pub prompt_tokens: Counter,
    pub completion_tokens: Counter,
    /// From a request's submission to its first token, at its owner.
    pub time_to_first_token: Histogram,
    /// Between a request's consecutive tokens, at its owner.
    pub inter_token_latency: Histogram,
    /// One step of this node's stage: a batch of decode rows and prompt
    /// chunks.
    pub stage_step: Histogram,
    /// Sequences in one step of this node's stage (its batch).
    pub step_sequences: Histogram,
    /// Seconds this node's stage spent in steps (its utilisation, as a
    /// rate).
    pub stage_busy: Counter<f64, AtomicU64>,
    /// Frame bytes over cluster links: the two members of the
    /// `link_bytes` family, taken once so that counting a frame is one
    /// atomic add.
    pub link_bytes_sent: Counter,
    pub link_bytes_received: Counter,
    /// Requests fed again on a new plan after a node was lost.
    pub recoveries: Counter,
    /// A decode step's hops: into a stage, from the moment the previous
    /// stage's output was ready (or the owner sent the step) to the moment
    /// the stage began on it (`into_stage`, measured where the stage
    /// runs); back to the owner, from the last stage's token to its
    /// arrival at the owner's node (`to_owner`). The two members of the
    /// `hop_seconds` family.
    pub hop_into_stage: Histogram,
    pub hop_to_owner: Histogram,
    // Read at scrape time.
    active_requests: Gauge,
    queued_requests: Gauge,
    kv_reserved_bytes: Gauge,
    kv_budget_bytes: Gauge,
    cluster_kv_capacity_tokens: Gauge,
    cluster_kv_others_tokens: Gauge,
    link_rtt_seconds: Family<Labels, Gauge<f64, AtomicU64>>,
    link_bandwidth: Family<Labels, Gauge>,
}

/// Latency buckets from 1 ms to about 33 s, doubling.
fn latency_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// Records a hop that began at `since` (Unix µs) and ends now.
pub fn observe_hop(hops: &Histogram, since: u64) {
    let micros = crate::unix_micros().saturating_sub(since);
    hops.observe(micros as f64 / 1e6);
}

/// Hop buckets from 10 µs to about 0.3 s, doubling.
fn hop_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.000_01, 2.0, 16))
}

impl Metrics {
    fn new() -> Self {
        let hops =
            Family::<Labels, Histogram>::new_with_constructor(hop_buckets as fn() -> Histogram);
        let hop = |kind: &str| {
            hops.get_or_create(&vec![("kind", kind.to_string())])
                .clone()
        };
        let link_bytes = Family::<Labels, Counter>::default();
        let direction = |d: &str| {
            link_bytes
                .get_or_create(&vec![("direction", d.to_string())])
                .clone()
        };
        let mut metrics = Self {
            registry: Registry::with_prefix("ringlet"),
            http_requests: Family::default(),
            prompt_tokens: Counter::default(),
            completion_tokens: Counter::default(),
            time_to_first_token: latency_buckets(),
            inter_token_latency: latency_buckets(),
            stage_step: latency_buckets(),
            step_sequences: Histogram::new(exponential_buckets(1.0, 2.0, 8)),
            stage_busy: Counter::default(),
            link_bytes_sent: direction("sent"),
            link_bytes_received: direction("received"),
            recoveries: Counter::default(),
            hop_into_stage: hop("into_stage"),
            hop_to_owner: hop("to_owner"),
            active_requests: Gauge::default(),
            queued_requests: Gauge::default(),
            kv_reserved_bytes: Gauge::default(),
            kv_budget_bytes: Gauge::default(),
            cluster_kv_capacity_tokens: Gauge::default(),
            cluster_kv_others_tokens: Gauge::default(),
            link_rtt_seconds: Family::default(),
            link_bandwidth: Family::default(),
        };
        let registry = &mut metrics.registry;
        registry.register(
            "http_requests",
            "HTTP requests answered, by route and status",
            metrics.http_requests.clone(),
        );
        registry.register(
            "prompt_tokens",
            "Prompt tokens of the requests this node took",
            metrics.prompt_tokens.clone(),
        );
        registry.register(
            "completion_tokens",
            "Tokens generated for the requests this node took",
            metrics.completion_tokens.clone(),
        );
        registry.register(
            "time_to_first_token_seconds",
            "Time from a request's submission to its first token",
            metrics.time_to_first_token.clone(),
        );
        registry.register(
            "inter_token_latency_seconds",
            "Time between a request's consecutive tokens",
            metrics.inter_token_latency.clone(),
        );
        registry.register(
            "stage_step_seconds",
            "Time of one step of this node's stage (a batch of decode rows and prompt chunks)",
            metrics.stage_step.clone(),
        );
        registry.register(
            "step_sequences",
            "Sequences in one step of this node's stage (its batch)",
            metrics.step_sequences.clone(),
        );
        registry.register(
            "stage_busy_seconds",
            "Time this node's stage spent in steps; its rate is the stage's utilisation",
            metrics.stage_busy.clone(),
        );
        registry.register(
            "link_bytes",
            "Frame bytes over cluster links, by direction",
            link_bytes,
        );
        registry.register(
            "hop_seconds",
            "A decode step's hops: into a stage, from the previous stage's output or the owner's step to the stage's start (into_stage); from the last stage's token to the owner (to_owner)",
            hops,
        );
        registry.register(
            "recoveries",
            "Requests fed again on a new plan after a node was lost",
            metrics.recoveries.clone(),
        );
        registry.register(
            "active_requests",
            "Requests being generated now",
            metrics.active_requests.clone(),
        );
        registry.register(
            "queued_requests",
            "Requests waiting to start",
            metrics.queued_requests.clone(),
        );
        registry.register(
            "kv_cache_reserved_bytes",
            "KV cache reserved by the active requests",
            metrics.kv_reserved_bytes.clone(),
        );
        registry.register(
            "kv_cache_budget_bytes",
            "KV cache the active requests may reserve together",
            metrics.kv_budget_bytes.clone(),
        );
        registry.register(
            "kv_cache_cluster_capacity_tokens",
            "Tokens of KV cache the plan's tightest stage holds for every owner's requests (0 while unknown)",
            metrics.cluster_kv_capacity_tokens.clone(),
        );
        registry.register(
            "kv_cache_cluster_others_tokens",
            "Tokens of KV cache reserved by the requests other nodes own, as they last said",
            metrics.cluster_kv_others_tokens.clone(),
        );
        registry.register(
            "link_rtt_seconds",
            "Round-trip time of the last heartbeat on each of this node's links",
            metrics.link_rtt_seconds.clone(),
        );
        registry.register(
            "link_bandwidth_bytes_per_second",
            "Bytes per second this node last received in large frames on each link",
            metrics.link_bandwidth.clone(),
        );
        metrics
    }

    /// The text of every metric, after the values read at scrape time.
    pub fn render(&self, now: Snapshot<'_>) -> String {
        self.active_requests.set(now.active_requests as i64);
        self.queued_requests.set(now.queued_requests as i64);
        self.kv_reserved_bytes
            .set(i64::try_from(now.kv_reserved_bytes).unwrap_or(i64::MAX));
        self.kv_budget_bytes
            .set(i64::try_from(now.kv_budget_bytes).unwrap_or(i64::MAX));
        let (capacity, others) = now
            .cluster_kv
            .map_or((0, 0), |kv| (kv.capacity_tokens, kv.others_tokens));
        self.cluster_kv_capacity_tokens
            .set(i64::try_from(capacity).unwrap_or(i64::MAX));
        self.cluster_kv_others_tokens
            .set(i64::try_from(others).unwrap_or(i64::MAX));
        // Links that went away leave the families.
        self.link_rtt_seconds.clear();
        self.link_bandwidth.clear();
        for link in now.links {
            let labels = vec![
                ("peer", link.peer.clone()),
                ("transport", link.transport.to_string()),
            ];
            if let Some(rtt) = link.rtt_seconds {
                self.link_rtt_seconds.get_or_create(&labels).set(rtt);
            }
            if let Some(bandwidth) = link.bandwidth_bytes_per_second {
                self.link_bandwidth
                    .get_or_create(&labels)
                    .set(i64::try_from(bandwidth).unwrap_or(i64::MAX));
            }
        }
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_text::encode(&mut text, &self.registry);
        text
    }
}

/// What `GET /metrics` reads from elsewhere when it is asked.
pub struct Snapshot<'a> {
    pub active_requests: usize,
    pub queued_requests: usize,
    pub kv_reserved_bytes: u64,
    pub kv_budget_bytes: u64,
    /// The cluster's room for KV cache, when the node is in one.
    pub cluster_kv: Option<crate::engine::KvRoom>,
    pub links: &'a [LinkSnapshot],
}

/// One of this node's links.
pub struct LinkSnapshot {
    /// The peer's name.
    pub peer: String,
    pub transport: &'static str,
    pub rtt_seconds: Option<f64>,
    pub bandwidth_bytes_per_second: Option<u64>,
}

/// The process's metrics.
pub fn global() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text_with_what_was_counted() {
        let metrics = Metrics::new();
        metrics
            .http_requests
            .get_or_create(&vec![
                ("route", "/v1/models".to_string()),
                ("status", "200".to_string()),
            ])
            .inc();
        metrics.time_to_first_token.observe(0.25);
        metrics.link_bytes_sent.inc_by(1500);
        let links = [LinkSnapshot {
            peer: "b".into(),
            transport: "tcp",
            rtt_seconds: Some(0.002),
            bandwidth_bytes_per_second: None,
        }];
        let text = metrics.render(Snapshot {
            active_requests: 1,
            queued_requests: 0,
            kv_reserved_bytes: 4096,
            kv_budget_bytes: 8192,
            cluster_kv: Some(crate::engine::KvRoom {
                capacity_tokens: 900,
                stage: "node b".into(),
                others_tokens: 120,
            }),
            links: &links,
        });
        for line in [
            "ringlet_http_requests_total{route=\"/v1/models\",status=\"200\"} 1",
            "ringlet_time_to_first_token_seconds_count 1",
            "ringlet_link_bytes_total{direction=\"sent\"} 1500",
            "ringlet_kv_cache_reserved_bytes 4096",
            "ringlet_kv_cache_cluster_capacity_tokens 900",
            "ringlet_kv_cache_cluster_others_tokens 120",
            "ringlet_link_rtt_seconds{peer=\"b\",transport=\"tcp\"} 0.002",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in:\n{text}");
        }
    }
}
