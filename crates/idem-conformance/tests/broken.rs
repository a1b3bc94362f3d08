//! The suite must be able to fail: each test here runs the whole suite
//! against a deliberately broken store (MemoryStore, or the minimal example
//! store, with one classic mistake) and asserts that the cases aimed at that
//! mistake fail by name. A correct store through the same wrapper must pass.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[allow(dead_code, unreachable_pub)]
#[path = "minimal.rs"]
mod minimal;

use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use idem_conformance::{Report, StoreFactory, Suite, TransactionEnd, Unavailable, Verdict};
use idem_core::machine::Fenced;
use idem_core::store::{
    Capabilities, Census, CensusSupport, InsertOutcome, Revision, State, Store, StoreError,
    SwapOutcome, Versioned, is_abandoned,
};
use idem_core::{
    Clock, Error, IdempotencyKey, MemoryStore, Outcome, RecordKey, Scope, SystemClock, Timestamp,
    Transition,
};
use libtest_mimic::{Arguments, Failed, Trial};

/// One classic mistake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flaw {
    /// No mistake: the wrapper must be transparent.
    None,
    /// Insert writes over a live record and says it inserted.
    InsertOverwrites,
    /// Insert answers `Inserted` when the live record has the revision it
    /// was asked to write ("my own write is already there").
    InsertOwnRevisionIsInserted,
    /// Insert treats an expired record as live.
    InsertIgnoresExpiry,
    /// Insert checks, then writes, with an await in between (check-then-insert).
    InsertNotAtomic,
    /// CAS swaps whatever the revision.
    CasIgnoresRevision,
    /// CAS on an absent key writes it (upsert).
    CasUpserts,
    /// CAS reads, then writes, with an await in between.
    CasNotAtomic,
    /// Get returns expired records.
    GetReturnsExpired,
    /// Delete deletes whatever the revision.
    DeleteIgnoresRevision,
    /// Purge removes live records too.
    PurgeRemovesLive,
    /// Purge ignores its limit.
    PurgeIgnoresLimit,
    /// The census counts expired records as live (it tallies at the epoch).
    CensusExpiredAsLive,
    /// Declares a sampled census but counts every record, whatever the sample.
    CensusIgnoresSample,
    /// Expiry is decided by the store's own (wall) clock.
    WallClock,
    /// Records are keyed by the client's key only, not the scope.
    Unscoped,
    /// Keys are compared case-insensitively.
    CaseInsensitiveKeys,
    /// Outcomes are cut to 64 KiB.
    TruncatesOutcomes,
    /// Revisions lose their top bit (a signed column gone wrong).
    NarrowRevisions,
    /// Timestamps are clamped to `i64::MAX` milliseconds.
    ClampsTimestamps,
    /// Two instances do not share records (a per-instance cache).
    InstancesDoNotShare,
    /// Transactional apply updates by key only, without checking the token.
    ApplyIgnoresToken,
    /// Transactional apply writes the record when the claim is gone.
    ApplyUpserts,
    /// The transaction is not rolled back (autocommit): a rolled-back
    /// apply stays written.
    RollbackCommits,
    /// Declares a 4 MiB record limit and enforces it (correct).
    LimitEnforced,
    /// Declares a 4 MiB record limit but stores larger records anyway.
    LimitNotEnforced,
    /// Declares a 4 MiB record limit but measures its encoded length instead
    /// of `codec::record_size`: it stores records somewhat above the limit.
    LimitByEncodedLength,
    /// Declares a 4 MiB record limit but refuses a record of exactly 4 MiB
    /// (`>=` instead of `>`).
    LimitOffByOne,
    /// CAS writes the record without its checkpoint (a checkpoint column
    /// left out of the UPDATE).
    CasDropsCheckpoint,
    /// CAS keeps the stored checkpoint when the new record has none
    /// (`COALESCE(new, old)` on a checkpoint column).
    CasKeepsCheckpoint,
    /// `abandoned` returns in-flight records with a checkpoint whose lease
    /// is still live.
    AbandonedIgnoresLease,
    /// `abandoned` returns expired records too.
    AbandonedIgnoresExpiry,
    /// `abandoned` returns records in the order they were written, not by
    /// lapse.
    AbandonedUnordered,
    /// `abandoned` takes the `limit` earliest lapsed leases, then leaves out
    /// those without a checkpoint (fewer than it should).
    AbandonedLimitBeforeFilter,
    /// Declares `abandoned` but does not implement it (a wrapper that does
    /// not forward it): `Unsupported`.
    AbandonedUndeclared,
}

/// The record limit the `Limit*` flaws declare.
const LIMIT: usize = 4 * 1024 * 1024;

