//! Per-sequence key/value caches.
//!
//! Each layer keeps keys and values in buffers `[KV, capacity, d]` that
//! double when full, so a decode step writes one row in place instead of
//! re-concatenating the whole history.

use candle_core::Tensor;

use crate::error::Result;

/// Rows allocated for a sequence's first step; doubles from there.
const INITIAL_CAPACITY_TOKENS: usize = 64;

/// One sequence's caches for every layer of a shard.
#[derive(Debug)]
pub(crate) struct SequenceCache {
    layers: Vec<LayerCache>,
    len: usize,
}

impl SequenceCache {
    pub(crate) fn new(n_layers: usize) -> Self {
        Self {
            layers: (0..n_layers).map(|_| LayerCache::default()).collect(),
            len: 0,
        }
    }

    /// Tokens cached.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn set_len(&mut self, len: usize) {
        self.len = len;
    }

    /// The cache of the shard's `i`-th layer.
    pub(crate) fn layer_mut(&mut self, i: usize) -> &mut LayerCache {
        &mut self.layers[i]
    }
}

/// Keys and values of one layer for one sequence: Candle tensors where
/// Candle computes attention ([`append`](LayerCache::append)), plain
/// vectors where ringlet's CPU code does ([`append_rows`](LayerCache::append_rows)),
/// which writes rows in place without the tensor ops' allocations (they
/// cost more than the attention of a short context). A sequence's caches
/// take one of the two, as its shard's device does.
#[derive(Debug, Default)]
pub(crate) struct LayerCache {
    keys: Option<Tensor>,   // [KV, capacity, d]
    values: Option<Tensor>, // [KV, capacity, d]
    host: HostBuffers,
    len: usize,
}

/// A layer's cached keys and values after [`LayerCache::append_rows`]:
/// `[KV, capacity, d]` each, the first `len` rows of each head filled.
pub(crate) struct CachedRows<'a> {
    pub(crate) keys: &'a [f32],
    pub(crate) values: &'a [f32],
    pub(crate) capacity: usize,
    pub(crate) len: usize,
}

/// [`LayerCache`]'s CPU buffers, `[KV, capacity, d]` each.
#[derive(Debug, Default)]
struct HostBuffers {
    keys: Vec<f32>,
    values: Vec<f32>,
    capacity: usize,
}

