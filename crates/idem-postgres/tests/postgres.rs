//! PostgreSQL-specific cases: completion inside the caller's transaction
//! (commit and rollback), races across pools, the read-only replay path,
//! corrupt rows, migrations, and pool / connection failures (through the
//! `idem-faults` proxy).
//!
//! Same rules as the conformance target: server at `IDEM_POSTGRES_URL`
//! (default `postgres://postgres@127.0.0.1:5432/test`), a schema per store,
//! IGNORED with a banner when unreachable, FAILED under `CI=true` /
//! `IDEM_REQUIRE_BACKENDS=1`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use idem_conformance::{Requires, Suite};
use idem_core::{
    Begin, Clock, Engine, Error, FailureKind, Fenced, FencingToken, Fingerprint, IdempotencyKey,
    Inserted, Lease, ManualClock, Outcome, Policy, Record, RecordKey, ReplayKind, Revision, Scope,
    State, Store, StoreError, Swapped, Timestamp, Versioned,
};
use idem_faults::{Fault, FaultProxy};
use idem_postgres::sqlx::postgres::PgConnectOptions;
use idem_postgres::sqlx::{self, AssertSqlSafe, Row};
use idem_postgres::{ClaimMode, PostgresStore, TableName};
use support::{Factory, count};

fn main() -> std::process::ExitCode {
    statements::install();
    Suite::empty(Factory::new())
        .case(
            "store::one_statement_per_step",
            Requires::Always,
            one_statement_per_step,
        )
        .case(
            "store::read_first_statements_per_step",
            Requires::Always,
            read_first_statements_per_step,
        )
        .case(
            "tx::commit_stores_record_and_business_row",
            Requires::Always,
            tx_commit,
        )
        .case(
            "tx::rollback_then_release_runs_once",
            Requires::Always,
            tx_rollback_then_release,
        )
        .case(
            "tx::rollback_then_lease_expiry_runs_once",
            Requires::Always,
            tx_rollback_then_expiry,
        )
        .case(
            "tx::lost_lease_is_refused_and_changes_nothing",
            Requires::Always,
            tx_lost_lease,
        )
        .case(
            "tx::heartbeat_before_apply_is_fine",
            Requires::Always,
            tx_heartbeat_before_apply,
        )
        .case(
            "tx::permanent_failure_in_transaction_is_replayed",
            Requires::Always,
            tx_fail,
        )
        .case(
            "tx::duplicates_do_not_block_on_an_open_transaction",
            Requires::Always,
            tx_duplicates_do_not_block,
        )
        .case(
            "race::two_pools_64_tasks_pay_once",
            Requires::Always,
            race_two_pools_pay_once,
        )
        .case(
            "race::two_pools_insert_over_expired_one_wins",
            Requires::Always,
            race_insert_over_expired,
        )
        .case(
            "race::two_pools_cas_losers_see_the_winner",
            Requires::Always,
            race_cas_losers_see_winner,
        )
        .case(
            "race::cas_behind_a_concurrent_commit_rereads",
            Requires::Always,
            cas_behind_a_concurrent_commit,
        )
        .case(
            "race::insert_behind_a_concurrent_insert_rereads",
            Requires::Always,
            insert_behind_a_concurrent_insert,
        )
        .case(
            "race::insert_over_expired_behind_a_concurrent_claim_rereads",
            Requires::Always,
            insert_over_expired_behind_a_concurrent_claim,
        )
        .case(
            "race::read_first_insert_behind_a_concurrent_insert_rereads",
            Requires::Always,
            read_first_insert_behind_a_concurrent_insert,
        )
        .case(
            "race::read_first_insert_over_expired_behind_a_concurrent_claim_rereads",
            Requires::Always,
            read_first_insert_over_expired_behind_a_concurrent_claim,
        )
        .case(
            "race::concurrent_purges_remove_each_record_once",
            Requires::Always,
            race_concurrent_purges,
        )
        .case(
            "store::replay_path_writes_nothing",
            Requires::Always,
            replay_path_writes_nothing,
        )
        .case(
            "store::scope_columns_are_readable",
            Requires::Always,
            scope_columns_are_readable,
        )
        .case(
            "store::corrupt_rows_of_every_kind",
            Requires::Always,
            corrupt_rows_of_every_kind,
        )
        .case(
            "store::missing_table_says_migrate",
            Requires::Always,
            missing_table_says_migrate,
        )
        .case(
            "migrate::idempotent_and_concurrent",
            Requires::Always,
            migrate_idempotent,
        )
        .case(
            "migrate::newer_schema_is_rejected_and_lock_released",
            Requires::Always,
            migrate_newer_rejected,
        )
        .case(
            "pool::unreachable_server_is_transient",
            Requires::Always,
            unreachable_is_transient,
        )
        .case(
            "pool::closed_pool_is_transient",
            Requires::Always,
            closed_pool_is_transient,
        )
        .case(
            "pool::exhausted_pool_times_out_as_transient",
            Requires::Always,
            exhausted_pool,
        )
        .case(
            "faults::cut_connections_are_transient_then_recover",
            Requires::Always,
            cut_connections,
        )
        .case(
            "faults::black_hole_times_out_then_recovers",
            Requires::Always,
            black_hole,
        )
        .case(
            "faults::lost_reply_on_complete_then_retry_succeeds",
            Requires::Always,
            lost_reply_on_complete,
        )
        .run()
}

