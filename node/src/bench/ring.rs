//! `ringlet bench ring`: rings of real `ringlet` processes on loopback,
//! driven through the HTTP API as a client would.
//!
//! All rings run at once so that rounds can alternate between them (these
//! machines are shared and noisy); the table reports medians. Greedy
//! decoding gives every ring size the same text, so they do the same work.
//!
//! Links are encrypted, as in a real cluster. The largest ring runs a
//! second time with frames in plaintext (`--insecure-plaintext-links`), so
//! one run says what encryption costs, and with `--webrtc` a third time
//! with WebRTC data channels between its nodes (`--link webrtc`; a relay
//! node too small for any layer signals for them), so one run says what
//! WebRTC costs against TCP. `--prefill-tokens` times one long prompt on
//! each ring and reads the activation throughput its links measured.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::cli::RingBenchArgs;
use crate::limits::{BENCH_REQUEST_TIMEOUT_SECS, BENCH_RING_START_TIMEOUT_SECS};

/// The user message: long enough for a real prefill, and a request the
/// default model answers at length.
const PROMPT: &str = "Write a long, detailed essay about the history of computing. Begin with the mechanical \
calculators of Pascal and Leibniz, continue with Babbage's engines and Ada Lovelace's notes, describe the \
electronic machines of the 1940s, the invention of the transistor and the integrated circuit, the rise of \
personal computers, and end with today's networks of machines that share their work.";

/// `node/bench/llama_cpp_batched.py`, run with the user's Python.
const LLAMA_CPP_BATCHED: &str = include_str!("../../bench/llama_cpp_batched.py");

const START_TIMEOUT: Duration = Duration::from_secs(BENCH_RING_START_TIMEOUT_SECS);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(BENCH_REQUEST_TIMEOUT_SECS);

/// One streamed request as the client saw it.
#[derive(Debug, Clone, Serialize)]
pub struct StreamTiming {
    pub prompt_tokens: u64,
    pub ttft_s: f64,
    pub decode_tok_s: f64,
    pub completion_tokens: usize,
    pub total_s: f64,
    /// Seconds between consecutive pieces of text (inter-token latency).
    #[serde(skip)]
    pub gaps_s: Vec<f64>,
    /// When the first and the last text came.
    #[serde(skip)]
    pub first_at: Option<Instant>,
    #[serde(skip)]
    pub last_at: Option<Instant>,
}

#[derive(Debug, Serialize)]
struct SizeReport {
    nodes: usize,
    /// Frames encrypted on the links (false: the plaintext comparison).
    encrypted: bool,
    /// `tcp` or `webrtc` between the ring's nodes.
    transport: &'static str,
    /// The long prompt's time to first token, if `--prefill-tokens`.
    prefill: Option<PrefillReport>,
    hops: HopReport,
    rounds: Vec<StreamTiming>,
    median_decode_tok_s: f64,
    median_ttft_s: f64,
}

impl SizeReport {
    /// What carries the ring's links, as the tables say it.
    fn label(&self) -> &'static str {
        match (self.nodes, self.encrypted, self.transport) {
            (1, _, _) => "none",
            (_, _, "webrtc") => "webrtc",
            (_, true, _) => "encrypted",
            (_, false, _) => "plaintext",
        }
    }
}

/// One long prompt through a ring.
#[derive(Debug, Clone, Serialize)]
struct PrefillReport {
    prompt_tokens: u64,
    ttft_s: f64,
    /// What the ring's links measured on the activation frames, bytes/s.
    link_bytes_per_second: Vec<u64>,
}

#[derive(Debug, Serialize)]
struct ConcurrencyReport {
    nodes: usize,
    streams: usize,
    /// Completion tokens of all streams over the wall time of the batch
    /// (their prefill included).
    aggregate_tok_s: Vec<f64>,
    median_aggregate_tok_s: f64,
    /// The tokens after each stream's first, over the time from the last
    /// first token to the last token (decode alone).
    median_decode_aggregate_tok_s: f64,
    /// One stream's gaps between tokens while the others run (every
    /// round's first stream), median and 99th percentile.
    itl_median_ms: f64,
    itl_p99_ms: f64,
    /// Each node's stage busy share of the rounds' wall time.
    stage_busy: Vec<f64>,
    /// llama.cpp's batched decoding of as many copies of the same prompt
    /// (`--llama-cpp`), alternated with ringlet's rounds.
    llama_cpp: Option<LlamaBatchedReport>,
}

/// llama.cpp's batched rounds for one stream count.
#[derive(Debug, Serialize)]
struct LlamaBatchedReport {
    median_aggregate_tok_s: f64,
    median_decode_aggregate_tok_s: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    model: String,
    threads_per_node: usize,
    decode_tokens: usize,
    sizes: Vec<SizeReport>,
    concurrency: Vec<ConcurrencyReport>,
    /// Handshake (Noise and Hello) times of the links, as the nodes logged.
    handshake_micros: Vec<u64>,
    /// WebRTC links' ICE and DTLS times (to the open data channel), ms.
    webrtc_handshake_ms: Vec<u64>,
}

