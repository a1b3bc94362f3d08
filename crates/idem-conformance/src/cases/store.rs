//! The store primitives, one clause of the [`Store`] contract at a time.
//!
//! Every record written here lives at least 10 s past the `now` it is written
//! at, so a backend with native expiry (which counts in wall-clock time) keeps
//! it physically for the whole case; expiry is always reached by passing a
//! later `now`.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use idem_core::{
    Engine, Error, FailureKind, FencingToken, Fingerprint, IdempotencyKey, Inserted, ManualClock,
    Outcome, RecordKey, Revision, Scope, State, Store, StoreError, Swapped, Timestamp, Versioned,
    codec,
};

use super::{T0, at, claim, completed, key, noise, ok, open, policy, same_bytes, secs};
use crate::StoreFactory;

/// Insert on an absent key writes the record, and `get` reads it back.
pub async fn insert_on_absent<F: StoreFactory>(factory: Arc<F>) {
    let store = open(&*factory).await;
    let k = key("absent");
    let rec = claim(1, 1, T0, 60);
    assert_eq!(
        ok(store.get(&k, T0).await, "get"),
        None,
        "a fresh store is empty"
    );
    assert_eq!(
        ok(
            store.insert_if_absent(&k, &rec, T0).await,
            "insert_if_absent"
        ),
        Inserted::Inserted,
        "insert on an absent key must insert"
    );
    assert_eq!(
        ok(store.get(&k, T0).await, "get"),
        Some(rec),
        "get must read back exactly what insert wrote"
    );
}

/// Insert on a live key writes nothing and returns the live record with its revision.
pub async fn insert_on_existing_returns_it<F: StoreFactory>(factory: Arc<F>) {
    let store = open(&*factory).await;
    let k = key("existing");
    let first = claim(1, 1, T0, 60);
    let second = completed(2, 2, T0, 60, b"second");
    ok(
        store.insert_if_absent(&k, &first, T0).await,
        "insert_if_absent",
    );
    assert_eq!(
        ok(
            store.insert_if_absent(&k, &second, at(5)).await,
            "insert_if_absent"
        ),
        Inserted::Exists(first.clone()),
        "insert on a live key must return the live record and its revision"
    );
    assert_eq!(
        ok(store.get(&k, at(5)).await, "get"),
        Some(first),
        "insert on a live key must not overwrite it"
    );
}

/// Insert over an expired record replaces it; one millisecond earlier the
/// record was still live and insert returned it.
pub async fn insert_over_expired_replaces_it<F: StoreFactory>(factory: Arc<F>) {
    let store = open(&*factory).await;
    let k = key("expired");
    let old = claim(1, 1, T0, 10);
    ok(
        store.insert_if_absent(&k, &old, T0).await,
        "insert_if_absent",
    );
    let new = claim(2, 2, at(secs(10)), 60);
    assert_eq!(
        ok(
            store.insert_if_absent(&k, &new, at(secs(10) - 1)).await,
            "insert_if_absent"
        ),
        Inserted::Exists(old),
        "1 ms before expires_at the record is live"
    );
    assert_eq!(
        ok(
            store.insert_if_absent(&k, &new, at(secs(10))).await,
            "insert_if_absent"
        ),
        Inserted::Inserted,
        "at expires_at (expires_at <= now) the record is expired and insert must replace it"
    );
    assert_eq!(ok(store.get(&k, at(secs(10))).await, "get"), Some(new));
}

/// Get of a key never written is `None`, also next to a written key.
pub async fn get_absent_is_none<F: StoreFactory>(factory: Arc<F>) {
    let store = open(&*factory).await;
    assert_eq!(ok(store.get(&key("never"), T0).await, "get"), None);
    ok(
        store
            .insert_if_absent(&key("written"), &claim(1, 1, T0, 60), T0)
            .await,
        "insert_if_absent",
    );
    assert_eq!(
        ok(store.get(&key("never"), T0).await, "get"),
        None,
        "a neighbouring key's record must not show up"
    );
}

/// Get of an expired record is `None` from `expires_at` on, and the record
/// until then.
pub async fn get_expired_is_none<F: StoreFactory>(factory: Arc<F>) {
    let store = open(&*factory).await;
    let k = key("expiring");
    let rec = completed(1, 1, T0, 10, b"done");
    ok(
        store.insert_if_absent(&k, &rec, T0).await,
        "insert_if_absent",
    );
    assert_eq!(
        ok(store.get(&k, at(secs(10) - 1)).await, "get"),
        Some(rec),
        "1 ms before expires_at the record is live"
    );
    assert_eq!(
        ok(store.get(&k, at(secs(10))).await, "get"),
        None,
        "at expires_at the record is expired (expires_at <= now)"
    );
    assert_eq!(
        ok(store.get(&k, at(secs(3600))).await, "get"),
        None,
        "long after expires_at the record is expired"
    );
}

