//! The opt-in cache of finished records: [`Engine::with_finished_cache`]
//! ([`CacheStats`]).
//!
//! A finished record (completed, or failed for good) never changes until it
//! expires, so an engine can keep the ones it has seen and answer a replay
//! without a store round trip. The entries live in a sharded, byte-bounded
//! [`quick_cache`] table keyed by the full [`RecordKey`] (scope and key);
//! nothing here reads a clock or runs in the background: expiry is judged
//! with the engine's clock on every lookup.

use std::cell::Cell;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use quick_cache::sync::Cache;
use quick_cache::{Equivalent, OptionsBuilder, Weighter};

use crate::engine::Engine;
use crate::store::{Record, State, Store};
use crate::{Clock, FailureKind, IdempotencyKey, RecordKey, Scope, Timestamp};

/// The fixed weight of one cache entry, in bytes, on top of its outcome and
/// the text of its key: the record's fixed fields, the key's digest, the
/// allocations' headers and the table's bookkeeping. See
/// [`Engine::with_finished_cache`].
pub const CACHE_ENTRY_OVERHEAD: usize = 576;

/// The most shards the table is split into (fewer for a small cache): each
/// is locked on its own, so concurrent lookups of different keys rarely meet.
const SHARDS: usize = 16;

/// The outcome size the table is sized for up front (it grows as needed).
const TYPICAL_OUTCOME: usize = 1024;

/// What an engine's finished-record cache holds and has done; see
/// [`Engine::finished_cache`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStats {
    /// Lookups answered from the cache (a replay or a mismatch, with no
    /// store call).
    pub hits: u64,
    /// Lookups that found no live entry (absent, or expired and removed):
    /// `begin` went to the store.
    pub misses: u64,
    /// Entries held now.
    pub entries: usize,
    /// Their weight in bytes (each: outcome + key text +
    /// [`CACHE_ENTRY_OVERHEAD`]).
    pub bytes: u64,
    /// The most the entries may weigh, in bytes (at most the `max_bytes`
    /// given to [`Engine::with_finished_cache`]).
    pub max_bytes: u64,
}

