//! The bytes stored under a record key (layout v1).
//!
//! ```text
//! offset  size  field
//!      0     1  layout tag, 0x01
//!      1     8  expires_at, ms since the Unix epoch, u64 big-endian
//!      9     8  revision, u64 big-endian
//!     17     8  reserved: 0 (idem-redis before round 5 wrote a random
//!                 write id here; such values still decode)
//!     25     …  the record, idem_core::store::codec::encode_record
//! ```
//!
//! The scripts read only the fixed-size header; the record itself is decoded
//! here. The header's `expires_at` must equal the record's: a mismatch is a
//! corrupt value.
//!
//! The encoding is deterministic: a [`Versioned`] always encodes to the same
//! bytes, so the store can rebuild the exact stored value of a record it read
//! and hand it to the server's own compare (`SET … IFEQ`, `DELIFEQ`), and a
//! write re-sent after a lost reply is recognised by equal bytes (revisions
//! and tokens are random per write, so equal bytes mean the same write).

use idem_core::Timestamp;
use idem_core::store::{
    Revision, Versioned,
    codec::{self, CodecError},
};

/// The layout tag of the current value layout.
pub(crate) const LAYOUT_V1: u8 = 1;

/// The size of the header the scripts read.
pub(crate) const HEADER_LEN: usize = 25;

/// Why stored bytes are not a record.
#[derive(Debug)]
pub(crate) enum Unreadable {
    /// The header is missing or has an unknown layout tag.
    Layout(&'static str),
    /// The header and the record disagree on the expiry.
    ExpiryMismatch,
    /// The record bytes do not decode.
    Codec(CodecError),
}

/// Encodes `versioned`: deterministic, see the module docs.
pub(crate) fn encode(versioned: &Versioned) -> Result<Vec<u8>, CodecError> {
    // One allocation and one copy of the outcome: the header, then the
    // record encoded in place behind it.
    let mut out =
        Vec::with_capacity(HEADER_LEN + codec::encoded_record_len_hint(&versioned.record));
    out.push(LAYOUT_V1);
    out.extend_from_slice(&versioned.record.expires_at.as_millis().to_be_bytes());
    out.extend_from_slice(&versioned.revision.as_u64().to_be_bytes());
    out.extend_from_slice(&0_u64.to_be_bytes());
    codec::encode_record_into(&versioned.record, &mut out)?;
    Ok(out)
}

fn be_u64(bytes: &[u8], at: usize) -> Option<u64> {
    let raw: [u8; 8] = bytes.get(at..at + 8)?.try_into().ok()?;
    Some(u64::from_be_bytes(raw))
}

/// The fixed-size header of a stored value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) expires_at: Timestamp,
    pub(crate) revision: Revision,
}

/// Reads the header of a stored value.
pub(crate) fn header(bytes: &[u8]) -> Result<Header, Unreadable> {
    if bytes.len() < HEADER_LEN {
        return Err(Unreadable::Layout("the value is shorter than the header"));
    }
    if bytes.first() != Some(&LAYOUT_V1) {
        return Err(Unreadable::Layout(
            "the value is not an idem record (unknown layout)",
        ));
    }
    match (be_u64(bytes, 1), be_u64(bytes, 9)) {
        (Some(expires_at), Some(revision)) => Ok(Header {
            expires_at: Timestamp::from_millis(expires_at),
            revision: Revision::from_u64(revision),
        }),
        _ => Err(Unreadable::Layout("the value is shorter than the header")),
    }
}

