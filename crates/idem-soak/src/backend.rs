//! The soaked backends: each opened isolated (its own temp file, schema or
//! key prefix), counted (how many records the store holds) and cleaned up
//! after the run.

use std::str::FromStr as _;
use std::sync::Arc;
use std::time::Duration;

use idem_core::{MemoryStore, Store};
use idem_postgres::sqlx::postgres::{PgConnectOptions, PgPool};
use idem_postgres::sqlx::{self, AssertSqlSafe, Connection as _};
use idem_postgres::{PostgresStore, TableName};
use idem_redis::{RedisConfig, RedisStore};
use serde::{Deserialize, Serialize};

use crate::SoakError;

/// A backend the soak can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum BackendKind {
    /// `idem_core::MemoryStore`, in the soak process.
    Memory,
    /// `idem-sqlite` on a temporary file (WAL, `synchronous=FULL`).
    Sqlite,
    /// `idem-postgres` in a schema of its own (`IDEM_POSTGRES_URL`).
    Postgres,
    /// `idem-redis` under a key prefix of its own (`IDEM_REDIS_URL`).
    Redis,
    /// `idem-redis` on a Redis Cluster (`IDEM_REDIS_CLUSTER_URLS`), under a
    /// key prefix of its own.
    RedisCluster,
}

impl BackendKind {
    /// The name in the report and on the command line.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
            Self::Redis => "redis",
            Self::RedisCluster => "redis-cluster",
        }
    }

    /// The longest engine TTL of a soak of this backend.
    ///
    /// # Behavior
    /// 5 s for the memory store, 30 s for the others. The memory store lives
    /// in the soak process, so its records count in the RSS the soak checks,
    /// and its memory grows in steps (hash-table doubling, allocator arenas):
    /// with the 24 s TTL of a 120 s run (~150k records) a one-time step of
    /// ~45 MiB came at 40 s in one run and at the very end in another. A
    /// short TTL keeps the store, and its steps, small (~23 MiB measured),
    /// so the RSS check watches the layer and the engine rather than the
    /// table's size.
    pub(crate) fn max_ttl(self) -> Duration {
        match self {
            Self::Memory => Duration::from_secs(5),
            _ => Duration::from_secs(30),
        }
    }

    /// The backends soaked when `--backends` is not given: memory, sqlite,
    /// postgres, redis, and redis-cluster when `IDEM_REDIS_CLUSTER_URLS` is
    /// set or every backend is `required` (it then fails when unset, as the
    /// cluster test suites do).
    pub(crate) fn defaults(required: bool) -> Vec<Self> {
        let mut kinds = vec![Self::Memory, Self::Sqlite, Self::Postgres, Self::Redis];
        if required || cluster_urls().is_some() {
            kinds.push(Self::RedisCluster);
        }
        kinds
    }
}

/// How long a connection attempt may take before the backend counts as
/// unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Connections of the PostgreSQL pool.
const PG_POOL: u32 = 16;

fn postgres_url() -> String {
    env_or(
        "IDEM_POSTGRES_URL",
        "postgres://postgres@127.0.0.1:5432/test",
    )
}

fn redis_url() -> String {
    env_or("IDEM_REDIS_URL", "redis://127.0.0.1:6379")
}

/// The cluster's seed nodes, from `IDEM_REDIS_CLUSTER_URLS` (comma-separated).
pub(crate) fn cluster_urls() -> Option<Vec<String>> {
    let urls: Vec<String> = std::env::var("IDEM_REDIS_CLUSTER_URLS")
        .ok()?
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    (!urls.is_empty()).then_some(urls)
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| default.to_string())
}

/// A tag unique to this process: pid and a random number.
pub(crate) fn run_tag() -> String {
    use std::hash::BuildHasher as _;
    let random = std::collections::hash_map::RandomState::new()
        .hash_one((std::process::id(), std::time::SystemTime::now()));
    format!("{}_{:08x}", std::process::id(), random & 0xffff_ffff)
}

