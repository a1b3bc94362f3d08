//! Choosing the store by URL, and the ledger that goes with it.
//!
//! | URL | idempotency records | payments ledger |
//! |---|---|---|
//! | `sqlite://PATH` (or `sqlite://` for a temporary directory) | table `idem_records` in PATH | table `payments` in PATH, same transaction |
//! | `postgres://…` | `<schema>.idempotency_records` | `<schema>.payments`, same transaction |
//! | `redis://…` | keys `<prefix><digest>` | table `payments` in a separate SQLite file (`--ledger`) |

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use idem_core::{Engine, Policy, Transition};
use idem_postgres::sqlx::{self, AssertSqlSafe, PgPool, Row};
use idem_postgres::{PostgresStore, TableName as PgTableName};
use idem_redis::{RedisConfig, RedisStore};
use idem_sqlite::rusqlite::{Connection, OptionalExtension, TransactionBehavior};
use idem_sqlite::{SqliteError, SqliteStore};
use tempfile::TempDir;

use crate::DemoError;
use crate::app::{self, CrashPlan, EffectLog, Ledger, LedgerError, Payment};

/// The default PostgreSQL schema of the demo.
pub const DEFAULT_PG_SCHEMA: &str = "idem_demo";

/// The default Redis key prefix of the demo.
pub const DEFAULT_REDIS_PREFIX: &str = "idem-demo:";

/// The default idempotency lease.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(10);

/// Where the idempotency records live, by URL.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreUrl {
    /// `sqlite://PATH`; `None` (`sqlite://`) for a file in a temporary directory.
    Sqlite(Option<PathBuf>),
    /// `postgres://…` or `postgresql://…`.
    Postgres(String),
    /// `redis://…` or `rediss://…`.
    Redis(String),
}

impl StoreUrl {
    /// Parses `sqlite://PATH` (`sqlite:///abs/path` for an absolute path,
    /// `sqlite://` for a temporary directory), `postgres://…`,
    /// `postgresql://…`, `redis://…`, `rediss://…`.
    pub fn parse(url: &str) -> Result<Self, DemoError> {
        let invalid = |reason| DemoError::InvalidStoreUrl {
            url: redact(url),
            reason,
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| invalid("expected sqlite://PATH, postgres://… or redis://…"))?;
        match scheme.to_ascii_lowercase().as_str() {
            "sqlite" if rest.is_empty() => Ok(Self::Sqlite(None)),
            "sqlite" => Ok(Self::Sqlite(Some(PathBuf::from(rest)))),
            "postgres" | "postgresql" => Ok(Self::Postgres(url.to_string())),
            "redis" | "rediss" => Ok(Self::Redis(url.to_string())),
            _ => Err(invalid(
                "unknown scheme: expected sqlite://, postgres:// or redis://",
            )),
        }
    }

    /// `sqlite`, `postgres` or `redis`.
    pub fn backend(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "sqlite",
            Self::Postgres(_) => "postgres",
            Self::Redis(_) => "redis",
        }
    }
}

impl Default for StoreUrl {
    fn default() -> Self {
        Self::Sqlite(None)
    }
}

impl std::str::FromStr for StoreUrl {
    type Err = DemoError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sqlite(None) => f.write_str("sqlite:// (temporary directory)"),
            Self::Sqlite(Some(path)) => write!(f, "sqlite://{}", path.display()),
            Self::Postgres(url) | Self::Redis(url) => f.write_str(&redact(url)),
        }
    }
}

/// `url` with the password, if any, replaced by `***`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}{path}")
        }
        _ => url.to_string(),
    }
}

/// Everything besides the URL that the backends need.
#[derive(Clone, Debug)]
pub struct BackendOptions {
    /// How long a claim holds without a heartbeat (the layer renews it every
    /// third of it while the handler runs); after a crash, the time before a
    /// retry can take the key over.
    pub lease: Duration,
    /// The PostgreSQL schema of the demo's tables (created if absent).
    pub pg_schema: String,
    /// The largest PostgreSQL pool.
    pub pg_max_connections: u32,
    /// The Redis key prefix of the demo's records.
    pub redis_prefix: String,
    /// With Redis: the SQLite file of the payments ledger (default: a file
    /// in a temporary directory).
    pub ledger: Option<PathBuf>,
    /// The external effect: the file each charge appends
    /// `<tenant> <key> <payment id>` to before the ledger write (see
    /// [`EffectLog`]); none by default.
    pub effect_log: Option<PathBuf>,
    /// Test-only fault injection.
    pub crash: CrashPlan,
}

