//! `idem-postgres`, against `INSERT … ON CONFLICT DO NOTHING` + `UPDATE …
//! WHERE key = $1` (and `SELECT`) on the same `PgPool`.

use std::str::FromStr;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use idem_core::{RecordKey, Store, StoreError};
use idem_postgres::{ClaimMode, PostgresStore, TableName};
use sqlx::postgres::PgConnectOptions;
use sqlx::{AssertSqlSafe, Connection, PgPool, Row};

use crate::backend::{Backend, Instance, Raw};
use crate::scenario::RAW_TTL_MS;
use crate::{BenchError, Workload};

/// Connections of the pool both sides share.
pub(crate) const POOL_SIZE: u32 = 16;
const APP_NAME: &str = "idem-bench";
const TABLE: &str = "idempotency_records";

pub(crate) struct PostgresBackend {
    pub(crate) url: String,
    /// How the store claims keys; `postgres-read-first` is the same backend
    /// in [`ClaimMode::ReadFirst`].
    pub(crate) mode: ClaimMode,
}

fn failed(e: impl std::fmt::Display) -> BenchError {
    BenchError::Failed(format!("postgres: {e}"))
}

fn store_failed(e: StoreError) -> BenchError {
    BenchError::Failed(format!("postgres store: {e}"))
}

fn sql(text: String) -> AssertSqlSafe<Arc<str>> {
    AssertSqlSafe(Arc::from(text))
}

#[async_trait]
impl Backend for PostgresBackend {
    fn name(&self) -> &'static str {
        match self.mode {
            ClaimMode::ReadFirst => "postgres-read-first",
            _ => "postgres",
        }
    }

    fn measures(&self, workload: Workload) -> bool {
        // Only the claim differs between the modes.
        self.mode == ClaimMode::SingleStatement
            || matches!(
                workload,
                Workload::Fresh | Workload::Replay | Workload::HotKey
            )
    }

    async fn open(&self) -> Result<Box<dyn Instance>, BenchError> {
        let options = PgConnectOptions::from_str(&self.url)
            .map_err(|e| BenchError::Failed(format!("postgres url: {e}")))?
            .application_name(APP_NAME);
        // One direct attempt first: a pool would retry until its acquire timeout.
        let probe = sqlx::PgConnection::connect_with(&options)
            .await
            .map_err(|e| BenchError::Unreachable(format!("{}: {e}", self.url)))?;
        let _ = probe.close().await;
        let pool = PostgresStore::pool_options()
            .max_connections(POOL_SIZE)
            .connect_with(options)
            .await
            .map_err(|e| BenchError::Unreachable(format!("{}: {e}", self.url)))?;
        let salt = std::hash::BuildHasher::hash_one(
            &std::collections::hash_map::RandomState::new(),
            std::process::id(),
        );
        let schema = format!("idem_bench_{}_{:08x}", std::process::id(), salt as u32);
        let table = TableName::new(schema.clone(), TABLE).map_err(failed)?;
        let store = PostgresStore::with_table(pool.clone(), table).with_claim_mode(self.mode);
        // `PostgresStore::migrate()`'s future is not `Send` (sqlx's migrator
        // is not general enough over lifetimes), so it cannot be awaited in
        // this boxed `Send` future: run it on a blocking thread.
        let migrating = store.clone();
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || handle.block_on(migrating.migrate()))
            .await
            .map_err(failed)?
            .map_err(store_failed)?;
        Ok(Box::new(PostgresInstance {
            store,
            pool,
            schema,
            salt,
            cloned: std::sync::atomic::AtomicU64::new(0),
        }))
    }
}

struct PostgresInstance {
    store: PostgresStore,
    pool: PgPool,
    schema: String,
    salt: u64,
    cloned: std::sync::atomic::AtomicU64,
}

impl PostgresInstance {
    fn records(&self) -> String {
        format!("\"{}\".\"{TABLE}\"", self.schema)
    }
}

/// The raw statements, prepared once per connection (sqlx's statement cache),
/// on the store's pool.
struct PgRaw {
    pool: PgPool,
    table: String,
    claim: Arc<str>,
    complete: Arc<str>,
    read: Arc<str>,
}

impl PgRaw {
    fn expiry() -> i64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or_default();
        now + RAW_TTL_MS as i64
    }
}

