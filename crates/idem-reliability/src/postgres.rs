//! PostgreSQL fixtures: stores in schemas of their own, stores behind a
//! fault proxy, and the clean-up of every schema this process created.
//!
//! Server: `IDEM_POSTGRES_URL` (default [`DEFAULT_URL`]). Every store gets
//! the schema `idem_rel_<pid>_<random>_<n>` (table `records`); the harness
//! drops exactly those schemas at the end of the run, nothing else.

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use idem_faults::FaultProxy;
use idem_postgres::sqlx::postgres::{PgConnectOptions, PgPool};
use idem_postgres::sqlx::{AssertSqlSafe, ConnectOptions, Connection, Executor};
use idem_postgres::{PostgresStore, TableName};

/// The local server (trust auth), used when `IDEM_POSTGRES_URL` is unset.
pub const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The table name inside each test schema.
pub const TABLE: &str = "records";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

static NEXT: AtomicU64 = AtomicU64::new(0);
static CREATED: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// The server URL for this run.
pub fn url() -> String {
    std::env::var("IDEM_POSTGRES_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_URL.to_string())
}

/// The connection options of [`url`].
pub fn options() -> PgConnectOptions {
    PgConnectOptions::from_str(&url()).expect("IDEM_POSTGRES_URL is a valid PostgreSQL URL")
}

/// Connects once (3 s at most), or says why the server cannot be used.
pub async fn probe() -> Result<(), String> {
    let unreachable = |e: String| {
        format!(
            "PostgreSQL not reachable at {} (set IDEM_POSTGRES_URL): {e}",
            url()
        )
    };
    let options = PgConnectOptions::from_str(&url()).map_err(|e| unreachable(e.to_string()))?;
    match tokio::time::timeout(CONNECT_TIMEOUT, options.connect()).await {
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
            Ok(())
        }
        Ok(Err(e)) => Err(unreachable(e.to_string())),
        Err(_) => Err(unreachable(format!("no answer within {CONNECT_TIMEOUT:?}"))),
    }
}

/// A fresh table name in a new, unique schema (recorded for clean-up; not
/// created yet: [`PostgresStore::migrate`] creates it).
pub fn fresh_table() -> TableName {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let schema = format!("idem_rel_{}_{n}", crate::run_id());
    CREATED
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(schema.clone());
    TableName::new(schema, TABLE).expect("a valid generated schema name")
}

/// A lazy pool of up to `max` connections to the test server.
pub fn pool(max: u32) -> PgPool {
    PostgresStore::pool_options()
        .max_connections(max)
        // Generous: 2 shared cores, many racing tasks.
        .acquire_timeout(Duration::from_secs(30))
        .connect_lazy_with(options())
}

/// A migrated store in a fresh schema, over a pool of its own.
pub async fn store() -> PostgresStore {
    let store = PostgresStore::with_table(pool(8), fresh_table());
    store.migrate().await.expect("migrate the test schema");
    store
}

/// A second store over `store`'s table, through a pool of its own.
pub async fn second(store: &PostgresStore) -> PostgresStore {
    PostgresStore::with_table(pool(8), store.table().clone())
}

/// A [`FaultProxy`] in front of the test server.
pub async fn proxy() -> FaultProxy {
    let opts = options();
    let addr = tokio::net::lookup_host((opts.get_host(), opts.get_port()))
        .await
        .expect("resolve the PostgreSQL server")
        .next()
        .expect("an address for the PostgreSQL server");
    FaultProxy::start(addr)
        .await
        .expect("start the fault proxy")
}

/// A store over `table` whose one connection goes through `proxy`, every call
/// bounded by `timeout` ([`PostgresStore::with_timeout`]).
///
/// One connection: statements warmed up on it stay prepared, so a fault
/// switched on afterwards hits the statement itself (a first use would be a
/// `Parse` round trip first).
pub fn store_via(proxy: &FaultProxy, table: &TableName, timeout: Duration) -> PostgresStore {
    let opts = options()
        .host(&proxy.addr().ip().to_string())
        .port(proxy.addr().port());
    let pool = PostgresStore::pool_options()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy_with(opts);
    PostgresStore::with_table(pool, table.clone()).with_timeout(Some(timeout))
}

/// Waits until every connection of `store`'s pool is back and idle. sqlx
/// pings a connection when it returns to the pool, in a background task; a
/// fault switched on during that ping would hit the ping, not the call
/// under test.
pub async fn settled(store: &PostgresStore) {
    crate::wait::until_true(
        "the pool's connections to come back",
        Duration::from_secs(10),
        || async { store.pool().num_idle() >= store.pool().size() as usize },
    )
    .await;
}

/// Drops every schema this process created (names generated by
/// [`fresh_table`] only). Called by the harness at the end of the run.
pub(crate) async fn cleanup() -> Result<usize, String> {
    let schemas = std::mem::take(&mut *CREATED.lock().unwrap_or_else(PoisonError::into_inner));
    if schemas.is_empty() {
        return Ok(0);
    }
    let mut conn = tokio::time::timeout(CONNECT_TIMEOUT, options().connect())
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    for schema in &schemas {
        // Only names generated by `fresh_table` (idem_rel_<pid>_<random>_<n>).
        let sql = format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE");
        conn.execute(AssertSqlSafe(sql))
            .await
            .map_err(|e| format!("{schema}: {e}"))?;
    }
    let _ = conn.close().await;
    Ok(schemas.len())
}
