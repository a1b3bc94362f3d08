//! `idem-postgres`, against `INSERT … ON CONFLICT DO NOTHING` + `UPDATE …
//! WHERE key = $1` (and `SELECT`) on the same `PgPool`.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use idem_core::RecordKey;
use idem_core::store::Store;
use idem_postgres::{ClaimMode, PostgresStore};
use idem_testkit::{BackendKind, Isolated, StoreUrl, Unavailable};
use sqlx::{AssertSqlSafe, PgPool, Row};

use crate::backend::{Backend, Instance, Raw};
use crate::scenario::raw_expiry;
use crate::{BenchError, Workload};

/// Connections of the pool both sides share.
pub(crate) const POOL_SIZE: u32 = 16;
/// The pool's `application_name`, by which [`Instance::server_pids`] finds
/// the server processes.
const APP_NAME: &str = "idem-bench";

pub(crate) struct PostgresBackend {
    /// How the store claims keys: `None` for the store's default (the
    /// `postgres` target); `postgres-read-first` and
    /// `postgres-single-statement` are the same backend in another mode.
    pub(crate) mode: Option<ClaimMode>,
}

fn failed(e: impl std::fmt::Display) -> BenchError {
    BenchError::Failed(format!("postgres: {e}"))
}

fn unreachable(e: Unavailable) -> BenchError {
    BenchError::Unreachable(e.to_string())
}

/// The environment's server (see [`idem_testkit::env`]) with the bench's
/// pool size, claim mode and `application_name`.
fn url(mode: Option<ClaimMode>) -> Result<StoreUrl, BenchError> {
    let StoreUrl::Postgres(server) = BackendKind::Postgres.url().map_err(unreachable)? else {
        return Err(failed("not a PostgreSQL URL"));
    };
    // A driver parameter: it passes through to sqlx.
    let base = server.connection_url();
    let sep = if base.contains('?') { '&' } else { '?' };
    let mut url =
        StoreUrl::parse(&format!("{base}{sep}application_name={APP_NAME}")).map_err(failed)?;
    if let StoreUrl::Postgres(pg) = &mut url {
        pg.max_connections = Some(POOL_SIZE);
        pg.claim_mode = match mode {
            None => None,
            Some(ClaimMode::ReadFirst) => Some(idemkit::ClaimMode::ReadFirst),
            Some(ClaimMode::SingleStatement) => Some(idemkit::ClaimMode::SingleStatement),
            Some(other) => {
                return Err(failed(format!(
                    "claim mode {other:?} cannot be named in a URL"
                )));
            }
        };
    }
    Ok(url)
}

fn sql(text: String) -> AssertSqlSafe<Arc<str>> {
    AssertSqlSafe(Arc::from(text))
}

#[async_trait]
impl Backend for PostgresBackend {
    fn name(&self) -> &'static str {
        match self.mode {
            None => "postgres",
            Some(ClaimMode::ReadFirst) => "postgres-read-first",
            Some(ClaimMode::SingleStatement) => "postgres-single-statement",
            Some(_) => "postgres-other-mode",
        }
    }

    fn measures(&self, workload: Workload) -> bool {
        // Only the claim differs between the modes.
        self.mode.is_none()
            || matches!(
                workload,
                Workload::Fresh | Workload::Replay | Workload::HotKey
            )
    }

    async fn open(&self) -> Result<Box<dyn Instance>, BenchError> {
        // One direct attempt first (bounded): the real cause of an
        // unreachable server, which opening would report as a failure.
        BackendKind::Postgres.probe().await.map_err(unreachable)?;
        let url = url(self.mode)?;
        // Opening migrates the table, and `PostgresStore::migrate()`'s
        // future is not `Send` (sqlx's migrator is not general enough over
        // lifetimes), so it cannot be awaited in this boxed `Send` future:
        // open on a blocking thread.
        let handle = tokio::runtime::Handle::current();
        let isolated =
            tokio::task::spawn_blocking(move || handle.block_on(Isolated::open_url(url)))
                .await
                .map_err(failed)?
                .map_err(failed)?;
        let store = isolated.postgres().clone();
        let salt = std::hash::BuildHasher::hash_one(
            &std::collections::hash_map::RandomState::new(),
            std::process::id(),
        );
        Ok(Box::new(PostgresInstance {
            pool: store.pool().clone(),
            store,
            isolated,
            salt,
            cloned: std::sync::atomic::AtomicU64::new(0),
        }))
    }
}

