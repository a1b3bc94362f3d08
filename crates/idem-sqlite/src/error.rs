//! The crate's error type and its mapping to [`StoreError`].

use std::ffi::c_int;
use std::path::PathBuf;
use std::sync::Arc;

use idem_core::store::{BoxError, StoreError, TableNameError};
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
///   corrupt files [`StoreError::Corrupt`], foreign files, schemas too new,
///   records too large and checkpoints that cannot be encoded
///   [`StoreError::Rejected`], anything else
///   [`StoreError::Generic`]. The driver's error is kept as the source. The
///   classification of every SQLite result code is the table in the crate
///   docs, "Error classification".
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
    /// A table name that is not a plain SQL identifier (the same error as
    /// every SQL store's; [`TableName::new`](crate::TableName::new) returns it
    /// as it is).
    #[error(transparent)]
    InvalidTableName(#[from] TableNameError),
    /// A stored row does not make a record (a value of the wrong type or
    /// length, an unknown state, …).
    #[error("a row of {table} is not a valid idem record: {why}")]
    CorruptRow {
        /// The table.
        table: String,
        /// What is wrong with it.
        why: String,
    },
    /// A record's checkpoint could not be encoded for its column
    /// ([`codec::encode_checkpoint`](idem_core::store::codec::encode_checkpoint));
    /// nothing was written.
    #[error("the record's checkpoint could not be encoded")]
    Encode(#[source] Arc<idem_core::store::codec::CodecError>),
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
    /// than the busy timeout, an I/O error, a full disk (the table is in the
    /// crate docs, "Error classification").
    pub fn is_transient(&self) -> bool {
        self.class() == Class::Unavailable
    }

    /// Whether the database file or a row in it cannot be read.
    pub fn is_corrupt(&self) -> bool {
        self.class() == Class::Corrupt
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

    /// The [`StoreError`] variant this error becomes.
    pub(crate) fn class(&self) -> Class {
        match self {
            Self::Sqlite(e) => classify(e, Phase::Statement),
            Self::Open { source: e, .. } => classify(e, Phase::Open),
            Self::NotADatabase { .. } | Self::CorruptRow { .. } => Class::Corrupt,
            Self::TooLarge { .. }
            | Self::Encode(_)
            | Self::SchemaTooNew { .. }
            | Self::ForeignDatabase { .. }
            | Self::ForeignTable { .. }
            | Self::InvalidTableName(_) => Class::Rejected,
            // The writer thread is gone for good; no runtime; in memory.
            Self::Closed | Self::NoRuntime | Self::InMemory => Class::Generic,
        }
    }
}

/// What an error means for the caller: the [`StoreError`] variant it
/// becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Class {
    /// Retrying later may succeed: [`StoreError::Unavailable`].
    Unavailable,
    /// The file or a row cannot be read: [`StoreError::Corrupt`].
    Corrupt,
    /// The record or the database was refused: [`StoreError::Rejected`].
    Rejected,
    /// Any other permanent error: [`StoreError::Generic`].
    Generic,
}

impl Class {
    /// The [`StoreError`] of this class, of the store `store`, caused by
    /// `source`.
    pub(crate) fn error(self, store: &'static str, source: impl Into<BoxError>) -> StoreError {
        let error = match self {
            Self::Unavailable => StoreError::unavailable,
            Self::Corrupt => StoreError::corrupt,
            Self::Rejected => StoreError::rejected,
            Self::Generic => StoreError::generic,
        };
        error(store, source.into())
    }
}

/// Where a driver error happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Opening and configuring a connection, migrating the table.
    Open,
    /// Running a statement on an open connection.
    Statement,
}

