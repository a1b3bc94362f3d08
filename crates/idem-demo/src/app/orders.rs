//! `POST /orders`: a multi-step operation written with idem's phases
//! (reserve stock → charge at the card network → record the receipt), and
//! the completer that finishes orders abandoned mid-way.
//!
//! # The flow
//!
//! | phase | kind | SQLite, PostgreSQL | Redis, memory (ledger in its own SQLite file) |
//! |---|---|---|---|
//! | `reserve` | local | reservation row + stock decrement commit **with the phase's checkpoint** (`Phases::prepare_local` + `apply_in` + `Phases::applied`) | the write is idempotent by the phase's downstream key (unique, inserted if absent, stock decremented only when inserted), then recorded with `Phases::external` |
//! | `charge` | external | `POST /charges` at the card network with `Idempotency-Key: <downstream key>`, 5xx and connection errors retried with the same key | same |
//! | `receipt` | local | receipt row commits **with the key's completion** (`prepare_response` + `apply_in` + `mark_applied`) | receipt inserted if absent (by order), then the response is returned for the layer to store |
//!
//! The `reserve` phase's recorded [`Reservation`] holds everything the later
//! phases need, so an order resumes without its request body; the order and
//! receipt ids are derived from the key, so every attempt answers the same
//! body. An attempt that fails after a phase was recorded leaves the key as
//! a retryable failure with its checkpoint (idem's rule for keys with
//! phases): the client's retry resumes after the recorded phases. A holder
//! that dies leaves the key in flight with its checkpoint: once its lease
//! lapses, a retry or the completer ([`order_completer`]) resumes it.
//!
//! Every error answer of the flow is marked [`NoEffect`](idem_tower::NoEffect):
//! each phase is idempotent by its key, so running the flow again is always
//! safe; a key that has a checkpoint keeps it (the release becomes a
//! retryable failure).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use axum::Extension;
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use idem_core::store::Store;
use idem_core::{
    Clock, Completer, CompleterTotals, Ending, Engine, Error as IdemError, Pass, PhaseError,
    Phases, RecordKey, Scope,
};
use idem_tower::{IdempotencyClaim, IdempotencyLayer};
use serde::{Deserialize, Serialize};

use super::card::{CardError, CardNetworkClient};
use super::order_ledger::{NewReservation, OrderLedger, Receipt, Reservation};
use super::{
    AppState, CrashPlan, LedgerError, MAX_AMOUNT, OrderCrashPoint, Tenant, no_effect, problem,
    unavailable,
};

/// The operation name in every order's idempotency scope (what the
/// completer resumes).
pub const ORDER_OPERATION: &str = "orders.create";

/// The `reserve` phase.
pub const RESERVE: &str = "reserve";
/// The `charge` phase.
pub const CHARGE: &str = "charge";
/// The `receipt` phase.
pub const RECEIPT: &str = "receipt";

/// The longest `sku` accepted.
pub const MAX_SKU_LEN: usize = 64;

/// The largest `quantity` accepted.
pub const MAX_QUANTITY: u32 = 1000;

/// Attempts of a charge within one request (5xx and connection errors of
/// the card network are retried with the same key).
const REQUEST_CHARGE_ATTEMPTS: u32 = 4;

/// Attempts of a charge within one resume of the completer.
const COMPLETER_CHARGE_ATTEMPTS: u32 = 8;

/// The idempotency scope of a tenant's orders.
pub fn order_scope(tenant: &str) -> Scope {
    Scope::tenant(tenant).with_operation(ORDER_OPERATION)
}

/// An order, as answered by `POST /orders` (201) and replayed to retries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// `ord_` and 24 hex digits.
    pub order_id: String,
    /// The sku reserved.
    pub sku: String,
    /// How many.
    pub quantity: u32,
    /// The card network's charge.
    pub charge_id: String,
    /// `rcpt_` and 24 hex digits.
    pub receipt_id: String,
}

/// The request body of `POST /orders`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewOrder {
    sku: String,
    quantity: u32,
    amount_cents: u64,
}

/// The result of the `charge` phase, as recorded in the checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Charge {
    charge_id: String,
}

