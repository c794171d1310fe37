//! The OpenAI-compatible API, driven in-process through `Router::oneshot`
//! against the real default model.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a failed expectation is the report

use std::sync::OnceLock;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use ringlet_node::api::{self, AppState};
use ringlet_node::cli::RuntimeConfig;
use ringlet_node::loaded_model::LoadedModel;
use ringlet_node::model_store::ModelStore;
use serde_json::{Value, json};
use tower::ServiceExt;

const MODEL: &str = "smollm2-135m";
const GOLDEN: &str = include_str!("golden/smollm2-135m.json");
/// Small enough to test refusal and waiting: about 1,450 tokens of KV cache.
const KV_BUDGET_BYTES: u64 = 64 << 20;

/// One engine for every test in this binary; it runs on its own threads.
fn state() -> AppState {
    static STATE: OnceLock<AppState> = OnceLock::new();
    STATE
        .get_or_init(|| {
            // Loaded on a thread of its own: tests already run inside a runtime.
            std::thread::spawn(|| {
                let runtime = tokio::runtime::Runtime::new().expect("runtime");
                let config = RuntimeConfig {
                    threads: 2,
                    store: ModelStore::new(ModelStore::default_dir()),
                    device: kernels::Device::Cpu,
                    kv_cache_bytes: KV_BUDGET_BYTES,
                    prefill_chunk_tokens: 512,
                    hub: ringlet_node::hub::HubConfig::from_env(),
                };
                let model = runtime
                    .block_on(LoadedModel::load_whole(&config, MODEL))
                    .expect("load the default model");
                let (_engine, state) =
                    ringlet_node::serve::start_local_engine(model, KV_BUDGET_BYTES)
                        .expect("start engine");
                state
            })
            .join()
            .expect("model loading thread")
        })
        .clone()
}

async fn send(request: Request<Body>) -> (StatusCode, Bytes) {
    let response = api::router(state())
        .oneshot(request)
        .await
        .expect("infallible router");
    let status = response.status();
    let body = tokio::time::timeout(Duration::from_secs(120), response.into_body().collect())
        .await
        .expect("body within the timeout")
        .expect("body")
        .to_bytes();
    (status, body)
}

async fn post_chat(body: impl Into<Body>) -> (StatusCode, Value) {
    post_json("/v1/chat/completions", body).await
}

async fn post_json(path: &str, body: impl Into<Body>) -> (StatusCode, Value) {
    let request = Request::post(path)
        .header("content-type", "application/json")
        .body(body.into())
        .expect("request");
    let (status, bytes) = send(request).await;
    let json = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)));
    (status, json)
}

async fn post_chat_stream(body: Value) -> Vec<String> {
    let request = Request::post("/v1/chat/completions")
        .body(Body::from(body.to_string()))
        .expect("request");
    let (status, bytes) = send(request).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&bytes)
    );
    String::from_utf8_lossy(&bytes)
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

fn chat(messages: Value, extra: Value) -> Value {
    let mut body = json!({ "model": MODEL, "messages": messages });
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    body
}

fn user(text: &str) -> Value {
    json!([{ "role": "user", "content": text }])
}

fn content(response: &Value) -> &str {
    response["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
}

#[tokio::test]
async fn greedy_completion_matches_llama_cpp_golden_text() {
    let golden: Value = serde_json::from_str(GOLDEN).expect("golden");
    for case in golden["cases"].as_array().expect("cases") {
        let body = chat(
            case["messages"].clone(),
            json!({ "temperature": 0, "max_tokens": 32 }),
        );
        let (status, response) = post_chat(body.to_string()).await;
        assert_eq!(status, StatusCode::OK, "{response}");
        assert_eq!(
            content(&response),
            case["output_text"].as_str().expect("text"),
            "case {}",
            case["name"]
        );
        assert_eq!(response["choices"][0]["finish_reason"], "length");
        assert_eq!(response["object"], "chat.completion");
        assert_eq!(response["model"], MODEL);
        let usage = &response["usage"];
        assert_eq!(
            usage["prompt_tokens"],
            case["prompt_ids"].as_array().expect("ids").len()
        );
        assert_eq!(usage["completion_tokens"], 32);
        assert_eq!(
            usage["total_tokens"].as_u64(),
            Some(usage["prompt_tokens"].as_u64().unwrap_or(0) + 32)
        );
        assert!(
            response["id"]
                .as_str()
                .is_some_and(|id| id.starts_with("chatcmpl-"))
        );
    }
}

#[tokio::test]
async fn streaming_gives_the_same_text_then_usage_then_done() {
    let messages = user("Name three planets.");
    let (_, whole) = post_chat(
        chat(
            messages.clone(),
            json!({ "temperature": 0, "max_tokens": 24 }),
        )
        .to_string(),
    )
    .await;
    let events = post_chat_stream(chat(
        messages,
        json!({ "temperature": 0, "max_tokens": 24, "stream": true, "stream_options": { "include_usage": true } }),
    ))
    .await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("chunk"))
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"])
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, content(&whole));
    let usage_chunk = chunks.last().expect("usage chunk");
    assert_eq!(usage_chunk["choices"].as_array().map(Vec::len), Some(0));
    assert_eq!(usage_chunk["usage"], whole["usage"]);
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(
        finish["choices"][0]["finish_reason"],
        whole["choices"][0]["finish_reason"]
    );
    assert!(
        chunks[..chunks.len() - 1]
            .iter()
            .all(|c| c["usage"].is_null()),
        "usage is null until the last chunk"
    );

    // Without include_usage there is no usage chunk and no usage field.
    let events =
        post_chat_stream(chat(user("Hi"), json!({ "max_tokens": 4, "stream": true }))).await;
    assert!(
        events
            .iter()
            .filter(|e| *e != "[DONE]")
            .all(|e| !e.contains("\"usage\""))
    );
}

