//! The conformance suite and the Redis-specific cases against one Redis
//! server (`IDEM_REDIS_URL`, default `redis://127.0.0.1:6379`).
//!
//! Every store gets its own key prefix (idem-testkit), whose keys are
//! deleted after its case (never FLUSHDB).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use idem_testkit::BackendKind;
use support::cases::*;

fn main() -> std::process::ExitCode {
    idem_testkit::cases!(support::suite(BackendKind::Redis);
        "redis::script_flush_mid_run" => script_flush_mid_run,
        "redis::client_kill_reconnects" => client_kill_reconnects,
        "redis::server_gone_then_back" => server_gone_then_back,
        "redis::silent_connection_times_out_then_recovers" =>
            silent_connection_times_out_then_recovers,
        "redis::corrupt_values_are_reported_and_kept" => corrupt_values_are_reported_and_kept,
        "redis::physical_expiry_follows_logical_expiry" => physical_expiry_follows_logical_expiry,
        "redis::layout_and_memory_per_record" => layout_and_memory_per_record,
        "redis::resent_write_is_recognised" => resent_write_is_recognised,
        "redis::hash_tag_prefix_is_rejected" => hash_tag_prefix_is_rejected,
        "redis::write_paths_follow_the_server" => write_paths_follow_the_server,
        "redis::values_with_a_write_id_are_still_swapped" =>
            values_with_a_write_id_are_still_swapped,
        "redis::census_counts_every_master_and_only_its_records" =>
            census_counts_every_master_and_only_its_records,
        "redis::records_of_the_first_format_still_work" => records_of_the_first_format_still_work,
        "redis::abandoned_finds_exactly_the_lapsed_checkpoints" =>
            abandoned_finds_exactly_the_lapsed_checkpoints,
        "redis::abandoned_search_cost" => abandoned_search_cost,
    )
    .run()
}
