//! The engine over `MemoryStore`: the main paths, and bad input that must be
//! refused with nothing stored or executed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use idem_conformance::{Fault, FaultKind, FaultyStore, Op};
use idem_core::machine::Fenced;
use idem_core::store::codec::CodecError;
use idem_core::store::{Store, StoreError, SwapOutcome};
use idem_core::{
    Begin, Clock, Engine, Error, Executed, Fingerprint, IdempotencyKey, InFlightPolicy,
    ManualClock, MemoryStore, OnError, Outcome, Policy, ReplayKind, Scope, Timestamp,
};

fn engine() -> (Engine<MemoryStore, ManualClock>, ManualClock) {
    let clock = ManualClock::new(Timestamp::from_millis(1_700_000_000_000));
    let engine = Engine::with_clock(MemoryStore::new(), clock.clone())
        .with_policy(Policy::default().with_lease(Duration::from_secs(10)))
        .expect("valid policy");
    (engine, clock)
}

fn key(s: &str) -> IdempotencyKey {
    IdempotencyKey::parse(s).unwrap()
}

#[tokio::test]
async fn fresh_then_replay_then_mismatch() {
    let (engine, _) = engine();
    let scope = Scope::tenant("t");
    let runs = AtomicUsize::new(0);
    let work = || async {
        runs.fetch_add(1, Ordering::SeqCst);
        vec![1u8, 2, 3]
    };
    let fp = Fingerprint::of(b"a");
    assert_eq!(
        engine.execute(&scope, &key("k"), fp, work).await.unwrap(),
        Executed::Fresh(vec![1, 2, 3])
    );
    assert_eq!(
        engine.execute(&scope, &key("k"), fp, work).await.unwrap(),
        Executed::Replayed(vec![1, 2, 3])
    );
    let mismatch = engine
        .execute(&scope, &key("k"), Fingerprint::of(b"b"), work)
        .await;
    assert!(matches!(mismatch, Err(Error::FingerprintMismatch)));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn zombie_holder_is_fenced_after_takeover() {
    let (engine, clock) = engine();
    let scope = Scope::tenant("t");
    let fp = Fingerprint::of(b"a");
    let Begin::Proceed(zombie) = engine.begin(&scope, &key("k"), fp).await.unwrap() else {
        panic!("first begin must proceed")
    };
    assert!(matches!(
        engine.begin(&scope, &key("k"), fp).await.unwrap(),
        Begin::InProgress { retry_after } if retry_after == Duration::from_secs(10)
    ));
    clock.advance(Duration::from_secs(10));
    let Begin::Proceed(fresh) = engine.begin(&scope, &key("k"), fp).await.unwrap() else {
        panic!("a lapsed lease must be taken over")
    };
    assert_ne!(zombie.token(), fresh.token());
    assert_eq!(fresh.attempt(), 2);
    let refused = engine.complete(&zombie, Outcome::new(&b"zombie"[..])).await;
    assert!(matches!(refused, Err(Error::LeaseLost(Fenced::TakenOver))));
    assert!(matches!(
        engine.extend(&zombie).await,
        Err(Error::LeaseLost(Fenced::TakenOver))
    ));
    assert!(matches!(
        engine.release(&zombie).await,
        Err(Error::LeaseLost(Fenced::TakenOver))
    ));
    engine
        .complete(&fresh, Outcome::new(&b"fresh"[..]))
        .await
        .unwrap();
    let Begin::Replay(replay) = engine.begin(&scope, &key("k"), fp).await.unwrap() else {
        panic!("must replay")
    };
    assert_eq!(replay.outcome.as_bytes(), b"fresh");
    assert_eq!(replay.kind, ReplayKind::Completed);
}

#[tokio::test]
async fn complete_retried_after_a_lost_reply_succeeds_once() {
    let (engine, _) = engine();
    let fp = Fingerprint::of(b"a");
    let Begin::Proceed(lease) = engine
        .begin(&Scope::tenant("t"), &key("k"), fp)
        .await
        .unwrap()
    else {
        panic!()
    };
    let copy = lease.clone();
    engine
        .complete(&lease, Outcome::new(&b"x"[..]))
        .await
        .unwrap();
    // The same holder completing again with the same outcome (a retry after
    // an ambiguous failure) is accepted; another outcome is not.
    engine
        .complete(&copy, Outcome::new(&b"x"[..]))
        .await
        .unwrap();
    assert!(matches!(
        engine.complete(&copy, Outcome::new(&b"y"[..])).await,
        Err(Error::LeaseLost(Fenced::Finished {
            by_holder: true,
            ..
        }))
    ));
}

#[tokio::test]
async fn release_lets_a_retry_run_and_errors_follow_on_error() {
    let (engine, _) = engine();
    let scope = Scope::tenant("t");
    let fp = Fingerprint::of(b"a");
    let runs = AtomicUsize::new(0);
    for (on_error, expect_runs, replayed) in [
        (OnError::Release, 1, false),
        (OnError::StoreRetryable, 2, false),
        (OnError::StorePermanent, 3, false),
        (OnError::StorePermanent, 3, true),
    ] {
        let got = engine
            .try_execute(
                &scope,
                &key("k"),
                fp,
                || async {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Err::<u8, String>("declined".into())
                },
                |_| on_error,
            )
            .await
            .unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), expect_runs);
        assert_eq!(got.is_replayed(), replayed);
        assert_eq!(got.into_inner(), Err("declined".to_string()));
    }
}

