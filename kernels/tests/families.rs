//! The families beyond llama (Gemma 3, Qwen 2, Qwen 3) against llama.cpp
//! on the same files: the same tokens for the prompts and plain texts, the
//! same top tokens after each prompt with logits within a [`tolerance`], and
//! the same greedy tokens; and each family split across shards gives
//! exactly what it gives whole.
//!
//! The references (`tests/golden/families.json`, made by
//! `tests/golden/make_family_reference.py`) come from a llama.cpp build
//! without AVX-512, whose f32 reductions run in 8 lanes where ringlet
//! follows the AVX-512 build's 16, so the logits agree to a tolerance here
//! rather than bit for bit (see the script).
//!
//! The files: Gemma 3 270M Q4_K_M from PyPI (`RINGLET_TEST_GEMMA_MODEL`),
//! and random-weight Qwen 2 and Qwen 3 files in Q8_0 and Q4_K_M
//! (`RINGLET_TEST_FAMILY_DIR`), both made by `tests/run`.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a failed expectation is the report

mod common;

use std::path::PathBuf;

use common::{ids, messages, sha256_hex};
use kernels::{LayerRange, ModelFile, SequenceId};
use serde_json::Value;

const REFERENCE: &str = include_str!("../../tests/golden/families.json");
/// One long chat for Gemma 3 (`make_family_reference.py --long`, made on an
/// AVX-512 host).
const LONG_REFERENCE: &str = include_str!("../../tests/golden/families-long.json");

/// How far a logit may be from llama.cpp's, per file: the 8- versus
/// 16-lane f32 sums differ in the last bits from the fifth token on, and
/// the activations' 8-bit quantization amplifies that through the layers.
/// Measured: Gemma 3 270M (logits up to 13) 0.27 and 0.95; the random
/// Qwen files (logits about ±3) at most 0.035.
fn tolerance(name: &str) -> f32 {
    if name == "gemma3" { 1.0 } else { 0.1 }
}

fn model_path(name: &str) -> PathBuf {
    if name == "gemma3" {
        return common::gemma_model_path();
    }
    let dir = std::env::var_os("RINGLET_TEST_FAMILY_DIR")
        .expect("set RINGLET_TEST_FAMILY_DIR (tests/run does) to test the Qwen files");
    let path = PathBuf::from(dir).join(format!("{name}.gguf"));
    assert!(
        path.is_file(),
        "{name}: no model at {}; run tests/run",
        path.display()
    );
    path
}

/// Checks one model against its reference, its logits within `tolerance`;
/// returns the prompt ids of its chats for the split check.
fn matches_llama_cpp(
    name: &str,
    reference: &Value,
    model: &ModelFile,
    tolerance: f32,
) -> Vec<Vec<u32>> {
    let tokenizer = model.tokenizer().expect("tokenizer");
    for text in reference["texts"].as_array().expect("texts") {
        let plain = text["text"].as_str().expect("text");
        let mut got = tokenizer.encode(plain).expect("encode");
        if got
            .first()
            .is_some_and(|&t| Some(t) == tokenizer.encode("").ok().and_then(|e| e.first().copied()))
        {
            got.remove(0); // the reference has no BOS on plain texts
        }
        assert_eq!(got, ids(&text["ids"]), "{name}: tokens of {plain:?}");
        assert_eq!(
            tokenizer.decode(&got).expect("decode"),
            plain,
            "{name}: round trip"
        );
    }
    let template = model.chat_template(&tokenizer).expect("template");
    let n_layers = model.config().n_layers;
    let mut whole = common::Chain::load(model, &[LayerRange::new(0, n_layers)]);
    let mut prompts = Vec::new();
    for (i, chat) in reference["chats"]
        .as_array()
        .expect("chats")
        .iter()
        .enumerate()
    {
        let case = chat["name"].as_str().expect("name");
        let prompt = template.render(&messages(chat), true).expect("render");
        assert_eq!(
            prompt,
            chat["prompt"].as_str().expect("prompt"),
            "{name}/{case}: prompt"
        );
        let prompt_ids = tokenizer.encode(&prompt).expect("encode");
        assert_eq!(
            prompt_ids,
            ids(&chat["prompt_ids"]),
            "{name}/{case}: prompt tokens"
        );
        let expected = ids(&chat["output_ids"]);
        let sequence = SequenceId(i as u64);
        let logits: Vec<f32> = whole
            .forward(sequence, 0, &prompt_ids)
            .to_vec1()
            .expect("logits");
        let top = chat["prompt_logits_top"].as_array().expect("top");
        let mut worst = 0f32;
        for entry in top {
            let (id, value) = (
                entry[0].as_u64().expect("id") as usize,
                entry[1].as_f64().expect("logit") as f32,
            );
            worst = worst.max((logits[id] - value).abs());
        }
        eprintln!("{name}/{case}: largest logit difference from llama.cpp {worst}");
        assert!(
            worst <= tolerance,
            "{name}/{case}: logits {worst} from llama.cpp's (tolerance {tolerance})"
        );
        let top_id = top[0][0].as_u64().expect("id") as u32;
        assert_eq!(
            common::argmax(&logits),
            top_id,
            "{name}/{case}: the top token after the prompt"
        );
        // Greedy decoding is chaotic where two tokens are nearly tied, so
        // follow llama.cpp's tokens (teacher forcing) and check that each
        // was ringlet's choice too, or within the tolerance of it.
        let mut logits = logits;
        for (step, &token) in expected.iter().enumerate() {
            let best = logits[common::argmax(&logits) as usize];
            let gap = best - logits[token as usize];
            assert!(
                gap <= tolerance,
                "{name}/{case}: step {step}: llama.cpp's token {token} is {gap} below ringlet's best"
            );
            logits = whole
                .forward(sequence, prompt_ids.len() + step, &[token])
                .to_vec1()
                .expect("logits");
        }
        prompts.push(prompt_ids);
    }
    prompts
}

