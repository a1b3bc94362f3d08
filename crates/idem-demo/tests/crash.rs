//! Crash test: `idem-demo serve` as a child process, killed with SIGKILL at
//! random moments (and aborting itself inside / right after charges), while
//! concurrent clients retry every payment with the same key until a final
//! answer; the server is restarted on the same store after every death.
//!
//! At the end, the payments ledger is compared with the logical payments:
//! - SQLite and PostgreSQL (ledger and idempotency record committed in one
//!   transaction): FAILS unless every logical payment was charged exactly
//!   once (duplicates = 0), none was lost (lost = 0), every client's answer
//!   is the payment charged, and no record is left in flight after its
//!   lease. At least 200 kills each.
//! - Redis (ledger in a separate SQLite file): the same, except that double
//!   charges are MEASURED and printed, not failed on — that is the documented
//!   at-least-once window (a crash after the ledger commit and before the
//!   key's completion). Lost payments and stuck keys still fail.
//!
//! Every server also has an external effect (`--effect-log`): each charge
//! appends `<tenant> <key> <payment id>` to a file before its ledger write,
//! outside the store's transaction, as a card network call would. External
//! duplicates (lines beyond one per logical payment) are MEASURED and
//! printed on every backend, not failed on: an effect followed by a crash
//! before the commit is the at-least-once window of any external call. What
//! fails: a charged payment without its external call (by payment id), a
//! line of no logical payment, and a call that neither charged nor was
//! followed by the death of the server that made it (every call without a
//! charge must be explained by a crash, at most one per client per death).
//! A key answered `outcome-unknown` also fails: here the only ambiguity is a
//! crash, which never finishes a key.
//!
//! PostgreSQL and Redis are IGNORED with a banner when unreachable and FAIL
//! under `CI=true` / `IDEM_REQUIRE_BACKENDS=1`. Each run's store is
//! idem-testkit's isolated one (its own file / schema / key prefix, removed
//! at the end), with a temporary directory for the logs.
//!
//! Knobs (environment): `IDEM_CRASH_KILLS` (SIGKILLs per SQL backend,
//! default 200, never below 200 under CI), `IDEM_CRASH_REDIS_KILLS` (default 60).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use idem_core::{IdempotencyKey, RecordKey};
use idem_demo::{Payment, scope_for};
use idem_testkit::runner::{self, Suite};
use idem_testkit::{BackendKind, Isolated};
use idem_tower::ProblemType;
use libtest_mimic::Failed;
use reqwest::StatusCode;
use tokio::process::Child;

/// The lease of the servers under test: short, so keys abandoned by a
/// killed server are taken over quickly.
///
/// A server that is *not* killed keeps its keys by heartbeat (every third
/// of the lease); a heartbeat later than two thirds of the lease (a loaded
/// two-core machine running the clients, the store and the restarts) would
/// let a retry take a live request's key over, and the extra external call
/// that follows is blamed on no death. 2 s leaves such a heartbeat over a
/// second; a key abandoned by a killed server waits that long for its
/// takeover (the kill schedule does not depend on it).
const LEASE_MS: u64 = 2000;

/// Concurrent clients.
const CLIENTS: usize = 12;

/// How long one logical payment may take to get its final answer.
const PAYMENT_DEADLINE: Duration = Duration::from_secs(90);

fn main() -> std::process::ExitCode {
    // Never below 200 under CI.
    let at_least = if runner::backends_required() { 200 } else { 0 };
    let kills = env_usize("IDEM_CRASH_KILLS", 200).max(at_least);
    let redis_kills = env_usize("IDEM_CRASH_REDIS_KILLS", 60);
    Suite::new("idem-demo (crash)")
        .with_default_test_threads(support::cores())
        .each(&support::BACKENDS[..2], "crash", move |kind| async move {
            support::passed(crash_sql(kind, kills).await);
        })
        .on(BackendKind::Redis, "crash", move |_| async move {
            support::passed(crash_redis(redis_kills).await);
        })
        .run()
}

/// SQLite and PostgreSQL: exactly once through every crash.
async fn crash_sql(kind: BackendKind, kills: usize) -> Result<(), Failed> {
    let target = Target::new(kind).await;
    let figures = run(&target, &Plan::with_aborts(kills)).await?;
    println!("{figures}");
    println!("{}", figures.summary());
    figures.require_exactly_once(kills)
}

