//! What a store keeps for one key: the [`Record`], its [`State`], and the
//! [`Revision`] it is stored under ([`Versioned`]).

use std::fmt;

use serde::{Deserialize, Serialize};

use bytes::Bytes;

use crate::{FailureKind, Fingerprint, IdempotencyKey, Outcome, RecordKey, Scope, Timestamp};

/// Proof of holding a key's lease. Unique per claim: a takeover or a new
/// claim after expiry always gets a new token, so a stale worker's token never
/// matches a newer claim.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FencingToken(u128);

impl FencingToken {
    /// Wraps a raw token (read back from a store, or chosen by a test).
    pub const fn from_u128(raw: u128) -> Self {
        Self(raw)
    }
    /// The raw token.
    pub const fn as_u128(self) -> u128 {
        self.0
    }
    /// The token as 16 big-endian bytes (for `BLOB`/`BYTEA` columns).
    pub const fn to_be_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }
    /// Reads a token from 16 big-endian bytes.
    pub const fn from_be_bytes(bytes: [u8; 16]) -> Self {
        Self(u128::from_be_bytes(bytes))
    }
}

impl fmt::Debug for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FencingToken({:032x})", self.0)
    }
}

/// The compare-and-swap tag of a stored record.
///
/// # Behavior
/// Chosen by the writer (the engine draws a fresh random one for every write),
/// stored verbatim by the store, and compared for equality only. Because a new
/// record never reuses the revision of an older one, a compare-and-swap based
/// on a record that has since expired and been re-created always fails (no
/// ABA).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Revision(u64);

impl Revision {
    /// Wraps a raw revision.
    pub const fn from_u64(raw: u64) -> Self {
        Self(raw)
    }
    /// The raw revision.
    pub const fn as_u64(self) -> u64 {
        self.0
    }
    /// The revision as a signed 64-bit integer, bit for bit (for SQL `BIGINT`).
    pub const fn as_i64(self) -> i64 {
        i64::from_ne_bytes(self.0.to_ne_bytes())
    }
    /// Reads a revision stored as a signed 64-bit integer, bit for bit.
    pub const fn from_i64(raw: i64) -> Self {
        Self(u64::from_ne_bytes(raw.to_ne_bytes()))
    }
}

/// Where a key is in its life. An absent or expired record has no state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum State {
    /// A request holds the lease and is running.
    InFlight {
        /// The holder's token.
        token: FencingToken,
        /// When the lease lapses unless extended; after it, a retry takes over.
        lease_deadline: Timestamp,
    },
    /// The request finished; its outcome is replayed.
    Completed {
        /// The token of the holder that completed it.
        token: FencingToken,
        /// The stored result.
        outcome: Outcome,
    },
    /// The request failed and the failure was stored.
    Failed {
        /// The token of the holder that failed it.
        token: FencingToken,
        /// Whether the same request may run again.
        kind: FailureKind,
        /// The stored failure (replayed if permanent).
        outcome: Outcome,
    },
}

impl State {
    /// The token of the claim this state belongs to.
    pub fn token(&self) -> FencingToken {
        match self {
            Self::InFlight { token, .. }
            | Self::Completed { token, .. }
            | Self::Failed { token, .. } => *token,
        }
    }

    /// A short name of the state (`in_flight`, `completed`, `failed_retryable`,
    /// `failed_permanent`, `failed_unknown`), for typed store columns, logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Self::InFlight { .. } => "in_flight",
            Self::Completed { .. } => "completed",
            Self::Failed {
                kind: FailureKind::Retryable,
                ..
            } => "failed_retryable",
            Self::Failed {
                kind: FailureKind::Permanent,
                ..
            } => "failed_permanent",
            Self::Failed {
                kind: FailureKind::Unknown,
                ..
            } => "failed_unknown",
        }
    }
}

/// A holder's recorded progress: the recovery point a later holder of the
/// same key resumes from (see [`Engine::checkpoint`](crate::Engine::checkpoint)
/// and [`Phases`](crate::Phases)).
///
/// # Behavior
/// - Written only by the holder of a live lease, with a fenced
///   compare-and-swap ([`Record::checkpoint`]); `seq` strictly increases
///   with every checkpoint of a record, so progress only moves forward.
/// - Kept across a takeover of a lapsed lease and across a retryable
///   failure, so the next holder receives it; dropped when the key
///   completes or fails for good.
/// - Carries the scope and client key of its record, so that a completer
///   that finds an abandoned record can claim it again
///   ([`Checkpoint::record_key`]).
/// - Stores keep it as one opaque value
///   ([`codec::encode_checkpoint`](crate::store::codec::encode_checkpoint))
///   and return it byte for byte.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Checkpoint {
    /// 1 for a record's first checkpoint, +1 for each later one.
    pub seq: u32,
    /// The name of the step recorded last (for logs, metrics and operators).
    pub step: String,
    /// The holder's serialized progress, opaque to the core and to stores.
    #[serde(with = "serde_bytes")]
    pub state: Vec<u8>,
    /// The scope of the record this checkpoint belongs to.
    pub scope: Scope,
    /// The client's key of the record this checkpoint belongs to.
    pub key: IdempotencyKey,
}

