//! The one test runner of idem's suites: the conformance suite runs on it,
//! and so can any other suite of async tests (the reliability tests, a
//! backend's own tests). It is libtest-mimic underneath, so `cargo test`
//! filters, `--list`, `--test-threads` and the usual output all work, in a
//! test target with `harness = false`.
//!
//! # Behavior
//! - **One tokio runtime for the whole run.** A multi-threaded runtime is
//!   started once and lives until the run ends: every probe, trial, teardown
//!   and after-all hook runs on it. A connection pool created while probing,
//!   or cached in a factory by the first trial, serves every later trial.
//!   (libtest's threads block on the runtime's handle; each trial runs as a
//!   task on the runtime's workers.)
//! - **Per-trial timeout.** A trial still running after
//!   `IDEM_CASE_TIMEOUT_SECS` (default 120 s, see [`case_timeout`]) fails as
//!   hung: its task is aborted (tasks it spawned itself are not) and its
//!   teardown still runs. A guard against a store that never answers, not a
//!   way to wait for anything.
//! - **A panic fails the trial** with the panic's message.
//! - **Requirements never pass silently.** A trial may need a
//!   [requirement](Runner::requirement) (a server, say). Each requirement
//!   any registered trial needs is probed once, before the first trial (not
//!   under `--list`). A trial whose requirement failed is reported
//!   **ignored**, with the reason and a banner on stderr, never as passed;
//!   with `CI=true` or `IDEM_REQUIRE_BACKENDS=1` ([`backends_required`]) it
//!   **fails** instead. So under CI, `0 ignored` is the rule: nothing that
//!   should run was skipped.
//! - **Teardown** ([`Trial::with_teardown`]) runs after the trial's body,
//!   whether it passed, panicked or timed out; its error fails the trial.
//! - **After-all hooks** ([`Runner::after_all`]) run once the trials are
//!   done (not under `--list`): clean up what the run created.
//!
//! Call [`Runner::run`] from a plain `fn main` (not from inside a tokio
//! runtime: the runner blocks on its own).
//!
//! ```
//! use idem_conformance::runner::{Runner, Trial};
//!
//! let verdicts = Runner::new("my-suite")
//!     // Probed once, before the first trial that needs it.
//!     .requirement("server", || async { Ok::<(), String>(()) })
//!     .trial(Trial::test("adds", || async { assert_eq!(1 + 1, 2) }))
//!     .trial(
//!         Trial::test("talks_to_the_server", || async { /* ... */ })
//!             .requires("server")
//!             .with_teardown(|| async { Ok::<(), String>(()) }),
//!     )
//!     // `.run()` in a test target's `fn main`; `report()` runs silently.
//!     .report();
//! assert!(verdicts.iter().all(|(_, v)| *v == idem_conformance::Verdict::Passed));
//! ```

use std::collections::HashMap;
use std::fmt::Display;
use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Duration;

use libtest_mimic::{Arguments, Completion, Conclusion, Failed};
use tokio::runtime::Runtime;

use crate::Verdict;

mod exec;
mod trial;

use exec::{Exec, panic_message};
use trial::Action;
pub use trial::Trial;

/// A boxed trial future.
pub type TrialFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// A boxed hook future: `Err` with a message when the hook failed.
type HookFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'static>>;
type Hook = Box<dyn FnOnce() -> HookFuture + Send>;
type Body = Box<dyn FnOnce() -> TrialFuture + Send>;

/// The per-trial timeout when `IDEM_CASE_TIMEOUT_SECS` is not set.
pub const DEFAULT_CASE_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a [requirement](Runner::requirement) or [probe](Runner::probe)
/// may take unless [`Runner::with_probe_timeout`] says otherwise.
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(15);

/// How long an aborted trial gets to drop what it holds before its teardown.
const ABORT_GRACE: Duration = Duration::from_secs(5);