/// Expiry is decided by the `now` the caller passes, never by the store's
/// own clock: a record from 2001 is live at a `now` in 2001, and one from
/// 2096 is expired at a `now` after its expiry.
pub async fn expiry_uses_the_callers_now<F: StoreFactory>(factory: Arc<F>) {
    let store = open(&*factory).await;
    let past = Timestamp::from_millis(1_000_000_000_000); // 2001-09-09
    let future = Timestamp::from_millis(4_000_000_000_000); // 2096-10-02
    let k = key("in-the-past");
    let old = claim(1, 1, past, 10);
    ok(
        store.insert_if_absent(&k, &old, past).await,
        "insert_if_absent",
    );
    let later = past.plus(Duration::from_secs(5));
    assert_eq!(
        ok(store.get(&k, later).await, "get"),
        Some(old.clone()),
        "a record live at the caller's `now` must be returned, whatever the store's clock says"
    );
    let swapped = claim(2, 1, later, 10);
    assert_eq!(
        ok(
            store
                .compare_and_swap(&k, old.revision, &swapped, later)
                .await,
            "compare_and_swap"
        ),
        Swapped::Swapped,
        "CAS on a record live at the caller's `now` must swap"
    );
    let k = key("in-the-future");
    let rec = claim(3, 3, future, 10);
    ok(
        store.insert_if_absent(&k, &rec, future).await,
        "insert_if_absent",
    );
    let expired = future.plus(Duration::from_secs(10));
    assert_eq!(
        ok(store.get(&k, expired).await, "get"),
        None,
        "a record expired at the caller's `now` must be absent, whatever the store's clock says"
    );
    let next = claim(4, 4, expired, 10);
    assert_eq!(
        ok(
            store.insert_if_absent(&k, &next, expired).await,
            "insert_if_absent"
        ),
        Inserted::Inserted,
        "insert over a record expired at the caller's `now` must replace it"
    );
}

/// CAS with the live record's revision writes the new record (with its own
/// revision); the old revision no longer matches.
pub async fn cas_right_revision_swaps<F: StoreFactory>(factory: Arc<F>) {
    let store = open(&*factory).await;
    let k = key("cas");
    let first = claim(1, 1, T0, 60);
    ok(
        store.insert_if_absent(&k, &first, T0).await,
        "insert_if_absent",
    );
    let second = completed(2, 1, at(1), 60, b"done");
    assert_eq!(
        ok(
            store
                .compare_and_swap(&k, first.revision, &second, at(1))
                .await,
            "compare_and_swap"
        ),
        Swapped::Swapped,
        "CAS with the live revision must swap"
    );
    assert_eq!(
        ok(store.get(&k, at(1)).await, "get"),
        Some(second.clone()),
        "get must read back the swapped record with its new revision"
    );
    let third = completed(3, 1, at(2), 60, b"again");
    assert_eq!(
        ok(
            store
                .compare_and_swap(&k, first.revision, &third, at(2))
                .await,
            "compare_and_swap"
        ),
        Swapped::Conflict(Some(second.clone())),
        "the replaced revision must no longer match"
    );
    assert_eq!(
        ok(
            store
                .compare_and_swap(&k, second.revision, &third, at(2))
                .await,
            "compare_and_swap"
        ),
        Swapped::Swapped,
        "the new revision must match"
    );
    assert_eq!(ok(store.get(&k, at(2)).await, "get"), Some(third));
}

/// CAS with a stale revision writes nothing and returns the live record.
pub async fn cas_stale_revision_changes_nothing<F: StoreFactory>(factory: Arc<F>) {
    let store = open(&*factory).await;
    let k = key("stale");
    let live = claim(1, 1, T0, 60);
    ok(
        store.insert_if_absent(&k, &live, T0).await,
        "insert_if_absent",
    );
    let attempt = completed(3, 2, at(1), 60, b"zombie");
    for stale in [2, 0, u64::MAX, 1 << 63] {
        assert_eq!(
            ok(
                store
                    .compare_and_swap(&k, Revision::from_u64(stale), &attempt, at(1))
                    .await,
                "compare_and_swap"
            ),
            Swapped::Conflict(Some(live.clone())),
            "CAS with revision {stale} (live is 1) must conflict and return the live record"
        );
    }
    assert_eq!(
        ok(store.get(&k, at(1)).await, "get"),
        Some(live),
        "a CAS with a stale revision must change nothing"
    );
}

