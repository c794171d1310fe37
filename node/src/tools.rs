//! Tool calling in each family's own format: how tools reach the prompt
//! (the chat template's own words when it reads `tools`, else a
//! description of ours in the Hermes format), the grammar that forces a
//! call (`tool_choice` `required` or a named function), and reading the
//! calls back out of the generated text, whole or as it streams.
//!
//! Formats:
//! - Hermes (Qwen 2.5, Qwen 3, and every template that does not read
//!   tools): `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`,
//!   any number, with text around them;
//! - Llama 3.x: the whole answer is `{"name": ..., "parameters": {...}}`
//!   (several separated by `;`), after an optional `<|python_tag|>`;
//! - Mistral: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`.

use kernels::{ChatMessage, ChatTemplate, Constraint, compact_json_layout};
use rand::Rng;
use serde_json::{Value, json};

/// How a model writes its calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    Hermes,
    Llama3,
    Mistral,
}

impl ToolFormat {
    /// The format a template's model was taught: read from the template.
    /// A template that does not read tools gets ours, Hermes'.
    pub fn of(template: &ChatTemplate) -> Self {
        let source = template.source();
        if !template.reads_tools() || source.contains("<tool_call>") {
            ToolFormat::Hermes
        } else if source.contains("[TOOL_CALLS]") || source.contains("[AVAILABLE_TOOLS]") {
            ToolFormat::Mistral
        } else if source.contains(PYTHON_TAG) || source.contains("ipython") {
            ToolFormat::Llama3
        } else {
            // A format we do not know: Hermes is what most fine-tunes
            // learned, and what a forced call will be held to.
            ToolFormat::Hermes
        }
    }

    /// The key the format gives a call's arguments.
    fn arguments_key(self) -> &'static str {
        match self {
            ToolFormat::Llama3 => "parameters",
            ToolFormat::Hermes | ToolFormat::Mistral => "arguments",
        }
    }
}

const CALL_START: &str = "<tool_call>";
const CALL_END: &str = "</tool_call>";
/// Llama 3.1's marker before a call (a control token: decoded text drops
/// it, but a grammar or a client may write it).
const PYTHON_TAG: &str = "<|python_tag|>";
const MISTRAL_CALLS: &str = "[TOOL_CALLS]";

/// For a template that does not read `tools`: the conversation with the
/// tools described in the system message, earlier calls written as
/// `<tool_call>` blocks and tool results as a user turn of
/// `<tool_response>` blocks (roles every template knows).
/// `tests/golden/make_chat_template_reference.py` does the same in
/// Python, and its renders are the reference.
pub fn describe_tools(messages: &[ChatMessage], tools: Option<&Value>) -> Vec<ChatMessage> {
    let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len() + 1);
    let mut rest = messages;
    if let Some(tools) = tools {
        let (system, after) = preamble_into_system(messages, tools);
        out.push(system);
        rest = after;
    }
    for message in rest {
        if message.role == "tool" {
            let block = format!("<tool_response>\n{}\n</tool_response>", message.content);
            match out.last_mut() {
                Some(last)
                    if last.role == "user" && last.content.starts_with("<tool_response>") =>
                {
                    last.content.push('\n');
                    last.content.push_str(&block);
                }
                _ => out.push(ChatMessage::new("user", block)),
            }
            continue;
        }
        if message.tool_calls.is_empty() {
            out.push(ChatMessage::new(
                message.role.clone(),
                message.content.clone(),
            ));
            continue;
        }
        let mut parts: Vec<String> = Vec::new();
        if !message.content.is_empty() {
            parts.push(message.content.clone());
        }
        for call in &message.tool_calls {
            let function = &call["function"];
            let body = json!({"name": function["name"], "arguments": function["arguments"]});
            parts.push(format!(
                "{CALL_START}\n{}\n{CALL_END}",
                kernels::python_json(&body)
            ));
        }
        out.push(ChatMessage::new(message.role.clone(), parts.join("\n")));
    }
    out
}

