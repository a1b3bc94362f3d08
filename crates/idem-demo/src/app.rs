//! The payments service: `POST /payments`, `GET /payments`, `GET /health`.
//!
//! # Requests
//!
//! `POST /payments` with `Authorization: Bearer <tenant>` (the tenant is the
//! idempotency scope), an `Idempotency-Key` header (required) and a JSON
//! body:
//!
//! | field | | |
//! |---|---|---|
//! | `amount` | positive integer, at most [`MAX_AMOUNT`] | required |
//! | `currency` | three capital letters | required |
//! | `customer` | 1 to 255 characters, no control characters | required |
//! | `delay_ms` | at most [`MAX_DELAY`] in ms: a slow card network | optional |
//! | `fail` | `"transient"`: the first attempt per (tenant, key) answers 503 and charges nothing; the retry succeeds | optional |
//!
//! Answers: 201 with the [`Payment`]; a retry replays it (with
//! `Idempotent-Replayed: true`); 400 for a body that is not a JSON object,
//! 422 for one that is not a valid payment, 401 without a bearer token, and
//! the idempotency layer's 400/409/422/503 (see `idem-tower`). Every error
//! body is `application/problem+json`.
//!
//! `GET /payments` lists the tenant's payments, oldest first, so anyone can
//! count the charges.
//!
//! `POST /orders` (same authentication, its own idempotency scope
//! [`ORDER_OPERATION`]) is a multi-step operation written with idem's
//! phases: reserve stock, charge at the card network, record the receipt;
//! see the `orders` module below and [`OrderCompleter`]. `GET /orders` lists
//! the tenant's reservations with their receipts, `GET /stock` every sku's
//! stock.
//!
//! # The external effect (`--effect-log`)
//!
//! With an [`EffectLog`] (`idem-demo --effect-log PATH`, or
//! `IDEM_DEMO_EFFECT_LOG`), each charge first makes its "card network call":
//! it appends the line `<tenant> <key> <payment id>` to that file (opened
//! with `O_APPEND`, `fdatasync`ed before going on), and only then writes the
//! ledger and completes the idempotency record. The call lives outside the
//! store's transaction, so a crash cannot roll it back: a crash after the
//! call and before the commit leaves a line without a charge, and the retry
//! (once the lease lapses) calls again. That is the at-least-once window of
//! any external call, on every store; the crash test counts the lines per
//! logical payment to measure it. A call that fails answers 502 without
//! [`NoEffect`](idem_tower::NoEffect) (whether the network took it is not
//! known), so the key ends as `outcome-unknown`.
//!
//! # Layout
//!
//! The router, authentication and the shared responses are here; the
//! [`Payment`], the [`Ledger`] trait and the [`CrashPlan`] in `app/ledger.rs`;
//! the [`EffectLog`] in `app/effect.rs`; the `POST /payments` handler and its
//! body validation in `app/payments.rs`; the orders' flow, handler and
//! completer in `app/orders.rs`, their ledger trait in
//! `app/order_ledger.rs`, the card network client in `app/card.rs`. Every
//! public item is re-exported here, at its `app::` path.

mod card;
mod effect;
mod ledger;
mod order_ledger;
mod orders;
mod payments;

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use idem_core::store::Store;
use idem_core::{Engine, Scope};
use idem_tower::{IdempotencyLayer, PROBLEM_JSON, scope_from_extension};

pub use card::{CardError, CardNetworkClient};
pub use effect::EffectLog;
pub use ledger::{CrashPlan, Ledger, LedgerError, OrderCrashPoint, Payment};
pub use order_ledger::{NewReservation, OrderLedger, OrderRow, Receipt, Reservation, Stock};
pub use orders::{
    CHARGE, MAX_QUANTITY, MAX_SKU_LEN, ORDER_OPERATION, Order, OrderCompleter, RECEIPT, RESERVE,
    order_scope,
};
use orders::{OrderFlow, create_order, list_orders, list_stock, order_completer};
use payments::create_payment;

/// The operation name in every payment's idempotency scope.
pub const OPERATION: &str = "payments.create";

