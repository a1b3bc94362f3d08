//! `idem purge`: remove expired records, batch after batch.

use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::cli::Purge;
use crate::commands::now;
use crate::commands::stats::coverage_json;
use crate::failure::{Exit, Failure};
use crate::format::out;
use crate::open::Target;

pub(crate) async fn run(args: Purge, timeout: Duration) -> Result<Exit, Failure> {
    let target = Target::existing(&args.store.url, timeout).await?;
    let store = target.store();
    let url = target.url.to_string();
    let native = store.capabilities().native_expiry;
    let now = now();
    if args.dry_run {
        return dry_run(&target, &args, native, now).await;
    }
    if native {
        // The contract lets such a store return 0 without a round trip; ask
        // once all the same, in case it has something to remove.
        let purged = target
            .call(
                "purge expired records",
                store.purge_expired(now, batch(&args)),
            )
            .await?;
        if args.json {
            out!(
                "{}",
                json!({ "store": url, "native_expiry": true, "purged": purged, "batches": 1 })
            );
        } else {
            let removed = if purged > 0 {
                format!("; removed {}", records(purged))
            } else {
                String::new()
            };
            out!(
                "{} stores expire records themselves (native expiry): nothing to purge in {url}{removed}",
                target.url.backend()
            );
        }
        return Ok(Exit::Done);
    }
    let bar = if args.json || !std::io::stderr().is_terminal() {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::new_spinner();
        if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} [{elapsed}]") {
            bar.set_style(style);
        }
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    };
    bar.set_message("purging expired records");
    let started = Instant::now();
    let limit = batch(&args);
    let (mut purged, mut batches) = (0_u64, 0_u64);
    loop {
        let removed = target
            .call("purge expired records", store.purge_expired(now, limit))
            .await;
        let removed = match removed {
            Ok(removed) => removed,
            Err(e) => {
                bar.finish_and_clear();
                if purged > 0 {
                    crate::failure::warn(&format!(
                        "{} removed before the failure",
                        records(purged)
                    ));
                }
                return Err(e);
            }
        };
        purged += removed;
        batches += 1;
        bar.set_message(format!(
            "purged {} ({batches} batch{})",
            records(purged),
            if batches == 1 { "" } else { "es" }
        ));
        if removed < u64::from(args.batch) {
            break;
        }
    }
    bar.finish_and_clear();
    if args.json {
        out!(
            "{}",
            json!({
                "store": url,
                "native_expiry": false,
                "purged": purged,
                "batches": batches,
                "elapsed_ms": u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            })
        );
    } else {
        out!(
            "purged {} from {url} in {batches} batch{} of up to {} ({:.1?})",
            records(purged),
            if batches == 1 { "" } else { "es" },
            args.batch,
            started.elapsed()
        );
    }
    Ok(Exit::Done)
}

/// `1 expired record`, `3 expired records`.
fn records(n: u64) -> String {
    format!("{n} expired record{}", if n == 1 { "" } else { "s" })
}

/// The batch size as the store takes it.
fn batch(args: &Purge) -> usize {
    usize::try_from(args.batch).unwrap_or(usize::MAX)
}

/// `--dry-run`: count the expired records, remove none.
async fn dry_run(
    target: &Target,
    args: &Purge,
    native: bool,
    now: idem_core::Timestamp,
) -> Result<Exit, Failure> {
    let store = target.store();
    let census = target
        .call("count the records", store.census(now, 10_000))
        .await?;
    let url = target.url.to_string();
    if args.json {
        out!(
            "{}",
            json!({
                "store": url,
                "dry_run": true,
                "native_expiry": native,
                "expired": census.expired,
                "coverage": coverage_json(census.coverage),
            })
        );
    } else {
        let scope = match census.coverage {
            idem_core::store::Coverage::Exact => String::new(),
            _ => " (in a sample of the first 10000 records)".to_string(),
        };
        let who = if native {
            "the store expires them itself"
        } else {
            "`idem purge` would remove them"
        };
        out!(
            "{}{scope}, {who}; nothing was removed from {url}",
            records(census.expired)
        );
    }
    Ok(Exit::Done)
}
