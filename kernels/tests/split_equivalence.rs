//! The key property of ringlet: any split of the layers into contiguous
//! shards computes exactly what one shard computes. Hidden states pass
//! between shards as f32 unchanged and every shard runs the same kernels
//! on the same inputs, so the logits must agree bit for bit; the tolerance
//! is zero.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a failed expectation is the report

mod common;

use kernels::{Device, KernelError, LayerRange, ModelFile, SequenceId, ShardInput};

const PROMPT: &str =
    "<|im_start|>user\nName three colours of the rainbow.<|im_end|>\n<|im_start|>assistant\n";
const DECODE_STEPS: usize = 8;

fn ranges(n_layers: usize, cuts: &[usize]) -> Vec<LayerRange> {
    let mut bounds = vec![0];
    bounds.extend_from_slice(cuts);
    bounds.push(n_layers);
    bounds
        .windows(2)
        .map(|w| LayerRange::new(w[0], w[1]))
        .collect()
}

#[test]
fn every_split_gives_bitwise_identical_logits() {
    let model = common::open_default_model();
    let n_layers = model.config().n_layers;
    assert_eq!(n_layers, 30);
    let prompt = model
        .tokenizer()
        .expect("tokenizer")
        .encode(PROMPT)
        .expect("encode");

    let mut one = common::Chain::load(&model, &[LayerRange::new(0, n_layers)]);
    let (reference_tokens, reference_logits) = one.greedy(SequenceId(1), &prompt, DECODE_STEPS);

    let mut splits: Vec<Vec<LayerRange>> = [2, 3, 5, 30]
        .iter()
        .map(|&k| LayerRange::split_even(n_layers, k))
        .collect();
    splits.push(ranges(n_layers, &[1, 29])); // uneven: a tiny first and last shard
    splits.push(ranges(n_layers, &[17])); // uneven halves
    for split in splits {
        let mut chain = common::Chain::load(&model, &split);
        let (tokens, logits) = chain.greedy(SequenceId(1), &prompt, DECODE_STEPS);
        assert_eq!(tokens, reference_tokens, "split {split:?}: tokens");
        for (step, (got, want)) in logits.iter().zip(&reference_logits).enumerate() {
            let same = got
                .iter()
                .zip(want)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "split {split:?}: logits differ at step {step}");
        }
    }
}

/// Several sequences in flight on one shard, their steps interleaved, give
/// each the same logits as running it alone.
#[test]
fn interleaved_sequences_match_separate_runs() {
    let model = common::open_default_model();
    let tokenizer = model.tokenizer().expect("tokenizer");
    let prompts: Vec<Vec<u32>> = [
        "Name a colour.",
        "Write a haiku about snow.",
        "What is 2 + 2?",
    ]
    .iter()
    .map(|p| {
        tokenizer
            .encode(&format!(
                "<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n"
            ))
            .expect("encode")
    })
    .collect();
    let n_layers = model.config().n_layers;
    let alone: Vec<_> = prompts
        .iter()
        .map(|p| {
            common::Chain::load(&model, &[LayerRange::new(0, n_layers)]).greedy(
                SequenceId(1),
                p,
                DECODE_STEPS,
            )
        })
        .collect();

    let mut chain = common::Chain::load(&model, &LayerRange::split_even(n_layers, 2));
    let mut next: Vec<u32> = Vec::new();
    let mut logits: Vec<Vec<Vec<f32>>> = vec![Vec::new(); prompts.len()];
    for (i, prompt) in prompts.iter().enumerate() {
        let l: Vec<f32> = chain
            .forward(SequenceId(i as u64), 0, prompt)
            .to_vec1()
            .expect("logits");
        next.push(common::argmax(&l));
        logits[i].push(l);
    }
    for step in 1..DECODE_STEPS {
        for (i, prompt) in prompts.iter().enumerate() {
            let l: Vec<f32> = chain
                .forward(SequenceId(i as u64), prompt.len() + step - 1, &[next[i]])
                .to_vec1()
                .expect("logits");
            next[i] = common::argmax(&l);
            logits[i].push(l);
        }
    }
    for (i, (tokens, reference)) in alone.iter().enumerate() {
        let same = logits[i]
            .iter()
            .flatten()
            .zip(reference.iter().flatten())
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(
            same,
            "sequence {i}: interleaved logits differ from its run alone (tokens {tokens:?})"
        );
    }
}

