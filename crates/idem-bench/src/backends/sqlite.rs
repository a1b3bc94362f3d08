//! `idem-sqlite` on a temporary file, against `INSERT … ON CONFLICT DO
//! NOTHING` + `UPDATE` (and `SELECT`) with the same pragmas and the same
//! writer-thread architecture.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use idem_core::RecordKey;
use idem_core::store::Store;
use idem_sqlite::{DEFAULT_MAX_BATCH, SqliteStore};
use idem_testkit::{BackendKind, Isolated};
use rusqlite::Connection;

use super::sqlite_raw::{self, InlineRaw, WriterRaw, failed, file_bytes};
use crate::BenchError;
use crate::backend::{Backend, Instance, Raw};

pub(crate) struct SqliteBackend;

/// The column names of `table`, in order.
fn table_columns(conn: &Connection, table: &str) -> Result<Vec<String>, BenchError> {
    let mut stmt = conn
        .prepare("SELECT name FROM pragma_table_info(?1)")
        .map_err(failed)?;
    let mut columns = Vec::new();
    for name in stmt
        .query_map([table], |r| r.get::<_, String>(0))
        .map_err(failed)?
    {
        columns.push(name.map_err(failed)?);
    }
    Ok(columns)
}

#[async_trait]
impl Backend for SqliteBackend {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    async fn open(&self) -> Result<Box<dyn Instance>, BenchError> {
        // The store's defaults, on a file in a temporary directory.
        let isolated = Isolated::open(BackendKind::Sqlite).await.map_err(failed)?;
        let store = isolated.sqlite().clone();
        let path = store
            .path()
            .ok_or_else(|| BenchError::Failed("the SQLite store has no file".into()))?
            .to_path_buf();
        Ok(Box::new(SqliteInstance {
            store,
            path,
            isolated,
        }))
    }
}

struct SqliteInstance {
    store: SqliteStore,
    path: PathBuf,
    isolated: Isolated,
}

impl SqliteInstance {
    /// A connection configured like the store's own (busy timeout, durability, WAL).
    fn connect(&self) -> Result<Connection, BenchError> {
        let conn = self.store.connect().map_err(failed)?;
        conn.set_prepared_statement_cache_capacity(32);
        Ok(conn)
    }

    fn table(&self) -> String {
        format!("\"{}\"", self.store.table().as_str())
    }
}

#[async_trait]
impl Instance for SqliteInstance {
    fn store(&self) -> Arc<dyn Store> {
        Arc::new(self.store.clone())
    }

    async fn raw(&self) -> Result<Arc<dyn Raw>, BenchError> {
        let conn = sqlite_raw::prepare(self.connect()?)?;
        Ok(Arc::new(WriterRaw::spawn(
            conn,
            &self.path,
            DEFAULT_MAX_BATCH,
        )?))
    }

    async fn raw_variants(&self) -> Result<Vec<(String, Arc<dyn Raw>)>, BenchError> {
        let conn = sqlite_raw::prepare(self.connect()?)?;
        Ok(vec![(
            "raw without the writer thread (autocommit on the caller's thread)".into(),
            Arc::new(InlineRaw::new(conn)),
        )])
    }

    async fn live_records(&self) -> Result<u64, BenchError> {
        self.isolated.records().await.map_err(failed)
    }

    async fn clone_records(&self, template: &RecordKey, n: u64) -> Result<(), BenchError> {
        let conn = self.connect()?;
        let table = self.table();
        // Every column copied from the template row, but the primary key.
        let columns = table_columns(&conn, self.store.table().as_str())?;
        let (cols, select) = super::clone_columns(&table, &columns, "randomblob(32)")?;
        let statement = format!(
            "WITH RECURSIVE g(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM g WHERE i < ?2) \
             INSERT INTO {table} ({cols}) SELECT {select} FROM {table} t, g WHERE t.digest = ?1",
        );
        let digest = template.digest().to_vec();
        tokio::task::spawn_blocking(move || -> Result<(), BenchError> {
            let mut left = n;
            while left > 0 {
                let chunk = left.min(100_000);
                let done = conn
                    .execute(
                        &statement,
                        rusqlite::params![&digest, i64::try_from(chunk).unwrap_or(i64::MAX)],
                    )
                    .map_err(failed)?;
                if done as u64 != chunk {
                    return Err(BenchError::Failed(format!(
                        "cloned {done} rows instead of {chunk}"
                    )));
                }
                left -= chunk;
            }
            conn.execute_batch("PRAGMA optimize").map_err(failed)?;
            // Settle the write-ahead log, so that no measurement pays for
            // checkpointing the bulk load.
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                .map_err(failed)
        })
        .await
        .map_err(failed)?
    }

    async fn data_bytes(&self) -> Result<Option<u64>, BenchError> {
        file_bytes(&self.path).map(Some)
    }

    async fn server_version(&self) -> Option<String> {
        let conn = self.connect().ok()?;
        let version: String = conn
            .query_row("SELECT sqlite_version()", [], |r| r.get(0))
            .ok()?;
        Some(format!("SQLite {version}"))
    }

    async fn settle(&self) -> Result<(), BenchError> {
        let conn = self.connect()?;
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .map_err(failed)
    }

    fn notes(&self) -> Vec<String> {
        vec![format!(
            "store defaults: WAL, synchronous=FULL, busy_timeout 5 s, one writer thread committing up to {DEFAULT_MAX_BATCH} calls per transaction; raw: the same pragmas (SqliteStore::connect) on a writer thread of its own with the same batching, in the same file"
        )]
    }

    async fn close(self: Box<Self>) -> Result<(), BenchError> {
        drop(self.store);
        self.isolated.close().await.map_err(failed)
    }
}
