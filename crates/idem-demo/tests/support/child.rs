//! `idem-demo` as a child process: started with its stderr appended to a
//! log, ready once it printed `listening on http://ADDR` and its `/health`
//! answers 200.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use libtest_mimic::Failed;
use reqwest::StatusCode;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The binary under test.
pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_idem-demo");

/// How long a child may take to start listening and answer `/health`.
pub(crate) const START_DEADLINE: Duration = Duration::from_secs(60);

/// Starts `idem-demo args…` (killed when dropped), with its stderr appended
/// to `log`; returns it and its `http://ADDR` once `/health` answered 200
/// (polling, with a deadline).
pub(crate) async fn start(
    args: &[String],
    log: &Path,
    http: &reqwest::Client,
) -> Result<(Child, String), Failed> {
    match try_start(args, log, http).await? {
        Some(started) => Ok(started),
        None => Err(format!(
            "`idem-demo {}` aborted while starting; log:\n{}",
            args.first().map_or("", String::as_str),
            tail(log)
        )
        .into()),
    }
}

/// [`start`], but `None` if the child aborted itself (an injected crash,
/// `SIGABRT`) before it was ready.
pub(crate) async fn try_start(
    args: &[String],
    log: &Path,
    http: &reqwest::Client,
) -> Result<Option<(Child, String)>, Failed> {
    let deadline = tokio::time::Instant::now() + START_DEADLINE;
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("log: {e}"))?;
    let mut command = Command::new(BIN);
    // The child's temporary files (an in-process card network's log) go
    // next to its log, in the test's own directory: a killed child cannot
    // remove them itself.
    if let Some(dir) = log.parent() {
        command.env("TMPDIR", dir);
    }
    let mut child = command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(stderr))
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("spawning {BIN}: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let url = loop {
        match tokio::time::timeout_at(deadline, lines.next_line()).await {
            Ok(Ok(Some(line))) => {
                if let Some(url) = line.strip_prefix("listening on ") {
                    break url.trim().to_string();
                }
            }
            Ok(Ok(None) | Err(_)) => {
                let status = child.wait().await;
                if status.as_ref().is_ok_and(aborted) {
                    return Ok(None);
                }
                return Err(format!(
                    "`idem-demo {}` exited before listening ({status:?}); log:\n{}",
                    args.first().map_or("", String::as_str),
                    tail(log)
                )
                .into());
            }
            Err(_) => {
                return Err(format!("idem-demo did not start; log:\n{}", tail(log)).into());
            }
        }
    };
    // Keep reading stdout, so the child never writes to a closed pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    loop {
        let health = http
            .get(format!("{url}/health"))
            .timeout(Duration::from_secs(2))
            .send()
            .await;
        if health.is_ok_and(|r| r.status() == StatusCode::OK) {
            return Ok(Some((child, url)));
        }
        if let Ok(Some(status)) = child.try_wait() {
            if aborted(&status) {
                return Ok(None);
            }
            return Err(format!("{url} exited ({status}); log:\n{}", tail(log)).into());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("{url}/health never answered; log:\n{}", tail(log)).into());
        }
        tokio::time::sleep(idem_testkit::wait::POLL).await;
    }
}

/// Whether the child aborted itself (`SIGABRT`: an injected crash).
fn aborted(status: &std::process::ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt;
    status.signal() == Some(6)
}

/// The last 20 lines of `log`.
pub(crate) fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
