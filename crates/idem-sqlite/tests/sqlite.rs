//! SQLite-specific behaviour: several instances and processes on one file,
//! completion inside a transaction, opening foreign or newer files, corrupt
//! rows, lock contention, the purger.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use idem_core::machine::Fenced;
use idem_core::store::{
    Checkpoint, Coverage, FencingToken, InsertOutcome, Record, Revision, State, Store, StoreError,
    Versioned,
};
use idem_core::{
    Clock, Engine, Error, Executed, FailureKind, Fingerprint, ManualClock, Outcome, RecordKey,
    Timestamp, Transition,
};
use idem_sqlite::rusqlite::{Connection, Transaction, TransactionBehavior};
use idem_sqlite::{
    DEFAULT_PAGE_CACHE_BYTES, Durability, SCHEMA_VERSION, SqliteError, SqliteStore, TableName,
};
use idem_testkit::fixtures::{
    LEASE, T0, engine, ikey, in_progress, policy, poll_until, prepared, proceed, race, replays,
    scope, stored,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long a test waits for another task, process or the purger.
const WAIT: Duration = Duration::from_secs(30);

fn db(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("idem.db")
}

/// A new temporary directory and the path of `idem.db` in it.
fn temp_db() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = db(&dir);
    (dir, path)
}

/// A store on `idem.db` in a new temporary directory.
fn fresh() -> (tempfile::TempDir, SqliteStore) {
    let (dir, path) = temp_db();
    (dir, SqliteStore::open(path).unwrap())
}

/// The record key of `s` in the tests' scope.
fn rkey(s: &str) -> RecordKey {
    RecordKey::new(&scope(), &ikey(s))
}

// ---------------------------------------------------------------------------
// Several instances, several processes
// ---------------------------------------------------------------------------

/// (fresh, replayed, in progress, work runs) of one race.
type Counts = (usize, usize, usize, usize);

/// `tasks` tasks released together, task `i` through `engines[i % len]`,
/// each running the work of one key, which counts its runs.
async fn race_on<C: Clock + 'static>(
    engines: &[Arc<Engine<SqliteStore, C>>],
    key: &'static str,
    tasks: usize,
) -> Counts {
    let runs = Arc::new(AtomicUsize::new(0));
    let (engines, counter) = (engines.to_vec(), runs.clone());
    let results = race(tasks, move |i| {
        let (engine, runs) = (engines[i % engines.len()].clone(), counter.clone());
        async move {
            let work = || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                tokio::task::yield_now().await;
                format!("ran in task {i} of process {}", std::process::id())
            };
            engine
                .execute(&scope(), &ikey(key), Fingerprint::of(b"req"), work)
                .await
        }
    })
    .await;
    let (mut fresh, mut replayed, mut in_progress) = (0, 0, 0);
    for result in results {
        match result {
            Ok(Executed::Fresh(_)) => fresh += 1,
            Ok(Executed::Replayed(_)) => replayed += 1,
            Err(Error::InProgress { .. }) => in_progress += 1,
            Err(e) => panic!("unexpected error: {e:?}"),
        }
    }
    (fresh, replayed, in_progress, runs.load(Ordering::SeqCst))
}

/// Two stores on one file (as two processes open it), 64 tasks released
/// together through two engines: the work runs exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_on_one_file_run_the_work_once() {
    let (dir, a) = fresh();
    let b = SqliteStore::open(db(&dir)).unwrap();
    let clock = ManualClock::new(T0);
    let engines = [Arc::new(engine(a, &clock)), Arc::new(engine(b, &clock))];
    const TASKS: usize = 64;
    let (fresh, replayed, in_progress, runs) = race_on(&engines, "one-key", TASKS).await;
    assert_eq!(fresh, 1, "exactly one task runs the work");
    assert_eq!(runs, 1, "the work ran exactly once");
    assert_eq!(replayed + in_progress, TASKS - 1);
    // Both instances now replay the same value.
    let mut seen = Vec::new();
    for engine in &engines {
        let got = engine
            .execute(
                &scope(),
                &ikey("one-key"),
                Fingerprint::of(b"req"),
                || async { String::from("ran again") },
            )
            .await
            .unwrap();
        assert!(got.is_replayed(), "{got:?}");
        seen.push(got.into_inner());
    }
    assert_eq!(seen[0], seen[1]);
}

const CHILD_ENV: &str = "IDEM_SQLITE_RACE_DIR";
const CHILD_INDEX_ENV: &str = "IDEM_SQLITE_RACE_INDEX";
const PROCESSES: usize = 3;
const TASKS_PER_PROCESS: usize = 32;

/// One process's share of the race: 32 tasks released together through its
/// own store and engine (real time).
async fn race_in_this_process(store: SqliteStore) -> Counts {
    let engine = Engine::new(store)
        .with_policy(policy())
        .expect("valid policy");
    race_on(&[Arc::new(engine)], "cross-process", TASKS_PER_PROCESS).await
}