/// The benchmark's nodes' config directories, removed at the end.
pub(super) struct Scratch(pub std::path::PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One ring to start: its size, whether frames are encrypted, and
/// whether its nodes link over WebRTC.
#[derive(Debug, Clone, Copy)]
struct RingKind {
    nodes: usize,
    encrypted: bool,
    webrtc: bool,
}

impl RingKind {
    fn label(self) -> &'static str {
        match (self.nodes, self.encrypted, self.webrtc) {
            (1, _, _) => "none",
            (_, _, true) => "webrtc",
            (_, true, false) => "encrypted",
            (_, false, false) => "plaintext",
        }
    }
}

/// A node process started for the benchmark; killed when dropped.
pub(super) struct BenchNode {
    pub addr: SocketAddr,
    pub child: Child,
}

pub async fn bench(args: RingBenchArgs) -> anyhow::Result<()> {
    if args.rounds == 0
        || args.decode_tokens == 0
        || args.nodes.is_empty()
        || args.nodes.contains(&0)
    {
        bail!("--rounds, --decode-tokens and every --nodes size must be at least 1");
    }
    let store = args.cache.store();
    // Fetched once here; the nodes find it in the same cache and resolve
    // the same name.
    let model = store.resolve_or_fetch(&args.model).await?;
    let mut sizes = args.nodes.clone();
    sizes.sort_unstable();
    sizes.dedup();
    let largest_size = sizes.last().copied().unwrap_or(1);
    let mut kinds: Vec<RingKind> = sizes
        .iter()
        .map(|&nodes| RingKind {
            nodes,
            encrypted: true,
            webrtc: false,
        })
        .collect();
    if largest_size > 1 {
        kinds.push(RingKind {
            nodes: largest_size,
            encrypted: false,
            webrtc: false,
        });
        if args.webrtc {
            kinds.push(RingKind {
                nodes: largest_size,
                encrypted: true,
                webrtc: true,
            });
        }
    }
    eprintln!(
        "ringlet bench ring: starting rings of {sizes:?} nodes ({} threads each), and one of {largest_size} with plaintext links",
        args.threads
    );
    // Every node gets a config directory of its own, all with one
    // cluster's secret.
    let scratch =
        Scratch(std::env::temp_dir().join(format!("ringlet-bench-ring-{}", std::process::id())));
    let token = crate::identity::JoinToken(crate::identity::ClusterSecret::random()).to_string();
    let mut rings = Vec::new();
    let mut relays = Vec::new();
    let mut handshake_micros = Vec::new();
    let mut webrtc_handshake_ms = Vec::new();
    for (ring, &kind) in kinds.iter().enumerate() {
        let started = start_ring(ring, kind, args.threads, &args, &scratch.0, &token).await?;
        handshake_micros.extend(started.handshake_micros);
        webrtc_handshake_ms.extend(started.webrtc_handshake_ms);
        rings.push(started.nodes);
        relays.extend(started.relay);
        eprintln!("  ring of {} ready ({} links)", kind.nodes, kind.label());
    }

    let mut prefills: Vec<Option<PrefillReport>> = vec![None; kinds.len()];
    if args.prefill_tokens > 0 {
        let body = long_prompt_body(&model.name, args.prefill_tokens);
        for (i, ring) in rings.iter().enumerate() {
            let timing = stream(ring[0].addr, &body).await?;
            let view = get_json(ring[0].addr, "/v1/cluster").await?;
            let transport = if kinds[i].webrtc { "webrtc" } else { "tcp" };
            let link_bytes_per_second: Vec<u64> = view["links"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|l| l["transport"] == transport)
                .filter_map(|l| l["bandwidth_bytes_per_second"].as_u64())
                .collect();
            let report = PrefillReport {
                prompt_tokens: timing.prompt_tokens,
                ttft_s: timing.ttft_s,
                link_bytes_per_second,
            };
            eprintln!(
                "  {}-token prompt on {} nodes ({} links): first token after {:.0} ms",
                report.prompt_tokens,
                kinds[i].nodes,
                kinds[i].label(),
                report.ttft_s * 1000.0
            );
            prefills[i] = Some(report);
        }
    }

    let body = request_body(&model.name, args.decode_tokens);
    let mut per_size: Vec<Vec<StreamTiming>> = vec![Vec::new(); kinds.len()];
    for round in 1..=args.rounds {
        for (i, ring) in rings.iter().enumerate() {
            let timing = stream(ring[0].addr, &body).await?;
            eprintln!(
                "  round {round}/{}: {} nodes ({} links): decode {:6.1} tok/s, first token after {:4.0} ms",
                args.rounds,
                kinds[i].nodes,
                kinds[i].label(),
                timing.decode_tok_s,
                timing.ttft_s * 1000.0
            );
            per_size[i].push(timing);
        }
    }

    let mut hops = Vec::new();
    for ring in &rings {
        hops.push(hop_figures(ring).await?);
    }

    let largest = rings.get(sizes.len() - 1).context("no ring")?;
    let llama = match args.llama_cpp.as_str() {
        "off" => None,
        python => {
            LlamaBatched::find(
                python,
                &model.path,
                args.threads,
                &body_prompt_ids(&model.path)?,
            )
            .await
        }
    };
    // Rounds go through every stream count in turn, so that a slow spell
    // of a shared host falls on all of them alike, not on one.
    let mut tallies: Vec<ConcurrencyTally> = args
        .streams
        .iter()
        .map(|_| ConcurrencyTally::default())
        .collect();
    for round in 1..=args.rounds {
        for (&streams, tally) in args.streams.iter().zip(&mut tallies) {
            let busy_before = stage_busy_seconds(largest).await?;
            let started = Instant::now();
            let batch = (0..streams).map(|i| stream(largest[i % largest.len()].addr, &body));
            let timings = futures_util::future::try_join_all(batch).await?;
            let elapsed = started.elapsed().as_secs_f64();
            let busy_after = stage_busy_seconds(largest).await?;
            tally.wall += elapsed;
            tally.busy.resize(busy_after.len(), 0.0);
            for ((busy, before), after) in tally.busy.iter_mut().zip(&busy_before).zip(&busy_after)
            {
                *busy += after - before;
            }
            let tokens: usize = timings.iter().map(|t| t.completion_tokens).sum();
            let rate = tokens as f64 / elapsed;
            let decode_rate = decode_aggregate(&timings);
            tally.gaps.extend(
                timings
                    .first()
                    .map(|t| t.gaps_s.clone())
                    .unwrap_or_default(),
            );
            eprintln!(
                "  round {round}/{}: {streams} streams on {} nodes: {rate:6.1} tok/s together ({decode_rate:6.1} decoding)",
                args.rounds,
                largest.len()
            );
            tally.rates.push(rate);
            tally.decode_rates.push(decode_rate);
            if let Some(llama) = &llama {
                let (aggregate, decode) = llama.round(streams, args.decode_tokens).await?;
                eprintln!(
                    "  round {round}/{}: llama.cpp batched, {streams} sequences: {aggregate:6.1} tok/s together ({decode:6.1} decoding)",
                    args.rounds
                );
                tally.llama_rates.push((aggregate, decode));
            }
        }
    }
    let concurrency: Vec<ConcurrencyReport> = args
        .streams
        .iter()
        .zip(tallies)
        .map(|(&streams, tally)| ConcurrencyReport {
            nodes: largest.len(),
            streams,
            median_aggregate_tok_s: median(&tally.rates),
            median_decode_aggregate_tok_s: median(&tally.decode_rates),
            aggregate_tok_s: tally.rates,
            itl_median_ms: percentile(&tally.gaps, 0.5) * 1e3,
            itl_p99_ms: percentile(&tally.gaps, 0.99) * 1e3,
            stage_busy: tally
                .busy
                .iter()
                .map(|busy| busy / tally.wall.max(f64::MIN_POSITIVE))
                .collect(),
            llama_cpp: (!tally.llama_rates.is_empty()).then(|| LlamaBatchedReport {
                median_aggregate_tok_s: median(
                    &tally.llama_rates.iter().map(|r| r.0).collect::<Vec<_>>(),
                ),
                median_decode_aggregate_tok_s: median(
                    &tally.llama_rates.iter().map(|r| r.1).collect::<Vec<_>>(),
                ),
            }),
        })
        .collect();

    let report = Report {
        model: model.name,
        threads_per_node: args.threads,
        decode_tokens: args.decode_tokens,
        sizes: kinds
            .iter()
            .zip(per_size)
            .zip(prefills)
            .zip(hops)
            .map(|(((kind, rounds), prefill), hops)| SizeReport {
                hops,
                nodes: kind.nodes,
                encrypted: kind.encrypted,
                transport: if kind.webrtc { "webrtc" } else { "tcp" },
                prefill,
                median_decode_tok_s: median(
                    &rounds.iter().map(|t| t.decode_tok_s).collect::<Vec<_>>(),
                ),
                median_ttft_s: median(&rounds.iter().map(|t| t.ttft_s).collect::<Vec<_>>()),
                rounds,
            })
            .collect(),
        concurrency,
        handshake_micros,
        webrtc_handshake_ms,
    };
    drop(relays);
    print_tables(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("results written to {}", path.display());
    }
    Ok(())
}

