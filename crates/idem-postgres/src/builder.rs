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
/// Every mode is atomic and linearizable per key and passes the same
/// conformance suite; stores in different modes can share one table at the
/// same time. They differ only in statements (round trips) and server work:
///
/// | | new key | replay, "in progress" or mismatch |
/// |---|---|---|
/// | [`Adaptive`](Self::Adaptive) (default), while most claims find no record | 1 (a plain `INSERT … ON CONFLICT (digest) DO NOTHING`) | 2 (that insert, which finds the record and writes nothing, then a plain `SELECT`) |
/// | [`Adaptive`](Self::Adaptive), while most claims find a live record | 2 (a `SELECT` that finds nothing, then a plain `INSERT … ON CONFLICT`) | 1 (a plain `SELECT`) |
/// | [`ReadFirst`](Self::ReadFirst) | 2 (as above) | 1 (a plain `SELECT`) |
/// | [`SingleStatement`](Self::SingleStatement) | 1 (a data-modifying CTE) | 1 (the same CTE, which writes nothing) |
///
/// A claim over an expired record that was not purged yet takes one more
/// statement when it starts with the plain insert (3), and 1 with
/// [`SingleStatement`](Self::SingleStatement). In every mode a replay writes
/// nothing: no row lock, no WAL, no commit flush.
///
/// The single claim statement costs the server about 1.7 times a plain
/// `SELECT` when it finds a record, and about a quarter more than the plain
/// insert when it inserts: every execution starts the `INSERT` with its `ON
/// CONFLICT … DO UPDATE` projection, the CTE scans and the portal that
/// materialises a data-modifying statement's result, whatever it then
/// does. [`Adaptive`](Self::Adaptive) uses the plain statements only, in
/// the order the traffic favours; docs/benchmarks.md measures every mode.
///
/// [`Engine::begin`]: idem_core::Engine::begin
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ClaimMode {
    /// One statement per claim, whatever it finds: the fewest round trips
    /// for a mix of new keys and duplicates, at the highest server cost per
    /// statement.
    SingleStatement,
    /// A `SELECT` of the live record first, an insert only when there is
    /// none: the cheapest replays (retry storms, redelivered messages), one
    /// more round trip per new key.
    ReadFirst,
    /// The default: a plain insert first while most of the store's recent
    /// claims carried new keys, a `SELECT` first while most found a live
    /// record.
    ///
    /// # Behavior
    /// - Each store (and its clones) keeps an exponentially weighted share
    ///   of its claims that found a live record, updated lock-free after
    ///   every claim; each claim weighs 1/16. Claims read first once the
    ///   share reaches 5/8 and insert first again once it falls to 3/8, so
    ///   16 claims of the other kind in a row switch the way from either
    ///   extreme, and a mix near one half (where both ways cost the same)
    ///   does not make the store switch back and forth.
    /// - A new store inserts first.
    ///   [`PostgresStore::reads_first`](crate::PostgresStore::reads_first)
    ///   tells which way the next claim starts.
    /// - Which way a claim starts changes only its cost, never its result.
    #[default]
    Adaptive,
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
///   (default [`ClaimMode::Adaptive`]).
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

    /// Claims keys in `mode` (default [`ClaimMode::Adaptive`]).
    ///
    /// # Behavior
    /// Changes only how many statements a claim takes (see [`ClaimMode`]);
    /// stores in different modes can share one table at the same time.
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