const FLAWS: &[(Flaw, &str, &[&str])] = &[
    (
        Flaw::InsertOverwrites,
        "insert_overwrites_a_live_record",
        &[
            "store::insert_on_existing_returns_it",
            "model::regression_duplicate_is_in_progress",
            "race::insert_if_absent_32_tasks_one_wins",
            "race::engine_32_tasks_run_once",
            "engine::replay_returns_byte_exact_outcome",
            "engine::execute_runs_once_and_replays",
            "model::matches_core_model",
        ],
    ),
    (
        Flaw::InsertOwnRevisionIsInserted,
        "insert_of_its_own_revision_says_inserted",
        &["store::reinsert_of_the_live_record_returns_it"],
    ),
    (
        Flaw::ApplyIgnoresToken,
        "transactional_apply_ignores_the_token",
        &["transactional::lost_claim_is_refused_and_nothing_changes"],
    ),
    (
        Flaw::ApplyUpserts,
        "transactional_apply_upserts_a_released_key",
        &["transactional::lost_claim_is_refused_and_nothing_changes"],
    ),
    (
        Flaw::RollbackCommits,
        "transactional_rollback_still_writes",
        &["transactional::rollback_leaves_the_claim_held"],
    ),
    (
        Flaw::InsertIgnoresExpiry,
        "insert_treats_expired_as_live",
        &[
            "store::insert_over_expired_replaces_it",
            "model::regression_claim_over_expired_record",
            "race::insert_over_expired_32_tasks_one_wins",
            "engine::expired_key_is_claimed_afresh",
            "model::matches_core_model",
        ],
    ),
    (
        Flaw::InsertNotAtomic,
        "insert_checks_then_writes",
        &[
            "race::insert_if_absent_32_tasks_one_wins",
            "race::insert_over_expired_32_tasks_one_wins",
            "race::two_instances_insert_one_wins",
        ],
    ),
    (
        Flaw::CasIgnoresRevision,
        "cas_ignores_the_revision",
        &[
            "store::cas_stale_revision_changes_nothing",
            "model::regression_zombie_complete_after_new_claim",
            "store::cas_right_revision_swaps",
            "race::cas_same_revision_32_tasks_one_wins",
            "race::takeover_32_tasks_one_wins",
            "engine::takeover_fences_zombie",
            "model::matches_core_model",
        ],
    ),
    (
        Flaw::CasUpserts,
        "cas_upserts_an_absent_key",
        &[
            "store::cas_on_absent_or_expired_changes_nothing",
            "model::regression_complete_after_release",
        ],
    ),
    (
        Flaw::CasNotAtomic,
        "cas_reads_then_writes",
        &[
            "race::cas_same_revision_32_tasks_one_wins",
            "race::two_instances_cas_one_wins",
        ],
    ),
    (
        Flaw::GetReturnsExpired,
        "get_returns_expired_records",
        &[
            "store::get_expired_is_none",
            "store::cas_on_absent_or_expired_changes_nothing",
            "model::regression_expired_record_is_invisible",
            "engine::expired_key_is_claimed_afresh",
            "model::matches_core_model",
        ],
    ),
    (
        Flaw::DeleteIgnoresRevision,
        "delete_ignores_the_revision",
        &[
            "store::delete_if_stale_revision_changes_nothing",
            "model::regression_zombie_release_after_new_claim",
            "engine::takeover_fences_zombie",
        ],
    ),
    (
        Flaw::PurgeRemovesLive,
        "purge_removes_live_records",
        &[
            "store::purge_keeps_live_records",
            "model::regression_purge_keeps_live_claim",
            "store::purge_removes_only_expired",
        ],
    ),
    (
        Flaw::PurgeIgnoresLimit,
        "purge_ignores_its_limit",
        &["store::purge_respects_its_limit"],
    ),
    (
        Flaw::CensusExpiredAsLive,
        "census_counts_expired_as_live",
        &["store::census_counts_by_state_and_expiry"],
    ),
    (
        Flaw::CensusIgnoresSample,
        "census_ignores_its_sample",
        &["store::census_respects_its_sample"],
    ),
    (
        Flaw::WallClock,
        "expiry_by_the_stores_own_clock",
        &[
            "store::expiry_uses_the_callers_now",
            "store::get_expired_is_none",
            "model::regression_expired_record_is_invisible",
            "model::matches_core_model",
        ],
    ),
    (
        Flaw::Unscoped,
        "keys_not_scoped",
        &[
            "store::scopes_with_separators_never_collide",
            "model::regression_one_key_one_record",
        ],
    ),
    (
        Flaw::CaseInsensitiveKeys,
        "keys_case_insensitive",
        &[
            "store::keys_with_every_allowed_character_never_collide",
            "model::regression_one_key_one_record",
        ],
    ),
    (
        Flaw::TruncatesOutcomes,
        "outcomes_truncated_at_64_kib",
        &[
            "store::large_record_round_trips",
            "engine::large_outcome_replays_byte_exact",
        ],
    ),
    (
        Flaw::NarrowRevisions,
        "revisions_lose_their_top_bit",
        &["store::records_round_trip_every_field"],
    ),
    (
        Flaw::ClampsTimestamps,
        "timestamps_clamped_to_i64",
        &["store::far_future_expiry_round_trips"],
    ),
    (
        Flaw::LimitNotEnforced,
        "record_limit_declared_but_not_enforced",
        &[
            "store::oversized_record_is_rejected",
            "store::declared_record_limit_is_honest",
        ],
    ),
    (
        Flaw::LimitByEncodedLength,
        "record_limit_measured_by_encoded_length",
        &["store::declared_record_limit_is_honest"],
    ),
    (
        Flaw::LimitOffByOne,
        "record_limit_refuses_a_record_at_the_limit",
        &["store::declared_record_limit_is_honest"],
    ),
    (
        Flaw::CasDropsCheckpoint,
        "cas_drops_the_checkpoint",
        &[
            "store::checkpoint_round_trips_every_path",
            "store::large_checkpoint_round_trips",
            "engine::checkpoint_is_fenced",
            "engine::next_holder_resumes_from_the_checkpoint",
            "engine::next_holder_resumes_across_instances",
            "engine::phases_run_each_external_phase_once_across_a_crash",
            "engine::ambiguous_ending_with_a_checkpoint_is_resumed",
            "engine::completer_drives_an_abandoned_key_to_completion",
            "race::completer_vs_client_retry_one_resume",
            "model::rule_checkpoint_survives_a_takeover",
            "model::rule_ambiguous_ending_with_a_checkpoint_is_resumed",
            "model::matches_core_model",
        ],
    ),
    (
        Flaw::CasKeepsCheckpoint,
        "cas_keeps_a_dropped_checkpoint",
        &[
            "store::checkpoint_round_trips_every_path",
            "engine::checkpoint_is_fenced",
            "model::rule_checkpoint_survives_a_takeover",
            "model::matches_core_model",
        ],
    ),
    (
        Flaw::AbandonedIgnoresLease,
        "abandoned_returns_live_leases",
        &[
            "store::abandoned_finds_exactly_lapsed_leases_with_a_checkpoint",
            "engine::completer_drives_an_abandoned_key_to_completion",
            "model::rule_checkpoint_survives_a_takeover",
            "model::rule_checkpoint_of_a_lapsed_lease_before_takeover",
            "model::matches_core_model",
        ],
    ),
    (
        Flaw::AbandonedIgnoresExpiry,
        "abandoned_returns_expired_records",
        &[
            "store::abandoned_finds_exactly_lapsed_leases_with_a_checkpoint",
            "store::abandoned_respects_its_limit",
            "model::rule_checkpoint_of_a_lapsed_lease_before_takeover",
        ],
    ),
    (
        Flaw::AbandonedUnordered,
        "abandoned_not_ordered_by_lapse",
        &[
            "store::abandoned_finds_exactly_lapsed_leases_with_a_checkpoint",
            "store::abandoned_respects_its_limit",
        ],
    ),
    (
        Flaw::AbandonedLimitBeforeFilter,
        "abandoned_limits_before_filtering",
        &["store::abandoned_respects_its_limit"],
    ),
    (
        Flaw::AbandonedUndeclared,
        "abandoned_declared_but_not_forwarded",
        &[
            "store::abandoned_is_supported_as_declared",
            "store::abandoned_finds_exactly_lapsed_leases_with_a_checkpoint",
            "store::abandoned_respects_its_limit",
            "engine::completer_drives_an_abandoned_key_to_completion",
            "engine::completer_skips_operations_without_a_resume",
            "race::completer_vs_client_retry_one_resume",
            "model::rule_checkpoint_survives_a_takeover",
        ],
    ),
    (
        Flaw::InstancesDoNotShare,
        "instances_do_not_share_records",
        &[
            "race::two_instances_insert_one_wins",
            "race::engine_two_instances_run_once",
            "engine::takeover_across_instances_fences_zombie",
            "model::matches_core_model",
            "model::regression_one_key_one_record",
        ],
    ),
];