pub(super) fn request_body(model: &str, decode_tokens: usize) -> String {
    serde_json::json!({
        "model": model,
        "messages": [{ "role": "user", "content": PROMPT }],
        "temperature": 0,
        "max_tokens": decode_tokens,
        "stream": true,
        "stream_options": { "include_usage": true },
    })
    .to_string()
}

/// A started ring, and how long its links' handshakes took.
struct StartedRing {
    nodes: Vec<BenchNode>,
    /// The node that signals for a WebRTC ring (it holds no layers).
    relay: Option<BenchNode>,
    handshake_micros: Vec<u64>,
    webrtc_handshake_ms: Vec<u64>,
}

/// Starts `kind.nodes` nodes joined into one ring and waits until each has
/// activated the plan with all of them.
async fn start_ring(
    ring: usize,
    kind: RingKind,
    threads: usize,
    args: &RingBenchArgs,
    scratch: &std::path::Path,
    token: &str,
) -> anyhow::Result<StartedRing> {
    let n = kind.nodes;
    let ready = format!("plan active: {n} stages");
    let mut nodes = Vec::new();
    let mut first: Option<SocketAddr> = None;
    let mut logs = Vec::new();
    let plaintext = ["--insecure-plaintext-links".to_string()];
    let webrtc = ["--link".to_string(), "webrtc".to_string()];
    let mut relay = None;
    if kind.webrtc {
        // Every node of the ring joins the relay; it is too small for a
        // layer, so the ring's links are all between nodes that learned
        // of each other through it: WebRTC.
        let small = ["--memory-budget".to_string(), "1MiB".to_string()];
        let spec = NodeSpec {
            name: format!("bench-{ring}-relay"),
            model: &args.model,
            threads,
            cache: &args.cache,
            config_dir: scratch.join(format!("ring{ring}-relay")),
            token,
            peer: None,
            extra: &small,
        };
        let (node, log) = start_node(spec).await?;
        first = Some(node.addr);
        relay = Some(node);
        drain(log);
    }
    for i in 0..n {
        let spec = NodeSpec {
            name: format!("bench-{ring}-{i}"),
            model: &args.model,
            threads,
            cache: &args.cache,
            config_dir: scratch.join(format!("ring{ring}-node{i}")),
            token,
            peer: first,
            extra: match (kind.encrypted, kind.webrtc) {
                (_, true) => &webrtc,
                (true, false) => &[],
                (false, false) => &plaintext,
            },
        };
        let (node, log) = start_node(spec).await?;
        first.get_or_insert(node.addr);
        nodes.push(node);
        logs.push(log);
    }
    let mut handshake_micros = Vec::new();
    let mut webrtc_handshake_ms = Vec::new();
    for rx in &mut logs {
        let (before, _) = wait_for_collecting(rx, &ready).await?;
        handshake_micros.extend(before.iter().filter_map(|line| handshake_time(line)));
        webrtc_handshake_ms.extend(before.iter().filter_map(|line| webrtc_handshake_time(line)));
    }
    // Keep draining the logs so the nodes never block on a full pipe.
    for rx in logs {
        drain(rx);
    }
    Ok(StartedRing {
        nodes,
        relay,
        handshake_micros,
        webrtc_handshake_ms,
    })
}

