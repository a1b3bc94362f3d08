//! `idem forget`: delete one key's record through the store contract
//! (`delete_if` on the revision just read).

use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::time::Duration;

use idem_core::FailureKind;
use idem_core::store::State;
use serde_json::json;

use crate::cli::Forget;
use crate::commands::{lease, not_found, now, read, record_key, summary};
use crate::failure::{self, Exit, Failure};
use crate::format::{self, out};
use crate::open::Target;

pub(crate) async fn run(args: Forget, timeout: Duration) -> Result<Exit, Failure> {
    let key = record_key(&args.key)?;
    let interactive = std::io::stdin().is_terminal();
    if !args.yes && !interactive {
        return Err(Failure::Usage(
            "forget asks for confirmation and stdin is not a terminal: pass --yes to forget without asking (nothing was read or deleted)"
                .to_string(),
        ));
    }
    let target = Target::existing(&args.store.url, timeout).await?;
    let read_at = now();
    let Some(found) = read(&target, &key, read_at).await? else {
        return Ok(not_found(&key, &target.url, args.json));
    };
    let what = format!("{} in {}", key.key(), format::scope(key.scope()));
    let state = &found.record.state;
    if let State::InFlight { lease_deadline, .. } = state
        && !args.force
    {
        return Err(Failure::NotDone(format!(
            "{what} is in flight (lease {}): a request may still be running, and forgetting the key lets a retry run the operation a second time; pass --force to forget it anyway",
            lease(*lease_deadline, read_at)
        )));
    }
    if let Some(checkpoint) = &found.record.checkpoint
        && !args.force
    {
        return Err(Failure::NotDone(format!(
            "{what} has recorded progress (checkpoint #{} after step \"{}\"): forgetting it discards the steps that took effect, and a retry runs every step again with new downstream idempotency keys (a second charge at a provider); pass --force to forget it anyway",
            checkpoint.seq,
            format::preview(checkpoint.step.as_bytes(), 64).0
        )));
    }
    let warning = consequence(state);
    failure::warn(&warning);
    if !args.yes && !confirm(&format!("Forget {what} ({})?", summary(&found, read_at)))? {
        return Err(Failure::NotDone(format!(
            "{what} was not forgotten: not confirmed"
        )));
    }
    let store = target.store();
    let revision = found.revision;
    let deleted = target
        .call("delete the key", async {
            store.delete_if(&key, &found, now()).await
        })
        .await?;
    if !deleted {
        let now_there = match read(&target, &key, now()).await {
            Ok(Some(current)) => format!(
                "it is now {} (revision {})",
                summary(&current, now()),
                current.revision.as_u64()
            ),
            Ok(None) => "it expired or was deleted meanwhile".to_string(),
            Err(_) => "it could not be read again".to_string(),
        };
        return Err(Failure::NotDone(format!(
            "{what} changed after it was read (revision {}): nothing was deleted; {now_there}; inspect it before trying again",
            revision.as_u64()
        )));
    }
    if args.json {
        out!(
            "{}",
            json!({
                "forgotten": true,
                "store": target.url.to_string(),
                "key": key.key().as_str(),
                "scope": format::scope_json(key.scope()),
                "digest": key.hex(),
                "state": state.name(),
                "revision": revision.as_u64(),
                "warning": warning,
            })
        );
    } else {
        out!(
            "forgot {what}: it was {} (revision {})",
            summary(&found, read_at),
            revision.as_u64()
        );
    }
    Ok(Exit::Done)
}

/// What forgetting a key in `state` means for the next retry.
fn consequence(state: &State) -> String {
    let again = "a retry with this key will run the operation again";
    match state {
        State::Completed { .. } => {
            format!("{again}: its stored outcome is gone, and it will not be replayed")
        }
        State::InFlight { .. } => format!(
            "{again} even if the request holding it is still running (it may take effect twice), and that request will find its lease lost"
        ),
        State::Failed {
            kind: FailureKind::Retryable,
            ..
        } => format!("{again}, and with any request body (the fingerprint is forgotten too)"),
        State::Failed {
            kind: FailureKind::Unknown,
            ..
        } => format!(
            "{again}, although its first run may have taken effect (its outcome is unknown)"
        ),
        State::Failed { .. } => {
            format!("{again} instead of replaying its stored failure")
        }
    }
}

/// Asks `question` on the terminal; true for `y` or `yes`.
fn confirm(question: &str) -> Result<bool, Failure> {
    let io = |source| Failure::Io {
        what: "ask for confirmation".to_string(),
        source,
    };
    let mut stderr = std::io::stderr();
    write!(stderr, "{question} [y/N] ").map_err(io)?;
    stderr.flush().map_err(io)?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer).map_err(io)?;
    Ok(matches!(
        answer.trim().to_ascii_lowercase().as_str(),
        "y" | "yes"
    ))
}