/// CAS on an absent or expired key writes nothing (no upsert) and returns
/// `Conflict(None)`, even with the expired record's own revision.
pub async fn cas_on_absent_or_expired_changes_nothing<F: StoreFactory>(factory: Arc<F>) {
    let store = open(&*factory).await;
    let k = key("cas-absent");
    let rec = claim(7, 7, T0, 60);
    assert_eq!(
        ok(
            store
                .compare_and_swap(&k, Revision::from_u64(1), &rec, T0)
                .await,
            "compare_and_swap"
        ),
        Swapped::Conflict(None),
        "CAS on an absent key must report Conflict(None)"
    );
    assert_eq!(
        ok(store.get(&k, T0).await, "get"),
        None,
        "CAS on an absent key must not create it"
    );

    let k = key("cas-expired");
    let old = claim(1, 1, T0, 10);
    ok(
        store.insert_if_absent(&k, &old, T0).await,
        "insert_if_absent",
    );
    let next = completed(2, 1, at(secs(10)), 60, b"late");
    assert_eq!(
        ok(
            store
                .compare_and_swap(&k, old.revision, &next, at(secs(10)))
                .await,
            "compare_and_swap"
        ),
        Swapped::Conflict(None),
        "CAS on an expired record must conflict with None, even with its revision"
    );
    assert_eq!(
        ok(store.get(&k, at(secs(10))).await, "get"),
        None,
        "CAS on an expired record must not write"
    );
    let fresh = claim(3, 3, at(secs(10)), 60);
    assert_eq!(
        ok(
            store.insert_if_absent(&k, &fresh, at(secs(10))).await,
            "insert_if_absent"
        ),
        Inserted::Inserted,
        "the expired key behaves as absent"
    );
}

/// `delete_if` with the live revision deletes; the key is then absent and
/// can be inserted again.
pub async fn delete_if_right_revision_deletes<F: StoreFactory>(factory: Arc<F>) {
    let store = open(&*factory).await;
    let k = key("delete");
    let rec = claim(1, 1, T0, 60);
    ok(
        store.insert_if_absent(&k, &rec, T0).await,
        "insert_if_absent",
    );
    assert!(
        ok(store.delete_if(&k, rec.revision, at(1)).await, "delete_if"),
        "delete_if with the live revision must delete and return true"
    );
    assert_eq!(ok(store.get(&k, at(1)).await, "get"), None);
    assert!(
        !ok(store.delete_if(&k, rec.revision, at(1)).await, "delete_if"),
        "a second delete_if finds nothing"
    );
    let again = claim(2, 2, at(2), 60);
    assert_eq!(
        ok(
            store.insert_if_absent(&k, &again, at(2)).await,
            "insert_if_absent"
        ),
        Inserted::Inserted,
        "a deleted key is absent"
    );
}

/// `delete_if` with a stale revision returns false and changes nothing.
pub async fn delete_if_stale_revision_changes_nothing<F: StoreFactory>(factory: Arc<F>) {
    let store = open(&*factory).await;
    let k = key("keep");
    let rec = claim(1, 1, T0, 60);
    ok(
        store.insert_if_absent(&k, &rec, T0).await,
        "insert_if_absent",
    );
    for stale in [2, 0, u64::MAX] {
        assert!(
            !ok(
                store.delete_if(&k, Revision::from_u64(stale), at(1)).await,
                "delete_if"
            ),
            "delete_if with revision {stale} (live is 1) must return false"
        );
    }
    assert_eq!(
        ok(store.get(&k, at(1)).await, "get"),
        Some(rec),
        "delete_if with a stale revision must change nothing"
    );
}

/// `delete_if` on an absent or expired key returns false.
pub async fn delete_if_absent_or_expired_is_false<F: StoreFactory>(factory: Arc<F>) {
    let store = open(&*factory).await;
    assert!(
        !ok(
            store
                .delete_if(&key("nothing"), Revision::from_u64(1), T0)
                .await,
            "delete_if"
        ),
        "delete_if on an absent key must return false"
    );
    let k = key("gone");
    let rec = claim(1, 1, T0, 10);
    ok(
        store.insert_if_absent(&k, &rec, T0).await,
        "insert_if_absent",
    );
    assert!(
        !ok(
            store.delete_if(&k, rec.revision, at(secs(10))).await,
            "delete_if"
        ),
        "delete_if on an expired record must return false, even with its revision"
    );
    assert_eq!(ok(store.get(&k, at(secs(10))).await, "get"), None);
}

