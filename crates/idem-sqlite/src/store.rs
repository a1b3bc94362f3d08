//! [`SqliteStore`]: the store's handle (opening, its file and table, a
//! second connection, the purger). The [`Store`](idem_core::store::Store) primitives are in
//! `store/primitives.rs`, completion inside a transaction
//! ([`SqliteStore::transaction`], [`SqliteStore::apply_in`],
//! [`apply_transition`](crate::apply_transition)) in `store/transaction.rs`,
//! the options and opening in `builder.rs`, and the writer thread that runs
//! every statement in `writer.rs`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use idem_core::store::{StoreError, Versioned};
use rusqlite::Connection;

use crate::SqliteError;
use crate::builder::{Durability, SqliteStoreBuilder, configure};
use crate::row::record_size;
use crate::schema::{self, TableName};
use crate::sql::Statements;
use crate::writer::Writer;

mod primitives;
mod transaction;

pub use transaction::apply_transition;

/// The SQLite [`Store`](idem_core::store::Store): idem's embedded default, durable with no server.
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
///   primitive; [`purge_expired`](idem_core::store::Store::purge_expired) deletes them in
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
    /// The store over `writer`'s connection, opened with `options`.
    pub(crate) fn assemble(
        writer: Writer,
        sql: Arc<Statements>,
        path: Option<PathBuf>,
        options: SqliteStoreBuilder,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                writer,
                sql,
                table: options.table.clone(),
                path,
                options,
            }),
        }
    }

    /// Options for opening a store (table, durability, busy timeout, batch size).
    pub fn builder() -> SqliteStoreBuilder {
        SqliteStoreBuilder::default()
    }

    /// Opens the database file at `path` (creating it if needed) with the
    /// default options.
    ///
    /// # Behavior
    /// - Switches the file to WAL mode, sets [`Durability::Full`] and a busy
    ///   timeout of [`DEFAULT_BUSY_TIMEOUT`](crate::DEFAULT_BUSY_TIMEOUT), then creates or migrates the
    ///   records table and its indexes in one transaction (several
    ///   processes may open the same file at once). A table of an earlier
    ///   schema version is upgraded in place (version 2 adds the nullable
    ///   `checkpoint` column and builds the partial index of abandoned
    ///   records, which reads the table once, under the write lock).
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

    /// Starts a background task (on the current tokio runtime) that deletes
    /// expired records: every `every` (on `clock`), it calls
    /// [`purge_expired`](idem_core::store::Store::purge_expired) in batches of `batch` until
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
}
