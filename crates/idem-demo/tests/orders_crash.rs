//! Order crash test: `POST /orders` (reserve → charge at the card network →
//! receipt, written with idem's phases) through SIGKILLs and injected aborts,
//! on SQLite, PostgreSQL **and Redis**.
//!
//! - The simulated card network runs as a child process that is never
//!   killed (`idem-demo card-network`, failing 5% of its requests before
//!   charging and losing 5% of its answers after charging); its charge log
//!   is the independent count of charges.
//! - `idem-demo serve` runs as a child process on the same store, killed
//!   with SIGKILL at random moments and aborting itself at the order crash
//!   points (inside and between the phases), restarted after every death;
//!   two servers in three run the completer. Short lease (2 s), so keys
//!   abandoned by a dead server are taken over quickly.
//! - Concurrent clients send orders; each is retried with the same key and
//!   body until a final answer, except one in five, whose client gives up
//!   after one attempt and comes back only at the end (so the completer has
//!   orders no client is waiting for).
//!
//! It FAILS on any duplicate reservation (reservations per order ≠ 1, or
//! stock taken that no reservation explains), any duplicate card-network
//! charge (charges per order ≠ 1), any lost order (no reservation, no
//! receipt or no charge), any stuck order (a record still in flight at the
//! end), any two different answers for one key (every 201 body for a key
//! identical, and equal to what the ledger and the card network recorded),
//! any `outcome-unknown` or refused order, and fewer SIGKILLs than asked.
//! The figures are printed at the end.
//!
//! PostgreSQL and Redis are IGNORED with a banner when unreachable and FAIL
//! under `CI=true` / `IDEM_REQUIRE_BACKENDS=1`. Each run's store is
//! idem-testkit's isolated one (its own file / schema / key prefix, removed
//! at the end), with a temporary directory for the logs and the Redis
//! ledger.
//!
//! Knob (environment): `IDEM_ORDER_CRASH_KILLS` (SIGKILLs per backend,
//! default 200, never below 200 under CI).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use idem_core::store::Store;
use idem_core::{Clock, IdempotencyKey, RecordKey, SystemClock, Timestamp, downstream_key};
use idem_demo::app::CHARGE;
use idem_demo::{ChargeLine, Order, OrderCrashPoint, OrderRow, Stock, order_scope};
use idem_testkit::runner::{self, Runner, Trial};
use idem_testkit::{BackendKind, Isolated};
use idem_tower::ProblemType;
use libtest_mimic::Failed;
use reqwest::StatusCode;
use tokio::process::Child;

/// The lease of the servers under test.
///
/// A server that is *not* killed keeps its keys by heartbeat (every third
/// of the lease); a heartbeat later than two thirds of the lease (a loaded
/// two-core machine running the clients, the store and the restarts) would
/// let a retry or the completer take a live request's key over: phases run
/// beside the live ones, which no death explains. 2 s leaves such a
/// heartbeat over a second; a key abandoned by a killed server waits that
/// long for its takeover (the kill schedule does not depend on it).
const LEASE_MS: u64 = 2000;

/// Concurrent clients.
const CLIENTS: usize = 10;

/// The share of orders whose client gives up after one attempt (and comes
/// back at the end).
const GIVE_UP: f64 = 0.2;

/// `--crash-orders`: the probability of aborting at each order crash point.
const CRASH_ORDERS: f64 = 0.012;

/// Random delay before each SIGKILL, ms.
const KILL_DELAY_MS: (u64, u64) = (20, 250);

/// Skus per run.
const SKUS: usize = 4;

/// How long one order may take to get its final answer.
const ORDER_DEADLINE: Duration = Duration::from_secs(90);

/// The per-backend limit (the runner's default of 120 s is for unit-sized
/// tests; this one must still stay well under the CI budget).
const CASE_TIMEOUT: Duration = Duration::from_secs(300);

