//! Shared helpers for the kernels' model tests.

#![allow(dead_code)] // each test binary uses a part of these helpers
#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a failed expectation is the report

use std::path::PathBuf;

use kernels::{
    ChatMessage, Device, LayerRange, ModelFile, SequenceId, SequenceStep, Shard, ShardInput,
    ShardOutput, Tensor,
};
use serde_json::Value;

/// The default model's file in the model cache, where `ringlet pull` (run
/// by `tests/run`) puts it. `RINGLET_MODEL_PATH` overrides.
pub fn default_model_path() -> PathBuf {
    if let Some(path) = std::env::var_os("RINGLET_MODEL_PATH") {
        return PathBuf::from(path);
    }
    let models = match (
        std::env::var_os("RINGLET_HOME"),
        std::env::var_os("XDG_CACHE_HOME"),
        std::env::var_os("HOME"),
    ) {
        (Some(home), _, _) => PathBuf::from(home).join("models"),
        (None, Some(cache), _) => PathBuf::from(cache).join("ringlet/models"),
        (None, None, Some(home)) => PathBuf::from(home).join(".cache/ringlet/models"),
        (None, None, None) => PathBuf::from(".cache/ringlet/models"),
    };
    let path = models.join("smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.is_file(),
        "the default model is not at {}; run `tests/run` or `cargo run --release -- pull` first",
        path.display()
    );
    path
}

pub fn open_default_model() -> ModelFile {
    ModelFile::open(default_model_path()).expect("open the default model")
}

/// Shards for `ranges`, chained in order, acting as one model.
pub struct Chain {
    pub shards: Vec<Shard>,
}

impl Chain {
    pub fn load(model: &ModelFile, ranges: &[LayerRange]) -> Self {
        let shards = ranges
            .iter()
            .map(|&r| model.load_shard(r, &Device::Cpu).expect("load shard"))
            .collect();
        Self { shards }
    }

    /// Runs tokens at `position` through every shard; returns the logits.
    pub fn forward(&mut self, sequence: SequenceId, position: usize, tokens: &[u32]) -> Tensor {
        let mut input = ShardInput::Tokens(tokens.to_vec());
        for shard in &mut self.shards {
            match shard.forward(sequence, position, input).expect("forward") {
                ShardOutput::Hidden(h) => input = ShardInput::Hidden(h),
                ShardOutput::Logits(logits) => return logits,
            }
        }
        panic!("the chain has no last shard")
    }

    /// One batched step through every shard: each `(sequence, position,
    /// tokens)` in one `forward_batch` per shard; returns each one's logits.
    pub fn forward_batch(&mut self, steps: &[(SequenceId, usize, Vec<u32>)]) -> Vec<Vec<f32>> {
        let mut inputs: Vec<ShardInput> = steps
            .iter()
            .map(|(_, _, tokens)| ShardInput::Tokens(tokens.clone()))
            .collect();
        for shard in &mut self.shards {
            let batch = steps
                .iter()
                .zip(inputs)
                .map(|(&(sequence, position, _), input)| SequenceStep {
                    sequence,
                    position,
                    input,
                })
                .collect();
            let outputs = shard.forward_batch(batch);
            if let Some(ShardOutput::Logits(_)) = outputs.first().and_then(|o| o.as_ref().ok()) {
                return outputs
                    .into_iter()
                    .map(|o| match o.expect("batched step") {
                        ShardOutput::Logits(l) => l.to_vec1().expect("logits"),
                        ShardOutput::Hidden(_) => panic!("hidden states from the last shard"),
                    })
                    .collect();
            }
            inputs = outputs
                .into_iter()
                .map(|o| match o.expect("batched step") {
                    ShardOutput::Hidden(h) => ShardInput::Hidden(h),
                    ShardOutput::Logits(_) => panic!("logits from a shard that is not last"),
                })
                .collect();
        }
        panic!("the chain has no last shard")
    }

    /// Greedy decoding of `steps` tokens; returns the tokens and the logits
    /// of every step.
    pub fn greedy(
        &mut self,
        sequence: SequenceId,
        prompt: &[u32],
        steps: usize,
    ) -> (Vec<u32>, Vec<Vec<f32>>) {
        let mut logits = self.forward(sequence, 0, prompt);
        let mut tokens = Vec::new();
        let mut all_logits = Vec::new();
        for step in 0..steps {
            let values: Vec<f32> = logits.to_vec1().expect("logits to vec");
            let next = argmax(&values);
            all_logits.push(values);
            tokens.push(next);
            if step + 1 < steps {
                logits = self.forward(sequence, prompt.len() + step, &[next]);
            }
        }
        (tokens, all_logits)
    }
}

/// Index of the largest value; the first one on ties, as llama.cpp picks.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// The Gemma 3 270M Q4_K_M file `tests/run` fetches from PyPI.
pub fn gemma_model_path() -> PathBuf {
    let path = std::env::var_os("RINGLET_TEST_GEMMA_MODEL")
        .map(PathBuf::from)
        .expect("set RINGLET_TEST_GEMMA_MODEL (tests/run does)");
    assert!(
        path.is_file(),
        "no Gemma 3 model at {}; run tests/run",
        path.display()
    );
    path
}

/// The `messages` of a reference case, as chat messages.
pub fn messages(case: &Value) -> Vec<ChatMessage> {
    case["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| {
            ChatMessage::new(
                m["role"].as_str().expect("role"),
                m["content"].as_str().expect("content"),
            )
        })
        .collect()
}

/// A JSON array of token ids.
pub fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .expect("ids")
        .iter()
        .map(|v| v.as_u64().expect("id") as u32)
        .collect()
}

/// The SHA-256 of `bytes`, in hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    kernels::to_hex(&Sha256::digest(bytes))
}
