//! [`Backend`] and [`Fixture`]: a fresh, isolated store of each backend.

use std::sync::Arc;

use idem_core::{MemoryStore, Store};
use idem_postgres::PostgresStore;
use idem_redis::RedisStore;
use idem_sqlite::SqliteStore;
use tempfile::TempDir;

/// The store backends the tests run against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Backend {
    /// `idem_core::MemoryStore` (always available).
    Memory,
    /// `idem_sqlite::SqliteStore` in a temporary directory (always available).
    Sqlite,
    /// `idem_postgres::PostgresStore` at `IDEM_POSTGRES_URL`.
    Postgres,
    /// `idem_redis::RedisStore` on the standalone server at `IDEM_REDIS_URL`.
    Redis,
    /// `idem_redis::RedisStore` on the cluster at `IDEM_REDIS_CLUSTER_URLS`.
    RedisCluster,
}

impl Backend {
    /// Every backend.
    pub const ALL: [Self; 5] = [
        Self::Memory,
        Self::Sqlite,
        Self::Postgres,
        Self::Redis,
        Self::RedisCluster,
    ];

    /// The backends whose stores are shared by several processes (every one
    /// but memory).
    pub const DURABLE: [Self; 4] = [
        Self::Sqlite,
        Self::Postgres,
        Self::Redis,
        Self::RedisCluster,
    ];

    /// The backends reached over TCP, which a [`FaultProxy`](idem_faults::FaultProxy)
    /// can sit in front of (the cluster client discovers its nodes itself,
    /// around any proxy, so it is not one of them).
    pub const NETWORKED: [Self; 2] = [Self::Postgres, Self::Redis];

    /// The name in test names and messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
            Self::Redis => "redis",
            Self::RedisCluster => "redis_cluster",
        }
    }

    /// Checks that the backend can be used, or says why not (which server,
    /// which environment variable).
    pub async fn probe(self) -> Result<(), String> {
        match self {
            Self::Memory | Self::Sqlite => Ok(()),
            Self::Postgres => crate::postgres::probe().await,
            Self::Redis => crate::redis::probe().await,
            Self::RedisCluster => crate::redis::probe_cluster().await,
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The concrete store of a [`Fixture`], for backend-specific access (raw
/// reads and writes, transactions).
#[derive(Clone, Debug)]
pub enum Handle {
    /// The memory store (clones share the records).
    Memory(MemoryStore),
    /// The SQLite store, over a file in the fixture's temporary directory.
    Sqlite(SqliteStore),
    /// The PostgreSQL store, in a schema of its own.
    Postgres(PostgresStore),
    /// The Redis store (standalone or cluster), under a prefix of its own.
    Redis(RedisStore),
}

/// A fresh store of one backend that shares no records with any other
/// fixture: its own temporary file, schema or key prefix.
///
/// # Behavior
/// - [`open`](Self::open) panics if the backend cannot be reached: the
///   [`harness`](crate::harness) probed it before running the test and
///   reported the test ignored (or failed) instead.
/// - PostgreSQL schemas and Redis keys are removed when the harness ends;
///   the SQLite directory when the fixture is dropped.
pub struct Fixture {
    backend: Backend,
    handle: Handle,
    store: Arc<dyn Store>,
    // Kept for the life of the fixture: the SQLite file lives in it.
    _dir: Option<TempDir>,
}

impl std::fmt::Debug for Fixture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fixture")
            .field("backend", &self.backend)
            .field("handle", &self.handle)
            .finish_non_exhaustive()
    }
}

impl Fixture {
    /// A fresh, isolated store of `backend`.
    pub async fn open(backend: Backend) -> Self {
        let (handle, dir) = match backend {
            Backend::Memory => (Handle::Memory(MemoryStore::new()), None),
            Backend::Sqlite => {
                let (store, dir) = crate::sqlite::store();
                (Handle::Sqlite(store), Some(dir))
            }
            Backend::Postgres => (Handle::Postgres(crate::postgres::store().await), None),
            Backend::Redis => (Handle::Redis(crate::redis::store().await), None),
            Backend::RedisCluster => (Handle::Redis(crate::redis::cluster_store().await), None),
        };
        let store = erase(&handle);
        Self {
            backend,
            handle,
            store,
            _dir: dir,
        }
    }

    /// The backend.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The store, type-erased (clones share it).
    pub fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    /// The concrete store.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// The SQLite store (panics for another backend).
    pub fn sqlite(&self) -> &SqliteStore {
        match &self.handle {
            Handle::Sqlite(s) => s,
            other => panic!("not a SQLite fixture: {other:?}"),
        }
    }

    /// The PostgreSQL store (panics for another backend).
    pub fn postgres(&self) -> &PostgresStore {
        match &self.handle {
            Handle::Postgres(s) => s,
            other => panic!("not a PostgreSQL fixture: {other:?}"),
        }
    }

    /// The Redis store (panics for another backend).
    pub fn redis(&self) -> &RedisStore {
        match &self.handle {
            Handle::Redis(s) => s,
            other => panic!("not a Redis fixture: {other:?}"),
        }
    }

    /// A second store instance over the same records, through connections
    /// of its own, as a second application server would open it (the memory
    /// store: a clone sharing the map).
    pub async fn second_instance(&self) -> Arc<dyn Store> {
        match &self.handle {
            Handle::Memory(m) => Arc::new(m.clone()),
            Handle::Sqlite(s) => {
                let path = s.path().expect("a file-backed SQLite store");
                Arc::new(
                    SqliteStore::builder()
                        .table(s.table().clone())
                        .open(path)
                        .expect("open the SQLite file a second time"),
                )
            }
            Handle::Postgres(s) => Arc::new(crate::postgres::second(s).await),
            Handle::Redis(s) => Arc::new(match self.backend {
                Backend::RedisCluster => crate::redis::cluster_store_with_prefix(s.prefix()).await,
                _ => crate::redis::store_with_prefix(s.prefix()).await,
            }),
        }
    }
}

fn erase(handle: &Handle) -> Arc<dyn Store> {
    match handle {
        Handle::Memory(s) => Arc::new(s.clone()),
        Handle::Sqlite(s) => Arc::new(s.clone()),
        Handle::Postgres(s) => Arc::new(s.clone()),
        Handle::Redis(s) => Arc::new(s.clone()),
    }
}