/// MemoryStore with one flaw.
#[derive(Clone)]
struct Flawed {
    inner: MemoryStore,
    flaw: Flaw,
    /// `InsertNotAtomic`, `CasNotAtomic`: how many read-then-write calls
    /// have read so far (shared by the instances over the same records).
    reads: Arc<AtomicUsize>,
    /// Every key written, in order (the `Abandoned*` flaws' own index).
    written: Arc<Mutex<Vec<RecordKey>>>,
}

impl Flawed {
    /// The read-then-write flaws' window, held open deterministically:
    /// after its read, a call waits (yielding, bounded) until another call
    /// has read too, so racing calls all read before any writes, as they
    /// would across a network round trip. A single yield left the window so
    /// narrow that on a loaded machine (or a runtime shared with other
    /// cases) the racers sometimes ran one after another and the flaw went
    /// unseen.
    async fn hold_the_window(&self) {
        let mine = self.reads.fetch_add(1, Ordering::SeqCst) + 1;
        for _ in 0..10_000 {
            if self.reads.load(Ordering::SeqCst) > mine {
                break;
            }
            tokio::task::yield_now().await;
        }
    }

    fn now(&self, now: Timestamp) -> Timestamp {
        if self.flaw == Flaw::WallClock {
            SystemClock.now()
        } else {
            now
        }
    }

