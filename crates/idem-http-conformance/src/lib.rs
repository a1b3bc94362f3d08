//! # idem-http-conformance
//!
//! The black-box contract suite every idem HTTP adapter passes
//! (`idem-tower`, `idem-actix`, and third parties'): named cases that start
//! a real loopback server through the adapter's [`Adapter`] fixture and
//! check, with a real HTTP client (reqwest), what each request gets (status,
//! problem `type`, headers, body) and how many effects the application
//! behind the middleware had.
//!
//! # Running it against an adapter
//!
//! An adapter crate adds a test target without the libtest harness:
//!
//! ```toml
//! [dev-dependencies]
//! idem-http-conformance = "0.1"
//!
//! [[test]]
//! name = "conformance"
//! harness = false
//! ```
//!
//! and implements [`Adapter`] in it: serve every method and path of a
//! loopback server through its middleware, built over the [`Setup`]'s
//! engine with [`Setup::configure`] and [`Setup::scope_of`], to one handler
//! that turns the request into a [`Call`], awaits [`App::handle`], and
//! answers what the [`Handled`] says. Its `main` is [`run`]:
//!
//! ```no_run
//! use idem_http_conformance::{Adapter, BoxFuture, Server, Setup};
//!
//! struct Mine;
//!
//! impl Adapter for Mine {
//!     fn name(&self) -> &'static str {
//!         "mine"
//!     }
//!     fn serve(&self, setup: Setup) -> BoxFuture<'static, Server> {
//!         Box::pin(async move {
//!             // Build the middleware from `setup`, bind 127.0.0.1:0, serve
//!             // in the background, and return its address and a guard
//!             // that stops it when dropped.
//!             # let _ = setup;
//!             Server::new("http://127.0.0.1:8080", ())
//!         })
//!     }
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     idem_http_conformance::run(Mine)
//! }
//! ```
//!
//! `cargo test --test conformance` then runs one test per case, named
//! `mine::<case>`; the usual libtest arguments filter them
//! (`cargo test --test conformance -- concurrent`).
//!
//! # Behavior
//! - Each case gets a fresh engine over a fresh [`TestStore`] (a memory
//!   store behind fault switches, for store outages) on a fresh
//!   [`TestClock`] (a manual clock started at the system time, which only
//!   the case moves: leases, heartbeats and waits never depend on how fast
//!   the machine is), a fresh [`App`], and its own [`Options`]; it starts
//!   its own server, and stops it (drops the guard) when it ends.
//! - Each case runs on a multi-thread Tokio runtime of its own (2 workers)
//!   and fails if it has not finished within [`CASE_TIMEOUT`]: a hang fails
//!   instead of blocking CI.
//! - The cases are in [`cases`](mod@cases), each a documented public function that
//!   can also be run on its own ([`Case::run`]), e.g. to show that an
//!   adapter that breaks the contract fails it.
//! - The handler's planned panic ([`PLANNED_PANIC`]) is not printed.
#![forbid(unsafe_code)]

mod app;
pub mod cases;
mod client;
pub mod fixture;
mod options;

use std::sync::{Arc, Once};
use std::time::Duration;

pub use libtest_mimic::{Arguments, Failed, Trial};

pub use app::APP_DATE;
pub use fixture::{
    Adapter, Answer, App, BoxFuture, Call, Handled, Options, PLANNED_PANIC, Server, Setup,
    TestClock, TestStore,
};

/// How long a case may run before it fails as a hang.
pub const CASE_TIMEOUT: Duration = Duration::from_secs(60);

/// What a case's function returns.
pub type CaseFuture<'a> = BoxFuture<'a, Result<(), Failed>>;

/// One named case of the suite.
#[derive(Clone, Copy)]
pub struct Case {
    name: &'static str,
    run: for<'a> fn(&'a dyn Adapter) -> CaseFuture<'a>,
}

impl std::fmt::Debug for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Case").field("name", &self.name).finish()
    }
}

