//! Records to typed columns and back.

use std::sync::Arc;

use idem_core::store::{FencingToken, Record, Revision, State, Versioned, codec};
use idem_core::{FailureKind, Fingerprint, Outcome, Timestamp};
use rusqlite::Row;
use rusqlite::types::{ToSql, ValueRef};

use crate::SqliteError;

/// The record columns, in the order [`decode`] reads them and
/// [`Columns::params`] binds them.
pub(crate) const RECORD_COLUMNS: &str = "state, fingerprint, token, lease_deadline, outcome, \
     created_at, updated_at, expires_at, attempts, revision, checkpoint";

/// How many columns [`RECORD_COLUMNS`] names.
pub(crate) const RECORD_COLUMN_COUNT: usize = 11;

/// A u64 (timestamp) stored bit for bit in an `INTEGER` column.
pub(crate) const fn to_i64(value: u64) -> i64 {
    value.cast_signed()
}

/// An `INTEGER` read back as the u64 it stores bit for bit.
pub(crate) const fn to_u64(value: i64) -> u64 {
    value.cast_unsigned()
}

/// A timestamp as stored.
pub(crate) const fn ts(t: Timestamp) -> i64 {
    to_i64(t.as_millis())
}

/// The record columns of a record, ready to bind.
pub(crate) struct Columns<'a> {
    state: &'static str,
    fingerprint: &'a [u8],
    token: [u8; 16],
    lease_deadline: Option<i64>,
    outcome: Option<&'a [u8]>,
    created_at: i64,
    updated_at: i64,
    expires_at: i64,
    attempts: i64,
    revision: i64,
    checkpoint: Option<Vec<u8>>,
}

impl<'a> Columns<'a> {
    /// The columns of `v`.
    ///
    /// # Behavior
    /// A checkpoint that cannot be encoded is [`SqliteError::Encode`].
    pub(crate) fn of(v: &'a Versioned) -> Result<Self, SqliteError> {
        let r = &v.record;
        let (lease_deadline, outcome) = match &r.state {
            State::InFlight { lease_deadline, .. } => (Some(ts(*lease_deadline)), None),
            State::Completed { outcome, .. } | State::Failed { outcome, .. } => {
                (None, Some(outcome.as_bytes()))
            }
        };
        let checkpoint = r
            .checkpoint
            .as_ref()
            .map(codec::encode_checkpoint)
            .transpose()
            .map_err(|e| SqliteError::Encode(Arc::new(e)))?;
        Ok(Self {
            state: r.state.name(),
            fingerprint: r.fingerprint.as_bytes(),
            token: r.state.token().to_be_bytes(),
            lease_deadline,
            outcome,
            created_at: ts(r.created_at),
            updated_at: ts(r.updated_at),
            expires_at: ts(r.expires_at),
            attempts: i64::from(r.attempts),
            revision: v.revision.as_i64(),
            checkpoint,
        })
    }

    /// The record columns, in [`RECORD_COLUMNS`] order.
    pub(crate) fn params(&self) -> [&dyn ToSql; RECORD_COLUMN_COUNT] {
        [
            &self.state,
            &self.fingerprint,
            &self.token,
            &self.lease_deadline,
            &self.outcome,
            &self.created_at,
            &self.updated_at,
            &self.expires_at,
            &self.attempts,
            &self.revision,
            &self.checkpoint,
        ]
    }
}

/// The record's size as the core measures it for the size limit
/// ([`idem_core::store::codec::record_size`]: the outcome, the checkpoint
/// and a fixed overhead).
pub(crate) fn record_size(v: &Versioned) -> usize {
    codec::record_size(&v.record)
}

