//! Messaging crash test: exactly-once processing of at-least-once messages,
//! for each broker (RabbitMQ through idem-lapin, NATS JetStream through
//! idem-nats) × store (SQLite, PostgreSQL, Redis).
//!
//! Every run publishes `IDEM_MESSAGING_MESSAGES` (default and minimum under
//! CI: 2,000) messages, each two or three times (a publisher retrying after a
//! lost confirm: the same key, the same payload), spread over the run and
//! shuffled within windows (some copies arrive together, some far apart),
//! while the `crash_consumer` binary consumes them and is SIGKILLed
//! `IDEM_MESSAGING_KILLS` (default and minimum under CI: 100) times at random
//! moments, restarted after each kill. A last consumer then drains the queue.
//!
//! Asserted from the effect rows, the consumers' delivery log and the
//! broker's own counts:
//! - SQLite and PostgreSQL (the effect row and the key's completion commit
//!   in one transaction, `Handled::Committed`): every message's effect
//!   exactly once; a duplicate FAILS.
//! - Redis (the effect row in a SQLite file of its own, committed before the
//!   key's completion, `Handled::Complete`): duplicates are the measured
//!   window, printed. Each must be explained: the earlier effect's writer
//!   was killed while it held a delivery of that message (received, never
//!   settled); an unexplained duplicate, or more than kills × prefetch,
//!   FAILS.
//! - No message lost: every message has its effect, none was dead-lettered,
//!   every copy was acknowledged (or its settlement is missing from the log
//!   only because a kill cut the delivery), and once the last consumer is
//!   gone the broker holds nothing ready, unacknowledged or delayed.
//! - No hot loop: a kill can multiply a copy (a delivery it cut short comes
//!   back, and so may the delayed copy already published; an
//!   acknowledgement written just before the kill may never reach the
//!   broker). A copy is *exposed* to a kill when the killed consumer
//!   received it and never settled it, or settled it within `EXPOSURE` of
//!   its death. Every delivery of a copy beyond its first must be a delayed
//!   redelivery it was given (each delay at least `MIN_RETRY`) or one of at
//!   most two per exposure; and for copies never exposed (one instance at a
//!   time), each delayed redelivery must come no sooner than its delay.
//!
//! One line of figures per run (`messaging[broker/store] …`). A broker or
//! store that cannot be reached (or a broker without a driver yet): the run
//! is IGNORED with a banner, FAILED under `CI=true` /
//! `IDEM_REQUIRE_BACKENDS=1`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use idem_core::MIN_RETRY;
use idem_postgres::sqlx::{self, AssertSqlSafe};
use idem_reliability::messaging::{Broker, BrokerKind, Outgoing};
use idem_testkit::runner::{self, Runner, Trial};
use idem_testkit::{BackendKind, Isolated, StoreUrl};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A failed run, with its message.
type Failed = String;

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_crash_consumer");

/// The consumers' lease: short, so keys held by a killed consumer are taken
/// over quickly.
const LEASE_MS: u64 = 1000;

/// The consumers' prefetch (deliveries handled at once).
const PREFETCH: u16 = 32;

/// The handler's random pause before its effect, at most.
const WORK_MS: u64 = 3;

/// The random delay between a consumer's `consuming` line and its SIGKILL.
const KILL_DELAY_MS: (u64, u64) = (0, 220);

/// The publications are spread over this many batches, one every
/// [`PUBLISH_EVERY`], so that kills land while messages arrive.
const PUBLISH_BATCHES: usize = 60;
const PUBLISH_EVERY: Duration = Duration::from_millis(150);

/// Copies are shuffled within windows of this many publications.
const SHUFFLE_WINDOW: usize = 200;

