//! The model's tokenizer, built from the GGUF's own `tokenizer.ggml.*`
//! metadata with the `tokenizers` crate, so that no `tokenizer.json` is
//! needed beside the weights.
//!
//! Supported:
//! - byte-level BPE (`tokenizer.ggml.model = "gpt2"`), the family of
//!   SmolLM2, Llama 3, Qwen 2 and GPT-2, with the pre-tokenizer named by
//!   `tokenizer.ggml.pre` (the same regexes llama.cpp uses);
//! - SentencePiece BPE (`tokenizer.ggml.model = "llama"`), the family of
//!   Llama 2, Mistral 7B v0.x, TinyLlama and Gemma: pieces with scores and
//!   `<0xXX>` byte pieces. llama.cpp merges the adjacent pair whose joined
//!   text is the piece with the highest score, leftmost first; a BPE whose
//!   merges are every split of every piece into two pieces, ranked by the
//!   joined piece's score, makes the same choices (this is how
//!   `transformers` converts SentencePiece models too).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::error::{KernelError, Result};
use crate::gguf::{get_string, get_string_array};

/// GGUF token types (`tokenizer.ggml.token_type`), as llama.cpp numbers them.
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// Control-token texts that end a turn in common chat formats. llama.cpp
/// treats them as end-of-generation too, whatever `eos_token_id` says.
const END_OF_TURN_TEXTS: [&str; 7] = [
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "</s>",
];

/// Pre-tokenizer regexes as llama.cpp and the models' `tokenizer.json` give
/// them. (GPT-2's own regex is built into `ByteLevel(use_regex = true)`.)
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Text ↔ token ids for one model.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    stop_tokens: BTreeSet<u32>,
    max_token_bytes: usize,
    /// Each token's bytes as generated text holds them, control tokens
    /// as `0xFF` then their name (which no text can contain): what a
    /// grammar engine matches tokens against.
    token_bytes: Arc<[Vec<u8>]>,
    /// The control tokens' ids: their text is a name, not generated text.
    control: BTreeSet<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("max_token_bytes", &self.max_token_bytes)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

fn tokenizer_error(reason: impl std::fmt::Display) -> KernelError {
    KernelError::Tokenizer {
        reason: reason.to_string(),
    }
}

impl Tokenizer {
    pub fn from_gguf_metadata(metadata: &HashMap<String, Value>) -> Result<Self> {
        let model = get_string(metadata, "tokenizer.ggml.model")?;
        let tokens = get_string_array(metadata, "tokenizer.ggml.tokens")?;
        let token_types = match metadata.get("tokenizer.ggml.token_type") {
            Some(Value::Array(types)) => types.iter().map(|t| t.to_i32().unwrap_or(1)).collect(),
            _ => vec![1; tokens.len()],
        };
        let inner = match model.as_str() {
            "gpt2" => {
                let pre = metadata
                    .get("tokenizer.ggml.pre")
                    .and_then(|v| v.to_string().ok())
                    .map_or("default", String::as_str);
                byte_level_bpe(metadata, &tokens, pre)?
            }
            "llama" => sentencepiece_bpe(metadata, &tokens, &token_types)?,
            other => {
                return Err(tokenizer_error(format!(
                    "tokenizer model `{other}` is not supported yet; ringlet reads byte-level BPE (`gpt2`: SmolLM2, Llama 3, Qwen) and SentencePiece (`llama`: Llama 2, Mistral, Gemma) tokenizers"
                )));
            }
        };
        let mut tokenizer = Self {
            inner,
            bos: opt_u32(metadata, "tokenizer.ggml.bos_token_id"),
            eos: opt_u32(metadata, "tokenizer.ggml.eos_token_id"),
            // llama.cpp's default when the key is absent: SentencePiece
            // models start with BOS, byte-level BPE ones do not.
            add_bos: metadata
                .get("tokenizer.ggml.add_bos_token")
                .and_then(|v| v.to_bool().ok())
                .unwrap_or(model == "llama"),
            stop_tokens: BTreeSet::new(),
            // Byte-level BPE writes one character per byte; SentencePiece
            // writes UTF-8 (a `▁` is three bytes for one space), so the
            // character count bounds the bytes a piece decodes to either way.
            max_token_bytes: tokens.iter().map(|t| t.chars().count()).max().unwrap_or(1),
            token_bytes: tokens
                .iter()
                .zip(&token_types)
                .map(|(text, &kind)| token_bytes(text, kind, model == "gpt2"))
                .collect(),
            control: (0u32..)
                .zip(&token_types)
                .filter(|(_, kind)| **kind == TOKEN_TYPE_CONTROL)
                .map(|(id, _)| id)
                .collect(),
        };
        tokenizer.add_special_tokens(&tokens, &token_types);
        tokenizer.stop_tokens = tokenizer.end_of_generation_tokens(metadata, &tokens, &token_types);
        Ok(tokenizer)
    }