fn main() -> std::process::ExitCode {
    // Never below 200 under CI.
    let at_least = if runner::backends_required() { 200 } else { 0 };
    let kills = env_usize("IDEM_ORDER_CRASH_KILLS", 200).max(at_least);
    let runner = Runner::new("idem-demo (orders crash)")
        .with_worker_threads(runner::WORKER_THREADS)
        .with_default_test_threads(support::cores())
        .with_case_timeout(
            CASE_TIMEOUT.max(Duration::from_secs(
                env_usize("IDEM_CASE_TIMEOUT_SECS", 0) as u64
            )),
        );
    support::BACKENDS
        .into_iter()
        .fold(runner, |runner, kind| {
            let name = format!("orders_crash::{}", kind.name());
            let trial = Trial::test(name, move || async move {
                support::passed(crash(kind, kills).await);
            })
            .requires(kind.name());
            runner
                .requirement(kind.name(), move || kind.probe())
                .trial(trial)
        })
        .run()
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

async fn crash(kind: BackendKind, kills: usize) -> Result<(), Failed> {
    let figures = run(kind, kills).await?;
    println!("{figures}");
    figures.verdict(kills)
}

/// What one run observed.
#[derive(Debug, Default)]
struct Figures {
    backend: &'static str,
    kills: u64,
    /// Server exits while no SIGKILL was pending (injected aborts).
    aborts: u64,
    /// Injected aborts per crash point (from the servers' logs).
    aborts_at: Vec<(&'static str, u64)>,
    servers: u64,
    servers_with_completer: u64,
    requests: u64,
    orders: u64,
    gave_up: u64,
    /// Orders given up by their client and found completed (replayed) when
    /// it came back.
    found_completed: u64,
    resumes_by_retry: u64,
    resumes_by_completer: u64,
    reservations: u64,
    charges: u64,
    /// Reservations beyond the first of an order.
    duplicate_reservations: u64,
    /// Reservations of no order of this run.
    unexpected_reservations: u64,
    /// Skus whose stock taken differs from what their reservations hold.
    stock_mismatches: u64,
    /// Charges beyond the first of an order.
    duplicate_charges: u64,
    /// Charges of no order, or under another key than the order's.
    unexpected_charges: u64,
    /// Orders without a reservation, a receipt or a charge.
    lost: u64,
    unanswered: u64,
    outcome_unknown: u64,
    refused: u64,
    /// Orders with two different 201 bodies, or one that is not what the
    /// ledger and the card network recorded.
    inconsistent: u64,
    /// Records in flight after their lease at the end.
    stuck: u64,
    /// Records in flight at the end.
    in_flight_left: u64,
    elapsed: Duration,
    /// The first anomalies, spelled out.
    notes: Vec<String>,
}

impl fmt::Display for Figures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let aborts: Vec<String> = self
            .aborts_at
            .iter()
            .map(|(point, n)| format!("{point} {n}"))
            .collect();
        write!(
            f,
            "orders-crash[{}]: kills = {}, server exits on their own = {} (injected crashes logged: {}), servers = {} ({} with the completer), \
             requests = {}, orders = {} (given up by their client: {}, found completed on its return: {}), \
             resumes = {} by a retry + {} by the completer, reservations = {}, charges = {}, \
             duplicates = {} reservations + {} charges + {} stock mismatches, \
             unexpected = {} reservations + {} charges, lost = {}, unanswered = {}, outcome-unknown = {}, \
             refused = {}, inconsistent answers = {}, stuck in flight after lease = {}, in flight at the end = {}, \
             elapsed = {:.1} s",
            self.backend,
            self.kills,
            self.aborts,
            aborts.join(", "),
            self.servers,
            self.servers_with_completer,
            self.requests,
            self.orders,
            self.gave_up,
            self.found_completed,
            self.resumes_by_retry,
            self.resumes_by_completer,
            self.reservations,
            self.charges,
            self.duplicate_reservations,
            self.duplicate_charges,
            self.stock_mismatches,
            self.unexpected_reservations,
            self.unexpected_charges,
            self.lost,
            self.unanswered,
            self.outcome_unknown,
            self.refused,
            self.inconsistent,
            self.stuck,
            self.in_flight_left,
            self.elapsed.as_secs_f64()
        )
    }
}