/// How long before its consumer's death a settlement may have been lost
/// with the connection (see [`analyse`]).
///
/// A settlement is logged only once its future resolved (the observer runs
/// after `basic.ack` / the JetStream acknowledgement returned), but for
/// RabbitMQ that means the frame left the process, not that the broker read
/// it: AMQP does not confirm acknowledgements, and a SIGKILL resets the
/// connection with the frame possibly still unread in the broker's socket
/// buffer. How long the broker may take to read it is a matter of
/// scheduling, so any figure is a heuristic: 50 ms was too tight on a loaded
/// two-core machine (a clean-clone CI run saw an acknowledgement logged
/// 53 ms before the SIGKILL come back as a redelivery), and 100 ms leaves
/// only twice that. 500 ms is beyond any stall seen. It only decides which
/// redeliveries a kill explains (each exposure: two more at most, so a hot
/// loop still fails) and which copies the early-redelivery check skips; the
/// effect counts (exactly once, or each duplicate explained by a delivery
/// cut by a kill) do not depend on it. Since a kill comes at most
/// [`KILL_DELAY_MS`] after `consuming`, every settlement of a consumer
/// killed in the kill phase is now exposed; the early-redelivery check
/// rests on the copies those consumers never touched.
const EXPOSURE: Duration = Duration::from_millis(500);

/// How long a consumer may take to start; how long the drain may take.
const START_DEADLINE: Duration = Duration::from_secs(30);
const DRAIN_DEADLINE: Duration = Duration::from_secs(45);

/// The stores, with where their effects go.
const STORES: [BackendKind; 3] = [
    BackendKind::Sqlite,
    BackendKind::Postgres,
    BackendKind::Redis,
];

fn main() -> std::process::ExitCode {
    let at_least = |n: usize| if runner::backends_required() { n } else { 0 };
    let messages = env_usize("IDEM_MESSAGING_MESSAGES", 2000).max(at_least(2000));
    let kills = env_usize("IDEM_MESSAGING_KILLS", 100).max(at_least(100));
    let mut runner = Runner::new("idem-reliability (messaging)")
        // One run at a time: the kill timing and the figures assume the
        // machine's cores are the run's.
        .with_default_test_threads(1);
    for broker in BrokerKind::ALL {
        runner = runner.requirement(broker.name(), move || async move {
            broker
                .connect(&broker.url())
                .await
                .map(drop)
                .map_err(|e| format!("{e} (set {})", env_var(broker)))
        });
    }
    for store in STORES {
        runner = runner.requirement(store.name(), move || store.probe());
    }
    for broker in BrokerKind::ALL {
        for store in STORES {
            let name = format!("crash::{}::{}", broker.name(), store.name());
            let plan = Plan {
                broker,
                store,
                messages,
                kills,
            };
            runner = runner.trial(
                Trial::test(name, move || async move {
                    if let Err(e) = crash(plan).await {
                        panic!("{e}");
                    }
                })
                .requires(broker.name())
                .requires(store.name()),
            );
        }
    }
    runner.run()
}

