//! Zero-config discovery across real hosts: nodes in network namespaces on
//! a bridge, each with its own IP address, started with no peer flags.
//! They find each other with mDNS, keep other clusters apart, follow a
//! cable pulled and plugged back, and admit a node that comes back with a
//! new address. Needs root (CI runs as root).

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a failed expectation is the report

mod support;

use std::time::{Duration, Instant};

use ringlet_node::identity::{ClusterSecret, JoinToken};
use support::netns::Lan;
use support::{Node, START_TIMEOUT};

/// How a node names one refused for lacking the cluster's secret.
const REFUSED: &str = "does not hold this cluster's key";

/// The stated time for three fresh nodes to find each other and activate
/// a plan over all of them (README: "within 30 seconds").
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// A node whose cable is pulled is dropped after three silent heartbeats
/// while requests run through it, else after the heartbeat timeout (6 s)
/// plus a heartbeat; this leaves room for a busy CI machine.
const DEPARTURE_TIMEOUT: Duration = Duration::from_secs(30);

fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(future)
}

fn chat_via(node: &Node) -> String {
    let answer = block_on(support::chat(node.addr, "Name a colour.", 6, false));
    assert_eq!(answer.status, 200, "{}", answer.body);
    answer.content()
}

fn view_of(node: &Node) -> serde_json::Value {
    block_on(support::get_json(node.addr, "/v1/cluster"))
}

/// Waits until `node`'s view lists `name` as seen but not joined; returns
/// the view and the reason given.
fn wait_until_listed(node: &Node, name: &str) -> (serde_json::Value, String) {
    let listed = |view: &serde_json::Value| -> Option<String> {
        view["not_joined"]
            .as_array()?
            .iter()
            .find(|p| p["name"] == name)
            .and_then(|p| p["reason"].as_str().map(str::to_string))
    };
    let view = block_on(support::wait_for_cluster(
        node.addr,
        DISCOVERY_TIMEOUT,
        |view| listed(view).is_some(),
    ));
    let reason = listed(&view).unwrap_or_default();
    (view, reason)
}