// ---------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------

const T0: Timestamp = Timestamp::from_millis(1_800_000_000_000);
const LEASE: Duration = Duration::from_secs(10);

fn policy() -> Policy {
    Policy::default()
        .with_lease(LEASE)
        .with_ttl(Duration::from_secs(60))
}

fn engine(store: PostgresStore, clock: &ManualClock) -> Engine<PostgresStore, ManualClock> {
    Engine::with_clock(store, clock.clone())
        .with_policy(policy())
        .expect("valid policy")
}

async fn open(factory: &Factory) -> PostgresStore {
    factory.store().await.expect("open a store")
}

fn scope() -> Scope {
    Scope::tenant("acme").with_operation("payments.create")
}

fn ikey(s: &str) -> IdempotencyKey {
    IdempotencyKey::parse(s).unwrap()
}

fn rkey(s: &str) -> RecordKey {
    RecordKey::new(&scope(), &ikey(s))
}

const REQUEST: &[u8] = br#"{"amount_cents":1000,"to":"bob"}"#;

fn fp() -> Fingerprint {
    Fingerprint::of(REQUEST)
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

async fn payment_rows(store: &PostgresStore, table: &str, key: &str) -> i64 {
    let sql = format!("SELECT count(*) FROM {table} WHERE idem_key = $1");
    sqlx::query_scalar::<_, i64>(AssertSqlSafe(sql))
        .bind(key)
        .fetch_one(store.pool())
        .await
        .expect("count payments")
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

async fn proceed(engine: &Engine<PostgresStore, ManualClock>, key: &str) -> Lease {
    match engine
        .begin(&scope(), &ikey(key), fp())
        .await
        .expect("begin")
    {
        Begin::Proceed(lease) => lease,
        other => panic!("expected Proceed for {key}, got {other:?}"),
    }
}

fn assert_replays(begun: Begin, want: &[u8], kind: ReplayKind) {
    match begun {
        Begin::Replay(replay) => {
            assert_eq!(replay.outcome.as_bytes(), want, "replayed outcome");
            assert_eq!(replay.kind, kind);
        }
        other => panic!("expected a replay, got {other:?}"),
    }
}

fn assert_transient(result: Result<impl std::fmt::Debug, StoreError>, what: &str) {
    match result {
        Err(e @ StoreError::Unavailable { .. }) => assert!(e.is_transient(), "{what}"),
        other => panic!("{what}: expected StoreError::Unavailable, got {other:?}"),
    }
}

/// A loopback port nothing listens on.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn options(factory: &Factory) -> PgConnectOptions {
    PgConnectOptions::from_str(factory.url()).unwrap()
}

/// A proxy in front of the test server (resolved from its URL).
async fn proxy(factory: &Factory) -> FaultProxy {
    let opts = options(factory);
    let addr = tokio::net::lookup_host((opts.get_host(), opts.get_port()))
        .await
        .expect("resolve the server")
        .next()
        .expect("an address");
    FaultProxy::start(addr).await.expect("start proxy")
}

/// A store over `table` through `proxy`, bounded by `timeout`.
fn store_via(
    factory: &Factory,
    proxy: &FaultProxy,
    table: &TableName,
    timeout: Duration,
) -> PostgresStore {
    let opts = options(factory)
        .host(&proxy.addr().ip().to_string())
        .port(proxy.addr().port());
    let pool = PostgresStore::pool_options()
        // One connection: the statements a test warms up are prepared on it.
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy_with(opts);
    PostgresStore::with_table(pool, table.clone()).with_timeout(Some(timeout))
}

/// Waits until every connection of `store`'s pool is back and idle. sqlx
/// pings a connection when it returns to the pool, in a background task;
/// a fault switched on during that ping would hit the ping, not the call
/// under test.
async fn settled(store: &PostgresStore) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.pool().num_idle() < store.pool().size() as usize {
        assert!(
            Instant::now() < deadline,
            "the pool's connections must come back"
        );
        tokio::task::yield_now().await;
    }
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

fn completed(rev: u64, token: u128, now: Timestamp, ttl_secs: u64, outcome: &[u8]) -> Versioned {
    Versioned {
        revision: Revision::from_u64(rev),
        record: Record {
            fingerprint: fp(),
            state: State::Completed {
                token: FencingToken::from_u128(token),
                outcome: Outcome::new(outcome.to_vec()),
            },
            created_at: now,
            updated_at: now,
            expires_at: now.plus(Duration::from_secs(ttl_secs)),
            attempts: 1,
        },
    }
}

/// Spawns `n` tasks, releases them together with a barrier, returns results in order.
async fn race<T: Send + 'static, Fut>(
    n: usize,
    task: impl Fn(usize) -> Fut + Send + Sync + 'static,
) -> Vec<T>
where
    Fut: std::future::Future<Output = T> + Send + 'static,
{
    let barrier = Arc::new(tokio::sync::Barrier::new(n));
    let task = Arc::new(task);
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let (barrier, task) = (barrier.clone(), task.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                task(i).await
            })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for h in handles {
        out.push(
            h.await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic())),
        );
    }
    out
}

