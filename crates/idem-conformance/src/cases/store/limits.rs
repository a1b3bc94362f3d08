//! A declared record limit is honest, and an undecodable record is an error.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::sync::Arc;

use idem_core::store::{
    FencingToken, InsertOutcome, Revision, State, Store, StoreError, SwapOutcome, Versioned, codec,
};
use idem_core::{Error, FailureKind, Fingerprint, ManualClock, Outcome, RecordKey};

use super::super::{T0, claim, completed, engine_on, key, must, noise, open, policy};
use crate::StoreFactory;

/// Fails the case unless `result` (of `what`) is [`StoreError::Rejected`]
/// and changed nothing: `k` still holds `before`.
async fn rejected<S: Store, T: std::fmt::Debug>(
    store: &S,
    result: Result<T, StoreError>,
    what: &str,
    k: &RecordKey,
    before: Option<Versioned>,
) {
    if !matches!(result, Err(StoreError::Rejected { .. })) {
        panic!("{what} must be Rejected, got {result:?}");
    }
    let after = must(store).get(k, T0).await;
    assert_eq!(after, before, "a refused {what} must change nothing");
}

/// The record limit `store` declares (these cases run only when it declares
/// one).
fn declared_limit<S: Store>(store: &S) -> usize {
    store
        .capabilities()
        .max_record_bytes
        .expect("the case runs only for backends with a limit")
}

/// A record larger than the declared limit is refused with
/// [`StoreError::Rejected`], and nothing is written or replaced.
pub async fn oversized_record_is_rejected<F: StoreFactory>(factory: Arc<F>) {
    let store = open(&*factory).await;
    let s = must(&store);
    let limit = declared_limit(&*store);
    let k = key("oversized");
    let huge = completed(1, 1, T0, 60, &noise(limit + 1, 9));
    let what = format!("insert of a record over the limit of {limit} bytes");
    let refused = store.insert_if_absent(&k, &huge, T0).await;
    rejected(&*store, refused, &what, &k, None).await;
    let small = claim(2, 1, T0, 60);
    s.insert(&k, &small, T0).await;
    let mut huge = huge;
    huge.revision = Revision::from_u64(3);
    let what = format!("CAS to a record over the limit of {limit} bytes");
    let refused = store.compare_and_swap(&k, &small, &huge, T0).await;
    rejected(&*store, refused, &what, &k, Some(small)).await;
}

