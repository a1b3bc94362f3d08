//! [`FaultyStore`]: a [`Store`] wrapper that fails chosen calls on a
//! schedule, for testing what an integration does when its store fails
//! (and for backend authors who want to test their own code the same way).
//!
//! ```
//! use idem_conformance::faulty::{Fault, FaultKind, FaultyStore, Op};
//! use idem_core::{Begin, Engine, Error, Fingerprint, IdempotencyKey, MemoryStore, Outcome, Scope};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Error> {
//! let engine = Engine::new(FaultyStore::new(MemoryStore::new()));
//! let (scope, key) = (Scope::tenant("acme"), IdempotencyKey::parse("order-1")?);
//! let request = Fingerprint::of(b"create order 1");
//!
//! // The next claim does not reach the store: a transient error, nothing written.
//! engine.store().inject(Fault::new(Op::InsertIfAbsent, FaultKind::Unavailable).next(1));
//! let refused = engine.begin(&scope, &key, request).await;
//! assert!(matches!(&refused, Err(e) if e.is_transient()));
//!
//! // The completion is written, but its reply is lost (the ambiguous case).
//! let lost_reply = engine.store().inject(
//!     Fault::new(Op::CompareAndSwap, FaultKind::Unavailable)
//!         .after_apply()
//!         .writing_finished()
//!         .next(1),
//! );
//! let Begin::Proceed(lease) = engine.begin(&scope, &key, request).await? else {
//!     unreachable!("the key is new")
//! };
//! assert!(engine.complete(&lease, Outcome::new("done")).await.is_err());
//! assert_eq!(engine.store().hits(lost_reply), 1);
//! // Completing again finds the holder's own write and succeeds.
//! engine.complete(&lease, Outcome::new("done")).await?;
//! assert!(matches!(engine.begin(&scope, &key, request).await?, Begin::Replay(_)));
//! assert_eq!(engine.store().calls(Op::CompareAndSwap), 2);
//! # Ok(()) }
//! ```

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use idem_core::store::codec::record_size;
use idem_core::store::{
    Capabilities, Census, InsertOutcome, Store, StoreError, SwapOutcome, Versioned,
};
use idem_core::{RecordKey, Timestamp};

mod fault;
#[cfg(test)]
mod tests;

pub use fault::{Call, Fault, FaultKind, InjectedFault, Op, Phase};

/// Identifies an injected [`Fault`] (to [remove](FaultyStore::remove) it or
/// count its [hits](FaultyStore::hits)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FaultId(u64);

struct Active {
    id: FaultId,
    fault: Fault,
    seen: u64,
    hits: u64,
}

#[derive(Default)]
struct Schedule {
    next_id: u64,
    faults: Vec<Active>,
    /// Hits of faults that were removed, so `hits` still answers.
    removed_hits: Vec<(FaultId, u64)>,
    calls: [u64; Op::ALL.len()],
    injected: [u64; Op::ALL.len()],
    oversized: [u64; Op::ALL.len()],
}

/// What to do with one call.
enum Plan {
    Pass,
    Fail(FaultKind, InjectedFault),
}

/// A fault-injecting [`Store`]: wraps any store and fails chosen calls of
/// any primitive with any [`StoreError`] kind, on a schedule ([`Fault`]).
///
/// # Behavior
/// - Without faults it is transparent: every call goes to the wrapped store
///   and its answer (or error) comes back unchanged.
/// - Every call is counted per primitive ([`calls`](Self::calls)), failed or
///   not; injected failures are counted per primitive
///   ([`injected`](Self::injected)) and per fault ([`hits`](Self::hits)).
/// - Faults are checked in the order they were injected; the first whose
///   window holds the call strikes it ([`Fault`]). A [`Phase::BeforeApply`]
///   fault returns its error without calling the wrapped store; a
///   [`Phase::AfterApply`] fault calls it, and if the call succeeded, drops
///   its answer and returns the error (a lost reply).
/// - [`with_max_record_bytes`](Self::with_max_record_bytes) declares a
///   record limit and enforces it honestly: a record whose
///   [`record_size`] is above it is refused by `insert_if_absent` and
///   `compare_and_swap` with [`StoreError::Rejected`] before the wrapped
///   store sees it (nothing written); a record at the limit is passed on.
///   The declared limit is never above the wrapped store's own.
/// - Clones share the schedule and the counters (inject into a clone the
///   engine holds through `engine.store()`).
/// - Errors name the store `"faulty"` unless [`with_name`](Self::with_name)
///   says otherwise.
#[derive(Clone)]
pub struct FaultyStore<S> {
    inner: S,
    name: &'static str,
    max_record_bytes: Option<usize>,
    schedule: Arc<Mutex<Schedule>>,
}