/// The class of an (extended) SQLite result code.
///
/// # Behavior
/// Pure. Transient: `BUSY`, `LOCKED` (lock held past the busy timeout),
/// `NOMEM`, `INTERRUPT`, `IOERR` (but `IOERR_CORRUPTFS` and `IOERR_DATA`,
/// corrupt), `FULL`, `PROTOCOL`, `SCHEMA`, `ABORT`, the `READONLY` cases
/// another connection resolves (`RECOVERY`, `CANTLOCK`, `ROLLBACK`), and
/// `CANTOPEN` on a statement (a journal, WAL or temporary file: usually out
/// of file descriptors). Corrupt: `CORRUPT`, `NOTADB`. Rejected: `TOOBIG`,
/// and a constraint that an application's trigger, commit hook or function
/// raised. Everything else is permanent: `CANTOPEN` on open, the other
/// `READONLY` cases, other constraint violations (a bug: the statements
/// cannot violate the table's own constraints), `PERM`, `AUTH`, `ERROR`,
/// `MISUSE`, `RANGE`, `MISMATCH`, …
pub(crate) fn classify_code(extended: c_int, phase: Phase) -> Class {
    use rusqlite::ffi;
    match extended {
        ffi::SQLITE_IOERR_CORRUPTFS | ffi::SQLITE_IOERR_DATA => return Class::Corrupt,
        ffi::SQLITE_READONLY_RECOVERY
        | ffi::SQLITE_READONLY_CANTLOCK
        | ffi::SQLITE_READONLY_ROLLBACK => return Class::Unavailable,
        ffi::SQLITE_CONSTRAINT_TRIGGER
        | ffi::SQLITE_CONSTRAINT_COMMITHOOK
        | ffi::SQLITE_CONSTRAINT_FUNCTION => return Class::Rejected,
        _ => {}
    }
    match extended & 0xff {
        ffi::SQLITE_BUSY
        | ffi::SQLITE_LOCKED
        | ffi::SQLITE_NOMEM
        | ffi::SQLITE_INTERRUPT
        | ffi::SQLITE_IOERR
        | ffi::SQLITE_FULL
        | ffi::SQLITE_PROTOCOL
        | ffi::SQLITE_SCHEMA
        | ffi::SQLITE_ABORT => Class::Unavailable,
        ffi::SQLITE_CANTOPEN => match phase {
            Phase::Open => Class::Generic,
            Phase::Statement => Class::Unavailable,
        },
        ffi::SQLITE_CORRUPT | ffi::SQLITE_NOTADB => Class::Corrupt,
        ffi::SQLITE_TOOBIG => Class::Rejected,
        _ => Class::Generic,
    }
}

/// The class of any rusqlite error.
///
/// # Behavior
/// Pure. SQLite failures by their extended code ([`classify_code`]); a
/// stored value of the wrong type or range ([`rusqlite::Error::FromSqlConversionFailure`],
/// `InvalidColumnType`, `IntegralValueOutOfRange`, `Utf8Error`) is
/// [`Class::Corrupt`]; a value that cannot be bound is [`Class::Rejected`];
/// any other (API misuse, a bug) is [`Class::Generic`].
pub(crate) fn classify(e: &rusqlite::Error, phase: Phase) -> Class {
    match e {
        rusqlite::Error::SqliteFailure(failure, _) => classify_code(failure.extended_code, phase),
        rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::IntegralValueOutOfRange(..)
        | rusqlite::Error::Utf8Error(..) => Class::Corrupt,
        rusqlite::Error::ToSqlConversionFailure(_) => Class::Rejected,
        _ => Class::Generic,
    }
}

impl From<rusqlite::Error> for SqliteError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Sqlite(Arc::new(e))
    }
}

