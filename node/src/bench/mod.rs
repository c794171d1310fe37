//! `ringlet bench`: prefill, decode, time to first token and peak memory of
//! the node's engine, side by side with llama.cpp on the same GGUF with the
//! same threads. Rounds alternate between the engines (these machines are
//! shared and noisy) and the table reports medians and ratios.

pub mod chunks;
pub mod cluster;
pub mod policy;
pub mod recovery;
pub mod ring;
pub mod structured;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use anyhow::{Context, bail};
use kernels::{Device, SamplingParams, SequenceId, Tokenizer};
use serde::{Deserialize, Serialize};
use tokio::process::Command;

use crate::cli::{EngineBenchArgs, RuntimeConfig};
use crate::engine::{Engine, EngineHandle, GenerationEvent, GenerationRequest, decode_rate};
use crate::limits::DEFAULT_KV_CACHE_BYTES;
use crate::loaded_model::LoadedModel;

const LLAMA_CPP_ROUND: &str = include_str!("../../bench/llama_cpp_round.py");

/// Text the benchmark prompt is cut from; repeated if the model's tokenizer
/// needs more tokens.
const PROMPT_TEXT: &str = "The history of computing is a story of machines that grew smaller and faster \
while the problems people gave them grew larger. Early mechanical calculators could add and multiply; \
later, electronic computers filled rooms and ran programs from punched cards. Networks joined them, and \
today a model too large for one machine can be split across several, each holding a slice of its layers \
and passing activations to the next around a ring. ";

/// One round of one engine.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Round {
    pub ttft_s: f64,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    pub generated: usize,
    #[serde(default)]
    pub peak_rss_bytes: u64,
}

#[derive(Debug, Serialize)]
struct EngineReport {
    engine: String,
    rounds: Vec<Round>,
    median: Round,
}

#[derive(Debug, Serialize)]
struct Report {
    model: String,
    model_file: PathBuf,
    weight_bytes: u64,
    threads: usize,
    prompt_tokens: usize,
    decode_tokens: usize,
    ringlet: EngineReport,
    llama_cpp: Option<EngineReport>,
}

pub async fn bench(args: EngineBenchArgs) -> anyhow::Result<()> {
    if args.rounds == 0 || args.prompt_tokens == 0 || args.decode_tokens == 0 || args.threads == 0 {
        bail!("--rounds, --prompt-tokens, --decode-tokens and --threads must all be at least 1");
    }
    let runtime = cpu_runtime(args.threads, args.cache.store());
    let model = LoadedModel::load_whole(&runtime, &args.model).await?;
    let context_length = model.file.config().context_length;
    if args.prompt_tokens + args.decode_tokens + 1 > context_length {
        bail!(
            "--prompt-tokens plus --decode-tokens must fit the model's context of {context_length} tokens"
        );
    }
    let prompt = bench_prompt(model.prompt.tokenizer(), args.prompt_tokens)?;
    let model_path = model.file.path().to_path_buf();
    let weight_bytes = model.shard.weight_bytes();
    let llama_cpp = LlamaCpp::find(&args.llama_cpp, &model_path, args.threads, &prompt).await;
    let engine = Engine::start_local(
        model.shard,
        &model.prompt,
        runtime.kv_cache_bytes,
        runtime.prefill_chunk_tokens,
    )?;

    eprintln!(
        "ringlet bench: {} with {} threads, {}-token prompt, {} decode tokens, {} rounds",
        model.name, args.threads, args.prompt_tokens, args.decode_tokens, args.rounds
    );
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    let mut profile = args.profile.then(StepProfile::default);
    kernels::profile::set_enabled(args.profile);
    for round in 1..=args.rounds {
        let r = measure_ringlet(
            &engine.handle,
            &prompt,
            args.decode_tokens,
            profile.as_mut(),
        )
        .await?;
        eprintln!(
            "  round {round}/{}: ringlet   decode {:6.1} tok/s, prefill {:7.1} tok/s",
            args.rounds, r.decode_tok_s, r.prefill_tok_s
        );
        ours.push(r);
        if let Some(llama) = &llama_cpp {
            let r = llama.measure(args.decode_tokens).await?;
            eprintln!(
                "  round {round}/{}: llama.cpp decode {:6.1} tok/s, prefill {:7.1} tok/s",
                args.rounds, r.decode_tok_s, r.prefill_tok_s
            );
            theirs.push(r);
        }
    }
    let (_, peak) = crate::cluster::resources::process_memory();
    for r in &mut ours {
        r.peak_rss_bytes = peak;
    }
    let report = Report {
        model: model.name.clone(),
        model_file: model_path,
        weight_bytes,
        threads: args.threads,
        prompt_tokens: args.prompt_tokens,
        decode_tokens: args.decode_tokens,
        ringlet: EngineReport {
            engine: format!("ringlet {}", env!("CARGO_PKG_VERSION")),
            median: median(&ours),
            rounds: ours,
        },
        llama_cpp: llama_cpp.as_ref().map(|_| EngineReport {
            engine: "llama.cpp (llama-cpp-python)".into(),
            median: median(&theirs),
            rounds: theirs,
        }),
    };
    print_table(&report);
    if let Some(profile) = &profile {
        profile.print(args.prompt_tokens, args.rounds);
    }
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json).with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("results written to {}", path.display());
    }
    tokio::task::spawn_blocking(move || engine.shutdown())
        .await
        .ok();
    Ok(())
}

