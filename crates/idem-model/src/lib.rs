//! # idem-model
//!
//! An exhaustive model check of idem's protocol with
//! [`stateright`](https://docs.rs/stateright): several engines, clients
//! retrying one idempotency key, a linearizable store, leases, heartbeats,
//! crashes, stalls (zombies), store outages, clock skew, handler endings and
//! time, explored in every interleaving up to a bound. It reuses idem-core's
//! own pure functions (`decide` and the `Record` transitions), so a change to
//! them changes what is checked. See docs/design.md, "What is model-checked".
//!
//! - [`Config`] says what is explored; [`scenarios`] holds the bounds used by
//!   the tests (`ci`) and by `cargo xtask model --deep`.
//! - [`check()`] runs one configuration and returns a [`Report`] with the
//!   states explored, the time taken, and each property's verdict (with a
//!   step-by-step trace for every counterexample).

pub mod check;
pub mod config;
pub mod model;
pub mod scenarios;
mod trace;

pub use check::{Report, Verdict, check};
pub use config::{ClientSpec, Config, Variant};
pub use model::ProtocolModel;
