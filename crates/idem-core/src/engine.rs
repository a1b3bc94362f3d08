//! The engine: drives a [`Store`] through the key state machine.

use std::future::Future;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::future::{Either, select};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::lease::Claims;
use crate::{
    Clock, Decision, Error, FailureKind, Fenced, FencingToken, Fingerprint, IdempotencyKey,
    InFlightPolicy, Inserted, Lease, Outcome, Policy, PolicyError, Record, RecordKey, Revision,
    Scope, State, Store, Swapped, Timestamp, Transition, Versioned, codec, decide,
};

/// What [`Engine::begin`] found.
#[derive(Debug)]
#[must_use = "a Proceed lease must be completed, failed or released"]
pub enum Begin {
    /// The caller holds the key: run the operation, then
    /// [`complete`](Engine::complete), [`fail`](Engine::fail) or
    /// [`release`](Engine::release) the lease.
    Proceed(Lease),
    /// The key finished before: answer with its stored outcome.
    Replay(Replay),
    /// Another request holds the key; its lease lapses after `retry_after`.
    InProgress {
        /// Time left on the holder's lease (for `Retry-After`).
        retry_after: Duration,
    },
    /// The key is bound to a different request (HTTP 422).
    Mismatch,
}

/// A stored outcome to answer a retry with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replay {
    /// The stored bytes.
    pub outcome: Outcome,
    /// How the key finished.
    pub kind: ReplayKind,
}

/// How the replayed key finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReplayKind {
    /// It completed.
    Completed,
    /// It failed permanently.
    Failed,
    /// It ended without a known result ([`FailureKind::Unknown`]): the work
    /// may or may not have taken effect. Answer "outcome unknown"; never run
    /// it again automatically.
    Unknown,
}

/// How a holder ends its claim; see [`Engine::settle`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Ending {
    /// The work finished with this result: store it for replay.
    Complete(Outcome),
    /// The work failed: store the failure (see [`FailureKind`]).
    Fail(FailureKind, Outcome),
    /// The work may have taken effect but its result is not known: finish
    /// the key as [`FailureKind::Unknown`].
    Unknown,
    /// The work declared that nothing took effect: delete the claim so that
    /// a retry runs it afresh.
    Release,
}

/// What [`Engine::shutdown`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Shutdown {
    /// Claims still running when the shutdown began.
    pub running: usize,
    /// Of those, how many finished by themselves within the grace period.
    pub finished: usize,
    /// Claims still running after the grace period, finished as
    /// [`FailureKind::Unknown`] (never run again; retries get "outcome unknown").
    pub marked_unknown: usize,
    /// Claims that could not be marked (the store failed): they stay in
    /// flight until their lease lapses, and a retry then runs them again.
    pub left_in_flight: usize,
}

/// The result of [`Engine::execute`]: whether the work ran now or its stored
/// result was replayed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Executed<T> {
    /// The work ran in this call.
    Fresh(T),
    /// An earlier call ran it; this is its stored result.
    Replayed(T),
}

impl<T> Executed<T> {
    /// The value, fresh or replayed.
    pub fn into_inner(self) -> T {
        match self {
            Self::Fresh(v) | Self::Replayed(v) => v,
        }
    }
    /// Whether the value was replayed.
    pub fn is_replayed(&self) -> bool {
        matches!(self, Self::Replayed(_))
    }
}

/// What [`Engine::try_execute`] does with an error of the work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnError {
    /// Release the key without storing anything: a retry runs the work again
    /// (for failures before any side effect).
    Release,
    /// Store the error as a retryable failure: the key stays bound to this
    /// request's fingerprint, and a retry of it runs the work again.
    StoreRetryable,
    /// Store the error as the key's final outcome: retries replay it.
    StorePermanent,
}

/// Fresh tokens and revisions: a per-engine random seed and a counter.
#[derive(Debug)]
struct Ids {
    seed: u64,
    counter: AtomicU64,
}

impl Ids {
    fn new() -> Self {
        // `RandomState` keys come from the operating system's randomness.
        let seed = std::collections::hash_map::RandomState::new().hash_one(0x1de7_u64);
        Self {
            seed,
            counter: AtomicU64::new(0),
        }
    }
    fn next(&self) -> u64 {
        self.counter.fetch_add(1, Ordering::Relaxed)
    }
    fn token(&self) -> FencingToken {
        FencingToken::from_u128((u128::from(self.seed) << 64) | u128::from(self.next()))
    }
    fn revision(&self) -> Revision {
        // splitmix64: a bijection of the counter, keyed by the seed.
        let mut z = self
            .seed
            .wrapping_add(self.next().wrapping_mul(0x9e37_79b9_7f4a_7c15));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Revision::from_u64(z ^ (z >> 31))
    }
}

