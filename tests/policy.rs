//! The scheduling policy is a Wasm component that can be replaced while
//! the cluster runs: real components built from `scheduler-wasm/examples`
//! and `tests/policies`, run in the node's sandbox and uploaded to real
//! `ringlet` processes over HTTP.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a failed expectation is the report

mod support;

use std::collections::BTreeSet;
use std::sync::OnceLock;

use bytes::Bytes;

use kernels::{SamplingParams, SequenceId};
use ringlet_node::cluster::protocol::PolicyRevision;
use ringlet_node::engine::{
    Engine, EngineModel, GenerationEvent, GenerationRequest, KvRoom, PipelineEnds, Scheduling,
};
use ringlet_node::policy::{
    self, Change, Cluster, Fault, Faults, Model, Node, PolicyError, PolicyHandle, PolicySource,
    StageLoad,
};
use ringlet_node::stage::{StageJob, StageResult};
use scheduler::NodeId;
use serde_json::Value;
use sha2::{Digest, Sha256};
use support::{Node as Process, START_TIMEOUT, chat, get_json, request_raw};
use tokio::sync::watch;

const EXAMPLE: &str = "scheduler-wasm/examples/fewest-nodes";
const MISBEHAVING: &str = "tests/policies/misbehaving";
const TOKEN: &str = "test-admin-token";
const MIB: u64 = 1 << 20;

/// Node processes share two cores: one test with nodes at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn example_policy() -> &'static [u8] {
    static BUILT: OnceLock<Vec<u8>> = OnceLock::new();
    BUILT.get_or_init(|| support::build_policy(EXAMPLE, None))
}

fn misbehaving(feature: &str) -> Vec<u8> {
    support::build_policy(MISBEHAVING, Some(feature))
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

// ---------------------------------------------------------------------------
// The sandbox, in process
// ---------------------------------------------------------------------------

/// The default model's shape: 30 layers of about 2 MiB and a 28.7 MiB
/// embedding tied to the head.
fn model() -> Model {
    Model {
        layer_count: 30,
        layer_bytes: vec![2_075_904; 30],
        embedding_bytes: 30_081_024,
        head_bytes: 30_081_024 + 2_304,
        tied_embeddings: true,
        kv_bytes_per_token_per_layer: 1_536,
        context_length: 8_192,
    }
}

fn node(id: u64, budget_mib: u64, score: f64) -> Node {
    Node {
        id,
        name: format!("node-{id}"),
        device: "cpu".into(),
        memory_budget_bytes: budget_mib * MIB,
        compute_score: score,
    }
}

fn cluster(nodes: Vec<Node>) -> Cluster {
    Cluster {
        nodes,
        links: Vec::new(),
    }
}

fn sandbox() -> PolicyHandle {
    policy::start().expect("start the policy thread").0
}

/// The next fault the policy host reports; it reports it before it
/// answers the call that failed, so it is already there.
fn reported(faults: &mut Faults) -> Fault {
    faults.try_recv().expect("a fault was reported")
}

fn revision(counter: u64) -> PolicyRevision {
    PolicyRevision {
        counter,
        origin: NodeId(1),
    }
}

async fn install(
    handle: &PolicyHandle,
    bytes: Vec<u8>,
    on: Cluster,
) -> Result<policy::PolicyView, PolicyError> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let counter = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    handle
        .install(
            Some(Bytes::from(bytes)),
            revision(counter),
            Change::Upload {
                cluster: on,
                model: model(),
            },
        )
        .await
}