async fn crash_redis(redis_kills: usize) -> Result<(), Failed> {
    let mut all = Vec::new();
    for plan in [
        Plan::kills_only(redis_kills),
        Plan::with_aborts(redis_kills / 2),
    ] {
        let figures = run(&Target::new(BackendKind::Redis).await, &plan).await?;
        println!("{figures}");
        figures.require_at_least_once()?;
        all.push(figures);
    }
    println!(
        "crash[redis]: MEASURED double charges (at-least-once window, not a failure): \
         {} after {} SIGKILLs alone; {} after {} SIGKILLs + {} aborts right after the ledger commit",
        all[0].extra_charges,
        all[0].kills,
        all[1].extra_charges,
        all[1].kills,
        all[1].aborts_after_charge
    );
    for figures in &all {
        println!("{}", figures.summary());
    }
    Ok(())
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// One server configuration under test.
struct Target {
    /// The store whose place (file, schema, key prefix) the servers use.
    isolated: Isolated,
    /// `--store …` and the backend's options.
    args: Vec<String>,
    /// The servers' logs (and the Redis ledger).
    dir: tempfile::TempDir,
}

impl Target {
    async fn new(kind: BackendKind) -> Self {
        let isolated = Isolated::fresh(kind).await;
        let dir = tempfile::tempdir().unwrap();
        let (store, options) = support::demo_store(&isolated, &dir.path().join("ledger.db"));
        let args = vec![
            "--store".into(),
            store,
            "--pg-schema".into(),
            options.pg_schema,
            "--pg-max-connections".into(),
            "8".into(),
            "--redis-prefix".into(),
            options.redis_prefix,
            "--ledger".into(),
            options.ledger.unwrap_or_default().display().to_string(),
        ];
        Self {
            isolated,
            args,
            dir,
        }
    }
}

/// The fault schedule.
#[derive(Clone, Debug)]
struct Plan {
    label: &'static str,
    /// SIGKILLs to deliver.
    kills: usize,
    /// Random delay before each SIGKILL, ms.
    kill_delay_ms: (u64, u64),
    /// `--crash-in-charge`.
    crash_in_charge: f64,
    /// `--crash-after-charge`.
    crash_after_charge: f64,
}

impl Plan {
    /// SIGKILLs at random, plus aborts inside and right after charges.
    fn with_aborts(kills: usize) -> Self {
        Self {
            label: "SIGKILL at random + aborts inside and right after charges",
            crash_in_charge: 0.08,
            crash_after_charge: 0.08,
            ..Self::kills_only(kills)
        }
    }

    /// SIGKILLs at random only.
    fn kills_only(kills: usize) -> Self {
        Self {
            label: "SIGKILL at random only",
            kills,
            kill_delay_ms: (20, 160),
            crash_in_charge: 0.0,
            crash_after_charge: 0.0,
        }
    }
}

/// What one run observed.
#[derive(Debug, Default)]
struct Figures {
    backend: &'static str,
    label: &'static str,
    kills: u64,
    /// Server exits seen while no SIGKILL was pending (an injected abort
    /// may instead coincide with a SIGKILL: the log counts below are the
    /// injected aborts themselves).
    aborts: u64,
    aborts_in_charge: u64,
    aborts_after_charge: u64,
    /// Client requests in flight at the moments of the SIGKILLs, summed.
    requests_hit_by_kills: u64,
    requests: u64,
    logical: u64,
    charges: u64,
    /// Charges beyond the first of a logical payment.
    extra_charges: u64,
    /// Logical payments charged more than once.
    duplicate_keys: u64,
    lost: u64,
    unanswered: u64,
    /// Logical payments whose final answer was `outcome-unknown`.
    outcome_unknown: u64,
    inconsistent: u64,
    unexpected: u64,
    stuck: u64,
    in_flight_left: u64,
    /// Lines in the effect log (external calls).
    external_calls: u64,
    /// External calls beyond the first of a logical payment.
    external_duplicates: u64,
    /// Logical payments with more than one external call.
    external_duplicate_keys: u64,
    /// External calls whose payment was never charged (the server died
    /// between the call and the commit).
    external_orphans: u64,
    /// The most external calls without a charge left by one server death.
    external_orphans_per_death: u64,
    /// External calls without a charge made by a server that did not die
    /// afterwards: no crash explains them.
    external_unexplained: u64,
    /// Charged payments without their external call (by payment id).
    external_missing: u64,
    /// Lines of no logical payment of this run, or not `<tenant> <key> <id>`.
    external_unexpected: u64,
    elapsed: Duration,
}

impl fmt::Display for Figures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "crash[{}] ({}): kills = {}, injected aborts = {} inside a charge + {} right after a charge \
             (server exits on its own: {}), \
             requests = {}, requests in flight at the kills = {}, logical payments = {}, charges = {}, \
             duplicates = {} (keys charged twice: {}), lost = {}, unanswered = {}, outcome-unknown = {}, \
             inconsistent answers = {}, unexpected charges = {}, stuck in flight after lease = {}, \
             in flight at the end = {}, external calls = {}, external duplicates = {} (keys called twice: {}; \
             calls never charged: {}, at most {} per server death, unexplained by a death: {}), \
             charges without their external call = {}, unexpected external calls = {}, elapsed = {:.1} s",
            self.backend,
            self.label,
            self.kills,
            self.aborts_in_charge,
            self.aborts_after_charge,
            self.aborts,
            self.requests,
            self.requests_hit_by_kills,
            self.logical,
            self.charges,
            self.extra_charges,
            self.duplicate_keys,
            self.lost,
            self.unanswered,
            self.outcome_unknown,
            self.inconsistent,
            self.unexpected,
            self.stuck,
            self.in_flight_left,
            self.external_calls,
            self.external_duplicates,
            self.external_duplicate_keys,
            self.external_orphans,
            self.external_orphans_per_death,
            self.external_unexplained,
            self.external_missing,
            self.external_unexpected,
            self.elapsed.as_secs_f64()
        )
    }
}