impl LayerCache {
    /// Appends the rows of `k` and `v`, laid out `[n, KV, d]` as the
    /// projections give them, to the CPU buffers; returns all cached keys
    /// and values. Buffers never grow past `max_tokens` rows (the model's
    /// context).
    pub(crate) fn append_rows(
        &mut self,
        k: &[f32],
        v: &[f32],
        kv_heads: usize,
        d: usize,
        max_tokens: usize,
    ) -> Result<CachedRows<'_>> {
        let row = kv_heads * d;
        if row == 0 || k.len() != v.len() || !k.len().is_multiple_of(row) {
            return Err(candle_core::Error::Msg(format!(
                "KV cache rows of {kv_heads} heads of {d} values: got {} keys and {} values",
                k.len(),
                v.len()
            ))
            .into());
        }
        let n = k.len() / row;
        let needed = self.len + n;
        let host = &mut self.host;
        if needed > host.capacity {
            let capacity = grown_capacity(needed, max_tokens);
            for buffer in [&mut host.keys, &mut host.values] {
                let mut grown = vec![0f32; kv_heads * capacity * d];
                for h in 0..kv_heads {
                    grown[h * capacity * d..][..self.len * d]
                        .copy_from_slice(&buffer[h * host.capacity * d..][..self.len * d]);
                }
                *buffer = grown;
            }
            host.capacity = capacity;
        }
        for (i, (k_row, v_row)) in k.chunks_exact(row).zip(v.chunks_exact(row)).enumerate() {
            for h in 0..kv_heads {
                let at = (h * host.capacity + self.len + i) * d;
                host.keys[at..at + d].copy_from_slice(&k_row[h * d..(h + 1) * d]);
                host.values[at..at + d].copy_from_slice(&v_row[h * d..(h + 1) * d]);
            }
        }
        self.len = needed;
        Ok(CachedRows {
            keys: &host.keys,
            values: &host.values,
            capacity: host.capacity,
            len: needed,
        })
    }

    /// Appends `k` and `v` (`[KV, n, d]`, contiguous) and returns views of
    /// all cached keys and values, `[KV, len, d]`. Buffers never grow past
    /// `max_tokens` rows (the model's context).
    pub(crate) fn append(
        &mut self,
        k: &Tensor,
        v: &Tensor,
        max_tokens: usize,
    ) -> Result<(Tensor, Tensor)> {
        let (kv_heads, n, d) = k.dims3()?;
        let needed = self.len + n;
        let capacity = self.keys.as_ref().map_or(0, |t| t.dims()[1]);
        if needed > capacity {
            let new_capacity = grown_capacity(needed, max_tokens);
            self.keys = Some(grow(
                self.keys.take(),
                self.len,
                (kv_heads, new_capacity, d),
                k,
            )?);
            self.values = Some(grow(
                self.values.take(),
                self.len,
                (kv_heads, new_capacity, d),
                v,
            )?);
        }
        let (Some(keys), Some(values)) = (&self.keys, &self.values) else {
            unreachable!("buffers were allocated above");
        };
        keys.slice_set(k, 1, self.len)?;
        values.slice_set(v, 1, self.len)?;
        self.len = needed;
        Ok((keys.narrow(1, 0, needed)?, values.narrow(1, 0, needed)?))
    }

    /// The whole key and value buffers, `[KV, capacity, d]`, and the
    /// capacity; rows past the cached length are zero (what the tests
    /// compare the CPU buffers with).
    #[cfg(test)]
    pub(crate) fn buffers(&self) -> Result<(&Tensor, &Tensor, usize)> {
        match (&self.keys, &self.values) {
            (Some(k), Some(v)) => Ok((k, v, k.dims()[1])),
            _ => Err(candle_core::Error::Msg("the KV cache is empty".into()).into()),
        }
    }

    #[cfg(test)]
    fn allocated_bytes(&self) -> u64 {
        [&self.keys, &self.values]
            .iter()
            .filter_map(|t| t.as_ref())
            .map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
            .sum()
    }
}

/// Rows to allocate for `needed` cached tokens: double, from
/// [`INITIAL_CAPACITY_TOKENS`], but never past the model's context
/// (`max_tokens`) unless `needed` is.
fn grown_capacity(needed: usize, max_tokens: usize) -> usize {
    needed
        .next_power_of_two()
        .max(INITIAL_CAPACITY_TOKENS)
        .min(max_tokens.max(needed))
}

