//! `ringlet bench cluster`: decode speed, time to first token and link
//! figures of a cluster that is already running, driven through one
//! node's HTTP API as a client would. Where `ringlet bench ring` starts
//! its own rings on loopback, this measures the machines and network a
//! cluster really has (the NAT lab's WebRTC and TCP rings, for one).

use std::net::SocketAddr;

use anyhow::{Context, bail};
use serde::Serialize;

use api_types::{ClusterView, LinkTransport, NodeId};

use super::ring::{StreamTiming, get_json, long_prompt_body, median, request_body, stream};
use crate::cli::ClusterBenchArgs;

/// One link as the cluster view showed it after the runs.
#[derive(Debug, Serialize)]
struct LinkFigures {
    from: String,
    to: String,
    /// As `GET /v1/cluster` names it (`tcp`, `webrtc`, `webrtc-turn`).
    transport: LinkTransport,
    handshake_ms: Option<f64>,
    rtt_ms: Option<f64>,
    bandwidth_bytes_per_second: Option<u64>,
}

#[derive(Debug, Serialize)]
struct Report {
    node: SocketAddr,
    model: String,
    stages: usize,
    /// The long prompt's timing, if `--prefill-tokens`.
    prefill: Option<StreamTiming>,
    rounds: Vec<StreamTiming>,
    median_decode_tok_s: f64,
    median_ttft_s: f64,
    /// Read after the long prompt, so the bandwidths are those of
    /// activation frames.
    links: Vec<LinkFigures>,
}

pub async fn bench(args: ClusterBenchArgs) -> anyhow::Result<()> {
    let node = args.node;
    let view = cluster_view(node).await?;
    let Some(plan) = view.active_plan() else {
        bail!("the node at {node} has no active plan yet: wait until it logs \"plan active\"");
    };
    let stages = plan.stages.len();
    let model = view
        .model
        .as_ref()
        .context("the cluster view names no model")?
        .name
        .clone();
    eprintln!("ringlet bench cluster: {model} on {stages} stages, through the node at {node}");

    let prefill = if args.prefill_tokens > 0 {
        let timing = stream(node, &long_prompt_body(&model, args.prefill_tokens)).await?;
        eprintln!(
            "  {}-token prompt: first token after {:.0} ms",
            timing.prompt_tokens,
            timing.ttft_s * 1000.0
        );
        Some(timing)
    } else {
        None
    };
    let after = cluster_view(node).await?;
    let name = |id: NodeId| {
        after
            .nodes
            .iter()
            .find(|n| n.id == id)
            .map_or_else(|| id.to_string(), |n| n.name.clone())
    };
    let links = after
        .links
        .iter()
        .map(|l| LinkFigures {
            from: name(l.from),
            to: name(l.to),
            transport: l.transport,
            handshake_ms: l.handshake_ms,
            rtt_ms: l.rtt_ms,
            bandwidth_bytes_per_second: l.bandwidth_bytes_per_second,
        })
        .collect();

    let body = request_body(&model, args.decode_tokens);
    let mut rounds = Vec::new();
    for round in 1..=args.rounds {
        let timing = stream(node, &body).await?;
        eprintln!(
            "  round {round}/{}: decode {:6.1} tok/s, first token after {:4.0} ms",
            args.rounds,
            timing.decode_tok_s,
            timing.ttft_s * 1000.0
        );
        rounds.push(timing);
    }
    let report = Report {
        node,
        model,
        stages,
        prefill,
        median_decode_tok_s: median(&rounds.iter().map(|t| t.decode_tok_s).collect::<Vec<_>>()),
        median_ttft_s: median(&rounds.iter().map(|t| t.ttft_s).collect::<Vec<_>>()),
        rounds,
        links,
    };
    print_report(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The node's `GET /v1/cluster`.
async fn cluster_view(node: SocketAddr) -> anyhow::Result<ClusterView> {
    let view = get_json(node, "/v1/cluster").await.with_context(|| {
        format!(
            "could not read the cluster view of the node at {node}; is it running, and is its API open (--open-api)?"
        )
    })?;
    serde_json::from_value(view).with_context(|| {
        format!("the node at {node} answered GET /v1/cluster with something that is not a cluster view (another version of ringlet, or an API key it wants?)")
    })
}

fn print_report(report: &Report) {
    println!(
        "\n{} on {} stages: decode {:.1} tok/s, first token after {:.0} ms (medians of {} rounds)",
        report.model,
        report.stages,
        report.median_decode_tok_s,
        report.median_ttft_s * 1000.0,
        report.rounds.len()
    );
    if let Some(prefill) = &report.prefill {
        println!(
            "{}-token prompt: first token after {:.0} ms",
            prefill.prompt_tokens,
            prefill.ttft_s * 1000.0
        );
    }
    let ms = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"));
    println!("\n| link | transport | handshake ms | RTT ms | MB/s |\n|---|---|---:|---:|---:|");
    for link in &report.links {
        println!(
            "| {} → {} | {} | {} | {} | {} |",
            link.from,
            link.to,
            link.transport.label(),
            ms(link.handshake_ms),
            ms(link.rtt_ms),
            link.bandwidth_bytes_per_second
                .map_or_else(|| "-".to_string(), |b| format!("{:.1}", b as f64 / 1e6))
        );
    }
}