    fn key(&self, key: &RecordKey) -> RecordKey {
        match self.flaw {
            Flaw::Unscoped => RecordKey::new(&Scope::global(), key.key()),
            Flaw::CaseInsensitiveKeys => RecordKey::new(
                key.scope(),
                &IdempotencyKey::parse(&key.key().as_str().to_ascii_lowercase()).unwrap(),
            ),
            _ => key.clone(),
        }
    }

    /// What the flawed store writes instead of `v`.
    fn mangle(&self, v: &Versioned) -> Versioned {
        let mut v = v.clone();
        match self.flaw {
            Flaw::TruncatesOutcomes => {
                if let State::Completed { outcome, .. } | State::Failed { outcome, .. } =
                    &mut v.record.state
                {
                    let cut = outcome.as_bytes()[..outcome.len().min(64 * 1024)].to_vec();
                    *outcome = Outcome::new(cut);
                }
            }
            Flaw::NarrowRevisions => {
                v.revision = Revision::from_u64(v.revision.as_u64() & (u64::MAX >> 1));
            }
            Flaw::ClampsTimestamps => {
                let max = Timestamp::from_millis(i64::MAX as u64);
                v.record.expires_at = v.record.expires_at.min(max);
            }
            _ => {}
        }
        v
    }

    /// Refuses records over the declared limit (`LimitEnforced`), or
    /// thinks it does (`LimitByEncodedLength`, `LimitOffByOne`).
    fn check_size(&self, v: &Versioned) -> Result<(), StoreError> {
        let (size, too_large) = match self.flaw {
            Flaw::LimitEnforced => {
                let size = idem_core::store::codec::record_size(&v.record);
                (size, size > LIMIT)
            }
            Flaw::LimitByEncodedLength => {
                let size = idem_core::store::codec::encode_record(&v.record)
                    .unwrap()
                    .len();
                (size, size > LIMIT)
            }
            Flaw::LimitOffByOne => {
                let size = idem_core::store::codec::record_size(&v.record);
                (size, size >= LIMIT)
            }
            _ => return Ok(()),
        };
        if too_large {
            return Err(StoreError::Rejected {
                store: "flawed",
                source: format!("record of {size} bytes over the limit of {LIMIT}").into(),
            });
        }
        Ok(())
    }

    /// Remembers `key` as written (the `Abandoned*` flaws' index).
    fn remember(&self, key: &RecordKey) {
        let mut written = self.written.lock().unwrap();
        if !written.contains(key) {
            written.push(key.clone());
        }
    }

    /// The flawed searches for abandoned records, over every record ever
    /// written (raw: expired ones included), in the order written.
    async fn flawed_abandoned(&self, now: Timestamp, limit: usize) -> Vec<Versioned> {
        let keys = self.written.lock().unwrap().clone();
        let mut all = Vec::new();
        for key in &keys {
            all.extend(self.raw(key).await);
        }
        let lapse = |v: &Versioned| match v.record.state {
            State::InFlight { lease_deadline, .. } => lease_deadline,
            _ => v.record.expires_at,
        };
        let in_flight = |v: &Versioned| matches!(v.record.state, State::InFlight { .. });
        let mut found: Vec<Versioned> = match self.flaw {
            Flaw::AbandonedIgnoresLease => all
                .into_iter()
                .filter(|v| {
                    in_flight(v) && !v.record.is_expired(now) && v.record.checkpoint.is_some()
                })
                .collect(),
            Flaw::AbandonedIgnoresExpiry => all
                .into_iter()
                .filter(|v| in_flight(v) && lapse(v) <= now && v.record.checkpoint.is_some())
                .collect(),
            Flaw::AbandonedUnordered => {
                let mut found: Vec<Versioned> = all
                    .into_iter()
                    .filter(|v| is_abandoned(&v.record, now))
                    .collect();
                found.truncate(limit);
                return found;
            }
            Flaw::AbandonedLimitBeforeFilter => {
                let mut lapsed: Vec<Versioned> = all
                    .into_iter()
                    .filter(|v| in_flight(v) && lapse(v) <= now && !v.record.is_expired(now))
                    .collect();
                lapsed.sort_by_key(lapse);
                lapsed.truncate(limit);
                lapsed.retain(|v| v.record.checkpoint.is_some());
                return lapsed;
            }
            _ => unreachable!("not an abandoned flaw"),
        };
        found.sort_by_key(lapse);
        found.truncate(limit);
        found
    }

