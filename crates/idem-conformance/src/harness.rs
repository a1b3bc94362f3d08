//! The conformance suite on the [one runner](crate::runner): one
//! libtest-style test per case, decided at run time.
//!
//! The backend is probed once (a store opened, `reopen` asked, capabilities
//! read). A case that does not apply to what the backend offers is not
//! registered (one stderr line lists such cases and why). Every case is
//! ignored (never passed) when the backend is unreachable; with `CI=true` or
//! `IDEM_REQUIRE_BACKENDS=1` an unreachable backend fails every case instead.
//! So under CI, `0 ignored` is the rule: nothing that should run was skipped.
//!
//! All cases run on the runner's one runtime, which lives as long as the
//! run; after each case the stores it opened go to
//! [`StoreFactory::teardown`].

use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;

use idem_core::store::{Capabilities, CensusSupport, Store};
use libtest_mimic::Arguments;

use crate::factory::Opened;
use crate::runner::{Runner, Trial, case_timeout};
use crate::{CaseReport, Report, StoreFactory, Verdict};

/// A boxed future returned by case functions.
pub type CaseFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// The runner's name: in banners and the runtime's thread names.
const RUNNER: &str = "idem-conformance";

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
    /// Backends that count records ([`Capabilities::census`] is not
    /// [`CensusSupport::None`](idem_core::store::CensusSupport::None)).
    Census,
    /// Backends that declare a record size limit
    /// ([`Capabilities::max_record_bytes`]) small enough to test (at most 64 MiB).
    RecordLimit,
    /// Backends whose factory can corrupt a stored record
    /// ([`StoreFactory::can_corrupt`]).
    Corruption,
    /// Backends that apply a [`Transition`](idem_core::Transition) inside
    /// the caller's transaction, through their factory
    /// ([`StoreFactory::can_apply_transition`]).
    Transactional,
    /// Backends that find abandoned records
    /// ([`Capabilities::abandoned`]: [`Store::abandoned`], what the
    /// [`Completer`](idem_core::Completer) needs). A backend that does not
    /// declare it is still checked to answer
    /// [`StoreError::Unsupported`](idem_core::StoreError::Unsupported)
    /// (`store::abandoned_is_supported_as_declared`).
    Abandoned,
}

/// The largest declared record limit the [`Requires::RecordLimit`] cases
/// test (they write a record just above it).
pub(crate) const TESTABLE_RECORD_LIMIT: usize = 64 * 1024 * 1024;

