//! Models from the Hugging Face Hub, against a Hub-compatible server on
//! loopback (`support/hub_server.py`, named in `HF_ENDPOINT`) that serves
//! the default model as a repository with two quantizations (Q4_1 as
//! published, Q8_0 made from it by `scripts/requantize_gguf.py`), a gated
//! copy, and an empty repository. Every ringlet here starts from an empty
//! Hugging Face cache of its own.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a failed expectation is the report

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use kernels::{LayerRange, ModelFile};
use ringlet_node::model_store::sha256_file;
use support::*;

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const REPO: &str = "ringlet-test/SmolLM2-135M-Instruct-GGUF";
const SPLIT: &str = "ringlet-test/SmolLM2-135M-Instruct-split-GGUF";
const GATED: &str = "ringlet-test/gated-GGUF";
const EMPTY: &str = "ringlet-test/empty";
const NO_RANGES: &str = "ringlet-test/no-ranges-GGUF";
const BROKEN_SPLIT: &str = "ringlet-test/broken-split-GGUF";
const TOKEN: &str = "hf_ringlet_test_token";
const Q4_FILE: &str = "SmolLM2-135M-Instruct-Q4_1.gguf";
const Q8_FILE: &str = "SmolLM2-135M-Instruct-Q8_0.gguf";
/// What a node may fetch beyond its slice: the header reads (the first
/// 1 MiB piece and, when the header is longer, a 4 MiB one) and the
/// repository listing.
const HEADER_ALLOWANCE: u64 = (5 << 20) + (64 << 10);

/// The Q8_0 variant of the default model; `tests/run` makes it.
fn q8_model_file() -> PathBuf {
    let path = std::env::var_os("RINGLET_TEST_Q8_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            panic!("RINGLET_TEST_Q8_MODEL must name the Q8_0 copy of the default model; `tests/run` makes it with scripts/requantize_gguf.py")
        });
    assert!(
        path.is_file(),
        "{} is missing; `tests/run` makes it",
        path.display()
    );
    path
}

