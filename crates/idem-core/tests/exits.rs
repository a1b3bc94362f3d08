//! Every way a claim ends, at the engine level (see docs/reliability.md,
//! "Every way a request ends"): effects are counted and what a retry gets
//! is checked; nothing may run twice outside a named window.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use idem_conformance::{Fault, FaultKind, FaultyStore, Op};
use idem_core::store::Store;
use idem_core::{
    Begin, Clock, Engine, Error, Executed, Fingerprint, IdempotencyKey, InFlightPolicy,
    ManualClock, MemoryStore, Outcome, Policy, RecordKey, Replay, ReplayKind, Scope, Timestamp,
};
use tokio::sync::Notify;

const T0: Timestamp = Timestamp::from_millis(1_700_000_000_000);
const LEASE: Duration = Duration::from_secs(12);

/// A `MemoryStore` behind the conformance suite's [`FaultyStore`]: the tests
/// fail its heartbeats (compare-and-swaps writing an in-flight record) with a
/// permanent error, or declare (and enforce) a record limit.
type Faulty = FaultyStore<MemoryStore>;

fn faulty() -> Faulty {
    FaultyStore::new(MemoryStore::new())
}

/// Heartbeats fail with a permanent error (Redis OOM / NOREPLICAS and
/// PostgreSQL 25006 were once classified so): the next `n`, or all of them
/// until removed.
fn failing_beats(n: Option<u64>) -> Fault {
    let fault = Fault::new(Op::CompareAndSwap, FaultKind::Generic).writing_in_flight();
    match n {
        Some(n) => fault.next(n),
        None => fault.always(),
    }
}

fn policy() -> Policy {
    Policy::default().with_lease(LEASE)
}

/// Whether the engine keeps finished records ([`Engine::with_finished_cache`]):
/// every row runs both ways (`plain::<row>`, `cached::<row>`).
#[derive(Clone, Copy, Debug)]
enum Cache {
    Off,
    On,
}

fn engine_over(
    store: Faulty,
    policy: Policy,
    cache: Cache,
) -> (Arc<Engine<Faulty, ManualClock>>, ManualClock) {
    let clock = ManualClock::new(T0);
    let engine = Engine::with_clock(store, clock.clone())
        .with_policy(policy)
        .unwrap();
    let engine = match cache {
        Cache::Off => engine,
        Cache::On => engine.with_finished_cache(16 << 20),
    };
    (Arc::new(engine), clock)
}

fn key(s: &str) -> IdempotencyKey {
    IdempotencyKey::parse(s).unwrap()
}

fn scope() -> Scope {
    Scope::tenant("t")
}

/// Waits until someone sleeps on `clock`, then moves it by `d`.
async fn step(clock: &ManualClock, d: Duration) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while clock.pending_sleepers() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing waits on the clock"
        );
        tokio::task::yield_now().await;
    }
    clock.advance(d);
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

/// Moves `clock` by `d` whenever someone sleeps on it, until `done()`.
async fn drive(clock: &ManualClock, d: Duration, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out driving the clock"
        );
        if clock.pending_sleepers() > 0 {
            clock.advance(d);
        }
        tokio::task::yield_now().await;
    }
}

async fn eventually<F: Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::task::yield_now().await;
    }
}

async fn state<S: Store, C: Clock>(engine: &Engine<S, C>, k: &str) -> Option<&'static str> {
    engine
        .store()
        .get(&RecordKey::new(&scope(), &key(k)), engine.clock().now())
        .await
        .unwrap()
        .map(|v| v.record.state.name())
}

