//! The raw Redis baseline (`SET NX PX`, `SET XX PX`, `GET`) and the
//! `MEMORY USAGE` sum shared by the standalone and cluster backends.

use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::{ConnectionLike, MultiplexedConnection};

use crate::BenchError;
use crate::backend::Raw;
use crate::scenario::RAW_TTL_MS;

pub(crate) fn failed(e: redis::RedisError) -> BenchError {
    BenchError::Failed(format!("redis: {e}"))
}

/// The raw commands on connection `C` (a `ConnectionManager` or a cluster
/// connection: the one the store uses), under `prefix`.
pub(crate) struct RedisRaw<C> {
    pub(crate) conn: C,
    /// Keys are the prefix then the 32 key bytes: the store's layout.
    pub(crate) prefix: String,
    /// A connection to each node holding data, for `MEMORY USAGE`.
    pub(crate) nodes: Vec<MultiplexedConnection>,
}

impl<C: ConnectionLike + Clone> RedisRaw<C> {
    fn key(&self, key: &[u8; 32]) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.prefix.len() + 32);
        k.extend_from_slice(self.prefix.as_bytes());
        k.extend_from_slice(key);
        k
    }

    /// `SET key value <condition> PX ttl`: whether it was set.
    async fn set(
        &self,
        key: &[u8; 32],
        value: &Bytes,
        condition: &str,
    ) -> Result<bool, BenchError> {
        let mut conn = self.conn.clone();
        let set: Option<String> = redis::cmd("SET")
            .arg(self.key(key))
            .arg(value.as_ref())
            .arg(condition)
            .arg("PX")
            .arg(RAW_TTL_MS)
            .query_async(&mut conn)
            .await
            .map_err(failed)?;
        Ok(set.is_some())
    }
}

#[async_trait]
impl<C> Raw for RedisRaw<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    async fn claim(&self, key: &[u8; 32], value: &Bytes) -> Result<bool, BenchError> {
        self.set(key, value, "NX").await
    }

    async fn complete(&self, key: &[u8; 32], value: &Bytes) -> Result<(), BenchError> {
        if !self.set(key, value, "XX").await? {
            return Err(BenchError::Failed("raw SET XX: key absent".into()));
        }
        Ok(())
    }

    async fn read(&self, key: &[u8; 32]) -> Result<Option<usize>, BenchError> {
        let mut conn = self.conn.clone();
        let value: Option<Vec<u8>> = redis::cmd("GET")
            .arg(self.key(key))
            .query_async(&mut conn)
            .await
            .map_err(failed)?;
        Ok(value.map(|v| v.len()))
    }

    async fn fill(&self, n: u64, value: &Bytes) -> Result<(), BenchError> {
        let salt =
            std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), n);
        let mut i = 0;
        while i < n {
            let end = (i + 2_000).min(n);
            // Concurrent calls on a multiplexed connection are pipelined.
            let calls = (i..end).map(|j| {
                let mut h = blake3::Hasher::new();
                h.update(&salt.to_le_bytes());
                h.update(&j.to_le_bytes());
                let key = self.key(h.finalize().as_bytes());
                let mut conn = self.conn.clone();
                async move {
                    redis::cmd("SET")
                        .arg(key)
                        .arg(value.as_ref())
                        .arg("PX")
                        .arg(RAW_TTL_MS)
                        .query_async::<()>(&mut conn)
                        .await
                }
            });
            for r in futures_util::future::join_all(calls).await {
                r.map_err(failed)?;
            }
            i = end;
        }
        Ok(())
    }

    async fn data_bytes(&self) -> Result<Option<u64>, BenchError> {
        memory_usage(&self.nodes, &self.prefix).await.map(Some)
    }
}

/// The sum of `MEMORY USAGE key SAMPLES 0` over every key under `prefix`
/// on every node of `nodes`.
pub(crate) async fn memory_usage(
    nodes: &[MultiplexedConnection],
    prefix: &str,
) -> Result<u64, BenchError> {
    let mut total = 0u64;
    for node in nodes {
        total += node_memory_usage(&mut node.clone(), prefix).await?;
    }
    Ok(total)
}

/// [`memory_usage`] on one node.
async fn node_memory_usage(
    conn: &mut MultiplexedConnection,
    prefix: &str,
) -> Result<u64, BenchError> {
    let keys = idem_testkit::redis::scan(conn, prefix)
        .await
        .map_err(failed)?;
    let mut total = 0u64;
    for chunk in keys.chunks(1_000) {
        let mut pipe = redis::pipe();
        for k in chunk {
            pipe.cmd("MEMORY").arg("USAGE").arg(k).arg("SAMPLES").arg(0);
        }
        let sizes: Vec<Option<u64>> = pipe.query_async(conn).await.map_err(failed)?;
        total += sizes.into_iter().flatten().sum::<u64>();
    }
    Ok(total)
}
