//! [`IdGenerator`]: the one source of fresh revisions, fencing tokens and
//! write ids, shared by the engine and by backends that tag their writes.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::store::{FencingToken, Revision};

/// Fresh unique numbers: a random per-generator seed and a counter.
///
/// # Behavior
/// - Every call draws the next value of one counter, so the values of one
///   generator never repeat (until the 64-bit counter wraps, 2^64 calls
///   later), whichever of the methods drew them.
/// - [`next_u64`](Self::next_u64) and [`revision`](Self::revision) mix the
///   counter with the seed (splitmix64, a bijection): consecutive values look
///   random, and two generators with different seeds give unrelated
///   sequences, so values drawn by different processes collide only by
///   chance (about one pair in 2^64).
/// - [`token`](Self::token) puts the seed in the upper 64 bits and the
///   counter in the lower ones: tokens of one generator are distinct by
///   construction, and tokens of two generators differ whenever their seeds
///   do.
/// - The seed of [`new`](Self::new) comes from the operating system's
///   randomness (through [`RandomState`]); [`with_seed`](Self::with_seed)
///   fixes it, for tests and replays. No clock is read.
/// - Lock-free and shareable: `&self` methods, one relaxed atomic increment
///   per value.
///
/// The engine draws one revision per write and one token per claim from its
/// own generator. A backend that tags each write with an id of its own (so
/// that a write re-sent after a lost reply is recognised as done, as
/// `idem-redis` does) draws them with [`next_u64`](Self::next_u64).
///
/// ```
/// use idem_core::store::IdGenerator;
///
/// let ids = IdGenerator::new();
/// let (a, b) = (ids.next_u64(), ids.next_u64());
/// assert_ne!(a, b);
/// assert_ne!(ids.token(), ids.token());
/// assert_ne!(ids.revision(), ids.revision());
///
/// // A fixed seed gives the same sequence again.
/// let (x, y) = (IdGenerator::with_seed(7), IdGenerator::with_seed(7));
/// assert_eq!(x.next_u64(), y.next_u64());
/// ```
#[derive(Debug)]
pub struct IdGenerator {
    seed: u64,
    counter: AtomicU64,
}

impl IdGenerator {
    /// A generator with a fresh random seed.
    pub fn new() -> Self {
        // `RandomState` keys come from the operating system's randomness.
        Self::with_seed(RandomState::new().hash_one(0x1de7_u64))
    }

    /// A generator with the given seed: the same seed gives the same
    /// sequence.
    pub const fn with_seed(seed: u64) -> Self {
        Self {
            seed,
            counter: AtomicU64::new(0),
        }
    }

    /// The seed.
    pub const fn seed(&self) -> u64 {
        self.seed
    }

    fn count(&self) -> u64 {
        self.counter.fetch_add(1, Ordering::Relaxed)
    }

    /// The next id: distinct from every earlier value of this generator, and
    /// (with overwhelming probability) from every other generator's.
    pub fn next_u64(&self) -> u64 {
        // splitmix64: a bijection of the counter, keyed by the seed.
        let mut z = self
            .seed
            .wrapping_add(self.count().wrapping_mul(0x9e37_79b9_7f4a_7c15));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A fresh revision ([`next_u64`](Self::next_u64) as a [`Revision`]).
    pub fn revision(&self) -> Revision {
        Revision::from_u64(self.next_u64())
    }

    /// A fresh fencing token: the seed in the upper 64 bits, the counter in
    /// the lower ones.
    pub fn token(&self) -> FencingToken {
        FencingToken::from_u128((u128::from(self.seed) << 64) | u128::from(self.count()))
    }
}

impl Default for IdGenerator {
    /// [`IdGenerator::new`].
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn values_do_not_repeat_across_methods() {
        let ids = IdGenerator::new();
        let mut seen = HashSet::new();
        for _ in 0..5_000 {
            assert!(seen.insert(u128::from(ids.next_u64())));
            assert!(seen.insert(u128::from(ids.revision().as_u64())));
        }
        let tokens: HashSet<FencingToken> = (0..5_000).map(|_| ids.token()).collect();
        assert_eq!(tokens.len(), 5_000);
    }

    #[test]
    fn a_seed_fixes_the_sequence_and_tokens_carry_it() {
        let (a, b) = (IdGenerator::with_seed(42), IdGenerator::with_seed(42));
        let xs: Vec<u64> = (0..100).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..100).map(|_| b.next_u64()).collect();
        assert_eq!(xs, ys);
        assert_ne!(IdGenerator::with_seed(43).next_u64(), xs[0]);
        let token = IdGenerator::with_seed(42).token();
        assert_eq!(token.as_u128() >> 64, 42);
        assert_eq!(token.as_u128() & u128::from(u64::MAX), 0);
    }
}