impl Default for BackendOptions {
    fn default() -> Self {
        Self {
            lease: DEFAULT_LEASE,
            pg_schema: DEFAULT_PG_SCHEMA.to_string(),
            pg_max_connections: 16,
            redis_prefix: DEFAULT_REDIS_PREFIX.to_string(),
            ledger: None,
            effect_log: None,
            crash: CrashPlan::default(),
        }
    }
}

/// An opened store and ledger, ready to serve.
pub struct Backend {
    router: Router,
    name: &'static str,
    description: Vec<String>,
    exactly_once: bool,
    _temp: Option<TempDir>,
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backend")
            .field("name", &self.name)
            .field("description", &self.description)
            .finish_non_exhaustive()
    }
}

impl Backend {
    /// Opens the store named by `url` and its ledger, creating (migrating)
    /// their tables.
    ///
    /// # Behavior
    /// - SQLite: one file (created if absent) holds both the idempotency
    ///   records and the ledger; a temporary directory, removed when the
    ///   backend is dropped, for `sqlite://`.
    /// - PostgreSQL: the schema `options.pg_schema` holds both; nothing
    ///   outside it is touched.
    /// - Redis: records under `options.redis_prefix`; the ledger is the
    ///   SQLite file `options.ledger` (a temporary one by default).
    /// - With `options.effect_log`, that file is opened for appending (created
    ///   if absent) and every charge appends its line to it first.
    pub async fn open(url: &StoreUrl, options: &BackendOptions) -> Result<Self, DemoError> {
        if options.lease < Duration::from_millis(30) {
            return Err(DemoError::InvalidOption(
                "the lease must be at least 30 ms".to_string(),
            ));
        }
        let effects = match &options.effect_log {
            Some(path) => Some(EffectLog::open(path).map_err(|e| {
                DemoError::InvalidOption(format!("effect log {}: {e}", path.display()))
            })?),
            None => None,
        };
        let mut backend = Self::open_store(url, options, effects.clone()).await?;
        if let Some(effects) = &effects {
            backend.description.push(format!(
                "external effect: each charge appends `<tenant> <key> <payment id>` to {} before the ledger write (outside the store's transaction: at least once on a crash)",
                effects.path().display()
            ));
        }
        Ok(backend)
    }

