//! `idem-redis` on a standalone server or a cluster, against `SET NX PX` +
//! `SET XX PX` (and `GET`) on a connection of the same kind and settings.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use idem_core::RecordKey;
use idem_core::store::Store;
use idem_redis::RedisStore;
use idem_testkit::redis::Deployment;
use idem_testkit::{BackendKind, StoreUrl, chain};
use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;

use super::redis_raw::{RedisRaw, failed, memory_usage};
use crate::backend::{Backend, Instance, Raw};
use crate::{BenchError, Plan};

/// A standalone server (`IDEM_REDIS_URL`), a Valkey server
/// (`IDEM_VALKEY_URL`) or a cluster (`IDEM_REDIS_CLUSTER_URLS`), from the
/// environment (see [`idem_testkit::env`]).
pub(crate) struct RedisBackend {
    /// Which server.
    pub(crate) server: Server,
}

/// The servers `idem-redis` is measured on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Server {
    /// The standalone server at `IDEM_REDIS_URL`.
    Redis,
    /// The Valkey server at `IDEM_VALKEY_URL` (no default: unset, the
    /// target is skipped).
    Valkey,
    /// The cluster at `IDEM_REDIS_CLUSTER_URLS`.
    Cluster,
}

/// The variable naming the Valkey server.
pub(crate) const VALKEY_URL_VAR: &str = "IDEM_VALKEY_URL";

impl Server {
    fn name(self) -> &'static str {
        match self {
            Self::Redis => BackendKind::Redis.name(),
            Self::Valkey => "valkey",
            Self::Cluster => BackendKind::RedisCluster.name(),
        }
    }

    /// The server's URL, from the environment.
    fn url(self) -> Result<StoreUrl, BenchError> {
        match self {
            Self::Redis => BackendKind::Redis.url(),
            Self::Cluster => BackendKind::RedisCluster.url(),
            Self::Valkey => {
                let url = std::env::var(VALKEY_URL_VAR).unwrap_or_default();
                if url.trim().is_empty() {
                    return Err(BenchError::Unreachable(format!(
                        "{VALKEY_URL_VAR} is not set (`cargo xtask bench` starts a Valkey server when it can)"
                    )));
                }
                return StoreUrl::parse(url.trim())
                    .map_err(|e| BenchError::Unreachable(format!("{VALKEY_URL_VAR}: {e}")));
            }
        }
        .map_err(|e| BenchError::Unreachable(e.to_string()))
    }
}

/// The store's defaults (`RedisStore::builder()`): the raw connection gets the same.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(1);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);

fn unreachable(what: &str, e: impl std::fmt::Display) -> BenchError {
    BenchError::Unreachable(format!("{what}: {e}"))
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
        self.server.name()
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
        let mut url = self.server.url()?;
        let StoreUrl::Redis(r) = &mut url else {
            return Err(BenchError::Failed(format!("not a Redis URL: {url}")));
        };
        r.prefix = Some(store_prefix.clone());
        let deployment = Deployment::of(r);
        // `Display` hides the password.
        let shown = url.to_string();
        let opened = url.open().await.map_err(|e| {
            if e.is_unreachable() {
                unreachable(&shown, chain(&e))
            } else {
                BenchError::Failed(format!("{shown}: {}", chain(&e)))
            }
        })?;
        let store = opened
            .store()
            .as_redis()
            .cloned()
            .ok_or_else(|| BenchError::Failed(format!("{shown} opened no Redis store")))?;
        let conn = match &deployment {
            Deployment::Standalone(node) => {
                let client = redis::Client::open(node.as_str())
                    .map_err(|e| BenchError::Failed(format!("redis url {shown}: {e}")))?;
                let manager_config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CONNECTION_TIMEOUT))
                    .set_response_timeout(Some(RESPONSE_TIMEOUT))
                    .set_number_of_retries(3)
                    .set_min_delay(Duration::from_millis(50))
                    .set_max_delay(Duration::from_secs(1));
                let manager = ConnectionManager::new_with_config(client, manager_config)
                    .await
                    .map_err(|e| unreachable(&shown, e))?;
                Conn::Standalone(manager)
            }
            Deployment::Cluster(seeds) => {
                let client = ClusterClientBuilder::new(seeds.clone())
                    .connection_timeout(CONNECTION_TIMEOUT)
                    .response_timeout(RESPONSE_TIMEOUT)
                    .build()
                    .map_err(|e| unreachable(&shown, e))?;
                let conn = client
                    .get_async_connection()
                    .await
                    .map_err(|e| unreachable(&shown, e))?;
                Conn::Cluster(conn)
            }
        };
        // A connection to each node holding data (the server; every master
        // of a cluster), for SCAN, MEMORY USAGE and INFO.
        let mut nodes = Vec::new();
        for master in deployment
            .masters()
            .await
            .map_err(|e| unreachable(&shown, e))?
        {
            let node = idem_testkit::redis::node(&master)
                .await
                .map_err(|e| unreachable(&shown, e))?;
            nodes.push(node);
        }
        Ok(Box::new(RedisInstance {
            store,
            conn,
            deployment,
            nodes,
            store_prefix,
            raw_prefix,
            prefix,
            salt,
            cloned: std::sync::atomic::AtomicU64::new(0),
        }))
    }
}

