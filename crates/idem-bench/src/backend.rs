//! What a benchmarked backend provides: isolated instances of its store, and
//! the raw baseline issued through the same driver, pool and connection model.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use idem_core::RecordKey;
use idem_core::store::Store;

use crate::{BenchError, Plan, Workload};

/// The raw store commands that bound what any idempotency layer can do: one
/// atomic write to claim a key, one to store the outcome, one read to replay.
///
/// # Behavior
/// Keys are 32 random-looking bytes (like record digests, so index and hash
/// placement behave alike); the backend maps them to its native key type.
/// Every value is written with the same time to live the engine's records
/// get, where the backend supports it.
#[async_trait]
pub trait Raw: Send + Sync + 'static {
    /// Writes `value` under `key` if absent (`SET NX PX`, `INSERT … ON
    /// CONFLICT DO NOTHING`); whether it wrote.
    async fn claim(&self, key: &[u8; 32], value: &Bytes) -> Result<bool, BenchError>;
    /// Replaces the value under an existing `key` (`SET XX PX`, `UPDATE …
    /// WHERE key = $1`).
    async fn complete(&self, key: &[u8; 32], value: &Bytes) -> Result<(), BenchError>;
    /// Reads the value under `key` (`GET`, `SELECT`); its length if present.
    async fn read(&self, key: &[u8; 32]) -> Result<Option<usize>, BenchError>;
    /// Adds `n` rows with new random keys and `value`, with bulk writes
    /// (multi-row `INSERT … SELECT`, pipelines), for the scaling measurement.
    async fn fill(&self, n: u64, value: &Bytes) -> Result<(), BenchError>;
    /// Bytes the baseline's data takes in the backend (table and index size,
    /// `MEMORY USAGE`), if the backend can tell.
    async fn data_bytes(&self) -> Result<Option<u64>, BenchError>;
}

/// One isolated instance of a backend's store: its own schema, key prefix or
/// file, removed by [`close`](Self::close).
#[async_trait]
pub trait Instance: Send + Sync {
    /// The store of this instance.
    fn store(&self) -> Arc<dyn Store>;

    /// The raw baseline on the same pool or connection model as
    /// [`store`](Self::store), in this instance's namespace.
    async fn raw(&self) -> Result<Arc<dyn Raw>, BenchError>;

    /// Other raw baselines worth reporting beside the fair one, with a label
    /// (for example SQLite without the store's thread hop).
    async fn raw_variants(&self) -> Result<Vec<(String, Arc<dyn Raw>)>, BenchError> {
        Ok(Vec::new())
    }

    /// How many records the store holds.
    async fn live_records(&self) -> Result<u64, BenchError>;

    /// Adds `n` records, copies of the one stored under `template` under new
    /// random keys, with bulk writes (multi-row `INSERT … SELECT`, pipelines).
    async fn clone_records(&self, template: &RecordKey, n: u64) -> Result<(), BenchError>;

    /// Bytes the store's records take in the backend (tables and indexes,
    /// `MEMORY USAGE` of its keys), if the backend can tell.
    async fn data_bytes(&self) -> Result<Option<u64>, BenchError>;

    /// Waits until the backend has finished the background work of earlier
    /// bulk loads and cleanups (checkpoints, lazy frees), so that the next
    /// measurement does not pay for them.
    async fn settle(&self) -> Result<(), BenchError> {
        Ok(())
    }

    /// The local server processes holding this instance's data (to report
    /// server CPU time per operation); empty when unknown or remote.
    async fn server_pids(&self) -> Vec<u32> {
        Vec::new()
    }

    /// The server's name and version (`redis 7.0.15`, `valkey 9.1.0`,
    /// `PostgreSQL 15.8`, `SQLite 3.50.2`), if it can tell.
    async fn server_version(&self) -> Option<String> {
        None
    }

    /// Remarks for the report (pool size, pragmas, architecture).
    fn notes(&self) -> Vec<String> {
        Vec::new()
    }

    /// Removes everything this instance created (its schema, keys, file).
    async fn close(self: Box<Self>) -> Result<(), BenchError>;
}

/// A backend under benchmark.
#[async_trait]
pub trait Backend: Send + Sync {
    /// Its name in the report: the [`Target`](crate::Target)'s.
    fn name(&self) -> &'static str;

    /// Whether `workload` says anything about this backend (a variant of
    /// another backend skips what it shares with it).
    fn measures(&self, workload: Workload) -> bool {
        let _ = workload;
        true
    }

    /// The byte budget of the engine's finished-record cache, if the
    /// measurements run with it (the `+cache` targets).
    fn finished_cache_bytes(&self) -> Option<usize> {
        None
    }

    /// The concurrency levels of the fresh and replay measurements.
    fn concurrencies(&self, plan: &Plan) -> Vec<usize> {
        plan.concurrencies.clone()
    }

    /// Opens a new isolated instance; [`BenchError::Unreachable`] if the
    /// server cannot be reached.
    async fn open(&self) -> Result<Box<dyn Instance>, BenchError>;
}