/// A zeroed buffer of `shape` holding the first `len` rows of `old`.
fn grow(
    old: Option<Tensor>,
    len: usize,
    shape: (usize, usize, usize),
    like: &Tensor,
) -> Result<Tensor> {
    let buffer = Tensor::zeros(shape, like.dtype(), like.device())?;
    if let Some(old) = old
        && len > 0
    {
        buffer.slice_set(&old.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
    }
    Ok(buffer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn append_keeps_history_across_growth() -> Result<()> {
        let dev = Device::Cpu;
        let mut cache = LayerCache::default();
        let mut all = Vec::new();
        // 100 single-token steps cross the 64-row initial capacity.
        for step in 0..100u32 {
            let k = Tensor::full(step as f32, (2, 1, 4), &dev)?;
            let v = Tensor::full(-(step as f32), (2, 1, 4), &dev)?;
            let (keys, values) = cache.append(&k, &v, 1 << 20)?;
            all.push(step as f32);
            assert_eq!(keys.dims(), &[2, all.len(), 4]);
            let got: Vec<f32> = keys.get(1)?.get_on_dim(1, 0)?.to_vec1()?;
            assert_eq!(got, all);
            let got: Vec<f32> = values.get(0)?.get_on_dim(1, 3)?.to_vec1()?;
            assert_eq!(got, all.iter().map(|x| -x).collect::<Vec<_>>());
        }
        assert_eq!(
            cache.allocated_bytes(),
            2 * (2 * 128 * 4 * DType::F32.size_in_bytes()) as u64
        );
        Ok(())
    }

    /// The CPU buffers hold what the tensor buffers hold, row for row,
    /// across growth (from `[n, KV, d]` rows instead of `[KV, n, d]`).
    #[test]
    fn host_rows_match_tensor_rows_across_growth() -> Result<()> {
        let dev = Device::Cpu;
        let (kv_heads, d) = (3, 4);
        let (mut tensors, mut host) = (LayerCache::default(), LayerCache::default());
        let mut len = 0;
        for (step, n) in [5usize, 1, 70, 1, 1, 60].into_iter().enumerate() {
            let rows: Vec<f32> = (0..n * kv_heads * d)
                .map(|i| (step * 1000 + i) as f32)
                .collect();
            let k = Tensor::from_vec(rows.clone(), (n, kv_heads, d), &dev)?
                .transpose(0, 1)?
                .contiguous()?;
            let v = (&k * -1.0)?;
            tensors.append(&k, &v, 1 << 20)?;
            let negated: Vec<f32> = rows.iter().map(|x| -x).collect();
            let cached = host.append_rows(&rows, &negated, kv_heads, d, 1 << 20)?;
            let (keys, values, capacity) = (cached.keys, cached.values, cached.capacity);
            len += n;
            assert_eq!(cached.len, len, "step {step}");
            let (want_k, want_v, want_capacity) = tensors.buffers()?;
            assert_eq!(capacity, want_capacity, "step {step}");
            for h in 0..kv_heads {
                let filled = |t: &Tensor| -> Result<Vec<f32>> {
                    Ok(t.get(h)?.narrow(0, 0, len)?.flatten_all()?.to_vec1()?)
                };
                assert_eq!(
                    &keys[h * capacity * d..][..len * d],
                    filled(want_k)?,
                    "step {step}"
                );
                assert_eq!(
                    &values[h * capacity * d..][..len * d],
                    filled(want_v)?,
                    "step {step}"
                );
            }
        }
        let ragged = host.append_rows(&[0.0; 5], &[0.0; 5], kv_heads, d, 1 << 20);
        assert!(ragged.is_err(), "rows that are not whole heads are refused");
        Ok(())
    }

    #[test]
    fn growth_stops_at_the_context_length() -> Result<()> {
        let dev = Device::Cpu;
        let mut cache = LayerCache::default();
        let k = Tensor::zeros((1, 70, 2), DType::F32, &dev)?;
        cache.append(&k, &k, 100)?; // 70 tokens would round up to 128 rows
        assert_eq!(cache.buffers()?.2, 100);
        let one = Tensor::zeros((1, 30, 2), DType::F32, &dev)?;
        let (keys, _) = cache.append(&one, &one, 100)?;
        assert_eq!(keys.dims(), &[1, 100, 2]);
        Ok(())
    }

    #[test]
    fn multi_token_append() -> Result<()> {
        let dev = Device::Cpu;
        let mut cache = LayerCache::default();
        let k = Tensor::arange(0f32, 24.0, &dev)?.reshape((2, 3, 4))?;
        let (keys, _) = cache.append(&k, &k, 1 << 20)?;
        assert_eq!(
            keys.contiguous()?.flatten_all()?.to_vec1::<f32>()?,
            k.flatten_all()?.to_vec1::<f32>()?
        );
        let (keys, _) = cache.append(&k, &k, 1 << 20)?;
        assert_eq!(keys.dims(), &[2, 6, 4]);
        Ok(())
    }
}
