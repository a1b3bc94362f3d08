//! Shared helpers for idem's reliability and security tests (`tests/`).
//!
//! This crate holds no library code of its own: it is where the tests that
//! cross crates live (store faults through the engine and the HTTP layer,
//! zombie workers, bad input, corrupted data, tenant isolation). The modules
//! here are the fixtures those test targets share:
//!
//! | module | what |
//! |---|---|
//! | [`harness`] | a libtest-mimic runner: probes each backend once; an unreachable one is IGNORED with a banner, or FAILS under `CI=true` / `IDEM_REQUIRE_BACKENDS=1`; each test runs in a runtime of its own; test schemas and keys are cleaned up at the end |
//! | [`Backend`], [`Fixture`] | a fresh, isolated store of each backend (memory, SQLite in a temp dir, PostgreSQL in a schema of its own, Redis under a prefix of its own, Redis Cluster), plus typed access for raw reads and writes |
//! | [`postgres`], [`redis`], [`sqlite`] | per-backend details: URLs from the environment, unique names, stores behind an [`idem_faults::FaultProxy`] with short timeouts |
//! | [`http`] | an axum app behind the `idem-tower` layer on a real loopback port, with a handler that counts its executions, can stall on a gate, and answers large bodies on demand; a reqwest client and a [`Reply`](http::Reply) with problem+json helpers |
//! | [`wait`] | polling with a deadline (never a bare sleep for a condition) |
//!
//! A test target uses them like this (with `harness = false` in Cargo.toml):
//!
//! ```no_run
//! use idem_reliability::{Backend, Fixture, harness::Suite};
//!
//! fn main() -> std::process::ExitCode {
//!     Suite::new("example")
//!         .each(&Backend::ALL, "store_opens", |backend| async move {
//!             let fixture = Fixture::open(backend).await;
//!             assert_eq!(fixture.backend(), backend);
//!         })
//!         .run()
//! }
//! ```
//!
//! Environment: `IDEM_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`), `IDEM_REDIS_URL` (default
//! `redis://127.0.0.1:6379`), `IDEM_REDIS_CLUSTER_URLS` (comma-separated;
//! unset: the cluster tests are ignored), `CI` / `IDEM_REQUIRE_BACKENDS`
//! (unreachable backends fail), `IDEM_CASE_TIMEOUT_SECS` (hang guard per
//! test, default 120).
#![forbid(unsafe_code)]
// Test support: a failed expectation here is a failed test, reported with
// its message, exactly as in the test files themselves.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod fixture;
pub mod harness;
pub mod http;
pub mod postgres;
pub mod redis;
pub mod sqlite;
pub mod wait;

pub use fixture::{Backend, Fixture, Handle};

use std::hash::BuildHasher;
use std::sync::LazyLock;

/// A tag unique to this test process (pid and a random number), part of
/// every schema name and key prefix the fixtures create.
pub fn run_id() -> &'static str {
    static RUN: LazyLock<String> = LazyLock::new(|| {
        let random = std::collections::hash_map::RandomState::new()
            .hash_one((std::process::id(), std::time::SystemTime::now()));
        format!("{}_{:08x}", std::process::id(), random & 0xffff_ffff)
    });
    &RUN
}

/// Whether an unreachable backend must fail the run (`CI=true` or
/// `IDEM_REQUIRE_BACKENDS=1`) instead of being ignored.
pub fn backends_required() -> bool {
    idem_conformance::backends_required()
}

/// An error and its sources, on one line (for assertion messages).
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(source) = next {
        out.push_str(": ");
        out.push_str(&source.to_string());
        next = source.source();
    }
    out
}
