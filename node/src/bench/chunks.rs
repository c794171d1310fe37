//! `ringlet bench chunks`: how the prompt chunk size (`--prefill-chunk`)
//! trades a long prompt's time to first token against the pace of the
//! streams already running.
//!
//! One node per chunk size, real processes on loopback, driven through
//! the HTTP API. In each round, on each node in turn, `--streams` greedy
//! answers run; once every one of them streams, a prompt of
//! `--prompt-tokens` arrives. A stage step carries one chunk of it beside
//! the running streams' tokens, so while it is read each of their tokens
//! waits for a chunk: the benchmark reports the prompt's time to first
//! token and the running streams' gaps between tokens meanwhile, against
//! their gaps before and after.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use tokio::sync::mpsc;

use super::ring::{
    BenchNode, NodeSpec, Scratch, drain, long_prompt_body, median, percentile, read_chunks,
    request_body, send_chat, start_node, wait_for,
};
use crate::cli::ChunkBenchArgs;
use crate::limits::BENCH_REQUEST_TIMEOUT_SECS;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(BENCH_REQUEST_TIMEOUT_SECS);

/// One round on one node.
#[derive(Debug, Clone, Serialize)]
struct Round {
    prompt_tokens: u64,
    ttft_ms: f64,
    /// The running streams' gaps that ended while the prompt was read.
    during_gaps_ms: Vec<f64>,
    /// Their other gaps.
    other_gaps_ms: Vec<f64>,
}

#[derive(Debug, Serialize)]
struct ChunkReport {
    chunk_tokens: usize,
    rounds: Vec<Round>,
    median_ttft_ms: f64,
    /// Over every round's gaps.
    during_median_ms: f64,
    during_p99_ms: f64,
    during_max_ms: f64,
    other_median_ms: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    model: String,
    threads: usize,
    streams: usize,
    prompt_tokens: usize,
    chunks: Vec<ChunkReport>,
}

