//! Recovery points through the store: [`Engine::checkpoint`] is fenced and
//! only moves forward, the next holder resumes from it, and
//! [`Phases`](idem_core::Phases) runs each external phase's work once across
//! a crash, with the same downstream key on every attempt.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use idem_core::store::{Checkpoint, State, Store};
use idem_core::{
    Begin, Engine, Error, FailureKind, Lease, ManualClock, Outcome, PhaseError, Phases, ReplayKind,
    downstream_key,
};

use super::super::{engine, engine_on, ikey, noise, open, policy, reopen, scope};
use super::{complete, fail, fp, lease_lost, proceed, replay, rkey, stored, take_over};
use crate::StoreFactory;

/// `engine.checkpoint`, failing the case if the holder's checkpoint is refused.
pub(crate) async fn checkpoint<S: Store>(
    engine: &Engine<S, ManualClock>,
    lease: &Lease,
    step: &str,
    state: &[u8],
) -> Checkpoint {
    match engine.checkpoint(lease, step, state.to_vec()).await {
        Ok(cp) => cp,
        Err(e) => panic!("the holder's checkpoint `{step}` failed: {e} ({e:?})"),
    }
}

/// The checkpoint stored under `name` (the record must be live).
async fn stored_checkpoint<S: Store>(
    engine: &Engine<S, ManualClock>,
    name: &str,
) -> Option<Checkpoint> {
    stored(engine, name)
        .await
        .unwrap_or_else(|| panic!("`{name}` must be stored"))
        .record
        .checkpoint
}

/// A provider that honours an idempotency key: the first call with a key
/// takes effect (a new id); later calls with that key return the same id.
#[derive(Default)]
pub(crate) struct Provider {
    calls: AtomicUsize,
    by_key: Mutex<HashMap<String, u64>>,
}

impl Provider {
    /// Calls the provider with `key`; returns the effect's id.
    pub(crate) fn call(&self, key: String) -> u64 {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mut by_key = self.by_key.lock().unwrap_or_else(PoisonError::into_inner);
        let next = by_key.len() as u64 + 1;
        *by_key.entry(key).or_insert(next)
    }
    /// How many calls it got.
    pub(crate) fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
    /// How many effects took place (distinct keys).
    pub(crate) fn effects(&self) -> usize {
        self.by_key
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
    /// The keys it was called with.
    pub(crate) fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .by_key
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect();
        keys.sort();
        keys
    }
}

/// The order flow of the phase cases: reserve (local work, counted), charge
/// and receipt (two providers honouring idempotency keys).
#[derive(Default)]
pub(crate) struct Shop {
    /// Runs of the operation (first attempts and resumes).
    pub(crate) runs: AtomicUsize,
    /// Runs that resumed from a checkpoint.
    pub(crate) resumes: AtomicUsize,
    /// Runs of the reserve phase's work.
    pub(crate) reserved: AtomicUsize,
    /// The card network.
    pub(crate) charges: Provider,
    /// The receipt service.
    pub(crate) receipts: Provider,
}

/// Where [`Shop::order`] stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Until {
    /// Runs every phase and returns the outcome.
    End,
    /// The process dies once the charge is recorded.
    CrashAfterCharge,
    /// The receipt is sent, then the process dies before recording it.
    CrashInsideReceipt,
}

impl Shop {
    /// Runs the order's phases on `phases` until `until`; the outcome when
    /// it ran to the end.
    pub(crate) async fn order(
        &self,
        phases: &mut Phases,
        until: Until,
    ) -> Result<Option<Outcome>, PhaseError<String>> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        if phases.resumed_from().is_some() {
            self.resumes.fetch_add(1, Ordering::SeqCst);
        }
        let stock: u32 = phases
            .external("reserve", |_key| async {
                self.reserved.fetch_add(1, Ordering::SeqCst);
                Ok::<u32, String>(7)
            })
            .await?;
        let charge: u64 = phases
            .external("charge", |key| async move {
                Ok::<u64, String>(self.charges.call(key))
            })
            .await?;
        if until == Until::CrashAfterCharge {
            return Ok(None);
        }
        let receipt: u64 = phases
            .external("receipt", |key| async move {
                let id = self.receipts.call(key);
                if until == Until::CrashInsideReceipt {
                    return Err(format!("the process died after sending receipt {id}"));
                }
                Ok::<u64, String>(id)
            })
            .await?;
        Ok(Some(Outcome::new(
            format!("order: stock {stock}, charge {charge}, receipt {receipt}").into_bytes(),
        )))
    }
}