/// Parses and validates the body: 400 if it is not a JSON object, 422 if it
/// is not a valid order.
#[allow(clippy::result_large_err)]
fn parse_order(body: &[u8]) -> Result<NewOrder, Response> {
    let invalid = |detail: &str| problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid-order", detail);
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
        problem(
            StatusCode::BAD_REQUEST,
            "malformed-body",
            &format!("the body is not JSON: {e}"),
        )
    })?;
    if !value.is_object() {
        return Err(problem(
            StatusCode::BAD_REQUEST,
            "malformed-body",
            "the body must be a JSON object",
        ));
    }
    let order: NewOrder =
        serde_json::from_value(value).map_err(|e| invalid(&format!("not an order: {e}")))?;
    let sku_ok = !order.sku.is_empty()
        && order.sku.len() <= MAX_SKU_LEN
        && order
            .sku
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !sku_ok {
        return Err(invalid(&format!(
            "`sku` must be 1 to {MAX_SKU_LEN} letters, digits, `-`, `_` or `.`"
        )));
    }
    if order.quantity == 0 || order.quantity > MAX_QUANTITY {
        return Err(invalid(&format!(
            "`quantity` must be a positive integer up to {MAX_QUANTITY}"
        )));
    }
    if order.amount_cents == 0 || order.amount_cents > MAX_AMOUNT {
        return Err(invalid(&format!(
            "`amount_cents` must be a positive integer up to {MAX_AMOUNT}"
        )));
    }
    Ok(order)
}

/// `prefix` and the first 24 hex digits of a downstream key (`idem-` and 32
/// hex digits): an id every attempt of one order derives the same.
fn derived_id(prefix: &str, downstream_key: &str) -> String {
    let hex = downstream_key
        .strip_prefix("idem-")
        .unwrap_or(downstream_key);
    format!("{prefix}{}", &hex[..hex.len().min(24)])
}

/// Whose order: the tenant and the client's key.
struct Who {
    tenant: String,
    key: String,
}

impl Who {
    fn of(key: &RecordKey) -> Self {
        Self {
            tenant: key.scope().tenant_id().to_string(),
            key: key.key().as_str().to_string(),
        }
    }
}

/// Why an order's flow stopped.
#[derive(Debug, thiserror::Error)]
enum FlowError {
    #[error("not enough stock of {0}")]
    OutOfStock(String),
    #[error("the key's reservation is for another order")]
    Mismatch,
    #[error("no card network is configured")]
    NoCardNetwork,
    #[error(transparent)]
    Card(CardError),
    #[error(transparent)]
    Ledger(LedgerError),
    #[error(transparent)]
    Idem(IdemError),
    #[error("{0}")]
    Internal(String),
}

impl From<LedgerError> for FlowError {
    fn from(e: LedgerError) -> Self {
        match e {
            LedgerError::OutOfStock { sku } => Self::OutOfStock(sku),
            other => Self::Ledger(other),
        }
    }
}

impl From<IdemError> for FlowError {
    fn from(e: IdemError) -> Self {
        Self::Idem(e)
    }
}

impl From<PhaseError<FlowError>> for FlowError {
    fn from(e: PhaseError<FlowError>) -> Self {
        match e {
            PhaseError::Failed { source, .. } => source,
            PhaseError::Idem(e) => Self::Idem(e),
            // A future kind of phase error: the flow can run again.
            _ => Self::Internal("the phase failed".to_string()),
        }
    }
}

impl FlowError {
    /// The answer to the client. Every 5xx is marked `NoEffect`: the flow
    /// can always run again (see the module docs).
    fn response(&self) -> Response {
        match self {
            Self::OutOfStock(sku) => problem(
                StatusCode::UNPROCESSABLE_ENTITY,
                "out-of-stock",
                &format!("not enough stock of {sku}; nothing was reserved or charged"),
            ),
            Self::Mismatch => problem(
                StatusCode::UNPROCESSABLE_ENTITY,
                "key-reused",
                "this idempotency key already reserved another order",
            ),
            Self::NoCardNetwork => no_effect(unavailable(
                "no card network is configured (--card-network); nothing was done",
            )),
            Self::Card(CardError::Refused { .. }) => no_effect(problem(
                StatusCode::BAD_GATEWAY,
                "card-network-refused",
                "the card network refused the charge",
            )),
            Self::Card(_) => no_effect(unavailable(
                "the card network is unavailable; retry with the same key: the order resumes where it stopped",
            )),
            Self::Idem(IdemError::LeaseLost(_)) | Self::Ledger(LedgerError::LeaseLost(_)) => {
                no_effect(unavailable("this attempt lost its claim on the key; retry"))
            }
            Self::Ledger(_) | Self::Idem(_) => no_effect(unavailable(
                "the order could not go on; retry with the same key: it resumes where it stopped",
            )),
            Self::Internal(_) => no_effect(problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the order failed",
            )),
        }
    }
}

