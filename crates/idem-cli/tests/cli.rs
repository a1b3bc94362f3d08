//! The `idem` binary, run as a child process against SQLite, PostgreSQL and
//! Redis stores of idem-testkit's (each test its own file, schema or key
//! prefix, named in the URL the binary gets), with records seeded by an
//! `Engine` over the same store: what each command prints (human and
//! `--json`), its exit code, and what it leaves in the store.
//!
//! PostgreSQL and Redis are IGNORED with a banner when unreachable and FAIL
//! under `CI=true` / `IDEM_REQUIRE_BACKENDS=1` (idem-testkit's runner).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idem_core::store::Store;
use idem_core::{
    Begin, Clock as _, Ending, Engine, FailureKind, ManualClock, Outcome, Policy, SystemClock,
    Timestamp,
};
use idem_testkit::fixtures::{fp, ikey, proceed, rkey, scope};
use idem_testkit::runner::Suite;
use idem_testkit::{BackendKind, Isolated, StoreUrl};
use serde_json::Value;
use tokio::process::Command;

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_idem");

/// The backends every command is tested against.
const BACKENDS: [BackendKind; 3] = [
    BackendKind::Sqlite,
    BackendKind::Postgres,
    BackendKind::Redis,
];

/// The key's scope on the command line (the fixtures' `scope()`).
const SCOPE_ARGS: [&str; 4] = ["--tenant", "acme", "--operation", "payments.create"];

/// The completed key's outcome: JSON, then bytes a terminal must not get raw,
/// then more than a preview shows.
fn outcome_bytes() -> Vec<u8> {
    let mut bytes = br#"{"charge":"ch_1"}"#.to_vec();
    bytes.extend_from_slice(b"\n\x00\xff\x1b[31m");
    bytes.extend_from_slice(&[b'x'; 100]);
    bytes
}

fn main() -> ExitCode {
    Suite::new("idem-cli")
        .each(&BACKENDS, "inspect_shows_each_state", |kind| async move {
            inspect_shows_each_state(kind).await;
        })
        .each(
            &BACKENDS,
            "forget_through_the_contract",
            |kind| async move {
                forget_through_the_contract(kind).await;
            },
        )
        .each(&BACKENDS, "stats_and_purge", |kind| async move {
            stats_and_purge(kind).await;
        })
        .each(&BACKENDS, "migrate_twice", |kind| async move {
            migrate_twice(kind).await;
        })
        .test("bad_input_is_one_line", bad_input_is_one_line)
        .test("unreachable_stores_fail_fast", unreachable_stores_fail_fast)
        .test(
            "timeout_bounds_a_silent_server",
            timeout_bounds_a_silent_server,
        )
        .test("help_documents_exit_codes", help_documents_exit_codes)
        .run()
}

// ---------------------------------------------------------------- running

/// What one run of the binary did.
#[derive(Debug)]
struct Run {
    args: Vec<String>,
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Panics unless the exit code is `code`.
    fn expect(self, code: i32) -> Self {
        assert_eq!(
            self.code,
            code,
            "exit code of `idem {}`: {self:#?}",
            self.args.join(" ")
        );
        assert!(
            !self.stderr.contains("panicked") && !self.stderr.contains("RUST_BACKTRACE"),
            "{self:#?}"
        );
        self
    }

    /// stdout as one JSON object.
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:#?}"))
    }

    /// Panics unless stderr is exactly one `idem: error: …` line holding
    /// each of `wanted`, and stdout is empty.
    fn one_line_error(&self, wanted: &[&str]) {
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line on stderr: {self:#?}");
        assert!(lines[0].starts_with("idem: error: "), "{self:#?}");
        for w in wanted {
            assert!(
                lines[0].contains(w),
                "stderr should mention {w:?}: {self:#?}"
            );
        }
        assert!(self.stdout.is_empty(), "nothing on stdout: {self:#?}");
    }
}

