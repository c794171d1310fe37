//! Constrained decoding: a grammar (a JSON schema, or a Lark grammar that
//! may embed JSON schemas) turned into a mask of the tokens that may come
//! next, by `llguidance`, the engine llama.cpp and vLLM use. The sampler
//! keeps one [`ConstraintMatcher`] per sequence and draws only from the
//! tokens it allows, so the answer always matches the grammar.

use std::sync::{Arc, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, SimpleVob, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde::{Deserialize, Serialize};

use crate::Tokenizer;

/// What an answer must match. Part of the link protocol (inside the
/// sampling parameters): changing it changes the protocol version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Constraint {
    /// A JSON schema, as JSON text (the wire format cannot carry a
    /// self-describing JSON value).
    JsonSchema(String),
    /// A grammar in llguidance's Lark dialect, where `%json { ... }`
    /// embeds a JSON schema: the shape of a tool call.
    Lark(String),
}

/// Why a grammar cannot be used, or a step of it failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct GrammarError(pub String);

/// The token vocabulary in the form the grammar engine needs, built once
/// per model on first use (a few tens of milliseconds for 50,000 tokens),
/// shared by every sequence.
pub struct Grammars {
    token_bytes: Arc<[Vec<u8>]>,
    stop_tokens: Vec<u32>,
    factory: OnceLock<Result<ParserFactory, String>>,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars")
            .field("vocab", &self.token_bytes.len())
            .finish_non_exhaustive()
    }
}

impl Grammars {
    pub fn new(tokenizer: &Tokenizer) -> Self {
        Self {
            token_bytes: Arc::clone(tokenizer.token_bytes()),
            stop_tokens: tokenizer.stop_tokens().iter().copied().collect(),
            factory: OnceLock::new(),
        }
    }

    fn factory(&self) -> Result<&ParserFactory, GrammarError> {
        self.factory
            .get_or_init(|| {
                let first_stop = *self
                    .stop_tokens
                    .first()
                    .ok_or("the model names no end-of-turn token, so a grammar cannot end")?;
                let info = TokRxInfo::new(self.token_bytes.len() as u32, first_stop);
                let trie =
                    TokTrie::from(&info, &self.token_bytes).with_eos_tokens(&self.stop_tokens);
                let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
                let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
                factory.quiet();
                Ok(factory)
            })
            .as_ref()
            .map_err(|e| GrammarError(e.clone()))
    }

    /// Compiles `constraint`, or says what in it is at fault (a malformed
    /// schema, an unsupported keyword).
    pub fn matcher(&self, constraint: &Constraint) -> Result<ConstraintMatcher, GrammarError> {
        let grammar = match constraint {
            Constraint::JsonSchema(text) => {
                let schema: serde_json::Value = serde_json::from_str(text)
                    .map_err(|e| GrammarError(format!("the schema is not JSON: {e}")))?;
                TopLevelGrammar::from_json_schema(compact_json_layout(schema))
            }
            Constraint::Lark(text) => TopLevelGrammar::from_lark(text.clone()),
        };
        let factory = self.factory()?;
        let matcher = Matcher::new(factory.create_parser(grammar));
        if let Some(error) = matcher.get_error() {
            return Err(GrammarError(error));
        }
        Ok(ConstraintMatcher {
            matcher,
            next: None,
            vocab: self.token_bytes.len(),
        })
    }
}

/// JSON laid out as models usually write it (`{"a": 1, "b": [2, 3]}`),
/// with no room for runs of whitespace: a small model at a high
/// temperature could otherwise write spaces until it runs out of tokens.
pub fn compact_json_layout(mut schema: serde_json::Value) -> serde_json::Value {
    if let Some(object) = schema.as_object_mut() {
        let options = object
            .entry("x-guidance")
            .or_insert_with(|| serde_json::json!({}));
        if let Some(options) = options.as_object_mut() {
            for (key, value) in [
                ("whitespace_flexible", serde_json::json!(false)),
                ("item_separator", serde_json::json!(", ")),
                ("key_separator", serde_json::json!(": ")),
            ] {
                options.entry(key).or_insert(value);
            }
        }
    }
    schema
}

/// One sequence's place in its grammar.
pub struct ConstraintMatcher {
    matcher: Matcher,
    /// The mask for the next token, when computed ahead.
    next: Option<SimpleVob>,
    vocab: usize,
}

impl std::fmt::Debug for ConstraintMatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConstraintMatcher").finish_non_exhaustive()
    }
}

impl ConstraintMatcher {
    /// Moves past tokens already generated (a sequence resumed on a new
    /// plan, or a prompt's forced prefix).
    pub fn replay(&mut self, tokens: &[u32]) -> Result<(), GrammarError> {
        self.next = None;
        self.matcher
            .consume_tokens(tokens)
            .map_err(|e| GrammarError(format!("the tokens so far break the grammar: {e}")))
    }

    /// Computes the next token's mask now, so that the sampler finds it
    /// ready: called once a token has been sent on its way, while the
    /// next forward pass runs elsewhere.
    pub fn prepare(&mut self) -> Result<(), GrammarError> {
        if self.next.is_none() {
            self.next = Some(self.mask()?);
        }
        Ok(())
    }

    fn mask(&mut self) -> Result<SimpleVob, GrammarError> {
        self.matcher
            .compute_mask_or_eos()
            .map_err(|e| GrammarError(format!("the grammar engine failed: {e}")))
    }

    /// Sets the logits of tokens the grammar does not allow next to -inf.
    pub fn apply(&mut self, logits: &mut [f32]) -> Result<(), GrammarError> {
        let mask = match self.next.take() {
            Some(mask) => mask,
            None => self.mask()?,
        };
        if mask.is_zero() {
            return Err(GrammarError(
                "the grammar allows no token here (the model's vocabulary cannot spell what it needs)"
                    .into(),
            ));
        }
        for (token, value) in logits.iter_mut().enumerate() {
            if token >= self.vocab || !mask.is_allowed(token as u32) {
                *value = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Moves past the token just drawn.
    pub fn consume(&mut self, token: u32) -> Result<(), GrammarError> {
        self.next = None;
        if self.matcher.is_stopped() {
            // The grammar is complete: only an end-of-turn token was
            // allowed, and it ends the answer.
            return Ok(());
        }
        self.matcher
            .consume_token(token)
            .map_err(|e| GrammarError(format!("token {token} breaks the grammar: {e}")))
    }
}