impl Case {
    const fn new(name: &'static str, run: for<'a> fn(&'a dyn Adapter) -> CaseFuture<'a>) -> Self {
        Self { name, run }
    }

    /// Its name: the name of its function in [`cases`](mod@cases).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Runs it against `adapter` on a multi-thread Tokio runtime of its
    /// own, failing after [`CASE_TIMEOUT`].
    ///
    /// # Behavior
    /// Blocks the calling thread: call it outside any Tokio runtime (from a
    /// plain `#[test]`). `Ok` if the adapter kept the contract, else the
    /// first broken promise (file, line, what was expected and what came).
    pub fn run(&self, adapter: &dyn Adapter) -> Result<(), Failed> {
        self.run_within(adapter, CASE_TIMEOUT)
    }

    /// [`run`](Self::run), failing after `limit` instead of
    /// [`CASE_TIMEOUT`].
    pub fn run_within(&self, adapter: &dyn Adapter, limit: Duration) -> Result<(), Failed> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name(format!("case-{}", self.name))
            .build()
            .map_err(|e| Failed::from(format!("cannot start a Tokio runtime: {e}")))?;
        let result = runtime.block_on(async {
            match tokio::time::timeout(limit, (self.run)(adapter)).await {
                Ok(result) => result,
                Err(_) => Err(Failed::from(format!(
                    "{} did not finish within {limit:?}: something hangs",
                    self.name
                ))),
            }
        });
        runtime.shutdown_timeout(Duration::from_secs(1));
        result
    }
}

impl Case {
    /// [`run`](Self::run) on a thread of its own, given up on a little
    /// after [`CASE_TIMEOUT`].
    fn run_watched(self, adapter: Arc<dyn Adapter>) -> Result<(), Failed> {
        let (done, result) = std::sync::mpsc::channel();
        let name = self.name;
        let spawned = std::thread::Builder::new()
            .name(format!("case-{name}"))
            .spawn(move || {
                let outcome =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run(&*adapter)));
                let _ = done.send(outcome.unwrap_or_else(|panic| {
                    let message = panic
                        .downcast_ref::<&str>()
                        .map(|m| (*m).to_owned())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a panic".to_owned());
                    Err(Failed::from(format!("the case panicked: {message}")))
                }));
            });
        if let Err(e) = spawned {
            return Err(Failed::from(format!("cannot start the case's thread: {e}")));
        }
        match result.recv_timeout(CASE_TIMEOUT + Duration::from_secs(5)) {
            Ok(outcome) => outcome,
            Err(_) => Err(Failed::from(format!(
                "{name} did not finish within {CASE_TIMEOUT:?} and its runtime does not \
                 answer: something blocks it"
            ))),
        }
    }
}

/// Every case, in a stable order.
pub fn cases() -> Vec<Case> {
    cases::ALL.to_vec()
}

/// The case named `name`, if there is one.
pub fn case(name: &str) -> Option<Case> {
    cases::ALL.iter().copied().find(|c| c.name == name)
}

/// One libtest-mimic trial per case against `adapter`, named
/// `<adapter>::<case>`.
///
/// # Behavior
/// Each trial runs its case ([`Case::run`]) on a thread of its own and
/// stops waiting for it a little after [`CASE_TIMEOUT`]: even a case whose
/// runtime is blocked (a handler or server that blocks every worker) fails
/// instead of hanging the run. Such a thread is left behind.
pub fn trials<A: Adapter>(adapter: A) -> Vec<Trial> {
    quiet_planned_panics();
    let adapter: Arc<dyn Adapter> = Arc::new(adapter);
    cases::ALL
        .iter()
        .map(|case| {
            let (case, adapter) = (*case, adapter.clone());
            Trial::test(format!("{}::{}", adapter.name(), case.name), move || {
                case.run_watched(adapter)
            })
        })
        .collect()
}

/// Runs every case against `adapter` with the test binary's arguments
/// (filters, `--list`, `--test-threads`, …): the `main` of an adapter's
/// `harness = false` test target.
///
/// # Behavior
/// One trial per case, named `<adapter>::<case>` ([`trials`]); the exit code
/// is that of `cargo test` (failure if any case failed).
pub fn run<A: Adapter>(adapter: A) -> std::process::ExitCode {
    let args = Arguments::from_args();
    libtest_mimic::run(&args, trials(adapter)).exit_code()
}

/// Keeps the handler's planned panics ([`PLANNED_PANIC`]) out of the
/// output; every other panic is printed as before.
fn quiet_planned_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let payload = info.payload();
            let planned = payload
                .downcast_ref::<&str>()
                .is_some_and(|m| m.contains(PLANNED_PANIC))
                || payload
                    .downcast_ref::<String>()
                    .is_some_and(|m| m.contains(PLANNED_PANIC));
            if !planned {
                previous(info);
            }
        }));
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn case_names_are_unique_and_found() {
        let mut names: Vec<_> = super::cases().iter().map(super::Case::name).collect();
        let count = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), count, "two cases share a name");
        for name in names {
            assert_eq!(super::case(name).map(|c| c.name()), Some(name));
        }
        assert!(super::case("no such case").is_none());
    }
}
