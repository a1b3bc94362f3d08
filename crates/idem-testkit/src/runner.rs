//! The test runner: [`Suite`], a thin layer over idem-conformance's one
//! runner ([`Runner`]) that knows the backends. The conformance suite's own
//! items are re-exported here.
//!
//! # Behavior
//! - Each test names the [`BackendKind`] it needs (or none); each needed
//!   backend is a runner requirement, [probed](BackendKind::probe) once
//!   before the first test. A test whose backend cannot be used is reported
//!   **ignored** with the reason and a banner on stderr, or **fails** under
//!   `CI=true` / `IDEM_REQUIRE_BACKENDS=1`; it is never reported as passed.
//! - Everything else is the [`Runner`]'s: one runtime for the whole run
//!   ([`WORKER_THREADS`] workers),
//!   the per-test timeout (`IDEM_CASE_TIMEOUT_SECS`, default 120 s), a
//!   panic fails the test with its message, `cargo test` filters and
//!   `--list` work.
//! - Unless `--test-threads` is given, [`DEFAULT_TEST_THREADS`] tests run at
//!   a time: such tests spend most of their time waiting on timeouts and
//!   leases, not on the CPU.

use std::future::Future;
use std::process::ExitCode;

pub use idem_conformance::runner::{Runner, Trial};
pub use idem_conformance::{
    Case, CaseFuture, Requires, StoreFactory, Suite as ConformanceSuite, TransactionEnd,
    Unavailable, backends_required, open_store,
};

use crate::BackendKind;

/// Tests run at a time unless `--test-threads` (or
/// [`Suite::with_default_test_threads`]) says otherwise.
pub const DEFAULT_TEST_THREADS: usize = 4;

/// The run's runtime workers: 2 for each of the [`DEFAULT_TEST_THREADS`]
/// tests running at a time (what each test had in a runtime of its own
/// before the runtime was shared).
pub const WORKER_THREADS: usize = 2 * DEFAULT_TEST_THREADS;

/// The tests of one `harness = false` target; see the [module docs](self).
#[derive(Debug)]
pub struct Suite {
    runner: Runner,
}

impl Suite {
    /// An empty suite; `name` appears in the banners.
    pub fn new(name: &str) -> Self {
        let runner = BackendKind::ALL
            .into_iter()
            .chain([BackendKind::Valkey])
            .fold(
                Runner::new(name)
                    .with_worker_threads(WORKER_THREADS)
                    .with_default_test_threads(DEFAULT_TEST_THREADS),
                |runner, kind| runner.requirement(kind.name(), move || kind.probe()),
            );
        Self { runner }
    }

    /// How many tests run at a time when `--test-threads` is not given.
    #[must_use]
    pub fn with_default_test_threads(mut self, n: usize) -> Self {
        self.runner = self.runner.with_default_test_threads(n);
        self
    }

    /// A test that needs no server.
    #[must_use]
    pub fn test<F, Fut>(mut self, name: &str, f: F) -> Self
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.runner = self.runner.trial(Trial::test(name, f));
        self
    }

    /// A test of one backend, named `<name>::<backend>` (`redis_cluster`
    /// for the cluster).
    #[must_use]
    pub fn on<F, Fut>(mut self, backend: BackendKind, name: &str, f: F) -> Self
    where
        F: FnOnce(BackendKind) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let name = format!("{name}::{}", backend.name().replace('-', "_"));
        let trial = Trial::test(name, move || f(backend)).requires(backend.name());
        self.runner = self.runner.trial(trial);
        self
    }

    /// The same test for each of `backends`, named `<name>::<backend>`.
    #[must_use]
    pub fn each<F, Fut>(mut self, backends: &[BackendKind], name: &str, f: F) -> Self
    where
        F: Fn(BackendKind) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        for &backend in backends {
            self = self.on(backend, name, f.clone());
        }
        self
    }

    /// The test names, in order.
    pub fn names(&self) -> Vec<String> {
        self.runner.names()
    }

    /// Runs the tests with the process's arguments; the exit code is that
    /// of `cargo test`.
    pub fn run(self) -> ExitCode {
        self.runner.run()
    }
}