impl<S> fmt::Debug for FaultyStore<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let schedule = self.lock();
        f.debug_struct("FaultyStore")
            .field("name", &self.name)
            .field("max_record_bytes", &self.max_record_bytes)
            .field(
                "faults",
                &schedule
                    .faults
                    .iter()
                    .map(|a| (a.id, &a.fault))
                    .collect::<Vec<_>>(),
            )
            .field("calls", &schedule.calls)
            .finish_non_exhaustive()
    }
}

impl<S> FaultyStore<S> {
    /// Wraps `inner`, with no fault and its own capabilities.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            name: "faulty",
            max_record_bytes: None,
            schedule: Arc::default(),
        }
    }

    /// The store name in the errors it injects.
    #[must_use]
    pub fn with_name(mut self, name: &'static str) -> Self {
        self.name = name;
        self
    }

    /// Declares (and enforces) a record limit of `max` bytes as measured by
    /// [`record_size`], or, with `None`, the wrapped store's own.
    ///
    /// # Behavior
    /// [`capabilities`](Store::capabilities) reports the smaller of `max`
    /// and the wrapped store's limit; larger records are refused with
    /// [`StoreError::Rejected`], writing nothing.
    #[must_use]
    pub fn with_max_record_bytes(mut self, max: Option<usize>) -> Self {
        self.max_record_bytes = max;
        self
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn lock(&self) -> MutexGuard<'_, Schedule> {
        self.schedule.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds `fault` to the schedule; it sees calls from now on.
    pub fn inject(&self, fault: Fault) -> FaultId {
        let mut schedule = self.lock();
        let id = FaultId(schedule.next_id);
        schedule.next_id += 1;
        schedule.faults.push(Active {
            id,
            fault,
            seen: 0,
            hits: 0,
        });
        id
    }

    /// Switches a fault off; `false` if it was not (or no longer) injected.
    pub fn remove(&self, id: FaultId) -> bool {
        let mut schedule = self.lock();
        let Some(at) = schedule.faults.iter().position(|a| a.id == id) else {
            return false;
        };
        let gone = schedule.faults.remove(at);
        schedule.removed_hits.push((id, gone.hits));
        true
    }

    /// Switches every fault off (the counters stay).
    pub fn clear(&self) {
        let mut schedule = self.lock();
        let gone: Vec<(FaultId, u64)> = schedule.faults.drain(..).map(|a| (a.id, a.hits)).collect();
        schedule.removed_hits.extend(gone);
    }

    /// How many calls `id` failed so far.
    pub fn hits(&self, id: FaultId) -> u64 {
        let schedule = self.lock();
        schedule
            .faults
            .iter()
            .find(|a| a.id == id)
            .map(|a| a.hits)
            .or_else(|| {
                schedule
                    .removed_hits
                    .iter()
                    .find(|(r, _)| *r == id)
                    .map(|(_, h)| *h)
            })
            .unwrap_or(0)
    }

    /// How many calls of `op` the store got (failed ones included).
    pub fn calls(&self, op: Op) -> u64 {
        self.lock().calls[op.index()]
    }

    /// How many calls of `op` an injected fault failed.
    pub fn injected(&self, op: Op) -> u64 {
        self.lock().injected[op.index()]
    }

    /// How many calls of `op` were refused by the declared record limit
    /// ([`with_max_record_bytes`](Self::with_max_record_bytes)).
    pub fn oversized(&self, op: Op) -> u64 {
        self.lock().oversized[op.index()]
    }

    /// Counts the call and decides whether a fault strikes it.
    fn plan(&self, call: &Call<'_>) -> Plan {
        let mut schedule = self.lock();
        let i = call.op.index();
        schedule.calls[i] += 1;
        let number = schedule.calls[i];
        let mut strike = None;
        for active in &mut schedule.faults {
            if active.fault.op != call.op
                || !active.fault.predicate.as_ref().is_none_or(|p| p(call))
            {
                continue;
            }
            active.seen += 1;
            if strike.is_none() && active.fault.window.contains(&active.seen) {
                active.hits += 1;
                strike = Some((active.fault.kind, active.fault.phase));
            }
        }
        match strike {
            Some((kind, phase)) => {
                schedule.injected[i] += 1;
                Plan::Fail(
                    kind,
                    InjectedFault {
                        op: call.op,
                        call: number,
                        phase,
                    },
                )
            }
            None => Plan::Pass,
        }
    }
}

