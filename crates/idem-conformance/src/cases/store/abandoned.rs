//! `abandoned` (optional): exactly the live in-flight records whose lease
//! lapsed with a checkpoint, earliest lapse first, at most `limit`, only the
//! store's own, following every write; nothing written.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::sync::Arc;

use idem_core::store::{
    FencingToken, InsertOutcome, Revision, State, Store, StoreError, SwapOutcome, Versioned,
};
use idem_core::{FailureKind, Outcome, RecordKey, Timestamp};

use super::super::{T0, at, claim, completed, key, must, ok, open, secs};
use super::checkpoint::checkpointed;
use crate::StoreFactory;

/// An in-flight claim written at `T0` whose lease lapses at `T0 + lapse_ms`
/// and whose record expires at `T0 + ttl_secs`, with a checkpoint when
/// `seq` is not 0.
fn in_flight(rev: u64, k: &RecordKey, lapse_ms: u64, ttl_secs: u64, seq: u32) -> Versioned {
    let mut v = claim(rev, rev.into(), T0, ttl_secs);
    v.record.state = State::InFlight {
        token: FencingToken::from_u128(rev.into()),
        lease_deadline: at(lapse_ms),
    };
    if seq > 0 {
        v = checkpointed(
            v,
            k,
            seq,
            &format!("step-{seq}"),
            rev.to_be_bytes().to_vec(),
        );
    }
    v
}

/// Names the records in an answer, by their checkpoint's key.
fn names(found: &[Versioned]) -> Vec<String> {
    found
        .iter()
        .map(|v| match &v.record.checkpoint {
            Some(cp) => cp.key.as_str().to_string(),
            None => format!("<a record without a checkpoint, revision {:?}>", v.revision),
        })
        .collect()
}

/// `abandoned` at `now` with `limit`, failing the case on an error.
async fn abandoned<S: Store + ?Sized>(store: &S, now: Timestamp, limit: usize) -> Vec<Versioned> {
    ok(store.abandoned(now, limit).await, "abandoned")
}

/// Checks that `found` is exactly `want` (by name, in order, each record as
/// written, revision included).
fn assert_exactly(found: &[Versioned], want: &[(&str, &Versioned)], what: &str) {
    let want_names: Vec<&str> = want.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        names(found),
        want_names,
        "{what}: abandoned must return exactly the live in-flight records whose lease \
         lapsed at or before `now` and that carry a checkpoint, earliest lapse first"
    );
    for (got, (name, rec)) in found.iter().zip(want) {
        assert_eq!(
            got, *rec,
            "{what}: `{name}` must come back exactly as written (revision, checkpoint, every field)"
        );
    }
}

/// A store that declares no `abandoned` says so with `Unsupported`; one that
/// declares it finds nothing in an empty store.
pub async fn abandoned_is_supported_as_declared<F: StoreFactory>(factory: Arc<F>) {
    let store = open(&*factory).await;
    let result = store.abandoned(at(secs(30)), 100).await;
    if store.capabilities().abandoned {
        let found = ok(result, "abandoned");
        assert!(
            found.is_empty(),
            "a new store holds no abandoned records, got {:?}",
            names(&found)
        );
    } else {
        assert!(
            matches!(result, Err(StoreError::Unsupported { .. })),
            "a store declaring no `abandoned` (Capabilities::abandoned false) must return \
             StoreError::Unsupported, got {result:?}"
        );
    }
}