/// Runs the key state machine against a [`Store`].
///
/// # Behavior
/// - [`begin`](Self::begin) makes one store call for a new key (the claim) and
///   one for a finished key (the replay); [`complete`](Self::complete) makes one.
/// - Races on a key are settled by the store's atomic primitives; the engine
///   re-reads and decides again after losing one, at most
///   [`Policy::max_cas_retries`] times.
/// - Every time decision uses the injected [`Clock`].
/// - Clones share the store, the clock and the registry of running claims
///   that [`shutdown`](Self::shutdown) waits for; cloning is cheap.
#[derive(Debug)]
pub struct Engine<S, C = DefaultClock> {
    shared: Arc<Shared<S, C>>,
    policy: Arc<Policy>,
    outcome_limit: usize,
}

#[derive(Debug)]
struct Shared<S, C> {
    store: S,
    clock: C,
    ids: Ids,
    claims: Arc<Claims>,
}

impl<S, C> Clone for Engine<S, C> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            policy: Arc::clone(&self.policy),
            outcome_limit: self.outcome_limit,
        }
    }
}

/// The engine's default clock: [`SystemClock`](crate::SystemClock) with the
/// `tokio` feature, [`ManualClock`](crate::ManualClock) otherwise.
#[cfg(feature = "tokio")]
pub type DefaultClock = crate::SystemClock;
/// The engine's default clock: [`SystemClock`](crate::SystemClock) with the
/// `tokio` feature, [`ManualClock`](crate::ManualClock) otherwise.
#[cfg(not(feature = "tokio"))]
pub type DefaultClock = crate::ManualClock;

#[cfg(feature = "tokio")]
impl<S: Store> Engine<S, crate::SystemClock> {
    /// An engine over `store` with the system clock and the default [`Policy`].
    pub fn new(store: S) -> Self {
        Self::with_clock(store, crate::SystemClock)
    }
}

impl<S: Store, C: Clock> Engine<S, C> {
    /// An engine over `store` reading time from `clock`, with the default [`Policy`].
    pub fn with_clock(store: S, clock: C) -> Self {
        let policy = Policy::default();
        let outcome_limit = outcome_limit(&store, &policy);
        Self {
            shared: Arc::new(Shared {
                store,
                clock,
                ids: Ids::new(),
                claims: Arc::default(),
            }),
            policy: Arc::new(policy),
            outcome_limit,
        }
    }

    /// The same engine with `policy`, checked by [`Policy::validate`].
    ///
    /// # Errors
    /// The policy's [`PolicyError`]; nothing is built.
    pub fn with_policy(mut self, policy: Policy) -> Result<Self, PolicyError> {
        policy.validate()?;
        self.outcome_limit = outcome_limit(&self.shared.store, &policy);
        self.policy = Arc::new(policy);
        Ok(self)
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.shared.store
    }
    /// The clock.
    pub fn clock(&self) -> &C {
        &self.shared.clock
    }
    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The largest outcome this engine stores, in bytes: the smaller of
    /// [`Policy::max_outcome_bytes`] and what the store's declared
    /// [`max_record_bytes`](crate::Capabilities::max_record_bytes) leaves
    /// after a record's fixed fields ([`codec::RECORD_OVERHEAD`]).
    pub fn outcome_limit(&self) -> usize {
        self.outcome_limit
    }

    /// Whether [`shutdown`](Self::shutdown) has begun: new claims are refused
    /// with [`Error::ShuttingDown`].
    pub fn is_shutting_down(&self) -> bool {
        self.shared.claims.is_closing()
    }

    /// Starts a request carrying `key` within `scope`.
    ///
    /// # Behavior
    /// Applies [`decide`] to what the store holds: claims an absent or expired
    /// key ([`Begin::Proceed`]), takes over a lapsed lease or a retryable
    /// failure with a new fencing token (`Proceed` again), replays a finished
    /// key ([`Begin::Replay`]), reports a live claim ([`Begin::InProgress`],
    /// after waiting if the policy says [`InFlightPolicy::Wait`]) or a
    /// different request ([`Begin::Mismatch`]). Of any number of concurrent
    /// calls on one key, at most one gets `Proceed` per claim. After
    /// [`shutdown`](Self::shutdown) began: [`Error::ShuttingDown`], nothing
    /// read or written.
    pub async fn begin(
        &self,
        scope: &Scope,
        key: &IdempotencyKey,
        fingerprint: Fingerprint,
    ) -> Result<Begin, Error> {
        self.begin_key(RecordKey::new(scope, key), fingerprint)
            .await
    }

