//! The cases, each a documented function that runs against any
//! [`Adapter`](crate::Adapter) and returns `Err` with the first broken
//! promise.
//!
//! | group | what |
//! |---|---|
//! | [`keys`] | the header grammar, pass-through, scope, body limit |
//! | [`flight`] | concurrent duplicates, reuse with another request, disconnects |
//! | [`exits`] | every way a claimed request ends, store outage, shutdown, the claim |
//! | [`lease`] | the heartbeat keeps a running handler's key; a handler whose lease was taken over leaves no answer |
//! | [`hooks`] | key from the body, canonical fingerprints, replay hook, fingerprinted headers |
//!
//! Every case counts the application's effects ([`App::effects`](crate::App::effects)):
//! the promise is that no effect runs twice for one key and that no client
//! gets an answer that belongs to another request.

pub mod exits;
pub mod flight;
pub mod hooks;
pub mod keys;
pub mod lease;

pub use exits::*;
pub use flight::*;
pub use hooks::*;
pub use keys::*;
pub use lease::*;

use crate::Case;

macro_rules! table {
    ($($module:ident :: $name:ident),* $(,)?) => {
        /// Every case, in order.
        pub(crate) static ALL: &[Case] = &[
            $(Case::new(stringify!($name), |adapter| Box::pin($module::$name(adapter)))),*
        ];
    };
}

table![
    keys::fresh_then_replay,
    keys::replay_is_exact,
    keys::quoted_and_bare_key_are_one_key,
    keys::key_sent_twice_is_invalid,
    keys::invalid_keys_are_refused,
    keys::no_key_passes_through,
    keys::required_key_is_missing,
    keys::uncovered_method_passes_through,
    keys::scope_rejection,
    keys::same_key_two_tenants,
    keys::body_too_large_declared,
    keys::body_too_large_chunked,
    flight::concurrent_duplicates,
    flight::duplicate_waits_for_the_original,
    flight::key_reused_after_finish,
    flight::key_reused_in_flight,
    flight::client_disconnect_runs_to_completion,
    exits::server_error_is_outcome_unknown,
    exits::no_effect_releases_the_key,
    exits::declared_no_effect_releases_the_key,
    exits::panic_is_outcome_unknown,
    exits::client_error_is_stored,
    exits::response_too_large_is_not_stored,
    exits::store_outage_fails_closed,
    exits::completion_store_failure_still_answers,
    exits::corrupt_record_is_500,
    exits::shutdown_refuses_new_and_finishes_running,
    exits::claim_in_handler,
    exits::complete_in_handler_transaction,
    lease::heartbeat_keeps_the_key_held,
    lease::lease_taken_over_keeps_one_answer,
    hooks::key_from_json_field,
    hooks::canonical_json_fingerprint,
    hooks::canonical_json_without_field,
    hooks::replay_hook,
    hooks::fingerprint_header,
];