pub async fn bench(args: ChunkBenchArgs) -> anyhow::Result<()> {
    if args.rounds == 0 || args.streams == 0 || args.chunks.is_empty() {
        bail!("--rounds, --streams and --chunks must each be at least 1");
    }
    if let Some(bad) = args
        .chunks
        .iter()
        .find(|&&c| c == 0 || c > crate::limits::PREFILL_CHUNK_TOKENS)
    {
        bail!(
            "--chunks {bad}: a chunk is 1 to {} tokens",
            crate::limits::PREFILL_CHUNK_TOKENS
        );
    }
    let store = args.cache.store();
    let model = store.resolve_or_fetch(&args.model).await?;
    let scratch =
        Scratch(std::env::temp_dir().join(format!("ringlet-bench-chunks-{}", std::process::id())));
    let token = crate::identity::JoinToken(crate::identity::ClusterSecret::random()).to_string();
    eprintln!(
        "ringlet bench chunks: one node per chunk size {:?} ({} threads each)",
        args.chunks, args.threads
    );
    let mut nodes: Vec<BenchNode> = Vec::new();
    for &chunk in &args.chunks {
        let extra = ["--prefill-chunk".to_string(), chunk.to_string()];
        let spec = NodeSpec {
            name: format!("bench-chunk-{chunk}"),
            model: &args.model,
            threads: args.threads,
            cache: &args.cache,
            config_dir: scratch.0.join(format!("chunk{chunk}")),
            token: &token,
            peer: None,
            extra: &extra,
        };
        let (node, mut log) = start_node(spec).await?;
        wait_for(&mut log, "plan active: 1 stages").await?;
        drain(log);
        nodes.push(node);
    }

    let running = request_body(&model.name, args.decode_tokens);
    let long = long_prompt_body(&model.name, args.prompt_tokens);
    let mut rounds: Vec<Vec<Round>> = vec![Vec::new(); nodes.len()];
    for round in 1..=args.rounds {
        for (i, node) in nodes.iter().enumerate() {
            let measured = one_round(node.addr, args.streams, &running, &long).await?;
            eprintln!(
                "  round {round}/{}: chunk {:3}: {}-token prompt's first token after {:5.0} ms; running streams' gaps meanwhile: longest {:5.1} ms",
                args.rounds,
                args.chunks[i],
                measured.prompt_tokens,
                measured.ttft_ms,
                measured.during_gaps_ms.iter().copied().fold(0.0, f64::max)
            );
            rounds[i].push(measured);
        }
    }

    let chunks = args
        .chunks
        .iter()
        .zip(rounds)
        .map(|(&chunk_tokens, rounds)| {
            let ttfts: Vec<f64> = rounds.iter().map(|r| r.ttft_ms).collect();
            let during: Vec<f64> = rounds
                .iter()
                .flat_map(|r| r.during_gaps_ms.clone())
                .collect();
            let other: Vec<f64> = rounds
                .iter()
                .flat_map(|r| r.other_gaps_ms.clone())
                .collect();
            ChunkReport {
                chunk_tokens,
                median_ttft_ms: median(&ttfts),
                during_median_ms: median(&during),
                during_p99_ms: percentile(&during, 0.99),
                during_max_ms: during.iter().copied().fold(0.0, f64::max),
                other_median_ms: median(&other),
                rounds,
            }
        })
        .collect();
    let report = Report {
        model: model.name.clone(),
        threads: args.threads,
        streams: args.streams,
        prompt_tokens: args.prompt_tokens,
        chunks,
    };
    print_table(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// `streams` running answers, then the long prompt once all of them
/// stream; the gaps of the running answers split by whether they ended
/// while the prompt was read.
async fn one_round(
    addr: SocketAddr,
    streams: usize,
    running: &str,
    long: &str,
) -> anyhow::Result<Round> {
    let (first_tx, mut first_rx) = mpsc::channel(streams);
    let mut tasks = Vec::new();
    for _ in 0..streams {
        let (body, first) = (running.to_string(), first_tx.clone());
        tasks.push(tokio::spawn(async move {
            tokio::time::timeout(REQUEST_TIMEOUT, text_times(addr, &body, Some(first)))
                .await
                .context("a running stream timed out")?
        }));
    }
    drop(first_tx);
    for _ in 0..streams {
        first_rx
            .recv()
            .await
            .context("a running stream ended before its first token")?;
    }
    let sent = Instant::now();
    let (prompt_tokens, prompt_times) =
        tokio::time::timeout(REQUEST_TIMEOUT, text_times(addr, long, None))
            .await
            .context("the long prompt timed out")??;
    let first = *prompt_times
        .first()
        .context("the long prompt's answer never came")?;
    let mut during_gaps_ms = Vec::new();
    let mut other_gaps_ms = Vec::new();
    for task in tasks {
        let (_, times) = task.await.context("a running stream's task failed")??;
        if times.last().is_some_and(|&last| last < first) {
            eprintln!(
                "  warning: a running stream ended before the prompt's first token, so its gaps miss the end of the prompt; raise --decode-tokens"
            );
        }
        for pair in times.windows(2) {
            let gap = (pair[1] - pair[0]).as_secs_f64() * 1000.0;
            if pair[1] > sent && pair[0] < first {
                during_gaps_ms.push(gap);
            } else {
                other_gaps_ms.push(gap);
            }
        }
    }
    Ok(Round {
        prompt_tokens,
        ttft_ms: (first - sent).as_secs_f64() * 1000.0,
        during_gaps_ms,
        other_gaps_ms,
    })
}

/// Streams one answer; returns its prompt's token count and when each
/// piece of text came (for an answer with no text, such as one that ends
/// at once, when it finished). `first` hears when the first one did.
async fn text_times(
    addr: SocketAddr,
    body: &str,
    first: Option<mpsc::Sender<()>>,
) -> anyhow::Result<(u64, Vec<Instant>)> {
    let mut socket = send_chat(addr, body).await?;
    let mut times = Vec::new();
    let mut prompt_tokens = 0;
    let mut finished = None;
    let mut first = first;
    read_chunks(&mut socket, |chunk| {
        if !chunk["choices"][0]["finish_reason"].is_null() {
            finished.get_or_insert_with(Instant::now);
        }
        if chunk["choices"][0]["delta"]["content"]
            .as_str()
            .is_some_and(|c| !c.is_empty())
        {
            times.push(Instant::now());
            if let Some(first) = first.take() {
                let _ = first.try_send(());
            }
        }
        if let Some(n) = chunk["usage"]["prompt_tokens"].as_u64() {
            prompt_tokens = n;
        }
        true
    })
    .await?;
    if times.is_empty() {
        times.extend(finished);
    }
    Ok((prompt_tokens, times))
}

fn print_table(report: &Report) {
    println!();
    println!(
        "{} running streams on one node ({} threads, {}), and a {}-token prompt arriving; medians over the rounds:",
        report.streams, report.threads, report.model, report.prompt_tokens
    );
    println!();
    println!(
        "| chunk tokens | prompt's first token ms | running streams' gap while it is read, median / p99 / max ms | their gap otherwise, median ms |"
    );
    println!("|---:|---:|---:|---:|");
    for chunk in &report.chunks {
        println!(
            "| {} | {:.0} | {:.1} / {:.1} / {:.1} | {:.1} |",
            chunk.chunk_tokens,
            chunk.median_ttft_ms,
            chunk.during_median_ms,
            chunk.during_p99_ms,
            chunk.during_max_ms,
            chunk.other_median_ms
        );
    }
}
