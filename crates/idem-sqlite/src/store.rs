//! [`SqliteStore`]: opening, the [`Store`] primitives, and completion inside
//! a transaction.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use idem_core::{
    Capabilities, Error, Fenced, Inserted, RecordKey, Revision, Store, StoreError, Swapped,
    Timestamp, Transition, Versioned,
};
use rusqlite::types::ToSql;
use rusqlite::{Connection, ErrorCode, Transaction, TransactionBehavior};

use crate::row::{Columns, record_size, ts};
use crate::schema::{self, TableName};
use crate::sql::Statements;
use crate::writer::{self, Op, Reply, Writer};
use crate::{STORE, SqliteError};

/// The default busy timeout: how long a connection waits for another one
/// (in this process or another) to release the write lock.
pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The default limit on the size of one record (64 MiB).
pub const DEFAULT_MAX_RECORD_BYTES: usize = 64 * 1024 * 1024;

/// The default number of primitives the writer commits together.
pub const DEFAULT_MAX_BATCH: usize = 64;

/// The default size of each connection's page cache: 32 MiB (SQLite's own
/// default is 2 MiB).
pub const DEFAULT_PAGE_CACHE_BYTES: usize = 32 * 1024 * 1024;

/// How hard a commit is pushed to disk (`PRAGMA synchronous`, in WAL mode).
///
/// # Behavior
/// - [`Full`](Self::Full) (the default): every commit waits for the write-ahead
///   log to reach the disk (`fsync`). A record the engine was told is stored
///   survives a process crash, an operating-system crash and a power loss.
/// - [`Normal`](Self::Normal): commits reach the operating system, and the
///   disk only at checkpoints. A record survives a crash of the process, but an
///   operating-system crash or a power loss may lose the last commits (never
///   corrupt the file). A lost completion means a retry runs the operation
///   again: fine when the side effect lives in the same database file
///   (transactional completion: it is lost with the record), not when it is
///   external (a card charged through an API).
///
/// idem exists to make side effects happen once, so it defaults to `Full`.
/// The writer thread commits concurrent calls together, so one `fsync` serves
/// a whole batch and `Full` costs far less than one `fsync` per call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Durability {
    /// `PRAGMA synchronous = FULL`: durable through power loss.
    #[default]
    Full,
    /// `PRAGMA synchronous = NORMAL`: durable through process crashes only.
    Normal,
}

impl Durability {
    fn pragma(self) -> &'static str {
        match self {
            Self::Full => "FULL",
            Self::Normal => "NORMAL",
        }
    }
}

/// Options for opening a [`SqliteStore`]; start with [`SqliteStore::builder`].
///
/// ```
/// use std::time::{Duration, Instant};
/// use idem_sqlite::{Durability, SqliteStore, TableName};
///
/// let dir = tempfile::tempdir()?;
/// let store = SqliteStore::builder()
///     .table(TableName::new("payment_keys")?)
///     .durability(Durability::Full)
///     .busy_timeout(Duration::from_secs(10))
///     .open(dir.path().join("app.db"))?;
/// assert_eq!(store.table().as_str(), "payment_keys");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug)]
pub struct SqliteStoreBuilder {
    table: TableName,
    durability: Durability,
    busy_timeout: Duration,
    max_batch: usize,
    max_record_bytes: usize,
    page_cache_bytes: usize,
}

impl Default for SqliteStoreBuilder {
    fn default() -> Self {
        Self {
            table: TableName::default(),
            durability: Durability::default(),
            busy_timeout: DEFAULT_BUSY_TIMEOUT,
            max_batch: DEFAULT_MAX_BATCH,
            max_record_bytes: DEFAULT_MAX_RECORD_BYTES,
            page_cache_bytes: DEFAULT_PAGE_CACHE_BYTES,
        }
    }
}

impl SqliteStoreBuilder {
    /// The records table (default `idem_records`).
    #[must_use]
    pub fn table(mut self, table: TableName) -> Self {
        self.table = table;
        self
    }

