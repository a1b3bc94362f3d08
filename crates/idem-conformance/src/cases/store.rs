//! The store primitives, one clause of the [`Store`](idem_core::store::Store)
//! contract at a time.
//!
//! Every record written here lives at least 10 s past the `now` it is written
//! at, so a backend with native expiry (which counts in wall-clock time) keeps
//! it physically for the whole case; expiry is always reached by passing a
//! later `now`.
//!
//! | file | cases |
//! |---|---|
//! | `store/insert_get.rs` | `insert_if_absent` and `get`: live, absent, expired, whose `now` |
//! | `store/cas_delete.rs` | `compare_and_swap` and `delete_if`: revisions, no upsert |
//! | `store/round_trip.rs` | every field round-trips; keys and scopes never collide |
//! | `store/purge.rs` | `purge_expired` |
//! | `store/census.rs` | `census` (optional) |
//! | `store/checkpoint.rs` | records with a checkpoint round-trip on every path; large checkpoints |
//! | `store/abandoned.rs` | `abandoned` (optional): lapsed leases with a checkpoint, order, limit |
//! | `store/limits.rs` | a declared record limit; corrupt records |

mod abandoned;
mod cas_delete;
mod census;
pub(crate) mod checkpoint;
mod insert_get;
mod limits;
mod purge;
mod round_trip;

pub use abandoned::{
    abandoned_finds_exactly_lapsed_leases_with_a_checkpoint, abandoned_is_supported_as_declared,
    abandoned_respects_its_limit,
};
pub use cas_delete::{
    cas_on_absent_or_expired_changes_nothing, cas_right_revision_swaps,
    cas_stale_revision_changes_nothing, delete_if_absent_or_expired_is_false,
    delete_if_right_revision_deletes, delete_if_stale_revision_changes_nothing,
};
pub use census::{
    census_counts_by_state_and_expiry, census_is_supported_as_declared, census_respects_its_sample,
};
pub use checkpoint::{checkpoint_round_trips_every_path, large_checkpoint_round_trips};
pub use insert_get::{
    expiry_uses_the_callers_now, get_absent_is_none, get_expired_is_none, insert_on_absent,
    insert_on_existing_returns_it, insert_over_expired_replaces_it,
    reinsert_of_the_live_record_returns_it,
};
pub use limits::{
    corrupt_record_is_an_error_not_absent, declared_record_limit_is_honest,
    oversized_record_is_rejected,
};
pub use purge::{purge_keeps_live_records, purge_removes_only_expired, purge_respects_its_limit};
pub use round_trip::{
    far_future_expiry_round_trips, keys_with_every_allowed_character_never_collide,
    large_record_round_trips, records_round_trip_every_field, scopes_with_separators_never_collide,
};
