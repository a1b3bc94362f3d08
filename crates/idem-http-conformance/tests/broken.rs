//! The suite can fail: adapters that break the contract in one way each
//! fail the cases that check that part of it. (If a change to the suite
//! made one of these pass, the suite would have stopped checking it.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[allow(dead_code, unreachable_pub)]
#[path = "tower.rs"]
mod tower;

use axum::extract::Request;
use axum::middleware::map_request;
use http::request::Parts;
use idem_http_conformance::{Adapter, BoxFuture, Server, Setup, case};
use idem_tower::{IdempotencyClaim, IdempotencyLayer};

/// Runs the case `name` against `adapter` and returns its failure message.
fn fails(name: &str, adapter: &dyn Adapter) -> String {
    let case = case(name).unwrap_or_else(|| panic!("no case {name}"));
    match case.run(adapter) {
        Ok(()) => panic!("{}::{name} passed against a broken adapter", adapter.name()),
        Err(failed) => {
            let why = failed.message().unwrap_or_default().to_owned();
            eprintln!("{}::{name} fails, as it must: {why}", adapter.name());
            why
        }
    }
}

/// idem-tower configured to fail open: runs handlers while the store is down.
struct FailOpen;

impl Adapter for FailOpen {
    fn name(&self) -> &'static str {
        "fail-open"
    }
    fn serve(&self, mut setup: Setup) -> BoxFuture<'static, Server> {
        setup.options.fail_open = true;
        tower::Tower.serve(setup)
    }
}

/// The app without any idempotency middleware.
struct Bare;

impl Adapter for Bare {
    fn name(&self) -> &'static str {
        "bare"
    }
    fn serve(&self, setup: Setup) -> BoxFuture<'static, Server> {
        Box::pin(tower::serve(tower::app_router(setup.app)))
    }
}

/// idem-tower built with its defaults: ignores the case's options.
struct IgnoresOptions;

impl Adapter for IgnoresOptions {
    fn name(&self) -> &'static str {
        "ignores-options"
    }
    fn serve(&self, setup: Setup) -> BoxFuture<'static, Server> {
        Box::pin(async move {
            let scope = setup.clone();
            let layer = IdempotencyLayer::new(setup.engine.clone(), move |parts: &Parts| {
                scope.scope_of(&parts.headers)
            });
            tower::serve(tower::app_router(setup.app).layer(layer)).await
        })
    }
}

/// idem-tower, but the handler never gets the claim.
struct NoClaim;

impl Adapter for NoClaim {
    fn name(&self) -> &'static str {
        "no-claim"
    }
    fn serve(&self, setup: Setup) -> BoxFuture<'static, Server> {
        Box::pin(async move {
            let scope = setup.clone();
            let builder = IdempotencyLayer::builder(setup.engine.clone(), move |parts: &Parts| {
                scope.scope_of(&parts.headers)
            });
            let layer = setup.configure(builder).build();
            let strip = map_request(|mut request: Request| async move {
                request.extensions_mut().remove::<IdempotencyClaim>();
                request
            });
            tower::serve(tower::app_router(setup.app).layer(strip).layer(layer)).await
        })
    }
}

#[test]
fn fail_open_fails_the_outage_case() {
    let why = fails("store_outage_fails_closed", &FailOpen);
    assert!(
        why.contains("503") || why.contains("store-unavailable"),
        "{why}"
    );
}

#[test]
fn no_middleware_fails_replay_outage_and_key_cases() {
    for name in [
        "fresh_then_replay",
        "store_outage_fails_closed",
        "key_sent_twice_is_invalid",
        "required_key_is_missing",
        "key_reused_after_finish",
        "server_error_is_outcome_unknown",
    ] {
        fails(name, &Bare);
    }
}

#[test]
fn ignoring_the_options_fails_the_hook_cases() {
    for name in [
        "replay_hook",
        "key_from_json_field",
        "canonical_json_fingerprint",
        "canonical_json_without_field",
        "fingerprint_header",
        "body_too_large_declared",
        "required_key_is_missing",
    ] {
        fails(name, &IgnoresOptions);
    }
}

#[test]
fn a_handler_without_the_claim_fails_the_claim_cases() {
    for name in [
        "claim_in_handler",
        "declared_no_effect_releases_the_key",
        "complete_in_handler_transaction",
    ] {
        fails(name, &NoClaim);
    }
}

/// idem-tower with `release_on_cancel(true)`: a dropped request stops its
/// handler and releases the key.
struct ReleaseOnCancel;

impl Adapter for ReleaseOnCancel {
    fn name(&self) -> &'static str {
        "release-on-cancel"
    }
    fn serve(&self, mut setup: Setup) -> BoxFuture<'static, Server> {
        setup.options.release_on_cancel = true;
        tower::Tower.serve(setup)
    }
}

#[test]
fn releasing_on_cancel_fails_the_disconnect_case() {
    fails("client_disconnect_runs_to_completion", &ReleaseOnCancel);
}

/// An adapter whose server never starts.
struct Hangs;

impl Adapter for Hangs {
    fn name(&self) -> &'static str {
        "hangs"
    }
    fn serve(&self, _: Setup) -> BoxFuture<'static, Server> {
        Box::pin(futures_util::future::pending())
    }
}

#[test]
fn a_hang_fails_the_case_instead_of_blocking() {
    let case = case("fresh_then_replay").unwrap();
    let failed = case
        .run_within(&Hangs, std::time::Duration::from_millis(200))
        .unwrap_err();
    let why = failed.message().unwrap_or_default();
    assert!(why.contains("did not finish"), "{why}");
}