/// The longest `delay_ms` accepted.
pub const MAX_DELAY: Duration = Duration::from_secs(30);

/// The largest `amount` accepted.
pub const MAX_AMOUNT: u64 = 1_000_000_000_000;

/// The longest `customer` accepted, in characters.
pub const MAX_CUSTOMER_LEN: usize = 255;

/// The longest bearer token (tenant) accepted, in bytes.
pub const MAX_TENANT_LEN: usize = 200;

/// The largest request body, in bytes (413 beyond).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The idempotency scope of a tenant's payments: the same key from two
/// tenants is two payments.
pub fn scope_for(tenant: &str) -> Scope {
    Scope::tenant(tenant).with_operation(OPERATION)
}

/// The authenticated tenant (the bearer token).
#[derive(Clone, Debug)]
struct Tenant(String);

#[derive(Clone)]
struct AppState {
    ledger: Arc<dyn Ledger>,
    /// (tenant, key) pairs whose `"fail": "transient"` attempt already failed.
    failed_once: Arc<Mutex<HashSet<(String, String)>>>,
    crash: CrashPlan,
    /// The external effect of a charge, if any.
    effects: Option<EffectLog>,
    backend: &'static str,
    /// The orders' phase code and ledger.
    orders: OrderFlow,
}

impl AppState {
    /// Whether this is the first `"fail": "transient"` attempt of (tenant,
    /// key) since the server started (bounded memory: forgotten after 100k).
    fn first_failure(&self, tenant: &str, key: &str) -> bool {
        let mut seen = self
            .failed_once
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if seen.len() >= 100_000 {
            seen.clear();
        }
        seen.insert((tenant.to_string(), key.to_string()))
    }
}

/// What the service is made of besides the idempotency engine.
#[derive(Clone)]
pub struct AppParts {
    /// The payments ledger.
    pub ledger: Arc<dyn Ledger>,
    /// The orders' ledger.
    pub orders: Arc<dyn OrderLedger>,
    /// The card network orders are charged at (`None`: `POST /orders`
    /// answers 503).
    pub card_network: Option<CardNetworkClient>,
    /// Test-only fault injection.
    pub crash: CrashPlan,
    /// The payments' external effect, if any.
    pub effects: Option<EffectLog>,
    /// `sqlite`, `postgres`, `redis` or `memory` (for `/health`).
    pub backend: &'static str,
    /// Whether to build the [`OrderCompleter`].
    pub completer: bool,
}

/// The service, and the completer of its orders if asked for.
#[derive(Debug)]
#[non_exhaustive]
pub struct App {
    /// The routes.
    pub router: Router,
    /// The completer of abandoned orders (run it beside the router).
    pub completer: Option<OrderCompleter>,
}

/// The service over `engine` (the idempotency store) and `parts`.
///
/// # Behavior
/// - `GET /health`: 200 `{"status":"ok","store":backend}`, no authentication.
/// - `POST /payments`, `GET /payments`, `POST /orders`, `GET /orders`,
///   `GET /stock`: see the [module docs](self).
/// - Every request runs in a task of its own: a client that disconnects
///   (timeout) does not cancel its charge, so its retry gets 409 while the
///   charge runs, then the replay.
/// - With `effects`, each charge appends its line to the [`EffectLog`]
///   before the ledger write (the external call outside the transaction).
/// - With `completer`, [`App::completer`] resumes abandoned orders with the
///   same phase code, answering what the handler would have.
pub fn build<S: Store>(engine: Arc<Engine<S>>, parts: AppParts) -> App {
    let idempotency = IdempotencyLayer::builder(
        engine.clone(),
        scope_from_extension(|t: &Tenant| scope_for(&t.0)),
    )
    .required(true)
    .max_body_bytes(MAX_BODY_BYTES)
    .build();
    let order_idempotency = IdempotencyLayer::builder(
        engine.clone(),
        scope_from_extension(|t: &Tenant| order_scope(&t.0)),
    )
    .required(true)
    .max_body_bytes(MAX_BODY_BYTES)
    .build();
    let flow = OrderFlow {
        ledger: parts.orders,
        card: parts.card_network,
        crash: parts.crash,
    };
    let completer = parts
        .completer
        .then(|| order_completer(&engine, order_idempotency.clone(), flow.clone()));
    let state = AppState {
        ledger: parts.ledger,
        failed_once: Arc::default(),
        crash: parts.crash,
        effects: parts.effects,
        backend: parts.backend,
        orders: flow,
    };
    let payments = Router::new()
        .route("/payments", get(list_payments).post(create_payment))
        .layer(idempotency)
        .layer(middleware::from_fn(authenticate));
    let orders = Router::new()
        .route("/orders", get(list_orders).post(create_order))
        .route("/stock", get(list_stock))
        .layer(order_idempotency)
        .layer(middleware::from_fn(authenticate));
    let router = Router::new()
        .route("/health", get(health))
        .merge(payments)
        .merge(orders)
        .layer(middleware::from_fn(detach))
        .with_state(state);
    App { router, completer }
}

