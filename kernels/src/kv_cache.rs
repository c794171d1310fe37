//! Per-sequence key/value caches.
//!
//! On the CPU each layer keeps its keys and values in pages of
//! [`PAGE_TOKENS`] tokens, allocated as the sequence grows: a decode step
//! writes one row in place, and growing never copies what is cached. (A
//! buffer that doubled when full copied every cached row at once, and
//! eight sequences in step all doubled on the same step: a 16 ms step took
//! 27 to 31 ms at 128 tokens and 100 to 130 ms at 1,024; and it held up to
//! twice the rows the KV reservation counts.) Candle's devices keep tensors
//! `[KV, capacity, d]` that double when full.

use candle_core::Tensor;

use crate::error::Result;

/// Tokens per page of a layer's CPU cache. Attention's weighted sums take
/// the keys in rounds of 64 (ggml's lanes, `cpu_ops::attention`), so with
/// pages of 64 a round never straddles two pages; and a sequence holds at
/// most 63 tokens' rows more than it has cached, per layer.
pub const PAGE_TOKENS: usize = 64;

/// The rows of KV cache a CPU stage allocates per layer for a sequence of
/// `tokens` tokens: whole pages. What a reservation of `tokens` must
/// count to cover the memory it stands for.
pub fn kv_rows_for(tokens: usize) -> usize {
    tokens.div_ceil(PAGE_TOKENS) * PAGE_TOKENS
}

/// The most tokens whose whole pages fit in `rows` rows of KV cache: the
/// largest count that [`kv_rows_for`] keeps within `rows`.
pub fn kv_tokens_within(rows: usize) -> usize {
    rows / PAGE_TOKENS * PAGE_TOKENS
}

/// Rows allocated for a sequence's first step in the tensor buffers;
/// doubles from there.
const INITIAL_CAPACITY_TOKENS: usize = PAGE_TOKENS;

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
/// Candle computes attention ([`append`](LayerCache::append)), pages of
/// plain values where ringlet's CPU code does
/// ([`append_rows`](LayerCache::append_rows)), which writes rows in place
/// without the tensor ops' allocations (they cost more than the attention
/// of a short context). A sequence's caches take one of the two, as its
/// shard's device does.
#[derive(Debug, Default)]
pub(crate) struct LayerCache {
    keys: Option<Tensor>,   // [KV, capacity, d]
    values: Option<Tensor>, // [KV, capacity, d]
    host: HostPages,
    len: usize,
}

/// A layer's cached keys and values after [`LayerCache::append_rows`]:
/// the first `len` rows of each KV head filled.
pub(crate) struct CachedRows<'a> {
    pub(crate) keys: Pages<'a>,
    pub(crate) values: Pages<'a>,
    pub(crate) len: usize,
}

/// [`LayerCache`]'s CPU pages, `[KV, PAGE_TOKENS, d]` each: page `p`
/// holds tokens `p * PAGE_TOKENS..`.
#[derive(Debug, Default)]
struct HostPages {
    keys: Vec<Page>,
    values: Vec<Page>,
    /// `(KV, d)` of the rows in the pages, from the first append.
    shape: Option<(usize, usize)>,
}

/// One page of keys or values, starting on a cache line: with `d` a
/// multiple of 16 (as every model's head size is) every row does too, so a
/// row's 64-byte loads each touch one line, not two. (A plain `Box<[f32]>`
/// starts wherever the allocator puts it, 16 bytes in, say; attention then
/// took about 6% longer.)
#[derive(Debug)]
pub(crate) struct Page(Box<[Line]>);

/// Sixteen values, one cache line.
#[derive(Debug, Clone, Copy, bytemuck::Zeroable, bytemuck::Pod)]
#[repr(C, align(64))]
struct Line([f32; 16]);

impl Page {
    /// `values` zeros, in whole lines: a page's `KV · PAGE_TOKENS · d`
    /// values always are (`PAGE_TOKENS` is a multiple of 16).
    fn zeroed(values: usize) -> Self {
        const { assert!(PAGE_TOKENS.is_multiple_of(16)) };
        Self(vec![bytemuck::Zeroable::zeroed(); values.div_ceil(16)].into_boxed_slice())
    }

