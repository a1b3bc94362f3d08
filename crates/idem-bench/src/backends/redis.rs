//! `idem-redis` on a standalone server or a cluster, against `SET NX PX` +
//! `SET XX PX` (and `GET`) on a connection of the same kind and settings.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use idem_core::{RecordKey, Store, StoreError};
use idem_redis::{RedisConfig, RedisStore};
use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;

use super::redis_raw::{RedisRaw, failed, memory_usage, scan_keys, unlink_prefix};
use crate::backend::{Backend, Instance, Raw};
use crate::{BenchError, Plan};

/// Where the servers are.
#[derive(Clone, Debug)]
pub(crate) enum Target {
    Standalone(String),
    Cluster(Vec<String>),
}

pub(crate) struct RedisBackend {
    pub(crate) target: Target,
}

/// The store's defaults (`RedisConfig::new()`): the raw connection gets the same.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(1);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);

fn unreachable(what: &str, e: impl std::fmt::Display) -> BenchError {
    BenchError::Unreachable(format!("{what}: {e}"))
}

fn store_error(what: &str, e: StoreError) -> BenchError {
    if e.is_transient() {
        unreachable(what, e)
    } else {
        BenchError::Failed(format!("{what}: {e}"))
    }
}

/// The raw baseline's connection: the kind the store uses.
#[derive(Clone)]
enum Conn {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
}

#[async_trait]
impl Backend for RedisBackend {
    fn name(&self) -> &'static str {
        match self.target {
            Target::Standalone(_) => "redis",
            Target::Cluster(_) => "redis-cluster",
        }
    }

    fn concurrencies(&self, plan: &Plan) -> Vec<usize> {
        plan.redis_concurrencies.clone()
    }

    async fn open(&self) -> Result<Box<dyn Instance>, BenchError> {
        let salt = std::hash::BuildHasher::hash_one(
            &std::collections::hash_map::RandomState::new(),
            std::process::id(),
        );
        // Short prefixes (13 bytes; the store's default is 5) so that the
        // bytes-per-record figure stays close to production's.
        let prefix = format!("ib{:08x}:", salt as u32);
        let store_prefix = format!("{prefix}i:");
        let raw_prefix = format!("{prefix}r:");
        let config = RedisConfig::new().with_prefix(store_prefix.clone());
        let (store, conn, nodes) = match &self.target {
            Target::Standalone(url) => {
                let client = redis::Client::open(url.as_str())
                    .map_err(|e| BenchError::Failed(format!("redis url {url}: {e}")))?;
                let store = RedisStore::with_client(client.clone(), config)
                    .await
                    .map_err(|e| store_error(url, e))?;
                let manager_config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CONNECTION_TIMEOUT))
                    .set_response_timeout(Some(RESPONSE_TIMEOUT))
                    .set_number_of_retries(3)
                    .set_min_delay(Duration::from_millis(50))
                    .set_max_delay(Duration::from_secs(1));
                let manager = ConnectionManager::new_with_config(client.clone(), manager_config)
                    .await
                    .map_err(|e| unreachable(url, e))?;
                let node = client
                    .get_multiplexed_async_connection()
                    .await
                    .map_err(|e| unreachable(url, e))?;
                (store, Conn::Standalone(manager), vec![node])
            }
            Target::Cluster(urls) => {
                if urls.is_empty() {
                    return Err(BenchError::Unreachable(
                        "no Redis Cluster: set IDEM_REDIS_CLUSTER_URLS (cargo xtask bench starts a throwaway one)".into(),
                    ));
                }
                let store = RedisStore::connect_cluster(urls, config)
                    .await
                    .map_err(|e| store_error(&urls.join(","), e))?;
                let client = ClusterClientBuilder::new(urls.clone())
                    .connection_timeout(CONNECTION_TIMEOUT)
                    .response_timeout(RESPONSE_TIMEOUT)
                    .build()
                    .map_err(|e| unreachable(&urls.join(","), e))?;
                let conn = client
                    .get_async_connection()
                    .await
                    .map_err(|e| unreachable(&urls.join(","), e))?;
                let nodes = masters(urls).await?;
                (store, Conn::Cluster(conn), nodes)
            }
        };
        Ok(Box::new(RedisInstance {
            store,
            conn,
            nodes,
            store_prefix,
            raw_prefix,
            prefix,
            salt,
            cloned: std::sync::atomic::AtomicU64::new(0),
        }))
    }
}

