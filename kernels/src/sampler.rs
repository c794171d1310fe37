//! Choosing the next token from logits: greedy at temperature 0, else
//! temperature, top-k and top-p sampling from a seeded generator, so the
//! same seed gives the same output. Before the choice, the logits are
//! adjusted as asked (logit bias, then repetition, presence and frequency
//! penalties, then min-p), and the log probabilities a client asked for
//! are read from the adjusted logits over the temperature, before top-k
//! and top-p cut any token out.

use std::collections::{HashMap, HashSet};

use candle_core::{DType, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use serde::{Deserialize, Serialize};

use crate::error::{KernelError, Result};
use crate::grammar::{Constraint, ConstraintMatcher, GrammarError};

/// Temperatures below this are greedy: dividing logits by a value this
/// small would overflow anyway.
const GREEDY_BELOW_TEMPERATURE: f64 = 1e-5;

/// The most alternatives a token's log probabilities list (OpenAI's
/// `top_logprobs` limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// How to pick tokens. `temperature == 0` is greedy decoding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    pub temperature: f64,
    /// Nucleus sampling mass; 1.0 turns it off.
    pub top_p: f64,
    /// Keep only the `k` most likely tokens; `None` turns it off.
    pub top_k: Option<usize>,
    pub seed: u64,
    /// Drop tokens less likely than this fraction of the likeliest one
    /// (after the temperature); 0 turns it off.
    pub min_p: f64,
    /// Subtracted once from the logit of every token generated so far
    /// (OpenAI's `presence_penalty`, -2 to 2).
    pub presence_penalty: f64,
    /// Subtracted from a token's logit once per time it was generated
    /// (OpenAI's `frequency_penalty`, -2 to 2).
    pub frequency_penalty: f64,
    /// Logits of tokens in the prompt or generated so far are divided by
    /// this when positive, multiplied when negative (as in `transformers`,
    /// llama.cpp and vLLM); 1.0 turns it off.
    pub repetition_penalty: f64,
    /// Added to these tokens' logits (OpenAI's `logit_bias`, -100 to 100).
    pub logit_bias: Vec<(u32, f64)>,
    /// Report the chosen token's log probability and this many of the
    /// likeliest alternatives; `None` reports nothing.
    pub logprobs: Option<usize>,
    /// Draw only tokens this grammar allows (structured output, forced
    /// tool calls).
    pub constraint: Option<Constraint>,
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_BELOW_TEMPERATURE || self.top_k == Some(1)
    }

    /// Whether the sampler needs the tokens generated so far: for a
    /// penalty, or to find its place in a grammar.
    pub fn needs_generated(&self) -> bool {
        self.penalizes() || self.constraint.is_some()
    }

    /// Whether a penalty needs the tokens generated so far.
    pub fn penalizes(&self) -> bool {
        self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
            || self.repetition_penalty != 1.0
    }

    /// Whether the repetition penalty needs the prompt's tokens too.
    pub fn penalizes_prompt(&self) -> bool {
        self.repetition_penalty != 1.0
    }

    /// Checks the ranges OpenAI documents: temperature in [0, 2], top_p in
    /// (0, 1], top_k at least 1, penalties in [-2, 2], biases in
    /// [-100, 100]; and min_p in [0, 1], repetition_penalty in (0, 2],
    /// at most [`MAX_TOP_LOGPROBS`] alternatives.
    pub fn validate(&self) -> Result<()> {
        let bad = |name, value, allowed| {
            Err(KernelError::BadSampling {
                name,
                value,
                allowed,
            })
        };
        if !(0.0..=2.0).contains(&self.temperature) {
            return bad("temperature", self.temperature, "0 to 2");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", self.top_p, "greater than 0, at most 1");
        }
        if self.top_k == Some(0) {
            return bad("top_k", 0.0, "at least 1");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", self.min_p, "0 to 1");
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return bad("presence_penalty", self.presence_penalty, "-2 to 2");
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return bad("frequency_penalty", self.frequency_penalty, "-2 to 2");
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty <= 2.0) {
            return bad(
                "repetition_penalty",
                self.repetition_penalty,
                "greater than 0, at most 2",
            );
        }
        if let Some(&(_, bias)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| !(-100.0..=100.0).contains(b))
        {
            return bad("logit_bias", bias, "-100 to 100");
        }
        if let Some(n) = self.logprobs.filter(|&n| n > MAX_TOP_LOGPROBS) {
            return bad("top_logprobs", n as f64, "0 to 20");
        }
        Ok(())
    }

    /// Whether the logits must be read and adjusted before the choice.
    fn adjusts(&self) -> bool {
        self.penalizes()
            || !self.logit_bias.is_empty()
            || (self.min_p > 0.0 && !self.is_greedy())
            || self.logprobs.is_some()
            || self.constraint.is_some()
    }
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: None,
            seed: 0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            logprobs: None,
            constraint: None,
        }
    }
}