    async fn open_store(
        url: &StoreUrl,
        options: &BackendOptions,
        effects: Option<EffectLog>,
    ) -> Result<Self, DemoError> {
        let policy = Policy::default().with_lease(options.lease);
        match url {
            StoreUrl::Sqlite(path) => {
                let (path, temp) = match path {
                    Some(path) => (path.clone(), None),
                    None => {
                        let dir = tempfile::Builder::new().prefix("idem-demo-").tempdir()?;
                        (dir.path().join("idem-demo.db"), Some(dir))
                    }
                };
                let store = SqliteStore::open(&path)?;
                let ledger = SqliteLedger::new(store.clone()).await?;
                let engine = Arc::new(Engine::new(store).with_policy(policy)?);
                Ok(Self {
                    router: app::router(engine, Arc::new(ledger), options.crash, effects, "sqlite"),
                    name: "sqlite",
                    description: vec![
                        format!("store: SQLite, {}", path.display()),
                        "ledger: table `payments` in the same file; each charge commits in the same transaction as its idempotency record (exactly once)".to_string(),
                    ],
                    exactly_once: true,
                    _temp: temp,
                })
            }
            StoreUrl::Postgres(url) => {
                let pool = PostgresStore::pool_options()
                    .max_connections(options.pg_max_connections.max(2))
                    .acquire_timeout(Duration::from_secs(5))
                    .connect(url)
                    .await?;
                let records = PgTableName::new(&options.pg_schema, "idempotency_records")?;
                let payments = PgTableName::new(&options.pg_schema, "payments")?;
                let store = PostgresStore::with_table(pool.clone(), records.clone());
                store.migrate().await.map_err(|source| DemoError::Store {
                    backend: "postgres",
                    source,
                })?;
                let ledger = PostgresLedger::new(pool, store.clone(), &payments).await?;
                let engine = Arc::new(Engine::new(store).with_policy(policy)?);
                Ok(Self {
                    router: app::router(
                        engine,
                        Arc::new(ledger),
                        options.crash,
                        effects,
                        "postgres",
                    ),
                    name: "postgres",
                    description: vec![
                        format!("store: PostgreSQL {}, table {records}", redact(url)),
                        format!(
                            "ledger: table {payments} in the same database; each charge commits in the same transaction as its idempotency record (exactly once)"
                        ),
                    ],
                    exactly_once: true,
                    _temp: None,
                })
            }
            StoreUrl::Redis(url) => {
                let config = RedisConfig::new().with_prefix(options.redis_prefix.clone());
                let store =
                    RedisStore::connect(url, config)
                        .await
                        .map_err(|source| DemoError::Store {
                            backend: "redis",
                            source,
                        })?;
                let (path, temp) = match &options.ledger {
                    Some(path) => (path.clone(), None),
                    None => {
                        let dir = tempfile::Builder::new().prefix("idem-demo-").tempdir()?;
                        (dir.path().join("ledger.db"), Some(dir))
                    }
                };
                let ledger = FileLedger::open(&path).await?;
                let engine = Arc::new(Engine::new(store).with_policy(policy)?);
                Ok(Self {
                    router: app::router(engine, Arc::new(ledger), options.crash, effects, "redis"),
                    name: "redis",
                    description: vec![
                        format!(
                            "store: Redis {}, key prefix {:?}",
                            redact(url),
                            options.redis_prefix
                        ),
                        format!(
                            "ledger: SQLite file {} (NOT in Redis's transaction: a crash between the charge and the completion of the key charges again once the lease lapses — the at-least-once window)",
                            path.display()
                        ),
                    ],
                    exactly_once: false,
                    _temp: temp,
                })
            }
        }
    }

    /// The service.
    pub fn router(&self) -> Router {
        self.router.clone()
    }

    /// `sqlite`, `postgres` or `redis`.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// What was opened, one line per item, for the console.
    pub fn description(&self) -> &[String] {
        &self.description
    }

    /// Whether each charge commits with its idempotency record (SQLite,
    /// PostgreSQL), so that even a crash cannot charge twice.
    pub fn exactly_once(&self) -> bool {
        self.exactly_once
    }
}

// ---------------------------------------------------------------------------
// SQLite ledgers

const SQLITE_LEDGER_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS payments (\
        seq INTEGER PRIMARY KEY, \
        id TEXT NOT NULL UNIQUE, \
        tenant TEXT NOT NULL, \
        idempotency_key TEXT NOT NULL, \
        amount INTEGER NOT NULL, \
        currency TEXT NOT NULL, \
        customer TEXT NOT NULL, \
        created_at TEXT NOT NULL); \
    CREATE INDEX IF NOT EXISTS payments_tenant ON payments (tenant, seq);";

fn sqlite_insert(conn: &Connection, tenant: &str, p: &Payment) -> Result<(), LedgerError> {
    let amount = i64::try_from(p.amount).map_err(|_| LedgerError::Row("amount".into()))?;
    conn.execute(
        "INSERT INTO payments (id, tenant, idempotency_key, amount, currency, customer, created_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        (
            &p.id,
            tenant,
            &p.idempotency_key,
            amount,
            &p.currency,
            &p.customer,
            &p.created_at,
        ),
    )?;
    Ok(())
}

fn sqlite_list(conn: &Connection, tenant: &str) -> Result<Vec<Payment>, LedgerError> {
    let mut statement = conn.prepare_cached(
        "SELECT id, amount, currency, customer, idempotency_key, created_at \
         FROM payments WHERE tenant = ?1 ORDER BY seq",
    )?;
    let rows = statement.query_map([tenant], |row| {
        Ok((
            row.get::<_, String>(0)?,
            row.get::<_, i64>(1)?,
            row.get::<_, String>(2)?,
            row.get::<_, String>(3)?,
            row.get::<_, String>(4)?,
            row.get::<_, String>(5)?,
        ))
    })?;
    let mut payments = Vec::new();
    for row in rows {
        let (id, amount, currency, customer, idempotency_key, created_at) = row?;
        payments.push(Payment {
            amount: u64::try_from(amount)
                .map_err(|_| LedgerError::Row(format!("payment {id}: negative amount")))?,
            id,
            currency,
            customer,
            idempotency_key,
            created_at,
        });
    }
    Ok(payments)
}

