//! The harness's self-test: `idem-bench --tiny` against the backends that
//! need no server (memory, sqlite), checking the structure of its results so
//! that the benchmark cannot rot. No timing is asserted: a benchmark measures,
//! a test checks.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use idem_bench::http_bench::HttpReport;
use idem_bench::report::{BackendReport, Compared, HotKey, Report, Status};

/// How many pairs the self-test measures per figure (`--repeat`), so that
/// the ranges are computed over more than one pair.
const REPEATS: usize = 2;

fn run_tiny(backends: &str) -> (Report, String) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("results.json");
    let output = Command::new(env!("CARGO_BIN_EXE_idem-bench"))
        .args([
            "--tiny",
            "--repeat",
            &REPEATS.to_string(),
            "--backends",
            backends,
            "--json",
        ])
        .arg(&json)
        .output()
        .expect("idem-bench runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "idem-bench --tiny failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Report = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    (report, stdout)
}

fn check_row(backend: &str, what: &str, row: &Compared) {
    let at = format!("{backend} {what} c={}", row.concurrency);
    assert!(
        row.ratio.is_finite() && row.ratio > 0.0,
        "{at}: ratio {}",
        row.ratio
    );
    for (side, s) in [("idem", &row.idem), ("raw", &row.raw)] {
        assert_eq!(s.errors, 0, "{at} {side}: {:?}", s.first_error);
        assert!(s.ops > 0, "{at} {side}: no operation");
        assert!(
            s.ops_per_sec.is_finite() && s.ops_per_sec > 0.0,
            "{at} {side}"
        );
        assert!(s.p50_us > 0.0 && s.p99_us >= s.p50_us, "{at} {side}: {s:?}");
    }
    assert_eq!(row.idem_reps.len(), row.raw_reps.len(), "{at}");
    // Ranges over the pairs: every pair's ratio kept, the median inside
    // the range, each side's range around its median.
    assert_eq!(row.repeats, REPEATS, "{at}");
    assert_eq!(row.idem_reps.len(), REPEATS, "{at}");
    assert_eq!(row.ratios.len(), REPEATS, "{at}");
    assert!(
        row.ratio_min > 0.0 && row.ratio_min <= row.ratio && row.ratio <= row.ratio_max,
        "{at}: {} ({}–{})",
        row.ratio,
        row.ratio_min,
        row.ratio_max
    );
    for (side, s, spread) in [
        ("idem", &row.idem, &row.idem_spread),
        ("raw", &row.raw, &row.raw_spread),
    ] {
        assert!(
            spread.ops_per_sec_min <= s.ops_per_sec && s.ops_per_sec <= spread.ops_per_sec_max,
            "{at} {side}: {spread:?}"
        );
        assert!(
            spread.p50_us_min <= s.p50_us && s.p50_us <= spread.p50_us_max,
            "{at} {side}: {spread:?}"
        );
        assert!(
            spread.p99_us_min <= s.p99_us && s.p99_us <= spread.p99_us_max,
            "{at} {side}: {spread:?}"
        );
    }
}

fn check_hot_key(backend: &str, side: &str, h: &HotKey) {
    assert_eq!(h.errors, 0, "{backend} hot key {side}: {:?}", h.first_error);
    assert!(
        h.rounds > 0 && h.tasks >= 64,
        "{backend} hot key {side}: {h:?}"
    );
    // Exactly one execution per round: the point of the library.
    assert_eq!(h.executions, h.rounds, "{backend} hot key {side}: {h:?}");
    assert_eq!(
        h.rounds_with_one_execution, h.rounds,
        "{backend} hot key {side}"
    );
    assert!(h.loser_p50_us > 0.0, "{backend} hot key {side}: {h:?}");
}

