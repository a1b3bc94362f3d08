//! Opening the store a [`StoreUrl`] names: [`store_from_url`] (type-erased)
//! and [`StoreUrl::open`] (the concrete store).

use std::sync::Arc;

use async_trait::async_trait;
use idem_core::store::{
    Capabilities, Census, InsertOutcome, Store, StoreError, SwapOutcome, Versioned,
};
use idem_core::{MemoryStore, RecordKey, Timestamp};

use crate::{OpenError, StoreUrl};

/// Opens the store `url` names (see the [crate docs](crate)), type-erased.
///
/// # Behavior
/// As [`StoreUrl::open`]; the store returned keeps a `sqlite://` temporary
/// directory alive until it is dropped.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idemkit::OpenError> {
/// let store = idemkit::store_from_url("memory://").await?;
/// let engine = idem_core::Engine::new(store);
/// # let _ = engine;
/// # Ok(()) }
/// ```
pub async fn store_from_url(url: &str) -> Result<Arc<dyn Store>, OpenError> {
    let opened = StoreUrl::parse(url)?.open().await?;
    #[cfg(feature = "sqlite")]
    if opened.temp_dir.is_some() {
        return Ok(Arc::new(opened));
    }
    Ok(opened.erased())
}

/// A store of one of the backends, of its concrete type (for what only that
/// type offers: `SqliteStore::transaction`, `PostgresStore::pool`, …).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum AnyStore {
    /// `memory://`.
    Memory(MemoryStore),
    /// `sqlite://…`.
    #[cfg(feature = "sqlite")]
    Sqlite(idem_sqlite::SqliteStore),
    /// `postgres://…`.
    #[cfg(feature = "postgres")]
    Postgres(idem_postgres::PostgresStore),
    /// `redis://…` or `redis+cluster://…`.
    #[cfg(feature = "redis")]
    Redis(idem_redis::RedisStore),
}

impl AnyStore {
    /// The store, type-erased (a clone: it shares the records).
    pub fn erased(&self) -> Arc<dyn Store> {
        match self {
            Self::Memory(s) => Arc::new(s.clone()),
            #[cfg(feature = "sqlite")]
            Self::Sqlite(s) => Arc::new(s.clone()),
            #[cfg(feature = "postgres")]
            Self::Postgres(s) => Arc::new(s.clone()),
            #[cfg(feature = "redis")]
            Self::Redis(s) => Arc::new(s.clone()),
        }
    }

    /// The memory store, if it is one.
    pub fn as_memory(&self) -> Option<&MemoryStore> {
        match self {
            Self::Memory(s) => Some(s),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    /// The SQLite store, if it is one.
    #[cfg(feature = "sqlite")]
    pub fn as_sqlite(&self) -> Option<&idem_sqlite::SqliteStore> {
        match self {
            Self::Sqlite(s) => Some(s),
            _ => None,
        }
    }

    /// The PostgreSQL store, if it is one.
    #[cfg(feature = "postgres")]
    pub fn as_postgres(&self) -> Option<&idem_postgres::PostgresStore> {
        match self {
            Self::Postgres(s) => Some(s),
            _ => None,
        }
    }

    /// The Redis store (standalone or cluster), if it is one.
    #[cfg(feature = "redis")]
    pub fn as_redis(&self) -> Option<&idem_redis::RedisStore> {
        match self {
            Self::Redis(s) => Some(s),
            _ => None,
        }
    }
}

/// A store opened by [`StoreUrl::open`]: the concrete store and, for
/// `sqlite://`, the temporary directory its file lives in (removed when the
/// `Opened` is dropped).
///
/// `Opened` is itself a [`Store`] (the same records).
pub struct Opened {
    store: AnyStore,
    erased: Arc<dyn Store>,
    #[cfg(feature = "sqlite")]
    pub(crate) temp_dir: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened")
            .field("store", &self.store)
            .field("temp_dir", &self.temp_dir())
            .finish()
    }
}

impl Opened {
    pub(crate) fn new(store: AnyStore) -> Self {
        Self {
            erased: store.erased(),
            store,
            #[cfg(feature = "sqlite")]
            temp_dir: None,
        }
    }

    /// The concrete store.
    pub fn store(&self) -> &AnyStore {
        &self.store
    }

    /// The store, type-erased (it shares the records; a `sqlite://`
    /// temporary file lives only as long as this `Opened`).
    pub fn erased(&self) -> Arc<dyn Store> {
        self.erased.clone()
    }

