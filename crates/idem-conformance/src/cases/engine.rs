//! The engine's guarantees, through the store under test.
//!
//! Each case drives an [`Engine`] with a [`ManualClock`]: the store compares
//! the `now` the engine passes, so moving the clock moves time for every
//! backend, and nothing waits on the wall clock.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use idem_core::machine::Fenced;
use idem_core::store::{Store, Versioned};
use idem_core::{
    Begin, Clock, Engine, Error, Executed, FailureKind, Fingerprint, Lease, ManualClock, Mismatch,
    OnError, Outcome, RecordKey, Replay, ReplayKind,
};

use super::{T0, engine, engine_on, ikey, must, noise, open, policy, reopen, same_bytes, scope};
use crate::StoreFactory;

pub(crate) mod checkpoint;
pub(crate) mod completer;
mod waiting;
pub use checkpoint::{
    ambiguous_ending_with_a_checkpoint_is_resumed, checkpoint_is_fenced,
    next_holder_resumes_across_instances, next_holder_resumes_from_the_checkpoint,
    phases_run_each_external_phase_once_across_a_crash,
};
pub use completer::{
    completer_drives_an_abandoned_key_to_completion, completer_skips_operations_without_a_resume,
};
pub use waiting::{
    heartbeat_keeps_the_lease, wait_for_original_gives_up_after_max,
    wait_for_original_returns_its_outcome,
};

pub(super) fn fp(s: &str) -> Fingerprint {
    Fingerprint::of(s.as_bytes())
}

pub(super) fn rkey(name: &str) -> RecordKey {
    RecordKey::new(&scope(), &ikey(name))
}

pub(super) async fn proceed<S: Store, C: Clock>(
    engine: &Engine<S, C>,
    name: &str,
    fp: Fingerprint,
) -> Lease {
    match engine.begin(&scope(), &ikey(name), fp).await {
        Ok(Begin::Proceed(lease)) => lease,
        other => panic!("begin on `{name}` must proceed, got {other:?}"),
    }
}

pub(super) async fn replay<S: Store, C: Clock>(
    engine: &Engine<S, C>,
    name: &str,
    fp: Fingerprint,
) -> Replay {
    match engine.begin(&scope(), &ikey(name), fp).await {
        Ok(Begin::Replay(replay)) => replay,
        other => panic!("begin on `{name}` must replay, got {other:?}"),
    }
}

pub(super) async fn stored<S: Store, C: Clock>(
    engine: &Engine<S, C>,
    name: &str,
) -> Option<Versioned> {
    must(engine.store())
        .get(&rkey(name), engine.clock().now())
        .await
}

/// Completes `lease` with `outcome`, failing the case if the engine refuses.
pub(super) async fn complete<S: Store, C: Clock>(
    engine: &Engine<S, C>,
    lease: &Lease,
    outcome: &[u8],
) {
    if let Err(e) = engine.complete(lease, Outcome::new(outcome.to_vec())).await {
        panic!("complete by the holder failed: {e} ({e:?})");
    }
}

/// Fails `lease` with `kind` and `outcome`, failing the case if the engine
/// refuses.
pub(super) async fn fail<S: Store, C: Clock>(
    engine: &Engine<S, C>,
    lease: &Lease,
    kind: FailureKind,
    outcome: &[u8],
) {
    if let Err(e) = engine
        .fail(lease, kind, Outcome::new(outcome.to_vec()))
        .await
    {
        panic!("fail by the holder failed: {e} ({e:?})");
    }
}

/// Lets `zombie`'s lease on `name` lapse, and a retry take it over: the new
/// holder's lease, with a new token.
pub(super) async fn take_over<S: Store>(
    engine: &Engine<S, ManualClock>,
    name: &str,
    zombie: &Lease,
) -> Lease {
    engine.clock().advance(policy().lease);
    let holder = proceed(engine, name, fp("a")).await;
    assert_ne!(
        holder.token(),
        zombie.token(),
        "a takeover issues a new token"
    );
    holder
}

pub(super) fn lease_lost(result: Result<(), Error>, what: &str) {
    assert!(
        matches!(result, Err(Error::LeaseLost(_))),
        "{what} must fail with LeaseLost, got {result:?}"
    );
}

