//! The one runner: one runtime for the whole run (a pool cached in the
//! factory works), teardown after every case (passed, failed or hung),
//! requirements that never pass silently.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use idem_conformance::faulty::{Fault, FaultKind, FaultyStore, Op};
use idem_conformance::runner::{Runner, Trial};
use idem_conformance::{Requires, StoreFactory, Suite, Unavailable, Verdict, open_store};
use idem_core::{MemoryStore, StoreError};
use tokio::sync::{OnceCell, mpsc, oneshot};

/// A "connection pool": one background task, spawned on first use, that
/// every store of the factory talks to. It lives on the runtime it was
/// spawned on: with a runtime per case it died with the first case, and
/// every later case found its pool gone.
#[derive(Clone)]
struct Pool(mpsc::Sender<oneshot::Sender<()>>);

impl Pool {
    fn start() -> Self {
        let (tx, mut rx) = mpsc::channel::<oneshot::Sender<()>>(64);
        tokio::spawn(async move {
            while let Some(reply) = rx.recv().await {
                let _ = reply.send(());
            }
        });
        Self(tx)
    }

    /// One round trip to the background task.
    async fn ping(&self) -> Result<(), StoreError> {
        let gone = || StoreError::Unavailable {
            store: "pooled",
            source: "the pool's connection task is gone (its runtime ended)".into(),
        };
        let (reply, answer) = oneshot::channel();
        self.0.send(reply).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())
    }

    /// A new, empty store over this pool.
    fn store(&self) -> Pooled {
        let store = FaultyStore::new(MemoryStore::new()).with_name("pooled");
        for op in Op::ALL {
            let pool = self.0.clone();
            store.inject(Fault::new(op, FaultKind::Unavailable).when(move |_| pool.is_closed()));
        }
        store
    }
}

/// A MemoryStore behind the factory's pool: once the pool's connection
/// task is gone, every call fails as unavailable.
type Pooled = FaultyStore<MemoryStore>;

/// The natural factory of a new backend author: the pool is created once,
/// cached, and shared by every store.
#[derive(Default)]
struct PooledFactory {
    pool: OnceCell<Pool>,
}

#[async_trait]
impl StoreFactory for PooledFactory {
    type Store = Pooled;
    fn name(&self) -> &'static str {
        "pooled"
    }
    async fn open(&self) -> Result<Pooled, Unavailable> {
        let pool = self.pool.get_or_init(|| async { Pool::start() }).await;
        pool.ping()
            .await
            .map_err(|e| Unavailable(format!("pool unreachable: {e}")))?;
        Ok(pool.store())
    }
    async fn reopen(&self, store: &Pooled) -> Result<Option<Pooled>, Unavailable> {
        Ok(Some(store.clone()))
    }
}

#[test]
fn a_pool_cached_in_the_factory_serves_every_case() {
    let report = Suite::new(PooledFactory::default()).report();
    assert!(
        report.failed().is_empty() && report.ignored().is_empty(),
        "every case must run and pass over the factory's one pool\n{report}"
    );
    assert!(report.passed().len() > 50, "{report}");
}

/// Counts the stores opened and torn down; optionally fails the teardown
/// of every store but the probe's.
#[derive(Default)]
struct Counting {
    opened: Arc<AtomicUsize>,
    torn_down: Arc<AtomicUsize>,
    fail_teardown: bool,
}

#[async_trait]
impl StoreFactory for Counting {
    type Store = MemoryStore;
    fn name(&self) -> &'static str {
        "counting"
    }
    async fn open(&self) -> Result<MemoryStore, Unavailable> {
        self.opened.fetch_add(1, Ordering::SeqCst);
        Ok(MemoryStore::new())
    }
    async fn reopen(&self, store: &MemoryStore) -> Result<Option<MemoryStore>, Unavailable> {
        Ok(Some(store.clone()))
    }
    async fn teardown(&self, _store: &MemoryStore) -> Result<(), Unavailable> {
        let n = self.torn_down.fetch_add(1, Ordering::SeqCst);
        if self.fail_teardown && n > 0 {
            return Err(Unavailable("DROP SCHEMA failed".into()));
        }
        Ok(())
    }
}

#[test]
fn every_opened_store_is_torn_down_once() {
    let factory = Counting::default();
    let (opened, torn_down) = (factory.opened.clone(), factory.torn_down.clone());
    let report = Suite::new(factory).report();
    assert!(report.failed().is_empty(), "{report}");
    let opened = opened.load(Ordering::SeqCst);
    assert!(opened > 50, "one store per case at least, got {opened}");
    assert_eq!(
        torn_down.load(Ordering::SeqCst),
        opened,
        "every store open returned (the probe's too) must be torn down once"
    );
}

