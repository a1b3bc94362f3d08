//! PostgreSQL-specific cases: completion inside the caller's transaction
//! (commit and rollback), races across pools, the read-only replay path,
//! corrupt rows, migrations, and pool / connection failures (through the
//! `idem-faults` proxy).
//!
//! Same rules as the conformance target: server at `IDEM_POSTGRES_URL`
//! (default `postgres://postgres@127.0.0.1:5432/test`), a schema per store
//! (idem-testkit), IGNORED with a banner when unreachable, FAILED under
//! `CI=true` / `IDEM_REQUIRE_BACKENDS=1`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use idem_conformance::{StoreFactory, Suite, open_store};
use idem_core::machine::Fenced;
use idem_core::store::{
    Census, Checkpoint, Coverage, EXPIRY_BUCKETS, FencingToken, InsertOutcome, Record, Revision,
    State, Store, StoreError, SwapOutcome, Versioned,
};
use idem_core::{
    Begin, Clock, Engine, Error, FailureKind, Fingerprint, Lease, ManualClock, Outcome, RecordKey,
    ReplayKind, Scope, Timestamp,
};
use idem_faults::{Fault, FaultProxy};
use idem_postgres::sqlx::postgres::PgConnectOptions;
use idem_postgres::sqlx::{self, AssertSqlSafe, Row};
use idem_postgres::{ClaimMode, PostgresStore, TableName};
use idem_testkit::fixtures::{
    LEASE, T0, assert_replays, assert_transient, begin, completed, engine, fp, ikey, in_progress,
    prepared, proceed, race, replays, rkey, scope, stored,
};
use idem_testkit::{StoreUrl, env, postgres as kit};
use support::{Factory, with_mode};

fn main() -> std::process::ExitCode {
    statements::install();
    idem_testkit::cases!(Suite::empty(support::factory());
        "store::one_statement_per_step" => one_statement_per_step,
        "store::read_first_statements_per_step" => read_first_statements_per_step,
        "store::adaptive_statements_per_step" => adaptive_statements_per_step,
        "store::adaptive_switches_both_ways" => adaptive_switches_both_ways,
        "store::adaptive_is_the_default" => adaptive_is_the_default,
        "tx::commit_stores_record_and_business_row" => tx_commit,
        "tx::rollback_then_release_runs_once" => tx_rollback_then_release,
        "tx::rollback_then_lease_expiry_runs_once" => tx_rollback_then_expiry,
        "tx::lost_lease_is_refused_and_changes_nothing" => tx_lost_lease,
        "tx::heartbeat_before_apply_is_fine" => tx_heartbeat_before_apply,
        "tx::permanent_failure_in_transaction_is_replayed" => tx_fail,
        "tx::duplicates_do_not_block_on_an_open_transaction" => tx_duplicates_do_not_block,
        "tx::local_phase_commits_its_rows_with_its_checkpoint_or_neither" => tx_local_phase,
        "store::abandoned_returns_only_lapsed_checkpointed_records_of_its_schema" =>
            abandoned_only_lapsed_checkpointed,
        "store::abandoned_orders_deadlines_as_unsigned" => abandoned_unsigned,
        "store::abandoned_skips_an_undecodable_checkpoint" => abandoned_corrupt,
        "store::abandoned_among_10000_records_returns_exactly_the_abandoned" => abandoned_10000,
        "store::records_with_large_checkpoints_are_rejected" => large_checkpoint_rejected,
        "store::checkpoints_round_trip_in_every_claim_mode" => checkpoints_in_every_claim_mode,
        "race::two_pools_64_tasks_pay_once" => race_two_pools_pay_once,
        "race::two_pools_insert_over_expired_one_wins" => race_insert_over_expired,
        "race::two_pools_cas_losers_see_the_winner" => race_cas_losers_see_winner,
        "race::cas_behind_a_concurrent_commit_rereads" => cas_behind_a_concurrent_commit,
        "race::insert_behind_a_concurrent_insert_rereads" => insert_behind_a_concurrent_insert,
        "race::insert_over_expired_behind_a_concurrent_claim_rereads" =>
            insert_over_expired_behind_a_concurrent_claim,
        "race::read_first_insert_behind_a_concurrent_insert_rereads" =>
            read_first_insert_behind_a_concurrent_insert,
        "race::read_first_insert_over_expired_behind_a_concurrent_claim_rereads" =>
            read_first_insert_over_expired_behind_a_concurrent_claim,
        "race::adaptive_insert_behind_a_concurrent_insert_rereads" =>
            adaptive_insert_behind_a_concurrent_insert,
        "race::adaptive_insert_over_expired_behind_a_concurrent_claim_rereads" =>
            adaptive_insert_over_expired_behind_a_concurrent_claim,
        "race::concurrent_purges_remove_each_record_once" => race_concurrent_purges,
        "store::replay_path_writes_nothing" => replay_path_writes_nothing,
        "store::scope_columns_are_readable" => scope_columns_are_readable,
        "store::corrupt_rows_of_every_kind" => corrupt_rows_of_every_kind,
        "store::missing_table_says_migrate" => missing_table_says_migrate,
        "store::census_agrees_with_tally_across_2_pow_63" => census_agrees_with_tally,
        "migrate::idempotent_and_concurrent" => migrate_idempotent,
        "migrate::newer_schema_is_rejected_and_lock_released" => migrate_newer_rejected,
        "migrate::a_table_without_checkpoints_gains_them" => migrate_adds_checkpoint,
        "pool::unreachable_server_is_transient" => unreachable_is_transient,
        "pool::closed_pool_is_transient" => closed_pool_is_transient,
        "pool::exhausted_pool_times_out_as_transient" => exhausted_pool,
        "faults::cut_connections_are_transient_then_recover" => cut_connections,
        "faults::black_hole_times_out_then_recovers" => black_hole,
        "faults::census_is_bounded_by_the_timeout" => census_black_hole,
        "faults::lost_reply_on_complete_then_retry_succeeds" => lost_reply_on_complete,
    )
    .run()
}

// ---------------------------------------------------------------------------
// Helpers (the backend-neutral ones are idem_testkit::fixtures).
// ---------------------------------------------------------------------------

type Eng = Engine<PostgresStore, ManualClock>;

/// A fresh store of the case (its schema is dropped after the case).
async fn open(factory: &Factory) -> PostgresStore {
    (*open_store(factory).await.expect("open a store")).clone()
}

/// A fresh store, a manual clock at [`T0`] and an engine over both.
async fn setup(factory: &Factory) -> (PostgresStore, ManualClock, Eng) {
    let store = open(factory).await;
    let clock = ManualClock::new(T0);
    let engine = engine(store.clone(), &clock);
    (store, clock, engine)
}

/// A fresh store and a second instance over its table with a pool of its
/// own (two application servers).
async fn two_pools(factory: &Factory) -> (Arc<PostgresStore>, Arc<PostgresStore>) {
    let a = open(factory).await;
    let b = factory
        .reopen(&a)
        .await
        .unwrap()
        .expect("a second instance");
    (Arc::new(a), Arc::new(b))
}

/// `n` tasks released together, even ones on `a`, odd ones on `b`.
async fn on_two_pools<T, Fut>(
    (a, b): &(Arc<PostgresStore>, Arc<PostgresStore>),
    n: usize,
    op: impl Fn(usize, Arc<PostgresStore>) -> Fut + Send + Sync + 'static,
) -> Vec<T>
where
    T: Send + 'static,
    Fut: Future<Output = T> + Send + 'static,
{
    let (a, b) = (a.clone(), b.clone());
    race(n, move |i| {
        op(i, if i % 2 == 0 { a.clone() } else { b.clone() })
    })
    .await
}

/// A store on a table named `table` that was never migrated, in a schema
/// of its own that does not exist yet (dropped at the end of the run).
async fn unmigrated(factory: &Factory, table: &str) -> PostgresStore {
    let edit = |url: &mut StoreUrl| {
        if let StoreUrl::Postgres(pg) = url {
            pg.table = Some(table.to_string());
            pg.migrate = false;
        }
    };
    factory.open_with(edit).await.expect("open a store")
}

/// How many rows `schema.table` holds.
async fn rows(store: &PostgresStore, schema: &str, table: &str) -> u64 {
    let table = TableName::new(schema, table).unwrap();
    kit::count(store.pool(), &table).await.expect("count rows")
}
/// `"schema".payments`, the business table of a test, created in the store's schema.
async fn payments(store: &PostgresStore) -> String {
    let name = format!("\"{}\".payments", store.table().schema());
    let sql = format!(
        "CREATE TABLE IF NOT EXISTS {name} (\
            id BIGSERIAL PRIMARY KEY, idem_key TEXT NOT NULL, amount_cents BIGINT NOT NULL)"
    );
    sqlx::query(AssertSqlSafe(sql))
        .execute(store.pool())
        .await
        .expect("create payments");
    name
}

/// Asserts that `key` has `n` rows in the business table `table`.
async fn assert_payments(store: &PostgresStore, table: &str, key: &str, n: i64, why: &str) {
    let sql = format!("SELECT count(*) FROM {table} WHERE idem_key = $1");
    let rows = sqlx::query_scalar::<_, i64>(AssertSqlSafe(sql))
        .bind(key)
        .fetch_one(store.pool())
        .await
        .expect("count payments");
    assert_eq!(rows, n, "{why}");
}

/// The business write and the completion in one transaction, committed if
/// `commit`, rolled back otherwise.
async fn pay(
    engine: &Engine<PostgresStore, ManualClock>,
    lease: &Lease,
    table: &str,
    key: &str,
    commit: bool,
) -> Result<(), Error> {
    let store = engine.store();
    let mut tx = store.pool().begin().await.expect("begin");
    let sql = format!("INSERT INTO {table} (idem_key, amount_cents) VALUES ($1, 1000)");
    sqlx::query(AssertSqlSafe(sql))
        .bind(key)
        .execute(&mut *tx)
        .await
        .expect("insert payment");
    let done = engine.prepare_complete(lease, Outcome::new(format!("paid {key}").into_bytes()))?;
    // On error the transaction is dropped: rolled back.
    store.apply_in(&mut tx, &done).await?;
    if commit {
        tx.commit().await.expect("commit");
    } else {
        tx.rollback().await.expect("rollback");
    }
    Ok(())
}

/// A loopback port nothing listens on.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// The test server's connection options.
fn options() -> PgConnectOptions {
    kit::options(&env::postgres_url()).unwrap()
}