/// A completed key replays its outcome byte for byte (every byte value),
/// as many times as asked.
pub async fn replay_returns_byte_exact_outcome<F: StoreFactory>(factory: Arc<F>) {
    let (engine, clock) = engine(open(&*factory).await);
    let mut bytes: Vec<u8> = (0..=255u8).collect();
    bytes.extend(noise(4096, 5));
    let lease = proceed(&engine, "replay", fp("a")).await;
    complete(&engine, &lease, &bytes).await;
    for _ in 0..3 {
        clock.advance(Duration::from_secs(1));
        let r = replay(&engine, "replay", fp("a")).await;
        assert_eq!(r.kind, ReplayKind::Completed);
        if let Err(diff) = same_bytes("replayed outcome", r.outcome.as_bytes(), &bytes) {
            panic!("{diff}");
        }
    }
}

/// A 1 MiB outcome stored through the engine replays byte for byte.
pub async fn large_outcome_replays_byte_exact<F: StoreFactory>(factory: Arc<F>) {
    let (engine, _clock) = engine(open(&*factory).await);
    let bytes = noise(1024 * 1024 + 5, 6);
    let lease = proceed(&engine, "large", fp("a")).await;
    complete(&engine, &lease, &bytes).await;
    let r = replay(&engine, "large", fp("a")).await;
    if let Err(diff) = same_bytes("replayed 1 MiB outcome", r.outcome.as_bytes(), &bytes) {
        panic!("{diff}");
    }
}

/// A different fingerprint gets `Mismatch` in every state a key can be in,
/// and changes nothing.
pub async fn fingerprint_mismatch_in_every_state<F: StoreFactory>(factory: Arc<F>) {
    let (engine, clock) = engine(open(&*factory).await);
    let lease = proceed(&engine, "in-flight", fp("a")).await;
    let lapsed = proceed(&engine, "lapsed", fp("a")).await;
    let done = proceed(&engine, "completed", fp("a")).await;
    complete(&engine, &done, b"ok").await;
    let retry = proceed(&engine, "retryable", fp("a")).await;
    fail(&engine, &retry, FailureKind::Retryable, b"503").await;
    let perm = proceed(&engine, "permanent", fp("a")).await;
    fail(&engine, &perm, FailureKind::Permanent, b"400").await;
    let unknown = proceed(&engine, "unknown", fp("a")).await;
    fail(&engine, &unknown, FailureKind::Unknown, &[]).await;
    // Lapse every lease: the in-flight key is extended to stay live.
    clock.advance(policy().lease - Duration::from_millis(1));
    engine.extend(&lease).await.expect("extend");
    clock.advance(Duration::from_millis(1));
    let _ = lapsed;
    for name in [
        "in-flight",
        "lapsed",
        "completed",
        "retryable",
        "permanent",
        "unknown",
    ] {
        let before = stored(&engine, name).await;
        assert!(before.is_some(), "`{name}` exists");
        match engine.begin(&scope(), &ikey(name), fp("b")).await {
            Ok(Begin::Mismatch(_)) => {}
            other => {
                panic!("a different request on a `{name}` key must get Mismatch, got {other:?}")
            }
        }
        assert_eq!(
            stored(&engine, name).await,
            before,
            "a mismatch must change nothing (`{name}`)"
        );
    }
    let e = engine
        .execute(&scope(), &ikey("completed"), fp("b"), || async { 1u8 })
        .await;
    assert!(
        matches!(e, Err(Error::FingerprintMismatch)),
        "execute with a different request must be FingerprintMismatch, got {e:?}"
    );
}

/// What `begin` with `fp` on `name` reports of the request the key is bound
/// to; fails the case unless it is a mismatch.
async fn mismatch<S: Store, C: Clock>(
    engine: &Engine<S, C>,
    name: &str,
    fp: Fingerprint,
) -> Mismatch {
    match engine.begin(&scope(), &ikey(name), fp).await {
        Ok(Begin::Mismatch(bound)) => bound,
        other => panic!("a different request on `{name}` must get Mismatch, got {other:?}"),
    }
}