// ---------------------------------------------------------------------------
// Completion inside the caller's transaction.
// ---------------------------------------------------------------------------

/// Commit: the payment row and the completed record are both there, and a
/// retry replays the outcome without paying again.
async fn tx_commit(factory: Arc<Factory>) {
    let store = open(&factory).await;
    let table = payments(&store).await;
    let clock = ManualClock::new(T0);
    let engine = engine(store.clone(), &clock);
    let lease = proceed(&engine, "pay-1").await;
    pay(&engine, &lease, &table, "pay-1", true)
        .await
        .expect("pay");
    assert_eq!(payment_rows(&store, &table, "pay-1").await, 1);
    let stored = store
        .get(&rkey("pay-1"), clock.now())
        .await
        .unwrap()
        .expect("record");
    assert!(
        matches!(&stored.record.state, State::Completed { token, outcome }
            if *token == lease.token() && outcome.as_bytes() == b"paid pay-1"),
        "the record must be completed by the holder: {stored:?}"
    );
    let again = engine.begin(&scope(), &ikey("pay-1"), fp()).await.unwrap();
    assert_replays(again, b"paid pay-1", ReplayKind::Completed);
    assert_eq!(
        payment_rows(&store, &table, "pay-1").await,
        1,
        "a replay pays nothing"
    );
}

/// Rollback: no payment, the key stays claimed by the same lease (retries
/// get "in progress"); after the holder releases it, a retry pays, and
/// there is exactly one payment in the end.
async fn tx_rollback_then_release(factory: Arc<Factory>) {
    let store = open(&factory).await;
    let table = payments(&store).await;
    let clock = ManualClock::new(T0);
    let engine = engine(store.clone(), &clock);
    let first = proceed(&engine, "pay-2").await;
    pay(&engine, &first, &table, "pay-2", false)
        .await
        .expect("apply before rollback");
    assert_eq!(
        payment_rows(&store, &table, "pay-2").await,
        0,
        "rolled back"
    );
    let stored = store
        .get(&rkey("pay-2"), clock.now())
        .await
        .unwrap()
        .expect("record");
    assert!(
        matches!(stored.record.state, State::InFlight { token, .. } if token == first.token()),
        "after a rollback the key stays claimed by the same lease: {stored:?}"
    );
    assert!(
        matches!(
            engine.begin(&scope(), &ikey("pay-2"), fp()).await.unwrap(),
            Begin::InProgress { .. }
        ),
        "a retry meanwhile is told the key is in progress"
    );
    engine.release(&first).await.expect("release");
    let second = proceed(&engine, "pay-2").await;
    assert_ne!(second.token(), first.token());
    pay(&engine, &second, &table, "pay-2", true)
        .await
        .expect("pay");
    assert_eq!(
        payment_rows(&store, &table, "pay-2").await,
        1,
        "exactly one payment"
    );
    assert_replays(
        engine.begin(&scope(), &ikey("pay-2"), fp()).await.unwrap(),
        b"paid pay-2",
        ReplayKind::Completed,
    );
}

/// Rollback, then the holder vanishes: once the lease lapses a retry takes
/// over and pays; the first holder's transition is refused afterwards.
/// Exactly one payment.
async fn tx_rollback_then_expiry(factory: Arc<Factory>) {
    let store = open(&factory).await;
    let table = payments(&store).await;
    let clock = ManualClock::new(T0);
    let engine = engine(store.clone(), &clock);
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
    assert_eq!(
        payment_rows(&store, &table, "pay-3").await,
        1,
        "exactly one payment"
    );
    assert_replays(
        engine.begin(&scope(), &ikey("pay-3"), fp()).await.unwrap(),
        b"paid pay-3",
        ReplayKind::Completed,
    );
}