impl Figures {
    /// The one-line summary of the measured windows.
    fn summary(&self) -> String {
        format!(
            "crash[{}] summary ({}): MEASURED external duplicates (at-least-once window of an external call, \
             not a failure) = {} over {} logical payments, after {} SIGKILLs + {} injected aborts; \
             ledger duplicates = {}; outcome-unknown = {}; elapsed = {:.1} s",
            self.backend,
            self.label,
            self.external_duplicates,
            self.logical,
            self.kills,
            self.aborts_in_charge + self.aborts_after_charge,
            self.extra_charges,
            self.outcome_unknown,
            self.elapsed.as_secs_f64()
        )
    }

    /// SQLite / PostgreSQL: exactly once, through every crash.
    fn require_exactly_once(&self, kills: usize) -> Result<(), Failed> {
        let mut errors = self.at_least_once_errors();
        if self.extra_charges != 0 || self.duplicate_keys != 0 {
            errors.push(format!("duplicates = {}", self.extra_charges));
        }
        if self.inconsistent != 0 {
            errors.push(format!("inconsistent answers = {}", self.inconsistent));
        }
        if self.kills < kills as u64 {
            errors.push(format!("only {} kills", self.kills));
        }
        self.verdict(errors)
    }

    /// Redis: nothing lost or stuck; double charges are measured only.
    fn require_at_least_once(&self) -> Result<(), Failed> {
        self.verdict(self.at_least_once_errors())
    }

    fn verdict(&self, errors: Vec<String>) -> Result<(), Failed> {
        if errors.is_empty() {
            Ok(())
        } else {
            Err(format!("{}: {}", self.backend, errors.join("; ")).into())
        }
    }