/// Whether an unreachable backend must fail the run (`CI=true` or
/// `IDEM_REQUIRE_BACKENDS=1`, also `yes`/`true`/`1` in any case) instead of
/// being ignored. The one place this rule is written down.
pub fn backends_required() -> bool {
    let set = |name: &str| {
        std::env::var(name)
            .map(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
            .unwrap_or(false)
    };
    set("CI") || set("IDEM_REQUIRE_BACKENDS")
}

/// The longest a trial may run before it fails as hung:
/// `IDEM_CASE_TIMEOUT_SECS`, else [`DEFAULT_CASE_TIMEOUT`].
pub fn case_timeout() -> Duration {
    std::env::var("IDEM_CASE_TIMEOUT_SECS")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(DEFAULT_CASE_TIMEOUT, Duration::from_secs)
}

/// A probe of a requirement: `Err` says why it cannot be reached.
type Probe = Box<dyn FnOnce() -> HookFuture + Send>;

/// One run of trials on one runtime; see the [module docs](self).
pub struct Runner {
    name: String,
    worker_threads: usize,
    case_timeout: Duration,
    probe_timeout: Duration,
    default_test_threads: Option<usize>,
    runtime: OnceLock<Result<Runtime, String>>,
    requirements: Vec<(String, Probe)>,
    trials: Vec<Trial>,
    after_all: Vec<Hook>,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("name", &self.name)
            .field("worker_threads", &self.worker_threads)
            .field("case_timeout", &self.case_timeout)
            .field("probe_timeout", &self.probe_timeout)
            .field(
                "requirements",
                &self.requirements.iter().map(|r| &r.0).collect::<Vec<_>>(),
            )
            .field("trials", &self.names())
            .finish_non_exhaustive()
    }
}