/// A mismatch says when the key was first claimed (the record's
/// `created_at`, by the engine's clock) while it is in flight, after a
/// takeover and once it finished, and how it finished once final (`None`
/// in flight or after a retryable failure); a claim over the expired
/// record is a new first use.
pub async fn mismatch_reports_the_first_use<F: StoreFactory>(factory: Arc<F>) {
    let (engine, clock) = engine(open(&*factory).await);
    clock.advance(Duration::from_secs(1));
    let first_use = clock.now();
    let zombie = proceed(&engine, "first-use", fp("a")).await;
    clock.advance(Duration::from_secs(2));
    let bound = mismatch(&engine, "first-use", fp("b")).await;
    assert_eq!(
        (bound.first_used_at, bound.finished),
        (first_use, None),
        "in flight: the first claim's time, nothing finished"
    );
    let holder = take_over(&engine, "first-use", &zombie).await;
    let bound = mismatch(&engine, "first-use", fp("b")).await;
    assert_eq!(
        (bound.first_used_at, bound.finished),
        (first_use, None),
        "a takeover keeps the first use"
    );
    complete(&engine, &holder, b"first body").await;
    let done = Replay {
        outcome: Outcome::new(&b"first body"[..]),
        kind: ReplayKind::Completed,
    };
    for _ in 0..2 {
        clock.advance(Duration::from_secs(1));
        let bound = mismatch(&engine, "first-use", fp("b")).await;
        assert_eq!(
            (bound.first_used_at, bound.finished),
            (first_use, Some(done.clone())),
            "completed: the first use and the stored outcome"
        );
    }
    let failed_at = clock.now();
    let retryable = proceed(&engine, "retryable", fp("a")).await;
    fail(&engine, &retryable, FailureKind::Retryable, b"503").await;
    let permanent = proceed(&engine, "permanent", fp("a")).await;
    fail(&engine, &permanent, FailureKind::Permanent, b"400").await;
    clock.advance(Duration::from_secs(1));
    let bound = mismatch(&engine, "retryable", fp("b")).await;
    assert_eq!(
        (bound.first_used_at, bound.finished),
        (failed_at, None),
        "a retryable failure is not finished: it may run again"
    );
    let bound = mismatch(&engine, "permanent", fp("b")).await;
    assert_eq!(
        (bound.first_used_at, bound.finished),
        (
            failed_at,
            Some(Replay {
                outcome: Outcome::new(&b"400"[..]),
                kind: ReplayKind::Failed,
            })
        ),
        "a permanent failure is final"
    );
    let expires_at = stored(&engine, "first-use")
        .await
        .expect("the completed record is stored")
        .record
        .expires_at;
    clock.set(expires_at);
    let again = clock.now();
    let fresh = proceed(&engine, "first-use", fp("b")).await;
    let bound = mismatch(&engine, "first-use", fp("a")).await;
    assert_eq!(
        (bound.first_used_at, bound.finished),
        (again, None),
        "a claim over the expired record is a new first use"
    );
    engine.release(&fresh).await.expect("release by the holder");
}

/// A duplicate of an in-flight request is told how long the holder's lease
/// has left, and that shrinks as the clock moves.
pub async fn in_progress_reports_time_left<F: StoreFactory>(factory: Arc<F>) {
    let (engine, clock) = engine(open(&*factory).await);
    let _lease = proceed(&engine, "busy", fp("a")).await;
    for (elapsed, left) in [(0, 10_000), (4_000, 6_000), (9_999, 1)] {
        clock.set(T0.plus(Duration::from_millis(elapsed)));
        match engine.begin(&scope(), &ikey("busy"), fp("a")).await {
            Ok(Begin::InProgress { retry_after }) => assert_eq!(
                retry_after,
                Duration::from_millis(left),
                "{elapsed} ms into a 10 s lease"
            ),
            other => panic!("a duplicate must be InProgress, got {other:?}"),
        }
    }
    let e = engine
        .execute(&scope(), &ikey("busy"), fp("a"), || async { 1u8 })
        .await;
    assert!(matches!(e, Err(Error::InProgress { .. })), "got {e:?}");
}