/// A fresh store, a proxy in front of the test server, and a store over
/// the same table through the proxy with one connection, each call bounded
/// by `timeout`.
async fn proxied(
    factory: &Factory,
    timeout: Duration,
) -> (PostgresStore, FaultProxy, PostgresStore) {
    let base = open(factory).await;
    let proxy = kit::proxy().await;
    let store = kit::store_via(&proxy, base.table(), timeout);
    (base, proxy, store)
}

/// Polls `op` until it succeeds or 20 s pass; every failure must be transient.
async fn until_ok<T, Fut>(what: &str, mut op: impl FnMut() -> Fut) -> T
where
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match op().await {
            Ok(v) => return v,
            Err(e) if e.is_transient() && Instant::now() < deadline => {
                tokio::task::yield_now().await;
            }
            Err(e) => panic!("{what}: never recovered: {e} ({e:?})"),
        }
    }
}

// ---------------------------------------------------------------------------
// Completion inside the caller's transaction.
// ---------------------------------------------------------------------------

/// Commit: the payment row and the completed record are both there, and a
/// retry replays the outcome without paying again.
async fn tx_commit(factory: Arc<Factory>) {
    let (store, clock, engine) = setup(&factory).await;
    let table = payments(&store).await;
    let lease = proceed(&engine, "pay-1").await;
    pay(&engine, &lease, &table, "pay-1", true)
        .await
        .expect("pay");
    assert_payments(&store, &table, "pay-1", 1, "paid").await;
    let stored = stored(&store, &rkey("pay-1"), clock.now()).await;
    assert!(
        matches!(&stored.record.state, State::Completed { token, outcome }
            if *token == lease.token() && outcome.as_bytes() == b"paid pay-1"),
        "the record must be completed by the holder: {stored:?}"
    );
    replays(&engine, "pay-1", b"paid pay-1").await;
    assert_payments(&store, &table, "pay-1", 1, "a replay pays nothing").await;
}

/// Rollback: no payment, the key stays claimed by the same lease (retries
/// get "in progress"); after the holder releases it, a retry pays, and
/// there is exactly one payment in the end.
async fn tx_rollback_then_release(factory: Arc<Factory>) {
    let (store, clock, engine) = setup(&factory).await;
    let table = payments(&store).await;
    let first = proceed(&engine, "pay-2").await;
    pay(&engine, &first, &table, "pay-2", false)
        .await
        .expect("apply before rollback");
    assert_payments(&store, &table, "pay-2", 0, "rolled back").await;
    let stored = stored(&store, &rkey("pay-2"), clock.now()).await;
    assert!(
        matches!(stored.record.state, State::InFlight { token, .. } if token == first.token()),
        "after a rollback the key stays claimed by the same lease: {stored:?}"
    );
    // A retry meanwhile is told the key is in progress.
    in_progress(&engine, "pay-2").await;
    engine.release(&first).await.expect("release");
    let second = proceed(&engine, "pay-2").await;
    assert_ne!(second.token(), first.token());
    pay(&engine, &second, &table, "pay-2", true)
        .await
        .expect("pay");
    assert_payments(&store, &table, "pay-2", 1, "exactly one payment").await;
    replays(&engine, "pay-2", b"paid pay-2").await;
}

/// Rollback, then the holder vanishes: once the lease lapses a retry takes
/// over and pays; the first holder's transition is refused afterwards.
/// Exactly one payment.
async fn tx_rollback_then_expiry(factory: Arc<Factory>) {
    let (store, clock, engine) = setup(&factory).await;
    let table = payments(&store).await;
    let first = proceed(&engine, "pay-3").await;
    pay(&engine, &first, &table, "pay-3", false)
        .await
        .expect("apply before rollback");
    let stale = engine
        .prepare_complete(&first, Outcome::new(&b"zombie"[..]))
        .unwrap();
    clock.advance(LEASE + Duration::from_millis(1));
    let second = proceed(&engine, "pay-3").await;
    assert_eq!(second.attempt(), 2, "a takeover");
    pay(&engine, &second, &table, "pay-3", true)
        .await
        .expect("pay");
    // The zombie wakes up and tries to commit its payment too.
    let mut tx = store.pool().begin().await.unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {table} (idem_key, amount_cents) VALUES ('pay-3', 1000)"
    )))
    .execute(&mut *tx)
    .await
    .unwrap();
    match store.apply_in(&mut tx, &stale).await {
        Err(Error::LeaseLost(Fenced::Finished {
            by_holder: false, ..
        })) => {}
        other => {
            panic!("a zombie's transition must be LeaseLost(Finished by another), got {other:?}")
        }
    }
    drop(tx); // rolled back, as the caller must on LeaseLost
    assert_payments(&store, &table, "pay-3", 1, "exactly one payment").await;
    replays(&engine, "pay-3", b"paid pay-3").await;
}

/// A transition whose lease was taken over or whose record is gone is
/// refused with the right reason and writes nothing.
async fn tx_lost_lease(factory: Arc<Factory>) {
    let (store, clock, engine) = setup(&factory).await;
    // Taken over while still in flight.
    let (_first, stale) = prepared(&engine, "lost-1", b"old").await;
    clock.advance(LEASE + Duration::from_millis(1));
    let second = proceed(&engine, "lost-1").await;
    let before = store.get(&rkey("lost-1"), clock.now()).await.unwrap();
    let mut conn = store.pool().acquire().await.unwrap();
    match store.apply_in(&mut conn, &stale).await {
        Err(Error::LeaseLost(Fenced::TakenOver)) => {}
        other => panic!("expected LeaseLost(TakenOver), got {other:?}"),
    }
    assert_eq!(
        store.get(&rkey("lost-1"), clock.now()).await.unwrap(),
        before,
        "nothing changed"
    );
    // Gone (released by its own holder after preparing).
    let done = engine
        .prepare_complete(&second, Outcome::new(&b"new"[..]))
        .unwrap();
    engine.release(&second).await.unwrap();
    match store.apply_in(&mut conn, &done).await {
        Err(Error::LeaseLost(Fenced::Expired)) => {}
        other => panic!("expected LeaseLost(Expired) on an absent key, got {other:?}"),
    }
    assert_eq!(store.get(&rkey("lost-1"), clock.now()).await.unwrap(), None);
}

/// Applies `transition` in a transaction of its own and commits.
async fn apply_and_commit(store: &PostgresStore, transition: &idem_core::Transition) {
    let mut tx = store.pool().begin().await.unwrap();
    store
        .apply_in(&mut tx, transition)
        .await
        .expect("apply in the transaction");
    tx.commit().await.unwrap();
}

/// The transition checks the fencing token, not the revision: a heartbeat
/// between prepare and apply does not make it fail.
async fn tx_heartbeat_before_apply(factory: Arc<Factory>) {
    let (store, clock, engine) = setup(&factory).await;
    let (lease, done) = prepared(&engine, "beat", b"ok").await;
    clock.advance(Duration::from_secs(3));
    engine.extend(&lease).await.expect("heartbeat");
    assert_ne!(lease.record().revision, done.next.revision);
    apply_and_commit(&store, &done).await;
    replays(&engine, "beat", b"ok").await;
}

/// A permanent failure stored in the caller's transaction is replayed.
async fn tx_fail(factory: Arc<Factory>) {
    let (store, _clock, engine) = setup(&factory).await;
    let lease = proceed(&engine, "declined").await;
    let failed = engine
        .prepare_fail(
            &lease,
            FailureKind::Permanent,
            Outcome::new(&b"card declined"[..]),
        )
        .unwrap();
    apply_and_commit(&store, &failed).await;
    assert_replays(
        begin(&engine, "declined").await,
        b"card declined",
        ReplayKind::Failed,
    );
}

/// While a completion sits in an open transaction (its row locked),
/// duplicates are answered at once ("in progress": the completion is not
/// committed), not blocked; after the commit they replay.
async fn tx_duplicates_do_not_block(factory: Arc<Factory>) {
    let (store, _clock, engine) = setup(&factory).await;
    let (_lease, done) = prepared(&engine, "open-tx", b"done").await;
    let mut tx = store.pool().begin().await.unwrap();
    store.apply_in(&mut tx, &done).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), in_progress(&engine, "open-tx"))
        .await
        .expect("a duplicate must not wait for the open transaction");
    tx.commit().await.unwrap();
    replays(&engine, "open-tx", b"done").await;
}

// ---------------------------------------------------------------------------
// Races.
// ---------------------------------------------------------------------------

/// 64 tasks over two stores with separate pools (two application servers)
/// race to pay with one key: exactly one pays, in one transaction with its
/// record; every other task is told "in progress" or gets the replay.
async fn race_two_pools_pay_once(factory: Arc<Factory>) {
    let (a, b) = two_pools(&factory).await;
    let table = Arc::new(payments(&a).await);
    let clock = ManualClock::new(T0);
    let engines = Arc::new([
        Arc::new(engine((*a).clone(), &clock)),
        Arc::new(engine((*b).clone(), &clock)),
    ]);
    let paid = Arc::new(AtomicUsize::new(0));
    let results = {
        let (engines, paid, table) = (engines.clone(), paid.clone(), table.clone());
        race(64, move |i| {
            let engine = engines[i % 2].clone();
            let (paid, table) = (paid.clone(), table.clone());
            async move {
                match begin(&engine, "storm").await {
                    Begin::Proceed(lease) => {
                        pay(&engine, &lease, &table, "storm", true).await.unwrap();
                        paid.fetch_add(1, Ordering::SeqCst);
                        "paid"
                    }
                    Begin::InProgress { .. } => "in progress",
                    Begin::Replay(r) => {
                        assert_eq!(r.outcome.as_bytes(), b"paid storm");
                        "replay"
                    }
                    Begin::Mismatch(_) => panic!("same request, no mismatch"),
                }
            }
        })
        .await
    };
    assert_eq!(
        paid.load(Ordering::SeqCst),
        1,
        "exactly one task pays: {results:?}"
    );
    assert_eq!(results.iter().filter(|r| **r == "paid").count(), 1);
    assert_payments(&a, &table, "storm", 1, "exactly one payment row").await;
    replays(&engines[1], "storm", b"paid storm").await;
}

/// The one candidate whose result `won`; every other result must have
/// `seen` that winner.
fn one_winner<'c, R: std::fmt::Debug>(
    results: &[R],
    candidates: &'c [Versioned],
    won: impl Fn(&R) -> bool,
    seen: impl Fn(&R) -> Option<&Versioned>,
) -> &'c Versioned {
    let winners: Vec<usize> = (0..results.len()).filter(|i| won(&results[*i])).collect();
    assert_eq!(winners.len(), 1, "exactly one winner: {winners:?}");
    let winner = &candidates[winners[0]];
    for (i, r) in results.iter().enumerate().filter(|(i, _)| *i != winners[0]) {
        assert_eq!(
            seen(r),
            Some(winner),
            "loser {i} must see the winner: {r:?}"
        );
    }
    winner
}