    /// Control and user-defined tokens are matched whole in the input
    /// (chat templates write them as text), and control tokens are left out
    /// of decoded text.
    fn add_special_tokens(&mut self, tokens: &[String], token_types: &[i32]) {
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(token_types)
            .filter(|(_, t)| **t == TOKEN_TYPE_CONTROL || **t == TOKEN_TYPE_USER_DEFINED)
            // Matched against the text as written, before a normalizer
            // turns spaces into `▁` (Gemma's user-defined tokens are runs
            // of spaces), as llama.cpp matches them.
            .map(|(text, t)| {
                AddedToken::from(text.clone(), *t == TOKEN_TYPE_CONTROL).normalized(false)
            })
            .collect();
        self.inner.add_special_tokens(&special);
    }

    fn end_of_generation_tokens(
        &self,
        metadata: &HashMap<String, Value>,
        tokens: &[String],
        token_types: &[i32],
    ) -> BTreeSet<u32> {
        let mut stops: BTreeSet<u32> = [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ]
        .iter()
        .filter_map(|key| opt_u32(metadata, key))
        .collect();
        for (id, (text, t)) in tokens.iter().zip(token_types).enumerate() {
            if *t == TOKEN_TYPE_CONTROL && END_OF_TURN_TEXTS.contains(&text.as_str()) {
                stops.insert(id as u32);
            }
        }
        stops
    }

    /// Token ids of `text`, with special tokens written as text (for
    /// example `<|im_start|>`) matched whole. A BOS token is prepended when
    /// the model asks for one and the text does not already start with it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.inner.encode(text, false).map_err(tokenizer_error)?;
        let mut ids = encoding.get_ids().to_vec();
        if let (true, Some(bos)) = (self.add_bos, self.bos)
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        Ok(ids)
    }

    /// Text of `ids`, without control tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(tokenizer_error)
    }

    /// Tokens in the vocabulary, control tokens included: the file's token
    /// list, one entry of `token_bytes` each. (`tokenizers` counts the same
    /// by copying its whole vocabulary, milliseconds of CPU per request.)
    pub fn vocab_size(&self) -> usize {
        self.token_bytes.len()
    }

    /// One token's own bytes, as clients see them beside its log
    /// probability (OpenAI's `bytes`): a text token's as generated text
    /// holds them, a part of a character's included (clients join such
    /// tokens' bytes into the character), and a control token's name
    /// (`<|im_end|>`). Not decoded alone: a SentencePiece decoder would
    /// strip a word's leading space, and a part of a character would read
    /// as U+FFFD.
    pub fn token_text_bytes(&self, id: u32) -> Vec<u8> {
        let Some(bytes) = self.token_bytes.get(id as usize) else {
            return Vec::new();
        };
        let skip = usize::from(self.is_control(id)); // the 0xFF mark
        bytes.get(skip..).unwrap_or_default().to_vec()
    }

    /// [`token_text_bytes`](Self::token_text_bytes) as text: a token that
    /// holds part of a character reads as U+FFFD.
    pub fn token_text(&self, id: u32) -> String {
        String::from_utf8_lossy(&self.token_text_bytes(id)).into_owned()
    }

    /// Whether `id` is a control token (BOS, EOS, a chat format's turn
    /// markers): generated text never holds its name.
    pub fn is_control(&self, id: u32) -> bool {
        self.control.contains(&id)
    }

    /// Tokens that end generation (EOS, end-of-turn).
    pub fn stop_tokens(&self) -> &BTreeSet<u32> {
        &self.stop_tokens
    }

    /// Every token's bytes, by id: text tokens as they appear in generated
    /// text, control tokens as `0xFF` followed by their name.
    pub fn token_bytes(&self) -> &Arc<[Vec<u8>]> {
        &self.token_bytes
    }

    /// Bytes of text in the longest token.
    pub fn max_token_bytes(&self) -> usize {
        self.max_token_bytes
    }

    pub fn bos_text(&self) -> String {
        self.bos
            .and_then(|id| self.inner.id_to_token(id))
            .unwrap_or_default()
    }

    pub fn eos_text(&self) -> String {
        self.eos
            .and_then(|id| self.inner.id_to_token(id))
            .unwrap_or_default()
    }
}

