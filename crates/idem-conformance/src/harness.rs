//! The runner: one libtest-style test per case, decided at run time.
//!
//! A case that does not apply to the backend's [`Capabilities`] is not
//! registered (one stderr line lists such cases and why). Every case is
//! ignored (never passed) when the backend is unreachable; with `CI=true` or
//! `IDEM_REQUIRE_BACKENDS=1` an unreachable backend fails every case instead.
//! So under CI, `0 ignored` is the rule: nothing that should run was skipped.

use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use idem_core::{Capabilities, RecordKey, Store};
use libtest_mimic::{Arguments, Completion, Failed, Trial};

/// A boxed future returned by case functions.
pub type CaseFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Why a backend could not be reached; the message says which env var to set.
#[derive(Debug, Clone)]
pub struct Unavailable(pub String);

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unavailable {}

/// A source of fresh, isolated stores of one backend.
///
/// # Behavior
/// - [`open`](Self::open) returns a store that shares no records with any
///   other store it returned (its own key prefix, schema, table or file), so
///   cases run in parallel without seeing each other. `purge_expired` on it
///   must only see its own records.
/// - [`reopen`](Self::reopen) returns a second instance over the *same*
///   records through its own connections, as a second application server
///   would open it; `None` when the backend cannot share records between
///   instances (then the cases that need two instances are ignored).
/// - [`corrupt`](Self::corrupt) overwrites the bytes stored under a key with
///   bytes that do not decode, bypassing the store's API; backends that can
///   do it say so with [`can_corrupt`](Self::can_corrupt), and the cases
///   about corrupt records run against them (they are ignored otherwise).
#[async_trait]
pub trait StoreFactory: Send + Sync + 'static {
    /// The store under test.
    type Store: Store;

    /// The backend's name in test names and messages (`"sqlite"`, `"redis-cluster"`).
    fn name(&self) -> &'static str;

    /// A fresh, isolated store, or why the backend cannot be reached.
    async fn open(&self) -> Result<Self::Store, Unavailable>;

    /// A second instance sharing `store`'s records through its own connections.
    async fn reopen(&self, store: &Self::Store) -> Result<Option<Self::Store>, Unavailable> {
        let _ = store;
        Ok(None)
    }

    /// Whether [`corrupt`](Self::corrupt) is implemented.
    fn can_corrupt(&self) -> bool {
        false
    }

    /// Replaces what `store` holds under `key` (a record written through the
    /// store just before) with bytes that cannot be decoded, as a bad disk, a
    /// foreign writer or a newer version of idem would leave them.
    async fn corrupt(&self, store: &Self::Store, key: &RecordKey) -> Result<(), Unavailable> {
        let _ = (store, key);
        Err(Unavailable(format!(
            "backend `{}` cannot corrupt records",
            self.name()
        )))
    }
}

/// Whether an unreachable backend must fail the run (`CI=true` or
/// `IDEM_REQUIRE_BACKENDS=1`) instead of being ignored.
pub fn backends_required() -> bool {
    let set = |name: &str| {
        std::env::var(name)
            .map(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
            .unwrap_or(false)
    };
    set("CI") || set("IDEM_REQUIRE_BACKENDS")
}

/// Which backends a case applies to. A case that does not apply is not
/// registered as a test (and reported as [`Verdict::NotApplicable`] by
/// [`Suite::report`]), never as passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Requires {
    /// Every backend.
    Always,
    /// Backends whose instances share records ([`StoreFactory::reopen`] gives `Some`).
    SharedInstances,
    /// Backends without native expiry (purge does the work).
    Purge,
    /// Backends that declare a record size limit
    /// ([`Capabilities::max_record_bytes`]) small enough to test (at most 64 MiB).
    RecordLimit,
    /// Backends whose factory can corrupt a stored record
    /// ([`StoreFactory::can_corrupt`]).
    Corruption,
}

/// The largest declared record limit the [`Requires::RecordLimit`] cases
/// test (they write a record just above it).
pub(crate) const TESTABLE_RECORD_LIMIT: usize = 64 * 1024 * 1024;

/// What the runner learned about a backend before running its cases.
#[derive(Clone, Copy, Debug)]
struct Probe {
    caps: Capabilities,
    shared: bool,
    corrupt: bool,
}

