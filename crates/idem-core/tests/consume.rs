//! `Engine::consume`: at most one handler run per message key, and the right
//! instruction for every delivery (acknowledge, redeliver later, dead-letter),
//! counted by the handler's effects.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use idem_conformance::{Fault, FaultKind, FaultyStore, Op};
use idem_core::store::{Census, Store};
use idem_core::{
    DeadLetterReason, Delivery, Engine, Fingerprint, Handled, MIN_RETRY, ManualClock, MemoryStore,
    Outcome, Policy, RetryReason, Scope, Timestamp,
};

const T0: Timestamp = Timestamp::from_millis(1_700_000_000_000);
const LEASE: Duration = Duration::from_secs(10);

type Faulty = FaultyStore<MemoryStore>;

fn engine() -> (Engine<Arc<Faulty>, ManualClock>, Arc<Faulty>, ManualClock) {
    let clock = ManualClock::new(T0);
    let store = Arc::new(FaultyStore::new(MemoryStore::new()));
    let engine = Engine::with_clock(store.clone(), clock.clone())
        .with_policy(Policy::default().with_lease(LEASE))
        .expect("valid policy");
    (engine, store, clock)
}

fn scope() -> Scope {
    Scope::tenant("billing").with_operation("invoice.paid")
}

fn payload(n: u32) -> Fingerprint {
    Fingerprint::of(format!(r#"{{"invoice":{n}}}"#).as_bytes())
}

/// A handler that counts its runs and ends as `how` says.
fn handler(
    runs: &Arc<AtomicUsize>,
    how: Handled,
) -> impl FnOnce(idem_core::Lease) -> std::pin::Pin<Box<dyn Future<Output = Handled> + Send>> {
    let runs = runs.clone();
    move |_lease| {
        Box::pin(async move {
            runs.fetch_add(1, Ordering::SeqCst);
            how
        })
    }
}

fn ok(body: &'static [u8]) -> Handled {
    Handled::Complete(Outcome::new(body))
}

async fn census(store: &Faulty) -> Census {
    store.census(T0, 1_000).await.unwrap()
}

#[tokio::test]
async fn a_message_runs_once_and_redeliveries_are_acknowledged_with_its_result() {
    let (engine, _, _) = engine();
    let runs = Arc::new(AtomicUsize::new(0));
    let first = engine
        .consume(
            &scope(),
            "msg-1",
            payload(1),
            handler(&runs, ok(b"credited")),
        )
        .await;
    assert_eq!(
        first,
        Delivery::Ack {
            replayed: false,
            outcome: Outcome::new(&b"credited"[..])
        }
    );
    for _ in 0..3 {
        let again = engine
            .consume(&scope(), "msg-1", payload(1), handler(&runs, ok(b"other")))
            .await;
        assert_eq!(
            again,
            Delivery::Ack {
                replayed: true,
                outcome: Outcome::new(&b"credited"[..])
            }
        );
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn concurrent_deliveries_run_once_and_never_spin() {
    let (engine, _, _) = engine();
    let engine = Arc::new(engine);
    let runs = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Notify::new());
    let barrier = Arc::new(tokio::sync::Barrier::new(16));
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (engine, runs, gate, barrier) =
                (engine.clone(), runs.clone(), gate.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                engine
                    .consume(&scope(), "msg-2", payload(2), move |_| async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        gate.notified().await;
                        Handled::Complete(Outcome::new(&b"done"[..]))
                    })
                    .await
            })
        })
        .collect();
    // Every loser answers while the winner is held at the gate.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while tasks.iter().filter(|t| t.is_finished()).count() < 15 {
        assert!(
            std::time::Instant::now() < deadline,
            "losers did not answer"
        );
        tokio::task::yield_now().await;
    }
    gate.notify_one();
    let mut acks = 0;
    for task in tasks {
        match task.await.unwrap() {
            Delivery::Ack {
                replayed: false, ..
            } => acks += 1,
            Delivery::Retry {
                reason: RetryReason::InProgress,
                after: Some(after),
            } => assert!(after >= MIN_RETRY, "a redelivery delay of {after:?} spins"),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(acks, 1, "exactly one delivery ran and acknowledged");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn another_payload_under_the_same_id_is_dead_lettered_unrun() {
    let (engine, _, _) = engine();
    let runs = Arc::new(AtomicUsize::new(0));
    let first = engine
        .consume(&scope(), "msg-3", payload(3), handler(&runs, ok(b"a")))
        .await;
    assert!(first.is_ack());
    let other = engine
        .consume(&scope(), "msg-3", payload(4), handler(&runs, ok(b"b")))
        .await;
    assert_eq!(
        other,
        Delivery::DeadLetter {
            reason: DeadLetterReason::PayloadMismatch
        }
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_released_message_runs_again_on_redelivery() {
    let (engine, _, _) = engine();
    let runs = Arc::new(AtomicUsize::new(0));
    let first = engine
        .consume(
            &scope(),
            "msg-4",
            payload(4),
            handler(&runs, Handled::Release),
        )
        .await;
    assert_eq!(
        first,
        Delivery::Retry {
            reason: RetryReason::Released,
            after: None
        }
    );
    let second = engine
        .consume(&scope(), "msg-4", payload(4), handler(&runs, ok(b"ok")))
        .await;
    assert_eq!(
        second,
        Delivery::Ack {
            replayed: false,
            outcome: Outcome::new(&b"ok"[..])
        }
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn failed_and_unknown_messages_are_dead_lettered_and_never_run_again() {
    let (engine, _, _) = engine();
    let runs = Arc::new(AtomicUsize::new(0));
    for (id, how, reason) in [
        (
            "msg-fail",
            Handled::Fail(Outcome::new(&b"bad invoice"[..])),
            DeadLetterReason::Failed,
        ),
        (
            "msg-unknown",
            Handled::Unknown,
            DeadLetterReason::OutcomeUnknown,
        ),
    ] {
        for _ in 0..3 {
            let delivery = engine
                .consume(&scope(), id, payload(5), handler(&runs, how.clone()))
                .await;
            assert_eq!(delivery, Delivery::DeadLetter { reason }, "{id}");
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2, "one run per message");
}

#[tokio::test]
async fn a_panicking_handler_is_never_run_again() {
    let (engine, store, _) = engine();
    let engine = Arc::new(engine);
    let runs = Arc::new(AtomicUsize::new(0));
    let task = {
        let (engine, runs) = (engine.clone(), runs.clone());
        tokio::spawn(async move {
            engine
                .consume(&scope(), "msg-panic", payload(6), move |_| async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    panic!("the handler broke after its effect");
                })
                .await
        })
    };
    assert!(task.await.is_err(), "the panic goes on");
    // The key is finished as unknown in the background: poll for it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while census(&store).await.failed_unknown == 0 {
        assert!(std::time::Instant::now() < deadline, "not settled");
        tokio::task::yield_now().await;
    }
    let again = engine
        .consume(&scope(), "msg-panic", payload(6), handler(&runs, ok(b"x")))
        .await;
    assert_eq!(
        again,
        Delivery::DeadLetter {
            reason: DeadLetterReason::OutcomeUnknown
        }
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_invalid_id_is_dead_lettered_with_nothing_stored_or_run() {
    let (engine, store, _) = engine();
    let runs = Arc::new(AtomicUsize::new(0));
    for id in ["", "has\nnewline", &"x".repeat(10_000)] {
        let delivery = engine
            .consume(&scope(), id, payload(7), handler(&runs, ok(b"x")))
            .await;
        assert_eq!(
            delivery,
            Delivery::DeadLetter {
                reason: DeadLetterReason::InvalidKey
            }
        );
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    assert_eq!(census(&store).await.total(), 0, "nothing stored");
}

#[tokio::test]
async fn store_outages_ask_for_redelivery_and_run_nothing() {
    let (engine, store, _) = engine();
    let runs = Arc::new(AtomicUsize::new(0));
    store.inject(Fault::new(Op::InsertIfAbsent, FaultKind::Unavailable).next(1));
    let delivery = engine
        .consume(&scope(), "msg-8", payload(8), handler(&runs, ok(b"x")))
        .await;
    assert_eq!(
        delivery,
        Delivery::Retry {
            reason: RetryReason::StoreUnavailable,
            after: None
        }
    );
    store.inject(Fault::new(Op::InsertIfAbsent, FaultKind::Corrupt).next(1));
    let delivery = engine
        .consume(&scope(), "msg-9", payload(9), handler(&runs, ok(b"x")))
        .await;
    assert_eq!(
        delivery,
        Delivery::DeadLetter {
            reason: DeadLetterReason::StoreRefused
        }
    );
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    let healed = engine
        .consume(&scope(), "msg-8", payload(8), handler(&runs, ok(b"x")))
        .await;
    assert!(healed.is_ack());
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_handler_that_committed_its_completion_is_acknowledged_without_a_write() {
    let (engine, store, _) = engine();
    let engine = Arc::new(engine);
    let runs = Arc::new(AtomicUsize::new(0));
    let delivery = {
        let (engine2, runs) = (engine.clone(), runs.clone());
        engine
            .consume(&scope(), "msg-10", payload(10), move |lease| async move {
                runs.fetch_add(1, Ordering::SeqCst);
                // Stands in for `prepare_complete` + `apply_in` in the
                // handler's own transaction (the SQL stores' tests do it for real).
                engine2
                    .complete(&lease, Outcome::new(&b"committed"[..]))
                    .await
                    .unwrap();
                Handled::Committed(Outcome::new(&b"committed"[..]))
            })
            .await
    };
    assert_eq!(
        delivery,
        Delivery::Ack {
            replayed: false,
            outcome: Outcome::new(&b"committed"[..])
        }
    );
    let cas_before = store.calls(Op::CompareAndSwap);
    let again = engine
        .consume(&scope(), "msg-10", payload(10), handler(&runs, ok(b"x")))
        .await;
    assert_eq!(
        again,
        Delivery::Ack {
            replayed: true,
            outcome: Outcome::new(&b"committed"[..])
        }
    );
    assert_eq!(store.calls(Op::CompareAndSwap), cas_before);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_lapsed_lease_is_taken_over_and_the_first_holder_is_told_to_retry() {
    let (engine, _, clock) = engine();
    let engine = Arc::new(engine);
    let runs = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Notify::new());
    let first = {
        let (engine, runs, gate) = (engine.clone(), runs.clone(), gate.clone());
        tokio::spawn(async move {
            engine
                .consume(&scope(), "msg-11", payload(11), move |_| async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    gate.notified().await;
                    Handled::Complete(Outcome::new(&b"zombie"[..]))
                })
                .await
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while runs.load(Ordering::SeqCst) == 0 {
        assert!(std::time::Instant::now() < deadline, "first did not start");
        tokio::task::yield_now().await;
    }
    // The first holder's heartbeat cannot reach the store... simulate a
    // paused process: move time past the lease without letting it beat.
    clock.advance(LEASE * 3);
    let second = engine
        .consume(
            &scope(),
            "msg-11",
            payload(11),
            handler(&runs, ok(b"second")),
        )
        .await;
    // Either the heartbeat kept the lease (then: in progress) or the
    // takeover ran; the answer is never a second acknowledgement of
    // another result.
    gate.notify_one();
    let first = first.await.unwrap();
    match second {
        Delivery::Ack {
            replayed: false, ..
        } => {
            assert_eq!(
                first,
                Delivery::Retry {
                    reason: RetryReason::LeaseLost,
                    after: Some(MIN_RETRY)
                }
            );
            assert_eq!(runs.load(Ordering::SeqCst), 2, "window W2: named");
        }
        Delivery::Retry {
            reason: RetryReason::InProgress,
            ..
        } => {
            assert!(first.is_ack());
            assert_eq!(runs.load(Ordering::SeqCst), 1);
        }
        other => panic!("unexpected {other:?}"),
    }
}
