//! The PostgreSQL test factory shared by the test targets.
//!
//! Server: `IDEM_POSTGRES_URL` (default [`DEFAULT_URL`]). Every store gets a
//! schema of its own, `idem_test_<pid>_<run>_<n>`; the schemas this process
//! created are dropped when the factory is dropped (at the end of the run),
//! and no other schema is ever touched.
#![allow(dead_code)]

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use idem_conformance::{StoreFactory, Unavailable};
use idem_core::RecordKey;
use idem_postgres::sqlx::postgres::{PgConnectOptions, PgPool};
use idem_postgres::sqlx::{self, AssertSqlSafe, ConnectOptions, Connection, Executor};
use idem_postgres::{ClaimMode, PostgresStore, TableName};

/// The local server (trust auth), used when `IDEM_POSTGRES_URL` is unset.
pub(crate) const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The table name inside each test schema.
pub(crate) const TABLE: &str = "records";

/// How long `open` waits for the server before calling it unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The server URL for this run.
pub(crate) fn url() -> String {
    std::env::var("IDEM_POSTGRES_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_URL.to_string())
}

/// Fresh isolated stores, one schema each, all claiming in one [`ClaimMode`].
pub(crate) struct Factory {
    url: String,
    mode: ClaimMode,
    run: String,
    next: AtomicU64,
    created: Mutex<Vec<String>>,
}

impl Default for Factory {
    fn default() -> Self {
        Self::new()
    }
}

impl Factory {
    /// Stores in the default mode, [`ClaimMode::SingleStatement`].
    pub(crate) fn new() -> Self {
        Self::with_mode(ClaimMode::SingleStatement)
    }

    /// Stores in [`ClaimMode::ReadFirst`].
    pub(crate) fn read_first() -> Self {
        Self::with_mode(ClaimMode::ReadFirst)
    }

    fn with_mode(mode: ClaimMode) -> Self {
        use std::hash::BuildHasher;
        let random = std::collections::hash_map::RandomState::new().hash_one(std::process::id());
        Self {
            url: url(),
            mode,
            run: format!("{:08x}", random & 0xffff_ffff),
            next: AtomicU64::new(0),
            created: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    fn unreachable(&self, e: impl std::fmt::Display) -> Unavailable {
        Unavailable(format!(
            "PostgreSQL not reachable at {} (set IDEM_POSTGRES_URL): {e}",
            self.url
        ))
    }

    /// A pool of up to `max` connections to the test server, checked reachable.
    pub(crate) async fn pool(&self, max: u32) -> Result<PgPool, Unavailable> {
        let options = PgConnectOptions::from_str(&self.url).map_err(|e| self.unreachable(e))?;
        // One direct connection first: it reports the real cause (refused,
        // unknown host, bad role), where a pool would only time out.
        match tokio::time::timeout(CONNECT_TIMEOUT, options.connect()).await {
            Ok(Ok(conn)) => {
                let _ = conn.close().await;
            }
            Ok(Err(e)) => return Err(self.unreachable(e)),
            Err(_) => {
                return Err(self.unreachable(format!("no answer within {CONNECT_TIMEOUT:?}")));
            }
        }
        let pool = PostgresStore::pool_options()
            .max_connections(max)
            // Generous: 2 shared cores, many racing tasks.
            .acquire_timeout(Duration::from_secs(60))
            .connect_lazy_with(options);
        Ok(pool)
    }

    /// A new, unique schema name (recorded for clean-up), not yet created.
    pub(crate) fn fresh_schema(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let name = format!("idem_test_{}_{}_{n}", std::process::id(), self.run);
        self.created
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(name.clone());
        name
    }

    /// A migrated store in a fresh schema, over its own pool.
    pub(crate) async fn store(&self) -> Result<PostgresStore, Unavailable> {
        let pool = self.pool(8).await?;
        let table = TableName::new(self.fresh_schema(), TABLE).map_err(|e| self.unreachable(e))?;
        let store = PostgresStore::with_table(pool, table).with_claim_mode(self.mode);
        store
            .migrate()
            .await
            .map_err(|e| Unavailable(format!("migrate failed on {}: {e} ({e:?})", self.url)))?;
        Ok(store)
    }

    /// A second store over `store`'s table, through a pool of its own.
    pub(crate) async fn second(&self, store: &PostgresStore) -> Result<PostgresStore, Unavailable> {
        let pool = self.pool(8).await?;
        Ok(PostgresStore::with_table(pool, store.table().clone()).with_claim_mode(self.mode))
    }
}

#[async_trait]
impl StoreFactory for Factory {
    type Store = PostgresStore;

    fn name(&self) -> &'static str {
        match self.mode {
            ClaimMode::ReadFirst => "postgres-read-first",
            _ => "postgres",
        }
    }

    async fn open(&self) -> Result<PostgresStore, Unavailable> {
        self.store().await
    }

    async fn reopen(&self, store: &PostgresStore) -> Result<Option<PostgresStore>, Unavailable> {
        self.second(store).await.map(Some)
    }

    fn can_corrupt(&self) -> bool {
        true
    }

    async fn corrupt(&self, store: &PostgresStore, key: &RecordKey) -> Result<(), Unavailable> {
        // A fingerprint of 3 bytes: typed columns, yet not a record.
        let sql = format!(
            "UPDATE {} SET fingerprint = '\\x0bad00'::bytea WHERE digest = $1",
            store.table()
        );
        let done = sqlx::query(AssertSqlSafe(sql))
            .bind(&key.digest()[..])
            .execute(store.pool())
            .await
            .map_err(|e| Unavailable(format!("corrupt failed: {e}")))?;
        if done.rows_affected() == 1 {
            Ok(())
        } else {
            Err(Unavailable(format!(
                "corrupt: no row under the key ({} rows)",
                done.rows_affected()
            )))
        }
    }
}

impl Drop for Factory {
    fn drop(&mut self) {
        let schemas =
            std::mem::take(&mut *self.created.lock().unwrap_or_else(PoisonError::into_inner));
        if schemas.is_empty() {
            return;
        }
        // The last reference may be dropped inside a case's runtime: clean
        // up on a thread of our own, with a runtime of its own.
        let url = self.url.clone();
        let cleanup = std::thread::spawn(move || -> Result<(), String> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async move {
                let options = PgConnectOptions::from_str(&url).map_err(|e| e.to_string())?;
                let mut conn = tokio::time::timeout(CONNECT_TIMEOUT, options.connect())
                    .await
                    .map_err(|_| "connect timed out".to_string())?
                    .map_err(|e| e.to_string())?;
                for schema in &schemas {
                    // Only names this factory generated (idem_test_<pid>_<run>_<n>).
                    let sql = format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE");
                    conn.execute(AssertSqlSafe(sql))
                        .await
                        .map_err(|e| format!("{schema}: {e}"))?;
                }
                conn.close().await.map_err(|e| e.to_string())
            })
        });
        let result = cleanup
            .join()
            .unwrap_or_else(|_| Err("the clean-up thread panicked".to_string()));
        if let Err(e) = result {
            eprintln!("idem-postgres tests: could not drop every test schema: {e}");
        }
    }
}

/// Rows in `table` of `store`'s schema (raw SQL, for assertions).
pub(crate) async fn count(store: &PostgresStore, sql_from_where: &str) -> i64 {
    let sql = format!("SELECT count(*) FROM {sql_from_where}");
    sqlx::query_scalar::<_, i64>(AssertSqlSafe(sql))
        .fetch_one(store.pool())
        .await
        .expect("count query")
}