async fn opens_then_panics(factory: Arc<Counting>) {
    let _store = open_store(&*factory).await.expect("open");
    let _second = open_store(&*factory).await.expect("open");
    panic!("the case fails after opening two stores");
}

async fn opens_and_passes(factory: Arc<Counting>) {
    let _store = open_store(&*factory).await.expect("open");
}

#[test]
fn a_failed_case_is_torn_down_too() {
    let factory = Counting::default();
    let (opened, torn_down) = (factory.opened.clone(), factory.torn_down.clone());
    let report = Suite::empty(factory)
        .case(
            "own::opens_then_panics",
            Requires::Always,
            opens_then_panics,
        )
        .report();
    match report.verdict("own::opens_then_panics") {
        Some(Verdict::Failed(why)) => assert!(why.contains("after opening two stores"), "{why}"),
        other => panic!("the case must fail with its message: {other:?}"),
    }
    assert_eq!(
        opened.load(Ordering::SeqCst),
        3,
        "the probe's store and two"
    );
    assert_eq!(torn_down.load(Ordering::SeqCst), 3);
}

#[test]
fn a_failed_teardown_fails_the_case() {
    let factory = Counting {
        fail_teardown: true,
        ..Counting::default()
    };
    let report = Suite::empty(factory)
        .case("own::opens_and_passes", Requires::Always, opens_and_passes)
        .report();
    match report.verdict("own::opens_and_passes") {
        Some(Verdict::Failed(why)) => {
            assert!(
                why.contains("teardown") && why.contains("DROP SCHEMA failed"),
                "{why}"
            );
        }
        other => panic!("a failed teardown must fail the case: {other:?}"),
    }
}

#[test]
fn a_hung_trial_fails_and_its_teardown_still_runs() {
    let torn_down = Arc::new(AtomicUsize::new(0));
    let seen = torn_down.clone();
    // A zero timeout: the hang is detected at the first poll, no waiting.
    let verdicts = Runner::new("runner-test")
        .with_case_timeout(Duration::ZERO)
        .trial(
            Trial::test("hangs", std::future::pending::<()>).with_teardown(move || async move {
                seen.fetch_add(1, Ordering::SeqCst);
                Ok::<(), String>(())
            }),
        )
        .report();
    match &verdicts[..] {
        [(name, Verdict::Failed(why))] if name == "hangs" => {
            assert!(why.contains("did not finish"), "{why}");
        }
        other => panic!("a hung trial must fail: {other:?}"),
    }
    assert_eq!(torn_down.load(Ordering::SeqCst), 1);
}

async fn never_probed() -> Result<(), String> {
    panic!("a requirement no trial needs is not probed")
}

#[test]
fn requirements_are_probed_once_and_never_pass_silently() {
    let probes = Arc::new(AtomicUsize::new(0));
    let (up, after) = (probes.clone(), Arc::new(AtomicUsize::new(0)));
    let ran_after = after.clone();
    // The requirement's probe starts a "pool" on the run's runtime; the
    // trials use it later: one runtime for the whole run.
    let pool = Arc::new(std::sync::OnceLock::<Pool>::new());
    let (set, used) = (pool.clone(), pool.clone());
    let verdicts = Runner::new("runner-test")
        .requirement("up", move || async move {
            up.fetch_add(1, Ordering::SeqCst);
            let _ = set.set(Pool::start());
            Ok::<(), String>(())
        })
        .requirement("down", || async { Err("set IDEM_NOWHERE_URL") })
        .requirement("unused", never_probed)
        .trial(
            Trial::test("uses_the_pool", move || async move {
                used.get()
                    .expect("probed before")
                    .ping()
                    .await
                    .expect("the pool lives");
            })
            .requires("up"),
        )
        .trial(Trial::test("also_up", || async {}).requires("up"))
        .trial(Trial::test("needs_down", || async { panic!("must not run") }).requires("down"))
        .trial(Trial::test("panics", || async { panic!("boom") }))
        .after_all(move || async move {
            ran_after.fetch_add(1, Ordering::SeqCst);
        })
        .report();
    assert_eq!(probes.load(Ordering::SeqCst), 1, "probed once");
    assert_eq!(after.load(Ordering::SeqCst), 1, "after-all ran once");
    assert_eq!(verdicts[0], ("uses_the_pool".to_string(), Verdict::Passed));
    assert_eq!(verdicts[1], ("also_up".to_string(), Verdict::Passed));
    let required = idem_conformance::backends_required();
    match &verdicts[2].1 {
        Verdict::Ignored(why) if !required => assert_eq!(why, "down unavailable"),
        Verdict::Failed(why) if required => assert!(why.contains("IDEM_NOWHERE_URL"), "{why}"),
        other => panic!("an unreachable requirement must be ignored (failed under CI): {other:?}"),
    }
    assert_eq!(
        verdicts[3],
        ("panics".to_string(), Verdict::Failed("boom".into()))
    );
}