/// The ledger in the idempotency store's own SQLite file, written through
/// the store's writer connection, one transaction per charge.
struct SqliteLedger {
    store: SqliteStore,
}

impl SqliteLedger {
    async fn new(store: SqliteStore) -> Result<Self, LedgerError> {
        store
            .transaction(|tx| -> Result<(), SqliteError> {
                Ok(tx.execute_batch(SQLITE_LEDGER_SCHEMA)?)
            })
            .await?;
        Ok(Self { store })
    }
}

#[async_trait]
impl Ledger for SqliteLedger {
    fn transactional(&self) -> bool {
        true
    }

    async fn charge(
        &self,
        tenant: &str,
        payment: &Payment,
        completion: Option<&Transition>,
        delay: Duration,
        crash: CrashPlan,
    ) -> Result<(), LedgerError> {
        // The card network call happens before the transaction: SQLite has
        // one writer, and a transaction held open for `delay` would hold up
        // every other request.
        tokio::time::sleep(delay).await;
        let (store, tenant, payment, completion) = (
            self.store.clone(),
            tenant.to_string(),
            payment.clone(),
            completion.cloned(),
        );
        self.store
            .transaction(move |tx| -> Result<(), LedgerError> {
                sqlite_insert(tx, &tenant, &payment)?;
                CrashPlan::maybe_crash(crash.in_charge, "inside the charge transaction");
                if let Some(completion) = &completion {
                    store.apply_in(tx, completion)?;
                }
                Ok(())
            })
            .await
    }

    async fn list(&self, tenant: &str) -> Result<Vec<Payment>, LedgerError> {
        let tenant = tenant.to_string();
        self.store
            .transaction(move |tx| sqlite_list(tx, &tenant))
            .await
    }
}

/// A ledger in a SQLite file of its own (with the Redis store): the charge
/// commits on its own, before the key is completed in Redis.
struct FileLedger {
    conn: Arc<Mutex<Connection>>,
}

impl FileLedger {
    async fn open(path: &Path) -> Result<Self, LedgerError> {
        let path = path.to_path_buf();
        let conn = tokio::task::spawn_blocking(move || -> Result<Connection, LedgerError> {
            let conn = Connection::open(&path)?;
            conn.busy_timeout(Duration::from_secs(5))?;
            let _mode: Option<String> = conn
                .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
                .optional()?;
            conn.execute_batch("PRAGMA synchronous = FULL;")?;
            conn.execute_batch(SQLITE_LEDGER_SCHEMA)?;
            Ok(conn)
        })
        .await??;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    async fn with_conn<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<R, LedgerError> + Send + 'static,
    ) -> Result<R, LedgerError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
            f(&mut conn)
        })
        .await?
    }
}

#[async_trait]
impl Ledger for FileLedger {
    fn transactional(&self) -> bool {
        false
    }