/// For [`describe_tools`]: the tools described in the first system
/// message (put first when there is none), and the messages after it.
fn preamble_into_system<'a>(
    messages: &'a [ChatMessage],
    tools: &Value,
) -> (ChatMessage, &'a [ChatMessage]) {
    let listed: Vec<String> = tools
        .as_array()
        .map(|tools| tools.iter().map(kernels::python_json).collect())
        .unwrap_or_default();
    let preamble = format!(
        "# Tools\n\nYou may call one or more of these functions. Their signatures, as JSON schemas, are within <tools></tools> XML tags:\n<tools>\n{}\n</tools>\n\nTo call a function, write a JSON object with its name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>",
        listed.join("\n")
    );
    match messages.split_first() {
        Some((first, rest)) if first.role == "system" => {
            let mut system = first.clone();
            system.content = format!("{}\n\n{preamble}", system.content);
            (system, rest)
        }
        _ => (ChatMessage::new("system", preamble), messages),
    }
}

/// A function a forced call may name: its name and arguments' schema.
#[derive(Debug, Clone)]
pub struct CallableFunction {
    pub name: String,
    pub parameters: Option<Value>,
}

/// The grammar of one call to one of `functions`, in `format`: the name
/// is one of theirs and the arguments match that function's schema.
pub fn forced_call(format: ToolFormat, functions: &[CallableFunction]) -> Constraint {
    let key = format.arguments_key();
    let calls: Vec<Value> = functions
        .iter()
        .map(|f| {
            let mut properties = serde_json::Map::new();
            properties.insert("name".into(), json!({"const": f.name}));
            properties.insert(
                key.into(),
                f.parameters
                    .clone()
                    .unwrap_or_else(|| json!({"type": "object"})),
            );
            json!({
                "type": "object",
                "properties": properties,
                "required": ["name", key],
                "additionalProperties": false,
            })
        })
        .collect();
    let schema = match <[Value; 1]>::try_from(calls) {
        Ok([one]) => one,
        Err(many) => json!({"anyOf": many}),
    };
    let schema = compact_json_layout(schema);
    let call = format!("%json {schema}");
    let grammar = match format {
        ToolFormat::Hermes => format!("start: \"{CALL_START}\\n\" {call} \"\\n{CALL_END}\""),
        ToolFormat::Llama3 => format!("start: {call}"),
        ToolFormat::Mistral => format!("start: \"[\" {call} \"]\""),
    };
    Constraint::Lark(grammar)
}

/// What the parser found in a piece of generated text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolEvent {
    /// Text that is not a call.
    Content(String),
    /// A call begins: its index among the answer's calls, id and name.
    CallStart {
        index: u32,
        id: String,
        name: String,
    },
    /// More of a call's arguments (JSON text).
    Arguments { index: u32, fragment: String },
}

/// A whole call, assembled from [`ToolEvent`]s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

/// Reads calls out of generated text as it arrives. Text that may still
/// turn out to be the start of a call is held back until it is known;
/// text that turns out not to be a call (a marker with no call after it,
/// an object that is not a call) is given back as content, whole.
#[derive(Debug)]
pub struct ToolCallParser {
    format: ToolFormat,
    /// Text not yet classified.
    pending: String,
    state: State,
    calls: u32,
    /// Markers and separators a calls region consumed before it made a
    /// call: content after all if no call comes.
    unclaimed: String,
    /// Whether the current calls region made a call (its separators and
    /// end marker are then structure, not content).
    region_called: bool,
}

#[derive(Debug)]
enum State {
    /// Plain text (Hermes: between calls; others: the answer is text).
    Text,
    /// Before the answer's first non-space character (Llama 3, Mistral).
    Undecided,
    /// Inside a calls region, between call objects.
    Between,
    /// Inside a call object.
    Call(CallScan),
}

/// Longest text of a call object before its arguments begin that is
/// still looked at for `{"name": "...", "arguments": `: a name is at most
/// 64 characters, so anything longer is not in that order (and is read
/// whole when the object ends).
const MAX_CALL_PREFIX_BYTES: usize = 512;

impl ToolCallParser {
    pub fn new(format: ToolFormat) -> Self {
        Self {
            format,
            pending: String::new(),
            state: match format {
                ToolFormat::Hermes => State::Text,
                ToolFormat::Llama3 | ToolFormat::Mistral => State::Undecided,
            },
            calls: 0,
            unclaimed: String::new(),
            region_called: false,
        }
    }

    /// Calls found so far.
    pub fn calls(&self) -> u32 {
        self.calls
    }

    /// Reads `text`; returns what it completes.
    pub fn push(&mut self, text: &str) -> Vec<ToolEvent> {
        self.pending.push_str(text);
        let mut events = Vec::new();
        self.advance(&mut events, false);
        events
    }

