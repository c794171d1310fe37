//! The definitions of the quantized dot products: which lanes, which
//! order, which roundings. Lane `j` of a block holds the exact integer sum
//! of products `4j..4j+4`; the fast versions (`x86`) are tested to give
//! these functions' bits exactly.

use half::f16;

/// The little-endian f16 at byte `at`, as f32.
pub(super) fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Weight `i` (0..32) of a 4-bit block's 16 bytes of nibbles.
pub(super) fn nibble(qs: &[u8], i: usize) -> u8 {
    if i < 16 {
        qs[i] & 0x0F
    } else {
        qs[i - 16] >> 4
    }
}

/// Eight-lane horizontal sum in ggml's order (`hsum_float_8`).
#[inline]
fn hsum8(a: [f32; 8]) -> f32 {
    ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
}

pub(super) fn dot_q4_0_q8_0(w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [0f32; 8];
    for (wb, ab) in w.chunks_exact(18).zip(a.chunks_exact(34)) {
        let d = f16_at(wb, 0) * f16_at(ab, 0);
        for (lane, acc) in acc.iter_mut().enumerate() {
            let sum: i32 = (4 * lane..4 * lane + 4)
                .map(|i| (nibble(&wb[2..], i) as i32 - 8) * (ab[2 + i] as i8 as i32))
                .sum();
            *acc = d.mul_add(sum as f32, *acc);
        }
    }
    hsum8(acc)
}

pub(super) fn dot_q4_1_q8_1(w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [0f32; 8];
    let mut summs = 0f32;
    for (wb, ab) in w.chunks_exact(20).zip(a.chunks_exact(36)) {
        let d = f16_at(wb, 0) * f16_at(ab, 0);
        summs += f16_at(wb, 2) * f16_at(ab, 2);
        for (lane, acc) in acc.iter_mut().enumerate() {
            let sum: i32 = (4 * lane..4 * lane + 4)
                .map(|i| nibble(&wb[4..], i) as i32 * (ab[4 + i] as i8 as i32))
                .sum();
            *acc = d.mul_add(sum as f32, *acc);
        }
    }
    hsum8(acc) + summs
}

pub(super) fn dot_q8_0_q8_0(w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [0f32; 8];
    for (wb, ab) in w.chunks_exact(34).zip(a.chunks_exact(34)) {
        let d = f16_at(wb, 0) * f16_at(ab, 0);
        for (lane, acc) in acc.iter_mut().enumerate() {
            let sum: i32 = (4 * lane..4 * lane + 4)
                .map(|i| (wb[2 + i] as i8 as i32) * (ab[2 + i] as i8 as i32))
                .sum();
            *acc = d.mul_add(sum as f32, *acc);
        }
    }
    hsum8(acc)
}