/// Builds records with extreme and distinct values in every field, one per
/// state.
fn extreme_records() -> Vec<(&'static str, Versioned)> {
    let all_bytes: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
    let mut fp = [0u8; 32];
    for (i, b) in fp.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(37) ^ 0x80;
    }
    let base = |rev: u64, state: State, attempts: u32| Versioned {
        revision: Revision::from_u64(rev),
        record: idem_core::Record {
            fingerprint: Fingerprint::from_bytes(fp),
            state,
            created_at: Timestamp::from_millis(1),
            updated_at: at(123),
            expires_at: at(secs(60) + 7),
            attempts,
        },
    };
    vec![
        (
            "in flight, max revision, max token, max attempts",
            base(
                u64::MAX,
                State::InFlight {
                    token: FencingToken::from_u128(u128::MAX),
                    lease_deadline: at(secs(30) + 1),
                },
                u32::MAX,
            ),
        ),
        (
            "completed with every byte value, revision with the top bit set",
            base(
                1 << 63,
                State::Completed {
                    token: FencingToken::from_u128(1),
                    outcome: Outcome::new(all_bytes.clone()),
                },
                1,
            ),
        ),
        (
            "failed retryable with an empty outcome, revision 0",
            base(
                0,
                State::Failed {
                    token: FencingToken::from_u128(1 << 127),
                    kind: FailureKind::Retryable,
                    outcome: Outcome::default(),
                },
                2,
            ),
        ),
        (
            "failed permanent with a NUL outcome, revision i64::MAX",
            base(
                i64::MAX as u64,
                State::Failed {
                    token: FencingToken::from_u128(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210),
                    kind: FailureKind::Permanent,
                    outcome: Outcome::new(vec![0u8]),
                },
                0,
            ),
        ),
        (
            "completed with invalid UTF-8 and a zero token",
            base(
                42,
                State::Completed {
                    token: FencingToken::from_u128(0),
                    outcome: Outcome::new(vec![0xff, 0xfe, 0xc3, 0x28, 0x00, b'\'', b'"', b'\\']),
                },
                3,
            ),
        ),
    ]
}

/// Every field of every state reads back exactly, through each path a
/// record comes back by: `get`, `Inserted::Exists`, `Swapped::Conflict`,
/// and after a CAS.
pub async fn records_round_trip_every_field<F: StoreFactory>(factory: Arc<F>) {
    let store = open(&*factory).await;
    let now = at(100);
    let other = claim(999, 999, now, 60);
    for (i, (what, rec)) in extreme_records().into_iter().enumerate() {
        // Written by insert.
        let k = key(&format!("inserted-{i}"));
        ok(
            store.insert_if_absent(&k, &rec, now).await,
            "insert_if_absent",
        );
        assert_eq!(
            ok(store.get(&k, now).await, "get"),
            Some(rec.clone()),
            "get after insert must return every field exactly ({what})"
        );
        assert_eq!(
            ok(
                store.insert_if_absent(&k, &other, now).await,
                "insert_if_absent"
            ),
            Inserted::Exists(rec.clone()),
            "Inserted::Exists must carry every field exactly ({what})"
        );
        assert_eq!(
            ok(
                store
                    .compare_and_swap(
                        &k,
                        Revision::from_u64(rec.revision.as_u64() ^ 1),
                        &other,
                        now
                    )
                    .await,
                "compare_and_swap"
            ),
            Swapped::Conflict(Some(rec.clone())),
            "Swapped::Conflict must carry every field exactly ({what})"
        );
        // Written by CAS.
        let k = key(&format!("swapped-{i}"));
        ok(
            store.insert_if_absent(&k, &other, now).await,
            "insert_if_absent",
        );
        assert_eq!(
            ok(
                store.compare_and_swap(&k, other.revision, &rec, now).await,
                "compare_and_swap"
            ),
            Swapped::Swapped
        );
        assert_eq!(
            ok(store.get(&k, now).await, "get"),
            Some(rec.clone()),
            "get after CAS must return every field exactly ({what})"
        );
        assert!(
            ok(store.delete_if(&k, rec.revision, now).await, "delete_if"),
            "delete_if must match the revision as written ({what})"
        );
    }
}

