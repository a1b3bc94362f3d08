//! The test runner of the reliability targets (`harness = false`), on
//! libtest-mimic: `cargo test` filters, `--list`, `--test-threads` and the
//! usual output all work.
//!
//! # Behavior
//! - Each test names the [`Backend`] it needs (or none). Every needed backend
//!   is probed once, before any test runs. A test whose backend cannot be
//!   reached is reported **ignored**, with the reason, and a banner on
//!   stderr says so loudly; with `CI=true` or `IDEM_REQUIRE_BACKENDS=1` it
//!   **fails** instead. It is never reported as passed.
//! - Each test runs in a tokio runtime of its own (multi-threaded, 2
//!   workers), bounded by `IDEM_CASE_TIMEOUT_SECS` (default 120 s) as a
//!   guard against hangs; a panic fails the test with its message.
//! - Unless `--test-threads` is given, 4 tests run at a time: they spend
//!   most of their time waiting on timeouts and leases, not on the CPU.
//! - At the end, the PostgreSQL schemas and Redis keys this process created
//!   are removed (only those).

use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;
use std::time::Duration;

use libtest_mimic::{Arguments, Completion, Failed, Trial};

use crate::Backend;

/// A boxed test future.
pub type TestFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Tests run at a time unless `--test-threads` says otherwise.
pub const DEFAULT_TEST_THREADS: usize = 4;

struct Entry {
    name: String,
    backend: Option<Backend>,
    run: Box<dyn FnOnce() -> TestFuture + Send>,
}

/// The tests of one target; see the [module docs](self).
pub struct Suite {
    name: &'static str,
    entries: Vec<Entry>,
}

impl std::fmt::Debug for Suite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Suite")
            .field("name", &self.name)
            .field(
                "tests",
                &self.entries.iter().map(|e| &e.name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Suite {
    /// An empty suite; `name` appears in the banners.
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            entries: Vec::new(),
        }
    }

    /// A test that needs no server.
    #[must_use]
    pub fn test<F, Fut>(mut self, name: &str, f: F) -> Self
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.entries.push(Entry {
            name: name.to_string(),
            backend: None,
            run: Box::new(move || Box::pin(f())),
        });
        self
    }

    /// A test of one backend, named `<name>::<backend>`.
    #[must_use]
    pub fn on<F, Fut>(mut self, backend: Backend, name: &str, f: F) -> Self
    where
        F: FnOnce(Backend) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.entries.push(Entry {
            name: format!("{name}::{backend}"),
            backend: Some(backend),
            run: Box::new(move || Box::pin(f(backend))),
        });
        self
    }

    /// The same test for each of `backends`, named `<name>::<backend>`.
    #[must_use]
    pub fn each<F, Fut>(mut self, backends: &[Backend], name: &str, f: F) -> Self
    where
        F: Fn(Backend) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        for &backend in backends {
            self = self.on(backend, name, f.clone());
        }
        self
    }

    /// The test names, in order.
    pub fn names(&self) -> Vec<String> {
        self.entries.iter().map(|e| e.name.clone()).collect()
    }

    /// Probes the backends, runs the tests with the process's arguments,
    /// cleans up; the exit code is that of `cargo test`.
    pub fn run(self) -> ExitCode {
        let mut args = Arguments::from_args();
        if args.test_threads.is_none() {
            args.test_threads = Some(DEFAULT_TEST_THREADS);
        }
        let mut needed: Vec<Backend> = self.entries.iter().filter_map(|e| e.backend).collect();
        needed.sort();
        needed.dedup();
        let probes: Vec<(Backend, Result<(), String>)> = if args.list {
            needed.iter().map(|&b| (b, Ok(()))).collect()
        } else {
            let rt = runtime();
            let probed = needed
                .iter()
                .map(|&b| {
                    let result = rt.block_on(async move {
                        tokio::time::timeout(Duration::from_secs(15), b.probe())
                            .await
                            .unwrap_or_else(|_| Err("the probe did not finish in 15 s".into()))
                    });
                    (b, result)
                })
                .collect();
            rt.shutdown_timeout(Duration::from_secs(1));
            probed
        };
        let required = crate::backends_required();
        for (backend, result) in &probes {
            if let Err(why) = result {
                eprintln!(
                    "\n================ idem-reliability ({}): {backend} UNAVAILABLE ================\n\
                     {why}\n{}\n=====================================================================================\n",
                    self.name,
                    if required {
                        "CI=true or IDEM_REQUIRE_BACKENDS=1 is set: every test of this backend FAILS."
                    } else {
                        "Every test of this backend is reported as IGNORED (not passed). Set CI=true or IDEM_REQUIRE_BACKENDS=1 to fail instead."
                    }
                );
            }
        }
        let unavailable = |backend: Backend| {
            probes
                .iter()
                .find(|(b, _)| *b == backend)
                .and_then(|(_, r)| r.as_ref().err().cloned())
        };
        let trials = self
            .entries
            .into_iter()
            .map(|entry| {
                let Entry { name, backend, run } = entry;
                match backend.and_then(|b| unavailable(b).map(|why| (b, why))) {
                    None => Trial::test(name, move || run_test(run).map_err(Failed::from)),
                    Some((b, why)) if required => Trial::test(name, move || {
                        Err(Failed::from(format!("{b} unavailable: {why}")))
                    }),
                    Some((b, _)) => Trial::ignorable_test(name, move || {
                        Ok(Completion::ignored_with(format!("{b} unavailable")))
                    }),
                }
            })
            .collect();
        let conclusion = libtest_mimic::run(&args, trials);
        if !args.list {
            cleanup();
        }
        conclusion.exit_code()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("idem-reliability")
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// The hang guard per test (`IDEM_CASE_TIMEOUT_SECS`, default 120 s).
fn case_timeout() -> Duration {
    std::env::var("IDEM_CASE_TIMEOUT_SECS")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(Duration::from_secs(120), Duration::from_secs)
}

/// Runs one test in a runtime of its own: `Err` with the panic message if
/// it failed.
fn run_test(run: Box<dyn FnOnce() -> TestFuture + Send>) -> Result<(), String> {
    let rt = runtime();
    let limit = case_timeout();
    let result = rt.block_on(async move {
        let task = tokio::spawn(run());
        match tokio::time::timeout(limit, task).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(match e.try_into_panic() {
                Ok(payload) => payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_string()))
                    .unwrap_or_else(|| "the test panicked".to_string()),
                Err(e) => format!("the test did not finish: {e}"),
            }),
            Err(_) => Err(format!(
                "the test did not finish within {limit:?} (IDEM_CASE_TIMEOUT_SECS): it hangs"
            )),
        }
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}

/// Removes this run's PostgreSQL schemas and Redis keys.
fn cleanup() {
    let rt = runtime();
    rt.block_on(async {
        let limit = Duration::from_secs(30);
        match tokio::time::timeout(limit, crate::postgres::cleanup()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => eprintln!("idem-reliability: could not drop every test schema: {e}"),
            Err(_) => eprintln!("idem-reliability: dropping the test schemas timed out"),
        }
        match tokio::time::timeout(limit, crate::redis::cleanup()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => eprintln!("idem-reliability: could not delete every test key: {e}"),
            Err(_) => eprintln!("idem-reliability: deleting the test keys timed out"),
        }
    });
    rt.shutdown_timeout(Duration::from_secs(1));
}