/// The order's phase code, shared by the handler and the completer.
#[derive(Clone)]
pub(crate) struct OrderFlow {
    pub(crate) ledger: Arc<dyn OrderLedger>,
    pub(crate) card: Option<CardNetworkClient>,
    pub(crate) crash: CrashPlan,
}

impl OrderFlow {
    /// Phase `reserve`: the recorded reservation, else reserves `request`.
    async fn reserve(
        &self,
        phases: &mut Phases,
        who: &Who,
        request: Option<&NewOrder>,
    ) -> Result<Reservation, FlowError> {
        if let Some(done) = phases.result::<Reservation>(RESERVE)? {
            return Ok(done);
        }
        let Some(request) = request else {
            return Err(FlowError::Internal(
                "an order resumed without its reservation".to_string(),
            ));
        };
        let reservation_key = phases.downstream_key(RESERVE);
        let reservation = Reservation {
            order_id: derived_id("ord_", &reservation_key),
            sku: request.sku.clone(),
            quantity: request.quantity,
            amount_cents: request.amount_cents,
        };
        let new = NewReservation {
            tenant: who.tenant.clone(),
            idempotency_key: who.key.clone(),
            reservation_key,
            reservation: reservation.clone(),
        };
        if self.ledger.transactional() {
            // The reservation and the phase's record commit together.
            let done = phases.prepare_local(RESERVE, &reservation)?;
            self.ledger.reserve(&new, Some(&done), self.crash).await?;
            phases.applied(&done)?;
            self.crash.order_point(OrderCrashPoint::AfterReserve);
            return Ok(reservation);
        }
        // No shared transaction: the write is idempotent by its key, then
        // recorded.
        let (ledger, crash) = (self.ledger.clone(), self.crash);
        let reserved = phases
            .external(RESERVE, move |_| async move {
                let stored = ledger.reserve(&new, None, crash).await?;
                crash.order_point(OrderCrashPoint::AfterReserve);
                // A key released after an earlier reservation, reused with
                // another body, must not take over that reservation.
                if stored != new.reservation {
                    return Err(FlowError::Mismatch);
                }
                Ok(stored)
            })
            .await?;
        Ok(reserved)
    }

    /// Phase `charge`: the recorded charge, else charges at the card network
    /// with the phase's downstream key.
    async fn charge(
        &self,
        phases: &mut Phases,
        reservation: &Reservation,
        attempts: u32,
    ) -> Result<Charge, FlowError> {
        let card = self.card.clone().ok_or(FlowError::NoCardNetwork)?;
        let already = phases.is_recorded(CHARGE);
        let crash = self.crash;
        let (order, amount) = (reservation.order_id.clone(), reservation.amount_cents);
        let charge = phases
            .external(CHARGE, move |key| async move {
                let charge_id = card
                    .charge(&key, &order, amount, attempts)
                    .await
                    .map_err(FlowError::Card)?;
                crash.order_point(OrderCrashPoint::AfterCardNetwork);
                Ok(Charge { charge_id })
            })
            .await?;
        if !already {
            self.crash.order_point(OrderCrashPoint::AfterCharge);
        }
        Ok(charge)
    }

    /// The order's answer and its receipt.
    fn order(
        phases: &Phases,
        who: &Who,
        reservation: &Reservation,
        charge: &Charge,
    ) -> (Order, Receipt) {
        let receipt_id = derived_id("rcpt_", &phases.downstream_key(RECEIPT));
        let order = Order {
            order_id: reservation.order_id.clone(),
            sku: reservation.sku.clone(),
            quantity: reservation.quantity,
            charge_id: charge.charge_id.clone(),
            receipt_id: receipt_id.clone(),
        };
        let receipt = Receipt {
            tenant: who.tenant.clone(),
            order_id: reservation.order_id.clone(),
            receipt_id,
            charge_id: charge.charge_id.clone(),
        };
        (order, receipt)
    }
}

/// The 201 answer's headers and body.
fn order_response(order: &Order) -> Result<(HeaderMap, Vec<u8>), FlowError> {
    let body = serde_json::to_vec(order).map_err(|e| FlowError::Internal(e.to_string()))?;
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok((headers, body))
}