impl Requires {
    /// `Ok` if a case with this requirement applies, or why it does not.
    fn applies(self, probe: &Probe) -> Result<(), &'static str> {
        match self {
            Self::Always => Ok(()),
            Self::SharedInstances if probe.shared => Ok(()),
            Self::SharedInstances => {
                Err("needs two instances sharing records (factory.reopen gives None)")
            }
            Self::Purge if !probe.caps.native_expiry => Ok(()),
            Self::Purge => Err("the backend expires records natively (purge may do nothing)"),
            Self::RecordLimit => match probe.caps.max_record_bytes {
                Some(max) if max <= TESTABLE_RECORD_LIMIT => Ok(()),
                Some(_) => Err("the declared record limit is above 64 MiB"),
                None => Err("the backend declares no record size limit"),
            },
            Self::Corruption if probe.corrupt => Ok(()),
            Self::Corruption => Err("the factory cannot corrupt records (can_corrupt is false)"),
        }
    }
}

type RunFn<F> = Arc<dyn Fn(Arc<F>) -> CaseFuture + Send + Sync>;

/// One named case of the suite, or one extra case of a backend.
pub struct Case<F> {
    name: String,
    requires: Requires,
    run: RunFn<F>,
}

impl<F> Case<F> {
    /// A case named `name` that applies where `requires` holds.
    pub fn new(
        name: impl Into<String>,
        requires: Requires,
        run: impl Fn(Arc<F>) -> CaseFuture + Send + Sync + 'static,
    ) -> Self {
        Self {
            name: name.into(),
            requires,
            run: Arc::new(run),
        }
    }

    /// The case's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where the case applies.
    pub fn requires(&self) -> Requires {
        self.requires
    }
}

/// How one case of a [`Report`] ended.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Verdict {
    /// It ran and every assertion held.
    Passed,
    /// It failed; the message says which assertion and why.
    Failed(String),
    /// It did not run: the backend was unreachable (never counted as
    /// passed).
    Ignored(String),
    /// It does not apply to the backend's capabilities; the reason says why.
    /// Not registered as a test by [`Suite::run`].
    NotApplicable(String),
}

/// The verdict of one case.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaseReport {
    /// The case's name, without the backend prefix (`store::insert_on_absent`).
    pub name: String,
    /// How it ended.
    pub verdict: Verdict,
}

/// The per-case results of [`Suite::report`], in case order.
#[derive(Clone, Debug)]
pub struct Report {
    /// The backend's name.
    pub backend: &'static str,
    /// One entry per case.
    pub cases: Vec<CaseReport>,
}

impl Report {
    fn names(&self, pick: impl Fn(&Verdict) -> bool) -> Vec<&str> {
        self.cases
            .iter()
            .filter(|c| pick(&c.verdict))
            .map(|c| c.name.as_str())
            .collect()
    }
    /// The names of the cases that passed.
    pub fn passed(&self) -> Vec<&str> {
        self.names(|v| matches!(v, Verdict::Passed))
    }
    /// The names of the cases that failed.
    pub fn failed(&self) -> Vec<&str> {
        self.names(|v| matches!(v, Verdict::Failed(_)))
    }
    /// The names of the cases that were ignored (backend unreachable).
    pub fn ignored(&self) -> Vec<&str> {
        self.names(|v| matches!(v, Verdict::Ignored(_)))
    }
    /// The names of the cases that do not apply to the backend.
    pub fn not_applicable(&self) -> Vec<&str> {
        self.names(|v| matches!(v, Verdict::NotApplicable(_)))
    }
    /// The verdict of the case named `name`.
    pub fn verdict(&self, name: &str) -> Option<&Verdict> {
        self.cases
            .iter()
            .find(|c| c.name == name)
            .map(|c| &c.verdict)
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for case in &self.cases {
            match &case.verdict {
                Verdict::Passed => writeln!(f, "{}::{} ... ok", self.backend, case.name)?,
                Verdict::Ignored(why) => {
                    writeln!(f, "{}::{} ... ignored ({why})", self.backend, case.name)?;
                }
                Verdict::NotApplicable(why) => {
                    writeln!(
                        f,
                        "{}::{} ... does not apply ({why})",
                        self.backend, case.name
                    )?;
                }
                Verdict::Failed(why) => {
                    writeln!(f, "{}::{} ... FAILED: {why}", self.backend, case.name)?;
                }
            }
        }
        Ok(())
    }
}

