//! The state of [`ClaimMode::Adaptive`](crate::ClaimMode::Adaptive): which
//! way a store's next claim starts, from how often its recent claims found a
//! live record.
//!
//! One `AtomicU32` per store, updated lock-free after each claim: the low
//! bits hold an exponentially weighted share of claims that found a live
//! record (a replay, "in progress", a mismatch), the top bit whether claims
//! read first. Each claim moves the share [`WEIGHT`]-th of the way towards 1
//! (found) or 0 (inserted); claims switch to reading first when the share
//! reaches [`READ_FIRST_AT`] and back to inserting first when it falls to
//! [`INSERT_FIRST_AT`]. The gap between the two keeps a store from switching
//! back and forth on a mix near one half, where both ways cost the same.
//!
//! From either extreme, 16 claims of the other kind in a row switch the way
//! (`SWITCH_AFTER`, checked by the unit tests).

use std::sync::atomic::{AtomicU32, Ordering};

/// A share of 1, in the fixed point of the state.
const ONE: u32 = 1 << 16;

/// The bits of the share.
const SHARE: u32 = (ONE << 1) - 1;

/// The bit set while claims read first.
const READ_FIRST: u32 = 1 << 31;

/// Each claim moves the share 1/`WEIGHT` of the way towards its result.
const WEIGHT: u32 = 16;

/// The share at or above which claims read first (5/8).
const READ_FIRST_AT: u32 = ONE / 8 * 5;

/// The share at or below which claims insert first again (3/8).
const INSERT_FIRST_AT: u32 = ONE / 8 * 3;

/// How many claims of the other kind in a row switch the way, from a share
/// of 0 or 1 (as the `ClaimMode::Adaptive` docs say).
#[cfg(test)]
const SWITCH_AFTER: usize = 16;

/// Which way a store's claims start, learnt from the claims themselves.
#[derive(Debug, Default)]
pub(crate) struct Adaptive {
    state: AtomicU32,
}

impl Adaptive {
    /// Whether the next claim reads first. A new store inserts first: most
    /// traffic carries new keys.
    pub(crate) fn reads_first(&self) -> bool {
        self.state.load(Ordering::Relaxed) & READ_FIRST != 0
    }

    /// Records one claim's result: `found` a live record, or inserted.
    ///
    /// Lock-free; concurrent claims may interleave their updates in any
    /// order (each is applied once). Once the share sits at 0 or 1 and the
    /// traffic keeps its kind, nothing is written: a load only.
    pub(crate) fn record(&self, found: bool) {
        let _ = self
            .state
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |state| {
                let next = step(state, found);
                (next != state).then_some(next)
            });
    }
}

/// The state after one claim.
fn step(state: u32, found: bool) -> u32 {
    let share = state & SHARE;
    // Rounded away from the old share, so that it reaches 0 and 1 exactly.
    let share = if found {
        share + (ONE - share).div_ceil(WEIGHT)
    } else {
        share - share.div_ceil(WEIGHT)
    };
    let read_first = match state & READ_FIRST != 0 {
        false => share >= READ_FIRST_AT,
        true => share > INSERT_FIRST_AT,
    };
    share | if read_first { READ_FIRST } else { 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives `adaptive` with `n` claims of one kind; how many it took to
    /// change the way (`None`: it did not).
    fn switches_after(adaptive: &Adaptive, found: bool, n: usize) -> Option<usize> {
        let before = adaptive.reads_first();
        (1..=n).find(|_| {
            adaptive.record(found);
            adaptive.reads_first() != before
        })
    }

    #[test]
    fn a_new_store_inserts_first_and_new_keys_keep_it_so() {
        let adaptive = Adaptive::default();
        assert!(!adaptive.reads_first());
        assert_eq!(switches_after(&adaptive, false, 1000), None);
        assert_eq!(adaptive.state.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn switches_both_ways_after_a_run_of_the_other_kind() {
        let adaptive = Adaptive::default();
        assert_eq!(switches_after(&adaptive, true, 1000), Some(SWITCH_AFTER));
        assert!(adaptive.reads_first());
        // Saturates at exactly 1: the way back is as long.
        assert_eq!(switches_after(&adaptive, true, 1000), None);
        assert_eq!(adaptive.state.load(Ordering::Relaxed), ONE | READ_FIRST);
        assert_eq!(switches_after(&adaptive, false, 1000), Some(SWITCH_AFTER));
        assert!(!adaptive.reads_first());
        assert_eq!(switches_after(&adaptive, false, 1000), None);
        assert_eq!(adaptive.state.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn an_even_mix_does_not_flap() {
        // Alternating results keep the share near 1/2, between the two
        // thresholds: whichever way the store went, it stays.
        for start in [false, true] {
            let adaptive = Adaptive::default();
            if start {
                switches_after(&adaptive, true, 1000);
            }
            for i in 0..10_000 {
                adaptive.record(i % 2 == 0);
                assert_eq!(adaptive.reads_first(), start, "claim {i}");
            }
        }
    }

    #[test]
    fn a_mostly_duplicate_mix_reads_first() {
        let adaptive = Adaptive::default();
        // 3 duplicates in 4.
        for i in 0..400 {
            adaptive.record(i % 4 != 0);
        }
        assert!(adaptive.reads_first());
        // 1 in 4.
        for i in 0..400 {
            adaptive.record(i % 4 == 0);
        }
        assert!(!adaptive.reads_first());
    }

    #[test]
    fn concurrent_updates_are_each_applied() {
        // Claims of one kind commute: whatever the interleaving, 4 threads
        // of 4 duplicates each end where 16 in a row do (none lost).
        let adaptive = std::sync::Arc::new(Adaptive::default());
        let start = std::sync::Arc::new(std::sync::Barrier::new(4));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (adaptive, start) = (adaptive.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    for _ in 0..4 {
                        adaptive.record(true);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("thread");
        }
        let sequential = Adaptive::default();
        for _ in 0..16 {
            sequential.record(true);
        }
        assert_eq!(
            adaptive.state.load(Ordering::Relaxed),
            sequential.state.load(Ordering::Relaxed)
        );
        assert!(adaptive.reads_first());
    }
}