fn check_backend(b: &BackendReport) {
    let name = b.name.as_str();
    assert_eq!(b.status, Status::Ok, "{name}: {:?}", b.reason);
    assert!(b.errors.is_empty(), "{name}: {:?}", b.errors);
    assert_eq!(b.fresh.len(), 2, "{name}: fresh at concurrency 1 and 4");
    assert_eq!(b.replay.len(), 2, "{name}: replay at concurrency 1 and 4");
    for row in &b.fresh {
        check_row(name, "fresh", row);
    }
    for row in &b.replay {
        check_row(name, "replay", row);
    }
    let hot = b.hot_key.as_ref().expect("hot-key figures");
    check_hot_key(name, "idem", &hot.idem);
    check_hot_key(name, "raw", &hot.raw);
    let scaling = b.scaling.as_ref().expect("scaling figures");
    assert!(
        scaling.large_records > scaling.small_records,
        "{name}: {scaling:?}"
    );
    assert!(
        scaling.ratio.is_finite() && scaling.ratio > 0.0,
        "{name}: {scaling:?}"
    );
    let purge = b.purge.as_ref().expect("purge figures");
    assert!(!purge.native_expiry, "{name}");
    assert!(purge.records > 0, "{name}: {purge:?}");
    assert_eq!(
        purge.removed, purge.records,
        "{name}: every expired record purged"
    );
    assert!(purge.rows_per_sec > 0.0, "{name}: {purge:?}");
}

/// The HTTP figures: the layer over each store against the bare endpoint,
/// every request answered as expected, the handler run once per fresh
/// request and never for a replay.
fn check_http(http: &HttpReport) {
    assert!(http.errors.is_empty(), "http: {:?}", http.errors);
    assert!(http.request_bytes > 0);
    let names: Vec<&str> = http.stores.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["memory", "sqlite"]);
    for store in &http.stores {
        let name = format!("http {}", store.name);
        assert!(store.errors.is_empty(), "{name}: {:?}", store.errors);
        assert_eq!(store.fresh.len(), 2, "{name}: fresh at concurrency 1 and 4");
        assert_eq!(
            store.replay.len(),
            2,
            "{name}: replay at concurrency 1 and 4"
        );
        for row in &store.fresh {
            check_row(&name, "fresh", row);
        }
        for row in &store.replay {
            check_row(&name, "replay", row);
        }
        let fresh_requests: u64 = store.fresh.iter().map(|r| r.idem.ops).sum();
        assert_eq!(store.fresh_handler_runs, fresh_requests, "{name}");
        assert_eq!(
            store.replay_handler_runs, 0,
            "{name}: a replay ran the handler"
        );
    }
}

#[test]
fn tiny_run_of_memory_and_sqlite_has_every_figure() {
    let (report, table) = run_tiny("memory,sqlite");
    assert_eq!(report.mode, "tiny");
    assert_eq!(report.format, idem_bench::report::FORMAT);
    assert_eq!(report.plan.repetitions, REPEATS);
    assert!(table.contains("ratio (min–max)"), "{table}");
    // The server's version where there is one to ask.
    assert_eq!(report.backends[0].server_version, None);
    assert!(
        report.backends[1]
            .server_version
            .as_deref()
            .is_some_and(|v| v.starts_with("SQLite 3.")),
        "{:?}",
        report.backends[1].server_version
    );
    assert_eq!(report.backends.len(), 2);
    let names: Vec<&str> = report.backends.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(names, ["memory", "sqlite"]);
    for b in &report.backends {
        check_backend(b);
        assert!(table.contains(&format!("== {} ==", b.name)), "{table}");
    }
    // The in-memory store has no byte count; SQLite has one.
    assert!(report.backends[0].memory.is_none());
    let sqlite = report.backends[1]
        .memory
        .as_ref()
        .expect("sqlite bytes per record");
    assert!(sqlite.idem_overhead_bytes.is_finite(), "{sqlite:?}");
    assert!(sqlite.raw_overhead_bytes.is_finite(), "{sqlite:?}");
    // The store's architecture is reported beside the fair baseline.
    assert!(!report.backends[1].architecture.is_empty());

    let core = report.core.as_ref().expect("core figures");
    assert_eq!(core.parts.len(), 6, "{core:?}");
    assert!(
        core.parts.iter().all(|p| p.ns.is_finite() && p.ns > 0.0),
        "{core:?}"
    );
    assert!(core.total_ns > 0.0);
    assert!(!report.targets.is_empty());
    assert!(table.contains("targets"), "{table}");

    check_http(report.http.as_ref().expect("http figures"));
    assert!(table.contains("== http: idem-tower on axum"), "{table}");
}