/// A record that never expires in practice (`expires_at` at the end of
/// time, as an infinite TTL saturates to, or just past `i64::MAX`)
/// round-trips exactly and stays live, through get, `Exists` and CAS: a
/// backend that keeps timestamps in signed 64-bit columns must not wrap it
/// into the past (clamping the comparison column to `i64::MAX` is fine; the
/// record itself must keep the exact value).
pub async fn far_future_expiry_round_trips<F: StoreFactory>(factory: Arc<F>) {
    let store = open(&*factory).await;
    let century = Duration::from_secs(100 * 365 * 24 * 3600);
    for (i, expires_at) in [u64::MAX, i64::MAX as u64 + 1, i64::MAX as u64]
        .into_iter()
        .map(Timestamp::from_millis)
        .enumerate()
    {
        let k = key(&format!("forever-{i}"));
        let mut rec = completed(1, 1, T0, 60, b"kept");
        rec.record.expires_at = expires_at;
        ok(
            store.insert_if_absent(&k, &rec, T0).await,
            "insert_if_absent",
        );
        assert_eq!(
            ok(store.get(&k, T0).await, "get"),
            Some(rec.clone()),
            "a record expiring at {expires_at:?} must read back exactly and be live"
        );
        assert_eq!(
            ok(store.get(&k, T0.plus(century)).await, "get"),
            Some(rec.clone()),
            "a record expiring at {expires_at:?} is still live a century later"
        );
        assert_eq!(
            ok(
                store.insert_if_absent(&k, &claim(2, 2, T0, 60), T0).await,
                "insert_if_absent"
            ),
            Inserted::Exists(rec.clone()),
            "a record expiring at {expires_at:?} is live for insert"
        );
        let mut next = rec.clone();
        next.revision = Revision::from_u64(3);
        assert_eq!(
            ok(
                store.compare_and_swap(&k, rec.revision, &next, at(1)).await,
                "compare_and_swap"
            ),
            Swapped::Swapped,
            "a record expiring at {expires_at:?} is live for CAS"
        );
        assert_eq!(ok(store.get(&k, at(1)).await, "get"), Some(next));
    }
}

/// Records with outcomes over 1 MiB round-trip byte-exact, written by insert
/// and by CAS.
pub async fn large_record_round_trips<F: StoreFactory>(factory: Arc<F>) {
    let store = open(&*factory).await;
    let k = key("large");
    let big = noise(1024 * 1024 + 17, 1);
    let rec = completed(1, 1, T0, 60, &big);
    ok(
        store.insert_if_absent(&k, &rec, T0).await,
        "insert_if_absent",
    );
    let got = ok(store.get(&k, T0).await, "get").expect("the large record must be stored");
    check_outcome(&got, &big, "get after insert of a 1 MiB + 17 B outcome");
    assert_eq!(got, rec, "every other field too");

    let bigger = noise(2 * 1024 * 1024 + 3, 2);
    let mut next = completed(2, 1, at(1), 60, &[]);
    next.record.state = State::Failed {
        token: FencingToken::from_u128(1),
        kind: FailureKind::Permanent,
        outcome: Outcome::new(bigger.clone()),
    };
    assert_eq!(
        ok(
            store.compare_and_swap(&k, rec.revision, &next, at(1)).await,
            "compare_and_swap"
        ),
        Swapped::Swapped
    );
    let got = ok(store.get(&k, at(1)).await, "get").expect("the swapped record must be stored");
    check_outcome(&got, &bigger, "get after CAS of a 2 MiB + 3 B outcome");
    assert_eq!(got, next, "every other field too");
}

fn check_outcome(got: &Versioned, want: &[u8], what: &str) {
    let bytes = match &got.record.state {
        State::Completed { outcome, .. } | State::Failed { outcome, .. } => outcome.as_bytes(),
        State::InFlight { .. } => panic!("{what}: the record came back in flight"),
    };
    if let Err(diff) = same_bytes(what, bytes, want) {
        panic!("{diff}");
    }
}