#[tokio::test]
async fn stop_sequences_end_the_text_truthfully() {
    let messages = user("Explain how a rainbow forms.");
    let (_, free) = post_chat(
        chat(
            messages.clone(),
            json!({ "temperature": 0, "max_tokens": 32 }),
        )
        .to_string(),
    )
    .await;
    let text = content(&free).to_string();
    // Stop at the second word of the free answer.
    let word = text
        .split_whitespace()
        .nth(1)
        .expect("a second word")
        .to_string();
    let stop_at = text.find(&word).expect("word in text");
    for stream in [false, true] {
        let body = chat(
            messages.clone(),
            json!({ "temperature": 0, "max_tokens": 32, "stop": [word.clone(), "NEVER-MATCHES"], "stream": stream }),
        );
        let (got, finish) = if stream {
            let events = post_chat_stream(body).await;
            let chunks: Vec<Value> = events
                .iter()
                .filter(|e| *e != "[DONE]")
                .map(|e| serde_json::from_str(e).expect("json"))
                .collect();
            let text: String = chunks
                .iter()
                .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
                .collect();
            let finish = chunks.iter().find_map(|c| {
                c["choices"][0]["finish_reason"]
                    .as_str()
                    .map(str::to_string)
            });
            (text, finish)
        } else {
            let (_, response) = post_chat(body.to_string()).await;
            (
                content(&response).to_string(),
                response["choices"][0]["finish_reason"]
                    .as_str()
                    .map(str::to_string),
            )
        };
        assert_eq!(got, text[..stop_at], "stream={stream}");
        assert_eq!(finish.as_deref(), Some("stop"), "stream={stream}");
    }
}

#[tokio::test]
async fn same_seed_same_sample_and_max_completion_tokens() {
    let body = |seed: u64| {
        chat(
            user("Tell me a story."),
            json!({ "temperature": 1.0, "top_p": 0.95, "seed": seed, "max_completion_tokens": 20 }),
        )
        .to_string()
    };
    let (_, a) = post_chat(body(42)).await;
    let (_, b) = post_chat(body(42)).await;
    let (_, c) = post_chat(body(7)).await;
    assert_eq!(content(&a), content(&b));
    assert_ne!(content(&a), content(&c));
    assert_eq!(a["usage"]["completion_tokens"], 20);
}

/// Sequences that went through a stage step together with others, from
/// the node's metrics: steps of more than one sequence, and all steps.
async fn batched_steps() -> (f64, f64) {
    let (_, bytes) = send(Request::get("/metrics").body(Body::empty()).unwrap()).await;
    let text = String::from_utf8_lossy(&bytes).to_string();
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    };
    let steps = value("ringlet_step_sequences_count ");
    let single = value("ringlet_step_sequences_bucket{le=\"1\"} ");
    (steps - single, steps)
}

/// Eight concurrent requests, greedy and seeded, run in batched steps and
/// each gets the text it gets alone.
#[tokio::test]
async fn batched_requests_get_the_answers_they_get_alone() {
    let bodies: Vec<String> = [
        "Name a colour.",
        "Name an animal.",
        "Name a city.",
        "Name a fruit.",
        "Tell me a story.",
        "Write a poem about rain.",
        "What is a star?",
        "Describe a forest.",
    ]
    .iter()
    .enumerate()
    .map(|(i, p)| {
        let sampling = if i % 2 == 0 {
            json!({ "temperature": 0, "max_tokens": 24 })
        } else {
            json!({ "temperature": 1.0, "top_p": 0.9, "seed": 100 + i, "max_tokens": 24 })
        };
        chat(user(p), sampling).to_string()
    })
    .collect();
    let mut alone = Vec::new();
    for body in &bodies {
        let (_, r) = post_chat(body.clone()).await;
        alone.push(content(&r).to_string());
    }
    let (batched_before, _) = batched_steps().await;
    let together =
        futures_util::future::join_all(bodies.iter().map(|b| post_chat(b.clone()))).await;
    for (i, ((status, response), expected)) in together.iter().zip(&alone).enumerate() {
        assert_eq!(*status, StatusCode::OK);
        assert_eq!(content(response), expected, "request {i}");
    }
    let (batched_after, _) = batched_steps().await;
    assert!(
        batched_after > batched_before,
        "eight concurrent requests ran in steps of several sequences"
    );
}

/// A request that joins running streams, and one whose client leaves
/// while the others run, change no other stream's text.
#[tokio::test]
async fn joining_and_cancelled_requests_do_not_change_the_others() {
    let body = |p: &str, stream: bool| {
        chat(
            user(p),
            json!({ "temperature": 0, "max_tokens": 40, "stream": stream }),
        )
        .to_string()
    };
    let prompts = [
        "Describe the sea.",
        "Describe a mountain.",
        "Describe a city.",
    ];
    let mut alone = Vec::new();
    for p in prompts {
        let (_, r) = post_chat(body(p, false)).await;
        alone.push(content(&r).to_string());
    }
    let joining = "Describe a desert.";
    let (_, r) = post_chat(body(joining, false)).await;
    let joining_alone = content(&r).to_string();

    let mut stats = state().engine.stats();
    let cancelled_before = stats.borrow().cancelled;
    // A stream that is dropped after its first pieces of text.
    let leaving = async {
        let body = body("Write a very long essay about the ocean.", true);
        drop(stream_until(body, |seen| seen.matches("\"content\":\"").count() >= 5).await);
    };
    // One more joins once the others run.
    let joins = async {
        let mut stats = state().engine.stats();
        tokio::time::timeout(Duration::from_secs(60), stats.wait_for(|s| s.active >= 3))
            .await
            .expect("the others start within 60 s")
            .expect("engine alive");
        post_chat(body(joining, false)).await
    };
    let running = futures_util::future::join_all(prompts.iter().map(|p| post_chat(body(p, false))));
    let (running, (), (status, joined)) = tokio::join!(running, leaving, joins);
    for ((status, response), expected) in running.iter().zip(&alone) {
        assert_eq!(*status, StatusCode::OK);
        assert_eq!(content(response), expected);
    }
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content(&joined), joining_alone, "the request that joined");
    tokio::time::timeout(
        Duration::from_secs(30),
        stats.wait_for(|s| s.cancelled > cancelled_before),
    )
    .await
    .expect("the engine cancels the stream whose client left within 30 s")
    .expect("engine alive");
}