/// Decodes the record columns ([`RECORD_COLUMNS`]) starting at column
/// `first` of `row`.
///
/// # Behavior
/// A value of the wrong type, a NULL where the state needs a value, a value
/// where the state has none, a fingerprint or token of the wrong length, an
/// unknown state, attempts outside u32 or a checkpoint that does not decode
/// ([`codec::decode_checkpoint`]) are each [`SqliteError::CorruptRow`];
/// nothing panics. A NULL checkpoint is none.
pub(crate) fn decode(row: &Row<'_>, first: usize, table: &str) -> Result<Versioned, SqliteError> {
    let corrupt = |why: String| SqliteError::CorruptRow {
        table: table.to_string(),
        why,
    };
    let value = |i: usize| row.get_ref(first + i).map_err(SqliteError::from);
    let kind = |v: ValueRef<'_>| match v {
        ValueRef::Null => "NULL",
        ValueRef::Integer(_) => "an INTEGER",
        ValueRef::Real(_) => "a REAL",
        ValueRef::Text(_) => "a TEXT",
        ValueRef::Blob(_) => "a BLOB",
    };
    let int = |i: usize, name: &str| -> Result<i64, SqliteError> {
        match value(i)? {
            ValueRef::Integer(v) => Ok(v),
            other => Err(corrupt(format!(
                "column {name} holds {}, not an INTEGER",
                kind(other)
            ))),
        }
    };
    let opt_int = |i: usize, name: &str| -> Result<Option<i64>, SqliteError> {
        match value(i)? {
            ValueRef::Null => Ok(None),
            _ => int(i, name).map(Some),
        }
    };
    let blob = |i: usize, name: &str| -> Result<Option<&[u8]>, SqliteError> {
        match value(i)? {
            ValueRef::Null => Ok(None),
            ValueRef::Blob(b) => Ok(Some(b)),
            other => Err(corrupt(format!(
                "column {name} holds {}, not a BLOB",
                kind(other)
            ))),
        }
    };
    let fixed = |i: usize, name: &str| -> Result<&[u8], SqliteError> {
        blob(i, name)?.ok_or_else(|| corrupt(format!("column {name} is NULL")))
    };

    let state = match value(0)? {
        ValueRef::Text(t) => t,
        other => {
            return Err(corrupt(format!(
                "column state holds {}, not a TEXT",
                kind(other)
            )));
        }
    };
    let fingerprint = fixed(1, "fingerprint")?;
    let fingerprint: [u8; 32] = fingerprint.try_into().map_err(|_| {
        corrupt(format!(
            "fingerprint is {} bytes, not 32",
            fingerprint.len()
        ))
    })?;
    let token = fixed(2, "token")?;
    let token: [u8; 16] = token
        .try_into()
        .map_err(|_| corrupt(format!("token is {} bytes, not 16", token.len())))?;
    let token = FencingToken::from_be_bytes(token);
    let lease_deadline = opt_int(3, "lease_deadline")?;
    let outcome = blob(4, "outcome")?;
    let created_at = int(5, "created_at")?;
    let updated_at = int(6, "updated_at")?;
    let expires_at = int(7, "expires_at")?;
    let attempts = int(8, "attempts")?;
    let revision = int(9, "revision")?;
    let checkpoint = blob(10, "checkpoint")?
        .map(codec::decode_checkpoint)
        .transpose()
        .map_err(|e| corrupt(format!("column checkpoint does not decode: {e}")))?;

    let attempts = u32::try_from(attempts)
        .map_err(|_| corrupt(format!("attempts {attempts} is not a u32")))?;
    let at = |raw: i64| Timestamp::from_millis(to_u64(raw));
    let state = match (state, lease_deadline, outcome) {
        (b"in_flight", Some(deadline), None) => State::InFlight {
            token,
            lease_deadline: at(deadline),
        },
        (b"completed", None, Some(outcome)) => State::Completed {
            token,
            outcome: Outcome::new(outcome.to_vec()),
        },
        (b"failed_retryable", None, Some(outcome)) => State::Failed {
            token,
            kind: FailureKind::Retryable,
            outcome: Outcome::new(outcome.to_vec()),
        },
        (b"failed_permanent", None, Some(outcome)) => State::Failed {
            token,
            kind: FailureKind::Permanent,
            outcome: Outcome::new(outcome.to_vec()),
        },
        (b"failed_unknown", None, Some(outcome)) => State::Failed {
            token,
            kind: FailureKind::Unknown,
            outcome: Outcome::new(outcome.to_vec()),
        },
        (name, deadline, outcome) => {
            return Err(corrupt(format!(
                "state `{}` with lease_deadline {} and outcome {}",
                String::from_utf8_lossy(name),
                if deadline.is_some() { "set" } else { "NULL" },
                if outcome.is_some() { "set" } else { "NULL" },
            )));
        }
    };
    Ok(Versioned {
        revision: Revision::from_i64(revision),
        record: Record::from_parts(
            Fingerprint::from_bytes(fingerprint),
            state,
            at(created_at),
            at(updated_at),
            at(expires_at),
            attempts,
        )
        .with_checkpoint(checkpoint),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn u64_round_trips_bit_for_bit() {
        for v in [0, 1, 1_800_000_000_000, i64::MAX as u64, 1 << 63, u64::MAX] {
            assert_eq!(to_u64(to_i64(v)), v);
        }
        assert_eq!(to_i64(1_800_000_000_000), 1_800_000_000_000);
        assert_eq!(to_i64(u64::MAX), -1);
    }

    fn decode_row(sql: &str) -> Result<Versioned, SqliteError> {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        conn.query_row(sql, [], |row| Ok(decode(row, 0, "t")))
            .unwrap()
    }

    #[test]
    fn inconsistent_rows_are_corrupt_not_panics() {
        let good =
            "SELECT 'completed', zeroblob(32), zeroblob(16), NULL, x'01', 1, 2, 3, 1, 7, NULL";
        let v = decode_row(good).unwrap();
        assert_eq!(v.revision, Revision::from_u64(7));
        assert_eq!(v.record.expires_at, Timestamp::from_millis(3));
        assert_eq!(v.record.checkpoint, None);
        for bad in [
            "SELECT 'bogus', zeroblob(32), zeroblob(16), NULL, x'01', 1, 2, 3, 1, 7, NULL",
            "SELECT 'completed', zeroblob(31), zeroblob(16), NULL, x'01', 1, 2, 3, 1, 7, NULL",
            "SELECT 'completed', zeroblob(32), zeroblob(17), NULL, x'01', 1, 2, 3, 1, 7, NULL",
            "SELECT 'completed', zeroblob(32), zeroblob(16), NULL, NULL, 1, 2, 3, 1, 7, NULL",
            "SELECT 'in_flight', zeroblob(32), zeroblob(16), NULL, NULL, 1, 2, 3, 1, 7, NULL",
            "SELECT 'in_flight', zeroblob(32), zeroblob(16), 5, x'00', 1, 2, 3, 1, 7, NULL",
            "SELECT 'completed', zeroblob(32), zeroblob(16), NULL, 'text', 1, 2, 3, 1, 7, NULL",
            "SELECT 'completed', zeroblob(32), zeroblob(16), NULL, x'01', 1.5, 2, 3, 1, 7, NULL",
            "SELECT 'completed', zeroblob(32), zeroblob(16), NULL, x'01', 1, 2, 3, -1, 7, NULL",
            "SELECT 'completed', zeroblob(32), zeroblob(16), NULL, x'01', 1, 2, 3, 4294967296, 7, NULL",
            "SELECT x'00', zeroblob(32), zeroblob(16), NULL, x'01', 1, 2, 3, 1, 7, NULL",
            "SELECT 'completed', NULL, zeroblob(16), NULL, x'01', 1, 2, 3, 1, 7, NULL",
            "SELECT 'completed', zeroblob(32), zeroblob(16), NULL, x'01', 1, 2, NULL, 1, 7, NULL",
            // A checkpoint that is not one: bytes of no format, text.
            "SELECT 'in_flight', zeroblob(32), zeroblob(16), 5, NULL, 1, 2, 3, 1, 7, x'00'",
            "SELECT 'in_flight', zeroblob(32), zeroblob(16), 5, NULL, 1, 2, 3, 1, 7, x'0102'",
            "SELECT 'in_flight', zeroblob(32), zeroblob(16), 5, NULL, 1, 2, 3, 1, 7, 'cp'",
        ] {
            assert!(
                matches!(decode_row(bad), Err(SqliteError::CorruptRow { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn checkpoints_round_trip_through_their_column() {
        let key = idem_core::RecordKey::new(
            &idem_core::Scope::tenant("t").with_operation("orders.create"),
            &idem_core::IdempotencyKey::parse("k").unwrap(),
        );
        let checkpoint = idem_core::store::Checkpoint::new(&key, 2, "charge", vec![0, 1, 2]);
        let record = Record::from_parts(
            Fingerprint::of(b"r"),
            State::InFlight {
                token: FencingToken::from_u128(9),
                lease_deadline: Timestamp::from_millis(5),
            },
            Timestamp::from_millis(1),
            Timestamp::from_millis(2),
            Timestamp::from_millis(3),
            1,
        )
        .with_checkpoint(Some(checkpoint));
        let v = Versioned::new(Revision::from_u64(7), record);
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        let cols = Columns::of(&v).unwrap();
        let sql = "SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11";
        let back = conn
            .query_row(sql, cols.params().as_slice(), |row| Ok(decode(row, 0, "t")))
            .unwrap()
            .unwrap();
        assert_eq!(back, v);
        assert!(
            record_size(&v) > codec::RECORD_OVERHEAD + 3,
            "the checkpoint counts"
        );
    }
}