/// 32 tasks over two pools claim a key whose record expired: exactly one
/// replaces it; every loser sees the winner's record (never the expired
/// one), even when the winner committed after the loser's snapshot.
async fn race_insert_over_expired(factory: Arc<Factory>) {
    let pools = two_pools(&factory).await;
    let k = rkey("expired-race");
    let old = completed(1, 1, T0, 1, b"old");
    assert_eq!(
        pools.0.insert_if_absent(&k, &old, T0).await.unwrap(),
        InsertOutcome::Inserted
    );
    let now = T0.plus(Duration::from_secs(5));
    let candidates: Vec<Versioned> = (0..32)
        .map(|i| completed(100 + i, 100 + u128::from(i), now, 60, b"new"))
        .collect();
    let results = {
        let (k, candidates) = (k.clone(), candidates.clone());
        on_two_pools(&pools, 32, move |i, store| {
            let (k, rec) = (k.clone(), candidates[i].clone());
            async move { store.insert_if_absent(&k, &rec, now).await.unwrap() }
        })
        .await
    };
    let winner = one_winner(
        &results,
        &candidates,
        |r| *r == InsertOutcome::Inserted,
        |r| match r {
            InsertOutcome::Exists(seen) => Some(seen),
            InsertOutcome::Inserted => None,
        },
    );
    assert_eq!(pools.0.get(&k, now).await.unwrap().as_ref(), Some(winner));
}

/// 32 tasks over two pools swap the same expected revision: exactly one
/// wins; every loser's conflict carries the winner's record, never the
/// revision it expected (the stale-snapshot case is re-read).
async fn race_cas_losers_see_winner(factory: Arc<Factory>) {
    let pools = two_pools(&factory).await;
    let k = rkey("cas-race");
    let base = completed(7, 7, T0, 60, b"base");
    pools.0.insert_if_absent(&k, &base, T0).await.unwrap();
    let candidates: Vec<Versioned> = (0..32)
        .map(|i| completed(1000 + i, 7, T0, 60, format!("v{i}").as_bytes()))
        .collect();
    let results = {
        let (k, candidates) = (k.clone(), candidates.clone());
        on_two_pools(&pools, 32, move |i, store| {
            let (k, rec) = (k.clone(), candidates[i].clone());
            let base = completed(7, 7, T0, 60, b"base");
            async move { store.compare_and_swap(&k, &base, &rec, T0).await.unwrap() }
        })
        .await
    };
    one_winner(
        &results,
        &candidates,
        |r| *r == SwapOutcome::Swapped,
        |r| match r {
            SwapOutcome::Conflict(seen) => seen.as_ref(),
            SwapOutcome::Swapped => None,
        },
    );
}

/// Waits until a statement on `store`'s table is blocked on a row lock.
async fn blocked_on_lock(store: &PostgresStore) {
    let pattern = format!("%{}%", store.table());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE wait_event_type = 'Lock' AND query LIKE $1 AND pid <> pg_backend_pid()",
        )
        .bind(&pattern)
        .fetch_one(store.pool())
        .await
        .unwrap();
        if waiting > 0 {
            return;
        }
        assert!(Instant::now() < deadline, "the statement never blocked");
        tokio::task::yield_now().await;
    }
}

/// Runs `sql` (binding the digests of `keys`) in a new transaction that
/// changes one row, and returns it, open.
async fn open_write(
    store: &PostgresStore,
    sql: String,
    keys: &[&RecordKey],
) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut tx = store.pool().begin().await.unwrap();
    let query = keys.iter().fold(sqlx::query(AssertSqlSafe(sql)), |q, k| {
        q.bind(k.digest().to_vec())
    });
    let done = query.execute(&mut *tx).await.unwrap();
    assert_eq!(done.rows_affected(), 1);
    tx
}

/// Runs `op` on `store` while `writer` holds a row lock: once `op` is
/// blocked on it, commits `writer`; returns what `op` answered.
async fn behind<T, Fut>(
    store: &Arc<PostgresStore>,
    writer: sqlx::Transaction<'static, sqlx::Postgres>,
    op: impl FnOnce(Arc<PostgresStore>) -> Fut,
) -> T
where
    T: Send + 'static,
    Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
{
    let op = tokio::spawn(op(store.clone()));
    blocked_on_lock(store).await;
    writer.commit().await.unwrap();
    op.await.unwrap().unwrap()
}

/// Deterministic stale snapshot for compare-and-swap: another transaction
/// has changed the revision but not committed when the swap starts; the
/// swap's snapshot still shows the expected revision, its UPDATE waits,
/// then finds the new one. The result must be a conflict carrying the new
/// record, never the expected revision.
async fn cas_behind_a_concurrent_commit(factory: Arc<Factory>) {
    let store = Arc::new(open(&factory).await);
    let k = rkey("stale-cas");
    store
        .insert_if_absent(&k, &completed(7, 7, T0, 60, b"base"), T0)
        .await
        .unwrap();
    let t = store.table();
    let writer = open_write(
        &store,
        format!("UPDATE {t} SET revision = 8, outcome = '\\x08'::bytea WHERE digest = $1"),
        &[&k],
    )
    .await;
    let next = completed(9, 7, T0, 60, b"mine");
    let swapped = behind(&store, writer, |store| async move {
        store
            .compare_and_swap(&k, &completed(7, 7, T0, 60, b"base"), &next, T0)
            .await
    })
    .await;
    let want = completed(8, 7, T0, 60, &[8]);
    assert_eq!(
        swapped,
        SwapOutcome::Conflict(Some(want)),
        "the conflict must carry the committed record"
    );
}

/// Deterministic stale snapshot for a claim: another transaction has
/// inserted the key (here: renamed a row to it) but not committed when the
/// claim starts; the claim's INSERT waits, then conflicts with a live
/// record its snapshot cannot see. The result must be that record.
async fn insert_behind_a_concurrent_insert(factory: Arc<Factory>) {
    let store = with_mode(&open(&factory).await, ClaimMode::SingleStatement);
    insert_behind_a_concurrent_insert_in(store).await;
}

/// The same in [`ClaimMode::ReadFirst`]: the read finds nothing, the insert
/// waits, then meets the committed record; the store reads again.
async fn read_first_insert_behind_a_concurrent_insert(factory: Arc<Factory>) {
    let store = with_mode(&open(&factory).await, ClaimMode::ReadFirst);
    insert_behind_a_concurrent_insert_in(store).await;
}

/// The same in [`ClaimMode::Adaptive`] while inserting first: the plain
/// insert waits, then meets the committed record and does nothing; the
/// read that follows shows it.
async fn adaptive_insert_behind_a_concurrent_insert(factory: Arc<Factory>) {
    let store = with_mode(&open(&factory).await, ClaimMode::Adaptive);
    insert_behind_a_concurrent_insert_in(store).await;
}

async fn insert_behind_a_concurrent_insert_in(store: PostgresStore) {
    let store = Arc::new(store);
    let reads_first = store.reads_first();
    let (k, elsewhere) = (rkey("stale-insert"), rkey("stale-insert-source"));
    let theirs = completed(5, 5, T0, 60, b"theirs");
    store
        .insert_if_absent(&elsewhere, &theirs, T0)
        .await
        .unwrap();
    let t = store.table();
    let writer = open_write(
        &store,
        format!("UPDATE {t} SET digest = $1 WHERE digest = $2"),
        &[&k, &elsewhere],
    )
    .await;
    let claimed = behind(&store, writer, |store| async move {
        store
            .insert_if_absent(&k, &completed(6, 6, T0, 60, b"mine"), T0)
            .await
    })
    .await;
    assert_eq!(
        claimed,
        InsertOutcome::Exists(theirs),
        "the claim must lose to the committed record and return it"
    );
    assert_eq!(
        store.reads_first(),
        reads_first,
        "two claims switch nothing"
    );
}

/// Deterministic stale snapshot over an expired record: another
/// transaction revives it (not yet committed) when the claim starts; the
/// claim's snapshot sees it expired, its ON CONFLICT waits, then finds it
/// live. The result must be the revived record, not a replacement.
async fn insert_over_expired_behind_a_concurrent_claim(factory: Arc<Factory>) {
    let store = with_mode(&open(&factory).await, ClaimMode::SingleStatement);
    insert_over_expired_behind_a_concurrent_claim_in(store).await;
}

/// The same in [`ClaimMode::ReadFirst`]: the read sees the record expired,
/// the insert's `ON CONFLICT` waits and then finds it live.
async fn read_first_insert_over_expired_behind_a_concurrent_claim(factory: Arc<Factory>) {
    let store = with_mode(&open(&factory).await, ClaimMode::ReadFirst);
    insert_over_expired_behind_a_concurrent_claim_in(store).await;
}

/// The same in [`ClaimMode::Adaptive`] while inserting first: the plain
/// insert waits for the reviving transaction, then meets the live record
/// and does nothing; the read that follows shows it.
async fn adaptive_insert_over_expired_behind_a_concurrent_claim(factory: Arc<Factory>) {
    let store = with_mode(&open(&factory).await, ClaimMode::Adaptive);
    insert_over_expired_behind_a_concurrent_claim_in(store).await;
}

async fn insert_over_expired_behind_a_concurrent_claim_in(store: PostgresStore) {
    let store = Arc::new(store);
    let k = rkey("stale-expired");
    store
        .insert_if_absent(&k, &completed(3, 3, T0, 1, b"old"), T0)
        .await
        .unwrap();
    let now = T0.plus(Duration::from_secs(5));
    let t = store.table();
    let live_until = T0.plus(Duration::from_secs(60)).as_millis();
    let writer = open_write(
        &store,
        format!("UPDATE {t} SET revision = 4, expires_at = {live_until} WHERE digest = $1"),
        &[&k],
    )
    .await;
    let claimed = behind(&store, writer, |store| async move {
        store
            .insert_if_absent(&k, &completed(6, 6, now, 60, b"mine"), now)
            .await
    })
    .await;
    let mut revived = completed(4, 3, T0, 60, b"old");
    revived.record.expires_at = Timestamp::from_millis(live_until);
    assert_eq!(
        claimed,
        InsertOutcome::Exists(revived),
        "the claim must not replace a record revived after its snapshot"
    );
}