/// What to remove after the run.
enum Cleanup {
    Nothing,
    Dir(tempfile::TempDir),
    Schema {
        pool: PgPool,
        schema: String,
    },
    Prefix {
        client: redis::Client,
        prefix: String,
    },
    ClusterPrefix {
        masters: Vec<String>,
        prefix: String,
    },
}

/// How to count the records a store holds (live and expired-but-kept).
enum Census {
    Memory(MemoryStore),
    Sqlite(idem_sqlite::SqliteStore),
    Postgres {
        pool: PgPool,
        table: TableName,
    },
    Redis {
        client: redis::Client,
        prefix: String,
    },
    Cluster {
        masters: Vec<String>,
        prefix: String,
    },
}

/// An isolated store of one backend.
pub(crate) struct Opened {
    /// The store.
    pub(crate) store: Arc<dyn Store>,
    /// What the report should say about the setup.
    pub(crate) notes: Vec<String>,
    /// How long after its logical expiry a record may still be held: the
    /// purge interval for the stores the soak purges, the expiry grace (plus
    /// Redis's own expiry lag) for Redis.
    pub(crate) expiry_lag: Duration,
    census: Census,
    cleanup: Cleanup,
}

fn setup(what: &str, e: impl std::error::Error + Send + Sync + 'static) -> SoakError {
    SoakError::Setup {
        what: what.to_string(),
        source: Box::new(e),
    }
}

/// Opens an isolated store of `kind`; [`SoakError::Unreachable`] if its
/// server cannot be reached.
pub(crate) async fn open(kind: BackendKind, tag: &str) -> Result<Opened, SoakError> {
    match kind {
        BackendKind::Memory => {
            let store = MemoryStore::new();
            Ok(Opened {
                store: Arc::new(store.clone()),
                notes: vec!["records held in the soak process itself".into()],
                expiry_lag: PURGE_LAG,
                census: Census::Memory(store),
                cleanup: Cleanup::Nothing,
            })
        }
        BackendKind::Sqlite => {
            let dir = tempfile::Builder::new()
                .prefix("idem-soak-")
                .tempdir()
                .map_err(|e| setup("temp dir", e))?;
            let path = dir.path().join("soak.db");
            let store =
                idem_sqlite::SqliteStore::open(&path).map_err(|e| setup("sqlite open", e))?;
            Ok(Opened {
                store: Arc::new(store.clone()),
                notes: vec![format!(
                    "temp file {} (WAL, synchronous=FULL, group commit)",
                    path.display()
                )],
                expiry_lag: PURGE_LAG,
                census: Census::Sqlite(store),
                cleanup: Cleanup::Dir(dir),
            })
        }
        BackendKind::Postgres => open_postgres(tag).await,
        BackendKind::Redis => open_redis(tag).await,
        BackendKind::RedisCluster => open_redis_cluster(tag).await,
    }
}

/// How long an expired record may outlive its expiry where the soak purges:
/// the purge runs every second.
const PURGE_LAG: Duration = Duration::from_secs(2);

/// Redis's physical expiry lag after the logical one: the grace the soak
/// configures, plus a second for Redis's active expiry cycle.
const REDIS_GRACE: Duration = Duration::from_secs(2);