#[async_trait]
impl Raw for PgRaw {
    async fn claim(&self, key: &[u8; 32], value: &Bytes) -> Result<bool, BenchError> {
        let done = sqlx::query(AssertSqlSafe(Arc::clone(&self.claim)))
            .bind(&key[..])
            .bind(value.as_ref())
            .bind(Self::expiry())
            .execute(&self.pool)
            .await
            .map_err(failed)?;
        Ok(done.rows_affected() == 1)
    }

    async fn complete(&self, key: &[u8; 32], value: &Bytes) -> Result<(), BenchError> {
        let done = sqlx::query(AssertSqlSafe(Arc::clone(&self.complete)))
            .bind(&key[..])
            .bind(value.as_ref())
            .bind(Self::expiry())
            .execute(&self.pool)
            .await
            .map_err(failed)?;
        if done.rows_affected() != 1 {
            return Err(BenchError::Failed("raw UPDATE matched no row".into()));
        }
        Ok(())
    }

    async fn read(&self, key: &[u8; 32]) -> Result<Option<usize>, BenchError> {
        let row = sqlx::query(AssertSqlSafe(Arc::clone(&self.read)))
            .bind(&key[..])
            .fetch_optional(&self.pool)
            .await
            .map_err(failed)?;
        match row {
            None => Ok(None),
            Some(row) => {
                let value: Vec<u8> = row.try_get(0).map_err(failed)?;
                Ok(Some(value.len()))
            }
        }
    }

    async fn fill(&self, n: u64, value: &Bytes) -> Result<(), BenchError> {
        let statement = format!(
            "INSERT INTO {} (key, value, expires_at) \
             SELECT sha256(convert_to($1 || '-' || g::text, 'UTF8')), $2, $3 \
             FROM generate_series($4::bigint, $5::bigint) g",
            self.table
        );
        let salt = format!(
            "{:016x}",
            std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), n)
        );
        let mut i = 0;
        while i < n {
            let end = (i + 100_000).min(n);
            sqlx::query(sql(statement.clone()))
                .bind(&salt)
                .bind(value.as_ref())
                .bind(Self::expiry())
                .bind(i64::try_from(i).unwrap_or(i64::MAX))
                .bind(i64::try_from(end - 1).unwrap_or(i64::MAX))
                .execute(&self.pool)
                .await
                .map_err(failed)?;
            i = end;
        }
        sqlx::raw_sql(sql(format!("VACUUM (ANALYZE) {}", self.table)))
            .execute(&self.pool)
            .await
            .map_err(failed)?;
        Ok(())
    }

    async fn data_bytes(&self) -> Result<Option<u64>, BenchError> {
        relation_bytes(&self.pool, &self.table).await.map(Some)
    }
}

async fn relation_bytes(pool: &PgPool, table: &str) -> Result<u64, BenchError> {
    let bytes: i64 = sqlx::query_scalar("SELECT pg_total_relation_size($1::regclass)")
        .bind(table)
        .fetch_one(pool)
        .await
        .map_err(failed)?;
    Ok(u64::try_from(bytes).unwrap_or(0))
}

#[async_trait]
impl Instance for PostgresInstance {
    fn store(&self) -> Arc<dyn Store> {
        Arc::new(self.store.clone())
    }

    async fn raw(&self) -> Result<Arc<dyn Raw>, BenchError> {
        let table = format!("\"{}\".raw_bench", self.schema);
        // The data any SQL idempotency table needs: key, value, expiry, and
        // an index on the expiry for purging (the store has one too).
        for ddl in [
            format!(
                "CREATE TABLE IF NOT EXISTS {table} (key BYTEA PRIMARY KEY, value BYTEA NOT NULL, expires_at BIGINT NOT NULL)"
            ),
            format!("CREATE INDEX IF NOT EXISTS raw_bench_expires ON {table} (expires_at)"),
        ] {
            sqlx::query(sql(ddl))
                .execute(&self.pool)
                .await
                .map_err(failed)?;
        }
        Ok(Arc::new(PgRaw {
            pool: self.pool.clone(),
            claim: Arc::from(format!(
                "INSERT INTO {table} (key, value, expires_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING"
            )),
            complete: Arc::from(format!(
                "UPDATE {table} SET value = $2, expires_at = $3 WHERE key = $1"
            )),
            read: Arc::from(format!("SELECT value FROM {table} WHERE key = $1")),
            table,
        }))
    }

