//! `cargo xtask soak [--secs N] [--dev] [--backends LIST] [idem-soak options]`:
//! builds the `idem-soak` binary and runs it. Each backend (memory, sqlite,
//! postgres, redis, redis-cluster) is soaked for N seconds (default 60) in a
//! child process of its own, through axum + idem-tower + the store on
//! loopback; the table goes to stdout, the JSON reports to
//! `target/soak/results.json` (unless `--json PATH` is given). Fails when a
//! backend fails, or is unreachable under `CI=true` /
//! `IDEM_REQUIRE_BACKENDS=1`.
//!
//! - Release build by default. `--dev` uses the debug build of
//!   `cargo build --workspace --all-targets` instead: the same feature set as
//!   the test run, so right after `cargo xtask test` it compiles nothing but
//!   links the binary. CI runs `--secs 10 --dev` (see `ci()`); the release
//!   figures in docs/reliability.md come from `cargo xtask soak --secs 120`.
//! - A throwaway 3-master Redis Cluster is started for the run (as for
//!   `cargo xtask test`) unless `IDEM_REDIS_CLUSTER_URLS` points at one.

use std::path::PathBuf;
use std::process::Command;

/// Runs the soak; `args` are passed to `idem-soak` (`--help` lists them),
/// except `--dev`.
pub(crate) fn run(args: &[String]) -> Result<(), String> {
    let root = crate::workspace_root();
    let dev = args.iter().any(|a| a == "--dev");
    let mut soak_args: Vec<String> = args.iter().filter(|a| *a != "--dev").cloned().collect();
    let build: &[&str] = if dev {
        &["build", "--workspace", "--all-targets"]
    } else {
        &["build", "--release", "-p", "idem-soak"]
    };
    crate::cargo(build)?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|dir| {
            if dir.is_relative() {
                root.join(dir)
            } else {
                dir
            }
        })
        .unwrap_or_else(|| root.join("target"));
    let exe = target
        .join(if dev { "debug" } else { "release" })
        .join(format!("idem-soak{}", std::env::consts::EXE_SUFFIX));
    if !soak_args
        .iter()
        .any(|a| a == "--json" || a.starts_with("--json="))
    {
        let json = target.join("soak").join("results.json");
        soak_args.push("--json".into());
        soak_args.push(json.display().to_string());
    }
    let cluster = crate::redis_cluster_for_tests();
    let mut command = Command::new(&exe);
    command.args(&soak_args).current_dir(&root);
    if let Some(cluster) = &cluster {
        command.env("IDEM_REDIS_CLUSTER_URLS", cluster.urls());
    }
    eprintln!("xtask: {} {}", exe.display(), soak_args.join(" "));
    let status = command
        .status()
        .map_err(|e| format!("cannot run {}: {e}", exe.display()));
    drop(cluster);
    let status = status?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("idem-soak failed ({status})"))
    }
}
