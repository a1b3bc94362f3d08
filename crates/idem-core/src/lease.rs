//! The claim a request holds on a key ([`Lease`]), the finishing write it can
//! hand to a transactional store ([`Transition`]), and the engine's registry
//! of live claims (for graceful shutdown).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use event_listener::Event;

use crate::machine::Fenced;
use crate::store::{Checkpoint, FencingToken, State, Versioned};
use crate::{Error, RecordKey, Timestamp};

/// The claim on a key held by the request that may run it.
///
/// # Behavior
/// - Only the holder of the lease's [`FencingToken`] can complete, fail,
///   release or extend the claim; once the lease lapses and a retry takes
///   over, every one of those calls with this lease fails with
///   [`Error::LeaseLost`] and changes nothing.
/// - Clones share one claim: hand them to the work, a heartbeat
///   ([`Engine::keep_alive`](crate::Engine::keep_alive)) and the code that
///   completes it.
/// - [`lost`](Self::lost) resolves when this holder can no longer count on
///   the key: the engine saw it taken over or finished by someone else, a
///   heartbeat could not extend it before its deadline, the hold ceiling
///   ([`Policy::max_hold`](crate::Policy::max_hold)) ended it, or a graceful
///   shutdown gave up on it. Work that has not started its effect should
///   stop; work whose effect already started should finish and try to
///   complete (the fencing token decides whether its result is stored).
/// - Dropping a lease without finishing it leaves the key in flight until the
///   lease lapses; a retry then takes over. [`Engine::execute`] and the HTTP
///   layer never do that after the work started: they finish the key as
///   [`FailureKind::Unknown`](crate::FailureKind::Unknown) instead.
///
/// [`Engine::execute`]: crate::Engine::execute
#[derive(Clone, Debug)]
pub struct Lease(pub(crate) Arc<LeaseInner>);

#[derive(Debug)]
pub(crate) struct LeaseInner {
    key: RecordKey,
    token: FencingToken,
    claimed_at: Timestamp,
    state: Mutex<LeaseState>,
    lost: AtomicBool,
    /// A phase of a multi-step operation started under this claim.
    phase_started: AtomicBool,
    lost_event: Event,
    registry: Option<(Weak<Claims>, u64)>,
}

#[derive(Debug)]
pub(crate) struct LeaseState {
    pub(crate) current: Versioned,
    pub(crate) finished: bool,
}

impl Drop for LeaseInner {
    fn drop(&mut self) {
        if let Some((claims, id)) = &self.registry
            && let Some(claims) = claims.upgrade()
        {
            claims.remove(*id);
        }
    }
}

