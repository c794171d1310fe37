//! Choosing the next token from logits: greedy at temperature 0, else
//! temperature, top-k and top-p sampling from a seeded generator, so the
//! same seed gives the same output.

use candle_core::Tensor;
use candle_transformers::generation::{LogitsProcessor, Sampling};
use serde::{Deserialize, Serialize};

use crate::error::{KernelError, Result};

/// Temperatures below this are greedy: dividing logits by a value this
/// small would overflow anyway.
const GREEDY_BELOW_TEMPERATURE: f64 = 1e-5;

/// How to pick tokens. `temperature == 0` is greedy decoding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    pub temperature: f64,
    /// Nucleus sampling mass; 1.0 turns it off.
    pub top_p: f64,
    /// Keep only the `k` most likely tokens; `None` turns it off.
    pub top_k: Option<usize>,
    pub seed: u64,
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: None,
            seed: 0,
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_BELOW_TEMPERATURE || self.top_k == Some(1)
    }

    /// Checks the ranges OpenAI documents: temperature in [0, 2], top_p in
    /// (0, 1], top_k at least 1.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=2.0).contains(&self.temperature) {
            return Err(KernelError::BadSampling {
                name: "temperature",
                value: self.temperature,
                allowed: "0 to 2",
            });
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(KernelError::BadSampling {
                name: "top_p",
                value: self.top_p,
                allowed: "greater than 0, at most 1",
            });
        }
        if self.top_k == Some(0) {
            return Err(KernelError::BadSampling {
                name: "top_k",
                value: 0.0,
                allowed: "at least 1",
            });
        }
        Ok(())
    }
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: None,
            seed: 0,
        }
    }
}

/// A sampler for one sequence. Its whole state is its parameters and the
/// index of the next token it draws: the `i`-th token's randomness comes
/// from its own generator, seeded from the request's seed and `i`. So a
/// sequence rebuilt on another node (after a node of the ring was lost)
/// draws exactly what it would have drawn, from [`Sampler::resume`], with
/// nothing to carry but a count.
pub struct Sampler {
    sampling: Sampling,
    seed: u64,
    /// Tokens drawn so far: the index of the next one.
    drawn: u64,
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
        Self::resume(params, 0)
    }

    /// A sampler that has already drawn `drawn` tokens.
    pub fn resume(params: &SamplingParams, drawn: u64) -> Result<Self> {
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
        Ok(Self {
            sampling,
            seed: params.seed,
            drawn,
        })
    }

    /// Tokens drawn so far.
    pub fn drawn(&self) -> u64 {
        self.drawn
    }

    /// Picks a token from `[vocab]` logits.
    pub fn sample(&mut self, logits: &Tensor) -> Result<u32> {
        let seed = token_seed(self.seed, self.drawn);
        let mut processor = LogitsProcessor::from_sampling(seed, self.sampling.clone());
        let token = processor.sample(logits)?;
        self.drawn += 1;
        Ok(token)
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn logits() -> Result<Tensor> {
        let values: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        Ok(Tensor::new(values, &Device::Cpu)?)
    }

    #[test]
    fn greedy_is_argmax() -> Result<()> {
        let logits = Tensor::new(&[0.1f32, 3.0, -1.0, 2.9], &Device::Cpu)?;
        assert_eq!(Sampler::new(&SamplingParams::greedy())?.sample(&logits)?, 1);
        let top1 = SamplingParams {
            top_k: Some(1),
            ..SamplingParams::default()
        };
        assert_eq!(Sampler::new(&top1)?.sample(&logits)?, 1);
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
            };
            let mut sampler = Sampler::new(&params)?;
            (0..64).map(|_| sampler.sample(&logits)).collect()
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
        };
        let mut whole = Sampler::new(&params)?;
        let all: Vec<u32> = (0..40)
            .map(|_| whole.sample(&logits))
            .collect::<Result<_>>()?;
        let mut resumed = Sampler::resume(&params, 25)?;
        let rest: Vec<u32> = (0..15)
            .map(|_| resumed.sample(&logits))
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
        };
        let mut sampler = Sampler::new(&params)?;
        for _ in 0..100 {
            let t = sampler.sample(&logits)? as usize;
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
        ] {
            assert!(Sampler::new(&params).is_err(), "{params:?}");
        }
    }
}