impl Figures {
    fn verdict(&self, kills: usize) -> Result<(), Failed> {
        // (what, counted): each must be 0.
        let zero = [
            ("duplicate reservations", self.duplicate_reservations),
            ("unexpected reservations", self.unexpected_reservations),
            ("stock mismatches", self.stock_mismatches),
            ("duplicate card-network charges", self.duplicate_charges),
            ("unexpected card-network charges", self.unexpected_charges),
            ("lost orders", self.lost),
            ("unanswered orders", self.unanswered),
            ("outcome-unknown answers", self.outcome_unknown),
            ("refused orders", self.refused),
            ("inconsistent answers", self.inconsistent),
            ("stuck in flight", self.stuck),
            ("in flight at the end", self.in_flight_left),
        ];
        let mut errors: Vec<String> = zero
            .iter()
            .filter(|(_, n)| *n != 0)
            .map(|(what, n)| format!("{what} = {n}"))
            .collect();
        if self.kills < kills as u64 {
            errors.push(format!("only {} kills (want {kills})", self.kills));
        }
        if self.orders == 0 {
            errors.push("no order was made".to_string());
        }
        // With enough kills, some orders are always abandoned with a
        // checkpoint while a completer runs (a handful of kills may not).
        if self.resumes_by_completer == 0 && kills >= 50 {
            errors.push("the completer never resumed an order".to_string());
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "orders-crash[{}]: {}\n{}",
                self.backend,
                errors.join("; "),
                self.notes.join("\n")
            )
            .into())
        }
    }
}

/// What the clients and the supervisor share.
struct Shared {
    /// `http://ADDR` of the current server.
    base: RwLock<String>,
    /// Set when the clients should stop starting new orders.
    stop: AtomicBool,
    requests: AtomicU64,
    tenants: [String; 2],
    skus: Vec<String>,
}

/// One order and what its client got.
#[derive(Debug)]
struct Outcome {
    tenant: String,
    key: String,
    sku: String,
    quantity: u32,
    amount_cents: u64,
    /// Every 201 body answered for the key.
    answers: Vec<String>,
    /// The final answer was `outcome-unknown`.
    unknown: bool,
    /// The final answer was a 4xx.
    refused: bool,
    gave_up: bool,
    /// Given up, and answered 201 replayed on its client's return.
    found_completed: bool,
}

/// One attempt's result.
enum Attempt {
    Created { body: String, replayed: bool },
    Refused,
    Unknown,
    Again,
}

async fn attempt(shared: &Shared, http: &reqwest::Client, o: &Outcome, body: &str) -> Attempt {
    let base = shared.base.read().unwrap().clone();
    shared.requests.fetch_add(1, Ordering::SeqCst);
    let sent = async {
        let response = http
            .post(format!("{base}/orders"))
            .bearer_auth(&o.tenant)
            .header("Idempotency-Key", &o.key)
            .header("content-type", "application/json")
            .body(body.to_string())
            .timeout(Duration::from_secs(15))
            .send()
            .await?;
        let status = response.status();
        let replayed = response
            .headers()
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true");
        Ok::<_, reqwest::Error>((status, replayed, response.text().await?))
    }
    .await;
    match sent {
        Ok((StatusCode::CREATED, replayed, body)) => Attempt::Created { body, replayed },
        Ok((StatusCode::INTERNAL_SERVER_ERROR, _, text)) if is_outcome_unknown(&text) => {
            Attempt::Unknown
        }
        // A final refusal: never expected here (same body every time).
        Ok((status, _, _)) if status.is_client_error() && status != StatusCode::CONFLICT => {
            Attempt::Refused
        }
        // 409, 5xx, or the server died: the same request again.
        _ => Attempt::Again,
    }
}

