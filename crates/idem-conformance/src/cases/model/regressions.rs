//! Fixed sequences, run as named cases.
//!
//! `regression_*`: minimal sequences the model test shrank to when it caught
//! a broken store (tests/broken.rs runs them against those stores and checks
//! they still fail there); index values are reduced modulo the model's sizes.
//! `rule_*`: sequences written by hand to pin a subtle rule of the engine.
//!
//! Paste a new failure from the model test's message as is: its `Debug`
//! output is valid Rust here.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::sync::Arc;

use super::Op::*;
use super::{FpIdx, KeyIdx, LeaseIdx, ScopeIdx, check};
use crate::StoreFactory;

const K0: KeyIdx = KeyIdx(0);
const K1: KeyIdx = KeyIdx(1);
const S0: ScopeIdx = ScopeIdx(0);
const S1: ScopeIdx = ScopeIdx(1);
const F0: FpIdx = FpIdx(0);
const F1: FpIdx = FpIdx(1);
const L0: LeaseIdx = LeaseIdx(0);
const L1: LeaseIdx = LeaseIdx(1);

/// One claim is visible under its own (key, scope) only, through every
/// instance. Shrunk from stores that ignored the scope, compared keys
/// case-insensitively, or kept records per instance.
pub async fn regression_one_key_one_record<F: StoreFactory>(factory: Arc<F>) {
    check(
        factory,
        vec![Begin {
            key: K0,
            scope: S0,
            fp: F0,
        }],
    )
    .await;
}

/// A duplicate of a live claim is in progress. Shrunk from a store whose
/// insert overwrote live records.
pub async fn regression_duplicate_is_in_progress<F: StoreFactory>(factory: Arc<F>) {
    check(
        factory,
        vec![
            Begin {
                key: K1,
                scope: S0,
                fp: F0,
            },
            Begin {
                key: K1,
                scope: S0,
                fp: F0,
            },
        ],
    )
    .await;
}

/// At its TTL a claim is gone. Shrunk from stores that returned expired
/// records, or decided expiry with their own clock.
pub async fn regression_expired_record_is_invisible<F: StoreFactory>(factory: Arc<F>) {
    check(
        factory,
        vec![
            Begin {
                key: K0,
                scope: S0,
                fp: F0,
            },
            Advance { millis: 60_000 },
        ],
    )
    .await;
}

/// A key whose record expired is claimed afresh. Shrunk from a store whose
/// insert treated an expired record as live (the engine then reported
/// contention).
pub async fn regression_claim_over_expired_record<F: StoreFactory>(factory: Arc<F>) {
    check(
        factory,
        vec![
            Begin {
                key: K0,
                scope: S0,
                fp: F0,
            },
            Advance { millis: 60_000 },
            Begin {
                key: K0,
                scope: S0,
                fp: F0,
            },
        ],
    )
    .await;
}

/// Purge leaves a live claim alone. Shrunk from a store whose purge removed
/// live records.
pub async fn regression_purge_keeps_live_claim<F: StoreFactory>(factory: Arc<F>) {
    check(
        factory,
        vec![
            Begin {
                key: K0,
                scope: S0,
                fp: F0,
            },
            Purge,
        ],
    )
    .await;
}

/// A released holder cannot complete. Shrunk from a store whose CAS wrote an
/// absent key (upsert).
pub async fn regression_complete_after_release<F: StoreFactory>(factory: Arc<F>) {
    check(
        factory,
        vec![
            Begin {
                key: K0,
                scope: S0,
                fp: F0,
            },
            Release { lease: L0 },
            Complete {
                lease: L0,
                outcome: 0,
            },
        ],
    )
    .await;
}

/// A released holder cannot complete over the next request's claim. Shrunk
/// from a store whose CAS ignored the revision.
pub async fn regression_zombie_complete_after_new_claim<F: StoreFactory>(factory: Arc<F>) {
    check(
        factory,
        vec![
            Begin {
                key: K0,
                scope: S0,
                fp: F0,
            },
            Release { lease: L0 },
            Begin {
                key: K0,
                scope: S0,
                fp: F0,
            },
            Complete {
                lease: L0,
                outcome: 0,
            },
        ],
    )
    .await;
}

/// A released holder cannot release the next request's claim. Shrunk from a
/// store whose delete ignored the revision.
pub async fn regression_zombie_release_after_new_claim<F: StoreFactory>(factory: Arc<F>) {
    check(
        factory,
        vec![
            Begin {
                key: K0,
                scope: S0,
                fp: F0,
            },
            Release { lease: L0 },
            Begin {
                key: K0,
                scope: S0,
                fp: F0,
            },
            Release { lease: L0 },
        ],
    )
    .await;
}

/// A zombie whose key was taken over and then released by the new holder
/// gets `Ok` from its own release: the key is absent, as the zombie wanted,
/// and nothing changes. (The engine's documented rule is "LeaseLost if the
/// lease is no longer held"; it treats an absent key as already released.)
pub async fn rule_zombie_release_after_takeover_and_release<F: StoreFactory>(factory: Arc<F>) {
    check(
        factory,
        vec![
            Begin {
                key: K0,
                scope: S0,
                fp: F0,
            },
            Advance { millis: 10_000 },
            Begin {
                key: K0,
                scope: S0,
                fp: F0,
            },
            Release { lease: L1 },
            Release { lease: L0 },
            Begin {
                key: K0,
                scope: S0,
                fp: F1,
            },
            Release { lease: L0 },
        ],
    )
    .await;
}

/// A holder whose lease lapsed but was not taken over still holds it and may
/// extend it; a duplicate is then in progress until the new deadline.
pub async fn rule_extend_of_lapsed_lease_before_takeover<F: StoreFactory>(factory: Arc<F>) {
    check(
        factory,
        vec![
            Begin {
                key: K1,
                scope: S0,
                fp: F1,
            },
            Advance { millis: 15_000 },
            Extend { lease: L0 },
            Begin {
                key: K1,
                scope: S0,
                fp: F1,
            },
            Advance { millis: 9_999 },
            Begin {
                key: K1,
                scope: S0,
                fp: F1,
            },
            Advance { millis: 1 },
            Begin {
                key: K1,
                scope: S0,
                fp: F1,
            },
            Extend { lease: L0 },
        ],
    )
    .await;
}

/// A retry of a retryable failure is attempt 2, keeps the record's expiry
/// unless its new lease needs longer, and fences the failed attempt.
pub async fn rule_reclaim_after_retryable_failure<F: StoreFactory>(factory: Arc<F>) {
    check(
        factory,
        vec![
            Begin {
                key: K0,
                scope: S1,
                fp: F0,
            },
            Advance { millis: 50_000 },
            Fail {
                lease: L0,
                retryable: true,
                outcome: 1,
            },
            Advance { millis: 55_000 },
            Begin {
                key: K0,
                scope: S1,
                fp: F0,
            },
            Advance { millis: 4_999 },
            Begin {
                key: K0,
                scope: S1,
                fp: F0,
            },
            Fail {
                lease: L0,
                retryable: true,
                outcome: 1,
            },
            Complete {
                lease: L1,
                outcome: 5,
            },
            Begin {
                key: K0,
                scope: S1,
                fp: F0,
            },
        ],
    )
    .await;
}
