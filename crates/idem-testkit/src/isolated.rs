//! [`Isolated`]: a store that shares no record with any other test.

use std::sync::Arc;
use std::time::Duration;

use idem_core::store::Store;
use idem_postgres::PostgresStore;
use idem_redis::RedisStore;
use idem_sqlite::SqliteStore;
use idemkit::{AnyStore, Opened, StoreUrl};
use tempfile::TempDir;

use crate::redis::Deployment;
use crate::{BackendKind, Unavailable};

/// How long a clean-up may take before it is given up (with a message).
const CLEANUP_LIMIT: Duration = Duration::from_secs(30);

/// A fresh store of one backend that shares no record with any other
/// store: a temporary file, a PostgreSQL schema or a Redis key prefix of its
/// own.
///
/// # Behavior
/// - [`open`](Self::open) takes the backend's server from the environment
///   ([`BackendKind::url`]); [`open_url`](Self::open_url) takes a URL,
///   whose options (`claim_mode`, `expiry_grace`, `max_connections`, …) it
///   keeps. Either way the store gets a place of its own:
///   - SQLite: `idem.db` in a new temporary directory;
///   - PostgreSQL: the schema `idem_test_<pid>_<random>_<n>` (created by
///     the migration; not at all with `migrate=false`), over a pool of 8
///     connections with a 60 s acquire timeout unless the URL says otherwise;
///   - Redis and the cluster: the key prefix `idem-test:<pid>_<random>:<n>:`,
///     with a 500 ms connection timeout, a 5 s response timeout and 2
///     reconnect attempts unless the URL says otherwise;
///   - memory: a new `MemoryStore`.
/// - An unreachable server is [`Unavailable`], naming the server and the
///   variable to set.
/// - [`close`](Self::close), or dropping the handle, removes what the store
///   holds: the directory, the schema (`DROP SCHEMA … CASCADE`), the keys
///   under the prefix on every master (never `FLUSHDB`). Dropping does it on
///   a thread of its own (so also inside an async test), and reports a
///   failure on stderr.
pub struct Isolated {
    kind: BackendKind,
    url: StoreUrl,
    opened: Option<Opened>,
    cleanup: Cleanup,
}

/// What to remove.
enum Cleanup {
    Nothing,
    Dir(TempDir),
    Schema {
        url: String,
        schema: String,
    },
    Prefix {
        deployment: Deployment,
        prefix: String,
    },
}

impl Cleanup {
    async fn run(self) -> Result<(), String> {
        match self {
            Self::Nothing => Ok(()),
            Self::Dir(dir) => dir.close().map_err(|e| e.to_string()),
            Self::Schema { url, schema } => crate::postgres::drop_schema(&url, &schema).await,
            Self::Prefix { deployment, prefix } => deployment
                .delete(&prefix)
                .await
                .map(drop)
                .map_err(|e| format!("delete the keys under {prefix}: {e}")),
        }
    }

    /// Runs the clean-up to the end on a thread with a runtime of its own
    /// (the caller may be inside a runtime).
    fn run_blocking(self) -> Result<(), String> {
        if matches!(self, Self::Nothing) {
            return Ok(());
        }
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async {
                tokio::time::timeout(CLEANUP_LIMIT, self.run())
                    .await
                    .unwrap_or_else(|_| Err(format!("timed out after {CLEANUP_LIMIT:?}")))
            })
        });
        thread
            .join()
            .unwrap_or_else(|_| Err("the clean-up thread panicked".to_string()))
    }
}

