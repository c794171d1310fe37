//! Several real `ringlet` processes on loopback pooled into one ring: the
//! product's key property across processes (any split gives the same
//! output), memory (each node holds only its layers), refusal, untrusted
//! peers and concurrency (losing a node: `recovery.rs`).

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a failed expectation is the report

mod support;

use std::time::Duration;

// Frames name a request by its sequence id and say how to sample.
use kernels::{LayerRange, ModelFile, SequenceId as RequestId, kv_tokens_within};
use ringlet_node::cluster::protocol::{
    self, Epoch, ForwardFrame, Frame, Hello, ModelIdentity, PROTOCOL_VERSION, Payload, PlanMessage,
    PlanStage, Resources, Sample as WireSample, UPGRADE_TOKEN, VERSION_HEADER, WireDType,
};
use ringlet_node::cluster::secure;
use ringlet_node::model_store::{CATALOGUE, ModelStore};
use scheduler::NodeId;
use serde_json::{Value, json};
use support::{Node, chat, chat_body, get_json, request, sse_data, streamed_content};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const GOLDEN: &str = include_str!("golden/smollm2-135m.json");

/// Each test here runs up to three node processes that compute with two
/// threads each; on a two-core machine they take turns.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What a node may hold beyond its weights: the binary, the tokenizer's
/// tables, the runtimes (wasmtime compiling the built-in policy among
/// them), and the KV caches and activations of these tests. Measured: 54
/// to 64 MiB for three nodes with 45 MiB budgets (it was 32 MiB before the
/// policy sandbox). Still far below what a node holding the whole model
/// (98 MB more) would show.
const RSS_OVERHEAD_BYTES: u64 = 80 << 20;

fn golden_cases() -> Vec<Value> {
    serde_json::from_str::<Value>(GOLDEN).expect("golden")["cases"]
        .as_array()
        .expect("cases")
        .clone()
}

fn golden_body(case: &Value, stream: bool) -> String {
    json!({ "model": support::MODEL, "messages": case["messages"], "temperature": 0, "max_tokens": 32, "stream": stream })
        .to_string()
}

fn model_file() -> ModelFile {
    ModelFile::open(ModelStore::new(ModelStore::default_dir()).path_of(&CATALOGUE[0]))
        .expect("the default model")
}

