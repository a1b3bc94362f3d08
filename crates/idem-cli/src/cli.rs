//! The command line: [`Cli`] and its subcommands.

use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// The exit codes, as `--help` shows them (the crate docs have the table).
const EXIT_CODES: &str = "\
Exit codes:
  0  done (inspect: the key has a live record)
  1  no live record for the key (inspect, forget)
  2  bad input: usage, malformed URL or key, unknown URL parameter, empty tenant,
     forget without --yes when stdin is not a terminal
  3  the store failed: unreachable, timed out, store error, no idem table
  4  not done: forget refused a key in flight or with a checkpoint (no --force), the confirmation was
     declined, or the record changed meanwhile; stats or purge --dry-run on a store
     that cannot count records

Store URLs: memory://, sqlite://PATH (sqlite:///ABS/PATH), postgres://USER@HOST/DB,
redis://HOST:PORT, redis+cluster://HOST:PORT,HOST:PORT; options as parameters
(?table=…, ?schema=…, ?prefix=…, ?acquire_timeout=2s, …), see the idemkit docs.
A password in the URL is never printed.";

/// Inspect, forget, purge and count idempotency records, and migrate SQL
/// schemas.
#[derive(Debug, Parser)]
#[command(name = "idem", version, after_help = EXIT_CODES)]
pub(crate) struct Cli {
    /// The longest any one store operation may take (opening the store, one
    /// read, one delete, one purge batch), e.g. 500ms, 30s, 2m.
    #[arg(long, global = true, default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
    pub(crate) timeout: Duration,

    /// What to do.
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Show one key's record: state, fingerprint, lease, attempts, times,
    /// outcome size and preview.
    #[command(after_help = EXIT_CODES)]
    Inspect(Inspect),
    /// Delete one key's record, so that a retry runs the operation again.
    #[command(after_help = EXIT_CODES)]
    Forget(Forget),
    /// Remove the records that have expired.
    #[command(after_help = EXIT_CODES)]
    Purge(Purge),
    /// Count records by state and by time left until they expire.
    #[command(after_help = EXIT_CODES)]
    Stats(Stats),
    /// Create or upgrade a SQL store's table (idempotent).
    #[command(after_help = EXIT_CODES)]
    Migrate(Migrate),
}

/// `--store`.
#[derive(Debug, Args)]
pub(crate) struct StoreArg {
    /// The store: sqlite://PATH, postgres://…, redis://…, redis+cluster://…
    /// (options as URL parameters: table=, schema=, prefix=, …).
    #[arg(
        long = "store",
        env = "IDEM_STORE_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    pub(crate) url: String,
}

/// Which key: its scope and the key itself.
#[derive(Debug, Args)]
pub(crate) struct KeyArgs {
    /// The tenant of the key's scope.
    #[arg(long, required_unless_present = "global", value_name = "TENANT")]
    pub(crate) tenant: Option<String>,
    /// The key belongs to the global scope (`Scope::global()`, whose tenant is
    /// empty) instead of a tenant's.
    #[arg(long, conflicts_with = "tenant")]
    pub(crate) global: bool,
    /// The principal of the key's scope, if the service scopes keys by one.
    #[arg(long, value_name = "PRINCIPAL")]
    pub(crate) principal: Option<String>,
    /// The operation of the key's scope, if the service scopes keys by one.
    #[arg(long, value_name = "OPERATION")]
    pub(crate) operation: Option<String>,
    /// The idempotency key, as the client sent it.
    #[arg(value_name = "KEY")]
    pub(crate) key: String,
}

/// `idem inspect`.
#[derive(Debug, Args)]
pub(crate) struct Inspect {
    #[command(flatten)]
    pub(crate) store: StoreArg,
    #[command(flatten)]
    pub(crate) key: KeyArgs,
    /// How many bytes of the outcome to preview (at most 1024; 0: none).
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub(crate) preview_bytes: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub(crate) json: bool,
}

/// `idem forget`.
#[derive(Debug, Args)]
pub(crate) struct Forget {
    #[command(flatten)]
    pub(crate) store: StoreArg,
    #[command(flatten)]
    pub(crate) key: KeyArgs,
    /// Do not ask for confirmation (required when stdin is not a terminal).
    #[arg(long, short = 'y')]
    pub(crate) yes: bool,
    /// Forget a key even while a request holds it (in flight): the request
    /// may still be running, and a retry may then run the operation a second
    /// time. Also needed for a key with a checkpoint (a multi-step operation
    /// part-way through): its recorded steps would run again.
    #[arg(long)]
    pub(crate) force: bool,
    /// Print one JSON object.
    #[arg(long)]
    pub(crate) json: bool,
}

/// `idem purge`.
#[derive(Debug, Args)]
pub(crate) struct Purge {
    #[command(flatten)]
    pub(crate) store: StoreArg,
    /// Records removed per store call.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000), value_name = "N")]
    pub(crate) batch: u32,
    /// Count the expired records instead of removing them (needs a store
    /// that can count).
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// Print one JSON object (and no progress).
    #[arg(long)]
    pub(crate) json: bool,
}

/// `idem stats`.
#[derive(Debug, Args)]
pub(crate) struct Stats {
    #[command(flatten)]
    pub(crate) store: StoreArg,
    /// Records counted at most, on a store that counts by iterating (Redis);
    /// SQL stores count every record.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..), value_name = "N")]
    pub(crate) sample: u64,
    /// Print one JSON object.
    #[arg(long)]
    pub(crate) json: bool,
}

/// `idem migrate`.
#[derive(Debug, Args)]
pub(crate) struct Migrate {
    #[command(flatten)]
    pub(crate) store: StoreArg,
}

/// A duration: a whole number and a unit (`ms`, `s`, `m`, `h`).
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let invalid = || format!("`{text}`: expected a whole number and a unit: 500ms, 30s, 2m, 1h");
    let n: u64 = number.parse().map_err(|_| invalid())?;
    let duration = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => return Err(invalid()),
    };
    if duration.is_zero() {
        return Err(format!("`{text}`: the timeout must be more than zero"));
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("1d").is_err());
    }
}
