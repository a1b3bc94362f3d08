//! Where the records live: a validated schema and table name.

use std::fmt;

/// The longest identifier PostgreSQL keeps (`NAMEDATALEN - 1`).
const MAX_IDENTIFIER: usize = 63;

/// The longest table name accepted: the derived names (`<table>_expires_at_idx`,
/// `<table>_migrations`) must still fit in 63 bytes.
pub const MAX_TABLE_LEN: usize = MAX_IDENTIFIER - INDEX_SUFFIX.len();

const INDEX_SUFFIX: &str = "_expires_at_idx";
const MIGRATIONS_SUFFIX: &str = "_migrations";

/// Why a schema or table name was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// The name is empty.
    #[error("{what} name is empty")]
    Empty {
        /// `"schema"` or `"table"`.
        what: &'static str,
    },
    /// The name is longer than allowed.
    #[error("{what} name `{name}` is {len} bytes long; at most {max} are allowed")]
    TooLong {
        /// `"schema"` or `"table"`.
        what: &'static str,
        /// The refused name.
        name: String,
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The name holds a character outside `[a-z0-9_]`, or starts with a digit.
    #[error(
        "{what} name `{name}` is not a plain identifier: use lowercase ASCII letters, digits and `_`, not starting with a digit"
    )]
    NotPlain {
        /// `"schema"` or `"table"`.
        what: &'static str,
        /// The refused name.
        name: String,
    },
    /// The schema name is reserved by PostgreSQL (`pg_*`, `information_schema`).
    #[error("schema name `{name}` is reserved by PostgreSQL")]
    Reserved {
        /// The refused name.
        name: String,
    },
}

/// The schema and table that hold the records.
///
/// # Behavior
/// - Both parts are plain identifiers: lowercase ASCII letters, digits and
///   `_`, not starting with a digit; the schema at most 63 bytes, the table at
///   most [`MAX_TABLE_LEN`] (so the derived index and migrations-table names
///   fit PostgreSQL's 63-byte limit). Anything else is a [`NameError`]: these
///   names are the only text ever interpolated into SQL (always quoted);
///   every value is a bind parameter.
/// - The default is `idem.idempotency_records`.
/// - [`PostgresStore::migrate`](crate::PostgresStore::migrate) creates the
///   schema if needed, the table, its expiry index `<table>_expires_at_idx`,
///   and the migrations bookkeeping table `<table>_migrations` in the same schema.
///
/// ```
/// use idem_postgres::TableName;
/// let t = TableName::new("billing", "idempotency")?;
/// assert_eq!(t.to_string(), "\"billing\".\"idempotency\"");
/// assert!(TableName::new("billing", "Robert'); DROP TABLE students;--").is_err());
/// # Ok::<(), idem_postgres::NameError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TableName {
    schema: String,
    table: String,
}

impl TableName {
    /// Validates `schema` and `table`.
    pub fn new(schema: impl Into<String>, table: impl Into<String>) -> Result<Self, NameError> {
        let schema = schema.into();
        let table = table.into();
        check("schema", &schema, MAX_IDENTIFIER)?;
        if schema.starts_with("pg_") || schema == "information_schema" {
            return Err(NameError::Reserved { name: schema });
        }
        check("table", &table, MAX_TABLE_LEN)?;
        Ok(Self { schema, table })
    }

    /// The schema name.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The table name (without the schema).
    pub fn table(&self) -> &str {
        &self.table
    }

    /// `"schema"`, quoted.
    pub(crate) fn quoted_schema(&self) -> String {
        format!("\"{}\"", self.schema)
    }

    /// `"<table>_expires_at_idx"`, quoted, unqualified (an index lives in its table's schema).
    pub(crate) fn quoted_index(&self) -> String {
        format!("\"{}{INDEX_SUFFIX}\"", self.table)
    }

    /// `"schema"."<table>_migrations"`, quoted.
    pub(crate) fn quoted_migrations(&self) -> String {
        format!("\"{}\".\"{}{MIGRATIONS_SUFFIX}\"", self.schema, self.table)
    }
}

impl Default for TableName {
    fn default() -> Self {
        Self {
            schema: "idem".to_string(),
            table: "idempotency_records".to_string(),
        }
    }
}

/// The schema-qualified, quoted name, ready for SQL: `"schema"."table"`.
impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\".\"{}\"", self.schema, self.table)
    }
}

fn check(what: &'static str, name: &str, max: usize) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { what });
    }
    if name.len() > max {
        return Err(NameError::TooLong {
            what,
            name: name.to_string(),
            len: name.len(),
            max,
        });
    }
    let plain = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit();
    if !plain {
        return Err(NameError::NotPlain {
            what,
            name: name.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_identifiers() {
        let t = TableName::new("idem_test_1", "records").unwrap();
        assert_eq!(t.to_string(), r#""idem_test_1"."records""#);
        assert_eq!(t.quoted_index(), r#""records_expires_at_idx""#);
        assert_eq!(
            t.quoted_migrations(),
            r#""idem_test_1"."records_migrations""#
        );
        assert_eq!(
            TableName::default().to_string(),
            r#""idem"."idempotency_records""#
        );
        assert!(TableName::new("a".repeat(63), "t".repeat(MAX_TABLE_LEN)).is_ok());
    }

    #[test]
    fn refuses_everything_else() {
        for (schema, table) in [
            ("", "t"),
            ("s", ""),
            ("S", "t"),
            ("s", "T"),
            ("1s", "t"),
            ("s", "1t"),
            ("s s", "t"),
            ("s", "t\"; drop table x; --"),
            ("s", "t.u"),
            ("sé", "t"),
            ("pg_catalog", "t"),
            ("information_schema", "t"),
        ] {
            assert!(
                TableName::new(schema, table).is_err(),
                "{schema:?}.{table:?} must be refused"
            );
        }
        assert!(matches!(
            TableName::new("a".repeat(64), "t"),
            Err(NameError::TooLong { max: 63, .. })
        ));
        assert!(matches!(
            TableName::new("s", "t".repeat(MAX_TABLE_LEN + 1)),
            Err(NameError::TooLong { .. })
        ));
    }
}
