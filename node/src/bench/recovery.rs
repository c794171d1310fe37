//! `ringlet bench recovery`: how long an answer pauses when a node of the
//! ring is killed while it streams, and where the time goes.
//!
//! A ring of real node processes on loopback; the client streams a greedy
//! answer from the first node (the owner, never killed) and, after
//! `--kill-after` tokens, the benchmark kills (SIGKILL) another node. The
//! pause is what the client sees: from the kill to the next token. The
//! owner's log says how long the re-plan, the layer load and the replay of
//! the request's history took; detection is the rest (the link closing,
//! and the events before the leader plans). The killed node is started
//! again and the ring grows back before the next round. Every recovered
//! answer must equal the uninterrupted one, or the benchmark fails.
//!
//! For comparison it measures what a person restarting the cluster by
//! hand would wait at best: a fresh ring of the nodes left, from their
//! start to the same token of the same answer.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use tokio::net::TcpStream;

use super::ring::{
    BenchNode, NodeSpec, Scratch, drain, median, read_chunks, request_body, send_chat, start_node,
    wait_for,
};
use crate::cli::RecoveryBenchArgs;
use crate::limits::BENCH_REQUEST_TIMEOUT_SECS;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(BENCH_REQUEST_TIMEOUT_SECS);

/// One kill, as the client and the owner saw it.
#[derive(Debug, Clone, Serialize)]
struct KillReport {
    victim: String,
    /// Tokens the client had when the node was killed.
    at_token: usize,
    pause_ms: f64,
    detection_ms: f64,
    replan_ms: f64,
    load_ms: f64,
    replay_ms: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    model: String,
    nodes: usize,
    threads_per_node: usize,
    kills: Vec<KillReport>,
    median_pause_ms: f64,
    worst_pause_ms: f64,
    /// A fresh ring of the nodes left, started by hand: until its plan is
    /// active, and then until the answer is back at the same token.
    restart_start_ms: f64,
    restart_reask_ms: f64,
}

pub async fn bench(args: RecoveryBenchArgs) -> anyhow::Result<()> {
    if args.nodes < 2 || args.kills == 0 || args.kill_after == 0 {
        bail!("--nodes must be at least 2, --kills and --kill-after at least 1");
    }
    if args.decode_tokens <= args.kill_after + 1 {
        bail!("--decode-tokens must be more than --kill-after + 1");
    }
    let store = args.cache.store();
    let model = store.resolve_or_fetch(&args.model).await?;
    let scratch = Scratch(
        std::env::temp_dir().join(format!("ringlet-bench-recovery-{}", std::process::id())),
    );
    let token = crate::identity::JoinToken(crate::identity::ClusterSecret::random()).to_string();
    let extra: Vec<String> = args
        .memory_budget
        .iter()
        .flat_map(|b| ["--memory-budget".to_string(), b.clone()])
        .collect();
    let spec = |name: String, peer: Option<SocketAddr>| NodeSpec {
        config_dir: scratch.0.join(&name),
        name,
        model: &args.model,
        threads: args.threads,
        cache: &args.cache,
        token: &token,
        peer,
        extra: &extra,
    };
    eprintln!(
        "ringlet bench recovery: a ring of {} nodes ({} threads each), {} kills after {} tokens",
        args.nodes, args.threads, args.kills, args.kill_after
    );
    let ready = format!("plan active: {} stages", args.nodes);
    let (owner, mut owner_log) = start_node(spec("owner".into(), None)).await?;
    let mut others = Vec::new();
    let mut other_logs = Vec::new();
    for i in 1..args.nodes {
        let (node, log) = start_node(spec(format!("node-{i}"), Some(owner.addr))).await?;
        others.push(node);
        other_logs.push(log);
    }
    wait_for(&mut owner_log, &ready).await?;
    for log in other_logs {
        drain(log);
    }
    let body = request_body(&model.name, args.decode_tokens);
    let reference = stream_and_kill(owner.addr, &body, None).await?.text;
    eprintln!(
        "  ring ready; the uninterrupted answer has {} characters",
        reference.len()
    );

    let mut kills = Vec::new();
    for round in 0..args.kills {
        let victim = round % others.len();
        let name = format!("node-{}", victim + 1);
        let streamed = stream_and_kill(
            owner.addr,
            &body,
            Some((args.kill_after, &mut others[victim])),
        )
        .await?;
        if streamed.text != reference {
            bail!(
                "round {}: the recovered answer differs from the uninterrupted one:\n{}\n---\n{reference}",
                round + 1,
                streamed.text
            );
        }
        let recovered = wait_for(&mut owner_log, "recovered from the loss of node").await?;
        let resumed = wait_for(&mut owner_log, "generation resumed").await?;
        let replan_ms = field(&recovered, "replan_ms")?;
        let load_ms = field(&recovered, "load_ms")?;
        let replay_ms = field(&resumed, "replay_ms")?;
        let report = KillReport {
            victim: name.clone(),
            at_token: args.kill_after,
            pause_ms: streamed.pause_ms,
            detection_ms: (streamed.pause_ms - replan_ms - load_ms - replay_ms).max(0.0),
            replan_ms,
            load_ms,
            replay_ms,
        };
        eprintln!(
            "  round {}/{}: killed {name}: pause {:.0} ms (detection {:.0}, re-plan {:.0}, load {:.0}, replay {:.0})",
            round + 1,
            args.kills,
            report.pause_ms,
            report.detection_ms,
            report.replan_ms,
            report.load_ms,
            report.replay_ms
        );
        kills.push(report);
        // The node comes back and the ring grows back once nothing runs.
        let (node, log) = start_node(spec(format!("{name}-{round}"), Some(owner.addr))).await?;
        drain(log);
        others[victim] = node;
        wait_for(&mut owner_log, &ready).await?;
    }
    drain(owner_log);
    drop(owner);
    drop(others);

    // What a restart by hand costs at best: the nodes left, started
    // fresh, and the same request asked again up to the same token.
    let started = Instant::now();
    let (first, mut first_log) = start_node(spec("restart-0".into(), None)).await?;
    let mut restarted = vec![first];
    for i in 1..args.nodes - 1 {
        let (node, log) = start_node(spec(format!("restart-{i}"), Some(restarted[0].addr))).await?;
        drain(log);
        restarted.push(node);
    }
    wait_for(
        &mut first_log,
        &format!("plan active: {} stages", args.nodes - 1),
    )
    .await?;
    drain(first_log);
    let restart_start_ms = millis(started.elapsed());
    let asked = Instant::now();
    first_tokens(restarted[0].addr, &body, args.kill_after + 1).await?;
    let restart_reask_ms = millis(asked.elapsed());
    drop(restarted);

    let pauses: Vec<f64> = kills.iter().map(|k| k.pause_ms).collect();
    let report = Report {
        model: model.name,
        nodes: args.nodes,
        threads_per_node: args.threads,
        median_pause_ms: median(&pauses),
        worst_pause_ms: pauses.iter().copied().fold(0.0, f64::max),
        kills,
        restart_start_ms,
        restart_reask_ms,
    };
    print_table(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("results written to {}", path.display());
    }
    Ok(())
}

