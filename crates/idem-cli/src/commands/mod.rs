//! The subcommands, and what they share: which key, reading it, showing it.

use idem_core::store::{State, Versioned};
use idem_core::{Clock as _, IdempotencyKey, RecordKey, Scope, SystemClock, Timestamp};

use crate::cli::{Cli, Command, KeyArgs};
use crate::failure::{Exit, Failure};
use crate::format::{self, out};
use crate::open::Target;

mod forget;
mod inspect;
mod migrate;
mod purge;
mod stats;

/// Runs the command line's command.
pub(crate) async fn run(cli: Cli) -> Result<Exit, Failure> {
    let timeout = cli.timeout;
    match cli.command {
        Command::Inspect(args) => inspect::run(args, timeout).await,
        Command::Forget(args) => forget::run(args, timeout).await,
        Command::Purge(args) => purge::run(args, timeout).await,
        Command::Stats(args) => stats::run(args, timeout).await,
        Command::Migrate(args) => migrate::run(args, timeout).await,
    }
}

/// The time now, by the system clock (the one records expire by).
pub(crate) fn now() -> Timestamp {
    SystemClock.now()
}

/// The record key of the arguments' scope and key.
pub(crate) fn record_key(args: &KeyArgs) -> Result<RecordKey, Failure> {
    let key = IdempotencyKey::parse(&args.key).map_err(|source| Failure::Key {
        key: args.key.escape_debug().to_string(),
        source,
    })?;
    let mut scope = match (&args.tenant, args.global) {
        (Some(tenant), _) if tenant.is_empty() => {
            return Err(Failure::Usage(
                "--tenant is empty: name the tenant, or pass --global for a key of the global scope"
                    .to_string(),
            ));
        }
        (Some(tenant), _) => Scope::tenant(tenant.clone()),
        (None, true) => Scope::global(),
        (None, false) => {
            return Err(Failure::Usage(
                "name the key's tenant with --tenant (or pass --global)".to_string(),
            ));
        }
    };
    if let Some(principal) = &args.principal {
        scope = scope.with_principal(principal.clone());
    }
    if let Some(operation) = &args.operation {
        scope = scope.with_operation(operation.clone());
    }
    Ok(RecordKey::new(&scope, &key))
}

/// The live record under `key`, as of `now`.
pub(crate) async fn read(
    target: &Target,
    key: &RecordKey,
    now: Timestamp,
) -> Result<Option<Versioned>, Failure> {
    let store = target.store();
    target
        .call("read the key", async move { store.get(key, now).await })
        .await
}

/// The one-line answer for a key without a live record.
pub(crate) fn not_found(key: &RecordKey, url: &impl std::fmt::Display, json: bool) -> Exit {
    if json {
        out!(
            "{}",
            serde_json::json!({
                "found": false,
                "store": url.to_string(),
                "key": key.key().as_str(),
                "scope": format::scope_json(key.scope()),
                "digest": key.hex(),
            })
        );
    } else {
        out!(
            "no record for {} in {} (absent, or expired) at {url}",
            key.key(),
            format::scope(key.scope())
        );
    }
    Exit::NotFound
}

/// One line about a record: `completed, 17-byte outcome, expires in 23 h 59 min`.
pub(crate) fn summary(versioned: &Versioned, now: Timestamp) -> String {
    let record = &versioned.record;
    let state = match &record.state {
        State::InFlight { lease_deadline, .. } => {
            format!("in_flight, lease {}", lease(*lease_deadline, now))
        }
        State::Completed { outcome, .. } | State::Failed { outcome, .. } => {
            format!("{}, {}-byte outcome", record.state.name(), outcome.len())
        }
    };
    format!(
        "{state}, expires {}",
        format::relative(record.expires_at, now)
    )
}

/// A lease deadline relative to `now`: `42 s left` or `lapsed 3 min 5 s
/// ago: a retry takes it over`.
pub(crate) fn lease(deadline: Timestamp, now: Timestamp) -> String {
    if deadline > now {
        format!("{} left", format::human(deadline.since(now)))
    } else {
        format!(
            "lapsed {} ago: a retry takes it over",
            format::human(now.since(deadline))
        )
    }
}
