//! The benchmarked backends.

use async_trait::async_trait;
use idem_testkit::BackendKind;

use crate::backend::{Backend, Instance};
use crate::{BenchError, FINISHED_CACHE_BYTES, Plan, Target, Workload};

mod memory;
mod postgres;
mod redis;
mod redis_raw;
mod sqlite;
mod sqlite_raw;

/// The backend of `target`.
pub(crate) fn make(target: Target) -> Box<dyn Backend> {
    match target {
        Target::Backend(BackendKind::Memory) => Box::new(memory::MemoryBackend),
        Target::Backend(BackendKind::Sqlite) => Box::new(sqlite::SqliteBackend),
        Target::Backend(BackendKind::Postgres) => {
            Box::new(postgres::PostgresBackend { mode: None })
        }
        Target::PostgresReadFirst => Box::new(postgres::PostgresBackend {
            mode: Some(idem_postgres::ClaimMode::ReadFirst),
        }),
        Target::PostgresSingleStatement => Box::new(postgres::PostgresBackend {
            mode: Some(idem_postgres::ClaimMode::SingleStatement),
        }),
        Target::Backend(BackendKind::Redis) => Box::new(redis::RedisBackend {
            server: redis::Server::Redis,
        }),
        Target::Backend(BackendKind::RedisCluster) => Box::new(redis::RedisBackend {
            server: redis::Server::Cluster,
        }),
        Target::Valkey | Target::Backend(BackendKind::Valkey) => Box::new(redis::RedisBackend {
            server: redis::Server::Valkey,
        }),
        Target::Cached(c) => Box::new(Cached {
            inner: make(Target::Backend(c.kind())),
            name: target.name(),
        }),
    }
}

/// A backend measured with the engine's finished-record cache
/// ([`Cacheable`](crate::Cacheable)): fresh, replay and hot key, on the backend's own
/// instances and raw commands.
struct Cached {
    inner: Box<dyn Backend>,
    name: &'static str,
}

#[async_trait]
impl Backend for Cached {
    fn name(&self) -> &'static str {
        self.name
    }

    fn measures(&self, workload: Workload) -> bool {
        // What the cache can change: the engine's path, not the store's.
        matches!(
            workload,
            Workload::Fresh | Workload::Replay | Workload::HotKey
        ) && self.inner.measures(workload)
    }

    fn finished_cache_bytes(&self) -> Option<usize> {
        Some(FINISHED_CACHE_BYTES)
    }

    fn concurrencies(&self, plan: &Plan) -> Vec<usize> {
        self.inner.concurrencies(plan)
    }

    async fn open(&self) -> Result<Box<dyn Instance>, BenchError> {
        self.inner.open().await
    }
}

/// The column list and the select list of an `INSERT … SELECT` that copies a
/// row of `table` (whose columns are `columns`) but its primary key
/// `digest`, which becomes the expression `digest` (new random-looking
/// bytes).
pub(crate) fn clone_columns(
    table: &str,
    columns: &[String],
    digest: &str,
) -> Result<(String, String), BenchError> {
    if !columns.iter().any(|c| c == "digest") {
        return Err(BenchError::Failed(format!(
            "{table} has no digest column: cannot clone records"
        )));
    }
    let quoted: Vec<String> = columns.iter().map(|c| format!("\"{c}\"")).collect();
    let select: Vec<String> = columns
        .iter()
        .map(|c| match c.as_str() {
            "digest" => digest.to_string(),
            _ => format!("t.\"{c}\""),
        })
        .collect();
    Ok((quoted.join(", "), select.join(", ")))
}