    /// A page holding `values` (their count a multiple of 16), for tests.
    #[cfg(test)]
    pub(crate) fn from_values(values: &[f32]) -> Self {
        let mut page = Self::zeroed(values.len());
        page.values_mut().copy_from_slice(values);
        page
    }

    pub(crate) fn values(&self) -> &[f32] {
        bytemuck::cast_slice(&self.0)
    }

    fn values_mut(&mut self) -> &mut [f32] {
        bytemuck::cast_slice_mut(&mut self.0)
    }
}

/// Keys (or values) of one layer, in pages `[KV, PAGE_TOKENS, d]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pages<'a> {
    pages: &'a [Page],
    d: usize,
}

impl<'a> Pages<'a> {
    /// `pages`, each `[kv_heads, PAGE_TOKENS, d]` values.
    pub(crate) fn new(pages: &'a [Page], d: usize) -> Self {
        Self { pages, d }
    }

    /// The rows of KV head `kv`.
    pub(crate) fn head(&self, kv: usize) -> HeadRows<'a> {
        HeadRows {
            pages: self.pages,
            offset: kv * PAGE_TOKENS * self.d,
            d: self.d,
        }
    }
}

/// One KV head's cached rows of `d` values, token `j` in page
/// `j / PAGE_TOKENS`. Every page is whole: rows past the cached length
/// are there (zeros), so a round of 64 keys can be read from one page.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HeadRows<'a> {
    pages: &'a [Page],
    offset: usize,
    d: usize,
}

impl<'a> HeadRows<'a> {
    /// Values per row.
    pub(crate) fn d(&self) -> usize {
        self.d
    }

    /// Rows allocated: a whole number of pages.
    pub(crate) fn rows(&self) -> usize {
        self.pages.len() * PAGE_TOKENS
    }

    /// The `PAGE_TOKENS` rows of page `page`, `[PAGE_TOKENS, d]`.
    pub(crate) fn page(&self, page: usize) -> &'a [f32] {
        &self.pages[page].values()[self.offset..][..PAGE_TOKENS * self.d]
    }

    /// Row `j`.
    pub(crate) fn row(&self, j: usize) -> &'a [f32] {
        &self.page(j / PAGE_TOKENS)[j % PAGE_TOKENS * self.d..][..self.d]
    }

    /// The rows `keys`, as runs within one page: `(first row, its rows)`.
    pub(crate) fn runs(
        &self,
        keys: std::ops::Range<usize>,
    ) -> impl Iterator<Item = (usize, &'a [f32])> + 'a {
        let (head, d) = (*self, self.d);
        let mut start = keys.start;
        std::iter::from_fn(move || {
            if start >= keys.end {
                return None;
            }
            let page = head.page(start / PAGE_TOKENS);
            let end = keys.end.min((start / PAGE_TOKENS + 1) * PAGE_TOKENS);
            let run = &page[start % PAGE_TOKENS * d..][..(end - start) * d];
            let first = start;
            start = end;
            Some((first, run))
        })
    }
}