pub(super) async fn create_order(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    claim: Option<Extension<IdempotencyClaim>>,
    body: Bytes,
) -> Response {
    // The layer requires a key, so the handler always runs under a claim.
    let Some(Extension(claim)) = claim else {
        return problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the request reached the handler without an idempotency claim",
        );
    };
    let request = match parse_order(&body) {
        Ok(request) => request,
        Err(response) => return response,
    };
    let flow = &state.orders;
    if flow.card.is_none() {
        return FlowError::NoCardNetwork.response();
    }
    let who = Who {
        tenant: tenant.0,
        key: claim.key().as_str().to_string(),
    };
    match run_request(flow, &claim, &who, &request).await {
        Ok((headers, body)) => (StatusCode::CREATED, headers, body).into_response(),
        Err(e) => {
            if !matches!(e, FlowError::OutOfStock(_) | FlowError::Mismatch) {
                tracing::warn!(error = %e, "an order stopped; a retry resumes it");
            }
            e.response()
        }
    }
}

/// The flow in a request: the receipt completes the key in its transaction
/// where the ledger shares the store's.
async fn run_request(
    flow: &OrderFlow,
    claim: &IdempotencyClaim,
    who: &Who,
    request: &NewOrder,
) -> Result<(HeaderMap, Vec<u8>), FlowError> {
    let mut phases = claim.phases()?;
    if let Some(step) = phases.resumed_from() {
        eprintln!("idem-demo: order resumed after `{step}` by a retry");
    }
    let reservation = flow.reserve(&mut phases, who, Some(request)).await?;
    let charge = flow
        .charge(&mut phases, &reservation, REQUEST_CHARGE_ATTEMPTS)
        .await?;
    let (order, receipt) = OrderFlow::order(&phases, who, &reservation, &charge);
    let (headers, body) = order_response(&order)?;
    if flow.ledger.transactional() {
        // The receipt and the stored response commit together.
        let done = claim.prepare_response(StatusCode::CREATED, &headers, &body)?;
        flow.ledger
            .receipt(&receipt, Some(&done), flow.crash)
            .await?;
        if let Err(e) = claim.mark_applied(&done) {
            tracing::warn!(error = %e, "marking the claim applied failed");
        }
    } else {
        flow.ledger.receipt(&receipt, None, flow.crash).await?;
    }
    flow.crash.order_point(OrderCrashPoint::AfterReceipt);
    Ok((headers, body))
}

/// The flow in the completer: the same phases; the receipt is written if
/// absent and the answer is returned for the completer to store, encoded by
/// `layer` exactly as the handler's response would be.
async fn resume<S: Store>(
    flow: OrderFlow,
    layer: IdempotencyLayer<S>,
    mut phases: Phases,
) -> Ending {
    eprintln!(
        "idem-demo: order resumed after `{}` by the completer",
        phases.resumed_from().unwrap_or("nothing")
    );
    let who = Who::of(phases.lease().key());
    let result = async {
        let reservation = flow.reserve(&mut phases, &who, None).await?;
        let charge = flow
            .charge(&mut phases, &reservation, COMPLETER_CHARGE_ATTEMPTS)
            .await?;
        let (order, receipt) = OrderFlow::order(&phases, &who, &reservation, &charge);
        let (headers, body) = order_response(&order)?;
        flow.ledger.receipt(&receipt, None, flow.crash).await?;
        flow.crash.order_point(OrderCrashPoint::AfterReceipt);
        Ok::<_, FlowError>(layer.outcome_of(StatusCode::CREATED, &headers, &body)?)
    }
    .await;
    match result {
        Ok(outcome) => Ending::Complete(outcome),
        Err(e) => {
            // With a checkpoint, stored as a retryable failure: the client's
            // retry resumes.
            tracing::warn!(error = %e, "the completer could not finish an order");
            Ending::Unknown
        }
    }
}

/// A boxed, sendable future.
type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What [`OrderCompleter`] needs of a [`Completer`], without its types.
trait RunCompleter: Send + Sync + 'static {
    fn run_until<'a>(&'a self, stop: BoxFuture<'static, ()>) -> BoxFuture<'a, ()>;
    fn pass(&self) -> BoxFuture<'_, Result<Pass, IdemError>>;
    fn totals(&self) -> CompleterTotals;
}

impl<S: Store, C: Clock> RunCompleter for Completer<S, C> {
    fn run_until<'a>(&'a self, stop: BoxFuture<'static, ()>) -> BoxFuture<'a, ()> {
        Box::pin(self.run(stop))
    }
    fn pass(&self) -> BoxFuture<'_, Result<Pass, IdemError>> {
        Box::pin(self.run_once())
    }
    fn totals(&self) -> CompleterTotals {
        Completer::totals(self)
    }
}

