//! Opening the store a URL names (parsed by [`idemkit`]), and the ledger
//! that goes with it.
//!
//! | URL | idempotency records | payments and orders ledger |
//! |---|---|---|
//! | `sqlite://PATH` (or `sqlite://` for a temporary directory) | table `idem_records` in PATH | tables `payments`, `order_*` in PATH, same transaction |
//! | `postgres://…` | `<schema>.idempotency_records` | `<schema>.payments`, `<schema>.order_*`, same transaction |
//! | `redis://…`, `redis+cluster://…`, `memory://` | keys `<prefix><digest>` (or this process's memory) | tables `payments`, `order_*` in a separate SQLite file (`--ledger`) |
//!
//! Store options are the URL's query parameters (see [`idemkit`]): for
//! example `sqlite://payments.db?durability=normal` or
//! `postgres://…?schema=billing`. `--pg-schema`, `--pg-max-connections`
//! and `--redis-prefix` apply when the URL does not set `schema`,
//! `max_connections` or `prefix`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use idem_core::{Engine, Policy};
use idem_postgres::TableName as PgTableName;
pub use idemkit::StoreUrl;
use idemkit::{AnyStore, Opened};
use tempfile::TempDir;

use crate::DemoError;
use crate::app::{self, AppParts, CardNetworkClient, CrashPlan, EffectLog, OrderCompleter};

mod postgres_ledger;
mod postgres_orders;
mod sqlite_ledger;
mod sqlite_orders;

use postgres_ledger::PostgresLedger;
use postgres_orders::PostgresOrders;
use sqlite_ledger::{FileLedger, SqliteLedger};
use sqlite_orders::{FileOrders, SqliteOrders};

/// The default PostgreSQL schema of the demo.
pub const DEFAULT_PG_SCHEMA: &str = "idem_demo";

/// The default Redis key prefix of the demo.
pub const DEFAULT_REDIS_PREFIX: &str = "idem-demo:";

/// The default idempotency lease.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(10);

/// The stock each sku is seeded with on its first reservation, by default.
pub const DEFAULT_STOCK: u64 = 1_000_000_000;

/// Everything besides the URL that the backends need.
#[derive(Clone, Debug)]
pub struct BackendOptions {
    /// How long a claim holds without a heartbeat (the layer renews it every
    /// third of it while the handler runs); after a crash, the time before a
    /// retry can take the key over.
    pub lease: Duration,
    /// The PostgreSQL schema of the demo's tables (created if absent), when
    /// the URL sets no `schema`.
    pub pg_schema: String,
    /// The largest PostgreSQL pool, when the URL sets no `max_connections`.
    pub pg_max_connections: u32,
    /// The Redis key prefix of the demo's records, when the URL sets no
    /// `prefix`.
    pub redis_prefix: String,
    /// With Redis (or memory): the SQLite file of the payments ledger
    /// (default: a file in a temporary directory).
    pub ledger: Option<PathBuf>,
    /// The external effect: the file each charge appends
    /// `<tenant> <key> <payment id>` to before the ledger write (see
    /// [`EffectLog`]); none by default.
    pub effect_log: Option<PathBuf>,
    /// Test-only fault injection.
    pub crash: CrashPlan,
    /// The stock each sku is seeded with on its first reservation.
    pub stock: u64,
    /// The card network orders are charged at (`http://HOST:PORT`); without
    /// one, `POST /orders` answers 503.
    pub card_network: Option<String>,
    /// Whether to build the completer of abandoned orders
    /// ([`Backend::completer`], run by [`RunningServer`](crate::RunningServer)).
    pub completer: bool,
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
            stock: DEFAULT_STOCK,
            card_network: None,
            completer: false,
        }
    }
}

