//! Joining is proven and links are private: real `ringlet` processes, a
//! real TCP relay between them that keeps every byte it carries (and can
//! alter one record), and a node without the cluster's secret.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a failed expectation is the report

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api_types::{ModelIdentity, Resources};
use ringlet_node::cluster::protocol::{
    AdminProof, Frame, Hello, PROTOCOL_VERSION, PolicyMessage, PolicyRevision,
};
use ringlet_node::cluster::{link, secure};
use ringlet_node::identity::{ClusterSecret, JoinToken};
use scheduler::NodeId;
use support::{Node, START_TIMEOUT, chat, get_json, model_file, request_raw};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(60);

/// These tests start nodes and flood one with handshakes; on two cores
/// they run one at a time, so that none starves another's nodes.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const REFUSED: &str = "does not hold this cluster's key";

/// What a relay does to the bytes coming back from the node it dials.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tamper {
    Nothing,
    /// Flips one bit of this record (counted from 0 after the handshake),
    /// on the first connection only.
    FlipBit(usize),
    /// Sends this record twice, on the first connection only.
    Replay(usize),
}

/// A TCP relay to `target`: a node that names the relay with `--peer`
/// links through it. Keeps a copy of every byte in both directions.
struct Relay {
    addr: SocketAddr,
    captured: Arc<Mutex<Vec<u8>>>,
}

impl Relay {
    async fn start(target: SocketAddr, tamper: Tamper) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("relay address");
        let captured = Arc::new(Mutex::new(Vec::new()));
        let copy = Arc::clone(&captured);
        tokio::spawn(async move {
            let mut first = true;
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = TcpStream::connect(target).await else {
                    continue;
                };
                let (in_read, in_write) = inbound.into_split();
                let (out_read, out_write) = outbound.into_split();
                let back = if first { tamper } else { Tamper::Nothing };
                first = false;
                tokio::spawn(pump(in_read, out_write, Arc::clone(&copy), Tamper::Nothing));
                tokio::spawn(pump(out_read, in_write, Arc::clone(&copy), back));
            }
        });
        Relay { addr, captured }
    }

    fn bytes(&self) -> Vec<u8> {
        self.captured.lock().unwrap().clone()
    }
}

/// Copies `from` to `to`, keeping a copy. With a tamper, it follows the
/// accepting node's side of the link protocol: the HTTP response head,
/// one handshake message, then records, each a 2-byte length and its body.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    captured: Arc<Mutex<Vec<u8>>>,
    tamper: Tamper,
) {
    if tamper != Tamper::Nothing {
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let Ok(byte) = from.read_u8().await else {
                return;
            };
            head.push(byte);
        }
        if !forward(&captured, &head, &mut to).await {
            return;
        }
        let mut index = 0usize;
        loop {
            let Ok(length) = from.read_u16().await else {
                return;
            };
            let mut message = length.to_be_bytes().to_vec();
            message.resize(2 + usize::from(length), 0);
            if from.read_exact(&mut message[2..]).await.is_err() {
                return;
            }
            // Message 0 is the handshake's second message; records follow.
            let record = index.checked_sub(1);
            index += 1;
            if let (Tamper::FlipBit(n), Some(r)) = (tamper, record)
                && r == n
            {
                let last = message.len() - 1;
                message[last] ^= 0x01;
            }
            let replay = matches!((tamper, record), (Tamper::Replay(n), Some(r)) if r == n);
            if replay && !forward(&captured, &message, &mut to).await {
                return;
            }
            if !forward(&captured, &message, &mut to).await {
                return;
            }
            if record.is_some_and(|r| r > 8) {
                break;
            }
        }
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if !forward(&captured, &buf[..n], &mut to).await {
                    return;
                }
            }
        }
    }
}

/// Keeps a copy of `bytes` and sends them on; false when `to` is gone.
async fn forward(captured: &Mutex<Vec<u8>>, bytes: &[u8], to: &mut OwnedWriteHalf) -> bool {
    captured.lock().unwrap().extend_from_slice(bytes);
    to.write_all(bytes).await.is_ok()
}

