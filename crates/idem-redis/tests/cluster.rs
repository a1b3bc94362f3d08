//! The conformance suite and the Redis-specific cases against a Redis Cluster
//! (`IDEM_REDIS_CLUSTER_URLS`, comma-separated node URLs; `cargo xtask test`
//! starts a throwaway 3-master cluster and sets it). Unset: every case is
//! reported IGNORED with a banner, or FAILS under `CI=true` /
//! `IDEM_REQUIRE_BACKENDS=1`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use idem_testkit::BackendKind;
use support::cases::*;

fn main() -> std::process::ExitCode {
    idem_testkit::cases!(support::suite(BackendKind::RedisCluster);
        "cluster::keys_spread_over_all_masters" => keys_spread_over_all_masters,
        "cluster::script_flush_mid_run" => script_flush_mid_run,
        "cluster::client_kill_reconnects" => client_kill_reconnects,
        "cluster::corrupt_values_are_reported_and_kept" => corrupt_values_are_reported_and_kept,
        "cluster::physical_expiry_follows_logical_expiry" => physical_expiry_follows_logical_expiry,
        "cluster::layout_and_memory_per_record" => layout_and_memory_per_record,
        "cluster::resent_write_is_recognised" => resent_write_is_recognised,
        "cluster::hash_tag_prefix_is_rejected" => hash_tag_prefix_is_rejected,
        "cluster::write_paths_follow_the_server" => write_paths_follow_the_server,
        "cluster::values_with_a_write_id_are_still_swapped" =>
            values_with_a_write_id_are_still_swapped,
        "cluster::census_counts_every_master_and_only_its_records" =>
            census_counts_every_master_and_only_its_records,
        "cluster::records_of_the_first_format_still_work" => records_of_the_first_format_still_work,
        "cluster::abandoned_finds_exactly_the_lapsed_checkpoints" =>
            abandoned_finds_exactly_the_lapsed_checkpoints,
        "cluster::abandoned_search_cost" => abandoned_search_cost,
    )
    .run()
}
