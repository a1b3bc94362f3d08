//! The byte format of stored records and values: bincode 2 (serde) behind a
//! one-byte format tag.
//!
//! # Behavior
//! - Every encoding starts with a format tag: [`FORMAT_V1`] for values,
//!   [`FORMAT_V2`] for records (which gained a [`Checkpoint`]); a later
//!   format gets a new tag and the decoder keeps reading the old ones (a
//!   record written as [`FORMAT_V1`] reads back without a checkpoint).
//! - Decoding never panics: empty input, an unknown tag, malformed or truncated
//!   bytes, trailing bytes, and lengths beyond [`DECODE_LIMIT`] are each a
//!   [`CodecError`].

use serde::Serialize;
use serde::de::DeserializeOwned;

use serde::Deserialize;

use crate::store::{Checkpoint, Record, State};
use crate::{Fingerprint, Timestamp};

/// The tag of the value format: bincode 2, standard configuration
/// (little-endian, variable-length integers). Records written before
/// checkpoints existed carry it too.
pub const FORMAT_V1: u8 = 1;

/// The tag of the current record format: [`FORMAT_V1`]'s encoding of a
/// [`Record`] with its checkpoint.
pub const FORMAT_V2: u8 = 2;

/// The most bytes a decoder accepts for one value (guards allocations driven
/// by a corrupt length prefix).
pub const DECODE_LIMIT: usize = 256 * 1024 * 1024;

/// Why bytes could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// No bytes at all.
    #[error("stored value is empty")]
    Empty,
    /// The format tag is not one this version knows (written by a newer version?).
    #[error(
        "stored value has unknown format tag {0}; this version writes tag {FORMAT_V1} for values and {FORMAT_V2} for records"
    )]
    UnknownFormat(u8),
    /// The bytes after the tag are not a valid encoding.
    #[error("stored value is malformed")]
    Malformed(#[source] bincode::error::DecodeError),
    /// Bytes were left over after the value.
    #[error("stored value has {0} trailing bytes")]
    TrailingBytes(usize),
    /// The value could not be encoded (a serde `Serialize` impl failed).
    #[error("value could not be encoded")]
    Encode(#[source] bincode::error::EncodeError),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<DECODE_LIMIT>()
}

/// Encodes any serde value with the format tag.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = vec![FORMAT_V1];
    bincode::serde::encode_into_std_write(value, &mut out, config()).map_err(CodecError::Encode)?;
    Ok(out)
}

/// Decodes a value written by [`encode`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (&tag, body) = bytes.split_first().ok_or(CodecError::Empty)?;
    if tag != FORMAT_V1 {
        return Err(CodecError::UnknownFormat(tag));
    }
    decode_body(body)
}

/// Encodes a record (for stores that keep it as one blob).
pub fn encode_record(record: &Record) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(encoded_record_len_hint(record));
    encode_record_into(record, &mut out)?;
    Ok(out)
}

/// Appends the encoding of `record` (the same bytes as
/// [`encode_record`]) to `out`, so that a store can put a header of its own
/// in front of it without a second copy.
///
/// # Behavior
/// Reserves room for the whole encoding first ([`encoded_record_len_hint`]),
/// so a 1 MiB outcome is copied once. On error, `out` may hold a partial
/// encoding after its original contents.
pub fn encode_record_into(record: &Record, out: &mut Vec<u8>) -> Result<(), CodecError> {
    out.reserve(encoded_record_len_hint(record));
    out.push(FORMAT_V2);
    bincode::serde::encode_into_std_write(record, out, config()).map_err(CodecError::Encode)?;
    Ok(())
}

/// The most a record's fields other than its outcome take, in any store's
/// accounting: the size of a record is its outcome's length plus this
/// ([`record_size`]).
///
/// Varint sizes: tag 1, fingerprint 32, state variant 1, token up to 17,
/// then a lease deadline up to 9 or a failure kind 1 and the outcome's
/// length up to 9, three timestamps up to 9 each, attempts up to 5: at most
/// 93 besides the outcome; typed columns (SQL) take less.
pub const RECORD_OVERHEAD: usize = 128;

/// The size of a record, as stores compare it with their
/// [`max_record_bytes`](crate::store::Capabilities::max_record_bytes): the outcome's
/// length plus [`RECORD_OVERHEAD`], plus [`Checkpoint::size`] for a
/// record with a checkpoint. An upper bound of the length of
/// [`encode_record`]'s output.
pub fn record_size(record: &Record) -> usize {
    let outcome = match &record.state {
        State::InFlight { .. } => 0,
        State::Completed { outcome, .. } | State::Failed { outcome, .. } => outcome.len(),
    };
    let checkpoint = record.checkpoint.as_ref().map_or(0, Checkpoint::size);
    RECORD_OVERHEAD
        .saturating_add(outcome)
        .saturating_add(checkpoint)
}

/// An upper bound of the length of [`encode_record`]'s output (the same as
/// [`record_size`]).
pub fn encoded_record_len_hint(record: &Record) -> usize {
    record_size(record)
}

/// Decodes a record written by [`encode_record`], in the current format or
/// in [`FORMAT_V1`] (read back without a checkpoint).
pub fn decode_record(bytes: &[u8]) -> Result<Record, CodecError> {
    match bytes.first() {
        Some(&FORMAT_V1) => decode::<RecordV1>(bytes).map(RecordV1::into_record),
        Some(&FORMAT_V2) => decode_body(&bytes[1..]),
        Some(&tag) => Err(CodecError::UnknownFormat(tag)),
        None => Err(CodecError::Empty),
    }
}