/// Runs `idem args…` with stdin closed (not a terminal) and no
/// `IDEM_STORE_URL`, unless `env` sets it.
async fn idem_env(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .env_remove("IDEM_STORE_URL")
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (name, value) in env {
        command.env(name, value);
    }
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .unwrap_or_else(|_| panic!("`idem {}` did not finish within 60 s", args.join(" ")))
        .expect("run idem");
    Run {
        args: args.iter().map(|s| s.to_string()).collect(),
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

async fn idem(args: &[&str]) -> Run {
    idem_env(args, &[]).await
}

/// `idem <command> --store URL [scope] rest…`.
async fn on_key(command: &str, url: &str, key: &str, rest: &[&str]) -> Run {
    let mut args = vec![command, "--store", url];
    args.extend(SCOPE_ARGS);
    args.push(key);
    args.extend(rest);
    idem(&args).await
}

/// The URL the binary gets for `url`: its `Display`, which names the test's
/// own file, schema or prefix, unless it hides a password (then the
/// driver's URL with the place added back).
fn cli_url(url: &StoreUrl) -> String {
    let shown = url.to_string();
    if !shown.contains("***") {
        return shown;
    }
    let with = |base: String, name: &str, value: &Option<String>| match value {
        Some(v) => format!(
            "{base}{}{name}={v}",
            if base.contains('?') { '&' } else { '?' }
        ),
        None => base,
    };
    match url {
        StoreUrl::Postgres(pg) => with(pg.connection_url(), "schema", &pg.schema),
        StoreUrl::Redis(r) => with(r.node_urls().remove(0), "prefix", &r.prefix),
        _ => shown,
    }
}

// ---------------------------------------------------------------- seeding

/// The keys [`seed`] writes, each in the fixtures' scope.
const COMPLETED: &str = "order-completed";
const IN_FLIGHT: &str = "order-in-flight";
const LAPSED: &str = "order-lapsed";
const FAILED: &str = "order-failed";
const EXPIRED: [&str; 3] = ["order-expired-1", "order-expired-2", "order-expired-3"];

fn engine<C: idem_core::Clock>(
    store: &Arc<dyn Store>,
    clock: C,
    policy: Policy,
) -> Engine<Arc<dyn Store>, C> {
    Engine::with_clock(store.clone(), clock)
        .with_policy(policy)
        .expect("valid policy")
}

/// Writes, relative to the system clock (the binary's):
/// - `order-completed`: completed with [`outcome_bytes`], TTL 30 min;
/// - `order-in-flight`: claimed, lease 10 min, TTL 1 day;
/// - `order-lapsed`: claimed 5 min ago with a 1 min lease, TTL 1 day;
/// - `order-failed`: failed permanently, TTL 3 days;
/// - three keys completed 3 days ago with a 1 h TTL: expired.
///
/// Live: 2 in flight, 1 completed, 1 failed permanently; 3 expired; by time
/// left: ≤ 1h: 1, ≤ 1d: 2, ≤ 7d: 1.
async fn seed(store: &Arc<dyn Store>) {
    let now = SystemClock.now();
    let minutes = |m: u64| Duration::from_secs(60 * m);

    let e = engine(store, SystemClock, Policy::default().with_ttl(minutes(30)));
    let lease = proceed(&e, COMPLETED).await;
    e.complete(&lease, Outcome::new(outcome_bytes()))
        .await
        .unwrap();

    let e = engine(
        store,
        SystemClock,
        Policy::default().with_lease(minutes(10)),
    );
    drop(proceed(&e, IN_FLIGHT).await);

    let five_ago = ManualClock::new(Timestamp::from_millis(now.as_millis() - 5 * 60_000));
    let e = engine(store, five_ago, Policy::default().with_lease(minutes(1)));
    drop(proceed(&e, LAPSED).await);

    let e = engine(
        store,
        SystemClock,
        Policy::default().with_ttl(minutes(3 * 24 * 60)),
    );
    let lease = proceed(&e, FAILED).await;
    e.fail(
        &lease,
        FailureKind::Permanent,
        Outcome::new(&b"card declined"[..]),
    )
    .await
    .unwrap();

    let long_ago = ManualClock::new(Timestamp::from_millis(now.as_millis() - 3 * 86_400_000));
    let e = engine(store, long_ago, Policy::default().with_ttl(minutes(60)));
    for key in EXPIRED {
        let lease = proceed(&e, key).await;
        e.complete(&lease, Outcome::new(&b"old"[..])).await.unwrap();
    }
}

/// Whether `key` has a live record.
async fn live(store: &Arc<dyn Store>, key: &str) -> bool {
    store
        .get(&rkey(key), SystemClock.now())
        .await
        .unwrap()
        .is_some()
}

// ---------------------------------------------------------------- tests

async fn inspect_shows_each_state(kind: BackendKind) {
    let isolated = Isolated::fresh(kind).await;
    let store = isolated.store();
    seed(&store).await;
    let url = cli_url(isolated.url());

    // Completed: every field, the preview escaped and cut.
    let run = on_key("inspect", &url, COMPLETED, &["--json"])
        .await
        .expect(0);
    let j = run.json();
    assert_eq!(j["found"], true);
    assert_eq!(j["state"], "completed");
    assert_eq!(j["key"], COMPLETED);
    assert_eq!(j["scope"]["tenant"], "acme");
    assert_eq!(j["scope"]["operation"], "payments.create");
    assert_eq!(j["scope"]["principal"], Value::Null);
    assert_eq!(j["digest"], rkey(COMPLETED).hex());
    let stored = store
        .get(&rkey(COMPLETED), SystemClock.now())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(j["revision"], stored.revision.as_u64());
    assert_eq!(
        j["token"],
        format!("{:032x}", stored.record.state.token().as_u128())
    );
    let fingerprint: String = fp().as_bytes().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(j["fingerprint"], fingerprint);
    assert_eq!(j["attempts"], 1);
    assert_eq!(j["lease"], Value::Null);
    assert_eq!(j["outcome"]["bytes"], outcome_bytes().len());
    assert_eq!(j["outcome"]["truncated"], true);
    let preview = j["outcome"]["preview"].as_str().unwrap();
    assert!(
        preview.starts_with(r#"{\"charge\":\"ch_1\"}\n\x00\xff\x1b[31m"#),
        "{preview}"
    );
    assert!(
        !preview.contains('\u{1b}'),
        "no raw escape byte: {preview:?}"
    );
    let expires_in = j["expires_in_ms"].as_i64().unwrap();
    assert!((1..=30 * 60_000).contains(&expires_in), "{expires_in}");
    assert!(j["expires_at"].as_str().unwrap().ends_with('Z'), "{j}");

    let run = on_key("inspect", &url, COMPLETED, &[]).await.expect(0);
    for line in [
        "state        completed",
        "completed by ",
        "attempts     1",
        &format!("outcome      {} bytes: ", outcome_bytes().len()),
        &format!("(first 64 of {} bytes)", outcome_bytes().len()),
        &format!("digest       {}", rkey(COMPLETED).hex()),
    ] {
        assert!(run.stdout.contains(line), "{line:?} in {}", run.stdout);
    }
    let run = on_key(
        "inspect",
        &url,
        COMPLETED,
        &["--json", "--preview-bytes", "4"],
    )
    .await
    .expect(0);
    assert_eq!(run.json()["outcome"]["preview"], r#"{\"ch"#);
    assert_eq!(run.json()["outcome"]["preview_hex"], "7b226368");

    // In flight, lease held.
    let run = on_key("inspect", &url, IN_FLIGHT, &["--json"])
        .await
        .expect(0);
    let j = run.json();
    assert_eq!(j["state"], "in_flight");
    assert_eq!(j["lease"]["lapsed"], false);
    let left = j["lease"]["remaining_ms"].as_i64().unwrap();
    assert!((1..=600_000).contains(&left), "{left}");
    assert_eq!(j["outcome"], Value::Null);
    let run = on_key("inspect", &url, IN_FLIGHT, &[]).await.expect(0);
    assert!(run.stdout.contains("lease holder "), "{}", run.stdout);
    assert!(run.stdout.contains(" left)"), "{}", run.stdout);

    // In flight, lease lapsed 4 minutes ago.
    let run = on_key("inspect", &url, LAPSED, &["--json"]).await.expect(0);
    let j = run.json();
    assert_eq!(j["state"], "in_flight");
    assert_eq!(j["lease"]["lapsed"], true);
    assert!(
        j["lease"]["remaining_ms"].as_i64().unwrap() <= -4 * 60_000,
        "{j}"
    );
    let run = on_key("inspect", &url, LAPSED, &[]).await.expect(0);
    assert!(run.stdout.contains("(lapsed 4 min"), "{}", run.stdout);

    // Failed permanently.
    let run = on_key("inspect", &url, FAILED, &["--json"]).await.expect(0);
    let j = run.json();
    assert_eq!(j["state"], "failed_permanent");
    assert_eq!(j["failure"], "permanent");
    assert_eq!(j["outcome"]["preview"], "card declined");
    assert_eq!(j["outcome"]["truncated"], false);

    // Expired, absent, another scope: not found (exit 1), one line.
    for key in [EXPIRED[0], "never-seen"] {
        let run = on_key("inspect", &url, key, &[]).await.expect(1);
        assert_eq!(run.stdout.lines().count(), 1, "{run:#?}");
        assert!(
            run.stdout
                .starts_with(&format!("no record for {key} in tenant \"acme\"")),
            "{run:#?}"
        );
    }
    let run = idem(&["inspect", "--store", &url, "--tenant", "globex", COMPLETED])
        .await
        .expect(1);
    assert!(run.stdout.contains("tenant \"globex\""), "{run:#?}");
    let run = on_key("inspect", &url, "never-seen", &["--json"])
        .await
        .expect(1);
    assert_eq!(run.json()["found"], false);

    // The store from the environment.
    let mut args = vec!["inspect"];
    args.extend(SCOPE_ARGS);
    args.push(COMPLETED);
    let run = idem_env(&args, &[("IDEM_STORE_URL", &url)]).await.expect(0);
    assert!(run.stdout.contains("state        completed"), "{run:#?}");
}

async fn forget_through_the_contract(kind: BackendKind) {
    let isolated = Isolated::fresh(kind).await;
    let store = isolated.store();
    seed(&store).await;
    let url = cli_url(isolated.url());

    // In flight: refused without --force, kept.
    let run = on_key("forget", &url, IN_FLIGHT, &["--yes"])
        .await
        .expect(4);
    run.one_line_error(&["in flight", "--force", "a second time"]);
    assert!(live(&store, IN_FLIGHT).await);

    // Not a terminal and no --yes: refused before anything is read.
    let run = on_key("forget", &url, COMPLETED, &[]).await.expect(2);
    run.one_line_error(&["--yes", "not a terminal"]);
    assert!(live(&store, COMPLETED).await);

    // Completed, --yes: deleted, with the warning.
    let run = on_key("forget", &url, COMPLETED, &["--yes", "--json"])
        .await
        .expect(0);
    let j = run.json();
    assert_eq!(j["forgotten"], true);
    assert_eq!(j["state"], "completed");
    assert!(
        j["warning"]
            .as_str()
            .unwrap()
            .contains("will run the operation again"),
        "{j}"
    );
    assert!(
        run.stderr
            .starts_with("idem: warning: a retry with this key will run the operation again"),
        "{run:#?}"
    );
    assert!(!live(&store, COMPLETED).await);
    on_key("inspect", &url, COMPLETED, &[]).await.expect(1);
    // The next request with the key is a fresh one: it runs.
    let e = Engine::new(store.clone());
    match e.begin(&scope(), &ikey(COMPLETED), fp()).await.unwrap() {
        Begin::Proceed(lease) => {
            assert_eq!(lease.attempt(), 1);
            e.complete(&lease, Outcome::new(&b"ch_2"[..]))
                .await
                .unwrap();
        }
        other => panic!("a forgotten key starts afresh, got {other:?}"),
    }

    // In flight with --force: deleted (human output).
    let run = on_key("forget", &url, LAPSED, &["--yes", "--force"])
        .await
        .expect(0);
    assert!(
        run.stdout
            .starts_with(&format!("forgot {LAPSED} in tenant \"acme\"")),
        "{run:#?}"
    );
    assert!(run.stderr.contains("may take effect twice"), "{run:#?}");
    assert!(!live(&store, LAPSED).await);

    // A multi-step operation that failed retryably after a recorded step:
    // inspect shows the checkpoint; forget refuses without --force (a retry
    // would run every step again with new downstream keys).
    const PHASED: &str = "order-phased";
    let e = Engine::new(store.clone());
    let lease = proceed(&e, PHASED).await;
    let mut phases = e.phases(&lease).unwrap();
    let _: String = phases
        .external("charge", |_| async {
            Ok::<_, std::io::Error>("ch_9".to_string())
        })
        .await
        .unwrap();
    e.settle(&lease, Ending::Unknown).await.unwrap();
    let run = on_key("inspect", &url, PHASED, &[]).await.expect(0);
    assert!(
        run.stdout.contains("state        failed_retryable"),
        "{run:#?}"
    );
    assert!(
        run.stdout.contains("checkpoint   #1 after step \"charge\""),
        "{run:#?}"
    );
    let run = on_key("inspect", &url, PHASED, &["--json"]).await.expect(0);
    assert_eq!(run.json()["checkpoint"]["step"], "charge");
    let run = on_key("forget", &url, PHASED, &["--yes"]).await.expect(4);
    run.one_line_error(&["recorded progress", "--force", "downstream"]);
    assert!(live(&store, PHASED).await);
    on_key("forget", &url, PHASED, &["--yes", "--force"])
        .await
        .expect(0);
    assert!(!live(&store, PHASED).await);

    // Failed: deleted; absent: exit 1, nothing else touched.
    on_key("forget", &url, FAILED, &["-y"]).await.expect(0);
    let run = on_key("forget", &url, FAILED, &["--yes"]).await.expect(1);
    assert!(
        run.stdout.starts_with(&format!("no record for {FAILED}")),
        "{run:#?}"
    );
    assert!(live(&store, IN_FLIGHT).await);
    assert!(
        live(&store, COMPLETED).await,
        "the new record of the re-run key"
    );
}

async fn stats_and_purge(kind: BackendKind) {
    let isolated = Isolated::fresh(kind).await;
    let store = isolated.store();
    seed(&store).await;
    let url = cli_url(isolated.url());
    let sql = kind != BackendKind::Redis;

    let run = idem(&["stats", "--store", &url, "--json"]).await.expect(0);
    let j = run.json();
    assert_eq!(j["coverage"]["kind"], "exact", "{j}");
    assert_eq!(j["live"], 4, "{j}");
    assert_eq!(j["states"]["in_flight"], 2, "{j}");
    assert_eq!(j["states"]["completed"], 1, "{j}");
    assert_eq!(j["states"]["failed_permanent"], 1, "{j}");
    assert_eq!(j["states"]["failed_retryable"], 0, "{j}");
    assert_eq!(j["states"]["failed_unknown"], 0, "{j}");
    assert_eq!(j["expired"], 3, "{j}");
    let expiry: Vec<u64> = j["expiry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["records"].as_u64().unwrap())
        .collect();
    assert_eq!(expiry, [0, 1, 2, 1, 0, 0], "{j}");
    assert_eq!(j["expiry"][0]["expires_within"], "≤ 1m");

    let run = idem(&["stats", "--store", &url]).await.expect(0);
    assert!(
        run.stdout.contains("counted    exact: every record"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("  in_flight                  2   50.0%"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("expired, not purged         3   42.9%"),
        "{}",
        run.stdout
    );

    // A sample smaller than the store: labelled as such where the store
    // iterates (Redis); SQL stores count everything regardless.
    let run = idem(&["stats", "--store", &url, "--sample", "2", "--json"])
        .await
        .expect(0);
    let j = run.json();
    if sql {
        assert_eq!(j["coverage"]["kind"], "exact", "{j}");
        assert_eq!(j["live"], 4, "{j}");
    } else {
        assert_eq!(
            j["coverage"],
            serde_json::json!({"kind": "sampled", "limit": 2}),
            "{j}"
        );
        assert_eq!(
            j["live"].as_u64().unwrap() + j["expired"].as_u64().unwrap(),
            2,
            "{j}"
        );
        let run = idem(&["stats", "--store", &url, "--sample", "2"])
            .await
            .expect(0);
        assert!(
            run.stdout
                .contains("sampled: first 2 records; proportions, not totals"),
            "{}",
            run.stdout
        );
    }

    // Dry run: counted, nothing removed.
    let run = idem(&["purge", "--store", &url, "--dry-run", "--json"])
        .await
        .expect(0);
    assert_eq!(run.json()["expired"], 3, "{run:#?}");

    let run = idem(&["purge", "--store", &url, "--batch", "2", "--json"])
        .await
        .expect(0);
    let j = run.json();
    if sql {
        assert_eq!(j["native_expiry"], false, "{j}");
        assert_eq!(j["purged"], 3, "{j}");
        assert_eq!(j["batches"], 2, "{j}");
        assert_eq!(
            isolated.records().await.unwrap(),
            4,
            "only the live records are left"
        );
        let run = idem(&["purge", "--store", &url]).await.expect(0);
        assert!(
            run.stdout.starts_with("purged 0 expired records from "),
            "{}",
            run.stdout
        );
        assert!(
            run.stderr.is_empty(),
            "no progress off a terminal: {run:#?}"
        );
    } else {
        assert_eq!(j["native_expiry"], true, "{j}");
        assert_eq!(j["purged"], 0, "{j}");
        let run = idem(&["purge", "--store", &url]).await.expect(0);
        assert!(
            run.stdout.starts_with(&format!(
                "redis stores expire records themselves (native expiry): nothing to purge in {}",
                isolated.url()
            )),
            "{}",
            run.stdout
        );
    }

    let run = idem(&["stats", "--store", &url, "--json"]).await.expect(0);
    let j = run.json();
    assert_eq!(j["live"], 4, "{j}");
    assert_eq!(j["expired"], if sql { 0 } else { 3 }, "{j}");
}

async fn migrate_twice(kind: BackendKind) {
    match kind {
        BackendKind::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("idem.db");
            let url = format!("sqlite://{}?table=payments_idem", path.display());
            // Nothing is created by the other commands.
            let run = idem(&["stats", "--store", &url]).await.expect(3);
            run.one_line_error(&["no idem table `payments_idem`", "idem migrate"]);
            assert!(!path.exists());

            let run = idem(&["migrate", "--store", &url]).await.expect(0);
            assert!(
                run.stdout.contains("created table `payments_idem`")
                    && run.stdout.contains("at schema version 2"),
                "{run:#?}"
            );
            let run = idem(&["migrate", "--store", &url]).await.expect(0);
            assert!(
                run.stdout
                    .contains("at schema version 2, the current one: nothing to do"),
                "{run:#?}"
            );
            let run = idem(&["stats", "--store", &url, "--json"]).await.expect(0);
            assert_eq!(run.json()["live"], 0);
        }
        BackendKind::Postgres => {
            // A schema of its own that nothing creates (migrate=false).
            let mut url = kind.url().unwrap();
            if let StoreUrl::Postgres(pg) = &mut url {
                pg.migrate = false;
            }
            let isolated = Isolated::open_url(url).await.unwrap();
            let mut url = isolated.url().clone();
            if let StoreUrl::Postgres(pg) = &mut url {
                pg.migrate = true;
            }
            let url = cli_url(&url);
            let run = on_key("inspect", &url, COMPLETED, &[]).await.expect(3);
            run.one_line_error(&["no idem table", "idem migrate"]);

            let run = idem(&["migrate", "--store", &url]).await.expect(0);
            assert!(
                run.stdout.contains("created table \"idem_test_")
                    && run.stdout.contains("at schema version 3"),
                "{run:#?}"
            );
            let run = idem(&["migrate", "--store", &url]).await.expect(0);
            assert!(
                run.stdout
                    .contains("at schema version 3, the current one: nothing to do"),
                "{run:#?}"
            );
            on_key("inspect", &url, COMPLETED, &[]).await.expect(1);
            drop(isolated);
        }
        _ => {
            let isolated = Isolated::fresh(kind).await;
            let url = cli_url(isolated.url());
            for _ in 0..2 {
                let run = idem(&["migrate", "--store", &url]).await.expect(0);
                assert!(
                    run.stdout
                        .contains("stores have no schema: nothing to migrate"),
                    "{run:#?}"
                );
            }
        }
    }
}

async fn bad_input_is_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("idem.db").display());
    idem(&["migrate", "--store", &db]).await.expect(0);
    let missing = format!(
        "sqlite://{}",
        dir.path().join("nope").join("x.db").display()
    );
    let unknown_param = format!("{db}?colour=blue");
    let cases: Vec<(Vec<&str>, i32, Vec<&str>)> = vec![
        (
            vec!["inspect", "--store", "nope", "--tenant", "a", "k"],
            2,
            vec!["has no scheme"],
        ),
        (
            vec!["stats", "--store", "mysql://db/x"],
            2,
            vec!["unknown scheme `mysql`"],
        ),
        (
            vec!["stats", "--store", &unknown_param],
            2,
            vec!["unknown parameter `colour`"],
        ),
        (
            vec!["stats", "--store", "sqlite://x.db?busy_timeout=5"],
            2,
            vec!["`busy_timeout`"],
        ),
        (
            vec!["inspect", "--store", &db, "--tenant", "a", "has space"],
            2,
            vec!["KEY `has space`", "0x20"],
        ),
        (
            vec!["inspect", "--store", &db, "--tenant", "", "k"],
            2,
            vec!["--tenant is empty"],
        ),
        (vec!["inspect", "--tenant", "a", "k"], 2, vec!["--store"]),
        (vec!["inspect", "--store", &db, "k"], 2, vec!["--tenant"]),
        (
            vec!["purge", "--store", &db, "--batch", "0"],
            2,
            vec!["--batch"],
        ),
        (
            vec!["stats", "--store", &db, "--timeout", "soon"],
            2,
            vec!["--timeout"],
        ),
        (vec!["frobnicate"], 2, vec!["frobnicate"]),
        (
            vec!["forget", "--store", &db, "--tenant", "a", "k"],
            2,
            vec!["--yes"],
        ),
        (
            vec!["stats", "--store", &missing],
            3,
            vec!["no idem table", "idem migrate"],
        ),
    ];
    for (args, code, wanted) in cases {
        idem(&args).await.expect(code).one_line_error(&wanted);
    }
    assert!(!dir.path().join("nope").exists());
}

async fn unreachable_stores_fail_fast() {
    for url in [
        "postgres://app:s3cret@127.0.0.1:1/app?acquire_timeout=1s",
        "redis://:s3cret@127.0.0.1:1?connection_timeout=500ms",
    ] {
        for command in [
            &["stats"][..],
            &["purge"],
            &["migrate"],
            &["inspect", "--tenant", "a", "k"],
        ] {
            let started = Instant::now();
            let mut args = vec!["--store", url];
            args.splice(0..0, command.iter().copied());
            let run = idem(&args).await.expect(3);
            run.one_line_error(&["could not open the", ":***@127.0.0.1:1"]);
            assert!(!run.stderr.contains("s3cret"), "{run:#?}");
            assert!(started.elapsed() < Duration::from_secs(15), "{run:#?}");
        }
    }
}

async fn timeout_bounds_a_silent_server() {
    // A server that accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let url = format!("postgres://app@127.0.0.1:{port}/app");
    let started = Instant::now();
    let run = idem(&["stats", "--timeout", "1s", "--store", &url])
        .await
        .expect(3);
    run.one_line_error(&["open the store", "no answer within 1s (--timeout)"]);
    assert!(started.elapsed() < Duration::from_secs(10), "{run:#?}");
    silent.abort();
}

async fn help_documents_exit_codes() {
    for args in [&["--help"][..], &["forget", "--help"]] {
        let run = idem(args).await.expect(0);
        assert!(run.stdout.contains("Exit codes:"), "{run:#?}");
        assert!(run.stdout.contains("4  not done"), "{run:#?}");
    }
    let run = idem(&["forget", "--help"]).await.expect(0);
    assert!(run.stdout.contains("--force"), "{run:#?}");
    assert!(run.stdout.contains("IDEM_STORE_URL"), "{run:#?}");
    // The environment's URL is never shown (it may hold a password).
    let run = idem_env(
        &["stats", "--help"],
        &[("IDEM_STORE_URL", "redis://:s3cret@h")],
    )
    .await
    .expect(0);
    assert!(!run.stdout.contains("s3cret"), "{run:#?}");
}
