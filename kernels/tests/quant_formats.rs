//! Every weight format Candle reads loads and runs: a small llama model with
//! random weights is written in each format, loaded whole and split in two,
//! and both give the same finite logits, bit for bit. Q4_0, Q4_1, Q5_0,
//! Q8_0, Q4_K, Q5_K and Q6_K run on ringlet's own kernels, the rest on Candle's.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a failed expectation is the report

use std::path::PathBuf;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use kernels::{Device, LayerRange, ModelFile, SequenceId, ShardInput, ShardOutput, Tensor};

const HIDDEN: usize = 256; // K-quant blocks are 256 wide
const HEADS: u32 = 4;
const KV_HEADS: u32 = 2;
const FF: usize = 512;
const LAYERS: usize = 4;
const VOCAB: usize = 320;

/// Deterministic values in [-scale, scale].
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn tensor(rows: usize, cols: usize, seed: u64, dtype: GgmlDType) -> QTensor {
    let t = Tensor::from_vec(values(rows * cols, seed, 0.08), (rows, cols), &Device::Cpu)
        .expect("tensor");
    QTensor::quantize(&t, dtype).expect("quantize")
}

fn norm(seed: u64) -> QTensor {
    let v: Vec<f32> = values(HIDDEN, seed, 0.2).iter().map(|x| 1.0 + x).collect();
    QTensor::quantize(
        &Tensor::from_vec(v, HIDDEN, &Device::Cpu).expect("norm"),
        GgmlDType::F32,
    )
    .expect("f32")
}

/// Writes a model whose matrices are all `dtype`; `tied` leaves out `output.weight`.
fn write_model(dtype: GgmlDType, tied: bool) -> PathBuf {
    let head_dim = HIDDEN / HEADS as usize;
    let kv_rows = KV_HEADS as usize * head_dim;
    let mut tensors: Vec<(String, QTensor)> = vec![
        ("token_embd.weight".into(), tensor(VOCAB, HIDDEN, 1, dtype)),
        ("output_norm.weight".into(), norm(2)),
    ];
    if !tied {
        tensors.push(("output.weight".into(), tensor(VOCAB, HIDDEN, 3, dtype)));
    }
    for l in 0..LAYERS as u64 {
        let seed = 100 * (l + 1);
        for (name, t) in [
            ("attn_norm", norm(seed)),
            ("attn_q", tensor(HIDDEN, HIDDEN, seed + 1, dtype)),
            ("attn_k", tensor(kv_rows, HIDDEN, seed + 2, dtype)),
            ("attn_v", tensor(kv_rows, HIDDEN, seed + 3, dtype)),
            ("attn_output", tensor(HIDDEN, HIDDEN, seed + 4, dtype)),
            ("ffn_norm", norm(seed + 5)),
            ("ffn_gate", tensor(FF, HIDDEN, seed + 6, dtype)),
            ("ffn_up", tensor(FF, HIDDEN, seed + 7, dtype)),
            ("ffn_down", tensor(HIDDEN, FF, seed + 8, dtype)),
        ] {
            tensors.push((format!("blk.{l}.{name}.weight"), t));
        }
    }
    let metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.block_count", Value::U32(LAYERS as u32)),
        ("llama.embedding_length", Value::U32(HIDDEN as u32)),
        ("llama.feed_forward_length", Value::U32(FF as u32)),
        ("llama.attention.head_count", Value::U32(HEADS)),
        ("llama.attention.head_count_kv", Value::U32(KV_HEADS)),
        ("llama.context_length", Value::U32(128)),
        ("llama.vocab_size", Value::U32(VOCAB as u32)),
        ("llama.rope.freq_base", Value::F32(10_000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
    ];
    let path = std::env::temp_dir().join(format!(
        "ringlet-{dtype:?}-{tied}-{}.gguf",
        std::process::id()
    ));
    let mut file = std::fs::File::create(&path).expect("create");
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut file, &metadata, &tensors).expect("write gguf");
    path
}

/// Logits of a 5-token prompt and 3 decode steps through `ranges`.
fn run(model: &ModelFile, ranges: &[LayerRange]) -> Vec<Vec<f32>> {
    let mut shards: Vec<_> = ranges
        .iter()
        .map(|&r| model.load_shard(r, &Device::Cpu).expect("shard"))
        .collect();
    let mut tokens = vec![3u32, 17, 250, 9, 42];
    let mut position = 0;
    let mut all = Vec::new();
    for _ in 0..4 {
        let mut input = ShardInput::Tokens(tokens.clone());
        let mut logits = None;
        for shard in &mut shards {
            match shard
                .forward(SequenceId(1), position, input.clone())
                .expect("forward")
            {
                ShardOutput::Hidden(h) => input = ShardInput::Hidden(h),
                ShardOutput::Logits(l) => logits = Some(l),
            }
        }
        let logits = logits.expect("the last shard returns logits");
        let values: Vec<f32> = logits.to_vec1().expect("logits");
        position += tokens.len();
        let next = values
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i as u32);
        tokens = vec![next.expect("argmax")];
        all.push(values);
    }
    all
}

#[test]
fn every_weight_format_loads_runs_and_splits_exactly() {
    let formats = [
        GgmlDType::F32,
        GgmlDType::F16,
        GgmlDType::BF16,
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
        GgmlDType::Q2K,
        GgmlDType::Q3K,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ];
    for (i, dtype) in formats.into_iter().enumerate() {
        let tied = i % 2 == 0;
        let path = write_model(dtype, tied);
        let model = ModelFile::open(&path).expect("open");
        assert_eq!(model.ties_embeddings(), tied);
        let whole = run(&model, &[LayerRange::new(0, LAYERS)]);
        let split = run(&model, &[LayerRange::new(0, 1), LayerRange::new(1, LAYERS)]);
        for (step, (a, b)) in whole.iter().zip(&split).enumerate() {
            assert!(
                a.iter().all(|v| v.is_finite()),
                "{dtype:?}: non-finite logits at step {step}"
            );
            assert!(a.iter().any(|v| *v != 0.0), "{dtype:?}: all-zero logits");
            assert!(
                a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{dtype:?}: split logits differ at step {step}"
            );
        }
        for range in [
            LayerRange::new(0, 1),
            LayerRange::new(1, 3),
            LayerRange::new(3, 4),
        ] {
            let shard = model.load_shard(range, &Device::Cpu).expect("shard");
            assert_eq!(
                shard.weight_bytes(),
                model.shard_weight_bytes(range).expect("bytes"),
                "{dtype:?} {range}"
            );
        }
        std::fs::remove_file(&path).expect("remove temp model");
    }
}
