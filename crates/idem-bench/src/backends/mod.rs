//! The benchmarked backends.

use idem_testkit::BackendKind;

use crate::backend::Backend;
use crate::{BenchError, Target};

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
        Target::Backend(BackendKind::Postgres) => Box::new(postgres::PostgresBackend {
            mode: idem_postgres::ClaimMode::SingleStatement,
        }),
        Target::PostgresReadFirst => Box::new(postgres::PostgresBackend {
            mode: idem_postgres::ClaimMode::ReadFirst,
        }),
        Target::Backend(kind @ (BackendKind::Redis | BackendKind::RedisCluster)) => {
            Box::new(redis::RedisBackend { kind })
        }
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
