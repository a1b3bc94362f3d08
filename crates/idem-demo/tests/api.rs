//! The demo's HTTP contract on SQLite, request by request: authentication,
//! validation (problem+json, never a panic), creation, replay, tenant
//! isolation, transient failures, and the listing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use idem_demo::{Backend, BackendOptions, Payment, RunningServer, StoreUrl};
use reqwest::StatusCode;
use serde_json::{Value, json};

struct Demo {
    server: RunningServer,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Demo {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = StoreUrl::sqlite(dir.path().join("api.db"));
        let backend = Backend::open(&url, &BackendOptions::default())
            .await
            .unwrap();
        assert!(backend.exactly_once());
        let server = RunningServer::start(([127, 0, 0, 1], 0).into(), backend)
            .await
            .unwrap();
        Self {
            server,
            client: reqwest::Client::new(),
            _dir: dir,
        }
    }

    fn post(&self, tenant: Option<&str>, key: Option<&str>, body: &str) -> reqwest::RequestBuilder {
        let mut request = self
            .client
            .post(format!("{}/payments", self.server.url()))
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(tenant) = tenant {
            request = request.bearer_auth(tenant);
        }
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        request
    }

    /// A payment request of `tenant` under `key`, sent.
    async fn pay(&self, tenant: &str, key: &str, body: &str) -> reqwest::Response {
        self.post(Some(tenant), Some(key), body)
            .send()
            .await
            .unwrap()
    }

    async fn list(&self, tenant: &str) -> Vec<Payment> {
        let response = self
            .client
            .get(format!("{}/payments", self.server.url()))
            .bearer_auth(tenant)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        response.json().await.unwrap()
    }

    async fn healthy(&self) {
        let response = self
            .client
            .get(format!("{}/health", self.server.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["store"], "sqlite");
    }
}

const BODY: &str = r#"{"amount": 1250, "currency": "EUR", "customer": "c1"}"#;

/// Asserts a 201 answer, replayed or not, and returns its payment.
async fn created(response: reqwest::Response, replayed: bool) -> Payment {
    assert_eq!(response.status(), StatusCode::CREATED);
    let header = response.headers().get("idempotent-replayed");
    assert_eq!(
        header.map(|v| v.to_str().unwrap()),
        replayed.then_some("true")
    );
    response.json().await.unwrap()
}

async fn problem(response: reqwest::Response, status: StatusCode) -> Value {
    assert_eq!(response.status(), status);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], status.as_u16());
    assert!(body["type"].as_str().unwrap().starts_with("https://"));
    body
}

