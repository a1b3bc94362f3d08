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

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use idem_core::{Engine, Error as IdemError, Scope, Store, Transition};
use idem_tower::{IdempotencyClaim, IdempotencyLayer, PROBLEM_JSON, scope_from_extension};
use serde::{Deserialize, Serialize};

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

/// A payment, as answered by `POST /payments` and listed by `GET /payments`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payment {
    /// `pay_` and 24 hex digits.
    pub id: String,
    /// The amount, in the currency's minor unit.
    pub amount: u64,
    /// ISO 4217 code.
    pub currency: String,
    /// The customer charged.
    pub customer: String,
    /// The idempotency key the payment was created with.
    pub idempotency_key: String,
    /// When it was charged (RFC 3339, UTC).
    pub created_at: String,
}

/// Test-only fault injection: the server aborts (as `kill -9` would) at a
/// point of the charge, with a probability.
///
/// # Behavior
/// - `in_charge`: inside the ledger transaction, after the payment row was
///   written and before the commit (the transaction never commits).
/// - `after_charge`: after the ledger commit, before the answer. With the
///   SQLite and PostgreSQL stores the idempotency record committed with the
///   charge; with Redis it is not completed yet (the at-least-once window).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CrashPlan {
    /// Probability of aborting inside the ledger transaction.
    pub in_charge: f64,
    /// Probability of aborting after the ledger commit, before the answer.
    pub after_charge: f64,
}

impl CrashPlan {
    /// Aborts the process with probability `probability`.
    pub(crate) fn maybe_crash(probability: f64, point: &str) {
        if probability > 0.0 && fastrand::f64() < probability {
            eprintln!("idem-demo: injected crash {point}");
            std::process::abort();
        }
    }
}

/// The demo's external effect: a file that every charge appends a line to
/// (its "card network call") before the ledger and the idempotency record
/// commit; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct EffectLog {
    path: PathBuf,
    file: Arc<File>,
}

impl EffectLog {
    /// Opens `path` for appending (`O_APPEND`), creating it if absent; the
    /// lines already in it are kept.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            file: Arc::new(file),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `<tenant> <key> <payment id>\n` in one write and waits for
    /// it to reach the disk (`sync_data`). Tenants, keys and payment ids are
    /// visible ASCII without spaces, so a line splits into exactly three
    /// fields.
    pub(crate) async fn record(
        &self,
        tenant: &str,
        key: &str,
        payment_id: &str,
    ) -> std::io::Result<()> {
        let line = format!("{tenant} {key} {payment_id}\n");
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || {
            // `&File` writes; with O_APPEND each write lands at the end, so
            // concurrent lines do not interleave.
            (&*file).write_all(line.as_bytes())?;
            file.sync_data()
        })
        .await
        .map_err(std::io::Error::other)?
    }
}