/// A connection to each master of the cluster (for SCAN, MEMORY USAGE, cleanup).
async fn masters(urls: &[String]) -> Result<Vec<MultiplexedConnection>, BenchError> {
    let first = urls.first().map(String::as_str).unwrap_or_default();
    let client = redis::Client::open(first).map_err(|e| unreachable(first, e))?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| unreachable(first, e))?;
    let nodes: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query_async(&mut conn)
        .await
        .map_err(failed)?;
    let mut out = Vec::new();
    for line in nodes.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(addr), Some(flags)) = (fields.get(1), fields.get(2)) else {
            continue;
        };
        if !flags.split(',').any(|f| f == "master") || flags.contains("fail") {
            continue;
        }
        // `ip:port@cport[,hostname]`
        let hostport = addr.split('@').next().unwrap_or_default();
        let url = format!("redis://{hostport}");
        let client = redis::Client::open(url.as_str()).map_err(|e| unreachable(&url, e))?;
        out.push(
            client
                .get_multiplexed_async_connection()
                .await
                .map_err(|e| unreachable(&url, e))?,
        );
    }
    if out.is_empty() {
        return Err(BenchError::Failed("CLUSTER NODES lists no master".into()));
    }
    Ok(out)
}

struct RedisInstance {
    store: RedisStore,
    conn: Conn,
    /// One connection per node holding data (the server; every master).
    nodes: Vec<MultiplexedConnection>,
    prefix: String,
    store_prefix: String,
    raw_prefix: String,
    salt: u64,
    cloned: std::sync::atomic::AtomicU64,
}

impl RedisInstance {
    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, BenchError> {
        match &self.conn {
            Conn::Standalone(c) => cmd.query_async(&mut c.clone()).await.map_err(failed),
            Conn::Cluster(c) => cmd.query_async(&mut c.clone()).await.map_err(failed),
        }
    }

    async fn restore_all(
        &self,
        keys: Vec<Vec<u8>>,
        ttl: u64,
        blob: &[u8],
    ) -> Result<(), BenchError> {
        match &self.conn {
            Conn::Standalone(c) => {
                let mut pipe = redis::pipe();
                for k in &keys {
                    pipe.cmd("RESTORE").arg(k).arg(ttl).arg(blob).ignore();
                }
                pipe.query_async::<()>(&mut c.clone()).await.map_err(failed)
            }
            Conn::Cluster(c) => {
                // The multiplexed cluster connection pipelines concurrent calls.
                let calls = keys.iter().map(|k| {
                    let mut c = c.clone();
                    async move {
                        redis::cmd("RESTORE")
                            .arg(k)
                            .arg(ttl)
                            .arg(blob)
                            .query_async::<()>(&mut c)
                            .await
                    }
                });
                for r in futures_util::future::join_all(calls).await {
                    r.map_err(failed)?;
                }
                Ok(())
            }
        }
    }

    async fn count(&self, prefix: &str) -> Result<u64, BenchError> {
        let mut total = 0;
        for node in &self.nodes {
            total += scan_keys(&mut node.clone(), prefix).await?.len() as u64;
        }
        Ok(total)
    }

    async fn bytes(&self, prefix: &str) -> Result<u64, BenchError> {
        let mut total = 0;
        for node in &self.nodes {
            total += memory_usage(&mut node.clone(), prefix).await?;
        }
        Ok(total)
    }
}

/// Sums `MEMORY USAGE` over every node, for the raw baseline's keys.
struct NodesBytes {
    nodes: Vec<MultiplexedConnection>,
    prefix: String,
}

struct RawOnNodes<C> {
    raw: RedisRaw<C>,
    bytes: NodesBytes,
}

#[async_trait]
impl<C> Raw for RawOnNodes<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    async fn claim(&self, key: &[u8; 32], value: &bytes::Bytes) -> Result<bool, BenchError> {
        self.raw.claim(key, value).await
    }
    async fn complete(&self, key: &[u8; 32], value: &bytes::Bytes) -> Result<(), BenchError> {
        self.raw.complete(key, value).await
    }
    async fn read(&self, key: &[u8; 32]) -> Result<Option<usize>, BenchError> {
        self.raw.read(key).await
    }
    async fn fill(&self, n: u64, value: &bytes::Bytes) -> Result<(), BenchError> {
        self.raw.fill(n, value).await
    }
    async fn data_bytes(&self) -> Result<Option<u64>, BenchError> {
        let mut total = 0;
        for node in &self.bytes.nodes {
            total += memory_usage(&mut node.clone(), &self.bytes.prefix).await?;
        }
        Ok(Some(total))
    }
}