/// What the suite learned about a backend before running its cases.
#[derive(Clone, Copy, Debug)]
struct Probe {
    caps: Capabilities,
    shared: bool,
    corrupt: bool,
    transactional: bool,
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
            Self::Census if probe.caps.census != CensusSupport::None => Ok(()),
            Self::Census => Err("the backend declares no census (Capabilities::census is None)"),
            Self::RecordLimit => match probe.caps.max_record_bytes {
                Some(max) if max <= TESTABLE_RECORD_LIMIT => Ok(()),
                Some(_) => Err("the declared record limit is above 64 MiB"),
                None => Err("the backend declares no record size limit"),
            },
            Self::Corruption if probe.corrupt => Ok(()),
            Self::Corruption => Err("the factory cannot corrupt records (can_corrupt is false)"),
            Self::Transactional if probe.transactional => Ok(()),
            Self::Transactional => Err(
                "the factory does not apply transitions in a transaction (can_apply_transition is false)",
            ),
            Self::Abandoned if probe.caps.abandoned => Ok(()),
            Self::Abandoned => Err(
                "the backend does not find abandoned records (Capabilities::abandoned is false)",
            ),
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

/// Builds the test list for one backend and runs it like `cargo test` would,
/// on the [one runner](crate::runner).
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
    /// Open its stores with [`open_store`](crate::open_store) so that they
    /// reach [`StoreFactory::teardown`].
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
        let (runner, plans) = self.plan();
        let mut not_applicable = Vec::new();
        let mut runner = runner;
        for (name, plan) in plans {
            match plan {
                Plan::Trial(trial) => runner = runner.trial(trial),
                Plan::NotApplicable(why) => {
                    not_applicable.push(format!("{backend}::{name} ({why})"))
                }
            }
        }
        if !not_applicable.is_empty() {
            eprintln!(
                "idem-conformance: {} case(s) do not apply to {backend} and are not registered: {}",
                not_applicable.len(),
                not_applicable.join(", ")
            );
        }
        runner.run_with(args)
    }

    /// Runs every case without printing anything and returns each case's
    /// verdict (for tests of the suite itself, and for tools).
    pub fn report(self) -> Report {
        let backend = self.factory.name();
        let (runner, plans) = self.plan();
        let mut runner = runner;
        let mut cases = Vec::with_capacity(plans.len());
        for (name, plan) in plans {
            let verdict = match plan {
                Plan::Trial(trial) => {
                    runner = runner.trial(trial);
                    None
                }
                Plan::NotApplicable(why) => Some(Verdict::NotApplicable(why)),
            };
            cases.push((name, verdict));
        }
        let mut ran = runner.report().into_iter().map(|(_, verdict)| verdict);
        Report {
            backend,
            cases: cases
                .into_iter()
                .map(|(name, verdict)| CaseReport {
                    name,
                    // The runner reports its trials in order: one per `None`.
                    verdict: verdict
                        .or_else(|| ran.next())
                        .unwrap_or_else(|| Verdict::Failed("the runner lost the case".into())),
                })
                .collect(),
        }
    }

    /// Starts the runner, probes the backend once on it, then decides what
    /// to do with each case.
    fn plan(self) -> (Runner, Vec<(String, Plan)>) {
        let Self { factory, cases } = self;
        let backend = factory.name();
        let runner = Runner::new(RUNNER).with_probe_timeout(case_timeout());
        let probed = runner.probe(backend, probe(&*factory));
        let plans = cases
            .into_iter()
            .map(|case| {
                let full = format!("{backend}::{}", case.name);
                let plan = match &probed {
                    Ok(probe) => match case.requires.applies(probe) {
                        Ok(()) => Plan::Trial(trial(full, &factory, case.run)),
                        Err(why) => Plan::NotApplicable(why.to_string()),
                    },
                    Err(why) => Plan::Trial(Trial::unavailable(full, backend, why.clone())),
                };
                (case.name, plan)
            })
            .collect();
        // The factory's last reference goes on the runtime, after the run:
        // a pool it caches is closed where it was created.
        let runner = runner.after_all(move || async move { drop(factory) });
        (runner, plans)
    }
}

/// What to do with one case once the backend was probed.
enum Plan {
    Trial(Trial),
    NotApplicable(String),
}

/// Opens a store, asks for a second instance and reads what the backend
/// offers; the probe's store then goes to teardown.
async fn probe<F: StoreFactory>(factory: &F) -> Result<Probe, crate::Unavailable> {
    let store = factory.open().await?;
    let shared = factory.reopen(&store).await?.is_some();
    let probe = Probe {
        caps: store.capabilities(),
        shared,
        corrupt: factory.can_corrupt(),
        transactional: factory.can_apply_transition(),
    };
    factory.teardown(&store).await.map_err(|e| {
        crate::Unavailable(format!("factory.teardown failed on the probe's store: {e}"))
    })?;
    Ok(probe)
}

/// One case as a trial: the case's body records the stores it opens, the
/// trial's teardown hands them to the factory.
fn trial<F: StoreFactory>(name: String, factory: &Arc<F>, run: RunFn<F>) -> Trial {
    let opened = Opened::default();
    let body = {
        let (opened, factory) = (opened.clone(), factory.clone());
        move || opened.scope(run(factory))
    };
    let factory = factory.clone();
    Trial::test(name, body).with_teardown(move || async move {
        let mut failures = Vec::new();
        for store in opened.take::<F::Store>() {
            if let Err(e) = factory.teardown(&store).await {
                failures.push(e.0);
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(format!("factory.teardown failed: {}", failures.join("; ")))
        }
    })
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