/// The names of the nodes holding layers in the view's plan, with the
/// layers each holds.
fn stages(view: &serde_json::Value) -> Vec<(String, u64, u64)> {
    let plan = &view["plan"];
    plan["stages"]
        .as_array()
        .map(|stages| {
            stages
                .iter()
                .map(|stage| {
                    let name = view["nodes"]
                        .as_array()
                        .and_then(|nodes| nodes.iter().find(|n| n["id"] == stage["node"]))
                        .and_then(|n| n["name"].as_str())
                        .unwrap_or("?")
                        .to_string();
                    let start = stage["layers"]["start"].as_u64().expect("start");
                    let end = stage["layers"]["end"].as_u64().expect("end");
                    (name, start, end)
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn nodes_on_a_lan_find_each_other_and_follow_departures_and_returns() {
    let mut lan = Lan::new();
    let hosts: Vec<_> = [11, 12, 13]
        .into_iter()
        .map(|last| lan.add_host(last))
        .collect();
    let other_host = lan.add_host(20);

    // Three nodes, no peer flags: they find each other and share the model.
    let started = Instant::now();
    let mut nodes: Vec<Node> = ["node-a", "node-b", "node-c"]
        .iter()
        .zip(&hosts)
        .map(|(name, host)| lan.start_node(host, &["--name", name]))
        .collect();
    for node in &mut nodes {
        node.wait_for_log("plan active: 3 stages", DISCOVERY_TIMEOUT);
    }
    println!(
        "three nodes found each other and activated a 3-stage plan in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let names = ["node-a", "node-b", "node-c"];
    for (node, me) in nodes.iter_mut().zip(names) {
        for (other, host) in names.iter().zip(&hosts).filter(|(o, _)| **o != me) {
            let line = node.wait_for_log(
                &format!("discovered peer {other} at"),
                Duration::from_secs(5),
            );
            assert!(line.contains(&format!("at {}:", host.ip)), "{line}");
        }
    }
    let view = view_of(&nodes[0]);
    let plan = stages(&view);
    assert_eq!(plan.len(), 3, "{view:#}");
    let mut holders: Vec<&str> = plan.iter().map(|(n, _, _)| n.as_str()).collect();
    holders.sort_unstable();
    assert_eq!(holders, ["node-a", "node-b", "node-c"]);
    assert_eq!(plan.first().map(|s| s.1), Some(0));
    assert_eq!(plan.last().map(|s| s.2), Some(30));
    assert!(
        plan.windows(2).all(|w| w[0].2 == w[1].1),
        "contiguous layers: {plan:?}"
    );
    assert!(!chat_via(&nodes[1]).is_empty());

    // A node of another cluster on the same LAN is seen, not joined.
    let mut outsider = lan.start_node(&other_host, &["--name", "node-x", "--cluster", "lab"]);
    let line = outsider.wait_for_log("not joining peer node-a", DISCOVERY_TIMEOUT);
    assert!(line.contains("cluster `default`"), "{line}");
    outsider.wait_for_log("plan active: 1 stages", START_TIMEOUT);
    let (seen, reason) = wait_until_listed(&nodes[0], "node-x");
    assert!(reason.contains("cluster `lab`"), "{reason}");
    assert_eq!(seen["nodes"].as_array().map(Vec::len), Some(3), "{seen:#}");
    drop(outsider);

    // A node of this cluster's name without its secret (another token),
    // found by mDNS, is refused on both sides and gets no layers.
    let stranger_token = JoinToken(ClusterSecret::random()).to_string();
    let mut stranger = lan.start_node(
        &other_host,
        &["--name", "node-s", "--join", &stranger_token],
    );
    let line = stranger.wait_for_log(REFUSED, DISCOVERY_TIMEOUT);
    assert!(line.contains("refused"), "{line}");
    nodes[0].wait_for_log(REFUSED, DISCOVERY_TIMEOUT);
    stranger.wait_for_log("plan active: 1 stages", START_TIMEOUT);
    let refused = block_on(support::wait_for_cluster(
        nodes[0].addr,
        DISCOVERY_TIMEOUT,
        |view| {
            view["not_joined"].as_array().is_some_and(|peers| {
                peers
                    .iter()
                    .any(|p| p["reason"].as_str().is_some_and(|r| r.contains(REFUSED)))
            })
        },
    ));
    assert_eq!(
        refused["nodes"].as_array().map(Vec::len),
        Some(3),
        "{refused:#}"
    );
    assert_eq!(stages(&refused).len(), 3, "{refused:#}");
    assert!(!chat_via(&nodes[0]).is_empty());
    drop(stranger);

    // A node of another protocol version is listed, not joined. It is
    // advertised by this test (on the bridge only), as an older ringlet
    // would.
    let advertiser = mdns_sd::ServiceDaemon::new().expect("an mDNS daemon");
    advertiser
        .disable_interface(mdns_sd::IfKind::All)
        .expect("disable interfaces");
    advertiser
        .enable_interface(mdns_sd::IfKind::Name(lan.bridge().to_string()))
        .expect("enable the bridge");
    let properties = [
        ("node", "00000000000000aa"),
        ("name", "node-old"),
        ("cluster", "default"),
        ("protocol", "1"),
        ("version", "0.0.1"),
    ];
    let service = mdns_sd::ServiceInfo::new(
        ringlet_node::cluster::discovery::SERVICE_TYPE,
        "node-old-000000aa",
        "ringlet-old.local.",
        std::net::IpAddr::from(lan.gateway()),
        52415,
        &properties[..],
    )
    .expect("a service");
    advertiser.register(service).expect("advertise");
    let (seen, reason) = wait_until_listed(&nodes[0], "node-old");
    assert!(reason.contains("protocol version 1"), "{reason}");
    nodes[0].wait_for_log("not joining peer node-old", DISCOVERY_TIMEOUT);
    assert_eq!(seen["nodes"].as_array().map(Vec::len), Some(3), "{seen:#}");
    let _ = advertiser.shutdown();

    // Where multicast is off, --peer still joins across hosts.
    let mark = nodes[0].log_mark();
    let first = nodes[0].addr.to_string();
    let mut manual = lan.start_node(
        &other_host,
        &["--name", "node-y", "--no-mdns", "--peer", &first],
    );
    manual.wait_for_log("discovery is off (--no-mdns)", Duration::from_secs(5));
    manual.wait_for_log("plan active: 4 stages", DISCOVERY_TIMEOUT);
    assert!(
        !manual
            .log_seen
            .iter()
            .any(|l| l.contains("discovered peer")),
        "--no-mdns discovers nothing"
    );
    assert!(!chat_via(&manual).is_empty());
    manual.kill();
    nodes[0].wait_for_log_since(mark, "peer node-y left", DEPARTURE_TIMEOUT);
    nodes[0].wait_for_log_since(mark, "plan active: 3 stages", DISCOVERY_TIMEOUT);

    // Pull node-c's cable while an answer streams through its stage: the
    // owner hears nothing from it, counts it as lost, the other two
    // re-plan, and the answer finishes exactly as uninterrupted.
    let prompt = "Tell me about the sea.";
    let reference = block_on(support::chat(nodes[0].addr, prompt, 48, false)).content();
    let mark = nodes[0].log_mark();
    let (streamed, pulled_at) = block_on(async {
        let (mut stream, mut seen) = support::start_stream(nodes[0].addr, prompt, 48, 6).await;
        lan.set_link(&hosts[2], false);
        let pulled_at = Instant::now();
        seen.extend(support::read_rest(&mut stream, DEPARTURE_TIMEOUT).await);
        (String::from_utf8_lossy(&seen).into_owned(), pulled_at)
    });
    let body = streamed.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    assert!(
        !body.contains("\"error\""),
        "the answer was not cut: {body}"
    );
    let (text, finish) = support::streamed_content(&support::sse_data(body));
    assert_eq!(finish.as_deref(), Some("length"), "{body}");
    assert_eq!(text, reference, "the answer with a cable pulled mid-way");
    let line = nodes[0].wait_for_log_since(
        mark,
        "recovered from the loss of node node-c",
        DEPARTURE_TIMEOUT,
    );
    println!(
        "cable pulled mid-answer: the answer finished {:.1} s later\n  {line}",
        pulled_at.elapsed().as_secs_f64()
    );
    nodes[0].wait_for_log_since(mark, "peer node-c left", DEPARTURE_TIMEOUT);
    nodes[0].wait_for_log_since(mark, "plan active: 2 stages", DEPARTURE_TIMEOUT);
    let view = view_of(&nodes[0]);
    let names: Vec<&str> = view["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["name"].as_str())
        .collect();
    assert!(
        !names.contains(&"node-c"),
        "node-c left the view: {names:?}"
    );
    let plan = stages(&view);
    assert_eq!(plan.len(), 2, "{view:#}");
    assert_eq!((plan[0].1, plan[1].2), (0, 30));
    assert!(!chat_via(&nodes[0]).is_empty());

    // Plug it back: it is admitted again, with no restart anywhere.
    let mark = nodes[0].log_mark();
    lan.set_link(&hosts[2], true);
    nodes[0].wait_for_log_since(mark, "peer node-c joined", DISCOVERY_TIMEOUT);
    nodes[0].wait_for_log_since(mark, "plan active: 3 stages", DISCOVERY_TIMEOUT);
    assert!(!chat_via(&nodes[0]).is_empty());

    // node-c comes back on another address: admitted again.
    let mark = nodes[0].log_mark();
    nodes[2].kill();
    nodes[0].wait_for_log_since(mark, "peer node-c left", DEPARTURE_TIMEOUT);
    let moved = lan.set_address(&hosts[2], 33);
    let restarted = Instant::now();
    nodes[2] = lan.start_node(&moved, &["--name", "node-c"]);
    let line = nodes[0].wait_for_log_since(mark, "discovered peer node-c at", DISCOVERY_TIMEOUT);
    assert!(
        line.contains(&format!("{}:", moved.ip)),
        "the new address: {line}"
    );
    nodes[0].wait_for_log_since(mark, "plan active: 3 stages", DISCOVERY_TIMEOUT);
    println!(
        "node-c at its new address {} was admitted in {:.1} s",
        moved.ip,
        restarted.elapsed().as_secs_f64()
    );
    let view = view_of(&nodes[0]);
    let c = view["nodes"]
        .as_array()
        .and_then(|nodes| nodes.iter().find(|n| n["name"] == "node-c"))
        .expect("node-c in the view");
    assert!(
        c["address"]
            .as_str()
            .is_some_and(|a| a.starts_with(&format!("{}:", moved.ip))),
        "{c:#}"
    );
    assert!(!chat_via(&nodes[1]).is_empty());
    drop(nodes);

    a_node_on_the_network_answers_other_machines_only_with_a_key(&mut lan);
    drop(lan);
}

/// A node listening on the LAN with no API key answers other machines'
/// API requests with a 403 that says how to open it; with a key, only
/// requests that carry it get in. The health check stays open. (Part of
/// the test above: one LAN per test process.)
fn a_node_on_the_network_answers_other_machines_only_with_a_key(lan: &mut Lan) {
    let host = lan.add_host(40);
    let open = |node: &Node, path: &str, key: Option<&str>| {
        let bearer = key.map(|k| format!("Bearer {k}"));
        let headers: Vec<(&str, &str)> = bearer
            .as_deref()
            .map(|b| vec![("Authorization", b)])
            .unwrap_or_default();
        block_on(support::request_raw(node.addr, "GET", path, &headers, None))
    };

    let mut closed = lan.start_node_exact(&host, &["--name", "node-closed", "--no-mdns"]);
    closed.wait_for_log("answers this machine only", START_TIMEOUT);
    closed.wait_for_log("plan active: 1 stages", START_TIMEOUT);
    let refused = open(&closed, "/v1/models", None);
    assert_eq!(refused.status, 403, "{}", refused.body);
    assert_eq!(refused.json()["error"]["code"], "api_key_required");
    assert!(refused.body.contains("--api-key"), "{}", refused.body);
    assert_eq!(open(&closed, "/healthz", None).status, 200);
    drop(closed);

    let mut keyed = lan.start_node_exact(
        &host,
        &["--name", "node-keyed", "--no-mdns", "--api-key", "lan-key"],
    );
    keyed.wait_for_log("plan active: 1 stages", START_TIMEOUT);
    let missing = open(&keyed, "/v1/models", None);
    assert_eq!(missing.status, 401, "{}", missing.body);
    assert_eq!(missing.json()["error"]["code"], "invalid_api_key");
    assert_eq!(open(&keyed, "/v1/models", Some("wrong")).status, 401);
    assert_eq!(open(&keyed, "/v1/models", Some("lan-key")).status, 200);
    assert_eq!(open(&keyed, "/healthz", None).status, 200);
}