#[tokio::test]
async fn the_built_in_policy_places_memory_weighted_and_the_example_fewest_fastest() {
    let handle = sandbox();
    // Three nodes that could each hold the model; node 3 is the fastest.
    let three = || {
        cluster(vec![
            node(1, 200, 10.0),
            node(2, 200, 20.0),
            node(3, 200, 40.0),
        ])
    };
    let placed = handle.place(three(), model()).await.expect("placed");
    assert_eq!(placed.policy.name, "memory-weighted");
    let plan = placed.result.expect("the built-in policy places it");
    assert_eq!(plan.stages.len(), 3, "{plan:?}");

    let view = install(&handle, example_policy().to_vec(), three())
        .await
        .expect("the example installs");
    assert_eq!(view.name, "fewest-nodes");
    assert_eq!(view.sha256, sha256_hex(example_policy()));
    let plan = handle
        .place(three(), model())
        .await
        .expect("placed")
        .result
        .expect("plan");
    assert_eq!(plan.stages.len(), 1, "{plan:?}");
    assert_eq!(
        (
            plan.stages[0].node,
            plan.stages[0].start,
            plan.stages[0].end
        ),
        (3, 0, 30)
    );

    // Small nodes: the two fastest that hold it together, fastest first.
    let small = cluster(vec![
        node(1, 60, 40.0),
        node(2, 60, 10.0),
        node(3, 60, 20.0),
    ]);
    let plan = handle
        .place(small, model())
        .await
        .expect("placed")
        .result
        .expect("plan");
    let order: Vec<u64> = plan.stages.iter().map(|s| s.node).collect();
    assert_eq!(order, vec![1, 3], "{plan:?}");
    assert_eq!(plan.stages[1].end, 30);

    // Its scheduling: shortest job first, as many as there is room for.
    let waiting = |id: u64, prompt_tokens: u32| policy::WaitingRequest {
        id,
        prompt_tokens,
        max_tokens: 100,
        waited_millis: 1_000 - id,
    };
    let load = |in_flight: u32| policy::StageLoad {
        node: 1,
        in_flight,
        limit: 16,
    };
    let picked = handle
        .schedule(
            vec![waiting(1, 900), waiting(2, 10), waiting(3, 300)],
            vec![load(14)],
        )
        .await
        .expect("scheduled");
    assert_eq!(picked, vec![2, 3]);
}

#[tokio::test]
async fn the_built_in_policy_places_the_largest_cluster_within_its_fuel() {
    // MAX_NODES nodes, every pair linked: the most a node ever asks about.
    let count = ringlet_node::limits::MAX_NODES as u64;
    let nodes: Vec<Node> = (1..=count).map(|id| node(id, 40, 10.0)).collect();
    let mut links = Vec::new();
    for a in 1..=count {
        for b in (1..=count).filter(|&b| b != a) {
            links.push(policy::Link {
                from: a,
                to: b,
                latency_micros: 100 + (a * 31 + b * 17) % 900,
                bandwidth_bytes_per_second: 110_000_000,
            });
        }
    }
    let placed = sandbox()
        .place(Cluster { nodes, links }, model())
        .await
        .expect("placed");
    let plan = placed.result.expect("placed within the fuel budget");
    assert_eq!(plan.stages.last().map(|s| s.end), Some(30), "{plan:?}");
}

