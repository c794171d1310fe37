//! From a stream of token ids to a stream of text: incremental decoding
//! that never splits a UTF-8 character, and stop sequences that are cut out
//! even when they straddle two tokens.

use std::collections::VecDeque;
use std::sync::Arc;

use kernels::{TokenLogprobs, Tokenizer};

use crate::engine::{FinishReason, Generation, GenerationEvent};

/// How many of a prompt's last tokens [`TextDecoder::after`] decodes
/// before the first generated token: one whole character before it is
/// enough for the leading space; a few more, as vLLM's detokenizer keeps,
/// cover tokenizers whose decoders look further back.
const DECODER_CONTEXT_TOKENS: usize = 5;

/// The tokens of `prompt` that [`TextDecoder::after`] decodes first.
pub fn decoder_context(prompt: &[u32]) -> &[u32] {
    &prompt[prompt.len().saturating_sub(DECODER_CONTEXT_TOKENS)..]
}

/// Turns tokens into text pieces as soon as they are complete characters.
///
/// Decoding token by token is wrong for byte-level BPE (one character can
/// span tokens) and for tokenizers that merge spaces across tokens, so each
/// step decodes a short window of recent tokens and emits what it added.
#[derive(Debug)]
pub struct TextDecoder {
    tokenizer: Arc<Tokenizer>,
    tokens: Vec<u32>,
    /// Start of the window decoded for context.
    prefix_offset: usize,
    /// End of the text already emitted.
    read_offset: usize,
}

impl TextDecoder {
    pub fn new(tokenizer: Arc<Tokenizer>) -> Self {
        Self {
            tokenizer,
            tokens: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// Decodes what follows `context` (a prompt's tokens) as the rest of
    /// that text. A SentencePiece decoder that adds a space prefix strips
    /// the leading space of what it decodes first, so without the prompt
    /// before it a completion's first word loses its space (`The capital
    /// of France isParis`). Context that ends inside a character is not
    /// used: its bytes would join the first token's.
    pub fn after(tokenizer: Arc<Tokenizer>, context: &[u32]) -> Self {
        let context = decoder_context(context);
        let whole = tokenizer
            .decode(context)
            .is_ok_and(|text| !text.ends_with('\u{FFFD}'));
        let tokens = if whole { context.to_vec() } else { Vec::new() };
        Self {
            tokenizer,
            prefix_offset: 0,
            read_offset: tokens.len(),
            tokens,
        }
    }

    /// Adds a token; returns the new text if it ends on a whole character.
    pub fn push(&mut self, token: u32) -> Result<Option<String>, kernels::KernelError> {
        self.tokens.push(token);
        let prefix = self
            .tokenizer
            .decode(&self.tokens[self.prefix_offset..self.read_offset])?;
        let full = self.tokenizer.decode(&self.tokens[self.prefix_offset..])?;
        if full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && full.is_char_boundary(prefix.len())
        {
            self.prefix_offset = self.read_offset;
            self.read_offset = self.tokens.len();
            Ok(Some(full[prefix.len()..].to_string()))
        } else {
            Ok(None)
        }
    }

    /// Text not emitted yet (an incomplete character at the very end).
    pub fn flush(&mut self) -> Result<String, kernels::KernelError> {
        let prefix = self
            .tokenizer
            .decode(&self.tokens[self.prefix_offset..self.read_offset])?;
        let full = self.tokenizer.decode(&self.tokens[self.prefix_offset..])?;
        self.prefix_offset = self.tokens.len();
        self.read_offset = self.tokens.len();
        Ok(full.get(prefix.len()..).unwrap_or_default().to_string())
    }
}

/// What a [`StopMatcher`] lets through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopOutcome {
    /// Text that can be shown: it cannot be the start of a stop sequence.
    Emit(String),
    /// A stop sequence matched; this is the text before it.
    Stopped(String),
}

/// Finds the earliest stop sequence in generated text, holding back just
/// enough text to see one that arrives over several pieces.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        let stops = stops.into_iter().filter(|s| !s.is_empty()).collect();
        Self {
            stops,
            pending: String::new(),
        }
    }

    pub fn push(&mut self, text: &str) -> StopOutcome {
        self.pending.push_str(text);
        let earliest = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = earliest {
            let before = self.pending[..at].to_string();
            self.pending.clear();
            return StopOutcome::Stopped(before);
        }
        let hold = self.longest_partial_stop();
        let emit_len = self.pending.len() - hold;
        let emitted = self.pending[..emit_len].to_string();
        self.pending.drain(..emit_len);
        StopOutcome::Emit(emitted)
    }

    /// Text held back when generation ends without a match.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Length of the longest suffix of `pending` that begins a stop sequence.
    fn longest_partial_stop(&self) -> usize {
        self.stops
            .iter()
            .flat_map(|stop| {
                (1..stop.len())
                    .rev()
                    .filter(|&k| stop.is_char_boundary(k) && self.pending.ends_with(&stop[..k]))
                    .take(1)
            })
            .max()
            .unwrap_or(0)
    }
}