/// How to start one benchmark node.
pub(super) struct NodeSpec<'a> {
    pub name: String,
    pub model: &'a str,
    pub threads: usize,
    pub cache: &'a crate::cli::CacheArgs,
    pub config_dir: std::path::PathBuf,
    /// The join token every node of the benchmark shares.
    pub token: &'a str,
    pub peer: Option<SocketAddr>,
    pub extra: &'a [String],
}

/// Starts a node and waits until it listens; returns it and its log lines
/// (which the caller must keep reading, or drain, so that it never blocks
/// on a full pipe).
pub(super) async fn start_node(
    spec: NodeSpec<'_>,
) -> anyhow::Result<(BenchNode, mpsc::Receiver<String>)> {
    let exe = std::env::current_exe().context("cannot find the ringlet binary")?;
    let mut command = Command::new(&exe);
    command
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--threads",
            &spec.threads.to_string(),
            "--model",
            spec.model,
        ])
        .args(["--name", &spec.name])
        .arg("--config-dir")
        .arg(&spec.config_dir)
        .args(spec.extra)
        .env("RINGLET_JOIN", spec.token)
        // Info for the readiness lines, debug for the handshake times.
        .env("RUST_LOG", "info,ringlet_node::cluster::link=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(dir) = &spec.cache.models_dir {
        command.arg("--models-dir").arg(dir);
    }
    if let Some(peer) = spec.peer {
        command.args(["--peer", &peer.to_string()]);
    }
    let mut child = command.spawn().context("cannot start a node")?;
    let stderr = child.stderr.take().context("no stderr")?;
    let (tx, mut rx) = mpsc::channel::<String>(1024);
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if tx.send(line).await.is_err() {
                break;
            }
        }
    });
    let line = wait_for(&mut rx, "listening on http://").await?;
    let addr: SocketAddr = line
        .split("listening on http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .context("no address in the node's log")?
        .parse()?;
    Ok((BenchNode { addr, child }, rx))
}

