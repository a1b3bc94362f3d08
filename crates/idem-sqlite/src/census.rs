//! [`Store::census`](idem_core::store::Store::census): one aggregate query
//! over the table, run on the writer thread's connection between batches.

use idem_core::Timestamp;
use idem_core::store::{Census, Coverage, EXPIRY_BUCKETS};
use rusqlite::Connection;

use crate::SqliteError;
use crate::row::{to_i64, ts};
use crate::sql::{CENSUS_COLUMNS, Statements};

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

/// Counts the table's records as of `now` with the census statement (one
/// pass over every row, inside the statement's implicit read transaction).
///
/// # Behavior
/// Rows whose `state` is not a record's (a damaged row) are counted as
/// `unreadable` and logged at `warn`. Other damage (a blob of the wrong length, …)
/// is not looked at: the census reads only `state` and `expires_at`.
pub(crate) fn count(
    conn: &Connection,
    sql: &Statements,
    now: Timestamp,
) -> Result<Census, SqliteError> {
    let [t0, t1, t2, t3, t4] = thresholds(now);
    let mut stmt = conn.prepare_cached(&sql.census)?;
    let mut rows = stmt.query(rusqlite::params![ts(now), t0, t1, t2, t3, t4])?;
    let row = rows.next()?.ok_or(rusqlite::Error::QueryReturnedNoRows)?;
    let mut counts = [0_i64; CENSUS_COLUMNS.len()];
    for (i, count) in counts.iter_mut().enumerate() {
        *count = row.get(i)?;
    }
    let mut values = [0_u64; CENSUS_COLUMNS.len()];
    for ((value, count), name) in values.iter_mut().zip(counts).zip(CENSUS_COLUMNS) {
        *value = u64::try_from(count).map_err(|_| SqliteError::CorruptRow {
            table: sql.table.clone(),
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
            table = %sql.table,
            rows = unreadable,
            "idem-sqlite: census found rows whose state is not an idem record's (counted as unreadable)"
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
    use std::time::Duration;

    use idem_core::store::{FencingToken, Record, State};
    use idem_core::{FailureKind, Fingerprint, Outcome};

    use super::*;
    use crate::TableName;

    fn record(state: State, expires_at: u64) -> Record {
        let t0 = Timestamp::from_millis(0);
        Record::from_parts(
            Fingerprint::of(b"x"),
            state,
            t0,
            t0,
            Timestamp::from_millis(expires_at),
            1,
        )
    }

    /// The SQL census agrees with `Census::tally` on every state, at bucket
    /// edges, and on both sides of 2^63 (timestamps stored as signed
    /// integers), for `now` on both sides too.
    #[test]
    fn the_query_agrees_with_tally_everywhere() {
        let token = FencingToken::from_u128(1);
        let states = [
            State::InFlight {
                token,
                lease_deadline: Timestamp::from_millis(0),
            },
            State::Completed {
                token,
                outcome: Outcome::new(b"o".to_vec()),
            },
            State::Failed {
                token,
                kind: FailureKind::Retryable,
                outcome: Outcome::new(b"o".to_vec()),
            },
            State::Failed {
                token,
                kind: FailureKind::Permanent,
                outcome: Outcome::new(b"o".to_vec()),
            },
            State::Failed {
                token,
                kind: FailureKind::Unknown,
                outcome: Outcome::new(b"o".to_vec()),
            },
        ];
        let nows = [
            0,
            1_800_000_000_000,
            (1 << 63) - 1_000,
            1 << 63,
            u64::MAX - 86_400_000,
            u64::MAX,
        ];
        for now in nows {
            let mut offsets: Vec<i128> = vec![-1_000, -1, 0, 1, 5_000];
            for bound in EXPIRY_BUCKETS {
                let ms = i128::try_from(bound.as_millis()).unwrap();
                offsets.extend([ms - 1, ms, ms + 1]);
            }
            let mut expiries: Vec<u64> = offsets
                .iter()
                .filter_map(|o| u64::try_from(i128::from(now) + o).ok())
                .collect();
            expiries.extend([0, 1, i64::MAX as u64, 1 << 63, (1 << 63) + 1, u64::MAX]);

            let mut conn = Connection::open_in_memory().unwrap();
            let table = TableName::default();
            crate::schema::migrate(&mut conn, &table, std::path::Path::new(":memory:")).unwrap();
            let sql = Statements::new(&table);
            let now = Timestamp::from_millis(now);
            let mut want = Census::new(Coverage::Exact);
            let mut n = 0_u32;
            for (i, e) in expiries.iter().enumerate() {
                let state = &states[i % states.len()];
                want.tally(&record(state.clone(), *e), now);
                n += 1;
                conn.execute(
                    "INSERT INTO idem_records (digest, tenant, \"key\", state, fingerprint, \
                     token, created_at, updated_at, expires_at, attempts, revision) \
                     VALUES (?1, 't', 'k', ?2, x'', x'', 0, 0, ?3, 1, 1)",
                    rusqlite::params![n.to_be_bytes().to_vec(), state.name(), to_i64(*e)],
                )
                .unwrap();
            }
            // Not a record: counted only as unreadable, live or not.
            want.unreadable = 2;
            for (i, e) in [0, u64::MAX].iter().enumerate() {
                conn.execute(
                    "INSERT INTO idem_records (digest, tenant, \"key\", state, fingerprint, \
                     token, created_at, updated_at, expires_at, attempts, revision) \
                     VALUES (?1, 't', 'k', 'bogus', x'', x'', 0, 0, ?2, 1, 1)",
                    rusqlite::params![vec![0xFF, u8::try_from(i).unwrap()], to_i64(*e)],
                )
                .unwrap();
            }
            let got = count(&conn, &sql, now).unwrap();
            assert_eq!(got, want, "now = {now:?}");
            assert_eq!(got.total(), u64::from(n), "now = {now:?}");
            assert_eq!(got.expiry.iter().sum::<u64>(), got.live());
        }
    }

    #[test]
    fn thresholds_saturate() {
        let t = thresholds(Timestamp::from_millis(u64::MAX - 60_000));
        assert_eq!(t[0], -1);
        assert_eq!(t[4], -1);
        let t = thresholds(Timestamp::from_millis(0));
        assert_eq!(t[0], 60_000);
        assert_eq!(
            t[4],
            i64::try_from(Duration::from_secs(30 * 86_400).as_millis()).unwrap()
        );
    }
}