    /// The text ended: what was held back is settled.
    pub fn finish(&mut self) -> Vec<ToolEvent> {
        let mut events = Vec::new();
        self.advance(&mut events, true);
        if let State::Call(scan) = std::mem::replace(&mut self.state, State::Text) {
            self.end_call(scan, &mut events);
        }
        self.give_back_unclaimed(&mut events);
        let rest = std::mem::take(&mut self.pending);
        // Spaces after calls are not content.
        let nothing = rest.is_empty() || (self.calls > 0 && rest.trim().is_empty());
        if !nothing {
            events.push(ToolEvent::Content(rest));
        }
        events
    }

    fn advance(&mut self, events: &mut Vec<ToolEvent>, at_end: bool) {
        loop {
            let progressed = match &mut self.state {
                State::Text => self.in_text(events, at_end),
                State::Undecided => self.undecided(at_end),
                State::Between => self.between(events),
                State::Call(_) => self.in_call(events),
            };
            if !progressed {
                return;
            }
        }
    }

    /// A calls region begins, having consumed `consumed`.
    fn enter_region(&mut self, consumed: String) {
        self.unclaimed = consumed;
        self.region_called = false;
        self.state = State::Between;
    }

    /// Text a region consumed: kept to give back until it makes a call.
    fn consumed(&mut self, text: &str) {
        if !self.region_called {
            self.unclaimed.push_str(text);
        }
    }

    /// The region made no call (so far): what it consumed is content.
    fn give_back_unclaimed(&mut self, events: &mut Vec<ToolEvent>) {
        if !self.region_called && !self.unclaimed.is_empty() {
            events.push(ToolEvent::Content(std::mem::take(&mut self.unclaimed)));
        }
    }

    fn made_call(&mut self) {
        self.region_called = true;
        self.unclaimed.clear();
    }

    /// Text: content; for Hermes, up to a `<tool_call>` (a tail that may
    /// be the marker's beginning, and the spaces before it, wait).
    fn in_text(&mut self, events: &mut Vec<ToolEvent>, at_end: bool) -> bool {
        if self.format != ToolFormat::Hermes {
            if !self.pending.is_empty() {
                events.push(ToolEvent::Content(std::mem::take(&mut self.pending)));
            }
            return false;
        }
        if let Some(at) = self.pending.find(CALL_START) {
            let before = self.pending[..at].trim_end().len();
            if before > 0 {
                events.push(ToolEvent::Content(self.pending[..before].to_string()));
            }
            let consumed = self.pending[before..at + CALL_START.len()].to_string();
            self.pending.drain(..at + CALL_START.len());
            self.enter_region(consumed);
            return true;
        }
        if at_end {
            return false; // `finish` settles the rest
        }
        let keep = partial_suffix(&self.pending, CALL_START);
        let undecided = &self.pending[..self.pending.len() - keep];
        // Spaces right before a call are not content; keep them until we know.
        let emit = undecided.trim_end().len();
        if emit > 0 {
            events.push(ToolEvent::Content(self.pending.drain(..emit).collect()));
        }
        false
    }

    /// Llama 3 / Mistral: the answer is calls if it begins with one.
    fn undecided(&mut self, at_end: bool) -> bool {
        let trimmed = self.pending.trim_start();
        if trimmed.is_empty() {
            return false;
        }
        let markers: &[&str] = match self.format {
            ToolFormat::Mistral => &[MISTRAL_CALLS, "["],
            _ => &[PYTHON_TAG, "{"],
        };
        for marker in markers {
            if trimmed.starts_with(marker) {
                if *marker == "[" {
                    // `[` then `{` is a list of calls; anything else is text.
                    let rest = trimmed[1..].trim_start();
                    if rest.is_empty() && !at_end {
                        return false;
                    }
                    if !rest.starts_with('{') {
                        break;
                    }
                }
                let skip = self.pending.len() - trimmed.len()
                    + if *marker == "{" { 0 } else { marker.len() };
                let consumed: String = self.pending.drain(..skip).collect();
                self.enter_region(consumed);
                return true;
            }
            if !at_end && marker.starts_with(trimmed) {
                return false; // may still become the marker
            }
        }
        self.state = State::Text;
        true
    }

