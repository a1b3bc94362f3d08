//! # idem-conformance
//!
//! The conformance suite every idem [`Store`](idem_core::Store) must pass:
//! named cases for each clause of the store contract, races, engine-level
//! cases, and a model-based test against the pure core model.
//!
//! A backend runs it from a test target with `harness = false`:
//!
//! ```text
//! idem_conformance::conformance_main!(MyFactory::default());
//! ```
//!
//! See docs/backend-authors.md.
#![forbid(unsafe_code)]

pub mod cases;
mod harness;

pub use harness::{
    Case, CaseFuture, Requires, StoreFactory, Suite, Unavailable, backends_required,
};
