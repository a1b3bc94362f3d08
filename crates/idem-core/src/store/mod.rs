//! What a backend author needs: the [`Store`] trait and everything its
//! methods take and return.
//!
//! Backends stay dumb: they store a [`Versioned`] record under a
//! [`RecordKey`] and compare revisions. Every rule (who may claim, replay,
//! take over) lives in the [`machine`](crate::machine) and the
//! [`Engine`](crate::Engine).
//!
//! | item | for |
//! |---|---|
//! | [`Store`], [`Capabilities`] | the trait to implement, and what the backend declares |
//! | [`InsertOutcome`], [`SwapOutcome`] | what the two conditional writes report |
//! | [`Versioned`], [`Record`], [`State`], [`Revision`], [`FencingToken`] | the stored data |
//! | [`codec`] | the byte format, for stores that keep a record as one blob |
//! | [`StoreError`], [`BoxError`] | the errors a store returns, with one constructor per kind |
//! | [`IdGenerator`] | fresh revisions, tokens and write ids |
//! | [`Census`], [`Coverage`], [`CensusSupport`] | counting records (optional: [`Store::census`]) |
//! | [`check_table_name`], [`TableNameError`] | the table-name rules every SQL store shares |
//!
//! [`Outcome`](crate::Outcome), [`FailureKind`](crate::FailureKind),
//! [`RecordKey`] and [`Timestamp`] are at the crate root: applications meet
//! them too.

use std::sync::Arc;

use async_trait::async_trait;

mod census;
pub mod codec;
mod ids;
mod record;
mod table_name;

pub use crate::error::{BoxError, StoreError};
pub use census::{Census, Coverage, EXPIRY_BUCKET_LABELS, EXPIRY_BUCKETS, expiry_bucket};
pub use ids::IdGenerator;
pub use record::{Checkpoint, FencingToken, Record, Revision, State, Versioned};
pub use table_name::{TableNameError, check_table_name};

use crate::{RecordKey, Timestamp};

/// What [`Store::insert_if_absent`] did.
///
/// Formerly `Inserted`; the variants kept their names.
#[derive(Clone, Debug, PartialEq, Eq)]
// The record is returned once per call and moved, never stored in bulk:
// boxing it would add an allocation to every claim for nothing.
#[allow(clippy::large_enum_variant)]
pub enum InsertOutcome {
    /// The record was written: no live record was there.
    Inserted,
    /// A live record exists and nothing was written; here it is, with its
    /// revision (it may be the very record this call tried to insert, if an
    /// earlier attempt of the same write took effect).
    Exists(Versioned),
}

/// What [`Store::compare_and_swap`] did.
///
/// Formerly `Swapped`; the variants kept their names.
#[derive(Clone, Debug, PartialEq, Eq)]
// As `InsertOutcome`.
#[allow(clippy::large_enum_variant)]
pub enum SwapOutcome {
    /// The record was replaced.
    Swapped,
    /// Nothing was written: the live record (if any) has another revision.
    /// `None` means the key is absent or expired.
    Conflict(Option<Versioned>),
}

/// What a backend can do, so that integrations and the conformance suite
/// pick the behaviour and the cases that apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// The backend removes expired records by itself (Redis `PX`):
    /// [`Store::purge_expired`] has nothing to do.
    pub native_expiry: bool,
    /// The largest record the backend accepts, if it has a limit, measured
    /// by [`codec::record_size`] (the outcome plus
    /// a fixed [`RECORD_OVERHEAD`](codec::RECORD_OVERHEAD)).
    ///
    /// # Behavior
    /// A store that declares a limit accepts every record of at most that
    /// size and refuses every larger one with
    /// [`StoreError::Rejected`], writing nothing
    /// (checked by the conformance suite). The engine stores no outcome that
    /// would exceed it ([`Engine::outcome_limit`](crate::Engine::outcome_limit)).
    pub max_record_bytes: Option<usize>,
    /// Whether and how [`Store::census`] counts records.
    ///
    /// # Behavior
    /// A store that declares [`CensusSupport::Exact`] or
    /// [`CensusSupport::Sampled`] implements [`Store::census`] (checked by
    /// the conformance suite); one that declares [`CensusSupport::None`]
    /// returns [`StoreError::Unsupported`] from it.
    pub census: CensusSupport,
    /// Whether [`Store::abandoned`] finds records whose lease lapsed with a
    /// checkpoint (what the [`Completer`](crate::Completer) needs).
    ///
    /// # Behavior
    /// A store that declares it implements [`Store::abandoned`] (checked by
    /// the conformance suite); one that does not returns
    /// [`StoreError::Unsupported`] from it.
    pub abandoned: bool,
}

