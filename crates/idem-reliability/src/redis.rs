//! Redis fixtures: stores under key prefixes of their own (standalone and
//! cluster), stores behind a fault proxy, raw admin connections, and the
//! clean-up of every key this process wrote.
//!
//! Servers: `IDEM_REDIS_URL` (default [`DEFAULT_URL`]) and
//! `IDEM_REDIS_CLUSTER_URLS` (comma-separated node URLs; unset: the cluster
//! is unavailable, `cargo xtask test` starts a throwaway one). Every store
//! gets the prefix `idem-rel:<pid>_<random>:<n>:`; the harness deletes the
//! keys under `idem-rel:<pid>_<random>:` at the end of the run (`SCAN` +
//! `UNLINK` on every master, never `FLUSHDB`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use ::redis::aio::MultiplexedConnection;
use ::redis::cluster_async::ClusterConnection;
use ::redis::{Cmd, FromRedisValue, RedisResult};
use idem_faults::FaultProxy;
use idem_redis::{RedisConfig, RedisStore};

/// The local server, when `IDEM_REDIS_URL` is unset.
pub const DEFAULT_URL: &str = "redis://127.0.0.1:6379";

static NEXT: AtomicU64 = AtomicU64::new(0);
static USED_STANDALONE: AtomicBool = AtomicBool::new(false);
static USED_CLUSTER: AtomicBool = AtomicBool::new(false);

/// The standalone server's URL for this run.
pub fn url() -> String {
    std::env::var("IDEM_REDIS_URL")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_URL.to_string())
}

/// The cluster's seed node URLs, if `IDEM_REDIS_CLUSTER_URLS` is set.
pub fn cluster_urls() -> Option<Vec<String>> {
    let urls: Vec<String> = std::env::var("IDEM_REDIS_CLUSTER_URLS")
        .ok()?
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    (!urls.is_empty()).then_some(urls)
}

/// Every key of this process starts with this.
pub fn run_prefix() -> String {
    format!("idem-rel:{}:", crate::run_id())
}

/// A key prefix no other store of this run uses.
pub fn fresh_prefix() -> String {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{}{n}:", run_prefix())
}

/// The configuration of test stores: `prefix`, short connection timeout so
/// that a missing server is reported quickly, a generous response timeout
/// (2 shared cores).
pub fn config(prefix: &str) -> RedisConfig {
    RedisConfig::new()
        .with_prefix(prefix)
        .with_connection_timeout(Duration::from_millis(500))
        .with_response_timeout(Duration::from_secs(5))
        .with_reconnect_attempts(2)
}

/// Connects to the standalone server once, or says why it cannot be used.
pub async fn probe() -> Result<(), String> {
    let store = RedisStore::connect(&url(), config(&fresh_prefix()))
        .await
        .map_err(|e| {
            format!(
                "Redis not reachable at {} (set IDEM_REDIS_URL): {}",
                url(),
                crate::chain(&e)
            )
        })?;
    store.ping().await.map_err(|e| crate::chain(&e))
}

/// Connects to the cluster once, or says why it cannot be used.
pub async fn probe_cluster() -> Result<(), String> {
    let Some(urls) = cluster_urls() else {
        return Err("IDEM_REDIS_CLUSTER_URLS is not set: run `cargo xtask test`, which starts a throwaway 3-master Redis Cluster, or set it to the nodes of one (redis://127.0.0.1:7000,redis://127.0.0.1:7001,...)".to_string());
    };
    let store = RedisStore::connect_cluster(&urls, config(&fresh_prefix()))
        .await
        .map_err(|e| {
            format!(
                "Redis Cluster not reachable at {} (set IDEM_REDIS_CLUSTER_URLS): {}",
                urls.join(","),
                crate::chain(&e)
            )
        })?;
    store.ping().await.map_err(|e| crate::chain(&e))
}

/// A store on the standalone server under a fresh prefix.
pub async fn store() -> RedisStore {
    store_with_prefix(&fresh_prefix()).await
}

/// A store on the standalone server under `prefix` (a second instance of
/// the store that uses it: its own connection, the same records).
pub async fn store_with_prefix(prefix: &str) -> RedisStore {
    USED_STANDALONE.store(true, Ordering::SeqCst);
    RedisStore::connect(&url(), config(prefix))
        .await
        .unwrap_or_else(|e| panic!("connect to Redis at {}: {}", url(), crate::chain(&e)))
}

/// A store on the cluster under a fresh prefix.
pub async fn cluster_store() -> RedisStore {
    cluster_store_with_prefix(&fresh_prefix()).await
}

/// A store on the cluster under `prefix`.
pub async fn cluster_store_with_prefix(prefix: &str) -> RedisStore {
    USED_CLUSTER.store(true, Ordering::SeqCst);
    let urls = cluster_urls().expect("IDEM_REDIS_CLUSTER_URLS");
    RedisStore::connect_cluster(&urls, config(prefix))
        .await
        .unwrap_or_else(|e| panic!("connect to the Redis Cluster: {}", crate::chain(&e)))
}