    /// Between call objects: separators are skipped; `{` opens a call; a
    /// Hermes block's end returns to text; anything else is text.
    fn between(&mut self, events: &mut Vec<ToolEvent>) -> bool {
        let trimmed = self
            .pending
            .trim_start_matches(|c: char| c.is_whitespace() || matches!(c, ',' | ';' | '[' | ']'));
        let skipped = self.pending.len() - trimmed.len();
        let marker = if self.format == ToolFormat::Hermes && trimmed.starts_with(CALL_END) {
            Some(CALL_END)
        } else if trimmed.starts_with(PYTHON_TAG) {
            Some(PYTHON_TAG)
        } else {
            None
        };
        if let Some(marker) = marker {
            let consumed: String = self.pending.drain(..skipped + marker.len()).collect();
            self.consumed(&consumed);
            if marker == CALL_END {
                self.give_back_unclaimed(events);
                self.state = State::Text;
            }
            return true;
        }
        if trimmed.starts_with('{') {
            let consumed: String = self.pending.drain(..skipped).collect();
            self.consumed(&consumed);
            self.state = State::Call(CallScan::default());
            return true;
        }
        let partial_end = self.format == ToolFormat::Hermes && CALL_END.starts_with(trimmed);
        if trimmed.is_empty() || partial_end {
            let consumed: String = self.pending.drain(..skipped).collect();
            self.consumed(&consumed);
            return false;
        }
        // Not a call after all: the rest, separators included, is text.
        self.give_back_unclaimed(events);
        self.state = State::Text;
        true
    }

    fn in_call(&mut self, events: &mut Vec<ToolEvent>) -> bool {
        let State::Call(scan) = &mut self.state else {
            return false;
        };
        let taken = std::mem::take(&mut self.pending);
        let rest = scan.feed(&taken);
        if scan.prefix.is_none() && scan.text.len() <= MAX_CALL_PREFIX_BYTES {
            scan.prefix = match_call_prefix(&scan.text, self.format.arguments_key());
        }
        let mut started = false;
        if let Some(prefix) = &scan.prefix
            && scan.index.is_none()
        {
            scan.index = Some(self.calls);
            events.push(ToolEvent::CallStart {
                index: self.calls,
                id: call_id(),
                name: prefix.name.clone(),
            });
            self.calls += 1;
            started = true;
        }
        scan.stream_arguments(events);
        if started {
            self.made_call();
        }
        match rest {
            Some(rest) => {
                self.pending = rest;
                if let State::Call(scan) = std::mem::replace(&mut self.state, State::Between) {
                    self.end_call(scan, events);
                }
                true
            }
            None => false,
        }
    }

    /// A call object ended (or the text did): what was not streamed is
    /// sent now; an object that is no call is text, with what its region
    /// consumed before it.
    fn end_call(&mut self, mut scan: CallScan, events: &mut Vec<ToolEvent>) {
        if let Some(index) = scan.index {
            scan.stream_arguments(events);
            if scan.streamed == 0 {
                // Arguments written as a JSON string (or never finished).
                let arguments = serde_json::from_str::<Value>(&scan.text)
                    .ok()
                    .and_then(|v| {
                        v.get(self.format.arguments_key())
                            .or(v.get("arguments"))
                            .cloned()
                    })
                    .map(arguments_text)
                    .unwrap_or_else(|| "{}".into());
                events.push(ToolEvent::Arguments {
                    index,
                    fragment: arguments,
                });
            }
            return;
        }
        let call = serde_json::from_str::<Value>(&scan.text)
            .ok()
            .and_then(|v| {
                let name = v.get("name")?.as_str()?.to_string();
                let arguments = v
                    .get(self.format.arguments_key())
                    .or(v.get("arguments"))
                    .or(v.get("parameters"))
                    .cloned()
                    .unwrap_or(json!({}));
                Some((name, arguments_text(arguments)))
            });
        match call {
            Some((name, arguments)) => {
                let index = self.calls;
                self.calls += 1;
                self.made_call();
                events.push(ToolEvent::CallStart {
                    index,
                    id: call_id(),
                    name,
                });
                events.push(ToolEvent::Arguments {
                    index,
                    fragment: arguments,
                });
            }
            None => {
                let mut text = if self.region_called {
                    String::new()
                } else {
                    std::mem::take(&mut self.unclaimed)
                };
                text.push_str(&scan.text);
                events.push(ToolEvent::Content(text));
            }
        }
    }
}

