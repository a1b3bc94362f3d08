//! The engine's opt-in cache of finished records
//! (`Engine::with_finished_cache`): every rule of its `# Behavior`, over a
//! `MemoryStore` that counts the calls it gets, on a `ManualClock`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use idem_core::store::{
    Capabilities, InsertOutcome, Record, Store, StoreError, SwapOutcome, Versioned,
};
use idem_core::{
    Begin, CACHE_ENTRY_OVERHEAD, CacheStats, Clock, Delivery, Engine, Error, Executed, FailureKind,
    Fingerprint, Handled, IdempotencyKey, ManualClock, MemoryStore, Outcome, Policy, RecordKey,
    Replay, ReplayKind, Scope, Timestamp,
};

const T0: Timestamp = Timestamp::from_millis(1_700_000_000_000);
const LEASE: Duration = Duration::from_secs(10);
const TTL: Duration = Duration::from_secs(60);
const MIB: usize = 1 << 20;

/// A `MemoryStore` (shared by clones) that counts every call.
#[derive(Clone, Default)]
struct Counting {
    inner: MemoryStore,
    calls: Arc<AtomicUsize>,
}

impl Counting {
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
    fn count(&self) {
        self.calls.fetch_add(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl Store for Counting {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn insert_if_absent(
        &self,
        key: &RecordKey,
        record: &Versioned,
        now: Timestamp,
    ) -> Result<InsertOutcome, StoreError> {
        self.count();
        self.inner.insert_if_absent(key, record, now).await
    }
    async fn get(&self, key: &RecordKey, now: Timestamp) -> Result<Option<Versioned>, StoreError> {
        self.count();
        self.inner.get(key, now).await
    }
    async fn compare_and_swap(
        &self,
        key: &RecordKey,
        expected: &Versioned,
        record: &Versioned,
        now: Timestamp,
    ) -> Result<SwapOutcome, StoreError> {
        self.count();
        self.inner
            .compare_and_swap(key, expected, record, now)
            .await
    }
    async fn delete_if(
        &self,
        key: &RecordKey,
        expected: &Versioned,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        self.count();
        self.inner.delete_if(key, expected, now).await
    }
    async fn purge_expired(&self, now: Timestamp, limit: usize) -> Result<u64, StoreError> {
        self.count();
        self.inner.purge_expired(now, limit).await
    }
    async fn abandoned(&self, now: Timestamp, limit: usize) -> Result<Vec<Versioned>, StoreError> {
        self.count();
        self.inner.abandoned(now, limit).await
    }
}

type Eng = Engine<Counting, ManualClock>;

fn policy() -> Policy {
    Policy::default().with_lease(LEASE).with_ttl(TTL)
}

/// An engine over `store` on `clock`, without the cache.
fn plain(store: &Counting, clock: &ManualClock) -> Eng {
    Engine::with_clock(store.clone(), clock.clone())
        .with_policy(policy())
        .unwrap()
}

/// An engine over `store` on `clock`, with a 64 MiB cache.
fn cached(store: &Counting, clock: &ManualClock) -> Eng {
    plain(store, clock).with_finished_cache(64 * MIB)
}

fn setup() -> (Eng, Counting, ManualClock) {
    let (store, clock) = (Counting::default(), ManualClock::new(T0));
    (cached(&store, &clock), store, clock)
}

fn scope() -> Scope {
    Scope::tenant("acme").with_operation("pay")
}

fn key(s: &str) -> IdempotencyKey {
    IdempotencyKey::parse(s).unwrap()
}

fn rkey(s: &str) -> RecordKey {
    RecordKey::new(&scope(), &key(s))
}

fn fp(s: &str) -> Fingerprint {
    Fingerprint::of(s.as_bytes())
}

fn stats(engine: &Eng) -> CacheStats {
    engine.finished_cache().expect("the cache is on")
}

async fn begin(engine: &Eng, name: &str, f: &str) -> Begin {
    engine.begin(&scope(), &key(name), fp(f)).await.unwrap()
}

async fn proceed(engine: &Eng, name: &str) -> idem_core::Lease {
    match begin(engine, name, "a").await {
        Begin::Proceed(lease) => lease,
        other => panic!("`{name}` must proceed, got {other:?}"),
    }
}

#[track_caller]
fn replayed(answer: Begin) -> Replay {
    match answer {
        Begin::Replay(replay) => replay,
        other => panic!("expected a replay, got {other:?}"),
    }
}

/// Finishes `name` through `engine`: completed with `outcome`, or failed
/// with `kind`.
async fn finish(engine: &Eng, name: &str, kind: Option<FailureKind>, outcome: &[u8]) {
    let lease = proceed(engine, name).await;
    let outcome = Outcome::new(outcome.to_vec());
    match kind {
        None => engine.complete(&lease, outcome).await.unwrap(),
        Some(kind) => engine.fail(&lease, kind, outcome).await.unwrap(),
    }
}

#[tokio::test]
async fn off_by_default_and_zero_bytes_is_off() {
    let (store, clock) = (Counting::default(), ManualClock::new(T0));
    assert_eq!(plain(&store, &clock).finished_cache(), None);
    assert_eq!(
        plain(&store, &clock)
            .with_finished_cache(0)
            .finished_cache(),
        None
    );
    let engine = cached(&store, &clock);
    let s = stats(&engine);
    assert_eq!((s.hits, s.misses, s.entries, s.bytes), (0, 0, 0, 0));
    assert!(s.max_bytes <= 64 * MIB as u64 && s.max_bytes > 63 * MIB as u64);
    // Off: no lookups, every replay reads the store.
    let engine = plain(&store, &clock);
    finish(&engine, "k", None, b"ok").await;
    let before = store.calls();
    replayed(begin(&engine, "k", "a").await);
    assert_eq!(store.calls(), before + 1);
}

/// The engine's own completion fills the cache; a replay is then answered
/// without a store call, with the stored bytes shared, not copied.
#[tokio::test]
async fn a_replay_of_a_key_this_engine_completed_makes_no_store_call() {
    let (engine, store, _clock) = setup();
    let body: Vec<u8> = (0..=255).cycle().take(4096).collect();
    let lease = proceed(&engine, "k").await;
    let outcome = Outcome::new(body.clone());
    engine.complete(&lease, outcome.clone()).await.unwrap();
    assert_eq!(stats(&engine).entries, 1);
    let before = store.calls();
    for _ in 0..5 {
        let r = replayed(begin(&engine, "k", "a").await);
        assert_eq!(r.kind, ReplayKind::Completed);
        assert_eq!(r.outcome.as_bytes(), &body[..]);
        assert_eq!(
            r.outcome.as_bytes().as_ptr(),
            outcome.as_bytes().as_ptr(),
            "a hit shares the outcome's bytes"
        );
    }
    assert_eq!(store.calls(), before, "no store call on a hit");
    let s = stats(&engine);
    assert_eq!((s.hits, s.misses), (5, 1), "{s:?}");
    assert_eq!(
        s.bytes,
        (4096 + "acme".len() + "pay".len() + "k".len() + CACHE_ENTRY_OVERHEAD) as u64
    );
}

/// A finished record read from the store by `begin` (written by another
/// engine) is kept: the first replay reads the store, the next ones do not.
/// A mismatch read from the store fills it too.
#[tokio::test]
async fn begin_keeps_finished_records_it_reads_from_the_store() {
    let (store, clock) = (Counting::default(), ManualClock::new(T0));
    let writer = plain(&store, &clock);
    finish(&writer, "read", None, b"ok").await;
    finish(&writer, "mismatch", None, b"ok").await;
    let engine = cached(&store, &clock);
    let before = store.calls();
    replayed(begin(&engine, "read", "a").await);
    assert_eq!(store.calls(), before + 1);
    replayed(begin(&engine, "read", "a").await);
    assert_eq!(store.calls(), before + 1, "the second replay is a hit");
    assert!(matches!(
        begin(&engine, "mismatch", "other").await,
        Begin::Mismatch(_)
    ));
    assert_eq!(store.calls(), before + 2);
    replayed(begin(&engine, "mismatch", "a").await);
    assert_eq!(store.calls(), before + 2, "a mismatch read filled it");
    assert_eq!(stats(&engine).hits, 2);
}

/// Every final kind is kept and answered exactly as the store path answers
/// (same `decide`, fingerprint included); in-flight claims and retryable
/// failures are never kept.
#[tokio::test]
async fn hits_answer_exactly_what_the_store_path_answers() {
    let (engine, store, clock) = setup();
    let kinds = [
        ("completed", None, true),
        ("permanent", Some(FailureKind::Permanent), true),
        ("unknown", Some(FailureKind::Unknown), true),
        ("retryable", Some(FailureKind::Retryable), false),
    ];
    for (name, kind, _) in kinds {
        finish(&engine, name, kind, name.as_bytes()).await;
    }
    let _held = proceed(&engine, "in-flight").await;
    assert_eq!(stats(&engine).entries, 3, "only the final records");
    let reference = plain(&store, &clock);
    for (name, _, kept) in kinds {
        for f in ["b", "a"] {
            let from_store = format!("{:?}", begin(&reference, name, f).await);
            let before = store.calls();
            let answer = format!("{:?}", begin(&engine, name, f).await);
            // The retryable key was reclaimed by the reference engine above.
            if kept || f == "b" {
                assert_eq!(answer, from_store, "`{name}` with fingerprint {f}");
            }
            assert_eq!(
                store.calls() == before,
                kept,
                "`{name}` with fingerprint {f}: a hit makes no store call, a miss one"
            );
        }
    }
    let before = store.calls();
    assert!(matches!(
        begin(&engine, "in-flight", "a").await,
        Begin::InProgress { .. }
    ));
    assert!(
        store.calls() > before,
        "an in-flight key is asked every time"
    );
    assert_eq!(stats(&engine).entries, 3);
}

/// The key of an entry is the full record key: the same client key in
/// another scope (another tenant, principal or operation) never gets it.
#[tokio::test]
async fn entries_never_cross_scopes() {
    let (engine, _store, _clock) = setup();
    finish(&engine, "k", None, b"tenant acme").await;
    let others = [
        Scope::tenant("acme"),
        Scope::tenant("other").with_operation("pay"),
        Scope::tenant("acme")
            .with_principal("u")
            .with_operation("pay"),
        Scope::tenant("acme").with_operation("refund"),
    ];
    for other in &others {
        match engine.begin(other, &key("k"), fp("a")).await.unwrap() {
            Begin::Proceed(_) => {}
            answer => panic!("{other:?} must claim its own key, got {answer:?}"),
        }
    }
    let r = replayed(begin(&engine, "k", "a").await);
    assert_eq!(r.outcome.as_bytes(), b"tenant acme");
}

/// An entry lives until its record's `expires_at`, judged with the
/// engine's clock: then it is a miss, it is removed, and the key is claimed
/// afresh through the store.
#[tokio::test]
async fn an_entry_expires_with_its_record() {
    let (engine, store, clock) = setup();
    finish(&engine, "k", None, b"old").await;
    let expires_at = store
        .inner
        .get(&rkey("k"), clock.now())
        .await
        .unwrap()
        .unwrap()
        .record
        .expires_at;
    clock.set(Timestamp::from_millis(expires_at.as_millis() - 1));
    let before = store.calls();
    replayed(begin(&engine, "k", "a").await);
    assert_eq!(store.calls(), before, "live until its last millisecond");
    clock.set(expires_at);
    let hits = stats(&engine).hits;
    let lease = proceed(&engine, "k").await;
    assert_eq!(lease.attempt(), 1, "claimed afresh");
    let s = stats(&engine);
    assert_eq!((s.hits, s.entries), (hits, 0), "expired: a miss, removed");
    engine
        .complete(&lease, Outcome::new(&b"new"[..]))
        .await
        .unwrap();
    let r = replayed(begin(&engine, "k", "a").await);
    assert_eq!(r.outcome.as_bytes(), b"new");
}

/// A completion the caller applies in its own transaction
/// (`prepare_complete`) is not kept: it may roll back. The store read of the
/// next `begin` keeps it.
#[tokio::test]
async fn a_prepared_transition_is_not_kept() {
    let (engine, store, clock) = setup();
    let lease = proceed(&engine, "tx").await;
    let done = engine
        .prepare_complete(&lease, Outcome::new(&b"paid"[..]))
        .unwrap();
    assert_eq!(stats(&engine).entries, 0);
    // What a SQL store's `apply_in` does inside the caller's transaction.
    let applied = store
        .inner
        .compare_and_swap(&done.key, &lease.record(), &done.next, clock.now())
        .await
        .unwrap();
    assert!(matches!(applied, SwapOutcome::Swapped));
    assert_eq!(stats(&engine).entries, 0);
    let before = store.calls();
    replayed(begin(&engine, "tx", "a").await);
    replayed(begin(&engine, "tx", "a").await);
    assert_eq!(store.calls(), before + 1);
}

/// What the cache changes: a key deleted behind the engine's back (`idem
/// forget`) is still replayed from the cache until the entry is dropped;
/// `forget_cached` and `clear_finished_cache` drop it.
#[tokio::test]
async fn a_key_forgotten_behind_the_engines_back_replays_until_dropped() {
    let (engine, store, clock) = setup();
    finish(&engine, "k", None, b"ok").await;
    finish(&engine, "j", None, b"ok").await;
    for name in ["k", "j"] {
        let record = store.inner.get(&rkey(name), clock.now()).await.unwrap();
        assert!(
            store
                .inner
                .delete_if(&rkey(name), &record.unwrap(), clock.now())
                .await
                .unwrap()
        );
    }
    replayed(begin(&engine, "k", "a").await);
    let clone = engine.clone();
    replayed(begin(&clone, "j", "a").await);
    assert!(engine.forget_cached(&rkey("k")));
    assert!(!engine.forget_cached(&rkey("k")));
    proceed(&engine, "k").await;
    replayed(begin(&engine, "j", "a").await);
    clone.clear_finished_cache();
    assert_eq!(stats(&engine).entries, 0, "clones share the cache");
    proceed(&engine, "j").await;
    let s = stats(&engine);
    assert!(s.hits >= 3, "counters survive a clear: {s:?}");
}

/// A release through this engine drops the key's entry (here an entry left
/// by a key forgotten behind its back, then claimed by another engine).
#[tokio::test]
async fn a_release_through_the_engine_drops_the_entry() {
    let (engine, store, clock) = setup();
    finish(&engine, "k", None, b"ok").await;
    let record = store.inner.get(&rkey("k"), clock.now()).await.unwrap();
    store
        .inner
        .delete_if(&rkey("k"), &record.unwrap(), clock.now())
        .await
        .unwrap();
    let other = plain(&store, &clock);
    let lease = proceed(&other, "k").await;
    replayed(begin(&engine, "k", "a").await);
    engine.release(&lease).await.unwrap();
    assert_eq!(stats(&engine).entries, 0);
    proceed(&engine, "k").await;
}

/// Bounded by bytes: the entries never weigh more than `max_bytes`, and a
/// record heavier than a shard's share is not kept (and still replays,
/// from the store).
#[tokio::test]
async fn the_cache_is_bounded_by_bytes() {
    let (store, clock) = (Counting::default(), ManualClock::new(T0));
    let max = 64 * 1024;
    let engine = plain(&store, &clock).with_finished_cache(max);
    for i in 0..200 {
        finish(&engine, &format!("k{i}"), None, &[7_u8; 1000]).await;
        let s = stats(&engine);
        assert!(s.bytes <= max as u64, "{s:?}");
        assert!(s.max_bytes <= max as u64, "{s:?}");
    }
    let s = stats(&engine);
    assert!(
        s.entries > 10 && s.entries < 64,
        "about 64 KiB of 1.4 KiB entries: {s:?}"
    );
    let big = vec![1_u8; max];
    finish(&engine, "big", None, &big).await;
    let before = store.calls();
    let r = replayed(begin(&engine, "big", "a").await);
    assert_eq!(r.outcome.as_bytes(), &big[..]);
    assert_eq!(
        store.calls(),
        before + 1,
        "too heavy to keep: from the store"
    );
    // A tiny cache keeps nothing and still answers right.
    let tiny = plain(&store, &clock).with_finished_cache(10);
    replayed(begin(&tiny, "k1", "a").await);
    replayed(begin(&tiny, "k1", "a").await);
    assert_eq!(stats(&tiny).entries, 0);
}

/// `execute`, `try_execute` and `consume` answer from the cache as from the
/// store: replayed values, permanent errors, outcome unknown, dead letters.
#[tokio::test]
async fn execute_and_consume_replay_from_the_cache() {
    let (engine, store, _clock) = setup();
    let runs = AtomicUsize::new(0);
    let work = || async {
        runs.fetch_add(1, Ordering::SeqCst);
        String::from("ch_1")
    };
    let first = engine
        .execute(&scope(), &key("e"), fp("a"), work)
        .await
        .unwrap();
    assert_eq!(first, Executed::Fresh("ch_1".to_string()));
    let before = store.calls();
    for _ in 0..3 {
        let again = engine
            .execute(&scope(), &key("e"), fp("a"), work)
            .await
            .unwrap();
        assert_eq!(again, Executed::Replayed("ch_1".to_string()));
    }
    assert!(matches!(
        engine.execute(&scope(), &key("e"), fp("b"), work).await,
        Err(Error::FingerprintMismatch)
    ));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(store.calls(), before);

    let declined = engine
        .try_execute(
            &scope(),
            &key("t"),
            fp("a"),
            || async { Err::<u32, _>("declined".to_string()) },
            |_| idem_core::OnError::StorePermanent,
        )
        .await
        .unwrap();
    assert_eq!(declined, Executed::Fresh(Err("declined".to_string())));
    let before = store.calls();
    let again = engine
        .try_execute(
            &scope(),
            &key("t"),
            fp("a"),
            || async { Ok::<u32, String>(1) },
            |_| idem_core::OnError::StorePermanent,
        )
        .await
        .unwrap();
    assert_eq!(again, Executed::Replayed(Err("declined".to_string())));
    assert_eq!(store.calls(), before);

    finish(&engine, "u", Some(FailureKind::Unknown), b"").await;
    assert!(matches!(
        engine
            .execute(&scope(), &key("u"), fp("a"), || async { 1_u8 })
            .await,
        Err(Error::OutcomeUnknown)
    ));

    let handle = |_lease| async { Handled::Complete(Outcome::new(&b"credited"[..])) };
    let first = engine.consume(&scope(), "msg-1", fp("m"), handle).await;
    assert!(matches!(
        first,
        Delivery::Ack {
            replayed: false,
            ..
        }
    ));
    let before = store.calls();
    let again = engine.consume(&scope(), "msg-1", fp("m"), handle).await;
    match again {
        Delivery::Ack {
            replayed: true,
            outcome,
        } => assert_eq!(outcome.as_bytes(), b"credited"),
        other => panic!("a redelivery must be acknowledged as replayed, got {other:?}"),
    }
    let failed = engine
        .consume(&scope(), "msg-2", fp("m"), |_lease| async {
            Handled::Fail(Outcome::new(&b"bad"[..]))
        })
        .await;
    assert!(matches!(failed, Delivery::DeadLetter { .. }));
    let calls = store.calls();
    let again = engine.consume(&scope(), "msg-2", fp("m"), handle).await;
    assert_eq!(failed, again);
    assert_eq!(store.calls(), calls, "the dead letter came from the cache");
    assert!(before < calls);
}

/// After `shutdown` began, `begin` refuses before looking at the cache.
#[tokio::test]
async fn shutdown_refuses_before_the_cache() {
    let (engine, _store, _clock) = setup();
    finish(&engine, "k", None, b"ok").await;
    let report = engine.shutdown(Duration::ZERO).await;
    assert_eq!(report.running, 0);
    assert!(matches!(
        engine.begin(&scope(), &key("k"), fp("a")).await,
        Err(Error::ShuttingDown)
    ));
}

/// 32 tasks replay one key at once: every one gets the outcome, none reads
/// the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_replays_are_all_hits() {
    let (engine, store, _clock) = setup();
    finish(&engine, "k", None, b"ok").await;
    let engine = Arc::new(engine);
    let before = store.calls();
    let barrier = Arc::new(tokio::sync::Barrier::new(32));
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let (engine, barrier) = (engine.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                replayed(begin(&engine, "k", "a").await)
            })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().outcome.as_bytes(), b"ok");
    }
    assert_eq!(store.calls(), before);
    assert_eq!(stats(&engine).hits, 32);
}

/// A `Record` kept in the cache is exactly the one stored.
#[tokio::test]
async fn begin_key_uses_the_cache_too() {
    let (engine, store, clock) = setup();
    finish(&engine, "k", Some(FailureKind::Permanent), b"400").await;
    let stored: Record = store
        .inner
        .get(&rkey("k"), clock.now())
        .await
        .unwrap()
        .unwrap()
        .record;
    let before = store.calls();
    let r = replayed(engine.begin_key(rkey("k"), fp("a")).await.unwrap());
    assert_eq!(r.kind, ReplayKind::Failed);
    assert!(matches!(
        &stored.state,
        idem_core::store::State::Failed { outcome, .. } if *outcome == r.outcome
    ));
    assert!(matches!(
        engine.begin_key(rkey("k"), fp("b")).await.unwrap(),
        Begin::Mismatch(_)
    ));
    assert_eq!(store.calls(), before);
}