#[tokio::test]
async fn bad_policies_are_refused_at_upload_with_a_clear_reason() {
    let handle = sandbox();
    let one = || cluster(vec![node(1, 200, 10.0)]);
    type Check = fn(&PolicyError) -> bool;
    let cases: Vec<(&str, Vec<u8>, Check, &str)> = vec![
        (
            "an endless loop",
            misbehaving("endless-loop"),
            |e| matches!(e, PolicyError::OutOfFuel),
            "fuel",
        ),
        (
            "a memory bomb",
            misbehaving("memory-bomb"),
            |e| matches!(e, PolicyError::OutOfMemory),
            "memory",
        ),
        (
            "a panic",
            misbehaving("panics"),
            |e| matches!(e, PolicyError::Trap(_)),
            "panics on purpose",
        ),
        (
            "a plan that skips a layer",
            misbehaving("skips-layer"),
            |e| matches!(e, PolicyError::InvalidPlan(_)),
            "layers 1..2 are placed nowhere",
        ),
        (
            "a plan that repeats a layer",
            misbehaving("repeats-layer"),
            |e| matches!(e, PolicyError::InvalidPlan(_)),
            "layers 1..2 are placed twice",
        ),
        (
            "a policy that sleeps",
            misbehaving("sleeps"),
            |e| matches!(e, PolicyError::TimedOut),
            "did not return within 2 s",
        ),
        (
            "an endless schedule",
            misbehaving("schedule-loops"),
            |e| matches!(e, PolicyError::OutOfFuel),
            "fuel",
        ),
        (
            "another world",
            misbehaving("wrong-world"),
            |e| matches!(e, PolicyError::WrongInterface(_)),
            "ringlet:scheduler/policy",
        ),
        (
            "a core module",
            b"\0asm\x01\0\0\0".to_vec(),
            |e| matches!(e, PolicyError::NotAComponent(_)),
            "not a WebAssembly component",
        ),
        (
            "random bytes",
            (0..4096u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect(),
            |e| matches!(e, PolicyError::NotAComponent(_)),
            "not a WebAssembly component",
        ),
        (
            "an oversized upload",
            vec![0; ringlet_node::limits::MAX_POLICY_BYTES + 1],
            |e| matches!(e, PolicyError::TooLarge { .. }),
            "limited to",
        ),
    ];
    for (what, bytes, expected, words) in cases {
        let error = install(&handle, bytes, one()).await.expect_err(what);
        assert!(expected(&error), "{what}: {error:?}");
        assert!(error.to_string().contains(words), "{what}: {error}");
        // Nothing changed: the built-in policy still places.
        let placed = handle.place(one(), model()).await.expect("placed");
        assert_eq!(placed.policy.name, "memory-weighted", "after {what}");
        assert!(placed.result.is_ok(), "after {what}");
    }
}

#[tokio::test]
async fn a_policy_failing_at_a_re_plan_falls_back_to_the_last_good_one() {
    let (handle, mut faults) = policy::start().expect("start the policy thread");
    let one = || cluster(vec![node(1, 200, 10.0)]);
    let two = || cluster(vec![node(1, 200, 10.0), node(2, 200, 30.0)]);
    install(&handle, example_policy().to_vec(), one())
        .await
        .expect("the example installs");
    // Fine on one node, so it passes its dry run...
    install(&handle, misbehaving("fails-on-two-nodes"), one())
        .await
        .expect("passes its dry run");
    // ...and fails once a second node joins: the example takes over again,
    // answers this very call, and the fault is reported for the cluster.
    let placed = handle.place(two(), model()).await.expect("placed");
    assert_eq!(placed.policy.name, "fewest-nodes");
    assert_eq!(placed.result.expect("the example places").stages.len(), 1);
    let fault = reported(&mut faults);
    assert_eq!(fault.failed.name, "misbehaving");
    assert!(
        fault.error.to_string().contains("cannot place on 2 nodes"),
        "{}",
        fault.error
    );
    assert_eq!(fault.now_active.name, "fewest-nodes");
    assert_eq!(fault.now_active_wasm.as_deref(), Some(example_policy()));
    // A policy change older than the one in force is refused.
    let stale = handle.install(None, revision(0), Change::Propagated).await;
    assert_eq!(stale.map(|v| v.name), Err(PolicyError::Outdated));
}

#[tokio::test]
async fn falling_back_ends_at_the_built_in_policy() {
    let (handle, mut faults) = policy::start().expect("start the policy thread");
    let nodes = |count: u64| cluster((1..=count).map(|id| node(id, 200, 10.0)).collect());
    let fails_on_three = misbehaving("fails-on-three-nodes");
    install(&handle, fails_on_three.clone(), nodes(1))
        .await
        .expect("installs");
    install(&handle, misbehaving("fails-on-two-nodes"), nodes(1))
        .await
        .expect("installs");

    // Two nodes: the newer one fails, the older one answers.
    let placed = handle.place(nodes(2), model()).await.expect("placed");
    assert!(placed.result.is_ok(), "{:?}", placed.result);
    assert_eq!(placed.policy.sha256, sha256_hex(&fails_on_three));
    let fault = reported(&mut faults);
    assert_eq!(fault.now_active_wasm.as_deref(), Some(&fails_on_three[..]));

    // The cluster makes the same switch, as a fallback: after it comes the
    // built-in policy, not the policy that just failed.
    let view = handle
        .install(
            Some(Bytes::from(fails_on_three.clone())),
            revision(1_000),
            Change::Fallback,
        )
        .await
        .expect("the fallback installs");
    assert_eq!(view.sha256, sha256_hex(&fails_on_three));

    // Three nodes: that one fails too, and the built-in policy answers.
    let placed = handle.place(nodes(3), model()).await.expect("placed");
    assert_eq!(placed.policy.source, PolicySource::BuiltIn);
    assert_eq!(placed.result.expect("plan").stages.len(), 3);
    let fault = reported(&mut faults);
    assert!(
        fault.error.to_string().contains("cannot place on 3 nodes"),
        "{}",
        fault.error
    );
    assert_eq!(fault.now_active.source, PolicySource::BuiltIn);
    assert_eq!(fault.now_active_wasm, None);
    // The built-in policy never fails over: nothing more to report.
    let placed = handle.place(nodes(2), model()).await.expect("placed");
    assert_eq!(placed.policy.source, PolicySource::BuiltIn);
    assert!(faults.try_recv().is_err(), "no further fault");
}

#[tokio::test]
async fn a_policy_failing_to_schedule_falls_back_within_the_call() {
    let (handle, mut faults) = policy::start().expect("start the policy thread");
    install(
        &handle,
        misbehaving("schedule-fails-on-long-queue"),
        cluster(vec![node(1, 200, 10.0)]),
    )
    .await
    .expect("passes its dry run");
    let queue: Vec<policy::WaitingRequest> = (1..=101)
        .map(|id| policy::WaitingRequest {
            id,
            prompt_tokens: 10,
            max_tokens: 10,
            waited_millis: 1_000 - id,
        })
        .collect();
    let stages = vec![StageLoad {
        node: 1,
        in_flight: 14,
        limit: 16,
    }];
    // The built-in policy answers instead: first come, first served, as
    // many as there is room for.
    let picked = handle.schedule(queue, stages).await.expect("scheduled");
    assert_eq!(picked, vec![1, 2]);
    let fault = reported(&mut faults);
    assert!(
        fault
            .error
            .to_string()
            .contains("cannot schedule 101 requests"),
        "{}",
        fault.error
    );
    assert_eq!(fault.now_active.source, PolicySource::BuiltIn);
}

/// An engine's model for a test that plays its stage: one byte of KV
/// cache a token, a gibibyte of it.
fn test_model() -> EngineModel {
    EngineModel {
        context_length: 4_096,
        stop_tokens: BTreeSet::new(),
        kv_bytes_per_token: 1,
        kv_budget_bytes: 1 << 30,
        prefill_chunk_tokens: 512,
    }
}

fn greedy_request(id: u64, prompt_tokens: usize, max_tokens: usize) -> GenerationRequest {
    GenerationRequest {
        id: SequenceId(id),
        prompt: vec![1; prompt_tokens],
        max_tokens,
        sampling: SamplingParams::greedy(),
        ignore_eos: false,
    }
}

/// Plays the only stage of an engine whose stage is full: one request runs,
/// three wait (prompts of 900, 10 and 300 tokens, arriving in that order).
/// When the running one finishes, returns the request the policy started.
async fn started_after_the_stage_frees_up(policy: PolicyHandle) -> u64 {
    let (_loads_tx, loads) = watch::channel(vec![StageLoad {
        node: 1,
        in_flight: 0,
        limit: 1,
    }]);
    let scheduling = Scheduling {
        policy,
        stages: loads,
        kv_room: watch::channel(None).1,
    };
    let (engine, mut stage) = Engine::start(test_model(), Some(scheduling)).expect("engine");
    let submit = |id: u64, prompt_tokens: usize| {
        engine
            .handle
            .submit(greedy_request(id, prompt_tokens, 1))
            .expect("submitted")
    };
    let next_started = async |stage: &mut PipelineEnds| loop {
        match stage.jobs.recv().await.expect("a job") {
            StageJob::Forward { sequence, .. } => return sequence.0,
            StageJob::Release { .. } => {}
        }
    };
    let _running = submit(100, 5);
    assert_eq!(next_started(&mut stage).await, 100);
    let _waiting = [submit(1, 900), submit(2, 10), submit(3, 300)];
    let mut stats = engine.handle.stats();
    stats
        .wait_for(|s| s.queued == 3)
        .await
        .expect("three requests wait");
    stage
        .results
        .send(StageResult::Token {
            sequence: SequenceId(100),
            token: 7,
            logprobs: None,
            batch: None,
        })
        .await
        .expect("result");
    next_started(&mut stage).await
}

/// A request that waits for KV room and then, when the plan changes (a
/// lost node's layers moved to the others), can never fit is failed with
/// the reason: it no longer holds up the requests behind it.
#[tokio::test]
async fn a_waiting_request_that_a_new_plan_cannot_hold_fails_and_frees_the_queue() {
    let (_loads_tx, loads) = watch::channel(Vec::new());
    let room = |capacity_tokens| {
        Some(KvRoom {
            capacity_tokens,
            stage: "node b (layers 0-29)".into(),
            others_tokens: 0,
        })
    };
    let (kv_tx, kv_room) = watch::channel(room(1_024));
    let scheduling = Scheduling {
        policy: sandbox(),
        stages: loads,
        kv_room,
    };
    let (engine, mut stage) = Engine::start(test_model(), Some(scheduling)).expect("engine");
    let submit = |id: u64, max_tokens: usize| {
        engine
            .handle
            .submit(greedy_request(id, 64, max_tokens))
            .expect("fits the plan it came to")
    };
    // 576 tokens run; 704 more do not fit beside them, so they wait.
    let _running = submit(1, 500);
    match stage.jobs.recv().await.expect("a job") {
        StageJob::Forward { sequence, .. } => assert_eq!(sequence, SequenceId(1)),
        StageJob::Release { .. } => panic!("a release before any step"),
    }
    let mut waiting = submit(2, 600);
    let mut stats = engine.handle.stats();
    stats
        .wait_for(|s| s.queued == 1)
        .await
        .expect("one request waits");

    // The new plan holds 640 tokens a request: 704 can never fit.
    kv_tx.send_replace(room(640));
    let event = tokio::time::timeout(std::time::Duration::from_secs(30), waiting.events.recv())
        .await
        .expect("the request still waits, holding up the queue");
    match event {
        Some(GenerationEvent::Failed { message }) => assert!(
            message.contains("more than the cluster holds for one request")
                && message.contains("node b"),
            "{message}"
        ),
        other => panic!("expected a failure, got {other:?}"),
    }
    stats
        .wait_for(|s| s.queued == 0)
        .await
        .expect("the queue is free");
}

#[tokio::test]
async fn the_policy_picks_which_waiting_request_starts() {
    // The built-in policy: first come, first served.
    assert_eq!(started_after_the_stage_frees_up(sandbox()).await, 1);
    // The example: shortest job first.
    let handle = sandbox();
    install(
        &handle,
        example_policy().to_vec(),
        cluster(vec![node(1, 200, 10.0)]),
    )
    .await
    .expect("the example installs");
    assert_eq!(started_after_the_stage_frees_up(handle).await, 2);
}

// ---------------------------------------------------------------------------
// Real nodes over HTTP
// ---------------------------------------------------------------------------

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

async fn put_policy(node: &Process, bytes: &[u8], token: Option<&str>) -> support::Response {
    let auth = token.map(bearer);
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    request_raw(
        node.addr,
        "PUT",
        "/v1/cluster/policy",
        &headers,
        Some(bytes),
    )
    .await
}

async fn delete_policy(node: &Process, token: Option<&str>) -> support::Response {
    let auth = token.map(bearer);
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    request_raw(node.addr, "DELETE", "/v1/cluster/policy", &headers, None).await
}

async fn chat_works(node: &Process) {
    let response = chat(node.addr, "Say hi", 4, false).await;
    assert_eq!(response.status, 200, "{}", response.body);
    assert!(!response.content().is_empty(), "{}", response.body);
}

fn stage_count(view: &Value) -> usize {
    view["plan"]["stages"].as_array().map_or(0, Vec::len)
}

#[tokio::test]
async fn changing_the_policy_needs_the_admin_token() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let open = Process::start_ready(&[]);
    let refused = put_policy(&open, example_policy(), Some(TOKEN)).await;
    assert_eq!(refused.status, 403, "{}", refused.body);
    assert_eq!(refused.json()["error"]["code"], "policy_changes_disabled");
    assert!(refused.body.contains("--admin-token"), "{}", refused.body);
    assert_eq!(delete_policy(&open, Some(TOKEN)).await.status, 403);
    drop(open);

    let guarded = Process::start_ready(&["--admin-token", TOKEN]);
    for token in [None, Some("wrong-token")] {
        let refused = put_policy(&guarded, example_policy(), token).await;
        assert_eq!(refused.status, 401, "{token:?}: {}", refused.body);
        assert_eq!(refused.json()["error"]["code"], "invalid_admin_token");
        assert_eq!(delete_policy(&guarded, token).await.status, 401);
    }
    let policy = get_json(guarded.addr, "/v1/cluster/policy").await;
    assert_eq!(policy["name"], "memory-weighted", "{policy}");
    assert_eq!(policy["revision"], 0, "{policy}");
}