    /// [`begin`](Self::begin) with a precomputed [`RecordKey`].
    pub async fn begin_key(
        &self,
        key: RecordKey,
        fingerprint: Fingerprint,
    ) -> Result<Begin, Error> {
        if self.is_shutting_down() {
            return Err(Error::ShuttingDown);
        }
        let (store, clock, ids) = (&self.shared.store, &self.shared.clock, &self.shared.ids);
        let started = clock.now();
        let wait_until = match self.policy.in_flight {
            InFlightPolicy::Reject => None,
            InFlightPolicy::Wait { max, poll } => Some((started.plus(max), poll)),
        };
        let mut poll = wait_until.map_or(Duration::ZERO, |(_, poll)| poll);
        let max_poll = poll.saturating_mul(8);
        // `None`: nothing seen yet, or the key looked absent: try to insert.
        let mut seen: Option<Versioned> = None;
        // Only writes that lose a race count: the first insert finding the
        // key is how the engine learns that it exists.
        let mut inserts = 0_u32;
        let mut races = 0_u32;
        loop {
            let now = clock.now();
            let decision = decide(seen.as_ref().map(|v| &v.record), &fingerprint, now);
            match (decision, seen.take()) {
                (Decision::Claim, _) => {
                    let claim = Versioned {
                        revision: ids.revision(),
                        record: Record::new_claim(fingerprint, ids.token(), now, &self.policy),
                    };
                    inserts += 1;
                    match store.insert_if_absent(&key, &claim, now).await? {
                        Inserted::Inserted => return Ok(Begin::Proceed(self.lease(key, claim))),
                        Inserted::Exists(current) => {
                            seen = Some(current);
                            if inserts == 1 {
                                continue;
                            }
                        }
                    }
                }
                (Decision::Reclaim(reason), Some(current)) => {
                    let next = Versioned {
                        revision: ids.revision(),
                        record: current.record.reclaim(ids.token(), now, &self.policy),
                    };
                    match store
                        .compare_and_swap(&key, current.revision, &next, now)
                        .await?
                    {
                        Swapped::Swapped => {
                            tracing::debug!(
                                ?reason,
                                attempt = next.record.attempts,
                                "idem: reclaimed key"
                            );
                            return Ok(Begin::Proceed(self.lease(key, next)));
                        }
                        Swapped::Conflict(current) => seen = current,
                    }
                }
                (Decision::Replay, Some(current)) => {
                    return match current.record.state {
                        State::Completed { outcome, .. } => Ok(Begin::Replay(Replay {
                            outcome,
                            kind: ReplayKind::Completed,
                        })),
                        State::Failed {
                            kind: FailureKind::Unknown,
                            outcome,
                            ..
                        } => Ok(Begin::Replay(Replay {
                            outcome,
                            kind: ReplayKind::Unknown,
                        })),
                        State::Failed { outcome, .. } => Ok(Begin::Replay(Replay {
                            outcome,
                            kind: ReplayKind::Failed,
                        })),
                        State::InFlight { .. } => Err(Error::Contention),
                    };
                }
                (Decision::Mismatch, _) => return Ok(Begin::Mismatch),
                (Decision::InProgress { retry_after }, _) => {
                    let Some((until, _)) = wait_until.filter(|(until, _)| now < *until) else {
                        return Ok(Begin::InProgress { retry_after });
                    };
                    let nap = poll
                        .min(until.since(now))
                        .min(retry_after)
                        .max(Duration::from_millis(1));
                    clock.sleep(nap).await;
                    poll = poll.saturating_mul(2).min(max_poll);
                    // Absent now (released or expired while we waited): the
                    // next round claims it.
                    seen = store.get(&key, clock.now()).await?;
                    continue;
                }
                // Reclaim or Replay without a record cannot happen (decide on
                // `None` is always `Claim`).
                (Decision::Reclaim(_) | Decision::Replay, None) => {}
            }
            races += 1;
            if races > self.policy.max_cas_retries {
                return Err(Error::Contention);
            }
        }
    }

    fn lease(&self, key: RecordKey, current: Versioned) -> Lease {
        Lease::new(key, current, Some(&self.shared.claims))
    }

    /// Completes the claim with `outcome`: retries with the same fingerprint
    /// replay it until the record expires.
    ///
    /// # Behavior
    /// One store call. Fails with [`Error::LeaseLost`], changing nothing, if
    /// the lease was taken over, expired, or already finished otherwise, and
    /// with [`Error::OutcomeTooLarge`], writing nothing, if `outcome` is over
    /// [`outcome_limit`](Self::outcome_limit).
    /// Completing again with the same outcome succeeds, so retrying after a
    /// transient store error is safe: if the first call had taken effect, the
    /// retry sees this holder's own write and succeeds.
    pub async fn complete(&self, lease: &Lease, outcome: Outcome) -> Result<(), Error> {
        self.check_size(&outcome)?;
        let done = State::Completed {
            token: lease.token(),
            outcome: outcome.clone(),
        };
        if lease.is_finished() && lease.record().record.state == done {
            return Ok(());
        }
        self.finish(lease, true, |record, now| {
            record.complete(lease.token(), outcome.clone(), now, &self.policy)
        })
        .await
    }