#[tokio::test]
async fn create_replay_and_list() {
    let demo = Demo::start().await;
    let paid = created(demo.pay("acme", "\"k-1\"", BODY).await, false).await;
    assert!(paid.id.starts_with("pay_"));
    assert_eq!((paid.amount, paid.currency.as_str()), (1250, "EUR"));
    assert_eq!(paid.customer, "c1");
    assert_eq!(paid.idempotency_key, "k-1");
    assert!(paid.created_at.ends_with('Z'));

    // The bare token is the same key as the quoted string.
    let retry = demo.pay("acme", "k-1", BODY).await;
    assert_eq!(created(retry, true).await, paid);

    // Another payload with the key: 422, nothing charged.
    let other = demo
        .pay(
            "acme",
            "k-1",
            r#"{"amount": 9999, "currency": "EUR", "customer": "c1"}"#,
        )
        .await;
    problem(other, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(demo.list("acme").await, vec![paid.clone()]);

    // Another tenant, same key: a payment of its own.
    let theirs = created(demo.pay("globex", "k-1", BODY).await, false).await;
    assert_ne!(theirs.id, paid.id);
    assert_eq!(demo.list("globex").await, vec![theirs]);
    assert_eq!(demo.list("acme").await, vec![paid]);
    assert!(demo.list("initech").await.is_empty());
}

#[tokio::test]
async fn authentication_and_key_are_required() {
    let demo = Demo::start().await;
    let response = demo.post(None, Some("k"), BODY).send().await.unwrap();
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    problem(response, StatusCode::UNAUTHORIZED).await;
    for bad in ["Bearer ", "Basic YWxhZGRpbjpvcGVu", "Bearer a b"] {
        let response = demo
            .client
            .post(format!("{}/payments", demo.server.url()))
            .header("authorization", bad)
            .header("Idempotency-Key", "k")
            .body(BODY)
            .send()
            .await
            .unwrap();
        problem(response, StatusCode::UNAUTHORIZED).await;
    }
    let response = demo
        .client
        .get(format!("{}/payments", demo.server.url()))
        .send()
        .await
        .unwrap();
    problem(response, StatusCode::UNAUTHORIZED).await;

    let missing = demo.post(Some("acme"), None, BODY).send().await.unwrap();
    let body = problem(missing, StatusCode::BAD_REQUEST).await;
    assert!(body["type"].as_str().unwrap().ends_with("missing-key"));
    let empty = demo.pay("acme", "\"\"", BODY).await;
    problem(empty, StatusCode::BAD_REQUEST).await;
    assert!(demo.list("acme").await.is_empty());
    demo.healthy().await;
}

#[tokio::test]
async fn invalid_bodies_are_problems_never_panics() {
    let demo = Demo::start().await;
    let unreadable = ["", "{", "\u{0}\u{1}binary", "[1, 2]", "\"amount\""];
    let invalid = [
        r#"{"amount": 0, "currency": "EUR", "customer": "c1"}"#,
        r#"{"amount": -5, "currency": "EUR", "customer": "c1"}"#,
        r#"{"amount": 1e300, "currency": "EUR", "customer": "c1"}"#,
        r#"{"amount": 18446744073709551616, "currency": "EUR", "customer": "c1"}"#,
        r#"{"amount": 5, "currency": "euro", "customer": "c1"}"#,
        r#"{"amount": 5, "currency": "EUR", "customer": "a\u0000b"}"#,
        r#"{"amount": 5, "currency": "EUR"}"#,
        r#"{"amount": 5, "currency": "EUR", "customer": "c1", "delay_ms": 30001}"#,
        r#"{"amount": 5, "currency": "EUR", "customer": "c1", "fail": "permanent"}"#,
        r#"{"amount": 5, "currency": "EUR", "customer": "c1", "amout": 5}"#,
    ];
    let unreadable = unreadable.map(|body| (body, StatusCode::BAD_REQUEST));
    let invalid = invalid.map(|body| (body, StatusCode::UNPROCESSABLE_ENTITY));
    let cases = unreadable.into_iter().chain(invalid);
    for (i, (body, status)) in cases.enumerate() {
        let key = format!("bad-{i}");
        let response = demo.pay("acme", &key, body).await;
        let problem = problem(response, status).await;
        assert!(problem["detail"].is_string(), "{body}: {problem}");
        // A 4xx is the request's final answer: replayed, still not charged.
        let again = demo.pay("acme", &key, body).await;
        assert_eq!(again.status(), status, "{body}");
        assert_eq!(again.headers()["idempotent-replayed"], "true");
    }
    let huge = "x".repeat(idem_demo::app::MAX_BODY_BYTES + 1);
    let response = demo.pay("acme", "huge", &huge).await;
    problem(response, StatusCode::PAYLOAD_TOO_LARGE).await;
    assert!(demo.list("acme").await.is_empty());
    demo.healthy().await;
}

#[tokio::test]
async fn transient_failure_charges_on_the_retry_only() {
    let demo = Demo::start().await;
    let body =
        json!({"amount": 10, "currency": "EUR", "customer": "c9", "fail": "transient"}).to_string();
    let first = demo.pay("acme", "t-1", &body).await;
    assert!(first.headers().contains_key("retry-after"));
    problem(first, StatusCode::SERVICE_UNAVAILABLE).await;
    assert!(demo.list("acme").await.is_empty(), "a 503 charged nothing");
    let paid = created(demo.pay("acme", "t-1", &body).await, false).await;
    let again = demo.pay("acme", "t-1", &body).await;
    assert_eq!(created(again, true).await, paid);
    assert_eq!(demo.list("acme").await, vec![paid]);
}

/// The slow charge's card network delay: long enough that the retry below
/// meets it in flight on a loaded machine (its client gave up at
/// [`SLOW_CLIENT_TIMEOUT`], leaving it 3 s more), well under
/// [`idem_demo::app::MAX_DELAY`].
const SLOW_CHARGE_MS: u64 = 5_000;
/// The first client's timeout: long enough for its request to reach the
/// server and claim the key (server and client share this test's one
/// thread), much shorter than the charge.
const SLOW_CLIENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

#[tokio::test]
async fn a_slow_charge_survives_its_client_and_answers_409_then_the_replay() {
    let demo = Demo::start().await;
    let body =
        json!({"amount": 10, "currency": "EUR", "customer": "c9", "delay_ms": SLOW_CHARGE_MS})
            .to_string();
    let started = std::time::Instant::now();
    let timed_out = demo
        .post(Some("acme"), Some("s-1"), &body)
        .timeout(SLOW_CLIENT_TIMEOUT)
        .send()
        .await;
    assert!(timed_out.unwrap_err().is_timeout());
    // The charge goes on server-side: the retry hears 409 until it is done.
    // Only 409 is right here (nothing to poll for): a 201 would be the retry
    // charging again (the first request lost) or a charge done sooner than
    // its delay allows.
    let retry = demo.pay("acme", "s-1", &body).await;
    assert_eq!(
        retry.status(),
        StatusCode::CONFLICT,
        "the retry, {:?} after the first request",
        started.elapsed()
    );
    assert!(retry.headers().contains_key("retry-after"));
    problem(retry, StatusCode::CONFLICT).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let paid = loop {
        let response = demo.pay("acme", "s-1", &body).await;
        if response.status() == StatusCode::CREATED {
            break created(response, true).await;
        }
        assert_eq!(response.status(), StatusCode::CONFLICT);
        assert!(std::time::Instant::now() < deadline, "never completed");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(SLOW_CHARGE_MS),
        "replayed before the charge's delay was over: {:?}",
        started.elapsed()
    );
    assert_eq!(demo.list("acme").await, vec![paid]);
}
