//! [`BackendKind`]: the store backends, where their servers are, and
//! whether they answer.

use std::time::Duration;

use idemkit::StoreUrl;

use crate::{Unavailable, env};

/// The store backends the tests and tools run against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "kebab-case")
)]
pub enum BackendKind {
    /// `idem_core::MemoryStore` (always available).
    Memory,
    /// `idem_sqlite::SqliteStore` on a file in a temporary directory
    /// (always available).
    Sqlite,
    /// `idem_postgres::PostgresStore` at `IDEM_POSTGRES_URL`.
    Postgres,
    /// `idem_redis::RedisStore` on the standalone server at `IDEM_REDIS_URL`.
    Redis,
    /// `idem_redis::RedisStore` on the cluster at `IDEM_REDIS_CLUSTER_URLS`.
    RedisCluster,
    /// `idem_redis::RedisStore` on the Valkey (≥ 9.0) server at
    /// `IDEM_VALKEY_URL`, where compare-and-swap and delete are native
    /// commands. Not in [`ALL`](Self::ALL): the Redis suites run on it
    /// in a target of their own.
    Valkey,
}

impl BackendKind {
    /// Every backend but [`Valkey`](Self::Valkey) (a second server of the
    /// Redis backend, for the Redis suites).
    pub const ALL: [Self; 5] = [
        Self::Memory,
        Self::Sqlite,
        Self::Postgres,
        Self::Redis,
        Self::RedisCluster,
    ];

    /// The backends whose stores several processes can share (every one
    /// but memory).
    pub const DURABLE: [Self; 4] = [
        Self::Sqlite,
        Self::Postgres,
        Self::Redis,
        Self::RedisCluster,
    ];

    /// The backends reached over one TCP connection, which a proxy can sit
    /// in front of (the cluster client discovers its nodes itself, around
    /// any proxy).
    pub const NETWORKED: [Self; 2] = [Self::Postgres, Self::Redis];

    /// `memory`, `sqlite`, `postgres`, `redis` or `redis-cluster` (as
    /// [`StoreUrl::backend`] names them).
    pub fn name(self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
            Self::Redis => "redis",
            Self::RedisCluster => "redis-cluster",
            Self::Valkey => "valkey",
        }
    }

    /// The backend named `name` (`redis_cluster` is `redis-cluster` too).
    pub fn parse(name: &str) -> Option<Self> {
        let name = name.trim().replace('_', "-");
        Self::ALL
            .into_iter()
            .chain([Self::Valkey])
            .find(|k| k.name() == name)
    }

    /// The backend of `url`.
    pub fn of(url: &StoreUrl) -> Option<Self> {
        Self::parse(url.backend())
    }

    /// The URL of this backend's test server, from the environment (see
    /// [`env`](mod@crate::env)): `memory://`, `sqlite://` (a temporary directory), the
    /// PostgreSQL and Redis URLs, or the cluster's nodes; unavailable when
    /// the variable holds no valid URL or the cluster's is unset.
    pub fn url(self) -> Result<StoreUrl, Unavailable> {
        let parsed = |var: &str, url: String| {
            StoreUrl::parse(&url).map_err(|e| Unavailable(format!("{var}: {e}")))
        };
        match self {
            Self::Memory => Ok(StoreUrl::Memory),
            Self::Sqlite => Ok(StoreUrl::sqlite_temp()),
            Self::Postgres => parsed("IDEM_POSTGRES_URL", env::postgres_url()),
            Self::Redis => parsed("IDEM_REDIS_URL", env::redis_url()),
            Self::RedisCluster => {
                let urls = env::redis_cluster_urls()
                    .ok_or_else(|| Unavailable(env::CLUSTER_UNSET.to_string()))?;
                StoreUrl::redis_cluster(&urls)
                    .map_err(|e| Unavailable(format!("IDEM_REDIS_CLUSTER_URLS: {e}")))
            }
            Self::Valkey => {
                let url =
                    env::valkey_url().ok_or_else(|| Unavailable(env::VALKEY_UNSET.to_string()))?;
                parsed("IDEM_VALKEY_URL", url)
            }
        }
    }

    /// Why this backend's server cannot be used: `cause`, with the server
    /// and the variable that names it.
    pub(crate) fn unreachable(self, url: &StoreUrl, cause: &str) -> Unavailable {
        Unavailable(match self {
            Self::Memory | Self::Sqlite => format!("{self} store at {url}: {cause}"),
            Self::Postgres => {
                format!("PostgreSQL not reachable at {url} (set IDEM_POSTGRES_URL): {cause}")
            }
            Self::Redis => format!("Redis not reachable at {url} (set IDEM_REDIS_URL): {cause}"),
            Self::RedisCluster => format!(
                "Redis Cluster not reachable at {url} (set IDEM_REDIS_CLUSTER_URLS; `cargo xtask test` starts a throwaway cluster): {cause}"
            ),
            Self::Valkey => format!(
                "Valkey not reachable at {url} (set IDEM_VALKEY_URL; `cargo xtask test` starts a throwaway server): {cause}"
            ),
        })
    }

    /// Checks once, within a few seconds, that the backend's server answers,
    /// or says why not (which server, which variable).
    ///
    /// # Behavior
    /// Memory and SQLite always answer. PostgreSQL: one connection.
    /// Redis and the cluster: a store connects (every node of a cluster) and
    /// answers `PING`; nothing is written.
    pub async fn probe(self) -> Result<(), Unavailable> {
        const LIMIT: Duration = Duration::from_secs(3);
        let url = self.url()?;
        match (self, &url) {
            (Self::Memory | Self::Sqlite, _) => Ok(()),
            (Self::Postgres, StoreUrl::Postgres(pg)) => {
                crate::postgres::connect(&pg.connection_url(), LIMIT)
                    .await
                    .map(drop)
                    .map_err(|cause| self.unreachable(&url, &cause))
            }
            (_, StoreUrl::Redis(r)) => {
                let mut r = r.clone();
                r.connection_timeout
                    .get_or_insert(Duration::from_millis(500));
                r.response_timeout.get_or_insert(LIMIT);
                r.reconnect_attempts.get_or_insert(1);
                let opened = StoreUrl::Redis(r)
                    .open()
                    .await
                    .map_err(|e| self.unreachable(&url, &cause(&e)))?;
                match opened.store().as_redis() {
                    Some(store) => store
                        .ping()
                        .await
                        .map_err(|e| self.unreachable(&url, &e.to_string())),
                    None => Ok(()),
                }
            }
            _ => Err(self.unreachable(&url, "not a URL of this backend")),
        }
    }
}

/// What went wrong opening a store, once (the errors' `Display` already
/// includes their sources).
pub(crate) fn cause(e: &idemkit::OpenError) -> String {
    match e {
        idemkit::OpenError::Open { source, .. } => source.to_string(),
        other => other.to_string(),
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