/// A benchmark's runtime: the CPU with the given threads, whatever the
/// node's own defaults are.
pub(super) fn cpu_runtime(threads: usize, store: crate::model_store::ModelStore) -> RuntimeConfig {
    RuntimeConfig {
        threads,
        store,
        device: Device::Cpu,
        kv_cache_bytes: DEFAULT_KV_CACHE_BYTES,
        prefill_chunk_tokens: crate::limits::PREFILL_CHUNK_TOKENS,
        hub: crate::hub::HubConfig::from_env(),
    }
}

/// Exactly `n` tokens of ordinary English.
fn bench_prompt(tokenizer: &Tokenizer, n: usize) -> anyhow::Result<Vec<u32>> {
    let mut text = String::new();
    loop {
        text.push_str(PROMPT_TEXT);
        let ids = tokenizer.encode(&text)?;
        if ids.len() >= n {
            return Ok(ids[..n].to_vec());
        }
    }
}

/// Time per kind of op, summed over rounds: prefill (up to the first
/// token) and decode (after it).
#[derive(Default)]
struct StepProfile {
    prefill: Vec<(kernels::profile::Op, u64, u64)>,
    decode: Vec<(kernels::profile::Op, u64, u64)>,
    decoded: usize,
}

impl StepProfile {
    fn add(into: &mut Vec<(kernels::profile::Op, u64, u64)>) {
        let taken = kernels::profile::take();
        if into.is_empty() {
            *into = taken;
        } else {
            for (sum, (_, nanos, calls)) in into.iter_mut().zip(taken) {
                sum.1 += nanos;
                sum.2 += calls;
            }
        }
    }