/// Reads a node's log lines to the end, dropping them.
pub(super) fn drain(mut log: mpsc::Receiver<String>) {
    tokio::spawn(async move { while log.recv().await.is_some() {} });
}

/// The `micros` of a "link handshake done" debug line.
fn handshake_time(line: &str) -> Option<u64> {
    if !line.contains("link handshake done") {
        return None;
    }
    line.split("micros=")
        .nth(1)?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// The `handshake_ms` of a "WebRTC data channel open" line.
fn webrtc_handshake_time(line: &str) -> Option<u64> {
    if !line.contains("WebRTC data channel open") {
        return None;
    }
    line.split("handshake_ms=")
        .nth(1)?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// A chat whose prompt is about `tokens` tokens long, answered with one.
pub(super) fn long_prompt_body(model: &str, tokens: usize) -> String {
    // " ring" is one token in the default model's vocabulary.
    let content = format!(
        "Repeat the last word.{}",
        " ring".repeat(tokens.saturating_sub(40))
    );
    serde_json::json!({
        "model": model,
        "messages": [{ "role": "user", "content": content }],
        "temperature": 0,
        "max_tokens": 2,
        "stream": true,
        "stream_options": { "include_usage": true },
    })
    .to_string()
}

/// GETs `path` from a node and parses its JSON body.
pub(super) async fn get_json(addr: SocketAddr, path: &str) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_str(&get_text(addr, path).await?)?)
}

/// The body of `GET path`.
async fn get_text(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut socket = TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    socket.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tokio::time::timeout(REQUEST_TIMEOUT, socket.read_to_end(&mut response))
        .await
        .context("the request timed out")??;
    let response = String::from_utf8_lossy(&response);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body)
        .context("no body in the response")?;
    Ok(body.to_string())
}

/// A ring's decode hops, as its nodes measured them from the timestamps
/// in the frames (`ringlet_hop_seconds` in their metrics).
#[derive(Debug, Clone, Default, Serialize)]
struct HopReport {
    /// Into a stage: from the previous stage's hidden states (or the
    /// owner's step) to the stage's start.
    into_stage_hops: u64,
    into_stage_mean_ms: f64,
    /// From the last stage's token to its owner's node.
    to_owner_hops: u64,
    to_owner_mean_ms: f64,
}