/// A holder's checkpoints get increasing sequence numbers and are
/// heartbeats; a holder whose lease was taken over, or that finished, or
/// whose record expired, gets `LeaseLost` from `checkpoint` and changes
/// nothing.
pub async fn checkpoint_is_fenced<F: StoreFactory>(factory: Arc<F>) {
    let (engine, clock) = engine(open(&*factory).await);
    let name = "cp-fenced";
    let zombie = proceed(&engine, name, fp("a")).await;
    let first = checkpoint(&engine, &zombie, "reserve", b"r1").await;
    assert_eq!(
        (first.seq, first.step.as_str(), &first.state[..]),
        (1, "reserve", &b"r1"[..]),
        "the first checkpoint"
    );
    assert_eq!(
        first.record_key(),
        rkey(name),
        "a checkpoint names its record"
    );
    assert_eq!(stored_checkpoint(&engine, name).await, Some(first.clone()));
    // A checkpoint is a heartbeat: the lease runs a full lease from it.
    clock.advance(policy().lease - Duration::from_secs(1));
    let second = checkpoint(&engine, &zombie, "charge", b"r2").await;
    assert_eq!(second.seq, 2, "sequence numbers increase");
    match engine.begin(&scope(), &ikey(name), fp("a")).await {
        Ok(Begin::InProgress { retry_after }) => assert_eq!(
            retry_after,
            policy().lease,
            "a checkpoint extends the lease to a full lease"
        ),
        other => panic!("a duplicate must be InProgress, got {other:?}"),
    }
    // The lease lapses; a retry takes over, carrying the progress.
    let holder = take_over(&engine, name, &zombie).await;
    assert_eq!(
        holder.checkpoint(),
        Some(second.clone()),
        "the new holder starts from the last checkpoint"
    );
    let before = stored(&engine, name).await;
    lease_lost(
        engine
            .checkpoint(&zombie, "zombie", b"late".to_vec())
            .await
            .map(|_| ()),
        "the zombie's checkpoint after a takeover",
    );
    assert_eq!(
        stored(&engine, name).await,
        before,
        "a fenced checkpoint must change nothing"
    );
    let third = checkpoint(&engine, &holder, "receipt", b"r3").await;
    assert_eq!(third.seq, 3, "the new holder goes on from the carried seq");
    complete(&engine, &holder, b"done").await;
    let done = stored(&engine, name).await;
    assert_eq!(
        done.as_ref().and_then(|v| v.record.checkpoint.clone()),
        None,
        "a completed key keeps no checkpoint"
    );
    for (lease, who) in [(&zombie, "the zombie"), (&holder, "the holder")] {
        lease_lost(
            engine
                .checkpoint(lease, "after", b"x".to_vec())
                .await
                .map(|_| ()),
            &format!("{who}'s checkpoint after the key completed"),
        );
    }
    assert_eq!(stored(&engine, name).await, done, "and changes nothing");
    let r = replay(&engine, name, fp("a")).await;
    assert_eq!(r.outcome.as_bytes(), b"done");
    // A holder whose record expired cannot checkpoint (nor bring it back).
    let expiring = proceed(&engine, "cp-expired", fp("a")).await;
    checkpoint(&engine, &expiring, "reserve", b"e1").await;
    clock.advance(policy().ttl);
    lease_lost(
        engine
            .checkpoint(&expiring, "late", b"e2".to_vec())
            .await
            .map(|_| ()),
        "a checkpoint of an expired record",
    );
    assert_eq!(
        stored(&engine, "cp-expired").await,
        None,
        "an expired record stays absent"
    );
}

/// The next holder of a key, after the lease lapsed or after a retryable
/// failure, receives the last checkpoint exactly (`Lease::checkpoint`, on
/// the instance `b`); a completion or a permanent failure drops it.
async fn resumes<S: Store>(a: Engine<S, ManualClock>, b: Engine<S, ManualClock>) {
    // After a lapse.
    let first = proceed(&a, "resume-lapse", fp("a")).await;
    let cp = checkpoint(&a, &first, "reserve", &noise(1000, 21)).await;
    let second = take_over(&b, "resume-lapse", &first).await;
    assert_eq!(second.attempt(), 2);
    assert_eq!(
        second.checkpoint(),
        Some(cp.clone()),
        "after a lapse the next holder receives the last checkpoint exactly"
    );
    complete(&b, &second, b"ok").await;
    assert_eq!(stored_checkpoint(&a, "resume-lapse").await, None);
    let r = replay(&a, "resume-lapse", fp("a")).await;
    assert_eq!(r.outcome.as_bytes(), b"ok");

    // After a retryable failure.
    let first = proceed(&a, "resume-retryable", fp("a")).await;
    checkpoint(&a, &first, "reserve", b"1").await;
    let cp = checkpoint(&a, &first, "charge", b"ch_1").await;
    fail(&a, &first, FailureKind::Retryable, b"503").await;
    let failed = stored(&a, "resume-retryable").await.expect("stored");
    assert_eq!(failed.record.state.name(), "failed_retryable");
    assert_eq!(
        failed.record.checkpoint,
        Some(cp.clone()),
        "a retryable failure keeps the checkpoint"
    );
    let second = proceed(&b, "resume-retryable", fp("a")).await;
    assert_eq!(second.attempt(), 2);
    assert_eq!(
        second.checkpoint(),
        Some(cp.clone()),
        "after a retryable failure the next holder receives the last checkpoint"
    );
    let next = checkpoint(&b, &second, "receipt", b"r").await;
    assert_eq!(next.seq, cp.seq + 1);
    fail(&b, &second, FailureKind::Permanent, b"declined").await;
    let failed = stored(&a, "resume-retryable").await.expect("stored");
    assert_eq!(
        failed.record.checkpoint, None,
        "a permanent failure drops it"
    );
    let r = replay(&a, "resume-retryable", fp("a")).await;
    assert_eq!(r.kind, ReplayKind::Failed);
    assert_eq!(r.outcome.as_bytes(), b"declined");
}