    /// How hard commits are pushed to disk (default [`Durability::Full`]).
    #[must_use]
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// How long to wait for the write lock held by another connection or
    /// process before failing with a transient error (default
    /// [`DEFAULT_BUSY_TIMEOUT`]).
    #[must_use]
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// The most primitives committed together (default
    /// [`DEFAULT_MAX_BATCH`]; 1 commits each call on its own).
    #[must_use]
    pub fn max_batch(mut self, max: usize) -> Self {
        self.max_batch = max.max(1);
        self
    }

    /// The largest record accepted, in bytes (default
    /// [`DEFAULT_MAX_RECORD_BYTES`]); larger ones are refused with
    /// [`StoreError::Rejected`] without touching the database.
    #[must_use]
    pub fn max_record_bytes(mut self, max: usize) -> Self {
        self.max_record_bytes = max;
        self
    }

    /// The most memory each of the store's connections keeps as page cache
    /// (`PRAGMA cache_size`; default [`DEFAULT_PAGE_CACHE_BYTES`]).
    ///
    /// # Behavior
    /// - SQLite fills the cache as pages are read and never beyond this
    ///   size; a store that touches fewer pages uses less.
    /// - Applies to the writer's connection and to every connection from
    ///   [`SqliteStore::connect`].
    /// - Pages that do not fit are read again from the operating system's
    ///   cache (or the disk) when next needed. Replays and "in progress"
    ///   answers read the record of a recent key, so a cache that holds the
    ///   records of the retry window keeps them off the kernel's read path:
    ///   about 1.4 KiB per record with a 1 KiB outcome. With SQLite's own
    ///   2 MiB, replays of 10,000 recent keys ran at less than half the
    ///   speed they reach with this default (docs/benchmarks.md).
    /// - `0` gives SQLite's minimum (a few pages); sizes above 2 TiB
    ///   (`i32::MAX` KiB, the most SQLite accepts) are taken as 2 TiB.
    #[must_use]
    pub fn page_cache_bytes(mut self, bytes: usize) -> Self {
        self.page_cache_bytes = bytes;
        self
    }

    /// Opens (creating it if needed) the database file at `path`; see
    /// [`SqliteStore::open`].
    pub fn open(&self, path: impl AsRef<Path>) -> Result<SqliteStore, SqliteError> {
        let path = path.as_ref();
        let conn = Connection::open(path).map_err(|e| schema::open_error(path, e))?;
        self.start(conn, Some(path.to_path_buf()))
    }

    /// Opens a private in-memory database; see [`SqliteStore::open_in_memory`].
    pub fn open_in_memory(&self) -> Result<SqliteStore, SqliteError> {
        let conn = Connection::open_in_memory()
            .map_err(|e| schema::open_error(Path::new(":memory:"), e))?;
        self.start(conn, None)
    }

    /// Takes over an open connection; see [`SqliteStore::from_connection`].
    pub fn from_connection(&self, conn: Connection) -> Result<SqliteStore, SqliteError> {
        let path = conn.path().filter(|p| !p.is_empty()).map(PathBuf::from);
        self.start(conn, path)
    }

    fn start(
        &self,
        mut conn: Connection,
        path: Option<PathBuf>,
    ) -> Result<SqliteStore, SqliteError> {
        let shown = schema::describe(path.as_deref());
        // Switching a new file to WAL needs an exclusive lock, and SQLite
        // reports SQLITE_BUSY at once (without its busy handler) when
        // another connection is opening the same file: retry within the
        // busy timeout, as the busy handler would.
        let deadline = Instant::now() + self.busy_timeout;
        let mut pause = Duration::from_millis(1);
        loop {
            let attempt = configure(&conn, self, path.is_some())
                .map_err(|e| schema::open_error(&shown, e))
                .and_then(|()| schema::migrate(&mut conn, &self.table, &shown));
            match attempt {
                Ok(()) => break,
                Err(e)
                    if matches!(
                        e.sqlite_code(),
                        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
                    ) && Instant::now() + pause < deadline =>
                {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
                Err(e) => return Err(e),
            }
        }
        let sql = Arc::new(Statements::new(&self.table));
        let writer = Writer::spawn(conn, sql.clone(), self.max_batch)?;
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                writer,
                sql,
                table: self.table.clone(),
                path,
                options: self.clone(),
            }),
        })
    }
}