async fn hop_figures(ring: &[BenchNode]) -> anyhow::Result<HopReport> {
    let (mut sums, mut counts) = ([0.0f64; 2], [0u64; 2]);
    for node in ring {
        let text = get_text(node.addr, "/metrics").await?;
        for (k, kind) in ["into_stage", "to_owner"].iter().enumerate() {
            let read = |name: &str| {
                let prefix = format!("ringlet_hop_seconds_{name}{{kind=\"{kind}\"}} ");
                text.lines()
                    .find_map(|l| l.strip_prefix(&prefix))
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            sums[k] += read("sum");
            counts[k] += read("count") as u64;
        }
    }
    let mean_ms = |k: usize| sums[k] * 1e3 / counts[k].max(1) as f64;
    Ok(HopReport {
        into_stage_hops: counts[0],
        into_stage_mean_ms: mean_ms(0),
        to_owner_hops: counts[1],
        to_owner_mean_ms: mean_ms(1),
    })
}

/// Waits for a log line containing `needle`; returns the lines before it
/// and the line.
pub(super) async fn wait_for_collecting(
    lines: &mut mpsc::Receiver<String>,
    needle: &str,
) -> anyhow::Result<(Vec<String>, String)> {
    let found = tokio::time::timeout(START_TIMEOUT, async {
        let mut before = Vec::new();
        while let Some(line) = lines.recv().await {
            if line.contains(needle) {
                return Some((before, line));
            }
            before.push(line);
        }
        None
    })
    .await
    .with_context(|| {
        format!(
            "a node did not log {needle:?} within {} s",
            START_TIMEOUT.as_secs()
        )
    })?;
    found.with_context(|| format!("a node exited before logging {needle:?}"))
}

pub(super) async fn wait_for(
    lines: &mut mpsc::Receiver<String>,
    needle: &str,
) -> anyhow::Result<String> {
    wait_for_collecting(lines, needle)
        .await
        .map(|(_, line)| line)
}

/// One streamed chat completion over HTTP/1.0, timed at the client.
pub(super) async fn stream(addr: SocketAddr, body: &str) -> anyhow::Result<StreamTiming> {
    tokio::time::timeout(REQUEST_TIMEOUT, stream_inner(addr, body))
        .await
        .context("the request timed out")?
}

async fn stream_inner(addr: SocketAddr, body: &str) -> anyhow::Result<StreamTiming> {
    let started = Instant::now();
    let mut socket = send_chat(addr, body).await?;
    let (mut first, mut last, mut tokens, mut prompt_tokens) = (None, None::<Instant>, None, 0);
    let mut gaps_s = Vec::new();
    read_chunks(&mut socket, |chunk| {
        if chunk["choices"][0]["delta"]["content"]
            .as_str()
            .is_some_and(|c| !c.is_empty())
        {
            let now = Instant::now();
            first.get_or_insert(now);
            if let Some(last) = last {
                gaps_s.push((now - last).as_secs_f64());
            }
            last = Some(now);
        }
        if let Some(n) = chunk["usage"]["completion_tokens"].as_u64() {
            tokens = Some(n as usize);
        }
        if let Some(n) = chunk["usage"]["prompt_tokens"].as_u64() {
            prompt_tokens = n;
        }
        true
    })
    .await?;
    let (Some(first), Some(last), Some(tokens)) = (first, last, tokens) else {
        bail!("the stream ended without text and usage");
    };
    Ok(StreamTiming {
        prompt_tokens,
        ttft_s: (first - started).as_secs_f64(),
        decode_tok_s: crate::engine::decode_rate(tokens, (last - first).as_secs_f64()),
        completion_tokens: tokens,
        total_s: started.elapsed().as_secs_f64(),
        gaps_s,
        first_at: Some(first),
        last_at: Some(last),
    })
}

/// Concurrent streams' decode rate: the tokens after each one's first,
/// over the time from the last first token to the last token.
fn decode_aggregate(timings: &[StreamTiming]) -> f64 {
    let all_started = timings.iter().filter_map(|t| t.first_at).max();
    let all_done = timings.iter().filter_map(|t| t.last_at).max();
    let tokens: usize = timings
        .iter()
        .map(|t| t.completion_tokens.saturating_sub(1))
        .sum();
    match (all_started, all_done) {
        (Some(start), Some(end)) if end > start => tokens as f64 / (end - start).as_secs_f64(),
        _ => 0.0,
    }
}

/// Each node's `ringlet_stage_busy_seconds_total`.
async fn stage_busy_seconds(ring: &[BenchNode]) -> anyhow::Result<Vec<f64>> {
    let mut busy = Vec::new();
    for node in ring {
        let text = get_text(node.addr, "/metrics").await?;
        busy.push(
            text.lines()
                .find_map(|l| l.strip_prefix("ringlet_stage_busy_seconds_total "))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0),
        );
    }
    Ok(busy)
}

/// The token ids of the benchmark's prompt, as a node renders it.
fn body_prompt_ids(model: &std::path::Path) -> anyhow::Result<Vec<u32>> {
    let file = kernels::ModelFile::open(model)?;
    let tokenizer = std::sync::Arc::new(file.tokenizer()?);
    let template = file.chat_template(&tokenizer)?;
    let prompt =
        crate::prompt::PromptBuilder::new(tokenizer, template, file.config().context_length);
    Ok(prompt.tokens(&[kernels::ChatMessage::new("user", PROMPT)])?)
}

/// What the rounds of one stream count gathered.
#[derive(Default)]
struct ConcurrencyTally {
    rates: Vec<f64>,
    decode_rates: Vec<f64>,
    /// The first stream's gaps between tokens, every round.
    gaps: Vec<f64>,
    llama_rates: Vec<(f64, f64)>,
    /// Each stage's busy seconds over the rounds.
    busy: Vec<f64>,
    /// The rounds' wall seconds.
    wall: f64,
}

/// llama.cpp's batched decoding through llama-cpp-python's low-level API
/// (`bench/llama_cpp_batched.py`), the anchor of the concurrency table.
struct LlamaBatched {
    python: String,
    script: std::path::PathBuf,
    prompt: Vec<u32>,
    model: std::path::PathBuf,
    threads: usize,
}

impl LlamaBatched {
    /// `None` (with a message saying why) when llama-cpp-python is missing.
    async fn find(
        python: &str,
        model: &std::path::Path,
        threads: usize,
        prompt: &[u32],
    ) -> Option<Self> {
        if !super::python_imports_llama_cpp(python, "llama.cpp's batched anchor").await {
            return None;
        }
        let script = std::env::temp_dir().join(format!(
            "ringlet-bench-llama-cpp-batched-{}.py",
            std::process::id()
        ));
        if let Err(error) = std::fs::write(&script, LLAMA_CPP_BATCHED) {
            eprintln!(
                "llama.cpp's batched anchor skipped: cannot write {}: {error}",
                script.display()
            );
            return None;
        }
        Some(Self {
            python: python.to_string(),
            script,
            prompt: prompt.to_vec(),
            model: model.to_path_buf(),
            threads,
        })
    }

