//! The full conformance suite against `PostgresStore` in its default claim
//! mode, [`ClaimMode::Adaptive`](idem_postgres::ClaimMode::Adaptive) (each
//! case's store is new, so its claims mostly insert first; reading first is
//! the path of `tests/conformance_read_first.rs`), on the server at
//! `IDEM_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`).
//!
//! Each case gets a schema of its own (idem-testkit), dropped after the
//! case. An unreachable server makes every case IGNORED with a banner
//! naming IDEM_POSTGRES_URL, or FAIL under `CI=true` /
//! `IDEM_REQUIRE_BACKENDS=1`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

idem_conformance::conformance_main!(support::factory());