impl std::fmt::Debug for Isolated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Isolated")
            .field("kind", &self.kind)
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl Isolated {
    /// A fresh store of `kind` on the server the environment names.
    pub async fn open(kind: BackendKind) -> Result<Self, Unavailable> {
        Self::open_url(kind.url()?).await
    }

    /// A fresh store of `kind`; panics with the reason if the backend
    /// cannot be used (for tests whose runner probed it first and reported
    /// them ignored or failed instead).
    pub async fn fresh(kind: BackendKind) -> Self {
        Self::open(kind)
            .await
            .unwrap_or_else(|e| panic!("open an isolated {kind} store: {e}"))
    }

    /// A fresh store on the server of `url`, with its options, in a place
    /// of its own (see the type's docs: the path, schema or prefix of `url`
    /// is replaced).
    pub async fn open_url(url: StoreUrl) -> Result<Self, Unavailable> {
        let kind = BackendKind::of(&url)
            .ok_or_else(|| Unavailable(format!("no test backend for {url}")))?;
        let mut url = url;
        let mut cleanup = Cleanup::Nothing;
        match &mut url {
            StoreUrl::Sqlite(s) => {
                let dir = tempfile::Builder::new()
                    .prefix("idem-test-")
                    .tempdir()
                    .map_err(|e| Unavailable(format!("create a temporary directory: {e}")))?;
                s.path = Some(dir.path().join("idem.db"));
                cleanup = Cleanup::Dir(dir);
            }
            StoreUrl::Postgres(pg) => {
                let schema = crate::postgres::fresh_schema();
                pg.schema = Some(schema.clone());
                pg.max_connections.get_or_insert(8);
                pg.acquire_timeout.get_or_insert(Duration::from_secs(60));
                cleanup = Cleanup::Schema {
                    url: pg.connection_url(),
                    schema,
                };
            }
            StoreUrl::Redis(r) => {
                let prefix = crate::redis::fresh_prefix();
                r.prefix = Some(prefix.clone());
                r.connection_timeout
                    .get_or_insert(Duration::from_millis(500));
                r.response_timeout.get_or_insert(Duration::from_secs(5));
                r.reconnect_attempts.get_or_insert(2);
                cleanup = Cleanup::Prefix {
                    deployment: Deployment::of(r),
                    prefix,
                };
            }
            _ => {}
        }
        match url.open().await {
            Ok(opened) => Ok(Self {
                kind,
                url,
                opened: Some(opened),
                cleanup,
            }),
            Err(e) => {
                // Nothing was created on a server that could not be reached.
                if !e.is_unreachable() {
                    let _ = cleanup.run().await;
                }
                Err(kind.unreachable(&url, &crate::backend::cause(&e)))
            }
        }
    }

    /// The backend.
    pub fn kind(&self) -> BackendKind {
        self.kind
    }

    /// Where the store's records live, unique to it: the SQLite file's path,
    /// the PostgreSQL schema or the Redis key prefix (empty for memory).
    pub fn place(&self) -> String {
        match &self.url {
            StoreUrl::Sqlite(s) => s
                .path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            StoreUrl::Postgres(pg) => pg.schema.clone().unwrap_or_default(),
            StoreUrl::Redis(r) => r.prefix.clone().unwrap_or_default(),
            _ => String::new(),
        }
    }

    /// The store's URL: the server, its options and its own path, schema or
    /// prefix (`Display` hides the password).
    pub fn url(&self) -> &StoreUrl {
        &self.url
    }

    fn opened(&self) -> &Opened {
        self.opened
            .as_ref()
            .expect("an Isolated store is open until it is dropped")
    }

    /// The store, type-erased (clones share the records).
    pub fn store(&self) -> Arc<dyn Store> {
        self.opened().erased()
    }

    /// The store, of its concrete type.
    pub fn handle(&self) -> &AnyStore {
        self.opened().store()
    }

    /// The SQLite store (panics for another backend).
    pub fn sqlite(&self) -> &SqliteStore {
        self.handle()
            .as_sqlite()
            .unwrap_or_else(|| panic!("not a SQLite store: {}", self.kind))
    }

    /// The PostgreSQL store (panics for another backend).
    pub fn postgres(&self) -> &PostgresStore {
        self.handle()
            .as_postgres()
            .unwrap_or_else(|| panic!("not a PostgreSQL store: {}", self.kind))
    }

    /// The Redis store, standalone or cluster (panics for another backend).
    pub fn redis(&self) -> &RedisStore {
        self.handle()
            .as_redis()
            .unwrap_or_else(|| panic!("not a Redis store: {}", self.kind))
    }

    /// The Redis server or cluster of the store, for raw access (`None` for
    /// another backend).
    pub fn redis_deployment(&self) -> Option<Deployment> {
        Deployment::of_store_url(&self.url)
    }

    /// A second instance over the same records through connections of its
    /// own, as a second application server would open it (memory: a clone
    /// sharing the map).
    pub async fn reopen(&self) -> Result<AnyStore, Unavailable> {
        reopen(&self.url, self.handle()).await
    }

    /// How many records the store holds now, expired ones not yet removed
    /// included (Redis: the keys under the prefix that Redis has not expired
    /// yet).
    pub async fn records(&self) -> Result<u64, String> {
        match self.handle() {
            AnyStore::Memory(m) => Ok(m.len() as u64),
            AnyStore::Sqlite(s) => {
                let conn = s.connect().map_err(|e| e.to_string())?;
                let sql = format!("SELECT COUNT(*) FROM \"{}\"", s.table().as_str());
                conn.query_row(&sql, [], |row| row.get::<_, i64>(0))
                    .map(|n| u64::try_from(n).unwrap_or(0))
                    .map_err(|e| e.to_string())
            }
            AnyStore::Postgres(s) => crate::postgres::count(s.pool(), s.table()).await,
            AnyStore::Redis(s) => match self.redis_deployment() {
                Some(deployment) => deployment
                    .count(s.prefix())
                    .await
                    .map_err(|e| e.to_string()),
                None => Err(format!("no Redis deployment in {}", self.url)),
            },
            _ => Err(format!("cannot count the records of {}", self.url)),
        }
    }

    /// Closes the store and removes what it holds now, reporting a failure
    /// (dropping does the same, reporting on stderr).
    pub async fn close(mut self) -> Result<(), String> {
        drop(self.opened.take());
        std::mem::replace(&mut self.cleanup, Cleanup::Nothing)
            .run()
            .await
    }
}