/// Retries `o` until a final answer (or the deadline).
async fn until_final(shared: &Shared, http: &reqwest::Client, o: &mut Outcome, body: &str) {
    let deadline = Instant::now() + ORDER_DEADLINE;
    let mut first = true;
    while Instant::now() < deadline {
        match attempt(shared, http, o, body).await {
            Attempt::Created { body, replayed } => {
                if first && o.gave_up {
                    o.found_completed = replayed;
                }
                o.answers.push(body);
                return;
            }
            Attempt::Refused => {
                o.refused = true;
                return;
            }
            Attempt::Unknown => {
                o.unknown = true;
                return;
            }
            // The client's back-off between two attempts.
            Attempt::Again => {
                tokio::time::sleep(Duration::from_millis(fastrand::u64(5..=30))).await;
            }
        }
        first = false;
    }
}

fn order_body(o: &Outcome) -> String {
    serde_json::json!({"sku": o.sku, "quantity": o.quantity, "amount_cents": o.amount_cents})
        .to_string()
}

/// One client: orders one after another; most retried until their final
/// answer, some given up after one attempt and retried after `stop`.
async fn client(
    worker: usize,
    run_id: String,
    shared: Arc<Shared>,
    http: reqwest::Client,
) -> Vec<Outcome> {
    let mut done = Vec::new();
    let mut later = Vec::new();
    let mut n = 0usize;
    while !shared.stop.load(Ordering::SeqCst) {
        n += 1;
        let mut o = Outcome {
            tenant: shared.tenants[n % 2].clone(),
            key: format!("{run_id}-w{worker}-{n}"),
            sku: shared.skus[fastrand::usize(..shared.skus.len())].clone(),
            quantity: fastrand::u32(1..=5),
            amount_cents: fastrand::u64(1..100_000),
            answers: Vec::new(),
            unknown: false,
            refused: false,
            gave_up: fastrand::f64() < GIVE_UP,
            found_completed: false,
        };
        let body = order_body(&o);
        if o.gave_up {
            match attempt(&shared, &http, &o, &body).await {
                Attempt::Created { body, .. } => {
                    o.gave_up = false;
                    o.answers.push(body);
                    done.push(o);
                }
                Attempt::Refused => {
                    o.refused = true;
                    done.push(o);
                }
                Attempt::Unknown => {
                    o.unknown = true;
                    done.push(o);
                }
                Attempt::Again => later.push(o),
            }
        } else {
            until_final(&shared, &http, &mut o, &body).await;
            done.push(o);
        }
    }
    // The clients that gave up come back.
    for mut o in later {
        let body = order_body(&o);
        until_final(&shared, &http, &mut o, &body).await;
        done.push(o);
    }
    done
}

fn is_outcome_unknown(body: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(body).is_ok_and(|v| {
        v.get("type").and_then(serde_json::Value::as_str) == Some(ProblemType::OutcomeUnknown.uri())
    })
}

/// Starts the order servers: `--completer` on two in three.
struct Supervisor {
    args: Vec<String>,
    log: std::path::PathBuf,
    started: u64,
    with_completer: u64,
    /// Servers that aborted (an injected crash) before they were ready.
    died_starting: u64,
}

impl Supervisor {
    async fn start(&mut self, http: &reqwest::Client) -> Result<(Child, String), Failed> {
        loop {
            let mut args = self.args.clone();
            if self.started % 3 != 2 {
                args.push("--completer".into());
                self.with_completer += 1;
            }
            self.started += 1;
            // A completer's first pass may reach a crash point before the
            // server answers `/health`: start another.
            match support::child::try_start(&args, &self.log, http).await? {
                Some(started) => return Ok(started),
                None => self.died_starting += 1,
            }
        }
    }
}

async fn get_json<T: serde::de::DeserializeOwned>(
    http: &reqwest::Client,
    url: String,
    tenant: &str,
) -> Result<T, Failed> {
    let request = http.get(&url).bearer_auth(tenant);
    let got = async { request.send().await?.error_for_status()?.json().await };
    Ok(got
        .await
        .map_err(|e: reqwest::Error| format!("GET {url}: {e}"))?)
}

