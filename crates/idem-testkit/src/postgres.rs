//! PostgreSQL chores: a connection with a bounded wait, unique schema
//! names, dropping schemas (only the ones named here), and the test server
//! behind a fault proxy.

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use idem_faults::FaultProxy;
use idem_postgres::sqlx::postgres::{PgConnectOptions, PgConnection, PgPool};
use idem_postgres::sqlx::{self, AssertSqlSafe, ConnectOptions, Connection};
use idem_postgres::{PostgresStore, TableName};

/// How long [`drop_schema`] waits for the server.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Every schema [`fresh_schema`] names starts with this.
pub const SCHEMA_PREFIX: &str = "idem_test_";

/// A schema name no other test (of this process or another) uses:
/// `idem_test_<pid>_<random>_<n>`. Only names; nothing is created.
pub fn fresh_schema() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{SCHEMA_PREFIX}{}_{n}", crate::run_id())
}

/// The connection options of `url`.
pub fn options(url: &str) -> Result<PgConnectOptions, String> {
    PgConnectOptions::from_str(url).map_err(|e| e.to_string())
}

/// One connection to `url`, waiting at most `limit`; the error is the
/// cause (refused, unknown host, bad role, no answer).
pub async fn connect(url: &str, limit: Duration) -> Result<PgConnection, String> {
    let options = options(url)?;
    match tokio::time::timeout(limit, options.connect()).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {limit:?}")),
    }
}

/// Runs `sql` on a new connection to `url`.
async fn execute(url: &str, sql: String) -> Result<(), String> {
    let mut conn = connect(url, CONNECT_TIMEOUT).await?;
    let done = sqlx::query(AssertSqlSafe(sql)).execute(&mut conn).await;
    let _ = conn.close().await;
    done.map(drop).map_err(|e| e.to_string())
}

/// Refuses anything but a plain identifier (`[a-z0-9_]`, not starting with
/// a digit): the name is interpolated into SQL.
fn plain(schema: &str) -> Result<&str, String> {
    let ok = !schema.is_empty()
        && schema
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !schema.as_bytes()[0].is_ascii_digit();
    if ok {
        Ok(schema)
    } else {
        Err(format!(
            "refusing schema name {schema:?}: not a plain identifier"
        ))
    }
}

/// Drops `schema` and everything in it, if present. The caller names only
/// schemas its tests created.
pub async fn drop_schema(url: &str, schema: &str) -> Result<(), String> {
    let schema = plain(schema)?;
    execute(url, format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .await
        .map_err(|e| format!("drop schema {schema}: {e}"))
}

/// How many rows `table` (a validated, quoted `TableName`) holds.
pub async fn count(pool: &PgPool, table: &TableName) -> Result<u64, String> {
    let sql = format!("SELECT count(*) FROM {table}");
    sqlx::query_scalar::<_, i64>(AssertSqlSafe(sql))
        .fetch_one(pool)
        .await
        .map(|n| u64::try_from(n).unwrap_or(0))
        .map_err(|e| e.to_string())
}

/// A [`FaultProxy`] in front of the test server (`IDEM_POSTGRES_URL`).
pub async fn proxy() -> FaultProxy {
    let opts = options(&crate::env::postgres_url()).expect("IDEM_POSTGRES_URL");
    let addr = tokio::net::lookup_host((opts.get_host(), opts.get_port()))
        .await
        .expect("resolve the PostgreSQL server")
        .next()
        .expect("an address for the PostgreSQL server");
    FaultProxy::start(addr)
        .await
        .expect("start the fault proxy")
}

/// A store over `table` whose one connection goes through `proxy` (in
/// front of the test server), every call bounded by `timeout`.
///
/// One connection: statements warmed up on it stay prepared, so a fault
/// switched on afterwards hits the statement itself (a first use would be a
/// `Parse` round trip first).
pub fn store_via(proxy: &FaultProxy, table: &TableName, timeout: Duration) -> PostgresStore {
    let opts = options(&crate::env::postgres_url())
        .expect("IDEM_POSTGRES_URL")
        .host(&proxy.addr().ip().to_string())
        .port(proxy.addr().port());
    let pool = PostgresStore::pool_options()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy_with(opts);
    PostgresStore::builder()
        .with_table(table.clone())
        .with_timeout(Some(timeout))
        .open(pool)
}

/// Waits (at most 10 s) until every connection of `store`'s pool is back
/// and idle. sqlx pings a connection when it returns to the pool, in a
/// background task; a fault switched on during that ping would hit the
/// ping, not the call under test.
pub async fn settled(store: &PostgresStore) {
    let limit = Duration::from_secs(10);
    let pool = store.pool();
    crate::fixtures::poll_until("the pool's connections to come back", limit, || {
        pool.num_idle() >= pool.size() as usize
    })
    .await;
}
