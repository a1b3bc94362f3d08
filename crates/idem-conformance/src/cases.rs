//! The named cases. Each is a plain `pub async fn name<F: StoreFactory>(factory: Arc<F>)`
//! that opens its own store(s) from the factory and panics, with a message
//! naming the clause of the contract it checks, when the store breaks it.
//!
//! | module | what it checks |
//! |---|---|
//! | [`store`] | every clause of the [`Store`] trait's `# Behavior`, one primitive at a time |
//! | [`transactional`] | completion inside the caller's transaction, for the backends that offer it |
//! | [`race`](mod@race) | the same clauses under real races: tasks released together by a barrier, exact counts |
//! | [`engine`] | the engine's guarantees through the store (replay, mismatch, fencing, release, failures, waiting, checkpoints, phases, the completer) |
//! | [`model`] | random operation sequences, engine + store against the pure core model |
//!
//! Every case that drives an engine (`engine::*`, `model::*` and the
//! `race::` cases through the engine) runs a second time with the engine's
//! cache of finished records on
//! ([`Engine::with_finished_cache`](idem_core::Engine::with_finished_cache)),
//! named `engine_cached::*`, `model_cached::*`, `race_cached::*`: the same
//! assertions must hold whether a replay comes from the store or from the
//! cache. Such a variant fails if none of its engines consulted the cache.
//!
//! Time never passes by itself: every case drives a [`ManualClock`]
//! or passes explicit timestamps, so no case waits on wall-clock time.
// This module is test code: a failed expectation is a failed case, reported
// by the harness with its message.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use idem_core::store::{
    FencingToken, InsertOutcome, Record, Revision, State, Store, StoreError, SwapOutcome, Versioned,
};
use idem_core::{
    CacheStats, Engine, Fingerprint, IdempotencyKey, ManualClock, Outcome, Policy, RecordKey,
    Scope, Timestamp,
};

use crate::{Case, Requires, StoreFactory};

pub mod engine;
pub mod model;
pub mod race;
pub mod store;
pub mod transactional;

/// Registers `$module::$name` as a case named `"$module::$name"`.
macro_rules! case {
    ($module:ident :: $name:ident, $requires:ident) => {
        Case::new(
            concat!(stringify!($module), "::", stringify!($name)),
            Requires::$requires,
            |f| Box::pin($module::$name(f)),
        )
    };
}

/// Registers `$module::$name` again as `"${module}_cached::$name"`, run
/// with the engine's cache of finished records on ([`with_finished_cache`]).
macro_rules! cached_case {
    ($module:ident :: $name:ident, $requires:ident) => {
        Case::new(
            concat!(stringify!($module), "_cached::", stringify!($name)),
            Requires::$requires,
            |f| Box::pin(with_finished_cache($module::$name(f))),
        )
    };
}

