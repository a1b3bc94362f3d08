//! The consumer process of the messaging crash test (`tests/messaging.rs`),
//! SIGKILLed at random moments and restarted by the test.
//!
//! ```text
//! crash_consumer BROKER QUEUE STORE_URL EFFECTS LOG [--lease-ms N] [--prefetch N] [--work-ms N]
//! ```
//!
//! - `BROKER`: `rabbitmq` or `nats`; its URL comes from idem-testkit's
//!   environment (`IDEM_AMQP_URL`, `IDEM_NATS_URL`).
//! - `QUEUE`: the queue (RabbitMQ) or stream (JetStream), declared by the test.
//! - `STORE_URL`: the idempotency store, an idemkit URL (`sqlite://PATH`,
//!   `postgres://…?schema=…`, `redis://…?prefix=…`).
//! - `EFFECTS`: where each message's effect (a row `(key, copy, pid, at_us)`
//!   in the table `effects`) is written:
//!   - `in-store`: in the store's own database, in the same transaction as
//!     the key's completion (`Handled::Committed`; SQLite and PostgreSQL);
//!   - a file path: a SQLite file of its own, committed before the key's
//!     completion (`Handled::Complete`; the Redis run, which measures the
//!     window between the two).
//! - `LOG`: the delivery log, appended one line per event (one `write` each,
//!   so a kill never leaves half a line behind a whole one):
//!   `R <pid> <µs> <key> <copy> <redelivered 0|1>` when a delivery arrives,
//!   `S <pid> <µs> <key> <copy> <A0|A1|D<delay ms>|X>` once it is settled
//!   (acknowledged fresh / replayed, delayed, dead-lettered); `-` for a
//!   missing key or copy.
//! - `--lease-ms` (default 1000): the engine's lease; `--prefetch` (default
//!   32); `--work-ms` (default 2): the handler waits up to this long (at
//!   random) before its effect, so that kills land inside handlers.
//!
//! It prints `consuming` on stdout once the store and the broker are
//! connected, then consumes until it is killed (or the broker connection
//! fails: exit code 1).
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use idem_core::{BoxError, BoxFuture, Engine, Handled, Lease, Outcome, Policy, Scope};
use idem_postgres::PostgresStore;
use idem_postgres::sqlx::{self, AssertSqlSafe};
use idem_reliability::messaging::{
    BrokerKind, ConsumerSetup, Event, Handler, Incoming, MessageEngine, Observer, Settlement,
};
use idem_sqlite::SqliteStore;
use idemkit::{AnyStore, StoreUrl};

/// The consumer's arguments.
struct Args {
    broker: BrokerKind,
    queue: String,
    store: String,
    effects: String,
    log: PathBuf,
    lease: Duration,
    prefetch: u16,
    work_ms: u64,
}

fn parse() -> Result<Args, String> {
    let mut positional = Vec::new();
    let mut lease_ms = 1000u64;
    let mut prefetch = 32u16;
    let mut work_ms = 2u64;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--lease-ms" => lease_ms = number(&value("--lease-ms")?)?,
            "--prefetch" => prefetch = number(&value("--prefetch")?)?,
            "--work-ms" => work_ms = number(&value("--work-ms")?)?,
            _ => positional.push(arg),
        }
    }
    let [broker, queue, store, effects, log] = <[String; 5]>::try_from(positional)
        .map_err(|_| "usage: crash_consumer BROKER QUEUE STORE_URL EFFECTS LOG [--lease-ms N] [--prefetch N] [--work-ms N]".to_string())?;
    Ok(Args {
        broker: BrokerKind::parse(&broker).ok_or_else(|| format!("unknown broker {broker}"))?,
        queue,
        store,
        effects,
        log: PathBuf::from(log),
        lease: Duration::from_millis(lease_ms),
        prefetch,
        work_ms,
    })
}

fn number<T: std::str::FromStr>(s: &str) -> Result<T, String> {
    s.parse().map_err(|_| format!("not a number: {s}"))
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("crash_consumer: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("crash_consumer: runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("crash_consumer: {e}");
            ExitCode::from(1)
        }
    }
}

/// Microseconds since the epoch.
fn now_us() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros())
}