/// Every family, whole and split in three, gives the same bits.
fn split_is_exact(name: &str, model: &ModelFile, prompt: &[u32]) {
    let n = model.config().n_layers;
    let mut whole = common::Chain::load(model, &[LayerRange::new(0, n)]);
    let mut split = common::Chain::load(
        model,
        &[
            LayerRange::new(0, n / 3),
            LayerRange::new(n / 3, n / 2),
            LayerRange::new(n / 2, n),
        ],
    );
    let (a, la) = whole.greedy(SequenceId(100), prompt, 6);
    let (b, lb) = split.greedy(SequenceId(100), prompt, 6);
    assert_eq!(a, b, "{name}: tokens whole and split");
    for (x, y) in la.iter().zip(&lb) {
        assert!(
            x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()),
            "{name}: logits whole and split"
        );
    }
}

/// A prompt of four tokens, where llama.cpp multiplies with the kernels
/// ringlet follows: every logit the same, bit for bit.
fn short_prompt_is_bit_exact(name: &str, reference: &Value, model: &ModelFile) {
    let prompt = ids(&reference["prefix"]["prompt_ids"]);
    let n = model.config().n_layers;
    let mut whole = common::Chain::load(model, &[LayerRange::new(0, n)]);
    let logits: Vec<f32> = whole
        .forward(SequenceId(200), 0, &prompt)
        .to_vec1()
        .expect("logits");
    let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(
        sha256_hex(&bytes),
        reference["prefix"]["logits_sha256"].as_str().expect("hash"),
        "{name}: logits after {prompt:?} differ from llama.cpp's"
    );
}

/// `exact_prefix`: whether the four-token prompt matches llama.cpp's bits
/// with this reference. It does for Gemma 3 and both Qwen 2 files. Qwen 3
/// matches for one and two tokens and not from the third: its heads are
/// 128 wide, and the reference's f32 dot products over a head run in 8
/// lanes where the AVX-512 build that ringlet follows runs 16, so its
/// attention scores differ in the last bits once there is a choice to
/// make; Qwen 3 is held to the tolerance.
fn family(name: &str, exact_prefix: bool) {
    let reference: Value = serde_json::from_str(REFERENCE).expect("reference json");
    let entry = &reference["models"][name];
    let model = ModelFile::open(model_path(name)).expect("open");
    if exact_prefix {
        short_prompt_is_bit_exact(name, entry, &model);
    }
    let prompts = matches_llama_cpp(name, entry, &model, tolerance(name));
    split_is_exact(name, &model, &prompts[0]);
}

#[test]
fn gemma3_q4_k_m_matches_llama_cpp_and_splits_exactly() {
    family("gemma3", true);
}

/// Gemma 3's sliding-window layers past their 512-token window: a chat of
/// 798 prompt tokens, whose keys fill 13 pages of KV cache and whose
/// window starts inside one, against llama.cpp as above. This reference
/// comes from an AVX-512 build, whose lanes ringlet follows: the logits
/// and every greedy choice agree exactly.
#[test]
fn gemma3_past_its_sliding_window_matches_llama_cpp() {
    let reference: Value = serde_json::from_str(LONG_REFERENCE).expect("reference json");
    let model = ModelFile::open(model_path("gemma3")).expect("open");
    let prompts = matches_llama_cpp("gemma3", &reference["models"]["gemma3"], &model, 0.0);
    assert_eq!(prompts.iter().map(Vec::len).collect::<Vec<_>>(), [798]);
}

#[test]
fn qwen2_q8_0_matches_llama_cpp_and_splits_exactly() {
    family("qwen2-q8_0", true);
}

#[test]
fn qwen2_q4_k_m_matches_llama_cpp_and_splits_exactly() {
    family("qwen2-q4_k_m", true);
}

#[test]
fn qwen3_q8_0_matches_llama_cpp_and_splits_exactly() {
    family("qwen3-q8_0", false);
}

#[test]
fn qwen3_q4_k_m_matches_llama_cpp_and_splits_exactly() {
    family("qwen3-q4_k_m", false);
}