/// Starts a streamed chat and reads it until what came satisfies `enough`;
/// returns the rest of the body, to drop (the client hangs up) or read.
async fn stream_until(body: String, enough: impl Fn(&str) -> bool) -> Body {
    let request = Request::post("/v1/chat/completions")
        .body(Body::from(body))
        .expect("request");
    let response = api::router(state())
        .oneshot(request)
        .await
        .expect("response");
    let mut body = response.into_body();
    let mut seen = String::new();
    while !enough(&seen) {
        let frame = tokio::time::timeout(Duration::from_secs(60), body.frame())
            .await
            .expect("a frame within 60 s")
            .unwrap_or_else(|| panic!("the stream ended early: {seen}"))
            .expect("frame");
        if let Some(data) = frame.data_ref() {
            seen.push_str(&String::from_utf8_lossy(data));
        }
    }
    body
}

#[tokio::test]
async fn dropping_a_stream_cancels_its_generation() {
    let mut stats = state().engine.stats();
    let cancelled_before = stats.borrow().cancelled;
    let body = chat(
        user("Write a very long essay about the ocean."),
        json!({ "temperature": 0, "max_tokens": 1000, "stream": true }),
    );
    // Read until some content has arrived, then hang up.
    let body = stream_until(body.to_string(), |seen| {
        seen.contains("\"content\":\"") && seen.matches("data:").count() >= 3
    })
    .await;
    drop(body);
    tokio::time::timeout(
        Duration::from_secs(30),
        stats.wait_for(|s| s.cancelled > cancelled_before),
    )
    .await
    .expect("the engine cancels within 30 s")
    .expect("engine alive");
}

/// A request the API must refuse, and how: the status, `param` and `code`.
type ErrorCase = (
    &'static str,
    String,
    StatusCode,
    Option<&'static str>,
    Option<&'static str>,
);

#[tokio::test]
async fn bad_requests_get_openai_errors() {
    let long_prompt = "word ".repeat(9_000);
    let cases: Vec<ErrorCase> = vec![
        ("malformed json", "{\"model\": ".into(), StatusCode::BAD_REQUEST, None, None),
        ("empty body", String::new(), StatusCode::BAD_REQUEST, None, None),
        ("not an object", "[1, 2]".into(), StatusCode::BAD_REQUEST, None, None),
        ("missing messages", json!({ "model": MODEL }).to_string(), StatusCode::BAD_REQUEST, None, None),
        ("empty messages", chat(json!([]), json!({})).to_string(), StatusCode::BAD_REQUEST, Some("messages"), None),
        ("unknown model", json!({ "model": "gpt-9", "messages": user("hi") }).to_string(), StatusCode::NOT_FOUND, Some("model"), Some("model_not_found")),
        ("temperature is a string", chat(user("hi"), json!({ "temperature": "hot" })).to_string(), StatusCode::BAD_REQUEST, Some("temperature"), None),
        ("temperature out of range", chat(user("hi"), json!({ "temperature": 3.5 })).to_string(), StatusCode::BAD_REQUEST, Some("temperature"), None),
        ("top_p out of range", chat(user("hi"), json!({ "top_p": 0 })).to_string(), StatusCode::BAD_REQUEST, Some("top_p"), None),
        ("max_tokens is zero", chat(user("hi"), json!({ "max_tokens": 0 })).to_string(), StatusCode::BAD_REQUEST, Some("max_tokens"), None),
        ("max_tokens negative", chat(user("hi"), json!({ "max_tokens": -5 })).to_string(), StatusCode::BAD_REQUEST, Some("max_tokens"), None),
        ("unknown role", chat(json!([{ "role": "wizard", "content": "hi" }]), json!({})).to_string(), StatusCode::BAD_REQUEST, Some("messages[0].role"), None),
        ("content is a number", chat(json!([{ "role": "user", "content": 5 }]), json!({})).to_string(), StatusCode::BAD_REQUEST, Some("messages[0].content"), None),
        ("image content", chat(json!([{ "role": "user", "content": [{ "type": "image_url", "image_url": { "url": "x" } }] }]), json!({})).to_string(), StatusCode::BAD_REQUEST, Some("messages[0].content"), None),
        ("n above one", chat(user("hi"), json!({ "n": 2 })).to_string(), StatusCode::BAD_REQUEST, Some("n"), None),
        ("too many stops", chat(user("hi"), json!({ "stop": ["a", "b", "c", "d", "e"] })).to_string(), StatusCode::BAD_REQUEST, Some("stop"), None),
        ("prompt longer than the context", chat(user(&long_prompt), json!({})).to_string(), StatusCode::BAD_REQUEST, Some("messages"), Some("context_length_exceeded")),
        ("completion past the context", chat(user("hi"), json!({ "max_tokens": 9000 })).to_string(), StatusCode::BAD_REQUEST, Some("messages"), Some("context_length_exceeded")),
        ("top_logprobs of 21", chat(user("hi"), json!({ "logprobs": true, "top_logprobs": 21 })).to_string(), StatusCode::BAD_REQUEST, Some("top_logprobs"), None),
        ("top_logprobs without logprobs", chat(user("hi"), json!({ "top_logprobs": 2 })).to_string(), StatusCode::BAD_REQUEST, Some("top_logprobs"), None),
        ("presence_penalty out of range", chat(user("hi"), json!({ "presence_penalty": 2.5 })).to_string(), StatusCode::BAD_REQUEST, Some("presence_penalty"), None),
        ("frequency_penalty out of range", chat(user("hi"), json!({ "frequency_penalty": -3 })).to_string(), StatusCode::BAD_REQUEST, Some("frequency_penalty"), None),
        ("repetition_penalty of zero", chat(user("hi"), json!({ "repetition_penalty": 0 })).to_string(), StatusCode::BAD_REQUEST, Some("repetition_penalty"), None),
        ("min_p above one", chat(user("hi"), json!({ "min_p": 1.5 })).to_string(), StatusCode::BAD_REQUEST, Some("min_p"), None),
        ("logit_bias key not a token", chat(user("hi"), json!({ "logit_bias": { "hello": 5 } })).to_string(), StatusCode::BAD_REQUEST, Some("logit_bias"), None),
        ("logit_bias token past the vocabulary", chat(user("hi"), json!({ "logit_bias": { "99999999": 5 } })).to_string(), StatusCode::BAD_REQUEST, Some("logit_bias"), None),
        ("logit_bias out of range", chat(user("hi"), json!({ "logit_bias": { "42": 150 } })).to_string(), StatusCode::BAD_REQUEST, Some("logit_bias"), None),
        ("tools not a list", chat(user("hi"), json!({ "tools": weather_tool() })).to_string(), StatusCode::BAD_REQUEST, Some("tools"), None),
        ("a function without a name", chat(user("hi"), json!({ "tools": [{ "type": "function", "function": { "description": "x" } }] })).to_string(), StatusCode::BAD_REQUEST, Some("tools[0].function.name"), None),
        ("a tool that is not a function", chat(user("hi"), json!({ "tools": [{ "type": "retrieval", "function": { "name": "x" } }] })).to_string(), StatusCode::BAD_REQUEST, Some("tools[0].type"), None),
        ("parameters not an object", chat(user("hi"), json!({ "tools": [{ "type": "function", "function": { "name": "x", "parameters": [1] } }] })).to_string(), StatusCode::BAD_REQUEST, Some("tools[0].function.parameters"), None),
        ("parameters with an unsupported keyword", chat(user("hi"), json!({ "tools": [{ "type": "function", "function": { "name": "x", "parameters": { "type": "object", "dependentSchemas": {} } } }], "tool_choice": "required" })).to_string(), StatusCode::BAD_REQUEST, Some("tools[0].function.parameters"), None),
        ("tool_choice names no tool", chat(user("hi"), json!({ "tools": [weather_tool()], "tool_choice": { "type": "function", "function": { "name": "launch" } } })).to_string(), StatusCode::BAD_REQUEST, Some("tool_choice.function.name"), None),
        ("tool_choice required without tools", chat(user("hi"), json!({ "tool_choice": "required" })).to_string(), StatusCode::BAD_REQUEST, Some("tool_choice"), None),
        ("a tool message without tool_call_id", chat(json!([{ "role": "user", "content": "hi" }, { "role": "tool", "content": "18" }]), json!({})).to_string(), StatusCode::BAD_REQUEST, Some("messages[1].tool_call_id"), None),
        ("arguments that are not JSON", chat(json!([{ "role": "user", "content": "hi" }, { "role": "assistant", "content": null, "tool_calls": [{ "id": "c", "type": "function", "function": { "name": "x", "arguments": "{oops" } }] }]), json!({})).to_string(), StatusCode::BAD_REQUEST, Some("messages[1].tool_calls[0].function.arguments"), None),
        ("a schema that is not an object", chat(user("hi"), json!({ "response_format": { "type": "json_schema", "json_schema": { "name": "x", "schema": 5 } } })).to_string(), StatusCode::BAD_REQUEST, Some("response_format.json_schema.schema"), None),
        ("a schema with an unsupported keyword", chat(user("hi"), json!({ "response_format": { "type": "json_schema", "json_schema": { "name": "x", "schema": { "type": "array", "uniqueItems": true } } } })).to_string(), StatusCode::BAD_REQUEST, Some("response_format.json_schema.schema"), None),
        ("an unknown response_format", chat(user("hi"), json!({ "response_format": { "type": "yaml" } })).to_string(), StatusCode::BAD_REQUEST, Some("response_format.type"), None),
        ("response_format with a forced call", chat(user("hi"), json!({ "tools": [weather_tool()], "tool_choice": "required", "response_format": { "type": "json_object" } })).to_string(), StatusCode::BAD_REQUEST, Some("response_format"), None),
    ];
    for (name, body, status, param, code) in cases {
        let (got, json) = post_chat(body).await;
        assert_eq!(got, status, "{name}: {json}");
        let error = &json["error"];
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{name}: {json}"
        );
        let kind = if status.is_server_error() {
            "server_error"
        } else {
            "invalid_request_error"
        };
        assert_eq!(error["type"], kind, "{name}");
        assert_eq!(error["param"].as_str(), param, "{name}: {json}");
        assert_eq!(error["code"].as_str(), code, "{name}: {json}");
    }
}