/// 16 purgers over two pools, in small batches, while live records sit
/// beside expired ones: each expired record is removed exactly once (the
/// counts add up) and no live record is touched.
async fn race_concurrent_purges(factory: Arc<Factory>) {
    let pools = two_pools(&factory).await;
    let a = pools.0.clone();
    for i in 0..200u64 {
        let rec = completed(i + 1, 1, T0, 1 + i % 5, b"x");
        a.insert_if_absent(&rkey(&format!("dead-{i}")), &rec, T0)
            .await
            .unwrap();
    }
    for i in 0..50u64 {
        let rec = completed(i + 1, 1, T0, 3600, b"x");
        a.insert_if_absent(&rkey(&format!("live-{i}")), &rec, T0)
            .await
            .unwrap();
    }
    let now = T0.plus(Duration::from_secs(10));
    let removed = on_two_pools(&pools, 16, move |_, store| async move {
        let mut total = 0;
        loop {
            let n = store.purge_expired(now, 7).await.unwrap();
            assert!(n <= 7, "a batch never exceeds its limit");
            total += n;
            if n == 0 {
                return total;
            }
        }
    })
    .await;
    // Rows locked by another purger are skipped, so a purger may stop early;
    // a final pass takes whatever is left.
    let rest = a.purge_expired(now, 1000).await.unwrap();
    assert_eq!(
        removed.iter().sum::<u64>() + rest,
        200,
        "each expired record removed once"
    );
    let t = a.table();
    assert_eq!(
        rows(&a, t.schema(), t.table()).await,
        50,
        "only the live records are left"
    );
    for i in 0..50u64 {
        assert!(
            a.get(&rkey(&format!("live-{i}")), now)
                .await
                .unwrap()
                .is_some()
        );
    }
}

// ---------------------------------------------------------------------------
// Store details.
// ---------------------------------------------------------------------------

/// Every statement sqlx runs, as logged on target `sqlx::query`.
mod statements {
    use std::sync::{Mutex, PoisonError};

    use tracing::field::{Field, Visit};
    use tracing_subscriber::Layer;
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    static LOG: Mutex<Vec<String>> = Mutex::new(Vec::new());

    struct Collect;

    struct Statement(String);

    impl Visit for Statement {
        fn record_str(&mut self, field: &Field, value: &str) {
            if matches!(field.name(), "db.statement" | "summary") {
                self.0.push_str(value);
                self.0.push(' ');
            }
        }
        fn record_debug(&mut self, _: &Field, _: &dyn std::fmt::Debug) {}
    }

    impl<S: tracing::Subscriber> Layer<S> for Collect {
        fn on_event(
            &self,
            event: &tracing::Event<'_>,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            let mut statement = Statement(String::new());
            event.record(&mut statement);
            LOG.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(statement.0);
        }
    }

    /// Records every statement of the process from now on.
    pub(crate) fn install() {
        let only_statements = Targets::new().with_target("sqlx::query", tracing::Level::TRACE);
        let _ = tracing_subscriber::registry()
            .with(Collect.with_filter(only_statements))
            .try_init();
    }

    /// How many statements so far mentioned `needle` (a test's schema).
    pub(crate) fn mentioning(needle: &str) -> usize {
        LOG.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|s| s.contains(needle))
            .count()
    }
}

/// Each engine step costs the statements the crate docs promise: in
/// [`ClaimMode::SingleStatement`], one per claim, replay, "in progress",
/// heartbeat, completion, release, read and purge batch, and inside the
/// caller's transaction; two for a takeover.
async fn one_statement_per_step(factory: Arc<Factory>) {
    let store = with_mode(&open(&factory).await, ClaimMode::SingleStatement);
    statements_per_step(store, 1, 1).await;
}

/// The same steps in [`ClaimMode::ReadFirst`]: a claim of a new key is a
/// `SELECT` that finds nothing plus a plain insert; everything else, replays
/// and "in progress" included, is one statement.
async fn read_first_statements_per_step(factory: Arc<Factory>) {
    let store = with_mode(&open(&factory).await, ClaimMode::ReadFirst);
    assert_eq!(store.claim_mode(), ClaimMode::ReadFirst);
    statements_per_step(store, 2, 1).await;
}

/// The same steps in [`ClaimMode::Adaptive`], which inserts first in a new
/// store (and keeps doing so over these few claims): a claim of a new key
/// is one plain insert; a claim that finds a live record is that insert
/// plus a `SELECT`.
async fn adaptive_statements_per_step(factory: Arc<Factory>) {
    let store = with_mode(&open(&factory).await, ClaimMode::Adaptive);
    assert!(!store.reads_first());
    statements_per_step(store.clone(), 1, 2).await;
    assert!(
        !store.reads_first(),
        "3 duplicates in 6 claims switch nothing"
    );
}

/// Counts the statements of each engine step; a claim of a new key takes
/// `new_claim`, a claim that finds a live record `found_claim`.
async fn statements_per_step(store: PostgresStore, new_claim: usize, found_claim: usize) {
    let schema = format!("\"{}\"", store.table().schema());
    let clock = ManualClock::new(T0);
    let engine = engine(store.clone(), &clock);
    let mut seen = statements::mentioning(&schema);
    let mut step = |what: &str, want: usize| {
        let now = statements::mentioning(&schema);
        assert_eq!(now - seen, want, "{what}: statements run");
        seen = now;
    };
    let lease = proceed(&engine, "steps").await;
    step("claim of a new key", new_claim);
    in_progress(&engine, "steps").await;
    step("duplicate while in flight", found_claim);
    engine.extend(&lease).await.unwrap();
    step("heartbeat", 1);
    engine
        .complete(&lease, Outcome::new(&b"ok"[..]))
        .await
        .unwrap();
    step("completion", 1);
    replays(&engine, "steps", b"ok").await;
    step("replay", found_claim);
    store.get(&rkey("steps"), clock.now()).await.unwrap();
    step("get", 1);
    let other = proceed(&engine, "steps-2").await;
    step("claim of a second key", new_claim);
    engine.release(&other).await.unwrap();
    step("release", 1);
    let third = proceed(&engine, "steps-3").await;
    step("claim of a third key", new_claim);
    clock.advance(LEASE + Duration::from_millis(1));
    let taker = proceed(&engine, "steps-3").await;
    assert_ne!(taker.token(), third.token());
    step(
        "takeover (read by the claim, then compare-and-swap)",
        found_claim + 1,
    );
    let done = engine
        .prepare_complete(&taker, Outcome::new(&b"tx"[..]))
        .unwrap();
    apply_and_commit(&store, &done).await;
    step("completion in the caller's transaction", 1);
    store
        .purge_expired(clock.now().plus(Duration::from_secs(3600)), 100)
        .await
        .unwrap();
    step("purge batch", 1);
}

/// How many claims of the other kind in a row switch the way an adaptive
/// store's claims start (the [`ClaimMode::Adaptive`] docs).
const SWITCH_AFTER: usize = 16;

/// Claims `key` on `store` directly (a completed record); what the store
/// answered and how many statements it ran.
async fn claim_counted(store: &PostgresStore, key: &str) -> (InsertOutcome, usize) {
    let schema = format!("\"{}\"", store.table().schema());
    let before = statements::mentioning(&schema);
    let outcome = store
        .insert_if_absent(&rkey(key), &completed(1, 1, T0, 3600, b"x"), T0)
        .await
        .unwrap();
    (outcome, statements::mentioning(&schema) - before)
}

/// Claims one existing key until `store` reads first (at most
/// [`SWITCH_AFTER`] claims).
async fn drive_until_it_reads_first(store: &PostgresStore) {
    claim_counted(store, "drive-duplicate").await;
    for _ in 0..SWITCH_AFTER {
        if store.reads_first() {
            return;
        }
        let (outcome, _) = claim_counted(store, "drive-duplicate").await;
        assert!(matches!(outcome, InsertOutcome::Exists(_)));
    }
    assert!(store.reads_first(), "never switched to reading first");
}

/// [`ClaimMode::Adaptive`] is driven by the claims alone (no clock, no
/// timing): a new store inserts first; [`SWITCH_AFTER`] claims in a row
/// that find a live record make it read first, and as many claims of new
/// keys make it insert first again. Each way costs what the docs say: one
/// statement for the claim it favours, two for the other.
async fn adaptive_switches_both_ways(factory: Arc<Factory>) {
    let store = with_mode(&open(&factory).await, ClaimMode::Adaptive);
    assert_eq!(store.claim_mode(), ClaimMode::Adaptive);
    assert!(!store.reads_first(), "a new store inserts first");
    let mut fresh = (0..).map(|i| format!("switch-new-{i}"));
    let mut new_key = || fresh.next().unwrap();

    // New keys keep it inserting first: one statement each.
    for _ in 0..3 * SWITCH_AFTER {
        assert_eq!(claim_counted(&store, &new_key()).await.1, 1);
        assert!(!store.reads_first());
    }
    // Duplicates: the insert, then the read, until the switch.
    let dup = new_key();
    assert_eq!(claim_counted(&store, &dup).await.1, 1);
    for i in 1..=SWITCH_AFTER {
        let (outcome, ran) = claim_counted(&store, &dup).await;
        assert!(matches!(outcome, InsertOutcome::Exists(_)), "{outcome:?}");
        assert_eq!(ran, 2, "duplicate {i} while inserting first");
        assert_eq!(
            store.reads_first(),
            i == SWITCH_AFTER,
            "after duplicate {i}"
        );
    }
    // Reading first: a duplicate is one `SELECT`; more of them change
    // nothing (these many take the share of duplicates to 1 exactly, from
    // which the way back is as long as the way here).
    for _ in 0..10 * SWITCH_AFTER {
        let (outcome, ran) = claim_counted(&store, &dup).await;
        assert!(matches!(outcome, InsertOutcome::Exists(_)));
        assert_eq!(ran, 1, "a duplicate while reading first");
        assert!(store.reads_first());
    }
    // New keys: the read, then the insert, until the switch back.
    for i in 1..=SWITCH_AFTER {
        let (outcome, ran) = claim_counted(&store, &new_key()).await;
        assert_eq!(outcome, InsertOutcome::Inserted);
        assert_eq!(ran, 2, "new key {i} while reading first");
        assert_eq!(store.reads_first(), i != SWITCH_AFTER, "after new key {i}");
    }
    assert_eq!(claim_counted(&store, &new_key()).await.1, 1);
    // Clones share the state; another store over the same table has its own.
    assert!(!store.clone().reads_first());
    drive_until_it_reads_first(&store).await;
    assert!(store.clone().reads_first());
    assert!(!with_mode(&store, ClaimMode::Adaptive).reads_first());
}