impl From<SqliteError> for StoreError {
    fn from(e: SqliteError) -> Self {
        e.class().error(STORE, e)
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
    use std::path::Path;

    use rusqlite::ffi;

    use super::*;

    fn code(code: c_int) -> SqliteError {
        SqliteError::from(rusqlite::Error::SqliteFailure(ffi::Error::new(code), None))
    }

    fn open(code: c_int) -> SqliteError {
        SqliteError::Open {
            path: Path::new("idem.db").to_path_buf(),
            source: Arc::new(rusqlite::Error::SqliteFailure(ffi::Error::new(code), None)),
        }
    }

    #[test]
    fn result_codes_by_class() {
        let cases: &[(c_int, Class)] = &[
            (ffi::SQLITE_BUSY, Class::Unavailable),
            (ffi::SQLITE_BUSY_RECOVERY, Class::Unavailable),
            (ffi::SQLITE_BUSY_SNAPSHOT, Class::Unavailable),
            (ffi::SQLITE_BUSY_TIMEOUT, Class::Unavailable),
            (ffi::SQLITE_LOCKED, Class::Unavailable),
            (ffi::SQLITE_LOCKED_SHAREDCACHE, Class::Unavailable),
            (ffi::SQLITE_NOMEM, Class::Unavailable),
            (ffi::SQLITE_INTERRUPT, Class::Unavailable),
            (ffi::SQLITE_IOERR, Class::Unavailable),
            (ffi::SQLITE_IOERR_WRITE, Class::Unavailable),
            (ffi::SQLITE_IOERR_FSYNC, Class::Unavailable),
            (ffi::SQLITE_IOERR_SHORT_READ, Class::Unavailable),
            (ffi::SQLITE_IOERR_NOMEM, Class::Unavailable),
            (ffi::SQLITE_IOERR_CORRUPTFS, Class::Corrupt),
            (ffi::SQLITE_IOERR_DATA, Class::Corrupt),
            (ffi::SQLITE_FULL, Class::Unavailable),
            (ffi::SQLITE_PROTOCOL, Class::Unavailable),
            (ffi::SQLITE_SCHEMA, Class::Unavailable),
            (ffi::SQLITE_ABORT, Class::Unavailable),
            (ffi::SQLITE_ABORT_ROLLBACK, Class::Unavailable),
            (ffi::SQLITE_READONLY_RECOVERY, Class::Unavailable),
            (ffi::SQLITE_READONLY_CANTLOCK, Class::Unavailable),
            (ffi::SQLITE_READONLY_ROLLBACK, Class::Unavailable),
            (ffi::SQLITE_READONLY, Class::Generic),
            (ffi::SQLITE_READONLY_DBMOVED, Class::Generic),
            (ffi::SQLITE_READONLY_CANTINIT, Class::Generic),
            (ffi::SQLITE_READONLY_DIRECTORY, Class::Generic),
            (ffi::SQLITE_CORRUPT, Class::Corrupt),
            (ffi::SQLITE_CORRUPT_INDEX, Class::Corrupt),
            (ffi::SQLITE_CORRUPT_SEQUENCE, Class::Corrupt),
            (ffi::SQLITE_NOTADB, Class::Corrupt),
            (ffi::SQLITE_TOOBIG, Class::Rejected),
            (ffi::SQLITE_CONSTRAINT_TRIGGER, Class::Rejected),
            (ffi::SQLITE_CONSTRAINT_COMMITHOOK, Class::Rejected),
            (ffi::SQLITE_CONSTRAINT_FUNCTION, Class::Rejected),
            (ffi::SQLITE_CONSTRAINT, Class::Generic),
            (ffi::SQLITE_CONSTRAINT_PRIMARYKEY, Class::Generic),
            (ffi::SQLITE_CONSTRAINT_UNIQUE, Class::Generic),
            (ffi::SQLITE_CONSTRAINT_NOTNULL, Class::Generic),
            (ffi::SQLITE_CONSTRAINT_CHECK, Class::Generic),
            (ffi::SQLITE_CONSTRAINT_DATATYPE, Class::Generic),
            (ffi::SQLITE_CONSTRAINT_FOREIGNKEY, Class::Generic),
            (ffi::SQLITE_ERROR, Class::Generic),
            (ffi::SQLITE_INTERNAL, Class::Generic),
            (ffi::SQLITE_PERM, Class::Generic),
            (ffi::SQLITE_AUTH, Class::Generic),
            (ffi::SQLITE_MISUSE, Class::Generic),
            (ffi::SQLITE_RANGE, Class::Generic),
            (ffi::SQLITE_MISMATCH, Class::Generic),
            (ffi::SQLITE_NOLFS, Class::Generic),
        ];
        for &(c, class) in cases {
            assert_eq!(classify_code(c, Phase::Statement), class, "{c}");
            assert_eq!(code(c).class(), class, "{c}");
            assert_eq!(code(c).is_transient(), class == Class::Unavailable, "{c}");
        }
    }

    #[test]
    fn cantopen_is_permanent_only_when_opening() {
        for c in [
            ffi::SQLITE_CANTOPEN,
            ffi::SQLITE_CANTOPEN_ISDIR,
            ffi::SQLITE_CANTOPEN_FULLPATH,
        ] {
            assert_eq!(classify_code(c, Phase::Open), Class::Generic, "{c}");
            assert_eq!(
                classify_code(c, Phase::Statement),
                Class::Unavailable,
                "{c}"
            );
            assert!(!open(c).is_transient(), "{c}");
            assert!(code(c).is_transient(), "{c}");
        }
        // Other codes do not depend on the phase.
        assert!(open(ffi::SQLITE_BUSY).is_transient());
        assert!(!open(ffi::SQLITE_READONLY_DIRECTORY).is_transient());
    }

    #[test]
    fn driver_errors_other_than_failures() {
        use rusqlite::types::Type;
        let cases: Vec<(rusqlite::Error, Class)> = vec![
            (
                rusqlite::Error::FromSqlConversionFailure(0, Type::Blob, "bad".into()),
                Class::Corrupt,
            ),
            (
                rusqlite::Error::InvalidColumnType(0, "state".into(), Type::Integer),
                Class::Corrupt,
            ),
            (
                rusqlite::Error::IntegralValueOutOfRange(0, -1),
                Class::Corrupt,
            ),
            (
                rusqlite::Error::ToSqlConversionFailure("big".into()),
                Class::Rejected,
            ),
            (rusqlite::Error::QueryReturnedNoRows, Class::Generic),
            (rusqlite::Error::InvalidColumnIndex(9), Class::Generic),
            (rusqlite::Error::InvalidParameterCount(1, 2), Class::Generic),
        ];
        for (e, class) in cases {
            assert_eq!(classify(&e, Phase::Statement), class, "{e}");
        }
    }

    #[test]
    fn store_errors_of_each_variant() {
        let cases: Vec<(SqliteError, Class)> = vec![
            (code(ffi::SQLITE_BUSY), Class::Unavailable),
            (code(ffi::SQLITE_FULL), Class::Unavailable),
            (code(ffi::SQLITE_CORRUPT), Class::Corrupt),
            (
                SqliteError::NotADatabase {
                    path: "x".into(),
                    source: Arc::new(rusqlite::Error::SqliteFailure(
                        ffi::Error::new(ffi::SQLITE_NOTADB),
                        None,
                    )),
                },
                Class::Corrupt,
            ),
            (
                SqliteError::CorruptRow {
                    table: "t".into(),
                    why: "x".into(),
                },
                Class::Corrupt,
            ),
            (code(ffi::SQLITE_TOOBIG), Class::Rejected),
            (SqliteError::TooLarge { size: 2, limit: 1 }, Class::Rejected),
            (
                SqliteError::SchemaTooNew {
                    path: "x".into(),
                    table: "t".into(),
                    found: 9,
                    supported: 1,
                },
                Class::Rejected,
            ),
            (
                SqliteError::ForeignDatabase {
                    path: "x".into(),
                    application_id: 7,
                },
                Class::Rejected,
            ),
            (
                SqliteError::ForeignTable {
                    path: "x".into(),
                    table: "t".into(),
                },
                Class::Rejected,
            ),
            (
                SqliteError::InvalidTableName(TableNameError::new("1x", "it starts with a digit")),
                Class::Rejected,
            ),
            (code(ffi::SQLITE_CONSTRAINT_UNIQUE), Class::Generic),
            (SqliteError::Closed, Class::Generic),
            (SqliteError::NoRuntime, Class::Generic),
            (SqliteError::InMemory, Class::Generic),
        ];
        for (e, class) in cases {
            let shown = format!("{e:?}");
            assert_eq!(e.class(), class, "{shown}");
            assert_eq!(e.is_corrupt(), class == Class::Corrupt, "{shown}");
            let store = StoreError::from(e);
            let expected = match store {
                StoreError::Unavailable { .. } => Class::Unavailable,
                StoreError::Corrupt { .. } => Class::Corrupt,
                StoreError::Rejected { .. } => Class::Rejected,
                _ => Class::Generic,
            };
            assert_eq!(expected, class, "{shown}");
            assert_eq!(store.is_transient(), class == Class::Unavailable, "{shown}");
        }
        assert!(matches!(
            idem_core::Error::from(SqliteError::Closed),
            idem_core::Error::Store(StoreError::Generic { .. })
        ));
    }
}
