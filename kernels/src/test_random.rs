//! The tests' pseudo-random numbers: one linear congruential generator
//! (Knuth's MMIX constants), seeded per test so that every run checks the
//! same inputs.

/// A generator from `seed`: each call returns the next 64-bit state, of
/// which callers take the high bits (the low ones cycle quickly).
pub(crate) fn lcg(seed: u64) -> impl FnMut() -> u64 {
    let mut state = seed;
    move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        state
    }
}