/// The scope of the test's messages.
fn scope(queue: &str) -> Scope {
    Scope::tenant("crash-consumer").with_operation(queue)
}

async fn run(args: Args) -> Result<(), String> {
    let url = StoreUrl::parse(&args.store).map_err(|e| e.to_string())?;
    let opened = url.open().await.map_err(|e| e.to_string())?;
    let engine: Arc<MessageEngine> = Arc::new(
        Engine::new(opened.erased())
            .with_policy(Policy::default().with_lease(args.lease))
            .map_err(|e| e.to_string())?,
    );
    let effects = Effects::open(opened.store(), &args.effects).await?;
    let handler = handler(engine.clone(), effects, args.work_ms);
    let observer = observer(&args.log)?;
    let broker = args
        .broker
        .connect(&args.broker.url())
        .await
        .map_err(|e| e.to_string())?;
    let setup = ConsumerSetup::new(engine, scope(&args.queue), handler, observer)
        .with_prefetch(args.prefetch);
    println!("consuming");
    let _ = std::io::stdout().flush();
    broker
        .consume(&args.queue, setup)
        .await
        .map_err(|e| e.to_string())?;
    drop(opened);
    Ok(())
}

/// Where the effects go.
#[derive(Clone)]
enum Effects {
    /// In the SQLite store's file, with the completion.
    Sqlite(SqliteStore),
    /// In the PostgreSQL store's schema, with the completion.
    Postgres(PostgresStore),
    /// In a SQLite file of their own, before the completion.
    Separate(Arc<Mutex<rusqlite::Connection>>),
}

const EFFECTS_TABLE: &str = "CREATE TABLE IF NOT EXISTS effects (key TEXT NOT NULL, copy INTEGER, pid INTEGER NOT NULL, at_us INTEGER NOT NULL)";

impl Effects {
    async fn open(store: &AnyStore, effects: &str) -> Result<Self, String> {
        match (effects, store) {
            ("in-store", AnyStore::Sqlite(s)) => {
                s.transaction(|tx| -> Result<(), BoxError> {
                    Ok(tx.execute_batch(EFFECTS_TABLE)?)
                })
                .await
                .map_err(|e| e.to_string())?;
                Ok(Self::Sqlite(s.clone()))
            }
            ("in-store", AnyStore::Postgres(s)) => {
                let sql = format!(
                    "CREATE TABLE IF NOT EXISTS \"{}\".effects (key TEXT NOT NULL, copy INTEGER, pid INTEGER NOT NULL, at_us BIGINT NOT NULL)",
                    s.table().schema()
                );
                sqlx::query(AssertSqlSafe(sql))
                    .execute(s.pool())
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(Self::Postgres(s.clone()))
            }
            ("in-store", _) => Err("in-store effects need a SQLite or PostgreSQL store".into()),
            (path, _) => {
                let conn = rusqlite::Connection::open(path).map_err(|e| e.to_string())?;
                conn.busy_timeout(Duration::from_secs(10))
                    .map_err(|e| e.to_string())?;
                conn.execute_batch(&format!("PRAGMA journal_mode=WAL; {EFFECTS_TABLE}"))
                    .map_err(|e| e.to_string())?;
                Ok(Self::Separate(Arc::new(Mutex::new(conn))))
            }
        }
    }
}

