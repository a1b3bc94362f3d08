//! Multi-step operations over `MemoryStore` with a manual clock: recovery
//! points, phases resumed after a crash, ambiguous endings of a phased key,
//! and the completer. The same promises run on every backend in the
//! conformance suite; here each is driven step by step.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use idem_core::machine::Fenced;
use idem_core::store::{State, Store};
use idem_core::{
    Begin, Completer, Ending, Engine, Error, FailureKind, Fingerprint, IdempotencyKey, Lease,
    ManualClock, MemoryStore, Outcome, PhaseError, Policy, RecordKey, ReplayKind, Scope, Timestamp,
    downstream_key,
};

const LEASE: Duration = Duration::from_secs(10);

fn engine() -> (Engine<MemoryStore, ManualClock>, ManualClock) {
    let clock = ManualClock::new(Timestamp::from_millis(1_700_000_000_000));
    let engine = Engine::with_clock(MemoryStore::new(), clock.clone())
        .with_policy(Policy::default().with_lease(LEASE))
        .expect("valid policy");
    (engine, clock)
}

fn scope() -> Scope {
    Scope::tenant("t").with_operation("orders.create")
}

fn key(s: &str) -> IdempotencyKey {
    IdempotencyKey::parse(s).unwrap()
}

async fn claim(engine: &Engine<MemoryStore, ManualClock>, k: &str) -> Lease {
    match engine
        .begin(&scope(), &key(k), Fingerprint::of(b"order"))
        .await
        .unwrap()
    {
        Begin::Proceed(lease) => lease,
        other => panic!("expected a claim, got {other:?}"),
    }
}

#[tokio::test]
async fn checkpoints_move_forward_and_the_next_holder_receives_them() {
    let (engine, clock) = engine();
    let first = claim(&engine, "k").await;
    assert_eq!(first.checkpoint(), None);
    let one = engine
        .checkpoint(&first, "reserve", &b"r"[..])
        .await
        .unwrap();
    let two = engine
        .checkpoint(&first, "charge", &b"c"[..])
        .await
        .unwrap();
    assert_eq!((one.seq, two.seq), (1, 2));
    assert_eq!(first.checkpoint().unwrap().step, "charge");

    // The holder dies; its lease lapses; a retry takes over and resumes.
    clock.advance(LEASE);
    let second = claim(&engine, "k").await;
    assert_eq!(second.attempt(), 2);
    let resumed = second.checkpoint().unwrap();
    assert_eq!(
        (resumed.seq, resumed.step.as_str(), &resumed.state[..]),
        (2, "charge", &b"c"[..])
    );

    // The old holder is fenced: its checkpoint changes nothing.
    let stale = engine.checkpoint(&first, "receipt", &b"x"[..]).await;
    assert!(
        matches!(stale, Err(Error::LeaseLost(Fenced::TakenOver))),
        "{stale:?}"
    );
    let stored = engine
        .store()
        .get(second.key(), clock_now(&engine))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.record.checkpoint.unwrap().seq, 2);

    // The new holder goes on from 3.
    let three = engine
        .checkpoint(&second, "receipt", &b"x"[..])
        .await
        .unwrap();
    assert_eq!(three.seq, 3);
    engine
        .complete(&second, Outcome::new(&b"done"[..]))
        .await
        .unwrap();
    let done = engine
        .store()
        .get(second.key(), clock_now(&engine))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        done.record.checkpoint, None,
        "a finished key keeps only its outcome"
    );
}

fn clock_now(engine: &Engine<MemoryStore, ManualClock>) -> Timestamp {
    use idem_core::Clock;
    engine.clock().now()
}