impl Drop for Isolated {
    fn drop(&mut self) {
        drop(self.opened.take());
        let cleanup = std::mem::replace(&mut self.cleanup, Cleanup::Nothing);
        if let Err(e) = cleanup.run_blocking() {
            eprintln!("idem-testkit: could not clean up {}: {e}", self.url);
        }
    }
}

/// Isolated stores handed out one after another (by a conformance
/// [`StoreFactory`](crate::runner::StoreFactory), say) and kept open until
/// [`close`](Self::close)d by their [place](Isolated::place), or until the
/// `Isolation` is dropped.
#[derive(Debug)]
pub struct Isolation {
    url: Result<StoreUrl, Unavailable>,
    open: std::sync::Mutex<Vec<Isolated>>,
}

impl Isolation {
    /// Stores of `kind` on the server the environment names.
    pub fn new(kind: BackendKind) -> Self {
        Self {
            url: kind.url(),
            open: std::sync::Mutex::default(),
        }
    }

    /// The same stores with other options: `edit` changes the URL every
    /// store is opened with.
    #[must_use]
    pub fn with_options(mut self, edit: impl FnOnce(&mut StoreUrl)) -> Self {
        if let Ok(url) = &mut self.url {
            edit(url);
        }
        self
    }

    /// The URL every store is opened with (each in a place of its own).
    pub fn url(&self) -> Result<&StoreUrl, Unavailable> {
        self.url.as_ref().map_err(Clone::clone)
    }

    /// A fresh isolated store, of its concrete type, kept open.
    pub async fn open(&self) -> Result<AnyStore, Unavailable> {
        self.open_with(|_| {}).await
    }

    /// A fresh isolated store opened with the URL changed by `edit` (a table
    /// name, `migrate=false`, an expiry grace…; its place is still its own),
    /// kept open.
    pub async fn open_with(
        &self,
        edit: impl FnOnce(&mut StoreUrl),
    ) -> Result<AnyStore, Unavailable> {
        let mut url = self.url.clone()?;
        edit(&mut url);
        let isolated = Isolated::open_url(url).await?;
        let store = isolated.handle().clone();
        self.lock().push(isolated);
        Ok(store)
    }

    /// A second instance of the store at `place` (see [`Isolated::reopen`]).
    pub async fn reopen(&self, place: &str) -> Result<AnyStore, Unavailable> {
        let (url, handle) = self
            .lock()
            .iter()
            .find(|i| i.place() == place)
            .map(|i| (i.url().clone(), i.handle().clone()))
            .ok_or_else(|| Unavailable(format!("no open isolated store at {place}")))?;
        reopen(&url, &handle).await
    }

    /// Closes the store at `place` and removes what it holds (nothing if no
    /// store is there).
    pub async fn close(&self, place: &str) -> Result<(), Unavailable> {
        let found = {
            let mut open = self.lock();
            open.iter()
                .position(|i| i.place() == place)
                .map(|at| open.swap_remove(at))
        };
        match found {
            Some(isolated) => isolated.close().await.map_err(Unavailable),
            None => Ok(()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Isolated>> {
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A second instance of the store at `url` (`handle`: the first one).
async fn reopen(url: &StoreUrl, handle: &AnyStore) -> Result<AnyStore, Unavailable> {
    if let AnyStore::Memory(m) = handle {
        return Ok(AnyStore::Memory(m.clone()));
    }
    let mut again = url.clone();
    if let StoreUrl::Postgres(pg) = &mut again {
        pg.migrate = false;
    }
    let kind = BackendKind::of(url).unwrap_or(BackendKind::Memory);
    again
        .open()
        .await
        .map(|opened| opened.store().clone())
        .map_err(|e| kind.unreachable(url, &crate::backend::cause(&e)))
}
