//! Shared helpers for idem's reliability and security tests (`tests/`).
//!
//! This crate holds no library code of its own: it is where the tests that
//! cross crates live (store faults through the engine and the HTTP layer,
//! zombie workers, bad input, corrupted data, tenant isolation). The
//! backends, isolated stores and the runner come from [`idem_testkit`];
//! the modules here are what only these tests need:
//!
//! | module | what |
//! |---|---|
//! | [`redis`] | an [`idem_faults::FaultProxy`] in front of the standalone Redis server, and stores reached through it with short timeouts (PostgreSQL's are in [`idem_testkit::postgres`]) |
//! | [`engine`] | an engine with a test policy, test keys, the lease of a `begin` that must proceed |
//! | [`http`] | an axum app behind the `idem-tower` layer on a real loopback port, with a handler that counts its executions and can stall on a gate; a reqwest client, raw HTTP/1.1 requests, and a [`Reply`](http::Reply) with problem+json helpers |
//! | [`messaging`] | the brokers of the messaging crash test (RabbitMQ, NATS JetStream) behind one [`messaging::Broker`] trait |
//! | [`pay`] | a payment app with a fixed scope for raw HTTP/1.1 tests: a JSON handler, large answers, a handler that waits on a gate; counters of executions, of requests reaching the router and of body bytes read |
//! | [`wait`] | polling with a deadline (never a bare sleep for a condition); re-exported from [`idem_testkit::wait`], which every test target shares |
//!
//! A test target uses them like this (with `harness = false` in Cargo.toml;
//! [`each!`] adds a test per backend for each named test):
//!
//! ```no_run
//! use idem_testkit::{BackendKind, Isolated, runner::Suite};
//!
//! async fn store_opens(kind: BackendKind) {
//!     let fixture = Isolated::fresh(kind).await;
//!     assert_eq!(fixture.kind(), kind);
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     idem_reliability::each!(Suite::new("idem-reliability (example)"), &BackendKind::ALL, {
//!         "store::opens" => store_opens,
//!         "store::opens_again" => |kind| store_opens(kind),
//!     })
//!     .run()
//! }
//! ```
//!
//! Environment: see [`idem_testkit`] (`IDEM_POSTGRES_URL`,
//! `IDEM_REDIS_URL`, `IDEM_REDIS_CLUSTER_URLS`, `CI` /
//! `IDEM_REQUIRE_BACKENDS`, `IDEM_CASE_TIMEOUT_SECS`).
#![forbid(unsafe_code)]
// Test support: a failed expectation here is a failed test, reported with
// its message, exactly as in the test files themselves.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod engine;
pub mod http;
pub mod messaging;
pub mod pay;
pub mod redis;
pub use idem_testkit::wait;

/// Adds one test per backend of `$backends` for each `"name" => test` to
/// `$suite` (an [`idem_testkit::runner::Suite`]), in order: the
/// `Suite::each` calls of a whole target, one line each (see the
/// [crate docs](crate) for an example). The names stay string literals, so
/// a test that reads the target's source finds them.
#[macro_export]
macro_rules! each {
    ($suite:expr, $backends:expr, { $($name:literal => $test:expr),* $(,)? }) => {
        $suite$(.each($backends, $name, $test))*
    };
}

/// The README's Rust examples, compiled and run as doctests (here, where
/// `idemkit` has every feature the README shows).
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;