    /// Reads the raw entry, expired or not.
    async fn raw(&self, key: &RecordKey) -> Option<Versioned> {
        self.inner
            .get(key, Timestamp::from_millis(0))
            .await
            .unwrap()
    }
}

#[async_trait]
impl Store for Flawed {
    fn capabilities(&self) -> Capabilities {
        match self.flaw {
            Flaw::LimitEnforced
            | Flaw::LimitNotEnforced
            | Flaw::LimitByEncodedLength
            | Flaw::LimitOffByOne => self.inner.capabilities().with_max_record_bytes(Some(LIMIT)),
            Flaw::CensusIgnoresSample => self
                .inner
                .capabilities()
                .with_census(CensusSupport::Sampled),
            _ => self.inner.capabilities(),
        }
    }

    async fn insert_if_absent(
        &self,
        key: &RecordKey,
        record: &Versioned,
        now: Timestamp,
    ) -> Result<InsertOutcome, StoreError> {
        self.check_size(record)?;
        let (key, now, record) = (self.key(key), self.now(now), self.mangle(record));
        self.remember(&key);
        match self.flaw {
            Flaw::InsertOverwrites => {
                let k = key.clone();
                if let Some(current) = self.inner.get(&k, now).await? {
                    self.inner
                        .compare_and_swap(&k, &current, &record, now)
                        .await?;
                    return Ok(InsertOutcome::Inserted);
                }
                self.inner.insert_if_absent(&key, &record, now).await
            }
            Flaw::InsertOwnRevisionIsInserted => {
                match self.inner.insert_if_absent(&key, &record, now).await? {
                    InsertOutcome::Exists(live) if live.revision == record.revision => {
                        Ok(InsertOutcome::Inserted)
                    }
                    other => Ok(other),
                }
            }
            Flaw::InsertIgnoresExpiry => match self.raw(&key).await {
                Some(existing) => Ok(InsertOutcome::Exists(existing)),
                None => self.inner.insert_if_absent(&key, &record, now).await,
            },
            Flaw::InsertNotAtomic => {
                let seen = self.inner.get(&key, now).await?;
                self.hold_the_window().await;
                match seen {
                    Some(existing) => Ok(InsertOutcome::Exists(existing)),
                    None => {
                        // Writes unconditionally, as `SET` without `NX` would.
                        if let Some(current) = self.raw(&key).await {
                            self.inner
                                .delete_if(&key, &current, Timestamp::from_millis(0))
                                .await?;
                        }
                        self.inner.insert_if_absent(&key, &record, now).await?;
                        Ok(InsertOutcome::Inserted)
                    }
                }
            }
            _ => self.inner.insert_if_absent(&key, &record, now).await,
        }
    }

    async fn get(&self, key: &RecordKey, now: Timestamp) -> Result<Option<Versioned>, StoreError> {
        let (key, now) = (self.key(key), self.now(now));
        if self.flaw == Flaw::GetReturnsExpired {
            return Ok(self.raw(&key).await);
        }
        self.inner.get(&key, now).await
    }

