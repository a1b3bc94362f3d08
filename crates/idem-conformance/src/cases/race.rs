//! Races: 32 tasks released together by a barrier on one key,
//! with exact counts of winners.
//!
//! Each case runs on a multi-threaded runtime, so the tasks really run in
//! parallel; a store whose primitive is not atomic (check, then write) lets
//! more than one task win.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use idem_core::{
    Begin, Clock, Error, Executed, Fingerprint, Inserted, Outcome, RecordKey, Revision, State,
    Store, Swapped, Versioned,
};

use super::{
    RACERS, T0, at, claim, engine, ikey, key, ok, open, policy, race, reopen, scope, secs,
};
use crate::StoreFactory;

/// Checks the results of racing `insert_if_absent`: exactly one `Inserted`,
/// every other task saw the winner's record, and the winner's record is stored.
fn one_insert_won(results: &[Inserted], candidates: &[Versioned], what: &str) -> Versioned {
    let winners: Vec<usize> = results
        .iter()
        .enumerate()
        .filter(|(_, r)| matches!(r, Inserted::Inserted))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        winners.len(),
        1,
        "{what}: exactly one of {} racing inserts must win, {} did (tasks {winners:?})",
        results.len(),
        winners.len()
    );
    let winner = &candidates[winners[0]];
    for (i, r) in results.iter().enumerate() {
        if let Inserted::Exists(seen) = r {
            assert_eq!(
                seen, winner,
                "{what}: loser {i} must see the winner's record (task {})",
                winners[0]
            );
        }
    }
    winner.clone()
}

/// 32 tasks insert different records on one absent key: exactly one inserts,
/// the 31 others get the winner's record back.
pub async fn insert_if_absent_32_tasks_one_wins<F: StoreFactory>(factory: Arc<F>) {
    let store = Arc::new(open(&*factory).await);
    let k = key("race-insert");
    let candidates: Vec<Versioned> = (0..RACERS)
        .map(|i| claim(i as u64 + 1, i as u128 + 1, T0, 60))
        .collect();
    let results = {
        let (store, k, candidates) = (store.clone(), k.clone(), candidates.clone());
        race(RACERS, move |i| {
            let (store, k, rec) = (store.clone(), k.clone(), candidates[i].clone());
            async move {
                ok(
                    store.insert_if_absent(&k, &rec, T0).await,
                    "insert_if_absent",
                )
            }
        })
        .await
    };
    let winner = one_insert_won(&results, &candidates, "insert on an absent key");
    assert_eq!(ok(store.get(&k, T0).await, "get"), Some(winner));
}

/// 32 tasks insert over one expired record: exactly one replaces it.
pub async fn insert_over_expired_32_tasks_one_wins<F: StoreFactory>(factory: Arc<F>) {
    let store = Arc::new(open(&*factory).await);
    let k = key("race-expired");
    ok(
        store
            .insert_if_absent(&k, &claim(1_000, 1_000, T0, 10), T0)
            .await,
        "insert_if_absent",
    );
    let now = at(secs(10));
    let candidates: Vec<Versioned> = (0..RACERS)
        .map(|i| claim(i as u64 + 1, i as u128 + 1, now, 60))
        .collect();
    let results = {
        let (store, k, candidates) = (store.clone(), k.clone(), candidates.clone());
        race(RACERS, move |i| {
            let (store, k, rec) = (store.clone(), k.clone(), candidates[i].clone());
            async move {
                ok(
                    store.insert_if_absent(&k, &rec, now).await,
                    "insert_if_absent",
                )
            }
        })
        .await
    };
    let winner = one_insert_won(&results, &candidates, "insert over an expired record");
    assert_eq!(ok(store.get(&k, now).await, "get"), Some(winner));
}

