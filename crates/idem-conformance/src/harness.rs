//! The runner: one libtest-style test per case, decided at run time.
//!
//! A case is ignored (never passed) when the backend is unreachable or the
//! case does not apply to the backend's [`Capabilities`]; with `CI=true` or
//! `IDEM_REQUIRE_BACKENDS=1` an unreachable backend fails every case instead.

use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;

use async_trait::async_trait;
use idem_core::{Capabilities, Store};
use libtest_mimic::{Arguments, Failed, Trial};

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

/// A source of fresh, isolated stores of one backend.
///
/// # Behavior
/// - [`open`](Self::open) returns a store that shares no records with any
///   other store it returned (its own key prefix, schema, table or file), so
///   cases run in parallel without seeing each other.
/// - [`reopen`](Self::reopen) returns a second instance over the *same*
///   records through its own connections, as a second application server
///   would open it; `None` when the backend cannot share records between
///   instances (then the cases that need two instances are ignored).
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

/// Which backends a case applies to.
#[derive(Clone, Copy, Debug)]
pub enum Requires {
    /// Every backend.
    Always,
    /// Backends whose instances share records ([`StoreFactory::reopen`] gives `Some`).
    SharedInstances,
    /// Backends without native expiry (purge does the work).
    Purge,
}

/// One named case of the suite, or one extra case of a backend.
pub struct Case<F> {
    name: String,
    requires: Requires,
    run: Arc<dyn Fn(Arc<F>) -> CaseFuture + Send + Sync>,
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
        let probe = runtime().and_then(|rt| {
            rt.block_on(async {
                match self.factory.open().await {
                    Ok(store) => {
                        let shared = matches!(self.factory.reopen(&store).await, Ok(Some(_)));
                        Ok((store.capabilities(), shared))
                    }
                    Err(e) => Err(e),
                }
            })
        });
        let trials = match probe {
            Ok((caps, shared)) => self
                .cases
                .into_iter()
                .map(|case| trial(backend, &self.factory, case, caps, shared))
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
                        let name = format!("{backend}::{}", case.name);
                        if required {
                            let why = why.clone();
                            Trial::test(name, move || {
                                Err(Failed::from(format!("{backend} unavailable: {why}")))
                            })
                        } else {
                            Trial::test(name, || Ok(())).with_ignored_flag(true)
                        }
                    })
                    .collect()
            }
        };
        libtest_mimic::run(args, trials)
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, Unavailable> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .map_err(|e| Unavailable(format!("cannot start a tokio runtime: {e}")))
}

fn trial<F: StoreFactory>(
    backend: &str,
    factory: &Arc<F>,
    case: Case<F>,
    caps: Capabilities,
    shared: bool,
) -> Trial {
    let applies = match case.requires {
        Requires::Always => true,
        Requires::SharedInstances => shared,
        Requires::Purge => !caps.native_expiry,
    };
    let name = format!("{backend}::{}", case.name);
    if !applies {
        return Trial::test(name, || Ok(())).with_ignored_flag(true);
    }
    let factory = factory.clone();
    let run = case.run.clone();
    Trial::test(name, move || {
        let rt = runtime().map_err(|e| Failed::from(e.0))?;
        rt.block_on(async move {
            tokio::spawn(run(factory))
                .await
                .map_err(|e| Failed::from(panic_message(e)))
        })
    })
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
