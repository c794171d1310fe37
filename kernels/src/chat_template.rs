//! Chat templates: the Jinja template a model ships in
//! `tokenizer.chat_template`, rendered with minijinja the way Hugging Face
//! `transformers` and llama.cpp render it (`trim_blocks`, `lstrip_blocks`,
//! Python string methods, `raise_exception`, and a `tojson` that writes
//! what Python's `json.dumps` writes, as transformers' does).
//!
//! Tools are passed as `tools` (a list of OpenAI tool objects, or none),
//! assistant messages carry `tool_calls` and tool results `tool_call_id`,
//! as `transformers` passes them.

use minijinja::syntax::SyntaxConfig;
use minijinja::value::Serde;
use minijinja::{Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// ChatML, for models that ship no template.
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

const TEMPLATE_NAME: &str = "chat";

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// An assistant turn's calls, as templates read them: `{"id", "type",
    /// "function": {"name", "arguments"}}` with the arguments as a JSON
    /// object. Left out of the message when empty (templates test for
    /// the key).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<serde_json::Value>,
    /// A tool result: the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
            name: None,
        }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`, or ChatML when it is `None`.
    pub fn new(source: Option<String>, bos_token: String, eos_token: String) -> Result<Self> {
        let mut env = Environment::new();
        // Hugging Face `transformers` and llama.cpp render templates with
        // trim_blocks and lstrip_blocks; the model authors wrote for that.
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_filter("tojson", tojson);
        let source = source.unwrap_or_else(|| CHATML.to_string());
        env.add_template_owned(TEMPLATE_NAME, source.clone())?;
        Ok(Self {
            env,
            source,
            bos_token,
            eos_token,
        })
    }

    /// Whether the template itself renders `tools` (else tools must be
    /// described to the model some other way).
    pub fn reads_tools(&self) -> bool {
        self.source.contains("tools")
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The prompt text for `messages`, ending with the assistant's turn
    /// opened when `add_generation_prompt` is set.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// [`render`](Self::render) with `tools` (a JSON list of OpenAI tool
    /// objects) for the template to describe.
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.env.get_template(TEMPLATE_NAME)?;
        Ok(template.render(minijinja::context! {
            messages => Value::from(Serde(messages)),
            // None, not undefined, when there are none: as transformers
            // passes it (`tools is not none` must be false).
            tools => tools.map_or(Value::from(()), |t| Value::from(Serde(t))),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })?)
    }
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent,
/// sort_keys=sort_keys)`:
/// `", "` and `": "` between items when compact; `","` then a new line
/// and `": "` when indented.
fn tojson(
    value: Value,
    kwargs: minijinja::value::Kwargs,
) -> std::result::Result<String, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let value = if sort_keys == Some(true) {
        let mut json = serde_json::to_value(&value)
            .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
        json.sort_all_objects();
        Value::from(Serde(json))
    } else {
        value
    };
    python_dumps(&value, indent)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))
}

/// Python's `json.dumps(value, ensure_ascii=False)`: how transformers'
/// templates write JSON, and how ringlet writes it into prompts.
pub fn python_json(value: &serde_json::Value) -> String {
    // Writing a JSON value to memory cannot fail.
    python_dumps(value, None).unwrap_or_default()
}

/// `json.dumps(value, ensure_ascii=False, indent=indent)`.
fn python_dumps(value: &impl Serialize, indent: Option<usize>) -> serde_json::Result<String> {
    let mut out = Vec::new();
    match indent {
        Some(n) => {
            let spaces = vec![b' '; n];
            let formatter = serde_json::ser::PrettyFormatter::with_indent(&spaces);
            value.serialize(&mut serde_json::Serializer::with_formatter(
                &mut out, formatter,
            ))?;
        }
        None => value.serialize(&mut serde_json::Serializer::with_formatter(
            &mut out,
            PythonCompact,
        ))?,
    }
    // serde_json writes UTF-8.
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// `json.dumps`'s default separators.
struct PythonCompact;

/// `", "` before every item but the first.
fn item_separator<W: ?Sized + std::io::Write>(writer: &mut W, first: bool) -> std::io::Result<()> {
    if first {
        Ok(())
    } else {
        writer.write_all(b", ")
    }
}

impl serde_json::ser::Formatter for PythonCompact {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        item_separator(writer, first)
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        item_separator(writer, first)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_fallback() -> Result<()> {
        let t = ChatTemplate::new(None, String::new(), "<|im_end|>".into())?;
        let out = t.render(&[ChatMessage::new("user", "hi")], true)?;
        assert_eq!(
            out,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        Ok(())
    }

    #[test]
    fn python_methods_and_raise_exception() -> Result<()> {
        let source = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}\
                      {% for m in messages %}{{ m['content'].strip() | upper }}{% endfor %}";
        let t = ChatTemplate::new(Some(source.into()), String::new(), String::new())?;
        assert_eq!(
            t.render(&[ChatMessage::new("user", "  hi  ")], false)?,
            "HI"
        );
        let err = t.render(&[ChatMessage::new("system", "x")], false);
        assert!(err.is_err_and(|e| e.to_string().contains("no system")));
        Ok(())
    }

    #[test]
    fn trims_blocks_like_transformers() -> Result<()> {
        let source = "{% for m in messages %}\n  {% if true %}\n{{ m['content'] }}\n  {% endif %}\n{% endfor %}";
        let t = ChatTemplate::new(Some(source.into()), String::new(), String::new())?;
        assert_eq!(
            t.render(
                &[ChatMessage::new("user", "a"), ChatMessage::new("user", "b")],
                false
            )?,
            "a\nb\n"
        );
        Ok(())
    }
}
