//! The crate's error type, [`PostgresError`], and its mapping to
//! [`StoreError`].

use std::time::Duration;

use idem_core::{BoxError, StoreError};
use sqlx::migrate::MigrateError;

use crate::{STORE, TableName};

/// An error of the PostgreSQL store: connecting, migrating, or running a
/// statement.
///
/// # Behavior
/// - [`is_transient`](Self::is_transient) tells the errors worth retrying
///   later (an unreachable server, a broken connection, a closed or exhausted
///   pool, a timeout, the transient SQLSTATEs of failover, shutdown, resources
///   and lock or serialization conflicts) from permanent ones (a missing
///   table, a record too large, a schema migrated by a newer version, …).
/// - Converted to [`StoreError`] (and from there to [`idem_core::Error`]):
///   transient errors become [`StoreError::Unavailable`], undecodable rows and
///   damaged table files [`StoreError::Corrupt`], values the server refuses,
///   records above the limit, checkpoints that cannot be encoded and newer
///   schemas [`StoreError::Rejected`],
///   anything else [`StoreError::Generic`]. The driver's error is kept as the
///   source. The classification of every driver error and SQLSTATE is the
///   table in the crate docs, "Error classification".
/// - [`Driver`](Self::Driver) shows the driver's message as its own.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PostgresError {
    /// The driver failed (server error, I/O, pool, protocol, …); classified
    /// by its kind and, for server errors, its SQLSTATE.
    #[error(transparent)]
    Driver(sqlx::Error),
    /// No answer within the store's timeout; the connection was closed.
    #[error("PostgreSQL did not answer within {0:?} (the connection was closed)")]
    Timeout(Duration),
    /// The table (or its schema, or a column) is missing.
    #[error("table {table} does not exist: run PostgresStore::migrate() first")]
    NotMigrated {
        /// The table.
        table: String,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// A record above the store's size limit.
    #[error("record of about {size} bytes exceeds the store's limit of {limit} bytes")]
    TooLarge {
        /// The record's size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// A record's checkpoint could not be encoded for its column
    /// ([`codec::encode_checkpoint`](idem_core::store::codec::encode_checkpoint));
    /// nothing was written.
    #[error("the record's checkpoint could not be encoded")]
    Encode(#[source] idem_core::store::codec::CodecError),
    /// Concurrent writers kept changing the row between snapshot and write.
    #[error("the row kept changing under {attempts} attempts of {operation}; retry later")]
    Unsettled {
        /// How many times the statement ran.
        attempts: usize,
        /// The primitive.
        operation: &'static str,
    },
    /// A stored row does not make a record (a value of the wrong type or
    /// length, an unknown state, …).
    #[error("row of {table} is not a valid record: {why}")]
    CorruptRow {
        /// The table.
        table: String,
        /// What is wrong with it.
        why: String,
    },
    /// The migration found a newer or modified schema, or could not run.
    #[error("table {table} cannot be migrated by this version of idem-postgres")]
    Migration {
        /// The table.
        table: String,
        /// What sqlx found.
        #[source]
        source: MigrateError,
    },
}

impl PostgresError {
    /// Whether retrying later may succeed (the table is in the crate docs,
    /// "Error classification").
    pub fn is_transient(&self) -> bool {
        self.class() == Class::Unavailable
    }

    /// A driver error of a statement on `table`: a missing table, schema or
    /// column becomes [`NotMigrated`](Self::NotMigrated).
    pub(crate) fn driver(e: sqlx::Error, table: &TableName) -> Self {
        match classify(&e) {
            Class::NotMigrated => Self::NotMigrated {
                table: table.to_string(),
                source: e,
            },
            _ => Self::Driver(e),
        }
    }

    /// A migration error on `table`: the driver errors of its statements as
    /// [`driver`](Self::driver), anything else [`Migration`](Self::Migration).
    pub(crate) fn migration(e: MigrateError, table: &TableName) -> Self {
        match e {
            MigrateError::Execute(e) | MigrateError::ExecuteMigration(e, _) => {
                Self::driver(e, table)
            }
            e => Self::Migration {
                table: table.to_string(),
                source: e,
            },
        }
    }

    /// The [`StoreError`] variant this error becomes.
    pub(crate) fn class(&self) -> Class {
        match self {
            Self::Driver(e) => match classify(e) {
                // Only `driver` builds these, with the table's name.
                Class::NotMigrated => Class::Generic,
                class => class,
            },
            Self::Timeout(_) | Self::Unsettled { .. } => Class::Unavailable,
            Self::NotMigrated { .. } => Class::NotMigrated,
            Self::TooLarge { .. } | Self::Encode(_) => Class::Rejected,
            Self::CorruptRow { .. } => Class::Corrupt,
            // A table migrated by a newer version, or whose migrations were
            // modified: the schema is not this version's.
            Self::Migration { source, .. } => match source {
                MigrateError::VersionMissing(_)
                | MigrateError::VersionMismatch(_)
                | MigrateError::VersionNotPresent(_)
                | MigrateError::VersionTooOld(..)
                | MigrateError::VersionTooNew(..)
                | MigrateError::Dirty(_) => Class::Rejected,
                _ => Class::Generic,
            },
        }
    }
}

impl From<PostgresError> for StoreError {
    fn from(e: PostgresError) -> Self {
        e.class().error(STORE, e)
    }
}

impl From<PostgresError> for idem_core::Error {
    fn from(e: PostgresError) -> Self {
        Self::Store(e.into())
    }
}

/// What a driver error means for the caller: the [`StoreError`] variant it
/// becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Class {
    /// Retrying later may succeed: [`StoreError::Unavailable`].
    Unavailable,
    /// The table, its schema or a column is missing: [`StoreError::Generic`]
    /// saying to run `migrate()`.
    NotMigrated,
    /// Stored data cannot be read: [`StoreError::Corrupt`].
    Corrupt,
    /// The server refused a value of the record: [`StoreError::Rejected`].
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
            Self::NotMigrated | Self::Generic => StoreError::generic,
        };
        error(store, source.into())
    }
}