    fn at_least_once_errors(&self) -> Vec<String> {
        // (what, counted): each must be 0.
        let zero = [
            ("lost", self.lost),
            ("unanswered", self.unanswered),
            (
                "outcome-unknown (a crash alone must never finish a key as outcome-unknown)",
                self.outcome_unknown,
            ),
            ("charges without their external call", self.external_missing),
            ("unexpected external calls", self.external_unexpected),
            (
                "external calls never charged, by a server that did not die",
                self.external_unexplained,
            ),
            ("unexpected charges", self.unexpected),
            ("stuck in flight", self.stuck),
            ("in flight at the end", self.in_flight_left),
        ];
        let mut errors: Vec<String> = zero
            .iter()
            .filter(|(_, n)| *n != 0)
            .map(|(what, n)| format!("{what} = {n}"))
            .collect();
        // Every extra external call is a ledger duplicate (Redis) or a call
        // that never charged, and each of those is explained by a death.
        if self.external_duplicates > self.extra_charges + self.external_orphans {
            errors.push(format!(
                "external duplicates = {} > ledger duplicates {} + calls never charged {}",
                self.external_duplicates, self.extra_charges, self.external_orphans
            ));
        }
        if self.external_orphans_per_death > CLIENTS as u64 {
            errors.push(format!(
                "{} external calls never charged left by one server death (at most {CLIENTS} clients)",
                self.external_orphans_per_death
            ));
        }
        for (none, what) in [
            (self.logical, "no payment was made"),
            (self.kills, "no kill was delivered"),
        ] {
            if none == 0 {
                errors.push(what.to_string());
            }
        }
        errors
    }
}

/// What the clients and the supervisor share.
struct Shared {
    /// `http://ADDR` of the current server.
    base: RwLock<String>,
    /// Set when the clients should stop starting new payments.
    stop: AtomicBool,
    /// Client requests currently in flight.
    in_flight: AtomicU64,
    requests: AtomicU64,
    tenants: [String; 2],
}

/// One logical payment and the final answer its client got.
struct Outcome {
    tenant: String,
    key: String,
    amount: u64,
    answer: Option<Payment>,
    /// The final answer was `outcome-unknown`.
    unknown: bool,
}

async fn run(target: &Target, plan: &Plan) -> Result<Figures, Failed> {
    let started = Instant::now();
    let run_id = format!("{:08x}", fastrand::u32(..));
    let log = target.dir.path().join(format!("server-{run_id}.log"));
    let effect_log = target.dir.path().join(format!("effects-{run_id}.log"));
    let mut args = vec![
        "serve".to_string(),
        "--addr".into(),
        "127.0.0.1:0".into(),
        "--lease-ms".into(),
        LEASE_MS.to_string(),
        "--crash-in-charge".into(),
        plan.crash_in_charge.to_string(),
        "--crash-after-charge".into(),
        plan.crash_after_charge.to_string(),
        "--effect-log".into(),
        effect_log.display().to_string(),
    ];
    args.extend(target.args.iter().cloned());
    let supervisor = Supervisor {
        args,
        log: log.clone(),
    };
    let shared = Arc::new(Shared {
        base: RwLock::new(String::new()),
        stop: AtomicBool::new(false),
        in_flight: AtomicU64::new(0),
        requests: AtomicU64::new(0),
        tenants: [format!("crash-{run_id}-a"), format!("crash-{run_id}-b")],
    });
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(CLIENTS)
        .build()
        .unwrap();

    let (mut child, url) = supervisor.start(&http).await?;
    *shared.base.write().unwrap() = url;

    let clients: Vec<_> = (0..CLIENTS)
        .map(|worker| tokio::spawn(client(worker, run_id.clone(), shared.clone(), http.clone())))
        .collect();
    let mut clients_done = tokio::spawn(futures_util::future::join_all(clients));

    let mut figures = Figures {
        backend: target.isolated.kind().name(),
        label: plan.label,
        ..Figures::default()
    };
    // The effect log's length at each server death: the lines before the
    // n-th boundary were written by the first n servers.
    let mut deaths: Vec<u64> = Vec::new();
    let effect_len = || std::fs::metadata(&effect_log).map_or(0, |m| m.len());
    // The fault schedule: a random delay, then SIGKILL; a server that died
    // on its own (an injected abort) is restarted without counting a kill.
    while figures.kills < plan.kills as u64 {
        let delay =
            Duration::from_millis(fastrand::u64(plan.kill_delay_ms.0..=plan.kill_delay_ms.1));
        tokio::select! {
            _ = child.wait() => figures.aborts += 1,
            () = tokio::time::sleep(delay) => {
                figures.requests_hit_by_kills += shared.in_flight.load(Ordering::SeqCst);
                child.start_kill().map_err(|e| format!("kill: {e}"))?;
                let _ = child.wait().await;
                figures.kills += 1;
            }
        }
        deaths.push(effect_len());
        let (next, url) = supervisor.start(&http).await?;
        child = next;
        *shared.base.write().unwrap() = url;
    }

    // Drain: no new payments; the ones under way retry to their final answer
    // (the server may still abort on its own: restart it).
    shared.stop.store(true, Ordering::SeqCst);
    let drain_deadline = tokio::time::Instant::now() + PAYMENT_DEADLINE + Duration::from_secs(30);
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
                deaths.push(effect_len());
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
    figures.logical = outcomes.len() as u64;

    // The ledger, through the (last) server.
    let base = shared.base.read().unwrap().clone();
    let mut charged: HashMap<(String, String), Vec<Payment>> = HashMap::new();
    for tenant in &shared.tenants {
        for p in list(&http, &base, tenant).await? {
            charged
                .entry((tenant.clone(), p.idempotency_key.clone()))
                .or_default()
                .push(p);
        }
    }
    let _ = child.start_kill();
    let _ = child.wait().await;
    let charged_ids: HashSet<String> = charged.values().flatten().map(|p| p.id.clone()).collect();
    let effects = std::fs::read_to_string(&effect_log).map_err(|e| format!("effect log: {e}"))?;
    count_effects(&mut figures, &effects, &deaths, &outcomes, &charged_ids);

    for o in &outcomes {
        let rows = charged
            .remove(&(o.tenant.clone(), o.key.clone()))
            .unwrap_or_default();
        figures.charges += rows.len() as u64;
        figures.extra_charges += rows.len().saturating_sub(1) as u64;
        figures.duplicate_keys += u64::from(rows.len() > 1);
        figures.lost += u64::from(rows.is_empty());
        match &o.answer {
            None if o.unknown => figures.outcome_unknown += 1,
            None => figures.unanswered += 1,
            // The answer is the payment charged (with several charges, one
            // of them), with the client's amount.
            Some(answer) => {
                if !rows.contains(answer) || answer.amount != o.amount {
                    figures.inconsistent += 1;
                }
            }
        }
    }
    figures.unexpected = charged.values().map(|rows| rows.len() as u64).sum();

    let (stuck, left) =
        support::in_flight_records(&target.isolated, &record_keys(&outcomes)?).await?;
    figures.stuck = stuck;
    figures.in_flight_left = left;

    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    figures.aborts_in_charge = log_text.matches("injected crash inside").count() as u64;
    figures.aborts_after_charge = log_text.matches("injected crash after").count() as u64;
    figures.elapsed = started.elapsed();
    Ok(figures)
}