/// A store built with the defaults claims adaptively.
async fn adaptive_is_the_default(factory: Arc<Factory>) {
    let store = open(&factory).await;
    let default = PostgresStore::builder()
        .with_table(store.table().clone())
        .open(store.pool().clone());
    assert_eq!(default.claim_mode(), ClaimMode::Adaptive);
    assert_eq!(ClaimMode::default(), ClaimMode::Adaptive);
    assert!(!with_mode(&store, ClaimMode::SingleStatement).reads_first());
    assert!(with_mode(&store, ClaimMode::ReadFirst).reads_first());
}

async fn row_version(store: &PostgresStore, k: &RecordKey) -> (String, String, String) {
    let sql = format!(
        "SELECT ctid::text, xmin::text, xmax::text FROM {} WHERE digest = $1",
        store.table()
    );
    let row = sqlx::query(AssertSqlSafe(sql))
        .bind(&k.digest()[..])
        .fetch_one(store.pool())
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

/// Replays and "in progress" answers are read-only in every claim mode
/// (and either way [`ClaimMode::Adaptive`] starts): the row keeps its tuple
/// (ctid, xmin) and gets no lock (xmax stays 0), so no WAL and no commit
/// flush per duplicate.
async fn replay_path_writes_nothing(factory: Arc<Factory>) {
    let base = open(&factory).await;
    for mode in [
        ClaimMode::SingleStatement,
        ClaimMode::ReadFirst,
        ClaimMode::Adaptive,
    ] {
        replay_path_writes_nothing_in(with_mode(&base, mode), "").await;
    }
    let adaptive = with_mode(&base, ClaimMode::Adaptive);
    drive_until_it_reads_first(&adaptive).await;
    replay_path_writes_nothing_in(adaptive.clone(), "-read-first").await;
    assert!(adaptive.reads_first());
}

async fn replay_path_writes_nothing_in(store: PostgresStore, suffix: &str) {
    let mode = store.claim_mode();
    let quiet = format!("quiet-{mode:?}{suffix}");
    let quiet = quiet.as_str();
    let clock = ManualClock::new(T0);
    let engine = engine(store.clone(), &clock);
    let reads_first = store.reads_first();
    let lease = proceed(&engine, quiet).await;
    let in_flight = row_version(&store, &rkey(quiet)).await;
    in_progress(&engine, quiet).await;
    assert_eq!(row_version(&store, &rkey(quiet)).await, in_flight);
    engine
        .complete(&lease, Outcome::new(&b"done"[..]))
        .await
        .unwrap();
    let done = row_version(&store, &rkey(quiet)).await;
    assert_eq!(done.2, "0", "a completed row carries no lock");
    for _ in 0..3 {
        replays(&engine, quiet, b"done").await;
        assert!(matches!(
            engine
                .begin(&scope(), &ikey(quiet), Fingerprint::of(b"other"))
                .await
                .unwrap(),
            Begin::Mismatch(_)
        ));
    }
    assert_eq!(
        row_version(&store, &rkey(quiet)).await,
        done,
        "{mode:?}: replays must not write, lock or rewrite the row"
    );
    assert_eq!(
        store.reads_first(),
        reads_first,
        "{mode:?}: 8 claims switch nothing"
    );
}

/// The scope and key are kept in readable columns (NUL, which PostgreSQL
/// text cannot hold, becomes U+FFFD); the digest alone identifies the record.
async fn scope_columns_are_readable(factory: Arc<Factory>) {
    let (store, _clock, engine) = setup(&factory).await;
    let scope = Scope::tenant("acme")
        .with_principal("user\0one")
        .with_operation("payments.create");
    let key = ikey("8e03978e-40d5-43e8-bc93-6894a57f9324");
    let Begin::Proceed(lease) = engine.begin(&scope, &key, fp()).await.unwrap() else {
        panic!("proceed")
    };
    engine
        .complete(&lease, Outcome::new(&b"ok"[..]))
        .await
        .unwrap();
    let sql = format!(
        "SELECT tenant, principal, operation, \"key\", state, octet_length(fingerprint), \
                octet_length(token), lease_deadline, attempts, expires_at - created_at \
         FROM {}",
        store.table()
    );
    let row = sqlx::query(AssertSqlSafe(sql))
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(row.get::<String, _>(0), "acme");
    assert_eq!(
        row.get::<Option<String>, _>(1).as_deref(),
        Some("user\u{FFFD}one")
    );
    assert_eq!(
        row.get::<Option<String>, _>(2).as_deref(),
        Some("payments.create")
    );
    assert_eq!(row.get::<String, _>(3), key.as_str());
    assert_eq!(row.get::<String, _>(4), "completed");
    assert_eq!(row.get::<i32, _>(5), 32);
    assert_eq!(row.get::<i32, _>(6), 16);
    assert_eq!(row.get::<Option<i64>, _>(7), None);
    assert_eq!(row.get::<i64, _>(8), 1);
    assert_eq!(
        row.get::<i64, _>(9),
        60_000,
        "ttl in ms of the engine clock"
    );
    assert_replays(
        engine.begin(&scope, &key, fp()).await.unwrap(),
        b"ok",
        ReplayKind::Completed,
    );
}

/// Every way a row can fail to be a record is `Corrupt` for `get` and
/// `insert_if_absent`, and the row is left as it was.
async fn corrupt_rows_of_every_kind(factory: Arc<Factory>) {
    let store = open(&factory).await;
    let cases = [
        ("token = '\\x01'::bytea", "short token"),
        ("fingerprint = ''::bytea", "empty fingerprint"),
        ("outcome = NULL", "completed without outcome"),
        ("lease_deadline = 5", "completed with a lease deadline"),
        (
            "state = 'in_flight'",
            "in flight without lease deadline, with outcome",
        ),
        ("attempts = -1", "negative attempts"),
        ("attempts = 4294967296", "attempts beyond u32"),
        ("checkpoint = '\\x00'::bytea", "a checkpoint of no format"),
        ("checkpoint = '\\x0103'::bytea", "a truncated checkpoint"),
    ];
    let table = store.table().to_string();
    for (i, (set, what)) in cases.iter().enumerate() {
        let k = rkey(&format!("corrupt-{i}"));
        let rec = completed(1, 1, T0, 60, b"fine");
        store.insert_if_absent(&k, &rec, T0).await.unwrap();
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE {table} SET {set} WHERE digest = $1"
        )))
        .bind(&k.digest()[..])
        .execute(store.pool())
        .await
        .unwrap();
        let before = row_version(&store, &k).await;
        let got = store.get(&k, T0).await;
        assert!(
            matches!(got, Err(StoreError::Corrupt { .. })),
            "{what}: get gave {got:?}"
        );
        let fresh = completed(2, 2, T0, 60, b"other");
        let got = store.insert_if_absent(&k, &fresh, T0).await;
        assert!(
            matches!(got, Err(StoreError::Corrupt { .. })),
            "{what}: insert_if_absent gave {got:?}"
        );
        assert_eq!(
            row_version(&store, &k).await,
            before,
            "{what}: the row must stay as it was"
        );
        let got = store
            .compare_and_swap(&k, &completed(9, 9, T0, 60, b"x"), &fresh, T0)
            .await;
        assert!(
            matches!(got, Err(StoreError::Corrupt { .. })),
            "{what}: a conflicting CAS must report Corrupt, got {got:?}"
        );
    }
}

/// The census statement counts exactly as `Census::tally` does: every
/// state, expiries at each bucket's edges, and timestamps on both sides of
/// 2^63 (stored bit for bit in BIGINT), for `now` on both sides too.
async fn census_agrees_with_tally(factory: Arc<Factory>) {
    let store = open(&factory).await;
    let token = FencingToken::from_u128(1);
    let outcome = || Outcome::new(b"o".to_vec());
    let states = [
        State::InFlight {
            token,
            lease_deadline: T0,
        },
        State::Completed {
            token,
            outcome: outcome(),
        },
        State::Failed {
            token,
            kind: FailureKind::Retryable,
            outcome: outcome(),
        },
        State::Failed {
            token,
            kind: FailureKind::Permanent,
            outcome: outcome(),
        },
        State::Failed {
            token,
            kind: FailureKind::Unknown,
            outcome: outcome(),
        },
    ];
    let nows = [
        0,
        T0.as_millis(),
        (1 << 63) - 1_000,
        1 << 63,
        u64::MAX - 86_400_000,
        u64::MAX,
    ];
    let mut expiries = vec![0, 1, i64::MAX as u64, 1 << 63, (1 << 63) + 1, u64::MAX];
    for now in nows {
        let mut offsets: Vec<i128> = vec![-1_000, -1, 0, 1, 5_000];
        for bound in EXPIRY_BUCKETS {
            let ms = i128::try_from(bound.as_millis()).unwrap();
            offsets.extend([ms - 1, ms, ms + 1]);
        }
        expiries.extend(
            offsets
                .iter()
                .filter_map(|o| u64::try_from(i128::from(now) + o).ok()),
        );
    }
    let mut records = Vec::new();
    for (i, e) in expiries.iter().enumerate() {
        let state = states[i % states.len()].clone();
        let e = Timestamp::from_millis(*e);
        let record = Record::from_parts(fp(), state, e, e, e, 1);
        // Written at `expires_at - 1` (or 0), when it is live: insert takes
        // only records live at its `now`.
        let at = Timestamp::from_millis(e.as_millis().saturating_sub(1));
        let k = rkey(&format!("census-{i}"));
        let v = Versioned {
            revision: Revision::from_u64(1),
            record: record.clone(),
        };
        match store.insert_if_absent(&k, &v, at).await.unwrap() {
            InsertOutcome::Inserted => records.push(record),
            other => panic!("record {i} was not inserted: {other:?}"),
        }
    }
    for now in nows {
        let now = Timestamp::from_millis(now);
        let mut want = Census::new(Coverage::Exact);
        for record in &records {
            want.tally(record, now);
        }
        let got = store.census(now, 0).await.unwrap();
        assert_eq!(got, want, "now = {now:?}");
        assert_eq!(got.total(), records.len() as u64);
        assert_eq!(got.expiry.iter().sum::<u64>(), got.live());
    }
}

