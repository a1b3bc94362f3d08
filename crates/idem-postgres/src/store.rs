//! [`PostgresStore`]: the store trait over a sqlx pool, plus completion
//! inside the caller's transaction.

use std::borrow::Cow;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use idem_core::{
    Capabilities, Error, Fenced, Inserted, RecordKey, Revision, Store, StoreError, Swapped,
    Timestamp, Transition, Versioned,
};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, Postgres, Row, SqlSafeStr};

use crate::TableName;
use crate::error;
use crate::row::{self, Columns, ts};
use crate::sql::{self, Statements};

/// The default limit of one record, in bytes (see [`PostgresStore::with_max_record_bytes`]).
pub const DEFAULT_MAX_RECORD_BYTES: usize = 64 * 1024 * 1024;

/// The largest limit accepted: PostgreSQL refuses a `bytea` value over 1 GB;
/// this leaves room for the rest of the row and the protocol.
pub const MAX_RECORD_BYTES_CEILING: usize = 1024 * 1024 * 1024 - 1024 * 1024;

/// The default bound on one store call (see [`PostgresStore::with_timeout`]).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a statement is re-run when its snapshot was older than a
/// concurrent commit (a race; see the crate docs) before giving up with a
/// transient error.
const ROUNDS: usize = 16;

/// How [`Store::insert_if_absent`] (the claim in [`Engine::begin`]) asks the
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

/// A [`Store`] in a PostgreSQL table, through a sqlx [`PgPool`] shared with
/// the application.
///
/// # Behavior
/// - One table (default `idem.idempotency_records`, see [`TableName`]) with
///   typed columns and an index on `expires_at`, created by
///   [`migrate`](Self::migrate).
/// - One statement per primitive on the happy path (one round trip once the
///   statement is prepared on the connection); statements are prepared once
///   per connection and cached by sqlx. See the crate docs for each
///   statement and the isolation reasoning.
/// - Every call is bounded by a timeout (default [`DEFAULT_TIMEOUT`]); an
///   unreachable server, a closed pool, a lost connection or a timeout is
///   [`StoreError::Unavailable`] (transient). A connection that timed out is
///   closed rather than returned to the pool.
/// - [`apply_in`](Self::apply_in) completes or fails a claim inside a
///   transaction (or on a connection) of the caller.
/// - Clones share the pool and the configuration.
///
/// ```no_run
/// use idem_core::{Engine, Fingerprint, IdempotencyKey, Scope};
/// use idem_postgres::PostgresStore;
///
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = PostgresStore::pool_options()
///     .max_connections(16)
///     .connect("postgres://postgres@127.0.0.1:5432/app")
///     .await?;
/// let store = PostgresStore::new(pool.clone()); // the application keeps using `pool`
/// store.migrate().await?;
/// let engine = Engine::new(store);
/// let scope = Scope::tenant("acme").with_operation("invoices.send");
/// let key = IdempotencyKey::parse("0b7c2ad1-5c1e-4ab5-9b1a-0d5f9a3f7e11")?;
/// let sent = engine
///     .execute(&scope, &key, Fingerprint::of(b"invoice 17"), || async { "sent".to_string() })
///     .await?;
/// println!("{}", sent.into_inner());
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

#[derive(Clone, Debug)]
struct Inner {
    pool: PgPool,
    table: TableName,
    sql: Arc<Statements>,
    timeout: Option<Duration>,
    max_record_bytes: usize,
    claim: ClaimMode,
}

impl PostgresStore {
    /// A store in the default table (`idem.idempotency_records`) over `pool`.
    pub fn new(pool: PgPool) -> Self {
        Self::with_table(pool, TableName::default())
    }

    /// A store in `table` over `pool`.
    pub fn with_table(pool: PgPool, table: TableName) -> Self {
        Self {
            inner: Arc::new(Inner {
                pool,
                sql: Arc::new(Statements::new(&table)),
                table,
                timeout: Some(DEFAULT_TIMEOUT),
                max_record_bytes: DEFAULT_MAX_RECORD_BYTES,
                claim: ClaimMode::default(),
            }),
        }
    }

