//! One ring across NATs, in a lab of network namespaces
//! ([`support::natlab`]): a relay node `p` and a STUN/TURN server (coturn)
//! on the public side; `a` and `b` each behind a home router (masquerade
//! plus a firewall that drops new connections from outside); `c` behind a
//! symmetric NAT. Every node is started with `--peer p` only. `a` and `b`
//! cannot reach each other over TCP, link over WebRTC directly (the TURN
//! server relays none of their bytes), `c` links through TURN, the cluster
//! answers bit for bit as one node does, and `p` leaving does not break
//! the `a`–`b` link. Needs root, nftables and coturn (tests/run installs
//! them; CI runs as root).

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a failed expectation is the report

mod support;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::natlab::{Host, Nat, NatLab};
use support::{Node, get_json, request};

const GOLDEN: &str = include_str!("golden/smollm2-135m.json");

/// Time for nodes to link (TCP dials time out after 3 s, then ICE and
/// DTLS) and activate a plan over all of them.
const RING_TIMEOUT: Duration = Duration::from_secs(90);

const TURN_USER: &str = "ringlet";
const TURN_CREDENTIAL: &str = "lab-credential";
/// The TURN server's relay ports: the bytes it relays cross these.
const RELAY_PORTS: &str = "49152-49999";

/// coturn, started in the TURN host's namespace; killed on drop.
struct TurnServer(Child);