#[tokio::test]
async fn wait_mode_returns_the_originals_outcome() {
    let clock = ManualClock::new(Timestamp::from_millis(1_700_000_000_000));
    let engine = Arc::new(
        Engine::with_clock(MemoryStore::new(), clock.clone())
            .with_policy(Policy::default().with_in_flight(InFlightPolicy::Wait {
                max: Duration::from_secs(5),
                poll: Duration::from_millis(100),
            }))
            .expect("valid policy"),
    );
    let scope = Scope::tenant("t");
    let fp = Fingerprint::of(b"a");
    let Begin::Proceed(lease) = engine.begin(&scope, &key("k"), fp).await.unwrap() else {
        panic!()
    };
    let waiter = {
        let engine = engine.clone();
        let scope = scope.clone();
        tokio::spawn(async move { engine.begin(&scope, &key("k"), fp).await })
    };
    // Wait until the waiter is parked on the clock, then finish the original
    // and move time.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while clock.pending_sleepers() == 0 && std::time::Instant::now() < deadline {
        tokio::task::yield_now().await;
    }
    assert_eq!(clock.pending_sleepers(), 1, "the duplicate must be waiting");
    engine
        .complete(&lease, Outcome::new(&b"original"[..]))
        .await
        .unwrap();
    let mut result = None;
    while result.is_none() && std::time::Instant::now() < deadline {
        clock.advance(Duration::from_millis(100));
        tokio::task::yield_now().await;
        if waiter.is_finished() {
            result = Some(waiter.await.unwrap().unwrap());
            break;
        }
    }
    let Some(Begin::Replay(replay)) = result else {
        panic!("the waiter must get the original's outcome: {result:?}")
    };
    assert_eq!(replay.outcome.as_bytes(), b"original");
}

/// A store whose every record reads back as corrupt (every call but the
/// purge fails with `StoreError::Corrupt`).
fn corrupt_store() -> FaultyStore<MemoryStore> {
    let store = FaultyStore::new(MemoryStore::new()).with_name("corrupt-test");
    for op in [
        Op::InsertIfAbsent,
        Op::Get,
        Op::CompareAndSwap,
        Op::DeleteIf,
    ] {
        store.inject(Fault::new(op, FaultKind::Corrupt));
    }
    store
}

