//! Table names of SQL stores: the checks every SQL backend shares, and the
//! one error type they all return for a refused name.

use std::borrow::Cow;

/// A table name a store refused, and why.
///
/// # Behavior
/// - Every SQL store of the workspace (SQLite, PostgreSQL) returns this type
///   from its `TableName::new`, so an application handles a bad name the same
///   way whatever the backend.
/// - Display names the refused name (quoted and escaped, so that control
///   characters or an injection attempt show as they are) and the reason:
///   `invalid table name "1abc": it starts with a digit`.
/// - [`check_table_name`] gives the checks all SQL stores share; a store adds
///   its own rules (reserved prefixes, lowercase only, …) with
///   [`TableNameError::new`].
///
/// ```
/// use idem_core::store::{TableNameError, check_table_name};
///
/// let e = check_table_name("payments-idem", 64).unwrap_err();
/// assert_eq!(e.name(), "payments-idem");
/// assert!(e.to_string().contains("'-'"), "{e}");
/// let own = TableNameError::new("sqlite_x", "names starting with `sqlite_` are reserved by SQLite");
/// assert_eq!(
///     own.to_string(),
///     "invalid table name \"sqlite_x\": names starting with `sqlite_` are reserved by SQLite"
/// );
/// ```
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid table name {name:?}: {reason}")]
pub struct TableNameError {
    name: String,
    reason: Cow<'static, str>,
}

impl TableNameError {
    /// An error refusing `name` for `reason` (a phrase such as "it starts
    /// with a digit", shown after the name).
    pub fn new(name: impl Into<String>, reason: impl Into<Cow<'static, str>>) -> Self {
        Self {
            name: name.into(),
            reason: reason.into(),
        }
    }

    /// The refused name, as given.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Why it was refused.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

/// Checks that `name` is a plain SQL identifier of at most `max_len` bytes.
///
/// # Behavior
/// Accepts 1 to `max_len` ASCII letters, digits and underscores, not
/// starting with a digit: a name that needs no quoting rules beyond double
/// quotes, and that no SQL dialect reads as anything but a name. Anything
/// else is a [`TableNameError`] naming the first rule broken (empty, too
/// long, a character outside the set, a leading digit). Pure; the store's own
/// limit goes in `max_len` (each database has its own, and derived names
/// such as indexes take room).
///
/// ```
/// use idem_core::store::check_table_name;
///
/// assert!(check_table_name("idem_records", 64).is_ok());
/// assert!(check_table_name("", 64).is_err());
/// assert!(check_table_name("x; DROP TABLE y", 64).is_err());
/// assert!(check_table_name("1abc", 64).is_err());
/// assert!(check_table_name("abcd", 3).is_err());
/// ```
pub fn check_table_name(name: &str, max_len: usize) -> Result<(), TableNameError> {
    if name.is_empty() {
        return Err(TableNameError::new(name, "it is empty"));
    }
    if name.len() > max_len {
        return Err(TableNameError::new(
            name,
            format!(
                "it is {} bytes long; at most {max_len} are allowed",
                name.len()
            ),
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_'))
    {
        return Err(TableNameError::new(
            name,
            format!("it holds {bad:?}: use ASCII letters, digits and `_` only"),
        ));
    }
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(TableNameError::new(name, "it starts with a digit"));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn plain_identifiers_pass() {
        for ok in ["idem_records", "_x", "A1", "a", &"a".repeat(64)] {
            assert_eq!(check_table_name(ok, 64), Ok(()), "{ok}");
        }
    }

    #[test]
    fn each_refusal_names_the_name_and_the_rule() {
        let cases: &[(&str, usize, &str)] = &[
            ("", 64, "empty"),
            ("abcd", 3, "4 bytes long; at most 3"),
            ("a-b", 64, "'-'"),
            ("a b", 64, "' '"),
            ("a\"b", 64, "'\"'"),
            ("é", 64, "'é'"),
            ("x\n", 64, "'\\n'"),
            ("1abc", 64, "starts with a digit"),
        ];
        for &(name, max, why) in cases {
            let e = check_table_name(name, max).unwrap_err();
            assert_eq!(e.name(), name);
            let shown = e.to_string();
            assert!(shown.contains(&format!("{name:?}")), "{shown}");
            assert!(shown.contains(why), "{shown} should say {why}");
        }
    }
}