fn self_view(cluster: &Value) -> Value {
    cluster["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["status"] == "self")
        .expect("self")
        .clone()
}

fn layers(view: &Value) -> LayerRange {
    serde_json::from_value(view["layers"].clone()).expect("layers")
}

#[tokio::test]
async fn one_two_and_three_nodes_give_llama_cpp_s_output_streaming_or_not() {
    let _turn = ONE_AT_A_TIME.lock().await;
    // Requests whose answers carry what the last stage computes beyond the
    // token (log probabilities, penalties, biases, min-p, a seed), and a
    // legacy completion: a ring answers them exactly as one node does.
    let sampled = json!({
        "model": support::MODEL,
        "messages": [{ "role": "user", "content": "Write a short story about a lighthouse." }],
        "max_tokens": 24, "temperature": 0.9, "seed": 11, "min_p": 0.05,
        "presence_penalty": 0.4, "frequency_penalty": 0.3, "repetition_penalty": 1.2,
        "logit_bias": { "28": -100 }, "logprobs": true, "top_logprobs": 3
    })
    .to_string();
    let legacy = json!({
        "model": support::MODEL, "prompt": ["The capital of France is", "Once upon a time"],
        "max_tokens": 12, "temperature": 0, "logprobs": 3
    })
    .to_string();
    // Constrained answers: a JSON schema at temperature 1, and a forced
    // tool call, sampled; their masks are computed at the last stage.
    let structured = json!({
        "model": support::MODEL,
        "messages": [{ "role": "user", "content": "Describe a person." }],
        "max_tokens": 60, "temperature": 1.0, "seed": 5,
        "response_format": { "type": "json_schema", "json_schema": { "name": "person", "schema": {
            "type": "object",
            "properties": { "name": { "type": "string", "maxLength": 30 }, "age": { "type": "integer", "minimum": 0, "maximum": 120 } },
            "required": ["name", "age"], "additionalProperties": false
        } } }
    })
    .to_string();
    let tool_call = json!({
        "model": support::MODEL,
        "messages": [{ "role": "user", "content": "What is the weather in Oslo?" }],
        "max_tokens": 60, "temperature": 0.8, "seed": 3, "tool_choice": "required",
        "tools": [{ "type": "function", "function": { "name": "get_weather", "parameters": {
            "type": "object", "properties": { "city": { "type": "string", "maxLength": 30 } },
            "required": ["city"], "additionalProperties": false
        } } }]
    })
    .to_string();
    let mut one_node: Option<(Value, Value, Value, Value)> = None;
    for n in 1..=3 {
        let nodes = Node::start_cluster(n, &[]);
        let entry = nodes[n - 1].addr;
        let sampled_chat = request(entry, "POST", "/v1/chat/completions", Some(&sampled)).await;
        assert_eq!(sampled_chat.status, 200, "{n} nodes: {}", sampled_chat.body);
        let completion = request(entry, "POST", "/v1/completions", Some(&legacy)).await;
        assert_eq!(completion.status, 200, "{n} nodes: {}", completion.body);
        let structured_chat =
            request(entry, "POST", "/v1/chat/completions", Some(&structured)).await;
        assert_eq!(
            structured_chat.status, 200,
            "{n} nodes: {}",
            structured_chat.body
        );
        let called = request(entry, "POST", "/v1/chat/completions", Some(&tool_call)).await;
        assert_eq!(called.status, 200, "{n} nodes: {}", called.body);
        let mut called = called.json()["choices"].clone();
        // Call ids are random; everything else must match.
        let id = &mut called[0]["message"]["tool_calls"][0]["id"];
        assert!(
            id.as_str().is_some_and(|id| id.starts_with("call_")),
            "{n} nodes: {called}"
        );
        *id = json!("");
        let answers = (
            sampled_chat.json()["choices"].clone(),
            completion.json()["choices"].clone(),
            structured_chat.json()["choices"].clone(),
            called,
        );
        match &one_node {
            None => one_node = Some(answers),
            Some(expected) => assert_eq!(&answers, expected, "{n} nodes against one"),
        }
        for (i, case) in golden_cases().iter().enumerate() {
            let expected = case["output_text"].as_str().expect("text");
            // Enter the ring through a different node each time.
            let entry = nodes[i % n].addr;
            let whole = request(
                entry,
                "POST",
                "/v1/chat/completions",
                Some(&golden_body(case, false)),
            )
            .await;
            assert_eq!(whole.status, 200, "{n} nodes: {}", whole.body);
            assert_eq!(
                whole.json()["choices"][0]["message"]["content"],
                expected,
                "{n} nodes, {}",
                case["name"]
            );
            let streamed = request(
                entry,
                "POST",
                "/v1/chat/completions",
                Some(&golden_body(case, true)),
            )
            .await;
            let (text, finish) = streamed_content(&sse_data(&streamed.body));
            assert_eq!(text, expected, "{n} nodes, streamed, {}", case["name"]);
            assert_eq!(finish.as_deref(), Some("length"));
        }
        let view = get_json(nodes[0].addr, "/v1/cluster").await;
        assert_eq!(
            view["plan"]["stages"].as_array().map(Vec::len),
            Some(n),
            "{view}"
        );
        assert_eq!(view["plan"]["state"], "active");
    }
}

/// Another family and the K-quant mix people download: Gemma 3 270M
/// Q4_K_M (sliding-window and global layers, its own tokenizer and chat
/// turns) answers the same on one node and on a ring of two. (Three equal
/// nodes get a two-stage plan from the built-in policy: the 170 MiB tied
/// embedding that the first stage holds is more than a third of the
/// model's bytes.)
#[tokio::test]
async fn gemma3_answers_the_same_on_one_and_two_nodes() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let path = std::env::var("RINGLET_TEST_GEMMA_MODEL")
        .expect("set RINGLET_TEST_GEMMA_MODEL (tests/run does)");
    let body = json!({
        "model": "gemma-3-270m-q4_k_m",
        "messages": [{"role": "user", "content": "Name the planets of the solar system."}],
        "temperature": 0,
        "max_tokens": 24,
    })
    .to_string();
    let mut answers = Vec::new();
    for n in 1..=2 {
        let nodes = Node::start_cluster(n, &["--model", &path]);
        let reply = request(
            nodes[n - 1].addr,
            "POST",
            "/v1/chat/completions",
            Some(&body),
        )
        .await;
        assert_eq!(reply.status, 200, "{n} nodes: {}", reply.body);
        let json = reply.json();
        assert_eq!(json["usage"]["completion_tokens"], 24, "{n} nodes: {json}");
        answers.push(json["choices"][0]["message"]["content"].clone());
    }
    assert!(
        answers[0].as_str().is_some_and(|a| !a.is_empty()),
        "{answers:?}"
    );
    assert_eq!(answers[0], answers[1], "one node and two");
}

