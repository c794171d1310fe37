//! Turning a conversation into prompt tokens: the model's chat template,
//! its tokenizer, and the context limit. Shared by the API and `ringlet run`.
//!
//! The rendered prompt is tokenized as a whole with special tokens matched,
//! as llama.cpp does: that is what gives the same prompt tokens (and so the
//! same answers) as llama.cpp. A consequence to know: a message that
//! contains a control token's text, say `<|im_start|>`, is read as that
//! token.

use std::sync::Arc;

use kernels::{ChatMessage, ChatTemplate, Grammars, Tokenizer};

#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error("the model's chat template rejected these messages: {0}")]
    Template(String),
    #[error("cannot tokenize the prompt: {0}")]
    Tokenize(String),
    #[error(
        "This model's maximum context length is {context_length} tokens. However, your messages resulted in {} tokens. Please reduce the length of the messages.",
        if *.at_least { format!("at least {tokens}") } else { tokens.to_string() }
    )]
    TooLong {
        tokens: usize,
        at_least: bool,
        context_length: usize,
    },
}

/// Builds prompt tokens for one model.
#[derive(Debug)]
pub struct PromptBuilder {
    tokenizer: Arc<Tokenizer>,
    template: ChatTemplate,
    context_length: usize,
    /// The vocabulary as the grammar engine reads it, for structured
    /// output and forced tool calls (built on first use).
    grammars: Arc<Grammars>,
}

impl PromptBuilder {
    pub fn new(tokenizer: Arc<Tokenizer>, template: ChatTemplate, context_length: usize) -> Self {
        Self {
            grammars: Arc::new(Grammars::new(&tokenizer)),
            tokenizer,
            template,
            context_length,
        }
    }

    pub fn grammars(&self) -> &Arc<Grammars> {
        &self.grammars
    }

    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// The prompt for `messages`, ending with the assistant's turn opened,
    /// or an error if it leaves no room to generate. CPU work: run it off
    /// async worker threads for large inputs.
    pub fn tokens(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, PromptError> {
        self.tokens_with_tools(messages, None)
    }

    /// [`tokens`](Self::tokens) with `tools` (a JSON list of OpenAI tool
    /// objects) described to the model: by the template when it reads
    /// them, else in ringlet's words (see [`crate::tools`]).
    pub fn tokens_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
    ) -> Result<Vec<u32>, PromptError> {
        let text = render_prompt(&self.template, messages, tools)
            .map_err(|e| PromptError::Template(e.to_string()))?;
        // No token is longer than this, so longer text cannot fit: refuse
        // before spending time tokenizing it.
        let at_least = text.len() / self.tokenizer.max_token_bytes().max(1);
        if at_least >= self.context_length {
            return Err(PromptError::TooLong {
                tokens: at_least,
                at_least: true,
                context_length: self.context_length,
            });
        }
        let tokens = self
            .tokenizer
            .encode(&text)
            .map_err(|e| PromptError::Tokenize(e.to_string()))?;
        if tokens.len() >= self.context_length {
            return Err(PromptError::TooLong {
                tokens: tokens.len(),
                at_least: false,
                context_length: self.context_length,
            });
        }
        Ok(tokens)
    }
}

/// The prompt text of a conversation with `tools` offered: the template
/// describes them when it reads them; else ringlet describes them, and
/// earlier calls and results, in words every template renders (see
/// [`crate::tools::describe_tools`]).
pub fn render_prompt(
    template: &ChatTemplate,
    messages: &[ChatMessage],
    tools: Option<&serde_json::Value>,
) -> kernels::Result<String> {
    let mentions_tools = tools.is_some()
        || messages
            .iter()
            .any(|m| m.role == "tool" || !m.tool_calls.is_empty());
    if mentions_tools && !template.reads_tools() {
        let described = crate::tools::describe_tools(messages, tools);
        template.render(&described, true)
    } else {
        template.render_with_tools(messages, tools, true)
    }
}