impl LayerCache {
    /// Appends the rows of `k` and `v`, laid out `[n, KV, d]` as the
    /// projections give them, to the CPU pages; returns all cached keys
    /// and values. Pages are added as the rows need them (the shard
    /// refuses steps past the model's context before they get here).
    pub(crate) fn append_rows(
        &mut self,
        k: &[f32],
        v: &[f32],
        kv_heads: usize,
        d: usize,
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
        if let Some((heads, values)) = host.shape
            && (heads, values) != (kv_heads, d)
        {
            return Err(candle_core::Error::Msg(format!(
                "KV cache pages hold {heads} heads of {values} values, not {kv_heads} of {d}"
            ))
            .into());
        }
        host.shape = Some((kv_heads, d));
        let page_values = kv_heads * PAGE_TOKENS * d;
        while host.keys.len() * PAGE_TOKENS < needed {
            host.keys.push(Page::zeroed(page_values));
            host.values.push(Page::zeroed(page_values));
        }
        for (i, (k_row, v_row)) in k.chunks_exact(row).zip(v.chunks_exact(row)).enumerate() {
            let token = self.len + i;
            let (page, slot) = (token / PAGE_TOKENS, token % PAGE_TOKENS);
            for h in 0..kv_heads {
                let at = (h * PAGE_TOKENS + slot) * d;
                host.keys[page].values_mut()[at..at + d]
                    .copy_from_slice(&k_row[h * d..(h + 1) * d]);
                host.values[page].values_mut()[at..at + d]
                    .copy_from_slice(&v_row[h * d..(h + 1) * d]);
            }
        }
        self.len = needed;
        Ok(CachedRows {
            keys: Pages::new(&host.keys, d),
            values: Pages::new(&host.values, d),
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

    /// The whole tensor buffers, `[KV, capacity, d]`, and the capacity;
    /// rows past the cached length are zero.
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

    /// The CPU pages hold what the tensor buffers hold, row for row,
    /// across pages (from `[n, KV, d]` rows instead of `[KV, n, d]`).
    #[test]
    fn host_rows_match_tensor_rows_across_pages() -> Result<()> {
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
            let cached = host.append_rows(&rows, &negated, kv_heads, d)?;
            len += n;
            assert_eq!(cached.len, len, "step {step}");
            let (want_k, want_v, _) = tensors.buffers()?;
            for h in 0..kv_heads {
                let filled = |t: &Tensor| -> Result<Vec<f32>> {
                    Ok(t.get(h)?.narrow(0, 0, len)?.flatten_all()?.to_vec1()?)
                };
                let (keys, values) = (cached.keys.head(h), cached.values.head(h));
                assert_eq!(keys.rows(), kv_rows_for(len));
                let rows = |head: HeadRows<'_>| -> Vec<f32> {
                    (0..len).flat_map(|j| head.row(j).to_vec()).collect()
                };
                assert_eq!(rows(keys), filled(want_k)?, "step {step}");
                assert_eq!(rows(values), filled(want_v)?, "step {step}");
                // The runs of a range cover it in order, one page each.
                let runs: Vec<f32> = keys.runs(3..len).flat_map(|(_, r)| r.to_vec()).collect();
                assert_eq!(runs, rows(keys)[3 * d..], "step {step}");
            }
        }
        let ragged = host.append_rows(&[0.0; 5], &[0.0; 5], kv_heads, d);
        assert!(ragged.is_err(), "rows that are not whole heads are refused");
        let other_shape = host.append_rows(&[0.0; 8], &[0.0; 8], 2, d);
        assert!(
            other_shape.is_err(),
            "rows of another head count are refused"
        );
        let same_size = host.append_rows(&[0.0; 12], &[0.0; 12], 6, 2);
        assert!(same_size.is_err(), "rows of another shape are refused");
        Ok(())
    }

    /// Growing adds pages and leaves the cached rows where they are: no
    /// step copies the history. Every head's rows start on a cache line.
    #[test]
    fn growing_adds_pages_without_moving_rows() -> Result<()> {
        let (kv_heads, d) = (2, 8);
        let mut cache = LayerCache::default();
        let mut pages: Vec<*const f32> = Vec::new();
        for len in 1..=3 * PAGE_TOKENS + 1 {
            // Token `t`'s row holds `t` in head 0 and `-t` in head 1.
            let t = (len - 1) as f32;
            let row: Vec<f32> = [t, -t].iter().flat_map(|&x| [x; 8]).collect();
            let cached = cache.append_rows(&row, &row, kv_heads, d)?;
            assert_eq!(cached.len, len);
            let keys = cached.keys.head(1);
            assert_eq!(keys.rows(), kv_rows_for(len));
            for page in pages.len()..keys.rows() / PAGE_TOKENS {
                pages.push(keys.page(page).as_ptr());
            }
            // Each head's rows start on a cache line (see `Page`).
            for page in 0..pages.len() {
                for head in [cached.keys.head(0), keys, cached.values.head(1)] {
                    let at = head.page(page).as_ptr() as usize;
                    assert_eq!(at % 64, 0, "page {page} starts {at:#x}");
                }
            }
            for (page, &at) in pages.iter().enumerate() {
                assert_eq!(keys.page(page).as_ptr(), at, "page {page} moved at {len}");
            }
            for j in 0..len {
                assert_eq!(keys.row(j), [-(j as f32); 8], "row {j} at {len}");
            }
        }
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