    fn print(&self, prompt_tokens: usize, rounds: usize) {
        let table = |title: String, ops: &[(kernels::profile::Op, u64, u64)], per: f64| {
            println!();
            println!("{title}");
            println!("| op | ms | share of the step | calls |");
            println!("|---|---:|---:|---:|");
            let step = ops.first().map_or(0, |o| o.1).max(1) as f64;
            let mut accounted = 0u64;
            for (op, nanos, calls) in ops.iter().skip(1) {
                accounted += nanos;
                println!(
                    "| {} | {:.3} | {:.1}% | {:.0} |",
                    op.name(),
                    *nanos as f64 / 1e6 / per,
                    *nanos as f64 / step * 100.0,
                    *calls as f64 / per
                );
            }
            let rest = step - accounted as f64;
            println!(
                "| everything else (dispatch, allocation, copies) | {:.3} | {:.1}% | |",
                rest / 1e6 / per,
                rest / step * 100.0
            );
            println!(
                "| **whole step** | **{:.3}** | 100% | {:.0} |",
                step / 1e6 / per,
                ops.first().map_or(0, |o| o.2) as f64 / per
            );
        };
        let rounds = rounds.max(1) as f64;
        table(
            format!("where the time of a {prompt_tokens}-token prefill goes (per prompt)"),
            &self.prefill,
            rounds,
        );
        table(
            "where the time of a decode step goes (per token)".into(),
            &self.decode,
            self.decoded.max(1) as f64,
        );
    }
}

async fn measure_ringlet(
    engine: &EngineHandle,
    prompt: &[u32],
    decode_tokens: usize,
    mut profile: Option<&mut StepProfile>,
) -> anyhow::Result<Round> {
    if profile.is_some() {
        kernels::profile::take(); // nothing from before this round
    }
    let started = Instant::now();
    let mut generation = engine.submit(GenerationRequest {
        id: SequenceId(rand::random()),
        prompt: prompt.to_vec(),
        max_tokens: decode_tokens + 1,
        sampling: SamplingParams::greedy(),
        ignore_eos: true,
    })?;
    let mut stamps = Vec::with_capacity(decode_tokens + 1);
    while let Some(event) = generation.events.recv().await {
        match event {
            GenerationEvent::Token { .. } => {
                stamps.push(Instant::now());
                if stamps.len() == 1
                    && let Some(profile) = profile.as_deref_mut()
                {
                    StepProfile::add(&mut profile.prefill);
                }
            }
            GenerationEvent::Finished { .. } => break,
            GenerationEvent::Failed { message } => bail!("generation failed: {message}"),
        }
    }
    if let Some(profile) = profile {
        StepProfile::add(&mut profile.decode);
        profile.decoded += stamps.len().saturating_sub(1);
    }
    let (Some(first), Some(last)) = (stamps.first(), stamps.last()) else {
        bail!("the engine generated no tokens");
    };
    let ttft = (*first - started).as_secs_f64();
    let decode_seconds = (*last - *first).as_secs_f64();
    Ok(Round {
        ttft_s: ttft,
        prefill_tok_s: prompt.len() as f64 / ttft,
        decode_tok_s: decode_rate(stamps.len(), decode_seconds),
        generated: stamps.len(),
        peak_rss_bytes: 0,
    })
}

/// llama.cpp through llama-cpp-python, one process per round.
struct LlamaCpp {
    python: String,
    script: PathBuf,
    prompt_file: PathBuf,
    model: PathBuf,
    threads: usize,
}