#[tokio::test]
async fn oversized_bodies_and_unknown_routes_are_json_errors() {
    let huge = format!(
        "{{\"model\":\"{MODEL}\",\"messages\":[{{\"role\":\"user\",\"content\":\"{}\"}}]}}",
        "a".repeat(5 << 20)
    );
    let (status, json) = post_chat(huge).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{json}");
    assert_eq!(json["error"]["type"], "invalid_request_error");

    let (status, body) = send(
        Request::get("/v1/nope")
            .body(Body::empty())
            .expect("request"),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let json: Value = serde_json::from_slice(&body).expect("json");
    assert!(
        json["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("/v1/nope"))
    );

    let (status, body) = send(
        Request::get("/v1/chat/completions")
            .body(Body::empty())
            .expect("request"),
    )
    .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(serde_json::from_slice::<Value>(&body).is_ok());
}

#[tokio::test]
async fn models_and_health() {
    let (status, body) = send(
        Request::get("/v1/models")
            .body(Body::empty())
            .expect("request"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let json: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(json["object"], "list");
    assert_eq!(json["data"][0]["id"], MODEL);
    assert_eq!(json["data"][0]["object"], "model");

    let (status, body) = send(
        Request::get(format!("/v1/models/{MODEL}"))
            .body(Body::empty())
            .expect("request"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let (status, _) = send(
        Request::get("/v1/models/other")
            .body(Body::empty())
            .expect("request"),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (status, body) = send(
        Request::get("/healthz")
            .body(Body::empty())
            .expect("request"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let json: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(json["status"], "ok");
    assert_eq!(json["model"], MODEL);
}

#[tokio::test]
async fn kv_cache_budget_refuses_what_cannot_fit_and_queues_what_can() {
    // 3,000 tokens of KV cache can never fit 64 MiB: refused up front.
    let (status, json) =
        post_chat(chat(user("hi"), json!({ "max_tokens": 3000 })).to_string()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{json}");
    assert_eq!(json["error"]["param"], "max_tokens");
    assert!(
        json["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("KV")),
        "{json}"
    );

    // No max_tokens: not the context's 8,192 tokens, which would not fit,
    // but as many as fit beside the prompt.
    let (status, json) =
        post_chat(chat(user("Say hello."), json!({ "temperature": 0 })).to_string()).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    let per_token = 30 * 1_536; // SmolLM2: 30 layers of 1,536 bytes a token
    assert!(
        json["usage"]["total_tokens"]
            .as_u64()
            .is_some_and(|t| t * per_token <= KV_BUDGET_BYTES),
        "{json}"
    );

    // Two requests of 900 tokens each fit one at a time: the second waits
    // for the first, and both complete.
    let body = chat(
        user("Say hello."),
        json!({ "temperature": 0, "max_tokens": 900 }),
    )
    .to_string();
    let both = futures_util::future::join(post_chat(body.clone()), post_chat(body)).await;
    for (status, response) in [both.0, both.1] {
        assert_eq!(status, StatusCode::OK, "{response}");
        assert!(!content(&response).is_empty());
    }
    let stats = state().engine.stats().borrow().clone();
    assert!(stats.kv_reserved_bytes <= KV_BUDGET_BYTES, "{stats:?}");
}

#[tokio::test]
async fn a_stop_sequence_is_a_finish_not_a_cancellation() {
    let stats = state().engine.stats();
    let messages = user("Explain how a rainbow forms.");
    let (_, free) = post_chat(
        chat(
            messages.clone(),
            json!({ "temperature": 0, "max_tokens": 20 }),
        )
        .to_string(),
    )
    .await;
    let stop = content(&free)
        .split_whitespace()
        .nth(3)
        .expect("a fourth word")
        .to_string();
    let completed_before = stats.borrow().completed;
    let (status, response) = post_chat(
        chat(
            messages,
            json!({ "temperature": 0, "max_tokens": 20, "stop": stop }),
        )
        .to_string(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(response["choices"][0]["finish_reason"], "stop");
    let mut stats = stats.clone();
    tokio::time::timeout(
        Duration::from_secs(30),
        stats.wait_for(|s| s.completed > completed_before),
    )
    .await
    .expect("counted as completed within 30 s")
    .expect("engine alive");
}

/// The golden case's request with log probabilities asked for.
fn logprobs_request(stream: bool) -> Value {
    let case = &serde_json::from_str::<Value>(GOLDEN).expect("golden")["cases"][0];
    chat(
        case["messages"].clone(),
        json!({ "temperature": 0, "max_tokens": 12, "logprobs": true, "top_logprobs": 5, "stream": stream }),
    )
}

#[tokio::test]
async fn logprobs_come_with_each_token_streaming_or_not() {
    let (status, whole) = post_chat(logprobs_request(false).to_string()).await;
    assert_eq!(status, StatusCode::OK, "{whole}");
    let entries = whole["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("logprobs.content");
    assert_eq!(entries.len() as u64, whole["usage"]["completion_tokens"]);
    let text: String = entries
        .iter()
        .map(|e| e["token"].as_str().expect("token"))
        .collect();
    assert_eq!(text, content(&whole), "the tokens spell the answer");
    for entry in entries {
        let logprob = entry["logprob"].as_f64().expect("logprob");
        let top = entry["top_logprobs"].as_array().expect("top_logprobs");
        assert_eq!(top.len(), 5, "{entry}");
        // Greedy: the chosen token is the likeliest, and the list is in
        // order.
        assert_eq!(top[0]["token"], entry["token"], "{entry}");
        assert_eq!(top[0]["logprob"].as_f64(), Some(logprob));
        assert!(logprob <= 0.0);
        let values: Vec<f64> = top.iter().map(|t| t["logprob"].as_f64().unwrap()).collect();
        assert!(values.windows(2).all(|w| w[0] >= w[1]), "{values:?}");
        let mass: f64 = values.iter().map(|v| v.exp()).sum();
        assert!(mass <= 1.0 + 1e-4, "{mass}");
        let bytes: Vec<u8> = entry["bytes"]
            .as_array()
            .expect("bytes")
            .iter()
            .map(|b| b.as_u64().unwrap() as u8)
            .collect();
        assert_eq!(bytes, entry["token"].as_str().unwrap().as_bytes());
    }

    // Streamed, the chunks carry the same entries, in order.
    let events = post_chat_stream(logprobs_request(true)).await;
    let streamed: Vec<Value> = events
        .iter()
        .filter(|e| e.as_str() != "[DONE]")
        .map(|e| serde_json::from_str::<Value>(e).expect("chunk"))
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array().cloned())
        .flatten()
        .collect();
    assert_eq!(&streamed, entries);

    // Without the flag, no log probabilities.
    let case = &serde_json::from_str::<Value>(GOLDEN).expect("golden")["cases"][0];
    let (_, plain) = post_chat(
        chat(
            case["messages"].clone(),
            json!({ "temperature": 0, "max_tokens": 4 }),
        )
        .to_string(),
    )
    .await;
    assert!(plain["choices"][0]["logprobs"].is_null(), "{plain}");
}

#[tokio::test]
async fn logit_bias_and_penalties_steer_the_choice() {
    let case = &serde_json::from_str::<Value>(GOLDEN).expect("golden")["cases"][0];
    let greedy = |extra: Value| {
        let mut body = json!({ "temperature": 0, "max_tokens": 6, "logprobs": true });
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        chat(case["messages"].clone(), body)
    };
    let (_, plain) = post_chat(greedy(json!({})).to_string()).await;
    let plain_text = content(&plain).to_string();

    // A bias of 100 on a token makes it the first one.
    let (status, biased) =
        post_chat(greedy(json!({ "logit_bias": { "28": 100 } })).to_string()).await;
    assert_eq!(status, StatusCode::OK, "{biased}");
    let first = &biased["choices"][0]["logprobs"]["content"][0];
    let expected_first = {
        let state = state();
        let model = state.model.get();
        model.prompt.tokenizer().token_text(28)
    };
    assert_eq!(
        first["token"].as_str(),
        Some(expected_first.as_str()),
        "{biased}"
    );

    // A strong repetition penalty changes a greedy answer that repeats the
    // prompt's words; a penalty of 1 (off) changes nothing.
    let (_, off) =
        post_chat(greedy(json!({ "repetition_penalty": 1.0, "presence_penalty": 0 })).to_string())
            .await;
    assert_eq!(content(&off), plain_text);
    let (_, penalized) = post_chat(greedy(json!({ "repetition_penalty": 2.0 })).to_string()).await;
    assert_ne!(content(&penalized), plain_text, "{penalized}");
}

/// A greedy answer whose emoji are each split over several tokens (the
/// default model's bytes `F0 9F`, `98`, `80` for 😀).
#[tokio::test]
async fn tokens_that_split_a_character_report_their_own_bytes_and_offsets() {
    let (status, whole) = post_chat(
        chat(
            user("Repeat exactly: 😀😀😀😀"),
            json!({ "temperature": 0, "max_tokens": 24, "logprobs": true }),
        )
        .to_string(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{whole}");
    let answer = content(&whole);
    assert!(
        answer.contains('😀') && !answer.contains('\u{FFFD}'),
        "{answer}"
    );
    let entries = whole["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("logprobs.content");
    let bytes_of = |entry: &Value| -> Vec<u8> {
        let bytes = entry["bytes"].as_array().expect("bytes");
        bytes
            .iter()
            .map(|b| b.as_u64().expect("a byte") as u8)
            .collect()
    };
    assert!(
        entries
            .iter()
            .any(|e| std::str::from_utf8(&bytes_of(e)).is_err()),
        "no token holds a part of a character: {entries:?}"
    );
    // OpenAI's `bytes`: joined, the tokens' bytes are the answer's.
    let joined: Vec<u8> = entries.iter().flat_map(bytes_of).collect();
    assert_eq!(String::from_utf8(joined).as_deref(), Ok(answer));

    // The legacy offsets index the text: a character's tokens start where
    // it does, and each token's offset is that of the characters before.
    let (status, whole) = post_completions(json!({
        "model": MODEL, "prompt": "Smileys: 😀😀😀", "max_tokens": 12, "temperature": 0, "logprobs": 1
    }))
    .await;
    assert_eq!(status, StatusCode::OK, "{whole}");
    let choice = &whole["choices"][0];
    assert_eq!(choice["text"], "😀😀😀😀", "{whole}");
    let offsets: Vec<u64> = choice["logprobs"]["text_offset"]
        .as_array()
        .expect("text_offset")
        .iter()
        .map(|o| o.as_u64().expect("an offset"))
        .collect();
    assert_eq!(offsets, [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]);
}

async fn post_completions(body: Value) -> (StatusCode, Value) {
    post_json("/v1/completions", body.to_string()).await
}

#[tokio::test]
async fn legacy_completions_continue_text_whole_streamed_and_echoed() {
    let prompt = "The capital of France is";
    let (status, whole) = post_completions(
        json!({ "model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 2 }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{whole}");
    assert_eq!(whole["object"], "text_completion");
    let choice = &whole["choices"][0];
    let text = choice["text"].as_str().expect("text");
    assert!(!text.is_empty());
    assert_eq!(whole["usage"]["completion_tokens"], 8);
    assert_eq!(choice["finish_reason"], "length");
    let logprobs = &choice["logprobs"];
    let tokens: Vec<&str> = logprobs["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tokens.concat(), text);
    assert_eq!(logprobs["token_logprobs"].as_array().unwrap().len(), 8);
    assert_eq!(logprobs["text_offset"][0], 0);
    assert_eq!(
        logprobs["top_logprobs"][0].as_object().unwrap().len(),
        2,
        "{logprobs}"
    );

    // Streamed: the same text in pieces, then [DONE].
    let request = Request::post("/v1/completions")
        .body(Body::from(
            json!({ "model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": true, "stream_options": { "include_usage": true } })
                .to_string(),
        ))
        .expect("request");
    let (status, bytes) = send(request).await;
    assert_eq!(status, StatusCode::OK);
    let events: Vec<String> = String::from_utf8_lossy(&bytes)
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("chunk"))
        .collect();
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(streamed, text);
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 8);

    // Two prompts, one of them as token ids, echoed: two choices.
    let (status, two) = post_completions(json!({
        "model": MODEL, "prompt": [prompt, "Once upon a time"], "max_tokens": 4, "temperature": 0, "echo": true
    }))
    .await;
    assert_eq!(status, StatusCode::OK, "{two}");
    let choices = two["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    assert!(choices[0]["text"].as_str().unwrap().starts_with(prompt));
    assert!(
        choices[1]["text"]
            .as_str()
            .unwrap()
            .starts_with("Once upon a time")
    );
    assert_eq!(
        choices[0]["text"].as_str().unwrap(),
        format!(
            "{prompt}{}",
            &text[..choices[0]["text"].as_str().unwrap().len() - prompt.len()]
        )
    );
    assert_eq!(two["usage"]["completion_tokens"], 8);

    let bad: Vec<(&str, Value, &str)> = vec![
        (
            "n above one",
            json!({ "model": MODEL, "prompt": "x", "n": 2 }),
            "n",
        ),
        (
            "best_of above one",
            json!({ "model": MODEL, "prompt": "x", "best_of": 3 }),
            "best_of",
        ),
        (
            "suffix",
            json!({ "model": MODEL, "prompt": "x", "suffix": "y" }),
            "suffix",
        ),
        (
            "echo with logprobs",
            json!({ "model": MODEL, "prompt": "x", "echo": true, "logprobs": 1 }),
            "echo",
        ),
        (
            "empty prompt",
            json!({ "model": MODEL, "prompt": "" }),
            "prompt",
        ),
        (
            "no prompts",
            json!({ "model": MODEL, "prompt": [] }),
            "prompt",
        ),
        (
            "token past the vocabulary",
            json!({ "model": MODEL, "prompt": [1, 99999999] }),
            "prompt",
        ),
        (
            "logprobs of 21",
            json!({ "model": MODEL, "prompt": "x", "logprobs": 21 }),
            "logprobs",
        ),
        (
            "max_tokens of zero",
            json!({ "model": MODEL, "prompt": "x", "max_tokens": 0 }),
            "max_tokens",
        ),
    ];
    for (name, body, param) in bad {
        let (status, json) = post_completions(body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{name}: {json}");
        assert_eq!(json["error"]["param"], param, "{name}: {json}");
    }
}

/// Greedy log probabilities against llama-cpp-python's on the same file
/// (tests/golden/make_logprobs_reference.py): the same tokens, in the same
/// order, within 1e-4 (both are a log-softmax of the same logits, one in
/// f32, one in f64).
#[tokio::test]
async fn logprobs_agree_with_llama_cpp_python() {
    let reference: Value =
        serde_json::from_str(include_str!("golden/smollm2-135m-logprobs.json")).expect("reference");
    let golden: Value = serde_json::from_str(GOLDEN).expect("golden");
    let top = reference["settings"]["top"].as_u64().expect("top");
    for (case, expected) in golden["cases"]
        .as_array()
        .unwrap()
        .iter()
        .zip(reference["cases"].as_array().unwrap())
    {
        let steps = expected["steps"].as_array().unwrap();
        let body = chat(
            case["messages"].clone(),
            json!({ "temperature": 0, "max_tokens": steps.len(), "logprobs": true, "top_logprobs": top }),
        );
        let (status, answer) = post_chat(body.to_string()).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        let got = answer["choices"][0]["logprobs"]["content"]
            .as_array()
            .unwrap();
        assert_eq!(got.len(), steps.len(), "{}", case["name"]);
        for (i, (ours, theirs)) in got.iter().zip(steps).enumerate() {
            let at = format!("{} token {i}", case["name"]);
            assert_eq!(ours["token"], theirs["text"], "{at}");
            let close =
                |a: &Value, b: &Value| (a.as_f64().unwrap() - b.as_f64().unwrap()).abs() < 1e-4;
            assert!(
                close(&ours["logprob"], &theirs["logprob"]),
                "{at}: {ours} {theirs}"
            );
            for (o, t) in ours["top_logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .zip(theirs["top"].as_array().unwrap())
            {
                assert_eq!(o["token"], t["text"], "{at}");
                assert!(close(&o["logprob"], &t["logprob"]), "{at}: {o} {t}");
            }
        }
    }
}

#[tokio::test]
async fn metrics_count_requests_tokens_and_latencies() {
    let (status, _) = post_chat(
        chat(
            user("Name a colour."),
            json!({ "temperature": 0, "max_tokens": 5 }),
        )
        .to_string(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, bytes) = send(Request::get("/metrics").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8_lossy(&bytes).to_string();
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|rest| rest.trim().parse().ok())
            })
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    };
    assert!(
        value("ringlet_http_requests_total{route=\"/v1/chat/completions\",status=\"200\"}") >= 1.0
    );
    assert!(value("ringlet_completion_tokens_total") >= 5.0);
    assert!(value("ringlet_prompt_tokens_total") >= 1.0);
    assert!(value("ringlet_time_to_first_token_seconds_count") >= 1.0);
    assert!(value("ringlet_inter_token_latency_seconds_count") >= 4.0);
    assert!(value("ringlet_stage_step_seconds_count") >= 5.0);
    assert_eq!(
        value("ringlet_kv_cache_budget_bytes"),
        KV_BUDGET_BYTES as f64
    );
    assert!(
        text.contains("# TYPE ringlet_recoveries_total counter"),
        "{text}"
    );
    // Paths no route knows share one label, whatever they are.
    send(
        Request::get("/no/such/path/42")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    let (_, bytes) = send(Request::get("/metrics").body(Body::empty()).unwrap()).await;
    let text = String::from_utf8_lossy(&bytes);
    assert!(
        text.contains("route=\"unmatched\",status=\"404\""),
        "{text}"
    );
    assert!(!text.contains("/no/such/path"), "{text}");
}

fn weather_tool() -> Value {
    json!({
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": { "type": "string", "maxLength": 40 },
                    "unit": { "type": "string", "enum": ["celsius", "fahrenheit"] }
                },
                "required": ["city", "unit"],
                "additionalProperties": false
            }
        }
    })
}

fn time_tool() -> Value {
    json!({
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Current local time in a city",
            "parameters": {
                "type": "object",
                "properties": { "city": { "type": "string", "maxLength": 40 } },
                "required": ["city"],
                "additionalProperties": false
            }
        }
    })
}

/// A person, as a schema with the bounds a real one has.
fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": { "type": "string", "minLength": 1, "maxLength": 30 },
            "age": { "type": "integer", "minimum": 0, "maximum": 120 },
            "languages": {
                "type": "array", "maxItems": 3,
                "items": { "type": "string", "enum": ["English", "French", "German", "Spanish"] }
            }
        },
        "required": ["name", "age", "languages"],
        "additionalProperties": false
    })
}

/// Checks `value` against [`person_schema`] by hand.
fn assert_is_person(value: &Value, context: &str) {
    let object = value
        .as_object()
        .unwrap_or_else(|| panic!("{context}: not an object: {value}"));
    let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["age", "languages", "name"], "{context}: {value}");
    let name = value["name"]
        .as_str()
        .unwrap_or_else(|| panic!("{context}: name: {value}"));
    assert!(
        (1..=30).contains(&name.chars().count()),
        "{context}: {value}"
    );
    let age = value["age"]
        .as_u64()
        .unwrap_or_else(|| panic!("{context}: age: {value}"));
    assert!(age <= 120, "{context}: {value}");
    let languages = value["languages"]
        .as_array()
        .unwrap_or_else(|| panic!("{context}: {value}"));
    assert!(languages.len() <= 3, "{context}: {value}");
    for language in languages {
        assert!(
            ["English", "French", "German", "Spanish"].contains(&language.as_str().unwrap_or("")),
            "{context}: {value}"
        );
    }
}

#[tokio::test]
async fn json_schema_answers_parse_and_validate_at_temperature_one() {
    for seed in 0..8 {
        let body = chat(
            user("Describe a person."),
            json!({
                "temperature": 1.0, "seed": seed, "max_tokens": 120,
                "response_format": { "type": "json_schema", "json_schema": { "name": "person", "strict": true, "schema": person_schema() } }
            }),
        );
        let (status, json) = post_chat(body.to_string()).await;
        assert_eq!(status, StatusCode::OK, "{json}");
        assert_eq!(
            json["choices"][0]["finish_reason"], "stop",
            "seed {seed}: {json}"
        );
        let value: Value = serde_json::from_str(content(&json))
            .unwrap_or_else(|e| panic!("seed {seed}: not JSON ({e}): {json}"));
        assert_is_person(&value, &format!("seed {seed}"));
    }
    // json_object: any object, streamed or not, the same.
    let body = chat(
        user("Give the capital of France as a JSON object with a key \"capital\"."),
        json!({ "temperature": 0, "max_tokens": 60, "response_format": { "type": "json_object" } }),
    );
    let (status, json) = post_chat(body.to_string()).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    let whole = content(&json).to_string();
    assert_eq!(json["choices"][0]["finish_reason"], "stop", "{json}");
    assert!(
        serde_json::from_str::<Value>(&whole).is_ok_and(|v| v.is_object()),
        "{whole}"
    );
    let mut streamed_body = body.clone();
    streamed_body["stream"] = json!(true);
    let streamed: String = post_chat_stream(streamed_body)
        .await
        .iter()
        .filter_map(|c| serde_json::from_str::<Value>(c).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(streamed, whole);
}

/// The calls of a streamed answer, assembled from `delta.tool_calls` as
/// OpenAI's clients assemble them: (id, name, arguments) by index.
fn assemble_calls(chunks: &[String]) -> (Vec<(String, String, String)>, Option<String>) {
    let mut calls: Vec<(String, String, String)> = Vec::new();
    let mut finish = None;
    for chunk in chunks {
        let Ok(chunk) = serde_json::from_str::<Value>(chunk) else {
            continue; // [DONE]
        };
        let choice = &chunk["choices"][0];
        if let Some(reason) = choice["finish_reason"].as_str() {
            finish = Some(reason.to_string());
        }
        for delta in choice["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let index = delta["index"].as_u64().expect("index") as usize;
            if index == calls.len() {
                // The first piece of a call has its id, type and name.
                assert_eq!(delta["type"], "function", "{delta}");
                calls.push((
                    delta["id"].as_str().expect("id").into(),
                    delta["function"]["name"].as_str().expect("name").into(),
                    String::new(),
                ));
            } else {
                assert!(
                    delta.get("id").is_none() && delta["function"].get("name").is_none(),
                    "{delta}"
                );
            }
            if let Some(arguments) = delta["function"]["arguments"].as_str() {
                calls[index].2.push_str(arguments);
            }
        }
    }
    (calls, finish)
}

#[tokio::test]
async fn forced_tool_calls_are_well_formed_streamed_or_not_and_round_trip() {
    let ask = json!([{ "role": "user", "content": "What is the weather in Paris?" }]);
    let forced = json!({ "tools": [weather_tool(), time_tool()], "tool_choice": "required", "temperature": 0, "max_tokens": 60 });
    let (status, json) = post_chat(chat(ask.clone(), forced.clone()).to_string()).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    let choice = &json["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{json}");
    assert!(choice["message"]["content"].is_null(), "{json}");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert!(
        call["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("call_")),
        "{call}"
    );
    let name = call["function"]["name"].as_str().expect("name");
    let arguments: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().expect("arguments"))
            .unwrap_or_else(|e| panic!("arguments are not JSON ({e}): {call}"));
    assert!(arguments["city"].is_string(), "{call}");
    if name == "get_weather" {
        assert!(
            ["celsius", "fahrenheit"].contains(&arguments["unit"].as_str().unwrap_or("")),
            "{call}"
        );
    } else {
        assert_eq!(name, "get_time", "{call}");
    }

    // Streamed: the same call, in OpenAI's incremental shape.
    let mut streamed = chat(ask.clone(), forced.clone());
    streamed["stream"] = json!(true);
    let (calls, finish) = assemble_calls(&post_chat_stream(streamed).await);
    assert_eq!(finish.as_deref(), Some("tool_calls"));
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].1, name);
    assert_eq!(
        calls[0].2,
        call["function"]["arguments"].as_str().unwrap_or("")
    );

    // With logprobs, every token's comes in some chunk, even those of
    // text the parser held back (the call's end marker).
    let mut scored = chat(ask.clone(), forced.clone());
    scored["stream"] = json!(true);
    scored["logprobs"] = json!(true);
    scored["stream_options"] = json!({ "include_usage": true });
    let chunks: Vec<Value> = post_chat_stream(scored)
        .await
        .iter()
        .filter_map(|c| serde_json::from_str(c).ok())
        .collect();
    let entries: usize = chunks
        .iter()
        .filter_map(|c| {
            c["choices"][0]["logprobs"]["content"]
                .as_array()
                .map(Vec::len)
        })
        .sum();
    let usage = chunks
        .iter()
        .find_map(|c| c["usage"]["completion_tokens"].as_u64());
    // The end-of-turn token ends the answer and has no text.
    assert!(
        usage.is_some_and(|n| entries as u64 >= n - 1 && entries as u64 <= n),
        "{entries} logprobs for {usage:?} tokens"
    );

    // A named function is the one called.
    let named = json!({ "tools": [weather_tool(), time_tool()], "temperature": 0, "max_tokens": 60,
        "tool_choice": { "type": "function", "function": { "name": "get_time" } } });
    let (status, json) = post_chat(chat(ask.clone(), named).to_string()).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(
        json["choices"][0]["message"]["tool_calls"][0]["function"]["name"], "get_time",
        "{json}"
    );

    // The round trip: the call, the tool's result, then an answer in words.
    let mut messages = ask.as_array().cloned().unwrap_or_default();
    messages.push(json!({ "role": "assistant", "content": null, "tool_calls": [call] }));
    messages.push(json!({ "role": "tool", "tool_call_id": call["id"], "content": "{\"temperature\": 18, \"sky\": \"clear\"}" }));
    let answer =
        json!({ "tools": [weather_tool(), time_tool()], "temperature": 0, "max_tokens": 40 });
    let (status, json) = post_chat(chat(json!(messages), answer).to_string()).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert!(!content(&json).is_empty(), "{json}");
    assert_ne!(json["choices"][0]["finish_reason"], "tool_calls", "{json}");

    // `none`: the tools are not offered, and the answer is text.
    let none = json!({ "tools": [weather_tool()], "tool_choice": "none", "temperature": 0, "max_tokens": 20 });
    let (status, json) = post_chat(chat(ask, none).to_string()).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert!(
        json["choices"][0]["message"].get("tool_calls").is_none(),
        "{json}"
    );
}