    async fn compare_and_swap(
        &self,
        key: &RecordKey,
        expected: &Versioned,
        record: &Versioned,
        now: Timestamp,
    ) -> Result<SwapOutcome, StoreError> {
        self.check_size(record)?;
        let (key, now, mut record) = (self.key(key), self.now(now), self.mangle(record));
        let expected = self.mangle(expected);
        match self.flaw {
            Flaw::CasDropsCheckpoint => record.record.checkpoint = None,
            Flaw::CasKeepsCheckpoint if record.record.checkpoint.is_none() => {
                if let Some(current) = self.inner.get(&key, now).await? {
                    record.record.checkpoint = current.record.checkpoint;
                }
            }
            _ => {}
        }
        match self.flaw {
            Flaw::CasIgnoresRevision => match self.inner.get(&key, now).await? {
                Some(current) => {
                    self.inner
                        .compare_and_swap(&key, &current, &record, now)
                        .await
                }
                None => Ok(SwapOutcome::Conflict(None)),
            },
            Flaw::CasUpserts => match self.inner.get(&key, now).await? {
                None => {
                    self.inner.insert_if_absent(&key, &record, now).await?;
                    Ok(SwapOutcome::Swapped)
                }
                Some(_) => {
                    self.inner
                        .compare_and_swap(&key, &expected, &record, now)
                        .await
                }
            },
            Flaw::CasNotAtomic => {
                let seen = self.inner.get(&key, now).await?;
                self.hold_the_window().await;
                match seen {
                    Some(current) if current.revision == expected.revision => {
                        // Writes whatever is there now, as GET-then-SET would.
                        if let Some(now_there) = self.inner.get(&key, now).await? {
                            self.inner
                                .compare_and_swap(&key, &now_there, &record, now)
                                .await?;
                        }
                        Ok(SwapOutcome::Swapped)
                    }
                    other => Ok(SwapOutcome::Conflict(other)),
                }
            }
            _ => {
                self.inner
                    .compare_and_swap(&key, &expected, &record, now)
                    .await
            }
        }
    }

    async fn delete_if(
        &self,
        key: &RecordKey,
        expected: &Versioned,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let (key, now) = (self.key(key), self.now(now));
        let expected = if self.flaw == Flaw::NarrowRevisions {
            Versioned {
                revision: Revision::from_u64(expected.revision.as_u64() & (u64::MAX >> 1)),
                record: expected.record.clone(),
            }
        } else {
            expected.clone()
        };
        if self.flaw == Flaw::DeleteIgnoresRevision {
            return match self.inner.get(&key, now).await? {
                Some(current) => self.inner.delete_if(&key, &current, now).await,
                None => Ok(false),
            };
        }
        self.inner.delete_if(&key, &expected, now).await
    }

    async fn purge_expired(&self, now: Timestamp, limit: usize) -> Result<u64, StoreError> {
        let now = self.now(now);
        match self.flaw {
            Flaw::PurgeRemovesLive => {
                let n = self.inner.len() as u64;
                let far = Timestamp::from_millis(u64::MAX);
                self.inner.purge_expired(far, usize::MAX).await?;
                Ok(n.min(limit as u64))
            }
            Flaw::PurgeIgnoresLimit => self.inner.purge_expired(now, usize::MAX).await,
            _ => self.inner.purge_expired(now, limit).await,
        }
    }

    async fn census(&self, now: Timestamp, sample: usize) -> Result<Census, StoreError> {
        match self.flaw {
            Flaw::CensusExpiredAsLive => self.inner.census(Timestamp::from_millis(0), sample).await,
            _ => self.inner.census(self.now(now), sample).await,
        }
    }

    async fn abandoned(&self, now: Timestamp, limit: usize) -> Result<Vec<Versioned>, StoreError> {
        let now = self.now(now);
        match self.flaw {
            Flaw::AbandonedUndeclared => Err(StoreError::unsupported("flawed", "abandoned")),
            Flaw::AbandonedIgnoresLease
            | Flaw::AbandonedIgnoresExpiry
            | Flaw::AbandonedUnordered
            | Flaw::AbandonedLimitBeforeFilter => Ok(self.flawed_abandoned(now, limit).await),
            _ => self.inner.abandoned(now, limit).await,
        }
    }
}

struct FlawedFactory(Flaw);

/// A correct store whose factory cannot open a second instance.
struct UnsharedFactory;

#[async_trait]
impl StoreFactory for UnsharedFactory {
    type Store = MemoryStore;
    fn name(&self) -> &'static str {
        "unshared"
    }
    async fn open(&self) -> Result<MemoryStore, Unavailable> {
        Ok(MemoryStore::new())
    }
}

/// A backend that cannot be reached.
struct UnreachableFactory;

#[async_trait]
impl StoreFactory for UnreachableFactory {
    type Store = MemoryStore;
    fn name(&self) -> &'static str {
        "unreachable"
    }
    async fn open(&self) -> Result<MemoryStore, Unavailable> {
        Err(Unavailable("set IDEM_NOWHERE_URL".into()))
    }
}