/// A generated token's log probabilities, for a client that asked.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprobs: TokenLogprobs,
}

/// A piece of a generation's text, or its end.
#[derive(Debug, Clone, PartialEq)]
pub enum TextEvent {
    /// Text, and the log probabilities (if asked for) of the tokens that
    /// came since the last piece. At the end a piece may have no text.
    Delta {
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
    Finished {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed(String),
}

/// A whole generation, as [`TextStream::collect`] gathers it.
#[derive(Debug)]
pub struct Collected {
    pub text: String,
    pub logprobs: Vec<TokenLogprob>,
    pub reason: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// The text of one generation, from the engine's token events.
/// Dropping it cancels the generation.
#[derive(Debug)]
pub struct TextStream {
    generation: Generation,
    decoder: TextDecoder,
    stops: StopMatcher,
    prompt_tokens: usize,
    completion_tokens: usize,
    /// Log probabilities of tokens whose text is not out yet.
    logprobs: Vec<TokenLogprob>,
    out: VecDeque<TextEvent>,
    done: bool,
    /// When the generation was submitted, and when its last token came:
    /// the time to first token and between tokens, for the metrics.
    submitted: std::time::Instant,
    last_token_at: Option<std::time::Instant>,
}

impl TextStream {
    pub fn new(
        generation: Generation,
        tokenizer: Arc<Tokenizer>,
        stops: Vec<String>,
        prompt_tokens: usize,
    ) -> Self {
        Self {
            generation,
            decoder: TextDecoder::new(tokenizer),
            stops: StopMatcher::new(stops),
            prompt_tokens,
            completion_tokens: 0,
            logprobs: Vec::new(),
            out: VecDeque::new(),
            submitted: std::time::Instant::now(),
            last_token_at: None,
            done: false,
        }
    }

    /// The generation's text as the continuation of `prompt` (legacy
    /// completions): see [`TextDecoder::after`]. Before the first event.
    pub fn continuing(mut self, prompt: &[u32]) -> Self {
        self.decoder = TextDecoder::after(Arc::clone(&self.decoder.tokenizer), prompt);
        self
    }

    /// The next event; `None` after `Finished` or `Failed`.
    pub async fn next(&mut self) -> Option<TextEvent> {
        loop {
            if let Some(event) = self.out.pop_front() {
                return Some(event);
            }
            if self.done {
                return None;
            }
            match self.generation.events.recv().await {
                Some(GenerationEvent::Token { token, logprobs }) => {
                    self.time_token();
                    if let Some(logprobs) = logprobs {
                        self.logprobs.push(TokenLogprob { token, logprobs });
                    }
                    self.on_token(token);
                }
                Some(GenerationEvent::Finished {
                    reason,
                    prompt_tokens,
                    completion_tokens,
                }) => {
                    let mut tail = self.decoder.flush().unwrap_or_default();
                    match self.stops.push(&tail) {
                        StopOutcome::Emit(text) => {
                            tail = text + &self.stops.flush();
                            self.finish(tail, reason, prompt_tokens, completion_tokens);
                        }
                        StopOutcome::Stopped(text) => {
                            self.finish(text, FinishReason::Stop, prompt_tokens, completion_tokens);
                        }
                    }
                }
                Some(GenerationEvent::Failed { message }) => {
                    self.done = true;
                    self.out.push_back(TextEvent::Failed(message));
                }
                None => {
                    self.done = true;
                    self.out
                        .push_back(TextEvent::Failed("the inference engine stopped".into()));
                }
            }
        }
    }

    /// Reads the generation to its end: all of its text, or why it failed.
    pub async fn collect(mut self) -> Result<Collected, String> {
        let (mut text, mut logprobs) = (String::new(), Vec::new());
        loop {
            match self.next().await {
                Some(TextEvent::Delta {
                    text: piece,
                    logprobs: tokens,
                }) => {
                    text.push_str(&piece);
                    logprobs.extend(tokens);
                }
                Some(TextEvent::Finished {
                    reason,
                    prompt_tokens,
                    completion_tokens,
                }) => {
                    return Ok(Collected {
                        text,
                        logprobs,
                        reason,
                        prompt_tokens,
                        completion_tokens,
                    });
                }
                Some(TextEvent::Failed(reason)) => return Err(reason),
                None => return Err("the generation ended without a result".into()),
            }
        }
    }

    fn time_token(&mut self) {
        let now = std::time::Instant::now();
        let metrics = crate::metrics::global();
        match self.last_token_at.replace(now) {
            None => metrics
                .time_to_first_token
                .observe((now - self.submitted).as_secs_f64()),
            Some(previous) => metrics
                .inter_token_latency
                .observe((now - previous).as_secs_f64()),
        }
    }

    fn on_token(&mut self, token: u32) {
        self.completion_tokens += 1;
        let text = match self.decoder.push(token) {
            Ok(Some(text)) => text,
            Ok(None) => return,
            Err(error) => {
                self.done = true;
                self.generation.events.close();
                self.out.push_back(TextEvent::Failed(format!(
                    "cannot decode token {token}: {error}"
                )));
                return;
            }
        };
        match self.stops.push(&text) {
            StopOutcome::Emit(text) if text.is_empty() => {}
            StopOutcome::Emit(text) => {
                let logprobs = std::mem::take(&mut self.logprobs);
                self.out.push_back(TextEvent::Delta { text, logprobs });
            }
            StopOutcome::Stopped(text) => {
                self.generation.stop();
                let (prompt, completion) = (self.prompt_tokens, self.completion_tokens);
                self.finish(text, FinishReason::Stop, prompt, completion);
            }
        }
    }

    fn finish(
        &mut self,
        text: String,
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    ) {
        let metrics = crate::metrics::global();
        metrics.prompt_tokens.inc_by(prompt_tokens as u64);
        metrics.completion_tokens.inc_by(completion_tokens as u64);
        if !text.is_empty() || !self.logprobs.is_empty() {
            let logprobs = std::mem::take(&mut self.logprobs);
            self.out.push_back(TextEvent::Delta { text, logprobs });
        }
        self.out.push_back(TextEvent::Finished {
            reason,
            prompt_tokens,
            completion_tokens,
        });
        self.done = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `pieces` through a matcher and returns (shown text, stopped?).
    fn run_stops(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut matcher = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut shown = String::new();
        for piece in pieces {
            match matcher.push(piece) {
                StopOutcome::Emit(text) => shown.push_str(&text),
                StopOutcome::Stopped(text) => {
                    shown.push_str(&text);
                    return (shown, true);
                }
            }
        }
        shown.push_str(&matcher.flush());
        (shown, false)
    }

    #[test]
    fn stop_sequences() {
        let cases: &[(&[&str], &[&str], &str, bool)] = &[
            (&[], &["hello", " world"], "hello world", false),
            (&["END"], &["abc", "END", "xyz"], "abc", true),
            (&["END"], &["ab", "E", "N", "D", "zz"], "ab", true),
            (&["END"], &["abEN", "x"], "abENx", false),
            (&["\n\n"], &["line\n", "\nnext"], "line", true),
            (&["bc", "abcd"], &["a", "bcd"], "", true),
            (&["bc", "abcd"], &["xa", "bcd"], "x", true),
            (&["é!"], &["café", "!"], "caf", true),
            (&["stop"], &["st", "op", "more"], "", true),
            (&["xyz"], &["xy"], "xy", false),
        ];
        for (stops, pieces, shown, stopped) in cases {
            assert_eq!(
                run_stops(stops, pieces),
                (shown.to_string(), *stopped),
                "stops {stops:?} pieces {pieces:?}"
            );
        }
    }

    #[test]
    fn held_back_text_is_only_a_possible_stop_prefix() {
        let mut matcher = StopMatcher::new(vec!["</answer>".into()]);
        assert_eq!(matcher.push("x </ans"), StopOutcome::Emit("x ".into()));
        assert_eq!(matcher.push("wer"), StopOutcome::Emit(String::new()));
        assert_eq!(matcher.push(">"), StopOutcome::Stopped(String::new()));
    }

    /// A SentencePiece tokenizer as Llama 2 and Mistral files have it: a
    /// space prefix (the key absent, as llama.cpp reads it), byte pieces,
    /// and control tokens.
    fn sentencepiece() -> Arc<Tokenizer> {
        use candle_core::quantized::gguf_file::Value;
        // (piece, GGUF token type): 2 unknown, 3 control, 6 byte, 1 normal.
        let vocabulary: &[(&str, i32)] = &[
            ("<unk>", 2),
            ("<s>", 3),
            ("</s>", 3),
            ("<0xF0>", 6),
            ("<0x9F>", 6),
            ("<0x98>", 6),
            ("<0x80>", 6),
            ("\u{2581}", 1),
            ("\u{2581}is", 1),
            ("\u{2581}Paris", 1),
            ("i", 1),
            ("s", 1),
        ];
        let array = |f: fn(&(&str, i32)) -> Value| Value::Array(vocabulary.iter().map(f).collect());
        let metadata = [
            ("tokenizer.ggml.model", Value::String("llama".into())),
            (
                "tokenizer.ggml.tokens",
                array(|(p, _)| Value::String(p.to_string())),
            ),
            ("tokenizer.ggml.scores", array(|_| Value::F32(0.0))),
            ("tokenizer.ggml.token_type", array(|(_, t)| Value::I32(*t))),
            ("tokenizer.ggml.bos_token_id", Value::U32(1)),
            ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_string(), value))
        .collect();
        Arc::new(Tokenizer::from_gguf_metadata(&metadata).expect("a SentencePiece tokenizer"))
    }

    const IS: u32 = 8;
    const PARIS: u32 = 9;

    #[test]
    fn a_continuation_keeps_the_space_a_sentencepiece_decoder_strips_first() {
        let tokenizer = sentencepiece();
        // Decoded alone, the first word loses its space: right for a chat
        // answer, wrong after a prompt.
        let mut alone = TextDecoder::new(Arc::clone(&tokenizer));
        assert_eq!(alone.push(PARIS).unwrap().as_deref(), Some("Paris"));
        let mut continuing = TextDecoder::after(Arc::clone(&tokenizer), &[1, IS]);
        assert_eq!(continuing.push(PARIS).unwrap().as_deref(), Some(" Paris"));
        assert_eq!(continuing.push(IS).unwrap().as_deref(), Some(" is"));
        // A prompt that ends inside a character is no context: its bytes
        // would join the first token's.
        let mut after_a_part = TextDecoder::after(Arc::clone(&tokenizer), &[IS, 3]);
        assert_eq!(after_a_part.push(PARIS).unwrap().as_deref(), Some("Paris"));
        // Only the prompt's last tokens are decoded each time.
        let long: Vec<u32> = std::iter::repeat_n(IS, 1000).collect();
        assert_eq!(decoder_context(&long).len(), DECODER_CONTEXT_TOKENS);
    }

    #[test]
    fn a_tokens_own_text_and_bytes_keep_its_space_and_its_part_of_a_character() {
        let tokenizer = sentencepiece();
        assert_eq!(tokenizer.token_text(PARIS), " Paris");
        assert_eq!(tokenizer.token_text_bytes(PARIS), b" Paris");
        assert_eq!(tokenizer.token_text_bytes(3), [0xF0]);
        assert_eq!(tokenizer.token_text(3), "\u{FFFD}");
        // A control token by its name, which no generated text holds.
        assert_eq!(tokenizer.token_text(2), "</s>");
        assert!(tokenizer.is_control(2) && !tokenizer.is_control(PARIS));
        // The four byte tokens of 😀 join into it.
        let bytes: Vec<u8> = (3..7)
            .flat_map(|id| tokenizer.token_text_bytes(id))
            .collect();
        assert_eq!(String::from_utf8(bytes).as_deref(), Ok("\u{1F600}"));
    }
}