/// The default model split in three parts; `tests/run` makes them.
fn split_parts() -> Vec<PathBuf> {
    let dir = std::env::var_os("RINGLET_TEST_SPLIT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("RINGLET_TEST_SPLIT_DIR must name the folder of the default model split in three; `tests/run` makes it with scripts/split_gguf.py"));
    (1..=3)
        .map(|n| dir.join(format!("SmolLM2-135M-Instruct-Q4_1-{n:05}-of-00003.gguf")))
        .inspect(|part| {
            assert!(
                part.is_file(),
                "{} is missing; `tests/run` makes it",
                part.display()
            )
        })
        .collect()
}

/// The repositories, laid out as the server reads them.
fn hub_root(tag: &str) -> PathBuf {
    let root = empty_dir(tag);
    let link = |target: &Path, repo: &str, file: &str| {
        let dir = root.join(repo);
        std::fs::create_dir_all(&dir).expect("repository folder");
        std::os::unix::fs::symlink(target, dir.join(file)).expect("link the model");
        std::fs::write(dir.join("README.md"), "# test repository\n").expect("readme");
    };
    link(&model_file(), REPO, Q4_FILE);
    link(&q8_model_file(), REPO, Q8_FILE);
    link(&model_file(), GATED, Q4_FILE);
    for (i, part) in split_parts().iter().enumerate() {
        let name = part
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        link(part, SPLIT, &name);
        if i != 1 {
            link(part, BROKEN_SPLIT, &name);
        }
    }
    link(&model_file(), NO_RANGES, Q4_FILE);
    std::fs::write(root.join(NO_RANGES).join(".no-ranges"), "").expect("no ranges");
    std::fs::write(root.join(GATED).join(".token"), TOKEN).expect("token");
    std::fs::create_dir_all(root.join(EMPTY)).expect("empty repository");
    std::fs::write(root.join(EMPTY).join("README.md"), "nothing here\n").expect("readme");
    root
}

/// A `ringlet` command that sees only `endpoint` and the Hugging Face home
/// `home` (and the token given, if any).
fn ringlet(endpoint: &str, home: &Path, token: Option<&str>) -> Command {
    let mut command = Command::new(ringlet_binary());
    command
        .env("HF_ENDPOINT", endpoint)
        .env("HF_HOME", home)
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_TOKEN_PATH")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null());
    match token {
        Some(token) => command.env("HF_TOKEN", token),
        None => command.env_remove("HF_TOKEN"),
    };
    command
}

/// Runs `ringlet pull MODEL`: whether it succeeded, and what it printed.
fn pull(endpoint: &str, home: &Path, model: &str, token: Option<&str>) -> (bool, String) {
    let output = ringlet(endpoint, home, token)
        .args(["pull", model])
        .output()
        .expect("run ringlet pull");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

fn assert_fails_saying(result: (bool, String), needles: &[&str]) {
    let (ok, text) = result;
    assert!(!ok, "expected a failure, got:\n{text}");
    for needle in needles {
        assert!(text.contains(needle), "no {needle:?} in:\n{text}");
    }
}

#[tokio::test]
async fn each_hub_failure_says_what_to_do() {
    let root = hub_root("hub-failures");
    let server = HubServer::start(&root, 0);
    let home = empty_dir("hub-failures-home");
    let at = server.endpoint.as_str();
    assert_fails_saying(
        pull(at, &home, "ringlet-test/missing-GGUF", None),
        &["has no repository ringlet-test/missing-GGUF", "HF_TOKEN"],
    );
    assert_fails_saying(pull(at, &home, EMPTY, None), &["holds no GGUF file"]);
    assert_fails_saying(
        pull(at, &home, &format!("{REPO}:Q5_K_M"), None),
        &["has no GGUF file for Q5_K_M; it has: Q4_1, Q8_0"],
    );
    assert_fails_saying(
        pull(at, &home, &format!("{REPO}@v9"), None),
        &["has no revision `v9`"],
    );
    assert_fails_saying(
        pull(at, &home, GATED, None),
        &[
            "is gated",
            "accept its licence",
            "HF_TOKEN",
            "no token is set",
        ],
    );
    assert_fails_saying(
        pull(at, &home, GATED, Some("hf_wrong")),
        &["is gated", "the token sent was refused"],
    );
    // A token the Hub no longer knows, on a public repository: about the
    // token, not a licence.
    assert_fails_saying(
        pull(at, &home, REPO, Some("hf_revoked")),
        &["refused the token in HF_TOKEN", "not expired", "unset it"],
    );
    assert_fails_saying(
        pull(&unreachable_endpoint(), &home, REPO, None),
        &["cannot reach the Hugging Face Hub", "HF_ENDPOINT"],
    );
    assert_fails_saying(pull(at, &home, BROKEN_SPLIT, None), &["lacks part 2 of 3"]);
    assert_fails_saying(
        pull(at, &home, NO_RANGES, None),
        &["refused bytes 0..1048576", "it sent the whole file instead"],
    );
    // The right token opens the gated repository; nothing else was fetched.
    let (ok, text) = pull(at, &home, GATED, Some(TOKEN));
    assert!(ok, "{text}");
    assert!(text.contains("fetched and verified"), "{text}");
}

type StderrLines = std::io::Lines<BufReader<std::process::ChildStderr>>;

/// Reads `child`'s stderr until a line contains `needle`; returns the lines
/// so far and the rest to come.
fn wait_for_line(child: &mut std::process::Child, needle: &str) -> (Vec<String>, StderrLines) {
    let stderr = child.stderr.take().expect("stderr piped");
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = Vec::new();
    while let Some(Ok(line)) = lines.next() {
        let hit = line.contains(needle);
        seen.push(line);
        if hit {
            return (seen, lines);
        }
    }
    panic!(
        "no line with {needle:?}; the process said:\n{}",
        seen.join("\n")
    );
}

#[tokio::test]
async fn a_pull_resumes_after_a_kill_and_lands_in_the_shared_cache() {
    let root = hub_root("hub-resume");
    // 16 MB/s: the 98 MB file takes six seconds, time to stop it midway.
    let server = HubServer::start(&root, 16_000_000);
    let home = empty_dir("hub-resume-home");
    let size = std::fs::metadata(model_file()).expect("model").len();
    let model = format!("{REPO}:q4_1"); // the quantization matches without case

    let mut first = ringlet(&server.endpoint, &home, None)
        .args(["pull", &model])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ringlet pull");
    wait_for_line(&mut first, "download 30%");
    first.kill().expect("kill the pull");
    let _ = first.wait();
    let sent_before = server.bytes_sent_to("ringlet/0.1.0").await;
    assert!(
        sent_before < size,
        "the first pull finished before the kill"
    );

    let (ok, text) = pull(&server.endpoint, &home, &model, None);
    assert!(ok, "{text}");
    // More than the header (which the second pull fetched again first)
    // was on disk: the first pull's ranges were kept.
    let on_disk: f64 = text
        .split(" MiB were on disk")
        .next()
        .and_then(|head| head.rsplit(", ").next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no figure of what was on disk in:\n{text}"));
    assert!(on_disk > 8.0, "only {on_disk} MiB were kept:\n{text}");
    let sent = server.bytes_sent_to("ringlet/0.1.0").await;
    // At most the ranges in flight at the kill (4 × 4 MiB) are fetched twice.
    assert!(
        sent <= size + (16 << 20) + (64 << 10),
        "{sent} bytes sent for a {size}-byte file"
    );

    // The file sits where huggingface_hub puts it: a blob named by its
    // SHA-256, linked from the commit's snapshot, and the ref names it.
    let (_, sha256) = sha256_file(&model_file()).expect("hash");
    let folder = home.join("hub/models--ringlet-test--SmolLM2-135M-Instruct-GGUF");
    let commit = std::fs::read_to_string(folder.join("refs/main")).expect("refs/main");
    let snapshot = folder.join("snapshots").join(commit.trim()).join(Q4_FILE);
    let link = std::fs::read_link(&snapshot).expect("the snapshot is a link");
    assert_eq!(link, Path::new("../../blobs").join(&sha256));
    assert_eq!(sha256_file(&snapshot).expect("hash").1, sha256);
    assert!(
        !folder
            .join(".ringlet")
            .join(format!("{sha256}.partial"))
            .exists(),
        "the partial file stayed behind"
    );

    // Pulled again: found in the cache, no model bytes sent.
    let (ok, text) = pull(&server.endpoint, &home, &model, None);
    assert!(ok && text.contains("is in the cache"), "{text}");
    let again = server.bytes_sent_to("ringlet/0.1.0").await;
    assert!(
        again - sent < 64 << 10,
        "{} bytes sent for a cached file",
        again - sent
    );
}

#[tokio::test]
async fn run_picks_the_quantization_asked_for() {
    let root = hub_root("hub-run");
    let server = HubServer::start(&root, 0);
    let home = empty_dir("hub-run-home");
    let answer = |model: &str| {
        let output = ringlet(&server.endpoint, &home, None)
            .args(["run", model, "--prompt", "What is the capital of France?"])
            .args(["--temperature", "0", "--max-tokens", "24", "--threads", "2"])
            .output()
            .expect("run ringlet run");
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(output.status.success(), "{model}: {stderr}");
        (String::from_utf8_lossy(&output.stdout).into_owned(), stderr)
    };
    let q8 = q8_model_file();
    let (from_hub, log) = answer(&format!("{REPO}:Q8_0"));
    assert!(
        log.contains(Q8_FILE),
        "the log names no chosen file:\n{log}"
    );
    let (from_file, _) = answer(q8.to_str().expect("utf-8 path"));
    assert_eq!(from_hub, from_file);
    assert!(!from_hub.trim().is_empty());
}

/// A fresh Hugging Face home for node `i` of the test `tag`.
fn hub_home(tag: &str, i: usize) -> String {
    empty_dir(&format!("{tag}-home-{i}"))
        .to_string_lossy()
        .into_owned()
}

/// An endpoint nothing listens on: a port bound, then let go.
fn unreachable_endpoint() -> String {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    format!("http://{}", closed.local_addr().expect("addr"))
}

/// Starts one cluster of nodes serving `model` with `extra` flags: node `i`
/// is `node-i`, reaches the Hub at `hubs[i].0` and keeps its Hugging Face
/// home in `hubs[i].1`, and every node after the first names the first
/// with `--peer`. Waits until each has activated a plan with all of them.
fn start_hub_nodes(model: &str, extra: &[&str], hubs: &[(&str, &str)]) -> Vec<Node> {
    let mut nodes: Vec<Node> = Vec::new();
    for (i, (endpoint, home)) in hubs.iter().enumerate() {
        let name = format!("node-{i}");
        let first = nodes.first().map(|n| n.addr.to_string());
        let mut flags = vec!["--model", model, "--name", &name];
        flags.extend(extra);
        if let Some(first) = &first {
            flags.extend(["--peer", first.as_str()]);
        }
        nodes.push(Node::start_with_env(
            &flags,
            &[
                ("HF_ENDPOINT", endpoint),
                ("HF_HOME", home),
                ("HF_TOKEN", ""),
            ],
        ));
    }
    let ready = format!("plan active: {} stages", hubs.len());
    for node in &mut nodes {
        node.wait_for_log(&ready, START_TIMEOUT);
    }
    nodes
}

/// What the node at `addr` answers to `question` asked of `model`.
async fn chat_at(addr: SocketAddr, model: &str, question: &str) -> Response {
    let body = chat_body_for(model, question, 24, false);
    request(addr, "POST", "/v1/chat/completions", Some(&body)).await
}

/// The text of a chat answer, which must have succeeded.
fn content_of(response: &Response) -> serde_json::Value {
    assert_eq!(response.status, 200, "{}", response.body);
    response.json()["choices"][0]["message"]["content"].clone()
}

/// What one node serving the file at `path` alone answers to `question`.
async fn answer_alone(path: &Path, question: &str) -> serde_json::Value {
    let node = Node::start_ready(&["--model", path.to_str().expect("utf-8 path")]);
    let name = path
        .file_stem()
        .expect("stem")
        .to_string_lossy()
        .into_owned();
    content_of(&chat_at(node.addr, &name, question).await)
}

/// The bytes of the tensors a shard of `layers` reads.
fn slice_bytes(file: &ModelFile, layers: LayerRange) -> u64 {
    file.shard_byte_ranges(layers)
        .expect("ranges")
        .iter()
        .flatten()
        .map(|r| r.end - r.start)
        .sum()
}

fn self_layers(view: &serde_json::Value) -> LayerRange {
    let me = view["nodes"]
        .as_array()
        .and_then(|nodes| nodes.iter().find(|n| n["status"] == "self"))
        .expect("the node itself in the view");
    serde_json::from_value(me["layers"].clone()).expect("layers")
}

#[tokio::test]
async fn three_nodes_fetch_only_their_slices_and_answer_as_one_node() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let root = hub_root("hub-three");
    // A fixed rate, so that the figures compare with whole-file downloads
    // (RINGLET_TEST_HUB_RATE, bytes per second, measures at another).
    let rate: u64 = std::env::var("RINGLET_TEST_HUB_RATE")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(40_000_000);
    let server = HubServer::start(&root, rate);
    let model = format!("{REPO}:Q4_1");
    let started = Instant::now();
    let homes: Vec<String> = (0..3).map(|i| hub_home("hub-three", i)).collect();
    let hubs: Vec<(&str, &str)> = homes
        .iter()
        .map(|h| (server.endpoint.as_str(), h.as_str()))
        .collect();
    let nodes = start_hub_nodes(&model, &["--memory-budget", "45MiB"], &hubs);
    let question = "Name three colours of the rainbow.";
    let ring = chat_at(nodes[1].addr, &model, question).await;
    let to_first_answer = started.elapsed();
    assert_eq!(ring.status, 200, "{}", ring.body);

    // Each node fetched from the Hub at most its slice and the header.
    let file = ModelFile::open(model_file()).expect("the default model");
    let size = std::fs::metadata(model_file()).expect("model").len();
    let mut total = 0;
    for (i, node) in nodes.iter().enumerate() {
        let view = get_json(node.addr, "/v1/cluster").await;
        let layers = self_layers(&view);
        let slice = slice_bytes(&file, layers);
        let fetched = server.bytes_sent_to(&format!("node/node-{i}")).await;
        eprintln!(
            "node-{i}: layers {layers}, slice {slice} bytes, fetched {fetched} bytes of a {size}-byte file"
        );
        // Less than its slice when a peer sent some of it (the tied
        // embedding is the first stage's and the last one's), never more
        // than its slice and the header.
        assert!(
            fetched <= slice + HEADER_ALLOWANCE,
            "node-{i} fetched {fetched} bytes for a {slice}-byte slice"
        );
        assert!(
            fetched < size * 6 / 10,
            "node-{i} fetched {fetched} of {size} bytes"
        );
        total += fetched;
    }
    eprintln!(
        "three empty caches to the first answer: {:.1} s; one whole file per node at {} MB/s would take {:.1} s to download alone",
        to_first_answer.as_secs_f64(),
        rate / 1_000_000,
        (3 * size) as f64 / rate as f64
    );
    // The tied embedding is both the first stage's input and the last
    // one's head, so the slices overlap by it: more than one file in all.
    eprintln!(
        "fetched in all: {total} bytes, {:.2} files",
        total as f64 / size as f64
    );

    // The answers are one node's with the whole file, bit for bit.
    drop(nodes);
    assert_eq!(
        content_of(&ring),
        answer_alone(&model_file(), question).await
    );
}

#[tokio::test]
async fn a_node_whose_hub_goes_away_says_so_and_keeps_serving() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let root = hub_root("hub-gone");
    // Slow enough that the slice cannot arrive before the server stops.
    let server = HubServer::start(&root, 2_000_000);
    let home = hub_home("hub-gone", 0);
    let model = format!("{REPO}:Q4_1");
    let mut node = Node::start_with_env(
        &["--model", &model],
        &[
            ("HF_ENDPOINT", server.endpoint.as_str()),
            ("HF_HOME", &home),
            ("HF_TOKEN", ""),
        ],
    );
    node.wait_for_log("loading layers for the new plan", START_TIMEOUT);
    // While it fetches, the cluster view says how far, of how much.
    let file = ModelFile::open(model_file()).expect("the default model");
    let slice = slice_bytes(&file, LayerRange::new(0, 30));
    wait_for_cluster(node.addr, REQUEST_TIMEOUT, |view| {
        view["nodes"][0]["models"].as_array().is_some_and(|models| {
            models.iter().any(|m| {
                m["name"] == model.as_str()
                    && m["state"] == "downloading"
                    && m["total_bytes"] == slice
                    && m["downloaded_bytes"]
                        .as_u64()
                        .is_some_and(|done| done > 0 && done < slice)
            })
        })
    })
    .await;
    drop(server);
    let line = node.wait_for_log("cannot load this node's layers", START_TIMEOUT);
    assert!(line.contains("cannot reach the Hugging Face Hub"), "{line}");
    // The node still answers, and says why it cannot serve: alive, not
    // ready, with the reason.
    assert_eq!(request(node.addr, "GET", "/livez", None).await.status, 200);
    let health = request(node.addr, "GET", "/healthz", None).await;
    assert!(node.is_running());
    assert_eq!(health.status, 503, "{}", health.body);
    assert!(health.json()["reason"].is_string(), "{}", health.body);
    let view = wait_for_cluster(node.addr, REQUEST_TIMEOUT, |view| {
        view["nodes"].as_array().is_some_and(|nodes| {
            nodes.iter().any(|n| {
                n["models"].as_array().is_some_and(|models| {
                    models
                        .iter()
                        .any(|m| m["name"] == model.as_str() && m["error"].is_string())
                })
            })
        })
    })
    .await;
    let chat = chat_at(node.addr, &model, "hi").await;
    assert_eq!(chat.status, 503, "{}", chat.body);
    assert!(
        chat.body.contains("cannot reach the Hugging Face Hub"),
        "the refusal says why: {}",
        chat.body
    );
    drop(view);
}

#[tokio::test]
async fn a_split_model_answers_as_the_single_file_locally_and_from_the_hub() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let question = "Why is the sea salty?";
    let expected = answer_alone(&model_file(), question).await;

    // Local: the first part names the model; the others are found beside it.
    let parts = split_parts();
    assert_eq!(answer_alone(&parts[0], question).await, expected);

    // From the Hub, on two nodes: each fetches its tensors from every part.
    let root = hub_root("hub-split");
    let server = HubServer::start(&root, 0);
    let model = format!("{SPLIT}:Q4_1");
    let homes: Vec<String> = (0..2).map(|i| hub_home("hub-split", i)).collect();
    let hubs: Vec<(&str, &str)> = homes
        .iter()
        .map(|h| (server.endpoint.as_str(), h.as_str()))
        .collect();
    let nodes = start_hub_nodes(&model, &["--memory-budget", "70MiB"], &hubs);
    assert_eq!(
        content_of(&chat_at(nodes[0].addr, &model, question).await),
        expected
    );
    let total: u64 = parts
        .iter()
        .map(|p| std::fs::metadata(p).expect("part").len())
        .sum();
    for i in 0..2 {
        let fetched = server.bytes_sent_to(&format!("node/node-{i}")).await;
        assert!(
            fetched < total * 8 / 10,
            "node-{i} fetched {fetched} of {total} bytes"
        );
    }
}