/// Decodes a stored value.
pub(crate) fn decode(bytes: &[u8]) -> Result<Versioned, Unreadable> {
    let head = header(bytes)?;
    let record = codec::decode_record(bytes.get(HEADER_LEN..).unwrap_or_default())
        .map_err(Unreadable::Codec)?;
    if record.expires_at != head.expires_at {
        return Err(Unreadable::ExpiryMismatch);
    }
    Ok(Versioned {
        revision: head.revision,
        record,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use idem_core::store::{Checkpoint, FencingToken, Record};
    use idem_core::{Fingerprint, Policy};

    fn sample() -> Versioned {
        Versioned {
            revision: Revision::from_u64(u64::MAX - 3),
            record: Record::new_claim(
                Fingerprint::of(b"req"),
                FencingToken::from_u128(9),
                Timestamp::from_millis(1_800_000_000_000),
                &Policy::default(),
            ),
        }
    }

    #[test]
    fn round_trips_with_a_fixed_header() {
        let v = sample();
        let bytes = encode(&v).unwrap();
        assert_eq!(bytes[0], LAYOUT_V1);
        assert_eq!(&bytes[1..9], &v.record.expires_at.as_millis().to_be_bytes());
        assert_eq!(&bytes[9..17], &(u64::MAX - 3).to_be_bytes());
        assert_eq!(&bytes[17..25], &[0; 8]);
        assert_eq!(decode(&bytes).unwrap(), v);
    }

    #[test]
    fn encoding_is_deterministic_and_tells_writes_apart() {
        let v = sample();
        let bytes = encode(&v).unwrap();
        assert_eq!(bytes, encode(&decode(&bytes).unwrap()).unwrap());
        let mut other = v.clone();
        other.revision = Revision::from_u64(1);
        assert_ne!(bytes, encode(&other).unwrap());
    }

    fn with_checkpoint() -> Versioned {
        let key = idem_core::RecordKey::new(
            &idem_core::Scope::tenant("t").with_operation("orders.create"),
            &idem_core::IdempotencyKey::parse("order-1").unwrap(),
        );
        let mut v = sample();
        v.record.checkpoint = Some(Checkpoint::new(&key, 2, "charge", b"ch_1".to_vec()));
        v
    }

    #[test]
    fn checkpoints_round_trip_and_encode_deterministically() {
        let v = with_checkpoint();
        let bytes = encode(&v).unwrap();
        assert_eq!(bytes[HEADER_LEN], codec::FORMAT_V2);
        assert_eq!(decode(&bytes).unwrap(), v);
        // What the native compare (`SET … IFEQ`) relies on.
        assert_eq!(bytes, encode(&decode(&bytes).unwrap()).unwrap());
        let mut without = v.clone();
        without.record.checkpoint = None;
        assert_ne!(bytes, encode(&without).unwrap());
    }

    #[test]
    fn records_of_the_first_format_decode_without_a_checkpoint() {
        let v = sample();
        let r = &v.record;
        let first = codec::encode(&(
            r.fingerprint,
            r.state.clone(),
            r.created_at,
            r.updated_at,
            r.expires_at,
            r.attempts,
        ))
        .unwrap();
        assert_eq!(first[0], codec::FORMAT_V1);
        let mut bytes = encode(&v).unwrap()[..HEADER_LEN].to_vec();
        bytes.extend_from_slice(&first);
        assert_eq!(decode(&bytes).unwrap(), v);
        // Re-encoded in the current format: other bytes, same revision, so
        // a native compare misses and the script decides by revision.
        let again = encode(&decode(&bytes).unwrap()).unwrap();
        assert_ne!(again, bytes);
        assert_eq!(header(&again).unwrap(), header(&bytes).unwrap());
    }

    #[test]
    fn values_with_a_write_id_still_decode() {
        let v = sample();
        let mut legacy = encode(&v).unwrap();
        legacy[17..25].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(decode(&legacy).unwrap(), v);
        assert_ne!(legacy, encode(&v).unwrap());
    }

    #[test]
    fn refuses_foreign_and_damaged_values() {
        let bytes = encode(&sample()).unwrap();
        assert!(matches!(decode(b""), Err(Unreadable::Layout(_))));
        assert!(matches!(decode(b"hello"), Err(Unreadable::Layout(_))));
        let mut foreign = bytes.clone();
        foreign[0] = b'{';
        assert!(matches!(decode(&foreign), Err(Unreadable::Layout(_))));
        assert!(matches!(
            decode(&bytes[..bytes.len() - 3]),
            Err(Unreadable::Codec(_))
        ));
        let mut moved = bytes.clone();
        moved[8] ^= 1;
        assert!(matches!(decode(&moved), Err(Unreadable::ExpiryMismatch)));
    }
}
