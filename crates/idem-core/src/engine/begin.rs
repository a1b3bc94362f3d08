//! Starting a request: [`Engine::begin`] applies [`decide`] to what the store
//! holds until it can claim the key, replay it, or report why not.

use std::time::Duration;

use crate::engine::Engine;
use crate::engine::cache::is_final;
use crate::machine::{Decision, decide};
use crate::store::{InsertOutcome, Record, State, Store, SwapOutcome, Versioned};
use crate::{
    Clock, Error, FailureKind, Fingerprint, IdempotencyKey, InFlightPolicy, Lease, Outcome,
    RecordKey, Scope, Timestamp,
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
    /// The key is bound to a different request (HTTP 422): what it is bound
    /// to, for the refusal (see [`Mismatch`]).
    Mismatch(Mismatch),
}

/// What a key reused with a different request is bound to (see [`Begin::Mismatch`]).
///
/// # Behavior
/// - Filled from the record [`decide`] refused on, read from the store or
///   from the cache of finished records
///   ([`with_finished_cache`](Engine::with_finished_cache)): the same values
///   either way.
/// - [`first_used_at`](Self::first_used_at) is the record's `created_at`:
///   the time of the claim that bound the key, by the engine's clock. A
///   takeover or a retry after a retryable failure keeps it; a claim over an
///   expired record starts a new one.
/// - [`finished`](Self::finished) is what [`Begin::Replay`] would give the
///   request the key is bound to: `Some` once the key is final (completed,
///   failed permanently, or ended with its outcome unknown), `None` while it
///   is in flight or after a retryable failure (it may still run again).
/// - It is for the integration, not for the caller that was refused: an
///   integration may read its own metadata from the stored bytes (e.g. the
///   method and path it stored with the response) to say what the key was
///   first used for, but must never answer with those bytes: they belong to
///   another request.
///
/// ```
/// # use idem_core::*;
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Error> {
/// let engine = Engine::new(MemoryStore::new());
/// let (scope, key) = (Scope::global(), IdempotencyKey::parse("order-17")?);
/// let Begin::Proceed(lease) = engine.begin(&scope, &key, Fingerprint::of(b"a")).await? else {
///     unreachable!("a fresh key is claimed");
/// };
/// let first_used_at = lease.record().record.created_at;
/// match engine.begin(&scope, &key, Fingerprint::of(b"b")).await? {
///     Begin::Mismatch(bound) => {
///         assert_eq!(bound.first_used_at, first_used_at);
///         assert_eq!(bound.finished, None); // still in flight
///     }
///     other => unreachable!("another request gets a mismatch, not {other:?}"),
/// }
/// # engine.release(&lease).await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Mismatch {
    /// When the key was first claimed (the record's `created_at`).
    pub first_used_at: Timestamp,
    /// The key's stored outcome if it has finished (how and the bytes), `None` while it is in flight
    /// (or after a retryable failure: it may run again). An integration may read its own metadata
    /// from it (e.g. the method and path it stored), never hand it to the mismatched caller.
    pub finished: Option<Replay>,
}

impl Mismatch {
    /// What a mismatch on `record` reports: its `created_at`, and its
    /// outcome if it is final.
    fn of(record: &Record) -> Self {
        Self {
            first_used_at: record.created_at,
            finished: if is_final(record) {
                replay_of(record.state.clone())
            } else {
                None
            },
        }
    }
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

impl<S: Store, C: Clock> Engine<S, C> {
    /// Starts a request carrying `key` within `scope`.
    ///
    /// # Behavior
    /// Applies [`decide`] to what the store holds: claims an absent or expired
    /// key ([`Begin::Proceed`]), takes over a lapsed lease or a retryable
    /// failure with a new fencing token (`Proceed` again), replays a finished
    /// key ([`Begin::Replay`]), reports a live claim ([`Begin::InProgress`],
    /// after waiting if the policy says [`InFlightPolicy::Wait`]) or a
    /// different request ([`Begin::Mismatch`], saying when the key was first
    /// used and, once it is final, how it ended). Of any number of concurrent
    /// calls on one key, at most one gets `Proceed` per claim. After
    /// [`shutdown`](Self::shutdown) began: [`Error::ShuttingDown`], nothing
    /// read or written.
    ///
    /// With the cache of finished records on
    /// ([`with_finished_cache`](Self::with_finished_cache)), a finished key
    /// this engine has seen is answered from it (`Replay` or `Mismatch`, by
    /// the same [`decide`]) without a store call.
    pub async fn begin(
        &self,
        scope: &Scope,
        key: &IdempotencyKey,
        fingerprint: Fingerprint,
    ) -> Result<Begin, Error> {
        if self.is_shutting_down() {
            return Err(Error::ShuttingDown);
        }
        if let Some(answer) = self.cached_answer(scope, key, &fingerprint) {
            return Ok(answer);
        }
        self.begin_in_store(RecordKey::new(scope, key), fingerprint)
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
        if let Some(answer) = self.cached_answer(key.scope(), key.key(), &fingerprint) {
            return Ok(answer);
        }
        self.begin_in_store(key, fingerprint).await
    }