async fn open_postgres(tag: &str) -> Result<Opened, SoakError> {
    let url = postgres_url();
    let unreachable = |reason: String| SoakError::Unreachable {
        backend: "postgres",
        reason: format!("{url}: {reason} (set IDEM_POSTGRES_URL)"),
    };
    let options = PgConnectOptions::from_str(&url)
        .map_err(|e| unreachable(e.to_string()))?
        .application_name("idem-soak");
    // One direct connection first: it reports the real cause (refused, bad
    // role), where a pool would only time out.
    match tokio::time::timeout(CONNECT_TIMEOUT, sqlx::PgConnection::connect_with(&options)).await {
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
        }
        Ok(Err(e)) => return Err(unreachable(e.to_string())),
        Err(_) => return Err(unreachable(format!("no answer within {CONNECT_TIMEOUT:?}"))),
    }
    let pool = PostgresStore::pool_options()
        .max_connections(PG_POOL)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(options)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let schema = format!("idem_soak_{tag}");
    let table = TableName::new(schema.clone(), "records").map_err(|e| setup("table name", e))?;
    let store = PostgresStore::with_table(pool.clone(), table.clone());
    let opened = Opened {
        store: Arc::new(store.clone()),
        notes: vec![format!(
            "schema {schema} (dropped afterwards), pool of {PG_POOL} connections, {url}"
        )],
        expiry_lag: PURGE_LAG,
        census: Census::Postgres {
            pool: pool.clone(),
            table,
        },
        cleanup: Cleanup::Schema { pool, schema },
    };
    if let Err(e) = store.migrate().await {
        opened.close().await.ok();
        return Err(setup("postgres migrate", e));
    }
    Ok(opened)
}

async fn open_redis(tag: &str) -> Result<Opened, SoakError> {
    let url = redis_url();
    let prefix = format!("idem-soak:{tag}:");
    let client = redis::Client::open(url.as_str()).map_err(|e| SoakError::Unreachable {
        backend: "redis",
        reason: format!("{url}: {e} (set IDEM_REDIS_URL)"),
    })?;
    // Redis drops a record this long after it expired logically: short, so
    // that the server's memory follows the soak's TTL.
    let config = RedisConfig::new()
        .with_prefix(prefix.clone())
        .with_expiry_grace(REDIS_GRACE);
    let store = match RedisStore::with_client(client.clone(), config).await {
        Ok(store) => store,
        Err(e) if e.is_transient() => {
            return Err(SoakError::Unreachable {
                backend: "redis",
                reason: format!("{url}: {} (set IDEM_REDIS_URL)", chain(&e)),
            });
        }
        Err(e) => return Err(setup("redis connect", e)),
    };
    Ok(Opened {
        store: Arc::new(store),
        notes: vec![format!(
            "key prefix {prefix} (keys removed afterwards), expiry grace {} s, {url}",
            REDIS_GRACE.as_secs()
        )],
        expiry_lag: REDIS_GRACE + Duration::from_secs(1),
        census: Census::Redis {
            client: client.clone(),
            prefix: prefix.clone(),
        },
        cleanup: Cleanup::Prefix { client, prefix },
    })
}

async fn open_redis_cluster(tag: &str) -> Result<Opened, SoakError> {
    let Some(urls) = cluster_urls() else {
        return Err(SoakError::Unreachable {
            backend: "redis-cluster",
            reason: "IDEM_REDIS_CLUSTER_URLS is not set (the nodes of a Redis Cluster, \
                     comma-separated)"
                .into(),
        });
    };
    let unreachable = |reason: String| SoakError::Unreachable {
        backend: "redis-cluster",
        reason: format!("{}: {reason} (set IDEM_REDIS_CLUSTER_URLS)", urls.join(",")),
    };
    let masters = masters(&urls).await.map_err(|e| unreachable(chain(&e)))?;
    if masters.is_empty() {
        return Err(unreachable("CLUSTER NODES lists no master".into()));
    }
    let prefix = format!("idem-soak:{tag}:");
    let config = RedisConfig::new()
        .with_prefix(prefix.clone())
        .with_expiry_grace(REDIS_GRACE);
    let store = match RedisStore::connect_cluster(&urls, config).await {
        Ok(store) => store,
        Err(e) if e.is_transient() => return Err(unreachable(chain(&e))),
        Err(e) => return Err(setup("redis cluster connect", e)),
    };
    Ok(Opened {
        store: Arc::new(store),
        notes: vec![format!(
            "key prefix {prefix} (keys removed afterwards), expiry grace {} s, {} masters: {}",
            REDIS_GRACE.as_secs(),
            masters.len(),
            masters.join(",")
        )],
        expiry_lag: REDIS_GRACE + Duration::from_secs(1),
        census: Census::Cluster {
            masters: masters.clone(),
            prefix: prefix.clone(),
        },
        cleanup: Cleanup::ClusterPrefix { masters, prefix },
    })
}