/// A streamed answer, and the pause around the kill if there was one.
struct Streamed {
    text: String,
    pause_ms: f64,
}

/// Streams `body` from `addr`; after `kill.0` tokens, kills `kill.1` and
/// measures the time to the next token.
async fn stream_and_kill(
    addr: SocketAddr,
    body: &str,
    mut kill: Option<(usize, &mut BenchNode)>,
) -> anyhow::Result<Streamed> {
    let mut socket = send_chat(addr, body).await?;
    let mut text = String::new();
    let (mut tokens, mut killed_at, mut pause_ms) = (0, None::<Instant>, 0.0);
    let read = async {
        read_events(&mut socket, |content| {
            tokens += 1;
            text.push_str(content);
            if let Some(at) = killed_at.take() {
                pause_ms = millis(at.elapsed());
            }
            if matches!(&kill, Some((after, _)) if tokens == *after)
                && let Some((_, node)) = kill.take()
            {
                let _ = node.child.start_kill();
                killed_at = Some(Instant::now());
            }
            true
        })
        .await
    };
    tokio::time::timeout(REQUEST_TIMEOUT, read)
        .await
        .context("the request timed out")??;
    Ok(Streamed { text, pause_ms })
}

/// Streams `body` until `tokens` tokens have come.
async fn first_tokens(addr: SocketAddr, body: &str, tokens: usize) -> anyhow::Result<()> {
    let mut socket = send_chat(addr, body).await?;
    let mut seen = 0;
    let read = read_events(&mut socket, |_| {
        seen += 1;
        seen < tokens
    });
    tokio::time::timeout(REQUEST_TIMEOUT, read)
        .await
        .context("the request timed out")?
}

/// Reads a streamed answer, calling `on_content` with each piece of text
/// until it returns false or the stream ends.
async fn read_events(
    socket: &mut TcpStream,
    mut on_content: impl FnMut(&str) -> bool,
) -> anyhow::Result<()> {
    read_chunks(
        socket,
        |chunk| match chunk["choices"][0]["delta"]["content"]
            .as_str()
            .filter(|c| !c.is_empty())
        {
            Some(content) => on_content(content),
            None => true,
        },
    )
    .await
}

/// The number after `name=` in a log line.
fn field(line: &str, name: &str) -> anyhow::Result<f64> {
    line.split(&format!("{name}="))
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no {name} in the log line: {line}"))
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn print_table(report: &Report) {
    println!();
    println!(
        "{}: a ring of {} nodes, {} threads each, loopback; each node killed (SIGKILL) mid-answer",
        report.model, report.nodes, report.threads_per_node
    );
    println!("| node killed | at token | pause ms | detection | re-plan | layer load | replay |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for kill in &report.kills {
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
            kill.victim,
            kill.at_token,
            kill.pause_ms,
            kill.detection_ms,
            kill.replan_ms,
            kill.load_ms,
            kill.replay_ms
        );
    }
    println!(
        "pause from the kill to the next token: median {:.0} ms, worst {:.0} ms; every recovered answer equals the uninterrupted one",
        report.median_pause_ms, report.worst_pause_ms
    );
    println!(
        "a restart by hand of the {} nodes left: {:.0} ms to an active plan, then {:.0} ms to the same token again ({:.1} s in all, not counting noticing and typing)",
        report.nodes - 1,
        report.restart_start_ms,
        report.restart_reask_ms,
        (report.restart_start_ms + report.restart_reask_ms) / 1000.0
    );
}