    /// Fails the claim, storing `outcome`; see [`FailureKind`].
    ///
    /// # Behavior
    /// As [`complete`](Self::complete).
    pub async fn fail(
        &self,
        lease: &Lease,
        kind: FailureKind,
        outcome: Outcome,
    ) -> Result<(), Error> {
        self.check_size(&outcome)?;
        let done = State::Failed {
            token: lease.token(),
            kind,
            outcome: outcome.clone(),
        };
        if lease.is_finished() && lease.record().record.state == done {
            return Ok(());
        }
        self.finish(lease, true, |record, now| {
            record.fail(lease.token(), kind, outcome.clone(), now, &self.policy)
        })
        .await
    }

    /// Extends the lease to `now + policy.lease` (a heartbeat).
    ///
    /// # Behavior
    /// One store call; [`Error::LeaseLost`] if the lease is no longer held.
    pub async fn extend(&self, lease: &Lease) -> Result<(), Error> {
        self.finish(lease, false, |record, now| {
            record.extend(lease.token(), now, &self.policy)
        })
        .await
    }

    /// Releases the claim without storing anything: the key becomes absent,
    /// and a retry runs the operation again. Only for work that declared that
    /// nothing took effect.
    ///
    /// # Behavior
    /// - One store call; [`Error::LeaseLost`], changing nothing, if the lease
    ///   is no longer held.
    /// - If the key is absent when the release looks (an earlier release of
    ///   ours whose reply was lost, the record expired, or, for a holder that
    ///   was taken over, the new holder released it too), the release returns
    ///   `Ok`: there is nothing to undo, and nothing is written. Only a
    ///   record that someone else holds or finished is reported as lost.
    pub async fn release(&self, lease: &Lease) -> Result<(), Error> {
        let store = &self.shared.store;
        for _ in 0..=self.policy.max_cas_retries {
            let current = lease.record();
            let now = self.shared.clock.now();
            if let Err(fenced) = current.record.check_holder(lease.token(), now) {
                lease.mark_lost();
                return Err(Error::LeaseLost(fenced));
            }
            if store.delete_if(lease.key(), current.revision, now).await? {
                lease.set_finished();
                return Ok(());
            }
            match store.get(lease.key(), now).await? {
                // Our own heartbeat moved the revision: try again with it.
                Some(seen) if seen.record.check_holder(lease.token(), now).is_ok() => {
                    lease.observe(seen, false);
                }
                Some(seen) => {
                    lease.mark_lost();
                    return Err(Error::LeaseLost(
                        seen.record
                            .check_holder(lease.token(), now)
                            .err()
                            .unwrap_or(Fenced::TakenOver),
                    ));
                }
                None => {
                    // Absent: released by an earlier attempt of ours whose
                    // reply was lost, or expired.
                    lease.set_finished();
                    return Ok(());
                }
            }
        }
        Err(Error::Contention)
    }

    /// Ends the claim as `ending` says, retrying store errors for as long as
    /// the write can still matter.
    ///
    /// # Behavior
    /// - `Complete` with an outcome over [`outcome_limit`](Self::outcome_limit),
    ///   or one the store refuses permanently, becomes `Unknown`: the work
    ///   ran, so the key is never left to run again.
    /// - Any other error but [`Error::LeaseLost`] is retried, backing off from
    ///   a fiftieth of the lease up to a third of it, until one lease after the
    ///   lease's deadline; then the last error is returned and the key stays
    ///   in flight until its lease lapses (a retry then runs the work again:
    ///   the window "store unreachable after the work" in docs/reliability.md).
    /// - Returns the ending actually written.
    pub async fn settle(&self, lease: &Lease, ending: Ending) -> Result<Ending, Error> {
        let until = lease.deadline().plus(self.policy.lease);
        self.settle_until(lease, ending, until).await
    }