/// The nodes of this cluster, as `GET /v1/cluster` lists them.
async fn node_names(addr: SocketAddr) -> Vec<String> {
    let view = get_json(addr, "/v1/cluster").await;
    view["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| n["name"].as_str().unwrap_or_default().to_string())
        .collect()
}

async fn answers(addr: SocketAddr) {
    let response = chat(addr, "Say hello.", 4, false).await;
    assert_eq!(response.status, 200, "{}", response.body);
}

#[tokio::test]
async fn a_node_without_the_secret_is_refused_on_both_sides_and_the_cluster_serves_on() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut member = Node::start_ready(&["--name", "member"]);
    let stranger_token = JoinToken(ClusterSecret::random()).to_string();
    let peer = member.addr.to_string();
    let mut stranger = Node::start_with_env(
        &["--name", "stranger", "--peer", &peer],
        &[
            ("RINGLET_JOIN", &stranger_token),
            // The debug lines show each later refusal.
            ("RUST_LOG", "info,ringlet_node::cluster=debug"),
        ],
    );
    let line = member.wait_for_log(REFUSED, WAIT);
    assert!(
        line.contains("refused a node connecting from 127.0.0.1"),
        "{line}"
    );
    let line = stranger.wait_for_log(REFUSED, WAIT);
    assert!(
        line.contains(&format!("refused the node at {peer}")),
        "{line}"
    );
    // The stranger serves alone: its plan has one stage, on itself.
    stranger.wait_for_log("plan active: 1 stages", START_TIMEOUT);

    assert_eq!(node_names(member.addr).await, ["member"]);
    assert_eq!(node_names(stranger.addr).await, ["stranger"]);
    let view = get_json(member.addr, "/v1/cluster").await;
    let refused = view["not_joined"].as_array().expect("not_joined");
    assert!(
        refused.iter().any(
            |r| r["reason"].as_str().unwrap_or_default().contains(REFUSED)
                && r["addresses"][0] == "127.0.0.1"
        ),
        "{view}"
    );
    assert_eq!(
        view["plan"]["stages"].as_array().map(Vec::len),
        Some(1),
        "{view}"
    );
    answers(member.addr).await;
    // It dials its --peer again every few seconds and is refused each
    // time; the warning is logged once.
    stranger.wait_for_log_count("refused again", 2, WAIT);
    let warnings = stranger
        .log_seen
        .iter()
        .filter(|l| l.contains("refused the node at"))
        .count();
    assert_eq!(warnings, 1, "{}", stranger.log_seen.join("\n"));
}

#[tokio::test]
async fn the_dialer_and_random_handshakes_learn_nothing_and_the_node_serves_on() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut node = Node::start_ready(&["--name", "target"]);

    // A well-formed handshake with another cluster's key: refused.
    let keys = support::link_keys(Some(&ClusterSecret::random()));
    let stream = link::dial(&node.addr.to_string()).await.expect("dial");
    let (reader, writer) = stream.into_split();
    let result = secure::handshake(reader, writer, &keys, true).await;
    assert!(
        matches!(result, Err(secure::HandshakeError::WrongKey)),
        "{:?}",
        result.err()
    );
    node.wait_for_log(REFUSED, WAIT);

    // Truncated: half a length prefix, then the connection closes.
    let mut stream = link::dial(&node.addr.to_string()).await.expect("dial");
    stream.write_all(&[0]).await.expect("write");
    drop(stream);

    // 10,000 handshakes of random bytes, 50 at a time.
    let addr = node.addr.to_string();
    for batch in 0..200u32 {
        let tries = (0..50u32).map(|i| {
            let addr = addr.clone();
            async move {
                let seed = batch * 50 + i;
                let Ok(mut stream) = link::dial(&addr).await else {
                    return false;
                };
                let length = (seed % 200) as usize;
                let mut junk: Vec<u8> = (0..length).map(|_| rand::random::<u8>()).collect();
                if seed % 2 == 0 && junk.len() > 2 {
                    // A plausible handshake length, then random bytes.
                    let n = u16::try_from(junk.len() - 2).unwrap_or(0);
                    junk[..2].copy_from_slice(&n.to_be_bytes());
                }
                let _ = stream.write_all(&junk).await;
                // Nothing more comes: the node sees the end at once.
                let _ = stream.shutdown().await;
                // Whatever the node answers, it is not a Hello: at most a
                // refusal (a zero length) before it hangs up.
                let mut answer = Vec::new();
                let _ =
                    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
                        .await;
                answer.len() <= 2
            }
        });
        let quiet = futures_util::future::join_all(tries).await;
        assert!(
            quiet.iter().all(|q| *q),
            "a random handshake got more than a refusal"
        );
    }
    assert!(node.is_running());
    assert_eq!(node_names(node.addr).await, ["target"]);
    answers(node.addr).await;
}

