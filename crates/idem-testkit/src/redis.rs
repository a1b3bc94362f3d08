//! Redis chores on a standalone server or a cluster: the masters of a
//! cluster (`CLUSTER NODES`), counting and deleting the keys under a prefix
//! (`SCAN` on every master, one key per command so that no command spans
//! two slots; never `FLUSHDB`), and a connection that routes by key.

use std::collections::BTreeMap;
use std::time::Duration;

use ::redis::aio::MultiplexedConnection;
use ::redis::cluster_async::ClusterConnection;
use ::redis::{Cmd, ErrorKind, FromRedisValue, RedisError, RedisResult};
use idem_redis::{RedisStore, RedisStoreBuilder};
use idemkit::{RedisUrl, StoreUrl};

/// How long connecting to one node may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Every key prefix [`fresh_prefix`] names starts with this.
pub const PREFIX_ROOT: &str = "idem-test:";

/// The prefix of every key this process's isolated stores write:
/// `idem-test:<pid>_<random>:`.
pub fn run_prefix() -> String {
    format!("{PREFIX_ROOT}{}:", crate::run_id())
}

/// A key prefix no other test uses: `idem-test:<pid>_<random>:<n>:`.
pub fn fresh_prefix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{}{}:", run_prefix(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A Redis the tests use: one server, or a cluster through its seed nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Deployment {
    /// One server (its URL).
    Standalone(String),
    /// A cluster (seed node URLs).
    Cluster(Vec<String>),
}

impl Deployment {
    /// The deployment a Redis store URL names.
    pub fn of(url: &RedisUrl) -> Self {
        let nodes = url.node_urls();
        if url.is_cluster() {
            Self::Cluster(nodes)
        } else {
            Self::Standalone(nodes.into_iter().next().unwrap_or_default())
        }
    }

    /// The deployment of a store URL, if it is a Redis one.
    pub fn of_store_url(url: &StoreUrl) -> Option<Self> {
        match url {
            StoreUrl::Redis(r) => Some(Self::of(r)),
            _ => None,
        }
    }

    /// The URLs of every master: the server itself, or the cluster's masters
    /// (from `CLUSTER NODES` of the first seed that answers), sorted.
    pub async fn masters(&self) -> RedisResult<Vec<String>> {
        match self {
            Self::Standalone(url) => Ok(vec![url.clone()]),
            Self::Cluster(seeds) => masters(seeds).await,
        }
    }

    /// A connection that sends each command to the node owning its key.
    pub async fn keyed(&self) -> RedisResult<Keyed> {
        match self {
            Self::Standalone(url) => Ok(Keyed::Single(node(url).await?)),
            Self::Cluster(seeds) => {
                let client = ::redis::cluster::ClusterClient::new(seeds.clone())?;
                Ok(Keyed::Cluster(client.get_async_connection().await?))
            }
        }
    }

    /// A store built by `builder` on this deployment: for options a store
    /// URL does not carry (a prefix of its own choosing, say).
    pub async fn connect(
        &self,
        builder: &RedisStoreBuilder,
    ) -> Result<RedisStore, idem_redis::RedisError> {
        match self {
            Self::Standalone(url) => builder.connect(url).await,
            Self::Cluster(seeds) => builder.connect_cluster(seeds).await,
        }
    }

    /// Whether this is a cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// How many keys under `prefix` each master holds.
    pub async fn keys_per_master(&self, prefix: &str) -> RedisResult<BTreeMap<String, u64>> {
        let mut out = BTreeMap::new();
        for master in self.masters().await? {
            let mut conn = node(&master).await?;
            out.insert(master, scan(&mut conn, prefix).await?.len() as u64);
        }
        Ok(out)
    }

    /// How many keys under `prefix` there are (keys Redis has expired do not
    /// count).
    pub async fn count(&self, prefix: &str) -> RedisResult<u64> {
        Ok(self.keys_per_master(prefix).await?.values().sum())
    }

    /// Deletes every key under `prefix` on every master; returns how many.
    pub async fn delete(&self, prefix: &str) -> RedisResult<u64> {
        let mut deleted = 0;
        for master in self.masters().await? {
            let mut conn = node(&master).await?;
            deleted += delete_on(&mut conn, prefix).await?;
        }
        Ok(deleted)
    }
}

/// A plain connection to one node (at most 3 s to connect).
pub async fn node(url: &str) -> RedisResult<MultiplexedConnection> {
    let client = ::redis::Client::open(url)?;
    tokio::time::timeout(CONNECT_TIMEOUT, client.get_multiplexed_async_connection())
        .await
        .map_err(|_| RedisError::from((ErrorKind::Io, "connection timed out")))?
}

/// The masters' URLs from `CLUSTER NODES` of the first of `seeds` that
/// answers, sorted.
pub async fn masters(seeds: &[String]) -> RedisResult<Vec<String>> {
    let mut last = None;
    for seed in seeds {
        let listed = async {
            let mut conn = node(seed).await?;
            ::redis::cmd("CLUSTER")
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
    Err(last.unwrap_or_else(|| RedisError::from((ErrorKind::Client, "no cluster seed node"))))
}

/// The `redis://host:port` URLs of the healthy masters in a `CLUSTER NODES`
/// listing (failed and address-less nodes left out), sorted.
pub fn parse_masters(nodes: &str) -> Vec<String> {
    let mut masters: Vec<String> = nodes
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let flags: Vec<&str> = fields.get(2)?.split(',').collect();
            let healthy = flags.contains(&"master")
                && !flags
                    .iter()
                    .any(|f| matches!(*f, "fail" | "fail?" | "noaddr"));
            let addr = fields.get(1)?.split('@').next()?;
            healthy.then(|| format!("redis://{addr}"))
        })
        .collect();
    masters.sort();
    masters
}

/// The keys under `prefix` on one node (the prefix holds no glob
/// characters).
pub async fn scan(conn: &mut MultiplexedConnection, prefix: &str) -> RedisResult<Vec<Vec<u8>>> {
    let mut keys = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, batch): (u64, Vec<Vec<u8>>) = ::redis::cmd("SCAN")
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

/// Deletes the keys under `prefix` on one node: one `UNLINK` per key,
/// pipelined (a cluster node refuses a multi-key `UNLINK` whose keys lie in
/// different slots: CROSSSLOT).
async fn delete_on(conn: &mut MultiplexedConnection, prefix: &str) -> RedisResult<u64> {
    let keys = scan(conn, prefix).await?;
    let mut deleted = 0;
    for batch in keys.chunks(1000) {
        let mut pipe = ::redis::pipe();
        for key in batch {
            pipe.cmd("UNLINK").arg(key);
        }
        let counts: Vec<u64> = pipe.query_async(conn).await?;
        deleted += counts.iter().sum::<u64>();
    }
    Ok(deleted)
}

/// A connection that sends each command to the node owning its key: for
/// reading and writing values behind a store's back.
pub enum Keyed {
    /// The standalone server.
    Single(MultiplexedConnection),
    /// The cluster client.
    Cluster(ClusterConnection),
}

impl Keyed {
    /// Sends `cmd` and converts the reply.
    pub async fn query<T: FromRedisValue>(&mut self, cmd: &Cmd) -> RedisResult<T> {
        match self {
            Self::Single(c) => cmd.query_async(c).await,
            Self::Cluster(c) => cmd.query_async(c).await,
        }
    }
}

impl std::fmt::Debug for Keyed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Single(_) => "Keyed::Single",
            Self::Cluster(_) => "Keyed::Cluster",
        })
    }
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
f6 127.0.0.1:7005@17005 master,fail? - 0 1 3 connected
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
}
