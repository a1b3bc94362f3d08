//! `idem-soak`: a bounded soak of idem through the full HTTP stack.
//!
//! For each backend, in a fresh child process of its own (so the memory
//! figures belong to that backend alone): an axum server behind the
//! `idem-tower` layer over the backend's store, on a loopback port, and many
//! concurrent clients in the same process sending a mix of new keys, replays,
//! duplicates racing each other, keys reused with another body, and invalid
//! keys. Every answer is checked; the handler's executions are counted
//! against the distinct keys; the process's RSS is sampled every second, and
//! the records the store still holds are counted at the end.
//!
//! Exit status: 0 when every backend passed; 1 when one failed, or was
//! unreachable under `CI=true` / `IDEM_REQUIRE_BACKENDS=1` (otherwise an
//! unreachable backend is reported as skipped). Run it with
//! `cargo xtask soak [--secs N] [--backends memory,sqlite,postgres,redis,redis-cluster]`
//! (redis-cluster is in the default list when `IDEM_REDIS_CLUSTER_URLS` is set);
//! the figures and their meaning are in docs/reliability.md.

mod backend;
mod load;
mod report;
mod rss;

use std::io::{BufRead as _, BufReader};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};

use clap::Parser;

use idem_testkit::{BackendKind, backends_required, chain};
use report::{Report, RssBound, Status};

/// Why a soak could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum SoakError {
    /// The backend's server cannot be reached.
    #[error("{backend} is unreachable: {reason}")]
    Unreachable {
        /// The backend.
        backend: &'static str,
        /// Why.
        reason: String,
    },
    /// Setting up or cleaning up failed.
    #[error("{what} failed")]
    Setup {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// `/proc` could not be read or parsed.
    #[error("cannot read the process's memory: {0}")]
    Proc(String),
    /// An I/O error (binding the port, reading `/proc`, running a child).
    #[error("i/o error")]
    Io(#[from] std::io::Error),
}

/// The marker of the result line a child prints on stdout.
const RESULT_MARKER: &str = "IDEM_SOAK_RESULT ";

#[derive(Parser, Debug)]
#[command(
    name = "idem-soak",
    about = "Bounded soak of idem through axum + idem-tower + each store, on loopback."
)]
struct Args {
    /// Seconds of load per backend.
    #[arg(long, default_value_t = 60)]
    secs: u64,
    /// Backends to soak, comma-separated [default: memory,sqlite,postgres,redis,
    /// and redis-cluster when IDEM_REDIS_CLUSTER_URLS is set or under
    /// CI=true / IDEM_REQUIRE_BACKENDS=1].
    #[arg(long, value_delimiter = ',')]
    backends: Vec<BackendKind>,
    /// Concurrent clients.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// RSS growth over the plateau (the highest RSS of the first half after
    /// the warm-up) always tolerated by the end, MiB.
    #[arg(long, default_value_t = 64)]
    max_rss_growth_mib: u64,
    /// RSS growth over the plateau tolerated as a percentage of the plateau
    /// (the larger of the two bounds applies).
    #[arg(long, default_value_t = 20)]
    max_rss_growth_percent: u64,
    /// Also write the reports as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Internal: run one backend in this process and print its report.
    #[arg(long, hide = true)]
    child: Option<BackendKind>,
}

impl Args {
    fn bound(&self) -> RssBound {
        RssBound {
            mib: self.max_rss_growth_mib,
            percent: self.max_rss_growth_percent,
        }
    }

    /// The plan of a soak of `kind`.
    fn plan(&self, kind: BackendKind) -> load::Plan {
        load::Plan::new(self.secs, self.clients, backend::max_ttl(kind))
    }