    /// The temporary directory of a `sqlite://` store.
    pub fn temp_dir(&self) -> Option<&std::path::Path> {
        #[cfg(feature = "sqlite")]
        if let Some(dir) = &self.temp_dir {
            return Some(dir.path());
        }
        None
    }
}

#[async_trait]
impl Store for Opened {
    fn capabilities(&self) -> Capabilities {
        self.erased.capabilities()
    }
    async fn insert_if_absent(
        &self,
        key: &RecordKey,
        record: &Versioned,
        now: Timestamp,
    ) -> Result<InsertOutcome, StoreError> {
        self.erased.insert_if_absent(key, record, now).await
    }
    async fn get(&self, key: &RecordKey, now: Timestamp) -> Result<Option<Versioned>, StoreError> {
        self.erased.get(key, now).await
    }
    async fn compare_and_swap(
        &self,
        key: &RecordKey,
        expected: &Versioned,
        record: &Versioned,
        now: Timestamp,
    ) -> Result<SwapOutcome, StoreError> {
        self.erased
            .compare_and_swap(key, expected, record, now)
            .await
    }
    async fn delete_if(
        &self,
        key: &RecordKey,
        expected: &Versioned,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        self.erased.delete_if(key, expected, now).await
    }
    async fn purge_expired(&self, now: Timestamp, limit: usize) -> Result<u64, StoreError> {
        self.erased.purge_expired(now, limit).await
    }
    async fn census(&self, now: Timestamp, sample: usize) -> Result<Census, StoreError> {
        self.erased.census(now, sample).await
    }
    async fn abandoned(&self, now: Timestamp, limit: usize) -> Result<Vec<Versioned>, StoreError> {
        self.erased.abandoned(now, limit).await
    }
}

impl StoreUrl {
    /// Opens the store this URL names, of its concrete type.
    ///
    /// # Behavior
    /// - `memory://`: a new, empty `MemoryStore`.
    /// - `sqlite://PATH`: opens (creating it if absent) the file; `sqlite://`:
    ///   a file in a new temporary directory, removed when the [`Opened`] is
    ///   dropped.
    /// - `postgres://…`: one direct connection first (so that an unreachable
    ///   server is reported with its cause, within `acquire_timeout`), then a
    ///   pool (`PostgresStore::pool_options`, `max_connections`,
    ///   `acquire_timeout`) and, unless `migrate=false`, the table's
    ///   migration (which creates the schema if needed).
    /// - `redis://…`, `redis+cluster://…`: connects (every node of a
    ///   cluster) and loads the scripts.
    /// - A backend whose cargo feature is off is
    ///   [`OpenError::FeatureDisabled`]; a table or schema name the store
    ///   refuses is [`OpenError::Url`] naming the parameter; an unreachable
    ///   server is [`OpenError::Open`] with
    ///   [`is_unreachable`](OpenError::is_unreachable) true.
    pub async fn open(&self) -> Result<Opened, OpenError> {
        match self {
            Self::Memory => Ok(Opened::new(AnyStore::Memory(MemoryStore::new()))),
            #[cfg(feature = "sqlite")]
            Self::Sqlite(url) => crate::url::sqlite::open(self, url),
            #[cfg(feature = "postgres")]
            Self::Postgres(url) => crate::url::postgres::open(self, url).await,
            #[cfg(feature = "redis")]
            Self::Redis(url) => crate::url::redis::open(self, url).await,
            #[allow(unreachable_patterns)]
            _ => Err(OpenError::FeatureDisabled {
                url: self.to_string(),
                feature: match self {
                    Self::Postgres(_) => "postgres",
                    Self::Redis(_) => "redis",
                    _ => "sqlite",
                },
            }),
        }
    }
}

/// Builder steps for the options a URL may leave out.
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "redis"))]
pub(crate) trait Optionally: Sized {
    /// `with(self, value)` if the URL sets the value; `self` (the store's
    /// default) otherwise.
    fn optionally<T>(self, value: Option<T>, with: impl FnOnce(Self, T) -> Self) -> Self {
        match value {
            Some(value) => with(self, value),
            None => self,
        }
    }
}

#[cfg(any(feature = "sqlite", feature = "postgres", feature = "redis"))]
impl<B> Optionally for B {}

/// The error of a store that failed to open.
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "redis"))]
pub(crate) fn failed(
    url: &StoreUrl,
    unreachable: bool,
    source: impl std::error::Error + Send + Sync + 'static,
) -> OpenError {
    OpenError::Open {
        backend: url.backend(),
        url: url.to_string(),
        unreachable,
        source: Box::new(source),
    }
}

/// A value the store itself refused, reported as the URL parameter `name`.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub(crate) fn refused(url: &StoreUrl, name: &str, e: impl std::fmt::Display) -> OpenError {
    OpenError::Url(crate::StoreUrlError::InvalidParameter {
        url: url.to_string(),
        name: name.to_string(),
        reason: e.to_string(),
    })
}