/// Whether `python` can import llama-cpp-python (and numpy, which it
/// brings); if not, says so, as what is `skipped`, and how to install it.
pub(super) async fn python_imports_llama_cpp(python: &str, skipped: &str) -> bool {
    let import = Command::new(python)
        .args(["-c", "import llama_cpp, numpy"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
    let imports = import.is_ok_and(|s| s.success());
    if !imports {
        eprintln!(
            "{skipped} skipped: `{python}` cannot import llama_cpp. Install it with\n  \
             CMAKE_ARGS=\"-DGGML_NATIVE=ON\" pip install llama-cpp-python\n(see README \"Benchmarks\"), or pass --llama-cpp off"
        );
    }
    imports
}

impl LlamaCpp {
    /// `None` (with a message saying why) when the comparison is off or
    /// llama-cpp-python is missing.
    async fn find(python: &str, model: &Path, threads: usize, prompt: &[u32]) -> Option<Self> {
        if python == "off" {
            return None;
        }
        if !python_imports_llama_cpp(python, "llama.cpp comparison").await {
            return None;
        }
        let dir = std::env::temp_dir();
        let script = dir.join(format!("ringlet-bench-llama-cpp-{}.py", std::process::id()));
        let prompt_file = dir.join(format!("ringlet-bench-prompt-{}.json", std::process::id()));
        let written = std::fs::write(&script, LLAMA_CPP_ROUND).and_then(|()| {
            std::fs::write(
                &prompt_file,
                serde_json::to_string(prompt).unwrap_or_default(),
            )
        });
        if let Err(error) = written {
            eprintln!(
                "llama.cpp comparison skipped: cannot write to {}: {error}",
                dir.display()
            );
            return None;
        }
        Some(Self {
            python: python.to_string(),
            script,
            prompt_file,
            model: model.to_path_buf(),
            threads,
        })
    }

    async fn measure(&self, decode_tokens: usize) -> anyhow::Result<Round> {
        let output = Command::new(&self.python)
            .arg(&self.script)
            .arg(&self.model)
            .arg(self.threads.to_string())
            .arg(&self.prompt_file)
            .arg(decode_tokens.to_string())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .context("cannot run the llama.cpp round")?;
        if !output.status.success() {
            bail!(
                "the llama.cpp round failed ({}):\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let line = stdout.lines().last().unwrap_or_default();
        serde_json::from_str(line)
            .with_context(|| format!("the llama.cpp round printed no result: {stdout}"))
    }
}

impl Drop for LlamaCpp {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.script);
        let _ = std::fs::remove_file(&self.prompt_file);
    }
}

fn median(rounds: &[Round]) -> Round {
    let pick = |f: fn(&Round) -> f64| {
        let mut values: Vec<f64> = rounds.iter().map(f).collect();
        values.sort_by(f64::total_cmp);
        values.get(values.len() / 2).copied().unwrap_or(0.0)
    };
    Round {
        ttft_s: pick(|r| r.ttft_s),
        prefill_tok_s: pick(|r| r.prefill_tok_s),
        decode_tok_s: pick(|r| r.decode_tok_s),
        generated: rounds.first().map_or(0, |r| r.generated),
        peak_rss_bytes: rounds.iter().map(|r| r.peak_rss_bytes).max().unwrap_or(0),
    }
}

/// A table row: its name, how to read it from a round, and whether a
/// higher value is better.
type TableRow = (&'static str, fn(&Round) -> f64, bool);

fn print_table(report: &Report) {
    let ours = &report.ringlet.median;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!();
    println!(
        "{} ({:.1} MiB of weights), {} threads, {}-token prompt, {} decode tokens, median of {} rounds",
        report.model,
        mib(report.weight_bytes),
        report.threads,
        report.prompt_tokens,
        report.decode_tokens,
        report.ringlet.rounds.len()
    );
    let rows: [TableRow; 4] = [
        ("prefill tok/s", |r| r.prefill_tok_s, true),
        ("decode tok/s", |r| r.decode_tok_s, true),
        ("time to first token ms", |r| r.ttft_s * 1000.0, false),
        (
            "peak RSS MiB",
            |r| r.peak_rss_bytes as f64 / (1 << 20) as f64,
            false,
        ),
    ];
    match &report.llama_cpp {
        Some(theirs) => {
            println!("| metric | ringlet | llama.cpp | ringlet / llama.cpp |");
            println!("|---|---:|---:|---:|");
            for (name, value, higher_is_better) in rows {
                let (a, b) = (value(ours), value(&theirs.median));
                let ratio = if b > 0.0 { a / b } else { 0.0 };
                let better = if higher_is_better {
                    "higher is better"
                } else {
                    "lower is better"
                };
                println!("| {name} | {a:.1} | {b:.1} | {ratio:.2} ({better}) |");
            }
        }
        None => {
            println!("| metric | ringlet |");
            println!("|---|---:|");
            for (name, value, _) in rows {
                println!("| {name} | {:.1} |", value(ours));
            }
        }
    }
}