/// A chosen token's log probability and the likeliest alternatives, in
/// order, each with its own (the chosen token may be among them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprobs {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// What a sampler chose.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// When the parameters asked for log probabilities.
    pub logprobs: Option<TokenLogprobs>,
}

/// A sampler for one sequence. Its whole state is its parameters, the
/// tokens its penalties look at and the index of the next token it draws:
/// the `i`-th token's randomness comes from its own generator, seeded
/// from the request's seed and `i`. So a sequence rebuilt on another node
/// (after a node of the ring was lost) draws exactly what it would have
/// drawn, from [`Sampler::resume`], given the count and the tokens.
pub struct Sampler {
    params: SamplingParams,
    sampling: Sampling,
    /// Times each token was generated, for the presence and frequency
    /// penalties.
    generated: HashMap<u32, u32>,
    /// Tokens of the prompt and the answer so far, for the repetition
    /// penalty (empty when it is off).
    repeated: HashSet<u32>,
    /// Tokens drawn so far: the index of the next one.
    drawn: u64,
    /// Where the answer is in its grammar, when it has one.
    constraint: Option<ConstraintMatcher>,
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampler")
            .field("drawn", &self.drawn)
            .finish_non_exhaustive()
    }
}

impl Sampler {
    pub fn new(params: &SamplingParams) -> Result<Self> {
        Self::resume(params, 0, &[], &[])
    }

    /// A sampler that has already drawn `drawn` tokens. Its penalties look
    /// at `generated` (the tokens drawn so far, when
    /// [`SamplingParams::penalizes`]) and `prompt` (when
    /// [`SamplingParams::penalizes_prompt`]).
    pub fn resume(
        params: &SamplingParams,
        drawn: u64,
        prompt: &[u32],
        generated: &[u32],
    ) -> Result<Self> {
        params.validate()?;
        let temperature = params.temperature;
        let top_p = (params.top_p < 1.0).then_some(params.top_p);
        let sampling = match (params.is_greedy(), params.top_k, top_p) {
            (true, _, _) => Sampling::ArgMax,
            (false, None, None) => Sampling::All { temperature },
            (false, Some(k), None) => Sampling::TopK { k, temperature },
            (false, None, Some(p)) => Sampling::TopP { p, temperature },
            (false, Some(k), Some(p)) => Sampling::TopKThenTopP { k, p, temperature },
        };
        let mut counts = HashMap::new();
        for &token in generated {
            *counts.entry(token).or_insert(0) += 1;
        }
        let repeated = if params.penalizes_prompt() {
            prompt.iter().chain(generated).copied().collect()
        } else {
            HashSet::new()
        };
        Ok(Self {
            params: params.clone(),
            sampling,
            generated: counts,
            repeated,
            drawn,
            constraint: None,
        })
    }

    /// Constrains the draw to `matcher`'s grammar, past the tokens
    /// `generated` so far.
    pub fn constrain(
        mut self,
        mut matcher: ConstraintMatcher,
        generated: &[u32],
    ) -> std::result::Result<Self, GrammarError> {
        matcher.replay(generated)?;
        self.constraint = Some(matcher);
        Ok(self)
    }

    /// Gets ready for the next draw (the grammar's next mask) while the
    /// token just drawn travels and the next forward pass runs.
    pub fn prepare(&mut self) -> std::result::Result<(), GrammarError> {
        match &mut self.constraint {
            Some(matcher) => matcher.prepare(),
            None => Ok(()),
        }
    }

    /// Tokens drawn so far.
    pub fn drawn(&self) -> u64 {
        self.drawn
    }