#[tokio::test]
async fn small_nodes_pool_memory_and_hold_only_their_layers() {
    let _turn = ONE_AT_A_TIME.lock().await;
    // Alone, a 45 MiB node cannot hold the 92 MiB model: a clear refusal.
    let mut alone = Node::start(&["--memory-budget", "45MiB"]);
    alone.wait_for_log("cannot place model", support::START_TIMEOUT);
    let refused = chat(alone.addr, "Hi", 4, false).await;
    assert_eq!(refused.status, 503, "{}", refused.body);
    let error = &refused.json()["error"];
    assert_eq!(error["code"], "cluster_not_ready");
    let message = error["message"].as_str().expect("message");
    assert!(
        message.contains("short") && message.contains("--memory-budget"),
        "{message}"
    );
    drop(alone);

    // Three of them serve it, each holding only its layers.
    let nodes = Node::start_cluster(3, &["--memory-budget", "45MiB"]);
    for (i, case) in golden_cases().iter().enumerate() {
        let response = request(
            nodes[i].addr,
            "POST",
            "/v1/chat/completions",
            Some(&golden_body(case, false)),
        )
        .await;
        assert_eq!(
            response.json()["choices"][0]["message"]["content"],
            case["output_text"]
        );
    }
    let model = model_file();
    let mut covered = Vec::new();
    for node in &nodes {
        let me = self_view(&get_json(node.addr, "/v1/cluster").await);
        let range = layers(&me);
        let weight_bytes = me["weight_bytes"].as_u64().expect("weight bytes");
        assert_eq!(
            weight_bytes,
            model.shard_weight_bytes(range).expect("bytes"),
            "{}: {range}",
            me["name"]
        );
        assert!(
            weight_bytes <= 45 << 20,
            "{}: {weight_bytes} bytes exceed the budget",
            me["name"]
        );
        let peak = me["peak_rss_bytes"].as_u64().expect("peak rss");
        assert!(
            peak <= weight_bytes + RSS_OVERHEAD_BYTES,
            "{}: peak RSS {peak} exceeds its {weight_bytes} bytes of weights plus {RSS_OVERHEAD_BYTES}",
            me["name"]
        );
        covered.push(range);
    }
    covered.sort_by_key(|r| r.start);
    assert_eq!(covered.first().map(|r| r.start), Some(0));
    assert!(
        covered.windows(2).all(|w| w[0].end == w[1].start),
        "{covered:?}"
    );
    assert_eq!(covered.last().map(|r| r.end), Some(model.config().n_layers));
}

/// Eight concurrent requests (greedy and seeded) on a three-node ring, sent
/// to every node: the stages run them in batched steps, and each gets the
/// text it gets alone.
#[tokio::test]
async fn batched_requests_on_a_three_node_ring_get_their_solo_answers() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let nodes = Node::start_cluster(3, &[]);
    let prompts = [
        "Name a colour.",
        "Write a haiku about snow.",
        "What is 7 times 6?",
        "Name three planets.",
        "Tell me a story.",
        "Describe a forest.",
        "What is a star?",
        "Write a poem about rain.",
    ];
    let body = |i: usize, stream: bool| {
        let mut body: Value =
            serde_json::from_str(&chat_body(prompts[i], 24, stream)).expect("a body");
        if i % 2 == 1 {
            body["temperature"] = json!(1.0);
            body["seed"] = json!(40 + i);
        }
        body.to_string()
    };
    let mut alone = Vec::new();
    for i in 0..prompts.len() {
        let response = request(
            nodes[0].addr,
            "POST",
            "/v1/chat/completions",
            Some(&body(i, false)),
        )
        .await;
        assert_eq!(response.status, 200);
        alone.push(response.content());
    }
    let bodies: Vec<String> = (0..prompts.len()).map(|i| body(i, true)).collect();
    let together = futures_util::future::join_all(
        bodies
            .iter()
            .enumerate()
            .map(|(i, b)| request(nodes[i % 3].addr, "POST", "/v1/chat/completions", Some(b))),
    )
    .await;
    for ((response, expected), prompt) in together.iter().zip(&alone).zip(prompts) {
        assert_eq!(response.status, 200);
        let (text, finish) = streamed_content(&sse_data(&response.body));
        assert_eq!(&text, expected, "{prompt}");
        assert!(finish.is_some());
    }
    // The stages ran steps of several sequences.
    let mut batched = 0.0;
    for node in &nodes {
        let metrics = request(node.addr, "GET", "/metrics", None).await;
        let text = metrics.body.clone();
        let value = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
                .unwrap_or(0.0)
        };
        batched += value("ringlet_step_sequences_count ")
            - value("ringlet_step_sequences_bucket{le=\"1\"} ");
    }
    assert!(batched > 0.0, "no stage ran a step of several sequences");
}