/// Runs `RACERS` CAS calls with one expected revision, half through `a` and
/// half through `b`, and checks exactly one swapped.
async fn cas_race<S: Store>(a: Arc<S>, b: Arc<S>, k: RecordKey, what: &str) {
    let base = claim(1_000, 1_000, T0, 60);
    ok(a.insert_if_absent(&k, &base, T0).await, "insert_if_absent");
    let candidates: Vec<Versioned> = (0..RACERS)
        .map(|i| claim(i as u64 + 1, i as u128 + 1, at(1), 60))
        .collect();
    let results = {
        let (k, candidates) = (k.clone(), candidates.clone());
        race(RACERS, move |i| {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            let (k, rec) = (k.clone(), candidates[i].clone());
            async move {
                ok(
                    store
                        .compare_and_swap(&k, Revision::from_u64(1_000), &rec, at(1))
                        .await,
                    "compare_and_swap",
                )
            }
        })
        .await
    };
    let winners: Vec<usize> = results
        .iter()
        .enumerate()
        .filter(|(_, r)| matches!(r, Swapped::Swapped))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        winners.len(),
        1,
        "{what}: exactly one of {RACERS} CAS calls on revision 1000 must swap, {} did (tasks {winners:?})",
        winners.len()
    );
    let winner = &candidates[winners[0]];
    for (i, r) in results.iter().enumerate() {
        if let Swapped::Conflict(seen) = r {
            assert_eq!(
                seen.as_ref(),
                Some(winner),
                "{what}: loser {i} must see the winner's record"
            );
        }
    }
}

/// 32 tasks CAS one revision to different records: exactly one swaps, the
/// others see the winner's record.
pub async fn cas_same_revision_32_tasks_one_wins<F: StoreFactory>(factory: Arc<F>) {
    let store = Arc::new(open(&*factory).await);
    cas_race(store.clone(), store, key("race-cas"), "CAS on one instance").await;
}

/// 32 tasks `delete_if` one revision: exactly one deletes.
pub async fn delete_if_32_tasks_one_wins<F: StoreFactory>(factory: Arc<F>) {
    let store = Arc::new(open(&*factory).await);
    let k = key("race-delete");
    let rec = claim(1_000, 1, T0, 60);
    ok(
        store.insert_if_absent(&k, &rec, T0).await,
        "insert_if_absent",
    );
    let results = {
        let (store, k) = (store.clone(), k.clone());
        race(RACERS, move |_| {
            let (store, k) = (store.clone(), k.clone());
            async move { ok(store.delete_if(&k, rec.revision, at(1)).await, "delete_if") }
        })
        .await
    };
    let deleted = results.iter().filter(|d| **d).count();
    assert_eq!(
        deleted, 1,
        "exactly one of {RACERS} delete_if calls must delete, {deleted} did"
    );
    assert_eq!(ok(store.get(&k, at(1)).await, "get"), None);
}

/// 32 tasks, half on each of two instances sharing records (two application
/// servers), insert on one key: exactly one wins.
pub async fn two_instances_insert_one_wins<F: StoreFactory>(factory: Arc<F>) {
    let a = Arc::new(open(&*factory).await);
    let b = Arc::new(reopen(&*factory, &a).await);
    let k = key("race-two-insert");
    let candidates: Vec<Versioned> = (0..RACERS)
        .map(|i| claim(i as u64 + 1, i as u128 + 1, T0, 60))
        .collect();
    let results = {
        let (a, b, k, candidates) = (a.clone(), b.clone(), k.clone(), candidates.clone());
        race(RACERS, move |i| {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            let (k, rec) = (k.clone(), candidates[i].clone());
            async move {
                ok(
                    store.insert_if_absent(&k, &rec, T0).await,
                    "insert_if_absent",
                )
            }
        })
        .await
    };
    let winner = one_insert_won(&results, &candidates, "insert through two instances");
    assert_eq!(ok(a.get(&k, T0).await, "get"), Some(winner.clone()));
    assert_eq!(
        ok(b.get(&k, T0).await, "get"),
        Some(winner),
        "both instances must see the same record"
    );
}

