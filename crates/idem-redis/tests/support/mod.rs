//! Shared by the Redis test targets: a [`StoreFactory`] over a real server or
//! cluster, admin connections, and the Redis-specific cases.
#![allow(dead_code, unreachable_pub)]

pub mod cases;

use std::collections::BTreeMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use idem_conformance::{StoreFactory, Unavailable};
use idem_core::RecordKey;
use idem_redis::{RedisConfig, RedisStore};
use redis::aio::MultiplexedConnection;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, RedisResult};

/// The local server, when `IDEM_REDIS_URL` is unset.
pub const DEFAULT_URL: &str = "redis://127.0.0.1:6379";

/// Where the tests' Redis is.
#[derive(Clone, Debug)]
pub enum Target {
    /// One server.
    Standalone(String),
    /// A cluster (seed node URLs), or `None` when `IDEM_REDIS_CLUSTER_URLS` is unset.
    Cluster(Option<Vec<String>>),
}

impl Target {
    pub fn standalone_from_env() -> Self {
        Self::Standalone(
            std::env::var("IDEM_REDIS_URL")
                .ok()
                .filter(|v| !v.trim().is_empty())
                .unwrap_or_else(|| DEFAULT_URL.to_string()),
        )
    }

    pub fn cluster_from_env() -> Self {
        Self::Cluster(std::env::var("IDEM_REDIS_CLUSTER_URLS").ok().and_then(|v| {
            let urls: Vec<String> = v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect();
            (!urls.is_empty()).then_some(urls)
        }))
    }
}

/// Stores with a unique key prefix each, over the target.
pub struct Factory {
    target: Target,
    run_prefix: String,
    counter: AtomicU64,
}

/// Error and its sources, on one line.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(source) = next {
        out.push_str(": ");
        out.push_str(&source.to_string());
        next = source.source();
    }
    out
}

impl Factory {
    pub fn new(target: Target) -> Self {
        let random = std::collections::hash_map::RandomState::new()
            .hash_one((std::process::id(), std::time::SystemTime::now()));
        Self {
            target,
            run_prefix: format!("idem-test:{}:{:08x}:", std::process::id(), random as u32),
            counter: AtomicU64::new(0),
        }
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self.target, Target::Cluster(_))
    }

    /// Every key of this test process starts with this.
    pub fn run_prefix(&self) -> &str {
        &self.run_prefix
    }

    /// A prefix no other store of this run uses.
    pub fn fresh_prefix(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        format!("{}{n}:", self.run_prefix)
    }

    /// The configuration of test stores: short timeouts, so that a missing
    /// server is reported quickly.
    pub fn config(&self, prefix: &str) -> RedisConfig {
        RedisConfig::new()
            .with_prefix(prefix)
            .with_connection_timeout(Duration::from_millis(500))
            .with_response_timeout(Duration::from_secs(5))
            .with_reconnect_attempts(2)
    }

    fn unreachable(&self, why: String) -> Unavailable {
        Unavailable(match &self.target {
            Target::Standalone(url) => {
                format!("Redis not reachable at {url} (set IDEM_REDIS_URL): {why}")
            }
            Target::Cluster(Some(urls)) => format!(
                "Redis Cluster not reachable at {} (set IDEM_REDIS_CLUSTER_URLS; `cargo xtask test` starts a throwaway cluster): {why}",
                urls.join(",")
            ),
            Target::Cluster(None) => "IDEM_REDIS_CLUSTER_URLS is not set: run `cargo xtask test`, which starts a throwaway 3-master Redis Cluster, or set it to the nodes of one (redis://127.0.0.1:7000,redis://127.0.0.1:7001,...)".to_string(),
        })
    }

    /// A store over the target with `config`.
    pub async fn connect(&self, config: RedisConfig) -> Result<RedisStore, Unavailable> {
        let result = match &self.target {
            Target::Standalone(url) => RedisStore::connect(url, config).await,
            Target::Cluster(Some(urls)) => RedisStore::connect_cluster(urls, config).await,
            Target::Cluster(None) => return Err(self.unreachable(String::new())),
        };
        result.map_err(|e| self.unreachable(chain(&e)))
    }

    /// The URL of the standalone server (panics for a cluster).
    pub fn url(&self) -> &str {
        match &self.target {
            Target::Standalone(url) => url,
            Target::Cluster(_) => panic!("not a standalone target"),
        }
    }

    /// The URLs of every master: the server itself, or the cluster's masters.
    pub async fn masters(&self) -> RedisResult<Vec<String>> {
        match &self.target {
            Target::Standalone(url) => Ok(vec![url.clone()]),
            Target::Cluster(urls) => {
                let seed = urls.as_ref().and_then(|u| u.first()).ok_or_else(|| {
                    redis::RedisError::from((redis::ErrorKind::Client, "no cluster URL"))
                })?;
                let mut conn = node(seed).await?;
                let nodes: String = redis::cmd("CLUSTER")
                    .arg("NODES")
                    .query_async(&mut conn)
                    .await?;
                let mut masters: Vec<String> = nodes
                    .lines()
                    .filter_map(|line| {
                        let fields: Vec<&str> = line.split_whitespace().collect();
                        let flags = fields.get(2)?;
                        let is_master = flags.split(',').any(|f| f == "master")
                            && !flags.split(',').any(|f| f == "fail" || f == "fail?");
                        let addr = fields.get(1)?.split('@').next()?;
                        is_master.then(|| format!("redis://{addr}"))
                    })
                    .collect();
                masters.sort();
                Ok(masters)
            }
        }
    }

    /// A connection that routes by key (the cluster client for a cluster).
    pub async fn keyed(&self) -> RedisResult<Keyed> {
        match &self.target {
            Target::Standalone(url) => Ok(Keyed::Single(node(url).await?)),
            Target::Cluster(urls) => {
                let client = redis::cluster::ClusterClient::new(urls.clone().unwrap_or_default())?;
                Ok(Keyed::Cluster(client.get_async_connection().await?))
            }
        }
    }

    /// How many keys with `prefix` each master holds.
    pub async fn keys_per_master(&self, prefix: &str) -> RedisResult<BTreeMap<String, usize>> {
        let mut out = BTreeMap::new();
        for master in self.masters().await? {
            let mut conn = node(&master).await?;
            out.insert(master, scan(&mut conn, prefix).await?.len());
        }
        Ok(out)
    }

    /// Deletes every key of this run, on every master (never FLUSHDB).
    pub async fn cleanup(&self) -> RedisResult<usize> {
        let mut deleted = 0;
        for master in self.masters().await? {
            let mut conn = node(&master).await?;
            for batch in scan(&mut conn, &self.run_prefix).await?.chunks(500) {
                let n: usize = redis::cmd("UNLINK")
                    .arg(batch)
                    .query_async(&mut conn)
                    .await?;
                deleted += n;
            }
        }
        Ok(deleted)
    }
}

