//! The one error type of the `kernels` crate.
//!
//! Variants carry the values a caller needs to act (`expected`, `got`, the
//! path, the key) rather than pre-formatted strings, in the manner of
//! `candle_core::Error`.

use std::path::PathBuf;

use crate::layers::{LayerRange, SequenceId};

/// Everything that can go wrong while reading a model, running a shard,
/// tokenizing or sampling.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("cannot read model file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path} is not a readable GGUF model file: {reason}")]
    NotGguf { path: PathBuf, reason: String },

    #[error("the model file has no metadata key `{key}`")]
    MissingMetadata { key: String },

    #[error("metadata key `{key}` should be {expected}")]
    BadMetadata { key: String, expected: &'static str },

    #[error(
        "architecture `{architecture}` is not supported; ringlet runs {supported} (the file's `general.architecture`)"
    )]
    UnsupportedArchitecture {
        architecture: String,
        /// Every `general.architecture` ringlet runs, comma-separated.
        supported: String,
    },

    #[error("the model file has no tensor `{name}`")]
    MissingTensor { name: String },

    #[error("tensor `{name}` has shape {got:?}, expected {expected:?}")]
    TensorShape {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },

    #[error("layer range {range} does not fit a model of {n_layers} layers")]
    LayerRangeOutOfBounds { range: LayerRange, n_layers: usize },

    #[error("shard {range} expects {expected} as input, got {got}")]
    WrongInput {
        range: LayerRange,
        expected: &'static str,
        got: &'static str,
    },

    #[error("hidden state has shape {got:?}, expected [tokens, {hidden_size}]")]
    HiddenShape { got: Vec<usize>, hidden_size: usize },

    #[error("sequence {sequence} is at position {expected}, the input starts at {got}")]
    PositionMismatch {
        sequence: SequenceId,
        expected: usize,
        got: usize,
    },

    #[error(
        "sequence {sequence} would reach {requested} tokens; the context holds {context_length}"
    )]
    ContextExceeded {
        sequence: SequenceId,
        requested: usize,
        context_length: usize,
    },

    #[error("an empty input was given to sequence {sequence}")]
    EmptyInput { sequence: SequenceId },

    #[error("sequence {sequence} appears twice in one batched step")]
    RepeatedInBatch { sequence: SequenceId },

    #[error("the batched step sequence {sequence} ran in failed: {reason}")]
    BatchFailed {
        sequence: SequenceId,
        reason: String,
    },

    #[error("token id {token} is outside the vocabulary of {vocab_size} tokens")]
    TokenOutOfVocabulary { token: u32, vocab_size: usize },

    #[error("tokenizer: {reason}")]
    Tokenizer { reason: String },

    #[error("chat template: {0}")]
    ChatTemplate(#[from] minijinja::Error),

    #[error("sampling parameter {name} = {value} is out of range ({allowed})")]
    BadSampling {
        name: &'static str,
        value: f64,
        allowed: &'static str,
    },

    #[error("constrained decoding: {0}")]
    Grammar(crate::grammar::GrammarError),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, KernelError>;
