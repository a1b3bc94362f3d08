//! Races: 32 tasks released together by a barrier on one key,
//! with exact counts of winners.
//!
//! Each case runs on a multi-threaded runtime, so the tasks really run in
//! parallel; a store whose primitive is not atomic (check, then write) lets
//! more than one task win.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use idem_core::store::{InsertOutcome, State, Store, SwapOutcome, Versioned};
use idem_core::{Begin, Clock, Error, Executed, Fingerprint, Outcome, RecordKey, Timestamp};

use super::{
    RACERS, T0, at, claim, engine, engine_on, ikey, key, must, open, open_with, policy, race,
    reopen, scope, secs,
};
use crate::StoreFactory;

/// The one task whose result `won`: fails the case unless exactly one of
/// the racing `calls` did.
fn one_winner<R>(results: &[R], won: impl Fn(&R) -> bool, calls: &str, what: &str) -> usize {
    let winners: Vec<usize> = (0..results.len()).filter(|i| won(&results[*i])).collect();
    assert_eq!(
        winners.len(),
        1,
        "{what}: exactly one of {} racing {calls} must win, {} did (tasks {winners:?})",
        results.len(),
        winners.len()
    );
    winners[0]
}

/// `RACERS` different records, the i-th from task i, written at `now`.
fn candidates(now: Timestamp) -> Vec<Versioned> {
    (0..RACERS)
        .map(|i| claim(i as u64 + 1, i as u128 + 1, now, 60))
        .collect()
}

/// Races `RACERS` calls of `call` on one key, task i with candidate i, half
/// through `a` and half through `b` (the same instance twice, or two).
async fn race_on<S: Store, T: Send + 'static, Fut>(
    (a, b): (Arc<S>, Arc<S>),
    k: &RecordKey,
    candidates: &[Versioned],
    call: impl Fn(Arc<S>, RecordKey, Versioned) -> Fut + Send + Sync + 'static,
) -> Vec<T>
where
    Fut: Future<Output = T> + Send + 'static,
{
    let (k, candidates) = (k.clone(), candidates.to_vec());
    race(RACERS, move |i| {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        call(store, k.clone(), candidates[i].clone())
    })
    .await
}

/// Races `RACERS` inserts of different records on `k` at `now`: exactly one
/// inserts, every other task gets the winner's record back, which is
/// stored (read through each instance).
async fn insert_race<S: Store>(stores: (Arc<S>, Arc<S>), k: RecordKey, now: Timestamp, what: &str) {
    let candidates = candidates(now);
    let results = race_on(
        stores.clone(),
        &k,
        &candidates,
        move |store, k, rec| async move { must(&store).insert(&k, &rec, now).await },
    )
    .await;
    let i = one_winner(
        &results,
        |r| matches!(r, InsertOutcome::Inserted),
        "inserts",
        what,
    );
    let winner = &candidates[i];
    for (j, r) in results.iter().enumerate() {
        if let InsertOutcome::Exists(seen) = r {
            assert_eq!(
                seen, winner,
                "{what}: loser {j} must see the winner's record (task {i})"
            );
        }
    }
    for store in [stores.0, stores.1] {
        assert_eq!(
            must(&store).get(&k, now).await.as_ref(),
            Some(winner),
            "{what}: every instance must see the winner's record"
        );
    }
}

/// 32 tasks insert different records on one absent key: exactly one inserts,
/// the 31 others get the winner's record back.
pub async fn insert_if_absent_32_tasks_one_wins<F: StoreFactory>(factory: Arc<F>) {
    let store = open(&*factory).await;
    let what = "insert on an absent key";
    insert_race((store.clone(), store), key("race-insert"), T0, what).await;
}

/// 32 tasks insert over one expired record: exactly one replaces it.
pub async fn insert_over_expired_32_tasks_one_wins<F: StoreFactory>(factory: Arc<F>) {
    let (store, k) = open_with(&*factory, "race-expired", &claim(1_000, 1_000, T0, 10)).await;
    let what = "insert over an expired record";
    insert_race((store.clone(), store), k, at(secs(10)), what).await;
}

