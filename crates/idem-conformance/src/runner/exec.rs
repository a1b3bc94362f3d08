//! Running one trial on the shared runtime: its body as a task bounded by
//! the timeout, then its teardown.

use std::time::Duration;

use tokio::runtime::Handle;

use super::trial::Action;
use super::{ABORT_GRACE, Body, Hook, Trial, backends_required};
use crate::Verdict;

/// Runs trials on the shared runtime, from any thread.
#[derive(Clone)]
pub(super) struct Exec {
    pub(super) handle: Result<Handle, String>,
    pub(super) limit: Duration,
}

impl Exec {
    pub(super) fn execute(&self, trial: Trial) -> Verdict {
        let Trial { body, teardown, .. } = trial;
        match body {
            Action::Unavailable { what, why } => {
                if backends_required() {
                    Verdict::Failed(format!("{what} unavailable: {why}"))
                } else {
                    Verdict::Ignored(format!("{what} unavailable"))
                }
            }
            Action::Run(run) => match &self.handle {
                Err(why) => Verdict::Failed(why.clone()),
                Ok(handle) => match handle.block_on(run_trial(run, teardown, self.limit)) {
                    Ok(()) => Verdict::Passed,
                    Err(why) => Verdict::Failed(why),
                },
            },
        }
    }
}

/// The body as a task bounded by `limit`, then the teardown.
async fn run_trial(run: Body, teardown: Option<Hook>, limit: Duration) -> Result<(), String> {
    let mut task = tokio::spawn(async move { run().await });
    let ran = match tokio::time::timeout(limit, &mut task).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(panic_message(e)),
        Err(_) => {
            task.abort();
            // Let the abort drop the trial's future (and the stores it
            // holds) before the teardown runs.
            let _ = tokio::time::timeout(ABORT_GRACE, task).await;
            Err(format!(
                "the case did not finish within {limit:?} (IDEM_CASE_TIMEOUT_SECS): it hangs"
            ))
        }
    };
    let torn = match teardown {
        None => Ok(()),
        Some(hook) => {
            let mut task = tokio::spawn(async move { hook().await });
            match tokio::time::timeout(limit, &mut task).await {
                Ok(Ok(result)) => result,
                Ok(Err(e)) => Err(panic_message(e)),
                Err(_) => {
                    task.abort();
                    Err(format!("it did not finish within {limit:?}"))
                }
            }
        }
    };
    match (ran, torn) {
        (Ok(()), Ok(())) => Ok(()),
        (Ok(()), Err(t)) => Err(format!("the teardown failed: {t}")),
        (Err(e), Ok(())) => Err(e),
        (Err(e), Err(t)) => Err(format!("{e}\n(the teardown failed too: {t})")),
    }
}

pub(super) fn panic_message(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_string()))
            .unwrap_or_else(|| "case panicked".to_string()),
        Err(e) => format!("case did not finish: {e}"),
    }
}