    /// Connects a new pool to `url` with [`pool_options`](Self::pool_options)
    /// and returns a store in the default table over it.
    ///
    /// # Behavior
    /// An unreachable server is [`StoreError::Unavailable`]; a malformed URL
    /// is [`StoreError::Generic`].
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let pool = Self::pool_options()
            .connect(url)
            .await
            .map_err(|e| error::map(e, &TableName::default()))?;
        Ok(Self::new(pool))
    }

    /// The pool options this crate recommends: sqlx's defaults, but without
    /// `test_before_acquire` (which costs a ping, i.e. a second round trip,
    /// on every checkout: a dead connection is reported as
    /// [`StoreError::Unavailable`] and replaced instead) and with a 5 s
    /// acquire timeout.
    pub fn pool_options() -> PgPoolOptions {
        PgPoolOptions::new()
            .test_before_acquire(false)
            .acquire_timeout(Duration::from_secs(5))
    }

    /// The same store with every call bounded by `timeout` (`None`: no bound).
    ///
    /// # Behavior
    /// One budget per call, covering the wait for a pooled connection and
    /// every statement of the call.
    /// A call that runs out of time is [`StoreError::Unavailable`]; it may or
    /// may not have taken effect (every primitive is conditional, so the
    /// engine's retries are safe), and its connection is closed.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Option<Duration>) -> Self {
        Arc::make_mut(&mut self.inner).timeout = timeout;
        self
    }

    /// The same store refusing records larger than `bytes` (default
    /// [`DEFAULT_MAX_RECORD_BYTES`], at most [`MAX_RECORD_BYTES_CEILING`]).
    ///
    /// # Behavior
    /// A larger record is [`StoreError::Rejected`] before anything is sent.
    #[must_use]
    pub fn with_max_record_bytes(mut self, bytes: usize) -> Self {
        Arc::make_mut(&mut self.inner).max_record_bytes = bytes.min(MAX_RECORD_BYTES_CEILING);
        self
    }

    /// The same store claiming keys in `mode` (default
    /// [`ClaimMode::SingleStatement`]).
    ///
    /// # Behavior
    /// Changes only how many statements a claim takes (see [`ClaimMode`]);
    /// stores in either mode can share one table at the same time.
    #[must_use]
    pub fn with_claim_mode(mut self, mode: ClaimMode) -> Self {
        Arc::make_mut(&mut self.inner).claim = mode;
        self
    }

    /// How this store claims keys.
    pub fn claim_mode(&self) -> ClaimMode {
        self.inner.claim
    }

    /// The pool (shared with the application).
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// Where the records live.
    pub fn table(&self) -> &TableName {
        &self.inner.table
    }

    /// Creates or upgrades the schema, the table and its index.
    ///
    /// # Behavior
    /// - Runs the migrations shipped with this crate (`migrations/*.sql`)
    ///   with sqlx's migrator, bookkept in `<table>_migrations` in the same
    ///   schema. Idempotent, and safe to call from every instance at start-up:
    ///   concurrent calls are serialised by sqlx's advisory lock (one per
    ///   database).
    /// - A table migrated by a newer idem-postgres (an unknown migration) or
    ///   whose migrations were modified is [`StoreError::Rejected`].
    /// - Uses one connection of the pool, closed afterwards if anything failed
    ///   (so an advisory lock is never left held on a pooled connection).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let table = &self.inner.table;
        let migrations = sql::MIGRATIONS
            .iter()
            .map(|(version, description, template)| {
                Migration::new(
                    *version,
                    Cow::Borrowed(*description),
                    MigrationType::Simple,
                    AssertSqlSafe(sql::migration_sql(template, table)).into_sql_str(),
                    false,
                )
            })
            .collect();
        let mut migrator = Migrator::with_migrations(migrations);
        migrator.dangerous_set_table_name(table.quoted_migrations());
        migrator.create_schema(table.quoted_schema());
        let mut conn = self
            .inner
            .pool
            .acquire()
            .await
            .map_err(|e| error::map(e, table))?;
        // `run_direct` is what `Migrator::run` calls; called directly, the
        // future stays `Send` for every lifetime (sqlx's own workaround for
        // "implementation of `Acquire` is not general enough").
        match migrator.run_direct(None, &mut *conn, false).await {
            Ok(()) => Ok(()),
            Err(e) => {
                // Drop the session: sqlx does not release its advisory lock
                // when a migration fails.
                let _ = conn.close().await;
                Err(error::map_migrate(e, table))
            }
        }
    }

    /// Applies `transition` (from [`Engine::prepare_complete`] or
    /// [`Engine::prepare_fail`]) on `conn`, typically the caller's open
    /// transaction (`&mut *tx`), so that the business write and the
    /// idempotency record commit together.
    ///
    /// # Behavior
    /// - One statement: `UPDATE … WHERE digest = $1 AND state = 'in_flight'
    ///   AND token = $2 AND <live at the transition's time>`. It checks the
    ///   fencing token, not the revision, so a heartbeat that extended the
    ///   lease meanwhile does not make it fail.
    /// - The record is replaced only if the live record is in flight under
    ///   the transition's token; otherwise nothing changes and the result is
    ///   [`Error::LeaseLost`] (taken over, finished, or expired; one more
    ///   `SELECT` on `conn` tells which). Roll the transaction back then: the
    ///   business write must not commit without its record.
    /// - The write takes effect only if the caller's transaction commits.
    ///   **If it rolls back, the key stays claimed**, in flight under the
    ///   same lease, exactly as before the call: retries of the key get
    ///   "in progress" until the holder releases it with
    ///   [`Engine::release`] (then a retry runs at once) or until the lease
    ///   lapses (then a retry takes over with a new token). The business
    ///   write rolled back too, so either way the operation runs once.
    /// - The updated row stays locked until the transaction ends: keep the
    ///   transaction short. A concurrent heartbeat or takeover of this key
    ///   waits for it.
    /// - The statement runs under the caller's isolation level. Under
    ///   `REPEATABLE READ`/`SERIALIZABLE`, a record changed after the
    ///   transaction's snapshot raises a serialization failure, reported as a
    ///   transient [`StoreError::Unavailable`]; retry the whole transaction.
    /// - No timeout is applied here: the caller owns the connection.
    ///
    /// [`Engine::prepare_complete`]: idem_core::Engine::prepare_complete
    /// [`Engine::prepare_fail`]: idem_core::Engine::prepare_fail
    /// [`Engine::release`]: idem_core::Engine::release
    ///
    /// ```no_run
    /// # use idem_core::{Begin, Engine, Fingerprint, IdempotencyKey, Outcome, Scope};
    /// # use idem_postgres::PostgresStore;
    /// # async fn charge(engine: &Engine<PostgresStore>, scope: &Scope, key: &IdempotencyKey)
    /// #     -> Result<(), Box<dyn std::error::Error>> {
    /// if let Begin::Proceed(lease) = engine.begin(scope, key, Fingerprint::of(b"1000 EUR")).await? {
    ///     let store = engine.store();
    ///     let mut tx = store.pool().begin().await?;
    ///     sqlx::query("INSERT INTO payments (idempotency_key, amount) VALUES ($1, $2)")
    ///         .bind(key.as_str())
    ///         .bind(1000_i64)
    ///         .execute(&mut *tx)
    ///         .await?;
    ///     let done = engine.prepare_complete(&lease, Outcome::new(&b"paid"[..]))?;
    ///     store.apply_in(&mut tx, &done).await?; // LeaseLost: tx rolls back on drop
    ///     tx.commit().await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn apply_in(
        &self,
        conn: &mut PgConnection,
        transition: &Transition,
    ) -> Result<(), Error> {
        let table = &self.inner.table;
        let cols = Columns::of(&transition.next);
        self.check_size(&cols)?;
        let now = transition.next.record.updated_at;
        let digest = &transition.key.digest()[..];
        let token = transition.token.to_be_bytes();
        let done = bind_record(
            sqlx::query(AssertSqlSafe(self.inner.sql.apply.clone()))
                .bind(digest)
                .bind(&token[..]),
            &cols,
        )
        .bind(ts(now))
        .execute(&mut *conn)
        .await
        .map_err(|e| error::map(e, table))?;
        if done.rows_affected() == 1 {
            return Ok(());
        }
        let row = sqlx::query(AssertSqlSafe(self.inner.sql.get.clone()))
            .bind(digest)
            .bind(ts(now))
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| error::map(e, table))?;
        let current = row
            .map(|row| row::decode(&row, 0, table.table()))
            .transpose()?;
        Err(match current {
            None => Error::LeaseLost(Fenced::Expired),
            Some(current) => match current.record.check_holder(transition.token, now) {
                Err(fenced) => Error::LeaseLost(fenced),
                // Still ours, yet the update found nothing: the row changed
                // between the two statements. Transient.
                Ok(()) => Error::Contention,
            },
        })
    }

    fn check_size(&self, cols: &Columns<'_>) -> Result<(), StoreError> {
        let size = cols.size();
        if size > self.inner.max_record_bytes {
            return Err(error::too_large(size, self.inner.max_record_bytes));
        }
        Ok(())
    }

    /// When a call starting now must be done.
    fn deadline(&self) -> Deadline {
        Deadline(
            self.inner
                .timeout
                .map(|limit| (tokio::time::Instant::now() + limit, limit)),
        )
    }

    /// `fut`, if it finishes before `deadline`.
    async fn limit<T>(
        &self,
        deadline: Deadline,
        fut: impl Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<Result<T, sqlx::Error>, Duration> {
        match deadline.0 {
            None => Ok(fut.await),
            Some((at, limit)) => tokio::time::timeout_at(at, fut).await.map_err(|_| limit),
        }
    }

    async fn acquire(&self, deadline: Deadline) -> Result<PoolConnection<Postgres>, StoreError> {
        self.limit(deadline, self.inner.pool.acquire())
            .await
            .map_err(error::timeout)?
            .map_err(|e| error::map(e, &self.inner.table))
    }

    /// The result of a statement run with [`limit`](Self::limit) on `conn`.
    fn settle<T>(
        &self,
        conn: &mut PoolConnection<Postgres>,
        result: Result<Result<T, sqlx::Error>, Duration>,
    ) -> Result<T, StoreError> {
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                // An error the server answered with leaves the connection
                // usable; any other (I/O, protocol) may leave it broken or
                // mid-protocol. A server that became a standby after a
                // failover (25006 read-only transaction) or is going away
                // (class 57: admin/crash shutdown, cannot connect now) keeps
                // answering so on this connection: replace it, so that the
                // retry reaches the new primary.
                let stale_server = match &e {
                    sqlx::Error::Database(db) => db
                        .code()
                        .is_some_and(|code| code == "25006" || code.starts_with("57P")),
                    _ => true,
                };
                if stale_server {
                    conn.close_on_drop();
                }
                Err(error::map(e, &self.inner.table))
            }
            Err(after) => {
                conn.close_on_drop();
                Err(error::timeout(after))
            }
        }
    }

    /// The record live under `key` at `now`, read on `conn` (the `get`
    /// statement).
    async fn read_live(
        &self,
        conn: &mut PoolConnection<Postgres>,
        deadline: Deadline,
        key: &RecordKey,
        now: Timestamp,
    ) -> Result<Option<Versioned>, StoreError> {
        let query = sqlx::query(AssertSqlSafe(self.inner.sql.get.clone()))
            .bind(&key.digest()[..])
            .bind(ts(now));
        let result = self
            .limit(deadline, query.fetch_optional(&mut **conn))
            .await;
        self.settle(conn, result)?
            .map(|row| self.decode(&row, 0))
            .transpose()
    }

    fn decode(&self, row: &PgRow, first: usize) -> Result<Versioned, StoreError> {
        row::decode(row, first, self.inner.table.table())
    }

    fn flag(&self, row: &PgRow) -> Result<bool, StoreError> {
        row.try_get::<bool, _>(0)
            .map_err(|e| error::map(e, &self.inner.table))
    }
}