/// Situation 2: one heartbeat fails with an error classified as permanent.
/// The heartbeat goes on, so a duplicate arriving after the original lease
/// deadline still finds the key in progress and never takes it over.
async fn one_permanent_heartbeat_error_does_not_stop_the_heartbeat(cache: Cache) {
    let store = faulty();
    let beat = store.inject(failing_beats(Some(1)));
    let (engine, clock) = engine_over(store.clone(), policy(), cache);
    let fp = Fingerprint::of(b"pay");
    let Begin::Proceed(lease) = engine.begin(&scope(), &key("k"), fp).await.unwrap() else {
        panic!("the first request claims")
    };
    let done = Arc::new(Notify::new());
    let effects = Arc::new(AtomicUsize::new(0));
    let original = tokio::spawn({
        let (engine, lease, done, effects) =
            (engine.clone(), lease.clone(), done.clone(), effects.clone());
        async move {
            let value = engine
                .run_with_heartbeat(&lease, async {
                    effects.fetch_add(1, Ordering::SeqCst);
                    done.notified().await;
                    "charged"
                })
                .await;
            engine.complete(&lease, Outcome::new(value)).await
        }
    });
    // Three lease lengths pass in beats; the first beat fails.
    for _ in 0..12 {
        step(&clock, LEASE / 4).await;
        let dup = engine.begin(&scope(), &key("k"), fp).await.unwrap();
        assert!(
            matches!(dup, Begin::InProgress { .. }),
            "a duplicate took the key over at {:?} after a single failed heartbeat",
            clock.now().since(T0)
        );
    }
    assert_eq!(store.hits(beat), 1);
    assert!(
        !lease.is_lost(),
        "one failed beat within the lease loses nothing"
    );
    done.notify_one();
    original.await.unwrap().unwrap();
    let Begin::Replay(replay) = engine.begin(&scope(), &key("k"), fp).await.unwrap() else {
        panic!("the retry must replay")
    };
    assert_eq!(replay.outcome.as_bytes(), b"charged");
    assert_eq!(effects.load(Ordering::SeqCst), 1);
}

/// A store that refuses heartbeats for longer than the lease: the holder is
/// told (`Lease::lost`) once its deadline has passed, and the heartbeat
/// keeps trying; when the store recovers before anyone took over, the claim
/// is held again and completes.
async fn heartbeats_failing_past_the_deadline_signal_lost_and_keep_trying(cache: Cache) {
    let store = faulty();
    let down = store.inject(failing_beats(None));
    let (engine, clock) = engine_over(store.clone(), policy(), cache);
    let fp = Fingerprint::of(b"pay");
    let Begin::Proceed(lease) = engine.begin(&scope(), &key("k"), fp).await.unwrap() else {
        panic!("claims")
    };
    let beat = tokio::spawn({
        let (engine, lease) = (engine.clone(), lease.clone());
        async move { engine.keep_alive(&lease).await }
    });
    while !lease.is_lost() {
        step(&clock, LEASE / 12).await;
    }
    assert!(
        clock.now() >= lease.deadline(),
        "lost fired before the deadline"
    );
    let failed = store.hits(down);
    assert!(failed >= 3, "the heartbeat gave up after {failed} failures");
    store.remove(down);
    step(&clock, LEASE / 12).await;
    eventually("the heartbeat to extend again", || async {
        lease.deadline() > clock.now()
    })
    .await;
    engine.complete(&lease, Outcome::new("ok")).await.unwrap();
    step(&clock, LEASE).await;
    assert!(beat.await.unwrap().is_ok());
}