    /// [`settle`](Self::settle), retrying only until `until` on the
    /// engine's clock (a time already past: one attempt, plus the switch to
    /// `Unknown` for a result the store refuses).
    pub async fn settle_until(
        &self,
        lease: &Lease,
        mut ending: Ending,
        until: Timestamp,
    ) -> Result<Ending, Error> {
        let clock = &self.shared.clock;
        let first = (self.policy.lease / 50).max(Duration::from_millis(1));
        let most = (self.policy.lease / 3).max(first);
        let mut wait = first;
        loop {
            let result = match &ending {
                Ending::Complete(outcome) => self.complete(lease, outcome.clone()).await,
                Ending::Fail(kind, outcome) => self.fail(lease, *kind, outcome.clone()).await,
                Ending::Unknown => {
                    self.fail(lease, FailureKind::Unknown, Outcome::default())
                        .await
                }
                Ending::Release => self.release(lease).await,
            };
            let error = match result {
                Ok(()) => return Ok(ending),
                Err(e @ Error::LeaseLost(_)) => return Err(e),
                Err(e) => e,
            };
            if matches!(ending, Ending::Complete(_) | Ending::Fail(..)) && !error.is_transient() {
                tracing::error!(error = %error, "idem: the result of the work cannot be stored; finishing the key as outcome unknown");
                ending = Ending::Unknown;
                continue;
            }
            let now = clock.now();
            if now >= until {
                tracing::error!(error = %error, "idem: could not end the claim; the key stays in flight until its lease lapses");
                return Err(error);
            }
            tracing::warn!(error = %error, "idem: ending the claim failed; retrying");
            clock.sleep(wait.min(until.since(now))).await;
            wait = wait.saturating_mul(2).min(most);
        }
    }

    /// Prepares the completion of `lease` for a store to apply inside the
    /// caller's database transaction; see [`Transition`].
    pub fn prepare_complete(&self, lease: &Lease, outcome: Outcome) -> Result<Transition, Error> {
        self.check_size(&outcome)?;
        let current = lease.record();
        let now = self.shared.clock.now();
        let record = current
            .record
            .complete(lease.token(), outcome, now, &self.policy)
            .map_err(Error::LeaseLost)?;
        Ok(Transition {
            key: lease.key().clone(),
            token: lease.token(),
            next: Versioned {
                revision: self.shared.ids.revision(),
                record,
            },
        })
    }

    /// Prepares a failure of `lease` for a store to apply inside the caller's
    /// database transaction; see [`Transition`].
    pub fn prepare_fail(
        &self,
        lease: &Lease,
        kind: FailureKind,
        outcome: Outcome,
    ) -> Result<Transition, Error> {
        self.check_size(&outcome)?;
        let current = lease.record();
        let now = self.shared.clock.now();
        let record = current
            .record
            .fail(lease.token(), kind, outcome, now, &self.policy)
            .map_err(Error::LeaseLost)?;
        Ok(Transition {
            key: lease.key().clone(),
            token: lease.token(),
            next: Versioned {
                revision: self.shared.ids.revision(),
                record,
            },
        })
    }

    /// Extends `lease` every third of the policy's lease duration until the
    /// lease is finished (returns `Ok`) or lost (returns the error).
    ///
    /// # Behavior
    /// - Run it beside long work (`select`/`join`): a slow but live holder is
    ///   then never taken over.
    /// - Any store error (transient or not) is retried, every twelfth of the
    ///   lease: only the store can say that the lease is lost, and a stopped
    ///   heartbeat would let a duplicate take over and run the work again.
    ///   If the deadline passes before an extension succeeds,
    ///   [`Lease::lost`] fires (a duplicate may take over from then on) but
    ///   the heartbeat keeps trying; it returns only when the store reports
    ///   the lease lost ([`Error::LeaseLost`]) or the lease is finished.
    /// - With [`Policy::max_hold`], once the claim has been held that long the
    ///   key is finished as [`FailureKind::Unknown`], [`Lease::lost`] fires and
    ///   the heartbeat returns [`Error::LeaseLost`].
    pub async fn keep_alive(&self, lease: &Lease) -> Result<(), Error> {
        let clock = &self.shared.clock;
        let beat = (self.policy.lease / 3).max(Duration::from_millis(1));
        let retry = (self.policy.lease / 12).max(Duration::from_millis(1));
        let mut wait = beat;
        loop {
            clock.sleep(wait).await;
            if lease.is_finished() {
                return Ok(());
            }
            let now = clock.now();
            if let Some(hold) = self.policy.max_hold
                && now >= lease.claimed_at().plus(hold)
            {
                tracing::error!(
                    held_ms = u64::try_from(now.since(lease.claimed_at()).as_millis())
                        .unwrap_or(u64::MAX),
                    "idem: the work held its key past the policy's max_hold; finishing it as outcome unknown"
                );
                lease.mark_lost();
                return match self.settle(lease, Ending::Unknown).await {
                    Ok(_) => Err(Error::LeaseLost(Fenced::Finished {
                        state: "failed_unknown",
                        by_holder: true,
                    })),
                    Err(e) => Err(e),
                };
            }
            match self.extend(lease).await {
                Ok(()) => wait = beat,
                Err(_) if lease.is_finished() => return Ok(()),
                Err(e @ Error::LeaseLost(_)) => {
                    lease.mark_lost();
                    return Err(e);
                }
                Err(e) => {
                    if clock.now() >= lease.deadline() {
                        tracing::error!(error = %e, "idem: heartbeat failed past the lease deadline; a duplicate may take the key over");
                        lease.mark_lost();
                    } else {
                        tracing::warn!(error = %e, "idem: heartbeat failed; retrying");
                    }
                    wait = retry;
                }
            }
        }
    }

