//! The retry storm, smaller, against the demo server in this process, on
//! each store: no payment charged twice or lost, every answer consistent, and
//! every scenario really produced its signal (replays, 409s, 422s, 503s,
//! client timeouts, two payments per shared key).
//!
//! Each store is idem-testkit's isolated one: SQLite always runs (a temporary
//! file), PostgreSQL (`IDEM_POSTGRES_URL`, a schema of its own) and Redis
//! (`IDEM_REDIS_URL`, a key prefix of its own) are IGNORED with a banner when
//! unreachable, and FAIL under `CI=true` / `IDEM_REQUIRE_BACKENDS=1`; all is
//! removed at the end.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use idem_demo::{BackendOptions, Scenario, StoreUrl, StormConfig, StormReport};
use idem_testkit::Isolated;
use idem_testkit::runner::Suite;
use libtest_mimic::Failed;

fn main() -> std::process::ExitCode {
    Suite::new("idem-demo (storm)")
        .with_default_test_threads(support::cores())
        .each(&support::BACKENDS, "storm", |kind| async move {
            let isolated = Isolated::fresh(kind).await;
            let dir = tempfile::tempdir().unwrap();
            let (url, options) = support::demo_store(&isolated, &dir.path().join("ledger.db"));
            let url = StoreUrl::parse(&url).unwrap();
            support::passed(storm(&url, &options).await);
        })
        .run()
}

async fn storm(url: &StoreUrl, options: &BackendOptions) -> Result<(), Failed> {
    let config = StormConfig::small();
    let (report, description) = idem_demo::storm::run_in_process(url, options, config)
        .await
        .map_err(|e| format!("the storm could not run: {e}"))?;
    println!("{}\n{}", description.join("\n"), report.table());
    check(&report, config).map_err(|e| format!("{e}\n{}", report.table()).into())
}

/// Exact counts where the scenario fixes them, bounds where timing may vary.
fn check(report: &StormReport, config: StormConfig) -> Result<(), String> {
    let total = report.totals();
    let p = config.payments_per_scenario as u64;
    let clicks = config.double_clicks as u64;
    let double_click = report.scenario(Scenario::DoubleClick);
    let timeout = report.scenario(Scenario::TimeoutThenRetry);
    let transient = report.scenario(Scenario::TransientFailure);
    let changed = report.scenario(Scenario::PayloadChanged);
    let tenants = report.scenario(Scenario::TwoTenants);
    // (what, counted, wanted)
    let exact = [
        ("duplicates", total.duplicates, 0),
        ("lost", total.lost, 0),
        ("inconsistent", total.inconsistent, 0),
        ("unexpected charges", report.unexpected, 0),
        ("logical payments", total.logical_payments, 6 * p),
        ("charges", total.charges, total.logical_payments),
        // Double clicks: one charge per key, every other click gets the
        // replay (possibly after 409s while the first runs), and every
        // attempt that did not end a click was a 409 (or a 503/timeout).
        ("double-click: charges", double_click.charges, p),
        (
            "double-click: replays",
            double_click.replays,
            p * (clicks - 1),
        ),
        (
            "double-click: attempts (clicks + 409s + 503s + timeouts)",
            double_click.attempts,
            p * clicks + double_click.conflicts + double_click.unavailable + double_click.timeouts,
        ),
        // Timeouts: every first attempt times out; the two retries end with
        // the replay (bounds below).
        ("timeout + retry: timeouts", timeout.timeouts, p),
        ("timeout + retry: charges", timeout.charges, p),
        // Transient failures: exactly one 503 per key, nothing charged by
        // it; the retry charges, the next request replays.
        ("transient failure: 503s", transient.unavailable, p),
        ("transient failure: charges", transient.charges, p),
        ("transient failure: replays", transient.replays, p),
        // Key reuse with another amount: one 422 per key, never a charge.
        ("payload changed: 422s", changed.mismatches, p),
        ("payload changed: charges", changed.charges, p),
        ("payload changed: replays", changed.replays, p),
        // Two tenants, same keys: two payments per key, replays within each.
        (
            "two tenants: logical payments",
            tenants.logical_payments,
            2 * p,
        ),
        ("two tenants: charges", tenants.charges, 2 * p),
        (
            "two tenants: replays",
            tenants.replays,
            2 * p * (clicks - 1),
        ),
    ];
    let mut errors: Vec<String> = exact
        .iter()
        .filter(|(_, got, want)| got != want)
        .map(|(what, got, want)| format!("{what} = {got} (want {want})"))
        .collect();
    if !report.is_clean() {
        errors.push("the report is not clean".to_string());
    }
    // The first retry may run the charge itself if it overtook the original.
    if !(p..=2 * p).contains(&timeout.replays) {
        errors.push(format!(
            "timeout + retry: replays = {} (want {p} to {})",
            timeout.replays,
            2 * p
        ));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}