/// A store on a table that was never migrated says so.
async fn missing_table_says_migrate(factory: Arc<Factory>) {
    let store = unmigrated(&factory, "never_migrated").await;
    match store.get(&rkey("k"), T0).await {
        Err(e @ StoreError::Generic { .. }) => {
            let text = std::error::Error::source(&e)
                .map(ToString::to_string)
                .unwrap_or_default();
            assert!(
                text.contains("migrate"),
                "the error must say to migrate: {text}"
            );
            assert!(!e.is_transient());
        }
        other => panic!("expected a Generic error naming migrate(), got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Migrations.
// ---------------------------------------------------------------------------

/// Eight instances migrating one fresh schema at once all succeed, as does
/// migrating again; one migration is recorded and the expiry index exists.
async fn migrate_idempotent(factory: Arc<Factory>) {
    let store = unmigrated(&factory, "custom_records").await;
    let table = store.table().clone();
    let results = {
        let store = store.clone();
        race(8, move |_| {
            let store = store.clone();
            async move { store.migrate().await }
        })
        .await
    };
    for r in results {
        r.expect("concurrent migrate");
    }
    store.migrate().await.expect("migrate again");
    // One row per migration shipped (1: the table, 2: the failed_unknown
    // state, 3: the checkpoint and the index of abandoned records).
    assert_eq!(
        rows(&store, table.schema(), "custom_records_migrations").await,
        3
    );
    let indexes = sqlx::query_scalar::<_, String>(
        "SELECT indexdef FROM pg_indexes WHERE schemaname = $1 AND tablename = 'custom_records'",
    )
    .bind(table.schema())
    .fetch_all(store.pool())
    .await
    .unwrap();
    assert!(
        indexes
            .iter()
            .any(|d| d.contains("custom_records_expires_at_idx") && d.contains("(expires_at)")),
        "an index on expires_at: {indexes:?}"
    );
    assert!(
        indexes.iter().any(|d| d.contains("(lease_deadline)")
            && d.contains("WHERE ((state = 'in_flight'::text) AND (checkpoint IS NOT NULL))")),
        "a partial index of abandoned records: {indexes:?}"
    );
    assert_eq!(
        columns(&store, &table).await,
        [
            "digest",
            "tenant",
            "principal",
            "operation",
            "key",
            "state",
            "fingerprint",
            "token",
            "lease_deadline",
            "outcome",
            "created_at",
            "updated_at",
            "expires_at",
            "attempts",
            "revision",
            "checkpoint",
        ]
    );
    let rec = completed(1, 1, T0, 60, b"works");
    assert_eq!(
        store.insert_if_absent(&rkey("k"), &rec, T0).await.unwrap(),
        InsertOutcome::Inserted
    );
    // Migration 2 admits the outcome-unknown state.
    let mut unknown = rec.clone();
    unknown.revision = Revision::from_u64(2);
    unknown.record.state = idem_core::store::State::Failed {
        token: unknown.record.state.token(),
        kind: idem_core::FailureKind::Unknown,
        outcome: Outcome::default(),
    };
    assert_eq!(
        store
            .insert_if_absent(&rkey("u"), &unknown, T0)
            .await
            .unwrap(),
        InsertOutcome::Inserted
    );
    assert_eq!(store.get(&rkey("u"), T0).await.unwrap(), Some(unknown));
}

/// A table migrated by a newer version is refused; the failed migration
/// leaves no advisory lock behind (another migration proceeds at once).
async fn migrate_newer_rejected(factory: Arc<Factory>) {
    let store = open(&factory).await;
    let t = store.table();
    let migrations = format!("\"{}\".{}_migrations", t.schema(), t.table());
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {migrations} (version, description, success, checksum, execution_time) \
         VALUES (9999, 'from the future', true, '\\x00'::bytea, 0)"
    )))
    .execute(store.pool())
    .await
    .unwrap();
    match store.migrate().await.map_err(StoreError::from) {
        Err(e @ StoreError::Rejected { .. }) => assert!(!e.is_transient()),
        other => panic!("a newer schema must be Rejected, got {other:?}"),
    }
    let other = tokio::time::timeout(Duration::from_secs(30), open_store(&*factory))
        .await
        .expect("another migration must not wait for a leaked advisory lock");
    other.expect("another store migrates");
}

// ---------------------------------------------------------------------------
// Pool and connection failures.
// ---------------------------------------------------------------------------

/// A pool pointed at a port nothing listens on: every call, migrate and the
/// engine report a transient `Unavailable`, keeping the driver's error.
async fn unreachable_is_transient(_factory: Arc<Factory>) {
    let opts = options().host("127.0.0.1").port(closed_port());
    let pool = PostgresStore::pool_options()
        .acquire_timeout(Duration::from_millis(500))
        .connect_lazy_with(opts.clone());
    let store = PostgresStore::builder().open(pool);
    let k = rkey("k");
    assert_transient(store.get(&k, T0).await, "get");
    assert_transient(
        store
            .insert_if_absent(&k, &completed(1, 1, T0, 60, b"x"), T0)
            .await,
        "insert_if_absent",
    );
    assert_transient(store.purge_expired(T0, 10).await, "purge_expired");
    assert_transient(store.migrate().await.map_err(StoreError::from), "migrate");
    let clock = ManualClock::new(T0);
    match engine(store, &clock)
        .begin(&scope(), &ikey("k"), fp())
        .await
    {
        Err(e @ Error::Store(StoreError::Unavailable { .. })) => assert!(e.is_transient()),
        other => panic!("the engine must report Store(Unavailable), got {other:?}"),
    }
    let url = format!("postgres://postgres@127.0.0.1:{}/test", opts.get_port());
    let connected = tokio::time::timeout(Duration::from_secs(30), PostgresStore::connect(&url))
        .await
        .expect("connect gives up within its acquire timeout");
    assert_transient(
        connected.map(|_| ()).map_err(StoreError::from),
        "PostgresStore::connect",
    );
}

/// A pool closed by the application: transient `Unavailable`.
async fn closed_pool_is_transient(factory: Arc<Factory>) {
    let store = open(&factory).await;
    store.pool().close().await;
    assert_transient(store.get(&rkey("k"), T0).await, "get on a closed pool");
}

/// Every connection busy (the application holds them): the call gives up
/// after the store's timeout with a transient error, and works once one
/// is free.
async fn exhausted_pool(factory: Arc<Factory>) {
    let table = open(&factory).await.table().clone();
    let pool = PostgresStore::pool_options()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(options())
        .await
        .unwrap();
    let store = PostgresStore::builder()
        .with_table(table)
        .with_timeout(Some(Duration::from_millis(300)))
        .open(pool.clone());
    let held = pool.acquire().await.unwrap();
    let started = Instant::now();
    assert_transient(store.get(&rkey("k"), T0).await, "get on an exhausted pool");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "bounded by the timeout"
    );
    drop(held);
    let k = rkey("k");
    assert_eq!(
        until_ok("get after release", || store.get(&k, T0)).await,
        None
    );
}

/// Connections cut under the store: the next call fails as transient, the
/// pool reconnects, and the engine carries on.
async fn cut_connections(factory: Arc<Factory>) {
    let (_base, proxy, store) = proxied(&factory, Duration::from_secs(10)).await;
    let clock = ManualClock::new(T0);
    let engine = engine(store.clone(), &clock);
    let lease = proceed(&engine, "cut").await;
    assert!(proxy.open_connections() > 0);
    kit::settled(&store).await;
    proxy.cut_all();
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.open_connections() > 0 {
        assert!(
            Instant::now() < deadline,
            "the proxy must close its connections"
        );
        tokio::task::yield_now().await;
    }
    let after_cut = store.get(&rkey("cut"), clock.now()).await;
    assert_transient(after_cut, "the first call on a cut connection");
    let k = rkey("cut");
    until_ok("get after the cut", || store.get(&k, clock.now())).await;
    engine
        .complete(&lease, Outcome::new(&b"done"[..]))
        .await
        .unwrap();
    replays(&engine, "cut", b"done").await;
}

/// A server that stops answering: the call times out as transient instead
/// of hanging, and the store recovers once traffic flows again.
async fn black_hole(factory: Arc<Factory>) {
    let (_base, proxy, store) = proxied(&factory, Duration::from_millis(500)).await;
    let k = rkey("hole");
    until_ok("warm up", || store.get(&k, T0)).await;
    kit::settled(&store).await;
    proxy.set(Fault::BlackHole);
    let started = Instant::now();
    assert_transient(store.get(&k, T0).await, "get into a black hole");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "bounded by the timeout"
    );
    proxy.heal();
    let rec = completed(1, 1, T0, 60, b"back");
    until_ok("insert after heal", || store.insert_if_absent(&k, &rec, T0)).await;
    assert_eq!(store.get(&k, T0).await.unwrap(), Some(rec));
}

/// A census that gets no answer is a transient error within the store's
/// timeout, like every call.
async fn census_black_hole(factory: Arc<Factory>) {
    let (_base, proxy, store) = proxied(&factory, Duration::from_millis(500)).await;
    until_ok("warm up", || store.census(T0, 10)).await;
    kit::settled(&store).await;
    proxy.set(Fault::BlackHole);
    let started = Instant::now();
    assert_transient(store.census(T0, 10).await, "census into a black hole");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "bounded by the timeout"
    );
    proxy.heal();
    let census = until_ok("census after heal", || store.census(T0, 10)).await;
    assert_eq!(census.total(), 0);
}

/// The completion reaches the server but its reply is lost: the engine
/// reports a transient error; retrying the completion succeeds (the store
/// shows the holder's own write) and retries replay the outcome.
async fn lost_reply_on_complete(factory: Arc<Factory>) {
    let (base, proxy, store) = proxied(&factory, Duration::from_millis(500)).await;
    let clock = ManualClock::new(T0);
    let engine = engine(store.clone(), &clock);
    let lease = proceed(&engine, "lost-reply").await;
    // A heartbeat prepares the compare-and-swap statement on the (single)
    // connection, so that the completion below is one message the server
    // executes although its reply is lost.
    engine.extend(&lease).await.unwrap();
    kit::settled(&store).await;
    proxy.set(Fault::DropReplies);
    match engine.complete(&lease, Outcome::new(&b"done"[..])).await {
        Err(e) if e.is_transient() => {}
        other => panic!("a lost reply must be a transient error, got {other:?}"),
    }
    proxy.heal();
    // The write took effect although its reply was lost.
    let k = rkey("lost-reply");
    let stored = until_ok("read after heal", || base.get(&k, clock.now())).await;
    assert!(
        matches!(
            stored.map(|v| v.record.state),
            Some(State::Completed { .. })
        ),
        "the completion reached the server"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match engine.complete(&lease, Outcome::new(&b"done"[..])).await {
            Ok(()) => break,
            Err(e) if e.is_transient() && Instant::now() < deadline => {}
            Err(e) => panic!("retrying the completion must succeed: {e}"),
        }
    }
    replays(&engine, "lost-reply", b"done").await;
}

