//! The engine: drives a [`Store`] through the key state machine.

use std::future::Future;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures_util::future::{Either, select};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{
    Clock, Decision, Error, FailureKind, Fenced, FencingToken, Fingerprint, IdempotencyKey,
    InFlightPolicy, Inserted, Outcome, Policy, Record, RecordKey, Revision, Scope, State, Store,
    Swapped, Timestamp, Versioned, codec, decide,
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
    /// Whether the key completed or failed permanently.
    pub kind: ReplayKind,
}

/// How the replayed key finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplayKind {
    /// It completed.
    Completed,
    /// It failed permanently.
    Failed,
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

/// The claim on a key held by the request that may run it.
///
/// # Behavior
/// - Only the holder of the lease's [`FencingToken`] can complete, fail,
///   release or extend the claim; once the lease lapses and a retry takes
///   over, every one of those calls with this lease fails with
///   [`Error::LeaseLost`] and changes nothing.
/// - Clones share one claim: hand them to the work, a heartbeat
///   ([`Engine::keep_alive`]) and the code that completes it.
/// - Dropping a lease without finishing it leaves the key in flight until the
///   lease lapses; a retry then takes over.
#[derive(Clone, Debug)]
pub struct Lease(Arc<LeaseInner>);

#[derive(Debug)]
struct LeaseInner {
    key: RecordKey,
    token: FencingToken,
    state: Mutex<LeaseState>,
}

#[derive(Debug)]
struct LeaseState {
    current: Versioned,
    finished: bool,
}