async fn run(kind: BackendKind, kills: usize) -> Result<Figures, Failed> {
    let started = Instant::now();
    let isolated = Isolated::fresh(kind).await;
    let dir = tempfile::tempdir().unwrap();
    let run_id = format!("{:08x}", fastrand::u32(..));
    let charge_log = dir.path().join("charges.log");
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(CLIENTS)
        .build()
        .unwrap();

    // The card network: never killed; fails and loses answers now and then.
    let network_args: Vec<String> = [
        "card-network",
        "--listen",
        "127.0.0.1:0",
        "--fail-rate",
        "0.05",
        "--drop-rate",
        "0.05",
        "--delay-ms",
        "15",
        "--log",
    ]
    .map(String::from)
    .into_iter()
    .chain([charge_log.display().to_string()])
    .collect();
    let (mut network, network_url) =
        support::child::start(&network_args, &dir.path().join("card-network.log"), &http).await?;

    let mut args: Vec<String> = [
        "serve",
        "--addr",
        "127.0.0.1:0",
        "--lease-ms",
        &LEASE_MS.to_string(),
        "--crash-orders",
        &CRASH_ORDERS.to_string(),
        "--card-network",
        &network_url,
    ]
    .map(String::from)
    .to_vec();
    args.extend(support::store_args(
        &isolated,
        &dir.path().join("ledger.db"),
    ));
    let log = dir.path().join("server.log");
    let mut supervisor = Supervisor {
        args,
        log: log.clone(),
        started: 0,
        with_completer: 0,
        died_starting: 0,
    };
    let shared = Arc::new(Shared {
        base: RwLock::new(String::new()),
        stop: AtomicBool::new(false),
        requests: AtomicU64::new(0),
        tenants: [format!("oc-{run_id}-a"), format!("oc-{run_id}-b")],
        skus: (0..SKUS).map(|n| format!("sku-{run_id}-{n}")).collect(),
    });

    let (mut child, url) = supervisor.start(&http).await?;
    *shared.base.write().unwrap() = url;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|worker| tokio::spawn(client(worker, run_id.clone(), shared.clone(), http.clone())))
        .collect();
    let mut clients_done = tokio::spawn(futures_util::future::join_all(clients));

    let mut figures = Figures {
        backend: kind.name(),
        ..Figures::default()
    };
    // The fault schedule: a random delay, then SIGKILL; a server that died
    // on its own (an injected abort) is restarted without counting a kill.
    while figures.kills < kills as u64 {
        let delay = Duration::from_millis(fastrand::u64(KILL_DELAY_MS.0..=KILL_DELAY_MS.1));
        tokio::select! {
            _ = child.wait() => figures.aborts += 1,
            () = tokio::time::sleep(delay) => {
                child.start_kill().map_err(|e| format!("kill: {e}"))?;
                let _ = child.wait().await;
                figures.kills += 1;
            }
        }
        let (next, url) = supervisor.start(&http).await?;
        child = next;
        *shared.base.write().unwrap() = url;
    }

    // Drain: no new orders; the ones under way, and the given-up ones, are
    // retried to their final answer (the server may still abort on its
    // own: restart it).
    shared.stop.store(true, Ordering::SeqCst);
    let drain_deadline = tokio::time::Instant::now() + 2 * ORDER_DEADLINE;
    let outcomes: Vec<Outcome> = loop {
        tokio::select! {
            done = &mut clients_done => {
                break done
                    .map_err(|e| format!("clients: {e}"))?
                    .into_iter()
                    .map(|r| r.map_err(|e| format!("client: {e}")))
                    .collect::<Result<Vec<_>, _>>()?
                    .into_iter()
                    .flatten()
                    .collect();
            }
            _ = child.wait() => {
                figures.aborts += 1;
                let (next, url) = supervisor.start(&http).await?;
                child = next;
                *shared.base.write().unwrap() = url;
            }
            () = tokio::time::sleep_until(drain_deadline) => {
                return Err("the clients did not finish".into());
            }
        }
    };
    figures.requests = shared.requests.load(Ordering::SeqCst);
    figures.servers = supervisor.started;
    figures.aborts += supervisor.died_starting;
    figures.servers_with_completer = supervisor.with_completer;

    // The ledger, through the last server.
    let base = shared.base.read().unwrap().clone();
    let mut rows: Vec<(String, OrderRow)> = Vec::new();
    for tenant in &shared.tenants {
        let listed: Vec<OrderRow> = get_json(&http, format!("{base}/orders"), tenant).await?;
        rows.extend(listed.into_iter().map(|r| (tenant.clone(), r)));
    }
    let stock: Vec<Stock> = get_json(&http, format!("{base}/stock"), "anyone").await?;
    let _ = child.start_kill();
    let _ = child.wait().await;
    let _ = network.start_kill();
    let _ = network.wait().await;
    let text = std::fs::read_to_string(&charge_log).map_err(|e| format!("charge log: {e}"))?;
    let charges =
        ChargeLine::parse_log(&text).map_err(|line| format!("charge log line {line:?}"))?;

    let charge_keys = charge_keys(&isolated, &outcomes).await?;
    count(
        &mut figures,
        &outcomes,
        &rows,
        &stock,
        &charges,
        &charge_keys,
    );
    let (stuck, left) = support::in_flight_records(&isolated, &record_keys(&outcomes)?).await?;
    figures.stuck = stuck;
    figures.in_flight_left = left;

    let server_log = std::fs::read_to_string(&log).unwrap_or_default();
    figures.aborts_at = OrderCrashPoint::ALL
        .iter()
        .map(|p| {
            let line = format!("injected order crash {}\n", p.name());
            (p.name(), server_log.matches(&line).count() as u64)
        })
        .collect();
    figures.resumes_by_retry = server_log.matches("by a retry").count() as u64;
    figures.resumes_by_completer = server_log.matches("by the completer").count() as u64;
    figures.elapsed = started.elapsed();
    Ok(figures)
}

