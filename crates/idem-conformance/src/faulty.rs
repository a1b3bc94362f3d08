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
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use idem_core::codec::record_size;
use idem_core::{
    Capabilities, Inserted, RecordKey, Revision, State, Store, StoreError, Swapped, Timestamp,
    Versioned,
};

/// A primitive of the [`Store`] trait.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    /// [`Store::insert_if_absent`] (a claim, or the first read of a key).
    InsertIfAbsent,
    /// [`Store::get`].
    Get,
    /// [`Store::compare_and_swap`] (a completion, a failure, a heartbeat, a takeover).
    CompareAndSwap,
    /// [`Store::delete_if`] (a release).
    DeleteIf,
    /// [`Store::purge_expired`].
    PurgeExpired,
}

impl Op {
    /// Every primitive.
    pub const ALL: [Self; 5] = [
        Self::InsertIfAbsent,
        Self::Get,
        Self::CompareAndSwap,
        Self::DeleteIf,
        Self::PurgeExpired,
    ];

    /// The method's name (`insert_if_absent`, …).
    pub const fn name(self) -> &'static str {
        match self {
            Self::InsertIfAbsent => "insert_if_absent",
            Self::Get => "get",
            Self::CompareAndSwap => "compare_and_swap",
            Self::DeleteIf => "delete_if",
            Self::PurgeExpired => "purge_expired",
        }
    }

    const fn index(self) -> usize {
        match self {
            Self::InsertIfAbsent => 0,
            Self::Get => 1,
            Self::CompareAndSwap => 2,
            Self::DeleteIf => 3,
            Self::PurgeExpired => 4,
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which [`StoreError`] variant an injected fault returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// [`StoreError::Unavailable`] (transient).
    Unavailable,
    /// [`StoreError::Corrupt`].
    Corrupt,
    /// [`StoreError::Rejected`].
    Rejected,
    /// [`StoreError::Generic`].
    Generic,
}

impl FaultKind {
    /// Every kind.
    pub const ALL: [Self; 4] = [
        Self::Unavailable,
        Self::Corrupt,
        Self::Rejected,
        Self::Generic,
    ];

    /// The error of this kind for the store named `store`, with `source` as
    /// its source.
    pub fn error(self, store: &'static str, source: InjectedFault) -> StoreError {
        let source = Box::new(source);
        match self {
            Self::Unavailable => StoreError::Unavailable { store, source },
            Self::Corrupt => StoreError::Corrupt { store, source },
            Self::Rejected => StoreError::Rejected { store, source },
            Self::Generic => StoreError::Generic { store, source },
        }
    }
}

/// When an injected fault strikes, relative to the real call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// The call never reaches the wrapped store: nothing is written, and the
    /// caller gets the error.
    BeforeApply,
    /// The call reaches the wrapped store and takes effect, then the caller
    /// gets the error instead of the reply (a lost reply, a timeout after
    /// the commit). If the wrapped store itself fails, its error is
    /// returned.
    AfterApply,
}

/// The source of every error a [`FaultyStore`] injects, so that a test can
/// tell an injected error from a real one
/// (`error.source()` downcasts to it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InjectedFault {
    /// The primitive that was failed.
    pub op: Op,
    /// Which call of that primitive it was (1 for the first call the store
    /// saw, counting every call).
    pub call: u64,
    /// Whether the call had taken effect.
    pub phase: Phase,
}

impl fmt::Display for InjectedFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let phase = match self.phase {
            Phase::BeforeApply => "before it reached the store",
            Phase::AfterApply => "after it took effect",
        };
        write!(
            f,
            "fault injected into {} call {} {phase}",
            self.op, self.call
        )
    }
}

impl std::error::Error for InjectedFault {}

/// One call as a [`Fault`]'s predicate sees it.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct Call<'a> {
    /// The primitive.
    pub op: Op,
    /// The key (`None` for `purge_expired`).
    pub key: Option<&'a RecordKey>,
    /// The record written (`insert_if_absent` and `compare_and_swap` only).
    pub record: Option<&'a Versioned>,
    /// The revision expected (`compare_and_swap` and `delete_if` only).
    pub expected: Option<Revision>,
    /// The caller's `now`.
    pub now: Timestamp,
}

impl Call<'_> {
    /// Whether the call writes an in-flight record (a claim, a heartbeat, a
    /// takeover).
    pub fn writes_in_flight(&self) -> bool {
        matches!(
            self.record.map(|v| &v.record.state),
            Some(State::InFlight { .. })
        )
    }

    /// Whether the call writes a finished record (a completion or a failure,
    /// `outcome-unknown` included).
    pub fn writes_finished(&self) -> bool {
        matches!(
            self.record.map(|v| &v.record.state),
            Some(State::Completed { .. } | State::Failed { .. })
        )
    }
}