/// Situation 6: with `max_cas_retries(0)`, duplicates of a finished key get
/// the replay, of a running key "in progress", of another request the
/// mismatch: finding the key is not a lost race.
async fn zero_cas_retries_still_replays_and_reports_in_progress(cache: Cache) {
    let (engine, _clock) = engine_over(faulty(), policy().with_max_cas_retries(0), cache);
    let fp = Fingerprint::of(b"pay");
    let Begin::Proceed(lease) = engine.begin(&scope(), &key("k"), fp).await.unwrap() else {
        panic!("claims")
    };
    for _ in 0..3 {
        assert!(matches!(
            engine.begin(&scope(), &key("k"), fp).await.unwrap(),
            Begin::InProgress { .. }
        ));
    }
    engine.complete(&lease, Outcome::new("done")).await.unwrap();
    for _ in 0..3 {
        let Begin::Replay(Replay { outcome, kind }) =
            engine.begin(&scope(), &key("k"), fp).await.unwrap()
        else {
            panic!("a duplicate of a finished key must replay, not report contention")
        };
        assert_eq!(
            (outcome.as_bytes(), kind),
            (&b"done"[..], ReplayKind::Completed)
        );
    }
    assert!(matches!(
        engine
            .begin(&scope(), &key("k"), Fingerprint::of(b"other"))
            .await
            .unwrap(),
        Begin::Mismatch(_)
    ));
    // execute() agrees.
    let runs = AtomicUsize::new(0);
    let again = engine
        .execute(&scope(), &key("x"), fp, || async {
            runs.fetch_add(1, Ordering::SeqCst);
            7_u32
        })
        .await
        .unwrap();
    assert_eq!(again, Executed::Fresh(7));
    let replay = engine
        .execute(&scope(), &key("x"), fp, || async {
            runs.fetch_add(1, Ordering::SeqCst);
            8_u32
        })
        .await
        .unwrap();
    assert_eq!(replay, Executed::Replayed(7));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// Situation 3 at the engine level: the effective outcome limit is the
/// smaller of the policy's and the store's; a value too large for the store
/// ends the key as outcome unknown instead of leaving it to run again.
async fn the_store_record_limit_bounds_outcomes_and_never_leaves_a_key_to_run_again(cache: Cache) {
    let store = faulty().with_max_record_bytes(Some(1_000));
    let (engine, _clock) = engine_over(store, policy(), cache);
    let limit = 1_000 - idem_core::store::codec::RECORD_OVERHEAD;
    assert_eq!(engine.outcome_limit(), limit);
    let fp = Fingerprint::of(b"big");
    // At the limit: stored.
    let Begin::Proceed(lease) = engine.begin(&scope(), &key("at"), fp).await.unwrap() else {
        panic!("claims")
    };
    engine
        .complete(&lease, Outcome::new(vec![7_u8; limit]))
        .await
        .unwrap();
    // Above it: refused before the store sees it.
    let Begin::Proceed(lease) = engine.begin(&scope(), &key("above"), fp).await.unwrap() else {
        panic!("claims")
    };
    assert!(matches!(
        engine.complete(&lease, Outcome::new(vec![7_u8; limit + 1])).await,
        Err(Error::OutcomeTooLarge { limit: l, .. }) if l == limit
    ));
    // execute() with a value too large: returned once, never run again.
    let runs = AtomicUsize::new(0);
    let work = || async {
        runs.fetch_add(1, Ordering::SeqCst);
        vec![1_u8; 4_000]
    };
    let first = engine.execute(&scope(), &key("e"), fp, work).await.unwrap();
    assert_eq!(first, Executed::Fresh(vec![1_u8; 4_000]));
    assert_eq!(state(&engine, "e").await, Some("failed_unknown"));
    assert!(matches!(
        engine.execute(&scope(), &key("e"), fp, work).await,
        Err(Error::OutcomeUnknown)
    ));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// Dropping `execute`'s future after the work started ends the key as
/// outcome unknown (in the background): the retry does not run it again.
async fn a_dropped_execute_ends_the_key_unknown(cache: Cache) {
    let (engine, _clock) = engine_over(faulty(), policy(), cache);
    let fp = Fingerprint::of(b"pay");
    let entered = Arc::new(Notify::new());
    let runs = Arc::new(AtomicUsize::new(0));
    let task = tokio::spawn({
        let (engine, entered, runs) = (engine.clone(), entered.clone(), runs.clone());
        async move {
            engine
                .execute(&scope(), &key("d"), fp, || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    entered.notify_one();
                    std::future::pending::<u32>().await
                })
                .await
        }
    });
    entered.notified().await;
    task.abort();
    let _ = task.await;
    eventually("the dropped claim to end", || async {
        state(&engine, "d").await == Some("failed_unknown")
    })
    .await;
    let retry = engine
        .execute(&scope(), &key("d"), fp, || async {
            runs.fetch_add(1, Ordering::SeqCst);
            1_u32
        })
        .await;
    assert!(matches!(retry, Err(Error::OutcomeUnknown)), "{retry:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A panic in `execute`'s work ends the key as outcome unknown.
async fn a_panicking_execute_ends_the_key_unknown(cache: Cache) {
    let (engine, _clock) = engine_over(faulty(), policy(), cache);
    let fp = Fingerprint::of(b"pay");
    let runs = Arc::new(AtomicUsize::new(0));
    let task = tokio::spawn({
        let (engine, runs) = (engine.clone(), runs.clone());
        async move {
            engine
                .execute(&scope(), &key("p"), fp, || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    if runs.load(Ordering::SeqCst) > 0 {
                        panic!("bug after the effect");
                    }
                    1_u32
                })
                .await
        }
    });
    assert!(task.await.unwrap_err().is_panic());
    eventually("the panicked claim to end", || async {
        state(&engine, "p").await == Some("failed_unknown")
    })
    .await;
    assert!(matches!(
        engine
            .execute(&scope(), &key("p"), fp, || async { 2_u32 })
            .await,
        Err(Error::OutcomeUnknown)
    ));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// `max_hold` ends a claim held that long as outcome unknown and tells the
/// holder; the duplicate gets the unknown answer, not a second run.
async fn max_hold_ends_a_hung_claim_as_unknown(cache: Cache) {
    let hold = LEASE * 3;
    let (engine, clock) = engine_over(faulty(), policy().with_max_hold(Some(hold)), cache);
    let fp = Fingerprint::of(b"pay");
    let Begin::Proceed(lease) = engine.begin(&scope(), &key("h"), fp).await.unwrap() else {
        panic!("claims")
    };
    let beat = tokio::spawn({
        let (engine, lease) = (engine.clone(), lease.clone());
        async move { engine.keep_alive(&lease).await }
    });
    drive(&clock, LEASE / 3, || beat.is_finished()).await;
    assert!(clock.now().since(T0) >= hold, "ended before the ceiling");
    eventually("the hold ceiling to end the claim", || async {
        state(&engine, "h").await == Some("failed_unknown")
    })
    .await;
    assert!(lease.is_lost());
    assert!(matches!(beat.await.unwrap(), Err(Error::LeaseLost(_))));
    let Begin::Replay(replay) = engine.begin(&scope(), &key("h"), fp).await.unwrap() else {
        panic!("replays")
    };
    assert_eq!(replay.kind, ReplayKind::Unknown);
    // The hung holder's late completion changes nothing.
    assert!(matches!(
        engine.complete(&lease, Outcome::new("late")).await,
        Err(Error::LeaseLost(_))
    ));
}

/// A graceful shutdown refuses new claims, waits for running ones, and ends
/// those still running after the grace period as outcome unknown.
async fn shutdown_waits_then_ends_the_rest_unknown(cache: Cache) {
    let (engine, clock) = engine_over(faulty(), policy(), cache);
    let fp = Fingerprint::of(b"pay");
    let Begin::Proceed(quick) = engine.begin(&scope(), &key("quick"), fp).await.unwrap() else {
        panic!("claims")
    };
    let Begin::Proceed(slow) = engine.begin(&scope(), &key("slow"), fp).await.unwrap() else {
        panic!("claims")
    };
    let shutdown = tokio::spawn({
        let engine = engine.clone();
        async move { engine.shutdown(Duration::from_secs(30)).await }
    });
    // Until the shutdown waits on the clock: it has counted the running
    // claims by then (on a multi-threaded runtime, completing `quick` as
    // soon as the flag is up could finish it before the count).
    eventually("the shutdown to begin and wait", || async {
        engine.is_shutting_down() && clock.pending_sleepers() > 0
    })
    .await;
    assert!(matches!(
        engine.begin(&scope(), &key("new"), fp).await,
        Err(Error::ShuttingDown)
    ));
    assert!(Error::ShuttingDown.is_transient());
    engine.complete(&quick, Outcome::new("ok")).await.unwrap();
    step(&clock, Duration::from_secs(31)).await;
    let report = shutdown.await.unwrap();
    assert_eq!(
        (
            report.running,
            report.finished,
            report.marked_unknown,
            report.left_in_flight
        ),
        (2, 1, 1, 0)
    );
    assert!(slow.is_lost());
    assert_eq!(state(&engine, "quick").await, Some("completed"));
    assert_eq!(state(&engine, "slow").await, Some("failed_unknown"));
    assert_eq!(state(&engine, "new").await, None);
}

/// Policies that cannot work are refused when the engine is built, naming
/// the field; durations never overflow.
#[test]
fn bad_policies_are_refused_when_the_engine_is_built() {
    let day = Duration::from_secs(86_400);
    let wait = |max, poll| InFlightPolicy::Wait { max, poll };
    let cases = [
        (Policy::default().with_lease(Duration::ZERO), "lease"),
        (Policy::default().with_ttl(Duration::ZERO), "ttl"),
        (Policy::default().with_ttl(Duration::from_secs(1)), "ttl"),
        (Policy::default().with_ttl(Duration::MAX), "ttl"),
        (
            Policy::default()
                .with_lease(Duration::MAX)
                .with_ttl(Duration::MAX),
            "ttl",
        ),
        (
            Policy::default().with_in_flight(wait(day, Duration::ZERO)),
            "in_flight.poll",
        ),
        (
            Policy::default().with_in_flight(wait(Duration::from_secs(1), day)),
            "in_flight.poll",
        ),
        (
            Policy::default().with_in_flight(wait(Duration::MAX, Duration::MAX)),
            "in_flight.max",
        ),
        (
            Policy::default().with_max_hold(Some(Duration::from_secs(1))),
            "max_hold",
        ),
        (
            Policy::default().with_max_hold(Some(Duration::MAX)),
            "max_hold",
        ),
        (
            Policy::default().with_max_outcome_bytes(0),
            "max_outcome_bytes",
        ),
    ];
    for (policy, field) in cases {
        let err = Engine::with_clock(MemoryStore::new(), ManualClock::new(T0))
            .with_policy(policy.clone())
            .map(|_| ())
            .expect_err(&format!("{policy:?} must be refused"));
        assert_eq!(err.field, field, "{policy:?}: {err}");
    }
    Policy::default().validate().unwrap();
    Policy::default()
        .with_in_flight(wait(day, day))
        .with_max_hold(Some(day))
        .validate()
        .unwrap();
}

/// The longest accepted wait with the longest poll backs off without
/// overflowing (`poll * 8`), and ends with "in progress".
async fn the_longest_wait_does_not_overflow(cache: Cache) {
    let day = Duration::from_secs(86_400);
    let policy = policy().with_in_flight(InFlightPolicy::Wait {
        max: day,
        poll: day,
    });
    let (engine, clock) = engine_over(faulty(), policy, cache);
    let fp = Fingerprint::of(b"pay");
    let Begin::Proceed(_held) = engine.begin(&scope(), &key("w"), fp).await.unwrap() else {
        panic!("claims")
    };
    let waiter = tokio::spawn({
        let engine = engine.clone();
        async move { engine.begin(&scope(), &key("w"), fp).await }
    });
    drive(&clock, Duration::from_secs(3_600), || waiter.is_finished()).await;
    assert!(matches!(
        waiter.await.unwrap().unwrap(),
        Begin::InProgress { .. } | Begin::Proceed(_)
    ));
}

/// Each row as a test, once without and once with the cache of finished
/// records.
macro_rules! rows {
    ($($row:ident),* $(,)?) => {
        mod plain {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $row() {
                    super::$row(super::Cache::Off).await;
                }
            )*
        }
        mod cached {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $row() {
                    super::$row(super::Cache::On).await;
                }
            )*
        }
    };
}

rows!(
    one_permanent_heartbeat_error_does_not_stop_the_heartbeat,
    heartbeats_failing_past_the_deadline_signal_lost_and_keep_trying,
    zero_cas_retries_still_replays_and_reports_in_progress,
    the_store_record_limit_bounds_outcomes_and_never_leaves_a_key_to_run_again,
    a_dropped_execute_ends_the_key_unknown,
    a_panicking_execute_ends_the_key_unknown,
    max_hold_ends_a_hung_claim_as_unknown,
    shutdown_waits_then_ends_the_rest_unknown,
    the_longest_wait_does_not_overflow,
);
