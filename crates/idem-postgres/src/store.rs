//! [`PostgresStore`]: the store's handle over a sqlx pool (opening,
//! migrating, the per-call time budget and the connection handling every
//! statement shares). The [`Store`](idem_core::store::Store) primitives are in
//! `store/primitives.rs`, completion inside the caller's transaction
//! ([`PostgresStore::apply_in`]) in `store/transaction.rs`.

use std::borrow::Cow;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use idem_core::store::{StoreError, Versioned};
use idem_core::{RecordKey, Timestamp};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, Postgres, Row, SqlSafeStr};

use crate::TableName;
use crate::adaptive::Adaptive;
use crate::builder::{ClaimMode, PostgresStoreBuilder};
use crate::error::PostgresError;
use crate::row::{self, Columns, ts};
use crate::sql::{self, Statements};

mod claim;
mod primitives;
mod transaction;

/// How often a statement is re-run when its snapshot was older than a
/// concurrent commit (a race; see the crate docs) before giving up with a
/// transient error.
const ROUNDS: usize = 16;

/// A [`Store`](idem_core::store::Store) in a PostgreSQL table, through a sqlx [`PgPool`] shared with
/// the application.
///
/// # Behavior
/// - One table (default `idem.idempotency_records`, see [`TableName`]) with
///   typed columns, an index on `expires_at` and a partial index of
///   abandoned records, created by [`migrate`](Self::migrate).
/// - One statement per primitive on the happy path (one round trip once the
///   statement is prepared on the connection); statements are prepared once
///   per connection and cached by sqlx. See the crate docs for each
///   statement and the isolation reasoning.
/// - Every call is bounded by a timeout (default [`DEFAULT_TIMEOUT`](crate::DEFAULT_TIMEOUT)); an
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
/// let store = PostgresStore::builder().open(pool.clone()); // the application keeps using `pool`
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

#[derive(Debug)]
struct Inner {
    pool: PgPool,
    table: TableName,
    sql: Arc<Statements>,
    timeout: Option<Duration>,
    max_record_bytes: usize,
    claim: ClaimMode,
    /// Which way claims start in [`ClaimMode::Adaptive`] (shared by clones).
    adaptive: Adaptive,
}

impl PostgresStore {
    /// Options for a store (table, timeout, record size limit, claim mode);
    /// see [`PostgresStoreBuilder`].
    pub fn builder() -> PostgresStoreBuilder {
        PostgresStoreBuilder::default()
    }

    /// Connects a new pool to `url` with [`pool_options`](Self::pool_options)
    /// and returns a store with the default options over it:
    /// `PostgresStore::builder().connect(url)`.
    ///
    /// # Behavior
    /// An unreachable server is a transient [`PostgresError`]
    /// ([`StoreError::Unavailable`] once converted); a malformed URL a
    /// permanent one ([`StoreError::Generic`]). Does not migrate: call
    /// [`migrate`](Self::migrate).
    pub async fn connect(url: &str) -> Result<Self, PostgresError> {
        Self::builder().connect(url).await
    }