impl Checkpoint {
    /// A checkpoint of the record under `key`.
    pub fn new(
        key: &RecordKey,
        seq: u32,
        step: impl Into<String>,
        state: impl Into<Bytes>,
    ) -> Self {
        Self {
            seq,
            step: step.into(),
            state: Vec::from(state.into()),
            scope: key.scope().clone(),
            key: key.key().clone(),
        }
    }

    /// The record key this checkpoint belongs to.
    pub fn record_key(&self) -> RecordKey {
        RecordKey::new(&self.scope, &self.key)
    }

    /// How many bytes it adds to a record's size
    /// ([`codec::record_size`](crate::store::codec::record_size)): the
    /// state, the step name, the scope's parts and the key, plus 64 for
    /// lengths and the sequence number.
    pub fn size(&self) -> usize {
        let scope = self.scope.tenant_id().len()
            + self.scope.principal().map_or(0, str::len)
            + self.scope.operation().map_or(0, str::len);
        64 + self.state.len() + self.step.len() + scope + self.key.as_str().len()
    }
}

/// Everything stored for one key.
///
/// # Behavior
/// - The fields are public to read (a store with typed columns writes each
///   one), but the type is `#[non_exhaustive]`: outside this crate a record
///   is built with [`Record::from_parts`] (a store reading its columns back)
///   or by the state machine's transitions ([`Record::new_claim`] and the
///   others in [`machine`](crate::machine)), never with a struct literal, and
///   a pattern names its fields with `..`.
/// - A store keeping the record as one blob uses
///   [`codec::encode_record`](crate::store::codec::encode_record) and never
///   looks inside.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Record {
    /// The fingerprint bound at the first claim; it never changes while the record lives.
    pub fingerprint: Fingerprint,
    /// Where the key is in its life.
    pub state: State,
    /// When the first claim was made.
    pub created_at: Timestamp,
    /// When the record was last written.
    pub updated_at: Timestamp,
    /// When the record expires; from then on the key behaves as absent.
    pub expires_at: Timestamp,
    /// How many claims were made (1 for the first; +1 per takeover or retry).
    pub attempts: u32,
    /// The last recovery point recorded by a holder, if any (see
    /// [`Checkpoint`]).
    pub checkpoint: Option<Checkpoint>,
}

impl Record {
    /// A record from its fields, as a store with typed columns reads them
    /// back.
    ///
    /// # Behavior
    /// Takes the values as they are, without checking them against each
    /// other (a store returns what was written; the engine and the
    /// conformance suite judge it).
    pub const fn from_parts(
        fingerprint: Fingerprint,
        state: State,
        created_at: Timestamp,
        updated_at: Timestamp,
        expires_at: Timestamp,
        attempts: u32,
    ) -> Self {
        Self {
            fingerprint,
            state,
            created_at,
            updated_at,
            expires_at,
            attempts,
            checkpoint: None,
        }
    }

    /// This record with `checkpoint` (a store with typed columns reading
    /// its checkpoint column back).
    #[must_use]
    pub fn with_checkpoint(mut self, checkpoint: Option<Checkpoint>) -> Self {
        self.checkpoint = checkpoint;
        self
    }

    /// Whether the record has expired at `now` (`expires_at <= now`): an
    /// expired record behaves exactly as an absent one.
    pub fn is_expired(&self, now: Timestamp) -> bool {
        self.expires_at <= now
    }
}

/// A record with the revision it is stored under.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Versioned {
    /// The compare-and-swap tag.
    pub revision: Revision,
    /// The record.
    pub record: Record,
}

impl Versioned {
    /// `record` stored under `revision`.
    pub const fn new(revision: Revision, record: Record) -> Self {
        Self { revision, record }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::Policy;
    use crate::store::codec;

    #[test]
    fn from_parts_builds_the_record_the_transitions_build() {
        let now = Timestamp::from_millis(1_000);
        let policy = Policy::default();
        let claim = Record::new_claim(
            Fingerprint::of(b"r"),
            FencingToken::from_u128(3),
            now,
            &policy,
        );
        let parts = Record::from_parts(
            claim.fingerprint,
            claim.state.clone(),
            claim.created_at,
            claim.updated_at,
            claim.expires_at,
            claim.attempts,
        );
        assert_eq!(parts, claim);
        let stored = Versioned::new(Revision::from_u64(9), parts);
        let bytes = codec::encode_record(&stored.record).unwrap();
        assert_eq!(codec::decode_record(&bytes).unwrap(), claim);
        assert_eq!(stored.revision, Revision::from_u64(9));
    }
}
