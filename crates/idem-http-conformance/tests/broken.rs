//! The suite can fail: adapters that break the contract in one way each
//! fail the cases that check that part of it. (If a change to the suite
//! made one of these pass, the suite would have stopped checking it.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[allow(dead_code, unreachable_pub)]
#[path = "tower.rs"]
mod tower;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::middleware::{Next, from_fn, map_request};
use axum::response::Response;
use bytes::Bytes;
use http::request::Parts;
use idem_http::{
    Admission, Builder, Contract, Exit, Finished, Integration, PassBody, ReadBody, ReadError, Reply,
};
use idem_http_conformance::{Adapter, BoxFuture, Server, Setup, TestClock, TestStore, case};
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

/// An adapter written by hand over `idem_http`'s contract (an axum
/// middleware function), as the crate docs of `idem_http` describe one,
/// with only what the lease cases need (no panics, `NoEffect`, streaming
/// nor running to completion when the client goes away), and one rule that
/// can be left out at a time.
#[derive(Clone, Copy)]
struct HandMade {
    name: &'static str,
    /// Runs the handler under `Claimed::run`, with the heartbeat beside
    /// it; else awaits it bare.
    heartbeat: bool,
    /// Sends the reply of `Finished::Superseded` (409) instead of the
    /// handler's response; else sends the handler's response anyway.
    fenced: bool,
}

/// Both rules kept: passes the lease cases.
const HAND_MADE: HandMade = HandMade {
    name: "hand-made",
    heartbeat: true,
    fenced: true,
};

/// Runs the handler without the heartbeat (the claim without
/// `Claimed::run`).
const NO_HEARTBEAT: HandMade = HandMade {
    name: "no-heartbeat",
    heartbeat: false,
    ..HAND_MADE
};

/// Sends a superseded handler's own response.
const UNFENCED: HandMade = HandMade {
    name: "unfenced",
    fenced: false,
    ..HAND_MADE
};

/// The contract alone, for a middleware written by hand.
struct ContractOnly;

impl Integration<TestStore, TestClock> for ContractOnly {
    type Scope = ();
    type Built = Contract<TestStore, TestClock>;
    fn build(contract: Contract<TestStore, TestClock>, (): ()) -> Self::Built {
        contract
    }
}

/// An axum request body, read whole up to the contract's limit.
struct Whole(Body);

impl ReadBody for Whole {
    type Read = BoxFuture<'static, Result<Bytes, ReadError>>;
    fn read(self, limit: usize) -> Self::Read {
        Box::pin(async move {
            axum::body::to_bytes(self.0, limit)
                .await
                .map_err(|_| ReadError::TooLarge)
        })
    }
}

fn send(reply: Reply) -> Response {
    reply.into_response().0.map(Body::from)
}

impl Adapter for HandMade {
    fn name(&self) -> &'static str {
        self.name
    }
    fn serve(&self, setup: Setup) -> BoxFuture<'static, Server> {
        let this = *self;
        Box::pin(async move {
            let builder = Builder::<_, _, ContractOnly>::new(setup.engine.clone(), ());
            let contract = Arc::new(setup.configure(builder).build());
            let app = setup.app.clone();
            let middleware = from_fn(move |request: Request, next: Next| {
                let (contract, setup) = (contract.clone(), setup.clone());
                async move { this.handle(&contract, &setup, request, next).await }
            });
            tower::serve(tower::app_router(app).layer(middleware)).await
        })
    }
}

impl HandMade {
    async fn handle(
        self,
        contract: &Arc<Contract<TestStore, TestClock>>,
        setup: &Setup,
        request: Request,
        next: Next,
    ) -> Response {
        let (mut parts, body) = request.into_parts();
        if !contract.covers_request(&parts) {
            return next.run(Request::from_parts(parts, body)).await;
        }
        let target = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let scope = || setup.scope_of(&parts.headers);
        let (claimed, bytes) = match contract.admit(&parts, &target, scope, Whole(body)).await {
            Admission::Answer(answer) => return send(answer),
            Admission::Pass(PassBody::Unread(Whole(body))) => {
                return next.run(Request::from_parts(parts, body)).await;
            }
            Admission::Pass(PassBody::Read(bytes)) | Admission::FailOpen(bytes) => {
                return next
                    .run(Request::from_parts(parts, Body::from(bytes)))
                    .await;
            }
            Admission::Proceed(claimed, bytes) => (claimed, bytes),
        };
        parts.extensions.insert(claimed.claim());
        let handler = next.run(Request::from_parts(parts, Body::from(bytes)));
        let response = if self.heartbeat {
            claimed.run(handler).await
        } else {
            handler.await
        };
        let (head, body) = response.into_parts();
        let data = axum::body::to_bytes(body, claimed.outcome_limit())
            .await
            .expect("the app's bodies are small and whole");
        let exit = Exit::Response {
            parts: &head,
            body: &data,
            trailers: None,
        };
        match claimed.finish(exit).await {
            Finished::Superseded(answer) if self.fenced => send(answer),
            _ => Response::from_parts(head, Body::from(data)),
        }
    }
}

#[test]
fn a_hand_made_adapter_that_keeps_both_rules_passes_the_lease_cases() {
    for name in [
        "heartbeat_keeps_the_key_held",
        "lease_taken_over_keeps_one_answer",
        "fresh_then_replay",
    ] {
        let case = case(name).unwrap();
        if let Err(failed) = case.run(&HAND_MADE) {
            panic!(
                "hand-made::{name}: {}",
                failed.message().unwrap_or_default()
            );
        }
    }
}

#[test]
fn an_adapter_without_the_heartbeat_fails_the_heartbeat_case() {
    let why = fails("heartbeat_keeps_the_key_held", &NO_HEARTBEAT);
    assert!(why.contains("heartbeat 1"), "{why}");
}

#[test]
fn an_adapter_that_sends_a_superseded_response_fails_the_takeover_case() {
    let why = fails("lease_taken_over_keeps_one_answer", &UNFENCED);
    assert!(why.contains("must answer 409"), "{why}");
}