struct RedisInstance {
    store: RedisStore,
    conn: Conn,
    /// The server or cluster, for counting and removing keys.
    deployment: Deployment,
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
}

#[async_trait]
impl Instance for RedisInstance {
    fn store(&self) -> Arc<dyn Store> {
        Arc::new(self.store.clone())
    }

    async fn raw(&self) -> Result<Arc<dyn Raw>, BenchError> {
        fn raw<C>(conn: &C, i: &RedisInstance) -> Arc<dyn Raw>
        where
            C: ConnectionLike + Clone + Send + Sync + 'static,
        {
            let (prefix, nodes) = (i.raw_prefix.clone(), i.nodes.clone());
            Arc::new(RedisRaw {
                conn: conn.clone(),
                prefix,
                nodes,
            })
        }
        Ok(match &self.conn {
            Conn::Standalone(c) => raw(c, self),
            Conn::Cluster(c) => raw(c, self),
        })
    }

    async fn live_records(&self) -> Result<u64, BenchError> {
        self.deployment
            .count(&self.store_prefix)
            .await
            .map_err(failed)
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
        memory_usage(&self.nodes, &self.store_prefix)
            .await
            .map(Some)
    }

    async fn settle(&self) -> Result<(), BenchError> {
        // UNLINK frees big cleanups on a background thread: wait for it.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        for node in &self.nodes {
            loop {
                let pending = info(node, "memory", "lazyfree_pending_objects")
                    .await
                    .map_err(failed)?;
                if pending.unwrap_or(0) == 0 || std::time::Instant::now() >= deadline {
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
            let pid = info(node, "server", "process_id").await.ok().flatten();
            let pid = pid.and_then(|p| u32::try_from(p).ok());
            // Only a server on this machine (same pid namespace).
            if let Some(pid) = pid.filter(|&p| {
                crate::cpu::comm(p)
                    .is_some_and(|c| c.starts_with("redis") || c.starts_with("valkey"))
            }) {
                pids.push(pid);
            }
        }
        pids
    }

    async fn server_version(&self) -> Option<String> {
        let node = self.nodes.first()?;
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut node.clone())
            .await
            .ok()?;
        server_version(&info)
    }

    fn notes(&self) -> Vec<String> {
        vec![match self.conn {
            Conn::Standalone(_) => "raw baseline: its own ConnectionManager (one multiplexed connection) with the store's timeouts; the store keeps its ConnectionManager private".into(),
            Conn::Cluster(_) => "raw baseline: its own async cluster connection with the store's timeouts".into(),
        }]
    }

    async fn close(self: Box<Self>) -> Result<(), BenchError> {
        self.deployment
            .delete(&self.prefix)
            .await
            .map(drop)
            .map_err(failed)
    }
}

/// The number `field` of `INFO section` on `node`, if listed.
async fn info(
    node: &MultiplexedConnection,
    section: &str,
    field: &str,
) -> redis::RedisResult<Option<u64>> {
    let info: String = redis::cmd("INFO")
        .arg(section)
        .query_async(&mut node.clone())
        .await?;
    let value = info
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'));
    Ok(value.and_then(|v| v.trim().parse().ok()))
}

/// `valkey 9.1.0` or `redis 7.0.15` from the text of `INFO server` (Valkey
/// also reports a `redis_version`, the Redis version it is compatible with).
fn server_version(info: &str) -> Option<String> {
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    field("valkey_version")
        .map(|v| format!("valkey {v}"))
        .or_else(|| field("redis_version").map(|v| format!("redis {v}")))
}

#[cfg(test)]
mod tests {
    use super::server_version;

    #[test]
    fn names_valkey_before_its_redis_compatibility_version() {
        let valkey =
            "# Server\r\nredis_version:7.2.4\r\nserver_name:valkey\r\nvalkey_version:9.1.0\r\n";
        assert_eq!(server_version(valkey).as_deref(), Some("valkey 9.1.0"));
        let redis = "# Server\r\nredis_version:7.0.15\r\nredis_mode:standalone\r\n";
        assert_eq!(server_version(redis).as_deref(), Some("redis 7.0.15"));
        assert_eq!(server_version("# Server\r\n"), None);
    }
}
