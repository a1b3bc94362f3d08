//! The full conformance suite against `PostgresStore`, on the server at
//! `IDEM_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`).
//!
//! Each case gets a schema of its own (idem-testkit), dropped after the
//! case. An unreachable server makes every case IGNORED with a banner
//! naming IDEM_POSTGRES_URL, or FAIL under `CI=true` /
//! `IDEM_REQUIRE_BACKENDS=1`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

idem_conformance::conformance_main!(support::factory());
