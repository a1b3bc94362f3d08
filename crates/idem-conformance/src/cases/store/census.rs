//! `census`: counts by state and expiry, only the store's own records, the
//! sample limit, nothing written.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::sync::Arc;

use idem_core::store::{
    CensusSupport, Coverage, FencingToken, State, Store, StoreError, Versioned,
};
use idem_core::{FailureKind, Outcome};

use super::super::{T0, at, claim, completed, key, must, ok, open, secs};
use crate::StoreFactory;

/// A failed record of `kind`, written at `T0`, living `ttl_secs`.
fn failed(rev: u64, kind: FailureKind, ttl_secs: u64) -> Versioned {
    let mut v = claim(rev, rev.into(), T0, ttl_secs);
    v.record.state = State::Failed {
        token: FencingToken::from_u128(rev.into()),
        kind,
        outcome: Outcome::new(b"failure".to_vec()),
    };
    v
}

/// Live records by state and by time left, records expired but stored, and
/// none of another store's records (every backend that declares a census).
pub async fn census_counts_by_state_and_expiry<F: StoreFactory>(factory: Arc<F>) {
    let store = open(&*factory).await;
    let native_expiry = store.capabilities().native_expiry;
    let s = must(&*store);
    // Written at T0, counted at T0 + 30 s: time left = ttl - 30 s.
    let records = [
        ("in-flight-a", claim(1, 1, T0, 60)),      // 30 s left: ≤ 1m
        ("in-flight-b", claim(2, 2, T0, 7_200)),   // ~2 h left: ≤ 1d
        ("done-a", completed(3, 3, T0, 60, b"a")), // ≤ 1m
        ("done-b", completed(4, 4, T0, 2 * 86_400, b"b")), // ≤ 7d
        ("done-c", completed(5, 5, T0, 40 * 86_400, b"c")), // > 30d
        ("retryable", failed(6, FailureKind::Retryable, 600)), // ≤ 1h
        ("permanent", failed(7, FailureKind::Permanent, 600)), // ≤ 1h
        ("unknown", failed(8, FailureKind::Unknown, 20 * 86_400)), // ≤ 30d
        ("dead-a", claim(9, 9, T0, 10)),           // expired at T0 + 30 s
        ("dead-b", completed(10, 10, T0, 20, b"d")), // expired at T0 + 30 s
    ];
    for (name, rec) in &records {
        s.insert(&key(name), rec, T0).await;
    }
    // Another store's records must not be counted.
    let other = open(&*factory).await;
    for i in 0..3 {
        must(&*other)
            .insert(&key(&format!("other-{i}")), &claim(100 + i, 1, T0, 60), T0)
            .await;
    }
    let now = at(secs(30));
    let census = ok(store.census(now, 1_000).await, "census");
    assert_eq!(
        census.coverage,
        Coverage::Exact,
        "a census of 10 records with a sample of 1,000 must be exact"
    );
    let got = (
        census.in_flight,
        census.completed,
        census.failed_retryable,
        census.failed_permanent,
        census.failed_unknown,
    );
    assert_eq!(
        got,
        (2, 3, 1, 1, 1),
        "live records by state (in_flight, completed, retryable, permanent, unknown); \
         a count above these includes another store's records"
    );
    assert_eq!(
        census.expiry,
        [2, 2, 1, 1, 1, 1],
        "live records by time left (≤1m, ≤1h, ≤1d, ≤7d, ≤30d, >30d)"
    );
    if native_expiry {
        assert!(
            census.expired <= 2,
            "{} expired records counted, only 2 were written",
            census.expired
        );
    } else {
        assert_eq!(census.expired, 2, "expired records still stored");
    }
    // The census wrote nothing.
    for (name, rec) in &records[..8] {
        assert_eq!(
            s.get(&key(name), now).await.as_ref(),
            Some(rec),
            "census must not change a record"
        );
    }
}

/// A sampled census stops at its sample; an exact one ignores it.
pub async fn census_respects_its_sample<F: StoreFactory>(factory: Arc<F>) {
    let store = open(&*factory).await;
    let support = store.capabilities().census;
    let s = must(&*store);
    for i in 0..10 {
        s.insert(&key(&format!("k-{i}")), &claim(i + 1, 1, T0, 60), T0)
            .await;
    }
    let census = ok(store.census(T0, 3).await, "census");
    match support {
        CensusSupport::Exact => {
            assert_eq!(census.coverage, Coverage::Exact, "an exact census");
            assert_eq!(census.total(), 10, "an exact census counts every record");
        }
        _ => {
            assert_eq!(
                census.coverage,
                Coverage::Sampled { limit: 3 },
                "a sampled census of 10 records with a sample of 3 says it is sampled"
            );
            assert_eq!(census.total(), 3, "a sample of 3 counts 3 records");
        }
    }
    assert_eq!(
        census.in_flight,
        census.total(),
        "every record is in flight"
    );
}

/// A store that declares no census says so with `Unsupported`, and one that
/// declares it counts an empty store as empty.
pub async fn census_is_supported_as_declared<F: StoreFactory>(factory: Arc<F>) {
    let store = open(&*factory).await;
    let result = store.census(T0, 100).await;
    match store.capabilities().census {
        CensusSupport::None => assert!(
            matches!(result, Err(StoreError::Unsupported { .. })),
            "a store declaring no census must return StoreError::Unsupported, got {result:?}"
        ),
        _ => {
            let census = ok(result, "census");
            assert_eq!(census.total(), 0, "a new store holds no records");
            assert_eq!(census.coverage, Coverage::Exact, "an empty census is exact");
        }
    }
}
