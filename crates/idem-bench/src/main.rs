//! `idem-bench`: runs the benchmarks, prints the table and writes the JSON
//! results. Normally started by `cargo xtask bench [--quick]` (release build).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use idem_bench::{Config, Mode, Sides, Target, Workload};

/// Benchmarks idem's backends against their raw store commands.
#[derive(Debug, Parser)]
#[command(name = "idem-bench", version)]
struct Args {
    /// Shorter measurements and smaller data sets (finishes in under 2 minutes).
    #[arg(long, conflicts_with = "tiny")]
    quick: bool,
    /// A few operations of everything: the harness's self-test.
    #[arg(long)]
    tiny: bool,
    /// Backends to measure, comma-separated: memory, sqlite, sqlite+cache,
    /// postgres, postgres-read-first, postgres-single-statement,
    /// postgres+cache, redis, redis+cache, valkey (at IDEM_VALKEY_URL),
    /// redis-cluster (default: all; --quick and --tiny leave out the
    /// variants postgres-read-first, postgres-single-statement and *+cache).
    #[arg(long, value_delimiter = ',', value_parser = target)]
    backends: Vec<Target>,
    /// Workloads to run, comma-separated (default all):
    /// fresh,replay,hot-key,architecture,scaling,purge,memory.
    #[arg(long, value_delimiter = ',', value_parser = workload)]
    workloads: Vec<Workload>,
    /// Concurrency levels of fresh and replay, comma-separated (default 1,8,32; 128 too on Redis).
    #[arg(long, value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Measure only one side of fresh and replay (`idem` or `raw`), for profiling.
    #[arg(long, value_parser = ["idem", "raw"])]
    only: Option<String>,
    /// Pairs of measurements (raw and idem, alternating which goes first) per
    /// fresh and replay figure; the ratio is reported as median, min and max
    /// over the pairs (default: 3, or 1 with --quick and --tiny).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100))]
    repeat: Option<u32>,
    /// Seconds per measurement (default: 0.2 with --quick, 1.0 otherwise).
    #[arg(long)]
    seconds: Option<f64>,
    /// Skip the pure core micro-benchmark.
    #[arg(long)]
    no_core: bool,
    /// Skip the HTTP measurement (idem-tower on axum against the bare
    /// endpoint, over the memory and sqlite stores when --backends names them).
    #[arg(long)]
    no_http: bool,
    /// Where to write the JSON results.
    #[arg(long, default_value = "target/bench/results.json")]
    json: PathBuf,
    /// Worker threads of the tokio runtime (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
}

/// A `--backends` name (an unknown one exits with status 2, naming them all).
fn target(name: &str) -> Result<Target, String> {
    Target::parse(name).ok_or_else(|| {
        let known: Vec<&str> = Target::all().into_iter().map(Target::name).collect();
        format!("known: {}", known.join(", "))
    })
}

/// A `--workloads` name (an unknown one exits with status 2, naming them all).
fn workload(name: &str) -> Result<Workload, String> {
    Workload::parse(name).ok_or_else(|| {
        let known: Vec<&str> = Workload::ALL.into_iter().map(Workload::name).collect();
        format!("known: {}", known.join(", "))
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mode = if args.tiny {
        Mode::Tiny
    } else if args.quick {
        Mode::Quick
    } else {
        Mode::Full
    };
    let mut config = Config::new(mode)
        .with_core(!args.no_core)
        .with_http(!args.no_http);
    if !args.backends.is_empty() {
        config = config.with_backends(args.backends.clone());
    }
    if !args.workloads.is_empty() {
        config = config.with_workloads(args.workloads.clone());
    }
    if !args.concurrency.is_empty() {
        config = config.with_concurrencies(args.concurrency.clone());
    }
    match args.only.as_deref() {
        Some("idem") => config = config.with_sides(Sides::Idem),
        Some("raw") => config = config.with_sides(Sides::Raw),
        _ => {}
    }
    if let Some(repeat) = args.repeat {
        config = config.with_repeats(repeat as usize);
    }
    if let Some(seconds) = args.seconds {
        config = config.with_seconds(seconds);
    }
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(threads) = args.threads {
        runtime.worker_threads(threads.max(1));
    }
    let runtime = match runtime.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("idem-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = runtime.block_on(idem_bench::run(&config));
    print!("{}", report.table());
    let json = match serde_json::to_string_pretty(&report) {
        Ok(json) => json,
        Err(e) => {
            eprintln!("idem-bench: cannot encode the results: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(dir) = args.json.parent().filter(|d| !d.as_os_str().is_empty())
        && let Err(e) = std::fs::create_dir_all(dir)
    {
        eprintln!("idem-bench: cannot create {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    if let Err(e) = std::fs::write(&args.json, json) {
        eprintln!("idem-bench: cannot write {}: {e}", args.json.display());
        return ExitCode::FAILURE;
    }
    eprintln!("idem-bench: results written to {}", args.json.display());
    ExitCode::SUCCESS
}
