//! `ringlet bench structured`: what constrained decoding costs on one
//! node, through the real API on loopback. Decode speed of the same
//! greedy essay with and without a JSON schema (rounds alternate), the
//! time the grammar engine takes to compile schemas (and, once per model,
//! the vocabulary), and the share of forced tool calls at temperature 1
//! whose arguments are well formed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use kernels::{Constraint, Grammars};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;

use super::ring::{StreamTiming, median, send_chat, stream};
use crate::cli::StructuredBenchArgs;
use crate::limits::DEFAULT_KV_CACHE_BYTES;
use crate::loaded_model::LoadedModel;
use crate::tools::{CallableFunction, ToolFormat, forced_call};

const ESSAY: &str = "Write a long, detailed essay about the history of computing, from the mechanical \
calculators of Pascal and Leibniz to today's networks of machines. Answer as a JSON object with the key \"essay\".";

#[derive(Debug, Serialize)]
struct CompileFigure {
    grammar: &'static str,
    median_ms: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    model: String,
    threads: usize,
    decode_tokens: usize,
    /// Building the vocabulary's token trie for the grammar engine, once
    /// per model (on the first constrained request).
    vocabulary_ms: f64,
    compile: Vec<CompileFigure>,
    plain: Vec<StreamTiming>,
    schema: Vec<StreamTiming>,
    median_plain_tok_s: f64,
    median_schema_tok_s: f64,
    median_plain_ttft_s: f64,
    median_schema_ttft_s: f64,
    calls: usize,
    well_formed_calls: usize,
    /// What was wrong with the calls that were not well formed.
    failures: Vec<String>,
}

pub async fn bench(args: StructuredBenchArgs) -> anyhow::Result<()> {
    if args.rounds == 0 || args.decode_tokens == 0 || args.threads == 0 {
        bail!("--rounds, --decode-tokens and --threads must all be at least 1");
    }
    let runtime = super::cpu_runtime(args.threads, args.cache.store());
    let model = LoadedModel::load_whole(&runtime, &args.model).await?;
    let name = model.name.clone();
    let format = ToolFormat::of(model.prompt.template());
    eprintln!(
        "ringlet bench structured: {name} with {} threads, {} decode tokens, {} rounds, {} forced calls",
        args.threads, args.decode_tokens, args.rounds, args.calls
    );

    let grammars = Arc::clone(model.prompt.grammars());
    let (vocabulary_ms, compile) =
        tokio::task::spawn_blocking(move || compile_times(&grammars, format))
            .await
            .context("the compile measurement failed")??;
    eprintln!("  vocabulary for the grammar engine: {vocabulary_ms:.0} ms (once per model)");
    for figure in &compile {
        eprintln!("  compile {}: {:.2} ms", figure.grammar, figure.median_ms);
    }

    let (engine, state) = crate::serve::start_local_engine(model, DEFAULT_KV_CACHE_BYTES)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server =
        tokio::spawn(async move { axum::serve(listener, crate::api::router(state)).await });

    let plain_body = essay_body(&name, args.decode_tokens, false);
    let schema_body = essay_body(&name, args.decode_tokens, true);
    let (mut plain, mut schema) = (Vec::new(), Vec::new());
    for round in 1..=args.rounds {
        let p = stream(addr, &plain_body).await?;
        let s = stream(addr, &schema_body).await?;
        eprintln!(
            "  round {round}/{}: decode {:6.1} tok/s plain ({} tokens), {:6.1} tok/s with a schema ({} tokens)",
            args.rounds, p.decode_tok_s, p.completion_tokens, s.decode_tok_s, s.completion_tokens
        );
        plain.push(p);
        schema.push(s);
    }

    let mut failures = Vec::new();
    for seed in 0..args.calls {
        if let Err(problem) = forced_weather_call(addr, &name, seed).await? {
            failures.push(format!("seed {seed}: {problem}"));
        }
    }
    eprintln!(
        "  forced tool calls: {} of {} well formed",
        args.calls - failures.len(),
        args.calls
    );
    server.abort();
    tokio::task::spawn_blocking(move || engine.shutdown())
        .await
        .ok();

    let rates = |t: &[StreamTiming]| median(&t.iter().map(|t| t.decode_tok_s).collect::<Vec<_>>());
    let ttfts = |t: &[StreamTiming]| median(&t.iter().map(|t| t.ttft_s).collect::<Vec<_>>());
    let report = Report {
        model: name,
        threads: args.threads,
        decode_tokens: args.decode_tokens,
        vocabulary_ms,
        compile,
        median_plain_tok_s: rates(&plain),
        median_schema_tok_s: rates(&schema),
        median_plain_ttft_s: ttfts(&plain),
        median_schema_ttft_s: ttfts(&schema),
        plain,
        schema,
        calls: args.calls,
        well_formed_calls: args.calls - failures.len(),
        failures,
    };
    print_report(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("results written to {}", path.display());
    }
    Ok(())
}