#[async_trait]
impl Instance for RedisInstance {
    fn store(&self) -> Arc<dyn Store> {
        Arc::new(self.store.clone())
    }

    async fn raw(&self) -> Result<Arc<dyn Raw>, BenchError> {
        let bytes = NodesBytes {
            nodes: self.nodes.clone(),
            prefix: self.raw_prefix.clone(),
        };
        Ok(match &self.conn {
            Conn::Standalone(c) => Arc::new(RawOnNodes {
                raw: RedisRaw {
                    conn: c.clone(),
                    prefix: self.raw_prefix.clone(),
                },
                bytes,
            }),
            Conn::Cluster(c) => Arc::new(RawOnNodes {
                raw: RedisRaw {
                    conn: c.clone(),
                    prefix: self.raw_prefix.clone(),
                },
                bytes,
            }),
        })
    }

    async fn live_records(&self) -> Result<u64, BenchError> {
        self.count(&self.store_prefix).await
    }

    async fn clone_records(&self, template: &RecordKey, n: u64) -> Result<(), BenchError> {
        let key = self.store.redis_key(template);
        let blob: Option<Vec<u8>> = self.query(redis::cmd("DUMP").arg(&key)).await?;
        let Some(blob) = blob else {
            return Err(BenchError::Failed(format!(
                "template {} not found",
                String::from_utf8_lossy(&key)
            )));
        };
        let ttl: i64 = self.query(redis::cmd("PTTL").arg(&key)).await?;
        let ttl = u64::try_from(ttl).unwrap_or(0);
        let start = self
            .cloned
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        let mut i = 0;
        while i < n {
            let end = (i + 2_000).min(n);
            let keys = (start + i..start + end)
                .map(|j| {
                    let mut h = blake3::Hasher::new();
                    h.update(&self.salt.to_le_bytes());
                    h.update(&j.to_le_bytes());
                    // The store's layout: prefix, then 32 digest bytes.
                    let mut k = self.store_prefix.as_bytes().to_vec();
                    k.extend_from_slice(h.finalize().as_bytes());
                    k
                })
                .collect();
            self.restore_all(keys, ttl, &blob).await?;
            i = end;
        }
        Ok(())
    }

    async fn data_bytes(&self) -> Result<Option<u64>, BenchError> {
        self.bytes(&self.store_prefix).await.map(Some)
    }

    async fn settle(&self) -> Result<(), BenchError> {
        // UNLINK frees big cleanups on a background thread: wait for it.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        for node in &self.nodes {
            loop {
                let info: String = redis::cmd("INFO")
                    .arg("memory")
                    .query_async(&mut node.clone())
                    .await
                    .map_err(failed)?;
                let pending = info
                    .lines()
                    .find_map(|l| l.strip_prefix("lazyfree_pending_objects:"))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(0);
                if pending == 0 || std::time::Instant::now() >= deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(())
    }

    async fn server_pids(&self) -> Vec<u32> {
        let mut pids = Vec::new();
        for node in &self.nodes {
            let info: Result<String, _> = redis::cmd("INFO")
                .arg("server")
                .query_async(&mut node.clone())
                .await;
            let pid = info.ok().and_then(|info| {
                info.lines()
                    .find_map(|l| l.strip_prefix("process_id:"))
                    .and_then(|p| p.trim().parse::<u32>().ok())
            });
            // Only a server on this machine (same pid namespace).
            if let Some(pid) =
                pid.filter(|&p| crate::cpu::comm(p).is_some_and(|c| c.starts_with("redis")))
            {
                pids.push(pid);
            }
        }
        pids
    }

    fn notes(&self) -> Vec<String> {
        vec![match self.conn {
            Conn::Standalone(_) => "raw baseline: its own ConnectionManager (one multiplexed connection) with the store's timeouts; the store keeps its ConnectionManager private".into(),
            Conn::Cluster(_) => "raw baseline: its own async cluster connection with the store's timeouts".into(),
        }]
    }

    async fn close(&self) -> Result<(), BenchError> {
        for node in &self.nodes {
            unlink_prefix(&mut node.clone(), &self.prefix).await?;
        }
        Ok(())
    }
}