/// Real processes: this test binary re-runs itself as 3 child processes,
/// each racing 32 tasks on one key of the same file, released together
/// (files as a cross-process barrier) with 32 tasks of this process: the
/// work runs exactly once in all 4 processes together.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn processes_racing_on_one_key_run_it_once() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        // Child: announce, wait for the start signal, race, report.
        let dir = PathBuf::from(dir);
        let index = std::env::var(CHILD_INDEX_ENV).unwrap();
        let store = SqliteStore::open(dir.join("idem.db")).unwrap();
        std::fs::write(dir.join(format!("ready-{index}")), b"").unwrap();
        let go = dir.join("go");
        poll_until("the start signal", WAIT, || go.exists()).await;
        let (fresh, replayed, in_progress, runs) = race_in_this_process(store).await;
        println!("IDEM_RACE {fresh} {replayed} {in_progress} {runs}");
        return;
    }
    let (dir, path) = temp_db();
    // Create the file first, so children only open it.
    drop(SqliteStore::open(&path).unwrap());
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..PROCESSES)
        .map(|i| {
            std::process::Command::new(&exe)
                .args([
                    "processes_racing_on_one_key_run_it_once",
                    "--exact",
                    "--nocapture",
                ])
                .env(CHILD_ENV, dir.path())
                .env(CHILD_INDEX_ENV, i.to_string())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let store = SqliteStore::open(&path).unwrap();
    let ready = |i: usize| dir.path().join(format!("ready-{i}")).exists();
    poll_until("every child to open the store", WAIT, || {
        (0..PROCESSES).all(ready)
    })
    .await;
    std::fs::write(dir.path().join("go"), b"").unwrap();
    let mine = race_in_this_process(store).await;
    let mut totals = [mine.0, mine.1, mine.2, mine.3];
    for child in children {
        let out = tokio::task::spawn_blocking(move || child.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "child failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = stdout
            .lines()
            .find_map(|l| l.strip_prefix("IDEM_RACE "))
            .unwrap_or_else(|| panic!("no result from the child: {stdout}"));
        let counts: Vec<usize> = line.split(' ').map(|n| n.parse().unwrap()).collect();
        for (total, n) in totals.iter_mut().zip(counts) {
            *total += n;
        }
    }
    let [fresh, replayed, in_progress, runs] = totals;
    assert_eq!(fresh, 1, "exactly one task of all processes runs the work");
    assert_eq!(runs, 1, "the work ran exactly once across processes");
    assert_eq!(
        replayed + in_progress,
        (PROCESSES + 1) * TASKS_PER_PROCESS - 1
    );
    // A late process replays it.
    let late = race_in_this_process(SqliteStore::open(&path).unwrap()).await;
    assert_eq!(late, (0, TASKS_PER_PROCESS, 0, 0));
}

// ---------------------------------------------------------------------------
// Completion inside a transaction
// ---------------------------------------------------------------------------

async fn create_payments(store: &SqliteStore) {
    store
        .transaction(|tx| -> Result<(), SqliteError> {
            tx.execute_batch(
                "CREATE TABLE payments (id INTEGER PRIMARY KEY, idem_key TEXT NOT NULL, cents INTEGER NOT NULL)",
            )?;
            Ok(())
        })
        .await
        .unwrap();
}

/// A store on a new file with a `payments` table, a manual clock and an
/// engine over both.
async fn with_payments() -> (
    tempfile::TempDir,
    SqliteStore,
    ManualClock,
    Engine<SqliteStore, ManualClock>,
) {
    let (dir, store) = fresh();
    create_payments(&store).await;
    let clock = ManualClock::new(T0);
    let engine = engine(store.clone(), &clock);
    (dir, store, clock, engine)
}

/// How many payments `key` has in the file at `path`.
fn payments(path: &Path, key: &str) -> i64 {
    let sql = "SELECT count(*) FROM payments WHERE idem_key = ?1";
    let conn = Connection::open(path).unwrap();
    conn.query_row(sql, [key], |r| r.get(0)).unwrap()
}

/// The payment of `key` and the completion `done` in one
/// `store.transaction`; the closure fails after both were written unless
/// `commit`. Returns the payment's row id.
async fn pay(
    store: &SqliteStore,
    key: &str,
    done: Transition,
    commit: bool,
) -> Result<i64, BoxError> {
    let (s, key) = (store.clone(), key.to_string());
    store
        .transaction(move |tx| -> Result<i64, BoxError> {
            tx.execute(
                "INSERT INTO payments (idem_key, cents) VALUES (?1, 100)",
                [&key],
            )?;
            s.apply_in(tx, &done)?;
            if commit {
                Ok(tx.last_insert_rowid())
            } else {
                Err("card network timed out".into())
            }
        })
        .await
}

/// The payment of `key` and `apply` in one immediate transaction on the
/// application's own connection `conn`, committed or rolled back.
fn pay_on(
    conn: &mut Connection,
    key: &str,
    apply: impl FnOnce(&Transaction<'_>) -> Result<(), Error>,
    commit: bool,
) {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .unwrap();
    tx.execute(
        "INSERT INTO payments (idem_key, cents) VALUES (?1, 100)",
        [key],
    )
    .unwrap();
    apply(&tx).unwrap();
    if commit {
        tx.commit().unwrap();
    } else {
        tx.rollback().unwrap();
    }
}

/// `store.transaction`: on commit the payment and the completed record are
/// both there; on rollback neither is, the key stays claimed, and after a
/// release the retry pays exactly once.
#[tokio::test]
async fn transaction_commits_business_row_and_record_together() {
    let (dir, store, clock, engine) = with_payments().await;

    // Commit.
    let (lease, done) = prepared(&engine, "commit", b"payment 1").await;
    let id = pay(&store, "commit", done, true).await.unwrap();
    assert!(id > 0);
    assert_eq!(payments(&db(&dir), "commit"), 1);
    let record = stored(&store, lease.key(), clock.now()).await;
    assert!(
        matches!(&record.record.state, State::Completed { outcome, .. } if outcome.as_bytes() == b"payment 1"),
        "{record:?}"
    );
    replays(&engine, "commit", b"payment 1").await;

    // Rollback: the closure fails after the payment and the record were written.
    let (lease, done) = prepared(&engine, "rollback", b"payment 2").await;
    assert!(pay(&store, "rollback", done, false).await.is_err());
    assert_eq!(payments(&db(&dir), "rollback"), 0, "no business row");
    let record = stored(&store, lease.key(), clock.now()).await;
    assert_eq!(
        record.record.state.token(),
        lease.token(),
        "the key is still claimed by the same lease"
    );
    assert!(matches!(record.record.state, State::InFlight { .. }));
    engine.release(&lease).await.unwrap();

    // The retry runs, once.
    let (_retry, done) = prepared(&engine, "rollback", b"payment 3").await;
    pay(&store, "rollback", done, true).await.unwrap();
    replays(&engine, "rollback", b"payment 3").await;
    assert_eq!(
        payments(&db(&dir), "rollback"),
        1,
        "exactly one business row in the end"
    );
}

/// The caller's OWN connection to the file: commit and rollback as above.
#[tokio::test]
async fn own_connection_transaction_commits_or_rolls_back_with_the_record() {
    let (dir, store, _clock, engine) = with_payments().await;
    // A plain rusqlite connection, as an application opens it.
    let mut conn = Connection::open(db(&dir)).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();

    let (_lease, done) = prepared(&engine, "own-commit", b"paid").await;
    let apply = |tx: &Transaction<'_>| idem_sqlite::apply_transition(tx, &done);
    pay_on(&mut conn, "own-commit", apply, true);
    assert_eq!(payments(&db(&dir), "own-commit"), 1);
    replays(&engine, "own-commit", b"paid").await;

    // Rollback on the application's connection.
    let (lease, done) = prepared(&engine, "own-rollback", b"paid").await;
    let apply = |tx: &Transaction<'_>| store.apply_in(tx, &done);
    pay_on(&mut conn, "own-rollback", apply, false);
    assert_eq!(payments(&db(&dir), "own-rollback"), 0);
    // The rolled-back key is still claimed.
    in_progress(&engine, "own-rollback").await;
    engine.release(&lease).await.unwrap();
    let (_retry, done) = prepared(&engine, "own-rollback", b"paid once").await;
    // `connect` gives a connection configured like the store's.
    let mut conn = store.connect().unwrap();
    let apply = |tx: &Transaction<'_>| store.apply_in(tx, &done);
    pay_on(&mut conn, "own-rollback", apply, true);
    assert_eq!(payments(&db(&dir), "own-rollback"), 1);
    replays(&engine, "own-rollback", b"paid once").await;
}

/// A holder whose lease was taken over cannot complete in its transaction:
/// `apply_in` fails with LeaseLost, and its business write rolls back.
#[tokio::test]
async fn taken_over_lease_cannot_commit_its_transaction() {
    let (dir, store, clock, engine) = with_payments().await;
    let zombie = proceed(&engine, "zombie").await;
    // A heartbeat changes the revision but not the token: still applies.
    engine.extend(&zombie).await.unwrap();
    clock.advance(Duration::from_secs(11)); // lease lapsed
    let _taker = proceed(&engine, "zombie").await;
    let done = engine
        .prepare_complete(&zombie, Outcome::new(&b"late"[..]))
        .unwrap();
    let result = pay(&store, "zombie", done, true).await;
    assert!(
        matches!(
            result.as_ref().map_err(|e| e.downcast_ref::<Error>()),
            Err(Some(Error::LeaseLost(Fenced::TakenOver)))
        ),
        "{result:?}"
    );
    assert_eq!(payments(&db(&dir), "zombie"), 0);
}

/// A heartbeat between prepare and apply does not fail the transaction (the
/// token is checked, not the revision).
#[tokio::test]
async fn heartbeat_before_apply_does_not_fail_it() {
    let (_dir, store) = fresh();
    let clock = ManualClock::new(T0);
    let engine = engine(store.clone(), &clock);
    let (lease, done) = prepared(&engine, "beat", b"ok").await;
    engine.extend(&lease).await.unwrap();
    let s = store.clone();
    store
        .transaction(move |tx| s.apply_in(tx, &done))
        .await
        .unwrap();
    replays(&engine, "beat", b"ok").await;
    // Applying again: the claim already finished.
    let again = engine
        .prepare_complete(&lease, Outcome::new(&b"ok"[..]))
        .unwrap();
    let s = store.clone();
    let result = store.transaction(move |tx| s.apply_in(tx, &again)).await;
    assert!(
        matches!(
            result,
            Err(Error::LeaseLost(Fenced::Finished {
                by_holder: true,
                ..
            }))
        ),
        "{result:?}"
    );
}

/// A panic in the closure rolls back, reaches the caller, and leaves the
/// store working.
#[tokio::test]
async fn panic_in_transaction_rolls_back_and_store_keeps_working() {
    let store = SqliteStore::open_in_memory().unwrap();
    create_payments(&store).await;
    let s = store.clone();
    let panicked = tokio::spawn(async move {
        s.transaction(|tx| -> Result<(), SqliteError> {
            tx.execute("INSERT INTO payments (idem_key, cents) VALUES ('p', 1)", [])?;
            panic!("handler bug");
        })
        .await
    })
    .await;
    assert!(panicked.unwrap_err().is_panic());
    let count: i64 = store
        .transaction(|tx| -> Result<i64, SqliteError> {
            Ok(tx.query_row("SELECT count(*) FROM payments", [], |r| r.get(0))?)
        })
        .await
        .unwrap();
    assert_eq!(count, 0, "the panicking transaction rolled back");
    let clock = ManualClock::new(T0);
    let engine = engine(store, &clock);
    let got = engine
        .execute(
            &scope(),
            &ikey("after-panic"),
            Fingerprint::of(b"x"),
            || async { 1_u8 },
        )
        .await
        .unwrap();
    assert_eq!(got, Executed::Fresh(1));
}

// ---------------------------------------------------------------------------
// Opening
// ---------------------------------------------------------------------------

#[test]
fn a_file_that_is_not_a_database_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.txt");
    std::fs::write(&path, "these are my notes, not a database\n".repeat(100)).unwrap();
    let err = SqliteStore::open(&path).unwrap_err();
    assert!(
        matches!(&err, SqliteError::NotADatabase { path: p, .. } if p == &path),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(message.contains("not a SQLite database"), "{message}");
    assert!(message.contains("notes.txt"), "{message}");
    assert!(!err.is_transient());
    // The file is left alone.
    assert!(
        std::fs::read_to_string(&path)
            .unwrap()
            .starts_with("these are my notes")
    );
}

#[test]
fn a_database_of_another_application_is_refused() {
    let (_dir, path) = temp_db();
    {
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "application_id", 0x1234_5678)
            .unwrap();
        conn.execute_batch("CREATE TABLE theirs (x)").unwrap();
    }
    let err = SqliteStore::open(&path).unwrap_err();
    assert!(
        matches!(
            err,
            SqliteError::ForeignDatabase {
                application_id: 0x1234_5678,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("another application"), "{err}");
    assert!(matches!(StoreError::from(err), StoreError::Rejected { .. }));
    // Nothing was created in it.
    let conn = Connection::open(&path).unwrap();
    let tables: i64 = conn
        .query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))
        .unwrap();
    assert_eq!(tables, 1);
}

#[test]
fn a_table_of_the_same_name_not_created_by_idem_is_refused() {
    let (_dir, path) = temp_db();
    Connection::open(&path)
        .unwrap()
        .execute_batch("CREATE TABLE idem_records (id INTEGER PRIMARY KEY, note TEXT)")
        .unwrap();
    let err = SqliteStore::open(&path).unwrap_err();
    assert!(
        matches!(&err, SqliteError::ForeignTable { table, .. } if table == "idem_records"),
        "{err:?}"
    );
    // Another table name in the same file works.
    let store = SqliteStore::builder()
        .with_table(TableName::new("idem_keys").unwrap())
        .open(&path)
        .unwrap();
    assert_eq!(store.table().as_str(), "idem_keys");
}

#[test]
fn a_newer_schema_version_is_a_clear_error() {
    let (_dir, path) = temp_db();
    drop(SqliteStore::open(&path).unwrap());
    Connection::open(&path)
        .unwrap()
        .execute("UPDATE idem_schema SET version = version + 1", [])
        .unwrap();
    let err = SqliteStore::open(&path).unwrap_err();
    match &err {
        SqliteError::SchemaTooNew {
            found, supported, ..
        } => {
            assert_eq!(*found, SCHEMA_VERSION + 1);
            assert_eq!(*supported, SCHEMA_VERSION);
        }
        other => panic!("expected SchemaTooNew, got {other:?}"),
    }
    assert!(err.to_string().contains("upgrade idem-sqlite"), "{err}");
}

/// Several processes starting at once on a new file: every open succeeds
/// (the WAL switch and the migration take turns) and the table is created once.
#[test]
fn concurrent_opens_of_a_new_file_all_succeed() {
    for round in 0..5 {
        let (_dir, path) = temp_db();
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let (path, barrier) = (path.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    SqliteStore::open(&path).map(drop)
                })
            })
            .collect();
        for handle in handles {
            if let Err(e) = handle.join().unwrap() {
                panic!("round {round}: open failed: {e:?}");
            }
        }
        let versions: i64 = Connection::open(&path)
            .unwrap()
            .query_row("SELECT count(*) FROM idem_schema", [], |r| r.get(0))
            .unwrap();
        assert_eq!(versions, 1);
    }
}

