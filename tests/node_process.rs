//! A real `ringlet serve` process on loopback, driven over TCP and by the
//! official `openai` Python package.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a failed expectation is the report

mod support;

use std::time::Duration;

use support::{Node, chat, chat_body, request, sse_data, streamed_content};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Runs `script` (in tests/) with the Python that has the official
/// `openai` package, against `node`, with `args` after the URL and model;
/// asserts it passed every check.
async fn run_openai_script(script: &str, node: &Node, args: &[&str]) {
    let python = std::env::var("RINGLET_TEST_PYTHON").unwrap_or_else(|_| {
        panic!("RINGLET_TEST_PYTHON must name a Python with the `openai` package; `tests/run` sets it up")
    });
    let script = format!("{}/../tests/{script}", env!("CARGO_MANIFEST_DIR"));
    let output = tokio::time::timeout(
        Duration::from_secs(300),
        tokio::process::Command::new(python)
            .arg(script)
            .arg(node.url())
            .arg(support::MODEL)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the openai client finishes within 300 s")
    .expect("run python");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "openai client checks failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
}

#[tokio::test]
async fn the_official_openai_python_client_works() {
    let node = Node::start_ready(&[]);
    run_openai_script("openai_client.py", &node, &[]).await;
}

/// `--api-key`: missing, wrong and right keys through the official
/// client, `/healthz` open, and guessing stopped (tests/openai_api_keys.py).
#[tokio::test]
async fn api_keys_through_the_official_openai_client() {
    let node = Node::start_ready(&["--api-key", "right-key", "--api-key", "second-key"]);
    run_openai_script("openai_api_keys.py", &node, &["second-key"]).await;
}

/// `GET /metrics` needs the API key when the node has one; over a ring,
/// the links' bytes and RTT show.
#[tokio::test]
async fn metrics_need_the_api_key_and_show_the_links() {
    let keyed = Node::start_ready(&["--api-key", "metrics-key"]);
    let open = request(keyed.addr, "GET", "/metrics", None).await;
    assert_eq!(open.status, 401, "{}", open.body);
    let with_key = support::request_raw(
        keyed.addr,
        "GET",
        "/metrics",
        &[("Authorization", "Bearer metrics-key")],
        None,
    )
    .await;
    assert_eq!(with_key.status, 200, "{}", with_key.body);
    assert!(with_key.body.contains("ringlet_kv_cache_budget_bytes"));

    let nodes = Node::start_cluster(2, &[]);
    support::wait_for_cluster(nodes[0].addr, Duration::from_secs(30), |view| {
        view["links"].as_array().is_some_and(|links| {
            links
                .iter()
                .any(|l| l["from"] == view["node"] && l["rtt_ms"].is_number())
        })
    })
    .await;
    let metrics = request(nodes[0].addr, "GET", "/metrics", None).await;
    assert_eq!(metrics.status, 200);
    for needle in [
        "ringlet_link_bytes_total{direction=\"sent\"}",
        "ringlet_link_bytes_total{direction=\"received\"}",
        "ringlet_link_rtt_seconds{peer=\"node-1\",transport=\"tcp\"}",
    ] {
        assert!(
            metrics.body.contains(needle),
            "{needle} not in:\n{}",
            metrics.body
        );
    }

    // A chat on the ring: every decode step's hops are timed from the
    // stamps in the frames, on the nodes that received them.
    let chat = serde_json::json!({
        "model": support::MODEL,
        "messages": [{ "role": "user", "content": "Name three rivers." }],
        "max_tokens": 8, "temperature": 0
    })
    .to_string();
    let answer = request(nodes[0].addr, "POST", "/v1/chat/completions", Some(&chat)).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let mut texts = Vec::new();
    for node in &nodes {
        texts.push(request(node.addr, "GET", "/metrics", None).await.body);
    }
    let count = |kind: &str| -> u64 {
        let prefix = format!("ringlet_hop_seconds_count{{kind=\"{kind}\"}} ");
        texts
            .iter()
            .filter_map(|text| text.lines().find_map(|l| l.strip_prefix(&prefix)))
            .filter_map(|v| v.trim().parse::<u64>().ok())
            .sum()
    };
    // 7 decode steps after the first token, each entering 2 stages; each
    // of the 8 tokens reaches its owner.
    assert!(count("into_stage") >= 14, "{}", count("into_stage"));
    assert!(count("to_owner") >= 8, "{}", count("to_owner"));
}

#[tokio::test]
async fn a_client_that_hangs_up_cancels_its_generation() {
    let mut node = Node::start_ready(&[]);
    let (stream, _) = support::start_stream(
        node.addr,
        "Write a very long essay about mountains.",
        4000,
        3,
    )
    .await;
    drop(stream);
    let line = node.wait_for_log("generation cancelled", Duration::from_secs(30));
    assert!(line.contains("client went away"), "{line}");
    // The node goes on serving.
    let response = chat(node.addr, "Hi", 4, false).await;
    assert_eq!(response.status, 200, "{}", response.body);
}

#[tokio::test]
async fn a_signalled_node_finishes_its_open_stream_and_exits() {
    let mut node = Node::start_ready(&[]);
    // A dashboard's live feed, which has no end of its own.
    let mut feed = TcpStream::connect(node.addr).await.expect("connect");
    feed.write_all(b"GET /v1/cluster/events HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("send");
    // Its headers and first event may come in separate reads.
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("event: cluster") {
        let n = tokio::time::timeout(support::REQUEST_TIMEOUT, feed.read(&mut buf))
            .await
            .expect("the feed's first event in time")
            .expect("read");
        assert!(n > 0, "the feed ended: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    let (mut stream, _) =
        support::start_stream(node.addr, "Write a short poem about rivers.", 48, 2).await;
    node.signal("TERM");
    // The stream in flight gets its answer to the end; the feed ends.
    let rest = support::read_rest(&mut stream, support::REQUEST_TIMEOUT).await;
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.contains("data: [DONE]"), "{rest}");
    support::read_rest(&mut feed, support::REQUEST_TIMEOUT).await;
    // The engine stopped when asked (its handles outlive the HTTP
    // server, so their drop cannot stop it), with nothing left: the 46
    // tokens after the signal took far less than the 10 s grace.
    let log = node.stopped_log(0);
    assert!(log.contains("ringlet_node::serve: stopped"), "{log}");
    // Nothing waited out a deadline.
    assert!(!log.contains("did not stop within"), "{log}");
    assert!(!log.contains("did not finish within"), "{log}");
}

#[tokio::test]
async fn a_stream_that_outlasts_the_stop_grace_is_told_to_retry() {
    let mut node = Node::start_ready(&[]);
    let (mut stream, _) = support::start_stream(
        node.addr,
        "Write a very long essay about mountains.",
        4000,
        2,
    )
    .await;
    node.signal("TERM");
    // 4,000 tokens take far longer than the 10 s grace: the stream ends
    // with an error that says what to do, not with a cut connection.
    let rest = support::read_rest(&mut stream, support::REQUEST_TIMEOUT).await;
    let rest = String::from_utf8_lossy(&rest);
    let last = sse_data(&rest).pop().unwrap_or_default();
    assert!(
        last.contains("the node is stopping; send the request again"),
        "{rest}"
    );
    let log = node.stopped_log(1);
    assert!(
        log.contains("open requests did not finish within 10 s"),
        "{log}"
    );
    assert!(!log.contains("did not stop within"), "{log}");
    assert!(!log.contains("did not take their last event"), "{log}");
}

#[tokio::test]
async fn concurrent_streams_over_sockets_all_finish() {
    let node = Node::start_ready(&[]);
    let prompts = [
        "Count to five.",
        "Say hello in French.",
        "Name a river.",
        "Name a mountain.",
    ];
    let mut alone = Vec::new();
    for p in prompts {
        alone.push(chat(node.addr, p, 12, false).await.content());
    }
    let bodies: Vec<String> = prompts.iter().map(|p| chat_body(p, 12, true)).collect();
    let together = futures_util::future::join_all(
        bodies
            .iter()
            .map(|b| request(node.addr, "POST", "/v1/chat/completions", Some(b))),
    )
    .await;
    for (response, expected) in together.iter().zip(&alone) {
        assert_eq!(response.status, 200);
        let events = sse_data(&response.body);
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let (content, finish) = streamed_content(&events);
        assert_eq!(&content, expected);
        assert!(finish.is_some());
    }
}

#[tokio::test]
async fn garbage_on_the_socket_does_not_hurt_the_node() {
    let mut node = Node::start_ready(&[]);
    let garbage: [&[u8]; 4] = [
        b"\x00\x01\x02\xff\xfe garbage\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 999999999999\r\n\r\n{",
        b"GET / HTTP/1.1\r\nHost: x\r\n", // never finishes its headers
        b"POST /v1/chat/completions HTTP/1.0\r\nContent-Length: 5\r\n\r\n{\"a\":",
    ];
    for bytes in garbage {
        let mut stream = TcpStream::connect(node.addr).await.expect("connect");
        stream.write_all(bytes).await.expect("send");
        drop(stream);
    }
    let response = request(node.addr, "POST", "/v1/chat/completions", Some("{not json")).await;
    assert_eq!(response.status, 400);
    assert_eq!(response.json()["error"]["type"], "invalid_request_error");
    let response = chat(node.addr, "Hi", 4, false).await;
    assert_eq!(response.status, 200, "{}", response.body);
    assert!(node.is_running());
}

#[tokio::test]
async fn a_non_streaming_client_that_hangs_up_cancels_its_generation() {
    let mut node = Node::start_ready(&[]);
    let body = chat_body("Write a very long essay about forests.", 1500, false);
    let raw = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut stream = TcpStream::connect(node.addr).await.expect("connect");
    stream.write_all(raw.as_bytes()).await.expect("send");
    node.wait_for_log("generation started", Duration::from_secs(60));
    drop(stream);
    let line = node.wait_for_log("generation cancelled", Duration::from_secs(30));
    assert!(line.contains("client went away"), "{line}");
}

#[tokio::test]
async fn a_taken_port_is_a_clear_error() {
    let node = Node::start_ready(&[]);
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(support::ringlet_binary())
            .args(["serve", "--listen", &node.addr.to_string()])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("exits within 60 s")
    .expect("run");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot listen on") && stderr.contains("--listen"),
        "{stderr}"
    );
}
