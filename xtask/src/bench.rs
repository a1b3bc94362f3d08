//! `cargo xtask bench [--quick] [idem-bench options]`: builds the `idem-bench`
//! binary in release mode and runs it, with a throwaway Redis Cluster for the
//! `redis-cluster` backend unless `IDEM_REDIS_CLUSTER_URLS` is set.
//!
//! The table goes to stdout; the JSON results to `target/bench/results.json`
//! (unless `--json PATH` is given). See docs/benchmarks.md.

use std::process::Command;

use crate::redis_cluster::Cluster;

/// Runs the benchmarks; `args` are passed to `idem-bench` (`--quick`,
/// `--backends memory,sqlite`, `--json PATH`, …; `--help` lists them).
pub(crate) fn run(args: &[String]) -> Result<(), String> {
    let root = crate::workspace_root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("xtask: cargo build --release -p idem-bench");
    let status = Command::new(&cargo)
        .args(["build", "--release", "-p", "idem-bench"])
        .current_dir(&root)
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err(format!(
            "cargo build --release -p idem-bench failed ({status})"
        ));
    }

    let mut bench_args: Vec<String> = args.to_vec();
    if !bench_args
        .iter()
        .any(|a| a == "--json" || a.starts_with("--json="))
    {
        let json = root.join("target").join("bench").join("results.json");
        bench_args.push("--json".into());
        bench_args.push(json.display().to_string());
    }
    let cluster = cluster_for(&bench_args, &root);
    let mut env: Vec<(&str, String)> = Vec::new();
    if let Some(cluster) = &cluster {
        env.push(("IDEM_REDIS_CLUSTER_URLS", cluster.urls()));
    }

    eprintln!(
        "xtask: cargo run --release -p idem-bench -- {}",
        bench_args.join(" ")
    );
    let status = Command::new(&cargo)
        .args(["run", "--quiet", "--release", "-p", "idem-bench", "--"])
        .args(&bench_args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .current_dir(&root)
        .status()
        .map_err(|e| format!("cannot run idem-bench: {e}"))?;
    // Stop the throwaway cluster before reporting anything else.
    drop(cluster);
    if status.success() {
        Ok(())
    } else {
        Err(format!("idem-bench failed ({status})"))
    }
}

/// A throwaway cluster when the run includes `redis-cluster` and
/// `IDEM_REDIS_CLUSTER_URLS` is not set; `None` (with a note) otherwise.
fn cluster_for(args: &[String], root: &std::path::Path) -> Option<Cluster> {
    if args
        .iter()
        .any(|a| matches!(a.as_str(), "-h" | "--help" | "-V" | "--version"))
    {
        return None;
    }
    if let Ok(urls) = std::env::var("IDEM_REDIS_CLUSTER_URLS")
        && !urls.trim().is_empty()
    {
        eprintln!("xtask: benchmarking the Redis Cluster at IDEM_REDIS_CLUSTER_URLS={urls}");
        return None;
    }
    let backends = args
        .iter()
        .position(|a| a == "--backends")
        .and_then(|i| args.get(i + 1).cloned())
        .or_else(|| {
            args.iter()
                .find_map(|a| a.strip_prefix("--backends=").map(str::to_string))
        });
    if backends.is_some_and(|b| !b.split(',').any(|name| name.trim() == "redis-cluster")) {
        return None;
    }
    match Cluster::start(root) {
        Ok(cluster) => {
            eprintln!(
                "xtask: started a throwaway Redis Cluster at {}",
                cluster.urls()
            );
            Some(cluster)
        }
        Err(e) => {
            eprintln!("xtask: no Redis Cluster ({e}); redis-cluster will be reported as skipped");
            None
        }
    }
}