/// 32 tasks, half on each of two instances, CAS one revision: exactly one swaps.
pub async fn two_instances_cas_one_wins<F: StoreFactory>(factory: Arc<F>) {
    let a = Arc::new(open(&*factory).await);
    let b = Arc::new(reopen(&*factory, &a).await);
    cas_race(a, b, key("race-two-cas"), "CAS through two instances").await;
}

/// Races `RACERS` `execute` calls over the given engines (task i uses engine
/// i mod n) and checks the guarded closure ran exactly once.
async fn execute_race<S: Store>(
    engines: Vec<Arc<idem_core::Engine<S, idem_core::ManualClock>>>,
    what: &str,
) {
    let runs = Arc::new(AtomicUsize::new(0));
    let results = {
        let (engines, runs) = (engines.clone(), runs.clone());
        race(RACERS, move |i| {
            let engine = engines[i % engines.len()].clone();
            let runs = runs.clone();
            async move {
                engine
                    .execute(
                        &scope(),
                        &ikey("once"),
                        Fingerprint::of(b"pay 10"),
                        || async {
                            runs.fetch_add(1, Ordering::SeqCst);
                            // Stay in flight a little while the others arrive.
                            for _ in 0..8 {
                                tokio::task::yield_now().await;
                            }
                            String::from("charged")
                        },
                    )
                    .await
            }
        })
        .await
    };
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "{what}: the guarded closure must run exactly once"
    );
    let mut fresh = 0;
    for (i, r) in results.iter().enumerate() {
        match r {
            Ok(Executed::Fresh(v)) => {
                fresh += 1;
                assert_eq!(v, "charged");
            }
            Ok(Executed::Replayed(v)) => assert_eq!(v, "charged", "{what}: task {i} replay"),
            Err(Error::InProgress { .. }) => {}
            Err(e) => panic!("{what}: task {i} failed: {e} ({e:?})"),
        }
    }
    assert_eq!(fresh, 1, "{what}: exactly one call must be fresh");
    for engine in &engines {
        let again = engine
            .execute(
                &scope(),
                &ikey("once"),
                Fingerprint::of(b"pay 10"),
                || async { String::from("again") },
            )
            .await
            .expect("a retry after the race");
        assert_eq!(
            again,
            Executed::Replayed("charged".to_string()),
            "{what}: a retry after the race must replay"
        );
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// 32 concurrent `execute` calls with one key through one engine: the closure
/// runs once; every other call replays or is told it is in progress.
pub async fn engine_32_tasks_run_once<F: StoreFactory>(factory: Arc<F>) {
    let (engine, _clock) = engine(open(&*factory).await);
    execute_race(vec![Arc::new(engine)], "one engine").await;
}

/// Two engines over two instances sharing records (two application servers)
/// race 32 `execute` calls with one key: the closure runs once.
pub async fn engine_two_instances_run_once<F: StoreFactory>(factory: Arc<F>) {
    let a = Arc::new(open(&*factory).await);
    let b = Arc::new(reopen(&*factory, &a).await);
    let clock = idem_core::ManualClock::new(T0);
    let engines = vec![
        Arc::new(
            idem_core::Engine::with_clock(a, clock.clone())
                .with_policy(policy())
                .expect("valid policy"),
        ),
        Arc::new(
            idem_core::Engine::with_clock(b, clock)
                .with_policy(policy())
                .expect("valid policy"),
        ),
    ];
    execute_race(engines, "two instances").await;
}

/// After the holder's lease lapsed, 32 retries race to take over: exactly
/// one gets a new lease (a new token, attempt 2), the others see it in
/// progress, and the old holder is fenced.
pub async fn takeover_32_tasks_one_wins<F: StoreFactory>(factory: Arc<F>) {
    let (engine, clock) = engine(open(&*factory).await);
    let engine = Arc::new(engine);
    let fp = Fingerprint::of(b"request");
    let Begin::Proceed(old) = engine
        .begin(&scope(), &ikey("takeover"), fp)
        .await
        .expect("begin")
    else {
        panic!("the first begin must proceed")
    };
    clock.advance(policy().lease);
    let results = {
        let engine = engine.clone();
        race(RACERS, move |_| {
            let engine = engine.clone();
            async move { engine.begin(&scope(), &ikey("takeover"), fp).await }
        })
        .await
    };
    let mut leases = Vec::new();
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Ok(Begin::Proceed(lease)) => leases.push(lease),
            Ok(Begin::InProgress { .. }) => {}
            other => {
                panic!("task {i}: a racing retry must proceed or be in progress, got {other:?}")
            }
        }
    }
    assert_eq!(
        leases.len(),
        1,
        "exactly one of {RACERS} retries may take over a lapsed lease, {} did",
        leases.len()
    );
    let new = &leases[0];
    assert_ne!(new.token(), old.token(), "a takeover issues a new token");
    assert_eq!(new.attempt(), 2, "a takeover is the second attempt");
    let lost = engine.complete(&old, Outcome::new(&b"zombie"[..])).await;
    assert!(
        matches!(lost, Err(Error::LeaseLost(_))),
        "the old holder must be fenced, got {lost:?}"
    );
}

