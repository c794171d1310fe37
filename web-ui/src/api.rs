//! The node's HTTP API, as the dashboard uses it: the response types it
//! reads (only the fields it shows) and `fetch` wrappers whose errors are
//! sentences for the page.

use serde::Deserialize;
use serde::de::DeserializeOwned;
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use web_sys::{AbortSignal, ReadableStreamDefaultReader, Request, RequestInit, Response};

/// `GET /v1/cluster`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct ClusterView {
    pub node: Option<String>,
    pub leader: Option<String>,
    pub model: Option<ModelIdentity>,
    pub nodes: Vec<NodeView>,
    pub links: Vec<LinkView>,
    pub plan: Option<PlanView>,
    pub plan_error: Option<String>,
    pub policy: Option<PolicyStatus>,
    pub not_joined: Vec<NotJoinedView>,
}

/// A node found on the network that this cluster does not join.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct NotJoinedView {
    pub name: String,
    pub addresses: Vec<String>,
    pub reason: String,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct ModelIdentity {
    pub name: String,
    pub fingerprint: String,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct NodeView {
    pub id: String,
    pub name: String,
    pub address: String,
    pub status: String,
    pub device: String,
    pub device_name: String,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    pub memory_budget_bytes: u64,
    pub compute_score: f64,
    pub model: ModelIdentity,
    pub layers: Option<LayerRange>,
    pub weight_bytes: Option<u64>,
    pub rss_bytes: Option<u64>,
    pub models: Vec<ModelAvailability>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq)]
pub struct LayerRange {
    pub start: u32,
    pub end: u32,
}

/// Whether a node has a model's file.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct ModelAvailability {
    pub name: String,
    /// `loaded`, `present`, `downloading` or `missing`.
    pub state: String,
    pub downloaded_bytes: Option<u64>,
    pub total_bytes: Option<u64>,
    /// Why the last download failed.
    pub error: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct LinkView {
    pub from: String,
    pub to: String,
    pub rtt_ms: Option<f64>,
    pub bandwidth_bytes_per_second: Option<u64>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct PlanView {
    pub epoch: u64,
    pub leader: String,
    pub state: String,
    pub stages: Vec<StageView>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct StageView {
    pub node: String,
    pub layers: LayerRange,
    pub weight_bytes: Option<u64>,
    pub in_flight: u32,
}

/// `GET /v1/cluster/policy`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct PolicyStatus {
    pub name: String,
    pub version: String,
    pub sha256: String,
    pub source: String,
    pub size_bytes: u64,
    pub revision: u64,
    pub warning: Option<String>,
}

/// `GET /v1/cluster/models`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct KnownModels {
    pub models: Vec<KnownModel>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct KnownModel {
    pub id: String,
    pub description: String,
    pub size_bytes: Option<u64>,
    pub served: bool,
    /// In the catalogue: nodes can fetch it by name.
    pub downloadable: bool,
}

/// `GET /v1/models`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct ModelList {
    pub data: Vec<ModelCard>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct ModelCard {
    pub id: String,
}

/// An HTTP answer read whole.
pub struct Answer {
    pub status: u16,
    pub body: String,
}

impl Answer {
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The node's own words for a failure: its OpenAI-shaped error message.
    pub fn error(&self) -> String {
        error_message(self.status, &self.body)
    }
}

pub fn error_message(status: u16, body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| format!("HTTP {status}: {}", body.trim()))
}

pub fn js_error(error: JsValue) -> String {
    if let Some(error) = error.dyn_ref::<js_sys::Error>() {
        return String::from(error.message());
    }
    error.as_string().unwrap_or_else(|| format!("{error:?}"))
}