/// The standalone server's socket address.
pub async fn server_addr() -> SocketAddr {
    let url = url();
    let host_port = url
        .split("://")
        .nth(1)
        .and_then(|rest| rest.rsplit('@').next())
        .and_then(|rest| rest.split('/').next())
        .unwrap_or("127.0.0.1:6379")
        .to_string();
    tokio::net::lookup_host(host_port)
        .await
        .expect("resolve the Redis server")
        .next()
        .expect("an address for the Redis server")
}

/// A [`FaultProxy`] in front of the standalone server.
pub async fn proxy() -> FaultProxy {
    FaultProxy::start(server_addr().await)
        .await
        .expect("start the fault proxy")
}

/// A store under `prefix` whose connection goes through `proxy`, with
/// connection and response timeouts of `timeout` and one reconnect attempt.
pub async fn store_via(proxy: &FaultProxy, prefix: &str, timeout: Duration) -> RedisStore {
    USED_STANDALONE.store(true, Ordering::SeqCst);
    let config = config(prefix)
        .with_connection_timeout(timeout)
        .with_response_timeout(timeout)
        .with_reconnect_attempts(1);
    RedisStore::connect(&format!("redis://{}", proxy.addr()), config)
        .await
        .unwrap_or_else(|e| panic!("connect through the proxy: {}", crate::chain(&e)))
}

/// A plain connection to one node.
pub async fn node(url: &str) -> RedisResult<MultiplexedConnection> {
    ::redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await
}

/// A raw connection that sends each command to the node owning its key:
/// for writing and reading values behind the store's back.
pub enum Admin {
    /// The standalone server.
    Single(MultiplexedConnection),
    /// The cluster client.
    Cluster(ClusterConnection),
}

impl Admin {
    /// A raw connection to the standalone server.
    pub async fn standalone() -> Self {
        Self::Single(node(&url()).await.expect("an admin connection to Redis"))
    }

    /// A raw connection to the cluster.
    pub async fn cluster() -> Self {
        let client = ::redis::cluster::ClusterClient::new(cluster_urls().unwrap_or_default())
            .expect("a cluster client");
        Self::Cluster(
            client
                .get_async_connection()
                .await
                .expect("an admin connection to the cluster"),
        )
    }

    /// Sends `cmd` and converts the reply.
    pub async fn query<T: FromRedisValue>(&mut self, cmd: &Cmd) -> RedisResult<T> {
        match self {
            Self::Single(c) => cmd.query_async(c).await,
            Self::Cluster(c) => cmd.query_async(c).await,
        }
    }
}

/// The URLs of the cluster's masters.
async fn masters() -> RedisResult<Vec<String>> {
    let seed = cluster_urls()
        .and_then(|urls| urls.into_iter().next())
        .ok_or_else(|| ::redis::RedisError::from((::redis::ErrorKind::Client, "no cluster URL")))?;
    let mut conn = node(&seed).await?;
    let nodes: String = ::redis::cmd("CLUSTER")
        .arg("NODES")
        .query_async(&mut conn)
        .await?;
    Ok(nodes
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let flags = fields.get(2)?;
            let master = flags.split(',').any(|f| f == "master");
            let addr = fields.get(1)?.split('@').next()?;
            master.then(|| format!("redis://{addr}"))
        })
        .collect())
}

/// Unlinks every key under `prefix` on one node; returns how many.
async fn unlink_prefix(conn: &mut MultiplexedConnection, prefix: &str) -> RedisResult<usize> {
    let mut deleted = 0;
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<Vec<u8>>) = ::redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await?;
        if !keys.is_empty() {
            // One key per command: a cluster node refuses a multi-key
            // UNLINK whose keys hash to different slots (CROSSSLOT).
            let mut pipe = ::redis::pipe();
            for key in &keys {
                pipe.cmd("UNLINK").arg(key);
            }
            let counts: Vec<usize> = pipe.query_async(conn).await?;
            deleted += counts.iter().sum::<usize>();
        }
        if next == 0 {
            return Ok(deleted);
        }
        cursor = next;
    }
}

/// Deletes every key of this run (standalone and cluster, where used).
/// Called by the harness at the end of the run.
pub(crate) async fn cleanup() -> Result<usize, String> {
    let prefix = run_prefix();
    let mut deleted = 0;
    if USED_STANDALONE.load(Ordering::SeqCst) {
        let mut conn = node(&url()).await.map_err(|e| e.to_string())?;
        deleted += unlink_prefix(&mut conn, &prefix)
            .await
            .map_err(|e| e.to_string())?;
    }
    if USED_CLUSTER.load(Ordering::SeqCst) {
        for master in masters().await.map_err(|e| e.to_string())? {
            let mut conn = node(&master).await.map_err(|e| e.to_string())?;
            deleted += unlink_prefix(&mut conn, &prefix)
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(deleted)
}