/// A transition whose lease was taken over or whose record is gone is
/// refused with the right reason and writes nothing.
async fn tx_lost_lease(factory: Arc<Factory>) {
    let store = open(&factory).await;
    let clock = ManualClock::new(T0);
    let engine = engine(store.clone(), &clock);
    // Taken over while still in flight.
    let first = proceed(&engine, "lost-1").await;
    let stale = engine
        .prepare_complete(&first, Outcome::new(&b"old"[..]))
        .unwrap();
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

/// The transition checks the fencing token, not the revision: a heartbeat
/// between prepare and apply does not make it fail.
async fn tx_heartbeat_before_apply(factory: Arc<Factory>) {
    let store = open(&factory).await;
    let clock = ManualClock::new(T0);
    let engine = engine(store.clone(), &clock);
    let lease = proceed(&engine, "beat").await;
    let done = engine
        .prepare_complete(&lease, Outcome::new(&b"ok"[..]))
        .unwrap();
    clock.advance(Duration::from_secs(3));
    engine.extend(&lease).await.expect("heartbeat");
    assert_ne!(lease.record().revision, done.next.revision);
    let mut tx = store.pool().begin().await.unwrap();
    store
        .apply_in(&mut tx, &done)
        .await
        .expect("apply after a heartbeat");
    tx.commit().await.unwrap();
    assert_replays(
        engine.begin(&scope(), &ikey("beat"), fp()).await.unwrap(),
        b"ok",
        ReplayKind::Completed,
    );
}

/// A permanent failure stored in the caller's transaction is replayed.
async fn tx_fail(factory: Arc<Factory>) {
    let store = open(&factory).await;
    let clock = ManualClock::new(T0);
    let engine = engine(store.clone(), &clock);
    let lease = proceed(&engine, "declined").await;
    let failed = engine
        .prepare_fail(
            &lease,
            FailureKind::Permanent,
            Outcome::new(&b"card declined"[..]),
        )
        .unwrap();
    let mut tx = store.pool().begin().await.unwrap();
    store.apply_in(&mut tx, &failed).await.unwrap();
    tx.commit().await.unwrap();
    assert_replays(
        engine
            .begin(&scope(), &ikey("declined"), fp())
            .await
            .unwrap(),
        b"card declined",
        ReplayKind::Failed,
    );
}

/// While a completion sits in an open transaction (its row locked),
/// duplicates are answered at once ("in progress": the completion is not
/// committed), not blocked; after the commit they replay.
async fn tx_duplicates_do_not_block(factory: Arc<Factory>) {
    let store = open(&factory).await;
    let clock = ManualClock::new(T0);
    let engine = engine(store.clone(), &clock);
    let lease = proceed(&engine, "open-tx").await;
    let done = engine
        .prepare_complete(&lease, Outcome::new(&b"done"[..]))
        .unwrap();
    let mut tx = store.pool().begin().await.unwrap();
    store.apply_in(&mut tx, &done).await.unwrap();
    let dup = tokio::time::timeout(
        Duration::from_secs(5),
        engine.begin(&scope(), &ikey("open-tx"), fp()),
    )
    .await
    .expect("a duplicate must not wait for the open transaction")
    .unwrap();
    assert!(matches!(dup, Begin::InProgress { .. }), "got {dup:?}");
    tx.commit().await.unwrap();
    assert_replays(
        engine
            .begin(&scope(), &ikey("open-tx"), fp())
            .await
            .unwrap(),
        b"done",
        ReplayKind::Completed,
    );
}

// ---------------------------------------------------------------------------
// Races.
// ---------------------------------------------------------------------------

/// 64 tasks over two stores with separate pools (two application servers)
/// race to pay with one key: exactly one pays, in one transaction with its
/// record; every other task is told "in progress" or gets the replay.
async fn race_two_pools_pay_once(factory: Arc<Factory>) {
    let a = open(&factory).await;
    let b = factory.second(&a).await.unwrap();
    let table = Arc::new(payments(&a).await);
    let clock = ManualClock::new(T0);
    let engines = Arc::new([
        Arc::new(engine(a.clone(), &clock)),
        Arc::new(engine(b, &clock)),
    ]);
    let paid = Arc::new(AtomicUsize::new(0));
    let results = {
        let (engines, paid, table) = (engines.clone(), paid.clone(), table.clone());
        race(64, move |i| {
            let engine = engines[i % 2].clone();
            let (paid, table) = (paid.clone(), table.clone());
            async move {
                match engine.begin(&scope(), &ikey("storm"), fp()).await.unwrap() {
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
                    Begin::Mismatch => panic!("same request, no mismatch"),
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
    assert_eq!(
        payment_rows(&a, &table, "storm").await,
        1,
        "exactly one payment row"
    );
    assert_replays(
        engines[1]
            .begin(&scope(), &ikey("storm"), fp())
            .await
            .unwrap(),
        b"paid storm",
        ReplayKind::Completed,
    );
}

/// 32 tasks over two pools claim a key whose record expired: exactly one
/// replaces it; every loser sees the winner's record (never the expired
/// one), even when the winner committed after the loser's snapshot.
async fn race_insert_over_expired(factory: Arc<Factory>) {
    let a = Arc::new(open(&factory).await);
    let b = Arc::new(factory.second(&a).await.unwrap());
    let k = rkey("expired-race");
    let old = completed(1, 1, T0, 1, b"old");
    assert_eq!(
        a.insert_if_absent(&k, &old, T0).await.unwrap(),
        Inserted::Inserted
    );
    let now = T0.plus(Duration::from_secs(5));
    let candidates: Vec<Versioned> = (0..32)
        .map(|i| completed(100 + i, 100 + u128::from(i), now, 60, b"new"))
        .collect();
    let results = {
        let (a, b, k, candidates) = (a.clone(), b.clone(), k.clone(), candidates.clone());
        race(32, move |i| {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            let (k, rec) = (k.clone(), candidates[i].clone());
            async move { store.insert_if_absent(&k, &rec, now).await.unwrap() }
        })
        .await
    };
    let winners: Vec<usize> = (0..32)
        .filter(|i| results[*i] == Inserted::Inserted)
        .collect();
    assert_eq!(
        winners.len(),
        1,
        "exactly one claim over the expired record: {winners:?}"
    );
    let winner = &candidates[winners[0]];
    for (i, r) in results.iter().enumerate() {
        if let Inserted::Exists(seen) = r {
            assert_eq!(seen, winner, "loser {i} must see the winner's record");
        }
    }
    assert_eq!(a.get(&k, now).await.unwrap().as_ref(), Some(winner));
}

/// 32 tasks over two pools swap the same expected revision: exactly one
/// wins; every loser's conflict carries the winner's record, never the
/// revision it expected (the stale-snapshot case is re-read).
async fn race_cas_losers_see_winner(factory: Arc<Factory>) {
    let a = Arc::new(open(&factory).await);
    let b = Arc::new(factory.second(&a).await.unwrap());
    let k = rkey("cas-race");
    let base = completed(7, 7, T0, 60, b"base");
    a.insert_if_absent(&k, &base, T0).await.unwrap();
    let candidates: Vec<Versioned> = (0..32)
        .map(|i| completed(1000 + i, 7, T0, 60, format!("v{i}").as_bytes()))
        .collect();
    let results = {
        let (a, b, k, candidates) = (a.clone(), b.clone(), k.clone(), candidates.clone());
        race(32, move |i| {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            let (k, rec) = (k.clone(), candidates[i].clone());
            async move {
                store
                    .compare_and_swap(&k, Revision::from_u64(7), &rec, T0)
                    .await
                    .unwrap()
            }
        })
        .await
    };
    let winners: Vec<usize> = (0..32)
        .filter(|i| results[*i] == Swapped::Swapped)
        .collect();
    assert_eq!(winners.len(), 1, "exactly one swap: {winners:?}");
    let winner = &candidates[winners[0]];
    for (i, r) in results.iter().enumerate() {
        if let Swapped::Conflict(seen) = r {
            assert_eq!(seen.as_ref(), Some(winner), "loser {i} must see the winner");
        }
    }
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

/// Runs `sql` (binding `digest`) in a new transaction and returns it, open.
async fn open_write(
    store: &PostgresStore,
    sql: String,
    digest: &RecordKey,
) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut tx = store.pool().begin().await.unwrap();
    let done = sqlx::query(AssertSqlSafe(sql))
        .bind(&digest.digest()[..])
        .execute(&mut *tx)
        .await
        .unwrap();
    assert_eq!(done.rows_affected(), 1);
    tx
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
        &k,
    )
    .await;
    let swap = {
        let (store, k) = (store.clone(), k.clone());
        tokio::spawn(async move {
            let next = completed(9, 7, T0, 60, b"mine");
            store
                .compare_and_swap(&k, Revision::from_u64(7), &next, T0)
                .await
        })
    };
    blocked_on_lock(&store).await;
    writer.commit().await.unwrap();
    let want = completed(8, 7, T0, 60, &[8]);
    assert_eq!(
        swap.await.unwrap().unwrap(),
        Swapped::Conflict(Some(want)),
        "the conflict must carry the committed record"
    );
}

/// Deterministic stale snapshot for a claim: another transaction has
/// inserted the key (here: renamed a row to it) but not committed when the
/// claim starts; the claim's INSERT waits, then conflicts with a live
/// record its snapshot cannot see. The result must be that record.
async fn insert_behind_a_concurrent_insert(factory: Arc<Factory>) {
    insert_behind_a_concurrent_insert_in(open(&factory).await).await;
}

/// The same in [`ClaimMode::ReadFirst`]: the read finds nothing, the insert
/// waits, then meets the committed record; the store reads again.
async fn read_first_insert_behind_a_concurrent_insert(factory: Arc<Factory>) {
    let store = open(&factory).await.with_claim_mode(ClaimMode::ReadFirst);
    insert_behind_a_concurrent_insert_in(store).await;
}

async fn insert_behind_a_concurrent_insert_in(store: PostgresStore) {
    let store = Arc::new(store);
    let (k, elsewhere) = (rkey("stale-insert"), rkey("stale-insert-source"));
    let theirs = completed(5, 5, T0, 60, b"theirs");
    store
        .insert_if_absent(&elsewhere, &theirs, T0)
        .await
        .unwrap();
    let t = store.table();
    let mut writer = store.pool().begin().await.unwrap();
    let moved = sqlx::query(AssertSqlSafe(format!(
        "UPDATE {t} SET digest = $1 WHERE digest = $2"
    )))
    .bind(&k.digest()[..])
    .bind(&elsewhere.digest()[..])
    .execute(&mut *writer)
    .await
    .unwrap();
    assert_eq!(moved.rows_affected(), 1);
    let claim = {
        let (store, k) = (store.clone(), k.clone());
        tokio::spawn(async move {
            store
                .insert_if_absent(&k, &completed(6, 6, T0, 60, b"mine"), T0)
                .await
        })
    };
    blocked_on_lock(&store).await;
    writer.commit().await.unwrap();
    assert_eq!(
        claim.await.unwrap().unwrap(),
        Inserted::Exists(theirs),
        "the claim must lose to the committed record and return it"
    );
}

/// Deterministic stale snapshot over an expired record: another
/// transaction revives it (not yet committed) when the claim starts; the
/// claim's snapshot sees it expired, its ON CONFLICT waits, then finds it
/// live. The result must be the revived record, not a replacement.
async fn insert_over_expired_behind_a_concurrent_claim(factory: Arc<Factory>) {
    insert_over_expired_behind_a_concurrent_claim_in(open(&factory).await).await;
}

/// The same in [`ClaimMode::ReadFirst`]: the read sees the record expired,
/// the insert's `ON CONFLICT` waits and then finds it live.
async fn read_first_insert_over_expired_behind_a_concurrent_claim(factory: Arc<Factory>) {
    let store = open(&factory).await.with_claim_mode(ClaimMode::ReadFirst);
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
        &k,
    )
    .await;
    let claim = {
        let (store, k) = (store.clone(), k.clone());
        tokio::spawn(async move {
            store
                .insert_if_absent(&k, &completed(6, 6, now, 60, b"mine"), now)
                .await
        })
    };
    blocked_on_lock(&store).await;
    writer.commit().await.unwrap();
    let mut revived = completed(4, 3, T0, 60, b"old");
    revived.record.expires_at = Timestamp::from_millis(live_until);
    assert_eq!(
        claim.await.unwrap().unwrap(),
        Inserted::Exists(revived),
        "the claim must not replace a record revived after its snapshot"
    );
}

/// 16 purgers over two pools, in small batches, while live records sit
/// beside expired ones: each expired record is removed exactly once (the
/// counts add up) and no live record is touched.
async fn race_concurrent_purges(factory: Arc<Factory>) {
    let a = Arc::new(open(&factory).await);
    let b = Arc::new(factory.second(&a).await.unwrap());
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
    let removed = {
        let (a, b) = (a.clone(), b.clone());
        race(16, move |i| {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            async move {
                let mut total = 0;
                loop {
                    let n = store.purge_expired(now, 7).await.unwrap();
                    assert!(n <= 7, "a batch never exceeds its limit");
                    total += n;
                    if n == 0 {
                        return total;
                    }
                }
            }
        })
        .await
    };
    // Rows locked by another purger are skipped, so a purger may stop early;
    // a final pass takes whatever is left.
    let rest = a.purge_expired(now, 1000).await.unwrap();
    assert_eq!(
        removed.iter().sum::<u64>() + rest,
        200,
        "each expired record removed once"
    );
    let table = a.table().to_string();
    assert_eq!(
        count(&a, &table).await,
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

/// Each engine step costs the statements the crate docs promise: one per
/// claim, replay, "in progress", heartbeat, completion, release, read and
/// purge batch, and inside the caller's transaction; two for a takeover.
async fn one_statement_per_step(factory: Arc<Factory>) {
    statements_per_step(open(&factory).await, 1).await;
}

/// The same steps in [`ClaimMode::ReadFirst`]: a claim of a new key is a
/// `SELECT` that finds nothing plus a plain insert; everything else, replays
/// and "in progress" included, is one statement.
async fn read_first_statements_per_step(factory: Arc<Factory>) {
    let store = open(&factory).await.with_claim_mode(ClaimMode::ReadFirst);
    assert_eq!(store.claim_mode(), ClaimMode::ReadFirst);
    statements_per_step(store, 2).await;
}

/// Counts the statements of each engine step; a claim of a new key takes
/// `new_claim`.
async fn statements_per_step(store: PostgresStore, new_claim: usize) {
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
    let dup = engine.begin(&scope(), &ikey("steps"), fp()).await.unwrap();
    assert!(matches!(dup, Begin::InProgress { .. }));
    step("duplicate while in flight", 1);
    engine.extend(&lease).await.unwrap();
    step("heartbeat", 1);
    engine
        .complete(&lease, Outcome::new(&b"ok"[..]))
        .await
        .unwrap();
    step("completion", 1);
    let replay = engine.begin(&scope(), &ikey("steps"), fp()).await.unwrap();
    assert_replays(replay, b"ok", ReplayKind::Completed);
    step("replay", 1);
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
    step("takeover (read by the claim, then compare-and-swap)", 2);
    let done = engine
        .prepare_complete(&taker, Outcome::new(&b"tx"[..]))
        .unwrap();
    let mut tx = store.pool().begin().await.unwrap();
    store.apply_in(&mut tx, &done).await.unwrap();
    tx.commit().await.unwrap();
    step("completion in the caller's transaction", 1);
    store
        .purge_expired(clock.now().plus(Duration::from_secs(3600)), 100)
        .await
        .unwrap();
    step("purge batch", 1);
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

/// Replays and "in progress" answers are read-only: the row keeps its
/// tuple (ctid, xmin) and gets no lock (xmax stays 0), so no WAL and no
/// commit flush per duplicate.
async fn replay_path_writes_nothing(factory: Arc<Factory>) {
    let store = open(&factory).await;
    let clock = ManualClock::new(T0);
    let engine = engine(store.clone(), &clock);
    let lease = proceed(&engine, "quiet").await;
    let in_flight = row_version(&store, &rkey("quiet")).await;
    assert!(matches!(
        engine.begin(&scope(), &ikey("quiet"), fp()).await.unwrap(),
        Begin::InProgress { .. }
    ));
    assert_eq!(row_version(&store, &rkey("quiet")).await, in_flight);
    engine
        .complete(&lease, Outcome::new(&b"done"[..]))
        .await
        .unwrap();
    let done = row_version(&store, &rkey("quiet")).await;
    assert_eq!(done.2, "0", "a completed row carries no lock");
    for _ in 0..3 {
        assert_replays(
            engine.begin(&scope(), &ikey("quiet"), fp()).await.unwrap(),
            b"done",
            ReplayKind::Completed,
        );
        assert!(matches!(
            engine
                .begin(&scope(), &ikey("quiet"), Fingerprint::of(b"other"))
                .await
                .unwrap(),
            Begin::Mismatch
        ));
    }
    assert_eq!(
        row_version(&store, &rkey("quiet")).await,
        done,
        "replays must not write, lock or rewrite the row"
    );
}

/// The scope and key are kept in readable columns (NUL, which PostgreSQL
/// text cannot hold, becomes U+FFFD); the digest alone identifies the record.
async fn scope_columns_are_readable(factory: Arc<Factory>) {
    let store = open(&factory).await;
    let clock = ManualClock::new(T0);
    let engine = engine(store.clone(), &clock);
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
            .compare_and_swap(&k, Revision::from_u64(9), &fresh, T0)
            .await;
        assert!(
            matches!(got, Err(StoreError::Corrupt { .. })),
            "{what}: a conflicting CAS must report Corrupt, got {got:?}"
        );
    }
}

/// A store on a table that was never migrated says so.
async fn missing_table_says_migrate(factory: Arc<Factory>) {
    let pool = factory.pool(2).await.unwrap();
    let table = TableName::new(factory.fresh_schema(), "never_migrated").unwrap();
    let store = PostgresStore::with_table(pool, table);
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
    let pool = factory.pool(8).await.unwrap();
    let table = TableName::new(factory.fresh_schema(), "custom_records").unwrap();
    let store = PostgresStore::with_table(pool, table.clone());
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
    let migrations = format!("\"{}\".custom_records_migrations", table.schema());
    // One row per migration shipped (1: the table, 2: the failed_unknown state).
    assert_eq!(count(&store, &migrations).await, 2);
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
    let rec = completed(1, 1, T0, 60, b"works");
    assert_eq!(
        store.insert_if_absent(&rkey("k"), &rec, T0).await.unwrap(),
        Inserted::Inserted
    );
    // Migration 2 admits the outcome-unknown state.
    let mut unknown = rec.clone();
    unknown.revision = Revision::from_u64(2);
    unknown.record.state = idem_core::State::Failed {
        token: unknown.record.state.token(),
        kind: idem_core::FailureKind::Unknown,
        outcome: Outcome::default(),
    };
    assert_eq!(
        store
            .insert_if_absent(&rkey("u"), &unknown, T0)
            .await
            .unwrap(),
        Inserted::Inserted
    );
    assert_eq!(store.get(&rkey("u"), T0).await.unwrap(), Some(unknown));
}

/// A table migrated by a newer version is refused; the failed migration
/// leaves no advisory lock behind (another migration proceeds at once).
async fn migrate_newer_rejected(factory: Arc<Factory>) {
    let store = open(&factory).await;
    let migrations = format!("\"{}\".records_migrations", store.table().schema());
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {migrations} (version, description, success, checksum, execution_time) \
         VALUES (9999, 'from the future', true, '\\x00'::bytea, 0)"
    )))
    .execute(store.pool())
    .await
    .unwrap();
    match store.migrate().await {
        Err(e @ StoreError::Rejected { .. }) => assert!(!e.is_transient()),
        other => panic!("a newer schema must be Rejected, got {other:?}"),
    }
    let other = tokio::time::timeout(Duration::from_secs(30), factory.store())
        .await
        .expect("another migration must not wait for a leaked advisory lock");
    other.expect("another store migrates");
}

// ---------------------------------------------------------------------------
// Pool and connection failures.
// ---------------------------------------------------------------------------

/// A pool pointed at a port nothing listens on: every call, migrate and the
/// engine report a transient `Unavailable`, keeping the driver's error.
async fn unreachable_is_transient(factory: Arc<Factory>) {
    let opts = options(&factory).host("127.0.0.1").port(closed_port());
    let pool = PostgresStore::pool_options()
        .acquire_timeout(Duration::from_millis(500))
        .connect_lazy_with(opts.clone());
    let store = PostgresStore::with_table(pool, TableName::default());
    let k = rkey("k");
    assert_transient(store.get(&k, T0).await, "get");
    assert_transient(
        store
            .insert_if_absent(&k, &completed(1, 1, T0, 60, b"x"), T0)
            .await,
        "insert_if_absent",
    );
    assert_transient(store.purge_expired(T0, 10).await, "purge_expired");
    assert_transient(store.migrate().await, "migrate");
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
    assert_transient(connected.map(|_| ()), "PostgresStore::connect");
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
        .connect_with(options(&factory))
        .await
        .unwrap();
    let store = PostgresStore::with_table(pool.clone(), table)
        .with_timeout(Some(Duration::from_millis(300)));
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
    let base = open(&factory).await;
    let proxy = proxy(&factory).await;
    let store = store_via(&factory, &proxy, base.table(), Duration::from_secs(10));
    let clock = ManualClock::new(T0);
    let engine = engine(store.clone(), &clock);
    let lease = proceed(&engine, "cut").await;
    assert!(proxy.open_connections() > 0);
    settled(&store).await;
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
    assert_replays(
        engine.begin(&scope(), &ikey("cut"), fp()).await.unwrap(),
        b"done",
        ReplayKind::Completed,
    );
}

/// A server that stops answering: the call times out as transient instead
/// of hanging, and the store recovers once traffic flows again.
async fn black_hole(factory: Arc<Factory>) {
    let base = open(&factory).await;
    let proxy = proxy(&factory).await;
    let store = store_via(&factory, &proxy, base.table(), Duration::from_millis(500));
    let k = rkey("hole");
    until_ok("warm up", || store.get(&k, T0)).await;
    settled(&store).await;
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

/// The completion reaches the server but its reply is lost: the engine
/// reports a transient error; retrying the completion succeeds (the store
/// shows the holder's own write) and retries replay the outcome.
async fn lost_reply_on_complete(factory: Arc<Factory>) {
    let base = open(&factory).await;
    let proxy = proxy(&factory).await;
    let store = store_via(&factory, &proxy, base.table(), Duration::from_millis(500));
    let clock = ManualClock::new(T0);
    let engine = engine(store.clone(), &clock);
    let lease = proceed(&engine, "lost-reply").await;
    // A heartbeat prepares the compare-and-swap statement on the (single)
    // connection, so that the completion below is one message the server
    // executes although its reply is lost.
    engine.extend(&lease).await.unwrap();
    settled(&store).await;
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
    assert_replays(
        engine
            .begin(&scope(), &ikey("lost-reply"), fp())
            .await
            .unwrap(),
        b"done",
        ReplayKind::Completed,
    );
}