#[test]
fn shards_hold_only_their_layers() {
    let model = common::open_default_model();
    let n_layers = model.config().n_layers;
    let layer_bytes = model.layer_weight_bytes().expect("layer bytes");
    let embedding = model.embedding_bytes().expect("embedding bytes");
    let whole = model
        .load_shard(LayerRange::new(0, n_layers), &Device::Cpu)
        .expect("whole");
    let layers_total: u64 = layer_bytes.iter().sum();
    // Tied embeddings: the whole model holds the embedding once.
    assert!(model.ties_embeddings());
    assert_eq!(
        whole.weight_bytes(),
        layers_total + model.head_bytes().expect("head")
    );

    for range in [
        LayerRange::new(0, 10),
        LayerRange::new(10, 20),
        LayerRange::new(20, 30),
        LayerRange::new(7, 8),
    ] {
        let shard = model.load_shard(range, &Device::Cpu).expect("shard");
        let own: u64 = layer_bytes[range.start..range.end].iter().sum();
        assert_eq!(
            shard.weight_bytes(),
            model.shard_weight_bytes(range).expect("bytes"),
            "{range}"
        );
        let extra = shard.weight_bytes() - own;
        match (range.is_first(), range.is_last(n_layers)) {
            (false, false) => assert_eq!(extra, 0, "{range}: a middle shard holds only its layers"),
            (true, false) => assert_eq!(extra, embedding, "{range}"),
            (false, true) => assert_eq!(extra, model.head_bytes().expect("head"), "{range}"),
            (true, true) => unreachable!(),
        }
        assert!(
            shard.weight_bytes() < whole.weight_bytes(),
            "{range} holds less than the whole model"
        );
    }
}

#[test]
fn misuse_is_an_error_not_a_panic() {
    let model: ModelFile = common::open_default_model();
    let cpu = Device::Cpu;
    assert!(matches!(
        model.load_shard(LayerRange::new(20, 31), &cpu),
        Err(KernelError::LayerRangeOutOfBounds { .. })
    ));
    assert!(matches!(
        model.load_shard(LayerRange::new(5, 5), &cpu),
        Err(KernelError::LayerRangeOutOfBounds { .. })
    ));

    let mut first = model
        .load_shard(LayerRange::new(0, 2), &cpu)
        .expect("first");
    let mut middle = model
        .load_shard(LayerRange::new(2, 4), &cpu)
        .expect("middle");
    let seq = SequenceId(9);
    assert!(matches!(
        middle.forward(seq, 0, ShardInput::Tokens(vec![1, 2])),
        Err(KernelError::WrongInput { .. })
    ));
    assert!(matches!(
        first.forward(seq, 0, ShardInput::Tokens(vec![49_152])),
        Err(KernelError::TokenOutOfVocabulary { token: 49_152, .. })
    ));
    assert!(matches!(
        first.forward(seq, 0, ShardInput::Tokens(vec![])),
        Err(KernelError::EmptyInput { .. })
    ));
    first
        .forward(seq, 0, ShardInput::Tokens(vec![1, 2, 3]))
        .expect("prefill");
    assert_eq!(first.sequence_len(seq), Some(3));
    // Skipping a position is refused and drops the sequence's cache.
    assert!(matches!(
        first.forward(seq, 5, ShardInput::Tokens(vec![4])),
        Err(KernelError::PositionMismatch {
            expected: 3,
            got: 5,
            ..
        })
    ));
    assert_eq!(first.sequence_len(seq), None);
    let wrong = kernels::Tensor::zeros((2, 100), kernels::DType::F32, &cpu).expect("zeros");
    assert!(matches!(
        middle.forward(seq, 0, ShardInput::Hidden(wrong)),
        Err(KernelError::HiddenShape { .. })
    ));
}
