//! The full conformance suite against `PostgresStore` in
//! [`ClaimMode::ReadFirst`](idem_postgres::ClaimMode::ReadFirst): the same
//! cases as `tests/conformance.rs`, with every claim reading first.
//!
//! Same server, isolation and IGNORED/FAILED rules as that target.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

idem_conformance::conformance_main!(support::read_first());
