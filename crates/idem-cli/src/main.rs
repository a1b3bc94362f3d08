//! # idem: the operator CLI of idem
//!
//! `idem` looks at and tends the idempotency records of a store: one key at
//! a time (`inspect`, `forget`), or all of them (`purge`, `stats`), and the
//! SQL schemas (`migrate`). Every command takes the store as a URL
//! (`--store`, or the `IDEM_STORE_URL` environment variable), in the syntax
//! of [`idemkit::StoreUrl`]: `sqlite:///var/lib/app/idem.db`,
//! `postgres://app@db/app?schema=billing`, `redis://cache:6379?prefix=app:`,
//! `redis+cluster://…`. The URL's parameters (`table=`, `schema=`,
//! `prefix=`) name the records' place, so one URL is one store. A password
//! in the URL is never printed (it shows as `***`).
//!
//! ```text
//! idem inspect --store URL --tenant T [--principal P] [--operation O] KEY [--json] [--preview-bytes N]
//! idem forget  --store URL --tenant T [--principal P] [--operation O] KEY [--yes] [--force] [--json]
//! idem purge   --store URL [--batch N] [--dry-run] [--json]
//! idem stats   --store URL [--sample N] [--json]
//! idem migrate --store URL
//! ```
//!
//! | command | what it does |
//! |---|---|
//! | `inspect` | reads one key's record: state, request fingerprint, lease holder and deadline (in flight) or the holder that finished it, attempts, created/updated/expires (RFC 3339, UTC), outcome size and a preview of its first bytes (64 by default, at most 1024; non-printable bytes escaped), the checkpoint of a multi-step operation (sequence number, last step, state size), the record's digest and revision |
//! | `forget` | deletes one key's record, only if it is still the revision just read (a record that changed meanwhile is left alone). Refuses a key in flight, or one with a checkpoint (a multi-step operation part-way through), unless `--force`; asks for confirmation on a terminal, requires `--yes` otherwise. A retry of a forgotten key runs the operation again |
//! | `purge` | removes the records that have expired, in batches of `--batch` (default 1000), until none is left; a spinner on a terminal, then the count. Stores that expire records themselves (Redis) have nothing to purge. `--dry-run` counts them instead (where the store can count) |
//! | `stats` | counts records by state, expired records not yet purged, and live records by time left until they expire; exact on SQL stores, a sample of the first `--sample` records (default 10 000) on Redis, labelled as such |
//! | `migrate` | creates or upgrades the table of a SQL store (idempotent: running it again changes nothing); Redis has no schema |
//!
//! The commands other than `migrate` never create or change a schema: on a
//! SQLite file or a PostgreSQL database without idem's table they fail,
//! pointing at `idem migrate`.
//!
//! Time is the system clock's (UTC); records expire by it.
//!
//! ## Exit codes
//!
//! | code | meaning |
//! |---|---|
//! | 0 | done (`inspect`: the key has a live record) |
//! | 1 | no live record for the key (`inspect`, `forget`): absent, or expired |
//! | 2 | bad input: usage, a malformed URL or key, an unknown URL parameter, an empty tenant, `forget` without `--yes` when stdin is not a terminal |
//! | 3 | the store failed: unreachable, timed out (`--timeout`, default 30 s per operation), an error of the store, no idem table |
//! | 4 | not done: `forget` refused a key in flight (no `--force`), the confirmation was declined, or the record changed between reading and deleting it; `stats` or `purge --dry-run` on a store that cannot count records |
//!
//! Errors are one line on stderr, `idem: error: …`, with their causes joined
//! by `: `; warnings (what forgetting a key means) are `idem: warning: …`
//! on stderr. With `--json`, results (and a missing key, as
//! `{"found": false, …}`) go to stdout as one JSON object; in `inspect`'s,
//! `outcome.preview` is the escaped text the human output shows and
//! `outcome.preview_hex` the same bytes in hexadecimal.
#![forbid(unsafe_code)]

mod cli;
mod commands;
mod failure;
mod format;
mod open;

use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser as _;

use crate::cli::Cli;
use crate::failure::Exit;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return failure::clap_error(&e),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            failure::report(&failure::Failure::Io {
                what: "start the async runtime".to_string(),
                source: e,
            });
            return Exit::Store.into();
        }
    };
    let result = runtime.block_on(commands::run(cli));
    // Leave behind, rather than wait for, a store call still running after
    // a timeout.
    runtime.shutdown_timeout(Duration::from_millis(500));
    let _ = std::io::stdout().flush();
    match result {
        Ok(exit) => exit.into(),
        Err(failure) => {
            failure::report(&failure);
            failure.exit().into()
        }
    }
}