    /// The answer of the cache of finished records, if it is on and holds
    /// a live entry for the key: what [`decide`] says of that record.
    fn cached_answer(
        &self,
        scope: &Scope,
        key: &IdempotencyKey,
        fingerprint: &Fingerprint,
    ) -> Option<Begin> {
        let cache = self.finished.as_deref()?;
        let now = self.shared.clock.now();
        let record = cache.lookup(scope, key, now)?;
        match decide(Some(&record), fingerprint, now) {
            Decision::Replay => replay_of(record.state).map(Begin::Replay),
            Decision::Mismatch => Some(Begin::Mismatch(Mismatch::of(&record))),
            // Not for a live final record; the store decides.
            Decision::Claim | Decision::Reclaim(_) | Decision::InProgress { .. } => None,
        }
    }

    /// `begin` past the cache: [`decide`] on what the store holds.
    async fn begin_in_store(
        &self,
        key: RecordKey,
        fingerprint: Fingerprint,
    ) -> Result<Begin, Error> {
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
                        InsertOutcome::Inserted => {
                            // Over an absent or expired record: drop what the
                            // cache may still hold of an expired one.
                            self.evict_finished(&key);
                            return Ok(Begin::Proceed(self.lease(key, claim)));
                        }
                        InsertOutcome::Exists(current) => {
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
                    match store.compare_and_swap(&key, &current, &next, now).await? {
                        SwapOutcome::Swapped => {
                            self.evict_finished(&key);
                            tracing::debug!(
                                ?reason,
                                attempt = next.record.attempts,
                                "idem: reclaimed key"
                            );
                            return Ok(Begin::Proceed(self.lease(key, next)));
                        }
                        SwapOutcome::Conflict(current) => seen = current,
                    }
                }
                (Decision::Replay, Some(current)) => {
                    self.fill_finished(&key, &current.record);
                    return replay_of(current.record.state)
                        .map(Begin::Replay)
                        .ok_or(Error::Contention);
                }
                (Decision::Mismatch, Some(current)) => {
                    self.fill_finished(&key, &current.record);
                    return Ok(Begin::Mismatch(Mismatch::of(&current.record)));
                }
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
                // Reclaim, Replay or Mismatch without a record cannot happen
                // (decide on `None` is always `Claim`). Were it to, there is
                // no record to report or act on: count a round and decide
                // again on `None`, which inserts (and so reads what the store
                // holds) or ends in `Contention`; never a guessed answer.
                (Decision::Reclaim(_) | Decision::Replay | Decision::Mismatch, None) => {}
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

    /// Keeps `record` in the cache of finished records if it is on and the
    /// record is final.
    pub(super) fn fill_finished(&self, key: &RecordKey, record: &Record) {
        if let Some(cache) = &self.finished {
            cache.fill(key, record);
        }
    }

    /// Drops `key` from the cache of finished records, if it is on.
    pub(super) fn evict_finished(&self, key: &RecordKey) {
        if let Some(cache) = &self.finished {
            cache.evict(key);
        }
    }
}

/// What a finished `state` replays; `None` for a claim in flight.
fn replay_of(state: State) -> Option<Replay> {
    match state {
        State::Completed { outcome, .. } => Some(Replay {
            outcome,
            kind: ReplayKind::Completed,
        }),
        State::Failed {
            kind: FailureKind::Unknown,
            outcome,
            ..
        } => Some(Replay {
            outcome,
            kind: ReplayKind::Unknown,
        }),
        State::Failed { outcome, .. } => Some(Replay {
            outcome,
            kind: ReplayKind::Failed,
        }),
        State::InFlight { .. } => None,
    }
}
