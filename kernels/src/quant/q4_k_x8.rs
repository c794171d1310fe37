//! Q4_K matrices whose row count is a multiple of 8, stored as llama.cpp's
//! x86 build repacks them (`block_q4_Kx8`): the blocks of eight rows at
//! one column side by side, so that one 32-byte load holds four bytes of
//! each of the eight rows and every i32 lane of a product belongs to one
//! output. The eight outputs then take their float steps together in one
//! vector instead of one by one, and no lane ever needs a horizontal sum.
//!
//! The layout is ringlet's own (the arithmetic, not the bytes, is what
//! must match llama.cpp), and exactly as large as the eight blocks it
//! holds, so that a node's memory is what the plan counted: per eight rows
//! and one 256-value column block, 1152 bytes:
//!
//! | bytes | what |
//! |---|---|
//! | `0..16` | `d` of rows 0..8, f16 |
//! | `16..32` | `dmin` of rows 0..8, f16 |
//! | `32..96` | byte `32 + 8s + r`: scale of sub-block `s`, row `r` (6 bits), and the top two bits of its minimum |
//! | `96..128` | byte `96 + 16(p % 2) + 2r + t`: the low four bits of the minimum of sub-block `2p + t`, row `r`, in the low nibble for `p < 2`, else the high one |
//! | `128..1152` | quants: 64-value group `j`, 4-byte chunk `c`, row `r` at `128 + 32(8j + c) + 4r` |
//!
//! Where llama.cpp keeps the twelve packed bytes of each row, these place
//! every row's scale of a sub-block side by side, so that one shuffle
//! spreads them over the eight outputs, and the minimums of a pair of
//! sub-blocks in the order of the products they multiply.

use super::portable::k4_scales_mins;

/// Bytes of one original Q4_K block.
const BLOCK: usize = 144;
/// Bytes of eight rows' blocks at one column.
pub(super) const GROUP_BLOCK: usize = 8 * BLOCK;
pub(super) const D: usize = 0;
pub(super) const DMIN: usize = 16;
pub(super) const SCALES: usize = 32;
pub(super) const MINS_LOW: usize = 96;
pub(super) const QS: usize = 128;

/// Where the low four bits of the minimum of sub-block `s`, row `r` lie:
/// the byte, and whether in its high nibble.
fn min_low_at(s: usize, r: usize) -> (usize, bool) {
    let (p, t) = (s / 2, s % 2);
    (MINS_LOW + 16 * (p % 2) + 2 * r + t, p >= 2)
}

/// `data`: `rows` (a multiple of 8) rows of `blocks` Q4_K blocks, as in
/// the GGUF file. Returns the interleaved layout: group `g` (rows
/// `8g..8g + 8`) is `blocks` consecutive group blocks.
pub(super) fn repack(data: &[u8], rows: usize, blocks: usize) -> Vec<u8> {
    debug_assert!(rows.is_multiple_of(8) && data.len() == rows * blocks * BLOCK);
    let mut out = vec![0u8; rows / 8 * blocks * GROUP_BLOCK];
    for (g, group) in out.chunks_exact_mut(blocks * GROUP_BLOCK).enumerate() {
        for (b, dst) in group.chunks_exact_mut(GROUP_BLOCK).enumerate() {
            for r in 0..8 {
                let at = ((8 * g + r) * blocks + b) * BLOCK;
                pack_block(&data[at..at + BLOCK], r, dst);
            }
        }
    }
    out
}

/// Writes original block `src` as row `r` of group block `dst`.
fn pack_block(src: &[u8], r: usize, dst: &mut [u8]) {
    dst[D + 2 * r..D + 2 * r + 2].copy_from_slice(&src[0..2]);
    dst[DMIN + 2 * r..DMIN + 2 * r + 2].copy_from_slice(&src[2..4]);
    let (sc, m) = k4_scales_mins(&src[4..16]);
    for s in 0..8 {
        dst[SCALES + 8 * s + r] = (sc[s] | (m[s] >> 4) << 6) as u8;
        let (at, high) = min_low_at(s, r);
        dst[at] |= ((m[s] & 15) as u8) << if high { 4 } else { 0 };
    }
    for j in 0..4 {
        for c in 0..8 {
            let to = QS + 32 * (8 * j + c) + 4 * r;
            dst[to..to + 4].copy_from_slice(&src[16 + 32 * j + 4 * c..][..4]);
        }
    }
}

/// Row `r` of group block `src` as the original Q4_K block (the inverse of
/// the repacking, bit for bit: every bit of the packed scales is one of
/// the eight 6-bit scales or minimums).
pub(super) fn original_block(src: &[u8], r: usize) -> [u8; BLOCK] {
    let mut block = [0u8; BLOCK];
    block[0..2].copy_from_slice(&src[D + 2 * r..][..2]);
    block[2..4].copy_from_slice(&src[DMIN + 2 * r..][..2]);
    let sc: [u8; 8] = std::array::from_fn(|s| src[SCALES + 8 * s + r] & 63);
    let m: [u8; 8] = std::array::from_fn(|s| {
        let (at, high) = min_low_at(s, r);
        let low = if high { src[at] >> 4 } else { src[at] & 15 };
        low | (src[SCALES + 8 * s + r] >> 6) << 4
    });
    // `get_scale_min_k4` read backwards: bytes 0..4 and 4..8 hold the low
    // six bits of scales and minimums 0..4 and the high two bits of those
    // of 4..8; bytes 8..12 the low four bits of scales and minimums 4..8.
    let packed = &mut block[4..16];
    for j in 0..4 {
        packed[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
        packed[j + 4] = m[j] | ((m[j + 4] >> 4) << 6);
        packed[j + 8] = (sc[j + 4] & 15) | ((m[j + 4] & 15) << 4);
    }
    for j in 0..4 {
        for c in 0..8 {
            block[16 + 32 * j + 4 * c..][..4]
                .copy_from_slice(&src[QS + 32 * (8 * j + c) + 4 * r..][..4]);
        }
    }
    block
}

/// Row `r` (0..8) of a group (`blocks` group blocks) as original blocks.
pub(super) fn original_row(group: &[u8], r: usize) -> Vec<u8> {
    group
        .chunks_exact(GROUP_BLOCK)
        .flat_map(|src| original_block(src, r))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repacking_is_undone_bit_for_bit() {
        let (rows, blocks) = (16, 3);
        let mut state = crate::test_random::lcg(7);
        let data: Vec<u8> = (0..rows * blocks * BLOCK)
            .map(|_| (state() >> 33) as u8)
            .collect();
        let packed = repack(&data, rows, blocks);
        assert_eq!(packed.len(), rows / 8 * blocks * GROUP_BLOCK);
        for row in 0..rows {
            let group = &packed[row / 8 * blocks * GROUP_BLOCK..][..blocks * GROUP_BLOCK];
            assert_eq!(
                original_row(group, row % 8),
                &data[row * blocks * BLOCK..(row + 1) * blocks * BLOCK],
                "row {row}"
            );
        }
    }
}
