//! The retry storm: clients that double-click, time out and retry, hit
//! transient failures, reuse keys with changed payloads, and share keys across
//! tenants — then a count of what was charged.
//!
//! Every logical payment has its own (tenant, key). At the end the storm
//! lists each tenant's payments (`GET /payments`) and compares them with what
//! it meant to pay: a key charged twice is a duplicate, a key never charged
//! is lost, an answer that differs from another attempt's, or from the
//! payment charged, is inconsistent.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use reqwest::StatusCode;
use serde_json::json;
use tokio::sync::Semaphore;

use crate::DemoError;
use crate::app::Payment;
use crate::backend::{Backend, BackendOptions, StoreUrl};
use crate::report::{ScenarioStats, StormReport};
use crate::server::RunningServer;

/// How big a storm to run.
#[derive(Clone, Copy, Debug)]
pub struct StormConfig {
    /// Logical payments per scenario (per tenant for
    /// [`Scenario::TwoTenants`]).
    pub payments_per_scenario: usize,
    /// Logical payments in flight at once.
    pub concurrency: usize,
    /// Identical requests sent at once by a double-clicking client.
    pub double_clicks: usize,
    /// How long the slow charges of [`Scenario::TimeoutThenRetry`] take
    /// server-side.
    pub slow_charge: Duration,
    /// How long the client of [`Scenario::TimeoutThenRetry`] waits before
    /// giving up on its first attempt (shorter than `slow_charge`).
    pub client_timeout: Duration,
    /// Show a progress bar (on stderr, when it is a terminal).
    pub progress: bool,
}

impl StormConfig {
    /// The storm the README's run command shows.
    pub fn full() -> Self {
        Self {
            payments_per_scenario: 200,
            concurrency: 32,
            double_clicks: 4,
            slow_charge: Duration::from_millis(150),
            client_timeout: Duration::from_millis(30),
            progress: true,
        }
    }

    /// A small storm for tests.
    pub fn small() -> Self {
        Self {
            payments_per_scenario: 12,
            concurrency: 8,
            double_clicks: 3,
            slow_charge: Duration::from_millis(150),
            client_timeout: Duration::from_millis(30),
            progress: false,
        }
    }

    fn validate(&self) -> Result<(), DemoError> {
        let invalid = |m: &str| Err(DemoError::InvalidOption(m.to_string()));
        if self.payments_per_scenario == 0 || self.payments_per_scenario > 100_000 {
            return invalid("payments per scenario must be between 1 and 100000");
        }
        if self.concurrency == 0 || self.concurrency > 4096 {
            return invalid("concurrency must be between 1 and 4096");
        }
        if self.double_clicks < 2 || self.double_clicks > 64 {
            return invalid("double clicks must be between 2 and 64");
        }
        if self.client_timeout >= self.slow_charge {
            return invalid("the client timeout must be shorter than the slow charge");
        }
        if self.slow_charge > crate::app::MAX_DELAY {
            return invalid("the slow charge must be at most 30 s");
        }
        Ok(())
    }
}

/// The kinds of client misbehaviour in the storm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scenario {
    /// Several identical requests at once (a double-click): one charge, the
    /// others get 409 then the replay.
    DoubleClick,
    /// The client gives up before a slow charge finishes, then retries: 409
    /// while the charge runs, then the replay.
    TimeoutThenRetry,
    /// The first attempt fails transiently (503, nothing charged); the retry
    /// charges.
    TransientFailure,
    /// The key is reused with another amount: 422, never a second charge.
    PayloadChanged,
    /// Two tenants send the same keys (double-clicking): two separate
    /// payments per key, one per tenant.
    TwoTenants,
}

impl Scenario {
    /// Every scenario, in table order.
    pub const ALL: [Self; 5] = [
        Self::DoubleClick,
        Self::TimeoutThenRetry,
        Self::TransientFailure,
        Self::PayloadChanged,
        Self::TwoTenants,
    ];