/// After a lease lapses, a retry takes over with a new fencing token; the
/// old holder (a zombie) can then neither complete, fail, extend nor
/// release, before or after the new holder finished, and the new holder's
/// result is what retries replay.
async fn takeover_fences<S: Store>(a: Engine<S, ManualClock>, b: Engine<S, ManualClock>) {
    let zombie = proceed(&a, "fenced", fp("a")).await;
    let holder = take_over(&b, "fenced", &zombie).await;
    assert_eq!(holder.attempt(), 2);
    let claim = stored(&a, "fenced").await;
    lease_lost(
        a.complete(&zombie, Outcome::new(&b"zombie"[..])).await,
        "the zombie's complete",
    );
    lease_lost(
        a.fail(
            &zombie,
            FailureKind::Permanent,
            Outcome::new(&b"zombie"[..]),
        )
        .await,
        "the zombie's fail",
    );
    lease_lost(a.extend(&zombie).await, "the zombie's extend");
    lease_lost(a.release(&zombie).await, "the zombie's release");
    assert_eq!(
        stored(&a, "fenced").await,
        claim,
        "a fenced zombie must change nothing"
    );
    b.complete(&holder, Outcome::new(&b"new holder"[..]))
        .await
        .expect("the new holder completes");
    let result = stored(&a, "fenced").await;
    lease_lost(
        a.complete(&zombie, Outcome::new(&b"zombie"[..])).await,
        "the zombie's complete after the new holder finished",
    );
    lease_lost(
        a.release(&zombie).await,
        "the zombie's release after the new holder finished",
    );
    assert_eq!(
        stored(&a, "fenced").await,
        result,
        "the zombie must not overwrite the new holder's result"
    );
    let r = replay(&a, "fenced", fp("a")).await;
    assert_eq!(r.outcome.as_bytes(), b"new holder");
}

/// Lease expiry takeover issues a new token and fences the zombie (one instance).
pub async fn takeover_fences_zombie<F: StoreFactory>(factory: Arc<F>) {
    let store = open(&*factory).await;
    let clock = ManualClock::new(T0);
    let a = engine_on(store.clone(), &clock, policy());
    takeover_fences(a, engine_on(store, &clock, policy())).await;
}

/// The same, with the zombie and the new holder on two instances sharing
/// records (two application servers).
pub async fn takeover_across_instances_fences_zombie<F: StoreFactory>(factory: Arc<F>) {
    let a = open(&*factory).await;
    let b = Arc::new(reopen(&*factory, &a).await);
    let clock = ManualClock::new(T0);
    takeover_fences(
        engine_on(a, &clock, policy()),
        engine_on(b, &clock, policy()),
    )
    .await;
}

/// Release makes the key absent: a retry proceeds at once as a first
/// attempt with a new token, and may use another fingerprint.
pub async fn release_lets_a_retry_proceed<F: StoreFactory>(factory: Arc<F>) {
    let (engine, _clock) = engine(open(&*factory).await);
    let first = proceed(&engine, "released", fp("a")).await;
    engine.release(&first).await.expect("release");
    assert_eq!(
        stored(&engine, "released").await,
        None,
        "a released key is absent"
    );
    let second = proceed(&engine, "released", fp("b")).await;
    assert_ne!(second.token(), first.token());
    assert_eq!(second.attempt(), 1, "after a release the key starts afresh");
    lease_lost(
        engine.complete(&first, Outcome::new(&b"late"[..])).await,
        "complete by the released holder",
    );
    complete(&engine, &second, b"second").await;
    let r = replay(&engine, "released", fp("b")).await;
    assert_eq!(r.outcome.as_bytes(), b"second");
}

/// A retryable failure lets the same request run again (attempt 2, same
/// fingerprint), while another request still gets `Mismatch`.
pub async fn retryable_failure_lets_a_retry_proceed<F: StoreFactory>(factory: Arc<F>) {
    let (engine, _clock) = engine(open(&*factory).await);
    let first = proceed(&engine, "retryable", fp("a")).await;
    fail(&engine, &first, FailureKind::Retryable, b"503").await;
    let rec = stored(&engine, "retryable")
        .await
        .expect("the failure is stored");
    assert_eq!(rec.record.state.name(), "failed_retryable");
    assert!(matches!(
        engine.begin(&scope(), &ikey("retryable"), fp("b")).await,
        Ok(Begin::Mismatch(_))
    ));
    let second = proceed(&engine, "retryable", fp("a")).await;
    assert_eq!(
        second.attempt(),
        2,
        "a retry of a retryable failure is attempt 2"
    );
    assert_ne!(second.token(), first.token());
    complete(&engine, &second, b"200").await;
    let r = replay(&engine, "retryable", fp("a")).await;
    assert_eq!(r.outcome.as_bytes(), b"200");
}

