//! `POST /payments`: parsing and validating the body, and the charge
//! itself (the prepared completion, the external call, the ledger write).

use std::time::Duration;

use axum::Extension;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use idem_core::Error as IdemError;
use idem_tower::IdempotencyClaim;
use serde::Deserialize;

use super::{
    AppState, CrashPlan, LedgerError, MAX_AMOUNT, MAX_CUSTOMER_LEN, MAX_DELAY, Payment, Tenant,
    no_effect, problem, unavailable,
};

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

pub(super) async fn create_payment(
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