/// Starts a member and a second node linked to it through a relay.
async fn pair_through_relay(extra: &[&str], tamper: Tamper) -> (Node, Node, Relay) {
    let first = Node::start_ready(&[extra, &["--name", "observed-alpha-7f3"]].concat());
    let relay = Relay::start(first.addr, tamper).await;
    let relayed = relay.addr.to_string();
    let second =
        Node::start(&[extra, &["--name", "observed-beta-2d8", "--peer", &relayed]].concat());
    (first, second, relay)
}

/// Postcard's encoding of a run of token ids: each a LEB128 varint.
fn varints(ids: &[u32]) -> Vec<u8> {
    let mut bytes = Vec::new();
    for &id in ids {
        let mut v = id;
        loop {
            let low = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                bytes.push(low);
                break;
            }
            bytes.push(low | 0x80);
        }
    }
    bytes
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// What an observer of the link finds: the node names, the cluster name,
/// the token ids of a known prompt.
async fn observe(extra: &[&str]) -> [bool; 4] {
    let extra = [extra, &["--cluster", "observed-lab-91c"]].concat();
    let (mut first, mut second, relay) = pair_through_relay(&extra, Tamper::Nothing).await;
    first.wait_for_log("plan active: 2 stages", START_TIMEOUT);
    second.wait_for_log("plan active: 2 stages", START_TIMEOUT);
    let prompt =
        "Describe the lighthouse keepers of the northern islands and their long winter nights.";
    // One of the two owns a request whose first stage is on the other,
    // so the prompt's tokens cross the link.
    for addr in [first.addr, second.addr] {
        let response = chat(addr, prompt, 4, false).await;
        assert_eq!(response.status, 200, "{}", response.body);
    }
    let model = kernels::ModelFile::open(model_file()).expect("model");
    let ids = model
        .tokenizer()
        .expect("tokenizer")
        .encode(prompt)
        .expect("encode");
    let inner = &ids[2..ids.len() - 2];
    let bytes = relay.bytes();
    assert!(bytes.len() > 10_000, "the relay saw the ring's traffic");
    [
        contains(&bytes, b"observed-alpha-7f3"),
        contains(&bytes, b"observed-beta-2d8"),
        contains(&bytes, b"observed-lab-91c"),
        contains(&bytes, &varints(inner)),
    ]
}

// The relay runs on the runtime while the test blocks on node logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_observer_of_the_link_sees_no_names_and_no_tokens() {
    let _turn = ONE_AT_A_TIME.lock().await;
    assert_eq!(observe(&[]).await, [false; 4], "names, cluster, token ids");
    // The same observer sees them all when frames go in plaintext: the
    // check above can fail.
    assert_eq!(
        observe(&["--insecure-plaintext-links"]).await,
        [true; 4],
        "names, cluster, token ids"
    );
}

async fn tampered_link_closes(tamper: Tamper) {
    let (mut first, mut second, _relay) = pair_through_relay(&[], tamper).await;
    let line = second.wait_for_log("failed authentication", WAIT);
    assert!(line.contains("closing a link"), "{line}");
    // The dialer links again (the relay no longer tampers) and the
    // cluster of two serves.
    first.wait_for_log("plan active: 2 stages", START_TIMEOUT);
    second.wait_for_log("plan active: 2 stages", START_TIMEOUT);
    answers(second.addr).await;
    answers(first.addr).await;
}

// The relay runs on the runtime while the test blocks on node logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_bit_closes_the_link_and_the_nodes_serve_on() {
    let _turn = ONE_AT_A_TIME.lock().await;
    tampered_link_closes(Tamper::FlipBit(2)).await;
}