impl Runner {
    /// An empty run. `name` appears in the banners and names the runtime's
    /// threads.
    ///
    /// Defaults: as many runtime workers as the machine has cores (at least
    /// 4), the per-trial timeout of [`case_timeout`], probes bounded by
    /// [`DEFAULT_PROBE_TIMEOUT`], libtest's default number of test threads.
    pub fn new(name: impl Into<String>) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        Self {
            name: name.into(),
            worker_threads: cores.max(4),
            case_timeout: case_timeout(),
            probe_timeout: DEFAULT_PROBE_TIMEOUT,
            default_test_threads: None,
            runtime: OnceLock::new(),
            requirements: Vec::new(),
            trials: Vec::new(),
            after_all: Vec::new(),
        }
    }

    /// The runtime's worker threads (shared by every trial running at the
    /// same time). Takes effect only before the first probe.
    #[must_use]
    pub fn with_worker_threads(mut self, n: usize) -> Self {
        self.worker_threads = n.max(1);
        self
    }

    /// The per-trial timeout, instead of [`case_timeout`].
    #[must_use]
    pub fn with_case_timeout(mut self, limit: Duration) -> Self {
        self.case_timeout = limit;
        self
    }

    /// How long a probe may take before its requirement counts as
    /// unreachable (default [`DEFAULT_PROBE_TIMEOUT`]).
    #[must_use]
    pub fn with_probe_timeout(mut self, limit: Duration) -> Self {
        self.probe_timeout = limit;
        self
    }

    /// How many trials run at a time when `--test-threads` is not given
    /// (libtest's default otherwise: one per core).
    #[must_use]
    pub fn with_default_test_threads(mut self, n: usize) -> Self {
        self.default_test_threads = Some(n.max(1));
        self
    }

    /// Declares a requirement named `name` (a server, a backend): `probe`
    /// runs once, before the first trial, if a registered trial
    /// [`requires`](Trial::requires) it; `Err` says why it cannot be reached
    /// (name the environment variable to set).
    #[must_use]
    pub fn requirement<F, Fut, E>(mut self, name: impl Into<String>, probe: F) -> Self
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Display,
    {
        self.requirements.push((
            name.into(),
            Box::new(move || Box::pin(async move { probe().await.map_err(|e| e.to_string()) })),
        ));
        self
    }

    /// Adds a trial.
    #[must_use]
    pub fn trial(mut self, trial: Trial) -> Self {
        self.trials.push(trial);
        self
    }

    /// Adds trials.
    #[must_use]
    pub fn trials(mut self, trials: impl IntoIterator<Item = Trial>) -> Self {
        self.trials.extend(trials);
        self
    }

    /// Runs `hook` on the run's runtime once every trial is done (not under
    /// `--list`), bounded by the per-trial timeout; a failure is reported on
    /// stderr and does not fail the run. Hooks run in the order added.
    #[must_use]
    pub fn after_all<F, Fut>(mut self, hook: F) -> Self
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.after_all.push(Box::new(move || {
            Box::pin(async move {
                hook().await;
                Ok(())
            })
        }));
        self
    }

    /// The trials' names, in order.
    pub fn names(&self) -> Vec<String> {
        self.trials.iter().map(|t| t.name.clone()).collect()
    }

    /// Runs `fut` to completion on the run's runtime, from outside it (for
    /// set-up before the trials are registered). `Err` only when the runtime
    /// cannot be started.
    pub fn block_on<T>(&self, fut: impl Future<Output = T>) -> Result<T, String> {
        Ok(self.runtime()?.block_on(fut))
    }

    /// Probes `what` now, on the run's runtime, bounded by the probe
    /// timeout: for suites that must know what a backend offers before they
    /// register their trials. On `Err` a banner on stderr says that the
    /// trials needing `what` are ignored (or fail, under
    /// [`backends_required`]); register those as [`Trial::unavailable`].
    pub fn probe<T, E: Display>(
        &self,
        what: &str,
        probe: impl Future<Output = Result<T, E>>,
    ) -> Result<T, String> {
        let limit = self.probe_timeout;
        let result = self.block_on(async move {
            match tokio::time::timeout(limit, probe).await {
                Ok(result) => result.map_err(|e| e.to_string()),
                Err(_) => Err(format!("the probe did not finish within {limit:?}")),
            }
        });
        let result = result.and_then(|r| r);
        if let Err(why) = &result {
            self.banner(what, why);
        }
        result
    }

    /// Runs the trials with the process's arguments; the exit code is that
    /// of `cargo test`.
    pub fn run(self) -> ExitCode {
        self.run_with(&Arguments::from_args()).exit_code()
    }

    /// Runs the trials with explicit arguments.
    pub fn run_with(mut self, args: &Arguments) -> Conclusion {
        let mut args = args.clone();
        if args.test_threads.is_none() {
            args.test_threads = self.default_test_threads;
        }
        let trials = std::mem::take(&mut self.trials);
        let trials = if args.list {
            trials
        } else {
            self.settle_requirements(trials)
        };
        let exec = self.exec();
        let trials = trials
            .into_iter()
            .map(|trial| {
                let name = trial.name.clone();
                let exec = exec.clone();
                libtest_mimic::Trial::ignorable_test(name, move || match exec.execute(trial) {
                    Verdict::Passed | Verdict::NotApplicable(_) => Ok(Completion::Completed),
                    Verdict::Ignored(why) => Ok(Completion::ignored_with(why)),
                    Verdict::Failed(why) => Err(Failed::from(why)),
                })
            })
            .collect();
        let conclusion = libtest_mimic::run(&args, trials);
        if !args.list {
            self.finish();
        }
        self.shut_down();
        conclusion
    }

    /// Runs every trial without printing anything (in parallel, one thread
    /// per core) and returns each trial's verdict, in order: for tests of a
    /// suite itself, and for tools. Banners of unreachable requirements are
    /// still printed.
    pub fn report(mut self) -> Vec<(String, Verdict)> {
        let trials = std::mem::take(&mut self.trials);
        let trials = self.settle_requirements(trials);
        let exec = self.exec();
        let count = trials.len();
        let queue = Mutex::new(trials.into_iter().enumerate());
        let results = Mutex::new(Vec::with_capacity(count));
        let threads = std::thread::available_parallelism()
            .map_or(1, usize::from)
            .min(count.max(1));
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| {
                    loop {
                        let next = queue.lock().unwrap_or_else(PoisonError::into_inner).next();
                        let Some((index, trial)) = next else {
                            break;
                        };
                        let name = trial.name.clone();
                        let verdict = exec.execute(trial);
                        results
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push((index, (name, verdict)));
                    }
                });
            }
        });
        self.finish();
        self.shut_down();
        let mut results = results.into_inner().unwrap_or_else(PoisonError::into_inner);
        results.sort_by_key(|(index, _)| *index);
        results.into_iter().map(|(_, r)| r).collect()
    }

    /// The run's runtime, started on first use.
    fn runtime(&self) -> Result<&Runtime, String> {
        self.runtime
            .get_or_init(|| {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(self.worker_threads)
                    .thread_name(self.name.clone())
                    .enable_all()
                    .build()
                    .map_err(|e| format!("{}: cannot start a tokio runtime: {e}", self.name))
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// What every trial needs to run: the runtime's handle and the timeout.
    fn exec(&self) -> Exec {
        Exec {
            handle: self.runtime().map(|rt| rt.handle().clone()),
            limit: self.case_timeout,
        }
    }

    /// Probes the requirements the trials need (once each, in the order
    /// declared), and turns the trials whose requirement failed into
    /// unavailable ones.
    fn settle_requirements(&mut self, trials: Vec<Trial>) -> Vec<Trial> {
        let needed: Vec<&String> = trials.iter().flat_map(|t| &t.requires).collect();
        let mut outcome: HashMap<String, Result<(), String>> = HashMap::new();
        for (name, probe) in std::mem::take(&mut self.requirements) {
            if !needed.contains(&&name) || outcome.contains_key(&name) {
                continue;
            }
            let result = self.probe(&name, probe());
            outcome.insert(name, result);
        }
        trials
            .into_iter()
            .map(|trial| {
                let missing = trial
                    .requires
                    .iter()
                    .find_map(|req| match outcome.get(req) {
                        Some(Ok(())) => None,
                        Some(Err(why)) => Some((req.clone(), why.clone())),
                        None => Some((
                            req.clone(),
                            format!(
                                "no requirement named `{req}` was declared with Runner::requirement"
                            ),
                        )),
                    });
                match missing {
                    None => trial,
                    Some((what, why)) => Trial {
                        body: Action::Unavailable { what, why },
                        teardown: None,
                        ..trial
                    },
                }
            })
            .collect()
    }

    /// Runs the after-all hooks.
    fn finish(&mut self) {
        let hooks = std::mem::take(&mut self.after_all);
        if hooks.is_empty() {
            return;
        }
        let limit = self.case_timeout;
        let name = self.name.clone();
        let ran = self.block_on(async move {
            for hook in hooks {
                let task = tokio::spawn(hook());
                match tokio::time::timeout(limit, task).await {
                    Ok(Ok(Ok(()))) => {}
                    Ok(Ok(Err(why))) => eprintln!("{name}: an after-all hook failed: {why}"),
                    Ok(Err(e)) => {
                        eprintln!("{name}: an after-all hook failed: {}", panic_message(e));
                    }
                    Err(_) => {
                        eprintln!("{name}: an after-all hook did not finish within {limit:?}")
                    }
                }
            }
        });
        if let Err(why) = ran {
            eprintln!("{why}: the after-all hooks did not run");
        }
    }

    /// Stops the runtime, giving its tasks a second to end.
    fn shut_down(self) {
        if let Some(Ok(runtime)) = self.runtime.into_inner() {
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
    }

    fn banner(&self, what: &str, why: &str) {
        let line = "=".repeat(16);
        eprintln!(
            "\n{line} {}: {what} UNAVAILABLE {line}\n{why}\n{}\n{}\n",
            self.name,
            if backends_required() {
                "CI=true or IDEM_REQUIRE_BACKENDS=1 is set: every test that needs it FAILS."
            } else {
                "Every test that needs it is reported as IGNORED (not passed). Set CI=true or IDEM_REQUIRE_BACKENDS=1 to fail instead."
            },
            "=".repeat(72)
        );
    }
}