impl<S: Store> FaultyStore<S> {
    /// The declared limit: the override, capped by the wrapped store's.
    fn limit(&self) -> Option<usize> {
        match (
            self.max_record_bytes,
            self.inner.capabilities().max_record_bytes,
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Refuses a record above the overridden limit (the wrapped store checks
    /// its own).
    fn check_size(&self, op: Op, record: &Versioned) -> Result<(), StoreError> {
        let Some(limit) = self.max_record_bytes else {
            return Ok(());
        };
        let size = record_size(&record.record);
        if size <= limit {
            return Ok(());
        }
        self.lock().oversized[op.index()] += 1;
        Err(StoreError::Rejected {
            store: self.name,
            source: format!("a record of {size} bytes is over the declared limit of {limit} bytes")
                .into(),
        })
    }

    /// Runs `apply` under the plan for `call`.
    async fn run<T>(
        &self,
        call: Call<'_>,
        apply: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let plan = self.plan(&call);
        let reaches_store = match &plan {
            Plan::Pass => true,
            Plan::Fail(_, fault) => fault.phase == Phase::AfterApply,
        };
        // The declared limit is the store's own check: only a call that
        // reaches the store meets it.
        if let (true, Some(record)) = (reaches_store, call.record) {
            self.check_size(call.op, record)?;
        }
        match plan {
            Plan::Pass => apply.await,
            Plan::Fail(kind, fault) if fault.phase == Phase::BeforeApply => {
                Err(kind.error(self.name, fault))
            }
            Plan::Fail(kind, fault) => {
                apply.await?;
                Err(kind.error(self.name, fault))
            }
        }
    }
}

#[async_trait]
impl<S: Store> Store for FaultyStore<S> {
    fn capabilities(&self) -> Capabilities {
        self.inner
            .capabilities()
            .with_max_record_bytes(self.limit())
    }

    async fn insert_if_absent(
        &self,
        key: &RecordKey,
        record: &Versioned,
        now: Timestamp,
    ) -> Result<InsertOutcome, StoreError> {
        let call = Call::of(Op::InsertIfAbsent, Some(key), Some(record), None, now);
        self.run(call, self.inner.insert_if_absent(key, record, now))
            .await
    }

    async fn get(&self, key: &RecordKey, now: Timestamp) -> Result<Option<Versioned>, StoreError> {
        let call = Call::of(Op::Get, Some(key), None, None, now);
        self.run(call, self.inner.get(key, now)).await
    }

    async fn compare_and_swap(
        &self,
        key: &RecordKey,
        expected: &Versioned,
        record: &Versioned,
        now: Timestamp,
    ) -> Result<SwapOutcome, StoreError> {
        let call = Call::of(
            Op::CompareAndSwap,
            Some(key),
            Some(record),
            Some(expected.revision),
            now,
        );
        let apply = self.inner.compare_and_swap(key, expected, record, now);
        self.run(call, apply).await
    }

    async fn delete_if(
        &self,
        key: &RecordKey,
        expected: &Versioned,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let call = Call::of(Op::DeleteIf, Some(key), None, Some(expected.revision), now);
        self.run(call, self.inner.delete_if(key, expected, now))
            .await
    }

    async fn purge_expired(&self, now: Timestamp, limit: usize) -> Result<u64, StoreError> {
        let call = Call::of(Op::PurgeExpired, None, None, None, now);
        self.run(call, self.inner.purge_expired(now, limit)).await
    }
    async fn census(&self, now: Timestamp, sample: usize) -> Result<Census, StoreError> {
        let call = Call::of(Op::Census, None, None, None, now);
        self.run(call, self.inner.census(now, sample)).await
    }

    async fn abandoned(&self, now: Timestamp, limit: usize) -> Result<Vec<Versioned>, StoreError> {
        let call = Call::of(Op::Abandoned, None, None, None, now);
        self.run(call, self.inner.abandoned(now, limit)).await
    }
}
