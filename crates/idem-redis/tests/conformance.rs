//! The conformance suite and the Redis-specific cases against one Redis
//! server (`IDEM_REDIS_URL`, default `redis://127.0.0.1:6379`).
//!
//! Every store gets its own key prefix (`idem-test:<pid>:<run>:<n>:`); the
//! run's keys are deleted at the end (never FLUSHDB).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use idem_conformance::{Requires, Suite};
use support::{Factory, Target, cases};

fn main() -> std::process::ExitCode {
    let target = Target::standalone_from_env();
    let factory = Factory::new(target.clone());
    let run_prefix = factory.run_prefix().to_string();
    let suite = Suite::new(factory)
        .case(
            "redis::script_flush_mid_run",
            Requires::Always,
            cases::script_flush_mid_run,
        )
        .case(
            "redis::client_kill_reconnects",
            Requires::Always,
            cases::client_kill_reconnects,
        )
        .case(
            "redis::server_gone_then_back",
            Requires::Always,
            cases::server_gone_then_back,
        )
        .case(
            "redis::silent_connection_times_out_then_recovers",
            Requires::Always,
            cases::silent_connection_times_out_then_recovers,
        )
        .case(
            "redis::corrupt_values_are_reported_and_kept",
            Requires::Always,
            cases::corrupt_values_are_reported_and_kept,
        )
        .case(
            "redis::physical_expiry_follows_logical_expiry",
            Requires::Always,
            cases::physical_expiry_follows_logical_expiry,
        )
        .case(
            "redis::layout_and_memory_per_record",
            Requires::Always,
            cases::layout_and_memory_per_record,
        )
        .case(
            "redis::resent_write_is_recognised",
            Requires::Always,
            cases::resent_write_is_recognised,
        )
        .case(
            "redis::hash_tag_prefix_is_rejected",
            Requires::Always,
            cases::hash_tag_prefix_is_rejected,
        );
    support::run_and_clean_up(suite, target, run_prefix)
}
