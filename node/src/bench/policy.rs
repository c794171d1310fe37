//! `ringlet bench policy`: what a scheduling policy costs the node. Times
//! compiling it, `place` on clusters of several sizes (every pair of nodes
//! linked) and `schedule` on a queue, through the same `PolicyHandle` the
//! cluster and the coordinator use, so each time includes the trip to the
//! policy thread and a fresh sandboxed instance.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::cli::PolicyBenchArgs;
use crate::cluster::protocol::PolicyRevision;
use crate::policy::{self, Change, Cluster, Link, Model, Node, StageLoad, WaitingRequest};

#[derive(Debug, Serialize)]
struct Latency {
    what: String,
    calls: usize,
    median_us: f64,
    p99_us: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    policy: String,
    sha256: String,
    size_bytes: u64,
    compile_ms: f64,
    latencies: Vec<Latency>,
}

pub async fn bench(args: PolicyBenchArgs) -> anyhow::Result<()> {
    let (handle, _faults) = policy::start()?;
    let (view, compile_ms) = match &args.policy {
        None => (handle.built_in().clone(), 0.0),
        Some(path) => {
            let bytes = tokio::fs::read(path)
                .await
                .with_context(|| format!("cannot read the policy {}", path.display()))?;
            let started = Instant::now();
            let revision = PolicyRevision {
                counter: 1,
                origin: scheduler::NodeId(1),
            };
            let view = handle
                .install(Some(bytes.into()), revision, Change::Propagated)
                .await
                .with_context(|| format!("{} is not a usable policy", path.display()))?;
            (view, started.elapsed().as_secs_f64() * 1e3)
        }
    };
    eprintln!(
        "benchmarking policy {} {} ({} calls each)",
        view.name, view.version, args.calls
    );
    let mut latencies = Vec::new();
    for &nodes in &args.nodes {
        let cluster = cluster(nodes);
        let samples = time_calls(args.calls, || {
            let handle = handle.clone();
            let cluster = cluster.clone();
            async move {
                let placed = handle.place(cluster, model()).await?;
                placed.result.map(|_| ()).map_err(anyhow::Error::from)
            }
        })
        .await
        .with_context(|| format!("place on {nodes} nodes failed"))?;
        latencies.push(summarize(format!("place, {nodes} nodes"), &samples));
    }
    let queue: Vec<WaitingRequest> = (0..args.queue as u64)
        .map(|id| WaitingRequest {
            id,
            prompt_tokens: 100 + (id as u32 * 37) % 900,
            max_tokens: 256,
            waited_millis: 1_000 - id.min(999),
        })
        .collect();
    let stages: Vec<StageLoad> = (0..3)
        .map(|node| StageLoad {
            node,
            in_flight: 4,
            limit: 16,
        })
        .collect();
    let samples = time_calls(args.calls, || {
        let handle = handle.clone();
        let (queue, stages) = (queue.clone(), stages.clone());
        async move {
            handle.schedule(queue, stages).await?;
            Ok(())
        }
    })
    .await
    .context("schedule failed")?;
    latencies.push(summarize(
        format!("schedule, {} waiting", args.queue),
        &samples,
    ));

    let report = Report {
        policy: format!("{} {}", view.name, view.version),
        sha256: view.sha256,
        size_bytes: view.size_bytes,
        compile_ms,
        latencies,
    };
    print_table(&report);
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// Nodes of 12 to 32 GiB and 10 to 50 GFLOP/s, every pair linked.
fn cluster(count: usize) -> Cluster {
    let nodes: Vec<Node> = (0..count as u64)
        .map(|i| Node {
            id: i + 1,
            name: format!("node-{i}"),
            device: "cpu".into(),
            memory_budget_bytes: (12 + (i * 5) % 21) << 30,
            compute_score: 10.0 + ((i * 7) % 41) as f64,
        })
        .collect();
    let mut links = Vec::new();
    for a in &nodes {
        for b in &nodes {
            if a.id != b.id {
                links.push(Link {
                    from: a.id,
                    to: b.id,
                    latency_micros: 200 + (a.id * 31 + b.id * 17) % 800,
                    bandwidth_bytes_per_second: 110_000_000,
                });
            }
        }
    }
    Cluster { nodes, links }
}

/// A 70B-class model: 80 layers of 410 MiB, 1 GiB embedding and head.
fn model() -> Model {
    Model {
        layer_count: 80,
        layer_bytes: vec![410 << 20; 80],
        embedding_bytes: 1 << 30,
        head_bytes: 1 << 30,
        tied_embeddings: false,
        kv_bytes_per_token_per_layer: 4_096,
        context_length: 8_192,
    }
}

async fn time_calls<F, Fut>(calls: usize, mut call: F) -> anyhow::Result<Vec<Duration>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let mut samples = Vec::with_capacity(calls);
    for _ in 0..calls {
        let started = Instant::now();
        call().await?;
        samples.push(started.elapsed());
    }
    Ok(samples)
}

fn summarize(what: String, samples: &[Duration]) -> Latency {
    let mut micros: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e6).collect();
    micros.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let index = ((micros.len() as f64 - 1.0) * q).round() as usize;
        micros.get(index).copied().unwrap_or(0.0)
    };
    Latency {
        what,
        calls: samples.len(),
        median_us: at(0.5),
        p99_us: at(0.99),
    }
}

fn print_table(report: &Report) {
    println!();
    println!(
        "policy {} ({} bytes, sha256 {}){}",
        report.policy,
        report.size_bytes,
        report.sha256.get(..12).unwrap_or_default(),
        if report.compile_ms > 0.0 {
            format!(", compiled in {:.0} ms", report.compile_ms)
        } else {
            String::new()
        }
    );
    println!("| call | median µs | p99 µs |");
    println!("|---|---:|---:|");
    for latency in &report.latencies {
        println!(
            "| {} | {:.0} | {:.0} |",
            latency.what, latency.median_us, latency.p99_us
        );
    }
}