/// A vocabulary entry's bytes. Byte-level BPE writes each byte as one
/// character (GPT-2's table: printable Latin-1 bytes as themselves, the
/// others as U+0100 onwards, in order); SentencePiece writes spaces as `▁`
/// and bytes as `<0xXX>`; user-defined tokens are their text as written.
fn token_bytes(text: &str, kind: i32, byte_level: bool) -> Vec<u8> {
    if kind == TOKEN_TYPE_CONTROL {
        let mut bytes = vec![0xFF];
        bytes.extend_from_slice(text.as_bytes());
        return bytes;
    }
    if kind == TOKEN_TYPE_USER_DEFINED {
        return text.as_bytes().to_vec();
    }
    if byte_level {
        let mut bytes = Vec::with_capacity(text.len());
        for c in text.chars() {
            match gpt2_byte(c) {
                Some(b) => bytes.push(b),
                None => bytes.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
            }
        }
        return bytes;
    }
    if kind == TOKEN_TYPE_BYTE
        && let Some(hex) = text.strip_prefix("<0x").and_then(|t| t.strip_suffix('>'))
        && let Ok(byte) = u8::from_str_radix(hex, 16)
    {
        return vec![byte];
    }
    text.replace('\u{2581}', " ").into_bytes()
}

/// The byte a byte-level BPE character stands for.
fn gpt2_byte(c: char) -> Option<u8> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let code = c as u32;
    if code < 256 && printable(code) {
        return Some(code as u8);
    }
    // The bytes that are not printable, in order, became U+0100 onwards.
    let index = code.checked_sub(256)?;
    (0u32..256)
        .filter(|&b| !printable(b))
        .nth(index as usize)
        .map(|b| b as u8)
}

fn byte_level_bpe(
    metadata: &HashMap<String, Value>,
    tokens: &[String],
    pre: &str,
) -> Result<tokenizers::Tokenizer> {
    let merges = get_string_array(metadata, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|merge| {
            merge
                .split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| {
                    tokenizer_error(format!(
                        "merge `{merge}` is not two tokens separated by a space"
                    ))
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.clone(), id as u32))
        .collect();
    // Llama 3 looks a whole pre-token up in the vocabulary before merging.
    let ignore_merges = matches!(pre, "llama-bpe" | "llama3");
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(tokenizer_error)?;

    let byte_level =
        |use_regex| PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, use_regex));
    let split = |regex: &str| -> Result<PreTokenizerWrapper> {
        let split = Split::new(
            SplitPattern::Regex(regex.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(tokenizer_error)?;
        Ok(PreTokenizerWrapper::Split(split))
    };
    let pre_tokenizer = match pre {
        "default" | "gpt-2" | "gpt2" => byte_level(true),
        // llama.cpp: `\p{N}` then GPT-2's regex; tokenizer.json: Digits then ByteLevel.
        "smollm" | "starcoder" | "refact" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            byte_level(true),
        ])),
        "llama-bpe" | "llama3" | "smaug-bpe" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
            split(LLAMA3_REGEX)?,
            byte_level(false),
        ])),
        "qwen2" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
            split(QWEN2_REGEX)?,
            byte_level(false),
        ])),
        other => {
            return Err(tokenizer_error(format!(
                "pre-tokenizer `{other}` is not supported yet (supported: default, smollm, llama-bpe, qwen2)"
            )));
        }
    };

    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));
    Ok(tokenizer)
}