    /// Runs `work` at most once per (scope, key): the first call runs it and
    /// stores its result; later calls with the same fingerprint get the stored
    /// result back.
    ///
    /// # Behavior
    /// - Fresh: `work` runs with a heartbeat beside it, its value is encoded
    ///   with the [`codec`] and stored ([`settle`](Self::settle)), then
    ///   returned as [`Executed::Fresh`]. A value that cannot be stored (too
    ///   large, not encodable, refused by the store) is still returned; the
    ///   key is finished as [`FailureKind::Unknown`] and retries get
    ///   [`Error::OutcomeUnknown`].
    /// - Once `work` has started, the key is never left to run again: if
    ///   this future is dropped or `work` panics, a task on the current tokio
    ///   runtime finishes the key as [`FailureKind::Unknown`] (or stores the
    ///   value, if it was already produced). Without a runtime (or without the
    ///   `tokio` feature) the key stays in flight until its lease lapses.
    /// - Replay: the stored value is decoded and returned as
    ///   [`Executed::Replayed`]; a key that ended with its outcome unknown
    ///   gives [`Error::OutcomeUnknown`].
    /// - In flight elsewhere: [`Error::InProgress`]; bound to another request:
    ///   [`Error::FingerprintMismatch`]. `work` does not run in either case.
    /// - If storing the result keeps failing (see [`settle`](Self::settle)),
    ///   the error is returned and the key stays in flight until its lease
    ///   lapses.
    ///
    /// The same call serves an HTTP handler and a queue consumer:
    ///
    /// ```
    /// # use idem_core::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Error> {
    /// let engine = Engine::new(MemoryStore::new());
    /// // A message redelivered by the broker carries the same id.
    /// let scope = Scope::tenant("billing").with_operation("invoice.paid");
    /// for _delivery in 0..3 {
    ///     let message_id = IdempotencyKey::parse("msg-0001")?;
    ///     let body = br#"{"invoice":17}"#;
    ///     let done = engine
    ///         .execute(&scope, &message_id, Fingerprint::of(body), || async { "credited".to_string() })
    ///         .await?;
    ///     assert_eq!(done.into_inner(), "credited");
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn execute<T, F, Fut>(
        &self,
        scope: &Scope,
        key: &IdempotencyKey,
        fingerprint: Fingerprint,
        work: F,
    ) -> Result<Executed<T>, Error>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = T>,
    {
        match self.begin(scope, key, fingerprint).await? {
            Begin::Proceed(lease) => {
                let mut guard = SettleOnDrop::new(self, &lease);
                let value = self.run_with_heartbeat(&lease, work()).await;
                let ending = match codec::encode(&value) {
                    Ok(bytes) => Ending::Complete(Outcome::new(bytes)),
                    Err(e) => {
                        tracing::error!(error = %e, "idem: the work's value cannot be encoded; finishing the key as outcome unknown");
                        Ending::Unknown
                    }
                };
                guard.pending(ending.clone());
                let settled = self.settle(&lease, ending).await;
                guard.disarm();
                settled?;
                Ok(Executed::Fresh(value))
            }
            Begin::Replay(Replay {
                kind: ReplayKind::Unknown,
                ..
            }) => Err(Error::OutcomeUnknown),
            Begin::Replay(replay) => Ok(Executed::Replayed(codec::decode(
                replay.outcome.as_bytes(),
            )?)),
            Begin::InProgress { retry_after } => Err(Error::InProgress { retry_after }),
            Begin::Mismatch => Err(Error::FingerprintMismatch),
        }
    }