impl Lease {
    fn new(key: RecordKey, current: Versioned) -> Self {
        Self(Arc::new(LeaseInner {
            key,
            token: current.record.state.token(),
            state: Mutex::new(LeaseState {
                current,
                finished: false,
            }),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, LeaseState> {
        self.0.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn observe(&self, seen: Versioned, finished: bool) {
        let mut state = self.lock();
        if !state.finished {
            state.current = seen;
            state.finished = finished;
        }
    }

    /// The key this lease holds.
    pub fn key(&self) -> &RecordKey {
        &self.0.key
    }
    /// The fencing token of this claim.
    pub fn token(&self) -> FencingToken {
        self.0.token
    }
    /// The record as this holder last wrote it.
    pub fn record(&self) -> Versioned {
        self.lock().current.clone()
    }
    /// Which attempt this is (1 for the first claim, more after takeovers and retries).
    pub fn attempt(&self) -> u32 {
        self.lock().current.record.attempts
    }
    /// When the lease lapses unless extended.
    pub fn deadline(&self) -> Timestamp {
        match self.lock().current.record.state {
            State::InFlight { lease_deadline, .. } => lease_deadline,
            _ => Timestamp::EPOCH,
        }
    }
    /// Whether this holder already completed, failed or released the claim
    /// through the engine, or marked a transactional completion applied.
    pub fn is_finished(&self) -> bool {
        self.lock().finished
    }

    /// Records that `transition` (prepared from this lease) was applied by a
    /// store inside the caller's transaction and that transaction committed.
    ///
    /// # Behavior
    /// - The lease becomes finished: [`Engine::keep_alive`] returns `Ok` at
    ///   its next beat instead of reporting the key as lost, and integrations
    ///   (the HTTP layer) see that nothing is left to store.
    /// - Call it only after the commit: if the transaction rolled back, the
    ///   claim is still in flight and should be released or left to lapse.
    /// - A transition prepared from another lease (another key or fencing
    ///   token) is refused with [`Error::LeaseLost`] and changes nothing.
    pub fn mark_applied(&self, transition: &Transition) -> Result<(), Error> {
        if transition.token != self.token() || transition.key != *self.key() {
            return Err(Error::LeaseLost(Fenced::TakenOver));
        }
        let mut state = self.lock();
        state.current = transition.next.clone();
        state.finished = true;
        Ok(())
    }
}

/// A holder's finishing write, prepared for a store to apply inside the
/// caller's own database transaction (see `idem-sqlite` and `idem-postgres`).
///
/// # Behavior
/// The store applies it as: replace the record under `key` with `next` if the
/// live record is in flight under `token` (checking the fencing token, not the
/// revision, so a concurrent heartbeat cannot fail the transaction), and
/// report [`Error::LeaseLost`] otherwise, changing nothing. It takes effect
/// only if the transaction commits.
#[derive(Clone, Debug)]
pub struct Transition {
    /// The key to write.
    pub key: RecordKey,
    /// The token that must hold the key.
    pub token: FencingToken,
    /// The record to write.
    pub next: Versioned,
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
///
/// Integrations share one engine (`Arc<Engine<_>>`).
#[derive(Debug)]
pub struct Engine<S, C = DefaultClock> {
    store: S,
    clock: C,
    policy: Policy,
    ids: Ids,
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
        Self {
            store,
            clock,
            policy: Policy::default(),
            ids: Ids::new(),
        }
    }

    /// The same engine with `policy`.
    #[must_use]
    pub fn with_policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }
    /// The clock.
    pub fn clock(&self) -> &C {
        &self.clock
    }
    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
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
    /// calls on one key, at most one gets `Proceed` per claim.
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
        let started = self.clock.now();
        let wait_until = match self.policy.in_flight {
            InFlightPolicy::Reject => None,
            InFlightPolicy::Wait { max, poll } => Some((started.plus(max), poll)),
        };
        let mut poll = wait_until.map_or(Duration::ZERO, |(_, poll)| poll);
        // `None`: nothing seen yet, or the key looked absent: try to insert.
        let mut seen: Option<Versioned> = None;
        let mut races = 0;
        loop {
            let now = self.clock.now();
            let decision = decide(seen.as_ref().map(|v| &v.record), &fingerprint, now);
            match (decision, seen.take()) {
                (Decision::Claim, _) => {
                    let claim = Versioned {
                        revision: self.ids.revision(),
                        record: Record::new_claim(fingerprint, self.ids.token(), now, &self.policy),
                    };
                    match self.store.insert_if_absent(&key, &claim, now).await? {
                        Inserted::Inserted => return Ok(Begin::Proceed(Lease::new(key, claim))),
                        Inserted::Exists(current) => seen = Some(current),
                    }
                }
                (Decision::Reclaim(reason), Some(current)) => {
                    let next = Versioned {
                        revision: self.ids.revision(),
                        record: current.record.reclaim(self.ids.token(), now, &self.policy),
                    };
                    match self
                        .store
                        .compare_and_swap(&key, current.revision, &next, now)
                        .await?
                    {
                        Swapped::Swapped => {
                            tracing::debug!(
                                ?reason,
                                attempt = next.record.attempts,
                                "idem: reclaimed key"
                            );
                            return Ok(Begin::Proceed(Lease::new(key, next)));
                        }
                        Swapped::Conflict(current) => seen = current,
                    }
                }
                (Decision::Replay, Some(current)) => {
                    return Ok(Begin::Replay(match current.record.state {
                        State::Completed { outcome, .. } => Replay {
                            outcome,
                            kind: ReplayKind::Completed,
                        },
                        State::Failed { outcome, .. } => Replay {
                            outcome,
                            kind: ReplayKind::Failed,
                        },
                        State::InFlight { .. } => return Err(Error::Contention),
                    }));
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
                    self.clock.sleep(nap).await;
                    poll = (poll * 2).min(wait_until.map_or(poll, |(_, p)| p * 8));
                    // Absent now (released or expired while we waited): the
                    // next round claims it.
                    seen = self.store.get(&key, self.clock.now()).await?;
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

    /// Completes the claim with `outcome`: retries with the same fingerprint
    /// replay it until the record expires.
    ///
    /// # Behavior
    /// One store call. Fails with [`Error::LeaseLost`], changing nothing, if
    /// the lease was taken over, expired, or already finished otherwise.
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
    /// and a retry runs the operation again. For failures before any side effect.
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
        for _ in 0..=self.policy.max_cas_retries {
            let current = lease.record();
            let now = self.clock.now();
            current
                .record
                .check_holder(lease.token(), now)
                .map_err(Error::LeaseLost)?;
            if self
                .store
                .delete_if(lease.key(), current.revision, now)
                .await?
            {
                lease.lock().finished = true;
                return Ok(());
            }
            match self.store.get(lease.key(), now).await? {
                // Our own heartbeat moved the revision: try again with it.
                Some(seen) if seen.record.check_holder(lease.token(), now).is_ok() => {
                    lease.observe(seen, false);
                }
                Some(seen) => {
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
                    lease.lock().finished = true;
                    return Ok(());
                }
            }
        }
        Err(Error::Contention)
    }

    /// Prepares the completion of `lease` for a store to apply inside the
    /// caller's database transaction; see [`Transition`].
    pub fn prepare_complete(&self, lease: &Lease, outcome: Outcome) -> Result<Transition, Error> {
        self.check_size(&outcome)?;
        let current = lease.record();
        let now = self.clock.now();
        let record = current
            .record
            .complete(lease.token(), outcome, now, &self.policy)
            .map_err(Error::LeaseLost)?;
        Ok(Transition {
            key: lease.key().clone(),
            token: lease.token(),
            next: Versioned {
                revision: self.ids.revision(),
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
        let now = self.clock.now();
        let record = current
            .record
            .fail(lease.token(), kind, outcome, now, &self.policy)
            .map_err(Error::LeaseLost)?;
        Ok(Transition {
            key: lease.key().clone(),
            token: lease.token(),
            next: Versioned {
                revision: self.ids.revision(),
                record,
            },
        })
    }

    /// Extends `lease` every third of the policy's lease duration until the
    /// lease is finished (returns `Ok`) or lost (returns the error).
    ///
    /// # Behavior
    /// Run it beside long work (`select`/`join`): a slow but live holder is
    /// then never taken over. A transient store error does not stop it; the
    /// next beat tries again.
    pub async fn keep_alive(&self, lease: &Lease) -> Result<(), Error> {
        let beat = (self.policy.lease / 3).max(Duration::from_millis(1));
        loop {
            self.clock.sleep(beat).await;
            if lease.is_finished() {
                return Ok(());
            }
            match self.extend(lease).await {
                Ok(()) => {}
                Err(e) if e.is_transient() => {
                    tracing::warn!(error = %e, "idem: heartbeat failed; retrying at the next beat");
                }
                Err(_) if lease.is_finished() => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Runs `work` at most once per (scope, key): the first call runs it and
    /// stores its result; later calls with the same fingerprint get the stored
    /// result back.
    ///
    /// # Behavior
    /// - Fresh: `work` runs with a heartbeat beside it, its value is encoded
    ///   with the [`codec`] and stored, then returned as [`Executed::Fresh`].
    /// - Replay: the stored value is decoded and returned as [`Executed::Replayed`].
    /// - In flight elsewhere: [`Error::InProgress`]; bound to another request:
    ///   [`Error::FingerprintMismatch`]. `work` does not run in either case.
    /// - If storing the result fails, the error is returned and the key stays
    ///   in flight until its lease lapses.
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
                let value = self.run_with_heartbeat(&lease, work()).await;
                let outcome = Outcome::new(codec::encode(&value)?);
                self.complete(&lease, outcome).await?;
                Ok(Executed::Fresh(value))
            }
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
    /// fresh and the next call runs the work again.
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
                let result = self.run_with_heartbeat(&lease, work()).await;
                match &result {
                    Ok(value) => {
                        self.complete(&lease, Outcome::new(codec::encode(value)?))
                            .await?;
                    }
                    Err(error) => match on_error(error) {
                        OnError::Release => self.release(&lease).await?,
                        OnError::StoreRetryable => {
                            let outcome = Outcome::new(codec::encode(error)?);
                            self.fail(&lease, FailureKind::Retryable, outcome).await?;
                        }
                        OnError::StorePermanent => {
                            let outcome = Outcome::new(codec::encode(error)?);
                            self.fail(&lease, FailureKind::Permanent, outcome).await?;
                        }
                    },
                }
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
            Begin::InProgress { retry_after } => Err(Error::InProgress { retry_after }),
            Begin::Mismatch => Err(Error::FingerprintMismatch),
        }
    }

    async fn run_with_heartbeat<T>(&self, lease: &Lease, work: impl Future<Output = T>) -> T {
        let work = std::pin::pin!(work);
        let beat = std::pin::pin!(self.keep_alive(lease));
        match select(work, beat).await {
            Either::Left((value, _)) => value,
            // The lease was lost: let the work finish; completing it will be
            // refused by the fencing token.
            Either::Right((_, work)) => work.await,
        }
    }

    fn check_size(&self, outcome: &Outcome) -> Result<(), Error> {
        if outcome.len() > self.policy.max_outcome_bytes {
            return Err(Error::OutcomeTooLarge {
                size: outcome.len(),
                limit: self.policy.max_outcome_bytes,
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
        let mut current = lease.record();
        for _ in 0..=self.policy.max_cas_retries {
            let now = self.clock.now();
            let next = Versioned {
                revision: self.ids.revision(),
                record: step(&current.record, now).map_err(Error::LeaseLost)?,
            };
            match self
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
