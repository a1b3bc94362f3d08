//! The benchmarked backends.

use crate::backend::Backend;
use crate::{BackendKind, Config};

mod memory;
mod postgres;
mod redis;
mod redis_raw;
mod sqlite;
mod sqlite_raw;

/// The backend of `kind`.
pub(crate) fn make(kind: BackendKind, config: &Config) -> Box<dyn Backend> {
    match kind {
        BackendKind::Memory => Box::new(memory::MemoryBackend),
        BackendKind::Sqlite => Box::new(sqlite::SqliteBackend),
        BackendKind::Postgres => Box::new(postgres::PostgresBackend {
            url: config.postgres_url.clone(),
            mode: idem_postgres::ClaimMode::SingleStatement,
        }),
        BackendKind::PostgresReadFirst => Box::new(postgres::PostgresBackend {
            url: config.postgres_url.clone(),
            mode: idem_postgres::ClaimMode::ReadFirst,
        }),
        BackendKind::Redis => Box::new(redis::RedisBackend {
            target: redis::Target::Standalone(config.redis_url.clone()),
        }),
        BackendKind::RedisCluster => Box::new(redis::RedisBackend {
            target: redis::Target::Cluster(config.redis_cluster_urls.clone()),
        }),
    }
}