#[tokio::test]
async fn a_joining_node_waits_for_the_running_request() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut nodes = Node::start_cluster(2, &[]);
    let (mut stream, mut seen) = support::start_stream(
        nodes[0].addr,
        "Write a very long essay about the history of sailing.",
        400,
        3,
    )
    .await;
    // A third node joins while the answer streams.
    let first = nodes[0].addr.to_string();
    nodes.push(Node::start(&["--name", "node-2", "--peer", &first]));
    let rest = support::read_rest(&mut stream, Duration::from_secs(120)).await;
    seen.extend_from_slice(&rest);
    let body = String::from_utf8_lossy(&seen);
    let events = sse_data(body.split_once("\r\n\r\n").map_or("", |(_, b)| b));
    assert!(
        !body.contains("\"error\""),
        "the answer was not cut: {body}"
    );
    let (_, finish) = streamed_content(&events);
    assert!(finish.is_some(), "the answer finished: {body}");
    // Then the cluster re-plans over all three.
    for node in &mut nodes {
        node.wait_for_log("plan active: 3 stages", support::START_TIMEOUT);
    }
    let waited = nodes.iter_mut().any(|node| {
        node.log_mark();
        node.log_seen
            .iter()
            .any(|l| l.contains("re-planning once the running requests finish"))
    });
    assert!(
        waited,
        "the leader waited for the request before re-planning"
    );
}

/// A raw link to a node, as a (possibly hostile) peer would open it.
async fn raw_link(addr: std::net::SocketAddr, version: u32) -> (TcpStream, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "GET /v1/ring/link HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: {UPGRADE_TOKEN}\r\n{VERSION_HEADER}: {version}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(stream.read_u8().await.expect("response"));
    }
    (stream, String::from_utf8_lossy(&head).to_string())
}

fn test_hello(fingerprint: &str) -> Hello {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        node: NodeId(1),
        name: "test-peer".into(),
        cluster: "default".into(),
        address: "127.0.0.1:9".into(),
        resources: Resources {
            device: "cpu".into(),
            device_name: "test".into(),
            memory_total_bytes: 1 << 20,
            memory_available_bytes: 1 << 20,
            memory_budget_bytes: 0,
            compute_score: 0.0,
        },
        model: ModelIdentity {
            name: "smollm2-135m".into(),
            fingerprint: fingerprint.into(),
        },
        peers: vec![],
        // Senior to the node under test, so that it leads: its plans are
        // considered (and refused on their merits).
        serving_since_ms: Some(1),
        ice_servers: Vec::new(),
        dtls_fingerprints: None,
    }
}

/// Opens a link and proves the cluster's secret as a member would (the
/// test binary's token, a key of its own): the hello is the caller's.
async fn linked_session(addr: std::net::SocketAddr) -> secure::Session {
    let (stream, head) = raw_link(addr, PROTOCOL_VERSION).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    support::member_handshake(stream).await
}

/// Links as a member, exchanges hellos, and returns the session.
async fn linked_peer(addr: std::net::SocketAddr, fingerprint: &str) -> secure::Session {
    let mut session = linked_session(addr).await;
    session
        .writer
        .write_frame(&Frame::Hello(test_hello(fingerprint)))
        .await
        .expect("hello");
    match tokio::time::timeout(Duration::from_secs(10), session.reader.read_frame_timed())
        .await
        .expect("hello in time")
    {
        Ok((Frame::Hello(_), _)) => session,
        other => panic!("expected the node's hello, got {other:?}"),
    }
}

