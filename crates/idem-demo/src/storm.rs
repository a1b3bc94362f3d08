//! The retry storm: clients that double-click, time out and retry, hit
//! transient failures, reuse keys with changed payloads, and share keys across
//! tenants — then a count of what was charged.
//!
//! Every logical payment has its own (tenant, key). At the end the storm
//! lists each tenant's payments (`GET /payments`) and compares them with what
//! it meant to pay: a key charged twice is a duplicate, a key never charged
//! is lost, an answer that differs from another attempt's, or from the
//! payment charged, is inconsistent.
//!
//! The clients send through `idem-client`'s middleware, the retrying client
//! a Rust service would use: it re-sends each call with the same key until
//! a final answer, and reports every attempt for the counts.
//!
//! The configuration, the scenarios and the run are here; the clients in
//! `storm/client.rs`; the final count in `storm/tally.rs`.

mod client;
mod tally;

use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::Semaphore;

use crate::DemoError;
use crate::backend::{Backend, BackendOptions, StoreUrl};
use crate::report::StormReport;
use crate::server::RunningServer;
use client::{Observed, drive};

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
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(config.concurrency * config.double_clicks)
        .timeout(Duration::from_secs(30))
        .build()?;
    let observed = Arc::new(Observed::default());
    let client = client::client(http.clone(), observed.clone());
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
    tally::count(&http, &base, &plans, &observed, elapsed).await
}
