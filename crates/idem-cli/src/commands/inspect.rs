//! `idem inspect`: one key's record.

use std::time::Duration;

use idem_core::store::{State, Versioned};
use idem_core::{RecordKey, Timestamp};
use serde_json::json;

use crate::cli::Inspect;
use crate::commands::{lease, not_found, now, read, record_key};
use crate::failure::{Exit, Failure};
use crate::format::{self, out};
use crate::open::Target;

pub(crate) async fn run(args: Inspect, timeout: Duration) -> Result<Exit, Failure> {
    let key = record_key(&args.key)?;
    let target = Target::existing(&args.store.url, timeout).await?;
    let now = now();
    let Some(found) = read(&target, &key, now).await? else {
        return Ok(not_found(&key, &target.url, args.json));
    };
    if args.json {
        out!(
            "{}",
            to_json(&target, &key, &found, now, args.preview_bytes)
        );
    } else {
        show(&target, &key, &found, now, args.preview_bytes);
    }
    Ok(Exit::Done)
}

fn token_hex(state: &State) -> String {
    format!("{:032x}", state.token().as_u128())
}

/// The record as JSON.
fn to_json(
    target: &Target,
    key: &RecordKey,
    found: &Versioned,
    now: Timestamp,
    preview_bytes: usize,
) -> serde_json::Value {
    let record = &found.record;
    let (lease, outcome, failure) = match &record.state {
        State::InFlight { lease_deadline, .. } => (
            json!({
                "deadline": format::rfc3339(*lease_deadline),
                "remaining_ms": format::millis_until(*lease_deadline, now),
                "lapsed": *lease_deadline <= now,
            }),
            serde_json::Value::Null,
            serde_json::Value::Null,
        ),
        State::Completed { outcome, .. } => (
            serde_json::Value::Null,
            outcome_json(outcome.as_bytes(), preview_bytes),
            serde_json::Value::Null,
        ),
        State::Failed { kind, outcome, .. } => (
            serde_json::Value::Null,
            outcome_json(outcome.as_bytes(), preview_bytes),
            json!(kind.name()),
        ),
    };
    json!({
        "found": true,
        "store": target.url.to_string(),
        "key": key.key().as_str(),
        "scope": format::scope_json(key.scope()),
        "digest": key.hex(),
        "revision": found.revision.as_u64(),
        "state": record.state.name(),
        "token": token_hex(&record.state),
        "lease": lease,
        "failure": failure,
        "fingerprint": format::hex(record.fingerprint.as_bytes()),
        "attempts": record.attempts,
        "created_at": format::rfc3339(record.created_at),
        "updated_at": format::rfc3339(record.updated_at),
        "expires_at": format::rfc3339(record.expires_at),
        "expires_in_ms": format::millis_until(record.expires_at, now),
        "outcome": outcome,
        "checkpoint": record.checkpoint.as_ref().map(|c| json!({
            "seq": c.seq,
            "step": c.step,
            "state_bytes": c.state.len(),
        })),
    })
}

/// The outcome's size and preview: `preview` is the text the human output
/// shows (escaped), `preview_hex` the same bytes exactly.
fn outcome_json(bytes: &[u8], preview_bytes: usize) -> serde_json::Value {
    let (preview, truncated) = format::preview(bytes, preview_bytes);
    let shown = &bytes[..bytes.len().min(preview_bytes.min(format::MAX_PREVIEW))];
    json!({
        "bytes": bytes.len(),
        "preview": preview,
        "preview_hex": format::hex(shown),
        "truncated": truncated,
    })
}

/// The record for people, one field a line.
fn show(target: &Target, key: &RecordKey, found: &Versioned, now: Timestamp, preview_bytes: usize) {
    let record = &found.record;
    let time = |t: Timestamp| format!("{} ({})", format::rfc3339(t), format::relative(t, now));
    out!("key          {}", key.key());
    out!("scope        {}", format::scope(key.scope()));
    out!("store        {}", target.url);
    out!("state        {}", record.state.name());
    match &record.state {
        State::InFlight { lease_deadline, .. } => {
            out!("lease holder {}", token_hex(&record.state));
            out!(
                "lease until  {} ({})",
                format::rfc3339(*lease_deadline),
                lease(*lease_deadline, now)
            );
        }
        State::Completed { .. } => out!("completed by {}", token_hex(&record.state)),
        State::Failed { .. } => out!("failed by    {}", token_hex(&record.state)),
    }
    out!(
        "fingerprint  {}",
        format::hex(record.fingerprint.as_bytes())
    );
    out!("attempts     {}", record.attempts);
    out!("created      {}", time(record.created_at));
    out!("updated      {}", time(record.updated_at));
    out!("expires      {}", time(record.expires_at));
    match &record.state {
        State::InFlight { .. } => out!("outcome      none yet"),
        State::Completed { outcome, .. } | State::Failed { outcome, .. } => {
            let bytes = outcome.as_bytes();
            let (preview, truncated) = format::preview(bytes, preview_bytes);
            let shown = preview_bytes.min(format::MAX_PREVIEW).min(bytes.len());
            let more = if truncated {
                format!(" … (first {shown} of {} bytes)", bytes.len())
            } else {
                String::new()
            };
            out!("outcome      {} bytes: \"{preview}\"{more}", bytes.len());
        }
    }
    if let Some(c) = &record.checkpoint {
        out!(
            "checkpoint   #{} after step \"{}\" ({} bytes of state)",
            c.seq,
            format::preview(c.step.as_bytes(), 64).0,
            c.state.len()
        );
    }
    out!("digest       {}", key.hex());
    out!("revision     {}", found.revision.as_u64());
}
