//! The table, its versioned migrations, and the checks run on open.

use std::fmt;
use std::path::Path;

use idem_core::store::{TableNameError, check_table_name};
use rusqlite::{Connection, ErrorCode, OptionalExtension, TransactionBehavior};

use crate::SqliteError;

/// `PRAGMA application_id` of databases created by idem: `"idem"` in ASCII.
pub(crate) const APPLICATION_ID: i32 = 0x6964_656d;

/// The table that records each idem table's schema version.
pub(crate) const SCHEMA_TABLE: &str = "idem_schema";

/// The longest accepted table name.
pub const MAX_TABLE_LEN: usize = 64;

/// The name of the records table (default `idem_records`).
///
/// # Behavior
/// Accepted: 1 to [`MAX_TABLE_LEN`] ASCII letters, digits and underscores,
/// not starting with a digit ([`idem_core::store::check_table_name`]), not starting
/// with `sqlite_` (reserved by SQLite), and not `idem_schema`. Anything else
/// is an [`idem_core::store::TableNameError`]. The name is always quoted in SQL. The expiry index is named
/// `<table>_expires_at`, the index of abandoned records (see
/// [`Store::abandoned`](idem_core::store::Store::abandoned)) `<table>_abandoned`.
///
/// ```
/// use idem_sqlite::TableName;
/// assert_eq!(TableName::default().as_str(), "idem_records");
/// assert!(TableName::new("payments_idem").is_ok());
/// assert!(TableName::new("x; DROP TABLE y").is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TableName(String);

impl TableName {
    /// Validates `name`.
    ///
    /// # Behavior
    /// A refused name is an [`idem_core::store::TableNameError`] (the same error as
    /// every SQL store's) naming the rule it breaks; `?` converts it into
    /// [`SqliteError::InvalidTableName`].
    pub fn new(name: &str) -> Result<Self, TableNameError> {
        check_table_name(name, MAX_TABLE_LEN)?;
        if name.to_ascii_lowercase().starts_with("sqlite_") {
            return Err(TableNameError::new(
                name,
                "names starting with `sqlite_` are reserved by SQLite",
            ));
        }
        if name.eq_ignore_ascii_case(SCHEMA_TABLE) {
            return Err(TableNameError::new(
                name,
                "`idem_schema` is idem-sqlite's own bookkeeping table",
            ));
        }
        Ok(Self(name.to_string()))
    }

    /// The name, unquoted.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name, quoted for SQL.
    pub(crate) fn quoted(&self) -> String {
        format!("\"{}\"", self.0)
    }

    /// The name of the table's index `suffix` (`expires_at`, `abandoned`),
    /// quoted: `"<table>_<suffix>"`. `suffix` is a constant of this crate.
    pub(crate) fn quoted_index(&self, suffix: &str) -> String {
        format!("\"{}_{suffix}\"", self.0)
    }
}