/// Writes one distinct record per (scope, key) and reads each back: every
/// pair must land on its own record.
async fn assert_no_collisions<S: Store>(store: &S, pairs: &[(Scope, IdempotencyKey)], what: &str) {
    let mut seen: HashMap<[u8; 32], usize> = HashMap::new();
    for (i, (scope, k)) in pairs.iter().enumerate() {
        let rk = RecordKey::new(scope, k);
        if let Some(j) = seen.insert(*rk.digest(), i) {
            panic!("test bug: pairs {j} and {i} are equal ({scope:?}, {k:?})");
        }
    }
    let record_of = |i: usize| {
        let mut v = completed(
            i as u64 + 1,
            i as u128 + 1,
            T0,
            60,
            &(i as u32).to_be_bytes(),
        );
        v.record.fingerprint = Fingerprint::of(&(i as u64).to_be_bytes());
        v
    };
    for (i, (scope, k)) in pairs.iter().enumerate() {
        let rk = RecordKey::new(scope, k);
        let rec = record_of(i);
        match ok(
            store.insert_if_absent(&rk, &rec, T0).await,
            "insert_if_absent",
        ) {
            Inserted::Inserted => {}
            Inserted::Exists(other) => {
                let j = other.revision.as_u64() as usize - 1;
                panic!(
                    "{what}: ({scope:?}, {k:?}) collided with pair {j} ({:?}): the store found its record",
                    pairs.get(j)
                );
            }
        }
    }
    for (i, (scope, k)) in pairs.iter().enumerate() {
        let rk = RecordKey::new(scope, k);
        assert_eq!(
            ok(store.get(&rk, T0).await, "get"),
            Some(record_of(i)),
            "{what}: ({scope:?}, {k:?}) must read back its own record"
        );
    }
}

/// Keys using every allowed character (visible ASCII, 1 to 255 bytes),
/// including characters special to SQL `LIKE`, Redis globs and hash tags,
/// and keys that differ only in case, each get their own record.
pub async fn keys_with_every_allowed_character_never_collide<F: StoreFactory>(factory: Arc<F>) {
    let store = open(&*factory).await;
    let every: String = (0x21u8..=0x7e).map(char::from).collect();
    let mut keys: Vec<String> = (0x21u8..=0x7e).map(|b| char::from(b).to_string()).collect();
    keys.push(every.clone());
    keys.push(every.chars().rev().collect());
    keys.push(every.repeat(3)[..255].to_string());
    keys.push("~".repeat(255));
    keys.push("~".repeat(254));
    for k in [
        "ABC", "abc", "Abc", "a%", "a_", "a*", "a?", "[a]", "a\\b", "a'b", "a\"b", "a:b", "a/b",
        "{a}", "{a}b", "a{b}", "00", "0x0", "--", "';--", "%00", "\\x00", "??",
    ] {
        keys.push(k.to_string());
    }
    let scope = Scope::tenant("keys");
    let pairs: Vec<(Scope, IdempotencyKey)> = keys
        .iter()
        .map(|k| (scope.clone(), IdempotencyKey::parse(k).expect("valid key")))
        .collect();
    assert_no_collisions(&store, &pairs, "keys").await;
}

/// Scopes whose parts contain separators, NUL, newlines, any Unicode, or are
/// empty versus absent, never share a record.
pub async fn scopes_with_separators_never_collide<F: StoreFactory>(factory: Arc<F>) {
    let store = open(&*factory).await;
    let k = |s: &str| IdempotencyKey::parse(s).expect("valid key");
    fn t(tenant: &str) -> Scope {
        Scope::tenant(tenant)
    }
    let mut pairs = vec![
        (t("a:b"), k("c")),
        (t("a"), k("b:c")),
        (t("a").with_principal("b"), k("c")),
        (t("a").with_operation("b"), k("c")),
        (t("a").with_principal(""), k("c")),
        (t("a").with_operation(""), k("c")),
        (t("a").with_principal("").with_operation(""), k("c")),
        (t("a").with_principal("b").with_operation("c"), k("d")),
        (t("a").with_principal("c").with_operation("b"), k("d")),
        (t("a"), k("c")),
        (t(""), k("c")),
        (t("").with_principal(""), k("c")),
        (Scope::global().with_operation("a"), k("c")),
        (t("a\0b"), k("c")),
        (t("a\nb"), k("c")),
        (t("a b"), k("c")),
        (t("租户"), k("c")),
        (t("🦀"), k("c")),
        (t("e\u{301}"), k("c")),
        (t("\u{e9}"), k("c")),
        (t(&"x".repeat(10_000)), k("c")),
        (t(&"x".repeat(10_001)), k("c")),
    ];
    for sep in [
        "/", "|", ";", ",", "#", "{", "}", "%", "_", "*", "'", "\"", "\\", ".", "-",
    ] {
        pairs.push((t(&format!("a{sep}b")), k("c")));
        pairs.push((t("a").with_principal(format!("b{sep}c")), k("d")));
        pairs.push((t("a").with_principal("b").with_operation(sep), k("c")));
    }
    assert_no_collisions(&store, &pairs, "scopes").await;
}