fn env_var(broker: BrokerKind) -> &'static str {
    match broker {
        BrokerKind::Rabbit => "IDEM_AMQP_URL",
        _ => "IDEM_NATS_URL",
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// One run.
#[derive(Clone, Copy, Debug)]
struct Plan {
    broker: BrokerKind,
    store: BackendKind,
    messages: usize,
    kills: usize,
}

/// What one run observed.
#[derive(Debug, Default)]
struct Figures {
    broker: &'static str,
    store: &'static str,
    messages: u64,
    copies: u64,
    kills: u64,
    /// Deliveries the consumers logged.
    deliveries: u64,
    /// Deliveries handed back for a delayed redelivery.
    delayed: u64,
    /// The shortest and the mean delay given, ms.
    delay_min_ms: u64,
    delay_mean_ms: u64,
    /// Deliveries cut short by a kill (received, never settled).
    cut: u64,
    /// Copies exposed to a kill (see [`analyse`]).
    exposed: u64,
    /// The most deliveries one copy got.
    max_per_copy: u64,
    /// Redeliveries no delay or kill explains (a hot loop).
    unexplained: u64,
    /// Delayed redeliveries that came before their delay.
    early: u64,
    /// The shortest wait of a delayed redelivery, ms.
    shortest_wait_ms: u64,
    /// Copies never acknowledged.
    unacked: u64,
    /// Copies dead-lettered (settlements).
    dead_lettered: u64,
    effects: u64,
    /// Effects beyond the first of a message.
    duplicates: u64,
    /// Duplicates whose earlier effect no kill explains (its writer was not
    /// killed holding the message).
    duplicates_unexplained: u64,
    /// Messages without an effect.
    lost: u64,
    /// Effects of no message of this run.
    unexpected: u64,
    /// What the broker still held at the end.
    left: String,
    /// Consumers stopped (SIGKILL) once quiescent during the drain.
    stops: u64,
    /// When the kills ended (s since the start).
    kills_phase_seconds: f64,
    drained: bool,
    seconds: f64,
    /// A few copies behind `unexplained` / `early`, with their log lines.
    examples: Vec<String>,
}

impl fmt::Display for Figures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "messaging[{}/{}]: messages = {}, copies = {}, kills = {}, deliveries = {} \
             (delayed redeliveries = {}, delay min/mean = {}/{} ms, shortest wait = {} ms, \
             cut by kills = {}, copies exposed to kills = {}, max per copy = {}, unexplained = {}, early = {}), \
             duplicates = {} (explained by a kill: {}), lost = {}, unacknowledged = {}, dead-lettered = {}, broker left = {}, \
             drain stops = {}, seconds = {:.1} (kills over at {:.1})",
            self.broker,
            self.store,
            self.messages,
            self.copies,
            self.kills,
            self.deliveries,
            self.delayed,
            self.delay_min_ms,
            self.delay_mean_ms,
            self.shortest_wait_ms,
            self.cut,
            self.exposed,
            self.max_per_copy,
            self.unexplained,
            self.early,
            self.duplicates,
            self.duplicates - self.duplicates_unexplained,
            self.lost,
            self.unacked,
            self.dead_lettered,
            self.left,
            self.stops,
            self.seconds,
            self.kills_phase_seconds
        )
    }
}

impl Figures {
    /// Keeps a few offending copies for the failure message.
    fn example(&mut self, id: &(String, u32), lines: &[Line], killed: &HashMap<u32, u64>) {
        if self.examples.len() >= 4 {
            return;
        }
        let start = lines.first().map_or(0, |l| l.at_us);
        let shown: Vec<String> = lines
            .iter()
            .map(|l| {
                let died = killed.get(&l.pid).map_or("survived".to_string(), |d| {
                    format!("killed at +{} ms", d.saturating_sub(start) / 1000)
                });
                format!(
                    "{} pid {} +{} ms {} ({died})",
                    if l.received { "R" } else { "S" },
                    l.pid,
                    l.at_us.saturating_sub(start) / 1000,
                    l.what
                )
            })
            .collect();
        self.examples.push(format!("{id:?}: {}", shown.join(" | ")));
    }

    fn verdict(&self, exactly_once: bool) -> Result<(), Failed> {
        let mut errors: Vec<String> = [
            ("lost (no effect)", self.lost),
            ("unacknowledged copies", self.unacked),
            ("dead-lettered copies", self.dead_lettered),
            ("unexpected effects", self.unexpected),
            (
                "redeliveries no delay or kill explains (hot loop)",
                self.unexplained,
            ),
            ("delayed redeliveries before their delay", self.early),
        ]
        .iter()
        .filter(|(_, n)| *n != 0)
        .map(|(what, n)| format!("{what} = {n}"))
        .collect();
        if !self.drained {
            errors.push(format!("the broker still holds {}", self.left));
        }
        if exactly_once && self.duplicates != 0 {
            errors.push(format!("duplicate effects = {}", self.duplicates));
        }
        if !exactly_once && self.duplicates_unexplained != 0 {
            errors.push(format!(
                "duplicate effects no kill explains = {} (of {})",
                self.duplicates_unexplained, self.duplicates
            ));
        }
        // A kill cuts at most `PREFETCH` deliveries, each leaving at most one
        // duplicate.
        if !exactly_once && self.duplicates > self.kills * u64::from(PREFETCH) {
            errors.push(format!(
                "duplicate effects = {} > kills × prefetch = {}",
                self.duplicates,
                self.kills * u64::from(PREFETCH)
            ));
        }
        if self.delayed > 0 && self.delay_min_ms < MIN_RETRY.as_millis() as u64 {
            errors.push(format!("a delay of {} ms (< MIN_RETRY)", self.delay_min_ms));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{}/{}: {}; examples:\n{}",
                self.broker,
                self.store,
                errors.join("; "),
                self.examples.join("\n")
            ))
        }
    }
}

