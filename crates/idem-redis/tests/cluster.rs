//! The conformance suite and the Redis-specific cases against a Redis Cluster
//! (`IDEM_REDIS_CLUSTER_URLS`, comma-separated node URLs; `cargo xtask test`
//! starts a throwaway 3-master cluster and sets it). Unset: every case is
//! reported IGNORED with a banner, or FAILS under `CI=true` /
//! `IDEM_REQUIRE_BACKENDS=1`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use idem_conformance::{Requires, Suite};
use support::{Factory, Target, cases};

fn main() -> std::process::ExitCode {
    let target = Target::cluster_from_env();
    let factory = Factory::new(target.clone());
    let run_prefix = factory.run_prefix().to_string();
    let suite = Suite::new(factory)
        .case(
            "cluster::keys_spread_over_all_masters",
            Requires::Always,
            cases::keys_spread_over_all_masters,
        )
        .case(
            "cluster::script_flush_mid_run",
            Requires::Always,
            cases::script_flush_mid_run,
        )
        .case(
            "cluster::client_kill_reconnects",
            Requires::Always,
            cases::client_kill_reconnects,
        )
        .case(
            "cluster::corrupt_values_are_reported_and_kept",
            Requires::Always,
            cases::corrupt_values_are_reported_and_kept,
        )
        .case(
            "cluster::physical_expiry_follows_logical_expiry",
            Requires::Always,
            cases::physical_expiry_follows_logical_expiry,
        )
        .case(
            "cluster::layout_and_memory_per_record",
            Requires::Always,
            cases::layout_and_memory_per_record,
        )
        .case(
            "cluster::resent_write_is_recognised",
            Requires::Always,
            cases::resent_write_is_recognised,
        )
        .case(
            "cluster::hash_tag_prefix_is_rejected",
            Requires::Always,
            cases::hash_tag_prefix_is_rejected,
        );
    support::run_and_clean_up(suite, target, run_prefix)
}
