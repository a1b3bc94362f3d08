//! What to inject: [`Fault`] (which calls of which [`Op`] fail, with
//! which [`FaultKind`], [before or after](Phase) they take effect).

use std::fmt;
use std::ops::RangeInclusive;
use std::sync::Arc;

use idem_core::store::{Revision, State, StoreError, Versioned};
use idem_core::{RecordKey, Timestamp};

/// A primitive of the [`Store`](idem_core::store::Store) trait.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    /// [`Store::insert_if_absent`](idem_core::store::Store::insert_if_absent) (a
    /// claim, or the first read of a key).
    InsertIfAbsent,
    /// [`Store::get`](idem_core::store::Store::get).
    Get,
    /// [`Store::compare_and_swap`](idem_core::store::Store::compare_and_swap) (a
    /// completion, a failure, a heartbeat, a takeover).
    CompareAndSwap,
    /// [`Store::delete_if`](idem_core::store::Store::delete_if) (a release).
    DeleteIf,
    /// [`Store::purge_expired`](idem_core::store::Store::purge_expired).
    PurgeExpired,
    /// [`Store::census`](idem_core::store::Store::census).
    Census,
    /// [`Store::abandoned`](idem_core::store::Store::abandoned) (a
    /// [`Completer`](idem_core::Completer)'s search).
    Abandoned,
}

impl Op {
    /// Every primitive.
    pub const ALL: [Self; 7] = [
        Self::InsertIfAbsent,
        Self::Get,
        Self::CompareAndSwap,
        Self::DeleteIf,
        Self::PurgeExpired,
        Self::Census,
        Self::Abandoned,
    ];

    /// The method's name (`insert_if_absent`, …).
    pub const fn name(self) -> &'static str {
        match self {
            Self::InsertIfAbsent => "insert_if_absent",
            Self::Get => "get",
            Self::CompareAndSwap => "compare_and_swap",
            Self::DeleteIf => "delete_if",
            Self::PurgeExpired => "purge_expired",
            Self::Census => "census",
            Self::Abandoned => "abandoned",
        }
    }

    pub(super) const fn index(self) -> usize {
        match self {
            Self::InsertIfAbsent => 0,
            Self::Get => 1,
            Self::CompareAndSwap => 2,
            Self::DeleteIf => 3,
            Self::PurgeExpired => 4,
            Self::Census => 5,
            Self::Abandoned => 6,
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

/// The source of every error a [`FaultyStore`](super::FaultyStore) injects, so that a test can
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
    /// The key (`None` for `purge_expired`, `census` and `abandoned`).
    pub key: Option<&'a RecordKey>,
    /// The record written (`insert_if_absent` and `compare_and_swap` only).
    pub record: Option<&'a Versioned>,
    /// The revision expected (`compare_and_swap` and `delete_if` only).
    pub expected: Option<Revision>,
    /// The caller's `now`.
    pub now: Timestamp,
}

impl<'a> Call<'a> {
    pub(super) fn of(
        op: Op,
        key: Option<&'a RecordKey>,
        record: Option<&'a Versioned>,
        expected: Option<Revision>,
        now: Timestamp,
    ) -> Self {
        Self {
            op,
            key,
            record,
            expected,
            now,
        }
    }

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

/// A fault to [`inject`](super::FaultyStore::inject): which calls fail, how, and
/// when.
///
/// # Behavior
/// - A fault *sees* a call when the call's primitive is its [`Op`] and its
///   predicate (if any, [`when`](Self::when)) accepts the call. It numbers
///   the calls it sees 1, 2, 3, … from the moment it was injected.
/// - It *hits* the calls whose number is in its window: every one by
///   default (until [removed](super::FaultyStore::remove)), the next `n`
///   ([`next`](Self::next)), or numbers `k..=m` ([`calls`](Self::calls)).
/// - A hit call fails with an error of its [`FaultKind`] whose source is an
///   [`InjectedFault`], [before or after](Phase) the call takes effect
///   (default: before).
#[derive(Clone)]
pub struct Fault {
    pub(super) op: Op,
    pub(super) kind: FaultKind,
    pub(super) phase: Phase,
    pub(super) window: RangeInclusive<u64>,
    pub(super) predicate: Option<Predicate>,
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

    /// Hits every call it sees, until [removed](super::FaultyStore::remove) (the
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