/// The URLs of the cluster's masters, from `CLUSTER NODES` of the first
/// seed that answers.
async fn masters(seeds: &[String]) -> Result<Vec<String>, redis::RedisError> {
    let mut last = None;
    for seed in seeds {
        let listed = async {
            let client = redis::Client::open(seed.as_str())?;
            let mut conn =
                tokio::time::timeout(CONNECT_TIMEOUT, client.get_multiplexed_async_connection())
                    .await
                    .map_err(|_| {
                        redis::RedisError::from((redis::ErrorKind::Io, "connection timed out"))
                    })??;
            redis::cmd("CLUSTER")
                .arg("NODES")
                .query_async::<String>(&mut conn)
                .await
        }
        .await;
        match listed {
            Ok(nodes) => return Ok(parse_masters(&nodes)),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| redis::RedisError::from((redis::ErrorKind::Client, "no seed node"))))
}

/// The masters' `redis://host:port` URLs in a `CLUSTER NODES` listing.
fn parse_masters(nodes: &str) -> Vec<String> {
    nodes
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let flags = fields.get(2)?;
            let master = flags.split(',').any(|f| f == "master")
                && !flags.split(',').any(|f| f == "fail" || f == "noaddr");
            let addr = fields.get(1)?.split('@').next()?;
            master.then(|| format!("redis://{addr}"))
        })
        .collect()
}

impl Opened {
    /// Removes everything the run created (temp file, schema, keys).
    pub(crate) async fn close(self) -> Result<(), SoakError> {
        drop(self.store);
        match self.cleanup {
            Cleanup::Nothing => Ok(()),
            Cleanup::Dir(dir) => dir.close().map_err(|e| setup("temp dir removal", e)),
            Cleanup::Schema { pool, schema } => {
                let sql = format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE");
                let done = sqlx::query(AssertSqlSafe(sql)).execute(&pool).await;
                pool.close().await;
                done.map(drop).map_err(|e| setup("postgres drop schema", e))
            }
            Cleanup::Prefix { client, prefix } => unlink_prefix(&client, &prefix)
                .await
                .map_err(|e| setup("redis cleanup", e)),
            Cleanup::ClusterPrefix { masters, prefix } => {
                for master in &masters {
                    let client = redis::Client::open(master.as_str())
                        .map_err(|e| setup("redis cleanup", e))?;
                    unlink_prefix(&client, &prefix)
                        .await
                        .map_err(|e| setup("redis cluster cleanup", e))?;
                }
                Ok(())
            }
        }
    }

    /// How many records the store holds now, expired ones not yet removed
    /// included (Redis: the keys under the prefix that Redis has not expired).
    pub(crate) async fn records(&self) -> Result<u64, SoakError> {
        match &self.census {
            Census::Memory(store) => Ok(store.len() as u64),
            Census::Sqlite(store) => {
                let sql = format!("SELECT COUNT(*) FROM \"{}\"", store.table());
                store
                    .transaction(move |tx| -> Result<i64, idem_sqlite::SqliteError> {
                        Ok(tx.query_row(&sql, [], |row| row.get(0))?)
                    })
                    .await
                    .map(|n| n.max(0) as u64)
                    .map_err(|e| setup("sqlite count", e))
            }
            Census::Postgres { pool, table } => {
                let sql = format!("SELECT COUNT(*) FROM {table}");
                sqlx::query_scalar::<_, i64>(AssertSqlSafe(sql))
                    .fetch_one(pool)
                    .await
                    .map(|n| n.max(0) as u64)
                    .map_err(|e| setup("postgres count", e))
            }
            Census::Redis { client, prefix } => count_prefix(client, prefix)
                .await
                .map_err(|e| setup("redis count", e)),
            Census::Cluster { masters, prefix } => {
                let mut total = 0;
                for master in masters {
                    let client = redis::Client::open(master.as_str())
                        .map_err(|e| setup("redis count", e))?;
                    total += count_prefix(&client, prefix)
                        .await
                        .map_err(|e| setup("redis cluster count", e))?;
                }
                Ok(total)
            }
        }
    }
}