/// The completer of abandoned orders (`idem-demo serve --completer`): an
/// [`idem_core::Completer`] resuming [`ORDER_OPERATION`] keys with the
/// order's phase code.
///
/// # Behavior
/// A key found abandoned (in flight, lease lapsed, with a checkpoint) is
/// claimed like any retry would, resumed after its recorded phases, and
/// completed with the answer the handler would have given (201 and the
/// [`Order`]), so that the client's retry replays it. An order that cannot
/// finish now (the card network down) is left as a retryable failure for
/// the client's retry.
#[derive(Clone)]
pub struct OrderCompleter {
    inner: Arc<dyn RunCompleter>,
}

impl std::fmt::Debug for OrderCompleter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrderCompleter")
            .field("totals", &self.totals())
            .finish()
    }
}

impl OrderCompleter {
    /// Runs passes until `stop` resolves ([`Completer::run`]).
    pub async fn run(&self, stop: impl Future<Output = ()> + Send + 'static) {
        self.inner.run_until(Box::pin(stop)).await;
    }

    /// One pass ([`Completer::run_once`]).
    pub async fn run_once(&self) -> Result<Pass, IdemError> {
        self.inner.pass().await
    }

    /// Totals since it was built.
    pub fn totals(&self) -> CompleterTotals {
        self.inner.totals()
    }
}

/// The completer of `layer`'s orders (see [`OrderCompleter`]).
pub(crate) fn order_completer<S: Store>(
    engine: &Engine<S>,
    layer: IdempotencyLayer<S>,
    flow: OrderFlow,
) -> OrderCompleter {
    let completer = Completer::new(engine.clone())
        .operation(Some(ORDER_OPERATION), move |phases: Phases| {
            resume(flow.clone(), layer.clone(), phases)
        });
    OrderCompleter {
        inner: Arc::new(completer),
    }
}

/// `GET /orders`: the tenant's reservations with their receipts.
pub(super) async fn list_orders(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
) -> Response {
    match state.orders.ledger.orders(&tenant.0).await {
        Ok(orders) => Json(orders).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "listing orders failed");
            unavailable("the ledger is unavailable; retry")
        }
    }
}

/// `GET /stock`: every sku's stock.
pub(super) async fn list_stock(State(state): State<AppState>) -> Response {
    match state.orders.ledger.stock().await {
        Ok(stock) => Json(stock).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "listing the stock failed");
            unavailable("the ledger is unavailable; retry")
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn order_validation() {
        let ok = parse_order(br#"{"sku":"sku-1","quantity":2,"amount_cents":500}"#).unwrap();
        assert_eq!(
            (ok.sku.as_str(), ok.quantity, ok.amount_cents),
            ("sku-1", 2, 500)
        );
        let status = |b: &[u8]| parse_order(b).err().map(|r| r.status());
        assert_eq!(status(b"nope"), Some(StatusCode::BAD_REQUEST));
        assert_eq!(status(b"[]"), Some(StatusCode::BAD_REQUEST));
        for bad in [
            r#"{"sku":"","quantity":1,"amount_cents":1}"#,
            r#"{"sku":"a b","quantity":1,"amount_cents":1}"#,
            r#"{"sku":"s","quantity":0,"amount_cents":1}"#,
            r#"{"sku":"s","quantity":1001,"amount_cents":1}"#,
            r#"{"sku":"s","quantity":5000000000,"amount_cents":1}"#,
            r#"{"sku":"s","quantity":1,"amount_cents":0}"#,
            r#"{"sku":"s","quantity":1,"amount_cents":1000000000001}"#,
            r#"{"sku":"s","quantity":1}"#,
            r#"{"sku":"s","quantity":1,"amount_cents":1,"x":1}"#,
        ] {
            assert_eq!(
                status(bad.as_bytes()),
                Some(StatusCode::UNPROCESSABLE_ENTITY),
                "{bad}"
            );
        }
        let long = format!(
            r#"{{"sku":"{}","quantity":1,"amount_cents":1}}"#,
            "s".repeat(65)
        );
        assert_eq!(
            status(long.as_bytes()),
            Some(StatusCode::UNPROCESSABLE_ENTITY)
        );
    }

    #[test]
    fn derived_ids() {
        let key = "idem-0123456789abcdef0123456789abcdef";
        assert_eq!(derived_id("ord_", key), "ord_0123456789abcdef01234567");
        assert_eq!(derived_id("rcpt_", "idem-ab"), "rcpt_ab");
    }
}