/// An application's own database (application_id 0, its own tables) takes
/// idem's table beside its own, keeps its application_id, and reopening is
/// idempotent and keeps the records.
#[tokio::test]
async fn an_application_database_is_shared_and_reopening_keeps_records() {
    let (_dir, path) = temp_db();
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("CREATE TABLE orders (id INTEGER PRIMARY KEY); INSERT INTO orders DEFAULT VALUES; PRAGMA user_version = 7;")
            .unwrap();
    }
    let clock = ManualClock::new(T0);
    {
        let engine = engine(SqliteStore::open(&path).unwrap(), &clock);
        let first = engine
            .execute(&scope(), &ikey("kept"), Fingerprint::of(b"x"), || async {
                5_u8
            })
            .await
            .unwrap();
        assert_eq!(first, Executed::Fresh(5));
    }
    let engine = engine(SqliteStore::open(&path).unwrap(), &clock);
    let again = engine
        .execute(&scope(), &ikey("kept"), Fingerprint::of(b"x"), || async {
            0_u8
        })
        .await
        .unwrap();
    assert_eq!(again, Executed::Replayed(5), "records survive reopening");
    let conn = Connection::open(&path).unwrap();
    let app_id: i32 = conn
        .pragma_query_value(None, "application_id", |r| r.get(0))
        .unwrap();
    let user_version: i32 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    let orders: i64 = conn
        .query_row("SELECT count(*) FROM orders", [], |r| r.get(0))
        .unwrap();
    let version: i64 = conn
        .query_row(
            "SELECT version FROM idem_schema WHERE records_table = 'idem_records'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!((app_id, user_version, orders), (0, 7, 1));
    assert_eq!(version, SCHEMA_VERSION);
}

