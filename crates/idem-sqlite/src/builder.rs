//! [`SqliteStoreBuilder`]: the options of a [`SqliteStore`] (table,
//! durability, busy timeout, batch size, record size limit, page cache),
//! their defaults, and opening: pragmas, migrations, the writer thread.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::{Connection, ErrorCode};

use crate::schema::{self, TableName};
use crate::sql::Statements;
use crate::writer::Writer;
use crate::{SqliteError, SqliteStore};

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
///     .with_table(TableName::new("payment_keys")?)
///     .with_durability(Durability::Full)
///     .with_busy_timeout(Duration::from_secs(10))
///     .open(dir.path().join("app.db"))?;
/// assert_eq!(store.table().as_str(), "payment_keys");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug)]
pub struct SqliteStoreBuilder {
    pub(crate) table: TableName,
    pub(crate) durability: Durability,
    busy_timeout: Duration,
    max_batch: usize,
    pub(crate) max_record_bytes: usize,
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
    pub fn with_table(mut self, table: TableName) -> Self {
        self.table = table;
        self
    }

    /// How hard commits are pushed to disk (default [`Durability::Full`]).
    #[must_use]
    pub fn with_durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// How long to wait for the write lock held by another connection or
    /// process before failing with a transient error (default
    /// [`DEFAULT_BUSY_TIMEOUT`]).
    #[must_use]
    pub fn with_busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// The most primitives committed together (default
    /// [`DEFAULT_MAX_BATCH`]; 1 commits each call on its own).
    #[must_use]
    pub fn with_max_batch(mut self, max: usize) -> Self {
        self.max_batch = max.max(1);
        self
    }

    /// The largest record accepted, in bytes (default
    /// [`DEFAULT_MAX_RECORD_BYTES`]); larger ones are refused with
    /// [`StoreError::Rejected`](idem_core::StoreError::Rejected) without
    /// touching the database.
    #[must_use]
    pub fn with_max_record_bytes(mut self, max: usize) -> Self {
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
    ///   about 1.4 KiB per record with a 1 KiB outcome. docs/benchmarks.md
    ///   ("SQLite: the page cache") measures replays with SQLite's own 2 MiB
    ///   against this default.
    /// - `0` gives SQLite's minimum (a few pages); sizes above 2 TiB
    ///   (`i32::MAX` KiB, the most SQLite accepts) are taken as 2 TiB.
    #[must_use]
    pub fn with_page_cache_bytes(mut self, bytes: usize) -> Self {
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
        Ok(SqliteStore::assemble(writer, sql, path, self.clone()))
    }
}

/// Sets the connection's pragmas: busy timeout, WAL (for files), durability,
/// page cache.
pub(crate) fn configure(
    conn: &Connection,
    options: &SqliteStoreBuilder,
    file: bool,
) -> rusqlite::Result<()> {
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