impl<S: Store, C: Clock> Engine<S, C> {
    /// The same engine keeping the finished records it sees, up to
    /// `max_bytes`, to answer replays without a store round trip. Off by
    /// default; `max_bytes == 0` turns it off. Clones of the returned engine
    /// share the cache; calling this again starts an empty one.
    ///
    /// # Behavior
    /// - **What is kept**: only finished records that are never claimed
    ///   again: completed, failed permanently, and failed with the outcome
    ///   unknown. Never a record in flight, never a retryable failure.
    /// - **When**: when [`begin`](Self::begin) reads such a record from the
    ///   store (to replay it, or to refuse a mismatch), and when this engine
    ///   writes one ([`complete`](Self::complete), [`fail`](Self::fail),
    ///   [`settle`](Self::settle), and so [`execute`](Self::execute),
    ///   [`consume`](Self::consume), the heartbeat's hold limit and
    ///   [`shutdown`](Self::shutdown)); nowhere else. A completion the caller
    ///   applies in its own transaction ([`prepare_complete`](Self::prepare_complete))
    ///   is not kept: it may roll back.
    /// - **Lookup**: `begin` looks up the full [`RecordKey`] (scope and key,
    ///   never the raw key, so no answer crosses scopes or tenants) before
    ///   any store call. A live entry is answered through the same pure
    ///   [`decide`](crate::machine::decide) as a record read from the store,
    ///   fingerprint included: the same request gets [`Begin::Replay`](crate::Begin::Replay)
    ///   with the stored bytes (shared, not copied), another request
    ///   [`Begin::Mismatch`](crate::Begin::Mismatch), exactly as from the store.
    /// - **Expiry**: an entry lives no longer than its record's `expires_at`,
    ///   judged with the engine's clock on every lookup: an expired entry is
    ///   a miss and is removed, and `begin` goes to the store.
    /// - **Size**: each entry weighs its outcome's length, plus the length of
    ///   its key and scope text, plus [`CACHE_ENTRY_OVERHEAD`]; the entries
    ///   never weigh more than `max_bytes` in all. When full, the least
    ///   useful entries are dropped (S3-FIFO-like, scan resistant). The table
    ///   is split into up to 16 shards, each holding its share of
    ///   `max_bytes`: an entry heavier than its shard's share is not kept.
    /// - **Eviction**: whatever removes or replaces a record through this
    ///   engine drops its entry: [`release`](Self::release), a claim over an
    ///   expired record, a takeover. [`forget_cached`](Self::forget_cached)
    ///   drops one key, [`clear_finished_cache`](Self::clear_finished_cache)
    ///   all of them.
    /// - **What it changes**: the store is no longer asked about a finished
    ///   key this engine has seen. A record deleted behind the engine's back
    ///   (`idem forget`, another process, a store purged early or restored
    ///   from a backup) may still be replayed from the cache of every process
    ///   that kept it, until the entry expires (at most the record's own
    ///   TTL) or is dropped. If keys are forgotten by hand, either leave the
    ///   cache off, or clear it in every process that may hold the key
    ///   ([`clear_finished_cache`](Self::clear_finished_cache) or
    ///   [`forget_cached`](Self::forget_cached), or a restart). Expiry, purges of
    ///   expired records and every write through an engine keep the cache
    ///   exact: a finished record is only ever replaced once it expired,
    ///   which every lookup checks.
    /// - Pure like the rest of the engine: no I/O, no clock of its own, no
    ///   background task.
    ///
    /// ```
    /// # use idem_core::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Error> {
    /// let engine = Engine::new(MemoryStore::new()).with_finished_cache(64 << 20);
    /// let scope = Scope::tenant("acme");
    /// let key = IdempotencyKey::parse("order-17")?;
    /// let request = Fingerprint::of(b"{\"qty\":1}");
    /// for _ in 0..3 {
    ///     engine.execute(&scope, &key, request, || async { 17_u32 }).await?;
    /// }
    /// let stats = engine.finished_cache().expect("the cache is on");
    /// // The completion filled it; both retries were answered from it.
    /// assert_eq!((stats.hits, stats.entries), (2, 1));
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn with_finished_cache(mut self, max_bytes: usize) -> Self {
        self.finished = (max_bytes > 0).then(|| Arc::new(FinishedCache::new(max_bytes)));
        self
    }

    /// What the finished-record cache holds and has done, or `None` if it is
    /// off; see [`with_finished_cache`](Self::with_finished_cache).
    pub fn finished_cache(&self) -> Option<CacheStats> {
        self.finished.as_deref().map(FinishedCache::stats)
    }

    /// Drops every entry of the finished-record cache (shared by this
    /// engine's clones); the counters are kept. Nothing if it is off.
    ///
    /// # Behavior
    /// After it returns, `begin` asks the store about every key again (and
    /// keeps what it finds finished, as before). Call it in every process
    /// after deleting keys by hand (`idem forget`) if the cache is on.
    pub fn clear_finished_cache(&self) {
        if let Some(cache) = &self.finished {
            cache.clear();
        }
    }

    /// Drops `key`'s entry from the finished-record cache, if any; returns
    /// whether there was one.
    ///
    /// # Behavior
    /// The next `begin` on `key` asks the store. Use it where the
    /// application deletes a key through its own store handle.
    pub fn forget_cached(&self, key: &RecordKey) -> bool {
        self.finished
            .as_deref()
            .is_some_and(|cache| cache.evict(key))
    }
}

/// Whether a record may be kept: finished and never claimed again.
pub(super) fn is_final(record: &Record) -> bool {
    match &record.state {
        State::InFlight { .. } => false,
        State::Failed {
            kind: FailureKind::Retryable,
            ..
        } => false,
        State::Completed { .. } | State::Failed { .. } => true,
    }
}

