//! `cargo xtask bench [--quick] [--repeat N] [idem-bench options]`: builds
//! the `idem-bench` binary in release mode and runs it, with a throwaway
//! Redis Cluster for the `redis-cluster` backend unless
//! `IDEM_REDIS_CLUSTER_URLS` is set, and a throwaway Valkey server for the
//! `valkey` backend unless `IDEM_VALKEY_URL` is set.
//!
//! The table goes to stdout; the JSON results to `target/bench/results.json`
//! (unless `--json PATH` is given); `cargo xtask bench-doc` turns them into
//! the tables of docs/benchmarks.md.

use std::path::Path;
use std::process::Command;

use crate::redis_cluster::Cluster;
use crate::valkey::Valkey;

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
    let valkey = valkey_for(&bench_args, &root);
    let mut env: Vec<(&str, String)> = Vec::new();
    if let Some(cluster) = &cluster {
        env.push(("IDEM_REDIS_CLUSTER_URLS", cluster.urls()));
    }
    if let Some(valkey) = &valkey {
        env.push(("IDEM_VALKEY_URL", valkey.url()));
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
    // Stop the throwaway servers before reporting anything else.
    drop(cluster);
    drop(valkey);
    if status.success() {
        Ok(())
    } else {
        Err(format!("idem-bench failed ({status})"))
    }
}

/// Whether `args` only ask for help or the version (no server needed).
fn help_only(args: &[String]) -> bool {
    args.iter()
        .any(|a| matches!(a.as_str(), "-h" | "--help" | "-V" | "--version"))
}

/// Whether the run of `args` measures the target `name`: named in
/// `--backends`, or without `--backends` one of the default targets
/// (`valkey` and `redis-cluster` are defaults in every mode).
fn runs_target(args: &[String], name: &str) -> bool {
    let backends = args
        .iter()
        .position(|a| a == "--backends")
        .and_then(|i| args.get(i + 1).cloned())
        .or_else(|| {
            args.iter()
                .find_map(|a| a.strip_prefix("--backends=").map(str::to_string))
        });
    backends.is_none_or(|b| b.split(',').any(|n| n.trim() == name))
}

/// A throwaway Valkey server when the run includes `valkey` and
/// `IDEM_VALKEY_URL` is not set; `None` (with a note) otherwise.
fn valkey_for(args: &[String], root: &Path) -> Option<Valkey> {
    if help_only(args) || !runs_target(args, "valkey") {
        return None;
    }
    if let Ok(url) = std::env::var("IDEM_VALKEY_URL")
        && !url.trim().is_empty()
    {
        eprintln!("xtask: benchmarking the Valkey server at IDEM_VALKEY_URL={url}");
        return None;
    }
    match Valkey::start(root) {
        Ok(valkey) => {
            eprintln!(
                "xtask: started a throwaway Valkey server at {}",
                valkey.url()
            );
            Some(valkey)
        }
        Err(e) => {
            eprintln!("xtask: no Valkey server ({e}); valkey will be reported as skipped");
            None
        }
    }
}

/// A throwaway cluster when the run includes `redis-cluster` and
/// `IDEM_REDIS_CLUSTER_URLS` is not set; `None` (with a note) otherwise.
fn cluster_for(args: &[String], root: &Path) -> Option<Cluster> {
    if help_only(args) || !runs_target(args, "redis-cluster") {
        return None;
    }
    if let Ok(urls) = std::env::var("IDEM_REDIS_CLUSTER_URLS")
        && !urls.trim().is_empty()
    {
        eprintln!("xtask: benchmarking the Redis Cluster at IDEM_REDIS_CLUSTER_URLS={urls}");
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

#[cfg(test)]
mod tests {
    use super::runs_target;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_string()).collect()
    }

    #[test]
    fn a_server_starts_only_for_the_targets_the_run_measures() {
        assert!(runs_target(&args(&["--quick"]), "valkey"));
        assert!(runs_target(
            &args(&["--backends", "redis,valkey"]),
            "valkey"
        ));
        assert!(runs_target(&args(&["--backends=valkey"]), "valkey"));
        assert!(!runs_target(
            &args(&["--backends", "redis,redis+cache"]),
            "valkey"
        ));
        assert!(!runs_target(&args(&["--backends=memory"]), "redis-cluster"));
        assert!(runs_target(
            &args(&["--backends", "memory, redis-cluster"]),
            "redis-cluster"
        ));
    }
}