/// What to do with one case once the backend was probed.
enum Plan<F> {
    Run(Arc<F>, RunFn<F>),
    Ignore(String),
    Fail(String),
    NotApplicable(String),
}

/// Builds the test list for one backend and runs it like `cargo test` would.
pub struct Suite<F: StoreFactory> {
    factory: Arc<F>,
    cases: Vec<Case<F>>,
}

impl<F: StoreFactory> Suite<F> {
    /// The full conformance suite for `factory`'s backend.
    pub fn new(factory: F) -> Self {
        Self {
            factory: Arc::new(factory),
            cases: crate::cases::all(),
        }
    }

    /// No cases yet: only the backend's own, added with [`case`](Self::case).
    pub fn empty(factory: F) -> Self {
        Self {
            factory: Arc::new(factory),
            cases: Vec::new(),
        }
    }

    /// Adds a backend-specific case, run and reported like the suite's own.
    #[must_use]
    pub fn case<Fut>(mut self, name: &str, requires: Requires, run: fn(Arc<F>) -> Fut) -> Self
    where
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.cases
            .push(Case::new(name, requires, move |f| Box::pin(run(f))));
        self
    }

    /// Adds a prepared [`Case`] (for example one of [`cases::all`](crate::cases::all)).
    #[must_use]
    pub fn with_case(mut self, case: Case<F>) -> Self {
        self.cases.push(case);
        self
    }

    /// Keeps only the cases whose name satisfies `keep`.
    #[must_use]
    pub fn retain(mut self, keep: impl Fn(&str) -> bool) -> Self {
        self.cases.retain(|c| keep(&c.name));
        self
    }

    /// The names of the cases, in order.
    pub fn names(&self) -> Vec<String> {
        self.cases.iter().map(|c| c.name.clone()).collect()
    }

    /// Runs the suite with the process's test arguments; the exit code is
    /// that of `cargo test`.
    pub fn run(self) -> ExitCode {
        let args = Arguments::from_args();
        self.run_with(&args).exit_code()
    }

    /// Runs the suite with explicit arguments (for tests of the suite itself).
    pub fn run_with(self, args: &Arguments) -> libtest_mimic::Conclusion {
        let backend = self.factory.name();
        let mut not_applicable = Vec::new();
        let trials = self
            .plan()
            .into_iter()
            .filter_map(|(name, plan)| {
                let name = format!("{backend}::{name}");
                Some(match plan {
                    Plan::Run(factory, run) => {
                        Trial::test(name, move || run_case(factory, run).map_err(Failed::from))
                    }
                    Plan::Ignore(why) => {
                        Trial::ignorable_test(name, move || Ok(Completion::ignored_with(why)))
                    }
                    Plan::Fail(why) => Trial::test(name, move || Err(Failed::from(why))),
                    Plan::NotApplicable(why) => {
                        not_applicable.push(format!("{name} ({why})"));
                        return None;
                    }
                })
            })
            .collect();
        if !not_applicable.is_empty() {
            eprintln!(
                "idem-conformance: {} case(s) do not apply to {backend} and are not registered: {}",
                not_applicable.len(),
                not_applicable.join(", ")
            );
        }
        libtest_mimic::run(args, trials)
    }

    /// Runs every case without printing anything and returns each case's
    /// verdict (for tests of the suite itself, and for tools).
    pub fn report(self) -> Report {
        let backend = self.factory.name();
        let plans = self.plan();
        let count = plans.len();
        let queue = Mutex::new(plans.into_iter().enumerate());
        let results = Mutex::new(Vec::with_capacity(count));
        let threads = std::thread::available_parallelism()
            .map(usize::from)
            .unwrap_or(1)
            .min(count.max(1));
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| {
                    loop {
                        let next = queue.lock().unwrap_or_else(PoisonError::into_inner).next();
                        let Some((index, (name, plan))) = next else {
                            break;
                        };
                        let verdict = match plan {
                            Plan::Run(factory, run) => match run_case(factory, run) {
                                Ok(()) => Verdict::Passed,
                                Err(why) => Verdict::Failed(why),
                            },
                            Plan::Ignore(why) => Verdict::Ignored(why),
                            Plan::Fail(why) => Verdict::Failed(why),
                            Plan::NotApplicable(why) => Verdict::NotApplicable(why),
                        };
                        results
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push((index, CaseReport { name, verdict }));
                    }
                });
            }
        });
        let mut cases = results.into_inner().unwrap_or_else(PoisonError::into_inner);
        cases.sort_by_key(|(index, _)| *index);
        Report {
            backend,
            cases: cases.into_iter().map(|(_, case)| case).collect(),
        }
    }

    /// Probes the backend once, then decides what to do with each case.
    fn plan(self) -> Vec<(String, Plan<F>)> {
        let backend = self.factory.name();
        let probe = runtime().and_then(|rt| {
            let probed = rt.block_on(async {
                let store = self.factory.open().await?;
                let shared = self.factory.reopen(&store).await?.is_some();
                Ok(Probe {
                    caps: store.capabilities(),
                    shared,
                    corrupt: self.factory.can_corrupt(),
                })
            });
            rt.shutdown_timeout(Duration::from_secs(1));
            probed
        });
        match probe {
            Ok(probe) => self
                .cases
                .into_iter()
                .map(|case| {
                    let plan = match case.requires.applies(&probe) {
                        Ok(()) => Plan::Run(self.factory.clone(), case.run),
                        Err(why) => Plan::NotApplicable(why.to_string()),
                    };
                    (case.name, plan)
                })
                .collect(),
            Err(why) => {
                let required = backends_required();
                eprintln!(
                    "\n================ idem-conformance: {backend} UNAVAILABLE ================\n\
                     {why}\n{}\n=========================================================================\n",
                    if required {
                        "CI=true or IDEM_REQUIRE_BACKENDS=1 is set: every case FAILS."
                    } else {
                        "Every case is reported as IGNORED (not passed). Set CI=true or IDEM_REQUIRE_BACKENDS=1 to fail instead."
                    }
                );
                self.cases
                    .into_iter()
                    .map(|case| {
                        let plan = if required {
                            Plan::Fail(format!("{backend} unavailable: {why}"))
                        } else {
                            Plan::Ignore(format!("{backend} unavailable"))
                        };
                        (case.name, plan)
                    })
                    .collect()
            }
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, Unavailable> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .thread_name("idem-conformance")
        .enable_all()
        .build()
        .map_err(|e| Unavailable(format!("cannot start a tokio runtime: {e}")))
}

/// The longest a case may run before it fails as hung
/// (`IDEM_CASE_TIMEOUT_SECS`, default 120 s). A safety net against a broken
/// backend that never answers, not a way to wait for anything.
fn case_timeout() -> Duration {
    std::env::var("IDEM_CASE_TIMEOUT_SECS")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(Duration::from_secs(120), Duration::from_secs)
}

/// Runs one case in a runtime of its own: `Err` with the panic message if it
/// failed.
fn run_case<F: StoreFactory>(factory: Arc<F>, run: RunFn<F>) -> Result<(), String> {
    let rt = runtime().map_err(|e| e.0)?;
    let limit = case_timeout();
    let result = rt.block_on(async move {
        let task = tokio::spawn(run(factory));
        match tokio::time::timeout(limit, task).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(panic_message(e)),
            Err(_) => Err(format!(
                "the case did not finish within {limit:?} (IDEM_CASE_TIMEOUT_SECS): the store hangs"
            )),
        }
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}

fn panic_message(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_string()))
            .unwrap_or_else(|| "case panicked".to_string()),
        Err(e) => format!("case did not finish: {e}"),
    }
}

/// Writes `fn main` for a conformance test target (`harness = false`) that
/// runs the full suite against `$factory`.
///
/// ```text
/// // tests/conformance.rs, with `[[test]] name = "conformance" harness = false`
/// idem_conformance::conformance_main!(my_store::TestFactory::default());
/// ```
#[macro_export]
macro_rules! conformance_main {
    ($factory:expr) => {
        fn main() -> ::std::process::ExitCode {
            $crate::Suite::new($factory).run()
        }
    };
}
