//! The full conformance suite against `PostgresStore` in
//! [`ClaimMode::SingleStatement`](idem_postgres::ClaimMode::SingleStatement):
//! the same cases as `tests/conformance.rs` (the default,
//! [`ClaimMode::Adaptive`](idem_postgres::ClaimMode::Adaptive)), with every
//! claim one data-modifying statement.
//!
//! Same server, isolation and IGNORED/FAILED rules as that target.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

idem_conformance::conformance_main!(support::single_statement());