/// GGUF token types of SentencePiece pieces that are text, not control
/// tokens or single bytes (`<0xXX>`).
const TOKEN_TYPE_NORMAL: i32 = 1;
const TOKEN_TYPE_BYTE: i32 = 6;

/// A SentencePiece BPE vocabulary (`tokenizer.ggml.model = "llama"`) as a
/// `tokenizers` BPE: spaces become `▁` (and one is put in front of the
/// text when `tokenizer.ggml.add_space_prefix` says so, as llama.cpp
/// does), unknown characters fall back to their bytes' `<0xXX>` pieces.
fn sentencepiece_bpe(
    metadata: &HashMap<String, Value>,
    tokens: &[String],
    token_types: &[i32],
) -> Result<tokenizers::Tokenizer> {
    use tokenizers::decoders::byte_fallback::ByteFallback;
    use tokenizers::decoders::fuse::Fuse;
    use tokenizers::decoders::sequence::Sequence as DecoderSequence;
    use tokenizers::decoders::strip::Strip;
    use tokenizers::normalizers::{NormalizerWrapper, Prepend, Replace};

    let scores: Vec<f32> = match metadata.get("tokenizer.ggml.scores") {
        Some(Value::Array(scores)) if scores.len() == tokens.len() => {
            scores.iter().map(|s| s.to_f32().unwrap_or(0.0)).collect()
        }
        _ => {
            return Err(tokenizer_error(
                "a SentencePiece (`llama`) tokenizer needs `tokenizer.ggml.scores`, one per token",
            ));
        }
    };
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.clone(), id as u32))
        .collect();
    // Every split of a text piece into two pieces is a merge, ranked by the
    // joined piece's score (highest first), ties by id, as llama.cpp's
    // priority queue orders them.
    let mut ranked: Vec<(f32, u32, String, String)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if token_types.get(id).copied().unwrap_or(TOKEN_TYPE_NORMAL) != TOKEN_TYPE_NORMAL {
            continue;
        }
        for (at, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(at);
            if vocab.contains_key(left) && vocab.contains_key(right) {
                ranked.push((scores[id], id as u32, left.to_string(), right.to_string()));
            }
        }
    }
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let merges = ranked.into_iter().map(|(_, _, l, r)| (l, r)).collect();
    let has_bytes = token_types.contains(&TOKEN_TYPE_BYTE);
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(has_bytes);
    if let Some(unk) =
        opt_u32(metadata, "tokenizer.ggml.unknown_token_id").and_then(|id| tokens.get(id as usize))
    {
        builder = builder.unk_token(unk.clone());
    }
    let bpe = builder.build().map_err(tokenizer_error)?;

    let add_space_prefix = metadata
        .get("tokenizer.ggml.add_space_prefix")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(true);
    let space = Replace::new(" ", "\u{2581}").map_err(tokenizer_error)?;
    let mut normalizers = Vec::new();
    let mut decoders = vec![
        DecoderWrapper::Replace(Replace::new("\u{2581}", " ").map_err(tokenizer_error)?),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
    ];
    if add_space_prefix {
        normalizers.push(NormalizerWrapper::Prepend(Prepend::new("\u{2581}".into())));
        decoders.push(DecoderWrapper::Strip(Strip::new(' ', 1, 0)));
    }
    normalizers.push(NormalizerWrapper::Replace(space));
    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    tokenizer.with_normalizer(Some(tokenizers::normalizers::Sequence::new(normalizers)));
    tokenizer.with_decoder(Some(DecoderWrapper::Sequence(DecoderSequence::new(
        decoders,
    ))));
    Ok(tokenizer)
}

fn opt_u32(metadata: &HashMap<String, Value>, key: &str) -> Option<u32> {
    metadata.get(key).and_then(|v| v.to_u32().ok())
}