/// The class of a SQLSTATE (the table is in the crate docs, "Error
/// classification").
///
/// # Behavior
/// Pure. Transient: connection exceptions (class 08), transaction rollbacks
/// but integrity violations (40000, 40001 serialization failure, 40003
/// statement completion unknown, 40P01 deadlock), insufficient resources
/// (class 53), lock not available (55P03), operator intervention (class 57:
/// query canceled or statement timeout, admin or crash shutdown, cannot
/// connect now, idle session timeout) but 57P04 database dropped, system
/// errors 58000 and 58030 (I/O), read-only transaction after a failover
/// (25006), idle-in-transaction timeout (25P03), snapshot too old (72000).
/// Missing table, schema or column: [`Class::NotMigrated`]. Data corrupted
/// (XX001, XX002): [`Class::Corrupt`]. Data exceptions (class 22) and
/// program limits (class 54): [`Class::Rejected`]. Everything else,
/// including constraint violations, authentication, privileges and syntax:
/// [`Class::Generic`].
pub(crate) fn classify_sqlstate(code: &str) -> Class {
    let class = code.get(..2).unwrap_or("");
    match (class, code) {
        ("08" | "53", _)
        | ("40", "40000" | "40001" | "40003" | "40P01")
        | ("55", "55P03")
        | ("58", "58000" | "58030")
        | ("25", "25006" | "25P03")
        | ("72", "72000") => Class::Unavailable,
        ("57", "57P04") => Class::Generic,
        ("57", _) => Class::Unavailable,
        (_, "42P01" | "3F000" | "42703") => Class::NotMigrated,
        (_, "XX001" | "XX002") => Class::Corrupt,
        ("22" | "54", _) => Class::Rejected,
        _ => Class::Generic,
    }
}

