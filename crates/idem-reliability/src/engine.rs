//! Engine-level shorthands shared by the test files.

use idem_core::store::Store;
use idem_core::{Begin, Clock, Engine, Lease, Policy};

/// An engine over `store` on `clock` with `policy` (a test's policy is
/// valid: panics otherwise).
pub fn engine<S: Store, C: Clock>(store: S, clock: C, policy: Policy) -> Engine<S, C> {
    Engine::with_clock(store, clock)
        .with_policy(policy)
        .expect("a valid policy")
}

/// A test's key (`name` is a valid key; panics otherwise).
pub use idem_testkit::fixtures::ikey as key;

/// The lease of a `begin` that must proceed, as attempt `attempt`; fails
/// the test naming `what` otherwise.
#[track_caller]
pub fn proceed(begin: Begin, attempt: u32, what: &str) -> Lease {
    match begin {
        Begin::Proceed(lease) => {
            assert_eq!(lease.attempt(), attempt, "{what}: attempt");
            lease
        }
        other => panic!("{what}: expected Proceed (attempt {attempt}), got {other:?}"),
    }
}