/// The declared limit is exact, as [`codec::record_size`] measures it (the
/// measure the engine uses for its
/// [`outcome_limit`](idem_core::Engine::outcome_limit)): for a store
/// declaring `max_record_bytes = L`, a record of size exactly `L` is
/// accepted by `insert_if_absent` and by `compare_and_swap` and reads back
/// byte for byte, and one of size `L + 1` is refused by both with
/// [`StoreError::Rejected`], writing nothing. A store that measures records
/// another way (its encoded length, a column's length) either refuses
/// outcomes the engine was promised it could store, or accepts records
/// above what it declared.
pub async fn declared_record_limit_is_honest<F: StoreFactory>(factory: Arc<F>) {
    let store = open(&*factory).await;
    let s = must(&store);
    let limit = declared_limit(&*store);
    assert!(
        limit >= codec::RECORD_OVERHEAD,
        "a declared limit of {limit} bytes is below codec::RECORD_OVERHEAD ({}): not even a claim fits",
        codec::RECORD_OVERHEAD
    );
    let room = limit - codec::RECORD_OVERHEAD;
    // One buffer for every record (the limit may be tens of MiB).
    let above = Outcome::new(noise(room + 1, 21));
    let fits = Outcome::new(above.bytes().slice(..room));
    let with_outcome = |rev: u64, outcome: &Outcome| {
        let mut v = completed(rev, 1, T0, 60, &[]);
        v.record.state = State::Completed {
            token: FencingToken::from_u128(1),
            outcome: outcome.clone(),
        };
        v
    };
    let at_limit = with_outcome(1, &fits);
    assert_eq!(codec::record_size(&at_limit.record), limit);
    let mut over = with_outcome(2, &above);
    assert_eq!(codec::record_size(&over.record), limit + 1);

    // Insert: at the limit accepted, one byte above refused.
    let k = key("limit-insert");
    match store.insert_if_absent(&k, &at_limit, T0).await {
        Ok(InsertOutcome::Inserted) => {}
        other => panic!(
            "insert of a record of exactly the declared limit ({limit} bytes by codec::record_size) must be Inserted, got {other:?}"
        ),
    }
    let got = s
        .get(&k, T0)
        .await
        .expect("the record at the limit must be stored");
    assert_eq!(
        got, at_limit,
        "the record at the limit must read back exactly"
    );
    let k_over = key("limit-insert-over");
    let what = format!(
        "insert of a record of the declared limit + 1 ({} bytes by codec::record_size)",
        limit + 1
    );
    let refused = store.insert_if_absent(&k_over, &over, T0).await;
    rejected(&*store, refused, &what, &k_over, None).await;

    // CAS: a claim grows to the limit (as a failure, to cover that state
    // too), then one byte above is refused and changes nothing.
    let k = key("limit-cas");
    let small = claim(3, 1, T0, 60);
    s.insert(&k, &small, T0).await;
    let mut failed = at_limit.clone();
    failed.revision = Revision::from_u64(4);
    failed.record.state = State::Failed {
        token: FencingToken::from_u128(1),
        kind: FailureKind::Unknown,
        outcome: fits.clone(),
    };
    assert_eq!(codec::record_size(&failed.record), limit);
    match store.compare_and_swap(&k, &small, &failed, T0).await {
        Ok(SwapOutcome::Swapped) => {}
        other => panic!(
            "CAS to a record of exactly the declared limit ({limit} bytes) must swap, got {other:?}"
        ),
    }
    assert_eq!(
        s.get(&k, T0).await,
        Some(failed.clone()),
        "the record at the limit must read back exactly"
    );
    over.revision = Revision::from_u64(5);
    let what = format!(
        "CAS to a record of the declared limit + 1 ({} bytes)",
        limit + 1
    );
    let refused = store.compare_and_swap(&k, &failed, &over, T0).await;
    rejected(&*store, refused, &what, &k, Some(failed)).await;
}

/// A record that cannot be decoded is reported as [`StoreError::Corrupt`] by
/// `get` and `insert_if_absent`, is never overwritten, and the engine
/// refuses to run anything over it.
pub async fn corrupt_record_is_an_error_not_absent<F: StoreFactory>(factory: Arc<F>) {
    let store = open(&*factory).await;
    let s = must(&store);
    let k = key("corrupt");
    let rec = completed(1, 1, T0, 60, b"fine");
    s.insert(&k, &rec, T0).await;
    if let Err(why) = factory.corrupt(&store, &k).await {
        panic!("factory.corrupt failed: {why}");
    }
    fn is_corrupt<T>(r: &Result<T, StoreError>) -> bool {
        matches!(r, Err(StoreError::Corrupt { .. }))
    }
    let got = store.get(&k, T0).await;
    assert!(
        is_corrupt(&got),
        "get of an undecodable record must be Err(Corrupt), got {got:?}"
    );
    let fresh = claim(2, 2, T0, 60);
    let got = store.insert_if_absent(&k, &fresh, T0).await;
    assert!(
        is_corrupt(&got),
        "insert_if_absent over an undecodable record must be Err(Corrupt) (never treat it as absent), got {got:?}"
    );
    let got = store.get(&k, T0).await;
    assert!(
        is_corrupt(&got),
        "the undecodable record must not have been overwritten, got {got:?}"
    );
    let engine = engine_on(store.clone(), &ManualClock::new(T0), policy());
    let begun = engine
        .begin_key(k.clone(), Fingerprint::of(b"request"))
        .await;
    assert!(
        matches!(begun, Err(Error::Store(StoreError::Corrupt { .. }))),
        "the engine must refuse a corrupt record with Error::Store(Corrupt), got {begun:?}"
    );
}