#[async_trait]
impl StoreFactory for FlawedFactory {
    type Store = Flawed;
    fn name(&self) -> &'static str {
        "flawed"
    }
    async fn open(&self) -> Result<Flawed, Unavailable> {
        Ok(Flawed {
            inner: MemoryStore::new(),
            flaw: self.0,
            reads: Arc::default(),
            written: Arc::default(),
        })
    }
    async fn reopen(&self, store: &Flawed) -> Result<Option<Flawed>, Unavailable> {
        if self.0 == Flaw::InstancesDoNotShare {
            return Ok(Some(Flawed {
                inner: MemoryStore::new(),
                flaw: self.0,
                reads: Arc::default(),
                written: Arc::default(),
            }));
        }
        Ok(Some(store.clone()))
    }
    fn can_apply_transition(&self) -> bool {
        true
    }
    /// A "transaction" over the flawed store's own primitives: the cases
    /// run one call at a time, so check-then-write is enough here.
    async fn apply_transition(
        &self,
        store: &Flawed,
        transition: &Transition,
        end: TransactionEnd,
    ) -> Result<Result<(), Error>, Unavailable> {
        let fail = |e: StoreError| Unavailable(format!("flawed: {e}"));
        let (key, now) = (&transition.key, transition.next.record.updated_at);
        let current = store.get(key, now).await.map_err(fail)?;
        let held = match (&current, self.0) {
            (Some(_), Flaw::ApplyIgnoresToken) | (None, Flaw::ApplyUpserts) => Ok(()),
            (Some(live), _) => live.record.check_holder(transition.token, now),
            (None, _) => Err(Fenced::Expired),
        };
        if let Err(fenced) = held {
            return Ok(Err(Error::LeaseLost(fenced)));
        }
        if end == TransactionEnd::Rollback && self.0 != Flaw::RollbackCommits {
            return Ok(Ok(()));
        }
        match current {
            Some(live) => {
                store
                    .compare_and_swap(key, &live, &transition.next, now)
                    .await
                    .map_err(fail)?;
            }
            None => {
                store
                    .insert_if_absent(key, &transition.next, now)
                    .await
                    .map_err(fail)?;
            }
        }
        Ok(Ok(()))
    }
}

/// The minimal example store, except that it treats a corrupt record as
/// absent (and so overwrites it).
#[derive(Clone, Default)]
struct CorruptAsAbsent(minimal::MiniStore);

#[async_trait]
impl Store for CorruptAsAbsent {
    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }
    async fn insert_if_absent(
        &self,
        key: &RecordKey,
        record: &Versioned,
        now: Timestamp,
    ) -> Result<InsertOutcome, StoreError> {
        match self.0.insert_if_absent(key, record, now).await {
            Err(StoreError::Corrupt { .. }) => {
                self.0.overwrite_blob(
                    key,
                    idem_core::store::codec::encode_record(&record.record).unwrap(),
                );
                Ok(InsertOutcome::Inserted)
            }
            other => other,
        }
    }
    async fn get(&self, key: &RecordKey, now: Timestamp) -> Result<Option<Versioned>, StoreError> {
        match self.0.get(key, now).await {
            Err(StoreError::Corrupt { .. }) => Ok(None),
            other => other,
        }
    }
    async fn compare_and_swap(
        &self,
        key: &RecordKey,
        expected: &Versioned,
        record: &Versioned,
        now: Timestamp,
    ) -> Result<SwapOutcome, StoreError> {
        self.0.compare_and_swap(key, expected, record, now).await
    }
    async fn delete_if(
        &self,
        key: &RecordKey,
        expected: &Versioned,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        self.0.delete_if(key, expected, now).await
    }
    async fn purge_expired(&self, now: Timestamp, limit: usize) -> Result<u64, StoreError> {
        self.0.purge_expired(now, limit).await
    }
    async fn census(&self, now: Timestamp, sample: usize) -> Result<Census, StoreError> {
        self.0.census(now, sample).await
    }
    async fn abandoned(&self, now: Timestamp, limit: usize) -> Result<Vec<Versioned>, StoreError> {
        self.0.abandoned(now, limit).await
    }
}

struct CorruptAsAbsentFactory;

#[async_trait]
impl StoreFactory for CorruptAsAbsentFactory {
    type Store = CorruptAsAbsent;
    fn name(&self) -> &'static str {
        "corrupt-as-absent"
    }
    async fn open(&self) -> Result<CorruptAsAbsent, Unavailable> {
        Ok(CorruptAsAbsent::default())
    }
    fn can_corrupt(&self) -> bool {
        true
    }
    async fn corrupt(&self, store: &CorruptAsAbsent, key: &RecordKey) -> Result<(), Unavailable> {
        store.0.overwrite_blob(key, vec![0xff]);
        Ok(())
    }
}

