//! The storm's clients: one task per logical payment sends its requests
//! the way its [`Scenario`] misbehaves (double-clicks, a timeout then
//! retries, a transient failure, a changed payload) and records what it saw
//! in the shared [`Observed`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;

use super::{Plan, Scenario, StormConfig};
use crate::app::Payment;

/// Per-scenario counters.
#[derive(Default)]
pub(super) struct Counters {
    pub(super) attempts: AtomicU64,
    pub(super) replays: AtomicU64,
    pub(super) conflicts: AtomicU64,
    pub(super) mismatches: AtomicU64,
    pub(super) unavailable: AtomicU64,
    pub(super) timeouts: AtomicU64,
    pub(super) inconsistent: AtomicU64,
}

/// Everything the clients record.
#[derive(Default)]
pub(super) struct Observed {
    pub(super) scenarios: [Counters; 5],
    pub(super) latencies: Mutex<Vec<Duration>>,
    /// (tenant, key) → the payment the final answers named.
    pub(super) answers: Mutex<HashMap<(String, String), Payment>>,
}

/// An answer the client got.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Answer {
    status: StatusCode,
    body: String,
}

/// Sends one request; `None` on a client timeout or a connection error.
async fn send(
    client: &reqwest::Client,
    base: &str,
    plan: &Plan,
    body: &serde_json::Value,
    timeout: Option<Duration>,
    observed: &Observed,
) -> Option<Answer> {
    let counters = &observed.scenarios[plan.scenario.index()];
    counters.attempts.fetch_add(1, Ordering::SeqCst);
    let mut request = client
        .post(format!("{base}/payments"))
        .bearer_auth(&plan.tenant)
        .header("Idempotency-Key", format!("\"{}\"", plan.key))
        .json(body);
    if let Some(timeout) = timeout {
        request = request.timeout(timeout);
    }
    let started = Instant::now();
    let result = async {
        let response = request.send().await?;
        let replayed = response.headers().get("idempotent-replayed").is_some();
        let status = response.status();
        let body = response.text().await?;
        Ok::<_, reqwest::Error>((status, replayed, body))
    }
    .await;
    observed
        .latencies
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(started.elapsed());
    let (status, replayed, body) = match result {
        Ok(r) => r,
        Err(_) => {
            counters.timeouts.fetch_add(1, Ordering::SeqCst);
            return None;
        }
    };
    if replayed {
        counters.replays.fetch_add(1, Ordering::SeqCst);
    }
    let counter = match status {
        StatusCode::CONFLICT => Some(&counters.conflicts),
        StatusCode::UNPROCESSABLE_ENTITY => Some(&counters.mismatches),
        StatusCode::SERVICE_UNAVAILABLE => Some(&counters.unavailable),
        _ => None,
    };
    if let Some(counter) = counter {
        counter.fetch_add(1, Ordering::SeqCst);
    }
    Some(Answer { status, body })
}

/// Retries (same key, same body) until a final answer: 2xx, or 4xx other
/// than 409 and 429. `None` if none came.
async fn until_final(
    client: &reqwest::Client,
    base: &str,
    plan: &Plan,
    body: &serde_json::Value,
    observed: &Observed,
) -> Option<Answer> {
    for attempt in 0..400u64 {
        match send(client, base, plan, body, None, observed).await {
            Some(a) if a.status.is_success() => return Some(a),
            Some(a)
                if a.status.is_client_error()
                    && a.status != StatusCode::CONFLICT
                    && a.status != StatusCode::TOO_MANY_REQUESTS =>
            {
                return Some(a);
            }
            // 409, 5xx, or a lost connection: back off a little and retry.
            _ => tokio::time::sleep(Duration::from_millis(5 + attempt.min(20) * 5)).await,
        }
    }
    None
}

/// Drives one logical payment: every attempt its scenario makes, then
/// its answer (when all attempts agreed) into `observed`.
pub(super) async fn drive(
    client: &reqwest::Client,
    base: &str,
    plan: &Plan,
    observed: &Observed,
    config: StormConfig,
) {
    let counters = &observed.scenarios[plan.scenario.index()];
    let body = json!({"amount": plan.amount, "currency": "EUR", "customer": plan.customer});
    let mut answers = Vec::new();
    match plan.scenario {
        Scenario::DoubleClick | Scenario::TwoTenants => {
            let clicks =
                (0..config.double_clicks).map(|_| until_final(client, base, plan, &body, observed));
            answers.extend(futures_util::future::join_all(clicks).await);
        }
        Scenario::TimeoutThenRetry => {
            let slow = json!({
                "amount": plan.amount, "currency": "EUR", "customer": plan.customer,
                "delay_ms": config.slow_charge.as_millis() as u64,
            });
            // The client gives up early; the charge goes on server-side.
            if let Some(answer) = send(
                client,
                base,
                plan,
                &slow,
                Some(config.client_timeout),
                observed,
            )
            .await
            {
                // Answered within the timeout after all: it counts.
                if answer.status.is_success() {
                    answers.push(Some(answer));
                }
            }
            answers.push(until_final(client, base, plan, &slow, observed).await);
            answers.push(until_final(client, base, plan, &slow, observed).await);
        }
        Scenario::TransientFailure => {
            let flaky = json!({
                "amount": plan.amount, "currency": "EUR", "customer": plan.customer,
                "fail": "transient",
            });
            answers.push(until_final(client, base, plan, &flaky, observed).await);
            answers.push(until_final(client, base, plan, &flaky, observed).await);
        }
        Scenario::PayloadChanged => {
            answers.push(until_final(client, base, plan, &body, observed).await);
            let changed =
                json!({"amount": plan.amount + 1, "currency": "EUR", "customer": plan.customer});
            let reuse = until_final(client, base, plan, &changed, observed).await;
            if reuse.as_ref().map(|a| a.status) != Some(StatusCode::UNPROCESSABLE_ENTITY) {
                counters.inconsistent.fetch_add(1, Ordering::SeqCst);
            }
            answers.push(until_final(client, base, plan, &body, observed).await);
        }
    }
    // Every attempt of one logical payment must end with the same 201.
    let first = answers.first().cloned().flatten();
    let consistent = first.as_ref().is_some_and(|f| f.status.is_success())
        && answers.iter().all(|a| a.as_ref() == first.as_ref());
    let payment = first.and_then(|a| serde_json::from_str::<Payment>(&a.body).ok());
    // Without a consistent answer nothing is recorded, and the final count
    // finds the payment inconsistent.
    if let Some(payment) = payment.filter(|_| consistent) {
        observed
            .answers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert((plan.tenant.clone(), plan.key.clone()), payment);
    }
}