    /// The scenario's name in the table.
    pub fn name(self) -> &'static str {
        match self {
            Self::DoubleClick => "double-click",
            Self::TimeoutThenRetry => "timeout + retry",
            Self::TransientFailure => "transient failure",
            Self::PayloadChanged => "payload changed",
            Self::TwoTenants => "two tenants",
        }
    }

    fn slug(self) -> &'static str {
        match self {
            Self::DoubleClick => "dbl",
            Self::TimeoutThenRetry => "slow",
            Self::TransientFailure => "flaky",
            Self::PayloadChanged => "reuse",
            Self::TwoTenants => "shared",
        }
    }

    fn index(self) -> usize {
        match self {
            Self::DoubleClick => 0,
            Self::TimeoutThenRetry => 1,
            Self::TransientFailure => 2,
            Self::PayloadChanged => 3,
            Self::TwoTenants => 4,
        }
    }
}

/// Per-scenario counters.
#[derive(Default)]
struct Counters {
    attempts: AtomicU64,
    replays: AtomicU64,
    conflicts: AtomicU64,
    mismatches: AtomicU64,
    unavailable: AtomicU64,
    timeouts: AtomicU64,
    inconsistent: AtomicU64,
}

/// Everything the clients record.
#[derive(Default)]
struct Observed {
    scenarios: [Counters; 5],
    latencies: Mutex<Vec<Duration>>,
    /// (tenant, key) → the payment the final answers named.
    answers: Mutex<HashMap<(String, String), Payment>>,
}

/// One planned logical payment.
#[derive(Clone, Debug)]
struct Plan {
    scenario: Scenario,
    tenant: String,
    key: String,
    customer: String,
    amount: u64,
}

/// Starts the demo server on `store` in this process (on 127.0.0.1, a free
/// port), runs the storm against it, and shuts it down.
///
/// Returns the report and the lines describing the backend.
pub async fn run_in_process(
    store: &StoreUrl,
    options: &BackendOptions,
    config: StormConfig,
) -> Result<(StormReport, Vec<String>), DemoError> {
    let backend = Backend::open(store, options).await?;
    let description = backend.description().to_vec();
    let server = RunningServer::start(([127, 0, 0, 1], 0).into(), backend).await?;
    let report = run(&server.url(), config).await;
    server.shutdown().await;
    Ok((report?, description))
}