#[tokio::test]
async fn an_uploaded_policy_re_plans_every_node_and_delete_restores_the_default() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut nodes = Process::start_cluster(2, &["--admin-token", TOKEN]);
    assert_eq!(
        stage_count(&get_json(nodes[0].addr, "/v1/cluster").await),
        2
    );

    // Uploaded to the second node, it reaches the leader, which re-plans:
    // either node alone holds the model, so the fewest nodes is one.
    let marks: Vec<usize> = nodes.iter_mut().map(Process::log_mark).collect();
    let response = put_policy(&nodes[1], example_policy(), Some(TOKEN)).await;
    assert_eq!(response.status, 200, "{}", response.body);
    let uploaded = response.json();
    assert_eq!(uploaded["name"], "fewest-nodes");
    assert_eq!(uploaded["source"], "uploaded");
    assert_eq!(uploaded["sha256"], sha256_hex(example_policy()));
    for (node, mark) in nodes.iter_mut().zip(&marks) {
        node.wait_for_log_since(*mark, "policy changed (revision 1)", START_TIMEOUT);
        node.wait_for_log_since(*mark, "plan active: 1 stages", START_TIMEOUT);
    }
    for node in &nodes {
        let policy = get_json(node.addr, "/v1/cluster/policy").await;
        assert_eq!(policy["name"], "fewest-nodes", "{policy}");
        assert_eq!(policy["version"], uploaded["version"]);
        assert_eq!(policy["sha256"], uploaded["sha256"]);
        assert_eq!(policy["revision"], uploaded["revision"]);
        let view = get_json(node.addr, "/v1/cluster").await;
        assert_eq!(stage_count(&view), 1, "{view}");
        assert_eq!(view["policy"]["name"], "fewest-nodes");
        chat_works(node).await;
    }

    // DELETE goes back to the built-in policy everywhere: two stages again.
    let marks: Vec<usize> = nodes.iter_mut().map(Process::log_mark).collect();
    let response = delete_policy(&nodes[0], Some(TOKEN)).await;
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(response.json()["name"], "memory-weighted");
    for (node, mark) in nodes.iter_mut().zip(&marks) {
        node.wait_for_log_since(*mark, "policy changed (revision 2)", START_TIMEOUT);
        node.wait_for_log_since(*mark, "plan active: 2 stages", START_TIMEOUT);
    }
    for node in &nodes {
        let policy = get_json(node.addr, "/v1/cluster/policy").await;
        assert_eq!(policy["name"], "memory-weighted", "{policy}");
        assert_eq!(policy["source"], "built_in");
        assert_eq!(stage_count(&get_json(node.addr, "/v1/cluster").await), 2);
        chat_works(node).await;
    }

    // A component larger than one frame reaches the peer whole.
    let large = misbehaving("large");
    assert!(large.len() > 4 * ringlet_node::limits::POLICY_CHUNK_BYTES);
    let marks: Vec<usize> = nodes.iter_mut().map(Process::log_mark).collect();
    let response = put_policy(&nodes[0], &large, Some(TOKEN)).await;
    assert_eq!(response.status, 200, "{}", response.body);
    for (node, mark) in nodes.iter_mut().zip(&marks) {
        node.wait_for_log_since(*mark, "policy changed (revision 3)", START_TIMEOUT);
        let policy = get_json(node.addr, "/v1/cluster/policy").await;
        assert_eq!(policy["sha256"], sha256_hex(&large), "{policy}");
        assert_eq!(policy["size_bytes"], large.len(), "{policy}");
    }
}

