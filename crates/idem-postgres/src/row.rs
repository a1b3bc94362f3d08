//! Records to typed columns and back.

use std::borrow::Cow;

use idem_core::store::{FencingToken, Record, Revision, State, StoreError, Versioned, codec};
use idem_core::{FailureKind, Fingerprint, Outcome, Timestamp};
use sqlx::Row;
use sqlx::postgres::PgRow;

use crate::PostgresError;

/// A u64 stored bit for bit as `BIGINT`.
pub(crate) const fn to_i64(value: u64) -> i64 {
    i64::from_ne_bytes(value.to_ne_bytes())
}

/// A `BIGINT` read back as the u64 it stores bit for bit.
pub(crate) const fn to_u64(value: i64) -> u64 {
    u64::from_ne_bytes(value.to_ne_bytes())
}

/// A timestamp as stored.
pub(crate) const fn ts(t: Timestamp) -> i64 {
    to_i64(t.as_millis())
}

/// `value` for a `TEXT` column: PostgreSQL text cannot hold NUL, so each NUL
/// becomes U+FFFD. Only the informational scope columns go through this; the
/// identity of a record is its digest, computed from the exact parts.
pub(crate) fn text(value: &str) -> Cow<'_, str> {
    if value.contains('\0') {
        Cow::Owned(value.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(value)
    }
}

/// The record columns of a record, ready to bind.
pub(crate) struct Columns<'a> {
    pub(crate) state: &'static str,
    pub(crate) fingerprint: &'a [u8],
    pub(crate) token: [u8; 16],
    pub(crate) lease_deadline: Option<i64>,
    pub(crate) outcome: Option<&'a [u8]>,
    pub(crate) created_at: i64,
    pub(crate) updated_at: i64,
    pub(crate) expires_at: i64,
    pub(crate) attempts: i64,
    pub(crate) revision: i64,
    pub(crate) checkpoint: Option<Vec<u8>>,
}

impl<'a> Columns<'a> {
    /// The columns of `v`.
    ///
    /// # Behavior
    /// A checkpoint that cannot be encoded is [`PostgresError::Encode`].
    pub(crate) fn of(v: &'a Versioned) -> Result<Self, PostgresError> {
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
            .map_err(PostgresError::Encode)?;
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
}

/// The record's size as the core measures it for the record size limit
/// ([`codec::record_size`]: the outcome, the checkpoint and a fixed
/// overhead).
pub(crate) fn size(v: &Versioned) -> usize {
    codec::record_size(&v.record)
}

/// Decodes the record columns starting at column `first` of `row`.
///
/// # Behavior
/// A column of the wrong type, a NULL where the state needs a value, a value
/// where the state has none, a fingerprint or token of the wrong length, an
/// unknown state, attempts outside u32 or a checkpoint that does not decode
/// ([`codec::decode_checkpoint`]) are each [`StoreError::Corrupt`]. A NULL
/// checkpoint is none.
pub(crate) fn decode(row: &PgRow, first: usize, table: &str) -> Result<Versioned, StoreError> {
    let corrupt = |why: String| {
        StoreError::from(PostgresError::CorruptRow {
            table: table.to_string(),
            why,
        })
    };
    let col = |i: usize| first + i;
    macro_rules! get {
        ($ty:ty, $i:expr, $name:literal) => {
            row.try_get::<$ty, _>(col($i))
                .map_err(|e| corrupt(format!("column {}: {e}", $name)))?
        };
    }
    let state: String = get!(String, 0, "state");
    let fingerprint: Vec<u8> = get!(Vec<u8>, 1, "fingerprint");
    let token: Vec<u8> = get!(Vec<u8>, 2, "token");
    let lease_deadline: Option<i64> = get!(Option<i64>, 3, "lease_deadline");
    let outcome: Option<Vec<u8>> = get!(Option<Vec<u8>>, 4, "outcome");
    let created_at: i64 = get!(i64, 5, "created_at");
    let updated_at: i64 = get!(i64, 6, "updated_at");
    let expires_at: i64 = get!(i64, 7, "expires_at");
    let attempts: i64 = get!(i64, 8, "attempts");
    let revision: i64 = get!(i64, 9, "revision");
    let checkpoint: Option<Vec<u8>> = get!(Option<Vec<u8>>, 10, "checkpoint");
    let checkpoint = checkpoint
        .as_deref()
        .map(codec::decode_checkpoint)
        .transpose()
        .map_err(|e| corrupt(format!("column checkpoint does not decode: {e}")))?;

    let fingerprint: [u8; 32] = fingerprint.as_slice().try_into().map_err(|_| {
        corrupt(format!(
            "fingerprint is {} bytes, not 32",
            fingerprint.len()
        ))
    })?;
    let token: [u8; 16] = token
        .as_slice()
        .try_into()
        .map_err(|_| corrupt(format!("token is {} bytes, not 16", token.len())))?;
    let token = FencingToken::from_be_bytes(token);
    let attempts = u32::try_from(attempts)
        .map_err(|_| corrupt(format!("attempts {attempts} is not a u32")))?;
    let at = |raw: i64| Timestamp::from_millis(to_u64(raw));
    let state = match (state.as_str(), lease_deadline, outcome) {
        ("in_flight", Some(deadline), None) => State::InFlight {
            token,
            lease_deadline: at(deadline),
        },
        ("completed", None, Some(outcome)) => State::Completed {
            token,
            outcome: Outcome::new(outcome),
        },
        ("failed_retryable", None, Some(outcome)) => State::Failed {
            token,
            kind: FailureKind::Retryable,
            outcome: Outcome::new(outcome),
        },
        ("failed_permanent", None, Some(outcome)) => State::Failed {
            token,
            kind: FailureKind::Permanent,
            outcome: Outcome::new(outcome),
        },
        ("failed_unknown", None, Some(outcome)) => State::Failed {
            token,
            kind: FailureKind::Unknown,
            outcome: Outcome::new(outcome),
        },
        (name, deadline, outcome) => {
            return Err(corrupt(format!(
                "state `{name}` with lease_deadline {} and outcome {}",
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
mod tests {
    use super::*;

    #[test]
    fn text_replaces_only_nul() {
        assert!(matches!(text("acme"), Cow::Borrowed("acme")));
        assert_eq!(text("a\0b"), "a\u{FFFD}b");
    }

    #[test]
    fn u64_round_trips_bit_for_bit_and_keeps_small_values_readable() {
        for v in [0, 1, 1_800_000_000_000, i64::MAX as u64, 1 << 63, u64::MAX] {
            assert_eq!(to_u64(to_i64(v)), v);
        }
        assert_eq!(to_i64(1_800_000_000_000), 1_800_000_000_000);
        assert_eq!(to_i64(u64::MAX), -1);
    }

    #[test]
    fn flipping_the_sign_bit_keeps_the_unsigned_order() {
        let flip = |v: u64| to_i64(v) ^ i64::MIN;
        let values = [
            0,
            1,
            1 << 62,
            i64::MAX as u64,
            1 << 63,
            u64::MAX - 1,
            u64::MAX,
        ];
        for a in values {
            for b in values {
                assert_eq!(a.cmp(&b), flip(a).cmp(&flip(b)), "{a} vs {b}");
            }
        }
    }
}