/// Reads frames until one matches, skipping heartbeats.
async fn read_until(session: &mut secure::Session, wanted: impl Fn(&Frame) -> bool) -> Frame {
    loop {
        let (frame, _) =
            tokio::time::timeout(Duration::from_secs(10), session.reader.read_frame_timed())
                .await
                .expect("a frame within 10 s")
                .expect("a frame");
        if wanted(&frame) {
            return frame;
        }
    }
}

#[tokio::test]
async fn malformed_frames_and_lying_peers_do_not_hurt_a_node() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut node = Node::start_ready(&[]);
    let fingerprint = model_file().fingerprint().to_string();

    // Another protocol version is refused before the upgrade, with a reason.
    let (_, head) = raw_link(node.addr, PROTOCOL_VERSION + 1).await;
    assert!(head.starts_with("HTTP/1.1 409"), "{head}");

    // Bad bytes where the handshake belongs: each link fails, nothing else.
    let oversized = (protocol::MAX_FRAME_BYTES + 1).to_be_bytes().to_vec();
    let mut garbage = 8u32.to_be_bytes().to_vec();
    garbage.extend_from_slice(&[0xff; 8]);
    let mut truncated = 100u32.to_be_bytes().to_vec();
    truncated.extend_from_slice(&[1; 10]);
    for bytes in [oversized, garbage, truncated] {
        let (mut stream, head) = raw_link(node.addr, PROTOCOL_VERSION).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        stream.write_all(&bytes).await.expect("send");
        drop(stream);
    }

    // A member whose hello is of another protocol: that link fails.
    let mut wrong = linked_session(node.addr).await;
    let hello = Frame::Hello(Hello {
        protocol_version: 99,
        ..test_hello(&fingerprint)
    });
    wrong.writer.write_frame(&hello).await.expect("send");
    node.wait_for_log("link handshake failed", Duration::from_secs(20));
    drop(wrong);

    // Garbage after a good handshake closes that link with one warning.
    let mut liar = linked_peer(node.addr, &fingerprint).await;
    liar.writer
        .write_stream_bytes(&(protocol::MAX_FRAME_BYTES + 1).to_be_bytes())
        .await
        .expect("send");
    node.wait_for_log("closing a link after a bad frame", Duration::from_secs(10));
    drop(liar);

    // A linked peer that sends activations of the wrong shape gets a
    // failure for that request; the link and the node stay up.
    let mut peer = linked_peer(node.addr, &fingerprint).await;
    let forward = Frame::Forward(ForwardFrame {
        request: RequestId(77),
        owner: NodeId(1),
        epoch: Epoch(1),
        stage: 0,
        position: 0,
        payload: Payload::Hidden {
            tokens: 2,
            hidden: 7,
            dtype: WireDType::F32,
            data: vec![0; 56],
        },
        sample: WireSample::Continue,
        token_by_token: false,
        sent_at: 0,
        batch: None,
    });
    peer.writer.write_frame(&forward).await.expect("send");
    let failed = read_until(&mut peer, |f| matches!(f, Frame::Failed { .. })).await;
    assert!(
        matches!(
            failed,
            Frame::Failed {
                request: RequestId(77),
                ..
            }
        ),
        "{failed:?}"
    );

    // A plan for another model file is refused with a reason, not obeyed.
    let plan = Frame::Plan(PlanMessage {
        epoch: Epoch(1_000),
        leader: NodeId(1),
        model: ModelIdentity {
            name: "other".into(),
            fingerprint: "sha256:0000".into(),
        },
        stages: vec![PlanStage {
            node: NodeId(1),
            address: "127.0.0.1:9".into(),
            layers: LayerRange::new(0, 30),
        }],
    });
    peer.writer.write_frame(&plan).await.expect("send");
    let refusal = read_until(&mut peer, |f| matches!(f, Frame::PlanFailed { .. })).await;
    let Frame::PlanFailed { error, .. } = refusal else {
        unreachable!()
    };
    assert!(
        error.contains("sha256:0000") && error.contains(&fingerprint),
        "{error}"
    );
    drop(peer);

    let response = chat(node.addr, "Hi", 4, false).await;
    assert_eq!(response.status, 200, "{}", response.body);
    assert!(node.is_running());
}