/// One run: see the module docs.
async fn crash(plan: Plan) -> Result<(), Failed> {
    let started = Instant::now();
    let isolated = Isolated::fresh(plan.store).await;
    let dir = tempfile::tempdir().unwrap();
    let run_id = format!("{:08x}", fastrand::u32(..));
    let queue = format!(
        "idem-crash-{}-{}-{run_id}",
        plan.broker.name(),
        plan.store.name()
    );
    let broker = plan
        .broker
        .connect(&plan.broker.url())
        .await
        .map_err(|e| format!("connect: {e}"))?;
    broker
        .declare(&queue)
        .await
        .map_err(|e| format!("declare: {e}"))?;
    let result = run(
        &plan,
        &isolated,
        dir.path(),
        &queue,
        &run_id,
        &broker,
        started,
    )
    .await;
    let deleted = broker.delete(&queue).await;
    let figures = result?;
    deleted.map_err(|e| format!("delete {queue}: {e}"))?;
    println!("{figures}");
    figures.verdict(plan.store != BackendKind::Redis)?;
    isolated
        .close()
        .await
        .map_err(|e| format!("clean-up: {e}"))?;
    Ok(())
}

async fn run(
    plan: &Plan,
    isolated: &Isolated,
    dir: &Path,
    queue: &str,
    run_id: &str,
    broker: &Arc<dyn Broker>,
    started: Instant,
) -> Result<Figures, Failed> {
    let log = dir.join("deliveries.log");
    let stderr = dir.join("consumer.stderr");
    let effects_file = dir.join("effects.db");
    let effects = match plan.store {
        BackendKind::Redis => effects_file.display().to_string(),
        _ => "in-store".to_string(),
    };
    let supervisor = Supervisor {
        args: vec![
            plan.broker.name().to_string(),
            queue.to_string(),
            child_store_url(isolated),
            effects,
            log.display().to_string(),
            "--lease-ms".into(),
            LEASE_MS.to_string(),
            "--prefetch".into(),
            PREFETCH.to_string(),
            "--work-ms".into(),
            WORK_MS.to_string(),
        ],
        stderr: stderr.clone(),
    };

    // The publications: every message two or three times, shuffled within
    // windows, in batches spread over the run.
    let keys: Vec<String> = (0..plan.messages)
        .map(|i| format!("m-{run_id}-{i:05}"))
        .collect();
    let mut publications: Vec<Outgoing> = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let payload = Bytes::from(format!(
            r#"{{"message":{i},"amount":{}}}"#,
            fastrand::u32(1..100_000)
        ));
        let copies = if i % 4 == 0 { 3 } else { 2 };
        for copy in 0..copies {
            publications.push(Outgoing {
                key: key.clone(),
                payload: payload.clone(),
                copy,
            });
        }
    }
    for window in publications.chunks_mut(SHUFFLE_WINDOW) {
        fastrand::shuffle(window);
    }
    let published: HashSet<(String, u32)> = publications
        .iter()
        .map(|o| (o.key.clone(), o.copy))
        .collect();
    let batch = publications.len().div_ceil(PUBLISH_BATCHES);
    let publisher = {
        let (broker, queue) = (broker.clone(), queue.to_string());
        tokio::spawn(async move {
            for chunk in publications.chunks(batch) {
                broker.publish(&queue, chunk).await?;
                tokio::time::sleep(PUBLISH_EVERY).await;
            }
            Ok::<_, idem_reliability::messaging::BrokerError>(())
        })
    };

    // The faults: start, a random delay, SIGKILL; again.
    let mut figures = Figures {
        broker: plan.broker.name(),
        store: plan.store.name(),
        messages: plan.messages as u64,
        copies: published.len() as u64,
        ..Figures::default()
    };
    // When each consumer was killed (pid → µs since the epoch).
    let mut killed: HashMap<u32, u64> = HashMap::new();
    while figures.kills < plan.kills as u64 {
        let mut child = supervisor.start().await?;
        let delay = Duration::from_millis(fastrand::u64(KILL_DELAY_MS.0..=KILL_DELAY_MS.1));
        tokio::select! {
            status = child.wait() => {
                return Err(format!(
                    "the consumer exited on its own ({status:?}); stderr:\n{}",
                    tail(&stderr)
                )
                );
            }
            () = tokio::time::sleep(delay) => {
                killed.insert(child.id().unwrap_or(0), now_us());
                child.start_kill().map_err(|e| format!("kill: {e}"))?;
                let _ = child.wait().await;
                figures.kills += 1;
            }
        }
    }
    publisher
        .await
        .map_err(|e| format!("publisher: {e}"))?
        .map_err(|e| format!("publish: {e}"))?;

    // The drain: a consumer until it is quiescent (every message has its
    // effect, the broker has nothing ready or delayed, every delivery this
    // consumer received is settled), then stopped; until the broker, once it
    // noticed the consumer gone, holds nothing (a stop may itself return a
    // delivery whose acknowledgement had not left the process: then again).
    figures.kills_phase_seconds = started.elapsed().as_secs_f64();
    let deadline = Instant::now() + DRAIN_DEADLINE;
    let mut reader = LogReader::new(&log);
    let backlog = 'drain: loop {
        let mut last = supervisor.start().await?;
        let pid = last.id().unwrap_or(0);
        loop {
            reader.read();
            let quiet = reader.open.get(&pid).is_none_or(|&n| n == 0)
                && effect_rows(isolated, &effects_file)
                    .await
                    .is_ok_and(|c| keys.iter().all(|k| c.contains_key(k)))
                && broker
                    .backlog(queue)
                    .await
                    .is_ok_and(|b| b.ready == 0 && b.unacked == 0 && b.delayed == 0);
            if quiet {
                break;
            }
            if let Ok(Some(status)) = last.try_wait() {
                return Err(format!(
                    "the last consumer exited ({status}); stderr:\n{}",
                    tail(&stderr)
                ));
            }
            if Instant::now() >= deadline {
                let _ = last.start_kill();
                let unsettled: Vec<String> = published
                    .iter()
                    .filter(|c| !reader.terminal.contains(*c))
                    .take(5)
                    .map(|c| format!("{c:?}: {:?}", reader.copies.get(c)))
                    .collect();
                let backlog = broker.backlog(queue).await;
                return Err(format!(
                    "not drained after {DRAIN_DEADLINE:?} (broker: {backlog:?}); \
                     some copies without a logged settlement: {unsettled:#?}; stderr:\n{}",
                    tail(&stderr)
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        killed.insert(pid, now_us());
        last.start_kill().map_err(|e| format!("stop: {e}"))?;
        let _ = last.wait().await;
        figures.stops += 1;
        loop {
            let backlog = broker
                .backlog(queue)
                .await
                .map_err(|e| format!("backlog: {e}"))?;
            if backlog.is_settled() && (backlog.is_drained() || Instant::now() < deadline) {
                if backlog.is_drained() {
                    break 'drain backlog;
                }
                continue 'drain;
            }
            if Instant::now() >= deadline {
                break 'drain backlog;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    figures.drained = backlog.is_settled() && backlog.is_drained();
    figures.left = format!(
        "ready {} unacked {} delayed {} dead {}",
        backlog.ready, backlog.unacked, backlog.delayed, backlog.dead_lettered
    );
    figures.dead_lettered = backlog.dead_lettered;

    reader.read();
    analyse(&mut figures, &reader, &published, &killed);
    let effects = effect_rows(isolated, &effects_file).await?;
    let known: HashSet<&str> = keys.iter().map(String::as_str).collect();
    for key in &keys {
        let rows = effects.get(key).map(Vec::as_slice).unwrap_or_default();
        figures.effects += rows.len() as u64;
        figures.duplicates += rows.len().saturating_sub(1) as u64;
        figures.lost += u64::from(rows.is_empty());
        // Every effect but the last must be the work of a consumer killed
        // while it held a delivery of the message (received, never settled):
        // the window between the effect and the completion.
        for &(pid, _) in rows.iter().take(rows.len().saturating_sub(1)) {
            let cut_there = killed.contains_key(&pid)
                && (0..4).any(|copy| {
                    reader
                        .copies
                        .get(&(key.clone(), copy))
                        .is_some_and(|lines| {
                            lines
                                .iter()
                                .filter(|l| l.pid == pid)
                                .map(|l| if l.received { 1i64 } else { -1 })
                                .sum::<i64>()
                                > 0
                        })
                });
            figures.duplicates_unexplained += u64::from(!cut_there);
        }
    }
    figures.unexpected = effects
        .iter()
        .filter(|(k, _)| !known.contains(k.as_str()))
        .map(|(_, rows)| rows.len() as u64)
        .sum();
    figures.seconds = started.elapsed().as_secs_f64();
    Ok(figures)
}

/// The store URL the consumer process opens: the isolated store's server
/// and its own file, schema or prefix (**with any password**: never print it).
fn child_store_url(isolated: &Isolated) -> String {
    let with = |base: String, name: &str, value: &str| {
        let sep = if base.contains('?') { '&' } else { '?' };
        format!("{base}{sep}{name}={}", encode(value))
    };
    match isolated.url() {
        StoreUrl::Postgres(pg) => with(
            with(pg.connection_url(), "schema", &isolated.place()),
            "max_connections",
            "4",
        ),
        StoreUrl::Redis(r) => with(r.node_urls().remove(0), "prefix", &isolated.place()),
        _ => format!("sqlite://{}", isolated.place()),
    }
}

/// Percent-encodes everything but unreserved characters.
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Effects per key, from the effect table.
/// The effect rows per key: (writer pid, µs), oldest first.
type Effects = HashMap<String, Vec<(u32, u64)>>;

/// The effect rows, from the effect table.
async fn effect_rows(isolated: &Isolated, file: &Path) -> Result<Effects, Failed> {
    const SQL: &str = "SELECT key, pid, at_us FROM effects";
    let mut rows: Vec<(String, i64, i64)> = match isolated.kind() {
        BackendKind::Postgres => {
            let store = isolated.postgres();
            let sql = format!(
                "SELECT key, pid::BIGINT, at_us FROM \"{}\".effects",
                store.table().schema()
            );
            sqlx::query_as(AssertSqlSafe(sql))
                .fetch_all(store.pool())
                .await
                .map_err(|e| format!("effects: {e}"))?
        }
        kind => {
            let conn = match kind {
                BackendKind::Sqlite => isolated.sqlite().connect().map_err(|e| e.to_string())?,
                _ => rusqlite::Connection::open(file).map_err(|e| e.to_string())?,
            };
            let mut stmt = conn.prepare(SQL).map_err(|e| format!("effects: {e}"))?;
            let read = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .map_err(|e| format!("effects: {e}"))?;
            read.collect::<Result<_, _>>()
                .map_err(|e| format!("effects: {e}"))?
        }
    };
    rows.sort_by_key(|r| r.2);
    let mut effects = Effects::new();
    for (key, pid, at) in rows {
        effects.entry(key).or_default().push((
            u32::try_from(pid).unwrap_or(0),
            u64::try_from(at).unwrap_or(0),
        ));
    }
    Ok(effects)
}

/// One line of the delivery log.
#[derive(Clone, Debug)]
struct Line {
    received: bool,
    pid: u32,
    at_us: u64,
    /// `A0`, `A1`, `D<ms>`, `X` for a settlement.
    what: String,
}

/// Reads the delivery log as it grows (whole lines only).
struct LogReader {
    path: PathBuf,
    offset: usize,
    /// Per (key, copy), its lines in log order.
    copies: HashMap<(String, u32), Vec<Line>>,
    /// Copies acknowledged or dead-lettered at least once.
    terminal: HashSet<(String, u32)>,
    /// Per process: deliveries received and not (yet) settled.
    open: HashMap<u32, i64>,
    /// Lines not of a published copy (a missing key or copy).
    strays: u64,
}

impl LogReader {
    fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            offset: 0,
            copies: HashMap::new(),
            terminal: HashSet::new(),
            open: HashMap::new(),
            strays: 0,
        }
    }

    fn read(&mut self) {
        let Ok(text) = std::fs::read(&self.path) else {
            return;
        };
        let Some(end) = text.iter().rposition(|&b| b == b'\n') else {
            return;
        };
        if end < self.offset {
            return;
        }
        let fresh = String::from_utf8_lossy(&text[self.offset..=end]).into_owned();
        self.offset = end + 1;
        for line in fresh.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            let &[kind, pid, at, key, copy, what] = f.as_slice() else {
                self.strays += 1;
                continue;
            };
            let (Ok(pid), Ok(at_us), Ok(copy)) = (pid.parse(), at.parse(), copy.parse()) else {
                self.strays += 1;
                continue;
            };
            let id = (key.to_string(), copy);
            let received = kind == "R";
            *self.open.entry(pid).or_default() += if received { 1 } else { -1 };
            if !received && (what.starts_with('A') || what == "X") {
                self.terminal.insert(id.clone());
            }
            self.copies.entry(id).or_default().push(Line {
                received,
                pid,
                at_us,
                what: what.to_string(),
            });
        }
    }
}

/// Microseconds since the epoch (the clock of the consumers' log lines).
fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Deliveries, delays and the hot-loop checks, from the log; `killed` says
/// when each killed consumer died.
///
/// A kill can multiply a copy: a delivery it cut short (received, never
/// settled) comes back, and so may the delayed copy it had already
/// published; an acknowledgement written just before the kill may never
/// reach the broker (the socket is reset with it unsent), so the delivery
/// comes back although its settlement was logged. A copy is *exposed* to a
/// kill when the killed consumer received it and either never settled it
/// or settled it within [`EXPOSURE`] of its death; each exposure explains
/// up to two more deliveries. A copy never exposed exists once at a time,
/// so each of its delayed redeliveries must wait its delay.
fn analyse(
    figures: &mut Figures,
    log: &LogReader,
    published: &HashSet<(String, u32)>,
    killed: &HashMap<u32, u64>,
) {
    let mut delays_ms: Vec<u64> = Vec::new();
    let mut shortest_wait = u64::MAX;
    for id in published {
        let lines = log.copies.get(id).map(Vec::as_slice).unwrap_or_default();
        let received = lines.iter().filter(|l| l.received).count() as u64;
        figures.deliveries += received;
        figures.max_per_copy = figures.max_per_copy.max(received);
        figures.dead_lettered += lines.iter().filter(|l| l.what == "X").count() as u64;
        // Per process: deliveries received and never settled, and the last
        // line's time.
        let mut per_pid: HashMap<u32, (i64, u64)> = HashMap::new();
        let mut delayed = 0u64;
        for l in lines {
            let entry = per_pid.entry(l.pid).or_default();
            entry.0 += if l.received { 1 } else { -1 };
            entry.1 = entry.1.max(l.at_us);
            if let Some(ms) = l.what.strip_prefix('D').and_then(|d| d.parse::<u64>().ok()) {
                delayed += 1;
                delays_ms.push(ms);
            }
        }
        let cut: u64 = per_pid.values().map(|&(n, _)| n.max(0) as u64).sum();
        let exposures = per_pid
            .iter()
            .filter(|(pid, (open, last))| {
                killed
                    .get(pid)
                    .is_some_and(|&died| *open > 0 || *last + EXPOSURE.as_micros() as u64 >= died)
            })
            .count() as u64;
        figures.cut += cut;
        figures.exposed += u64::from(exposures > 0);
        // Never settled, and no kill explains why the settlement is missing
        // from the log (a kill between the acknowledgement and its line).
        figures.unacked += u64::from(!log.terminal.contains(id) && cut == 0);
        figures.delayed += delayed;
        // Every delivery beyond the first: a delayed redelivery, or a kill.
        if received > 1 + delayed + 2 * exposures {
            figures.unexplained += received - 1 - delayed - 2 * exposures;
            figures.example(id, lines, killed);
        }
        if exposures == 0 {
            let mut last_received: Option<u64> = None;
            let mut pending: Option<(u64, u64)> = None; // (received at, delay µs)
            for l in lines {
                if l.received {
                    if let Some((at, delay)) = pending.take() {
                        let waited = l.at_us.saturating_sub(at);
                        shortest_wait = shortest_wait.min(waited / 1000);
                        // 1 ms of slack for clock granularity across processes.
                        if waited + 1000 < delay {
                            figures.early += 1;
                            figures.example(id, lines, killed);
                        }
                    }
                    last_received = Some(l.at_us);
                } else if let Some(ms) =
                    l.what.strip_prefix('D').and_then(|d| d.parse::<u64>().ok())
                {
                    pending = last_received.map(|at| (at, ms * 1000));
                }
            }
        }
    }
    figures.unexplained += log.strays;
    figures.delay_min_ms = delays_ms.iter().copied().min().unwrap_or(0);
    figures.delay_mean_ms = if delays_ms.is_empty() {
        0
    } else {
        delays_ms.iter().sum::<u64>() / delays_ms.len() as u64
    };
    figures.shortest_wait_ms = if shortest_wait == u64::MAX {
        0
    } else {
        shortest_wait
    };
}

/// Starts consumer processes.
struct Supervisor {
    args: Vec<String>,
    stderr: PathBuf,
}

impl Supervisor {
    /// Starts a consumer and waits for its `consuming` line.
    async fn start(&self) -> Result<Child, Failed> {
        let deadline = tokio::time::Instant::now() + START_DEADLINE;
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr)
            .map_err(|e| format!("stderr log: {e}"))?;
        let mut child = Command::new(BIN)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("spawning {BIN}: {e}"))?;
        let stdout = child.stdout.take().ok_or_else(|| "no stdout".to_string())?;
        let mut lines = BufReader::new(stdout).lines();
        loop {
            match tokio::time::timeout_at(deadline, lines.next_line()).await {
                Ok(Ok(Some(line))) if line.trim() == "consuming" => break,
                Ok(Ok(Some(_))) => {}
                Ok(Ok(None) | Err(_)) => {
                    let status = child.wait().await;
                    return Err(format!(
                        "the consumer exited before consuming ({status:?}); stderr:\n{}",
                        tail(&self.stderr)
                    ));
                }
                Err(_) => {
                    return Err(format!(
                        "the consumer did not start within {START_DEADLINE:?}; stderr:\n{}",
                        tail(&self.stderr)
                    ));
                }
            }
        }
        // Keep reading stdout, so the consumer never writes to a closed pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(child)
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