/// The cache shared by an engine and its clones.
pub(crate) struct FinishedCache {
    entries: Cache<Owned, Record, Weigh>,
    max_bytes: u64,
    hits: Striped,
    misses: Striped,
}

impl FinishedCache {
    fn new(max_bytes: usize) -> Self {
        // A multiple of the shard count, so that the shards' shares add up
        // to exactly this (quick_cache halves the count for small caches,
        // which keeps it a divisor).
        let max_bytes = max_bytes - max_bytes % SHARDS;
        let estimated = (max_bytes / (CACHE_ENTRY_OVERHEAD + TYPICAL_OUTCOME)).max(1);
        let weight = u64::try_from(max_bytes).unwrap_or(u64::MAX);
        let mut options = OptionsBuilder::new();
        options
            .shards(SHARDS)
            .estimated_items_capacity(estimated)
            .weight_capacity(weight);
        let entries = match options.build() {
            Ok(options) => Cache::with_options(
                options,
                Weigh,
                quick_cache::DefaultHashBuilder::default(),
                quick_cache::sync::DefaultLifecycle::default(),
            ),
            // Both capacities are set above; keep a working cache anyway.
            Err(_) => Cache::with_weighter(estimated, weight, Weigh),
        };
        Self {
            entries,
            max_bytes: weight,
            hits: Striped::default(),
            misses: Striped::default(),
        }
    }

    /// The live entry of (`scope`, `key`) at `now`, counted as a hit; an
    /// expired one is removed. `None` (a miss): ask the store.
    pub(super) fn lookup(
        &self,
        scope: &Scope,
        key: &IdempotencyKey,
        now: Timestamp,
    ) -> Option<Record> {
        let probe = Probe { scope, key };
        match self.entries.get(&probe) {
            Some(record) if !record.is_expired(now) => {
                self.hits.add();
                Some(record)
            }
            Some(_) => {
                // Only if it is still expired: a fresh fill may have replaced it.
                self.entries.remove_if(&probe, |r| r.is_expired(now));
                self.misses.add();
                None
            }
            None => {
                self.misses.add();
                None
            }
        }
    }

    /// Keeps `record` for `key` if it is final ([`is_final`]); anything else
    /// is left alone.
    pub(super) fn fill(&self, key: &RecordKey, record: &Record) {
        if is_final(record) {
            self.entries.insert(Owned(key.clone()), record.clone());
        }
    }

    /// Drops `key`'s entry; whether there was one.
    pub(super) fn evict(&self, key: &RecordKey) -> bool {
        self.entries
            .remove(&Probe {
                scope: key.scope(),
                key: key.key(),
            })
            .is_some()
    }

    fn clear(&self) {
        self.entries.clear();
    }

    fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.sum(),
            misses: self.misses.sum(),
            entries: self.entries.len(),
            bytes: self.entries.weight(),
            max_bytes: self.max_bytes,
        }
    }
}

impl fmt::Debug for FinishedCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("FinishedCache").field(&self.stats()).finish()
    }
}

/// The weight of an entry: see [`CACHE_ENTRY_OVERHEAD`].
fn weight(key: &RecordKey, record: &Record) -> u64 {
    let outcome = match &record.state {
        State::Completed { outcome, .. } | State::Failed { outcome, .. } => outcome.len(),
        State::InFlight { .. } => 0,
    };
    let scope = key.scope();
    let text = scope.tenant_id().len()
        + scope.principal().map_or(0, str::len)
        + scope.operation().map_or(0, str::len)
        + key.key().as_str().len();
    u64::try_from(
        outcome
            .saturating_add(text)
            .saturating_add(CACHE_ENTRY_OVERHEAD),
    )
    .unwrap_or(u64::MAX)
}

#[derive(Clone)]
struct Weigh;

impl Weighter<Owned, Record> for Weigh {
    fn weight(&self, key: &Owned, record: &Record) -> u64 {
        weight(&key.0, record)
    }
}

/// An entry's key: the full record key, compared whole.
#[derive(Clone, PartialEq, Eq)]
struct Owned(RecordKey);

