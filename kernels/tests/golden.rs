//! Golden test: the default model gives exactly what llama.cpp gives on the
//! same GGUF, for three short fixed chats and a long one (824 prompt
//! tokens, 13 pages of KV cache): the same prompt tokens, bit-identical
//! logits after the prompt (their SHA-256), and the same 32 greedy tokens.
//! ringlet's CPU kernels reproduce ggml's arithmetic (see `kernels::quant`),
//! so there is no tolerance. The reference was made by
//! `tests/golden/make_reference.py`.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a failed expectation is the report

mod common;

use common::{ids, messages, sha256_hex};
use kernels::{LayerRange, SequenceId};
use serde_json::Value;

const REFERENCES: [&str; 2] = [
    include_str!("../../tests/golden/smollm2-135m.json"),
    include_str!("../../tests/golden/smollm2-135m-long.json"),
];

#[test]
fn greedy_decoding_matches_llama_cpp() {
    let cases: Vec<Value> = REFERENCES
        .iter()
        .flat_map(|text| {
            let reference: Value = serde_json::from_str(text).expect("reference json");
            reference["cases"].as_array().expect("cases").clone()
        })
        .collect();
    assert_eq!(cases.len(), 4, "three short chats and a long one");
    let model = common::open_default_model();
    let tokenizer = model.tokenizer().expect("tokenizer");
    let template = model.chat_template(&tokenizer).expect("chat template");
    let n_layers = model.config().n_layers;
    let mut chain = common::Chain::load(&model, &[LayerRange::new(0, n_layers)]);

    for (i, case) in cases.iter().enumerate() {
        let name = case["name"].as_str().expect("name");
        let prompt = template.render(&messages(case), true).expect("render");
        assert_eq!(
            prompt,
            case["prompt"].as_str().expect("prompt"),
            "{name}: rendered chat template"
        );
        let prompt_ids = tokenizer.encode(&prompt).expect("encode");
        assert_eq!(
            prompt_ids,
            ids(&case["prompt_ids"]),
            "{name}: prompt tokens"
        );

        let expected = ids(&case["output_ids"]);
        let (tokens, logits) = chain.greedy(SequenceId(i as u64), &prompt_ids, expected.len());
        let bytes: Vec<u8> = logits[0].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(
            sha256_hex(&bytes),
            case["prompt_logits_sha256"].as_str().expect("hash"),
            "{name}: logits after the prompt differ from llama.cpp's (its top 5: {})",
            case["prompt_logits_top5"]
        );
        assert_eq!(
            tokens,
            expected,
            "{name}: greedy tokens differ from llama.cpp\nringlet:   {:?}\nllama.cpp: {:?}",
            tokenizer.decode(&tokens).unwrap_or_default(),
            case["output_text"].as_str().unwrap_or_default(),
        );
        assert_eq!(
            tokenizer.decode(&tokens).expect("decode"),
            case["output_text"].as_str().expect("text"),
            "{name}: decoded text"
        );
    }
}

#[test]
fn tokenizer_round_trips_text_and_special_tokens() {
    let model = common::open_default_model();
    let tokenizer = model.tokenizer().expect("tokenizer");
    for text in [
        "Hello, world!",
        "  leading spaces and\ttabs\nand newlines\n\n",
        "numbers 1234567 and 3.14159",
        "unicode: naïve café — 日本語 🦀",
        "code: fn main() { println!(\"hi\"); }",
    ] {
        let ids = tokenizer.encode(text).expect("encode");
        assert_eq!(tokenizer.decode(&ids).expect("decode"), text);
    }
    // Special tokens written as text are one token each and vanish on decode.
    let ids = tokenizer
        .encode("<|im_start|>user\nhi<|im_end|>")
        .expect("encode");
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&2));
    assert_eq!(tokenizer.decode(&ids).expect("decode"), "user\nhi");
    assert!(
        tokenizer.stop_tokens().contains(&2),
        "<|im_end|> ends generation"
    );
    // The vocabulary the API checks token ids against: every token of the
    // file, its control tokens included, and no more.
    assert_eq!(tokenizer.vocab_size(), model.config().vocab_size);
    assert_eq!(tokenizer.vocab_size(), tokenizer.token_bytes().len());
}