impl TurnServer {
    fn start(lab: &NatLab, host: &Host) -> TurnServer {
        let ip = host.public.to_string();
        let child = lab
            .command_in(host, "turnserver")
            .args([
                "-n",
                &format!("--listening-ip={ip}"),
                &format!("--relay-ip={ip}"),
                "--listening-port=3478",
                "--min-port=49152",
                "--max-port=49999",
                "--lt-cred-mech",
                &format!("--user={TURN_USER}:{TURN_CREDENTIAL}"),
                "--realm=ringlet.test",
                "--no-tls",
                "--no-dtls",
                "--no-cli",
                // One thread: with a thread per core, a client's requests
                // can reach another thread's session and fail ("Wrong
                // nonce").
                "--relay-threads=0",
                "--log-file=stdout",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start turnserver (coturn; tests/run installs it)");
        // Ready once it answers on its port: a STUN binding request gets
        // a response (20-byte header, type 0x0101).
        let deadline = Instant::now() + Duration::from_secs(20);
        let script = format!(
            "import socket,os,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(0.5)\nreq=b'\\x00\\x01\\x00\\x00\\x21\\x12\\xa4\\x42'+os.urandom(12)\ns.sendto(req,('{ip}',3478))\ndata=s.recv(2048)\nsys.exit(0 if data[:2]==b'\\x01\\x01' else 1)"
        );
        while Instant::now() < deadline {
            let answered = lab
                .command_in(host, "python3")
                .args(["-c", &script])
                .output()
                .is_ok_and(|o| o.status.success());
            if answered {
                return TurnServer(child);
            }
        }
        let mut child = child;
        let _ = child.kill();
        let _ = child.wait();
        panic!("the TURN server did not answer STUN on {ip}:3478 within 20 s");
    }
}

impl Drop for TurnServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(future)
}

fn golden_cases() -> Vec<Value> {
    serde_json::from_str::<Value>(GOLDEN).expect("golden")["cases"]
        .as_array()
        .expect("cases")
        .clone()
}

/// Every golden case through `node`: each answer is llama.cpp's (one
/// node's) exactly.
fn answers_like_one_node(node: &Node) {
    for case in golden_cases() {
        let body = json!({ "model": support::MODEL, "messages": case["messages"], "temperature": 0, "max_tokens": 32 })
            .to_string();
        let answer = block_on(request(
            node.addr,
            "POST",
            "/v1/chat/completions",
            Some(&body),
        ));
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert_eq!(
            answer.content(),
            case["output_text"].as_str().expect("text"),
            "case {}",
            case["name"]
        );
    }
}

/// A long prompt, so that its prefill moves activations worth measuring.
fn long_chat(node: &Node) {
    let text = "The ring passes activations from node to node. ".repeat(40);
    let body = json!({ "model": support::MODEL, "messages": [{"role": "user", "content": text}], "temperature": 0, "max_tokens": 4 })
        .to_string();
    let answer = block_on(request(
        node.addr,
        "POST",
        "/v1/chat/completions",
        Some(&body),
    ));
    assert_eq!(answer.status, 200, "{}", answer.body);
}

/// The node with this name in `view`.
fn id_of(view: &Value, name: &str) -> Value {
    view["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["name"] == name)
        .unwrap_or_else(|| panic!("no node {name} in {view:#}"))["id"]
        .clone()
}

/// The names of the plan's stages in `view`, stage 0 first.
fn plan_order(view: &Value) -> Vec<String> {
    let name_of = |id: &Value| {
        view["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .find(|n| &n["id"] == id)
            .and_then(|n| n["name"].as_str())
            .unwrap_or_else(|| panic!("no node {id} in {view:#}"))
            .to_string()
    };
    view["plan"]["stages"]
        .as_array()
        .unwrap_or_else(|| panic!("no plan in {view:#}"))
        .iter()
        .map(|stage| name_of(&stage["node"]))
        .collect()
}

/// The hops of `order` that carry activations (stage `k` to stage
/// `k + 1`) between `node` and any of `through`, as `(from, to)` names.
fn activation_hops_between(
    order: &[String],
    node: &str,
    through: &[&str],
) -> Vec<(String, String)> {
    order
        .windows(2)
        .filter(|hop| {
            (hop[0] == node && through.contains(&hop[1].as_str()))
                || (hop[1] == node && through.contains(&hop[0].as_str()))
        })
        .map(|hop| (hop[0].clone(), hop[1].clone()))
        .collect()
}

/// The link from `from` to `to` as `view` shows it.
fn link(view: &Value, from: &str, to: &str) -> Value {
    let (from, to) = (id_of(view, from), id_of(view, to));
    view["links"]
        .as_array()
        .expect("links")
        .iter()
        .find(|l| l["from"] == from && l["to"] == to)
        .unwrap_or_else(|| panic!("no link in {view:#}"))
        .clone()
}

/// The lab with its TURN server and relay node `p` started.
struct Lab {
    lab: NatLab,
    turn_host: Host,
    relay_host: Host,
    _turn: TurnServer,
    /// Dropped last: the next lab starts once this one is gone.
    _one_lab_at_a_time: std::sync::MutexGuard<'static, ()>,
}

/// One lab runs at a time. Each lab's nodes and TURN server read their
/// UDP sockets on threads that share two cores; with two labs (and two
/// busy loops) running, the hosts' `RcvbufErrors` counted hundreds of
/// dropped datagrams, and a drop that SCTP's fast retransmit misses waits
/// for its retransmission timer (1 s, doubling up to 60 s, fixed in
/// rtc-sctp). The lab measures what links do, not what two cores do
/// under several rings.
static ONE_LAB_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Lab {
    fn new() -> Lab {
        // A test that failed holding the lab poisons the lock; the next
        // lab is still a fresh one.
        let one_lab_at_a_time = ONE_LAB_AT_A_TIME
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut lab = NatLab::new();
        let turn_host = lab.public_host(3);
        let relay_host = lab.public_host(10);
        let turn = TurnServer::start(&lab, &turn_host);
        lab.count_udp(&turn_host, RELAY_PORTS);
        Lab {
            lab,
            turn_host,
            relay_host,
            _turn: turn,
            _one_lab_at_a_time: one_lab_at_a_time,
        }
    }

    fn stun(&self) -> String {
        format!("stun:{}:3478", self.turn_host.public)
    }

    fn turn(&self) -> String {
        format!("turn:{}:3478", self.turn_host.public)
    }
}

#[test]
fn nodes_behind_nats_form_one_ring_over_webrtc() {
    let mut lab = Lab::new();
    let a = lab.lab.private_host(1, Nat::Home);
    let b = lab.lab.private_host(2, Nat::Home);
    let c = lab.lab.private_host(3, Nat::Symmetric);

    // Only p knows the STUN and TURN servers: the others learn them from p.
    let (stun, turn) = (lab.stun(), lab.turn());
    let mut p = lab.lab.start_node(
        &lab.relay_host,
        &[
            "--name",
            "p",
            "--stun",
            &stun,
            "--turn",
            &turn,
            "--turn-user",
            TURN_USER,
            "--turn-credential",
            TURN_CREDENTIAL,
        ],
    );
    let peer = format!("{}:{}", lab.relay_host.public, p.addr.port());
    let started = Instant::now();
    let mut node_a = lab.lab.start_node(&a, &["--name", "a", "--peer", &peer]);
    let mut node_b = lab.lab.start_node(&b, &["--name", "b", "--peer", &peer]);

    // The premise: a cannot open a TCP connection to b (nor b to a), but
    // both reach p.
    let lan = &lab.lab;
    assert!(
        !lan.tcp_connects(&a, b.public, node_b.addr.port()),
        "a reached b over TCP: the lab has no NAT"
    );
    assert!(
        !lan.tcp_connects(&b, a.public, node_a.addr.port()),
        "b reached a over TCP"
    );
    assert!(
        lan.tcp_connects(&a, lab.relay_host.public, p.addr.port()),
        "a cannot reach p"
    );

    for node in [&mut node_a, &mut node_b, &mut p] {
        node.wait_for_log("plan active: 3 stages", RING_TIMEOUT);
    }
    println!(
        "p, a and b formed a 3-stage ring {:.1} s after a and b started",
        started.elapsed().as_secs_f64()
    );
    node_a.wait_for_log(
        "using the STUN/TURN servers a peer shared",
        Duration::from_secs(5),
    );
    let view = block_on(get_json(node_a.addr, "/v1/cluster"));
    let a_to_b = link(&view, "a", "b");
    assert_eq!(a_to_b["transport"], "webrtc", "{view:#}");
    assert_eq!(link(&view, "a", "p")["transport"], "tcp", "{view:#}");
    println!(
        "a–b handshake (ICE + DTLS): {:.0} ms",
        a_to_b["handshake_ms"].as_f64().unwrap_or(0.0)
    );

    // a and b were told of the TURN server, yet it relays none of their
    // bytes: a long prefill moves activations between them directly.
    let relayed_before = lab.lab.counted_bytes(&lab.turn_host);
    long_chat(&node_b);
    answers_like_one_node(&node_a);
    let relayed = lab.lab.counted_bytes(&lab.turn_host) - relayed_before;
    assert_eq!(
        relayed, 0,
        "the TURN server relayed {relayed} bytes between a and b"
    );

    // c, behind a symmetric NAT, can link to a and b only through TURN.
    let mut node_c = lab.lab.start_node(&c, &["--name", "c", "--peer", &peer]);
    for node in [&mut node_c, &mut node_a, &mut node_b, &mut p] {
        node.wait_for_log("plan active: 4 stages", RING_TIMEOUT);
    }
    let view = block_on(get_json(node_c.addr, "/v1/cluster"));
    for other in ["a", "b"] {
        let through = link(&view, "c", other);
        assert_eq!(through["transport"], "webrtc-turn", "{view:#}");
        println!(
            "c–{other} handshake through TURN (ICE + DTLS): {:.0} ms",
            through["handshake_ms"].as_f64().unwrap_or(0.0)
        );
    }
    // Activations cross TURN where c's neighbour in the ring is a or b:
    // each stage sends them to the next, and only the last stage's
    // answer (a token) goes back. Where p sits on c's only such hop,
    // c's TURN links carry no more than its control frames.
    let order = plan_order(&view);
    let crossing = activation_hops_between(&order, "c", &["a", "b"]);
    let relayed_before = lab.lab.counted_bytes(&lab.turn_host);
    for node in [&node_c, &node_a] {
        answers_like_one_node(node);
    }
    let relayed = lab.lab.counted_bytes(&lab.turn_host) - relayed_before;
    println!(
        "ring {order:?}: c's activation hops through TURN {crossing:?}; TURN relayed {relayed} bytes"
    );
    if crossing.is_empty() {
        assert!(relayed > 0, "the TURN server relayed nothing of c's frames");
    } else {
        assert!(
            relayed > 100_000,
            "the TURN server relayed only {relayed} bytes of c's activations over {crossing:?}"
        );
    }

    // p leaves; a, b and c go on, and their WebRTC links stay up.
    let mark = node_a.log_mark();
    p.kill();
    node_a.wait_for_log_since(mark, "plan active: 3 stages", RING_TIMEOUT);
    let left: Vec<String> = node_a
        .lines_since(mark)
        .into_iter()
        .filter(|l| l.contains("peer b left") || l.contains("peer c left"))
        .collect();
    assert!(
        left.is_empty(),
        "a lost a WebRTC link when p left: {left:?}"
    );
    let view = block_on(get_json(node_a.addr, "/v1/cluster"));
    assert_eq!(link(&view, "a", "b")["transport"], "webrtc", "{view:#}");
    answers_like_one_node(&node_b);
}

/// Without a TURN server, a node behind a symmetric NAT cannot link to
/// the nodes behind other NATs: it says why, the leader leaves it out of
/// the plan (the node with the most unlinkable pairs goes), and the ring
/// goes on without it.
#[test]
fn without_turn_a_node_behind_a_symmetric_nat_is_left_out_with_the_reason() {
    let mut lab = Lab::new();
    let a = lab.lab.private_host(1, Nat::Home);
    let b = lab.lab.private_host(2, Nat::Home);
    let c = lab.lab.private_host(3, Nat::Symmetric);
    let stun = lab.stun();
    let mut p = lab
        .lab
        .start_node(&lab.relay_host, &["--name", "p", "--stun", &stun]);
    let peer = format!("{}:{}", lab.relay_host.public, p.addr.port());
    let mut node_a = lab.lab.start_node(&a, &["--name", "a", "--peer", &peer]);
    let mut node_b = lab.lab.start_node(&b, &["--name", "b", "--peer", &peer]);
    for node in [&mut node_a, &mut node_b, &mut p] {
        node.wait_for_log("plan active: 3 stages", RING_TIMEOUT);
    }

    let mark_p = p.log_mark();
    let mut node_c = lab.lab.start_node(&c, &["--name", "c", "--peer", &peer]);
    let why = node_c.wait_for_log("over WebRTC: ICE found no path", RING_TIMEOUT);
    assert!(
        why.contains("no TURN server is configured") && why.contains("--turn"),
        "{why}"
    );
    p.wait_for_log_since(
        mark_p,
        "plans leave one of them out until they link",
        RING_TIMEOUT,
    );
    p.wait_for_log_since(mark_p, "plan active: 3 stages", RING_TIMEOUT);
    let view = block_on(get_json(node_c.addr, "/v1/cluster"));
    let listed = view["not_joined"].as_array().expect("not_joined");
    assert!(
        listed.iter().any(|n| n["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no TURN server"))),
        "{view:#}"
    );
    for node in [&node_a, &node_b, &p] {
        answers_like_one_node(node);
    }
}

/// The same 2-stage ring (two nodes behind home NATs; a relay that
/// holds no layers signals for them) over WebRTC, then, with a port
/// forwarded on each router so that TCP connects, over TCP: each answers
/// as one node does, and `ringlet bench cluster` measures each through a's
/// API, reporting the a–b link's transport. The figures it prints are the
/// README's (`cargo test --release --test nat -- --nocapture
/// webrtc_and_over_tcp`); nothing here asserts a speed.
#[test]
fn the_same_ring_over_webrtc_and_over_tcp_answers_alike_and_is_measured() {
    const PORT_A: u16 = 7101;
    const PORT_B: u16 = 7102;
    for tcp in [false, true] {
        let mut lab = Lab::new();
        let a = lab.lab.private_host(1, Nat::Home);
        let b = lab.lab.private_host(2, Nat::Home);
        if tcp {
            lab.lab.forward_tcp(&a, PORT_A);
            lab.lab.forward_tcp(&b, PORT_B);
        }
        let stun = lab.stun();
        let p = lab.lab.start_node(
            &lab.relay_host,
            &["--name", "p", "--stun", &stun, "--memory-budget", "1MiB"],
        );
        let peer = format!("{}:{}", lab.relay_host.public, p.addr.port());
        let mut node_a = lab
            .lab
            .start_node_on(&a, PORT_A, &["--name", "a", "--peer", &peer]);
        let mut node_b = lab
            .lab
            .start_node_on(&b, PORT_B, &["--name", "b", "--peer", &peer]);
        for node in [&mut node_a, &mut node_b] {
            node.wait_for_log("plan active: 2 stages", RING_TIMEOUT);
        }
        let view = block_on(get_json(node_a.addr, "/v1/cluster"));
        let expected = if tcp { "tcp" } else { "webrtc" };
        assert_eq!(link(&view, "a", "b")["transport"], expected, "{view:#}");
        answers_like_one_node(&node_a);

        let report_path = std::env::temp_dir().join(format!(
            "ringlet-nat-bench-{}-{expected}.json",
            std::process::id()
        ));
        let output = std::process::Command::new(support::ringlet_binary())
            .args([
                "bench",
                "cluster",
                "--node",
                &node_a.addr.to_string(),
                "--json",
            ])
            .arg(&report_path)
            .output()
            .expect("run ringlet bench cluster");
        println!(
            "\n=== a–b over {expected} (NAT lab) ===\n{}{}",
            String::from_utf8_lossy(&output.stderr),
            String::from_utf8_lossy(&output.stdout)
        );
        assert!(output.status.success(), "ringlet bench cluster failed");
        let report: Value =
            serde_json::from_slice(&std::fs::read(&report_path).expect("the bench's JSON"))
                .expect("JSON");
        let _ = std::fs::remove_file(&report_path);
        assert_eq!(report["stages"], 2, "{report:#}");
        assert_eq!(report["rounds"].as_array().map(Vec::len), Some(3));
        assert!(
            report["prefill"]["prompt_tokens"]
                .as_u64()
                .is_some_and(|n| n > 2000),
            "{report:#}"
        );
        let a_to_b = report["links"]
            .as_array()
            .expect("links")
            .iter()
            .find(|l| l["from"] == "a" && l["to"] == "b")
            .unwrap_or_else(|| panic!("no a–b link in {report:#}"))
            .clone();
        assert_eq!(a_to_b["transport"], expected, "{report:#}");
    }
}

/// A fake member that the test drives: it holds the cluster's secret and
/// sends signals a real member would never send.
mod bad_signals {
    use super::*;
    use ringlet_node::cluster::protocol::{
        Frame, Hello, PROTOCOL_VERSION, Resources, Signal, SignalBody,
    };
    use ringlet_node::cluster::rtc::{self, RtcConfig};
    use ringlet_node::cluster::{link, secure};
    use ringlet_node::identity::ClusterSecret;
    use scheduler::NodeId;

    async fn fake_member(
        node: &Node,
        id: NodeId,
        peers: Vec<(NodeId, String)>,
    ) -> ringlet_node::cluster::secure::Session {
        let stream = link::dial(&node.addr.to_string()).await.expect("dial");
        let mut session = support::member_handshake(stream).await;
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            node: id,
            name: "mallory".into(),
            cluster: "default".into(),
            address: "127.0.0.1:9".into(),
            resources: Resources {
                device: "cpu".into(),
                device_name: "test".into(),
                memory_total_bytes: 1 << 30,
                memory_available_bytes: 1 << 30,
                memory_budget_bytes: 0,
                compute_score: 1.0,
            },
            model: ringlet_node::cluster::protocol::ModelIdentity {
                name: "other".into(),
                fingerprint: "other".into(),
            },
            peers: peers
                .into_iter()
                .map(
                    |(node, address)| ringlet_node::cluster::protocol::PeerAddress {
                        node,
                        address,
                    },
                )
                .collect(),
            serving_since_ms: None,
            ice_servers: Vec::new(),
            dtls_fingerprints: None,
        };
        session
            .writer
            .write_frame(&Frame::Hello(hello))
            .await
            .expect("hello");
        let (theirs, _) = session
            .reader
            .read_frame_timed()
            .await
            .expect("their hello");
        assert!(matches!(theirs, Frame::Hello(_)));
        session
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn garbled_and_unexpected_signals_are_refused_and_the_node_keeps_serving() {
        let mut node = Node::start_ready(&["--name", "target"]);
        let view = get_json(node.addr, "/v1/cluster").await;
        let target =
            NodeId(u64::from_str_radix(view["node"].as_str().expect("id"), 16).expect("hex"));
        // The member tells of a node with the lowest id, so that node's
        // offers are in turn.
        let told = NodeId(1);
        let mallory = NodeId(u64::MAX - 1);
        let mut session =
            fake_member(&node, mallory, vec![(told, "198.51.100.99:4000".into())]).await;
        let send = |body: SignalBody, from: NodeId, session_id: u64| {
            Frame::Signal(Signal {
                from,
                to: target,
                session: session_id,
                address: "198.51.100.99:4000".into(),
                body,
            })
        };

        // A garbled offer: refused with a warning, and the refusal comes
        // back through the member.
        let garbled = send(
            SignalBody::Offer {
                sdp: "v=0\r\nthis is not a session description".into(),
            },
            told,
            7,
        );
        session.writer.write_frame(&garbled).await.expect("send");
        node.wait_for_log("answering a WebRTC offer", Duration::from_secs(10));
        let refusal = loop {
            match session.reader.read_frame_timed().await.expect("frame").0 {
                Frame::Signal(Signal {
                    body: SignalBody::Refuse { reason },
                    to,
                    session: 7,
                    ..
                }) => {
                    assert_eq!(to, told);
                    break reason;
                }
                _ => continue,
            }
        };
        assert!(refusal.contains("not usable"), "{refusal}");

        // An answer for a session nobody offered.
        let stray = send(
            SignalBody::Answer {
                sdp: "v=0\r\n".into(),
            },
            told,
            99,
        );
        session.writer.write_frame(&stray).await.expect("send");
        node.wait_for_log(
            "which this node is not waiting for",
            Duration::from_secs(10),
        );

        // A real offer from a node that is not a member, relayed by one:
        // the data channel opens, and the link on it is refused because
        // the stranger does not hold the cluster's key.
        let stranger = NodeId(2);
        let config = RtcConfig {
            ice_servers: Vec::new(),
            udp_bind: "127.0.0.1:0".into(),
        };
        let (rtc, offer) = rtc::Session::offer(&config).await.expect("offer");
        let offer = send(SignalBody::Offer { sdp: offer }, stranger, 5);
        session.writer.write_frame(&offer).await.expect("send");
        let answer = loop {
            match session.reader.read_frame_timed().await.expect("frame").0 {
                Frame::Signal(Signal {
                    body: SignalBody::Answer { sdp },
                    to,
                    session: 5,
                    ..
                }) => {
                    assert_eq!(to, stranger);
                    break sdp;
                }
                _ => continue,
            }
        };
        rtc.answered(answer).await.expect("answered");
        let channel = rtc.open().await.expect("the data channel opens");
        let (reader, writer) = tokio::io::split(channel.stream);
        let not_ours = support::link_keys(Some(&ClusterSecret::random()));
        let refused = secure::handshake(reader, writer, &not_ours, true).await;
        assert!(
            matches!(refused, Err(secure::HandshakeError::WrongKey)),
            "{:?}",
            refused.err()
        );
        node.wait_for_log("does not hold this cluster's key", Duration::from_secs(10));

        // A signal to relay that the member says comes from someone else.
        let spoofed = Frame::Signal(Signal {
            from: told,
            to: NodeId(3),
            session: 1,
            address: String::new(),
            body: SignalBody::Invite,
        });
        session.writer.write_frame(&spoofed).await.expect("send");
        node.wait_for_log(
            "a node relays only its own signals",
            Duration::from_secs(10),
        );

        // An offer from a node with a higher id, relayed (the lower id
        // offers).
        let wrong_way = send(
            SignalBody::Offer {
                sdp: "v=0\r\n".into(),
            },
            NodeId(u64::MAX),
            3,
        );
        if target < NodeId(u64::MAX) {
            session.writer.write_frame(&wrong_way).await.expect("send");
            node.wait_for_log("the node with the lower id offers", Duration::from_secs(10));
        }

        assert!(node.is_running());
        let answer = support::chat(node.addr, "Name a colour.", 4, false).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
    }
}
