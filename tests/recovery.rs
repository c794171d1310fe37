//! A lost node does not lose the answer: real `ringlet` processes on
//! loopback, a node killed (SIGKILL), stopped (SIGSTOP) or with a stage
//! thread that dies, while answers stream through it. The streams pause
//! and finish with no error, and their text is exactly what one node
//! answers uninterrupted, greedy or seeded. When the nodes left cannot
//! hold the model, the request waits `--recovery-wait` for a node to come
//! back, and fails with a clear error if none does.
//!
//! Every wait here has a timeout and waits for an event (a log line, a
//! number of streamed chunks); none sleeps.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a failed expectation is the report

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::{
    MODEL, Node, read_content_events, read_rest, request, send_chat, sse_data, streamed_content,
};
use tokio::net::TcpStream;

/// Each test runs up to three node processes that compute with two
/// threads each; on a two-core machine they take turns.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A budget under which one node cannot hold the default model (92 MiB
/// of weights, more with its tied embedding on two stages) and any two
/// can.
const SMALL: &str = "80MiB";

/// A budget that holds the whole model, small enough that the policy
/// (which gives each node layers in proportion to its budget) still gives
/// nodes with [`SMALL`] budgets layers beside it.
const WHOLE: &str = "200MiB";

/// Time for a stream to finish after a loss: detection, re-plan, layer
/// load, replay of the history and the rest of the answer, on a shared
/// two-core machine.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(120);

/// A prompt of about 1,100 tokens: three prefill chunks, so a kill right
/// after the request starts lands in its prefill.
fn long_prompt() -> String {
    let notes = "The harbour master logged every ship that came in: its name, its cargo, \
                 the weather it met and the hour it tied up. ";
    format!(
        "{}\nFrom these notes, write a long story about one of the ships.",
        notes.repeat(40)
    )
}

fn body(prompt: &str, max_tokens: u32, temperature: f64, stream: bool) -> String {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": temperature,
        "seed": 7,
        "stream": stream,
    })
    .to_string()
}

/// The text of an uninterrupted, non-streamed answer.
async fn answer(node: &Node, body: &str) -> String {
    let response = request(node.addr, "POST", "/v1/chat/completions", Some(body)).await;
    assert_eq!(response.status, 200, "{}", response.body);
    response.content()
}

/// Reads the rest of a stream and returns its text; panics if it carried
/// an error or did not finish.
async fn finish_stream(mut stream: TcpStream, mut seen: Vec<u8>) -> String {
    let rest = read_rest(&mut stream, RECOVERY_TIMEOUT).await;
    seen.extend_from_slice(&rest);
    let raw = String::from_utf8_lossy(&seen);
    let body = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    assert!(!body.contains("\"error\""), "the stream failed: {body}");
    let (text, finish) = streamed_content(&sse_data(body));
    assert_eq!(
        finish.as_deref(),
        Some("length"),
        "the stream finished: {body}"
    );
    text
}

/// The answers of one node alone (a cluster of its own: no peers, and
/// loopback nodes do not discover each other) to each of `bodies`.
async fn answers_alone(bodies: &[String]) -> Vec<String> {
    let alone = Node::start_ready(&["--name", "alone"]);
    let mut answers = Vec::new();
    for body in bodies {
        let plain = body.replace("\"stream\":true", "\"stream\":false");
        answers.push(answer(&alone, &plain).await);
    }
    answers
}

/// Three nodes of [`SMALL`] budgets in a ring: `a` and `b` form it and
/// so are its senior nodes (one of them leads), then the `owner` the
/// client talks to joins.
fn ring_of_three() -> (Node, Node, Node) {
    let mut a = Node::start(&["--name", "a", "--memory-budget", SMALL]);
    let first = a.addr.to_string();
    let mut b = Node::start(&["--name", "b", "--memory-budget", SMALL, "--peer", &first]);
    a.wait_for_log("plan active: 2 stages", support::START_TIMEOUT);
    let mut owner = Node::start(&[
        "--name",
        "owner",
        "--memory-budget",
        SMALL,
        "--peer",
        &first,
    ]);
    for node in [&mut a, &mut b, &mut owner] {
        node.wait_for_log("plan active: 3 stages", support::START_TIMEOUT);
    }
    (a, b, owner)
}