async fn pragmas(store: &SqliteStore) -> Result<(String, i64), SqliteError> {
    store
        .transaction(|tx| -> Result<(String, i64), SqliteError> {
            let mode = tx.pragma_query_value(None, "journal_mode", |r| r.get(0))?;
            let sync = tx.pragma_query_value(None, "synchronous", |r| r.get(0))?;
            Ok((mode, sync))
        })
        .await
}

/// A new file gets idem's application_id, WAL mode and the chosen durability.
#[tokio::test]
async fn new_files_are_marked_and_use_wal_and_the_durability_setting() {
    let (_dir, path) = temp_db();
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(store.durability(), Durability::Full);
    assert_eq!(pragmas(&store).await.unwrap(), ("wal".to_string(), 2));
    let normal = SqliteStore::builder()
        .with_durability(Durability::Normal)
        .open(&path)
        .unwrap();
    assert_eq!(pragmas(&normal).await.unwrap(), ("wal".to_string(), 1));
    let app_id: i32 = Connection::open(&path)
        .unwrap()
        .pragma_query_value(None, "application_id", |r| r.get(0))
        .unwrap();
    assert_eq!(app_id, 0x6964_656d);
}

/// The page cache size reaches the writer's connection and every
/// connection from `connect`: the default, a chosen size, 0, and a size
/// beyond what SQLite accepts.
#[tokio::test]
async fn page_cache_size_applies_to_every_connection() {
    async fn cache_kib(store: &SqliteStore) -> (i64, i64) {
        let writer = store
            .transaction(|tx| -> Result<i64, SqliteError> {
                Ok(tx.pragma_query_value(None, "cache_size", |r| r.get(0))?)
            })
            .await
            .unwrap();
        let other = store
            .connect()
            .unwrap()
            .pragma_query_value(None, "cache_size", |r| r.get::<_, i64>(0))
            .unwrap();
        (writer, other)
    }
    let (_dir, path) = temp_db();
    let default = SqliteStore::open(&path).unwrap();
    let want = -i64::try_from(DEFAULT_PAGE_CACHE_BYTES / 1024).unwrap();
    assert_eq!(want, -32 * 1024);
    assert_eq!(cache_kib(&default).await, (want, want));
    let small = SqliteStore::builder()
        .with_page_cache_bytes(1_500_000)
        .open(&path)
        .unwrap();
    assert_eq!(
        cache_kib(&small).await,
        (-1465, -1465),
        "rounded up to whole KiB"
    );
    let none = SqliteStore::builder()
        .with_page_cache_bytes(0)
        .open(&path)
        .unwrap();
    assert_eq!(cache_kib(&none).await, (0, 0));
    let huge = SqliteStore::builder()
        .with_page_cache_bytes(usize::MAX)
        .open(&path)
        .unwrap();
    let most = -i64::from(i32::MAX);
    assert_eq!(cache_kib(&huge).await, (most, most), "clamped, not wrapped");
}

#[tokio::test]
async fn in_memory_and_existing_connections_work() {
    let clock = ManualClock::new(T0);
    let memory = SqliteStore::open_in_memory().unwrap();
    assert!(memory.path().is_none());
    assert!(matches!(memory.connect(), Err(SqliteError::InMemory)));
    let engine = engine(memory, &clock);
    let got = engine
        .execute(&scope(), &ikey("m"), Fingerprint::of(b"x"), || async {
            1_u8
        })
        .await
        .unwrap();
    assert_eq!(got, Executed::Fresh(1));

    let adopted = SqliteStore::from_connection(Connection::open_in_memory().unwrap()).unwrap();
    assert!(adopted.path().is_none());
    let k = rkey("adopted");
    assert_eq!(
        adopted
            .insert_if_absent(&k, &claim(1, T0), T0)
            .await
            .unwrap(),
        InsertOutcome::Inserted
    );
    assert_eq!(adopted.get(&k, T0).await.unwrap(), Some(claim(1, T0)));

    let dir = tempfile::tempdir().unwrap();
    let conn = Connection::open(db(&dir)).unwrap();
    let store = SqliteStore::from_connection(conn).unwrap();
    assert_eq!(store.path(), Some(db(&dir).as_path()));
    let other = SqliteStore::open(db(&dir)).unwrap();
    let k = rkey("shared");
    let rec = claim(1, T0);
    assert_eq!(
        store.insert_if_absent(&k, &rec, T0).await.unwrap(),
        InsertOutcome::Inserted
    );
    assert_eq!(other.get(&k, T0).await.unwrap(), Some(rec));
}