/// Every case of the suite, in order.
pub fn all<F: StoreFactory>() -> Vec<Case<F>> {
    vec![
        // The store primitives, one clause at a time.
        case!(store::insert_on_absent, Always),
        case!(store::insert_on_existing_returns_it, Always),
        case!(store::reinsert_of_the_live_record_returns_it, Always),
        case!(store::insert_over_expired_replaces_it, Always),
        case!(store::get_absent_is_none, Always),
        case!(store::get_expired_is_none, Always),
        case!(store::expiry_uses_the_callers_now, Always),
        case!(store::cas_right_revision_swaps, Always),
        case!(store::cas_stale_revision_changes_nothing, Always),
        case!(store::cas_on_absent_or_expired_changes_nothing, Always),
        case!(store::delete_if_right_revision_deletes, Always),
        case!(store::delete_if_stale_revision_changes_nothing, Always),
        case!(store::delete_if_absent_or_expired_is_false, Always),
        case!(store::records_round_trip_every_field, Always),
        case!(store::far_future_expiry_round_trips, Always),
        case!(store::large_record_round_trips, Always),
        case!(
            store::keys_with_every_allowed_character_never_collide,
            Always
        ),
        case!(store::scopes_with_separators_never_collide, Always),
        case!(store::purge_keeps_live_records, Always),
        case!(store::purge_removes_only_expired, Purge),
        case!(store::purge_respects_its_limit, Purge),
        case!(store::census_is_supported_as_declared, Always),
        case!(store::census_counts_by_state_and_expiry, Census),
        case!(store::census_respects_its_sample, Census),
        case!(store::oversized_record_is_rejected, RecordLimit),
        case!(store::declared_record_limit_is_honest, RecordLimit),
        case!(store::corrupt_record_is_an_error_not_absent, Corruption),
        // Checkpoints, and the search for abandoned records (optional).
        case!(store::checkpoint_round_trips_every_path, Always),
        case!(store::large_checkpoint_round_trips, Always),
        case!(store::abandoned_is_supported_as_declared, Always),
        case!(
            store::abandoned_finds_exactly_lapsed_leases_with_a_checkpoint,
            Abandoned
        ),
        case!(store::abandoned_respects_its_limit, Abandoned),
        // Completion inside the caller's transaction, where offered.
        case!(
            transactional::commit_applies_complete_and_fail,
            Transactional
        ),
        case!(transactional::rollback_leaves_the_claim_held, Transactional),
        case!(
            transactional::apply_checks_the_token_not_the_revision,
            Transactional
        ),
        case!(
            transactional::lost_claim_is_refused_and_nothing_changes,
            Transactional
        ),
        // Races: tasks released together, exact counts.
        case!(race::insert_if_absent_32_tasks_one_wins, Always),
        case!(race::insert_over_expired_32_tasks_one_wins, Always),
        case!(race::cas_same_revision_32_tasks_one_wins, Always),
        case!(race::delete_if_32_tasks_one_wins, Always),
        case!(race::two_instances_insert_one_wins, SharedInstances),
        case!(race::two_instances_cas_one_wins, SharedInstances),
        case!(race::engine_32_tasks_run_once, Always),
        case!(race::engine_two_instances_run_once, SharedInstances),
        case!(race::takeover_32_tasks_one_wins, Always),
        case!(race::zombie_complete_vs_takeover_one_wins, Always),
        case!(race::completer_vs_client_retry_one_resume, Abandoned),
        // The engine through the store.
        case!(engine::replay_returns_byte_exact_outcome, Always),
        case!(engine::large_outcome_replays_byte_exact, Always),
        case!(engine::fingerprint_mismatch_in_every_state, Always),
        case!(engine::mismatch_reports_the_first_use, Always),
        case!(engine::in_progress_reports_time_left, Always),
        case!(engine::takeover_fences_zombie, Always),
        case!(
            engine::takeover_across_instances_fences_zombie,
            SharedInstances
        ),
        case!(engine::release_lets_a_retry_proceed, Always),
        case!(engine::retryable_failure_lets_a_retry_proceed, Always),
        case!(engine::permanent_failure_is_replayed, Always),
        case!(engine::try_execute_follows_on_error, Always),
        case!(engine::execute_runs_once_and_replays, Always),
        case!(engine::complete_is_idempotent_for_its_holder, Always),
        case!(engine::expired_key_is_claimed_afresh, Always),
        case!(engine::heartbeat_keeps_the_lease, Always),
        case!(engine::wait_for_original_returns_its_outcome, Always),
        case!(engine::wait_for_original_gives_up_after_max, Always),
        // Recovery points, phases and the completer.
        case!(engine::checkpoint_is_fenced, Always),
        case!(engine::next_holder_resumes_from_the_checkpoint, Always),
        case!(
            engine::next_holder_resumes_across_instances,
            SharedInstances
        ),
        case!(
            engine::phases_run_each_external_phase_once_across_a_crash,
            Always
        ),
        case!(
            engine::ambiguous_ending_with_a_checkpoint_is_resumed,
            Always
        ),
        case!(
            engine::completer_drives_an_abandoned_key_to_completion,
            Abandoned
        ),
        case!(
            engine::completer_skips_operations_without_a_resume,
            Abandoned
        ),
        // The model-based test and the sequences it once shrank to.
        case!(model::matches_core_model, Always),
        case!(model::regression_one_key_one_record, Always),
        case!(model::regression_duplicate_is_in_progress, Always),
        case!(model::regression_expired_record_is_invisible, Always),
        case!(model::regression_claim_over_expired_record, Always),
        case!(model::regression_purge_keeps_live_claim, Always),
        case!(model::regression_complete_after_release, Always),
        case!(model::regression_zombie_complete_after_new_claim, Always),
        case!(model::regression_zombie_release_after_new_claim, Always),
        case!(
            model::rule_zombie_release_after_takeover_and_release,
            Always
        ),
        case!(model::rule_extend_of_lapsed_lease_before_takeover, Always),
        case!(model::rule_reclaim_after_retryable_failure, Always),
        case!(model::rule_checkpoint_survives_a_takeover, Always),
        case!(
            model::rule_ambiguous_ending_with_a_checkpoint_is_resumed,
            Always
        ),
        case!(
            model::rule_checkpoint_of_a_lapsed_lease_before_takeover,
            Always
        ),
        // Every case that drives an engine, again with its cache of
        // finished records on.
        cached_case!(race::engine_32_tasks_run_once, Always),
        cached_case!(race::engine_two_instances_run_once, SharedInstances),
        cached_case!(race::takeover_32_tasks_one_wins, Always),
        cached_case!(race::zombie_complete_vs_takeover_one_wins, Always),
        cached_case!(race::completer_vs_client_retry_one_resume, Abandoned),
        cached_case!(engine::replay_returns_byte_exact_outcome, Always),
        cached_case!(engine::large_outcome_replays_byte_exact, Always),
        cached_case!(engine::fingerprint_mismatch_in_every_state, Always),
        cached_case!(engine::mismatch_reports_the_first_use, Always),
        cached_case!(engine::in_progress_reports_time_left, Always),
        cached_case!(engine::takeover_fences_zombie, Always),
        cached_case!(
            engine::takeover_across_instances_fences_zombie,
            SharedInstances
        ),
        cached_case!(engine::release_lets_a_retry_proceed, Always),
        cached_case!(engine::retryable_failure_lets_a_retry_proceed, Always),
        cached_case!(engine::permanent_failure_is_replayed, Always),
        cached_case!(engine::try_execute_follows_on_error, Always),
        cached_case!(engine::execute_runs_once_and_replays, Always),
        cached_case!(engine::complete_is_idempotent_for_its_holder, Always),
        cached_case!(engine::expired_key_is_claimed_afresh, Always),
        cached_case!(engine::heartbeat_keeps_the_lease, Always),
        cached_case!(engine::wait_for_original_returns_its_outcome, Always),
        cached_case!(engine::wait_for_original_gives_up_after_max, Always),
        cached_case!(engine::checkpoint_is_fenced, Always),
        cached_case!(engine::next_holder_resumes_from_the_checkpoint, Always),
        cached_case!(
            engine::next_holder_resumes_across_instances,
            SharedInstances
        ),
        cached_case!(
            engine::phases_run_each_external_phase_once_across_a_crash,
            Always
        ),
        cached_case!(
            engine::ambiguous_ending_with_a_checkpoint_is_resumed,
            Always
        ),
        cached_case!(
            engine::completer_drives_an_abandoned_key_to_completion,
            Abandoned
        ),
        cached_case!(
            engine::completer_skips_operations_without_a_resume,
            Abandoned
        ),
        cached_case!(model::matches_core_model, Always),
        cached_case!(model::regression_one_key_one_record, Always),
        cached_case!(model::regression_duplicate_is_in_progress, Always),
        cached_case!(model::regression_expired_record_is_invisible, Always),
        cached_case!(model::regression_claim_over_expired_record, Always),
        cached_case!(model::regression_purge_keeps_live_claim, Always),
        cached_case!(model::regression_complete_after_release, Always),
        cached_case!(model::regression_zombie_complete_after_new_claim, Always),
        cached_case!(model::regression_zombie_release_after_new_claim, Always),
        cached_case!(
            model::rule_zombie_release_after_takeover_and_release,
            Always
        ),
        cached_case!(model::rule_extend_of_lapsed_lease_before_takeover, Always),
        cached_case!(model::rule_reclaim_after_retryable_failure, Always),
        cached_case!(model::rule_checkpoint_survives_a_takeover, Always),
        cached_case!(
            model::rule_ambiguous_ending_with_a_checkpoint_is_resumed,
            Always
        ),
        cached_case!(
            model::rule_checkpoint_of_a_lapsed_lease_before_takeover,
            Always
        ),
    ]
}