    /// The store `builder` describes, over `pool`.
    pub(crate) fn assemble(pool: PgPool, builder: &PostgresStoreBuilder) -> Self {
        Self {
            inner: Arc::new(Inner {
                pool,
                sql: Arc::new(Statements::new(&builder.table)),
                table: builder.table.clone(),
                timeout: builder.timeout,
                max_record_bytes: builder.max_record_bytes,
                claim: builder.claim,
                adaptive: Adaptive::default(),
            }),
        }
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

    /// How this store claims keys.
    pub fn claim_mode(&self) -> ClaimMode {
        self.inner.claim
    }

    /// Whether this store's next claim starts with a `SELECT` of the live
    /// record (rather than with an insert).
    ///
    /// # Behavior
    /// Always `true` in [`ClaimMode::ReadFirst`] and `false` in
    /// [`ClaimMode::SingleStatement`]. In [`ClaimMode::Adaptive`] it follows
    /// the store's recent claims (see there): `false` for a new store, `true`
    /// after most recent claims found a live record. Shared by clones; a
    /// snapshot, which concurrent claims may change at once.
    pub fn reads_first(&self) -> bool {
        match self.inner.claim {
            ClaimMode::SingleStatement => false,
            ClaimMode::ReadFirst => true,
            ClaimMode::Adaptive => self.inner.adaptive.reads_first(),
        }
    }

    /// The pool (shared with the application).
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// Where the records live.
    pub fn table(&self) -> &TableName {
        &self.inner.table
    }

    /// Creates or upgrades the schema, the table and its indexes.
    ///
    /// # Behavior
    /// - A table created by an earlier version is upgraded in place
    ///   (migration 3 adds the nullable `checkpoint` column, without a
    ///   rewrite, and builds the partial index of abandoned records, which
    ///   reads the table once and blocks its writes meanwhile).
    /// - Runs the migrations shipped with this crate (`migrations/*.sql`)
    ///   with sqlx's migrator, bookkept in `<table>_migrations` in the same
    ///   schema. Idempotent, and safe to call from every instance at start-up:
    ///   concurrent calls are serialised by sqlx's advisory lock (one per
    ///   database).
    /// - A table migrated by a newer idem-postgres (an unknown migration) or
    ///   whose migrations were modified is [`PostgresError::Migration`]
    ///   ([`StoreError::Rejected`] once converted); driver errors are
    ///   classified as for every call (an unreachable server is transient).
    /// - Uses one connection of the pool, closed afterwards if anything failed
    ///   (so an advisory lock is never left held on a pooled connection).
    pub async fn migrate(&self) -> Result<(), PostgresError> {
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
            .map_err(|e| PostgresError::driver(e, table))?;
        // `run_direct` is what `Migrator::run` calls; called directly, the
        // future stays `Send` for every lifetime (sqlx's own workaround for
        // "implementation of `Acquire` is not general enough").
        match migrator.run_direct(None, &mut *conn, false).await {
            Ok(()) => Ok(()),
            Err(e) => {
                // Drop the session: sqlx does not release its advisory lock
                // when a migration fails.
                let _ = conn.close().await;
                Err(PostgresError::migration(e, table))
            }
        }
    }

    /// Refuses a record above the size limit ([`row::size`]: the outcome
    /// and the checkpoint count).
    fn check_size(&self, record: &Versioned) -> Result<(), StoreError> {
        let size = row::size(record);
        if size > self.inner.max_record_bytes {
            return Err(PostgresError::TooLarge {
                size,
                limit: self.inner.max_record_bytes,
            }
            .into());
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
            .map_err(PostgresError::Timeout)?
            .map_err(|e| PostgresError::driver(e, &self.inner.table).into())
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
                Err(PostgresError::driver(e, &self.inner.table).into())
            }
            Err(after) => {
                conn.close_on_drop();
                Err(PostgresError::Timeout(after).into())
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
            .map_err(|e| PostgresError::driver(e, &self.inner.table).into())
    }
}

/// The end of a call's time budget, and the budget (for the error).
#[derive(Clone, Copy, Debug)]
struct Deadline(Option<(tokio::time::Instant, Duration)>);

/// Binds the record columns (`$n..$n+10`) in [`sql::RECORD_COLUMNS`] order.
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
        .bind(cols.checkpoint.as_deref())
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;

    use idem_core::{Error, Transition};

    use super::*;

    type SendFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

    /// `migrate` and `apply_in` can be awaited inside `Send` boxed futures
    /// (`async_trait`, `tokio::spawn`): a compile-time check.
    #[allow(dead_code)]
    fn futures_are_send(store: PostgresStore, transition: Transition) {
        let migrate: SendFuture<Result<(), PostgresError>> = {
            let store = store.clone();
            Box::pin(async move { store.migrate().await })
        };
        let apply: SendFuture<Result<(), Error>> = Box::pin(async move {
            let mut conn = store
                .pool()
                .acquire()
                .await
                .map_err(|e| PostgresError::driver(e, store.table()))?;
            store.apply_in(&mut conn, &transition).await
        });
        drop((migrate, apply));
    }
}
