//! The chat page: answers stream in token by token and render as
//! markdown; a stop button cancels the generation on the node.

use std::cell::RefCell;

use api_types::{
    ChatCompletionRequest, FinishReason, MessageContent, ModelList, RequestMessage, Role,
    StreamOptions,
};
use leptos::prelude::*;
use web_sys::AbortController;

use crate::{Shared, api, markdown};

/// The most tokens an answer may take.
const MAX_TOKENS: u64 = 512;

/// One message of the conversation.
#[derive(Clone, Debug, PartialEq)]
pub struct Turn {
    id: u64,
    /// Counts changes, so the list re-renders only the turn that changed.
    version: u64,
    from_user: bool,
    text: String,
    error: Option<String>,
    streaming: bool,
    /// Time to first token, speed, why it ended.
    meta: Vec<String>,
}

/// The conversation and its controls; part of [`Shared`], so it outlives
/// the page.
#[derive(Clone, Copy)]
pub struct ChatState {
    turns: RwSignal<Vec<Turn>>,
    models: RwSignal<Vec<String>>,
    model: RwSignal<Option<String>>,
    models_error: RwSignal<Option<String>>,
    draft: RwSignal<String>,
    busy: RwSignal<bool>,
    next_id: StoredValue<u64>,
}

thread_local! {
    /// Aborts the answer being streamed.
    static STREAMING: RefCell<Option<AbortController>> = const { RefCell::new(None) };
}

impl ChatState {
    pub fn new() -> Self {
        Self {
            turns: RwSignal::new(Vec::new()),
            models: RwSignal::new(Vec::new()),
            model: RwSignal::new(None),
            models_error: RwSignal::new(None),
            draft: RwSignal::new(String::new()),
            busy: RwSignal::new(false),
            next_id: StoredValue::new(1),
        }
    }

    fn new_turn(&self, from_user: bool, text: String, streaming: bool) -> Turn {
        let id = self.next_id.get_value();
        self.next_id.set_value(id + 1);
        Turn {
            id,
            version: 0,
            from_user,
            text,
            error: None,
            streaming,
            meta: Vec::new(),
        }
    }

    fn update_answer(&self, change: impl FnOnce(&mut Turn)) {
        self.turns.update(|turns| {
            if let Some(turn) = turns.last_mut() {
                change(turn);
                turn.version += 1;
            }
        });
    }

    async fn load_models(self) {
        match api::get_json::<ModelList>("/v1/models").await {
            Ok(list) => {
                let ids: Vec<String> = list.data.into_iter().map(|m| m.id).collect();
                if self.model.get_untracked().is_none() {
                    self.model.set(ids.first().cloned());
                }
                self.models.set(ids);
                self.models_error.set(None);
            }
            Err(error) => self.models_error.set(Some(error)),
        }
    }

    fn send(self) {
        let text = self.draft.get_untracked().trim().to_string();
        if text.is_empty() || self.busy.get_untracked() {
            return;
        }
        let Some(model) = self.model.get_untracked() else {
            self.models_error
                .set(Some("The node serves no model yet; wait a moment.".into()));
            return;
        };
        let message = |role, text: &str| RequestMessage {
            role,
            content: Some(MessageContent::Text(text.to_string())),
            tool_calls: None,
            tool_call_id: None,
            name: None,
        };
        let mut messages: Vec<RequestMessage> = self
            .turns
            .get_untracked()
            .iter()
            .filter(|t| t.error.is_none() && !t.text.is_empty())
            .map(|t| {
                let role = if t.from_user {
                    Role::User
                } else {
                    Role::Assistant
                };
                message(role, &t.text)
            })
            .collect();
        messages.push(message(Role::User, &text));
        let request = ChatCompletionRequest {
            model,
            messages,
            stream: Some(true),
            stream_options: Some(StreamOptions {
                include_usage: Some(true),
            }),
            max_tokens: Some(MAX_TOKENS),
            ..ChatCompletionRequest::default()
        };

        let question = self.new_turn(true, text, false);
        let answer = self.new_turn(false, String::new(), true);
        self.turns.update(|turns| turns.extend([question, answer]));
        self.draft.set(String::new());
        self.busy.set(true);
        let controller = AbortController::new().ok();
        let signal = controller.as_ref().map(AbortController::signal);
        STREAMING.with(|s| *s.borrow_mut() = controller);
        leptos::task::spawn_local(async move {
            let Some(signal) = signal else {
                self.update_answer(|t| {
                    t.streaming = false;
                    t.error =
                        Some("This browser cannot cancel requests (no AbortController).".into());
                });
                self.busy.set(false);
                return;
            };
            let started = api::now_ms();
            let mut first_token: Option<f64> = None;
            let mut tokens: u64 = 0;
            let mut usage: Option<u64> = None;
            let mut finish: Option<FinishReason> = None;
            let result = api::stream_chat(&request, &signal, |event| match event {
                api::ChatEvent::Token(text) => {
                    first_token.get_or_insert_with(api::now_ms);
                    tokens += 1;
                    self.update_answer(|t| t.text.push_str(&text));
                }
                api::ChatEvent::Finished { reason } => finish = Some(reason),
                api::ChatEvent::Usage { completion_tokens } => usage = Some(completion_tokens),
            })
            .await;
            let ended = api::now_ms();
            let stopped = signal.aborted();
            let tokens = usage.unwrap_or(tokens);
            self.update_answer(|t| {
                t.streaming = false;
                if let Some(first) = first_token {
                    t.meta
                        .push(format!("first token {:.2} s", (first - started) / 1000.0));
                    let seconds = (ended - first) / 1000.0;
                    // Too short to time, the rate would say nothing.
                    if tokens > 2 && seconds >= 0.1 {
                        t.meta
                            .push(format!("{:.1} tok/s", (tokens - 1) as f64 / seconds));
                    }
                    t.meta.push(format!("{tokens} tokens"));
                }
                match (&result, stopped) {
                    (_, true) => t.meta.push("stopped".into()),
                    (Err(error), false) => t.error = Some(error.clone()),
                    (Ok(()), false) if finish == Some(FinishReason::Length) => {
                        t.meta.push(format!("cut at {MAX_TOKENS} tokens"));
                    }
                    (Ok(()), false) => {}
                }
            });
            STREAMING.with(|s| *s.borrow_mut() = None);
            self.busy.set(false);
        });
    }