impl Hash for Owned {
    fn hash<H: Hasher>(&self, state: &mut H) {
        hash_parts(self.0.scope(), self.0.key(), state);
    }
}

/// A lookup by the parts of a record key, borrowed: no key is built (nor
/// hashed with blake3) to answer from the cache.
struct Probe<'a> {
    scope: &'a Scope,
    key: &'a IdempotencyKey,
}

impl Hash for Probe<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        hash_parts(self.scope, self.key, state);
    }
}

impl Equivalent<Owned> for Probe<'_> {
    fn equivalent(&self, owned: &Owned) -> bool {
        owned.0.key() == self.key && owned.0.scope() == self.scope
    }
}

/// The same hash for an [`Owned`] key and a [`Probe`] of its parts.
fn hash_parts<H: Hasher>(scope: &Scope, key: &IdempotencyKey, state: &mut H) {
    key.as_str().hash(state);
    scope.tenant_id().hash(state);
    scope.principal().hash(state);
    scope.operation().hash(state);
}

/// A counter spread over cache lines, one per thread (modulo): counting a
/// hit never contends with another thread's.
#[derive(Default)]
struct Striped([Padded; STRIPES]);

const STRIPES: usize = 16;

#[derive(Default)]
#[repr(align(128))]
struct Padded(AtomicU64);

impl Striped {
    fn add(&self) {
        self.0[stripe()].0.fetch_add(1, Ordering::Relaxed);
    }
    fn sum(&self) -> u64 {
        self.0
            .iter()
            .map(|p| p.0.load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }
}

/// This thread's stripe, handed out round robin.
fn stripe() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    STRIPE.with(|s| {
        if s.get() == usize::MAX {
            s.set(NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES);
        }
        s.get()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Fingerprint, Outcome};
    use std::hash::BuildHasher;
    use std::time::Duration;

    #[test]
    fn the_overhead_covers_the_fixed_fields() {
        assert!(
            std::mem::size_of::<RecordKey>() + std::mem::size_of::<Record>() + 128
                <= CACHE_ENTRY_OVERHEAD
        );
    }

    #[test]
    fn an_owned_key_and_a_probe_of_its_parts_hash_and_compare_alike() {
        let scope = Scope::tenant("t").with_principal("p").with_operation("o");
        let key = IdempotencyKey::parse("k").unwrap();
        let owned = Owned(RecordKey::new(&scope, &key));
        let probe = Probe {
            scope: &scope,
            key: &key,
        };
        let hasher = quick_cache::DefaultHashBuilder::default();
        assert_eq!(hasher.hash_one(&owned), hasher.hash_one(&probe));
        assert!(probe.equivalent(&owned));
        let other = Scope::tenant("t").with_principal("p");
        assert!(
            !Probe {
                scope: &other,
                key: &key
            }
            .equivalent(&owned)
        );
    }

    #[test]
    fn weights_count_the_outcome_the_key_text_and_the_overhead() {
        let key = RecordKey::new(&Scope::tenant("ab"), &IdempotencyKey::parse("xyz").unwrap());
        let policy = crate::Policy::default();
        let now = Timestamp::from_millis(1_000);
        let claim = Record::new_claim(
            Fingerprint::of(b"r"),
            crate::store::FencingToken::from_u128(1),
            now,
            &policy,
        );
        let done = claim
            .complete(
                crate::store::FencingToken::from_u128(1),
                Outcome::new(vec![0_u8; 1000]),
                now.plus(Duration::from_secs(1)),
                &policy,
            )
            .unwrap();
        assert_eq!(
            weight(&key, &done),
            (1000 + 5 + CACHE_ENTRY_OVERHEAD) as u64
        );
        assert!(!is_final(&claim) && is_final(&done));
    }

    #[test]
    fn striped_counters_add_up() {
        let counter = Arc::new(Striped::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let counter = counter.clone();
                std::thread::spawn(move || (0..1000).for_each(|_| counter.add()))
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(counter.sum(), 4000);
    }
}