/// The size of the cache of finished records the `*_cached` variants give
/// every engine: room for every record of any case (the largest outcome is
/// 1 MiB + 5 bytes).
pub(crate) const CACHE_BYTES: usize = 64 << 20;

/// What a `*_cached` variant learns of the engines its case built.
type CacheReader = Box<dyn Fn() -> Option<CacheStats> + Send + Sync>;

/// The engines a `*_cached` variant built (each read through its
/// [`Engine::finished_cache`]); clones share them.
#[derive(Clone, Default)]
pub(crate) struct CacheProbe(Arc<Mutex<Vec<CacheReader>>>);

impl CacheProbe {
    fn register<S: Store>(&self, engine: &Engine<S, ManualClock>) {
        let engine = engine.clone();
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Box::new(move || engine.finished_cache()));
    }

    fn stats(&self) -> Vec<Option<CacheStats>> {
        let readers = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        readers.iter().map(|read| read()).collect()
    }
}

tokio::task_local! {
    /// Set while a `*_cached` variant runs: [`engine_on`] turns the cache on.
    static FINISHED_CACHE: CacheProbe;
}

/// Runs `case` with the cache of finished records on in every engine it
/// builds through [`engine_on`]; fails if it built none, or none of them
/// consulted its cache (the variant would test nothing).
pub(crate) async fn with_finished_cache(case: impl Future<Output = ()>) {
    let probe = CacheProbe::default();
    FINISHED_CACHE.scope(probe.clone(), case).await;
    let stats = probe.stats();
    assert!(
        !stats.is_empty(),
        "the case built no engine: its cached variant would test nothing"
    );
    assert!(
        stats.iter().all(Option::is_some),
        "an engine of the cached variant has no cache of finished records"
    );
    let lookups: u64 = stats.iter().flatten().map(|s| s.hits + s.misses).sum();
    assert!(
        lookups > 0,
        "no engine of the case consulted its cache of finished records"
    );
}

