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
}

pub fn ringlet_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ringlet"))
}

impl Node {
    /// Starts `ringlet serve` on a free loopback port with `extra` flags and
    /// waits until it says it is listening.
    pub fn start(extra: &[&str]) -> Node {
        let mut child = Command::new(ringlet_binary())
            .args(["serve", "--listen", "127.0.0.1:0", "--threads", "2"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ringlet");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, log) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut node = Node {
            addr: "127.0.0.1:1".parse().expect("addr"),
            child,
            log,
            log_seen: Vec::new(),
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
        if let Some(line) = self.log_seen.iter().find(|l| l.contains(needle)) {
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

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
}

/// One HTTP/1.0 request; the server closes the connection after the
/// response, so the body is everything until EOF (no chunked decoding).
pub async fn request(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> Response {
    let raw = match body {
        Some(body) => format!(
            "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
        None => format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n"),
    };
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(raw.as_bytes()).await.expect("send");
        let mut bytes = Vec::new();
        stream.read_to_end(&mut bytes).await.expect("read");
        parse_response(&bytes)
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .expect("response within the timeout")
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
pub fn chat_body(user: &str, max_tokens: u32, stream: bool) -> String {
    serde_json::json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": user}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    })
    .to_string()
}

/// `GET path` as JSON.
pub async fn get_json(addr: SocketAddr, path: &str) -> serde_json::Value {
    let response = request(addr, "GET", path, None).await;
    assert_eq!(response.status, 200, "GET {path}: {}", response.body);
    response.json()
}