/// A plain connection to one node.
pub async fn node(url: &str) -> RedisResult<MultiplexedConnection> {
    redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await
}

/// The keys starting with `prefix` on one node (the prefix holds no glob characters).
pub async fn scan(conn: &mut MultiplexedConnection, prefix: &str) -> RedisResult<Vec<Vec<u8>>> {
    let mut keys = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, batch): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await?;
        keys.extend(batch);
        if next == 0 {
            return Ok(keys);
        }
        cursor = next;
    }
}

/// A connection that sends each command to the node owning its key.
pub enum Keyed {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl Keyed {
    pub async fn query<T: FromRedisValue>(&mut self, cmd: &Cmd) -> RedisResult<T> {
        match self {
            Self::Single(c) => cmd.query_async(c).await,
            Self::Cluster(c) => cmd.query_async(c).await,
        }
    }
}

#[async_trait]
impl StoreFactory for Factory {
    type Store = RedisStore;

    fn name(&self) -> &'static str {
        match self.target {
            Target::Standalone(_) => "redis",
            Target::Cluster(_) => "redis-cluster",
        }
    }

    async fn open(&self) -> Result<RedisStore, Unavailable> {
        self.connect(self.config(&self.fresh_prefix())).await
    }

    async fn reopen(&self, store: &RedisStore) -> Result<Option<RedisStore>, Unavailable> {
        self.connect(self.config(store.prefix())).await.map(Some)
    }

    fn can_corrupt(&self) -> bool {
        true
    }

    /// Keeps the 25-byte header and replaces the record bytes with ones of an
    /// unknown codec format tag, as a newer version of idem would write them.
    async fn corrupt(&self, store: &RedisStore, key: &RecordKey) -> Result<(), Unavailable> {
        let fail = |e: redis::RedisError| self.unreachable(e.to_string());
        let rk = store.redis_key(key);
        let mut conn = self.keyed().await.map_err(fail)?;
        let mut value: Vec<u8> = conn.query(redis::cmd("GET").arg(&rk)).await.map_err(fail)?;
        if value.len() < 25 {
            return Err(Unavailable(format!("no record to corrupt at {rk:?}")));
        }
        value.truncate(25);
        value.extend_from_slice(&[0xEE, 1, 2, 3, 4, 5]);
        let () = conn
            .query(redis::cmd("SET").arg(&rk).arg(value).arg("KEEPTTL"))
            .await
            .map_err(fail)?;
        Ok(())
    }
}

/// Runs `suite`, then deletes this run's keys (best effort; a missing server
/// has none).
pub fn run_and_clean_up(
    suite: idem_conformance::Suite<Factory>,
    target: Target,
    run_prefix: String,
) -> std::process::ExitCode {
    let code = suite.run();
    let cleaner = Factory {
        target,
        run_prefix,
        counter: AtomicU64::new(0),
    };
    if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        match rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(30), cleaner.cleanup()).await
        }) {
            Ok(Ok(n)) if n > 0 => eprintln!(
                "idem-redis tests: deleted {n} test keys under {}",
                cleaner.run_prefix
            ),
            Ok(Ok(_)) | Err(_) => {}
            Ok(Err(e)) => eprintln!("idem-redis tests: cleanup skipped: {e}"),
        }
    }
    code
}