#[tokio::test]
async fn corrupt_record_is_a_permanent_error_and_nothing_runs() {
    let clock = ManualClock::new(Timestamp::from_millis(1));
    let engine = Engine::with_clock(corrupt_store(), clock);
    let runs = AtomicUsize::new(0);
    let got = engine
        .execute(
            &Scope::tenant("t"),
            &key("k"),
            Fingerprint::of(b"a"),
            || async {
                runs.fetch_add(1, Ordering::SeqCst);
            },
        )
        .await;
    let err = got.unwrap_err();
    assert!(
        matches!(err, Error::Store(StoreError::Corrupt { .. })),
        "{err:?}"
    );
    assert!(!err.is_transient());
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    assert!(engine.store().inner().is_empty());
}

#[tokio::test]
async fn unknown_codec_version_in_a_stored_outcome_is_an_error_not_a_replay() {
    let (engine, clock) = engine();
    let scope = Scope::tenant("t");
    let fp = Fingerprint::of(b"a");
    let Begin::Proceed(lease) = engine.begin(&scope, &key("k"), fp).await.unwrap() else {
        panic!()
    };
    // A value written by a future version: tag 9.
    engine
        .complete(&lease, Outcome::new(vec![9u8, 1, 2]))
        .await
        .unwrap();
    let runs = AtomicUsize::new(0);
    let got = engine
        .execute(&scope, &key("k"), fp, || async {
            runs.fetch_add(1, Ordering::SeqCst);
            5u8
        })
        .await;
    assert!(
        matches!(got, Err(Error::Codec(CodecError::UnknownFormat(9)))),
        "{got:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    let _ = clock.now();
}

#[tokio::test]
async fn oversized_outcome_is_refused_and_the_claim_kept() {
    let clock = ManualClock::new(Timestamp::from_millis(1));
    let engine = Engine::with_clock(MemoryStore::new(), clock)
        .with_policy(Policy::default().with_max_outcome_bytes(16))
        .expect("valid policy");
    let Begin::Proceed(lease) = engine
        .begin(&Scope::tenant("t"), &key("k"), Fingerprint::of(b"a"))
        .await
        .unwrap()
    else {
        panic!()
    };
    let err = engine
        .complete(&lease, Outcome::new(vec![0u8; 17]))
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        Error::OutcomeTooLarge {
            size: 17,
            limit: 16
        }
    ));
    assert!(!lease.is_finished());
    engine.release(&lease).await.unwrap();
    assert!(engine.store().is_empty());
}

#[tokio::test]
async fn mark_applied_finishes_the_lease_and_refuses_foreign_transitions() {
    let (engine, clock) = engine();
    let scope = Scope::tenant("t");
    let fp = Fingerprint::of(b"a");
    let Begin::Proceed(lease) = engine.begin(&scope, &key("tx"), fp).await.unwrap() else {
        panic!("first begin must proceed")
    };
    let Begin::Proceed(other) = engine.begin(&scope, &key("other"), fp).await.unwrap() else {
        panic!("first begin must proceed")
    };
    let done = engine
        .prepare_complete(&lease, Outcome::new(&b"paid"[..]))
        .unwrap();
    // What a SQL store's `apply_in` does inside the caller's transaction.
    let applied = engine
        .store()
        .compare_and_swap(&done.key, &lease.record(), &done.next, clock.now())
        .await
        .unwrap();
    assert!(matches!(applied, SwapOutcome::Swapped));

    // A transition of another lease is refused and changes nothing.
    assert!(matches!(
        other.mark_applied(&done),
        Err(Error::LeaseLost(Fenced::TakenOver))
    ));
    assert!(!other.is_finished());

    assert!(!lease.is_finished());
    lease.mark_applied(&done).unwrap();
    assert!(lease.is_finished());
    assert_eq!(lease.record().revision, done.next.revision);

    // The heartbeat ends quietly instead of reporting the lease lost.
    let beat = engine.keep_alive(&lease);
    let drive = async {
        while clock.pending_sleepers() == 0 {
            tokio::task::yield_now().await;
        }
        clock.advance(Duration::from_secs(10));
    };
    let (beat, ()) = tokio::join!(beat, drive);
    assert!(beat.is_ok());
    let Begin::Replay(replay) = engine.begin(&scope, &key("tx"), fp).await.unwrap() else {
        panic!("must replay")
    };
    assert_eq!(replay.outcome.as_bytes(), b"paid");
}