    fn stop(self) {
        STREAMING.with(|s| {
            if let Some(controller) = s.borrow().as_ref() {
                controller.abort();
            }
        });
    }
}

impl Default for ChatState {
    fn default() -> Self {
        Self::new()
    }
}

#[component]
pub fn ChatPage() -> impl IntoView {
    let state = expect_context::<Shared>().chat;
    if state.models.get_untracked().is_empty() {
        leptos::task::spawn_local(state.load_models());
    }
    let messages = NodeRef::<leptos::html::Div>::new();
    // Follow the answer as it grows.
    Effect::new(move |_| {
        state.turns.track();
        if let Some(list) = messages.get() {
            list.set_scroll_top(list.scroll_height());
        }
    });
    let on_key = move |event: web_sys::KeyboardEvent| {
        if event.key() == "Enter" && !event.shift_key() && !event.is_composing() {
            event.prevent_default();
            state.send();
        }
    };
    view! {
        <div class="panel chat">
            <div class="chat-bar">
                <strong>"Model"</strong>
                <select
                    data-testid="model"
                    on:change=move |ev| state.model.set(Some(event_target_value(&ev)))
                >
                    {move || {
                        let chosen = state.model.get();
                        state
                            .models
                            .get()
                            .into_iter()
                            .map(|id| {
                                let selected = chosen.as_deref() == Some(id.as_str());
                                view! {
                                    <option value=id.clone() selected=selected>
                                        {id.clone()}
                                    </option>
                                }
                            })
                            .collect_view()
                    }}
                </select>
                <span class="spacer"></span>
                <button
                    class="btn"
                    disabled=move || state.busy.get() || state.turns.with(Vec::is_empty)
                    on:click=move |_| state.turns.set(Vec::new())
                >
                    "New chat"
                </button>
            </div>
            {move || {
                state
                    .models_error
                    .get()
                    .map(|error| {
                        view! {
                            <div class="notice error" style="margin: 12px 18px 0">
                                {error}
                            </div>
                        }
                    })
            }}
            <div class="messages" node_ref=messages data-testid="messages">
                <Show when=move || state.turns.with(Vec::is_empty)>
                    <div class="empty">
                        <b>"Ask the cluster anything"</b>
                        "Every node holds a slice of the model's layers; your question travels round the ring one token at a time."
                    </div>
                </Show>
                <For
                    each=move || state.turns.get()
                    key=|turn| (turn.id, turn.version)
                    children=view_turn
                />
            </div>
            <div class="composer">
                <textarea
                    rows="2"
                    placeholder="Message the cluster (Enter sends, Shift+Enter for a new line)"
                    data-testid="prompt"
                    prop:value=move || state.draft.get()
                    on:input=move |ev| state.draft.set(event_target_value(&ev))
                    on:keydown=on_key
                ></textarea>
                <Show
                    when=move || state.busy.get()
                    fallback=move || {
                        view! {
                            <button
                                class="btn primary"
                                data-testid="send"
                                disabled=move || state.draft.with(|d| d.trim().is_empty())
                                on:click=move |_| state.send()
                            >
                                "Send"
                            </button>
                        }
                    }
                >
                    <button class="btn danger" data-testid="stop" on:click=move |_| state.stop()>
                        "■ Stop"
                    </button>
                </Show>
            </div>
        </div>
    }
}

fn view_turn(turn: Turn) -> AnyView {
    if turn.from_user {
        return view! {
            <div class="turn user">
                <div class="bubble">{turn.text}</div>
            </div>
        }
        .into_any();
    }
    let mut html = markdown::to_html(&turn.text);
    if turn.streaming {
        // The cursor goes at the end of the last paragraph, if it is one.
        const CURSOR: &str = "<span class=\"cursor\"></span>";
        match html.trim_end().strip_suffix("</p>") {
            Some(open) => html = format!("{open}{CURSOR}</p>"),
            None => html.push_str(CURSOR),
        }
    }
    let state = if turn.streaming { "streaming" } else { "done" };
    view! {
        <div class="turn assistant" data-testid="answer" data-state=state>
            <Show when={
                let empty = turn.text.is_empty() && !turn.streaming;
                move || !empty
            }>
                <div class="bubble" inner_html=html.clone()></div>
            </Show>
            {turn.error.map(|error| view! { <div class="bubble error">{error}</div> })}
            <div class="meta">
                {turn.meta.into_iter().map(|m| view! { <span>{m}</span> }).collect_view()}
            </div>
        </div>
    }
    .into_any()
}
