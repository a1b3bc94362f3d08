//! # idem-testkit
//!
//! The test support every idem test target and support tool shares
//! (unpublished): which backends there are and where their servers are,
//! stores isolated from every other test, the PostgreSQL and Redis chores,
//! and the test runner.
//!
//! | item | what |
//! |---|---|
//! | [`BackendKind`] | memory, sqlite, postgres, redis, redis-cluster: names, [`url`](BackendKind::url) from the environment (through [`idemkit::StoreUrl`]), [`probe`](BackendKind::probe) |
//! | [`env`](mod@env) | the only reader of `IDEM_POSTGRES_URL`, `IDEM_REDIS_URL`, `IDEM_REDIS_CLUSTER_URLS` (with the local defaults) |
//! | [`Isolated`] | a store of one backend that shares no record with any other: a temporary file, a schema or a key prefix of its own; counts its records; removes them on [`close`](Isolated::close) or drop |
//! | [`Isolation`] | isolated stores handed out one after another (a conformance factory's) and closed by place |
//! | [`Factory`] | the conformance suite's `StoreFactory` over an [`Isolation`]; a backend adds its [`Hooks`] (corrupt a record, apply a transition in its transaction); [`cases!`] adds a backend's own cases |
//! | [`fixtures`] | what the backends' own tests share: a fixed clock start, the test policy, scope and keys, claiming, replay and transient-error assertions, racing tasks, polling |
//! | [`postgres`] | connect with a bounded wait, drop schemas, unique schema names, count rows, the server behind a fault proxy |
//! | [`redis`] | `CLUSTER NODES` discovery of the masters, prefix-scoped `SCAN` counts and deletes (one slot per command, never `FLUSHDB`), a connection that routes by key |
//! | [`wait`] | polling with a deadline, the one way a test waits for a condition it cannot await (a broker's queue, a server's state): never a bare sleep |
//! | [`runner`] | the libtest-mimic runner: probes each backend once, skipped-is-ignored (failed under CI), runtime and per-test timeout; and the conformance suite's items |
//!
//! ```no_run
//! use idem_testkit::{BackendKind, Isolated, runner::Suite};
//!
//! fn main() -> std::process::ExitCode {
//!     Suite::new("example")
//!         .each(&BackendKind::ALL, "store_opens", |kind| async move {
//!             let isolated = Isolated::fresh(kind).await;
//!             assert_eq!(isolated.records().await.unwrap(), 0);
//!         })
//!         .run()
//! }
//! ```
//!
//! Environment: `IDEM_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`), `IDEM_REDIS_URL` (default
//! `redis://127.0.0.1:6379`), `IDEM_REDIS_CLUSTER_URLS` (comma-separated
//! node URLs; unset: the cluster is unavailable), `CI` /
//! `IDEM_REQUIRE_BACKENDS` (an unavailable backend fails instead of being
//! ignored), `IDEM_CASE_TIMEOUT_SECS` (hang guard per test, default 120).
#![forbid(unsafe_code)]
// Test support: a failed expectation here is a failed test, reported with
// its message, as in the test files themselves.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod backend;
pub mod env;
mod factory;
pub mod fixtures;
mod isolated;
pub mod postgres;
pub mod redis;
pub mod runner;
pub mod wait;

pub use backend::BackendKind;
pub use factory::{Factory, Hooks, KitStore};
pub use idem_conformance::{Unavailable, backends_required};
pub use idemkit::{self, AnyStore, StoreUrl};
pub use isolated::{Isolated, Isolation};

use std::hash::BuildHasher;
use std::sync::LazyLock;

/// A tag unique to this test process (pid and a random number), part of
/// every schema name and key prefix the kit creates.
pub fn run_id() -> &'static str {
    static RUN: LazyLock<String> = LazyLock::new(|| {
        let random = std::collections::hash_map::RandomState::new()
            .hash_one((std::process::id(), std::time::SystemTime::now()));
        format!("{}_{:08x}", std::process::id(), random & 0xffff_ffff)
    });
    &RUN
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