/// Exactly the live in-flight records whose lease lapsed (at or before
/// `now`) with a checkpoint, earliest lapse first; never a live lease, a
/// finished record (even one carrying a checkpoint), a lapsed lease without
/// a checkpoint, an expired record, or another store's record. The answer
/// follows every write (a takeover, a completion, a delete, a first
/// checkpoint, a lease moved, an expired record replaced), and writes
/// nothing.
pub async fn abandoned_finds_exactly_lapsed_leases_with_a_checkpoint<F: StoreFactory>(
    factory: Arc<F>,
) {
    let store = open(&*factory).await;
    let s = must(&*store);
    let now = at(secs(30));
    let k = key;
    // Written at T0, looked for at T0 + 30 s; every lapse is distinct.
    // Inserted out of lapse order.
    let lapsed_b = in_flight(1, &k("lapsed-b"), secs(20), 60, 2);
    let lapsed_a = in_flight(2, &k("lapsed-a"), secs(5), 60, 1);
    let lapsed_at_now = in_flight(3, &k("lapsed-at-now"), secs(30), 60, 4);
    let live = in_flight(4, &k("live-lease"), secs(30) + 1, 60, 1);
    let no_checkpoint = in_flight(5, &k("no-checkpoint"), secs(3), 60, 0);
    let completed_cp = checkpointed(
        completed(6, 6, T0, 60, b"done"),
        &k("completed"),
        3,
        "done",
        b"x".to_vec(),
    );
    let mut retryable = in_flight(7, &k("retryable"), secs(2), 60, 2);
    retryable.record.state = State::Failed {
        token: FencingToken::from_u128(7),
        kind: FailureKind::Retryable,
        outcome: Outcome::default(),
    };
    let mut unknown = in_flight(8, &k("unknown"), secs(2), 60, 2);
    unknown.record.state = State::Failed {
        token: FencingToken::from_u128(8),
        kind: FailureKind::Unknown,
        outcome: Outcome::default(),
    };
    let expired = in_flight(9, &k("expired"), secs(2), 20, 1);
    // These change before the search.
    let taken_over = in_flight(10, &k("taken-over"), secs(8), 60, 1);
    let finished = in_flight(11, &k("finished"), secs(9), 60, 1);
    let deleted = in_flight(12, &k("deleted"), secs(4), 60, 1);
    let gained = in_flight(13, &k("gained"), secs(12), 60, 0);
    let moved = in_flight(14, &k("moved"), secs(1), 60, 1);
    let replaced = in_flight(15, &k("replaced"), 1_500, 20, 3);
    let written = [
        ("lapsed-b", &lapsed_b),
        ("lapsed-a", &lapsed_a),
        ("lapsed-at-now", &lapsed_at_now),
        ("live-lease", &live),
        ("no-checkpoint", &no_checkpoint),
        ("completed", &completed_cp),
        ("retryable", &retryable),
        ("unknown", &unknown),
        ("expired", &expired),
        ("taken-over", &taken_over),
        ("finished", &finished),
        ("deleted", &deleted),
        ("gained", &gained),
        ("moved", &moved),
        ("replaced", &replaced),
    ];
    for (name, rec) in written {
        s.insert(&k(name), rec, T0).await;
    }
    // Another store's abandoned record must not be found.
    let other = open(&*factory).await;
    must(&*other)
        .insert(&k("other"), &in_flight(16, &k("other"), secs(1), 60, 1), T0)
        .await;

    // Before any change, at T0 + 10 s (only leases that lapsed by then).
    let early = abandoned(&*store, at(secs(10)), 100).await;
    assert_exactly(
        &early,
        &[
            ("moved", &moved),
            ("replaced", &replaced),
            ("expired", &expired),
            ("deleted", &deleted),
            ("lapsed-a", &lapsed_a),
            ("taken-over", &taken_over),
            ("finished", &finished),
        ],
        "at T0 + 10 s",
    );

    // A retry takes over: a live lease again (the checkpoint carried).
    let mut takeover = in_flight(20, &k("taken-over"), secs(40), 60, 1);
    takeover.record.checkpoint = taken_over.record.checkpoint.clone();
    assert_eq!(
        s.swap(&k("taken-over"), &taken_over, &takeover, at(secs(10)))
            .await,
        SwapOutcome::Swapped
    );
    // The holder completes: no longer in flight.
    let done = completed(21, 11, T0, 60, b"ok");
    assert_eq!(
        s.swap(&k("finished"), &finished, &done, at(secs(10))).await,
        SwapOutcome::Swapped
    );
    // Deleted.
    assert!(s.delete(&k("deleted"), &deleted, at(secs(10))).await);
    // A lapsed lease gains its first checkpoint.
    let mut with_cp = checkpointed(gained.clone(), &k("gained"), 1, "first", b"g".to_vec());
    with_cp.revision = Revision::from_u64(22);
    assert_eq!(
        s.swap(&k("gained"), &gained, &with_cp, at(secs(10))).await,
        SwapOutcome::Swapped
    );
    // A lease moved to a later lapse (still lapsed at the search).
    let mut later = in_flight(23, &k("moved"), secs(25), 60, 2);
    later.record.checkpoint = Some({
        let mut cp = moved.record.checkpoint.clone().expect("a checkpoint");
        cp.seq = 2;
        cp
    });
    assert_eq!(
        s.swap(&k("moved"), &moved, &later, at(secs(10))).await,
        SwapOutcome::Swapped
    );
    // An expired abandoned record replaced by a fresh claim without one.
    let fresh = in_flight(24, &k("replaced"), secs(60), 90, 0);
    assert_eq!(
        s.insert(&k("replaced"), &fresh, at(secs(25))).await,
        InsertOutcome::Inserted,
        "the expired record is replaced"
    );

    let found = abandoned(&*store, now, 100).await;
    assert_exactly(
        &found,
        &[
            ("lapsed-a", &lapsed_a),
            ("gained", &with_cp),
            ("lapsed-b", &lapsed_b),
            ("moved", &later),
            ("lapsed-at-now", &lapsed_at_now),
        ],
        "at T0 + 30 s, after the writes",
    );
    // The search wrote nothing.
    for (name, rec) in [
        ("lapsed-a", &lapsed_a),
        ("lapsed-b", &lapsed_b),
        ("live-lease", &live),
        ("completed", &completed_cp),
        ("retryable", &retryable),
    ] {
        assert_eq!(
            s.get(&k(name), now).await.as_ref(),
            Some(rec),
            "abandoned must not change a record (`{name}`)"
        );
    }
    assert_eq!(
        abandoned(&*store, now, 100).await,
        found,
        "a second search finds the same"
    );
    // The other store finds only its own.
    assert_eq!(names(&abandoned(&*other, now, 100).await), ["other"]);
}