/// Counts the external calls of the effect log (`<tenant> <key> <payment
/// id>` lines) per logical payment, and which calls were never charged;
/// `deaths` are the log's lengths at the server deaths.
fn count_effects(
    figures: &mut Figures,
    effects: &str,
    deaths: &[u64],
    outcomes: &[Outcome],
    charged_ids: &HashSet<String>,
) {
    let mut calls: HashMap<(&str, &str), u64> = outcomes
        .iter()
        .map(|o| ((o.tenant.as_str(), o.key.as_str()), 0))
        .collect();
    let mut called_ids = HashSet::new();
    // Calls never charged, per server (index: the servers in start order;
    // the last one never died).
    let mut orphans = vec![0u64; deaths.len() + 1];
    let mut offset = 0u64;
    for line in effects.split_inclusive('\n') {
        let server = deaths.partition_point(|&end| end <= offset);
        offset += line.len() as u64;
        figures.external_calls += 1;
        let fields: Vec<&str> = line.split_whitespace().collect();
        let &[tenant, key, id] = fields.as_slice() else {
            figures.external_unexpected += 1;
            continue;
        };
        if !line.ends_with('\n') {
            figures.external_unexpected += 1;
            continue;
        }
        match calls.get_mut(&(tenant, key)) {
            Some(n) => *n += 1,
            None => figures.external_unexpected += 1,
        }
        called_ids.insert(id);
        if !charged_ids.contains(id) {
            orphans[server] += 1;
        }
    }
    for &n in calls.values() {
        figures.external_duplicates += n.saturating_sub(1);
        figures.external_duplicate_keys += u64::from(n > 1);
    }
    figures.external_missing = charged_ids
        .iter()
        .filter(|id| !called_ids.contains(id.as_str()))
        .count() as u64;
    figures.external_orphans = orphans.iter().sum();
    figures.external_orphans_per_death = orphans[..deaths.len()].iter().copied().max().unwrap_or(0);
    figures.external_unexplained = orphans[deaths.len()];
}

