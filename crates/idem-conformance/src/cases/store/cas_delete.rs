//! `compare_and_swap` and `delete_if`: the revision decides, never an upsert.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::sync::Arc;

use idem_core::store::{InsertOutcome, SwapOutcome};

use super::super::{T0, at, claim, completed, key, must, open, open_with, secs, stale};
use crate::StoreFactory;

/// CAS with the live record's revision writes the new record (with its own
/// revision); the old revision no longer matches.
pub async fn cas_right_revision_swaps<F: StoreFactory>(factory: Arc<F>) {
    let first = claim(1, 1, T0, 60);
    let (store, k) = open_with(&*factory, "cas", &first).await;
    let s = must(&store);
    let second = completed(2, 1, at(1), 60, b"done");
    assert_eq!(
        s.swap(&k, &first, &second, at(1)).await,
        SwapOutcome::Swapped,
        "CAS with the live revision must swap"
    );
    assert_eq!(
        s.get(&k, at(1)).await,
        Some(second.clone()),
        "get must read back the swapped record with its new revision"
    );
    let third = completed(3, 1, at(2), 60, b"again");
    assert_eq!(
        s.swap(&k, &first, &third, at(2)).await,
        SwapOutcome::Conflict(Some(second.clone())),
        "the replaced revision must no longer match"
    );
    assert_eq!(
        s.swap(&k, &second, &third, at(2)).await,
        SwapOutcome::Swapped,
        "the new revision must match"
    );
    assert_eq!(s.get(&k, at(2)).await, Some(third));
}

/// CAS with a stale revision writes nothing and returns the live record.
pub async fn cas_stale_revision_changes_nothing<F: StoreFactory>(factory: Arc<F>) {
    let live = claim(1, 1, T0, 60);
    let (store, k) = open_with(&*factory, "stale", &live).await;
    let s = must(&store);
    let attempt = completed(3, 2, at(1), 60, b"zombie");
    for n in [2, 0, u64::MAX, 1 << 63] {
        assert_eq!(
            s.swap(&k, &stale(&live, n), &attempt, at(1)).await,
            SwapOutcome::Conflict(Some(live.clone())),
            "CAS with revision {n} (live is 1) must conflict and return the live record"
        );
    }
    assert_eq!(
        s.get(&k, at(1)).await,
        Some(live),
        "a CAS with a stale revision must change nothing"
    );
}

/// CAS on an absent or expired key writes nothing (no upsert) and returns
/// `Conflict(None)`, even with the expired record's own revision.
pub async fn cas_on_absent_or_expired_changes_nothing<F: StoreFactory>(factory: Arc<F>) {
    let store = open(&*factory).await;
    let (s, k) = (must(&store), key("cas-absent"));
    assert_eq!(
        s.swap(&k, &claim(1, 1, T0, 60), &claim(7, 7, T0, 60), T0)
            .await,
        SwapOutcome::Conflict(None),
        "CAS on an absent key must report Conflict(None)"
    );
    assert_eq!(
        s.get(&k, T0).await,
        None,
        "CAS on an absent key must not create it"
    );

    let k = key("cas-expired");
    let old = claim(1, 1, T0, 10);
    s.insert(&k, &old, T0).await;
    let next = completed(2, 1, at(secs(10)), 60, b"late");
    assert_eq!(
        s.swap(&k, &old, &next, at(secs(10))).await,
        SwapOutcome::Conflict(None),
        "CAS on an expired record must conflict with None, even with its revision"
    );
    assert_eq!(
        s.get(&k, at(secs(10))).await,
        None,
        "CAS on an expired record must not write"
    );
    assert_eq!(
        s.insert(&k, &claim(3, 3, at(secs(10)), 60), at(secs(10)))
            .await,
        InsertOutcome::Inserted,
        "the expired key behaves as absent"
    );
}

/// `delete_if` with the live revision deletes; the key is then absent and
/// can be inserted again.
pub async fn delete_if_right_revision_deletes<F: StoreFactory>(factory: Arc<F>) {
    let rec = claim(1, 1, T0, 60);
    let (store, k) = open_with(&*factory, "delete", &rec).await;
    let s = must(&store);
    assert!(
        s.delete(&k, &rec, at(1)).await,
        "delete_if with the live revision must delete and return true"
    );
    assert_eq!(s.get(&k, at(1)).await, None);
    assert!(
        !s.delete(&k, &rec, at(1)).await,
        "a second delete_if finds nothing"
    );
    assert_eq!(
        s.insert(&k, &claim(2, 2, at(2), 60), at(2)).await,
        InsertOutcome::Inserted,
        "a deleted key is absent"
    );
}

/// `delete_if` with a stale revision returns false and changes nothing.
pub async fn delete_if_stale_revision_changes_nothing<F: StoreFactory>(factory: Arc<F>) {
    let rec = claim(1, 1, T0, 60);
    let (store, k) = open_with(&*factory, "keep", &rec).await;
    let s = must(&store);
    for n in [2, 0, u64::MAX] {
        assert!(
            !s.delete(&k, &stale(&rec, n), at(1)).await,
            "delete_if with revision {n} (live is 1) must return false"
        );
    }
    assert_eq!(
        s.get(&k, at(1)).await,
        Some(rec),
        "delete_if with a stale revision must change nothing"
    );
}

/// `delete_if` on an absent or expired key returns false.
pub async fn delete_if_absent_or_expired_is_false<F: StoreFactory>(factory: Arc<F>) {
    let store = open(&*factory).await;
    let s = must(&store);
    assert!(
        !s.delete(&key("nothing"), &claim(1, 1, T0, 60), T0).await,
        "delete_if on an absent key must return false"
    );
    let k = key("gone");
    let rec = claim(1, 1, T0, 10);
    s.insert(&k, &rec, T0).await;
    assert!(
        !s.delete(&k, &rec, at(secs(10))).await,
        "delete_if on an expired record must return false, even with its revision"
    );
    assert_eq!(s.get(&k, at(secs(10))).await, None);
}
