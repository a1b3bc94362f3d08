//! The operations of the model test, and their generator.

use proptest::prelude::*;

/// The number of distinct idempotency keys in the model.
pub const KEYS: usize = 2;
/// The number of distinct scopes in the model.
pub const SCOPES: usize = 2;
/// The number of distinct request fingerprints in the model.
pub const FINGERPRINTS: usize = 3;

/// One of the model's [`KEYS`] keys (taken modulo, so no value is rejected).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyIdx(pub u8);
/// One of the model's [`SCOPES`] scopes (modulo).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScopeIdx(pub u8);
/// One of the model's [`FINGERPRINTS`] fingerprints (modulo).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FpIdx(pub u8);
/// One of the leases handed out so far, oldest first (modulo their number;
/// the operation does nothing while there is none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseIdx(pub u8);

/// One step of a generated sequence. Its `Debug` output is valid Rust with
/// `use Op::*` in scope, so a shrunk failure pastes into a regression case.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// `engine.begin` on a key and scope with a fingerprint.
    Begin {
        /// Which key.
        key: KeyIdx,
        /// Which scope.
        scope: ScopeIdx,
        /// Which request.
        fp: FpIdx,
    },
    /// `engine.complete` by a lease holder, with `outcome % 4` copies of the
    /// byte `outcome`.
    Complete {
        /// Which lease.
        lease: LeaseIdx,
        /// The outcome's byte.
        outcome: u8,
    },
    /// `engine.fail` by a lease holder.
    Fail {
        /// Which lease.
        lease: LeaseIdx,
        /// Retryable or permanent.
        retryable: bool,
        /// The outcome's byte.
        outcome: u8,
    },
    /// `engine.fail` with
    /// [`FailureKind::Unknown`](idem_core::FailureKind::Unknown) by a lease
    /// holder (an ambiguous ending: a panic, a dropped or broken response).
    FailUnknown {
        /// Which lease.
        lease: LeaseIdx,
    },
    /// `engine.release` by a lease holder.
    Release {
        /// Which lease.
        lease: LeaseIdx,
    },
    /// `engine.extend` (a heartbeat) by a lease holder.
    Extend {
        /// Which lease.
        lease: LeaseIdx,
    },
    /// `engine.checkpoint` by a lease holder (it records progress): step
    /// `step-{state % 4}`, `state % 5` copies of the byte `state`.
    Checkpoint {
        /// Which lease.
        lease: LeaseIdx,
        /// The step's name and state.
        state: u8,
    },
    /// `store.abandoned` at the current time: the keys whose lease lapsed
    /// with a checkpoint (or `Unsupported`, for a store that does not
    /// declare it).
    Abandoned,
    /// Moves the clock.
    Advance {
        /// By how many milliseconds.
        millis: u32,
    },
    /// `store.purge_expired` at the current time.
    Purge,
}

fn op() -> impl Strategy<Value = Op> {
    let lease = any::<u8>().prop_map(LeaseIdx);
    prop_oneof![
        4 => (any::<u8>(), any::<u8>(), any::<u8>()).prop_map(|(k, s, f)| Op::Begin {
            key: KeyIdx(k),
            scope: ScopeIdx(s),
            fp: FpIdx(f),
        }),
        2 => (lease.clone(), any::<u8>()).prop_map(|(lease, outcome)| Op::Complete { lease, outcome }),
        1 => (lease.clone(), any::<bool>(), any::<u8>())
            .prop_map(|(lease, retryable, outcome)| Op::Fail { lease, retryable, outcome }),
        1 => lease.clone().prop_map(|lease| Op::FailUnknown { lease }),
        1 => lease.clone().prop_map(|lease| Op::Release { lease }),
        1 => lease.clone().prop_map(|lease| Op::Extend { lease }),
        2 => (lease, any::<u8>()).prop_map(|(lease, state)| Op::Checkpoint { lease, state }),
        1 => Just(Op::Abandoned),
        2 => prop_oneof![
            Just(1u32),
            Just(1_000),
            Just(9_999),
            Just(10_000),
            Just(59_999),
            Just(60_000),
            0u32..120_000,
        ]
        .prop_map(|millis| Op::Advance { millis }),
        1 => Just(Op::Purge),
    ]
}

/// Sequences of 1 to 40 operations.
pub fn ops() -> impl Strategy<Value = Vec<Op>> {
    proptest::collection::vec(op(), 1..40)
}
