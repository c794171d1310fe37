//! OpenAI's legacy completions: `POST /v1/completions`, a prompt continued
//! as plain text, which evaluation harnesses and older clients still use.
//! Shapes follow <https://platform.openai.com/docs/api-reference/completions>.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::chat::{FinishReason, StopField, StreamOptions, Usage};
use crate::models::Object;

/// `POST /v1/completions` body. Unknown fields are accepted and ignored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: PromptField,
    /// OpenAI's default is 16.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_of: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<StopField>,
    /// Give the prompt back before the completion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub echo: Option<bool>,
    /// Text after the completion (insertion); not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suffix: Option<String>,
    /// Report each token's log probability and this many likeliest
    /// alternatives (0 to 20; OpenAI allows 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logit_bias: Option<BTreeMap<String, f64>>,
}

/// A prompt: text or token ids, one or several (one choice each).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

impl Default for PromptField {
    fn default() -> Self {
        PromptField::Text(String::new())
    }
}

/// A whole answer, or (with `stream`) one chunk of one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    pub id: String,
    /// [`Object::TextCompletion`].
    pub object: Object,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    pub choices: Vec<CompletionChoice>,
    /// Whole answers always; chunks with `stream_options.include_usage`
    /// (null until one last chunk without choices).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionChoice {
    pub text: String,
    pub index: u32,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<FinishReason>,
}

/// The legacy shape of log probabilities: parallel lists, one entry per
/// token; `text_offset` is where each token's text starts in the choice's
/// text, in characters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<Option<f64>>,
    pub top_logprobs: Vec<Option<BTreeMap<String, f64>>>,
    pub text_offset: Vec<usize>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a failed expectation is the report

    use super::*;

    #[test]
    fn prompts_are_read_in_every_shape() {
        let read = |prompt: &str| {
            serde_json::from_str::<CompletionRequest>(&format!(
                r#"{{"model":"m","prompt":{prompt}}}"#
            ))
            .unwrap()
            .prompt
        };
        assert_eq!(read(r#""hi""#), PromptField::Text("hi".into()));
        assert_eq!(
            read(r#"["a","b"]"#),
            PromptField::Texts(vec!["a".into(), "b".into()])
        );
        assert_eq!(read("[1,2]"), PromptField::Tokens(vec![1, 2]));
        assert_eq!(
            read("[[1],[2,3]]"),
            PromptField::TokenLists(vec![vec![1], vec![2, 3]])
        );
    }
}