#[tokio::test]
async fn a_node_without_the_hub_gets_its_slice_from_peers_and_peers_come_first() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let root = hub_root("hub-peers");
    let server = HubServer::start(&root, 0);
    let model = format!("{REPO}:Q4_1");
    // node-0 has the whole file (pulled before); node-1 starts empty with
    // the Hub in reach; node-2 starts empty with no route to the Hub.
    let homes: Vec<String> = (0..3).map(|i| hub_home("hub-peers", i)).collect();
    let (ok, text) = pull(&server.endpoint, Path::new(&homes[0]), &model, None);
    assert!(ok, "{text}");
    let no_hub = unreachable_endpoint();
    let hubs = [
        (server.endpoint.as_str(), homes[0].as_str()),
        (server.endpoint.as_str(), homes[1].as_str()),
        (no_hub.as_str(), homes[2].as_str()),
    ];
    let mut nodes = start_hub_nodes(&model, &["--memory-budget", "45MiB"], &hubs);
    let lan_only = &mut nodes[2];
    lan_only.wait_for_log("fetching the model from peers", START_TIMEOUT);
    lan_only.wait_for_log("fetched ranges from peer", START_TIMEOUT);
    // ...and says, range by range, where each came from.
    let line = lan_only.wait_for_log("range fetched from peer", START_TIMEOUT);
    assert!(line.contains("start=") && line.contains("end="), "{line}");
    // node-1 could reach the Hub, yet took its header and slice from node-0:
    // the Hub sent it only the repository listing and the file's HEAD.
    let node_1_from_hub = server.bytes_sent_to("node/node-1").await;
    assert!(
        node_1_from_hub < 64 << 10,
        "node-1 fetched {node_1_from_hub} bytes from the Hub"
    );
    nodes[1].wait_for_log("fetched ranges from peer", START_TIMEOUT);
    // Peers proved the cluster secret for those files; a stranger learns
    // neither the model nor its bytes.
    for path in ["/v1/ring/model", "/v1/ring/files/x/held"] {
        let stranger = request(nodes[0].addr, "GET", path, None).await;
        assert_eq!(stranger.status, 403, "{path}: {}", stranger.body);
        assert_eq!(stranger.json()["error"]["code"], "not_a_cluster_node");
    }

    let question = "What is two plus two?";
    let ring = content_of(&chat_at(nodes[2].addr, &model, question).await);
    drop(nodes);
    assert_eq!(ring, answer_alone(&model_file(), question).await);
}