/// `limit` caps the answer to the records whose lease lapsed first, after
/// leaving out what does not qualify (a store that cuts first and filters
/// after returns fewer); 0 finds nothing.
pub async fn abandoned_respects_its_limit<F: StoreFactory>(factory: Arc<F>) {
    let store = open(&*factory).await;
    let s = must(&*store);
    let now = at(secs(30));
    // Ten abandoned records, lapsed at 1 s .. 10 s, inserted in a scrambled order.
    let order = [7u64, 2, 9, 4, 1, 10, 5, 3, 8, 6];
    let mut recs: Vec<(String, Versioned)> = Vec::new();
    for i in order {
        let name = format!("abandoned-{i:02}");
        let rec = in_flight(i, &key(&name), secs(i), 60, 1);
        s.insert(&key(&name), &rec, T0).await;
        recs.push((name, rec));
    }
    recs.sort_by_key(|(name, _)| name.clone());
    // Records that lapsed earlier but do not qualify.
    for i in 0..4u64 {
        let name = format!("no-checkpoint-{i}");
        s.insert(&key(&name), &in_flight(100 + i, &key(&name), i, 60, 0), T0)
            .await;
        let name = format!("expired-{i}");
        s.insert(&key(&name), &in_flight(200 + i, &key(&name), i, 20, 1), T0)
            .await;
    }
    let want = |n: usize| -> Vec<(&str, &Versioned)> {
        recs.iter()
            .take(n)
            .map(|(name, rec)| (name.as_str(), rec))
            .collect()
    };
    for limit in [1, 3, 9, 10, 11, 1_000] {
        let found = abandoned(&*store, now, limit).await;
        assert_exactly(&found, &want(limit.min(10)), &format!("with limit {limit}"));
    }
    let none = abandoned(&*store, now, 0).await;
    assert!(
        none.is_empty(),
        "a limit of 0 finds nothing, got {:?}",
        names(&none)
    );
}
