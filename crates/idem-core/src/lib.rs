//! # idem-core
//!
//! The pure core of **idem**, a library that makes retried operations take
//! effect once. Its API comes in three layers:
//!
//! | layer | path | for | holds |
//! |---|---|---|---|
//! | application | `idem_core::*` (this page) | code that runs work once per key | the [`Engine`] and what its methods take and return, keys and scopes ([`IdempotencyKey`], [`Scope`], [`RecordKey`]), request [`Fingerprint`]s, the [`Policy`], errors ([`Error`]), clocks ([`Clock`]), and [`MemoryStore`] |
//! | backend | [`idem_core::store`](store) | authors of a store | the [`store::Store`] trait, the versioned [`store::Record`], revisions and tokens, [`store::Capabilities`], the [`store::codec`], [`StoreError`] constructors, the [`store::IdGenerator`] |
//! | model | [`idem_core::machine`](machine) | the model check, the conformance suite, readers of the rules | the key state machine as pure functions: [`machine::decide`] and the record transitions |
//!
//! Nothing here performs I/O or reads a clock of its own: time comes from an
//! injected [`Clock`], storage from a [`store::Store`].
//!
//! ```
//! use idem_core::{Engine, Executed, Fingerprint, IdempotencyKey, MemoryStore, Scope};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idem_core::Error> {
//! let engine = Engine::new(MemoryStore::new());
//! let scope = Scope::tenant("acme").with_operation("payments.create");
//! let key = IdempotencyKey::parse("8e03978e-40d5-43e8-bc93-6894a57f9324")?;
//! let request = Fingerprint::of(br#"{"amount":1000,"currency":"EUR"}"#);
//!
//! let charge = || async { String::from("ch_1") }; // the side effect
//! let first = engine.execute(&scope, &key, request, charge).await?;
//! let retry = engine.execute(&scope, &key, request, charge).await?;
//! assert_eq!(first, Executed::Fresh("ch_1".to_string()));
//! assert_eq!(retry, Executed::Replayed("ch_1".to_string()));
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod engine;
mod error;
mod fingerprint;
mod key;
mod lease;
pub mod machine;
mod memory;
mod outcome;
mod phases;
mod policy;
pub mod store;
mod time;

pub use engine::{
    Begin, CACHE_ENTRY_OVERHEAD, CacheStats, Completer, CompleterTotals, DeadLetterReason,
    DefaultClock, Delivery, Ending, Engine, Executed, Handled, MIN_RETRY, Mismatch, OnError, Pass,
    Replay, ReplayKind, RetryReason, Shutdown,
};
pub use error::{BoxError, Error, StoreError};
pub use fingerprint::{FINGERPRINT_CONTEXT, Fingerprint, FingerprintBuilder};
pub use key::{IdempotencyKey, KeyError, MAX_KEY_LEN, RecordKey, Scope};
pub use lease::{Lease, Transition};
pub use memory::MemoryStore;
pub use outcome::{FailureKind, Outcome};
pub use phases::{CheckpointWriter, PhaseError, Phases, WriteFuture, downstream_key};
pub use policy::{InFlightPolicy, MAX_DURATION, MAX_WAIT, Policy, PolicyError};
#[cfg(feature = "tokio")]
pub use time::SystemClock;
pub use time::{BoxFuture, Clock, ManualClock, Timestamp};