#[tokio::test]
async fn a_file_that_changes_midway_is_refused() {
    let root = hub_root("hub-changed");
    let server = HubServer::start(&root, 16_000_000);
    let home = empty_dir("hub-changed-home");
    let mut pull = ringlet(&server.endpoint, &home, None)
        .args(["pull", &format!("{REPO}:Q4_1")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ringlet pull");
    let (mut seen, rest) = wait_for_line(&mut pull, "download 10%");
    // The repository's file is replaced by another under the same name, in
    // one rename: the server never lacks the file, so what the node sees is a
    // different file, not a missing one.
    let file = root.join(REPO).join(Q4_FILE);
    let replacement = file.with_extension("replacement");
    std::os::unix::fs::symlink(q8_model_file(), &replacement).expect("link");
    std::fs::rename(&replacement, &file).expect("replace");
    seen.extend(rest.map_while(Result::ok));
    let status = pull.wait().expect("wait");
    let log = seen.join("\n");
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("changed on the Hub while this node fetched it"),
        "{log}"
    );
}

#[tokio::test]
async fn a_full_disk_is_refused_before_fetching() {
    // A 48 MiB file system for the cache: the 94 MiB model cannot fit.
    let home = empty_dir("hub-full-home");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=48m", "tmpfs"])
        .arg(&home)
        .status()
        .expect("run mount");
    assert!(
        mounted.success(),
        "mounting a tmpfs needs root, as the netns tests do"
    );
    let root = hub_root("hub-full");
    let server = HubServer::start(&root, 0);
    let result = pull(&server.endpoint, &home, &format!("{REPO}:Q4_1"), None);
    let _ = Command::new("umount").arg(&home).status();
    assert_fails_saying(
        result,
        &[
            "MiB free, but this node's part of",
            "needs",
            "free some disk space",
        ],
    );
    let sent = server.bytes_sent_to("ringlet/0.1.0").await;
    // Only the header was read.
    assert!(
        sent < HEADER_ALLOWANCE,
        "{sent} bytes were fetched for a file that cannot fit"
    );
}

#[tokio::test]
async fn an_admin_switches_the_cluster_to_another_model_without_restarts() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let root = hub_root("hub-switch");
    let server = HubServer::start(&root, 0);
    let (q4, q8) = (format!("{REPO}:Q4_1"), format!("{REPO}:Q8_0"));
    let homes: Vec<String> = (0..2).map(|i| hub_home("hub-switch", i)).collect();
    let hubs: Vec<(&str, &str)> = homes
        .iter()
        .map(|h| (server.endpoint.as_str(), h.as_str()))
        .collect();
    let extra = ["--memory-budget", "100MiB", "--admin-token", "s3cret"];
    let mut nodes = start_hub_nodes(&q4, &extra, &hubs);
    let switch = |addr, token: &str, model: &str| {
        let body = serde_json::json!({ "model": model }).to_string();
        let token = format!("Bearer {token}");
        async move {
            request_raw(
                addr,
                "POST",
                "/v1/cluster/models",
                &[
                    ("authorization", token.as_str()),
                    ("content-type", "application/json"),
                ],
                Some(body.as_bytes()),
            )
            .await
        }
    };
    let refused = switch(nodes[0].addr, "wrong", &q8).await;
    assert_eq!(refused.status, 401, "{}", refused.body);

    // A model no node can open: each says why, and the old one still serves.
    let missing = "ringlet-test/missing-GGUF";
    let started = switch(nodes[0].addr, "s3cret", missing).await;
    assert_eq!(started.status, 202, "{}", started.body);
    wait_for_cluster(nodes[1].addr, REQUEST_TIMEOUT, |view| {
        view["nodes"].as_array().is_some_and(|nodes| {
            nodes
                .iter()
                .filter(|n| {
                    n["models"].as_array().is_some_and(|models| {
                        models.iter().any(|m| {
                            m["name"] == missing
                                && m["error"]
                                    .as_str()
                                    .is_some_and(|e| e.contains("has no repository"))
                        })
                    })
                })
                .count()
                == 2
        })
    })
    .await;
    let question = "What colour is the sky?";
    let old = chat_at(nodes[1].addr, &q4, question).await;
    assert_eq!(old.status, 200, "{}", old.body);

    // The switch: both nodes serve the Q8_0 file, re-planned, no restart.
    let marks: Vec<usize> = nodes.iter_mut().map(Node::log_mark).collect();
    let started = switch(nodes[1].addr, "s3cret", &q8).await;
    assert_eq!(started.status, 202, "{}", started.body);
    assert_eq!(
        started.json()["nodes"],
        serde_json::json!(["node-1", "node-0"])
    );
    for (node, mark) in nodes.iter_mut().zip(marks) {
        node.wait_for_log_since(mark, "now serving another model", START_TIMEOUT);
        node.wait_for_log_since(mark, "plan active: 2 stages", START_TIMEOUT);
    }
    let listed = get_json(nodes[0].addr, "/v1/models").await;
    assert_eq!(listed["data"][0]["id"], q8.as_str(), "{listed}");
    let ring = chat_at(nodes[0].addr, &q8, question).await;
    assert_eq!(ring.status, 200, "{}", ring.body);
    let stale = chat_at(nodes[0].addr, &q4, question).await;
    assert_eq!(stale.status, 404, "{}", stale.body);
    assert!(nodes.iter_mut().all(Node::is_running));

    drop(nodes);
    assert_eq!(
        content_of(&ring),
        answer_alone(&q8_model_file(), question).await
    );
}
