//! What the backends' own tests share: a fixed start for the manual clock,
//! the test policy, one scope and its keys, claiming and replay
//! assertions, transient-error assertions, racing tasks and polling with a
//! deadline.

use std::time::{Duration, Instant};

use idem_core::store::{FencingToken, Record, Revision, State, Store, StoreError, Versioned};
use idem_core::{
    Begin, Clock, Engine, Fingerprint, IdempotencyKey, Lease, ManualClock, Outcome, Policy,
    RecordKey, ReplayKind, Scope, Timestamp, Transition,
};

/// Where the tests' manual clocks start.
pub const T0: Timestamp = Timestamp::from_millis(1_800_000_000_000);

/// The lease of [`policy`].
pub const LEASE: Duration = Duration::from_secs(10);

/// The request body whose [`fp`] every claim here carries.
pub const REQUEST: &[u8] = br#"{"amount_cents":1000,"to":"bob"}"#;

/// A lease of [`LEASE`] and a 60 s TTL.
pub fn policy() -> Policy {
    Policy::default()
        .with_lease(LEASE)
        .with_ttl(Duration::from_secs(60))
}

/// An engine over `store` with [`policy`], on `clock`.
pub fn engine<S: Store>(store: S, clock: &ManualClock) -> Engine<S, ManualClock> {
    Engine::with_clock(store, clock.clone())
        .with_policy(policy())
        .expect("valid policy")
}

/// Tenant `acme`, operation `payments.create`.
pub fn scope() -> Scope {
    Scope::tenant("acme").with_operation("payments.create")
}

/// The key `s` (panics if invalid).
pub fn ikey(s: &str) -> IdempotencyKey {
    IdempotencyKey::parse(s).unwrap()
}

/// The record key of `s` in [`scope`].
pub fn rkey(s: &str) -> RecordKey {
    RecordKey::new(&scope(), &ikey(s))
}

/// The fingerprint of [`REQUEST`].
pub fn fp() -> Fingerprint {
    Fingerprint::of(REQUEST)
}

/// A completed record: revision `rev`, token `token`, written at `now`,
/// expiring `ttl_secs` later, with `outcome`.
pub fn completed(
    rev: u64,
    token: u128,
    now: Timestamp,
    ttl_secs: u64,
    outcome: &[u8],
) -> Versioned {
    Versioned {
        revision: Revision::from_u64(rev),
        record: Record::from_parts(
            fp(),
            State::Completed {
                token: FencingToken::from_u128(token),
                outcome: Outcome::new(outcome.to_vec()),
            },
            now,
            now,
            now.plus(Duration::from_secs(ttl_secs)),
            1,
        ),
    }
}

/// `engine.begin` for `key` with [`fp`] in [`scope`].
pub async fn begin<S: Store, C: Clock>(engine: &Engine<S, C>, key: &str) -> Begin {
    engine
        .begin(&scope(), &ikey(key), fp())
        .await
        .expect("begin")
}

/// Claims `key`; panics unless the engine says proceed.
pub async fn proceed<S: Store, C: Clock>(engine: &Engine<S, C>, key: &str) -> Lease {
    match begin(engine, key).await {
        Begin::Proceed(lease) => lease,
        other => panic!("expected Proceed for {key}, got {other:?}"),
    }
}

/// The live record under `key` at `now` (panics if there is none).
pub async fn stored(store: &impl Store, key: &RecordKey, now: Timestamp) -> Versioned {
    let found = store.get(key, now).await.expect("get");
    found.unwrap_or_else(|| panic!("no live record under {key:?}"))
}

/// Claims `key` and prepares its completion with `outcome`, to be applied
/// in a transaction.
pub async fn prepared<S: Store, C: Clock>(
    engine: &Engine<S, C>,
    key: &str,
    outcome: &[u8],
) -> (Lease, Transition) {
    let lease = proceed(engine, key).await;
    let done = engine
        .prepare_complete(&lease, Outcome::new(outcome.to_vec()))
        .expect("prepare_complete");
    (lease, done)
}

/// Asserts that `begun` replays `want` as `kind`.
pub fn assert_replays(begun: Begin, want: &[u8], kind: ReplayKind) {
    match begun {
        Begin::Replay(replay) => {
            assert_eq!(replay.outcome.as_bytes(), want, "replayed outcome");
            assert_eq!(replay.kind, kind);
        }
        other => panic!("expected a replay, got {other:?}"),
    }
}

/// Asserts that a retry of `key` replays the completed outcome `want`.
pub async fn replays<S: Store, C: Clock>(engine: &Engine<S, C>, key: &str, want: &[u8]) {
    assert_replays(begin(engine, key).await, want, ReplayKind::Completed);
}

/// Asserts that a retry of `key` is told the key is in progress.
pub async fn in_progress<S: Store, C: Clock>(engine: &Engine<S, C>, key: &str) {
    let begun = begin(engine, key).await;
    assert!(
        matches!(begun, Begin::InProgress { .. }),
        "expected InProgress for {key}, got {begun:?}"
    );
}

/// Asserts that `result` is a transient [`StoreError::Unavailable`].
pub fn assert_transient(result: Result<impl std::fmt::Debug, StoreError>, what: &str) {
    match result {
        Err(e @ StoreError::Unavailable { .. }) => assert!(e.is_transient(), "{what}"),
        other => panic!("{what}: expected StoreError::Unavailable, got {other:?}"),
    }
}

pub use idem_conformance::cases::race;

/// Polls `cond` (yielding in between) until it holds; panics after
/// `limit`.
pub async fn poll_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::task::yield_now().await;
    }
}