#[test]
fn a_path_that_cannot_be_opened_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-such-dir").join("idem.db");
    let err = SqliteStore::open(&path).unwrap_err();
    assert!(
        matches!(&err, SqliteError::Open { path: p, .. } if p == &path),
        "{err:?}"
    );
    assert!(err.to_string().contains("no-such-dir"), "{err}");
    assert!(!err.is_transient());
}

#[test]
fn bad_table_names_are_refused() {
    let e = TableName::new("x\"; DROP TABLE y; --").unwrap_err();
    assert_eq!(e.name(), "x\"; DROP TABLE y; --");
    assert!(matches!(
        SqliteError::from(e),
        SqliteError::InvalidTableName(_)
    ));
}

// ---------------------------------------------------------------------------
// Corrupt rows
// ---------------------------------------------------------------------------

fn claim(rev: u64, now: Timestamp) -> Versioned {
    Versioned {
        revision: Revision::from_u64(rev),
        record: Record::new_claim(
            Fingerprint::of(b"req"),
            idem_core::store::FencingToken::from_u128(u128::from(rev)),
            now,
            &policy(),
        ),
    }
}

/// Each kind of inconsistent row is `Corrupt` for get, insert and the
/// engine, and is never overwritten.
#[tokio::test]
async fn inconsistent_rows_are_corrupt_errors_and_never_overwritten() {
    let (_dir, store) = fresh();
    let conn = store.connect().unwrap();
    let clock = ManualClock::new(T0);
    let engine = engine(store.clone(), &clock);
    let corruptions = [
        "state = 'archived'",
        "token = x'0102'",
        "fingerprint = zeroblob(31)",
        "state = 'completed', outcome = NULL, lease_deadline = NULL",
        "lease_deadline = NULL",
        "attempts = -1",
        // A checkpoint that does not decode (no format; a truncated one).
        "checkpoint = x'00'",
        "checkpoint = x'0103'",
    ];
    for (i, set) in corruptions.iter().enumerate() {
        let k = rkey(&format!("corrupt-{i}"));
        store.insert_if_absent(&k, &claim(1, T0), T0).await.unwrap();
        conn.execute(
            &format!("UPDATE idem_records SET {set} WHERE digest = ?1"),
            [&k.digest()[..]],
        )
        .unwrap();
        let got = store.get(&k, T0).await;
        assert!(
            matches!(got, Err(StoreError::Corrupt { .. })),
            "{set}: {got:?}"
        );
        let err = got.unwrap_err();
        assert!(
            std::error::Error::source(&err)
                .map(|s| s.to_string())
                .unwrap_or_default()
                .contains("not a valid idem record"),
            "{set}: the source says what is wrong: {err:?}"
        );
        let got = store.insert_if_absent(&k, &claim(2, T0), T0).await;
        assert!(
            matches!(got, Err(StoreError::Corrupt { .. })),
            "{set}: {got:?}"
        );
        let got = store
            .compare_and_swap(&k, &claim(9, T0), &claim(3, T0), T0)
            .await;
        assert!(
            matches!(got, Err(StoreError::Corrupt { .. })),
            "{set}: {got:?}"
        );
        let begun = engine.begin_key(k.clone(), Fingerprint::of(b"req")).await;
        assert!(
            matches!(begun, Err(Error::Store(StoreError::Corrupt { .. }))),
            "{set}"
        );
        let revision: i64 = conn
            .query_row(
                "SELECT revision FROM idem_records WHERE digest = ?1",
                [&k.digest()[..]],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(revision, 1, "{set}: the corrupt row was not overwritten");
    }
}

// ---------------------------------------------------------------------------
// Lock contention
// ---------------------------------------------------------------------------

/// Another connection holding the write lock makes the store wait (busy
/// timeout), not fail; with a zero timeout it fails with a transient error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_contention_waits_within_the_busy_timeout() {
    let (dir, store) = fresh();
    let impatient = SqliteStore::builder()
        .with_busy_timeout(Duration::ZERO)
        .open(db(&dir))
        .unwrap();
    let mut conn = Connection::open(db(&dir)).unwrap();
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .unwrap();

    let k = rkey("locked");
    let err = impatient
        .insert_if_absent(&k, &claim(1, T0), T0)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Unavailable { .. }) && err.is_transient(),
        "{err:?}"
    );

    let s = store.clone();
    let k2 = k.clone();
    let waiting = tokio::spawn(async move { s.insert_if_absent(&k2, &claim(2, T0), T0).await });
    for _ in 0..200 {
        tokio::task::yield_now().await;
        assert!(
            !waiting.is_finished(),
            "the store cannot finish while another connection holds the write lock"
        );
    }
    tx.commit().unwrap();
    assert_eq!(waiting.await.unwrap().unwrap(), InsertOutcome::Inserted);
    assert_eq!(
        impatient.get(&k, T0).await.unwrap(),
        Some(claim(2, T0)),
        "the first, failed insert changed nothing"
    );
}

// ---------------------------------------------------------------------------
// Census
// ---------------------------------------------------------------------------

/// The census counts the records of its own table written by any instance,
/// skips a row that is not a record instead of failing, and reads without
/// the write lock: it answers while another connection holds that lock,
/// with a busy timeout of zero (waiting for the lock would fail at once).
#[tokio::test]
async fn census_counts_its_table_skips_damaged_rows_and_needs_no_write_lock() {
    let (dir, store) = fresh();
    let other = SqliteStore::open(db(&dir)).unwrap();
    let elsewhere = SqliteStore::builder()
        .with_table(TableName::new("other_records").unwrap())
        .open(db(&dir))
        .unwrap();
    for i in 0..4 {
        store
            .insert_if_absent(&rkey(&format!("a{i}")), &claim(1, T0), T0)
            .await
            .unwrap();
    }
    for i in 0..3 {
        other
            .insert_if_absent(&rkey(&format!("b{i}")), &claim(1, T0), T0)
            .await
            .unwrap();
    }
    elsewhere
        .insert_if_absent(&rkey("c"), &claim(1, T0), T0)
        .await
        .unwrap();
    let mut conn = Connection::open(db(&dir)).unwrap();
    conn.execute(
        "UPDATE idem_records SET state = 'archived' WHERE digest = ?1",
        [&rkey("a0").digest()[..]],
    )
    .unwrap();

    let impatient = SqliteStore::builder()
        .with_busy_timeout(Duration::ZERO)
        .open(db(&dir))
        .unwrap();
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .unwrap();
    let census = impatient.census(T0, 1).await.unwrap();
    assert_eq!(
        census.coverage,
        Coverage::Exact,
        "exact, whatever the sample"
    );
    assert_eq!(
        (census.in_flight, census.total()),
        (6, 6),
        "6 records of this table; the damaged row and the other table's record are not counted"
    );
    assert_eq!(
        census.unreadable, 1,
        "the damaged row is counted as unreadable"
    );
    assert_eq!(census.expiry.iter().sum::<u64>(), 6);
    tx.rollback().unwrap();

    let later = claim(1, T0).record.expires_at;
    let census = store.census(later, 1).await.unwrap();
    assert_eq!(
        (census.live(), census.expired),
        (0, 6),
        "all expired at {later:?}"
    );
    assert_eq!(rows(&db(&dir)), 7, "the census wrote nothing");
}