/// The class of any driver error.
///
/// # Behavior
/// Pure. Transient: I/O errors, an exhausted pool (`PoolTimedOut`), a pool
/// the application closed (`PoolClosed`: it is shutting down, and a retry
/// elsewhere or later succeeds), a crashed background worker, protocol
/// errors (a connection desynchronised or cut mid-message: it is closed and
/// replaced, and the statement's effect is unknown as for a lost reply), and
/// the transient SQLSTATEs ([`classify_sqlstate`]). A value that does not
/// decode is [`Class::Corrupt`], one that does not encode
/// [`Class::Rejected`]. TLS and configuration errors, and anything else, are
/// [`Class::Generic`].
pub(crate) fn classify(e: &sqlx::Error) -> Class {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => Class::Unavailable,
        sqlx::Error::Database(db) => db
            .code()
            .map_or(Class::Generic, |code| classify_sqlstate(&code)),
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => Class::Corrupt,
        sqlx::Error::Encode(_) => Class::Rejected,
        // Tls (a certificate or TLS setting refused: the same handshake fails
        // the same way; a network failure during it is `Io`), Configuration,
        // InvalidArgument, RowNotFound, ColumnNotFound, TypeNotFound, …
        _ => Class::Generic,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use std::borrow::Cow;
    use std::error::Error as _;

    use sqlx::error::{DatabaseError, ErrorKind};

    use super::*;

    /// A server error with a SQLSTATE, as the driver reports it.
    #[derive(Debug, thiserror::Error)]
    #[error("server error {0}")]
    struct Db(&'static str);

    impl DatabaseError for Db {
        fn message(&self) -> &str {
            "server error"
        }
        fn code(&self) -> Option<Cow<'_, str>> {
            Some(Cow::Borrowed(self.0))
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> ErrorKind {
            ErrorKind::Other
        }
    }

    fn db(code: &'static str) -> sqlx::Error {
        sqlx::Error::Database(Box::new(Db(code)))
    }

    /// The [`StoreError`] of a driver error on `table`.
    fn map(e: sqlx::Error, table: &TableName) -> StoreError {
        PostgresError::driver(e, table).into()
    }

    #[test]
    fn sqlstates_by_class() {
        let cases: &[(&str, Class)] = &[
            // Connection exceptions.
            ("08000", Class::Unavailable),
            ("08001", Class::Unavailable),
            ("08003", Class::Unavailable),
            ("08004", Class::Unavailable),
            ("08006", Class::Unavailable),
            ("08007", Class::Unavailable),
            ("08P01", Class::Unavailable),
            // Transaction rollback.
            ("40000", Class::Unavailable),
            ("40001", Class::Unavailable),
            ("40003", Class::Unavailable),
            ("40P01", Class::Unavailable),
            ("40002", Class::Generic),
            // Insufficient resources.
            ("53000", Class::Unavailable),
            ("53100", Class::Unavailable),
            ("53200", Class::Unavailable),
            ("53300", Class::Unavailable),
            ("53400", Class::Unavailable),
            // Lock not available (lock_timeout); other class 55 states.
            ("55P03", Class::Unavailable),
            ("55000", Class::Generic),
            ("55006", Class::Generic),
            // Operator intervention.
            ("57000", Class::Unavailable),
            ("57014", Class::Unavailable),
            ("57P01", Class::Unavailable),
            ("57P02", Class::Unavailable),
            ("57P03", Class::Unavailable),
            ("57P05", Class::Unavailable),
            ("57P04", Class::Generic),
            // System errors.
            ("58000", Class::Unavailable),
            ("58030", Class::Unavailable),
            ("58P01", Class::Generic),
            ("58P02", Class::Generic),
            // Invalid transaction state.
            ("25006", Class::Unavailable),
            ("25P03", Class::Unavailable),
            ("25P02", Class::Generic),
            ("25001", Class::Generic),
            // Snapshot too old.
            ("72000", Class::Unavailable),
            // Schema missing.
            ("42P01", Class::NotMigrated),
            ("3F000", Class::NotMigrated),
            ("42703", Class::NotMigrated),
            // Syntax, privileges, other 42.
            ("42601", Class::Generic),
            ("42501", Class::Generic),
            ("42883", Class::Generic),
            // Data exceptions and program limits.
            ("22000", Class::Rejected),
            ("22001", Class::Rejected),
            ("22003", Class::Rejected),
            ("22021", Class::Rejected),
            ("22P02", Class::Rejected),
            ("54000", Class::Rejected),
            ("54001", Class::Rejected),
            // Integrity constraints: a bug or a foreign constraint.
            ("23000", Class::Generic),
            ("23502", Class::Generic),
            ("23503", Class::Generic),
            ("23505", Class::Generic),
            ("23514", Class::Generic),
            ("23P01", Class::Generic),
            // Authentication, catalog, features, internal.
            ("28000", Class::Generic),
            ("28P01", Class::Generic),
            ("3D000", Class::Generic),
            ("0A000", Class::Generic),
            ("P0001", Class::Generic),
            ("XX000", Class::Generic),
            ("XX001", Class::Corrupt),
            ("XX002", Class::Corrupt),
            // Malformed.
            ("", Class::Generic),
            ("5", Class::Generic),
        ];
        for (code, class) in cases {
            assert_eq!(classify_sqlstate(code), *class, "{code:?}");
        }
    }

    #[test]
    fn driver_errors_by_variant() {
        use std::io::ErrorKind as Io;
        let cases: Vec<(sqlx::Error, Class)> = vec![
            (
                sqlx::Error::Io(Io::ConnectionRefused.into()),
                Class::Unavailable,
            ),
            (
                sqlx::Error::Io(Io::ConnectionReset.into()),
                Class::Unavailable,
            ),
            (
                sqlx::Error::Io(Io::UnexpectedEof.into()),
                Class::Unavailable,
            ),
            (sqlx::Error::PoolTimedOut, Class::Unavailable),
            (sqlx::Error::PoolClosed, Class::Unavailable),
            (sqlx::Error::WorkerCrashed, Class::Unavailable),
            (
                sqlx::Error::Protocol("unknown message type: 'x'".into()),
                Class::Unavailable,
            ),
            (
                sqlx::Error::Tls("invalid peer certificate".into()),
                Class::Generic,
            ),
            (sqlx::Error::Configuration("bad url".into()), Class::Generic),
            (sqlx::Error::InvalidArgument("x".into()), Class::Generic),
            (sqlx::Error::RowNotFound, Class::Generic),
            (sqlx::Error::ColumnNotFound("state".into()), Class::Generic),
            (sqlx::Error::Decode("bad".into()), Class::Corrupt),
            (
                sqlx::Error::ColumnDecode {
                    index: "0".into(),
                    source: "bad".into(),
                },
                Class::Corrupt,
            ),
            (sqlx::Error::Encode("too long".into()), Class::Rejected),
            (db("25006"), Class::Unavailable),
            (db("57P01"), Class::Unavailable),
            (db("23505"), Class::Generic),
            (db("42P01"), Class::NotMigrated),
            (db("XX001"), Class::Corrupt),
            (db("22P02"), Class::Rejected),
        ];
        for (e, class) in cases {
            assert_eq!(classify(&e), class, "{e}");
        }
    }

    #[test]
    fn map_builds_the_variant_of_the_class() {
        let t = TableName::default();
        let read_only = map(db("25006"), &t);
        assert!(matches!(read_only, StoreError::Unavailable { .. }));
        assert!(read_only.is_transient());
        assert!(matches!(map(db("XX001"), &t), StoreError::Corrupt { .. }));
        assert!(matches!(map(db("22001"), &t), StoreError::Rejected { .. }));
        let missing = map(db("42P01"), &t);
        assert!(matches!(missing, StoreError::Generic { .. }));
        let why = missing.source().expect("a source").to_string();
        assert!(why.contains("migrate()"), "{why}");
        let unique = map(db("23505"), &t);
        assert!(matches!(unique, StoreError::Generic { .. }));
        assert!(!unique.is_transient());
        // The driver's error stays the source.
        let source = unique.source().expect("a source").to_string();
        assert!(source.contains("23505"), "{source}");
        assert!(PostgresError::Timeout(Duration::from_secs(1)).is_transient());
        assert!(StoreError::from(PostgresError::Timeout(Duration::from_secs(1))).is_transient());
        let unsettled = PostgresError::Unsettled {
            attempts: 3,
            operation: "get",
        };
        assert!(StoreError::from(unsettled).is_transient());
        let too_large = PostgresError::TooLarge { size: 2, limit: 1 };
        assert!(!too_large.is_transient());
        assert!(matches!(
            StoreError::from(too_large),
            StoreError::Rejected { .. }
        ));
        let corrupt = PostgresError::CorruptRow {
            table: "t".into(),
            why: "x".into(),
        };
        assert!(matches!(
            StoreError::from(corrupt),
            StoreError::Corrupt { .. }
        ));
        assert!(matches!(
            idem_core::Error::from(PostgresError::driver(db("23505"), &t)),
            idem_core::Error::Store(StoreError::Generic { .. })
        ));
    }
}
