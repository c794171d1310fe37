//! The node's HTTP API, as the dashboard uses it: `fetch` wrappers whose
//! errors are sentences for the page, and streams of server-sent events
//! (the chat, the cluster feed) read chunk by chunk. Every request carries
//! the browser's API key, if the user gave one (`access.rs`). The JSON
//! types are the node's own, from `api_types`.

use api_types::{ChatCompletionChunk, ChatCompletionRequest, ErrorBody, FinishReason};
use serde::de::DeserializeOwned;
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use web_sys::{AbortSignal, ReadableStreamDefaultReader, Request, RequestInit, Response};

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
    serde_json::from_str::<ErrorBody>(body)
        .map(|body| body.error.message)
        .unwrap_or_else(|_| format!("HTTP {status}: {}", body.trim()))
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
    // Admin requests bring their own token, which the node takes as a key.
    if !headers.iter().any(|(name, _)| name.eq_ignore_ascii_case("authorization"))
        && let Some(key) = crate::access::stored_key()
    {
        let bearer = format!("Bearer {key}");
        request
            .headers()
            .set("Authorization", &bearer)
            .map_err(js_error)?;
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
    let answer = Answer {
        status: response.status(),
        body: text.as_string().unwrap_or_default(),
    };
    crate::access::observe(answer.status, &answer.body);
    Ok(answer)
}

/// Opens a stream of server-sent events; a refusal is the node's words.
async fn open_stream(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&JsValue>,
    signal: Option<&AbortSignal>,
) -> Result<ReadableStreamDefaultReader, String> {
    let response = fetch(method, url, headers, body, signal).await?;
    if !response.ok() {
        let text = JsFuture::from(response.text().map_err(js_error)?)
            .await
            .map_err(js_error)?;
        let text = text.as_string().unwrap_or_default();
        crate::access::observe(response.status(), &text);
        return Err(error_message(response.status(), &text));
    }
    let stream = response.body().ok_or("the node answered without a body")?;
    stream
        .get_reader()
        .dyn_into()
        .map_err(|e| js_error(e.into()))
}

/// One server-sent event: its name (`message` when unnamed) and data.
pub struct ServerEvent {
    pub name: String,
    pub data: String,
}

/// Reads server-sent events until `on_event` says stop (false) or the
/// stream ends (an error). A chunk may end mid-line (or mid-character),
/// so bytes wait until their newline arrives.
async fn read_events(
    reader: &ReadableStreamDefaultReader,
    mut on_event: impl FnMut(ServerEvent) -> Result<bool, String>,
) -> Result<(), String> {
    let mut pending: Vec<u8> = Vec::new();
    let (mut name, mut data) = (String::new(), String::new());
    loop {
        let read = JsFuture::from(reader.read()).await.map_err(js_error)?;
        let done = js_sys::Reflect::get(&read, &"done".into())
            .map(|d| d.is_truthy())
            .unwrap_or(true);
        if done {
            return Err("the stream stopped before it was complete".into());
        }
        let value = js_sys::Reflect::get(&read, &"value".into()).map_err(js_error)?;
        pending.extend(js_sys::Uint8Array::new(&value).to_vec());
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\r', '\n']);
            if line.is_empty() {
                if !data.is_empty() || !name.is_empty() {
                    let event = ServerEvent {
                        name: if name.is_empty() { "message".into() } else { std::mem::take(&mut name) },
                        data: std::mem::take(&mut data),
                    };
                    if !on_event(event)? {
                        return Ok(());
                    }
                }
                continue;
            }
            if let Some(value) = line.strip_prefix("data:") {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(value.strip_prefix(' ').unwrap_or(value));
            } else if let Some(value) = line.strip_prefix("event:") {
                name = value.trim().to_string();
            }
        }
    }
}

/// Follows a server-sent event feed (a GET) until it fails.
pub async fn follow_events(
    url: &str,
    on_event: impl FnMut(ServerEvent) -> Result<bool, String>,
) -> Result<(), String> {
    let reader = open_stream("GET", url, &[("Accept", "text/event-stream")], None, None).await?;
    read_events(&reader, on_event).await
}

/// Waits `ms` milliseconds.
pub async fn sleep_ms(ms: i32) {
    let promise = js_sys::Promise::new(&mut |resolve, _| {
        if let Some(window) = web_sys::window() {
            let _ = window.set_timeout_with_callback_and_timeout_and_arguments_0(&resolve, ms);
        }
    });
    let _ = JsFuture::from(promise).await;
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
    Finished { reason: FinishReason },
    Usage { completion_tokens: u64 },
}

/// Posts a streaming chat completion and reports its events until
/// `[DONE]`. Aborting `signal` ends it with an error.
pub async fn stream_chat(
    request: &ChatCompletionRequest,
    signal: &AbortSignal,
    mut on_event: impl FnMut(ChatEvent),
) -> Result<(), String> {
    let body = serde_json::to_string(request)
        .map_err(|e| format!("cannot write the chat request: {e}"))?;
    let reader = open_stream(
        "POST",
        "/v1/chat/completions",
        &[("Content-Type", "application/json")],
        Some(&JsValue::from_str(&body)),
        Some(signal),
    )
    .await?;
    read_events(&reader, |event| {
        let data = event.data.trim();
        if data == "[DONE]" {
            return Ok(false);
        }
        // A failure after the answer started comes as an error body.
        if let Ok(failure) = serde_json::from_str::<ErrorBody>(data) {
            return Err(failure.error.message);
        }
        let chunk: ChatCompletionChunk = serde_json::from_str(data)
            .map_err(|e| format!("the node sent an unreadable chunk: {e}"))?;
        if let Some(choice) = chunk.choices.into_iter().next() {
            if let Some(text) = choice.delta.content
                && !text.is_empty()
            {
                on_event(ChatEvent::Token(text));
            }
            if let Some(reason) = choice.finish_reason {
                on_event(ChatEvent::Finished { reason });
            }
        }
        if let Some(Some(usage)) = chunk.usage {
            on_event(ChatEvent::Usage {
                completion_tokens: usage.completion_tokens,
            });
        }
        Ok(true)
    })
    .await
}

/// Milliseconds on the page's clock.
pub fn now_ms() -> f64 {
    web_sys::window()
        .and_then(|w| w.performance())
        .map_or(0.0, |p| p.now())
}