/// The end of a call's time budget, and the budget (for the error).
#[derive(Clone, Copy, Debug)]
struct Deadline(Option<(tokio::time::Instant, Duration)>);

/// Binds the record columns (`$n..$n+9`) in [`sql::RECORD_COLUMNS`] order.
fn bind_record<'q>(
    query: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    cols: &'q Columns<'q>,
) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
    query
        .bind(cols.state)
        .bind(cols.fingerprint)
        .bind(&cols.token[..])
        .bind(cols.lease_deadline)
        .bind(cols.outcome)
        .bind(cols.created_at)
        .bind(cols.updated_at)
        .bind(cols.expires_at)
        .bind(cols.attempts)
        .bind(cols.revision)
}

#[async_trait]
impl Store for PostgresStore {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new().with_max_record_bytes(Some(self.inner.max_record_bytes))
    }

    async fn insert_if_absent(
        &self,
        key: &RecordKey,
        record: &Versioned,
        now: Timestamp,
    ) -> Result<Inserted, StoreError> {
        let cols = Columns::of(record);
        self.check_size(&cols)?;
        let scope = key.scope();
        let tenant = row::text(scope.tenant_id());
        let principal = scope.principal().map(row::text);
        let operation = scope.operation().map(row::text);
        let read_first = self.inner.claim == ClaimMode::ReadFirst;
        let deadline = self.deadline();
        let mut conn = self.acquire(deadline).await?;
        for round in 1..=ROUNDS {
            if read_first {
                // A live record seen by this statement's snapshot was live
                // during the call: reporting it is linearizable. Absent or
                // expired: the insert below decides, on the latest version.
                if let Some(found) = self.read_live(&mut conn, deadline, key, now).await? {
                    return Ok(Inserted::Exists(found));
                }
            }
            let sql = if read_first {
                &self.inner.sql.insert_only
            } else {
                &self.inner.sql.insert
            };
            let query = sqlx::query(AssertSqlSafe(sql.clone()))
                .bind(&key.digest()[..])
                .bind(tenant.as_ref())
                .bind(principal.as_deref())
                .bind(operation.as_deref())
                .bind(key.key().as_str());
            let query = bind_record(query, &cols).bind(ts(now));
            let result = self.limit(deadline, query.fetch_optional(&mut *conn)).await;
            match self.settle(&mut conn, result)? {
                Some(row) if read_first || self.flag(&row)? => return Ok(Inserted::Inserted),
                Some(row) => return Ok(Inserted::Exists(self.decode(&row, 1)?)),
                // A live record was committed after this statement's snapshot
                // (read first: after the read): the insert lost, but this
                // statement cannot show the winner. A new one can.
                None => tracing::debug!(round, "idem-postgres: insert lost a race; re-reading"),
            }
        }
        Err(error::unsettled(ROUNDS, "insert_if_absent"))
    }

    async fn get(&self, key: &RecordKey, now: Timestamp) -> Result<Option<Versioned>, StoreError> {
        let deadline = self.deadline();
        let mut conn = self.acquire(deadline).await?;
        self.read_live(&mut conn, deadline, key, now).await
    }

    async fn compare_and_swap(
        &self,
        key: &RecordKey,
        expected: Revision,
        record: &Versioned,
        now: Timestamp,
    ) -> Result<Swapped, StoreError> {
        let cols = Columns::of(record);
        self.check_size(&cols)?;
        let deadline = self.deadline();
        let mut conn = self.acquire(deadline).await?;
        for round in 1..=ROUNDS {
            let query = sqlx::query(AssertSqlSafe(self.inner.sql.cas.clone()))
                .bind(&key.digest()[..])
                .bind(expected.as_i64());
            let query = bind_record(query, &cols).bind(ts(now));
            let result = self.limit(deadline, query.execute(&mut *conn)).await;
            if self.settle(&mut conn, result)?.rows_affected() == 1 {
                return Ok(Swapped::Swapped);
            }
            // No live row under `expected`, judged on the latest version.
            // The read is a new statement, so its snapshot includes any
            // write that beat the update.
            match self.read_live(&mut conn, deadline, key, now).await? {
                None => return Ok(Swapped::Conflict(None)),
                Some(current) if current.revision != expected => {
                    return Ok(Swapped::Conflict(Some(current)));
                }
                // `expected` is back (the update's snapshot was older than
                // the record it expected): ask again.
                Some(_) => tracing::debug!(
                    round,
                    "idem-postgres: compare_and_swap saw a stale snapshot; retrying"
                ),
            }
        }
        Err(error::unsettled(ROUNDS, "compare_and_swap"))
    }

    async fn delete_if(
        &self,
        key: &RecordKey,
        expected: Revision,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let deadline = self.deadline();
        let mut conn = self.acquire(deadline).await?;
        let query = sqlx::query(AssertSqlSafe(self.inner.sql.delete.clone()))
            .bind(&key.digest()[..])
            .bind(expected.as_i64())
            .bind(ts(now));
        let result = self.limit(deadline, query.execute(&mut *conn)).await;
        Ok(self.settle(&mut conn, result)?.rows_affected() == 1)
    }

    async fn purge_expired(&self, now: Timestamp, limit: usize) -> Result<u64, StoreError> {
        if limit == 0 {
            return Ok(0);
        }
        let now = ts(now);
        let sql = if now >= 0 {
            &self.inner.sql.purge_low
        } else {
            &self.inner.sql.purge_high
        };
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let deadline = self.deadline();
        let mut conn = self.acquire(deadline).await?;
        let query = sqlx::query(AssertSqlSafe(sql.clone()))
            .bind(now)
            .bind(limit);
        let result = self.limit(deadline, query.execute(&mut *conn)).await;
        Ok(self.settle(&mut conn, result)?.rows_affected())
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;

    use super::*;

    type SendFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

    /// `migrate` and `apply_in` can be awaited inside `Send` boxed futures
    /// (`async_trait`, `tokio::spawn`): a compile-time check.
    #[allow(dead_code)]
    fn futures_are_send(store: PostgresStore, transition: Transition) {
        let migrate: SendFuture<Result<(), StoreError>> = {
            let store = store.clone();
            Box::pin(async move { store.migrate().await })
        };
        let apply: SendFuture<Result<(), Error>> = Box::pin(async move {
            let mut conn = store
                .pool()
                .acquire()
                .await
                .map_err(|e| error::map(e, store.table()))?;
            store.apply_in(&mut conn, &transition).await
        });
        drop((migrate, apply));
    }
}