#[tokio::test]
async fn a_node_with_another_model_file_gets_no_layers() {
    let _turn = ONE_AT_A_TIME.lock().await;
    // A copy of the default model with one byte of its name changed: the
    // same shapes, but another file, so another fingerprint.
    let original = ModelStore::new(ModelStore::default_dir()).path_of(&CATALOGUE[0]);
    let mut bytes = std::fs::read(&original).expect("read model");
    let at = bytes
        .windows(7)
        .position(|w| w == b"Smollm2")
        .expect("the model's name in its header");
    bytes[at + 6] = b'3';
    let copy = std::env::temp_dir().join(format!("ringlet-variant-{}.gguf", std::process::id()));
    std::fs::write(&copy, &bytes).expect("write copy");

    let mut first = Node::start_ready(&["--name", "original"]);
    let peer = first.addr.to_string();
    let mut other = Node::start(&[
        "--name",
        "variant",
        "--model",
        copy.to_str().expect("path"),
        "--peer",
        &peer,
    ]);
    let line = first.wait_for_log("different model file", support::START_TIMEOUT);
    assert!(line.contains("variant"), "{line}");
    // The log line comes as the peer is admitted; the view is published
    // after it.
    let listed = |view: &serde_json::Value| {
        view["nodes"]
            .as_array()
            .is_some_and(|nodes| nodes.iter().any(|n| n["name"] == "variant"))
    };
    let view = support::wait_for_cluster(first.addr, support::START_TIMEOUT, listed).await;
    let variant = view["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["name"] == "variant")
        .expect("listed");
    assert!(
        variant["status"]
            .as_str()
            .is_some_and(|s| s.starts_with("not used")),
        "{variant}"
    );
    assert!(variant["layers"].is_null());
    assert_eq!(view["plan"]["stages"].as_array().map(Vec::len), Some(1));
    // The variant leads a plan of its own with the same number; its word
    // that its plan is active is not the first node's leader's.
    other.wait_for_log("plan active", support::START_TIMEOUT);
    let response = chat(first.addr, "Hi", 4, false).await;
    assert_eq!(response.status, 200);
    first.log_mark();
    let activations: Vec<&String> = first
        .log_seen
        .iter()
        .filter(|l| l.contains("plan active:"))
        .collect();
    assert_eq!(activations.len(), 1, "{activations:#?}");
    std::fs::remove_file(&copy).expect("remove copy");
}

/// What a streamed answer's client saw: when its first and its last
/// content came, and its whole response.
async fn stream_timed(
    mut stream: TcpStream,
) -> (
    Option<std::time::Instant>,
    Option<std::time::Instant>,
    String,
) {
    let mut seen = Vec::new();
    let (mut first, mut last) = (None, None);
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(support::REQUEST_TIMEOUT, stream.read(&mut buf))
            .await
            .expect("the answer in time")
            .expect("read");
        if n == 0 {
            break;
        }
        // Text, not the empty content of the chunk that opens the answer.
        let text = String::from_utf8_lossy(&buf[..n]);
        if text
            .match_indices("\"content\":\"")
            .any(|(at, key)| !text[at + key.len()..].starts_with('"'))
        {
            let now = std::time::Instant::now();
            first.get_or_insert(now);
            last = Some(now);
        }
        seen.extend_from_slice(&buf[..n]);
    }
    (first, last, String::from_utf8_lossy(&seen).into_owned())
}