#[tokio::test]
async fn bad_uploads_are_refused_and_the_node_keeps_serving() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let node = Process::start_ready(&["--admin-token", TOKEN]);
    let uploads: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("an endless loop", misbehaving("endless-loop"), 422, "fuel"),
        ("a memory bomb", misbehaving("memory-bomb"), 422, "memory"),
        ("a panic", misbehaving("panics"), 422, "panics on purpose"),
        (
            "a plan that skips a layer",
            misbehaving("skips-layer"),
            422,
            "placed nowhere",
        ),
        (
            "a plan that repeats a layer",
            misbehaving("repeats-layer"),
            422,
            "placed twice",
        ),
        (
            "another world",
            misbehaving("wrong-world"),
            422,
            "ringlet:scheduler/policy",
        ),
        (
            "random bytes",
            b"these are not the bytes you are looking for".to_vec(),
            422,
            "not a WebAssembly component",
        ),
        ("an empty body", Vec::new(), 400, "body is empty"),
        (
            "an oversized upload",
            vec![0; ringlet_node::limits::MAX_POLICY_BYTES + 1],
            413,
            "limited to",
        ),
    ];
    // A chat runs while the bad policies arrive, and after each.
    let chatting = tokio::spawn({
        let addr = node.addr;
        async move { chat(addr, "Count to twenty.", 48, true).await }
    });
    for (what, bytes, status, words) in uploads {
        let response = put_policy(&node, &bytes, Some(TOKEN)).await;
        assert_eq!(response.status, status, "{what}: {}", response.body);
        let message = response.json()["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(message.contains(words), "{what}: {message}");
        chat_works(&node).await;
    }
    let streamed = chatting.await.expect("the chat task");
    assert_eq!(streamed.status, 200, "{}", streamed.body);
    assert!(streamed.body.contains("[DONE]"), "{}", streamed.body);
    let policy = get_json(node.addr, "/v1/cluster/policy").await;
    assert_eq!(policy["name"], "memory-weighted", "{policy}");
    assert_eq!(policy["revision"], 0, "nothing changed: {policy}");
}