/// Runs the storm against a demo server at `base` (e.g.
/// `http://127.0.0.1:3000`).
///
/// # Behavior
/// Each run uses fresh tenants (`storm-<random>-a`, `-b`), so it counts only
/// its own payments, on a fresh or a long-running server alike. Fails only
/// if the configuration is invalid or the final `GET /payments` fails; every
/// misbehaviour of the server is counted in the report instead.
pub async fn run(base: &str, config: StormConfig) -> Result<StormReport, DemoError> {
    config.validate()?;
    let base = base.trim_end_matches('/').to_string();
    let started = Instant::now();
    let run_id = format!("{:08x}", fastrand::u32(..));
    let mut plans = Vec::new();
    for scenario in Scenario::ALL {
        for i in 0..config.payments_per_scenario {
            let key = format!("{run_id}-{}-{i:05}", scenario.slug());
            let tenants: &[&str] = if scenario == Scenario::TwoTenants {
                &["a", "b"]
            } else {
                &["a"]
            };
            for tenant in tenants {
                plans.push(Plan {
                    scenario,
                    tenant: format!("storm-{run_id}-{tenant}"),
                    key: key.clone(),
                    customer: format!("customer-{i}"),
                    amount: 100 + i as u64,
                });
            }
        }
    }
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(config.concurrency * config.double_clicks)
        .timeout(Duration::from_secs(30))
        .build()?;
    let observed = Arc::new(Observed::default());
    let progress = if config.progress {
        let bar = ProgressBar::new(plans.len() as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} storm [{bar:40}] {pos}/{len} logical payments {elapsed}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let gate = Arc::new(Semaphore::new(config.concurrency));
    let mut tasks = Vec::with_capacity(plans.len());
    for plan in &plans {
        let plan = plan.clone();
        let (client, observed, gate, progress, base) = (
            client.clone(),
            observed.clone(),
            gate.clone(),
            progress.clone(),
            base.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await;
            drive(&client, &base, &plan, &observed, config).await;
            progress.inc(1);
        }));
    }
    for task in tasks {
        if task.await.is_err() {
            // A client task that panicked left its payment unanswered; the
            // final count still finds it lost or charged.
            tracing::error!("a storm client task failed");
        }
    }
    progress.finish_and_clear();
    let elapsed = started.elapsed();

    // What the server charged, per tenant and key.
    let mut charged: HashMap<(String, String), Vec<Payment>> = HashMap::new();
    let tenants: BTreeSet<&str> = plans.iter().map(|p| p.tenant.as_str()).collect();
    for tenant in tenants {
        let response = client
            .get(format!("{base}/payments"))
            .bearer_auth(tenant)
            .send()
            .await?;
        if !response.status().is_success() {
            return Err(DemoError::Storm(format!(
                "GET /payments answered {}",
                response.status()
            )));
        }
        let payments: Vec<Payment> = response.json().await?;
        for p in payments {
            charged
                .entry((tenant.to_string(), p.idempotency_key.clone()))
                .or_default()
                .push(p);
        }
    }

    let answers = std::mem::take(
        &mut *observed
            .answers
            .lock()
            .unwrap_or_else(PoisonError::into_inner),
    );
    let mut stats: [ScenarioStats; 5] = Default::default();
    for plan in &plans {
        let s = &mut stats[plan.scenario.index()];
        s.logical_payments += 1;
        let id = (plan.tenant.clone(), plan.key.clone());
        let rows = charged.remove(&id).unwrap_or_default();
        s.charges += rows.len() as u64;
        s.duplicates += rows.len().saturating_sub(1) as u64;
        if rows.is_empty() {
            s.lost += 1;
        }
        // The answer the client got is the payment charged, with the
        // original payload (never the changed one).
        let matches = match (rows.as_slice(), answers.get(&id)) {
            ([row], Some(answer)) => {
                row == answer && row.amount == plan.amount && row.customer == plan.customer
            }
            _ => false,
        };
        if !matches {
            s.inconsistent += 1;
        }
    }
    let unexpected = charged.values().map(|rows| rows.len() as u64).sum();

    for scenario in Scenario::ALL {
        let c = &observed.scenarios[scenario.index()];
        let s = &mut stats[scenario.index()];
        s.attempts = c.attempts.load(Ordering::SeqCst);
        s.replays = c.replays.load(Ordering::SeqCst);
        s.conflicts = c.conflicts.load(Ordering::SeqCst);
        s.mismatches = c.mismatches.load(Ordering::SeqCst);
        s.unavailable = c.unavailable.load(Ordering::SeqCst);
        s.timeouts = c.timeouts.load(Ordering::SeqCst);
        s.inconsistent += c.inconsistent.load(Ordering::SeqCst);
    }

    let mut latencies = std::mem::take(
        &mut *observed
            .latencies
            .lock()
            .unwrap_or_else(PoisonError::into_inner),
    );
    latencies.sort();
    let pick = |q: f64| {
        let last = latencies.len().saturating_sub(1) as f64;
        latencies
            .get((last * q).round() as usize)
            .copied()
            .unwrap_or_default()
    };
    Ok(StormReport {
        scenarios: Scenario::ALL
            .iter()
            .map(|s| (*s, stats[s.index()].clone()))
            .collect(),
        unexpected,
        p50: pick(0.5),
        p99: pick(0.99),
        elapsed,
    })
}

/// An answer the client got.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Answer {
    status: StatusCode,
    body: String,
}

/// Sends one request; `None` on a client timeout or a connection error.
async fn send(
    client: &reqwest::Client,
    base: &str,
    plan: &Plan,
    body: &serde_json::Value,
    timeout: Option<Duration>,
    observed: &Observed,
) -> Option<Answer> {
    let counters = &observed.scenarios[plan.scenario.index()];
    counters.attempts.fetch_add(1, Ordering::SeqCst);
    let mut request = client
        .post(format!("{base}/payments"))
        .bearer_auth(&plan.tenant)
        .header("Idempotency-Key", format!("\"{}\"", plan.key))
        .json(body);
    if let Some(timeout) = timeout {
        request = request.timeout(timeout);
    }
    let started = Instant::now();
    let result = async {
        let response = request.send().await?;
        let replayed = response.headers().get("idempotent-replayed").is_some();
        let status = response.status();
        let body = response.text().await?;
        Ok::<_, reqwest::Error>((status, replayed, body))
    }
    .await;
    observed
        .latencies
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(started.elapsed());
    let (status, replayed, body) = match result {
        Ok(r) => r,
        Err(_) => {
            counters.timeouts.fetch_add(1, Ordering::SeqCst);
            return None;
        }
    };
    if replayed {
        counters.replays.fetch_add(1, Ordering::SeqCst);
    }
    let counter = match status {
        StatusCode::CONFLICT => Some(&counters.conflicts),
        StatusCode::UNPROCESSABLE_ENTITY => Some(&counters.mismatches),
        StatusCode::SERVICE_UNAVAILABLE => Some(&counters.unavailable),
        _ => None,
    };
    if let Some(counter) = counter {
        counter.fetch_add(1, Ordering::SeqCst);
    }
    Some(Answer { status, body })
}