/// KV cache is accounted per stage, for every owner: a stage's budget is
/// what its node's memory budget leaves beside its weights (at most its
/// `--kv-cache`), and each request, whoever owns it, takes its prompt
/// plus `max_tokens` on every stage. A request larger than the tightest
/// stage holds is refused with a 400 that names that node; one with no
/// `max_tokens` gets what fits; one that fits alone but not beside
/// another node's running request waits for it.
#[tokio::test]
async fn every_stage_admits_the_kv_cache_of_every_owner_within_its_budget() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut nodes = vec![Node::start(&["--name", "node-0"])];
    let first = nodes[0].addr.to_string();
    nodes.push(Node::start(&["--name", "node-1", "--peer", &first]));
    nodes.push(Node::start(&[
        "--name",
        "tight",
        "--peer",
        &first,
        "--kv-cache",
        "3MiB",
    ]));
    for node in &mut nodes {
        node.wait_for_log("plan active: 3 stages", support::START_TIMEOUT);
    }
    // The tight stage holds 3 MiB over its layers; the others far more.
    let tight_layers = layers(&self_view(&get_json(nodes[2].addr, "/v1/cluster").await));
    let per_token = model_file().config().kv_bytes_per_token_per_layer();
    let capacity = (3u64 << 20) / (tight_layers.len() as u64 * per_token);
    let view = support::wait_for_cluster(nodes[0].addr, support::START_TIMEOUT, |v| {
        v["plan"]["kv_capacity_tokens"].is_u64()
    })
    .await;
    assert_eq!(view["plan"]["kv_capacity_tokens"], capacity, "{view:#}");

    // More than the tight stage holds: refused up front, naming it.
    let too_long = chat(nodes[0].addr, "Hi", capacity as u32, false).await;
    assert_eq!(too_long.status, 400, "{}", too_long.body);
    let error = too_long.json();
    assert_eq!(error["error"]["param"], "max_tokens", "{error}");
    let message = error["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("node tight") && message.contains(&capacity.to_string()),
        "{message}"
    );

    // No max_tokens: as many as fit beside the prompt.
    let open = json!({
        "model": support::MODEL,
        "messages": [{ "role": "user", "content": "Say hello." }],
        "temperature": 0,
    });
    let answered = request(
        nodes[1].addr,
        "POST",
        "/v1/chat/completions",
        Some(&open.to_string()),
    )
    .await;
    assert_eq!(answered.status, 200, "{}", answered.body);
    let usage = &answered.json()["usage"];
    assert!(
        usage["total_tokens"]
            .as_u64()
            .is_some_and(|t| t <= capacity),
        "{usage}"
    );

    // Two requests that each take the whole KV pages the tight stage holds
    // (a reservation counts whole pages: more than half its room, so two
    // never fit together): node-1's runs, and node-0's waits for it to end.
    let essay = "Write a very long essay about the history of sailing.";
    let prompt_tokens = chat(nodes[0].addr, essay, 1, false).await.json()["usage"]["prompt_tokens"]
        .as_u64()
        .expect("prompt tokens");
    let whole_pages = kv_tokens_within(capacity as usize) as u64;
    let max_tokens = whole_pages.saturating_sub(prompt_tokens);
    assert!(
        max_tokens >= 16,
        "the tight stage holds too little: {capacity}"
    );
    assert!(2 * whole_pages > capacity, "two requests fit in {capacity}");
    let (running, seen) = support::start_stream(nodes[1].addr, essay, max_tokens as u32, 2).await;
    // node-0 has heard of node-1's reservation.
    support::wait_for_cluster(nodes[0].addr, support::REQUEST_TIMEOUT, |v| {
        v["plan"]["kv_reserved_tokens"].as_u64() >= Some(prompt_tokens + max_tokens)
    })
    .await;
    let sent = std::time::Instant::now();
    let waiting =
        support::send_chat(nodes[0].addr, &chat_body(essay, max_tokens as u32, true)).await;
    let ((_, running_last, running_rest), (waited_first, _, waited)) =
        tokio::join!(stream_timed(running), stream_timed(waiting));
    let running_body = String::from_utf8_lossy(&seen).into_owned() + &running_rest;
    assert!(
        running_body.contains("finish_reason\":\"length"),
        "the running answer ran to its max_tokens: {running_body}"
    );
    // The first still had tokens to give when the second came, and the
    // second's first token came after the first's last.
    let running_last = running_last.expect("the first answer's content");
    assert!(
        running_last > sent,
        "the first answer ended before the second was sent"
    );
    let waited_first = waited_first.unwrap_or_else(|| panic!("no content: {waited}"));
    assert!(
        waited_first >= running_last,
        "the second request started {:?} before the first's last token",
        running_last - waited_first
    );
    let events = sse_data(waited.split_once("\r\n\r\n").map_or("", |(_, b)| b));
    let (_, finish) = streamed_content(&events);
    assert!(
        finish.is_some(),
        "the waiting request was answered: {waited}"
    );
}