/// Compares the orders with the ledger's rows, the stock and the card
/// network's charges.
fn count(
    figures: &mut Figures,
    outcomes: &[Outcome],
    rows: &[(String, OrderRow)],
    stock: &[Stock],
    charges: &[ChargeLine],
    charge_keys: &HashMap<(String, String), String>,
) {
    figures.orders = outcomes.len() as u64;
    figures.gave_up = outcomes.iter().filter(|o| o.gave_up).count() as u64;
    figures.found_completed = outcomes.iter().filter(|o| o.found_completed).count() as u64;
    figures.reservations = rows.len() as u64;
    figures.charges = charges.len() as u64;

    let mut by_key: HashMap<(&str, &str), Vec<&OrderRow>> = HashMap::new();
    for (tenant, row) in rows {
        by_key
            .entry((tenant.as_str(), row.idempotency_key.as_str()))
            .or_default()
            .push(row);
    }
    let mut by_order: HashMap<&str, Vec<&ChargeLine>> = HashMap::new();
    for line in charges {
        by_order.entry(line.order.as_str()).or_default().push(line);
    }
    let mut orders_seen = HashSet::new();
    for o in outcomes {
        figures.unanswered += u64::from(o.answers.is_empty() && !o.unknown && !o.refused);
        figures.outcome_unknown += u64::from(o.unknown);
        figures.refused += u64::from(o.refused);
        let reserved = by_key
            .remove(&(o.tenant.as_str(), o.key.as_str()))
            .unwrap_or_default();
        figures.duplicate_reservations += reserved.len().saturating_sub(1) as u64;
        let Some(row) = reserved.first() else {
            figures.lost += 1;
            continue;
        };
        orders_seen.insert(row.order_id.as_str());
        let lines = by_order
            .get(row.order_id.as_str())
            .cloned()
            .unwrap_or_default();
        figures.duplicate_charges += lines.len().saturating_sub(1) as u64;
        if lines.len() > 1 && figures.notes.len() < 10 {
            figures
                .notes
                .push(format!("charged {} times: {o:?}: {lines:?}", lines.len()));
        }
        let expected_key = charge_keys.get(&(o.tenant.clone(), o.key.clone()));
        figures.unexpected_charges += lines
            .iter()
            .filter(|l| Some(&l.key) != expected_key || l.amount_cents != o.amount_cents)
            .count() as u64;
        let (Some(receipt_id), Some(charge_id), Some(line)) =
            (&row.receipt_id, &row.charge_id, lines.first())
        else {
            figures.lost += 1;
            continue;
        };
        // Every 201 body identical, and what the ledger and the network hold.
        let recorded = Order {
            order_id: row.order_id.clone(),
            sku: o.sku.clone(),
            quantity: o.quantity,
            charge_id: line.charge_id.clone(),
            receipt_id: receipt_id.clone(),
        };
        let consistent = *charge_id == line.charge_id
            && row.sku == o.sku
            && row.quantity == o.quantity
            && row.amount_cents == o.amount_cents
            && o.answers.iter().all(|a| *a == o.answers[0])
            && o.answers
                .iter()
                .all(|a| serde_json::from_str::<Order>(a).is_ok_and(|got| got == recorded));
        figures.inconsistent += u64::from(!consistent);
        if !consistent && figures.notes.len() < 10 {
            figures
                .notes
                .push(format!("inconsistent: {o:?}: row {row:?}, charge {line:?}"));
        }
    }
    figures.unexpected_reservations = by_key.values().map(|v| v.len() as u64).sum();
    figures.unexpected_charges += charges
        .iter()
        .filter(|l| !orders_seen.contains(l.order.as_str()))
        .count() as u64;

    // The stock taken from each sku is what its reservations hold.
    let mut reserved: HashMap<&str, u64> = HashMap::new();
    for (_, row) in rows {
        *reserved.entry(row.sku.as_str()).or_default() += u64::from(row.quantity);
    }
    for s in stock {
        let taken = s.initial.saturating_sub(s.available);
        if reserved.remove(s.sku.as_str()).unwrap_or(0) != taken {
            figures.stock_mismatches += 1;
        }
    }
    figures.stock_mismatches += reserved.len() as u64;
}

