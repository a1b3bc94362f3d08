//! Where the records live: a validated schema and table name.

use std::fmt;

use idem_core::store::{TableNameError, check_table_name};

/// The longest identifier PostgreSQL keeps (`NAMEDATALEN - 1`).
const MAX_IDENTIFIER: usize = 63;

/// The longest table name accepted: the derived names (`<table>_expires_at_idx`,
/// `<table>_migrations`) must still fit in 63 bytes.
pub const MAX_TABLE_LEN: usize = MAX_IDENTIFIER - INDEX_SUFFIX.len();

const INDEX_SUFFIX: &str = "_expires_at_idx";
const MIGRATIONS_SUFFIX: &str = "_migrations";

/// The schema and table that hold the records.
///
/// # Behavior
/// - Both parts are plain identifiers: lowercase ASCII letters, digits and
///   `_`, not starting with a digit; the schema at most 63 bytes, the table at
///   most [`MAX_TABLE_LEN`] (so the derived index and migrations-table names
///   fit PostgreSQL's 63-byte limit). Anything else is an
///   [`idem_core::store::TableNameError`] (the same error as every SQL store's),
///   naming `schema.table` and the rule broken: these
///   names are the only text ever interpolated into SQL (always quoted);
///   every value is a bind parameter.
/// - The default is `idem.idempotency_records`.
/// - [`PostgresStore::migrate`](crate::PostgresStore::migrate) creates the
///   schema if needed, the table, its expiry index `<table>_expires_at_idx`,
///   its index of abandoned records (named by PostgreSQL:
///   `<table>_lease_deadline_idx`, the table's part shortened if the whole
///   would exceed 63 bytes), and the migrations bookkeeping table
///   `<table>_migrations` in the same schema.
///
/// ```
/// use idem_postgres::TableName;
/// let t = TableName::new("billing", "idempotency")?;
/// assert_eq!(t.to_string(), "\"billing\".\"idempotency\"");
/// assert!(TableName::new("billing", "Robert'); DROP TABLE students;--").is_err());
/// # Ok::<(), idem_core::store::TableNameError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TableName {
    schema: String,
    table: String,
}

impl TableName {
    /// Validates `schema` and `table`.
    pub fn new(
        schema: impl Into<String>,
        table: impl Into<String>,
    ) -> Result<Self, TableNameError> {
        let schema = schema.into();
        let table = table.into();
        let refuse = |what: &str, e: TableNameError| {
            TableNameError::new(
                format!("{schema}.{table}"),
                format!("the {what} name: {}", e.reason()),
            )
        };
        check(&schema, MAX_IDENTIFIER).map_err(|e| refuse("schema", e))?;
        if schema.starts_with("pg_") || schema == "information_schema" {
            return Err(refuse(
                "schema",
                TableNameError::new(&*schema, "it is reserved by PostgreSQL"),
            ));
        }
        check(&table, MAX_TABLE_LEN).map_err(|e| refuse("table", e))?;
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

/// A plain identifier ([`check_table_name`]) in lowercase: PostgreSQL folds
/// unquoted names to lowercase, so a mixed-case name would be a different
/// object to anyone typing it unquoted.
fn check(name: &str, max: usize) -> Result<(), TableNameError> {
    check_table_name(name, max)?;
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(TableNameError::new(
            name,
            "it holds uppercase letters: use lowercase (PostgreSQL folds unquoted names to lowercase)",
        ));
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
        let long_schema = TableName::new("a".repeat(64), "t").unwrap_err();
        assert!(
            long_schema.reason().contains("schema name")
                && long_schema.reason().contains("at most 63"),
            "{long_schema}"
        );
        let long_table = TableName::new("s", "t".repeat(MAX_TABLE_LEN + 1)).unwrap_err();
        assert!(
            long_table.reason().contains("table name")
                && long_table
                    .reason()
                    .contains(&format!("at most {MAX_TABLE_LEN}")),
            "{long_table}"
        );
        let reserved = TableName::new("pg_catalog", "t").unwrap_err();
        assert_eq!(reserved.name(), "pg_catalog.t");
        assert!(reserved.to_string().contains("reserved"), "{reserved}");
    }
}
