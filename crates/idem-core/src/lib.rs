//! # idem-core
//!
//! The pure core of **idem**, a library that makes retried operations take
//! effect once: keys and scopes ([`IdempotencyKey`], [`Scope`],
//! [`RecordKey`]), request [`Fingerprint`]s, [`Record`]s and the key state
//! machine ([`decide`] and the `Record` transitions), the [`codec`], the
//! [`Store`] trait, the [`Engine`] that drives a store, and [`MemoryStore`].
//!
//! Nothing here performs I/O or reads a clock of its own: time comes from an
//! injected [`Clock`], storage from a [`Store`].
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

pub mod codec;
mod engine;
mod error;
mod fingerprint;
mod key;
mod lease;
mod machine;
mod memory;
mod policy;
mod record;
mod store;
mod time;

pub use codec::CodecError;
pub use engine::{
    Begin, DefaultClock, Ending, Engine, Executed, OnError, Replay, ReplayKind, Shutdown,
};
pub use error::{BoxError, Error, StoreError};
pub use fingerprint::{FINGERPRINT_CONTEXT, Fingerprint, FingerprintBuilder};
pub use key::{IdempotencyKey, KeyError, MAX_KEY_LEN, RecordKey, Scope};
pub use lease::{Lease, Transition};
pub use machine::{Decision, Fenced, ReclaimReason, decide};
pub use memory::MemoryStore;
pub use policy::{InFlightPolicy, MAX_DURATION, MAX_WAIT, Policy, PolicyError};
pub use record::{FailureKind, FencingToken, Outcome, Record, Revision, State, Versioned};
pub use store::{Capabilities, Inserted, Store, Swapped};
#[cfg(feature = "tokio")]
pub use time::SystemClock;
pub use time::{BoxFuture, Clock, ManualClock, Timestamp};