/// The next holder resumes from the last checkpoint (one instance).
pub async fn next_holder_resumes_from_the_checkpoint<F: StoreFactory>(factory: Arc<F>) {
    let store = open(&*factory).await;
    let clock = ManualClock::new(super::super::T0);
    let a = engine_on(store.clone(), &clock, policy());
    resumes(a, engine_on(store, &clock, policy())).await;
}

/// The same, with the next holder on a second instance sharing records.
pub async fn next_holder_resumes_across_instances<F: StoreFactory>(factory: Arc<F>) {
    let a = open(&*factory).await;
    let b = Arc::new(reopen(&*factory, &a).await);
    let clock = ManualClock::new(super::super::T0);
    resumes(
        engine_on(a, &clock, policy()),
        engine_on(b, &clock, policy()),
    )
    .await;
}

/// An order run as phases (reserve, charge, receipt) dies twice, once after
/// the charge was recorded and once inside the receipt (sent, not
/// recorded); the third attempt finishes it. Each phase's work took effect
/// exactly once, every attempt sent each provider the same downstream key,
/// resumed phases returned their recorded results, and the order's outcome
/// is what retries replay.
pub async fn phases_run_each_external_phase_once_across_a_crash<F: StoreFactory>(factory: Arc<F>) {
    let (engine, clock) = engine(open(&*factory).await);
    let name = "phased-order";
    let shop = Shop::default();

    // Attempt 1: reserve and charge are recorded, then the process dies
    // (the lease is dropped, nothing settled).
    let first = proceed(&engine, name, fp("a")).await;
    let created_at = first.record().record.created_at;
    let mut phases = engine.phases(&first).expect("phases");
    assert_eq!(
        phases.resumed_from(),
        None,
        "a first attempt resumes nothing"
    );
    let ran = shop.order(&mut phases, Until::CrashAfterCharge).await;
    assert!(matches!(ran, Ok(None)), "attempt 1: {ran:?}");
    let first_keys: Vec<String> = ["reserve", "charge", "receipt"]
        .iter()
        .map(|p| phases.downstream_key(p))
        .collect();
    drop(phases);
    drop(first);

    // Attempt 2, after the lease lapsed: resumes after the charge; the
    // receipt is sent and the process dies before recording it.
    clock.advance(policy().lease);
    let second = proceed(&engine, name, fp("a")).await;
    assert_eq!(second.attempt(), 2);
    let mut phases = engine.phases(&second).expect("phases");
    assert_eq!(phases.resumed_from(), Some("charge"));
    assert!(phases.is_recorded("reserve") && phases.is_recorded("charge"));
    assert!(!phases.is_recorded("receipt"));
    assert_eq!(phases.result::<u64>("charge").expect("decodes"), Some(1));
    let ran = shop.order(&mut phases, Until::CrashInsideReceipt).await;
    assert!(
        matches!(ran, Err(PhaseError::Failed { ref phase, .. }) if phase == "receipt"),
        "attempt 2: {ran:?}"
    );
    assert!(
        !phases.is_recorded("receipt"),
        "a failed phase records nothing"
    );
    drop(phases);
    drop(second);

    // Attempt 3: resumes after the charge again and finishes.
    clock.advance(policy().lease);
    let third = proceed(&engine, name, fp("a")).await;
    assert_eq!(third.attempt(), 3);
    let mut phases = engine.phases(&third).expect("phases");
    assert_eq!(phases.resumed_from(), Some("charge"));
    let third_keys: Vec<String> = ["reserve", "charge", "receipt"]
        .iter()
        .map(|p| phases.downstream_key(p))
        .collect();
    let outcome = shop
        .order(&mut phases, Until::End)
        .await
        .expect("attempt 3 runs to the end")
        .expect("an outcome");
    complete(&engine, &third, outcome.as_bytes()).await;

    assert_eq!(
        shop.reserved.load(Ordering::SeqCst),
        1,
        "the reserve phase's work ran once"
    );
    assert_eq!(
        (shop.charges.calls(), shop.charges.effects()),
        (1, 1),
        "the card network was called once (the charge was recorded)"
    );
    assert_eq!(
        (shop.receipts.calls(), shop.receipts.effects()),
        (2, 1),
        "the receipt was sent twice with one key: one effect"
    );
    assert_eq!(
        (
            shop.runs.load(Ordering::SeqCst),
            shop.resumes.load(Ordering::SeqCst)
        ),
        (3, 2)
    );
    assert_eq!(
        first_keys, third_keys,
        "every attempt sends the same downstream keys"
    );
    let want: Vec<String> = ["reserve", "charge", "receipt"]
        .iter()
        .map(|p| downstream_key(&rkey(name), created_at, p))
        .collect();
    assert_eq!(
        first_keys, want,
        "downstream keys derive from the record key and its creation time"
    );
    assert_eq!(shop.charges.keys(), [want[1].clone()]);
    assert_eq!(shop.receipts.keys(), [want[2].clone()]);
    assert!(
        want[0] != want[1] && want[1] != want[2] && want[0] != want[2],
        "each phase has its own key"
    );
    assert_eq!(
        outcome.as_bytes(),
        b"order: stock 7, charge 1, receipt 1",
        "resumed phases return their recorded results"
    );
    assert_eq!(stored_checkpoint(&engine, name).await, None);
    let r = replay(&engine, name, fp("a")).await;
    assert_eq!(r.kind, ReplayKind::Completed);
    assert_eq!(r.outcome, outcome, "retries replay the order's outcome");
}

