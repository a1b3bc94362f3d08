//! Fixed sequences, run as named cases.
//!
//! `regression_*`: minimal sequences the model test shrank to when it caught
//! a broken store (tests/broken.rs runs them against those stores and checks
//! they still fail there); index values are reduced modulo the model's sizes.
//! `rule_*`: sequences written by hand to pin a subtle rule of the engine.
//!
//! Paste a new failure from the model test's message as is, as an entry of
//! `sequences!` below: its `Debug` output is valid Rust there.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::sync::Arc;

use super::Op::*;
use super::{FpIdx, KeyIdx, LeaseIdx, Op, ScopeIdx, check};
use crate::StoreFactory;

/// Defines each named sequence as a case that runs it with [`check`].
macro_rules! sequences {
    ($($(#[$doc:meta])* $name:ident: [$($op:expr),* $(,)?];)*) => {$(
        $(#[$doc])*
        pub async fn $name<F: StoreFactory>(factory: Arc<F>) {
            check(factory, vec![$($op),*]).await;
        }
    )*};
}

const K0: KeyIdx = KeyIdx(0);
const K1: KeyIdx = KeyIdx(1);
const S0: ScopeIdx = ScopeIdx(0);
const S1: ScopeIdx = ScopeIdx(1);
const F0: FpIdx = FpIdx(0);
const F1: FpIdx = FpIdx(1);
const L0: LeaseIdx = LeaseIdx(0);
const L1: LeaseIdx = LeaseIdx(1);
const L2: LeaseIdx = LeaseIdx(2);

/// `Begin { key, scope, fp }`, shorter.
const fn begin(key: KeyIdx, scope: ScopeIdx, fp: FpIdx) -> Op {
    Begin { key, scope, fp }
}

sequences! {
    /// One claim is visible under its own (key, scope) only, through every
    /// instance. Shrunk from stores that ignored the scope, compared keys
    /// case-insensitively, or kept records per instance.
    regression_one_key_one_record: [begin(K0, S0, F0)];

    /// A duplicate of a live claim is in progress. Shrunk from a store whose
    /// insert overwrote live records.
    regression_duplicate_is_in_progress: [begin(K1, S0, F0), begin(K1, S0, F0)];

    /// At its TTL a claim is gone. Shrunk from stores that returned expired
    /// records, or decided expiry with their own clock.
    regression_expired_record_is_invisible: [begin(K0, S0, F0), Advance { millis: 60_000 }];

    /// A key whose record expired is claimed afresh. Shrunk from a store whose
    /// insert treated an expired record as live (the engine then reported
    /// contention).
    regression_claim_over_expired_record: [
        begin(K0, S0, F0), Advance { millis: 60_000 }, begin(K0, S0, F0),
    ];

    /// Purge leaves a live claim alone. Shrunk from a store whose purge removed
    /// live records.
    regression_purge_keeps_live_claim: [begin(K0, S0, F0), Purge];

    /// A released holder cannot complete. Shrunk from a store whose CAS wrote an
    /// absent key (upsert).
    regression_complete_after_release: [
        begin(K0, S0, F0), Release { lease: L0 }, Complete { lease: L0, outcome: 0 },
    ];

    /// A released holder cannot complete over the next request's claim. Shrunk
    /// from a store whose CAS ignored the revision.
    regression_zombie_complete_after_new_claim: [
        begin(K0, S0, F0), Release { lease: L0 },
        begin(K0, S0, F0), Complete { lease: L0, outcome: 0 },
    ];

    /// A released holder cannot release the next request's claim. Shrunk from a
    /// store whose delete ignored the revision.
    regression_zombie_release_after_new_claim: [
        begin(K0, S0, F0), Release { lease: L0 },
        begin(K0, S0, F0), Release { lease: L0 },
    ];

    /// A zombie whose key was taken over and then released by the new holder
    /// gets `Ok` from its own release: the key is absent, as the zombie wanted,
    /// and nothing changes. (The engine's documented rule is "LeaseLost if the
    /// lease is no longer held"; it treats an absent key as already released.)
    rule_zombie_release_after_takeover_and_release: [
        begin(K0, S0, F0), Advance { millis: 10_000 },
        begin(K0, S0, F0), Release { lease: L1 },
        Release { lease: L0 },
        begin(K0, S0, F1), Release { lease: L0 },
    ];

    /// A holder whose lease lapsed but was not taken over still holds it and may
    /// extend it; a duplicate is then in progress until the new deadline.
    rule_extend_of_lapsed_lease_before_takeover: [
        begin(K1, S0, F1), Advance { millis: 15_000 },
        Extend { lease: L0 },
        begin(K1, S0, F1), Advance { millis: 9_999 },
        begin(K1, S0, F1), Advance { millis: 1 },
        begin(K1, S0, F1), Extend { lease: L0 },
    ];

    /// A retry of a retryable failure is attempt 2, keeps the record's expiry
    /// unless its new lease needs longer, and fences the failed attempt.
    rule_reclaim_after_retryable_failure: [
        begin(K0, S1, F0), Advance { millis: 50_000 },
        Fail { lease: L0, retryable: true, outcome: 1 }, Advance { millis: 55_000 },
        begin(K0, S1, F0), Advance { millis: 4_999 },
        begin(K0, S1, F0), Fail { lease: L0, retryable: true, outcome: 1 },
        Complete { lease: L1, outcome: 5 },
        begin(K0, S1, F0),
    ];

    /// A checkpoint survives a takeover: the new holder carries it (the
    /// zombie's own checkpoint is fenced), goes on from its sequence
    /// number, and a completion drops it; the search for abandoned keys
    /// sees the key only while its lease is lapsed with the checkpoint.
    rule_checkpoint_survives_a_takeover: [
        begin(K0, S0, F0), Checkpoint { lease: L0, state: 1 },
        Advance { millis: 9_000 }, Checkpoint { lease: L0, state: 2 },
        Advance { millis: 9_999 }, Abandoned, Advance { millis: 1 }, Abandoned,
        begin(K0, S0, F0), Abandoned,
        Checkpoint { lease: L0, state: 3 }, Checkpoint { lease: L1, state: 4 },
        Complete { lease: L1, outcome: 6 }, Abandoned,
        Checkpoint { lease: L1, state: 5 },
        begin(K0, S0, F0),
    ];

    /// With a checkpoint, an unknown outcome and a release are stored as
    /// retryable failures keeping it, and the next request resumes (attempts
    /// 2 and 3); the first holder's release repeats the ending it already
    /// stored (`Ok`, nothing written); without a checkpoint a release
    /// deletes the key.
    rule_ambiguous_ending_with_a_checkpoint_is_resumed: [
        begin(K1, S1, F1), Checkpoint { lease: L0, state: 7 },
        FailUnknown { lease: L0 }, begin(K1, S1, F1),
        Release { lease: L1 }, Release { lease: L0 },
        begin(K1, S1, F1), Checkpoint { lease: L2, state: 8 },
        Complete { lease: L2, outcome: 9 }, begin(K1, S1, F1),
        begin(K0, S0, F0), Release { lease: LeaseIdx(3) }, begin(K0, S0, F0),
    ];

    /// A holder whose lease lapsed but was not taken over may still
    /// checkpoint (a heartbeat too); a checkpoint's record expires with it.
    rule_checkpoint_of_a_lapsed_lease_before_takeover: [
        begin(K0, S1, F0), Advance { millis: 15_000 }, Abandoned,
        Checkpoint { lease: L0, state: 0 }, Abandoned, begin(K0, S1, F0),
        Advance { millis: 10_000 }, Abandoned, Advance { millis: 60_000 }, Abandoned,
        Checkpoint { lease: L0, state: 1 }, begin(K0, S1, F0),
    ];
}