// ---------------------------------------------------------------------------
// Expiry and the purger
// ---------------------------------------------------------------------------

fn rows(path: &Path) -> i64 {
    Connection::open(path)
        .unwrap()
        .query_row("SELECT count(*) FROM idem_records", [], |r| r.get(0))
        .unwrap()
}

#[tokio::test]
async fn purger_deletes_expired_rows_in_batches_and_stops() {
    let (_dir, path) = temp_db();
    let store = SqliteStore::open(&path).unwrap();
    let clock = ManualClock::new(T0);
    for i in 0..10 {
        let k = rkey(&format!("short-{i}"));
        let mut rec = claim(i + 1, T0);
        rec.record.expires_at = T0.plus(Duration::from_secs(1));
        store.insert_if_absent(&k, &rec, T0).await.unwrap();
    }
    let live = rkey("long");
    let mut long = claim(100, T0);
    long.record.expires_at = T0.plus(Duration::from_secs(3600));
    store.insert_if_absent(&live, &long, T0).await.unwrap();
    assert_eq!(rows(&path), 11);

    let purger = store
        .spawn_purger(clock.clone(), Duration::from_secs(60), 3)
        .unwrap();
    poll_until("the purger to wait on the clock", WAIT, || {
        clock.pending_sleepers() > 0
    })
    .await;
    clock.advance(Duration::from_secs(60));
    poll_until("a purge round", WAIT, || purger.rounds() >= 1).await;
    assert_eq!(purger.purged(), 10);
    assert_eq!(rows(&path), 1, "only the live record is left");
    assert_eq!(store.get(&live, clock.now()).await.unwrap(), Some(long));
    purger.stop().await;
}

#[test]
fn purger_needs_a_runtime() {
    let store = SqliteStore::open_in_memory().unwrap();
    assert!(matches!(
        store.spawn_purger(ManualClock::new(T0), Duration::from_secs(1), 10),
        Err(SqliteError::NoRuntime)
    ));
}

/// Records over the size limit are refused before touching the database.
#[tokio::test]
async fn records_over_the_limit_are_rejected() {
    let store = SqliteStore::builder()
        .with_max_record_bytes(1024)
        .open_in_memory()
        .unwrap();
    let k = rkey("big");
    let mut rec = claim(1, T0);
    rec.record.state = State::Completed {
        token: rec.record.state.token(),
        outcome: Outcome::new(vec![0u8; 2048]),
    };
    assert!(matches!(
        store.insert_if_absent(&k, &rec, T0).await,
        Err(StoreError::Rejected { .. })
    ));
    assert_eq!(store.get(&k, T0).await.unwrap(), None);
    // The checkpoint counts too (`codec::record_size`).
    let heavy = claim(2, T0).record.with_checkpoint(Some(Checkpoint::new(
        &k,
        1,
        "reserve",
        vec![0u8; 2048],
    )));
    let heavy = Versioned::new(Revision::from_u64(2), heavy);
    assert!(matches!(
        store.insert_if_absent(&k, &heavy, T0).await,
        Err(StoreError::Rejected { .. })
    ));
    assert_eq!(store.get(&k, T0).await.unwrap(), None);
}

/// Concurrent calls are committed in batches and each still gets its own,
/// correct answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batched_calls_each_get_their_own_answer() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(db(&dir)).unwrap());
    const TASKS: usize = 256;
    let results = race(TASKS, move |i| {
        let store = store.clone();
        let k = rkey(&format!("k{}", i % 64));
        async move {
            store
                .insert_if_absent(&k, &claim(i as u64 + 1, T0), T0)
                .await
                .unwrap()
        }
    })
    .await;
    let inserted = results
        .iter()
        .filter(|r| **r == InsertOutcome::Inserted)
        .count();
    assert_eq!(inserted, 64, "one insert per key");
    assert_eq!(rows(&db(&dir)), 64);
}

// ---------------------------------------------------------------------------
// Checkpoints: the column, local phases, abandoned records
// ---------------------------------------------------------------------------