/// How a store answers [`Store::census`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum CensusSupport {
    /// Not offered: `census` returns [`StoreError::Unsupported`].
    #[default]
    None,
    /// Counts every record, whatever the sample size asked for (an
    /// aggregate query).
    Exact,
    /// Iterates records and stops after the sample size asked for; the
    /// census is [`Coverage::Exact`] when the iteration ended first.
    Sampled,
}

impl Capabilities {
    /// A backend without native expiry and without a size limit.
    pub const fn new() -> Self {
        Self {
            native_expiry: false,
            max_record_bytes: None,
            census: CensusSupport::None,
            abandoned: false,
        }
    }
    /// Declares [`Store::abandoned`].
    #[must_use]
    pub const fn with_abandoned(mut self, yes: bool) -> Self {
        self.abandoned = yes;
        self
    }
    /// Declares native expiry.
    #[must_use]
    pub const fn with_native_expiry(mut self, yes: bool) -> Self {
        self.native_expiry = yes;
        self
    }
    /// Declares how the store answers [`Store::census`].
    #[must_use]
    pub const fn with_census(mut self, census: CensusSupport) -> Self {
        self.census = census;
        self
    }
    /// Declares a record size limit.
    #[must_use]
    pub const fn with_max_record_bytes(mut self, max: Option<usize>) -> Self {
        self.max_record_bytes = max;
        self
    }
}

impl Default for Capabilities {
    fn default() -> Self {
        Self::new()
    }
}

/// Where idempotency records live. Implement it for a new backend and prove it
/// with the `idem-conformance` suite (see docs/backend-authors.md).
///
/// # Behavior
/// Common to every method:
/// - A record is *live* at `now` when `record.expires_at > now`. A record that
///   is not live behaves exactly as an absent one for every method, whether or
///   not it is still physically stored. `now` comes from the engine's clock;
///   stores never read a clock to decide expiry.
/// - Each method is atomic and linearizable per key: concurrent calls on one
///   key (from any task, connection or process sharing the data) behave as if
///   run one at a time.
/// - Records round-trip exactly: every field of [`Versioned`] reads back as written,
///   outcomes byte for byte (up to at least 1 MiB).
/// - A record that cannot be decoded is reported as [`StoreError::Corrupt`],
///   never as absent, and is never overwritten by `insert_if_absent`.
/// - A failure to reach the store is [`StoreError::Unavailable`].
///
/// On the happy path the engine makes one call per step: `insert_if_absent`
/// to claim or to find a record to replay, `compare_and_swap` to complete.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// What the backend can do.
    fn capabilities(&self) -> Capabilities;

    /// Writes `record` under `key` if no live record is there.
    ///
    /// # Behavior
    /// - No record, or only an expired one: writes `record` (replacing the
    ///   expired one) and returns [`InsertOutcome::Inserted`].
    /// - A live record: writes nothing and returns it with its revision as
    ///   [`InsertOutcome::Exists`].
    /// - Of N concurrent calls on one absent key, exactly one inserts; the
    ///   others see its record.
    /// - A live record with `record`'s revision but any other field different
    ///   is another caller's: [`InsertOutcome::Exists`]. Only `record` itself
    ///   (every field equal: this call, re-sent after a lost reply) may be
    ///   answered [`InsertOutcome::Inserted`] (or `Exists`), since the live
    ///   record is then the caller's.
    async fn insert_if_absent(
        &self,
        key: &RecordKey,
        record: &Versioned,
        now: Timestamp,
    ) -> Result<InsertOutcome, StoreError>;

    /// Reads the live record under `key`.
    ///
    /// # Behavior
    /// `None` when the key is absent or its record expired.
    async fn get(&self, key: &RecordKey, now: Timestamp) -> Result<Option<Versioned>, StoreError>;

    /// Replaces the live record under `key` with `record` if it is still
    /// `expected` (the record as this store returned it).
    ///
    /// # Behavior
    /// - Live record with `expected.revision`: writes `record` (with its own,
    ///   new revision) and returns [`SwapOutcome::Swapped`].
    /// - Otherwise writes nothing and returns [`SwapOutcome::Conflict`] with the
    ///   live record, or `None` if the key is absent or expired.
    /// - Of N concurrent calls with the same `expected`, at most one swaps.
    /// - `expected` must be a record exactly as read from this store
    ///   ([`get`](Store::get), [`InsertOutcome::Exists`],
    ///   [`SwapOutcome::Conflict`]) or as written by this caller. Revisions
    ///   are never reused, so comparing the revision alone is enough; a store
    ///   whose server compares whole values (Redis `SET … IFEQ`) may compare
    ///   the whole record instead, and then a doctored `expected` with the
    ///   right revision is a conflict, never a swap.
    async fn compare_and_swap(
        &self,
        key: &RecordKey,
        expected: &Versioned,
        record: &Versioned,
        now: Timestamp,
    ) -> Result<SwapOutcome, StoreError>;

    /// Deletes the live record under `key` if it is still `expected` (the
    /// record as this store returned it).
    ///
    /// # Behavior
    /// Returns `true` if it deleted; `false`, changing nothing, if the key is
    /// absent, expired, or holds another revision. `expected` is compared as
    /// in [`compare_and_swap`](Store::compare_and_swap).
    async fn delete_if(
        &self,
        key: &RecordKey,
        expected: &Versioned,
        now: Timestamp,
    ) -> Result<bool, StoreError>;

    /// Physically removes up to `limit` records that expired at or before `now`.
    ///
    /// # Behavior
    /// Returns how many it removed; removes no live record. Stores with
    /// [`native_expiry`](Capabilities::native_expiry) may return 0. Call it
    /// until it returns less than `limit` to purge everything expired.
    async fn purge_expired(&self, now: Timestamp, limit: usize) -> Result<u64, StoreError>;

    /// Counts the records the store holds, as of `now` (optional; see
    /// [`Capabilities::census`]).
    ///
    /// # Behavior
    /// - Counts only this store's own records (its table, schema or key
    ///   prefix), live ones by state and by time left, and those expired at
    ///   `now` but still stored; see [`Census`].
    /// - A store declaring [`CensusSupport::Exact`] counts every record and
    ///   returns [`Coverage::Exact`]. One declaring [`CensusSupport::Sampled`]
    ///   counts at most `sample` records: [`Coverage::Sampled`] with
    ///   `limit = sample` when it stopped early, [`Coverage::Exact`] when it
    ///   saw every record.
    /// - Writes nothing. Not linearizable with concurrent writes: a record
    ///   written meanwhile may or may not be counted, but none is counted twice.
    /// - The default returns [`StoreError::Unsupported`].
    async fn census(&self, now: Timestamp, sample: usize) -> Result<Census, StoreError> {
        let _ = (now, sample);
        Err(StoreError::unsupported("store", "census"))
    }

    /// Finds live records abandoned mid-way: in flight, with a lease that
    /// lapsed at or before `now`, and with a checkpoint (optional; see
    /// [`Capabilities::abandoned`]).
    ///
    /// # Behavior
    /// - Returns at most `limit` such records with their revisions, those
    ///   whose lease lapsed first first; never a record that is expired,
    ///   finished, without a checkpoint, or whose lease is still live at
    ///   `now`. Each record's key is its checkpoint's
    ///   ([`Checkpoint::record_key`]).
    /// - Counts only this store's own records (table, schema or prefix).
    /// - Writes nothing, and is not linearizable with concurrent writes: a
    ///   record returned may have been taken over since, which the caller's
    ///   conditional claim finds out.
    /// - The default returns [`StoreError::Unsupported`].
    async fn abandoned(&self, now: Timestamp, limit: usize) -> Result<Vec<Versioned>, StoreError> {
        let _ = (now, limit);
        Err(StoreError::unsupported("store", "abandoned"))
    }
}

