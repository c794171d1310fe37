//! Batched steps: several sequences through one step of a shard, their
//! rows sharing every matrix product, give each sequence the bits it gets
//! alone, on any split, whoever joins or leaves the batch. Greedy tokens
//! and every logit are compared; the tolerance is zero.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a failed expectation is the report

mod common;

use std::collections::BTreeMap;

use kernels::{
    Device, KernelError, LayerRange, ModelFile, SequenceId, SequenceStep, ShardInput, ShardOutput,
};

const DECODE_STEPS: usize = 10;

/// A sequence of the test: its prompt, and the steps at which it joins
/// and leaves the batch.
struct Plan {
    prompt: Vec<u32>,
    joins: usize,
    leaves: usize,
}

fn plans(model: &ModelFile) -> Vec<Plan> {
    let tokenizer = model.tokenizer().expect("tokenizer");
    let encode = |text: &str| tokenizer.encode(text).expect("encode");
    vec![
        // Two start together (a batch of two prompts of different lengths),
        // one joins while they decode (its prompt beside their one-token
        // rows), one joins later with a one-token prompt, one leaves early.
        Plan {
            prompt: encode("The capital of France is"),
            joins: 0,
            leaves: DECODE_STEPS,
        },
        Plan {
            prompt: encode("Write a haiku about the first snow of winter, please."),
            joins: 0,
            leaves: 6,
        },
        Plan {
            prompt: encode("1, 2, 3, 4,"),
            joins: 3,
            leaves: DECODE_STEPS,
        },
        Plan {
            prompt: encode("Hello"),
            joins: 5,
            leaves: DECODE_STEPS,
        },
    ]
}

/// Runs every plan in one batch per step on `ranges`; returns each
/// sequence's logits at every step it ran.
fn batched(model: &ModelFile, ranges: &[LayerRange], plans: &[Plan]) -> Vec<Vec<Vec<f32>>> {
    let mut chain = common::Chain::load(model, ranges);
    let mut logits: Vec<Vec<Vec<f32>>> = vec![Vec::new(); plans.len()];
    let mut next: BTreeMap<usize, (usize, u32)> = BTreeMap::new(); // plan → (position, token)
    for step in 0..DECODE_STEPS {
        let mut batch = Vec::new();
        let mut members = Vec::new();
        for (i, plan) in plans.iter().enumerate() {
            let id = SequenceId(100 + i as u64);
            if step == plan.joins {
                batch.push((id, 0, plan.prompt.clone()));
                members.push(i);
            } else if step > plan.joins && step < plan.leaves {
                let (position, token) = next[&i];
                batch.push((id, position, vec![token]));
                members.push(i);
            } else if step == plan.leaves {
                for shard in &mut chain.shards {
                    shard.release(id);
                }
            }
        }
        for (i, values) in members.into_iter().zip(chain.forward_batch(&batch)) {
            let position = plans[i].prompt.len() + logits[i].len();
            next.insert(i, (position, common::argmax(&values)));
            logits[i].push(values);
        }
    }
    logits
}

fn assert_batches_match_solo_runs(model: &ModelFile, splits: &[Vec<LayerRange>]) {
    let n_layers = model.config().n_layers;
    let plans = plans(model);
    let whole = [LayerRange::new(0, n_layers)];
    for split in splits {
        let together = batched(model, split, &plans);
        for (i, plan) in plans.iter().enumerate() {
            let steps = plan.leaves - plan.joins;
            let (tokens, alone) =
                common::Chain::load(model, &whole).greedy(SequenceId(1), &plan.prompt, steps);
            assert_eq!(together[i].len(), steps, "sequence {i}: steps run");
            for (step, (got, want)) in together[i].iter().zip(&alone).enumerate() {
                assert!(
                    got.iter()
                        .zip(want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "split {split:?}, sequence {i}: logits at step {step} differ from its run \
                     alone (tokens alone {tokens:?})"
                );
            }
        }
    }
}

#[test]
fn batched_steps_give_each_sequence_its_solo_bits() {
    let model = common::open_default_model();
    let n_layers = model.config().n_layers;
    assert!(
        model
            .load_shard(LayerRange::new(0, n_layers), &Device::Cpu)
            .expect("shard")
            .batches_exactly()
    );
    assert_batches_match_solo_runs(
        &model,
        &[
            vec![LayerRange::new(0, n_layers)],
            LayerRange::split_even(n_layers, 3),
        ],
    );
}

/// Gemma 3's Q4_K_M: repacked Q4_K (whose llama.cpp kernels round by the
/// row count: gemm for fours, gemv for the rest) and Q6_K (vec_dot below
/// eight rows, tiled from eight) beside each other in one batch.
#[test]
fn batched_k_quant_steps_give_each_sequence_its_solo_bits() {
    let model = ModelFile::open(common::gemma_model_path()).expect("open Gemma 3");
    let n_layers = model.config().n_layers;
    assert_batches_match_solo_runs(
        &model,
        &[
            vec![LayerRange::new(0, n_layers)],
            LayerRange::split_even(n_layers, 2),
        ],
    );
}

#[test]
fn a_bad_step_fails_alone_and_the_rest_of_its_batch_runs() {
    let model = common::open_default_model();
    let n_layers = model.config().n_layers;
    let mut shard = model
        .load_shard(LayerRange::new(0, n_layers), &Device::Cpu)
        .expect("shard");
    let (good, bad) = (SequenceId(1), SequenceId(2));
    shard
        .forward(bad, 0, ShardInput::Tokens(vec![1, 2, 3]))
        .expect("prefill");
    let step = |sequence, position, tokens: Vec<u32>| SequenceStep {
        sequence,
        position,
        input: ShardInput::Tokens(tokens),
    };
    let outputs = shard.forward_batch(vec![
        step(bad, 7, vec![4]), // skips positions
        step(good, 0, vec![5, 6]),
        step(good, 2, vec![7]), // the same sequence twice
    ]);
    assert!(matches!(
        outputs[0],
        Err(KernelError::PositionMismatch { .. })
    ));
    assert!(matches!(outputs[1], Ok(ShardOutput::Logits(_))));
    assert!(matches!(
        outputs[2],
        Err(KernelError::RepeatedInBatch { .. })
    ));
    assert_eq!(
        shard.sequence_len(bad),
        None,
        "the bad step's cache is dropped"
    );
    assert_eq!(shard.sequence_len(good), Some(2));
}