#[tokio::test]
async fn a_policy_that_fails_when_a_node_joins_is_replaced_on_every_node() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut first = Process::start_ready(&["--admin-token", TOKEN, "--name", "node-0"]);
    let response = put_policy(&first, &misbehaving("fails-on-two-nodes"), Some(TOKEN)).await;
    assert_eq!(
        response.status, 200,
        "it passes its dry run alone: {}",
        response.body
    );
    first.wait_for_log("policy changed (revision 1)", START_TIMEOUT);

    // A second node joins: the policy traps at the re-plan (on whichever
    // node leads), the cluster falls back to the built-in policy as
    // revision 2, and both nodes say why.
    let peer = first.addr.to_string();
    let mut second = Process::start(&["--admin-token", TOKEN, "--name", "node-1", "--peer", &peer]);
    for node in [&mut first, &mut second] {
        node.wait_for_log("policy changed (revision 2)", START_TIMEOUT);
        node.wait_for_log("plan active: 2 stages", START_TIMEOUT);
    }
    for node in [&first, &second] {
        let policy = get_json(node.addr, "/v1/cluster/policy").await;
        assert_eq!(policy["name"], "memory-weighted", "{policy}");
        let warning = policy["warning"].as_str().unwrap_or_default();
        assert!(
            warning.contains("misbehaving") && warning.contains("cannot place on 2 nodes"),
            "{policy}"
        );
        chat_works(node).await;
    }
}