/// Fails unless every case in `expected` failed. The random model test is
/// expected to catch a flaw only when it generates enough sequences (it is
/// run with fewer when `IDEM_PROPTEST_CASES` says so); the fixed regression
/// sequences always are.
fn expect_failures(report: &Report, expected: &[&str]) -> Result<(), Failed> {
    let enough = idem_conformance::cases::model::cases() >= 64;
    let expected: Vec<&str> = expected
        .iter()
        .copied()
        .filter(|c| enough || *c != "model::matches_core_model")
        .collect();
    let failed = report.failed();
    let missed: Vec<&&str> = expected.iter().filter(|c| !failed.contains(c)).collect();
    if failed.is_empty() || !missed.is_empty() {
        return Err(format!(
            "the suite did not reject the broken store as expected; these cases passed or were ignored: {missed:?}\n{report}"
        )
        .into());
    }
    for name in &expected {
        match report.verdict(name) {
            Some(Verdict::Failed(why)) if !why.is_empty() => {}
            other => return Err(format!("{name}: {other:?}").into()),
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    // The broken stores make cases panic on purpose; keep their panic
    // messages (which the report carries) off the terminal.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let on_case_thread = std::thread::current()
            .name()
            .is_some_and(|n| n.starts_with("idem-conformance"));
        if !on_case_thread {
            default_hook(info);
        }
    }));

    let mut trials = vec![
        Trial::test("broken::memory_store_through_the_wrapper_passes", || {
            let report = Suite::new(FlawedFactory(Flaw::None)).report();
            let failed = report.failed();
            if !failed.is_empty() {
                return Err(format!("a correct store failed {failed:?}\n{report}").into());
            }
            let not_applicable = report.not_applicable();
            // MemoryStore declares no record limit and cannot be corrupted.
            if not_applicable
                != [
                    "store::oversized_record_is_rejected",
                    "store::declared_record_limit_is_honest",
                    "store::corrupt_record_is_an_error_not_absent",
                ]
                || !report.ignored().is_empty()
            {
                return Err(format!(
                    "unexpected not-applicable cases {not_applicable:?} or ignored {:?}",
                    report.ignored()
                )
                .into());
            }
            Ok(())
        }),
        Trial::test("broken::enforced_record_limit_passes", || {
            let report = Suite::new(FlawedFactory(Flaw::LimitEnforced)).report();
            let failed = report.failed();
            if !failed.is_empty()
                || report.verdict("store::oversized_record_is_rejected") != Some(&Verdict::Passed)
                || report.verdict("store::declared_record_limit_is_honest")
                    != Some(&Verdict::Passed)
            {
                return Err(
                    format!("a store enforcing its declared limit must pass\n{report}").into(),
                );
            }
            Ok(())
        }),
        Trial::test(
            "harness::cases_needing_two_instances_do_not_apply_without_them",
            || {
                let report = Suite::new(UnsharedFactory).report();
                let not_applicable = report.not_applicable();
                let shared = [
                    "race::two_instances_insert_one_wins",
                    "race::two_instances_cas_one_wins",
                    "race::engine_two_instances_run_once",
                    "engine::takeover_across_instances_fences_zombie",
                ];
                if !report.failed().is_empty()
                    || !report.ignored().is_empty()
                    || shared.iter().any(|c| !not_applicable.contains(c))
                {
                    return Err(format!(
                        "cases needing two instances must not apply (and nothing be ignored)\n{report}"
                    )
                    .into());
                }
                match report.verdict(shared[0]) {
                    Some(Verdict::NotApplicable(why)) if why.contains("reopen") => Ok(()),
                    other => Err(format!("the reason must name reopen: {other:?}").into()),
                }
            },
        ),
        Trial::test("harness::unreachable_backend_never_passes", || {
            let report = Suite::new(UnreachableFactory).report();
            if !report.passed().is_empty()
                || report.cases.len() != Suite::new(UnreachableFactory).names().len()
            {
                return Err(format!("an unreachable backend passed cases\n{report}").into());
            }
            let all_ignored = report.ignored().len() == report.cases.len();
            let all_failed = report.failed().len() == report.cases.len();
            if idem_conformance::backends_required() && !all_failed {
                return Err(format!("with CI=true every case must fail\n{report}").into());
            }
            if !idem_conformance::backends_required() && !all_ignored {
                return Err(format!("without CI every case must be ignored\n{report}").into());
            }
            Ok(())
        }),
        Trial::test("broken::corrupt_record_treated_as_absent", || {
            let report = Suite::new(CorruptAsAbsentFactory).report();
            expect_failures(&report, &["store::corrupt_record_is_an_error_not_absent"])
        }),
    ];
    for &(flaw, name, expected) in FLAWS {
        trials.push(Trial::test(format!("broken::{name}"), move || {
            let report = Suite::new(FlawedFactory(flaw)).report();
            expect_failures(&report, expected)
        }));
    }
    libtest_mimic::run(&Arguments::from_args(), trials).exit_code()
}
