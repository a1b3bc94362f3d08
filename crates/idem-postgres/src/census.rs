//! [`Store::census`](idem_core::store::Store::census): one aggregate
//! statement over the table (see `sql::census`), turned into a [`Census`].

use idem_core::Timestamp;
use idem_core::store::{Census, Coverage, EXPIRY_BUCKETS, StoreError};
use sqlx::Row;
use sqlx::postgres::PgRow;

use crate::row::to_i64;
use crate::sql::CENSUS_COLUMNS;
use crate::{PostgresError, TableName};

/// The histogram's thresholds as stored: `now` plus each bucket's upper
/// bound, in ms, saturating at `u64::MAX` (a live record expires at most
/// then, so a saturated threshold holds every live record, as it should:
/// its time left is below the bound).
pub(crate) fn thresholds(now: Timestamp) -> [i64; 5] {
    EXPIRY_BUCKETS.map(|bound| {
        let bound = u64::try_from(bound.as_millis()).unwrap_or(u64::MAX);
        to_i64(now.as_millis().saturating_add(bound))
    })
}

/// The census of the statement's one row.
///
/// # Behavior
/// Rows of an unknown state (impossible while the table's `CHECK` stands)
/// are counted as `unreadable` and logged at `warn`.
pub(crate) fn from_row(row: &PgRow, table: &TableName) -> Result<Census, StoreError> {
    let mut values = [0_u64; CENSUS_COLUMNS.len()];
    for (i, (value, name)) in values.iter_mut().zip(CENSUS_COLUMNS).enumerate() {
        let count: i64 = row
            .try_get(i)
            .map_err(|e| PostgresError::driver(e, table))?;
        *value = u64::try_from(count).map_err(|_| PostgresError::CorruptRow {
            table: table.table().to_string(),
            why: format!("the census counted {count} rows as {name}"),
        })?;
    }
    let [
        expired,
        in_flight,
        completed,
        failed_retryable,
        failed_permanent,
        failed_unknown,
        b0,
        b1,
        b2,
        b3,
        b4,
        b5,
        unreadable,
    ] = values;
    if unreadable > 0 {
        tracing::warn!(
            table = %table,
            rows = unreadable,
            "idem-postgres: census found rows whose state is not an idem record's (counted as unreadable)"
        );
    }
    let mut census = Census::new(Coverage::Exact);
    census.expired = expired;
    census.in_flight = in_flight;
    census.completed = completed;
    census.failed_retryable = failed_retryable;
    census.failed_permanent = failed_permanent;
    census.failed_unknown = failed_unknown;
    census.expiry = [b0, b1, b2, b3, b4, b5];
    census.unreadable = unreadable;
    Ok(census)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_saturate() {
        assert_eq!(thresholds(Timestamp::from_millis(u64::MAX - 1))[0], -1);
        assert_eq!(thresholds(Timestamp::from_millis(0))[1], 3_600_000);
        assert_eq!(
            thresholds(Timestamp::from_millis(i64::MAX as u64))[0],
            i64::MIN + 59_999
        );
    }
}
