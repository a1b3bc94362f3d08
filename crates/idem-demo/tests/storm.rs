//! The retry storm, smaller, against the demo server in this process, on
//! each store: no payment charged twice or lost, every answer consistent, and
//! every scenario really produced its signal (replays, 409s, 422s, 503s,
//! client timeouts, two payments per shared key).
//!
//! SQLite always runs (temporary directory). PostgreSQL (`IDEM_POSTGRES_URL`,
//! a schema of its own, dropped at the end) and Redis (`IDEM_REDIS_URL`, a
//! key prefix of its own, deleted at the end) are IGNORED with a banner when
//! unreachable, and FAIL under `CI=true` / `IDEM_REQUIRE_BACKENDS=1`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use idem_demo::{BackendOptions, Scenario, StoreUrl, StormConfig, StormReport};
use libtest_mimic::{Arguments, Completion, Failed, Trial};

fn main() -> std::process::ExitCode {
    let args = Arguments::from_args();
    let trials = vec![
        Trial::test("storm::sqlite", || {
            common::runtime().block_on(async {
                let dir = tempfile::tempdir().unwrap();
                let url = StoreUrl::Sqlite(Some(dir.path().join("storm.db")));
                storm(&url, &BackendOptions::default()).await
            })
        }),
        Trial::ignorable_test("storm::postgres", || {
            common::runtime().block_on(async {
                let url = common::postgres_url();
                if let Err(why) = common::postgres_reachable(&url).await {
                    return common::unreachable("storm::postgres", &why);
                }
                let schema = common::unique("idem_demo_test");
                let options = BackendOptions {
                    pg_schema: schema.clone(),
                    ..BackendOptions::default()
                };
                let result = storm(&StoreUrl::Postgres(url.clone()), &options).await;
                common::drop_postgres_schema(&url, &schema).await;
                result.map(|()| Completion::Completed)
            })
        }),
        Trial::ignorable_test("storm::redis", || {
            common::runtime().block_on(async {
                let url = common::redis_url();
                if let Err(why) = common::redis_reachable(&url).await {
                    return common::unreachable("storm::redis", &why);
                }
                let prefix = format!("{}:", common::unique("idem-demo-test"));
                let dir = tempfile::tempdir().unwrap();
                let options = BackendOptions {
                    redis_prefix: prefix.clone(),
                    ledger: Some(dir.path().join("ledger.db")),
                    ..BackendOptions::default()
                };
                let result = storm(&StoreUrl::Redis(url.clone()), &options).await;
                common::delete_redis_prefix(&url, &prefix).await;
                result.map(|()| Completion::Completed)
            })
        }),
    ];
    libtest_mimic::run(&args, trials).exit_code()
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
    let mut errors = Vec::new();
    let mut expect = |ok: bool, what: String| {
        if !ok {
            errors.push(what);
        }
    };
    expect(
        total.duplicates == 0,
        format!("duplicates = {}", total.duplicates),
    );
    expect(total.lost == 0, format!("lost = {}", total.lost));
    expect(
        total.inconsistent == 0,
        format!("inconsistent = {}", total.inconsistent),
    );
    expect(
        report.unexpected == 0,
        format!("unexpected charges = {}", report.unexpected),
    );
    expect(report.is_clean(), "the report is not clean".to_string());
    expect(
        total.logical_payments == 6 * p,
        format!("logical payments = {}", total.logical_payments),
    );
    expect(
        total.charges == total.logical_payments,
        format!("charges = {}", total.charges),
    );

    // Double clicks: one charge per key, every other click gets the replay
    // (possibly after 409s while the first runs).
    let s = report.scenario(Scenario::DoubleClick);
    expect(
        s.charges == p,
        format!("double-click: charges = {}", s.charges),
    );
    expect(
        s.replays == p * (clicks - 1),
        format!(
            "double-click: replays = {} (want {})",
            s.replays,
            p * (clicks - 1)
        ),
    );
    // Every attempt that did not end a click was a 409 (or a 503/timeout).
    expect(
        s.attempts == p * clicks + s.conflicts + s.unavailable + s.timeouts,
        format!(
            "double-click: attempts = {}, conflicts = {}",
            s.attempts, s.conflicts
        ),
    );

    // Timeouts: every first attempt times out; the two retries end with the
    // replay (the first retry may run the charge itself if it overtook the
    // original).
    let s = report.scenario(Scenario::TimeoutThenRetry);
    expect(
        s.timeouts == p,
        format!("timeout + retry: timeouts = {}", s.timeouts),
    );
    expect(
        s.charges == p,
        format!("timeout + retry: charges = {}", s.charges),
    );
    expect(
        (p..=2 * p).contains(&s.replays),
        format!("timeout + retry: replays = {}", s.replays),
    );

    // Transient failures: exactly one 503 per key, nothing charged by it;
    // the retry charges, the next request replays.
    let s = report.scenario(Scenario::TransientFailure);
    expect(
        s.unavailable == p,
        format!("transient failure: 503s = {}", s.unavailable),
    );
    expect(
        s.charges == p,
        format!("transient failure: charges = {}", s.charges),
    );
    expect(
        s.replays == p,
        format!("transient failure: replays = {}", s.replays),
    );

    // Key reuse with another amount: one 422 per key, never a charge.
    let s = report.scenario(Scenario::PayloadChanged);
    expect(
        s.mismatches == p,
        format!("payload changed: 422s = {}", s.mismatches),
    );
    expect(
        s.charges == p,
        format!("payload changed: charges = {}", s.charges),
    );
    expect(
        s.replays == p,
        format!("payload changed: replays = {}", s.replays),
    );

    // Two tenants, same keys: two payments per key, replays within each.
    let s = report.scenario(Scenario::TwoTenants);
    expect(
        s.logical_payments == 2 * p && s.charges == 2 * p,
        format!(
            "two tenants: logical = {}, charges = {}",
            s.logical_payments, s.charges
        ),
    );
    expect(
        s.replays == 2 * p * (clicks - 1),
        format!("two tenants: replays = {}", s.replays),
    );

    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}