    /// [`execute`](Self::execute) for fallible work: `on_error` decides what
    /// an error does to the key ([`OnError`]).
    ///
    /// # Behavior
    /// `Ok` values are stored and replayed as `Ok`; errors stored as permanent
    /// are replayed as `Err`; released and retryable errors are returned as
    /// fresh and the next call runs the work again. Drops, panics and values
    /// that cannot be stored behave as in [`execute`](Self::execute).
    pub async fn try_execute<T, E, F, Fut>(
        &self,
        scope: &Scope,
        key: &IdempotencyKey,
        fingerprint: Fingerprint,
        work: F,
        on_error: impl FnOnce(&E) -> OnError,
    ) -> Result<Executed<Result<T, E>>, Error>
    where
        T: Serialize + DeserializeOwned,
        E: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        match self.begin(scope, key, fingerprint).await? {
            Begin::Proceed(lease) => {
                let mut guard = SettleOnDrop::new(self, &lease);
                let result = self.run_with_heartbeat(&lease, work()).await;
                let encoded = |value: Result<Vec<u8>, crate::CodecError>| match value {
                    Ok(bytes) => Some(Outcome::new(bytes)),
                    Err(e) => {
                        tracing::error!(error = %e, "idem: the work's result cannot be encoded; finishing the key as outcome unknown");
                        None
                    }
                };
                let ending = match &result {
                    Ok(value) => encoded(codec::encode(value)).map(Ending::Complete),
                    Err(error) => match on_error(error) {
                        OnError::Release => Some(Ending::Release),
                        OnError::StoreRetryable => encoded(codec::encode(error))
                            .map(|o| Ending::Fail(FailureKind::Retryable, o)),
                        OnError::StorePermanent => encoded(codec::encode(error))
                            .map(|o| Ending::Fail(FailureKind::Permanent, o)),
                    },
                }
                .unwrap_or(Ending::Unknown);
                guard.pending(ending.clone());
                let settled = self.settle(&lease, ending).await;
                guard.disarm();
                settled?;
                Ok(Executed::Fresh(result))
            }
            Begin::Replay(Replay {
                outcome,
                kind: ReplayKind::Completed,
            }) => Ok(Executed::Replayed(Ok(codec::decode(outcome.as_bytes())?))),
            Begin::Replay(Replay {
                outcome,
                kind: ReplayKind::Failed,
            }) => Ok(Executed::Replayed(Err(codec::decode(outcome.as_bytes())?))),
            Begin::Replay(_) => Err(Error::OutcomeUnknown),
            Begin::InProgress { retry_after } => Err(Error::InProgress { retry_after }),
            Begin::Mismatch => Err(Error::FingerprintMismatch),
        }
    }

    /// Runs `work` with a heartbeat beside it ([`keep_alive`](Self::keep_alive)).
    ///
    /// # Behavior
    /// If the heartbeat ends first (the lease was lost), the work still runs
    /// to its end; completing it will be refused by the fencing token.
    pub async fn run_with_heartbeat<T>(&self, lease: &Lease, work: impl Future<Output = T>) -> T {
        let work = std::pin::pin!(work);
        let beat = std::pin::pin!(self.keep_alive(lease));
        match select(work, beat).await {
            Either::Left((value, _)) => value,
            Either::Right((_, work)) => work.await,
        }
    }

    /// Stops taking new claims and waits up to `grace` for the running ones
    /// (claims made by this engine or its clones, through `begin` or
    /// `execute`) to finish.
    ///
    /// # Behavior
    /// - From the call on, [`begin`](Self::begin) fails with
    ///   [`Error::ShuttingDown`] (transient: HTTP 503 with `Retry-After`).
    /// - Nothing that ran is released. Claims still unfinished after `grace`
    ///   are finished as [`FailureKind::Unknown`] (their [`Lease::lost`]
    ///   fires): the process is about to stop them, and a retry must not run
    ///   them again. A claim whose mark cannot be written stays in flight
    ///   until its lease lapses.
    /// - `grace` is measured on the engine's clock.
    pub async fn shutdown(&self, grace: Duration) -> Shutdown {
        let claims = &self.shared.claims;
        let clock = &self.shared.clock;
        claims.close();
        let running = claims.unfinished().len();
        let until = clock.now().plus(grace);
        loop {
            let listener = claims.changed.listen();
            if claims.unfinished().is_empty() {
                return Shutdown {
                    running,
                    finished: running,
                    ..Shutdown::default()
                };
            }
            let now = clock.now();
            if now >= until {
                break;
            }
            let nap = clock.sleep(until.since(now));
            let _ = select(std::pin::pin!(listener), nap).await;
        }
        let open = claims.unfinished();
        let mut report = Shutdown {
            running,
            finished: running.saturating_sub(open.len()),
            ..Shutdown::default()
        };
        for lease in open {
            lease.mark_lost();
            let until = clock.now().plus(self.policy.lease / 10);
            match self.settle_until(&lease, Ending::Unknown, until).await {
                Ok(_) => report.marked_unknown += 1,
                Err(_) if lease.is_finished() => report.finished += 1,
                Err(e) => {
                    tracing::error!(error = %e, key = ?lease.key(), "idem: shutdown could not mark a running claim; it stays in flight until its lease lapses");
                    report.left_in_flight += 1;
                }
            }
        }
        tracing::info!(?report, "idem: shutdown");
        report
    }

    fn check_size(&self, outcome: &Outcome) -> Result<(), Error> {
        if outcome.len() > self.outcome_limit {
            return Err(Error::OutcomeTooLarge {
                size: outcome.len(),
                limit: self.outcome_limit,
            });
        }
        Ok(())
    }

    /// One conditional write by the holder: `step` builds the next record from
    /// the current one. `finishes` marks the lease finished on success.
    async fn finish(
        &self,
        lease: &Lease,
        finishes: bool,
        step: impl Fn(&Record, Timestamp) -> Result<Record, Fenced>,
    ) -> Result<(), Error> {
        let result = self.finish_inner(lease, finishes, step).await;
        if matches!(result, Err(Error::LeaseLost(_))) && !lease.is_finished() {
            lease.mark_lost();
        }
        result
    }

    async fn finish_inner(
        &self,
        lease: &Lease,
        finishes: bool,
        step: impl Fn(&Record, Timestamp) -> Result<Record, Fenced>,
    ) -> Result<(), Error> {
        let mut current = lease.record();
        for _ in 0..=self.policy.max_cas_retries {
            let now = self.shared.clock.now();
            let next = Versioned {
                revision: self.shared.ids.revision(),
                record: step(&current.record, now).map_err(Error::LeaseLost)?,
            };
            match self
                .shared
                .store
                .compare_and_swap(lease.key(), current.revision, &next, now)
                .await?
            {
                Swapped::Swapped => {
                    lease.observe(next, finishes);
                    return Ok(());
                }
                Swapped::Conflict(None) => return Err(Error::LeaseLost(Fenced::Expired)),
                Swapped::Conflict(Some(seen)) => {
                    match seen.record.check_holder(lease.token(), now) {
                        // Our own heartbeat (or a retried call of ours) moved
                        // the revision; try again from what is stored.
                        Ok(()) => {
                            lease.observe(seen.clone(), false);
                            current = seen;
                        }
                        Err(fenced) => {
                            if matches!(
                                fenced,
                                Fenced::Finished {
                                    by_holder: true,
                                    ..
                                }
                            ) {
                                // An earlier call of ours whose reply was lost
                                // already wrote exactly this: done.
                                let applied = finishes && seen.record.state == next.record.state;
                                lease.observe(seen, true);
                                if applied {
                                    return Ok(());
                                }
                            }
                            return Err(Error::LeaseLost(fenced));
                        }
                    }
                }
            }
        }
        Err(Error::Contention)
    }
}