    async fn charge(
        &self,
        tenant: &str,
        payment: &Payment,
        _completion: Option<&Transition>,
        delay: Duration,
        crash: CrashPlan,
    ) -> Result<(), LedgerError> {
        tokio::time::sleep(delay).await;
        let (tenant, payment) = (tenant.to_string(), payment.clone());
        self.with_conn(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            sqlite_insert(&tx, &tenant, &payment)?;
            CrashPlan::maybe_crash(crash.in_charge, "inside the charge transaction");
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn list(&self, tenant: &str) -> Result<Vec<Payment>, LedgerError> {
        let tenant = tenant.to_string();
        self.with_conn(move |conn| sqlite_list(conn, &tenant)).await
    }
}

// ---------------------------------------------------------------------------
// PostgreSQL ledger

/// The ledger in the idempotency store's PostgreSQL schema; each charge and
/// its idempotency record commit in one transaction.
struct PostgresLedger {
    pool: PgPool,
    store: PostgresStore,
    insert: String,
    list: String,
}

impl PostgresLedger {
    async fn new(
        pool: PgPool,
        store: PostgresStore,
        table: &PgTableName,
    ) -> Result<Self, LedgerError> {
        // Identifiers come from a validated `TableName` (quoted by Display).
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(table.to_string())
            .execute(&mut *tx)
            .await?;
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE IF NOT EXISTS {table} (\
                seq BIGSERIAL PRIMARY KEY, \
                id TEXT NOT NULL UNIQUE, \
                tenant TEXT NOT NULL, \
                idempotency_key TEXT NOT NULL, \
                amount BIGINT NOT NULL, \
                currency TEXT NOT NULL, \
                customer TEXT NOT NULL, \
                created_at TEXT NOT NULL)"
        )))
        .execute(&mut *tx)
        .await?;
        let index = format!("\"{}_tenant\"", table.table());
        sqlx::query(AssertSqlSafe(format!(
            "CREATE INDEX IF NOT EXISTS {index} ON {table} (tenant, seq)"
        )))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Self {
            pool,
            store,
            insert: format!(
                "INSERT INTO {table} (id, tenant, idempotency_key, amount, currency, customer, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)"
            ),
            list: format!(
                "SELECT id, amount, currency, customer, idempotency_key, created_at \
                 FROM {table} WHERE tenant = $1 ORDER BY seq"
            ),
        })
    }
}

#[async_trait]
impl Ledger for PostgresLedger {
    fn transactional(&self) -> bool {
        true
    }

    async fn charge(
        &self,
        tenant: &str,
        payment: &Payment,
        completion: Option<&Transition>,
        delay: Duration,
        crash: CrashPlan,
    ) -> Result<(), LedgerError> {
        let amount =
            i64::try_from(payment.amount).map_err(|_| LedgerError::Row("amount".into()))?;
        let mut tx = self.pool.begin().await?;
        sqlx::query(AssertSqlSafe(self.insert.clone()))
            .bind(&payment.id)
            .bind(tenant)
            .bind(&payment.idempotency_key)
            .bind(amount)
            .bind(&payment.currency)
            .bind(&payment.customer)
            .bind(&payment.created_at)
            .execute(&mut *tx)
            .await?;
        // The card network call, while the payment row is written but not
        // committed: a crash now rolls it back with the transaction.
        tokio::time::sleep(delay).await;
        CrashPlan::maybe_crash(crash.in_charge, "inside the charge transaction");
        if let Some(completion) = completion {
            self.store.apply_in(&mut tx, completion).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn list(&self, tenant: &str) -> Result<Vec<Payment>, LedgerError> {
        let rows = sqlx::query(AssertSqlSafe(self.list.clone()))
            .bind(tenant)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter()
            .map(|row| {
                let id: String = row.try_get(0)?;
                let amount: i64 = row.try_get(1)?;
                Ok(Payment {
                    amount: u64::try_from(amount)
                        .map_err(|_| LedgerError::Row(format!("payment {id}: negative amount")))?,
                    id,
                    currency: row.try_get(2)?,
                    customer: row.try_get(3)?,
                    idempotency_key: row.try_get(4)?,
                    created_at: row.try_get(5)?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn store_urls() {
        assert_eq!(
            StoreUrl::parse("sqlite://").unwrap(),
            StoreUrl::Sqlite(None)
        );
        assert_eq!(
            StoreUrl::parse("sqlite://data/app.db").unwrap(),
            StoreUrl::Sqlite(Some("data/app.db".into()))
        );
        assert_eq!(
            StoreUrl::parse("sqlite:///tmp/app.db").unwrap(),
            StoreUrl::Sqlite(Some("/tmp/app.db".into()))
        );
        assert_eq!(
            StoreUrl::parse("postgres://u@h/db").unwrap().backend(),
            "postgres"
        );
        assert_eq!(
            StoreUrl::parse("redis://127.0.0.1:6379").unwrap().backend(),
            "redis"
        );
        assert!(StoreUrl::parse("mysql://x").is_err());
        assert!(StoreUrl::parse("payments.db").is_err());
        let shown = StoreUrl::parse("postgres://bob:secret@h:5432/db")
            .unwrap()
            .to_string();
        assert_eq!(shown, "postgres://bob:***@h:5432/db");
        let err = StoreUrl::parse("ftp://bob:secret@h/")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("secret"), "{err}");
    }
}