    async fn live_records(&self) -> Result<u64, BenchError> {
        let n: i64 = sqlx::query_scalar(sql(format!("SELECT count(*) FROM {}", self.records())))
            .fetch_one(&self.pool)
            .await
            .map_err(failed)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn clone_records(&self, template: &RecordKey, n: u64) -> Result<(), BenchError> {
        // Every column copied from the template row, but the primary key.
        let columns: Vec<String> = sqlx::query_scalar(
            "SELECT column_name::text FROM information_schema.columns \
             WHERE table_schema = $1 AND table_name = $2 ORDER BY ordinal_position",
        )
        .bind(&self.schema)
        .bind(TABLE)
        .fetch_all(&self.pool)
        .await
        .map_err(failed)?;
        if !columns.iter().any(|c| c == "digest") {
            return Err(BenchError::Failed(format!(
                "{} has no digest column: cannot clone records",
                self.records()
            )));
        }
        let quoted: Vec<String> = columns.iter().map(|c| format!("\"{c}\"")).collect();
        let select: Vec<String> = columns
            .iter()
            .map(|c| {
                if c == "digest" {
                    // 32 random-looking bytes, like a blake3 digest.
                    "sha256(convert_to($2 || '-' || g::text, 'UTF8'))".to_string()
                } else {
                    format!("t.\"{c}\"")
                }
            })
            .collect();
        let statement = format!(
            "INSERT INTO {records} ({cols}) SELECT {select} FROM {records} t, \
             generate_series($3::bigint, $4::bigint) g WHERE t.digest = $1",
            records = self.records(),
            cols = quoted.join(", "),
            select = select.join(", "),
        );
        let start = self
            .cloned
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        let salt = format!("{:016x}", self.salt);
        let mut i = 0;
        while i < n {
            let end = (i + 100_000).min(n);
            let done = sqlx::query(sql(statement.clone()))
                .bind(&template.digest()[..])
                .bind(&salt)
                .bind(i64::try_from(start + i).unwrap_or(i64::MAX))
                .bind(i64::try_from(start + end - 1).unwrap_or(i64::MAX))
                .execute(&self.pool)
                .await
                .map_err(failed)?;
            if done.rows_affected() != end - i {
                return Err(BenchError::Failed(format!(
                    "cloned {} rows instead of {}",
                    done.rows_affected(),
                    end - i
                )));
            }
            i = end;
        }
        // Hint bits, visibility map and statistics, as autovacuum would
        // leave them in production.
        sqlx::raw_sql(sql(format!("VACUUM (ANALYZE) {}", self.records())))
            .execute(&self.pool)
            .await
            .map_err(failed)?;
        Ok(())
    }

    async fn data_bytes(&self) -> Result<Option<u64>, BenchError> {
        relation_bytes(&self.pool, &self.records()).await.map(Some)
    }

    async fn settle(&self) -> Result<(), BenchError> {
        // Write out what bulk loads and dropped schemas left dirty. Needs
        // superuser or pg_checkpoint; without it, measurements may pay for it.
        let _ = sqlx::raw_sql("CHECKPOINT").execute(&self.pool).await;
        Ok(())
    }

    async fn server_pids(&self) -> Vec<u32> {
        let pids: Vec<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND datname = current_database()",
        )
        .bind(APP_NAME)
        .fetch_all(&self.pool)
        .await
        .unwrap_or_default();
        pids.into_iter()
            .filter_map(|p| u32::try_from(p).ok())
            .filter(|&p| crate::cpu::comm(p).is_some_and(|c| c.starts_with("postgres")))
            .collect()
    }

    fn notes(&self) -> Vec<String> {
        vec![format!(
            "one PgPool of {POOL_SIZE} connections (PostgresStore::pool_options) shared by the store and the raw statements; raw table (key BYTEA PRIMARY KEY, value BYTEA, expires_at BIGINT) with an index on expires_at like the store's"
        )]
    }

    async fn close(&self) -> Result<(), BenchError> {
        let dropped = sqlx::query(sql(format!(
            "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
            self.schema
        )))
        .execute(&self.pool)
        .await
        .map_err(failed);
        self.pool.close().await;
        dropped.map(drop)
    }
}