impl Lease {
    pub(crate) fn new(key: RecordKey, current: Versioned, claims: Option<&Arc<Claims>>) -> Self {
        let claimed_at = current.record.updated_at;
        let token = current.record.state.token();
        let registry = claims.map(|c| (Arc::downgrade(c), c.next_id()));
        let lease = Self(Arc::new(LeaseInner {
            key,
            token,
            claimed_at,
            state: Mutex::new(LeaseState {
                current,
                finished: false,
            }),
            lost: AtomicBool::new(false),
            phase_started: AtomicBool::new(false),
            lost_event: Event::new(),
            registry,
        }));
        if let (Some(claims), Some((_, id))) = (claims, &lease.0.registry) {
            claims.add(*id, &lease.0);
        }
        lease
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, LeaseState> {
        self.0.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn observe(&self, seen: Versioned, finished: bool) {
        let done = {
            let mut state = self.lock();
            if !state.finished {
                state.current = seen;
                state.finished = finished;
            }
            state.finished
        };
        if done {
            self.notify_registry();
        }
    }

    pub(crate) fn set_finished(&self) {
        self.lock().finished = true;
        self.notify_registry();
    }

    fn notify_registry(&self) {
        if let Some((claims, _)) = &self.0.registry
            && let Some(claims) = claims.upgrade()
        {
            claims.changed.notify(usize::MAX);
        }
    }

    /// Signals [`lost`](Self::lost) to everyone waiting on it.
    pub(crate) fn mark_lost(&self) {
        if !self.0.lost.swap(true, Ordering::AcqRel) {
            self.0.lost_event.notify(usize::MAX);
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
    /// When this claim was made (by the engine's clock).
    pub fn claimed_at(&self) -> Timestamp {
        self.0.claimed_at
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

    /// Whether [`lost`](Self::lost) has resolved.
    pub fn is_lost(&self) -> bool {
        self.0.lost.load(Ordering::Acquire)
    }

    /// Resolves when this holder can no longer count on the key (see the
    /// type's `# Behavior`); never resolves while the claim is safely held.
    ///
    /// ```
    /// # use idem_core::*;
    /// # async fn charge() {}
    /// # async fn run(engine: Engine<MemoryStore>, lease: Lease) {
    /// tokio::select! {
    ///     () = lease.lost() => { /* stop before the effect; nothing is stored */ }
    ///     () = charge() => { let _ = engine.complete(&lease, Outcome::new("ok")).await; }
    /// }
    /// # }
    /// ```
    pub async fn lost(&self) {
        loop {
            if self.is_lost() {
                return;
            }
            let listener = self.0.lost_event.listen();
            if self.is_lost() {
                return;
            }
            listener.await;
        }
    }

    /// Records that a phase of a multi-step operation started under this
    /// claim (its work may have had an effect).
    pub(crate) fn mark_phase_started(&self) {
        self.0.phase_started.store(true, Ordering::Release);
    }

    /// Whether this claim made progress that a retry must resume rather
    /// than redo or forget: its record has a checkpoint, or a phase started
    /// under it. Such a claim is never released nor finished as outcome
    /// unknown (see [`Engine::fail`](crate::Engine::fail)).
    pub fn has_progress(&self) -> bool {
        self.0.phase_started.load(Ordering::Acquire)
            || self.lock().current.record.checkpoint.is_some()
    }

    /// The last checkpoint of this claim's record: on a claim that took over
    /// a lapsed lease or a retryable failure, the previous holder's
    /// progress, to resume from (see [`Engine::checkpoint`](crate::Engine::checkpoint)).
    pub fn checkpoint(&self) -> Option<Checkpoint> {
        self.lock().current.record.checkpoint.clone()
    }

    /// Records that `transition` (prepared from this lease) was applied by a
    /// store inside the caller's transaction and that transaction committed.
    ///
    /// # Behavior
    /// - A finishing transition ([`Engine::prepare_complete`](crate::Engine::prepare_complete),
    ///   [`prepare_fail`](crate::Engine::prepare_fail)) finishes the lease:
    ///   [`Engine::keep_alive`](crate::Engine::keep_alive)
    ///   returns `Ok` at its next beat instead of reporting the key as lost,
    ///   and integrations (the HTTP layer) see that nothing is left to store.
    /// - A checkpoint ([`Engine::prepare_checkpoint`](crate::Engine::prepare_checkpoint))
    ///   keeps the lease open; later writes start from the checkpointed record.
    /// - Call it only after the commit: if the transaction rolled back, the
    ///   claim is still in flight and should be released or left to lapse.
    /// - A transition prepared from another lease (another key or fencing
    ///   token) is refused with [`Error::LeaseLost`] and changes nothing.
    pub fn mark_applied(&self, transition: &Transition) -> Result<(), Error> {
        if transition.token != self.token() || transition.key != *self.key() {
            return Err(Error::LeaseLost(Fenced::TakenOver));
        }
        let finished = !matches!(transition.next.record.state, State::InFlight { .. });
        {
            let mut state = self.lock();
            state.current = transition.next.clone();
            state.finished = finished;
        }
        self.notify_registry();
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

/// The engine's live claims: what a graceful shutdown waits for.
#[derive(Debug, Default)]
pub(crate) struct Claims {
    closing: AtomicBool,
    next: AtomicU64,
    live: Mutex<HashMap<u64, Weak<LeaseInner>>>,
    pub(crate) changed: Event,
}

impl Claims {
    fn next_id(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }
    fn map(&self) -> MutexGuard<'_, HashMap<u64, Weak<LeaseInner>>> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }
    fn add(&self, id: u64, lease: &Arc<LeaseInner>) {
        self.map().insert(id, Arc::downgrade(lease));
    }
    fn remove(&self, id: u64) {
        self.map().remove(&id);
        self.changed.notify(usize::MAX);
    }
    pub(crate) fn close(&self) {
        self.closing.store(true, Ordering::Release);
    }
    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }
    /// The claims still held and not finished.
    pub(crate) fn unfinished(&self) -> Vec<Lease> {
        // Upgrade under the lock, filter after it: dropping the last clone of
        // a lease removes it from the map, which takes the lock.
        let held: Vec<Lease> = self
            .map()
            .values()
            .filter_map(Weak::upgrade)
            .map(Lease)
            .collect();
        held.into_iter().filter(|l| !l.is_finished()).collect()
    }
}