// The relay runs on the runtime while the test blocks on node logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_record_closes_the_link_and_the_nodes_serve_on() {
    let _turn = ONE_AT_A_TIME.lock().await;
    tampered_link_closes(Tamper::Replay(2)).await;
}

const ADMIN: &str = "security-admin-token";

/// A member of the cluster that is not an admin: it holds the secret (the
/// test binary's token) but not the admin token. It links to `addr` from
/// this test process and sends frames of its own.
async fn member_without_admin_token(addr: SocketAddr) -> secure::Session {
    let stream = link::dial(&addr.to_string()).await.expect("dial");
    let mut session = support::member_handshake(stream).await;
    session
        .writer
        .write_frame(&Frame::Hello(mallory()))
        .await
        .expect("hello");
    their_hello(&mut session).await;
    session
}

/// Reads the node's Hello on a session that passed the handshake.
async fn their_hello(session: &mut secure::Session) {
    let (theirs, _) = session
        .reader
        .read_frame_timed()
        .await
        .expect("their hello");
    assert!(matches!(theirs, Frame::Hello(_)), "{theirs:?}");
}

/// `method path` on the node at `addr`, with the admin's token.
async fn as_admin(addr: SocketAddr, method: &str, path: &str) -> support::Response {
    let bearer = format!("Bearer {ADMIN}");
    request_raw(addr, method, path, &[("Authorization", &bearer)], None).await
}

/// The Hello of a member that this test process plays.
fn mallory() -> Hello {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        node: NodeId(rand::random()),
        name: "mallory".into(),
        cluster: "default".into(),
        address: "127.0.0.1:9".into(),
        resources: Resources {
            device: "cpu".into(),
            device_name: "test".into(),
            memory_total_bytes: 1 << 30,
            memory_available_bytes: 1 << 30,
            memory_budget_bytes: 1 << 20,
            compute_score: 1.0,
        },
        model: ModelIdentity {
            name: "another".into(),
            fingerprint: "sha256:another".into(),
        },
        peers: Vec::new(),
        serving_since_ms: None,
        ice_servers: Vec::new(),
        dtls_fingerprints: None,
    }
}

async fn policy_revision(addr: SocketAddr) -> u64 {
    get_json(addr, "/v1/cluster/policy").await["revision"]
        .as_u64()
        .expect("revision")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_without_the_admin_token_cannot_change_the_cluster() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut nodes = Node::start_cluster(2, &["--admin-token", ADMIN]);
    for node in &mut nodes {
        let mut mallory = member_without_admin_token(node.addr).await;
        let origin = NodeId(rand::random());
        let forged = AdminProof {
            issued_at: ringlet_node::unix_seconds(),
            nonce: 1,
            mac: vec![0; 32],
        };
        let frames = [
            Frame::Policy(PolicyMessage {
                revision: PolicyRevision {
                    counter: 1000,
                    origin,
                },
                wasm_bytes: None,
                warning: None,
                proof: None,
            }),
            Frame::Policy(PolicyMessage {
                revision: PolicyRevision {
                    counter: 1001,
                    origin,
                },
                wasm_bytes: None,
                warning: None,
                proof: Some(forged),
            }),
            Frame::SwitchModel {
                model: "org/other:Q8_0".into(),
                proof: None,
            },
            Frame::RotateSecret {
                removed: None,
                secret: vec![7; 32],
                proof: None,
            },
        ];
        for frame in &frames {
            mallory.writer.write_frame(frame).await.expect("send");
        }
        let line = node.wait_for_log("refused a policy change from a peer: it carries no", WAIT);
        assert!(line.contains("admin authorization"), "{line}");
        node.wait_for_log(
            "refused a policy change from a peer: its admin authorization does not verify",
            WAIT,
        );
        node.wait_for_log("refused a model switch from a peer", WAIT);
        node.wait_for_log("refused a rotation of the cluster secret from a peer", WAIT);
    }
    for node in &nodes {
        assert_eq!(
            policy_revision(node.addr).await,
            0,
            "the policy is unchanged"
        );
        assert!(
            !node
                .log_seen
                .iter()
                .any(|l| l.contains("asked to switch models")),
            "no switch"
        );
    }
    // The same kind of change from an admin, through the API, reaches
    // every node: the checks above could pass.
    let reset = as_admin(nodes[0].addr, "DELETE", "/v1/cluster/policy").await;
    assert_eq!(reset.status, 200, "{}", reset.body);
    nodes[1].wait_for_log("the cluster's policy changed; installing it", WAIT);
    let revision = policy_revision(nodes[0].addr).await;
    assert_eq!(revision, 1, "the refused changes did not push the counter");
    assert_eq!(policy_revision(nodes[1].addr).await, revision);
}

