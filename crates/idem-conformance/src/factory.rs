//! What a backend hands the suite: [`StoreFactory`], and the stores opened
//! through it during a case (handed back to
//! [`teardown`](StoreFactory::teardown) after the case).

use std::any::Any;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use idem_core::store::Store;
use idem_core::{MemoryStore, RecordKey, Transition};

/// Why a backend could not be reached; the message says which env var to set.
#[derive(Debug, Clone)]
pub struct Unavailable(pub String);

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unavailable {}

/// How [`StoreFactory::apply_transition`] ends the transaction it opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransactionEnd {
    /// Commit it, if applying the transition succeeded (roll back otherwise,
    /// as an application would).
    Commit,
    /// Roll it back, whatever applying the transition answered.
    Rollback,
}

/// A source of fresh, isolated stores of one backend.
///
/// # Runtime model (read this first)
///
/// **The whole suite runs on ONE multi-threaded tokio runtime that lives as
/// long as the run** (see [`runner`](crate::runner)): the probe, every case
/// and every teardown run on it, many cases at a time. So a factory may
/// create a connection pool once (lazily in [`open`](Self::open), in a
/// `tokio::sync::OnceCell`) and hand every case a store over it: the pool's
/// connections and background tasks stay valid for the whole run. Cases do
/// not get a runtime of their own, and nothing a factory caches is torn
/// down between cases, except through [`teardown`](Self::teardown).
/// The factory itself is dropped at the end of the run, on the runtime.
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
/// - [`teardown`](Self::teardown) is called once for every store `open`
///   returned to a case, after the case ended (passed, failed, or timed out
///   and aborted), and for the store the probe opened: drop the store's
///   per-case table, schema or keys there. Not called for `reopen`'s second
///   instances (they share the first one's records).
/// - [`corrupt`](Self::corrupt) overwrites the bytes stored under a key with
///   bytes that do not decode, bypassing the store's API; backends that can
///   do it say so with [`can_corrupt`](Self::can_corrupt), and the cases
///   about corrupt records run against them (they are ignored otherwise).
/// - [`apply_transition`](Self::apply_transition) applies a
///   [`Transition`] inside one of the backend's own transactions, for the
///   backends that offer completion inside the caller's transaction (an
///   optional feature, see docs/backend-authors.md); backends that do say
///   so with [`can_apply_transition`](Self::can_apply_transition), and the
///   `transactional::*` cases run against them.
#[async_trait]
pub trait StoreFactory: Send + Sync + 'static {
    /// The store under test.
    type Store: Store;

    /// The backend's name in test names and messages (`"sqlite"`, `"redis-cluster"`).
    fn name(&self) -> &'static str;

    /// A fresh, isolated store, or why the backend cannot be reached.
    ///
    /// Runs on the suite's one runtime, like everything else: a pool created
    /// (or cached) here lives as long as the run.
    async fn open(&self) -> Result<Self::Store, Unavailable>;

    /// A second instance sharing `store`'s records through its own connections.
    async fn reopen(&self, store: &Self::Store) -> Result<Option<Self::Store>, Unavailable> {
        let _ = store;
        Ok(None)
    }

    /// Cleans up after a case: called with each store [`open`](Self::open)
    /// returned to it, after the case ended (passed, failed, or timed out:
    /// then after its task was aborted; tasks the case spawned and did not
    /// wait for may still hold the store), and with the store the probe
    /// opened. Drop per-case tables, schemas or keys here. An error fails the
    /// case. The default does nothing.
    async fn teardown(&self, store: &Self::Store) -> Result<(), Unavailable> {
        let _ = store;
        Ok(())
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

    /// Whether [`apply_transition`](Self::apply_transition) is implemented:
    /// the backend offers completion inside the caller's transaction.
    fn can_apply_transition(&self) -> bool {
        false
    }

    /// Opens a transaction on `store`'s data the way an application would,
    /// applies `transition` in it with the backend's own API (`apply_in` in
    /// idem-sqlite and idem-postgres), and ends it: commits when `end` is
    /// [`TransactionEnd::Commit`] and the apply succeeded, rolls back
    /// otherwise.
    ///
    /// Returns what applying answered: `Ok(Ok(()))`, or `Ok(Err(e))` (e.g.
    /// [`Error::LeaseLost`](idem_core::Error::LeaseLost) when the claim is
    /// no longer held). `Err(Unavailable)` only when the transaction could
    /// not be run at all (begin or commit failed).
    async fn apply_transition(
        &self,
        store: &Self::Store,
        transition: &Transition,
        end: TransactionEnd,
    ) -> Result<Result<(), idem_core::Error>, Unavailable> {
        let _ = (store, transition, end);
        Err(Unavailable(format!(
            "backend `{}` does not apply transitions in a transaction",
            self.name()
        )))
    }
}

/// The suite over [`MemoryStore`], the reference store: a fresh store per
/// case, and as its second instance a clone (clones share the records: the
/// closest a process-local store comes to a second instance).
///
/// ```text
/// // tests/memory.rs, with `harness = false`:
/// idem_conformance::conformance_main!(idem_conformance::MemoryFactory);
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct MemoryFactory;

#[async_trait]
impl StoreFactory for MemoryFactory {
    type Store = MemoryStore;
    fn name(&self) -> &'static str {
        "memory"
    }
    async fn open(&self) -> Result<MemoryStore, Unavailable> {
        Ok(MemoryStore::new())
    }
    async fn reopen(&self, store: &MemoryStore) -> Result<Option<MemoryStore>, Unavailable> {
        Ok(Some(store.clone()))
    }
}

tokio::task_local! {
    /// The stores opened through [`open_store`] by the running case.
    static OPENED: Opened;
}

/// The stores opened through [`open_store`] during one case, for its
/// teardown.
#[derive(Clone, Default)]
pub(crate) struct Opened(Arc<Mutex<Vec<Box<dyn Any + Send + Sync>>>>);

impl Opened {
    fn push<S: Send + Sync + 'static>(&self, store: Arc<S>) {
        self.list().push(Box::new(store));
    }

    /// The stores of type `S` opened so far (taken: a second call gives
    /// only those opened since).
    pub(crate) fn take<S: Send + Sync + 'static>(&self) -> Vec<Arc<S>> {
        std::mem::take(&mut *self.list())
            .into_iter()
            .filter_map(|store| store.downcast::<Arc<S>>().ok().map(|s| *s))
            .collect()
    }

    /// Runs `case` with `self` as the place [`open_store`] records stores.
    pub(crate) fn scope<Fut: Future>(self, case: Fut) -> impl Future<Output = Fut::Output> {
        OPENED.scope(self, case)
    }

    fn list(&self) -> std::sync::MutexGuard<'_, Vec<Box<dyn Any + Send + Sync>>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Opens a store through `factory` for the running case: the case's own
/// store, which the suite hands to [`StoreFactory::teardown`] once the case
/// ended. Every case of the suite opens its stores this way; a backend's own
/// cases ([`Suite::case`](crate::Suite::case)) should too.
///
/// # Behavior
/// Called from the case's own task (not from a task it spawned), the store
/// is recorded for teardown; elsewhere it is simply opened.
pub async fn open_store<F: StoreFactory>(factory: &F) -> Result<Arc<F::Store>, Unavailable> {
    let store = Arc::new(factory.open().await?);
    // Outside a case (no task-local set) there is nothing to record.
    let _ = OPENED.try_with(|opened| opened.push(store.clone()));
    Ok(store)
}