#[tokio::test]
async fn phases_run_once_across_a_crash_with_the_same_downstream_key() {
    let (engine, clock) = engine();
    let reserve = AtomicUsize::new(0);
    let charge = AtomicUsize::new(0);
    let keys = std::sync::Mutex::new(Vec::new());

    // Attempt 1: reserve and charge run, then the process "dies" before
    // the receipt (the lease is dropped without an ending).
    let lease = claim(&engine, "order-1").await;
    let mut phases = engine.phases(&lease).unwrap();
    assert_eq!(phases.resumed_from(), None);
    let r: u32 = phases
        .external("reserve", |_| async {
            reserve.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>(7)
        })
        .await
        .unwrap();
    let c: String = phases
        .external("charge", |k| async {
            charge.fetch_add(1, Ordering::SeqCst);
            keys.lock().unwrap().push(k);
            Ok::<_, std::io::Error>("ch_1".to_string())
        })
        .await
        .unwrap();
    assert_eq!((r, c.as_str()), (7, "ch_1"));
    drop(phases);
    drop(lease);

    // While the lease is live, a retry waits (409 over HTTP).
    assert!(matches!(
        engine
            .begin(&scope(), &key("order-1"), Fingerprint::of(b"order"))
            .await
            .unwrap(),
        Begin::InProgress { .. }
    ));

    // Attempt 2 after the lease lapsed: both phases are recorded.
    clock.advance(LEASE);
    let lease = claim(&engine, "order-1").await;
    let mut phases = engine.phases(&lease).unwrap();
    assert_eq!(phases.resumed_from(), Some("charge"));
    let r: u32 = phases
        .external("reserve", |_| async {
            reserve.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>(99)
        })
        .await
        .unwrap();
    let c: String = phases
        .external("charge", |k| async {
            charge.fetch_add(1, Ordering::SeqCst);
            keys.lock().unwrap().push(k);
            Ok::<_, std::io::Error>("ch_2".to_string())
        })
        .await
        .unwrap();
    assert_eq!(
        (r, c.as_str()),
        (7, "ch_1"),
        "recorded results, not new ones"
    );
    assert_eq!(reserve.load(Ordering::SeqCst), 1);
    assert_eq!(charge.load(Ordering::SeqCst), 1);
    engine
        .complete(&lease, Outcome::new(&b"ok"[..]))
        .await
        .unwrap();

    let created_at = lease.record().record.created_at;
    let expected = downstream_key(
        &RecordKey::new(&scope(), &key("order-1")),
        created_at,
        "charge",
    );
    assert_eq!(*keys.lock().unwrap(), vec![expected.clone()]);
    assert_eq!(phases.downstream_key("charge"), expected);
    assert_ne!(phases.downstream_key("reserve"), expected);
    assert!(expected.starts_with("idem-") && expected.len() == 37);
    // The same key used again after its record expired is a new operation:
    // its downstream keys differ, so no provider replays the old answer.
    clock.advance(Policy::default().ttl);
    let reused = claim(&engine, "order-1").await;
    assert_eq!(reused.attempt(), 1);
    assert_ne!(
        engine.phases(&reused).unwrap().downstream_key("charge"),
        expected
    );
}

#[tokio::test]
async fn a_started_phase_is_never_released_nor_finished_unknown() {
    // The external call ran, its checkpoint could not be written (the
    // process lost the store), and the handler said "no effect": the
    // record must stay, so the retry sends the same downstream key.
    let (engine, _) = engine();
    let lease = claim(&engine, "k").await;
    let mut phases = engine.phases(&lease).unwrap();
    let key_first = phases.downstream_key("charge");
    let failed: Result<u8, _> = phases
        .external("charge", |_| async {
            Err::<u8, _>(std::io::Error::other("timeout after sending"))
        })
        .await;
    assert!(failed.is_err());
    assert!(lease.has_progress());
    for ending in [Ending::Release, Ending::Unknown] {
        let written = engine.settle(&lease, ending).await.unwrap();
        assert_eq!(
            written,
            Ending::Fail(FailureKind::Retryable, Outcome::default())
        );
    }
    let retry = claim(&engine, "k").await;
    assert_eq!(retry.attempt(), 2);
    assert_eq!(
        engine.phases(&retry).unwrap().downstream_key("charge"),
        key_first
    );
}

#[tokio::test]
async fn a_failed_phase_records_nothing_and_runs_again_with_the_same_key() {
    let (engine, clock) = engine();
    let calls = std::sync::Mutex::new(Vec::new());
    let lease = claim(&engine, "k").await;
    let mut phases = engine.phases(&lease).unwrap();
    let failed: Result<String, _> = phases
        .external("charge", |k| async {
            calls.lock().unwrap().push(k);
            Err::<String, _>(std::io::Error::other("card network timed out"))
        })
        .await;
    assert!(matches!(failed, Err(PhaseError::Failed { ref phase, .. }) if phase == "charge"));
    assert!(!phases.is_recorded("charge"));
    // The handler answers 5xx: the layer would end the key unknown; with no
    // checkpoint yet that is final (nothing recorded, nothing to resume).
    drop(phases);
    clock.advance(LEASE);
    let lease = claim(&engine, "k").await;
    let mut phases = engine.phases(&lease).unwrap();
    let ok: String = phases
        .external("charge", |k| async {
            calls.lock().unwrap().push(k);
            Ok::<_, std::io::Error>("ch".to_string())
        })
        .await
        .unwrap();
    assert_eq!(ok, "ch");
    let calls = calls.lock().unwrap();
    assert_eq!(calls.len(), 2);
    assert_eq!(
        calls[0], calls[1],
        "every attempt sends the same downstream key"
    );
}

#[tokio::test]
async fn ambiguous_endings_of_a_phased_key_are_resumable_not_final() {
    for ending in [Ending::Unknown, Ending::Release] {
        let (engine, _) = engine();
        let lease = claim(&engine, "k").await;
        let mut phases = engine.phases(&lease).unwrap();
        let _: u8 = phases
            .external("reserve", |_| async { Ok::<_, std::io::Error>(1) })
            .await
            .unwrap();
        engine.settle(&lease, ending.clone()).await.unwrap();
        let stored = engine
            .store()
            .get(lease.key(), clock_now(&engine))
            .await
            .unwrap()
            .unwrap();
        assert!(
            matches!(
                stored.record.state,
                State::Failed {
                    kind: FailureKind::Retryable,
                    ..
                }
            ),
            "{ending:?} -> {:?}",
            stored.record.state
        );
        // The retry resumes at once (no lease to wait for).
        let retry = claim(&engine, "k").await;
        let phases = engine.phases(&retry).unwrap();
        assert_eq!(phases.resumed_from(), Some("reserve"));
        assert_eq!(phases.result::<u8>("reserve").unwrap(), Some(1));
    }
}

