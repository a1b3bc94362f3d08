//! `idem stats`: the store's census.

use std::time::Duration;

use idem_core::StoreError;
use idem_core::store::{Census, Coverage, EXPIRY_BUCKET_LABELS};
use serde_json::json;

use crate::cli::Stats;
use crate::commands::now;
use crate::failure::{Exit, Failure};
use crate::format::{out, percent};
use crate::open::Target;

pub(crate) async fn run(args: Stats, timeout: Duration) -> Result<Exit, Failure> {
    let target = Target::existing(&args.store.url, timeout).await?;
    let store = target.store();
    let sample = usize::try_from(args.sample).unwrap_or(usize::MAX);
    let census = match target
        .call("count the records", store.census(now(), sample))
        .await
    {
        Ok(census) => census,
        Err(Failure::Store {
            source: StoreError::Unsupported { .. },
            ..
        }) => {
            return Err(Failure::NotDone(format!(
                "this store cannot count records ({} offers no census)",
                target.url.backend()
            )));
        }
        Err(e) => return Err(e),
    };
    if args.json {
        out!("{}", to_json(&target, &census));
    } else {
        show(&target, &census);
    }
    Ok(Exit::Done)
}

/// The census's coverage as JSON.
pub(crate) fn coverage_json(coverage: Coverage) -> serde_json::Value {
    match coverage {
        Coverage::Sampled { limit } => json!({ "kind": "sampled", "limit": limit }),
        _ => json!({ "kind": "exact" }),
    }
}

/// `(name, count)` of the live states, in order.
fn states(census: &Census) -> [(&'static str, u64); 5] {
    [
        ("in_flight", census.in_flight),
        ("completed", census.completed),
        ("failed_retryable", census.failed_retryable),
        ("failed_permanent", census.failed_permanent),
        ("failed_unknown", census.failed_unknown),
    ]
}

fn to_json(target: &Target, census: &Census) -> serde_json::Value {
    let states: serde_json::Map<String, serde_json::Value> = states(census)
        .into_iter()
        .map(|(name, n)| (name.to_string(), json!(n)))
        .collect();
    let expiry: Vec<serde_json::Value> = EXPIRY_BUCKET_LABELS
        .iter()
        .zip(census.expiry)
        .map(|(label, n)| json!({ "expires_within": label, "records": n }))
        .collect();
    json!({
        "store": target.url.to_string(),
        "coverage": coverage_json(census.coverage),
        "live": census.live(),
        "states": states,
        "expired": census.expired,
        "expiry": expiry,
        "unreadable": census.unreadable,
    })
}

fn show(target: &Target, census: &Census) {
    let live = census.live();
    out!("store      {}", target.url);
    match census.coverage {
        Coverage::Sampled { limit } => {
            out!("counted    sampled: first {limit} records; proportions, not totals")
        }
        _ => out!("counted    exact: every record"),
    }
    out!("live records by state");
    for (name, n) in states(census) {
        out!("  {name:<18}{n:>10}  {}", percent(n, live));
    }
    out!("  {:<18}{live:>10}", "live");
    out!(
        "expired, not purged {:>9}  {}",
        census.expired,
        percent(census.expired, census.total())
    );
    out!("live records by time left until they expire");
    for (label, n) in EXPIRY_BUCKET_LABELS.iter().zip(census.expiry) {
        out!("  {label:<18}{n:>10}  {}", percent(n, live));
    }
    if census.unreadable > 0 {
        out!(
            "unreadable          {:>9}  stored items that are not readable records (corrupt, foreign, or newer): `idem inspect` reports such a key as corrupt",
            census.unreadable
        );
    }
}