enum Racer {
    Zombie(Result<(), Error>),
    Retry(Result<Begin, Error>),
}

/// On 32 keys at once, a zombie (lease lapsed) completes while a retry takes
/// over: on every key exactly one wins. Either the zombie's completion stuck
/// and the retry replays it, or the retry holds a new lease and the zombie
/// was fenced; never both, never neither.
pub async fn zombie_complete_vs_takeover_one_wins<F: StoreFactory>(factory: Arc<F>) {
    let (engine, clock) = engine(open(&*factory).await);
    let engine = Arc::new(engine);
    let fp = Fingerprint::of(b"request");
    let keys: Vec<String> = (0..RACERS).map(|i| format!("zombie-{i}")).collect();
    let mut zombies = Vec::new();
    for k in &keys {
        let Begin::Proceed(lease) = engine.begin(&scope(), &ikey(k), fp).await.expect("begin")
        else {
            panic!("the first begin must proceed")
        };
        zombies.push(lease);
    }
    clock.advance(policy().lease);
    let results = {
        let (engine, keys, zombies) = (engine.clone(), keys.clone(), zombies.clone());
        race(2 * RACERS, move |i| {
            let engine = engine.clone();
            let (k, zombie) = (keys[i / 2].clone(), zombies[i / 2].clone());
            async move {
                if i % 2 == 0 {
                    Racer::Zombie(
                        engine
                            .complete(&zombie, Outcome::new(k.clone().into_bytes()))
                            .await,
                    )
                } else {
                    Racer::Retry(engine.begin(&scope(), &ikey(&k), fp).await)
                }
            }
        })
        .await
    };
    for (pair, k) in results.chunks(2).zip(&keys) {
        let stored = engine
            .store()
            .get(&RecordKey::new(&scope(), &ikey(k)), clock.now())
            .await
            .expect("get")
            .expect("the key exists");
        match pair {
            [
                Racer::Zombie(Ok(())),
                Racer::Retry(Ok(Begin::Replay(replay))),
            ] => {
                assert_eq!(replay.outcome.as_bytes(), k.as_bytes(), "{k}: replay");
                assert!(matches!(stored.record.state, State::Completed { .. }));
            }
            [
                Racer::Zombie(Err(Error::LeaseLost(_))),
                Racer::Retry(Ok(Begin::Proceed(lease))),
            ] => {
                assert!(
                    matches!(stored.record.state, State::InFlight { token, .. } if token == lease.token()),
                    "{k}: the new holder's claim must be stored, not the zombie's outcome"
                );
            }
            [Racer::Zombie(z), Racer::Retry(r)] => {
                panic!(
                    "{k}: exactly one of the zombie and the retry must win; zombie got {z:?}, retry got {r:?}"
                )
            }
            _ => unreachable!("results come in pairs"),
        }
    }
}