/// The column names of `table` in the file at `path`, in order.
fn columns(path: &Path, table: &str) -> Vec<String> {
    let conn = Connection::open(path).unwrap();
    let mut stmt = conn
        .prepare("SELECT name FROM pragma_table_info(?1) ORDER BY cid")
        .unwrap();
    stmt.query_map([table], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// The `CREATE INDEX` statements of `table` in the file at `path`.
fn indexes(path: &Path, table: &str) -> Vec<String> {
    let conn = Connection::open(path).unwrap();
    let mut stmt = conn
        .prepare("SELECT sql FROM sqlite_schema WHERE type = 'index' AND tbl_name = ?1 AND sql IS NOT NULL")
        .unwrap();
    stmt.query_map([table], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// A table of the first schema version (before checkpoints) migrates on
/// open: it gains the checkpoint column and the index of abandoned records,
/// keeps its records (read back without a checkpoint), and a record
/// written before the migration can be checkpointed and found abandoned.
#[tokio::test]
async fn a_version_1_table_migrates_on_open_and_keeps_its_records() {
    let (_dir, path) = temp_db();
    let clock = ManualClock::new(T0);
    {
        let engine = engine(SqliteStore::open(&path).unwrap(), &clock);
        let done = engine
            .execute(
                &scope(),
                &ikey("old-done"),
                Fingerprint::of(b"x"),
                || async { 7_u8 },
            )
            .await
            .unwrap();
        assert_eq!(done, Executed::Fresh(7));
        proceed(&engine, "old-in-flight").await;
    }
    // Back to version 1: what idem-sqlite before checkpoints left behind.
    Connection::open(&path)
        .unwrap()
        .execute_batch(
            "DROP INDEX idem_records_abandoned;
             ALTER TABLE idem_records DROP COLUMN checkpoint;
             UPDATE idem_schema SET version = 1;",
        )
        .unwrap();
    assert!(!columns(&path, "idem_records").contains(&"checkpoint".to_string()));

    let store = SqliteStore::open(&path).unwrap();
    let version: i64 = Connection::open(&path)
        .unwrap()
        .query_row("SELECT version FROM idem_schema", [], |r| r.get(0))
        .unwrap();
    assert_eq!((version, SCHEMA_VERSION), (2, 2));
    assert_eq!(
        columns(&path, "idem_records"),
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
    let abandoned_index = indexes(&path, "idem_records")
        .into_iter()
        .find(|sql| sql.contains("\"idem_records_abandoned\""))
        .expect("the index of abandoned records");
    assert!(
        abandoned_index.contains("(lease_deadline)")
            && abandoned_index.contains("WHERE state = 'in_flight' AND checkpoint IS NOT NULL"),
        "{abandoned_index}"
    );

    let engine = engine(store.clone(), &clock);
    let again = engine
        .execute(
            &scope(),
            &ikey("old-done"),
            Fingerprint::of(b"x"),
            || async { 0_u8 },
        )
        .await
        .unwrap();
    assert_eq!(again, Executed::Replayed(7), "the old record replays");
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
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0], stored(&store, taker.key(), clock.now()).await);
}

/// How many `reservations` rows `key` has in the file at `path`.
fn reservations(path: &Path, key: &str) -> i64 {
    let sql = "SELECT count(*) FROM reservations WHERE order_key = ?1";
    let conn = Connection::open(path).unwrap();
    conn.query_row(sql, [key], |r| r.get(0)).unwrap()
}

/// A local phase in `store.transaction`: the reservation row of `key` and
/// the phase's checkpoint, applied with `apply_in`; the closure fails after
/// both were written unless `commit`. Returns the transition applied.
async fn reserve(
    store: &SqliteStore,
    phases: &idem_core::Phases,
    key: &str,
    commit: bool,
) -> Result<Transition, BoxError> {
    let (s, p, key) = (store.clone(), phases.clone(), key.to_string());
    store
        .transaction(move |tx| -> Result<Transition, BoxError> {
            tx.execute("INSERT INTO reservations (order_key) VALUES (?1)", [&key])?;
            let id = tx.last_insert_rowid();
            let t = p.prepare_local("reserve", &id)?;
            s.apply_in(tx, &t)?;
            if commit {
                Ok(t)
            } else {
                Err("the handler failed after the phase".into())
            }
        })
        .await
}

/// A local phase commits its business row and its checkpoint in one
/// transaction; a rollback leaves neither; the same checkpoint cannot be
/// applied twice; a holder whose lease was taken over cannot apply one,
/// and its business row rolls back; the taker resumes after the phase.
#[tokio::test]
async fn local_phase_commits_its_rows_with_its_checkpoint_or_neither() {
    let (dir, store) = fresh();
    store
        .transaction(|tx| -> Result<(), SqliteError> {
            Ok(tx.execute_batch(
                "CREATE TABLE reservations (id INTEGER PRIMARY KEY, order_key TEXT NOT NULL)",
            )?)
        })
        .await
        .unwrap();
    let clock = ManualClock::new(T0);
    let engine = engine(store.clone(), &clock);
    let lease = proceed(&engine, "order-1").await;
    let mut phases = engine.phases(&lease).unwrap();

    // Rollback: neither the row nor the checkpoint.
    assert!(reserve(&store, &phases, "order-1", false).await.is_err());
    assert_eq!(reservations(&db(&dir), "order-1"), 0);
    let record = stored(&store, lease.key(), clock.now()).await;
    assert_eq!(record.record.checkpoint, None);
    assert!(matches!(record.record.state, State::InFlight { token, .. } if token == lease.token()));

    // Commit: both, and the record stays in flight under the same lease.
    let applied = reserve(&store, &phases, "order-1", true).await.unwrap();
    phases.applied(&applied).unwrap();
    assert_eq!(reservations(&db(&dir), "order-1"), 1);
    let record = stored(&store, lease.key(), clock.now()).await;
    assert_eq!(record, applied.next);
    assert!(matches!(record.record.state, State::InFlight { token, .. } if token == lease.token()));
    let checkpoint = record.record.checkpoint.clone().expect("a checkpoint");
    assert_eq!((checkpoint.seq, checkpoint.step.as_str()), (1, "reserve"));
    assert!(phases.is_recorded("reserve"));
    assert_eq!(lease.checkpoint(), Some(checkpoint));

    // The same checkpoint again: it would not move forward.
    let (s, again) = (store.clone(), applied.clone());
    let twice = store.transaction(move |tx| s.apply_in(tx, &again)).await;
    assert!(
        matches!(
            twice,
            Err(Error::LeaseLost(Fenced::Backwards {
                stored: 1,
                offered: 1
            }))
        ),
        "{twice:?}"
    );

    // The lease lapses and another holder takes over: the old holder's
    // next local phase is refused, and its row rolls back.
    clock.advance(LEASE + Duration::from_millis(1));
    let taker = proceed(&engine, "order-1").await;
    let stale = reserve(&store, &phases, "order-1", true).await;
    assert!(
        matches!(
            stale.as_ref().map_err(|e| e.downcast_ref::<Error>()),
            Err(Some(Error::LeaseLost(Fenced::TakenOver)))
        ),
        "{stale:?}"
    );
    assert_eq!(
        reservations(&db(&dir), "order-1"),
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

/// A checkpoint prepared by `engine.prepare_checkpoint` applies on the
/// application's own connection (`apply_transition`), and is fenced there
/// too.
#[tokio::test]
async fn checkpoint_applies_on_the_applications_own_connection() {
    let (dir, store, clock, engine) = with_payments().await;
    let lease = proceed(&engine, "own-cp").await;
    let mut conn = Connection::open(db(&dir)).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    let step = engine
        .prepare_checkpoint(&lease, "debit", &b"state"[..])
        .unwrap();
    let apply = |tx: &Transaction<'_>| idem_sqlite::apply_transition(tx, &step);
    pay_on(&mut conn, "own-cp", apply, true);
    lease.mark_applied(&step).unwrap();
    assert_eq!(payments(&db(&dir), "own-cp"), 1);
    let record = stored(&store, lease.key(), clock.now()).await;
    assert_eq!(record.record.checkpoint, step.next.record.checkpoint);
    // A later checkpoint through the engine builds on it.
    let next = engine
        .checkpoint(&lease, "credit", &b"s2"[..])
        .await
        .unwrap();
    assert_eq!(next.seq, 2);
    // A stale one (prepared before) is refused, and nothing changes.
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .unwrap();
    let refused = idem_sqlite::apply_transition(&tx, &step);
    assert!(
        matches!(
            refused,
            Err(Error::LeaseLost(Fenced::Backwards {
                stored: 2,
                offered: 1
            }))
        ),
        "{refused:?}"
    );
    drop(tx);
    let record = stored(&store, lease.key(), clock.now()).await;
    assert_eq!(record.record.checkpoint, Some(next));
}

/// `abandoned` returns exactly the live in-flight records whose lease lapsed
/// and that carry a checkpoint, earliest lapse first, at most `limit`, and
/// only from the store's own table.
#[tokio::test]
async fn abandoned_returns_only_lapsed_checkpointed_records_of_its_table() {
    let (dir, store) = fresh();
    assert!(store.capabilities().abandoned);
    let other = SqliteStore::builder()
        .with_table(TableName::new("other_records").unwrap())
        .open(db(&dir))
        .unwrap();
    let clock = ManualClock::new(T0);
    let engine = engine(store.clone(), &clock);
    let other_engine = idem_testkit::fixtures::engine(other.clone(), &clock);

    let first = proceed(&engine, "first").await;
    engine.checkpoint(&first, "a", &b"1"[..]).await.unwrap();
    let plain = proceed(&engine, "no-checkpoint").await;
    let elsewhere = proceed(&other_engine, "other-table").await;
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
    drop(plain);

    let now = clock.now();
    let found = store.abandoned(now, 100).await.unwrap();
    let keys: Vec<RecordKey> = found
        .iter()
        .map(|v| v.record.checkpoint.as_ref().unwrap().record_key())
        .collect();
    assert_eq!(keys, [rkey("first"), rkey("second")]);
    for v in &found {
        let key = v.record.checkpoint.as_ref().unwrap().record_key();
        assert_eq!(*v, stored(&store, &key, now).await, "as stored");
        assert!(idem_core::store::is_abandoned(&v.record, now));
    }
    assert_eq!(store.abandoned(now, 1).await.unwrap(), found[..1]);
    assert_eq!(store.abandoned(now, 0).await.unwrap(), []);
    let theirs = other.abandoned(now, 100).await.unwrap();
    assert_eq!(theirs.len(), 1);
    assert_eq!(
        theirs[0].record.checkpoint.as_ref().unwrap().record_key(),
        rkey("other-table")
    );
    // At the lease's deadline it lapsed; once expired, it is gone.
    let live_deadline = match stored(&store, live.key(), now).await.record.state {
        State::InFlight { lease_deadline, .. } => lease_deadline,
        other => panic!("{other:?}"),
    };
    assert_eq!(store.abandoned(live_deadline, 100).await.unwrap().len(), 3);
    let later = T0.plus(Duration::from_secs(61));
    let keys: Vec<RecordKey> = store
        .abandoned(later, 100)
        .await
        .unwrap()
        .iter()
        .map(|v| v.record.checkpoint.as_ref().unwrap().record_key())
        .collect();
    assert_eq!(keys, [rkey("live-lease")], "the others expired");
}

/// Deadlines on both sides of 2^63 ms (stored as negative INTEGERs) are
/// ordered and compared as unsigned numbers.
#[tokio::test]
async fn abandoned_orders_deadlines_as_unsigned() {
    let store = SqliteStore::open_in_memory().unwrap();
    let deadlines = [5_u64, 1 << 62, (1 << 63) + 5, 1 << 63, u64::MAX - 10];
    for (i, d) in deadlines.iter().enumerate() {
        let k = rkey(&format!("d{i}"));
        let record = in_flight_with_checkpoint(
            &k,
            Timestamp::from_millis(*d),
            Timestamp::from_millis(u64::MAX),
        );
        store
            .insert_if_absent(
                &k,
                &Versioned::new(Revision::from_u64(i as u64 + 1), record),
                Timestamp::EPOCH,
            )
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

/// A record whose checkpoint does not decode is skipped (and logged) by
/// `abandoned`, so the completer goes on with every other key; `get` still
/// reports it as `Corrupt`, never as absent.
#[tokio::test]
async fn abandoned_skips_an_undecodable_checkpoint_and_get_reports_it() {
    let (_dir, store) = fresh();
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
    store
        .connect()
        .unwrap()
        .execute(
            "UPDATE idem_records SET checkpoint = x'01ff' WHERE digest = ?1",
            [&k.digest()[..]],
        )
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

/// 10,000 records, 100 of them abandoned (and, among the others, records
/// in flight with a live lease, lapsed without a checkpoint, expired with a
/// checkpoint, failed retryably with one, completed): `abandoned` returns
/// exactly the 100, in lapse order. Prints how long one call takes (run
/// with `--nocapture`; no timing is asserted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_among_10000_records_returns_exactly_the_abandoned() {
    let (dir, path) = temp_db();
    let store = SqliteStore::builder()
        .with_durability(Durability::Normal)
        .open(&path)
        .unwrap();
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
                _ => idem_testkit::fixtures::completed(i + 1, 1, T0, 86_400 * 2, b"done").record,
            };
            (k, Versioned::new(Revision::from_u64(i + 1), record))
        })
        .collect();
    let store = Arc::new(store);
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in records.chunks(100) {
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
    assert_eq!(rows(&path), 10_000);

    let want: Vec<RecordKey> = (0..100).map(|i| rkey(&format!("r{}", i * 100))).collect();
    let found = store.abandoned(now, 100).await.unwrap();
    let keys: Vec<RecordKey> = found
        .iter()
        .map(|v| v.record.checkpoint.as_ref().unwrap().record_key())
        .collect();
    assert_eq!(keys, want);
    assert_eq!(store.abandoned(now, 10).await.unwrap(), found[..10]);

    let mut times = Vec::new();
    for _ in 0..50 {
        let started = std::time::Instant::now();
        let found = store.abandoned(now, 100).await.unwrap();
        times.push(started.elapsed());
        assert_eq!(found.len(), 100);
    }
    times.sort_unstable();
    eprintln!(
        "sqlite abandoned(now, 100) over 10,000 records (100 abandoned): median {:?}, min {:?}, max {:?}",
        times[times.len() / 2],
        times[0],
        times[times.len() - 1]
    );
    drop(dir);
}