/// The effective outcome limit of `store` under `policy`.
fn outcome_limit<S: Store>(store: &S, policy: &Policy) -> usize {
    let by_store = store
        .capabilities()
        .max_record_bytes
        .map_or(usize::MAX, |max| max.saturating_sub(codec::RECORD_OVERHEAD));
    policy.max_outcome_bytes.min(by_store)
}

/// Ends a claim whose work started if the future running it is dropped (or
/// the work panics) before it could end the claim itself.
struct SettleOnDrop<'a, S: Store, C: Clock> {
    engine: &'a Engine<S, C>,
    lease: Lease,
    pending: Option<Ending>,
}

impl<'a, S: Store, C: Clock> SettleOnDrop<'a, S, C> {
    fn new(engine: &'a Engine<S, C>, lease: &Lease) -> Self {
        Self {
            engine,
            lease: lease.clone(),
            pending: Some(Ending::Unknown),
        }
    }
    fn pending(&mut self, ending: Ending) {
        self.pending = Some(ending);
    }
    fn disarm(&mut self) {
        self.pending = None;
    }
}

impl<S: Store, C: Clock> Drop for SettleOnDrop<'_, S, C> {
    fn drop(&mut self) {
        let Some(ending) = self.pending.take() else {
            return;
        };
        if self.lease.is_finished() {
            return;
        }
        spawn_settle(self.engine.clone(), self.lease.clone(), ending);
    }
}

#[cfg(feature = "tokio")]
fn spawn_settle<S: Store, C: Clock>(engine: Engine<S, C>, lease: Lease, ending: Ending) {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            tracing::warn!(key = ?lease.key(), "idem: the work was dropped or panicked after it started; ending its claim in the background");
            runtime.spawn(async move {
                if let Err(e) = engine.settle(&lease, ending).await {
                    tracing::error!(error = %e, key = ?lease.key(), "idem: could not end a dropped claim; it stays in flight until its lease lapses");
                }
            });
        }
        Err(_) => {
            tracing::error!(key = ?lease.key(), "idem: the work was dropped after it started and no runtime is left to end its claim; it stays in flight until its lease lapses")
        }
    }
}

#[cfg(not(feature = "tokio"))]
fn spawn_settle<S: Store, C: Clock>(engine: Engine<S, C>, lease: Lease, ending: Ending) {
    let _ = (engine, ending);
    tracing::error!(key = ?lease.key(), "idem: the work was dropped after it started; without the `tokio` feature its claim stays in flight until its lease lapses");
}