/// Encodes a checkpoint (for stores with typed columns that keep it in a
/// column of its own).
pub fn encode_checkpoint(checkpoint: &Checkpoint) -> Result<Vec<u8>, CodecError> {
    encode(checkpoint)
}

/// Decodes a checkpoint written by [`encode_checkpoint`].
pub fn decode_checkpoint(bytes: &[u8]) -> Result<Checkpoint, CodecError> {
    decode(bytes)
}

fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, CodecError> {
    let (value, read) =
        bincode::serde::decode_from_slice(body, config()).map_err(CodecError::Malformed)?;
    if read != body.len() {
        return Err(CodecError::TrailingBytes(body.len() - read));
    }
    Ok(value)
}

/// A record as [`FORMAT_V1`] wrote it (before checkpoints).
#[derive(Deserialize)]
struct RecordV1 {
    fingerprint: Fingerprint,
    state: State,
    created_at: Timestamp,
    updated_at: Timestamp,
    expires_at: Timestamp,
    attempts: u32,
}

impl RecordV1 {
    fn into_record(self) -> Record {
        Record::from_parts(
            self.fingerprint,
            self.state,
            self.created_at,
            self.updated_at,
            self.expires_at,
            self.attempts,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::FencingToken;
    use crate::{Fingerprint, Outcome, Policy, Timestamp};

    fn record() -> Record {
        let claim = Record::new_claim(
            Fingerprint::of(b"req"),
            FencingToken::from_u128(7),
            Timestamp::from_millis(5),
            &Policy::default(),
        );
        claim
            .complete(
                FencingToken::from_u128(7),
                Outcome::new(vec![9u8; 1000]),
                Timestamp::from_millis(6),
                &Policy::default(),
            )
            .unwrap()
    }

    #[test]
    fn round_trips_and_tags() {
        let bytes = encode_record(&record()).unwrap();
        assert_eq!(bytes[0], FORMAT_V2);
        // The outcome is stored as raw bytes, not one varint per byte.
        assert!(bytes.len() < 1100, "{}", bytes.len());
        assert_eq!(decode_record(&bytes).unwrap(), record());
    }

    #[test]
    fn encode_into_appends_the_same_bytes_within_the_hint() {
        let claim = Record::new_claim(
            Fingerprint::of(b"req"),
            FencingToken::from_u128(u128::MAX),
            Timestamp::from_millis(u64::MAX / 2),
            &Policy::default(),
        );
        for record in [record(), claim] {
            let alone = encode_record(&record).unwrap();
            assert!(
                alone.len() <= encoded_record_len_hint(&record),
                "{}",
                alone.len()
            );
            let mut out = b"head".to_vec();
            encode_record_into(&record, &mut out).unwrap();
            assert_eq!(&out[..4], b"head");
            assert_eq!(&out[4..], &alone[..]);
        }
    }

    #[test]
    fn records_of_the_first_format_read_back_without_a_checkpoint() {
        let r = record();
        // The first format: the same fields, without the checkpoint.
        let legacy = encode(&(
            r.fingerprint,
            r.state.clone(),
            r.created_at,
            r.updated_at,
            r.expires_at,
            r.attempts,
        ))
        .unwrap();
        assert_eq!(legacy[0], FORMAT_V1);
        assert_eq!(decode_record(&legacy).unwrap(), r);
    }

    #[test]
    fn checkpoints_round_trip_in_records_and_alone() {
        let key = crate::RecordKey::new(
            &crate::Scope::tenant("t").with_operation("orders.create"),
            &crate::IdempotencyKey::parse("k-1").unwrap(),
        );
        let cp = Checkpoint::new(&key, 3, "charge", vec![7u8; 300]);
        let claim = Record::new_claim(
            Fingerprint::of(b"req"),
            FencingToken::from_u128(7),
            Timestamp::from_millis(5),
            &Policy::default(),
        )
        .with_checkpoint(Some(cp.clone()));
        let bytes = encode_record(&claim).unwrap();
        assert!(bytes.len() <= record_size(&claim), "{}", bytes.len());
        assert_eq!(decode_record(&bytes).unwrap(), claim);
        let alone = encode_checkpoint(&cp).unwrap();
        assert_eq!(decode_checkpoint(&alone).unwrap(), cp);
        assert_eq!(cp.record_key(), key);
    }

    #[test]
    fn bad_bytes_are_errors() {
        let bytes = encode_record(&record()).unwrap();
        assert!(matches!(decode_record(&[]), Err(CodecError::Empty)));
        let mut newer = bytes.clone();
        newer[0] = 3;
        assert!(matches!(
            decode_record(&newer),
            Err(CodecError::UnknownFormat(3))
        ));
        assert!(matches!(
            decode_record(&bytes[..bytes.len() / 2]),
            Err(CodecError::Malformed(_))
        ));
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            decode_record(&longer),
            Err(CodecError::TrailingBytes(1))
        ));
        // A huge length prefix is refused, not allocated.
        let huge = [
            FORMAT_V1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ];
        assert!(decode::<Vec<u8>>(&huge).is_err());
    }
}
