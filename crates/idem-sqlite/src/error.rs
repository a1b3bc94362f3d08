//! The crate's error type and its mapping to [`StoreError`].

use std::path::PathBuf;
use std::sync::Arc;

use idem_core::StoreError;
use rusqlite::ErrorCode;

use crate::STORE;

/// An error of the SQLite store: opening, migrating, or running a statement.
///
/// # Behavior
/// - [`is_transient`](Self::is_transient) tells the errors worth retrying
///   later (lock contention beyond the busy timeout, I/O errors, a full disk)
///   from permanent ones (a foreign or corrupt file, a schema too new, a bad
///   table name, a record too large).
/// - Converted to [`StoreError`] (and from there to [`idem_core::Error`]):
///   transient errors become [`StoreError::Unavailable`], undecodable rows and
///   corrupt files [`StoreError::Corrupt`], foreign files, schemas too new and
///   records too large [`StoreError::Rejected`], anything else
///   [`StoreError::Generic`]. The driver's error is kept as the source.
/// - Cheap to clone: driver errors are shared.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SqliteError {
    /// The database file could not be opened or configured.
    #[error("cannot open the SQLite database {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The driver's error.
        #[source]
        source: Arc<rusqlite::Error>,
    },
    /// The file is not a SQLite database (or is encrypted, or its header is corrupt).
    #[error("{path} is not a SQLite database (or it is encrypted or damaged)")]
    NotADatabase {
        /// The file.
        path: PathBuf,
        /// The driver's error.
        #[source]
        source: Arc<rusqlite::Error>,
    },
    /// The file is a SQLite database of another application: its
    /// `PRAGMA application_id` is neither 0 nor idem's.
    #[error(
        "{path} belongs to another application (SQLite application_id {application_id:#010x}); \
         idem only opens databases whose application_id is 0 or {:#010x} (\"idem\")",
        crate::schema::APPLICATION_ID
    )]
    ForeignDatabase {
        /// The file.
        path: PathBuf,
        /// The `application_id` found.
        application_id: i32,
    },
    /// A table with the records table's name exists but was not created by idem.
    #[error(
        "table {table} in {path} exists but was not created by idem-sqlite \
         (it has no entry in idem_schema); choose another table name"
    )]
    ForeignTable {
        /// The file.
        path: PathBuf,
        /// The table.
        table: String,
    },
    /// The table was created or migrated by a newer version of idem-sqlite.
    #[error(
        "table {table} in {path} has idem schema version {found}, newer than the {supported} \
         this version of idem-sqlite knows: upgrade idem-sqlite"
    )]
    SchemaTooNew {
        /// The file.
        path: PathBuf,
        /// The table.
        table: String,
        /// The version found.
        found: i64,
        /// The newest version this crate knows.
        supported: i64,
    },
    /// A table name that is not a plain SQL identifier.
    #[error(
        "invalid table name {0:?}: use 1 to 64 ASCII letters, digits and underscores, \
         not starting with a digit or `sqlite_`"
    )]
    InvalidTableName(String),
    /// A stored row does not make a record (a value of the wrong type or
    /// length, an unknown state, …).
    #[error("a row of {table} is not a valid idem record: {why}")]
    CorruptRow {
        /// The table.
        table: String,
        /// What is wrong with it.
        why: String,
    },
    /// A record larger than the store's limit.
    #[error("record of about {size} bytes exceeds the store's limit of {limit} bytes")]
    TooLarge {
        /// The record's size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The store's database is in memory: no other connection can open it.
    #[error(
        "the store's database is in memory; use SqliteStore::transaction instead of a second connection"
    )]
    InMemory,
    /// A background task was started outside a tokio runtime.
    #[error("no tokio runtime: start the purger from within a tokio runtime")]
    NoRuntime,
    /// The store's writer thread is gone (it could not start, or it stopped).
    #[error("the SQLite store's writer thread has stopped")]
    Closed,
    /// A statement failed.
    #[error("SQLite failed")]
    Sqlite(#[source] Arc<rusqlite::Error>),
}