/// An ambiguous ending (outcome unknown, release, settle with `Unknown`) of
/// a claim with a checkpoint is stored as a retryable failure keeping the
/// checkpoint, and the next `begin` resumes from it; without a checkpoint an
/// unknown outcome stays final.
pub async fn ambiguous_ending_with_a_checkpoint_is_resumed<F: StoreFactory>(factory: Arc<F>) {
    let (engine, _clock) = engine(open(&*factory).await);
    let name = "ambiguous";
    let expect_resumable = |v: Option<idem_core::store::Versioned>, cp: &Checkpoint, what: &str| {
        let v = v.unwrap_or_else(|| panic!("{what}: the key must be stored"));
        assert!(
            matches!(
                v.record.state,
                State::Failed {
                    kind: FailureKind::Retryable,
                    ..
                }
            ),
            "{what} with a checkpoint must be stored as a retryable failure, got {}",
            v.record.state.name()
        );
        assert_eq!(
            v.record.checkpoint.as_ref(),
            Some(cp),
            "{what}: the checkpoint is kept"
        );
    };
    let first = proceed(&engine, name, fp("a")).await;
    let cp = checkpoint(&engine, &first, "charge", b"ch_1").await;
    fail(&engine, &first, FailureKind::Unknown, &[]).await;
    expect_resumable(stored(&engine, name).await, &cp, "an unknown outcome");

    let second = proceed(&engine, name, fp("a")).await;
    assert_eq!(second.checkpoint(), Some(cp.clone()));
    engine.release(&second).await.expect("release");
    expect_resumable(stored(&engine, name).await, &cp, "a release");

    let third = proceed(&engine, name, fp("a")).await;
    assert_eq!(third.checkpoint(), Some(cp.clone()));
    engine
        .settle(&third, idem_core::Ending::Unknown)
        .await
        .expect("settle");
    expect_resumable(stored(&engine, name).await, &cp, "settle(Unknown)");

    let fourth = proceed(&engine, name, fp("a")).await;
    assert_eq!(fourth.attempt(), 4);
    assert_eq!(fourth.checkpoint(), Some(cp.clone()));
    complete(&engine, &fourth, b"done").await;
    let r = replay(&engine, name, fp("a")).await;
    assert_eq!(r.outcome.as_bytes(), b"done");

    // Without a checkpoint, an unknown outcome is final.
    let plain = proceed(&engine, "ambiguous-plain", fp("a")).await;
    fail(&engine, &plain, FailureKind::Unknown, &[]).await;
    let r = replay(&engine, "ambiguous-plain", fp("a")).await;
    assert_eq!(r.kind, ReplayKind::Unknown);
    let result = engine
        .checkpoint(&plain, "late", b"x".to_vec())
        .await
        .map(|_| ());
    assert!(
        matches!(result, Err(Error::LeaseLost(_))),
        "a finished holder cannot checkpoint, got {result:?}"
    );
}