fn essay_body(model: &str, decode_tokens: usize, schema: bool) -> String {
    let mut body = json!({
        "model": model,
        "messages": [{ "role": "user", "content": ESSAY }],
        "temperature": 0,
        "max_tokens": decode_tokens,
        "stream": true,
        "stream_options": { "include_usage": true },
    });
    if schema {
        body["response_format"] = json!({ "type": "json_schema", "json_schema": { "name": "essay", "schema": {
            "type": "object", "properties": { "essay": { "type": "string" } },
            "required": ["essay"], "additionalProperties": false
        } } });
    }
    body.to_string()
}

/// The weather function the forced calls name.
fn weather_parameters() -> Value {
    json!({
        "type": "object",
        "properties": {
            "city": { "type": "string", "maxLength": 40 },
            "unit": { "type": "string", "enum": ["celsius", "fahrenheit"] },
            "days": { "type": "integer", "minimum": 1, "maximum": 14 }
        },
        "required": ["city", "unit"],
        "additionalProperties": false
    })
}

/// A schema of the size real applications send: nested objects, arrays,
/// enums, numbers with bounds, optional fields.
fn large_schema() -> Value {
    let address = json!({
        "type": "object",
        "properties": {
            "street": { "type": "string", "maxLength": 80 },
            "city": { "type": "string", "maxLength": 40 },
            "postcode": { "type": "string", "pattern": "^[0-9]{4,6}$" },
            "country": { "type": "string", "enum": ["FR", "DE", "ES", "IT", "NL", "NO", "SE"] }
        },
        "required": ["street", "city", "country"],
        "additionalProperties": false
    });
    json!({
        "type": "object",
        "properties": {
            "id": { "type": "integer", "minimum": 1 },
            "name": { "type": "string", "minLength": 1, "maxLength": 60 },
            "email": { "type": "string", "format": "email" },
            "age": { "type": "integer", "minimum": 0, "maximum": 130 },
            "score": { "type": "number", "minimum": 0, "maximum": 1 },
            "active": { "type": "boolean" },
            "tags": { "type": "array", "items": { "type": "string", "maxLength": 20 }, "maxItems": 8 },
            "home": address.clone(),
            "work": address,
            "orders": { "type": "array", "maxItems": 5, "items": {
                "type": "object",
                "properties": {
                    "sku": { "type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$" },
                    "quantity": { "type": "integer", "minimum": 1, "maximum": 99 },
                    "status": { "enum": ["open", "shipped", "delivered", "returned"] }
                },
                "required": ["sku", "quantity", "status"],
                "additionalProperties": false
            } }
        },
        "required": ["id", "name", "email", "active", "home", "orders"],
        "additionalProperties": false
    })
}