/// Purge never removes a live record (every backend; one with native expiry
/// may remove nothing).
pub async fn purge_keeps_live_records<F: StoreFactory>(factory: Arc<F>) {
    let store = open(&*factory).await;
    let live: Vec<(RecordKey, Versioned)> = (0..4)
        .map(|i| (key(&format!("live-{i}")), claim(i + 1, 1, T0, 60 + i)))
        .collect();
    for (k, rec) in &live {
        ok(store.insert_if_absent(k, rec, T0).await, "insert_if_absent");
    }
    for i in 0..3 {
        let rec = claim(100 + i, 1, T0, 10);
        ok(
            store
                .insert_if_absent(&key(&format!("dead-{i}")), &rec, T0)
                .await,
            "insert_if_absent",
        );
    }
    let now = at(secs(30));
    let removed = ok(store.purge_expired(now, 1000).await, "purge_expired");
    assert!(
        removed <= 3,
        "purge removed {removed} records but only 3 were expired"
    );
    for (k, rec) in &live {
        assert_eq!(
            ok(store.get(k, now).await, "get"),
            Some(rec.clone()),
            "purge must not touch a live record"
        );
    }
}

/// Purge removes exactly the records expired at `now` (`expires_at <= now`),
/// physically: afterwards even a `get` at an earlier `now` finds nothing,
/// while every live record is untouched.
pub async fn purge_removes_only_expired<F: StoreFactory>(factory: Arc<F>) {
    let store = open(&*factory).await;
    let ttls = [10, 20, 30, 30, 31, 40, 50];
    let recs: Vec<(RecordKey, Versioned)> = ttls
        .iter()
        .enumerate()
        .map(|(i, ttl)| (key(&format!("purge-{i}")), claim(i as u64 + 1, 1, T0, *ttl)))
        .collect();
    for (k, rec) in &recs {
        ok(store.insert_if_absent(k, rec, T0).await, "insert_if_absent");
    }
    let now = at(secs(30));
    assert_eq!(
        ok(store.purge_expired(now, 1000).await, "purge_expired"),
        4,
        "4 records expire at or before now (TTL 10, 20, 30, 30 s of {ttls:?} at T0 + 30 s)"
    );
    assert_eq!(
        ok(store.purge_expired(now, 1000).await, "purge_expired"),
        0,
        "nothing is left to purge"
    );
    for ((k, rec), ttl) in recs.iter().zip(ttls) {
        let want = (ttl > 30).then(|| rec.clone());
        assert_eq!(
            ok(store.get(k, T0).await, "get"),
            want,
            "after purge at T0 + 30 s, the record with TTL {ttl} s must be {}",
            if ttl > 30 { "kept" } else { "physically gone" }
        );
    }
}

/// Purge removes at most `limit` records per call; calling it until it
/// returns less than `limit` removes every expired record.
pub async fn purge_respects_its_limit<F: StoreFactory>(factory: Arc<F>) {
    let store = open(&*factory).await;
    for i in 0..5 {
        ok(
            store
                .insert_if_absent(&key(&format!("old-{i}")), &claim(i + 1, 1, T0, 10), T0)
                .await,
            "insert_if_absent",
        );
    }
    let live = claim(99, 1, T0, 60);
    ok(
        store.insert_if_absent(&key("young"), &live, T0).await,
        "insert_if_absent",
    );
    let now = at(secs(10));
    let mut rounds = Vec::new();
    loop {
        let n = ok(store.purge_expired(now, 2).await, "purge_expired");
        rounds.push(n);
        if n < 2 || rounds.len() > 10 {
            break;
        }
    }
    assert_eq!(
        rounds,
        vec![2, 2, 1],
        "5 expired records purged 2 at a time must take rounds of 2, 2, 1"
    );
    assert_eq!(ok(store.get(&key("young"), now).await, "get"), Some(live));
}