/// An RFC 9457 problem response of the demo.
pub(crate) fn problem(status: StatusCode, kind: &str, detail: &str) -> Response {
    let body = serde_json::json!({
        "type": format!("https://idem.dev/problems/demo/{kind}"),
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail,
    });
    (
        status,
        [(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON))],
        body.to_string(),
    )
        .into_response()
}

/// Runs the rest of the stack in a task of its own, so that a dropped
/// connection does not cancel a charge half-way.
async fn detach(request: Request, next: Next) -> Response {
    match tokio::spawn(next.run(request)).await {
        Ok(response) => response,
        Err(e) => {
            tracing::error!(error = %e, "request task failed");
            problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the request failed",
            )
        }
    }
}

/// `Authorization: Bearer <tenant>` → the [`Tenant`] extension, or 401.
async fn authenticate(mut request: Request, next: Next) -> Response {
    match bearer(request.headers()) {
        Some(tenant) => {
            request.extensions_mut().insert(Tenant(tenant));
            next.run(request).await
        }
        None => {
            let mut response = problem(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "send `Authorization: Bearer <tenant>`: the tenant is the scope of your idempotency keys",
            );
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            response
        }
    }
}

/// The bearer token: non-empty, at most [`MAX_TENANT_LEN`] visible ASCII bytes.
fn bearer(headers: &HeaderMap) -> Option<String> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    let value = value.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    let valid = scheme.eq_ignore_ascii_case("bearer")
        && !token.is_empty()
        && token.len() <= MAX_TENANT_LEN
        && token.bytes().all(|b| b.is_ascii_graphic());
    valid.then(|| token.to_string())
}

async fn health(State(state): State<AppState>) -> Response {
    Json(serde_json::json!({"status": "ok", "store": state.backend})).into_response()
}

async fn list_payments(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
) -> Response {
    match state.ledger.list(&tenant.0).await {
        Ok(payments) => Json(payments).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "listing payments failed");
            unavailable("the ledger is unavailable; retry")
        }
    }
}

/// Marks a response of a request that charged nothing: the idempotency
/// layer then releases the key and a retry runs afresh (without the mark, a
/// 5xx is ambiguous and the key ends as `outcome-unknown`).
fn no_effect(mut response: Response) -> Response {
    response.extensions_mut().insert(idem_tower::NoEffect);
    response
}

fn unavailable(detail: &str) -> Response {
    let mut response = problem(StatusCode::SERVICE_UNAVAILABLE, "unavailable", detail);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}
#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn bearer_tokens() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer acme"),
        );
        assert_eq!(bearer(&h).as_deref(), Some("acme"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer  acme "),
        );
        assert_eq!(bearer(&h).as_deref(), Some("acme"));
        for bad in ["Bearer ", "Basic abc", "Bearer", "Bearer a b"] {
            h.insert(header::AUTHORIZATION, HeaderValue::from_static(bad));
            assert_eq!(bearer(&h), None, "{bad}");
        }
    }
}