#[tokio::test]
async fn a_removed_node_cannot_rejoin_and_the_old_token_admits_no_one() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut nodes = Node::start_cluster(2, &["--admin-token", ADMIN]);
    let view = get_json(nodes[0].addr, "/v1/cluster").await;
    let removed = view["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["name"] == "node-1")
        .and_then(|n| n["id"].as_str())
        .expect("node-1's id")
        .to_string();
    let path = format!("/v1/cluster/nodes/{removed}");
    let refused = request_raw(nodes[0].addr, "DELETE", &path, &[], None).await;
    assert_eq!(refused.status, 401, "an admin change: {}", refused.body);
    let mark = nodes[0].log_mark();
    let answer = as_admin(nodes[0].addr, "DELETE", &path).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let rotated = answer.json();
    assert_eq!(rotated["removed"], "node-1");
    let new_token = rotated["token"].as_str().expect("token").to_string();
    assert_ne!(new_token, support::test_join_token());

    // node-1 dials node-0 again (its --peer) and is refused: it holds the
    // old secret only.
    nodes[0].wait_for_log(REFUSED, WAIT);
    nodes[1].wait_for_log(REFUSED, WAIT);
    nodes[0].wait_for_log_since(mark, "plan active: 1 stages", START_TIMEOUT);
    assert_eq!(node_names(nodes[0].addr).await, ["node-0"]);
    answers(nodes[0].addr).await;

    // A new machine with the old token is refused; with the new one
    // (which the invite now gives) it joins.
    let peer = nodes[0].addr.to_string();
    let old = support::test_join_token().to_string();
    let mut late = Node::start(&["--name", "late", "--peer", &peer, "--join", &old]);
    late.wait_for_log(REFUSED, WAIT);
    late.wait_for_log("plan active: 1 stages", START_TIMEOUT);
    drop(late);
    let invite = as_admin(nodes[0].addr, "GET", "/v1/cluster/invite").await;
    assert_eq!(invite.status, 200, "{}", invite.body);
    assert_eq!(invite.json()["token"], new_token.as_str());
    let mut invited = Node::start(&[
        "--name",
        "invited",
        "--peer",
        &peer,
        "--join",
        &new_token,
        "--admin-token",
        ADMIN,
    ]);
    invited.wait_for_log("plan active: 2 stages", START_TIMEOUT);
    nodes[0].wait_for_log_since(mark, "plan active: 2 stages", START_TIMEOUT);
    answers(invited.addr).await;
}

/// A link whose handshake proved the secret before an admin rotated it is
/// not admitted after: a removed node could otherwise hold such links
/// half open and finish them once it is removed.
#[tokio::test]
async fn a_link_that_opened_with_the_previous_secret_is_refused() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut node = Node::start_ready(&["--name", "target", "--admin-token", ADMIN]);
    let stream = link::dial(&node.addr.to_string()).await.expect("dial");
    let mut session = support::member_handshake(stream).await;
    their_hello(&mut session).await;

    let rotated = as_admin(node.addr, "POST", "/v1/cluster/secret/rotate").await;
    assert_eq!(rotated.status, 200, "{}", rotated.body);
    session
        .writer
        .write_frame(&Frame::Hello(mallory()))
        .await
        .expect("hello");
    let (answer, _) = session.reader.read_frame_timed().await.expect("an answer");
    match answer {
        Frame::Bye { reason } => assert!(reason.contains("cluster secret changed"), "{reason}"),
        other => panic!("the link was kept: {other:?}"),
    }
    node.wait_for_log(
        "refused a link that opened with the cluster's previous secret",
        WAIT,
    );
    assert_eq!(node_names(node.addr).await, ["target"]);
    answers(node.addr).await;
}