    /// Picks a token from `[vocab]` logits.
    pub fn sample(&mut self, logits: &Tensor) -> Result<Sampled> {
        let seed = token_seed(self.params.seed, self.drawn);
        let mut processor = LogitsProcessor::from_sampling(seed, self.sampling.clone());
        let sampled = if self.params.adjusts() {
            let mut values: Vec<f32> = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            self.adjust(&mut values);
            if let Some(matcher) = &mut self.constraint {
                matcher.apply(&mut values).map_err(KernelError::Grammar)?;
            }
            let logprobs = self
                .params
                .logprobs
                .map(|top| self.log_probabilities(&values, top));
            self.apply_min_p(&mut values);
            let token = if self.params.is_greedy() {
                first_max_index(&values)
            } else {
                let adjusted = Tensor::from_vec(values, logits.elem_count(), logits.device())?;
                processor.sample(&adjusted)?
            };
            Sampled {
                token,
                logprobs: logprobs.map(|read| read(token)),
            }
        } else if self.params.is_greedy() && logits.device().is_cpu() {
            let logits = logits.to_dtype(DType::F32)?.flatten_all()?;
            Sampled {
                token: crate::cpu_ops::with_f32(&logits, first_max_index)?,
                logprobs: None,
            }
        } else {
            Sampled {
                token: processor.sample(logits)?,
                logprobs: None,
            }
        };
        if let Some(matcher) = &mut self.constraint {
            matcher
                .consume(sampled.token)
                .map_err(KernelError::Grammar)?;
        }
        self.drawn += 1;
        if self.params.penalizes() {
            *self.generated.entry(sampled.token).or_insert(0) += 1;
        }
        if self.params.penalizes_prompt() {
            self.repeated.insert(sampled.token);
        }
        Ok(sampled)
    }

    /// Logit bias, then the penalties.
    fn adjust(&self, values: &mut [f32]) {
        let params = &self.params;
        for &(token, bias) in &params.logit_bias {
            if let Some(v) = values.get_mut(token as usize) {
                *v += bias as f32;
            }
        }
        if params.repetition_penalty != 1.0 {
            let penalty = params.repetition_penalty as f32;
            for &token in &self.repeated {
                if let Some(v) = values.get_mut(token as usize) {
                    *v = if *v > 0.0 { *v / penalty } else { *v * penalty };
                }
            }
        }
        if params.presence_penalty != 0.0 || params.frequency_penalty != 0.0 {
            for (&token, &count) in &self.generated {
                if let Some(v) = values.get_mut(token as usize) {
                    *v -= params.presence_penalty as f32
                        + params.frequency_penalty as f32 * count as f32;
                }
            }
        }
    }

    /// Min-p: tokens whose probability (after the temperature) is below
    /// `min_p` times the likeliest one's are dropped.
    fn apply_min_p(&self, values: &mut [f32]) {
        let params = &self.params;
        if params.min_p <= 0.0 || params.is_greedy() {
            return;
        }
        let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let floor = max + (params.temperature * params.min_p.ln()) as f32;
        for v in values.iter_mut() {
            if *v < floor {
                *v = f32::NEG_INFINITY;
            }
        }
    }

    /// The log-softmax of the adjusted logits over the temperature (1 when
    /// greedy), and the `top` likeliest tokens; the chosen token's value
    /// is read once it is chosen.
    fn log_probabilities(
        &self,
        values: &[f32],
        top: usize,
    ) -> impl FnOnce(u32) -> TokenLogprobs + use<> {
        let temperature = if self.params.is_greedy() {
            1.0
        } else {
            self.params.temperature
        };
        let scaled: Vec<f64> = values.iter().map(|&v| f64::from(v) / temperature).collect();
        let max = scaled.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = scaled.iter().map(|v| (v - max).exp()).sum();
        let log_norm = max + sum.ln();
        let mut order: Vec<u32> = (0..scaled.len() as u32).collect();
        let top = top.min(order.len());
        if top > 0 {
            order.select_nth_unstable_by(top - 1, |a, b| {
                scaled[*b as usize].total_cmp(&scaled[*a as usize])
            });
            order.truncate(top);
            order.sort_by(|a, b| {
                scaled[*b as usize]
                    .total_cmp(&scaled[*a as usize])
                    .then(a.cmp(b))
            });
        } else {
            order.clear();
        }
        let top: Vec<(u32, f32)> = order
            .into_iter()
            .map(|t| (t, (scaled[t as usize] - log_norm) as f32))
            .collect();
        move |token| TokenLogprobs {
            logprob: scaled
                .get(token as usize)
                .map_or(f32::NEG_INFINITY, |v| (v - log_norm) as f32),
            top,
        }
    }
}