    /// One round of `sequences` copies of the prompt, `decode_tokens`
    /// each: (aggregate, decode-only aggregate) tok/s.
    async fn round(&self, sequences: usize, decode_tokens: usize) -> anyhow::Result<(f64, f64)> {
        let prompts = self.script.with_extension(format!("{sequences}.json"));
        std::fs::write(
            &prompts,
            serde_json::to_string(&vec![&self.prompt; sequences])?,
        )?;
        let output = Command::new(&self.python)
            .arg(&self.script)
            .arg(&self.model)
            .arg(self.threads.to_string())
            .arg(&prompts)
            .arg(decode_tokens.to_string())
            .output()
            .await
            .context("cannot run llama.cpp's batched round")?;
        let _ = std::fs::remove_file(&prompts);
        if !output.status.success() {
            // A llama.cpp built for instructions this CPU lacks dies of a
            // signal and says nothing: name the status, and what to do.
            bail!(
                "llama.cpp's batched round failed ({}): {} (rebuild llama-cpp-python for this CPU, or pass --llama-cpp off)",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let report: serde_json::Value = serde_json::from_slice(&output.stdout)
            .context("llama.cpp's batched round printed no JSON")?;
        Ok((
            report["aggregate_tok_s"].as_f64().unwrap_or(0.0),
            report["decode_aggregate_tok_s"].as_f64().unwrap_or(0.0),
        ))
    }
}

impl Drop for LlamaBatched {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.script);
    }
}

/// Sends a chat completion request over HTTP/1.0; the answer is read from
/// the returned socket.
pub(super) async fn send_chat(addr: SocketAddr, body: &str) -> anyhow::Result<TcpStream> {
    let mut socket = TcpStream::connect(addr).await?;
    let request = format!(
        "POST /v1/chat/completions HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(request.as_bytes()).await?;
    Ok(socket)
}

/// Reads a streamed answer's server-sent events, calling `on_chunk` with
/// each JSON chunk until it returns false or the stream ends; an error
/// event fails.
pub(super) async fn read_chunks(
    socket: &mut TcpStream,
    mut on_chunk: impl FnMut(&serde_json::Value) -> bool,
) -> anyhow::Result<()> {
    let mut pending = String::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = socket.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        pending.push_str(&String::from_utf8_lossy(&buf[..n]));
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: ")) else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let chunk: serde_json::Value =
                serde_json::from_str(data).context("a chunk that is not JSON")?;
            if let Some(error) = chunk.get("error") {
                bail!("the node failed the request: {error}");
            }
            if !on_chunk(&chunk) {
                return Ok(());
            }
        }
    }
}

pub(super) fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)
}

/// The value a `share` (0 to 1) of `values` lie below (0 when empty).
pub(super) fn percentile(values: &[f64], share: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let index = ((sorted.len() as f64 * share) as usize).min(sorted.len().saturating_sub(1));
    sorted.get(index).copied().unwrap_or(0.0)
}