impl Default for TableName {
    fn default() -> Self {
        Self("idem_records".to_string())
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The migrations, in order: migration `i` (0-based) brings the table from
/// version `i` to version `i + 1`. `{table}` and `{index}` are replaced by
/// the quoted names (`{abandoned_index}` too). Never edit a shipped
/// migration; append a new one.
const MIGRATIONS: &[&str] = &[
    // 1: the records table and its expiry index.
    "CREATE TABLE {table} (
        digest BLOB PRIMARY KEY NOT NULL,
        tenant TEXT NOT NULL,
        principal TEXT,
        operation TEXT,
        \"key\" TEXT NOT NULL,
        state TEXT NOT NULL,
        fingerprint BLOB NOT NULL,
        token BLOB NOT NULL,
        lease_deadline INTEGER,
        outcome BLOB,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        attempts INTEGER NOT NULL,
        revision INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX {index} ON {table} (expires_at);",
    // 2: the checkpoint (`codec::encode_checkpoint`, NULL for none) and the
    // index that serves `Store::abandoned`: in-flight records with a
    // checkpoint, by lease deadline (records without a checkpoint, nearly
    // all of them, are not in it).
    "ALTER TABLE {table} ADD COLUMN checkpoint BLOB;
    CREATE INDEX {abandoned_index} ON {table} (lease_deadline)
        WHERE state = 'in_flight' AND checkpoint IS NOT NULL;",
];

/// The schema version this crate creates and reads.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Where an open's checks apply (for error messages).
pub(crate) fn describe(path: Option<&Path>) -> std::path::PathBuf {
    path.map_or_else(|| ":memory:".into(), Path::to_path_buf)
}

/// Maps an error of the first statements on a new connection: a file that
/// is not a database gets its own, clear error.
pub(crate) fn open_error(path: &Path, e: rusqlite::Error) -> SqliteError {
    let source = std::sync::Arc::new(e);
    match source.sqlite_error_code() {
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => SqliteError::NotADatabase {
            path: path.to_path_buf(),
            source,
        },
        _ => SqliteError::Open {
            path: path.to_path_buf(),
            source,
        },
    }
}

/// Checks that the database may hold idem's table, and creates or migrates
/// it, in one `IMMEDIATE` transaction (concurrent openers take turns).
///
/// # Behavior
/// - A file that is not a SQLite database: [`SqliteError::NotADatabase`].
/// - `application_id` neither 0 nor idem's: [`SqliteError::ForeignDatabase`].
///   A new, empty database gets idem's `application_id`; a database that
///   already holds other tables (an application's own database, for
///   transactional completion) keeps its `application_id` of 0.
/// - A table with the records table's name that idem did not create:
///   [`SqliteError::ForeignTable`].
/// - A schema version newer than [`SCHEMA_VERSION`]: [`SqliteError::SchemaTooNew`].
/// - Otherwise applies the missing migrations and records the version;
///   running it again changes nothing.
pub(crate) fn migrate(
    conn: &mut Connection,
    table: &TableName,
    path: &Path,
) -> Result<(), SqliteError> {
    let checked = |e: rusqlite::Error| open_error(path, e);
    let application_id: i32 = conn
        .pragma_query_value(None, "application_id", |row| row.get(0))
        .map_err(checked)?;
    if application_id != 0 && application_id != APPLICATION_ID {
        return Err(SqliteError::ForeignDatabase {
            path: path.to_path_buf(),
            application_id,
        });
    }
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(checked)?;
    let objects: i64 = tx
        .query_row("SELECT count(*) FROM sqlite_schema", [], |row| row.get(0))
        .map_err(checked)?;
    tx.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS {SCHEMA_TABLE} (
            records_table TEXT PRIMARY KEY NOT NULL,
            version INTEGER NOT NULL
        ) STRICT"
    ))?;
    let found: Option<i64> = tx
        .query_row(
            &format!("SELECT version FROM {SCHEMA_TABLE} WHERE records_table = ?1"),
            [table.as_str()],
            |row| row.get(0),
        )
        .optional()?;
    let found = match found {
        Some(version) => version,
        None => {
            let exists: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE name = ?1 COLLATE NOCASE)",
                [table.as_str()],
                |row| row.get(0),
            )?;
            if exists {
                return Err(SqliteError::ForeignTable {
                    path: path.to_path_buf(),
                    table: table.to_string(),
                });
            }
            0
        }
    };
    if found > SCHEMA_VERSION {
        return Err(SqliteError::SchemaTooNew {
            path: path.to_path_buf(),
            table: table.to_string(),
            found,
            supported: SCHEMA_VERSION,
        });
    }
    let start = usize::try_from(found.max(0)).unwrap_or(usize::MAX);
    for (i, migration) in MIGRATIONS.iter().enumerate().skip(start) {
        tx.execute_batch(
            &migration
                .replace("{table}", &table.quoted())
                .replace("{index}", &table.quoted_index("expires_at"))
                .replace("{abandoned_index}", &table.quoted_index("abandoned")),
        )?;
        tracing::info!(table = %table, version = i + 1, "idem-sqlite: migrated");
    }
    if found != SCHEMA_VERSION {
        tx.execute(
            &format!(
                "INSERT INTO {SCHEMA_TABLE} (records_table, version) VALUES (?1, ?2) \
                 ON CONFLICT (records_table) DO UPDATE SET version = excluded.version"
            ),
            rusqlite::params![table.as_str(), SCHEMA_VERSION],
        )?;
    }
    if objects == 0 && application_id == 0 {
        tx.pragma_update(None, "application_id", APPLICATION_ID)?;
    }
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_plain_identifiers() {
        for ok in ["idem_records", "_x", "A1", &"a".repeat(64)] {
            assert!(TableName::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1abc",
            "a-b",
            "a b",
            "a\"b",
            "sqlite_master",
            "SQLite_x",
            "idem_schema",
            "é",
            &"a".repeat(65),
        ] {
            let e = TableName::new(bad).unwrap_err();
            assert_eq!(e.name(), bad);
            assert!(matches!(
                SqliteError::from(e),
                SqliteError::InvalidTableName(_)
            ));
        }
    }

    #[test]
    fn migrating_twice_changes_nothing() {
        let mut conn = Connection::open_in_memory().unwrap();
        let t = TableName::default();
        let path = Path::new(":memory:");
        migrate(&mut conn, &t, path).unwrap();
        migrate(&mut conn, &t, path).unwrap();
        let version: i64 = conn
            .query_row("SELECT version FROM idem_schema", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let id: i32 = conn
            .pragma_query_value(None, "application_id", |r| r.get(0))
            .unwrap();
        assert_eq!(id, APPLICATION_ID);
    }
}
