//! sqlx errors to [`StoreError`]s.

use std::time::Duration;

use idem_core::StoreError;
use sqlx::migrate::MigrateError;

use crate::{STORE, TableName};

/// The store's own reasons, kept as the source of a [`StoreError`].
#[derive(Debug, thiserror::Error)]
pub(crate) enum Why {
    /// No answer in time; the connection was closed.
    #[error("PostgreSQL did not answer within {0:?} (the connection was closed)")]
    Timeout(Duration),
    /// The table (or its schema) is missing.
    #[error("table {table} does not exist: run PostgresStore::migrate() first")]
    NotMigrated {
        /// The table.
        table: String,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// A record above the size limit.
    #[error("record of about {size} bytes exceeds the store's limit of {limit} bytes")]
    TooLarge {
        /// The record's size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Concurrent writers kept changing the row between snapshot and write.
    #[error("the row kept changing under {0} attempts of {1}; retry later")]
    Unsettled(usize, &'static str),
    /// The migration found a newer or modified schema.
    #[error("table {table} cannot be migrated by this version of idem-postgres")]
    Migration {
        /// The table.
        table: String,
        /// What sqlx found.
        #[source]
        source: MigrateError,
    },
}

/// SQLSTATEs that mean "try again later": connection exceptions (class 08),
/// insufficient resources (class 53), operator intervention (57: shutdown,
/// cannot connect now, statement timeout / cancel), serialization failure,
/// deadlock, lock not available.
fn transient_sqlstate(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("57")
        || matches!(code, "40001" | "40P01" | "55P03")
}

fn unavailable(source: impl Into<idem_core::BoxError>) -> StoreError {
    StoreError::Unavailable {
        store: STORE,
        source: source.into(),
    }
}

pub(crate) fn generic(source: impl Into<idem_core::BoxError>) -> StoreError {
    StoreError::Generic {
        store: STORE,
        source: source.into(),
    }
}

pub(crate) fn rejected(source: impl Into<idem_core::BoxError>) -> StoreError {
    StoreError::Rejected {
        store: STORE,
        source: source.into(),
    }
}

pub(crate) fn timeout(after: Duration) -> StoreError {
    unavailable(Why::Timeout(after))
}

pub(crate) fn unsettled(attempts: usize, what: &'static str) -> StoreError {
    unavailable(Why::Unsettled(attempts, what))
}

/// Maps a driver error.
///
/// # Behavior
/// - Unreachable, closed or timed-out pools and connections, I/O, TLS and
///   protocol errors, and the transient SQLSTATEs ([`transient_sqlstate`]):
///   [`StoreError::Unavailable`].
/// - A missing table or schema: [`StoreError::Generic`] saying to run
///   `migrate()`.
/// - A value that does not decode: [`StoreError::Corrupt`].
/// - Anything else: [`StoreError::Generic`]. The driver's error is always
///   kept as the source.
pub(crate) fn map(e: sqlx::Error, table: &TableName) -> StoreError {
    match &e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => unavailable(e),
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => StoreError::Corrupt {
            store: STORE,
            source: Box::new(e),
        },
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            if transient_sqlstate(&code) {
                unavailable(e)
            } else if matches!(code.as_str(), "42P01" | "3F000") {
                generic(Why::NotMigrated {
                    table: table.to_string(),
                    source: e,
                })
            } else {
                generic(e)
            }
        }
        _ => generic(e),
    }
}

/// Maps a migration error: a newer or modified schema is
/// [`StoreError::Rejected`]; driver errors as [`map`].
pub(crate) fn map_migrate(e: MigrateError, table: &TableName) -> StoreError {
    match e {
        MigrateError::Execute(e) | MigrateError::ExecuteMigration(e, _) => map(e, table),
        e @ (MigrateError::VersionMissing(_)
        | MigrateError::VersionMismatch(_)
        | MigrateError::VersionNotPresent(_)
        | MigrateError::VersionTooOld(..)
        | MigrateError::VersionTooNew(..)
        | MigrateError::Dirty(_)) => rejected(Why::Migration {
            table: table.to_string(),
            source: e,
        }),
        e => generic(Why::Migration {
            table: table.to_string(),
            source: e,
        }),
    }
}

pub(crate) fn too_large(size: usize, limit: usize) -> StoreError {
    rejected(Why::TooLarge { size, limit })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_and_io_failures_are_transient() {
        let t = TableName::default();
        for e in [
            sqlx::Error::PoolTimedOut,
            sqlx::Error::PoolClosed,
            sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
        ] {
            assert!(map(e, &t).is_transient());
        }
        assert!(!map(sqlx::Error::RowNotFound, &t).is_transient());
        assert!(matches!(
            map(sqlx::Error::Decode("bad".into()), &t),
            StoreError::Corrupt { .. }
        ));
        assert!(timeout(Duration::from_secs(1)).is_transient());
        for code in ["08006", "53300", "57P01", "57014", "40001", "40P01"] {
            assert!(transient_sqlstate(code), "{code}");
        }
        for code in ["23505", "42P01", "22P02"] {
            assert!(!transient_sqlstate(code), "{code}");
        }
    }
}