// ---------------------------------------------------------------------------
// Checkpoints: the column, local phases, abandoned records
// ---------------------------------------------------------------------------

/// The column names of `table`, in order.
async fn columns(store: &PostgresStore, table: &TableName) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT column_name::text FROM information_schema.columns \
         WHERE table_schema = $1 AND table_name = $2 ORDER BY ordinal_position",
    )
    .bind(table.schema())
    .bind(table.table())
    .fetch_all(store.pool())
    .await
    .unwrap()
}

/// A table migrated before checkpoints existed (migrations 1 and 2) gains
/// the column and the index when `migrate` runs again, and keeps its
/// records (read back without a checkpoint).
async fn migrate_adds_checkpoint(factory: Arc<Factory>) {
    let (store, clock, engine) = setup(&factory).await;
    let table = store.table().clone();
    let done = completed(1, 1, T0, 60, b"before");
    store
        .insert_if_absent(&rkey("old"), &done, T0)
        .await
        .unwrap();
    proceed(&engine, "old-in-flight").await;
    // Back to what idem-postgres before checkpoints left behind.
    let migrations = format!("\"{}\".\"{}_migrations\"", table.schema(), table.table());
    for sql in [
        format!(
            "DROP INDEX \"{}\".\"{}_lease_deadline_idx\"",
            table.schema(),
            table.table()
        ),
        format!("ALTER TABLE {table} DROP COLUMN checkpoint"),
        format!("DELETE FROM {migrations} WHERE version = 3"),
    ] {
        sqlx::query(AssertSqlSafe(sql))
            .execute(store.pool())
            .await
            .unwrap();
    }
    assert!(
        !columns(&store, &table)
            .await
            .contains(&"checkpoint".to_string())
    );

    store.migrate().await.expect("migrate the older table");
    assert!(
        columns(&store, &table)
            .await
            .contains(&"checkpoint".to_string())
    );
    assert_eq!(
        rows(
            &store,
            table.schema(),
            &format!("{}_migrations", table.table())
        )
        .await,
        3
    );
    assert_eq!(store.get(&rkey("old"), T0).await.unwrap(), Some(done));
    let old = stored(&store, &rkey("old-in-flight"), clock.now()).await;
    assert_eq!(old.record.checkpoint, None);
    clock.advance(LEASE + Duration::from_millis(1));
    let taker = proceed(&engine, "old-in-flight").await;
    engine
        .checkpoint(&taker, "reserve", &b"r"[..])
        .await
        .unwrap();
    clock.advance(LEASE + Duration::from_millis(1));
    let found = store.abandoned(clock.now(), 10).await.unwrap();
    assert_eq!(found, [stored(&store, taker.key(), clock.now()).await]);
}

/// `"schema".reservations`, the business table of a local phase.
async fn reservations_table(store: &PostgresStore) -> String {
    let name = format!("\"{}\".reservations", store.table().schema());
    let sql = format!(
        "CREATE TABLE IF NOT EXISTS {name} (id BIGSERIAL PRIMARY KEY, order_key TEXT NOT NULL)"
    );
    sqlx::query(AssertSqlSafe(sql))
        .execute(store.pool())
        .await
        .expect("create reservations");
    name
}

/// How many reservations `key` has in `table`.
async fn reservations(store: &PostgresStore, table: &str, key: &str) -> i64 {
    let sql = format!("SELECT count(*) FROM {table} WHERE order_key = $1");
    sqlx::query_scalar(AssertSqlSafe(sql))
        .bind(key)
        .fetch_one(store.pool())
        .await
        .unwrap()
}

/// A local phase: the reservation row of `key` and the phase's checkpoint
/// in one sqlx transaction, committed if `commit`, rolled back otherwise.
async fn reserve(
    store: &PostgresStore,
    phases: &idem_core::Phases,
    table: &str,
    key: &str,
    commit: bool,
) -> Result<idem_core::Transition, Error> {
    let mut tx = store.pool().begin().await.unwrap();
    let sql = format!("INSERT INTO {table} (order_key) VALUES ($1) RETURNING id");
    let id: i64 = sqlx::query_scalar(AssertSqlSafe(sql))
        .bind(key)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    let t = phases.prepare_local("reserve", &id)?;
    // On error the transaction is dropped: rolled back.
    store.apply_in(&mut tx, &t).await?;
    if commit {
        tx.commit().await.unwrap();
    } else {
        tx.rollback().await.unwrap();
    }
    Ok(t)
}

/// A local phase commits its business row and its checkpoint in one
/// transaction; a rollback leaves neither; the same checkpoint cannot be
/// applied twice; a holder whose lease was taken over cannot apply one, and
/// its business row rolls back; the taker resumes after the phase.
async fn tx_local_phase(factory: Arc<Factory>) {
    let (store, clock, engine) = setup(&factory).await;
    let table = reservations_table(&store).await;
    let lease = proceed(&engine, "order-1").await;
    let mut phases = engine.phases(&lease).unwrap();

    // Rollback: neither the row nor the checkpoint.
    reserve(&store, &phases, &table, "order-1", false)
        .await
        .unwrap();
    assert_eq!(reservations(&store, &table, "order-1").await, 0);
    let record = stored(&store, lease.key(), clock.now()).await;
    assert_eq!(record.record.checkpoint, None);

    // Commit: both, and the record stays in flight under the same lease.
    let applied = reserve(&store, &phases, &table, "order-1", true)
        .await
        .unwrap();
    phases.applied(&applied).unwrap();
    assert_eq!(reservations(&store, &table, "order-1").await, 1);
    let record = stored(&store, lease.key(), clock.now()).await;
    assert_eq!(record, applied.next);
    assert!(matches!(record.record.state, State::InFlight { token, .. } if token == lease.token()));
    let checkpoint = record.record.checkpoint.clone().expect("a checkpoint");
    assert_eq!((checkpoint.seq, checkpoint.step.as_str()), (1, "reserve"));
    assert!(phases.is_recorded("reserve"));

    // The same checkpoint again: it would not move forward.
    let mut tx = store.pool().begin().await.unwrap();
    match store.apply_in(&mut tx, &applied).await {
        Err(Error::LeaseLost(Fenced::Backwards {
            stored: 1,
            offered: 1,
        })) => {}
        other => panic!("expected LeaseLost(Backwards), got {other:?}"),
    }
    drop(tx);

    // The lease lapses and another holder takes over: the old holder's next
    // local phase is refused, and its row rolls back.
    clock.advance(LEASE + Duration::from_millis(1));
    let taker = proceed(&engine, "order-1").await;
    match reserve(&store, &phases, &table, "order-1", true).await {
        Err(Error::LeaseLost(Fenced::TakenOver)) => {}
        other => panic!("expected LeaseLost(TakenOver), got {other:?}"),
    }
    assert_eq!(
        reservations(&store, &table, "order-1").await,
        1,
        "the stale row rolled back"
    );

    // The taker resumes after the committed phase.
    let resumed = engine.phases(&taker).unwrap();
    assert_eq!(resumed.resumed_from(), Some("reserve"));
    let id: i64 = resumed.result("reserve").unwrap().expect("recorded");
    assert!(id > 0);
    engine
        .complete(&taker, Outcome::new(&b"ordered"[..]))
        .await
        .unwrap();
    replays(&engine, "order-1", b"ordered").await;
    let done = stored(&store, taker.key(), clock.now()).await;
    assert_eq!(
        done.record.checkpoint, None,
        "completion drops the checkpoint"
    );
}

/// The record keys of `found` (from their checkpoints).
fn keys_of(found: &[Versioned]) -> Vec<RecordKey> {
    found
        .iter()
        .map(|v| {
            v.record
                .checkpoint
                .as_ref()
                .expect("a checkpoint")
                .record_key()
        })
        .collect()
}

/// `abandoned` returns exactly the live in-flight records whose lease
/// lapsed and that carry a checkpoint, earliest lapse first, at most
/// `limit`, and only from the store's own schema.
async fn abandoned_only_lapsed_checkpointed(factory: Arc<Factory>) {
    let (store, clock, engine) = setup(&factory).await;
    assert!(store.capabilities().abandoned);
    let other = open(&factory).await;
    let other_engine = idem_testkit::fixtures::engine(other.clone(), &clock);

    let first = proceed(&engine, "first").await;
    engine.checkpoint(&first, "a", &b"1"[..]).await.unwrap();
    let _plain = proceed(&engine, "no-checkpoint").await;
    let elsewhere = proceed(&other_engine, "other-schema").await;
    other_engine
        .checkpoint(&elsewhere, "a", &b"1"[..])
        .await
        .unwrap();
    clock.advance(Duration::from_secs(1));
    let second = proceed(&engine, "second").await;
    engine.checkpoint(&second, "a", &b"2"[..]).await.unwrap();
    let done = proceed(&engine, "completed").await;
    engine.checkpoint(&done, "a", &b"3"[..]).await.unwrap();
    engine
        .complete(&done, Outcome::new(&b"ok"[..]))
        .await
        .unwrap();
    let retry = proceed(&engine, "failed-retryable").await;
    engine.checkpoint(&retry, "a", &b"4"[..]).await.unwrap();
    engine
        .fail(&retry, FailureKind::Retryable, Outcome::new(&b"later"[..]))
        .await
        .unwrap();
    clock.advance(Duration::from_secs(11));
    let live = proceed(&engine, "live-lease").await;
    engine.checkpoint(&live, "a", &b"5"[..]).await.unwrap();

    let now = clock.now();
    let found = store.abandoned(now, 100).await.unwrap();
    assert_eq!(keys_of(&found), [rkey("first"), rkey("second")]);
    for v in &found {
        let key = v.record.checkpoint.as_ref().unwrap().record_key();
        assert_eq!(*v, stored(&store, &key, now).await, "as stored");
        assert!(idem_core::store::is_abandoned(&v.record, now));
    }
    assert_eq!(store.abandoned(now, 1).await.unwrap(), found[..1]);
    assert_eq!(store.abandoned(now, 0).await.unwrap(), []);
    assert_eq!(
        keys_of(&other.abandoned(now, 100).await.unwrap()),
        [rkey("other-schema")]
    );
    let live_deadline = match stored(&store, live.key(), now).await.record.state {
        State::InFlight { lease_deadline, .. } => lease_deadline,
        other => panic!("{other:?}"),
    };
    assert_eq!(store.abandoned(live_deadline, 100).await.unwrap().len(), 3);
    let later = T0.plus(Duration::from_secs(61));
    assert_eq!(
        keys_of(&store.abandoned(later, 100).await.unwrap()),
        [rkey("live-lease")],
        "the others expired"
    );
}