/// The running `*_cached` variant's probe, if any, to carry into work the
/// case runs outside its task (see [`in_probe`]).
pub(crate) fn current_probe() -> Option<CacheProbe> {
    FINISHED_CACHE.try_with(Clone::clone).ok()
}

/// Runs `work` under `probe` (from [`current_probe`]), so that engines it
/// builds follow the case's variant.
pub(crate) async fn in_probe<T>(probe: Option<CacheProbe>, work: impl Future<Output = T>) -> T {
    match probe {
        Some(probe) => FINISHED_CACHE.scope(probe, work).await,
        None => work.await,
    }
}

// ---------------------------------------------------------------------------
// Shared helpers of the cases.
// ---------------------------------------------------------------------------

/// The time every case starts at (2027-01-15): not the wall clock, so a store
/// that compares with its own clock instead of the `now` it is given fails.
pub(crate) const T0: Timestamp = Timestamp::from_millis(1_800_000_000_000);

/// How many tasks race in the concurrency cases.
pub(crate) const RACERS: usize = 32;

/// `T0` plus `millis`.
pub(crate) fn at(millis: u64) -> Timestamp {
    Timestamp::from_millis(T0.as_millis() + millis)
}

/// Seconds as milliseconds, for [`at`].
pub(crate) const fn secs(s: u64) -> u64 {
    s * 1_000
}

/// The policy of the engine cases: a short lease and TTL, so the clock moves
/// a few seconds rather than a day. Every record still lives at least 10 s,
/// so a backend whose native expiry counts in wall-clock time keeps it for the
/// whole case.
pub(crate) fn policy() -> Policy {
    Policy::default()
        .with_lease(Duration::from_secs(10))
        .with_ttl(Duration::from_secs(60))
}

/// An engine over `store` with a fresh manual clock at [`T0`].
pub(crate) fn engine<S: Store>(store: S) -> (Engine<S, ManualClock>, ManualClock) {
    let clock = ManualClock::new(T0);
    (engine_on(store, &clock, policy()), clock)
}

/// An engine over `store` with `policy`, on `clock` (which engines over
/// two instances share).
///
/// In a `*_cached` variant ([`with_finished_cache`]) the engine keeps
/// finished records ([`CACHE_BYTES`]).
pub(crate) fn engine_on<S: Store>(
    store: S,
    clock: &ManualClock,
    policy: Policy,
) -> Engine<S, ManualClock> {
    let engine = Engine::with_clock(store, clock.clone())
        .with_policy(policy)
        .expect("valid policy");
    match current_probe() {
        Some(probe) => {
            let engine = engine.with_finished_cache(CACHE_BYTES);
            probe.register(&engine);
            engine
        }
        None => engine,
    }
}

/// The scope of the store cases.
pub(crate) fn scope() -> Scope {
    Scope::tenant("conformance").with_operation("cases")
}

/// A valid idempotency key.
pub(crate) fn ikey(name: &str) -> IdempotencyKey {
    IdempotencyKey::parse(name).expect("the cases use valid keys")
}

/// The record key of `name` in [`scope`].
pub(crate) fn key(name: &str) -> RecordKey {
    RecordKey::new(&scope(), &ikey(name))
}

