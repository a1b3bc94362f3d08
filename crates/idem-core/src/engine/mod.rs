//! The engine: drives a [`Store`] through the key state machine
//! ([`machine`](crate::machine)).
//!
//! One concern per file:
//!
//! | file | holds |
//! |---|---|
//! | `mod.rs` | [`Engine`], its construction and settings |
//! | `begin.rs` | [`Engine::begin`]: claim, replay or refuse ([`Begin`], [`Replay`], [`Mismatch`]) |
//! | `cache.rs` | the opt-in cache of finished records ([`Engine::with_finished_cache`], [`CacheStats`]) |
//! | `holder.rs` | the holder's writes: complete, fail, extend, release, and the transactional `prepare_*` |
//! | `checkpoint.rs` | recovery points: [`Engine::checkpoint`] and [`Engine::prepare_checkpoint`] |
//! | `completer.rs` | the [`Completer`]: drives abandoned keys with a checkpoint to completion |
//! | `settle.rs` | [`Engine::settle`] ([`Ending`]) and the guard that ends a dropped claim |
//! | `heartbeat.rs` | [`Engine::keep_alive`] and [`Engine::run_with_heartbeat`] |
//! | `execute.rs` | [`Engine::execute`] and [`Engine::try_execute`] ([`Executed`], [`OnError`]) |
//! | `shutdown.rs` | [`Engine::shutdown`] ([`Shutdown`]) |

use std::sync::Arc;

use crate::lease::Claims;
use crate::store::codec;
use crate::store::{IdGenerator, Store};
use crate::{Clock, Policy, PolicyError};

mod begin;
mod cache;
mod checkpoint;
mod completer;
mod consume;
mod execute;
mod heartbeat;
mod holder;
mod settle;
mod shutdown;

pub use begin::{Begin, Mismatch, Replay, ReplayKind};
pub use cache::{CACHE_ENTRY_OVERHEAD, CacheStats};
pub use completer::{Completer, CompleterTotals, Pass};
pub use consume::{DeadLetterReason, Delivery, Handled, MIN_RETRY, RetryReason};
pub use execute::{Executed, OnError};
pub use settle::Ending;
pub use shutdown::Shutdown;

/// Runs the key state machine against a [`Store`].
///
/// # Behavior
/// - [`begin`](Self::begin) makes one store call for a new key (the claim) and
///   one for a finished key (the replay); [`complete`](Self::complete) makes one.
///   With the opt-in cache of finished records
///   ([`with_finished_cache`](Self::with_finished_cache)), a replay of a
///   finished key this engine has seen makes none.
/// - Races on a key are settled by the store's atomic primitives; the engine
///   re-reads and decides again after losing one, at most
///   [`Policy::max_cas_retries`] times.
/// - Every time decision uses the injected [`Clock`].
/// - Clones share the store, the clock, the registry of running claims
///   that [`shutdown`](Self::shutdown) waits for, and the cache of finished
///   records if it is on; cloning is cheap.
#[derive(Debug)]
pub struct Engine<S, C = DefaultClock> {
    shared: Arc<Shared<S, C>>,
    policy: Arc<Policy>,
    outcome_limit: usize,
    /// The opt-in cache of finished records (`cache.rs`).
    finished: Option<Arc<cache::FinishedCache>>,
}

#[derive(Debug)]
struct Shared<S, C> {
    store: S,
    clock: C,
    ids: IdGenerator,
    claims: Arc<Claims>,
}

impl<S, C> Clone for Engine<S, C> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            policy: Arc::clone(&self.policy),
            outcome_limit: self.outcome_limit,
            finished: self.finished.clone(),
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
                ids: IdGenerator::new(),
                claims: Arc::default(),
            }),
            policy: Arc::new(policy),
            outcome_limit,
            finished: None,
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
    /// [`max_record_bytes`](crate::store::Capabilities::max_record_bytes) leaves
    /// after a record's fixed fields ([`codec::RECORD_OVERHEAD`]).
    pub fn outcome_limit(&self) -> usize {
        self.outcome_limit
    }

    /// Whether [`shutdown`](Self::shutdown) has begun: new claims are refused
    /// with [`Error::ShuttingDown`](crate::Error::ShuttingDown).
    pub fn is_shutting_down(&self) -> bool {
        self.shared.claims.is_closing()
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