/// Sets the connection's pragmas: busy timeout, WAL (for files), durability,
/// page cache.
fn configure(conn: &Connection, options: &SqliteStoreBuilder, file: bool) -> rusqlite::Result<()> {
    conn.busy_timeout(options.busy_timeout)?;
    conn.set_prepared_statement_cache_capacity(32);
    if file {
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(
                mode,
                "idem-sqlite: the database did not switch to WAL mode; concurrency will suffer"
            );
        }
    }
    conn.pragma_update(None, "synchronous", options.durability.pragma())?;
    // A negative `cache_size` is a size in KiB; SQLite reads it as a 32-bit
    // integer.
    let kib = i32::try_from(options.page_cache_bytes.div_ceil(1024)).unwrap_or(i32::MAX);
    conn.pragma_update(None, "cache_size", -kib)?;
    Ok(())
}

/// The SQLite [`Store`]: idem's embedded default, durable with no server.
///
/// # Behavior
/// - Keeps every record in one table (default `idem_records`, see the crate
///   docs for the columns) of a SQLite database in WAL mode. The store
///   creates and migrates the table itself when it opens the file.
/// - Every primitive is atomic and linearizable per key across tasks,
///   [`SqliteStore`] instances and processes sharing the file: each runs
///   inside an `IMMEDIATE` transaction, and other connections wait up to
///   the busy timeout for the write lock.
/// - Calls never block the async runtime: they run on the store's writer
///   thread, which owns the connection and commits the calls that arrive
///   together in one transaction (one `fsync` per batch).
/// - A record with `expires_at <= now` behaves as absent for every
///   primitive; [`purge_expired`](Store::purge_expired) deletes them in
///   bounded batches, and [`spawn_purger`](Self::spawn_purger) does it in
///   the background.
/// - A row that does not decode is [`StoreError::Corrupt`] and is never
///   overwritten while it is live. Lock contention beyond the busy timeout,
///   I/O errors and a full disk are [`StoreError::Unavailable`].
/// - [`transaction`](Self::transaction) and [`apply_in`](Self::apply_in)
///   complete a claim in the same transaction as the caller's own writes.
/// - Clones share the writer thread; it stops when the last clone is dropped.
///
/// ```
/// use idem_core::{Engine, Executed, Fingerprint, IdempotencyKey, Scope};
/// use idem_sqlite::SqliteStore;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let engine = Engine::new(SqliteStore::open(dir.path().join("idem.db"))?);
/// let scope = Scope::tenant("acme").with_operation("orders.create");
/// let key = IdempotencyKey::parse("order-42")?;
/// let first = engine.execute(&scope, &key, Fingerprint::of(b"42"), || async { 42_u32 }).await?;
/// let again = engine.execute(&scope, &key, Fingerprint::of(b"42"), || async { 0_u32 }).await?;
/// assert_eq!((first, again), (Executed::Fresh(42), Executed::Replayed(42)));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    writer: Writer,
    sql: Arc<Statements>,
    table: TableName,
    path: Option<PathBuf>,
    options: SqliteStoreBuilder,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.path)
            .field("table", &self.inner.table)
            .field("durability", &self.inner.options.durability)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Options for opening a store (table, durability, busy timeout, batch size).
    pub fn builder() -> SqliteStoreBuilder {
        SqliteStoreBuilder::default()
    }

    /// Opens the database file at `path` (creating it if needed) with the
    /// default options.
    ///
    /// # Behavior
    /// - Switches the file to WAL mode, sets [`Durability::Full`] and a busy
    ///   timeout of [`DEFAULT_BUSY_TIMEOUT`], then creates or migrates the
    ///   records table and its expiry index in one transaction (several
    ///   processes may open the same file at once).
    /// - A file that is not a SQLite database is [`SqliteError::NotADatabase`];
    ///   a SQLite database of another application (a foreign
    ///   `application_id`) is [`SqliteError::ForeignDatabase`]; a table of the
    ///   same name not created by idem is [`SqliteError::ForeignTable`]; a
    ///   table migrated by a newer idem-sqlite is [`SqliteError::SchemaTooNew`].
    ///   An application's own database (`application_id` 0) is fine: keep
    ///   your tables next to idem's for transactional completion.
    /// - Blocks for the file I/O of opening (milliseconds); open stores at
    ///   startup, not per request.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, SqliteError> {
        Self::builder().open(path)
    }

    /// A private in-memory database (records vanish with the store), for
    /// tests and examples.
    pub fn open_in_memory() -> Result<Self, SqliteError> {
        Self::builder().open_in_memory()
    }

    /// Takes over `conn` as the store's connection (it moves to the writer
    /// thread), applying the store's pragmas and migrations as
    /// [`open`](Self::open) does.
    pub fn from_connection(conn: Connection) -> Result<Self, SqliteError> {
        Self::builder().from_connection(conn)
    }

    /// The database file, if the store is not in memory.
    pub fn path(&self) -> Option<&Path> {
        self.inner.path.as_deref()
    }

    /// The records table.
    pub fn table(&self) -> &TableName {
        &self.inner.table
    }

    /// The durability setting.
    pub fn durability(&self) -> Durability {
        self.inner.options.durability
    }

    /// A new connection to the store's file, configured like the store's own
    /// (busy timeout, durability, page cache): for the application's transactions with
    /// [`apply_in`](Self::apply_in).
    ///
    /// # Behavior
    /// Fails with [`SqliteError::InMemory`] for an in-memory store (its database
    /// cannot be shared); use [`transaction`](Self::transaction) there.
    pub fn connect(&self) -> Result<Connection, SqliteError> {
        let Some(path) = self.path() else {
            return Err(SqliteError::InMemory);
        };
        let conn = Connection::open(path).map_err(|e| schema::open_error(path, e))?;
        configure(&conn, &self.inner.options, true).map_err(|e| schema::open_error(path, e))?;
        Ok(conn)
    }

    /// Runs `f` in an `IMMEDIATE` transaction on the store's own connection
    /// (on its writer thread, between batches), committing if `f` returns
    /// `Ok` and rolling back otherwise.
    ///
    /// # Behavior
    /// - Use it to make a business write and the idempotency record commit
    ///   together: inside `f`, write your rows and call
    ///   [`apply_in`](Self::apply_in) (or [`apply_transition`](crate::apply_transition))
    ///   with the [`Transition`] from
    ///   [`Engine::prepare_complete`](idem_core::Engine::prepare_complete).
    ///   If the lease was lost, `apply_in` fails with [`Error::LeaseLost`]
    ///   and returning that error rolls everything back.
    /// - If the transaction rolls back, the key stays claimed under the same
    ///   lease: [`release`](idem_core::Engine::release) it so that a retry
    ///   runs at once, or let the lease lapse.
    /// - Other calls on this store wait while `f` runs: keep it short, and do
    ///   no network I/O in it. A panic in `f` rolls back and is resumed in the
    ///   caller. Errors of `BEGIN`/`COMMIT` reach the caller as `E::from(SqliteError)`.
    /// - Works for in-memory stores too, and needs no second connection (no
    ///   lock contention with the store).
    /// - Once sent, `f` runs even if the returned future is dropped.
    ///
    /// ```
    /// use idem_core::{Begin, Engine, Fingerprint, IdempotencyKey, Outcome, Scope};
    /// use idem_sqlite::{SqliteError, SqliteStore};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    /// let store = SqliteStore::open_in_memory()?;
    /// store
    ///     .transaction(|tx| -> Result<(), SqliteError> {
    ///         Ok(tx.execute_batch("CREATE TABLE payments (key TEXT, cents INTEGER)")?)
    ///     })
    ///     .await?;
    /// let engine = Engine::new(store.clone());
    /// let key = IdempotencyKey::parse("pay-1")?;
    /// let scope = Scope::tenant("acme").with_operation("payments.create");
    /// if let Begin::Proceed(lease) = engine.begin(&scope, &key, Fingerprint::of(b"100")).await? {
    ///     let done = engine.prepare_complete(&lease, Outcome::new(&b"paid"[..]))?;
    ///     let s = store.clone();
    ///     store
    ///         .transaction(move |tx| -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    ///             tx.execute("INSERT INTO payments VALUES (?1, 100)", ["pay-1"])?;
    ///             s.apply_in(tx, &done)?; // payment and record commit together
    ///             Ok(())
    ///         })
    ///         .await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn transaction<R, E, F>(&self, f: F) -> Result<R, E>
    where
        F: FnOnce(&Transaction<'_>) -> Result<R, E> + Send + 'static,
        R: Send + 'static,
        E: From<SqliteError> + Send + 'static,
    {
        self.inner
            .writer
            .run(move |conn| {
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(|e| E::from(SqliteError::from(e)))?;
                let value = f(&tx)?;
                tx.commit().map_err(|e| E::from(SqliteError::from(e)))?;
                Ok(value)
            })
            .await
            .map_err(E::from)?
    }

    /// Applies `transition` (from
    /// [`Engine::prepare_complete`](idem_core::Engine::prepare_complete) or
    /// [`prepare_fail`](idem_core::Engine::prepare_fail)) on `conn`, normally
    /// inside the caller's open transaction, in the store's table.
    ///
    /// # Behavior
    /// - Replaces the record if the live record is in flight under the
    ///   transition's fencing token (the token, not the revision, so a
    ///   heartbeat meanwhile does not fail it): one `UPDATE`, which takes
    ///   effect only if the transaction commits.
    /// - Otherwise changes nothing and returns [`Error::LeaseLost`] (taken
    ///   over, already finished, or expired); a record above the size limit
    ///   is [`StoreError::Rejected`]; SQL errors are [`Error::Store`].
    /// - `conn` may be the `tx` of [`transaction`](Self::transaction), or a
    ///   transaction on the application's own connection to the same file
    ///   (see [`connect`](Self::connect)). Begin those with
    ///   [`TransactionBehavior::Immediate`]: a deferred transaction that read
    ///   first cannot always upgrade to a write while the store writes, and
    ///   fails with `SQLITE_BUSY` instead of waiting.
    pub fn apply_in(&self, conn: &Connection, transition: &Transition) -> Result<(), Error> {
        self.check_size(&transition.next)?;
        apply(conn, &self.inner.sql, transition)
    }

    /// Starts a background task (on the current tokio runtime) that deletes
    /// expired records: every `every` (on `clock`), it calls
    /// [`purge_expired`](Store::purge_expired) in batches of `batch` until
    /// less than a batch is left.
    ///
    /// # Behavior
    /// Errors are logged and retried at the next round. The task stops when
    /// the returned [`Purger`](crate::Purger) is stopped or dropped. Fails
    /// with [`SqliteError::NoRuntime`] outside a tokio runtime.
    pub fn spawn_purger<C: idem_core::Clock>(
        &self,
        clock: C,
        every: Duration,
        batch: usize,
    ) -> Result<crate::Purger, SqliteError> {
        crate::purger::spawn(self.clone(), clock, every, batch)
    }

    fn check_size(&self, record: &Versioned) -> Result<(), StoreError> {
        let size = record_size(record);
        let limit = self.inner.options.max_record_bytes;
        if size > limit {
            return Err(SqliteError::TooLarge { size, limit }.into());
        }
        Ok(())
    }

    async fn call(&self, op: Op) -> Result<Reply, StoreError> {
        Ok(self.inner.writer.call(op).await?)
    }
}