/// Opens a fresh store (handed to the factory's teardown after the case),
/// failing the case if the backend went away since the probe.
pub(crate) async fn open<F: StoreFactory>(factory: &F) -> Arc<F::Store> {
    match crate::open_store(factory).await {
        Ok(store) => store,
        Err(why) => panic!("factory.open() failed after the probe succeeded: {why}"),
    }
}

/// Opens a fresh store and writes `rec` under the key `name`, at the
/// record's `created_at` (the first step of most store cases).
pub(crate) async fn open_with<F: StoreFactory>(
    factory: &F,
    name: &str,
    rec: &Versioned,
) -> (Arc<F::Store>, RecordKey) {
    let store = open(factory).await;
    let k = key(name);
    must(&store).insert(&k, rec, rec.record.created_at).await;
    (store, k)
}

/// Opens a second instance over `store`'s records (cases that require
/// [`Requires::SharedInstances`]).
pub(crate) async fn reopen<F: StoreFactory>(factory: &F, store: &F::Store) -> F::Store {
    match factory.reopen(store).await {
        Ok(Some(second)) => second,
        Ok(None) => panic!("factory.reopen() gave None after the probe said it gives Some"),
        Err(why) => panic!("factory.reopen() failed: {why}"),
    }
}

/// Unwraps a store result, naming the call that failed.
#[track_caller]
pub(crate) fn ok<T>(result: Result<T, StoreError>, call: &str) -> T {
    match result {
        Ok(value) => value,
        Err(e) => panic!("store.{call} failed: {e} ({e:?})"),
    }
}

/// The primitives of `store` with their results unwrapped: a store error
/// fails the case, naming the call.
pub(crate) fn must<S: Store + ?Sized>(store: &S) -> Must<'_, S> {
    Must(store)
}

/// See [`must`].
pub(crate) struct Must<'a, S: ?Sized>(&'a S);

impl<S: Store + ?Sized> Must<'_, S> {
    /// `insert_if_absent`.
    pub(crate) async fn insert(
        &self,
        k: &RecordKey,
        rec: &Versioned,
        now: Timestamp,
    ) -> InsertOutcome {
        ok(
            self.0.insert_if_absent(k, rec, now).await,
            "insert_if_absent",
        )
    }

    /// `get`.
    pub(crate) async fn get(&self, k: &RecordKey, now: Timestamp) -> Option<Versioned> {
        ok(self.0.get(k, now).await, "get")
    }

    /// `compare_and_swap`.
    pub(crate) async fn swap(
        &self,
        k: &RecordKey,
        from: &Versioned,
        to: &Versioned,
        now: Timestamp,
    ) -> SwapOutcome {
        ok(
            self.0.compare_and_swap(k, from, to, now).await,
            "compare_and_swap",
        )
    }

    /// `delete_if`.
    pub(crate) async fn delete(&self, k: &RecordKey, rev: &Versioned, now: Timestamp) -> bool {
        ok(self.0.delete_if(k, rev, now).await, "delete_if")
    }

    /// `purge_expired`.
    pub(crate) async fn purge(&self, now: Timestamp, limit: usize) -> u64 {
        ok(self.0.purge_expired(now, limit).await, "purge_expired")
    }
}

/// An in-flight claim under `token`, written at `now`, living `ttl_secs`.
/// `v` under another revision: what a caller holding a stale read passes
/// as `expected`.
pub(crate) fn stale(v: &Versioned, rev: u64) -> Versioned {
    Versioned {
        revision: Revision::from_u64(rev),
        record: v.record.clone(),
    }
}

pub(crate) fn claim(rev: u64, token: u128, now: Timestamp, ttl_secs: u64) -> Versioned {
    let ttl = Duration::from_secs(ttl_secs);
    Versioned {
        revision: Revision::from_u64(rev),
        record: Record::from_parts(
            Fingerprint::of(b"request"),
            State::InFlight {
                token: FencingToken::from_u128(token),
                lease_deadline: now.plus(ttl.min(Duration::from_secs(10))),
            },
            now,
            now,
            now.plus(ttl),
            1,
        ),
    }
}

/// A completed record with `outcome`, written at `now`, living `ttl_secs`.
pub(crate) fn completed(
    rev: u64,
    token: u128,
    now: Timestamp,
    ttl_secs: u64,
    outcome: &[u8],
) -> Versioned {
    let mut v = claim(rev, token, now, ttl_secs);
    v.record.state = State::Completed {
        token: FencingToken::from_u128(token),
        outcome: Outcome::new(outcome.to_vec()),
    };
    v
}