/// Whether `record` is what [`Store::abandoned`] looks for at `now`: live,
/// in flight with a lapsed lease, and with a checkpoint.
pub fn is_abandoned(record: &Record, now: Timestamp) -> bool {
    !record.is_expired(now)
        && record.checkpoint.is_some()
        && matches!(record.state, State::InFlight { lease_deadline, .. } if lease_deadline <= now)
}

macro_rules! forward_store {
    ($($ty:ty),*) => {$(
        #[async_trait]
        impl<S: Store + ?Sized> Store for $ty {
            fn capabilities(&self) -> Capabilities {
                (**self).capabilities()
            }
            async fn insert_if_absent(
                &self,
                key: &RecordKey,
                record: &Versioned,
                now: Timestamp,
            ) -> Result<InsertOutcome, StoreError> {
                (**self).insert_if_absent(key, record, now).await
            }
            async fn get(&self, key: &RecordKey, now: Timestamp) -> Result<Option<Versioned>, StoreError> {
                (**self).get(key, now).await
            }
            async fn compare_and_swap(
                &self,
                key: &RecordKey,
                expected: &Versioned,
                record: &Versioned,
                now: Timestamp,
            ) -> Result<SwapOutcome, StoreError> {
                (**self).compare_and_swap(key, expected, record, now).await
            }
            async fn delete_if(
                &self,
                key: &RecordKey,
                expected: &Versioned,
                now: Timestamp,
            ) -> Result<bool, StoreError> {
                (**self).delete_if(key, expected, now).await
            }
            async fn purge_expired(&self, now: Timestamp, limit: usize) -> Result<u64, StoreError> {
                (**self).purge_expired(now, limit).await
            }
            async fn census(&self, now: Timestamp, sample: usize) -> Result<Census, StoreError> {
                (**self).census(now, sample).await
            }
            async fn abandoned(&self, now: Timestamp, limit: usize) -> Result<Vec<Versioned>, StoreError> {
                (**self).abandoned(now, limit).await
            }
        }
    )*};
}

forward_store!(Arc<S>, Box<S>);