/// Runs `RACERS` CAS calls with one expected revision, half through `a` and
/// half through `b`, and checks exactly one swapped.
async fn cas_race<S: Store>(a: Arc<S>, b: Arc<S>, k: RecordKey, what: &str) {
    must(&a).insert(&k, &claim(1_000, 1_000, T0, 60), T0).await;
    let candidates = candidates(at(1));
    let results = race_on((a, b), &k, &candidates, |store, k, rec| async move {
        let from = claim(1_000, 1_000, T0, 60);
        must(&store).swap(&k, &from, &rec, at(1)).await
    })
    .await;
    let calls = "CAS calls on revision 1000";
    let winner =
        &candidates[one_winner(&results, |r| matches!(r, SwapOutcome::Swapped), calls, what)];
    for (i, r) in results.iter().enumerate() {
        if let SwapOutcome::Conflict(seen) = r {
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
    let store = open(&*factory).await;
    cas_race(store.clone(), store, key("race-cas"), "CAS on one instance").await;
}

/// 32 tasks `delete_if` one revision: exactly one deletes.
pub async fn delete_if_32_tasks_one_wins<F: StoreFactory>(factory: Arc<F>) {
    let rec = claim(1_000, 1, T0, 60);
    let (store, k) = open_with(&*factory, "race-delete", &rec).await;
    let same = vec![rec; RACERS];
    let results = race_on(
        (store.clone(), store.clone()),
        &k,
        &same,
        |store, k, rec| async move { must(&store).delete(&k, &rec, at(1)).await },
    )
    .await;
    let deleted = results.iter().filter(|d| **d).count();
    assert_eq!(
        deleted, 1,
        "exactly one of {RACERS} delete_if calls must delete, {deleted} did"
    );
    assert_eq!(must(&store).get(&k, at(1)).await, None);
}

/// 32 tasks, half on each of two instances sharing records (two application
/// servers), insert on one key: exactly one wins.
pub async fn two_instances_insert_one_wins<F: StoreFactory>(factory: Arc<F>) {
    let a = open(&*factory).await;
    let b = Arc::new(reopen(&*factory, &a).await);
    let what = "insert through two instances";
    insert_race((a, b), key("race-two-insert"), T0, what).await;
}

/// 32 tasks, half on each of two instances, CAS one revision: exactly one swaps.
pub async fn two_instances_cas_one_wins<F: StoreFactory>(factory: Arc<F>) {
    let a = open(&*factory).await;
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
    let a = open(&*factory).await;
    let b = Arc::new(reopen(&*factory, &a).await);
    let clock = idem_core::ManualClock::new(T0);
    let engines = vec![
        Arc::new(engine_on(a, &clock, policy())),
        Arc::new(engine_on(b, &clock, policy())),
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

/// What one racer of [`completer_vs_client_retry_one_resume`] did.
#[derive(Debug)]
enum Resumer {
    /// A completer's pass.
    Completer(idem_core::Pass),
    /// A client's retry: whether it resumed the key itself.
    Client(Result<bool, Error>),
}

/// Eight abandoned keys (lease lapsed after the charge was recorded); two
/// completers (on two engines) and one client retry per key are released
/// together: every key is resumed exactly once (its remaining phase's work
/// runs once) by whoever claimed it first, every key ends completed, and
/// every retry replays that outcome.
pub async fn completer_vs_client_retry_one_resume<F: StoreFactory>(factory: Arc<F>) {
    use super::engine::checkpoint::Shop;
    use super::engine::completer::{abandon, completer, resume};

    const KEYS: usize = RACERS / 4;
    let store = open(&*factory).await;
    let clock = idem_core::ManualClock::new(T0);
    let client = Arc::new(engine_on(store.clone(), &clock, policy()));
    let shop = Arc::new(Shop::default());
    let names: Vec<String> = (0..KEYS).map(|i| format!("contended-order-{i}")).collect();
    for name in &names {
        abandon(&client, &shop, key(name)).await;
    }
    clock.advance(policy().lease);
    let completers = Arc::new([
        completer(&engine_on(store.clone(), &clock, policy()), &shop).with_concurrency(KEYS),
        completer(&engine_on(store.clone(), &clock, policy()), &shop).with_concurrency(KEYS),
    ]);
    let fp = super::engine::fp("a");
    let results = {
        let (client, shop, names, completers) = (
            client.clone(),
            shop.clone(),
            names.clone(),
            completers.clone(),
        );
        race(KEYS + 2, move |i| {
            let (client, shop, names, completers) = (
                client.clone(),
                shop.clone(),
                names.clone(),
                completers.clone(),
            );
            async move {
                if i < 2 {
                    return Resumer::Completer(completers[i].run_once().await.expect("a pass"));
                }
                let k = &names[i - 2];
                Resumer::Client(match client.begin(&scope(), &ikey(k), fp).await {
                    Ok(Begin::Proceed(lease)) => {
                        let phases = client.phases(&lease).expect("phases");
                        let ending = resume(&shop, phases).await;
                        client.settle(&lease, ending).await.map(|_| true)
                    }
                    Ok(Begin::InProgress { .. } | Begin::Replay(_)) => Ok(false),
                    Ok(other) => panic!("a client retry of `{k}` got {other:?}"),
                    Err(e) => Err(e),
                })
            }
        })
        .await
    };
    let mut by_completers = 0;
    let mut by_clients = 0;
    for result in &results {
        match result {
            Resumer::Completer(pass) => {
                assert_eq!(pass.errors, 0, "a completer's pass had errors: {pass:?}");
                assert_eq!(pass.resumed, pass.ended, "{pass:?}");
                by_completers += pass.resumed;
            }
            Resumer::Client(Ok(resumed)) => by_clients += usize::from(*resumed),
            Resumer::Client(Err(e)) => panic!("a client retry failed: {e} ({e:?})"),
        }
    }
    let resumes = shop.resumes.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        (by_completers + by_clients, resumes),
        (KEYS, KEYS),
        "each of {KEYS} abandoned keys must be resumed exactly once \
         (completers resumed {by_completers}, clients {by_clients}): {results:?}"
    );
    assert_eq!(
        (shop.receipts.calls(), shop.receipts.effects()),
        (KEYS, KEYS),
        "the remaining phase's work ran once per key"
    );
    assert_eq!(
        (shop.charges.calls(), shop.charges.effects()),
        (KEYS, KEYS),
        "the recorded phase never ran again"
    );
    for name in &names {
        match client.begin(&scope(), &ikey(name), fp).await {
            Ok(Begin::Replay(replay)) => {
                let text = String::from_utf8_lossy(replay.outcome.as_bytes()).into_owned();
                assert!(
                    text.starts_with("order: stock 7, charge "),
                    "`{name}`: a retry replays the order's outcome, got {text:?}"
                );
            }
            other => panic!("`{name}` must be completed and replayed, got {other:?}"),
        }
    }
}