/// Applies `transition` in the default table (`idem_records`) on `conn`:
/// [`SqliteStore::apply_in`] for stores opened with the default options.
///
/// ```
/// # fn f(tx: &rusqlite::Transaction<'_>, done: &idem_core::Transition) -> Result<(), idem_core::Error> {
/// idem_sqlite::apply_transition(tx, done)?; // inside the caller's transaction
/// # Ok(()) }
/// ```
pub fn apply_transition(conn: &Connection, transition: &Transition) -> Result<(), Error> {
    static DEFAULT: OnceLock<Statements> = OnceLock::new();
    let sql = DEFAULT.get_or_init(|| Statements::new(&TableName::default()));
    let size = record_size(&transition.next);
    if size > DEFAULT_MAX_RECORD_BYTES {
        return Err(SqliteError::TooLarge {
            size,
            limit: DEFAULT_MAX_RECORD_BYTES,
        }
        .into());
    }
    apply(conn, sql, transition)
}

fn apply(conn: &Connection, sql: &Statements, transition: &Transition) -> Result<(), Error> {
    let cols = Columns::of(&transition.next);
    let now = ts(transition.next.record.updated_at);
    let digest = &transition.key.digest()[..];
    let token = transition.token.to_be_bytes();
    let token = &token[..];
    let mut params: Vec<&dyn ToSql> = Vec::with_capacity(13);
    params.extend_from_slice(&[&digest, &token]);
    params.extend_from_slice(&cols.params());
    params.push(&now);
    let updated = conn
        .prepare_cached(&sql.apply)
        .and_then(|mut stmt| stmt.execute(params.as_slice()))
        .map_err(SqliteError::from)?;
    if updated == 1 {
        return Ok(());
    }
    let current = writer::get(conn, sql, digest, now)?;
    Err(match current {
        None => Error::LeaseLost(Fenced::Expired),
        Some(current) => match current
            .record
            .check_holder(transition.token, transition.next.record.updated_at)
        {
            Err(fenced) => Error::LeaseLost(fenced),
            // Still ours, yet the update matched nothing: the row changed
            // between the two statements (a connection without a write lock).
            Ok(()) => Error::Contention,
        },
    })
}