/// Retries (same key, same body) until a final answer: 2xx, or 4xx other
/// than 409 and 429. `None` if none came.
async fn until_final(
    client: &reqwest::Client,
    base: &str,
    plan: &Plan,
    body: &serde_json::Value,
    observed: &Observed,
) -> Option<Answer> {
    for attempt in 0..400u64 {
        match send(client, base, plan, body, None, observed).await {
            Some(a) if a.status.is_success() => return Some(a),
            Some(a)
                if a.status.is_client_error()
                    && a.status != StatusCode::CONFLICT
                    && a.status != StatusCode::TOO_MANY_REQUESTS =>
            {
                return Some(a);
            }
            // 409, 5xx, or a lost connection: back off a little and retry.
            _ => tokio::time::sleep(Duration::from_millis(5 + attempt.min(20) * 5)).await,
        }
    }
    None
}

async fn drive(
    client: &reqwest::Client,
    base: &str,
    plan: &Plan,
    observed: &Observed,
    config: StormConfig,
) {
    let counters = &observed.scenarios[plan.scenario.index()];
    let body = json!({"amount": plan.amount, "currency": "EUR", "customer": plan.customer});
    let mut answers = Vec::new();
    match plan.scenario {
        Scenario::DoubleClick | Scenario::TwoTenants => {
            let clicks =
                (0..config.double_clicks).map(|_| until_final(client, base, plan, &body, observed));
            answers.extend(futures_util::future::join_all(clicks).await);
        }
        Scenario::TimeoutThenRetry => {
            let slow = json!({
                "amount": plan.amount, "currency": "EUR", "customer": plan.customer,
                "delay_ms": config.slow_charge.as_millis() as u64,
            });
            // The client gives up early; the charge goes on server-side.
            if let Some(answer) = send(
                client,
                base,
                plan,
                &slow,
                Some(config.client_timeout),
                observed,
            )
            .await
            {
                // Answered within the timeout after all: it counts.
                if answer.status.is_success() {
                    answers.push(Some(answer));
                }
            }
            answers.push(until_final(client, base, plan, &slow, observed).await);
            answers.push(until_final(client, base, plan, &slow, observed).await);
        }
        Scenario::TransientFailure => {
            let flaky = json!({
                "amount": plan.amount, "currency": "EUR", "customer": plan.customer,
                "fail": "transient",
            });
            answers.push(until_final(client, base, plan, &flaky, observed).await);
            answers.push(until_final(client, base, plan, &flaky, observed).await);
        }
        Scenario::PayloadChanged => {
            answers.push(until_final(client, base, plan, &body, observed).await);
            let changed =
                json!({"amount": plan.amount + 1, "currency": "EUR", "customer": plan.customer});
            let reuse = until_final(client, base, plan, &changed, observed).await;
            if reuse.as_ref().map(|a| a.status) != Some(StatusCode::UNPROCESSABLE_ENTITY) {
                counters.inconsistent.fetch_add(1, Ordering::SeqCst);
            }
            answers.push(until_final(client, base, plan, &body, observed).await);
        }
    }
    // Every attempt of one logical payment must end with the same 201.
    let first = answers.first().cloned().flatten();
    let consistent = first.as_ref().is_some_and(|f| f.status.is_success())
        && answers.iter().all(|a| a.as_ref() == first.as_ref());
    let payment = first.and_then(|a| serde_json::from_str::<Payment>(&a.body).ok());
    // Without a consistent answer nothing is recorded, and the final count
    // finds the payment inconsistent.
    if let Some(payment) = payment.filter(|_| consistent) {
        observed
            .answers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert((plan.tenant.clone(), plan.key.clone()), payment);
    }
}