type Predicate = Arc<dyn Fn(&Call<'_>) -> bool + Send + Sync>;

/// A fault to [`inject`](FaultyStore::inject): which calls fail, how, and
/// when.
///
/// # Behavior
/// - A fault *sees* a call when the call's primitive is its [`Op`] and its
///   predicate (if any, [`when`](Self::when)) accepts the call. It numbers
///   the calls it sees 1, 2, 3, … from the moment it was injected.
/// - It *hits* the calls whose number is in its window: every one by
///   default (until [removed](FaultyStore::remove)), the next `n`
///   ([`next`](Self::next)), or numbers `k..=m` ([`calls`](Self::calls)).
/// - A hit call fails with an error of its [`FaultKind`] whose source is an
///   [`InjectedFault`], [before or after](Phase) the call takes effect
///   (default: before).
#[derive(Clone)]
pub struct Fault {
    op: Op,
    kind: FaultKind,
    phase: Phase,
    window: RangeInclusive<u64>,
    predicate: Option<Predicate>,
}

impl fmt::Debug for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fault")
            .field("op", &self.op)
            .field("kind", &self.kind)
            .field("phase", &self.phase)
            .field("window", &self.window)
            .field("predicate", &self.predicate.is_some())
            .finish()
    }
}

impl Fault {
    /// Fails every call of `op` with `kind`, before it takes effect, until
    /// removed.
    pub fn new(op: Op, kind: FaultKind) -> Self {
        Self {
            op,
            kind,
            phase: Phase::BeforeApply,
            window: 1..=u64::MAX,
            predicate: None,
        }
    }

    /// Strikes after the call took effect: the write happened, the caller
    /// gets the error (a lost reply).
    #[must_use]
    pub fn after_apply(mut self) -> Self {
        self.phase = Phase::AfterApply;
        self
    }

    /// Strikes before the call takes effect (the default): nothing is written.
    #[must_use]
    pub fn before_apply(mut self) -> Self {
        self.phase = Phase::BeforeApply;
        self
    }

    /// Hits only the next `n` calls it sees (`next(0)` hits none).
    #[must_use]
    pub fn next(self, n: u64) -> Self {
        if n == 0 {
            #[allow(clippy::reversed_empty_ranges)]
            return self.calls(1..=0);
        }
        self.calls(1..=n)
    }

    /// Hits the calls it sees numbered `range` (1 is the first call seen
    /// after the fault was injected): `calls(2..=2)` fails only the second.
    #[must_use]
    pub fn calls(mut self, range: RangeInclusive<u64>) -> Self {
        self.window = range;
        self
    }

    /// Hits every call it sees, until [removed](FaultyStore::remove) (the
    /// default).
    #[must_use]
    pub fn always(self) -> Self {
        self.calls(1..=u64::MAX)
    }