/// A permanent failure is final: retries replay it as a failure, byte for byte.
pub async fn permanent_failure_is_replayed<F: StoreFactory>(factory: Arc<F>) {
    let (engine, _clock) = engine(open(&*factory).await);
    let first = proceed(&engine, "permanent", fp("a")).await;
    let body = noise(777, 8);
    fail(&engine, &first, FailureKind::Permanent, &body).await;
    for _ in 0..2 {
        let r = replay(&engine, "permanent", fp("a")).await;
        assert_eq!(
            r.kind,
            ReplayKind::Failed,
            "a permanent failure replays as failed"
        );
        assert_eq!(r.outcome.as_bytes(), &body[..]);
    }
}

/// `try_execute`: a released error and a retryable error run the work again;
/// a permanent error is replayed as the same error.
pub async fn try_execute_follows_on_error<F: StoreFactory>(factory: Arc<F>) {
    let (engine, _clock) = engine(open(&*factory).await);
    let runs = AtomicUsize::new(0);
    let call = |on_error: OnError, result: Result<u32, String>| {
        let runs = &runs;
        let engine = &engine;
        async move {
            engine
                .try_execute(
                    &scope(),
                    &ikey("try"),
                    fp("a"),
                    || async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        result
                    },
                    move |_| on_error,
                )
                .await
                .expect("try_execute")
        }
    };
    let r = call(OnError::Release, Err("timeout".into())).await;
    assert_eq!(r, Executed::Fresh(Err("timeout".to_string())));
    let r = call(OnError::StoreRetryable, Err("503".into())).await;
    assert_eq!(r, Executed::Fresh(Err("503".to_string())));
    let r = call(OnError::StorePermanent, Err("declined".into())).await;
    assert_eq!(r, Executed::Fresh(Err("declined".to_string())));
    assert_eq!(
        runs.load(Ordering::SeqCst),
        3,
        "released and retryable errors run again"
    );
    let r = call(OnError::StorePermanent, Ok(1)).await;
    assert_eq!(
        r,
        Executed::Replayed(Err("declined".to_string())),
        "a permanent error is replayed"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 3, "a replay runs nothing");
}

/// `execute` runs the work once and replays its value afterwards.
pub async fn execute_runs_once_and_replays<F: StoreFactory>(factory: Arc<F>) {
    let (engine, clock) = engine(open(&*factory).await);
    let runs = AtomicUsize::new(0);
    for i in 0..3 {
        let got = engine
            .execute(&scope(), &ikey("exec"), fp("a"), || async {
                runs.fetch_add(1, Ordering::SeqCst);
                vec![String::from("ch_1"), String::from("€")]
            })
            .await
            .expect("execute");
        let want = vec!["ch_1".to_string(), "€".to_string()];
        if i == 0 {
            assert_eq!(got, Executed::Fresh(want));
        } else {
            assert_eq!(got, Executed::Replayed(want));
        }
        clock.advance(Duration::from_secs(5));
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// Completing again with the same outcome succeeds without change (a retry
/// after a lost reply); with another outcome it is refused.
pub async fn complete_is_idempotent_for_its_holder<F: StoreFactory>(factory: Arc<F>) {
    let (engine, clock) = engine(open(&*factory).await);
    let lease = proceed(&engine, "twice", fp("a")).await;
    complete(&engine, &lease, b"once").await;
    let done = stored(&engine, "twice").await;
    clock.advance(Duration::from_secs(1));
    engine
        .complete(&lease, Outcome::new(&b"once"[..]))
        .await
        .expect("completing again with the same outcome succeeds");
    assert_eq!(stored(&engine, "twice").await, done, "and changes nothing");
    match engine.complete(&lease, Outcome::new(&b"other"[..])).await {
        Err(Error::LeaseLost(Fenced::Finished {
            by_holder: true, ..
        })) => {}
        other => panic!("completing with another outcome must be refused, got {other:?}"),
    }
    assert_eq!(stored(&engine, "twice").await, done);
}

/// Once a finished record expires (TTL), the key is absent: any request
/// claims it afresh as attempt 1.
pub async fn expired_key_is_claimed_afresh<F: StoreFactory>(factory: Arc<F>) {
    let (engine, clock) = engine(open(&*factory).await);
    let lease = proceed(&engine, "ttl", fp("a")).await;
    complete(&engine, &lease, b"old").await;
    clock.advance(policy().ttl - Duration::from_millis(1));
    replay(&engine, "ttl", fp("a")).await;
    clock.advance(Duration::from_millis(1));
    assert_eq!(stored(&engine, "ttl").await, None, "expired at its TTL");
    let again = proceed(&engine, "ttl", fp("b")).await;
    assert_eq!(again.attempt(), 1);
}