#[tokio::test]
async fn of_two_links_a_peer_dialed_the_node_keeps_the_one_with_the_smaller_binding() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut node = Node::start_ready(&[]);
    let fingerprint = model_file().fingerprint().to_string();

    // A peer dials the node twice, as it would at two of its addresses.
    // Both handshakes finish before either hello, so the test knows each
    // link's binding (the node sees the same values) and sends the hello
    // of the link that must lose first: the node admits it first.
    let (one, two) = (
        linked_session(node.addr).await,
        linked_session(node.addr).await,
    );
    assert_ne!(one.binding, two.binding);
    let (mut kept, mut dropped) = if one.binding < two.binding {
        (one, two)
    } else {
        (two, one)
    };
    for session in [&mut dropped, &mut kept] {
        session
            .writer
            .write_frame(&Frame::Hello(test_hello(&fingerprint)))
            .await
            .expect("hello");
        read_until(session, |f| matches!(f, Frame::Hello(_))).await;
    }

    // The link admitted first is the one let go: the node says so on it.
    tokio::time::timeout(
        Duration::from_secs(20),
        read_until(&mut dropped, |f| matches!(f, Frame::LinkReplaced)),
    )
    .await
    .expect("the node lets the link with the larger binding go");

    // The other link stays, and answers.
    kept.writer
        .write_frame(&Frame::Heartbeat { sent_at_micros: 7 })
        .await
        .expect("heartbeat");
    let answer = tokio::time::timeout(
        Duration::from_secs(20),
        read_until(&mut kept, |f| {
            matches!(
                f,
                Frame::LinkReplaced | Frame::HeartbeatAck { sent_at_micros: 7 }
            )
        }),
    )
    .await
    .expect("the kept link answers a heartbeat");
    assert!(
        matches!(answer, Frame::HeartbeatAck { .. }),
        "the node let the smaller binding's link go"
    );
    assert!(node.is_running());
}

#[tokio::test]
async fn a_stopped_node_says_goodbye_and_its_peers_do_not_seek_it() {
    stop_one_of_three("tcp").await;
}

#[tokio::test]
async fn a_stopped_node_says_goodbye_over_webrtc_too() {
    // b and c, told of each other by a, link over WebRTC.
    stop_one_of_three("webrtc").await;
}

/// Three nodes linked with `--link LINK`; c, idle, gets SIGTERM. The
/// survivors must hear its goodbye and not seek it over WebRTC.
async fn stop_one_of_three(link: &str) {
    let _turn = ONE_AT_A_TIME.lock().await;
    // The survivors log their redials (debug), which show them going on
    // past the stop.
    let redials = [("RUST_LOG", "info,ringlet_node::cluster::actor=debug")];
    let mut a = Node::start_with_env(&["--name", "a", "--link", link], &redials);
    let first = a.addr.to_string();
    let mut b = Node::start_with_env(&["--name", "b", "--link", link, "--peer", &first], &redials);
    let mut c = Node::start(&["--name", "c", "--link", link, "--peer", &first]);
    for node in [&mut a, &mut b, &mut c] {
        node.wait_for_log("plan active: 3 stages", support::START_TIMEOUT);
    }
    // An answer owned by each survivor crosses every link from c: each
    // link's first frame, a 1 MiB probe, has arrived, which over a slow
    // data channel could otherwise hold the goodbye behind it past the
    // stop's wait.
    for owner in [&a, &b] {
        let answer = chat(owner.addr, "Say hi.", 2, false).await;
        assert!(!answer.content().is_empty(), "{answer:?}");
    }
    let marks = [a.log_mark(), b.log_mark()];
    c.signal("TERM");
    // Idle, its HTTP server ends the moment it is told to: the engine
    // still stops, and every link writes the goodbye before it closes.
    let log = c.stopped_log(0);
    assert!(!log.contains("did not close within"), "{log}");
    let redial_failed = format!("dial failed; will retry error=cannot connect to {}", c.addr);
    let seeking = [
        "offering a WebRTC link",
        "asking a peer to offer a WebRTC link",
        "refused a WebRTC signal",
        "could not link to the node",
        "no WebRTC link for now",
    ];
    for (node, mark) in [(&mut a, marks[0]), (&mut b, marks[1])] {
        let left = node.wait_for_log_since(mark, "peer c left", support::REQUEST_TIMEOUT);
        assert!(
            left.contains("reason=the peer said goodbye: the node is stopping"),
            "{left}"
        );
        node.wait_for_log_since(mark, "plan active: 2 stages", support::START_TIMEOUT);
        // A node that left says so: it is not sought over WebRTC, through
        // the other survivor, when its address stops answering. Two
        // failed redials: the first one's end has been handled.
        node.wait_for_log_count(&redial_failed, 2, support::REQUEST_TIMEOUT);
        let since = node.lines_since(mark);
        assert!(
            !since
                .iter()
                .any(|line| seeking.iter().any(|needle| line.contains(needle))),
            "{since:#?}"
        );
    }
    if link == "webrtc" {
        let joined = b.log_seen.join("\n");
        assert!(joined.contains("WebRTC data channel open"), "{joined}");
    }
}