#[async_trait]
impl Store for SqliteStore {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new().with_max_record_bytes(Some(self.inner.options.max_record_bytes))
    }

    async fn insert_if_absent(
        &self,
        key: &RecordKey,
        record: &Versioned,
        now: Timestamp,
    ) -> Result<Inserted, StoreError> {
        self.check_size(record)?;
        let op = Op::Insert {
            key: key.clone(),
            record: record.clone(),
            now,
        };
        match self.call(op).await? {
            Reply::Inserted(inserted) => Ok(inserted),
            other => Err(mismatch(&other)),
        }
    }

    async fn get(&self, key: &RecordKey, now: Timestamp) -> Result<Option<Versioned>, StoreError> {
        let op = Op::Get {
            digest: *key.digest(),
            now,
        };
        match self.call(op).await? {
            Reply::Got(got) => Ok(got),
            other => Err(mismatch(&other)),
        }
    }

    async fn compare_and_swap(
        &self,
        key: &RecordKey,
        expected: Revision,
        record: &Versioned,
        now: Timestamp,
    ) -> Result<Swapped, StoreError> {
        self.check_size(record)?;
        let op = Op::Cas {
            digest: *key.digest(),
            expected,
            record: record.clone(),
            now,
        };
        match self.call(op).await? {
            Reply::Swapped(swapped) => Ok(swapped),
            other => Err(mismatch(&other)),
        }
    }

    async fn delete_if(
        &self,
        key: &RecordKey,
        expected: Revision,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let op = Op::Delete {
            digest: *key.digest(),
            expected,
            now,
        };
        match self.call(op).await? {
            Reply::Deleted(deleted) => Ok(deleted),
            other => Err(mismatch(&other)),
        }
    }

    async fn purge_expired(&self, now: Timestamp, limit: usize) -> Result<u64, StoreError> {
        if limit == 0 {
            return Ok(0);
        }
        match self.call(Op::Purge { now, limit }).await? {
            Reply::Purged(purged) => Ok(purged),
            other => Err(mismatch(&other)),
        }
    }
}

/// The writer answered a primitive with another primitive's reply (a bug).
fn mismatch(reply: &Reply) -> StoreError {
    StoreError::Generic {
        store: STORE,
        source: format!("internal error: the writer thread answered {reply:?}").into(),
    }
}
