//! The storm's clients: one task per logical payment makes the calls its
//! [`Scenario`] calls for (double-clicks, a timeout then retries, a transient
//! failure, a changed payload), each through `idem-client`'s middleware,
//! which re-sends with the same key until a final answer; the middleware's
//! observer counts every attempt in the shared [`Observed`].
//!
//! Every call carries the plan's key (a caller-supplied key, as a job that
//! stored its key would send it): the scenarios that misbehave on purpose
//! need it — two clicks are two logical calls with one key, a changed
//! payload reuses a key with another body.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use idem_client::reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
use idem_client::{AttemptEvent, IdempotencyMiddleware, IdempotencyResponseExt, Key, RetryPolicy};
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

impl Observed {
    /// Counts one attempt the middleware made (its scenario is the
    /// request's [`Scenario`] extension).
    fn attempt(&self, event: &AttemptEvent<'_>) {
        let Some(scenario) = event.extensions.get::<Scenario>() else {
            return;
        };
        let counters = &self.scenarios[scenario.index()];
        counters.attempts.fetch_add(1, Ordering::SeqCst);
        self.latencies
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(event.elapsed);
        if event.replayed {
            counters.replays.fetch_add(1, Ordering::SeqCst);
        }
        let counter = match event.status {
            None => Some(&counters.timeouts),
            Some(StatusCode::CONFLICT) => Some(&counters.conflicts),
            Some(StatusCode::UNPROCESSABLE_ENTITY) => Some(&counters.mismatches),
            Some(StatusCode::SERVICE_UNAVAILABLE) => Some(&counters.unavailable),
            Some(_) => None,
        };
        if let Some(counter) = counter {
            counter.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// The storm's HTTP client: `http` behind idem-client's middleware, whose
/// every attempt is counted in `observed`.
///
/// # Behavior
/// The retry policy is the contract's (docs/http-contract.md): re-send with
/// the same key on no answer, 409 + `Retry-After`, 429 and 5xx; never after
/// 422 or another 4xx. Two settings differ from the defaults, for a storm
/// that finishes in seconds: short backoffs (5 ms doubling to 100 ms), and
/// `Retry-After` honoured up to 50 ms — the server's 409 says "1" (whole
/// seconds, rounded up) while a demo charge takes milliseconds; a client
/// that polls sooner than asked is one more kind of impatience the server
/// must take. The budget (2 minutes) outlasts the server's lease (60 s), so
/// that even a claim orphaned by a client that vanished while the server
/// stored it (the key then answers 409 until the lease lapses) ends in an
/// answer rather than a lost payment.
pub(super) fn client(http: reqwest::Client, observed: Arc<Observed>) -> ClientWithMiddleware {
    let middleware = IdempotencyMiddleware::builder()
        .policy(
            RetryPolicy::default()
                .max_attempts(5_000)
                .backoff(Duration::from_millis(5), Duration::from_millis(100))
                .retry_after_cap(Duration::from_millis(50))
                .budget(Duration::from_secs(120)),
        )
        .on_attempt(move |event| observed.attempt(event))
        .build();
    ClientBuilder::new(http).with(middleware).build()
}

/// An answer the client got.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Answer {
    status: StatusCode,
    /// 422 `key-reused` (the layer's, not the payment's validation).
    key_reused: bool,
    body: String,
}

/// One logical call: the plan's key, `body`, re-sent by the middleware
/// until a final answer (`None` if none came). `policy` and `timeout`
/// replace the middleware's policy and the client's timeout for this call.
async fn call(
    client: &ClientWithMiddleware,
    base: &str,
    plan: &Plan,
    body: &serde_json::Value,
    policy: Option<RetryPolicy>,
    timeout: Option<Duration>,
) -> Option<Answer> {
    let key = Key::new(plan.key.as_str()).ok()?;
    let mut request = client
        .post(format!("{base}/payments"))
        .bearer_auth(&plan.tenant)
        .with_extension(key)
        .with_extension(plan.scenario)
        .json(body);
    if let Some(policy) = policy {
        request = request.with_extension(policy);
    }
    if let Some(timeout) = timeout {
        request = request.timeout(timeout);
    }
    let response = request.send().await.ok()?;
    let key_reused = response.idempotency().is_some_and(|i| i.key_reused());
    let status = response.status();
    let body = response.text().await.ok()?;
    Some(Answer {
        status,
        key_reused,
        body,
    })
}

/// Drives one logical payment: every call its scenario makes, then its
/// answer (when all calls agreed) into `observed`.
pub(super) async fn drive(
    client: &ClientWithMiddleware,
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
            // Each click is a logical call of its own, with the same key.
            let clicks =
                (0..config.double_clicks).map(|_| call(client, base, plan, &body, None, None));
            answers.extend(futures_util::future::join_all(clicks).await);
        }
        Scenario::TimeoutThenRetry => {
            let slow = json!({
                "amount": plan.amount, "currency": "EUR", "customer": plan.customer,
                "delay_ms": config.slow_charge.as_millis() as u64,
            });
            // A client with a short timeout and no retries gives up early;
            // the charge goes on server-side. Later the operation is retried
            // with its stored key.
            if let Some(answer) = call(
                client,
                base,
                plan,
                &slow,
                Some(RetryPolicy::no_retry()),
                Some(config.client_timeout),
            )
            .await
            {
                // Answered within the timeout after all: it counts.
                if answer.status.is_success() {
                    answers.push(Some(answer));
                }
            }
            answers.push(call(client, base, plan, &slow, None, None).await);
            answers.push(call(client, base, plan, &slow, None, None).await);
        }
        Scenario::TransientFailure => {
            let flaky = json!({
                "amount": plan.amount, "currency": "EUR", "customer": plan.customer,
                "fail": "transient",
            });
            answers.push(call(client, base, plan, &flaky, None, None).await);
            answers.push(call(client, base, plan, &flaky, None, None).await);
        }
        Scenario::PayloadChanged => {
            answers.push(call(client, base, plan, &body, None, None).await);
            let changed =
                json!({"amount": plan.amount + 1, "currency": "EUR", "customer": plan.customer});
            let reuse = call(client, base, plan, &changed, None, None).await;
            if !reuse.is_some_and(|a| a.status == StatusCode::UNPROCESSABLE_ENTITY && a.key_reused)
            {
                counters.inconsistent.fetch_add(1, Ordering::SeqCst);
            }
            answers.push(call(client, base, plan, &body, None, None).await);
        }
    }
    // Every call of one logical payment must end with the same 201.
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