/// An in-flight record under `key` (token 1) whose lease lapses at
/// `deadline`, expiring at `expires`, with a checkpoint.
fn in_flight_with_checkpoint(key: &RecordKey, deadline: Timestamp, expires: Timestamp) -> Record {
    Record::from_parts(
        Fingerprint::of(b"req"),
        State::InFlight {
            token: FencingToken::from_u128(1),
            lease_deadline: deadline,
        },
        Timestamp::EPOCH,
        Timestamp::EPOCH,
        expires,
        1,
    )
    .with_checkpoint(Some(Checkpoint::new(key, 1, "reserve", &b"state"[..])))
}

/// Deadlines on both sides of 2^63 ms (stored as negative BIGINTs) are
/// ordered and compared as unsigned numbers.
async fn abandoned_unsigned(factory: Arc<Factory>) {
    let store = open(&factory).await;
    let deadlines = [5_u64, 1 << 62, (1 << 63) + 5, 1 << 63, u64::MAX - 10];
    for (i, d) in deadlines.iter().enumerate() {
        let k = rkey(&format!("d{i}"));
        let record = in_flight_with_checkpoint(
            &k,
            Timestamp::from_millis(*d),
            Timestamp::from_millis(u64::MAX),
        );
        let v = Versioned::new(Revision::from_u64(i as u64 + 1), record);
        store
            .insert_if_absent(&k, &v, Timestamp::EPOCH)
            .await
            .unwrap();
    }
    let deadline_of = |v: &Versioned| match v.record.state {
        State::InFlight { lease_deadline, .. } => lease_deadline.as_millis(),
        _ => unreachable!(),
    };
    for now in [0, 5, 1 << 62, (1 << 63) + 4, (1 << 63) + 5, u64::MAX - 1] {
        let found = store
            .abandoned(Timestamp::from_millis(now), 100)
            .await
            .unwrap();
        let got: Vec<u64> = found.iter().map(deadline_of).collect();
        let mut want: Vec<u64> = deadlines.iter().copied().filter(|d| *d <= now).collect();
        want.sort_unstable();
        assert_eq!(got, want, "now = {now}");
    }
}

/// A record whose checkpoint does not decode is skipped (and logged) by
/// `abandoned`, so the completer goes on with every other key; `get` still
/// reports it as `Corrupt`, never as absent.
async fn abandoned_corrupt(factory: Arc<Factory>) {
    let store = open(&factory).await;
    let (k, other) = (rkey("damaged"), rkey("intact"));
    for key in [&k, &other] {
        let record = in_flight_with_checkpoint(key, T0, T0.plus(Duration::from_secs(60)));
        store
            .insert_if_absent(key, &Versioned::new(Revision::from_u64(1), record), T0)
            .await
            .unwrap();
    }
    let now = T0.plus(Duration::from_secs(1));
    assert_eq!(store.abandoned(now, 10).await.unwrap().len(), 2);
    let sql = format!(
        "UPDATE {} SET checkpoint = '\\x01ff'::bytea WHERE digest = $1",
        store.table()
    );
    sqlx::query(AssertSqlSafe(sql))
        .bind(&k.digest()[..])
        .execute(store.pool())
        .await
        .unwrap();
    let got = store.abandoned(now, 10).await.unwrap();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        got[0].record.checkpoint.as_ref().unwrap().record_key(),
        other
    );
    let read = store.get(&k, now).await;
    assert!(matches!(read, Err(StoreError::Corrupt { .. })), "{read:?}");
}

/// The checkpoint counts against the record size limit.
async fn large_checkpoint_rejected(factory: Arc<Factory>) {
    let base = open(&factory).await;
    let store = PostgresStore::builder()
        .with_table(base.table().clone())
        .with_max_record_bytes(1024)
        .open(base.pool().clone());
    let k = rkey("heavy");
    let mut record = in_flight_with_checkpoint(&k, T0, T0.plus(Duration::from_secs(60)));
    record.checkpoint = Some(Checkpoint::new(&k, 1, "reserve", vec![0u8; 2048]));
    let got = store
        .insert_if_absent(&k, &Versioned::new(Revision::from_u64(1), record), T0)
        .await;
    assert!(matches!(got, Err(StoreError::Rejected { .. })), "{got:?}");
    assert_eq!(store.get(&k, T0).await.unwrap(), None);
}

/// 10,000 records, 100 of them abandoned (and, among the others, records
/// in flight with a live lease, lapsed without a checkpoint, expired with a
/// checkpoint, failed retryably with one, completed): `abandoned` returns
/// exactly the 100, in lapse order. Prints how long one call takes (no
/// timing is asserted).
async fn abandoned_10000(factory: Arc<Factory>) {
    let store = open(&factory).await;
    let now = T0.plus(Duration::from_secs(3600));
    let far = now.plus(Duration::from_secs(86_400));
    let records: Vec<(RecordKey, Versioned)> = (0..10_000_u64)
        .map(|i| {
            let k = rkey(&format!("r{i}"));
            let lapsed = T0.plus(Duration::from_millis(i));
            let record = match i % 100 {
                0 => in_flight_with_checkpoint(&k, lapsed, far),
                1 => in_flight_with_checkpoint(&k, now.plus(LEASE), far),
                2 => in_flight_with_checkpoint(&k, lapsed, far).with_checkpoint(None),
                3 => in_flight_with_checkpoint(&k, lapsed, now),
                4 => {
                    let mut r = in_flight_with_checkpoint(&k, lapsed, far);
                    r.state = State::Failed {
                        token: FencingToken::from_u128(1),
                        kind: FailureKind::Retryable,
                        outcome: Outcome::default(),
                    };
                    r
                }
                _ => completed(i + 1, 1, T0, 86_400 * 2, b"done").record,
            };
            (k, Versioned::new(Revision::from_u64(i + 1), record))
        })
        .collect();
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in records.chunks(1_000) {
        let (store, chunk) = (store.clone(), chunk.to_vec());
        tasks.spawn(async move {
            for (k, v) in chunk {
                let inserted = store.insert_if_absent(&k, &v, T0).await.unwrap();
                assert_eq!(inserted, InsertOutcome::Inserted);
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let table = store.table().clone();
    assert_eq!(rows(&store, table.schema(), table.table()).await, 10_000);
    sqlx::query(AssertSqlSafe(format!("ANALYZE {table}")))
        .execute(store.pool())
        .await
        .unwrap();

    let want: Vec<RecordKey> = (0..100).map(|i| rkey(&format!("r{}", i * 100))).collect();
    let found = store.abandoned(now, 100).await.unwrap();
    assert_eq!(keys_of(&found), want);
    assert_eq!(store.abandoned(now, 10).await.unwrap(), found[..10]);

    let mut times = Vec::new();
    for _ in 0..50 {
        let started = Instant::now();
        let found = store.abandoned(now, 100).await.unwrap();
        times.push(started.elapsed());
        assert_eq!(found.len(), 100);
    }
    times.sort_unstable();
    let plan: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
        "EXPLAIN (ANALYZE, BUFFERS) SELECT digest FROM {table} \
         WHERE state = 'in_flight' AND checkpoint IS NOT NULL \
         AND lease_deadline BETWEEN 0 AND $1 ORDER BY lease_deadline LIMIT 100"
    )))
    .bind(now.as_millis().cast_signed())
    .fetch_all(store.pool())
    .await
    .unwrap();
    eprintln!(
        "postgres abandoned(now, 100) over 10,000 records (100 abandoned): median {:?}, min {:?}, max {:?}\n  {}",
        times[times.len() / 2],
        times[0],
        times[times.len() - 1],
        plan.join("\n  ")
    );
}

/// Every claim path writes and reads the checkpoint: a new key, a key over
/// an expired record, and a claim that finds a live record, in each
/// [`ClaimMode`]; a compare-and-swap too.
async fn checkpoints_in_every_claim_mode(factory: Arc<Factory>) {
    let base = open(&factory).await;
    let later = T0.plus(Duration::from_secs(2));
    for (n, mode) in [
        ClaimMode::SingleStatement,
        ClaimMode::ReadFirst,
        ClaimMode::Adaptive,
    ]
    .into_iter()
    .enumerate()
    {
        let store = with_mode(&base, mode);
        let rev = |i: u64| Revision::from_u64(100 * n as u64 + i);
        let fresh = rkey(&format!("fresh-{n}"));
        let v = Versioned::new(
            rev(1),
            in_flight_with_checkpoint(&fresh, later, later.plus(Duration::from_secs(60))),
        );
        assert_eq!(
            store.insert_if_absent(&fresh, &v, T0).await.unwrap(),
            InsertOutcome::Inserted,
            "{mode:?}"
        );
        assert_eq!(
            store.get(&fresh, T0).await.unwrap().as_ref(),
            Some(&v),
            "{mode:?}"
        );
        let other = Versioned::new(rev(2), v.record.clone().with_checkpoint(None));
        assert_eq!(
            store.insert_if_absent(&fresh, &other, T0).await.unwrap(),
            InsertOutcome::Exists(v.clone()),
            "{mode:?}: the live record, with its checkpoint"
        );

        let over = rkey(&format!("over-expired-{n}"));
        let short = completed(rev(3).as_u64(), 1, T0, 1, b"short");
        store.insert_if_absent(&over, &short, T0).await.unwrap();
        let v = Versioned::new(
            rev(4),
            in_flight_with_checkpoint(&over, later, later.plus(Duration::from_secs(60))),
        );
        assert_eq!(
            store.insert_if_absent(&over, &v, later).await.unwrap(),
            InsertOutcome::Inserted,
            "{mode:?}"
        );
        assert_eq!(
            store.get(&over, later).await.unwrap().as_ref(),
            Some(&v),
            "{mode:?}"
        );

        let mut next = v.record.clone();
        next.checkpoint = Some(Checkpoint::new(&over, 2, "charge", &b"ch_1"[..]));
        let next = Versioned::new(rev(5), next);
        assert_eq!(
            store
                .compare_and_swap(&over, &v, &next, later)
                .await
                .unwrap(),
            SwapOutcome::Swapped
        );
        assert_eq!(store.get(&over, later).await.unwrap(), Some(next));
    }
}