fn print_tables(report: &Report) {
    println!();
    println!(
        "{}: {} threads per node, {} decode tokens, loopback, medians",
        report.model, report.threads_per_node, report.decode_tokens
    );
    let Some(one) = report.sizes.first() else {
        return;
    };
    println!(
        "| nodes | links | decode tok/s | time to first token ms | decode vs {} node | TTFT vs {} node |",
        one.nodes, one.nodes
    );
    println!("|---:|---|---:|---:|---:|---:|");
    for size in &report.sizes {
        println!(
            "| {} | {} | {:.1} | {:.0} | {:.2} | {:.2} |",
            size.nodes,
            size.label(),
            size.median_decode_tok_s,
            size.median_ttft_s * 1000.0,
            size.median_decode_tok_s / one.median_decode_tok_s.max(f64::MIN_POSITIVE),
            size.median_ttft_s / one.median_ttft_s.max(f64::MIN_POSITIVE)
        );
    }
    if report.sizes.iter().any(|s| s.hops.into_stage_hops > 0) {
        println!();
        println!("Decode hops, from the timestamps in the frames (means over every decode step):");
        println!("| nodes | links | into a stage ms | hops | last stage → owner ms | hops |");
        println!("|---:|---|---:|---:|---:|---:|");
        for size in &report.sizes {
            println!(
                "| {} | {} | {:.3} | {} | {:.3} | {} |",
                size.nodes,
                size.label(),
                size.hops.into_stage_mean_ms,
                size.hops.into_stage_hops,
                size.hops.to_owner_mean_ms,
                size.hops.to_owner_hops
            );
        }
    }
    let tcp = report
        .sizes
        .iter()
        .rev()
        .find(|s| s.encrypted && s.transport == "tcp");
    let webrtc = report.sizes.iter().find(|s| s.transport == "webrtc");
    if let (Some(tcp), Some(webrtc)) = (tcp, webrtc) {
        println!();
        println!(
            "webrtc on {} nodes: decode {:.3}x, time to first token {:.3}x of TCP links",
            webrtc.nodes,
            webrtc.median_decode_tok_s / tcp.median_decode_tok_s.max(f64::MIN_POSITIVE),
            webrtc.median_ttft_s / tcp.median_ttft_s.max(f64::MIN_POSITIVE)
        );
    }
    if report.sizes.iter().any(|s| s.prefill.is_some()) {
        println!();
        println!(
            "| nodes | links | prompt tokens | time to first token ms | link throughput MB/s (median) |"
        );
        println!("|---:|---|---:|---:|---:|");
        for size in &report.sizes {
            let Some(prefill) = &size.prefill else {
                continue;
            };
            let rates: Vec<f64> = prefill
                .link_bytes_per_second
                .iter()
                .map(|&b| b as f64 / 1e6)
                .collect();
            println!(
                "| {} | {} | {} | {:.0} | {} |",
                size.nodes,
                size.label(),
                prefill.prompt_tokens,
                prefill.ttft_s * 1000.0,
                if rates.is_empty() {
                    "-".to_string()
                } else {
                    format!("{:.0}", median(&rates))
                }
            );
        }
    }
    if !report.webrtc_handshake_ms.is_empty() {
        let ms: Vec<f64> = report
            .webrtc_handshake_ms
            .iter()
            .map(|&m| m as f64)
            .collect();
        println!(
            "WebRTC link handshakes (ICE and DTLS to an open channel): median {:.0} ms, max {:.0} ms over {} link ends",
            median(&ms),
            ms.iter().copied().fold(0.0, f64::max),
            ms.len()
        );
    }
    let plain = report.sizes.iter().find(|s| !s.encrypted);
    let encrypted = plain.and_then(|p| {
        report
            .sizes
            .iter()
            .find(|s| s.encrypted && s.nodes == p.nodes)
    });
    if let (Some(plain), Some(encrypted)) = (plain, encrypted) {
        println!();
        println!(
            "encryption on {} nodes: decode {:.3}x, time to first token {:.3}x of plaintext links",
            plain.nodes,
            encrypted.median_decode_tok_s / plain.median_decode_tok_s.max(f64::MIN_POSITIVE),
            encrypted.median_ttft_s / plain.median_ttft_s.max(f64::MIN_POSITIVE)
        );
    }
    if !report.handshake_micros.is_empty() {
        let ms: Vec<f64> = report
            .handshake_micros
            .iter()
            .map(|&m| m as f64 / 1000.0)
            .collect();
        println!(
            "link handshakes (Noise and Hello): median {:.2} ms, max {:.2} ms over {} link ends",
            median(&ms),
            ms.iter().copied().fold(0.0, f64::max),
            ms.len()
        );
    }
    if let Some(single) = report.concurrency.first() {
        println!();
        println!(
            "Concurrent greedy streams on {} nodes (aggregate: all tokens over the wall time, prefill included; decoding: after every stream's first token):",
            single.nodes
        );
        println!(
            "| streams | aggregate tok/s | vs {} stream | decoding tok/s | llama.cpp batched aggregate | decoding | ringlet / llama.cpp | one stream's inter-token ms, median / p99 | stage busy |",
            single.streams
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|---|");
        for c in &report.concurrency {
            let (llama_aggregate, llama_decode, ratio) = match &c.llama_cpp {
                Some(l) => (
                    format!("{:.1}", l.median_aggregate_tok_s),
                    format!("{:.1}", l.median_decode_aggregate_tok_s),
                    format!(
                        "{:.2}",
                        c.median_aggregate_tok_s / l.median_aggregate_tok_s.max(f64::MIN_POSITIVE)
                    ),
                ),
                None => ("-".into(), "-".into(), "-".into()),
            };
            let busy: Vec<String> = c
                .stage_busy
                .iter()
                .map(|b| format!("{:.0}%", b * 100.0))
                .collect();
            println!(
                "| {} | {:.1} | {:.2} | {:.1} | {llama_aggregate} | {llama_decode} | {ratio} | {:.1} / {:.1} | {} |",
                c.streams,
                c.median_aggregate_tok_s,
                c.median_aggregate_tok_s / single.median_aggregate_tok_s.max(f64::MIN_POSITIVE),
                c.median_decode_aggregate_tok_s,
                c.itl_median_ms,
                c.itl_p99_ms,
                busy.join(" ")
            );
        }
    }
}