/// Starts servers.
struct Supervisor {
    args: Vec<String>,
    log: PathBuf,
}

impl Supervisor {
    /// Starts the server, waits for its `listening on` line and for
    /// `/health` to answer 200 (polling, with a deadline).
    async fn start(&self, http: &reqwest::Client) -> Result<(Child, String), Failed> {
        support::child::start(&self.args, &self.log, http).await
    }
}

/// One client: logical payments one after another, each retried with the
/// same key and body until a final answer.
async fn client(
    worker: usize,
    run_id: String,
    shared: Arc<Shared>,
    http: reqwest::Client,
) -> Vec<Outcome> {
    let mut outcomes = Vec::new();
    let mut n = 0usize;
    while !shared.stop.load(Ordering::SeqCst) {
        n += 1;
        let tenant = shared.tenants[n % 2].clone();
        let key = format!("{run_id}-w{worker}-{n}");
        let amount = fastrand::u64(1..100_000);
        // Half the payments are slow charges, so kills land mid-charge.
        let delay_ms = if fastrand::bool() {
            fastrand::u64(20..=250)
        } else {
            0
        };
        let body = serde_json::json!({
            "amount": amount, "currency": "EUR", "customer": format!("c{worker}"),
            "delay_ms": delay_ms,
        })
        .to_string();
        let deadline = Instant::now() + PAYMENT_DEADLINE;
        let mut unknown = false;
        let answer = loop {
            if Instant::now() >= deadline {
                break None;
            }
            let base = shared.base.read().unwrap().clone();
            shared.in_flight.fetch_add(1, Ordering::SeqCst);
            shared.requests.fetch_add(1, Ordering::SeqCst);
            let result = async {
                let response = http
                    .post(format!("{base}/payments"))
                    .bearer_auth(&tenant)
                    .header("Idempotency-Key", &key)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .timeout(Duration::from_secs(15))
                    .send()
                    .await?;
                let status = response.status();
                Ok::<_, reqwest::Error>((status, response.text().await?))
            }
            .await;
            shared.in_flight.fetch_sub(1, Ordering::SeqCst);
            match result {
                Ok((StatusCode::CREATED, text)) => {
                    break serde_json::from_str::<Payment>(&text).ok();
                }
                // A final refusal: never expected here (same body every time).
                Ok((StatusCode::UNPROCESSABLE_ENTITY | StatusCode::BAD_REQUEST, _)) => break None,
                // The key's final answer: the outcome is not known and the
                // payment is never run again (counted; not expected here).
                Ok((StatusCode::INTERNAL_SERVER_ERROR, text)) if is_outcome_unknown(&text) => {
                    unknown = true;
                    break None;
                }
                // 409, 503, or the server died: retry the same request.
                _ => tokio::time::sleep(Duration::from_millis(fastrand::u64(5..=30))).await,
            }
        };
        outcomes.push(Outcome {
            tenant,
            key,
            amount,
            answer,
            unknown,
        });
    }
    outcomes
}

/// Whether `body` is the `outcome-unknown` problem.
fn is_outcome_unknown(body: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(body).is_ok_and(|v| {
        v.get("type").and_then(serde_json::Value::as_str) == Some(ProblemType::OutcomeUnknown.uri())
    })
}

async fn list(http: &reqwest::Client, base: &str, tenant: &str) -> Result<Vec<Payment>, Failed> {
    let request = http.get(format!("{base}/payments")).bearer_auth(tenant);
    let listed = async { request.send().await?.error_for_status()?.json().await };
    Ok(listed
        .await
        .map_err(|e: reqwest::Error| format!("GET /payments: {e}"))?)
}

/// The record keys of `outcomes` (every key the clients used).
fn record_keys(outcomes: &[Outcome]) -> Result<Vec<RecordKey>, Failed> {
    outcomes
        .iter()
        .map(|o| {
            let key = IdempotencyKey::parse(&o.key).map_err(|e| format!("{e}"))?;
            Ok(RecordKey::new(&scope_for(&o.tenant), &key))
        })
        .collect()
}