/// The handler: a random pause, then the effect (and, with SQL stores, the
/// key's completion in the same transaction).
fn handler(engine: Arc<MessageEngine>, effects: Effects, work_ms: u64) -> Handler {
    Arc::new(
        move |lease: Lease, message: Incoming| -> BoxFuture<Handled> {
            let (engine, effects) = (engine.clone(), effects.clone());
            Box::pin(async move {
                if work_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(fastrand::u64(0..=work_ms))).await;
                }
                let outcome = Outcome::new(format!("effect of {}", message.key).into_bytes());
                let pid = i64::from(std::process::id());
                let at = i64::try_from(now_us()).unwrap_or(i64::MAX);
                let copy = message.copy.map(i64::from);
                let key = message.key.clone();
                match effects {
                    Effects::Sqlite(store) => {
                        let Ok(done) = engine.prepare_complete(&lease, outcome.clone()) else {
                            return Handled::Release;
                        };
                        let s = store.clone();
                        let committed = store
                        .transaction(move |tx| -> Result<(), BoxError> {
                            tx.execute(
                                "INSERT INTO effects (key, copy, pid, at_us) VALUES (?1, ?2, ?3, ?4)",
                                rusqlite::params![key, copy, pid, at],
                            )?;
                            Ok(s.apply_in(tx, &done)?)
                        })
                        .await;
                        match committed {
                            Ok(()) => Handled::Committed(outcome),
                            // Rolled back (lease lost, or an error): nothing took effect.
                            Err(_) => Handled::Release,
                        }
                    }
                    Effects::Postgres(store) => {
                        let Ok(done) = engine.prepare_complete(&lease, outcome.clone()) else {
                            return Handled::Release;
                        };
                        match postgres_effect(&store, &done, &key, copy, pid, at).await {
                            Ok(()) => Handled::Committed(outcome),
                            Err(Commit::RolledBack) => Handled::Release,
                            Err(Commit::Unknown) => Handled::Unknown,
                        }
                    }
                    Effects::Separate(conn) => {
                        let written = tokio::task::spawn_blocking(move || {
                            let conn = conn.lock().map_err(|e| e.to_string())?;
                            conn.execute(
                            "INSERT INTO effects (key, copy, pid, at_us) VALUES (?1, ?2, ?3, ?4)",
                            rusqlite::params![key, copy, pid, at],
                        )
                        .map_err(|e| e.to_string())
                        })
                        .await;
                        match written {
                            Ok(Ok(_)) => Handled::Complete(outcome),
                            _ => Handled::Release,
                        }
                    }
                }
            })
        },
    )
}

/// How a PostgreSQL effect transaction failed.
enum Commit {
    /// Before `COMMIT`: nothing took effect.
    RolledBack,
    /// `COMMIT` itself failed: it may have taken effect.
    Unknown,
}

async fn postgres_effect(
    store: &PostgresStore,
    done: &idem_core::Transition,
    key: &str,
    copy: Option<i64>,
    pid: i64,
    at: i64,
) -> Result<(), Commit> {
    let mut tx = store.pool().begin().await.map_err(|_| Commit::RolledBack)?;
    let sql = format!(
        "INSERT INTO \"{}\".effects (key, copy, pid, at_us) VALUES ($1, $2, $3, $4)",
        store.table().schema()
    );
    sqlx::query(AssertSqlSafe(sql))
        .bind(key)
        .bind(copy.and_then(|c| i32::try_from(c).ok()))
        .bind(i32::try_from(pid).unwrap_or(i32::MAX))
        .bind(at)
        .execute(&mut *tx)
        .await
        .map_err(|_| Commit::RolledBack)?;
    store
        .apply_in(&mut tx, done)
        .await
        .map_err(|_| Commit::RolledBack)?;
    tx.commit().await.map_err(|_| Commit::Unknown)
}

/// Appends each event to `log` as one line, in one `write`.
fn observer(log: &std::path::Path) -> Result<Observer, String> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("{}: {e}", log.display()))?;
    let file = Mutex::new(file);
    let pid = std::process::id();
    Ok(Arc::new(move |event: Event| {
        let show = |s: Option<String>| s.unwrap_or_else(|| "-".into());
        let line = match event {
            Event::Received {
                key,
                copy,
                redelivered,
            } => format!(
                "R {pid} {} {} {} {}\n",
                now_us(),
                show(key),
                show(copy.map(|c| c.to_string())),
                u8::from(redelivered)
            ),
            Event::Settled {
                key,
                copy,
                settlement,
            } => {
                let what = match settlement {
                    Settlement::Acked { replayed } => format!("A{}", u8::from(replayed)),
                    Settlement::Retried { delay } => format!("D{}", delay.as_millis()),
                    _ => "X".to_string(),
                };
                format!(
                    "S {pid} {} {} {} {what}\n",
                    now_us(),
                    show(key),
                    show(copy.map(|c| c.to_string()))
                )
            }
            _ => return,
        };
        if let Ok(mut f) = file.lock() {
            let _ = f.write_all(line.as_bytes());
        }
    }))
}