struct PostgresInstance {
    store: PostgresStore,
    pool: PgPool,
    /// The schema of its own, dropped by [`Instance::close`].
    isolated: Isolated,
    salt: u64,
    cloned: std::sync::atomic::AtomicU64,
}

impl PostgresInstance {
    fn records(&self) -> String {
        self.store.table().to_string()
    }

    fn schema(&self) -> &str {
        self.store.table().schema()
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
    /// Runs the claim or completion `statement` for `key` and `value`: rows
    /// affected.
    async fn write(
        &self,
        statement: &Arc<str>,
        key: &[u8; 32],
        value: &Bytes,
    ) -> Result<u64, BenchError> {
        let done = sqlx::query(AssertSqlSafe(Arc::clone(statement)))
            .bind(&key[..])
            .bind(value.as_ref())
            .bind(raw_expiry())
            .execute(&self.pool)
            .await
            .map_err(failed)?;
        Ok(done.rows_affected())
    }
}

#[async_trait]
impl Raw for PgRaw {
    async fn claim(&self, key: &[u8; 32], value: &Bytes) -> Result<bool, BenchError> {
        Ok(self.write(&self.claim, key, value).await? == 1)
    }

    async fn complete(&self, key: &[u8; 32], value: &Bytes) -> Result<(), BenchError> {
        if self.write(&self.complete, key, value).await? != 1 {
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
                .bind(raw_expiry())
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
        let table = format!("\"{}\".raw_bench", self.schema());
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
        self.isolated.records().await.map_err(failed)
    }

    async fn clone_records(&self, template: &RecordKey, n: u64) -> Result<(), BenchError> {
        // Every column copied from the template row, but the primary key.
        let columns: Vec<String> = sqlx::query_scalar(
            "SELECT column_name::text FROM information_schema.columns \
             WHERE table_schema = $1 AND table_name = $2 ORDER BY ordinal_position",
        )
        .bind(self.schema())
        .bind(self.store.table().table())
        .fetch_all(&self.pool)
        .await
        .map_err(failed)?;
        // 32 random-looking bytes, like a blake3 digest.
        let digest = "sha256(convert_to($2 || '-' || g::text, 'UTF8'))";
        let (cols, select) = super::clone_columns(&self.records(), &columns, digest)?;
        let statement = format!(
            "INSERT INTO {records} ({cols}) SELECT {select} FROM {records} t, \
             generate_series($3::bigint, $4::bigint) g WHERE t.digest = $1",
            records = self.records(),
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

    async fn server_version(&self) -> Option<String> {
        let version: String = sqlx::query_scalar("SHOW server_version")
            .fetch_one(&self.pool)
            .await
            .ok()?;
        // `15.8 (Debian 15.8-0+deb12u1)`: the number is what matters.
        let number = version.split_whitespace().next()?;
        Some(format!("PostgreSQL {number}"))
    }

    fn notes(&self) -> Vec<String> {
        vec![
            format!("store claim mode: {:?}", self.store.claim_mode()),
            format!(
                "one PgPool of {POOL_SIZE} connections (PostgresStore::pool_options) shared by the store and the raw statements; raw table (key BYTEA PRIMARY KEY, value BYTEA, expires_at BIGINT) with an index on expires_at like the store's"
            ),
        ]
    }

    async fn close(self: Box<Self>) -> Result<(), BenchError> {
        self.pool.close().await;
        self.isolated.close().await.map_err(failed)
    }
}
