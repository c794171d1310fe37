//! The CPU forward pass computes on its own thread pool only. Candle's
//! parallel element-wise ops start a second pool whose threads spin after
//! each op, on the same cores as the matmuls; on a 2-core machine that cost
//! a sixth of prefill speed. Prompts long enough for Candle to have used
//! its pool (64 Ki values in one tensor) must leave no such thread behind.
//! A test binary of its own: it looks at every thread of its process.

#![cfg(target_os = "linux")]
#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a failed expectation is the report

mod common;

use std::path::PathBuf;

use kernels::{LayerRange, ModelFile, SequenceId};

/// The names of this process's threads.
fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .expect("list this process's threads")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .collect()
}

/// A 128-token prefill, split in two shards, then a decoded token.
fn run(model: &ModelFile) {
    let n_layers = model.config().n_layers;
    let mut chain = common::Chain::load(model, &LayerRange::split_even(n_layers, 2));
    let vocab = model.config().vocab_size as u32;
    let prompt: Vec<u32> = (0..128).map(|i| (i * 97 + 11) % vocab).collect();
    let (tokens, _) = chain.greedy(SequenceId(1), &prompt, 1);
    assert_eq!(tokens.len(), 1, "one token decoded");
}

#[test]
fn forward_passes_start_no_spinning_pool() {
    let qwen2 = std::env::var_os("RINGLET_TEST_FAMILY_DIR")
        .map(|dir| PathBuf::from(dir).join("qwen2-q8_0.gguf"))
        .expect("set RINGLET_TEST_FAMILY_DIR (tests/run does): Qwen 2 has the Q, K, V biases");
    // The default model (residual additions) and Qwen 2 (also biases).
    for path in [common::default_model_path(), qwen2] {
        let model = ModelFile::open(&path).expect("open the model");
        run(&model);
        let spinning: Vec<String> = thread_names()
            .into_iter()
            .filter(|name| name.starts_with("candle-bp"))
            .collect();
        assert!(
            spinning.is_empty(),
            "{}: Candle's pool started: {spinning:?}",
            path.display()
        );
    }
}