impl BackendOptions {
    /// `url` with the demo's defaults filled in where it sets nothing.
    fn apply(&self, url: &StoreUrl) -> StoreUrl {
        let mut url = url.clone();
        match &mut url {
            StoreUrl::Postgres(pg) => {
                pg.schema.get_or_insert_with(|| self.pg_schema.clone());
                let max = pg.max_connections.unwrap_or(self.pg_max_connections);
                pg.max_connections = Some(max.max(2));
                pg.migrate = true;
            }
            StoreUrl::Redis(r) => {
                r.prefix.get_or_insert_with(|| self.redis_prefix.clone());
            }
            _ => {}
        }
        url
    }
}

/// An opened store and ledger, ready to serve.
pub struct Backend {
    router: Router,
    completer: Option<OrderCompleter>,
    name: &'static str,
    description: Vec<String>,
    exactly_once: bool,
    _store: Opened,
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
    /// - PostgreSQL: the schema (the URL's `schema`, else
    ///   `options.pg_schema`) holds both; nothing outside it is touched.
    /// - Redis (standalone or cluster) and memory: records under the URL's
    ///   `prefix` (else `options.redis_prefix`); the ledger is the SQLite
    ///   file `options.ledger` (a temporary one by default).
    /// - With `options.effect_log`, that file is opened for appending (created
    ///   if absent) and every charge appends its line to it first.
    /// - The orders' ledger is beside the payments' (same database, or the
    ///   same separate SQLite file); with `options.completer`, the
    ///   [`completer`](Self::completer) of abandoned orders is built (it
    ///   needs a store that can list abandoned keys: all of the demo's).
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
        let card_network = options
            .card_network
            .as_deref()
            .map(CardNetworkClient::new)
            .transpose()?;
        let mut backend =
            Self::open_store(&options.apply(url), options, effects.clone(), card_network).await?;
        match &options.card_network {
            Some(url) => backend
                .description
                .push(format!("card network: {url} (orders are charged there)")),
            None => backend
                .description
                .push("card network: none (POST /orders answers 503)".to_string()),
        }
        if backend.completer.is_some() {
            backend.description.push(
                "completer: on (orders abandoned mid-way are finished in the background)"
                    .to_string(),
            );
        }
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
        card_network: Option<CardNetworkClient>,
    ) -> Result<Self, DemoError> {
        let policy = Policy::default().with_lease(options.lease);
        let opened = url.open().await?;
        let parts = |ledger: Arc<dyn app::Ledger>,
                     orders: Arc<dyn app::OrderLedger>,
                     backend: &'static str| AppParts {
            ledger,
            orders,
            card_network: card_network.clone(),
            crash: options.crash,
            effects: effects.clone(),
            backend,
            completer: options.completer,
        };
        match opened.store().clone() {
            AnyStore::Sqlite(store) => {
                let path = store.path().map(Path::to_path_buf).unwrap_or_default();
                let ledger = SqliteLedger::new(store.clone()).await?;
                let orders = SqliteOrders::new(store.clone(), options.stock).await?;
                let engine = Arc::new(Engine::new(store).with_policy(policy)?);
                let app = app::build(engine, parts(Arc::new(ledger), Arc::new(orders), "sqlite"));
                Ok(Self {
                    router: app.router,
                    completer: app.completer,
                    name: "sqlite",
                    description: vec![
                        format!("store: SQLite, {}", path.display()),
                        "ledger: tables `payments` and `order_*` in the same file; each charge, and each order's reservation and receipt, commits in the same transaction as its idempotency record (exactly once)".to_string(),
                    ],
                    exactly_once: true,
                    _store: opened,
                    _temp: None,
                })
            }
            AnyStore::Postgres(store) => {
                let records = store.table().clone();
                let payments = PgTableName::new(records.schema(), "payments")?;
                let ledger =
                    PostgresLedger::new(store.pool().clone(), store.clone(), &payments).await?;
                let orders = PostgresOrders::new(
                    store.pool().clone(),
                    store.clone(),
                    records.schema(),
                    options.stock,
                )
                .await?;
                let engine = Arc::new(Engine::new(store).with_policy(policy)?);
                let app = app::build(
                    engine,
                    parts(Arc::new(ledger), Arc::new(orders), "postgres"),
                );
                Ok(Self {
                    router: app.router,
                    completer: app.completer,
                    name: "postgres",
                    description: vec![
                        format!("store: {url}, table {records}"),
                        format!(
                            "ledger: tables {payments} and order_* in the same schema; each charge, and each order's reservation and receipt, commits in the same transaction as its idempotency record (exactly once)"
                        ),
                    ],
                    exactly_once: true,
                    _store: opened,
                    _temp: None,
                })
            }
            store => {
                let (path, temp) = match &options.ledger {
                    Some(path) => (path.clone(), None),
                    None => {
                        let dir = tempfile::Builder::new().prefix("idem-demo-").tempdir()?;
                        (dir.path().join("ledger.db"), Some(dir))
                    }
                };
                let ledger = FileLedger::open(&path).await?;
                let orders = FileOrders::open(&path, options.stock).await?;
                let (name, records) = match &store {
                    AnyStore::Redis(r) => (
                        "redis",
                        format!("store: {url}, key prefix {:?}", r.prefix()),
                    ),
                    _ => (
                        "memory",
                        "store: memory://, in this process (gone when it exits)".to_string(),
                    ),
                };
                let engine = Arc::new(Engine::new(opened.erased()).with_policy(policy)?);
                let app = app::build(engine, parts(Arc::new(ledger), Arc::new(orders), name));
                Ok(Self {
                    router: app.router,
                    completer: app.completer,
                    name,
                    description: vec![
                        records,
                        format!(
                            "ledger: SQLite file {} (NOT in the store's transaction: a crash between a payment's charge and the completion of its key charges again once the lease lapses — the at-least-once window; orders are written with phases, each write idempotent by its key: reserved and charged once)",
                            path.display()
                        ),
                    ],
                    exactly_once: false,
                    _store: opened,
                    _temp: temp,
                })
            }
        }
    }

    /// The service.
    pub fn router(&self) -> Router {
        self.router.clone()
    }

    /// The completer of abandoned orders, if
    /// [`BackendOptions::completer`] asked for it.
    pub fn completer(&self) -> Option<&OrderCompleter> {
        self.completer.as_ref()
    }

    /// `sqlite`, `postgres`, `redis` or `memory`.
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn store_urls() {
        let options = BackendOptions::default();
        // The demo's defaults where the URL sets nothing…
        let StoreUrl::Postgres(pg) =
            options.apply(&StoreUrl::parse("postgres://u@h/db?migrate=false").unwrap())
        else {
            panic!("not postgres")
        };
        assert_eq!(pg.schema.as_deref(), Some(DEFAULT_PG_SCHEMA));
        assert_eq!(pg.max_connections, Some(16));
        assert!(pg.migrate, "the demo always creates its tables");
        let StoreUrl::Redis(r) = options.apply(&StoreUrl::parse("redis://h:6379").unwrap()) else {
            panic!("not redis")
        };
        assert_eq!(r.prefix.as_deref(), Some(DEFAULT_REDIS_PREFIX));
        // …and the URL's where it does.
        let StoreUrl::Postgres(pg) = options
            .apply(&StoreUrl::parse("postgres://u@h/db?schema=billing&max_connections=1").unwrap())
        else {
            panic!("not postgres")
        };
        assert_eq!(pg.schema.as_deref(), Some("billing"));
        assert_eq!(pg.max_connections, Some(2), "at least 2 connections");
        let url = StoreUrl::parse("sqlite://data/app.db").unwrap();
        assert_eq!(options.apply(&url), url);
        // A bad URL is refused with its reason, password hidden.
        let err = StoreUrl::parse("ftp://bob:secret@h/")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("secret"), "{err}");
    }
}
