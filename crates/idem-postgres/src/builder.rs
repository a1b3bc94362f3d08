//! [`PostgresStoreBuilder`]: the options of a [`PostgresStore`] (table,
//! timeout, record size limit, claim mode), and their defaults.

use std::time::Duration;

use sqlx::postgres::PgPool;

use crate::PostgresError;
use crate::{PostgresStore, TableName};

/// The default limit of one record, in bytes (see [`PostgresStoreBuilder::with_max_record_bytes`]).
pub const DEFAULT_MAX_RECORD_BYTES: usize = 64 * 1024 * 1024;

/// The largest limit accepted: PostgreSQL refuses a `bytea` value over 1 GB;
/// this leaves room for the rest of the row and the protocol.
pub const MAX_RECORD_BYTES_CEILING: usize = 1024 * 1024 * 1024 - 1024 * 1024;

/// The default bound on one store call (see [`PostgresStoreBuilder::with_timeout`]).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// How [`Store::insert_if_absent`](idem_core::store::Store::insert_if_absent) (the claim in [`Engine::begin`]) asks the
/// server.
///
/// # Behavior
/// Both modes are atomic and linearizable per key and pass the same
/// conformance suite; they differ only in round trips and server work:
///
/// | | new key | replay or "in progress" |
/// |---|---|---|
/// | [`SingleStatement`](Self::SingleStatement) | 1 statement | 1 statement (the claim statement, which writes nothing) |
/// | [`ReadFirst`](Self::ReadFirst) | 2 (a `SELECT` that finds nothing, then a plain `INSERT … ON CONFLICT`) | 1 plain `SELECT` |
///
/// The single claim statement (a data-modifying CTE) costs the server about
/// half as much again as a plain `SELECT` even when it inserts nothing, and
/// binds 16 parameters where the `SELECT` binds 2. `ReadFirst` therefore
/// serves a replay with 25–30% less CPU (client and server), and pays one
/// more round trip for each new key (about 50 µs on loopback).
/// docs/benchmarks.md measures both.
///
/// [`Engine::begin`]: idem_core::Engine::begin
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ClaimMode {
    /// One statement per claim, whatever it finds (the default): the fewest
    /// round trips for new keys, which are most of the traffic.
    #[default]
    SingleStatement,
    /// A `SELECT` of the live record first, an insert only when there is
    /// none: cheaper replays (retry storms, redelivered messages), one more
    /// round trip per new key.
    ReadFirst,
}

/// Options for a [`PostgresStore`]; start with [`PostgresStore::builder`].
///
/// # Behavior
/// - [`with_table`](Self::with_table): where the records live (default
///   `idem.idempotency_records`).
/// - [`with_timeout`](Self::with_timeout): the bound on each store call
///   (default [`DEFAULT_TIMEOUT`]).
/// - [`with_max_record_bytes`](Self::with_max_record_bytes): the largest
///   record accepted (default [`DEFAULT_MAX_RECORD_BYTES`]).
/// - [`with_claim_mode`](Self::with_claim_mode): how a claim asks the server
///   (default [`ClaimMode::SingleStatement`]).
/// - [`open`](Self::open) makes a store over the application's pool; it is
///   infallible: it checks nothing and sends nothing (the table name was
///   validated by [`TableName::new`]; call
///   [`migrate`](PostgresStore::migrate) to create the table).
///   [`connect`](Self::connect) dials a new pool with
///   [`PostgresStore::pool_options`] first.
///
/// ```no_run
/// use std::time::Duration;
/// use idem_postgres::{ClaimMode, PostgresStore, TableName};
///
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = PostgresStore::pool_options()
///     .connect("postgres://postgres@127.0.0.1:5432/app")
///     .await?;
/// let store = PostgresStore::builder()
///     .with_table(TableName::new("billing", "idempotency")?)
///     .with_timeout(Some(Duration::from_secs(2)))
///     .with_claim_mode(ClaimMode::ReadFirst)
///     .open(pool.clone()); // the application keeps using `pool`
/// store.migrate().await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct PostgresStoreBuilder {
    pub(crate) table: TableName,
    pub(crate) timeout: Option<Duration>,
    pub(crate) max_record_bytes: usize,
    pub(crate) claim: ClaimMode,
}

impl Default for PostgresStoreBuilder {
    fn default() -> Self {
        Self {
            table: TableName::default(),
            timeout: Some(DEFAULT_TIMEOUT),
            max_record_bytes: DEFAULT_MAX_RECORD_BYTES,
            claim: ClaimMode::default(),
        }
    }
}

impl PostgresStoreBuilder {
    /// The schema and table of the records (default
    /// `idem.idempotency_records`).
    #[must_use]
    pub fn with_table(mut self, table: TableName) -> Self {
        self.table = table;
        self
    }

    /// Bounds every call by `timeout` (`None`: no bound; default
    /// [`DEFAULT_TIMEOUT`]).
    ///
    /// # Behavior
    /// One budget per call, covering the wait for a pooled connection and
    /// every statement of the call.
    /// A call that runs out of time is [`StoreError::Unavailable`](idem_core::StoreError::Unavailable); it may or
    /// may not have taken effect (every primitive is conditional, so the
    /// engine's retries are safe), and its connection is closed.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self
    }

    /// Refuses records larger than `bytes` (default
    /// [`DEFAULT_MAX_RECORD_BYTES`], at most [`MAX_RECORD_BYTES_CEILING`]).
    ///
    /// # Behavior
    /// A larger record is [`StoreError::Rejected`](idem_core::StoreError::Rejected) before anything is sent.
    #[must_use]
    pub fn with_max_record_bytes(mut self, bytes: usize) -> Self {
        self.max_record_bytes = bytes.min(MAX_RECORD_BYTES_CEILING);
        self
    }

    /// Claims keys in `mode` (default [`ClaimMode::SingleStatement`]).
    ///
    /// # Behavior
    /// Changes only how many statements a claim takes (see [`ClaimMode`]);
    /// stores in either mode can share one table at the same time.
    #[must_use]
    pub fn with_claim_mode(mut self, mode: ClaimMode) -> Self {
        self.claim = mode;
        self
    }

    /// A store with these options over `pool` (shared with the application).
    ///
    /// # Behavior
    /// Infallible and immediate: sends nothing. Run
    /// [`migrate`](PostgresStore::migrate) once to create the table.
    pub fn open(&self, pool: PgPool) -> PostgresStore {
        PostgresStore::assemble(pool, self)
    }

    /// Connects a new pool to `url` with [`PostgresStore::pool_options`] and
    /// returns a store with these options over it.
    ///
    /// # Behavior
    /// An unreachable server is a transient [`PostgresError`]
    /// ([`StoreError::Unavailable`](idem_core::StoreError::Unavailable) once converted); a malformed URL a
    /// permanent one ([`StoreError::Generic`](idem_core::StoreError::Generic)). Does not migrate.
    pub async fn connect(&self, url: &str) -> Result<PostgresStore, PostgresError> {
        let pool = PostgresStore::pool_options()
            .connect(url)
            .await
            .map_err(|e| PostgresError::driver(e, &self.table))?;
        Ok(self.open(pool))
    }
}