#[test]
fn unreachable_servers_are_reported_as_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("results.json");
    // Nothing listens on port 1 of loopback.
    let output = Command::new(env!("CARGO_BIN_EXE_idem-bench"))
        .args([
            "--tiny",
            "--no-core",
            "--backends",
            "postgres,postgres-read-first,postgres-single-statement,postgres+cache,redis,redis+cache,valkey,redis-cluster",
        ])
        .arg("--json")
        .arg(&json)
        .env("IDEM_POSTGRES_URL", "postgres://postgres@127.0.0.1:1/test")
        .env("IDEM_REDIS_URL", "redis://127.0.0.1:1")
        .env("IDEM_REDIS_CLUSTER_URLS", "")
        .env_remove("IDEM_VALKEY_URL")
        .output()
        .expect("idem-bench runs");
    assert!(
        output.status.success(),
        "a benchmark does not fail on an unreachable server"
    );
    let report: Report = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let names: Vec<&str> = report.backends.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "postgres",
            "postgres-read-first",
            "postgres-single-statement",
            "postgres+cache",
            "redis",
            "redis+cache",
            "valkey",
            "redis-cluster"
        ]
    );
    for b in &report.backends {
        assert_eq!(b.status, Status::Skipped, "{}", b.name);
        assert!(
            b.reason.as_deref().is_some_and(|r| !r.is_empty()),
            "{}",
            b.name
        );
        assert!(b.fresh.is_empty() && b.replay.is_empty(), "{}", b.name);
    }
    assert!(report.core.is_none());
    assert!(
        report.http.is_none(),
        "no store of the HTTP measurement named"
    );
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(table.contains("skipped (unreachable)"), "{table}");
}

#[test]
fn the_cache_variant_measures_fresh_replay_and_hot_key() {
    let (report, table) = run_tiny("sqlite+cache");
    let names: Vec<&str> = report.backends.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(names, ["sqlite+cache"]);
    let b = &report.backends[0];
    assert_eq!(b.status, Status::Ok, "{:?}", b.reason);
    assert!(b.errors.is_empty(), "{:?}", b.errors);
    assert_eq!(
        b.finished_cache_bytes,
        Some(idem_bench::FINISHED_CACHE_BYTES)
    );
    // The replays were answered from the cache.
    let cache = b.finished_cache.as_ref().expect("cache counters");
    assert!(cache.hits > 0 && cache.entries > 0, "{cache:?}");
    assert_eq!(b.fresh.len(), 2);
    assert_eq!(b.replay.len(), 2);
    for row in &b.fresh {
        check_row(&b.name, "fresh", row);
    }
    for row in &b.replay {
        check_row(&b.name, "replay", row);
    }
    let hot = b.hot_key.as_ref().expect("hot-key figures");
    check_hot_key(&b.name, "idem", &hot.idem);
    check_hot_key(&b.name, "raw", &hot.raw);
    // What the cache cannot change is left to the `sqlite` target.
    assert!(b.scaling.is_none() && b.purge.is_none() && b.memory.is_none());
    assert!(b.architecture.is_empty());
    assert!(table.contains("== sqlite+cache =="), "{table}");
    assert!(
        report
            .targets
            .iter()
            .any(|t| t.name.starts_with("sqlite+cache replay") && t.target == ">= 3.00"),
        "{:?}",
        report.targets
    );
}