/// Arguments as JSON text: an object as written compactly; a string that
/// holds JSON (some models quote the object) as its contents; any other
/// string JSON-encoded, so that clients can always parse it.
fn arguments_text(arguments: Value) -> String {
    match arguments {
        Value::String(text) if serde_json::from_str::<Value>(&text).is_ok() => text,
        other => other.to_string(),
    }
}

/// OpenAI-style call ids: `call_` and 24 letters and digits.
fn call_id() -> String {
    let suffix: String = rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(24)
        .map(char::from)
        .collect();
    format!("call_{suffix}")
}

/// The length of the longest end of `text` that begins `marker`.
fn partial_suffix(text: &str, marker: &str) -> usize {
    (1..marker.len().min(text.len() + 1))
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n) && marker.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0)
}

/// Nesting of JSON text read one character at a time: strings (with
/// escapes), objects and arrays. The one scanner the parser uses.
#[derive(Debug, Default, Clone)]
struct JsonScan {
    depth: u32,
    in_string: bool,
    escaped: bool,
}

impl JsonScan {
    /// Reads `c`; true when it closes the object or array the scan
    /// began in.
    fn step(&mut self, c: char) -> bool {
        if self.in_string {
            match (self.escaped, c) {
                (true, _) => self.escaped = false,
                (false, '\\') => self.escaped = true,
                (false, '"') => self.in_string = false,
                _ => {}
            }
            return false;
        }
        match c {
            '"' => self.in_string = true,
            '{' | '[' => self.depth += 1,
            '}' | ']' => {
                self.depth = self.depth.saturating_sub(1);
                return self.depth == 0;
            }
            _ => {}
        }
        false
    }
}

/// Where a call object's name and arguments are, once its text shows them
/// in the usual order: `{"name": "...", "arguments": ` (or
/// `"parameters"`).
#[derive(Debug, Clone)]
struct CallPrefix {
    name: String,
    /// Byte offset of the arguments value in the object's text.
    arguments_at: usize,
}

/// A call object's text as it arrives, with its nesting tracked.
#[derive(Debug, Default)]
struct CallScan {
    text: String,
    object: JsonScan,
    prefix: Option<CallPrefix>,
    /// The call's index once its start was sent.
    index: Option<u32>,
    /// The arguments value's nesting, and how much of it was read.
    arguments: JsonScan,
    arguments_read: usize,
    /// Where the arguments value ends, once it has.
    arguments_end: Option<usize>,
    /// Bytes of the arguments value sent so far.
    streamed: usize,
}

impl CallScan {
    /// Adds `input` up to the end of the object; returns what follows it
    /// when the object ended.
    fn feed(&mut self, input: &str) -> Option<String> {
        for (at, c) in input.char_indices() {
            self.text.push(c);
            if self.object.step(c) {
                return Some(input[at + c.len_utf8()..].to_string());
            }
        }
        None
    }

    /// Sends the arguments' text that arrived since the last call, up to
    /// the value's end. A value that is a string is sent whole at the end
    /// instead (its contents are the arguments).
    fn stream_arguments(&mut self, events: &mut Vec<ToolEvent>) {
        let (Some(prefix), Some(index)) = (&self.prefix, self.index) else {
            return;
        };
        let value = &self.text[prefix.arguments_at..];
        if !value.starts_with(['{', '[']) {
            return;
        }
        if self.arguments_end.is_none() {
            for (at, c) in value[self.arguments_read..].char_indices() {
                if self.arguments.step(c) {
                    self.arguments_end = Some(self.arguments_read + at + c.len_utf8());
                    break;
                }
            }
            self.arguments_read = self.arguments_end.unwrap_or(value.len());
        }
        let end = self.arguments_end.unwrap_or(value.len());
        if end > self.streamed {
            events.push(ToolEvent::Arguments {
                index,
                fragment: value[self.streamed..end].to_string(),
            });
            self.streamed = end;
        }
    }
}