/// `len` deterministic pseudo-random bytes (xorshift), different per `seed`.
pub(crate) fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[3]
        })
        .collect()
}

/// Compares two byte strings, describing the first difference (not the bytes).
pub(crate) fn same_bytes(what: &str, got: &[u8], want: &[u8]) -> Result<(), String> {
    if got == want {
        return Ok(());
    }
    let first = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    Err(format!(
        "{what}: got {} bytes, want {} bytes; first difference at byte {first}",
        got.len(),
        want.len()
    ))
}

/// The longest a case polls for a condition another task makes true.
pub(crate) const POLL_DEADLINE: Duration = Duration::from_secs(10);

/// Polls `cond` (yielding between checks) until it holds or
/// [`POLL_DEADLINE`] passes; returns whether it held. Never sleeps.
pub(crate) async fn poll_until(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + POLL_DEADLINE;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::task::yield_now().await;
    }
}

/// Spawns `n` tasks running `task(i)`, releases them together with a
/// barrier, and returns their results in task order (the races of the
/// suite, and of the backends' own tests).
///
/// # Behavior
/// - No task starts its work before all `n` have been spawned and reached
///   the barrier, so they contend as much as the runtime allows.
/// - A task's panic is resumed in the caller, with its payload.
pub async fn race<T, Fut>(n: usize, task: impl Fn(usize) -> Fut + Send + Sync + 'static) -> Vec<T>
where
    T: Send + 'static,
    Fut: Future<Output = T> + Send + 'static,
{
    let barrier = Arc::new(tokio::sync::Barrier::new(n));
    let task = Arc::new(task);
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let barrier = barrier.clone();
            let task = task.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                task(i).await
            })
        })
        .collect();
    let mut results = Vec::with_capacity(n);
    for handle in handles {
        match handle.await {
            Ok(value) => results.push(value),
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryFactory;

    #[test]
    fn names_are_unique_and_module_qualified() {
        let names: Vec<String> = all::<MemoryFactory>()
            .iter()
            .map(|c| c.name().to_string())
            .collect();
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len(), "duplicate case names");
        for name in &names {
            let (module, case) = name.split_once("::").expect("module::case");
            assert!(
                [
                    "store",
                    "transactional",
                    "race",
                    "engine",
                    "model",
                    "race_cached",
                    "engine_cached",
                    "model_cached"
                ]
                .contains(&module),
                "{name}"
            );
            assert!(
                !case.is_empty()
                    && case
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{name}"
            );
        }
    }

    /// The cases that drive an engine, by name: each has a `*_cached::` twin.
    fn drives_an_engine(name: &str) -> bool {
        name.starts_with("engine::")
            || name.starts_with("model::")
            || matches!(
                name,
                "race::engine_32_tasks_run_once"
                    | "race::engine_two_instances_run_once"
                    | "race::takeover_32_tasks_one_wins"
                    | "race::zombie_complete_vs_takeover_one_wins"
                    | "race::completer_vs_client_retry_one_resume"
            )
    }

    /// No case that drives an engine is left out of the cached run, and
    /// each cached variant has its plain case, with the same requirement.
    #[test]
    fn every_case_driving_an_engine_runs_cached_too() {
        let cases = all::<MemoryFactory>();
        let find = |name: &str| cases.iter().find(|c| c.name() == name);
        let mut twins = 0;
        for case in &cases {
            let name = case.name();
            if let Some((module, rest)) = name.split_once("_cached::") {
                let plain = format!("{module}::{rest}");
                let plain = find(&plain).unwrap_or_else(|| panic!("{name} has no plain case"));
                assert!(drives_an_engine(plain.name()), "{name}");
                assert_eq!(plain.requires(), case.requires(), "{name}");
            } else if drives_an_engine(name) {
                let (module, rest) = name.split_once("::").expect("module::case");
                assert!(
                    find(&format!("{module}_cached::{rest}")).is_some(),
                    "{name} does not run with the cache of finished records"
                );
                twins += 1;
            }
        }
        assert!(twins >= 30, "{twins}");
    }

    #[test]
    fn noise_differs_by_seed_and_is_stable() {
        assert_eq!(noise(64, 1), noise(64, 1));
        assert_ne!(noise(64, 1), noise(64, 2));
        assert!(noise(4096, 3).iter().any(|b| *b > 200));
    }
}