    /// A failed report of `kind`, nothing measured (yet).
    fn report(&self, kind: BackendKind, failures: Vec<String>) -> Report {
        let plan = self.plan(kind);
        Report {
            backend: kind.name().into(),
            status: Status::Fail,
            failures,
            notes: Vec::new(),
            clients: plan.clients,
            ttl_secs: plan.ttl.as_secs_f64(),
            warmup_secs: plan.warmup.as_secs_f64(),
            rss_bound: self.bound(),
            measured: None,
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match args.child {
        Some(kind) => child(&args, kind),
        None => parent(&args),
    }
}

/// Runs each backend in a child process, prints the table, decides.
fn parent(args: &Args) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("idem-soak: cannot find my own executable: {e}");
            return ExitCode::FAILURE;
        }
    };
    let required = backends_required();
    let kinds = if args.backends.is_empty() {
        backend::defaults(required)
    } else {
        args.backends.clone()
    };
    let mut reports = Vec::new();
    for &kind in &kinds {
        eprintln!(
            "idem-soak: {} for {} s with {} clients …",
            kind.name(),
            args.secs,
            args.clients
        );
        let mut report = run_child(&exe, args, kind);
        if report.status == Status::Skipped && required {
            report.status = Status::Fail;
            report
                .failures
                .push("unreachable, and CI / IDEM_REQUIRE_BACKENDS requires every backend".into());
        }
        reports.push(report);
    }
    println!("{}", report::table(&reports));
    if let Some(path) = &args.json {
        let written = serde_json::to_vec_pretty(&reports)
            .map_err(std::io::Error::other)
            .and_then(|json| {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                std::fs::write(path, json)
            });
        match written {
            Ok(()) => eprintln!("idem-soak: wrote {}", path.display()),
            Err(e) => {
                eprintln!("idem-soak: cannot write {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        }
    }
    let with = |status| -> Vec<&str> {
        let of = reports.iter().filter(|r| r.status == status);
        of.map(|r| r.backend.as_str()).collect()
    };
    let (failed, skipped) = (with(Status::Fail), with(Status::Skipped));
    if !skipped.is_empty() {
        eprintln!(
            "\n================ idem-soak: SKIPPED {} ================\n\
             These backends were unreachable and were NOT soaked (not passed).\n\
             Set CI=true or IDEM_REQUIRE_BACKENDS=1 to make this a failure.\n",
            skipped.join(", ")
        );
    }
    if failed.is_empty() {
        eprintln!("idem-soak: PASS");
        ExitCode::SUCCESS
    } else {
        eprintln!("idem-soak: FAIL ({})", failed.join(", "));
        ExitCode::FAILURE
    }
}

/// Runs `kind` in a child process and reads its report.
fn run_child(exe: &std::path::Path, args: &Args, kind: BackendKind) -> Report {
    let broken = |why: String| args.report(kind, vec![why]);
    let spawned = Command::new(exe)
        .arg("--child")
        .arg(kind.name())
        .arg("--secs")
        .arg(args.secs.to_string())
        .arg("--clients")
        .arg(args.clients.to_string())
        .arg("--max-rss-growth-mib")
        .arg(args.max_rss_growth_mib.to_string())
        .arg("--max-rss-growth-percent")
        .arg(args.max_rss_growth_percent.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => return broken(format!("cannot start the child process: {e}")),
    };
    let mut result = None;
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            match line {
                Ok(line) => match line.strip_prefix(RESULT_MARKER) {
                    Some(json) => result = Some(serde_json::from_str::<Report>(json)),
                    None => println!("{line}"),
                },
                Err(e) => {
                    result = Some(Err(serde_json::Error::io(e)));
                    break;
                }
            }
        }
    }
    let status = child.wait();
    match (result, status) {
        (Some(Ok(report)), Ok(status)) if status.success() => report,
        (Some(Err(e)), _) => broken(format!("unreadable report from the child: {e}")),
        (_, Ok(status)) => broken(format!("the child process ended with {status}")),
        (_, Err(e)) => broken(format!("waiting for the child process: {e}")),
    }
}

/// Runs one backend in this process and prints its report on stdout.
fn child(args: &Args, kind: BackendKind) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("idem-soak: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = runtime.block_on(soak_one(args, kind));
    match serde_json::to_string(&report) {
        Ok(json) => {
            println!("{RESULT_MARKER}{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("idem-soak: cannot encode the report: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn soak_one(args: &Args, kind: BackendKind) -> Report {
    let plan = args.plan(kind);
    let mut report = args.report(kind, Vec::new());
    let opened = match backend::open(kind).await {
        Ok(opened) => opened,
        Err(e @ SoakError::Unreachable { .. }) => {
            eprintln!("idem-soak: {e}");
            report.status = Status::Skipped;
            report.failures.push(e.to_string());
            return report;
        }
        Err(e) => {
            report.failures.push(chain(&e));
            return report;
        }
    };
    report.notes = opened.notes.clone();
    let measured = load::run(&opened, &plan).await;
    if let Err(e) = opened.close().await {
        report.failures.push(format!("cleanup: {}", chain(&e)));
    }
    match measured {
        Ok(m) => {
            report.failures.extend(report::verdict(&m, args.bound()));
            report.measured = Some(m);
        }
        Err(e) => report.failures.push(chain(&e)),
    }
    if report.failures.is_empty() {
        report.status = Status::Pass;
    }
    report
}