    /// Sees only the calls `predicate` accepts (they alone are numbered).
    /// Replaces an earlier predicate.
    #[must_use]
    pub fn when(mut self, predicate: impl Fn(&Call<'_>) -> bool + Send + Sync + 'static) -> Self {
        self.predicate = Some(Arc::new(predicate));
        self
    }

    /// Sees only calls that write an in-flight record
    /// ([`Call::writes_in_flight`]): with [`Op::CompareAndSwap`], heartbeats
    /// and takeovers.
    #[must_use]
    pub fn writing_in_flight(self) -> Self {
        self.when(|call| call.writes_in_flight())
    }

    /// Sees only calls that write a finished record
    /// ([`Call::writes_finished`]): with [`Op::CompareAndSwap`],
    /// completions and failures.
    #[must_use]
    pub fn writing_finished(self) -> Self {
        self.when(|call| call.writes_finished())
    }

    /// The primitive it fails.
    pub fn op(&self) -> Op {
        self.op
    }
    /// The error it returns.
    pub fn kind(&self) -> FaultKind {
        self.kind
    }
    /// When it strikes.
    pub fn phase(&self) -> Phase {
        self.phase
    }
}

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
    calls: [u64; 5],
    injected: [u64; 5],
    oversized: [u64; 5],
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
    ) -> Result<Inserted, StoreError> {
        let call = Call {
            op: Op::InsertIfAbsent,
            key: Some(key),
            record: Some(record),
            expected: None,
            now,
        };
        self.run(call, self.inner.insert_if_absent(key, record, now))
            .await
    }

    async fn get(&self, key: &RecordKey, now: Timestamp) -> Result<Option<Versioned>, StoreError> {
        let call = Call {
            op: Op::Get,
            key: Some(key),
            record: None,
            expected: None,
            now,
        };
        self.run(call, self.inner.get(key, now)).await
    }

    async fn compare_and_swap(
        &self,
        key: &RecordKey,
        expected: Revision,
        record: &Versioned,
        now: Timestamp,
    ) -> Result<Swapped, StoreError> {
        let call = Call {
            op: Op::CompareAndSwap,
            key: Some(key),
            record: Some(record),
            expected: Some(expected),
            now,
        };
        self.run(
            call,
            self.inner.compare_and_swap(key, expected, record, now),
        )
        .await
    }

    async fn delete_if(
        &self,
        key: &RecordKey,
        expected: Revision,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let call = Call {
            op: Op::DeleteIf,
            key: Some(key),
            record: None,
            expected: Some(expected),
            now,
        };
        self.run(call, self.inner.delete_if(key, expected, now))
            .await
    }

    async fn purge_expired(&self, now: Timestamp, limit: usize) -> Result<u64, StoreError> {
        let call = Call {
            op: Op::PurgeExpired,
            key: None,
            record: None,
            expected: None,
            now,
        };
        self.run(call, self.inner.purge_expired(now, limit)).await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::error::Error as _;

    use idem_core::codec::RECORD_OVERHEAD;
    use idem_core::{FailureKind, FencingToken, MemoryStore, Outcome};

    use super::*;
    use crate::cases::{T0, claim, completed, key};

    fn store() -> FaultyStore<MemoryStore> {
        FaultyStore::new(MemoryStore::new())
    }

    fn injected(e: &StoreError) -> &InjectedFault {
        e.source()
            .and_then(|s| s.downcast_ref::<InjectedFault>())
            .unwrap_or_else(|| panic!("not an injected fault: {e:?}"))
    }

    #[tokio::test]
    async fn without_faults_it_is_transparent_and_counts() {
        let s = store();
        let k = key("t");
        let rec = claim(1, 1, T0, 60);
        assert_eq!(
            s.insert_if_absent(&k, &rec, T0).await.unwrap(),
            Inserted::Inserted
        );
        assert_eq!(s.get(&k, T0).await.unwrap(), Some(rec.clone()));
        let next = completed(2, 1, T0, 60, b"ok");
        assert_eq!(
            s.compare_and_swap(&k, rec.revision, &next, T0)
                .await
                .unwrap(),
            Swapped::Swapped
        );
        assert!(s.delete_if(&k, next.revision, T0).await.unwrap());
        assert_eq!(s.purge_expired(T0, 10).await.unwrap(), 0);
        for op in Op::ALL {
            assert_eq!(s.calls(op), 1, "{op}");
            assert_eq!(s.injected(op), 0, "{op}");
        }
        assert_eq!(s.capabilities(), MemoryStore::new().capabilities());
    }

    #[tokio::test]
    async fn next_n_fails_the_next_calls_only() {
        let s = store();
        let k = key("n");
        let id = s.inject(Fault::new(Op::Get, FaultKind::Unavailable).next(2));
        for call in 1..=2 {
            let e = s.get(&k, T0).await.unwrap_err();
            assert!(e.is_transient());
            assert_eq!(
                injected(&e),
                &InjectedFault {
                    op: Op::Get,
                    call,
                    phase: Phase::BeforeApply
                }
            );
        }
        assert_eq!(s.get(&k, T0).await.unwrap(), None);
        assert_eq!(
            (s.hits(id), s.calls(Op::Get), s.injected(Op::Get)),
            (2, 3, 2)
        );
        // Other primitives are untouched.
        s.insert_if_absent(&k, &claim(1, 1, T0, 60), T0)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_window_fails_calls_k_to_m_counted_from_injection() {
        let s = store();
        let k = key("w");
        s.get(&k, T0).await.unwrap();
        let id = s.inject(Fault::new(Op::Get, FaultKind::Generic).calls(2..=3));
        let mut results = Vec::new();
        for _ in 0..5 {
            results.push(s.get(&k, T0).await.is_ok());
        }
        assert_eq!(results, [true, false, false, true, true]);
        assert_eq!(s.hits(id), 2);
        assert_eq!(s.calls(Op::Get), 6);
    }

    #[tokio::test]
    async fn always_until_removed() {
        let s = store();
        let k = key("a");
        let id = s.inject(Fault::new(Op::DeleteIf, FaultKind::Rejected));
        for _ in 0..3 {
            assert!(matches!(
                s.delete_if(&k, Revision::from_u64(1), T0).await,
                Err(StoreError::Rejected {
                    store: "faulty",
                    ..
                })
            ));
        }
        assert!(s.remove(id));
        assert!(!s.remove(id));
        assert!(!s.delete_if(&k, Revision::from_u64(1), T0).await.unwrap());
        assert_eq!(s.hits(id), 3, "hits survive removal");
        let again = s.inject(Fault::new(Op::PurgeExpired, FaultKind::Corrupt));
        assert!(matches!(
            s.purge_expired(T0, 1).await,
            Err(StoreError::Corrupt { .. })
        ));
        s.clear();
        assert_eq!(s.purge_expired(T0, 1).await.unwrap(), 0);
        assert_eq!(s.hits(again), 1);
    }

    #[tokio::test]
    async fn before_apply_writes_nothing_after_apply_writes() {
        let s = store();
        let k = key("phase");
        let rec = claim(1, 1, T0, 60);
        s.inject(Fault::new(Op::InsertIfAbsent, FaultKind::Unavailable).next(1));
        s.insert_if_absent(&k, &rec, T0).await.unwrap_err();
        assert_eq!(s.inner().get(&k, T0).await.unwrap(), None);

        s.inject(
            Fault::new(Op::InsertIfAbsent, FaultKind::Unavailable)
                .after_apply()
                .next(1),
        );
        let e = s.insert_if_absent(&k, &rec, T0).await.unwrap_err();
        assert_eq!(injected(&e).phase, Phase::AfterApply);
        assert_eq!(s.inner().get(&k, T0).await.unwrap(), Some(rec.clone()));

        let next = completed(2, 1, T0, 60, b"done");
        s.inject(
            Fault::new(Op::CompareAndSwap, FaultKind::Unavailable)
                .after_apply()
                .next(1),
        );
        s.compare_and_swap(&k, rec.revision, &next, T0)
            .await
            .unwrap_err();
        assert_eq!(s.inner().get(&k, T0).await.unwrap(), Some(next.clone()));

        s.inject(
            Fault::new(Op::DeleteIf, FaultKind::Generic)
                .after_apply()
                .next(1),
        );
        s.delete_if(&k, next.revision, T0).await.unwrap_err();
        assert_eq!(s.inner().get(&k, T0).await.unwrap(), None);
        // The wrapped store's own answer wins over an after-apply fault when
        // it fails: here it conflicts (not an error), so the fault strikes.
        s.inject(
            Fault::new(Op::CompareAndSwap, FaultKind::Generic)
                .after_apply()
                .next(1),
        );
        s.compare_and_swap(&k, rec.revision, &next, T0)
            .await
            .unwrap_err();
        assert_eq!(s.inner().get(&k, T0).await.unwrap(), None);
    }

    #[tokio::test]
    async fn predicates_tell_heartbeats_from_completions() {
        let s = store();
        let k = key("p");
        let rec = claim(1, 1, T0, 60);
        s.insert_if_absent(&k, &rec, T0).await.unwrap();
        let beats = s.inject(
            Fault::new(Op::CompareAndSwap, FaultKind::Unavailable)
                .writing_in_flight()
                .calls(2..=2),
        );
        let mut current = rec;
        for (i, fails) in [(2, false), (3, true), (4, false)] {
            let mut beat = current.clone();
            beat.revision = Revision::from_u64(i);
            let got = s.compare_and_swap(&k, current.revision, &beat, T0).await;
            assert_eq!(got.is_err(), fails, "heartbeat {i}");
            if !fails {
                current = beat;
            }
        }
        assert_eq!(s.hits(beats), 1);
        let done = s.inject(
            Fault::new(Op::CompareAndSwap, FaultKind::Rejected)
                .writing_finished()
                .when(|c| c.writes_finished() && c.key.is_some_and(|k| k.key().as_str() == "p")),
        );
        let mut finished = completed(9, 1, T0, 60, b"x");
        finished.record.state = State::Failed {
            token: FencingToken::from_u128(1),
            kind: FailureKind::Unknown,
            outcome: Outcome::default(),
        };
        let e = s
            .compare_and_swap(&k, current.revision, &finished, T0)
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::Rejected { .. }));
        assert_eq!(s.hits(done), 1);
        assert_eq!(s.inner().get(&k, T0).await.unwrap(), Some(current));
    }

    #[test]
    fn every_kind_maps_to_its_variant() {
        for kind in FaultKind::ALL {
            let e = kind.error(
                "x",
                InjectedFault {
                    op: Op::Get,
                    call: 1,
                    phase: Phase::BeforeApply,
                },
            );
            let ok = matches!(
                (kind, &e),
                (FaultKind::Unavailable, StoreError::Unavailable { .. })
                    | (FaultKind::Corrupt, StoreError::Corrupt { .. })
                    | (FaultKind::Rejected, StoreError::Rejected { .. })
                    | (FaultKind::Generic, StoreError::Generic { .. })
            );
            assert!(ok, "{kind:?} → {e:?}");
            assert_eq!(e.is_transient(), kind == FaultKind::Unavailable);
            assert!(injected(&e).to_string().contains("get call 1"));
        }
    }

    #[tokio::test]
    async fn a_declared_limit_is_enforced_by_record_size() {
        let limit = RECORD_OVERHEAD + 100;
        let s = store().with_max_record_bytes(Some(limit));
        assert_eq!(s.capabilities().max_record_bytes, Some(limit));
        let k = key("l");
        let at = completed(1, 1, T0, 60, &[7; 100]);
        assert_eq!(record_size(&at.record), limit);
        s.insert_if_absent(&k, &at, T0).await.unwrap();
        let over = completed(2, 1, T0, 60, &[7; 101]);
        let k2 = key("l2");
        assert!(matches!(
            s.insert_if_absent(&k2, &over, T0).await,
            Err(StoreError::Rejected { .. })
        ));
        assert!(matches!(
            s.compare_and_swap(&k, at.revision, &over, T0).await,
            Err(StoreError::Rejected { .. })
        ));
        assert_eq!(s.get(&k2, T0).await.unwrap(), None);
        assert_eq!(s.get(&k, T0).await.unwrap(), Some(at));
        assert_eq!(s.oversized(Op::InsertIfAbsent), 1);
        assert_eq!(s.oversized(Op::CompareAndSwap), 1);
        // Never declares more than the wrapped store's own limit.
        let capped = FaultyStore::new(store().with_max_record_bytes(Some(500)))
            .with_max_record_bytes(Some(1000));
        assert_eq!(capped.capabilities().max_record_bytes, Some(500));
    }

    #[tokio::test]
    async fn the_engine_sees_the_store_limit_and_the_faults() {
        let s = store().with_max_record_bytes(Some(RECORD_OVERHEAD + 64));
        let engine = idem_core::Engine::with_clock(s, idem_core::ManualClock::new(T0))
            .with_policy(crate::cases::policy())
            .unwrap();
        assert_eq!(engine.outcome_limit(), 64);
        engine
            .store()
            .inject(Fault::new(Op::InsertIfAbsent, FaultKind::Unavailable).next(1));
        let scope = crate::cases::scope();
        let k = crate::cases::ikey("e");
        let fp = idem_core::Fingerprint::of(b"r");
        let e = engine.begin(&scope, &k, fp).await.unwrap_err();
        assert!(e.is_transient(), "{e:?}");
        let idem_core::Begin::Proceed(lease) = engine.begin(&scope, &k, fp).await.unwrap() else {
            panic!("a fresh claim")
        };
        let ended = engine
            .settle_until(
                &lease,
                idem_core::Ending::Complete(Outcome::new(vec![1; 65])),
                T0,
            )
            .await
            .unwrap();
        assert_eq!(ended, idem_core::Ending::Unknown);
    }

    #[test]
    fn a_store_with_a_declared_limit_passes_the_store_cases() {
        struct Limited;
        #[async_trait]
        impl crate::StoreFactory for Limited {
            type Store = FaultyStore<MemoryStore>;
            fn name(&self) -> &'static str {
                "faulty-limited"
            }
            async fn open(&self) -> Result<Self::Store, crate::Unavailable> {
                Ok(FaultyStore::new(MemoryStore::new())
                    .with_max_record_bytes(Some(4 * 1024 * 1024)))
            }
        }
        let report = crate::Suite::new(Limited)
            .retain(|n| n.starts_with("store::"))
            .report();
        assert!(report.failed().is_empty(), "{report}");
        for case in [
            "store::oversized_record_is_rejected",
            "store::declared_record_limit_is_honest",
        ] {
            assert_eq!(
                report.verdict(case),
                Some(&crate::Verdict::Passed),
                "{report}"
            );
        }
    }
}