fn now_ms() -> i64 {
    i64::try_from(SystemClock.now().as_millis()).unwrap()
}

/// The card network's key for each order's charge: derived from the record
/// key and the record's creation time (read from the store), as the service
/// derives it.
async fn charge_keys(
    isolated: &Isolated,
    outcomes: &[Outcome],
) -> Result<HashMap<(String, String), String>, Failed> {
    let now = Timestamp::from_millis(now_ms() as u64);
    let store = isolated.store();
    let mut keys = HashMap::new();
    for o in outcomes {
        let key = IdempotencyKey::parse(&o.key).map_err(|e| format!("{e}"))?;
        let record_key = RecordKey::new(&order_scope(&o.tenant), &key);
        if let Some(v) = store
            .get(&record_key, now)
            .await
            .map_err(|e| format!("reading the records: {e}"))?
        {
            keys.insert(
                (o.tenant.clone(), o.key.clone()),
                downstream_key(&record_key, v.record.created_at, CHARGE),
            );
        }
    }
    Ok(keys)
}

/// The record keys of `outcomes` (every key the clients used).
fn record_keys(outcomes: &[Outcome]) -> Result<Vec<RecordKey>, Failed> {
    outcomes
        .iter()
        .map(|o| {
            let key = IdempotencyKey::parse(&o.key).map_err(|e| format!("{e}"))?;
            Ok(RecordKey::new(&order_scope(&o.tenant), &key))
        })
        .collect()
}