/// Whether `victim` leads the cluster as `owner` sees it.
async fn leads(victim: &Node, owner: &Node) -> bool {
    let id = support::get_json(victim.addr, "/v1/cluster").await["node"].clone();
    support::get_json(owner.addr, "/v1/cluster").await["leader"] == id
}

/// Starts a node that joins the cluster at `first` and waits until the
/// cluster has grown back to `stages` stages, as `watch` sees it.
fn rejoin(first: &str, name: &str, budget: &str, watch: &mut Node, stages: usize) -> Node {
    let mark = watch.log_mark();
    let node = Node::start(&["--name", name, "--memory-budget", budget, "--peer", first]);
    watch.wait_for_log_since(
        mark,
        &format!("plan active: {stages} stages"),
        support::START_TIMEOUT,
    );
    node
}

/// Streams `body` from `owner` and does `fault` to `victim` once the
/// owner has started the generation (`after` 0: in its prefill) or the
/// client has `after` chunks; returns the finished text and the owner's
/// log mark from before the request, after printing the pause the client
/// saw and the owner's breakdown of it.
async fn answer_through(
    owner: &mut Node,
    victim: &mut Node,
    body: &str,
    after: usize,
    what: &str,
    fault: impl FnOnce(&mut Node),
) -> (String, usize) {
    let mark = owner.log_mark();
    let mut stream = send_chat(owner.addr, body).await;
    let mut seen = Vec::new();
    if after == 0 {
        owner.wait_for_log_since(mark, "generation started", support::REQUEST_TIMEOUT);
    } else {
        read_content_events(&mut stream, &mut seen, after).await;
    }
    let faulted_at = Instant::now();
    fault(victim);
    let text = finish_stream(stream, seen).await;
    let line = owner.wait_for_log_since(mark, "recovered from the loss of node", RECOVERY_TIMEOUT);
    let resumed = owner.wait_for_log_since(mark, "generation resumed", RECOVERY_TIMEOUT);
    println!(
        "{what}: the stream went on {:.0} ms after the fault\n  {line}\n  {resumed}",
        faulted_at.elapsed().as_secs_f64() * 1000.0
    );
    (text, mark)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_and_stopped_stage_nodes_do_not_lose_the_answer() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let prompt = long_prompt();
    let greedy = body(&prompt, 40, 0.0, true);
    let seeded = body(&prompt, 40, 0.9, true);
    let short = body("Tell me about the sea.", 40, 0.0, true);

    let alone = answers_alone(&[greedy.clone(), seeded.clone(), short.clone()]).await;
    let (greedy_alone, seeded_alone, short_alone) = (&alone[0], &alone[1], &alone[2]);
    let (mut a, mut b, mut owner) = ring_of_three();

    // A senior node (perhaps the leader) dies during the prefill of a
    // greedy answer; the other one later, so the leader is among them.
    let kill = |node: &mut Node| node.kill();
    let mut leaders_killed = usize::from(leads(&a, &owner).await);
    let (text, mark) = answer_through(
        &mut owner,
        &mut a,
        &greedy,
        0,
        "greedy, killed in the prefill",
        kill,
    )
    .await;
    assert_eq!(&text, greedy_alone, "greedy, a node killed in the prefill");
    let resuming = owner.wait_for_log_since(mark, "resuming the generation", RECOVERY_TIMEOUT);
    assert!(
        resuming.contains("generated=0"),
        "the kill landed in the prefill: {resuming}"
    );
    let mut a = rejoin(&owner.addr.to_string(), "a", SMALL, &mut owner, 3);

    // The other stage node dies ten tokens into a greedy answer.
    leaders_killed += usize::from(leads(&b, &owner).await);
    let (text, _) = answer_through(
        &mut owner,
        &mut b,
        &greedy,
        10,
        "greedy, killed after 10 tokens",
        kill,
    )
    .await;
    assert_eq!(&text, greedy_alone, "greedy, a node killed after 10 tokens");
    let mut b = rejoin(&owner.addr.to_string(), "b", SMALL, &mut owner, 3);

    // A seeded sampled answer, the biggest stage killed 20 tokens in: the
    // sampler resumes at the same draw.
    let (text, _) = answer_through(
        &mut owner,
        &mut a,
        &seeded,
        20,
        "seeded, killed after 20 tokens",
        kill,
    )
    .await;
    assert_eq!(&text, seeded_alone, "seeded, a node killed after 20 tokens");
    let _a = rejoin(&owner.addr.to_string(), "a", SMALL, &mut owner, 3);
    assert!(
        leaders_killed >= 1,
        "the leader was among the nodes killed (a and b were the senior ones)"
    );

    // A seeded answer again, the other node killed in its prefill.
    let (text, _) = answer_through(
        &mut owner,
        &mut b,
        &seeded,
        0,
        "seeded, killed in the prefill",
        kill,
    )
    .await;
    assert_eq!(&text, seeded_alone, "seeded, a node killed in the prefill");
    let mut b = rejoin(&owner.addr.to_string(), "b", SMALL, &mut owner, 3);

    // A stopped process (a hang, not a death) is noticed by its silence.
    let stop = |node: &mut Node| node.signal("STOP");
    let (text, mark) = answer_through(
        &mut owner,
        &mut b,
        &short,
        10,
        "greedy, stopped after 10 tokens",
        stop,
    )
    .await;
    assert_eq!(&text, short_alone, "greedy, a node stopped after 10 tokens");
    let silent = owner.wait_for_log_since(mark, "has sent nothing for", RECOVERY_TIMEOUT);
    println!("  {silent}");
    // Let it go on: it does not disturb the plan that replaced it, and
    // it is admitted again.
    let mark = owner.log_mark();
    b.signal("CONT");
    let again = finish_stream(send_chat(owner.addr, &short).await, Vec::new()).await;
    assert_eq!(&again, short_alone, "after SIGCONT");
    owner.wait_for_log_since(mark, "plan active: 3 stages", support::START_TIMEOUT);
    let after = finish_stream(send_chat(owner.addr, &short).await, Vec::new()).await;
    assert_eq!(&after, short_alone, "on the grown-back ring");

    // The cluster view lists the recoveries.
    let view = support::get_json(owner.addr, "/v1/cluster").await;
    let recoveries = view["recoveries"].as_array().expect("recoveries");
    assert!(recoveries.len() >= 5, "{view:#}");
    assert!(
        recoveries
            .iter()
            .all(|r| r["outcome"] == "resumed" && r["resumed_requests"].as_u64() >= Some(1)),
        "{recoveries:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_concurrent_streams_survive_a_lost_node() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let prompts = [
        "Name a colour and say why you like it.",
        "Write a haiku about snow.",
        "Explain what a lighthouse does.",
        "Name three planets and one fact about each.",
    ];
    let mut bodies: Vec<String> = prompts.iter().map(|p| body(p, 32, 0.0, true)).collect();
    // And a sampled answer held to a JSON schema: the new plan's last
    // stage rebuilds its grammar state from the tokens so far.
    let mut structured: serde_json::Value =
        serde_json::from_str(&body("Tell a story about snow, as JSON.", 32, 0.9, true))
            .expect("a JSON body");
    structured["response_format"] = json!({ "type": "json_schema", "json_schema": { "name": "story", "schema": {
        "type": "object", "properties": { "story": { "type": "string", "minLength": 400 } },
        "required": ["story"], "additionalProperties": false
    } } });
    bodies.push(structured.to_string());
    let alone = answers_alone(&bodies).await;
    let (_a, mut b, mut owner) = ring_of_three();
    let mut streams = Vec::new();
    for body in &bodies {
        streams.push(send_chat(owner.addr, body).await);
    }
    let mut seen = vec![Vec::new(); bodies.len()];
    read_content_events(&mut streams[0], &mut seen[0], 6).await;
    let mark = owner.log_mark();
    b.kill();
    let texts = futures_util::future::join_all(
        streams
            .into_iter()
            .zip(seen)
            .map(|(stream, seen)| finish_stream(stream, seen)),
    )
    .await;
    let labels = prompts.iter().copied().chain(["a story as JSON"]);
    for ((text, expected), label) in texts.iter().zip(&alone).zip(labels) {
        assert_eq!(text, expected, "{label}");
    }
    assert!(texts[4].starts_with("{\"story\": \""), "{}", texts[4]);
    let line =
        owner.wait_for_log_since(mark, "recovered from the loss of node b", RECOVERY_TIMEOUT);
    println!("{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_rest_cannot_hold_the_model_requests_wait_for_a_node() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let wait = ["--recovery-wait", "15"];
    let prompt = "Write a long story about a lighthouse keeper.";
    let mut a = Node::start(&[&["--name", "a", "--memory-budget", SMALL][..], &wait].concat());
    let first = a.addr.to_string();
    let mut owner = Node::start(
        &[
            &[
                "--name",
                "owner",
                "--memory-budget",
                SMALL,
                "--peer",
                &first,
            ][..],
            &wait,
        ]
        .concat(),
    );
    owner.wait_for_log("plan active: 2 stages", support::START_TIMEOUT);
    let reference = answer(&owner, &body(prompt, 30, 0.0, false)).await;

    // No node comes back: the request fails after the wait, naming the
    // lost node and the shortfall.
    let mut stream = send_chat(owner.addr, &body(prompt, 30, 0.0, true)).await;
    let mut seen = Vec::new();
    read_content_events(&mut stream, &mut seen, 5).await;
    let killed_at = Instant::now();
    a.kill();
    let rest = read_rest(&mut stream, RECOVERY_TIMEOUT).await;
    let waited = killed_at.elapsed();
    let tail = String::from_utf8_lossy(&rest);
    assert!(
        tail.contains("\"error\"")
            && tail.contains("node a")
            && tail.contains("cannot hold the model")
            && tail.contains("--recovery-wait"),
        "{tail}"
    );
    assert!(
        waited >= Duration::from_secs(15),
        "it waited the stated time: {waited:?}"
    );
    println!("failed after {waited:?}: {tail}");
    let view = support::get_json(owner.addr, "/v1/cluster").await;
    assert_eq!(view["recoveries"][0]["outcome"], "failed", "{view:#}");

    // A node comes back within the wait: the answer completes.
    let mut a = rejoin(&owner.addr.to_string(), "a", SMALL, &mut owner, 2);
    let mut stream = send_chat(owner.addr, &body(prompt, 30, 0.0, true)).await;
    let mut seen = Vec::new();
    read_content_events(&mut stream, &mut seen, 5).await;
    let mark = owner.log_mark();
    a.kill();
    owner.wait_for_log_since(mark, "lost node a", RECOVERY_TIMEOUT);
    // A request that arrives during the recovery waits for it too.
    let late = tokio::spawn({
        let (addr, body) = (owner.addr, body(prompt, 30, 0.0, false));
        async move { request(addr, "POST", "/v1/chat/completions", Some(&body)).await }
    });
    let _back = rejoin(&owner.addr.to_string(), "a", SMALL, &mut owner, 2);
    let text = finish_stream(stream, seen).await;
    assert_eq!(text, reference);
    let late = late.await.expect("the late request");
    assert_eq!(late.status, 200, "{}", late.body);
    assert_eq!(
        late.content(),
        reference,
        "the request that came during the recovery"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_or_hung_stage_thread_is_a_lost_stage() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let short = body("Tell me about the sea.", 40, 0.0, true);
    let mut owner = Node::start_ready(&["--name", "owner", "--memory-budget", WHOLE]);
    let reference = answer(
        &owner,
        &short.replace("\"stream\":true", "\"stream\":false"),
    )
    .await;
    let first = owner.addr.to_string();
    for fault in ["exit-after:20", "hang-after:20"] {
        // A node whose stage thread ends (or blocks) after 20 steps: the
        // node itself notices, turns its readiness to 503 and leaves the
        // plan; the answer goes on without it.
        let mark = owner.log_mark();
        let mut faulty = Node::start_with_env(
            &[
                "--name",
                "faulty",
                "--memory-budget",
                SMALL,
                "--peer",
                &first,
            ],
            &[("RINGLET_TEST_STAGE_FAULT", fault)],
        );
        owner.wait_for_log_since(mark, "plan active: 2 stages", support::START_TIMEOUT);
        let text = finish_stream(send_chat(owner.addr, &short).await, Vec::new()).await;
        assert_eq!(text, reference, "{fault}");
        faulty.wait_for_log_since(0, "this node's stage is lost", RECOVERY_TIMEOUT);
        let health = request(faulty.addr, "GET", "/healthz", None).await;
        assert_eq!(health.status, 503, "{fault}: {}", health.body);
        assert_eq!(health.json()["status"], "stage_lost", "{}", health.body);
        let live = request(faulty.addr, "GET", "/livez", None).await;
        assert_eq!(live.status, 200);
        owner.wait_for_log_since(mark, "plan active: 1 stages", RECOVERY_TIMEOUT);
        let line = owner.wait_for_log_since(
            mark,
            "recovered from the loss of node faulty",
            RECOVERY_TIMEOUT,
        );
        println!("{fault}: {line}");
        drop(faulty);
    }
}