/// Times the vocabulary build (the first compile), then the median of
/// ten compiles of each grammar.
fn compile_times(
    grammars: &Grammars,
    format: ToolFormat,
) -> anyhow::Result<(f64, Vec<CompileFigure>)> {
    let object = Constraint::JsonSchema(r#"{"type": "object"}"#.into());
    let started = Instant::now();
    grammars.matcher(&object)?;
    let first_ms = started.elapsed().as_secs_f64() * 1e3;
    let cases: [(&'static str, Constraint); 4] = [
        ("json_object", object),
        (
            "a 3-property schema",
            Constraint::JsonSchema(weather_parameters().to_string()),
        ),
        (
            "a 10-property nested schema",
            Constraint::JsonSchema(large_schema().to_string()),
        ),
        (
            "a forced call of one of 2 functions",
            forced_call(
                format,
                &[
                    CallableFunction {
                        name: "get_weather".into(),
                        parameters: Some(weather_parameters()),
                    },
                    CallableFunction {
                        name: "get_customer".into(),
                        parameters: Some(large_schema()),
                    },
                ],
            ),
        ),
    ];
    let mut figures = Vec::new();
    let mut one_ms = 0.0;
    for (grammar, constraint) in cases {
        let mut times = Vec::new();
        for _ in 0..10 {
            let started = Instant::now();
            grammars.matcher(&constraint)?;
            times.push(started.elapsed().as_secs_f64() * 1e3);
        }
        let median_ms = median(&times);
        if grammar == "json_object" {
            one_ms = median_ms;
        }
        figures.push(CompileFigure { grammar, median_ms });
    }
    Ok(((first_ms - one_ms).max(0.0), figures))
}

/// One forced call at temperature 1: `Err` says what is wrong with it.
async fn forced_weather_call(
    addr: SocketAddr,
    model: &str,
    seed: usize,
) -> anyhow::Result<Result<(), String>> {
    let cities = ["Paris", "Oslo", "Lima", "Kyoto", "Cairo"];
    let body = json!({
        "model": model,
        "messages": [{ "role": "user", "content": format!("What is the weather in {} this week?", cities[seed % cities.len()]) }],
        "tools": [{ "type": "function", "function": {
            "name": "get_weather", "description": "The weather forecast for a city",
            "parameters": weather_parameters()
        } }],
        "tool_choice": "required",
        "temperature": 1.0,
        "seed": seed,
        "max_tokens": 80,
    })
    .to_string();
    let answer = post(addr, &body).await?;
    let choice = &answer["choices"][0];
    if choice["finish_reason"] != "tool_calls" {
        return Ok(Err(format!("finish_reason {}", choice["finish_reason"])));
    }
    let calls = choice["message"]["tool_calls"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let [call] = calls.as_slice() else {
        return Ok(Err(format!("{} calls", calls.len())));
    };
    if call["function"]["name"] != "get_weather" {
        return Ok(Err(format!("named {}", call["function"]["name"])));
    }
    let arguments = call["function"]["arguments"].as_str().unwrap_or_default();
    Ok(valid_weather_arguments(arguments))
}

/// Checks arguments against [`weather_parameters`].
fn valid_weather_arguments(text: &str) -> Result<(), String> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| format!("arguments not JSON ({e}): {text}"))?;
    let object = value.as_object().ok_or(format!("not an object: {text}"))?;
    if object
        .keys()
        .any(|k| !["city", "unit", "days"].contains(&k.as_str()))
    {
        return Err(format!("an unknown key: {text}"));
    }
    let city = value["city"].as_str().ok_or(format!("no city: {text}"))?;
    if city.chars().count() > 40 {
        return Err(format!("city too long: {text}"));
    }
    if !["celsius", "fahrenheit"].contains(&value["unit"].as_str().unwrap_or_default()) {
        return Err(format!("bad unit: {text}"));
    }
    if let Some(days) = value.get("days")
        && !days.as_u64().is_some_and(|d| (1..=14).contains(&d))
    {
        return Err(format!("bad days: {text}"));
    }
    Ok(())
}

/// A whole (not streamed) answer's JSON.
async fn post(addr: SocketAddr, body: &str) -> anyhow::Result<Value> {
    let mut socket = send_chat(addr, body).await?;
    let mut response = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(crate::limits::BENCH_REQUEST_TIMEOUT_SECS),
        socket.read_to_end(&mut response),
    )
    .await
    .context("the request timed out")??;
    let text = String::from_utf8_lossy(&response);
    let (head, json) = text
        .split_once("\r\n\r\n")
        .context("an HTTP response without a body")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!(
            "the node answered {}: {json}",
            head.lines().next().unwrap_or("")
        );
    }
    serde_json::from_str(json).context("an answer that is not JSON")
}

fn print_report(report: &Report) {
    println!();
    println!(
        "{}: {} threads, one node, greedy essay of up to {} tokens, medians",
        report.model, report.threads, report.decode_tokens
    );
    println!("| answer | decode tok/s | time to first token ms |");
    println!("|---|---:|---:|");
    println!(
        "| free text | {:.1} | {:.0} |",
        report.median_plain_tok_s,
        report.median_plain_ttft_s * 1e3
    );
    println!(
        "| JSON schema | {:.1} | {:.0} |",
        report.median_schema_tok_s,
        report.median_schema_ttft_s * 1e3
    );
    println!(
        "decode with a schema: {:.2}x without",
        report.median_schema_tok_s / report.median_plain_tok_s.max(f64::MIN_POSITIVE)
    );
    println!();
    println!("| grammar | compile ms (median of 10) |");
    println!("|---|---:|");
    for figure in &report.compile {
        println!("| {} | {:.2} |", figure.grammar, figure.median_ms);
    }
    println!(
        "vocabulary for the grammar engine: {:.0} ms, once per model",
        report.vocabulary_ms
    );
    println!();
    println!(
        "forced tool calls at temperature 1: {} of {} well formed",
        report.well_formed_calls, report.calls
    );
    for failure in &report.failures {
        println!("  {failure}");
    }
}