/// One `SCAN` page of the keys matching `pattern`: the next cursor (0 at the
/// end) and the keys.
async fn scan_page(
    conn: &mut redis::aio::MultiplexedConnection,
    pattern: &str,
    cursor: u64,
) -> Result<(u64, Vec<Vec<u8>>), redis::RedisError> {
    redis::cmd("SCAN")
        .arg(cursor)
        .arg("MATCH")
        .arg(pattern)
        .arg("COUNT")
        .arg(1000)
        .query_async(conn)
        .await
}

/// Counts the keys under `prefix` on one server (SCAN skips keys Redis has
/// already expired).
async fn count_prefix(client: &redis::Client, prefix: &str) -> Result<u64, redis::RedisError> {
    let mut conn = client.get_multiplexed_async_connection().await?;
    let pattern = format!("{prefix}*");
    let mut cursor: u64 = 0;
    let mut total = 0u64;
    loop {
        let (next, keys) = scan_page(&mut conn, &pattern, cursor).await?;
        total += keys.len() as u64;
        if next == 0 {
            return Ok(total);
        }
        cursor = next;
    }
}

/// Deletes every key under `prefix` on one server (SCAN + UNLINK; the prefix
/// holds no glob characters). One UNLINK per key, pipelined: on a cluster
/// node the keys of one SCAN page lie in many slots, which a multi-key
/// UNLINK refuses (CROSSSLOT).
async fn unlink_prefix(client: &redis::Client, prefix: &str) -> Result<(), redis::RedisError> {
    let mut conn = client.get_multiplexed_async_connection().await?;
    let pattern = format!("{prefix}*");
    let mut cursor: u64 = 0;
    loop {
        let (next, keys) = scan_page(&mut conn, &pattern, cursor).await?;
        if !keys.is_empty() {
            let mut pipe = redis::pipe();
            for key in &keys {
                pipe.cmd("UNLINK").arg(key).ignore();
            }
            pipe.query_async::<()>(&mut conn).await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

/// An error and its sources, on one line.
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(source) = next {
        out.push_str(": ");
        out.push_str(&source.to_string());
        next = source.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masters_come_from_cluster_nodes() {
        let nodes = "\
a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7001@17001 master - 0 1 2 connected 5461-10922
c3 127.0.0.1:7002@17002 slave b2 0 1 2 connected
d4 127.0.0.1:7003@17003 master,fail - 0 1 3 disconnected
e5 127.0.0.1:7004@17004 master - 0 1 4 connected 10923-16383
";
        assert_eq!(
            parse_masters(nodes),
            [
                "redis://127.0.0.1:7000",
                "redis://127.0.0.1:7001",
                "redis://127.0.0.1:7004"
            ]
        );
        assert!(parse_masters("").is_empty());
    }

    #[test]
    fn names_match_the_command_line() {
        use clap::ValueEnum as _;
        for kind in BackendKind::value_variants() {
            let parsed = BackendKind::from_str(kind.name(), false);
            assert_eq!(parsed, Ok(*kind));
        }
        assert_eq!(
            BackendKind::defaults(true).last(),
            Some(&BackendKind::RedisCluster)
        );
        assert!(BackendKind::defaults(false).starts_with(&[
            BackendKind::Memory,
            BackendKind::Sqlite,
            BackendKind::Postgres,
            BackendKind::Redis
        ]));
    }
}