/// The seed of the generator for token `index` of a request seeded with
/// `seed`: SplitMix64's finalizer over both, so that neighbouring seeds
/// and indices give unrelated streams.
fn token_seed(seed: u64, index: u64) -> u64 {
    let mut z = seed ^ index.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The index of the first of the largest values, as Candle's `argmax`
/// picks it (a value replaces the best so far only when it is larger: a
/// tie goes to the first, and NaNs are passed over unless the first value
/// is one), in a fraction of its time, which was most of a greedy draw:
/// the maxima of 16 lanes, then the first 16 values that hold the largest.
fn first_max_index(values: &[f32]) -> u32 {
    if values.first().is_none_or(|v| v.is_nan()) {
        return 0;
    }
    let chunks = values.chunks_exact(16);
    let rest = chunks.remainder();
    let mut lanes = [f32::NEG_INFINITY; 16];
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = lane.max(v); // `max` passes NaNs over
        }
    }
    let max = lanes
        .iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let holds_max = |chunk: &[f32]| chunk.iter().fold(false, |seen, &v| seen | (v == max));
    let index = values
        .chunks(16)
        .position(holds_max)
        .and_then(|c| {
            let at = values[16 * c..].iter().position(|&v| v == max)?;
            Some(16 * c + at)
        })
        .unwrap_or(0);
    index as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_fast_argmax_picks_what_candles_picks() -> Result<()> {
        let nan = f32::NAN;
        let inf = f32::INFINITY;
        let mut cases: Vec<Vec<f32>> = vec![
            vec![1.0],
            vec![nan, 5.0, 7.0],
            vec![3.0, nan, 7.0, nan, 7.0],
            vec![-inf, -inf, -inf],
            vec![-inf, nan, -inf],
            vec![-0.0, 0.0, -0.0],
            vec![0.0, -0.0],
            vec![1.0, inf, 2.0, inf],
        ];
        // Ties and NaNs inside and across 16-value chunks, in a
        // vocabulary-sized row whose length is no multiple of 16.
        let mut seed = 7u64;
        for case in 0..24 {
            let mut row: Vec<f32> = (0..49_155)
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((seed >> 40) % 1000) as f32 * 0.01
                })
                .collect();
            let len = row.len();
            row[(case * 4099) % len] = 11.0;
            row[(case * 7919 + 5) % len] = 11.0;
            if case % 3 == 0 {
                row[(case * 131 + 1) % len] = nan;
            }
            cases.push(row);
        }
        for values in cases {
            let candle = Tensor::new(values.as_slice(), &Device::Cpu)?
                .argmax(candle_core::D::Minus1)?
                .to_scalar::<u32>()?;
            assert_eq!(
                first_max_index(&values),
                candle,
                "{:?}",
                &values[..values.len().min(8)]
            );
        }
        Ok(())
    }

    fn logits() -> Result<Tensor> {
        let values: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        Ok(Tensor::new(values, &Device::Cpu)?)
    }

    #[test]
    fn greedy_is_argmax() -> Result<()> {
        let logits = Tensor::new(&[0.1f32, 3.0, -1.0, 2.9], &Device::Cpu)?;
        assert_eq!(
            Sampler::new(&SamplingParams::greedy())?
                .sample(&logits)?
                .token,
            1
        );
        let top1 = SamplingParams {
            top_k: Some(1),
            ..SamplingParams::default()
        };
        assert_eq!(Sampler::new(&top1)?.sample(&logits)?.token, 1);
        Ok(())
    }

    #[test]
    fn same_seed_same_tokens_other_seed_other_tokens() -> Result<()> {
        let logits = logits()?;
        let draw = |seed| -> Result<Vec<u32>> {
            let params = SamplingParams {
                temperature: 1.5,
                top_p: 0.95,
                top_k: Some(40),
                seed,
                ..SamplingParams::default()
            };
            let mut sampler = Sampler::new(&params)?;
            (0..64)
                .map(|_| sampler.sample(&logits).map(|s| s.token))
                .collect()
        };
        assert_eq!(draw(7)?, draw(7)?);
        assert_ne!(draw(7)?, draw(8)?);
        Ok(())
    }

    #[test]
    fn a_resumed_sampler_continues_the_same_draws() -> Result<()> {
        let logits = logits()?;
        let params = SamplingParams {
            temperature: 1.2,
            top_p: 0.9,
            top_k: None,
            seed: 42,
            frequency_penalty: 0.5,
            ..SamplingParams::default()
        };
        let mut whole = Sampler::new(&params)?;
        let all: Vec<u32> = (0..40)
            .map(|_| whole.sample(&logits).map(|s| s.token))
            .collect::<Result<_>>()?;
        let mut resumed = Sampler::resume(&params, 25, &[], &all[..25])?;
        let rest: Vec<u32> = (0..15)
            .map(|_| resumed.sample(&logits).map(|s| s.token))
            .collect::<Result<_>>()?;
        assert_eq!(rest, all[25..]);
        assert_eq!(resumed.drawn(), 40);
        Ok(())
    }

    #[test]
    fn top_k_limits_choices() -> Result<()> {
        let logits = logits()?;
        let values: Vec<f32> = logits.to_vec1()?;
        let mut sorted = values.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let threshold = sorted[2];
        let params = SamplingParams {
            temperature: 2.0,
            top_p: 1.0,
            top_k: Some(3),
            seed: 1,
            ..SamplingParams::default()
        };
        let mut sampler = Sampler::new(&params)?;
        for _ in 0..100 {
            let t = sampler.sample(&logits)?.token as usize;
            assert!(values[t] >= threshold);
        }
        Ok(())
    }

    #[test]
    fn rejects_out_of_range() {
        for params in [
            SamplingParams {
                temperature: -0.1,
                ..SamplingParams::default()
            },
            SamplingParams {
                temperature: 2.5,
                ..SamplingParams::default()
            },
            SamplingParams {
                top_p: 0.0,
                ..SamplingParams::default()
            },
            SamplingParams {
                top_p: 1.5,
                ..SamplingParams::default()
            },
            SamplingParams {
                top_k: Some(0),
                ..SamplingParams::default()
            },
            SamplingParams {
                presence_penalty: 2.5,
                ..SamplingParams::default()
            },
            SamplingParams {
                repetition_penalty: 0.0,
                ..SamplingParams::default()
            },
            SamplingParams {
                min_p: 1.5,
                ..SamplingParams::default()
            },
            SamplingParams {
                logit_bias: vec![(3, 101.0)],
                ..SamplingParams::default()
            },
            SamplingParams {
                logprobs: Some(21),
                ..SamplingParams::default()
            },
        ] {
            assert!(Sampler::new(&params).is_err(), "{params:?}");
        }
    }

    #[test]
    fn greedy_logprobs_are_the_log_softmax_with_the_choice_on_top() -> Result<()> {
        let values = [0.5f32, 2.0, -1.0, 1.5];
        let logits = Tensor::new(&values, &Device::Cpu)?;
        let params = SamplingParams {
            logprobs: Some(2),
            ..SamplingParams::greedy()
        };
        let sampled = Sampler::new(&params)?.sample(&logits)?;
        let norm = values.iter().map(|v| v.exp()).sum::<f32>().ln();
        let logprobs = sampled.logprobs.expect("asked for");
        assert_eq!(sampled.token, 1);
        assert!((logprobs.logprob - (2.0 - norm)).abs() < 1e-6);
        assert_eq!(logprobs.top.len(), 2);
        assert_eq!((logprobs.top[0].0, logprobs.top[1].0), (1, 3));
        assert!((logprobs.top[1].1 - (1.5 - norm)).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn a_bias_and_penalties_move_the_choice() -> Result<()> {
        let logits = Tensor::new(&[0.5f32, 2.0, -1.0, 1.9], &Device::Cpu)?;
        let biased = SamplingParams {
            logit_bias: vec![(2, 100.0)],
            ..SamplingParams::greedy()
        };
        assert_eq!(Sampler::new(&biased)?.sample(&logits)?.token, 2);
        // Token 1 was generated once: a presence penalty of 0.2 puts 3 first.
        let present = SamplingParams {
            presence_penalty: 0.2,
            ..SamplingParams::greedy()
        };
        assert_eq!(
            Sampler::resume(&present, 1, &[], &[1])?
                .sample(&logits)?
                .token,
            3
        );
        // Token 1 in the prompt: 2.0 / 1.1 < 1.9.
        let repeated = SamplingParams {
            repetition_penalty: 1.1,
            ..SamplingParams::greedy()
        };
        assert_eq!(
            Sampler::resume(&repeated, 0, &[1], &[])?
                .sample(&logits)?
                .token,
            3
        );
        // A frequency penalty grows with each time the token came.
        let frequent = SamplingParams {
            frequency_penalty: 0.06,
            ..SamplingParams::greedy()
        };
        let mut sampler = Sampler::resume(&frequent, 1, &[], &[1])?;
        assert_eq!(sampler.sample(&logits)?.token, 1);
        let mut sampler = Sampler::resume(&frequent, 2, &[], &[1, 1])?;
        assert_eq!(sampler.sample(&logits)?.token, 3);
        Ok(())
    }

    #[test]
    fn min_p_drops_unlikely_tokens() -> Result<()> {
        // At temperature 1, token 2 is e^-3 ≈ 0.05 of token 1's probability.
        let logits = Tensor::new(&[0.0f32, 3.0, 0.0, 2.5], &Device::Cpu)?;
        let params = SamplingParams {
            min_p: 0.5,
            seed: 3,
            ..SamplingParams::default()
        };
        let mut sampler = Sampler::new(&params)?;
        for _ in 0..200 {
            let token = sampler.sample(&logits)?.token;
            assert!(token == 1 || token == 3, "{token}");
        }
        Ok(())
    }
}
