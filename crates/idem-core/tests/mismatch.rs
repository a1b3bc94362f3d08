//! `Begin::Mismatch` says what the key is bound to: when it was first
//! claimed, and how it finished once final; from the store and from the
//! cache of finished records alike. On a `ManualClock`, over a `MemoryStore`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use idem_core::{
    Begin, Clock, Engine, FailureKind, Fingerprint, IdempotencyKey, Lease, ManualClock,
    MemoryStore, Mismatch, Outcome, Policy, Replay, ReplayKind, Scope, Timestamp,
};

const T0: Timestamp = Timestamp::from_millis(1_700_000_000_000);
const LEASE: Duration = Duration::from_secs(10);

fn policy() -> Policy {
    Policy::default()
        .with_lease(LEASE)
        .with_ttl(Duration::from_secs(60))
}

fn engine(store: &MemoryStore, clock: &ManualClock) -> Engine<MemoryStore, ManualClock> {
    Engine::with_clock(store.clone(), clock.clone())
        .with_policy(policy())
        .unwrap()
}

fn scope() -> Scope {
    Scope::tenant("acme")
}

fn key(name: &str) -> IdempotencyKey {
    IdempotencyKey::parse(name).unwrap()
}

async fn proceed(engine: &Engine<MemoryStore, ManualClock>, name: &str, fp: &[u8]) -> Lease {
    match engine
        .begin(&scope(), &key(name), Fingerprint::of(fp))
        .await
    {
        Ok(Begin::Proceed(lease)) => lease,
        other => panic!("`{name}` must proceed, got {other:?}"),
    }
}

async fn mismatch(engine: &Engine<MemoryStore, ManualClock>, name: &str, fp: &[u8]) -> Mismatch {
    match engine
        .begin(&scope(), &key(name), Fingerprint::of(fp))
        .await
    {
        Ok(Begin::Mismatch(bound)) => bound,
        other => panic!("another request on `{name}` must get Mismatch, got {other:?}"),
    }
}

fn replay(kind: ReplayKind, bytes: &'static [u8]) -> Replay {
    Replay {
        outcome: Outcome::new(bytes),
        kind,
    }
}

/// In flight: the first claim's time and nothing finished; a takeover keeps
/// the first use; once completed, the stored outcome too.
#[tokio::test]
async fn reports_the_first_use_in_flight_and_once_completed() {
    let clock = ManualClock::new(T0);
    let engine = engine(&MemoryStore::new(), &clock);
    clock.advance(Duration::from_secs(1));
    let t1 = clock.now();
    let first = proceed(&engine, "k", b"a").await;

    clock.advance(Duration::from_secs(2));
    let bound = mismatch(&engine, "k", b"b").await;
    assert_eq!((bound.first_used_at, bound.finished), (t1, None));

    // The lease lapses; the same request takes it over: still the first use.
    clock.advance(LEASE);
    let holder = proceed(&engine, "k", b"a").await;
    assert_ne!(holder.token(), first.token());
    let bound = mismatch(&engine, "k", b"b").await;
    assert_eq!((bound.first_used_at, bound.finished), (t1, None));

    engine
        .complete(&holder, Outcome::new(&b"done"[..]))
        .await
        .unwrap();
    clock.advance(Duration::from_secs(1));
    let bound = mismatch(&engine, "k", b"b").await;
    assert_eq!(
        (bound.first_used_at, bound.finished),
        (t1, Some(replay(ReplayKind::Completed, b"done")))
    );
}

/// Every way a key ends, through the store and through the cache of
/// finished records: the same report, and the cache answers the final ones.
#[tokio::test]
async fn the_cache_reports_what_the_store_reports() {
    let clock = ManualClock::new(T0);
    let store = MemoryStore::new();
    let cached = engine(&store, &clock).with_finished_cache(1 << 20);
    let plain = engine(&store, &clock);
    let cases = [
        (
            "completed",
            None,
            &b"201"[..],
            Some(replay(ReplayKind::Completed, b"201")),
        ),
        (
            "permanent",
            Some(FailureKind::Permanent),
            &b"400"[..],
            Some(replay(ReplayKind::Failed, b"400")),
        ),
        (
            "unknown",
            Some(FailureKind::Unknown),
            &b""[..],
            Some(replay(ReplayKind::Unknown, b"")),
        ),
        // Not finished: the same request may run again.
        ("retryable", Some(FailureKind::Retryable), &b"503"[..], None),
    ];
    for (i, (name, failure, bytes, finished)) in cases.into_iter().enumerate() {
        clock.advance(Duration::from_secs(1));
        let first_use = clock.now();
        let lease = proceed(&cached, name, b"a").await;
        clock.advance(Duration::from_secs(1));
        // In flight: never in the cache, both read the store.
        for engine in [&cached, &plain] {
            let bound = mismatch(engine, name, b"b").await;
            assert_eq!((bound.first_used_at, bound.finished), (first_use, None));
        }
        match failure {
            None => cached.complete(&lease, Outcome::new(bytes)).await,
            Some(kind) => cached.fail(&lease, kind, Outcome::new(bytes)).await,
        }
        .unwrap();
        clock.advance(Duration::from_secs(1));
        let hits = cached.finished_cache().unwrap().hits;
        let from_cache = mismatch(&cached, name, b"b").await;
        let from_store = mismatch(&plain, name, b"b").await;
        assert_eq!(from_cache, from_store, "`{name}`");
        assert_eq!(
            (from_store.first_used_at, from_store.finished),
            (first_use, finished.clone()),
            "`{name}`"
        );
        let answered = cached.finished_cache().unwrap().hits - hits;
        assert_eq!(
            answered,
            u64::from(finished.is_some()),
            "`{name}` (case {i}): the cache answers exactly the final keys"
        );
    }
}