#[tokio::test]
async fn local_phases_apply_as_transitions_and_keep_the_lease_open() {
    let (engine, clock) = engine();
    let lease = claim(&engine, "k").await;
    let mut phases = engine.phases(&lease).unwrap();
    let transition = phases.prepare_local("reserve", &5u32).unwrap();
    assert!(matches!(
        transition.next.record.state,
        State::InFlight { .. }
    ));
    // What a SQL store's apply_in does, in the caller's transaction:
    let store = engine.store();
    let current = lease.record();
    assert_eq!(
        store
            .compare_and_swap(lease.key(), &current, &transition.next, clock.now_ts())
            .await
            .unwrap(),
        idem_core::store::SwapOutcome::Swapped
    );
    phases.applied(&transition).unwrap();
    assert!(!lease.is_finished());
    assert_eq!(phases.result::<u32>("reserve").unwrap(), Some(5));
    // Later writes start from the checkpointed record.
    let _: u8 = phases
        .external("charge", |_| async { Ok::<_, std::io::Error>(2) })
        .await
        .unwrap();
    engine
        .complete(&lease, Outcome::new(&b"ok"[..]))
        .await
        .unwrap();
}

trait NowTs {
    fn now_ts(&self) -> Timestamp;
}
impl NowTs for ManualClock {
    fn now_ts(&self) -> Timestamp {
        use idem_core::Clock;
        self.now()
    }
}

#[tokio::test]
async fn the_completer_finishes_an_abandoned_key_without_a_client_retry() {
    let (engine, clock) = engine();
    let charges = Arc::new(AtomicUsize::new(0));
    // Attempt 1 reserves, then dies.
    let lease = claim(&engine, "abandoned").await;
    let mut phases = engine.phases(&lease).unwrap();
    let _: u32 = phases
        .external("reserve", |_| async { Ok::<_, std::io::Error>(3) })
        .await
        .unwrap();
    drop(phases);
    drop(lease);
    // A key without a checkpoint is not the completer's.
    let plain = claim(&engine, "plain").await;
    drop(plain);

    let counted = Arc::clone(&charges);
    let completer =
        Completer::new(engine.clone()).operation(Some("orders.create"), move |mut phases| {
            let counted = Arc::clone(&counted);
            async move {
                let qty: u32 = phases.result("reserve").unwrap().unwrap();
                let charged: Result<String, PhaseError<std::io::Error>> = phases
                    .external("charge", |k| async move {
                        counted.fetch_add(1, Ordering::SeqCst);
                        Ok(format!("{k}:{qty}"))
                    })
                    .await;
                match charged {
                    Ok(c) => Ending::Complete(Outcome::new(c.into_bytes())),
                    Err(_) => Ending::Unknown,
                }
            }
        });
    // Nothing is abandoned while the lease is live.
    assert_eq!(completer.run_once().await.unwrap().found, 0);
    clock.advance(LEASE);
    let pass = completer.run_once().await.unwrap();
    assert_eq!(
        (pass.found, pass.resumed, pass.ended, pass.errors),
        (1, 1, 1, 0),
        "{pass:?}"
    );
    assert_eq!(charges.load(Ordering::SeqCst), 1);
    // The client's late retry replays the completer's answer.
    match engine
        .begin(&scope(), &key("abandoned"), Fingerprint::of(b"order"))
        .await
        .unwrap()
    {
        Begin::Replay(replay) => {
            assert_eq!(replay.kind, ReplayKind::Completed);
            assert!(replay.outcome.as_bytes().ends_with(b":3"));
        }
        other => panic!("expected a replay, got {other:?}"),
    }
    // A second pass finds nothing more.
    assert_eq!(completer.run_once().await.unwrap().found, 0);
    assert_eq!(charges.load(Ordering::SeqCst), 1);
    assert_eq!(completer.totals().ended, 1);
}

#[tokio::test]
async fn oversized_checkpoints_are_refused_and_write_nothing() {
    let clock = ManualClock::new(Timestamp::from_millis(1_000_000));
    let engine = Engine::with_clock(MemoryStore::new(), clock)
        .with_policy(Policy::default().with_max_outcome_bytes(1024))
        .unwrap();
    let lease = claim(&engine, "k").await;
    let too_big = engine.checkpoint(&lease, "s", vec![0u8; 2048]).await;
    assert!(
        matches!(too_big, Err(Error::OutcomeTooLarge { .. })),
        "{too_big:?}"
    );
    assert_eq!(lease.record().record.checkpoint, None);
}