/// Matches `{ "name" : "<name>" , "<key>" : ` at the start of `text`.
fn match_call_prefix(text: &str, key: &str) -> Option<CallPrefix> {
    let mut rest = text.strip_prefix('{')?.trim_start();
    rest = rest.strip_prefix("\"name\"")?.trim_start();
    rest = rest.strip_prefix(':')?.trim_start();
    if !rest.starts_with('"') {
        return None;
    }
    // The name string, escapes and all.
    let mut string = JsonScan::default();
    let mut name_end = None;
    for (at, c) in rest.char_indices() {
        string.step(c);
        if at > 0 && !string.in_string {
            name_end = Some(at + 1);
            break;
        }
    }
    let name_end = name_end?;
    let name: String = serde_json::from_str(&rest[..name_end]).ok()?;
    rest = rest[name_end..].trim_start();
    rest = rest.strip_prefix(',')?.trim_start();
    rest = rest
        .strip_prefix(&format!("\"{key}\""))
        .or_else(|| rest.strip_prefix("\"arguments\""))?
        .trim_start();
    rest = rest.strip_prefix(':')?.trim_start();
    if rest.is_empty() {
        return None; // the value has not begun
    }
    Some(CallPrefix {
        name,
        arguments_at: text.len() - rest.len(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Feeds `text` in pieces of `size` bytes (on character boundaries)
    /// and returns the content and the calls (name, arguments) it gives.
    fn parse(format: ToolFormat, text: &str, size: usize) -> (String, Vec<(String, String)>) {
        let mut parser = ToolCallParser::new(format);
        let mut events = Vec::new();
        let mut piece = String::new();
        for c in text.chars() {
            piece.push(c);
            if piece.len() >= size {
                events.extend(parser.push(&std::mem::take(&mut piece)));
            }
        }
        events.extend(parser.push(&piece));
        events.extend(parser.finish());
        let mut content = String::new();
        let mut calls: Vec<(String, String)> = Vec::new();
        for event in events {
            match event {
                ToolEvent::Content(text) => content.push_str(&text),
                ToolEvent::CallStart { index, name, id } => {
                    assert_eq!(index as usize, calls.len());
                    assert!(id.starts_with("call_") && id.len() == 29);
                    calls.push((name, String::new()));
                }
                ToolEvent::Arguments { index, fragment } => {
                    calls[index as usize].1.push_str(&fragment)
                }
            }
        }
        (content, calls)
    }

    #[test]
    fn hermes_calls_with_text_around_them_in_any_pieces() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": [1, 2]}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>";
        for size in [1, 2, 3, 7, 1000] {
            let (content, calls) = parse(ToolFormat::Hermes, text, size);
            assert_eq!(content, "Let me check.", "pieces of {size}");
            assert_eq!(
                calls,
                vec![
                    (
                        "get_weather".into(),
                        "{\"city\": \"Paris\", \"days\": [1, 2]}".into()
                    ),
                    ("get_time".into(), "{}".into())
                ],
                "pieces of {size}"
            );
        }
    }

    #[test]
    fn plain_text_and_broken_calls_stay_content() {
        let (content, calls) = parse(ToolFormat::Hermes, "Hello <tool there", 2);
        assert_eq!((content.as_str(), calls.len()), ("Hello <tool there", 0));
        // Not a call: the text comes back whole, markers and all.
        for text in [
            "<tool_call>\n{\"nam\": 1}\n</tool_call>",
            "Look: <tool_call> is a tag.",
            "<tool_call>",
        ] {
            for size in [1, 3, 100] {
                let (content, calls) = parse(ToolFormat::Hermes, text, size);
                assert_eq!(
                    (content.as_str(), calls.len()),
                    (text, 0),
                    "pieces of {size}"
                );
            }
        }
        for (format, text) in [
            (ToolFormat::Llama3, "{\"a\": 1}\n\nThe answer"),
            (ToolFormat::Mistral, "["),
            (ToolFormat::Mistral, "[ 1 ]"),
            (ToolFormat::Mistral, " [TOOL_CALLS"),
        ] {
            for size in [1, 4, 100] {
                let (content, calls) = parse(format, text, size);
                assert_eq!(
                    (content.as_str(), calls.len()),
                    (text, 0),
                    "{text:?} in pieces of {size}"
                );
            }
        }
        let (content, calls) = parse(ToolFormat::Llama3, "The answer is {x}.", 1);
        assert_eq!(calls.len(), 0);
        assert_eq!(content, "The answer is {x}.");
    }

    #[test]
    fn arguments_out_of_order_or_quoted_are_read_whole() {
        let text = "<tool_call>\n{\"arguments\": {\"a\": 1}, \"name\": \"f\"}\n</tool_call>";
        assert_eq!(
            parse(ToolFormat::Hermes, text, 4).1,
            vec![("f".into(), "{\"a\":1}".into())]
        );
        let text =
            "<tool_call>\n{\"name\": \"f\", \"arguments\": \"{\\\"a\\\": 1}\"}\n</tool_call>";
        assert_eq!(
            parse(ToolFormat::Hermes, text, 4).1,
            vec![("f".into(), "{\"a\": 1}".into())]
        );
        // A string that is not JSON is sent JSON-encoded.
        let text = "<tool_call>\n{\"name\": \"f\", \"arguments\": \"hello\"}\n</tool_call>";
        assert_eq!(
            parse(ToolFormat::Hermes, text, 4).1,
            vec![("f".into(), "\"hello\"".into())]
        );
    }

    #[test]
    fn llama3_and_mistral_calls() {
        let text = " {\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}";
        for size in [1, 5, 100] {
            let (content, calls) = parse(ToolFormat::Llama3, text, size);
            assert_eq!(content, "");
            assert_eq!(
                calls,
                vec![("get_weather".into(), "{\"city\": \"Oslo\"}".into())]
            );
        }
        let text = "[TOOL_CALLS] [{\"name\": \"a\", \"arguments\": {\"x\": \"}\"}}, {\"name\": \"b\", \"arguments\": {}}]";
        for size in [1, 6, 100] {
            let (content, calls) = parse(ToolFormat::Mistral, text, size);
            assert_eq!(content, "");
            assert_eq!(
                calls,
                vec![
                    ("a".into(), "{\"x\": \"}\"}".into()),
                    ("b".into(), "{}".into())
                ]
            );
        }
        let (content, calls) = parse(ToolFormat::Mistral, "[1, 2] are numbers", 3);
        assert_eq!((content.as_str(), calls.len()), ("[1, 2] are numbers", 0));
    }

    /// Every family's template renders tools, calls and results as
    /// transformers renders them (`tool_cases` of
    /// `tests/golden/chat_templates.json`): natively for the templates
    /// that read `tools`, through [`describe_tools`] for the others.
    #[test]
    fn every_family_renders_tools_as_transformers_does() {
        let reference: Value =
            serde_json::from_str(include_str!("../../tests/golden/chat_templates.json")).unwrap();
        let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
        let mut checked = 0;
        for family in reference["families"].as_array().unwrap() {
            let name = text(&family["name"]);
            let template = ChatTemplate::new(
                Some(text(&family["template"])),
                text(&family["bos_token"]),
                text(&family["eos_token"]),
            )
            .unwrap();
            for case in family["tool_cases"].as_array().unwrap() {
                let case_name = text(&case["name"]);
                assert_eq!(
                    template.reads_tools(),
                    case["native"].as_bool().unwrap(),
                    "{name}/{case_name}"
                );
                // As the API turns a request's messages into these: null
                // content is empty.
                let messages: Vec<ChatMessage> = case["messages"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|m| {
                        let mut m = m.clone();
                        if m["content"].is_null() {
                            m["content"] = json!("");
                        }
                        serde_json::from_value(m).unwrap()
                    })
                    .collect();
                let got = crate::prompt::render_prompt(&template, &messages, Some(&case["tools"]));
                if case["error"].as_bool() == Some(true) {
                    assert!(
                        got.is_err(),
                        "{name}/{case_name}: transformers refuses it; got {got:?}"
                    );
                } else {
                    let got = got.unwrap_or_else(|e| panic!("{name}/{case_name}: {e}"));
                    assert_eq!(got, text(&case["rendered"]), "{name}/{case_name}");
                }
                checked += 1;
            }
        }
        assert!(checked >= 40, "only {checked} tool cases checked");
    }

    #[test]
    fn forced_call_grammars_name_the_functions_and_their_schemas() {
        let functions = [CallableFunction {
            name: "get_weather".into(),
            parameters: Some(json!({"type": "object", "properties": {"city": {"type": "string"}}})),
        }];
        let Constraint::Lark(grammar) = forced_call(ToolFormat::Hermes, &functions) else {
            panic!("a Lark grammar");
        };
        assert!(
            grammar.starts_with("start: \"<tool_call>\\n\" %json {"),
            "{grammar}"
        );
        assert!(grammar.contains("\"const\":\"get_weather\""), "{grammar}");
        let Constraint::Lark(grammar) = forced_call(ToolFormat::Llama3, &functions) else {
            panic!("a Lark grammar");
        };
        assert!(grammar.contains("\"parameters\""), "{grammar}");
    }
}