/// A ledger failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    /// The idempotency claim was taken over (its lease lapsed) before the
    /// charge committed; nothing was charged.
    #[error("the idempotency lease was lost before the charge committed: {0}")]
    LeaseLost(#[source] IdemError),
    /// Completing the idempotency record in the transaction failed; nothing
    /// was charged.
    #[error("completing the idempotency record failed: {0}")]
    Completion(#[source] IdemError),
    /// SQLite failed.
    #[error("ledger (SQLite): {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The idem SQLite store failed.
    #[error("ledger (idem-sqlite): {0}")]
    SqliteStore(#[from] idem_sqlite::SqliteError),
    /// PostgreSQL failed.
    #[error("ledger (PostgreSQL): {0}")]
    Postgres(#[from] sqlx::Error),
    /// The blocking ledger task failed.
    #[error("ledger task: {0}")]
    Join(#[from] tokio::task::JoinError),
    /// A stored row does not make a payment.
    #[error("ledger row: {0}")]
    Row(String),
}

impl From<IdemError> for LedgerError {
    fn from(e: IdemError) -> Self {
        match e {
            IdemError::LeaseLost(_) => Self::LeaseLost(e),
            other => Self::Completion(other),
        }
    }
}

/// Where payments are recorded.
#[async_trait]
pub trait Ledger: Send + Sync + 'static {
    /// Whether a charge commits together with its idempotency record (the
    /// handler then passes the completion to [`charge`](Self::charge)).
    fn transactional(&self) -> bool;

    /// Records `payment` for `tenant`, after a simulated card network call
    /// of `delay`. A transactional ledger applies `completion` in the same
    /// transaction; `in_charge` of `crash` applies inside the transaction.
    async fn charge(
        &self,
        tenant: &str,
        payment: &Payment,
        completion: Option<&Transition>,
        delay: Duration,
        crash: CrashPlan,
    ) -> Result<(), LedgerError>;

    /// The tenant's payments, oldest first.
    async fn list(&self, tenant: &str) -> Result<Vec<Payment>, LedgerError>;
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

/// The service over `engine` (the idempotency store) and `ledger`.
///
/// # Behavior
/// - `GET /health`: 200 `{"status":"ok","store":backend}`, no authentication.
/// - `POST /payments`, `GET /payments`: see the [module docs](self).
/// - Every request runs in a task of its own: a client that disconnects
///   (timeout) does not cancel its charge, so its retry gets 409 while the
///   charge runs, then the replay.
/// - With `effects`, each charge appends its line to the [`EffectLog`]
///   before the ledger write (the external call outside the transaction).
pub fn router<S: Store>(
    engine: Arc<Engine<S>>,
    ledger: Arc<dyn Ledger>,
    crash: CrashPlan,
    effects: Option<EffectLog>,
    backend: &'static str,
) -> Router {
    let idempotency =
        IdempotencyLayer::builder(engine, scope_from_extension(|t: &Tenant| scope_for(&t.0)))
            .required(true)
            .max_body_bytes(MAX_BODY_BYTES)
            .build();
    let state = AppState {
        ledger,
        failed_once: Arc::default(),
        crash,
        effects,
        backend,
    };
    let payments = Router::new()
        .route("/payments", get(list_payments).post(create_payment))
        .layer(idempotency)
        .layer(middleware::from_fn(authenticate));
    Router::new()
        .route("/health", get(health))
        .merge(payments)
        .layer(middleware::from_fn(detach))
        .with_state(state)
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

/// The request body of `POST /payments`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewPayment {
    amount: u64,
    currency: String,
    customer: String,
    #[serde(default)]
    delay_ms: Option<u64>,
    #[serde(default)]
    fail: Option<FailMode>,
}

#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum FailMode {
    Transient,
}

/// Parses and validates the body: 400 if it is not a JSON object, 422 if it
/// is not a valid payment.
#[allow(clippy::result_large_err)]
fn parse_payment(body: &[u8]) -> Result<NewPayment, Response> {
    let invalid =
        |detail: &str| problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid-payment", detail);
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
    let payment: NewPayment =
        serde_json::from_value(value).map_err(|e| invalid(&format!("not a payment: {e}")))?;
    if payment.amount == 0 || payment.amount > MAX_AMOUNT {
        return Err(invalid(&format!(
            "`amount` must be a positive integer up to {MAX_AMOUNT}"
        )));
    }
    if payment.currency.len() != 3 || !payment.currency.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(invalid(
            "`currency` must be three capital letters, e.g. \"EUR\"",
        ));
    }
    let customer_len = payment.customer.chars().count();
    if customer_len == 0
        || customer_len > MAX_CUSTOMER_LEN
        || payment.customer.chars().any(char::is_control)
    {
        return Err(invalid(&format!(
            "`customer` must be 1 to {MAX_CUSTOMER_LEN} characters, without control characters"
        )));
    }
    if payment
        .delay_ms
        .is_some_and(|ms| Duration::from_millis(ms) > MAX_DELAY)
    {
        return Err(invalid(&format!(
            "`delay_ms` must be at most {}",
            MAX_DELAY.as_millis()
        )));
    }
    Ok(payment)
}

/// A fresh payment id: `pay_` and 24 hex digits.
fn payment_id() -> String {
    format!("pay_{:016x}{:08x}", fastrand::u64(..), fastrand::u32(..))
}

async fn create_payment(
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
    let request = match parse_payment(&body) {
        Ok(request) => request,
        Err(response) => return response,
    };
    let key = claim.key().as_str();
    if request.fail == Some(FailMode::Transient) && state.first_failure(&tenant.0, key) {
        // Nothing was charged, and the response says so (`NoEffect`): the
        // layer releases the key, so the retry runs the charge afresh.
        return no_effect(unavailable(
            "the card network failed transiently; nothing was charged; retry with the same key",
        ));
    }
    let payment = Payment {
        id: payment_id(),
        amount: request.amount,
        currency: request.currency,
        customer: request.customer,
        idempotency_key: key.to_string(),
        created_at: crate::time::now_rfc3339(),
    };
    let body = match serde_json::to_vec(&payment) {
        Ok(body) => body,
        Err(e) => {
            tracing::error!(error = %e, "encoding a payment failed");
            return no_effect(problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the payment could not be encoded",
            ));
        }
    };
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    // With a transactional ledger, the stored response commits with the charge.
    let completion = if state.ledger.transactional() {
        match claim.prepare_response(StatusCode::CREATED, &headers, &body) {
            Ok(transition) => Some(transition),
            Err(IdemError::LeaseLost(_)) => {
                return no_effect(unavailable("this attempt lost its claim on the key; retry"));
            }
            Err(e) => {
                tracing::error!(error = %e, "preparing the completion failed");
                return no_effect(problem(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "the response could not be prepared",
                ));
            }
        }
    } else {
        None
    };
    // The card network call: an effect outside the store's transaction,
    // made before the ledger write, that a crash cannot roll back.
    if let Some(effects) = &state.effects
        && let Err(e) = effects.record(&tenant.0, key, &payment.id).await
    {
        tracing::error!(error = %e, "the card network call (effect log) failed");
        // Not `NoEffect`: whether the call took effect is not known.
        return problem(
            StatusCode::BAD_GATEWAY,
            "card-network",
            "the card network call failed; whether it took effect is not known",
        );
    }
    let delay = Duration::from_millis(request.delay_ms.unwrap_or(0));
    match state
        .ledger
        .charge(&tenant.0, &payment, completion.as_ref(), delay, state.crash)
        .await
    {
        Ok(()) => {
            CrashPlan::maybe_crash(state.crash.after_charge, "after the charge committed");
            if let Some(transition) = &completion
                && let Err(e) = claim.mark_applied(transition)
            {
                tracing::warn!(error = %e, "marking the claim applied failed");
            }
            (StatusCode::CREATED, headers, body).into_response()
        }
        // The ledger wrote nothing (its write failed or rolled back). That is
        // "no effect" only if the card network was not called: after an
        // external call, the key must end as outcome unknown, not run again.
        Err(LedgerError::LeaseLost(_)) => nothing_charged_unless_called(
            &state,
            unavailable("this attempt lost its claim on the key; nothing was recorded; retry"),
        ),
        Err(e) => {
            tracing::warn!(error = %e, "charge failed");
            nothing_charged_unless_called(
                &state,
                unavailable("the ledger is unavailable; nothing was recorded; retry"),
            )
        }
    }
}

/// `NoEffect` on `response` unless this charge made its external call.
fn nothing_charged_unless_called(state: &AppState, response: Response) -> Response {
    if state.effects.is_some() {
        response
    } else {
        no_effect(response)
    }
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

    #[tokio::test]
    async fn the_effect_log_appends_one_line_per_call() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("effects.log");
        std::fs::write(&path, "acme k0 pay_0\n").unwrap();
        let log = EffectLog::open(&path).unwrap();
        log.record("acme", "k1", "pay_1").await.unwrap();
        log.record("globex", "k1", "pay_2").await.unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "acme k0 pay_0\nacme k1 pay_1\nglobex k1 pay_2\n"
        );
    }

    #[test]
    fn payment_validation() {
        let ok = parse_payment(br#"{"amount":5,"currency":"EUR","customer":"c1"}"#).unwrap();
        assert_eq!(ok.amount, 5);
        let status = |b: &[u8]| parse_payment(b).err().map(|r| r.status());
        assert_eq!(status(b"not json"), Some(StatusCode::BAD_REQUEST));
        assert_eq!(status(b"[1]"), Some(StatusCode::BAD_REQUEST));
        for bad in [
            r#"{"amount":0,"currency":"EUR","customer":"c1"}"#,
            r#"{"amount":-1,"currency":"EUR","customer":"c1"}"#,
            r#"{"amount":1.5,"currency":"EUR","customer":"c1"}"#,
            r#"{"amount":"5","currency":"EUR","customer":"c1"}"#,
            r#"{"amount":5,"currency":"eur","customer":"c1"}"#,
            r#"{"amount":5,"currency":"EUR","customer":""}"#,
            r#"{"amount":5,"currency":"EUR"}"#,
            r#"{"amount":5,"currency":"EUR","customer":"c1","delay_ms":30001}"#,
            r#"{"amount":5,"currency":"EUR","customer":"c1","fail":"always"}"#,
            r#"{"amount":5,"currency":"EUR","customer":"c1","extra":1}"#,
        ] {
            assert_eq!(
                status(bad.as_bytes()),
                Some(StatusCode::UNPROCESSABLE_ENTITY),
                "{bad}"
            );
        }
    }
}