/// A record larger than the declared limit is refused with
/// [`StoreError::Rejected`], and nothing is written or replaced.
pub async fn oversized_record_is_rejected<F: StoreFactory>(factory: Arc<F>) {
    let store = open(&*factory).await;
    let limit = store
        .capabilities()
        .max_record_bytes
        .expect("the case runs only for backends with a limit");
    let k = key("oversized");
    let huge = completed(1, 1, T0, 60, &noise(limit + 1, 9));
    match store.insert_if_absent(&k, &huge, T0).await {
        Err(StoreError::Rejected { .. }) => {}
        other => panic!(
            "insert of a record over the limit of {limit} bytes must be Rejected, got {other:?}"
        ),
    }
    assert_eq!(
        ok(store.get(&k, T0).await, "get"),
        None,
        "nothing may be written"
    );
    let small = claim(2, 1, T0, 60);
    ok(
        store.insert_if_absent(&k, &small, T0).await,
        "insert_if_absent",
    );
    let mut huge = huge;
    huge.revision = Revision::from_u64(3);
    match store.compare_and_swap(&k, small.revision, &huge, T0).await {
        Err(StoreError::Rejected { .. }) => {}
        other => panic!(
            "CAS to a record over the limit of {limit} bytes must be Rejected, got {other:?}"
        ),
    }
    assert_eq!(
        ok(store.get(&k, T0).await, "get"),
        Some(small),
        "a refused CAS must change nothing"
    );
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
    let limit = store
        .capabilities()
        .max_record_bytes
        .expect("the case runs only for backends with a limit");
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
        Ok(Inserted::Inserted) => {}
        other => panic!(
            "insert of a record of exactly the declared limit ({limit} bytes by codec::record_size) must be Inserted, got {other:?}"
        ),
    }
    let got = ok(store.get(&k, T0).await, "get").expect("the record at the limit must be stored");
    assert_eq!(
        got, at_limit,
        "the record at the limit must read back exactly"
    );
    let k_over = key("limit-insert-over");
    match store.insert_if_absent(&k_over, &over, T0).await {
        Err(StoreError::Rejected { .. }) => {}
        other => panic!(
            "insert of a record of the declared limit + 1 ({} bytes by codec::record_size) must be Rejected, got {other:?}",
            limit + 1
        ),
    }
    assert_eq!(
        ok(store.get(&k_over, T0).await, "get"),
        None,
        "a refused insert must write nothing"
    );

    // CAS: a claim grows to the limit (as a failure, to cover that state
    // too), then one byte above is refused and changes nothing.
    let k = key("limit-cas");
    let small = claim(3, 1, T0, 60);
    ok(
        store.insert_if_absent(&k, &small, T0).await,
        "insert_if_absent",
    );
    let mut failed = at_limit.clone();
    failed.revision = Revision::from_u64(4);
    failed.record.state = State::Failed {
        token: FencingToken::from_u128(1),
        kind: FailureKind::Unknown,
        outcome: fits.clone(),
    };
    assert_eq!(codec::record_size(&failed.record), limit);
    match store
        .compare_and_swap(&k, small.revision, &failed, T0)
        .await
    {
        Ok(Swapped::Swapped) => {}
        other => panic!(
            "CAS to a record of exactly the declared limit ({limit} bytes) must swap, got {other:?}"
        ),
    }
    assert_eq!(
        ok(store.get(&k, T0).await, "get"),
        Some(failed.clone()),
        "the record at the limit must read back exactly"
    );
    over.revision = Revision::from_u64(5);
    match store.compare_and_swap(&k, failed.revision, &over, T0).await {
        Err(StoreError::Rejected { .. }) => {}
        other => panic!(
            "CAS to a record of the declared limit + 1 ({} bytes) must be Rejected, got {other:?}",
            limit + 1
        ),
    }
    assert_eq!(
        ok(store.get(&k, T0).await, "get"),
        Some(failed),
        "a refused CAS must change nothing"
    );
}

/// A record that cannot be decoded is reported as [`StoreError::Corrupt`] by
/// `get` and `insert_if_absent`, is never overwritten, and the engine
/// refuses to run anything over it.
pub async fn corrupt_record_is_an_error_not_absent<F: StoreFactory>(factory: Arc<F>) {
    let store = Arc::new(open(&*factory).await);
    let k = key("corrupt");
    let rec = completed(1, 1, T0, 60, b"fine");
    ok(
        store.insert_if_absent(&k, &rec, T0).await,
        "insert_if_absent",
    );
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
    let engine = Engine::with_clock(store.clone(), ManualClock::new(T0))
        .with_policy(policy())
        .expect("valid policy");
    let begun = engine
        .begin_key(k.clone(), Fingerprint::of(b"request"))
        .await;
    assert!(
        matches!(begun, Err(Error::Store(StoreError::Corrupt { .. }))),
        "the engine must refuse a corrupt record with Error::Store(Corrupt), got {begun:?}"
    );
}
