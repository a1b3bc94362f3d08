//! `insert_if_absent` and `get`: what is live, what is absent, and whose
//! `now` decides.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use idem_core::Timestamp;
use idem_core::store::{InsertOutcome, SwapOutcome};

use super::super::{T0, at, claim, completed, key, must, open, open_with, secs};
use crate::StoreFactory;

/// Insert on an absent key writes the record, and `get` reads it back.
pub async fn insert_on_absent<F: StoreFactory>(factory: Arc<F>) {
    let store = open(&*factory).await;
    let (s, k) = (must(&store), key("absent"));
    let rec = claim(1, 1, T0, 60);
    assert_eq!(s.get(&k, T0).await, None, "a fresh store is empty");
    assert_eq!(
        s.insert(&k, &rec, T0).await,
        InsertOutcome::Inserted,
        "insert on an absent key must insert"
    );
    assert_eq!(
        s.get(&k, T0).await,
        Some(rec),
        "get must read back exactly what insert wrote"
    );
}

/// Insert on a live key writes nothing and returns the live record with its revision.
pub async fn insert_on_existing_returns_it<F: StoreFactory>(factory: Arc<F>) {
    let first = claim(1, 1, T0, 60);
    let (store, k) = open_with(&*factory, "existing", &first).await;
    let s = must(&store);
    let second = completed(2, 2, T0, 60, b"second");
    assert_eq!(
        s.insert(&k, &second, at(5)).await,
        InsertOutcome::Exists(first.clone()),
        "insert on a live key must return the live record and its revision"
    );
    assert_eq!(
        s.get(&k, at(5)).await,
        Some(first),
        "insert on a live key must not overwrite it"
    );
}

/// Inserting another record under the live record's revision is not an
/// insert: the store writes nothing and returns the live record as
/// `Exists`, also for a record written by CAS. A store that takes "my
/// revision is already there" for its own write and answers `Inserted`
/// tells a second claimant that it won. The identical record again (every
/// field equal: a call re-sent after a lost reply) may be answered either
/// way, since the live record is then the caller's, byte for byte.
pub async fn reinsert_of_the_live_record_returns_it<F: StoreFactory>(factory: Arc<F>) {
    let store = open(&*factory).await;
    let (s, k) = (must(&store), key("identical"));
    let first = claim(1, 1, T0, 60);
    assert_eq!(
        s.insert(&k, &first, T0).await,
        InsertOutcome::Inserted,
        "insert on an absent key must insert"
    );
    // Another claimant's record under the same revision: not a re-send.
    let rival = claim(1, 2, at(5), 60);
    assert_eq!(
        s.insert(&k, &rival, at(5)).await,
        InsertOutcome::Exists(first.clone()),
        "inserting another record with the live record's revision must return the live one as Exists, not Inserted"
    );
    // The very same record again (a re-sent call): either answer is true.
    let again = s.insert(&k, &first, at(5)).await;
    assert!(
        again == InsertOutcome::Inserted || again == InsertOutcome::Exists(first.clone()),
        "re-inserting the identical live record must say Inserted or Exists(it), got {again:?}"
    );
    let done = completed(2, 1, at(10), 60, b"done");
    assert_eq!(
        s.swap(&k, &first, &done, at(10)).await,
        SwapOutcome::Swapped
    );
    let rival_done = completed(2, 2, at(20), 60, b"rival");
    assert_eq!(
        s.insert(&k, &rival_done, at(20)).await,
        InsertOutcome::Exists(done.clone()),
        "inserting another record with the revision a CAS wrote must return the live one as Exists, not Inserted"
    );
    assert_eq!(
        s.get(&k, at(20)).await,
        Some(done),
        "the live record is unchanged"
    );
}

/// Insert over an expired record replaces it; one millisecond earlier the
/// record was still live and insert returned it.
pub async fn insert_over_expired_replaces_it<F: StoreFactory>(factory: Arc<F>) {
    let old = claim(1, 1, T0, 10);
    let (store, k) = open_with(&*factory, "expired", &old).await;
    let s = must(&store);
    let new = claim(2, 2, at(secs(10)), 60);
    assert_eq!(
        s.insert(&k, &new, at(secs(10) - 1)).await,
        InsertOutcome::Exists(old),
        "1 ms before expires_at the record is live"
    );
    assert_eq!(
        s.insert(&k, &new, at(secs(10))).await,
        InsertOutcome::Inserted,
        "at expires_at (expires_at <= now) the record is expired and insert must replace it"
    );
    assert_eq!(s.get(&k, at(secs(10))).await, Some(new));
}

/// Get of a key never written is `None`, also next to a written key.
pub async fn get_absent_is_none<F: StoreFactory>(factory: Arc<F>) {
    let store = open(&*factory).await;
    let s = must(&store);
    assert_eq!(s.get(&key("never"), T0).await, None);
    s.insert(&key("written"), &claim(1, 1, T0, 60), T0).await;
    assert_eq!(
        s.get(&key("never"), T0).await,
        None,
        "a neighbouring key's record must not show up"
    );
}

/// Get of an expired record is `None` from `expires_at` on, and the record
/// until then.
pub async fn get_expired_is_none<F: StoreFactory>(factory: Arc<F>) {
    let rec = completed(1, 1, T0, 10, b"done");
    let (store, k) = open_with(&*factory, "expiring", &rec).await;
    let s = must(&store);
    let expected = [
        (
            secs(10) - 1,
            Some(rec),
            "1 ms before expires_at the record is live",
        ),
        (
            secs(10),
            None,
            "at expires_at the record is expired (expires_at <= now)",
        ),
        (
            secs(3600),
            None,
            "long after expires_at the record is expired",
        ),
    ];
    for (millis, want, why) in expected {
        assert_eq!(s.get(&k, at(millis)).await, want, "{why}");
    }
}

/// Expiry is decided by the `now` the caller passes, never by the store's
/// own clock: a record from 2001 is live at a `now` in 2001, and one from
/// 2096 is expired at a `now` after its expiry.
pub async fn expiry_uses_the_callers_now<F: StoreFactory>(factory: Arc<F>) {
    let past = Timestamp::from_millis(1_000_000_000_000); // 2001-09-09
    let future = Timestamp::from_millis(4_000_000_000_000); // 2096-10-02
    let old = claim(1, 1, past, 10);
    let (store, k) = open_with(&*factory, "in-the-past", &old).await;
    let s = must(&store);
    let later = past.plus(Duration::from_secs(5));
    assert_eq!(
        s.get(&k, later).await,
        Some(old.clone()),
        "a record live at the caller's `now` must be returned, whatever the store's clock says"
    );
    assert_eq!(
        s.swap(&k, &old, &claim(2, 1, later, 10), later).await,
        SwapOutcome::Swapped,
        "CAS on a record live at the caller's `now` must swap"
    );
    let k = key("in-the-future");
    s.insert(&k, &claim(3, 3, future, 10), future).await;
    let expired = future.plus(Duration::from_secs(10));
    assert_eq!(
        s.get(&k, expired).await,
        None,
        "a record expired at the caller's `now` must be absent, whatever the store's clock says"
    );
    assert_eq!(
        s.insert(&k, &claim(4, 4, expired, 10), expired).await,
        InsertOutcome::Inserted,
        "insert over a record expired at the caller's `now` must replace it"
    );
}