async fn fetch(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&JsValue>,
    signal: Option<&AbortSignal>,
) -> Result<Response, String> {
    let init = RequestInit::new();
    init.set_method(method);
    if let Some(body) = body {
        init.set_body(body);
    }
    init.set_signal(signal);
    let request = Request::new_with_str_and_init(url, &init).map_err(js_error)?;
    for (name, value) in headers {
        request.headers().set(name, value).map_err(js_error)?;
    }
    let window = web_sys::window().ok_or("the page has no window")?;
    let response = JsFuture::from(window.fetch_with_request(&request))
        .await
        .map_err(|e| format!("cannot reach the node: {}", js_error(e)))?;
    response.dyn_into::<Response>().map_err(js_error)
}

/// Sends a request and reads the whole answer.
pub async fn send(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&JsValue>,
) -> Result<Answer, String> {
    let response = fetch(method, url, headers, body, None).await?;
    let text = JsFuture::from(response.text().map_err(js_error)?)
        .await
        .map_err(js_error)?;
    Ok(Answer {
        status: response.status(),
        body: text.as_string().unwrap_or_default(),
    })
}

pub async fn get_json<T: DeserializeOwned>(url: &str) -> Result<T, String> {
    let answer = send("GET", url, &[], None).await?;
    if !answer.ok() {
        return Err(answer.error());
    }
    serde_json::from_str(&answer.body)
        .map_err(|e| format!("the node answered {url} with unexpected JSON: {e}"))
}

/// What a streamed chat completion says, chunk by chunk.
pub enum ChatEvent {
    Token(String),
    Finished { reason: String },
    Usage { completion_tokens: u64 },
}

/// Posts a streaming chat completion and reports its events until
/// `[DONE]`. Aborting `signal` ends it with an error.
pub async fn stream_chat(
    body: &str,
    signal: &AbortSignal,
    mut on_event: impl FnMut(ChatEvent),
) -> Result<(), String> {
    let response = fetch(
        "POST",
        "/v1/chat/completions",
        &[("Content-Type", "application/json")],
        Some(&JsValue::from_str(body)),
        Some(signal),
    )
    .await?;
    if !response.ok() {
        let text = JsFuture::from(response.text().map_err(js_error)?)
            .await
            .map_err(js_error)?;
        return Err(error_message(
            response.status(),
            &text.as_string().unwrap_or_default(),
        ));
    }
    let stream = response.body().ok_or("the node answered without a body")?;
    let reader: ReadableStreamDefaultReader = stream
        .get_reader()
        .dyn_into()
        .map_err(|e| js_error(e.into()))?;
    // Server-sent events: `data: …` lines. A chunk may end mid-line (or
    // mid-character), so bytes wait here until their newline arrives.
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let read = JsFuture::from(reader.read()).await.map_err(js_error)?;
        let done = js_sys::Reflect::get(&read, &"done".into())
            .map(|d| d.is_truthy())
            .unwrap_or(true);
        if done {
            return Err("the answer stopped before it was complete".into());
        }
        let value = js_sys::Reflect::get(&read, &"value".into()).map_err(js_error)?;
        pending.extend(js_sys::Uint8Array::new(&value).to_vec());
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let Some(data) = line.trim().strip_prefix("data:") else {
                continue;
            };
            let data = data.trim();
            if data == "[DONE]" {
                return Ok(());
            }
            let chunk: serde_json::Value = serde_json::from_str(data)
                .map_err(|e| format!("the node sent an unreadable chunk: {e}"))?;
            if let Some(message) = chunk["error"]["message"].as_str() {
                return Err(message.to_string());
            }
            let choice = &chunk["choices"][0];
            if let Some(text) = choice["delta"]["content"].as_str()
                && !text.is_empty()
            {
                on_event(ChatEvent::Token(text.to_string()));
            }
            if let Some(reason) = choice["finish_reason"].as_str() {
                on_event(ChatEvent::Finished {
                    reason: reason.to_string(),
                });
            }
            if let Some(tokens) = chunk["usage"]["completion_tokens"].as_u64() {
                on_event(ChatEvent::Usage {
                    completion_tokens: tokens,
                });
            }
        }
    }
}

/// Milliseconds on the page's clock.
pub fn now_ms() -> f64 {
    web_sys::window()
        .and_then(|w| w.performance())
        .map_or(0.0, |p| p.now())
}