impl SqliteError {
    /// Whether retrying later may succeed: the database was locked longer
    /// than the busy timeout, an I/O error, a full disk.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Sqlite(e) => transient_code(e),
            // A path that cannot be opened stays so; a lock held too long may not.
            Self::Open { source: e, .. } => {
                transient_code(e) && e.sqlite_error_code() != Some(ErrorCode::CannotOpen)
            }
            _ => false,
        }
    }

    /// Whether the database file or a row in it cannot be read.
    pub fn is_corrupt(&self) -> bool {
        match self {
            Self::CorruptRow { .. } | Self::NotADatabase { .. } => true,
            Self::Sqlite(e) => matches!(
                e.sqlite_error_code(),
                Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
            ),
            _ => false,
        }
    }

    /// The SQLite error code, for driver errors.
    pub fn sqlite_code(&self) -> Option<ErrorCode> {
        match self {
            Self::Sqlite(e)
            | Self::Open { source: e, .. }
            | Self::NotADatabase { source: e, .. } => e.sqlite_error_code(),
            _ => None,
        }
    }
}

fn transient_code(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(
            ErrorCode::DatabaseBusy
                | ErrorCode::DatabaseLocked
                | ErrorCode::SystemIoFailure
                | ErrorCode::DiskFull
                | ErrorCode::CannotOpen
                | ErrorCode::OperationInterrupted
                | ErrorCode::FileLockingProtocolFailed
                | ErrorCode::OutOfMemory
        )
    )
}

impl From<rusqlite::Error> for SqliteError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Sqlite(Arc::new(e))
    }
}

impl From<SqliteError> for StoreError {
    fn from(e: SqliteError) -> Self {
        if e.is_transient() {
            StoreError::Unavailable {
                store: STORE,
                source: Box::new(e),
            }
        } else if e.is_corrupt() {
            StoreError::Corrupt {
                store: STORE,
                source: Box::new(e),
            }
        } else if matches!(
            e,
            SqliteError::TooLarge { .. }
                | SqliteError::SchemaTooNew { .. }
                | SqliteError::ForeignDatabase { .. }
                | SqliteError::ForeignTable { .. }
                | SqliteError::InvalidTableName(_)
        ) || e.sqlite_code() == Some(ErrorCode::TooBig)
        {
            StoreError::Rejected {
                store: STORE,
                source: Box::new(e),
            }
        } else {
            StoreError::Generic {
                store: STORE,
                source: Box::new(e),
            }
        }
    }
}

impl From<SqliteError> for idem_core::Error {
    fn from(e: SqliteError) -> Self {
        Self::Store(e.into())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn code(code: i32) -> SqliteError {
        SqliteError::from(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(code),
            None,
        ))
    }

    #[test]
    fn busy_and_io_are_transient_and_map_to_unavailable() {
        for c in [
            rusqlite::ffi::SQLITE_BUSY,
            rusqlite::ffi::SQLITE_LOCKED,
            rusqlite::ffi::SQLITE_IOERR,
            rusqlite::ffi::SQLITE_FULL,
        ] {
            let e = code(c);
            assert!(e.is_transient(), "{c}");
            assert!(StoreError::from(e).is_transient(), "{c}");
        }
        assert!(!code(rusqlite::ffi::SQLITE_CONSTRAINT).is_transient());
        assert!(!SqliteError::Closed.is_transient());
    }

    #[test]
    fn categories_map_to_store_errors() {
        assert!(matches!(
            StoreError::from(code(rusqlite::ffi::SQLITE_CORRUPT)),
            StoreError::Corrupt { .. }
        ));
        assert!(matches!(
            StoreError::from(SqliteError::CorruptRow {
                table: "t".into(),
                why: "x".into()
            }),
            StoreError::Corrupt { .. }
        ));
        assert!(matches!(
            StoreError::from(code(rusqlite::ffi::SQLITE_TOOBIG)),
            StoreError::Rejected { .. }
        ));
        assert!(matches!(
            StoreError::from(SqliteError::TooLarge { size: 2, limit: 1 }),
            StoreError::Rejected { .. }
        ));
        assert!(matches!(
            StoreError::from(SqliteError::Closed),
            StoreError::Generic { .. }
        ));
        assert!(matches!(
            idem_core::Error::from(SqliteError::Closed),
            idem_core::Error::Store(StoreError::Generic { .. })
        ));
    }
}
