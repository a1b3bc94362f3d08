//! Heartbeats and waiting for the original: the cases where time passes
//! while a holder works.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use idem_core::store::{State, Store};
use idem_core::{
    Begin, Clock, Engine, Error, InFlightPolicy, Lease, ManualClock, Outcome, Replay, ReplayKind,
};
use tokio::task::JoinHandle;

use super::super::{T0, engine, engine_on, ikey, open, policy, poll_until, scope};
use super::{fp, proceed, stored};
use crate::StoreFactory;

/// A heartbeat (`keep_alive`) keeps a slow holder's lease well past its
/// original deadline: duplicates stay `InProgress` instead of taking over.
pub async fn heartbeat_keeps_the_lease<F: StoreFactory>(factory: Arc<F>) {
    let (engine, clock) = engine(open(&*factory).await);
    let engine = Arc::new(engine);
    let lease = proceed(&engine, "slow", fp("a")).await;
    let beat = policy().lease / 3;
    let heart = {
        let (engine, lease) = (engine.clone(), lease.clone());
        tokio::spawn(async move { engine.keep_alive(&lease).await })
    };
    for i in 0..6 {
        assert!(
            poll_until(|| clock.pending_sleepers() > 0).await,
            "beat {i}: the heartbeat never waited on the clock"
        );
        clock.advance(beat);
    }
    // Wait for the last beat's extend to land (the heartbeat sleeps again).
    assert!(poll_until(|| clock.pending_sleepers() > 0).await);
    let now = clock.now();
    assert!(
        lease.deadline() > now,
        "after {:?} of heartbeats the lease must still be live (deadline {:?}, now {now:?})",
        beat * 6,
        lease.deadline()
    );
    match engine.begin(&scope(), &ikey("slow"), fp("a")).await {
        Ok(Begin::InProgress { .. }) => {}
        other => {
            panic!("a duplicate of a live, heart-beating request must be InProgress, got {other:?}")
        }
    }
    let rec = stored(&engine, "slow").await.expect("stored");
    assert!(
        matches!(rec.record.state, State::InFlight { lease_deadline, token } if lease_deadline > now && token == lease.token()),
        "the extended lease must be stored: {rec:?}"
    );
    engine
        .complete(&lease, Outcome::new(&b"slow but done"[..]))
        .await
        .expect("complete");
    clock.advance(beat);
    assert!(
        poll_until(|| heart.is_finished()).await,
        "the heartbeat must stop once the lease is finished"
    );
    assert!(matches!(heart.await, Ok(Ok(()))));
}

/// A duplicate of an in-flight request, waiting for the original.
struct Waiting<S: Store> {
    engine: Arc<Engine<S, ManualClock>>,
    clock: ManualClock,
    /// The original's lease.
    original: Lease,
    duplicate: JoinHandle<Result<Begin, Error>>,
}

impl<S: Store> Waiting<S> {
    /// An engine in wait-for-original mode (at most 5 s, polling every
    /// 100 ms) on a manual clock at [`T0`], the request `name` in flight,
    /// and its duplicate spawned.
    async fn start(store: S, name: &'static str) -> Self {
        let clock = ManualClock::new(T0);
        let policy = policy().with_in_flight(InFlightPolicy::Wait {
            max: Duration::from_secs(5),
            poll: Duration::from_millis(100),
        });
        let engine = Arc::new(engine_on(store, &clock, policy));
        let original = proceed(&engine, name, fp("a")).await;
        let duplicate = {
            let engine = engine.clone();
            tokio::spawn(async move { engine.begin(&scope(), &ikey(name), fp("a")).await })
        };
        Self {
            engine,
            clock,
            original,
            duplicate,
        }
    }

    /// Moves the clock 100 ms whenever the duplicate waits on it, until it
    /// finishes; fails the case with `why` if it does not.
    async fn finish(self, why: &str) -> Result<Begin, Error> {
        let clock = &self.clock;
        let finished = poll_until(|| {
            if clock.pending_sleepers() > 0 {
                clock.advance(Duration::from_millis(100));
            }
            self.duplicate.is_finished()
        })
        .await;
        assert!(finished, "{why}");
        self.duplicate.await.expect("join")
    }
}

/// In wait-for-original mode a duplicate waits for the original and returns
/// its outcome. The clock moves only while the duplicate is parked on it,
/// after the original completed, so the run is deterministic.
pub async fn wait_for_original_returns_its_outcome<F: StoreFactory>(factory: Arc<F>) {
    let waiting = Waiting::start(open(&*factory).await, "waited").await;
    let clock = waiting.clock.clone();
    assert!(
        poll_until(|| clock.pending_sleepers() > 0).await,
        "the duplicate must wait on the clock"
    );
    assert!(
        !waiting.duplicate.is_finished(),
        "the duplicate must still be waiting"
    );
    waiting
        .engine
        .complete(&waiting.original, Outcome::new(&b"original"[..]))
        .await
        .expect("complete");
    match waiting
        .finish("the duplicate must finish once the original completed")
        .await
    {
        Ok(Begin::Replay(Replay {
            outcome,
            kind: ReplayKind::Completed,
        })) => assert_eq!(outcome.as_bytes(), b"original"),
        other => panic!("the duplicate must replay the original's outcome, got {other:?}"),
    }
    assert!(
        clock.now() < T0.plus(Duration::from_secs(5)),
        "the duplicate must not have waited out its maximum"
    );
}

/// In wait-for-original mode a duplicate gives up with `InProgress` once its
/// maximum wait passes while the original is still running.
pub async fn wait_for_original_gives_up_after_max<F: StoreFactory>(factory: Arc<F>) {
    let waiting = Waiting::start(open(&*factory).await, "slow-original").await;
    let clock = waiting.clock.clone();
    match waiting
        .finish("the duplicate must give up after its maximum wait")
        .await
    {
        Ok(Begin::InProgress { retry_after }) => {
            assert!(retry_after > Duration::ZERO && retry_after <= policy().lease);
        }
        other => panic!("the duplicate must give up with InProgress, got {other:?}"),
    }
    let waited = clock.now().since(T0);
    assert!(
        waited >= Duration::from_secs(5) && waited < policy().lease,
        "the duplicate must wait its 5 s maximum, not less and not until the lease lapses (waited {waited:?})"
    );
}
