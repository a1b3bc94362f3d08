//! The README's "three lines on an axum endpoint", through the facade
//! (`idemkit`, as a service team depends on it) and `store_from_url`, on
//! every backend (issue 20).
//!
//! - `readme::layer_runs_once::<backend>`: the README's layer over
//!   `idemkit::store_from_url(URL)` (the backend's URL, with an isolated
//!   path, schema or prefix as query parameters): a payment sent three times
//!   with one key runs once; the retries get the first answer with
//!   `Idempotent-Replayed: true`; the key with another body gets `422`; the
//!   same key from another tenant runs for that tenant.
//! - `readme::bad_parameter_is_named::<backend>`: an unknown and a malformed
//!   query parameter of that backend's URL are refused, naming the parameter,
//!   before anything is opened.
//!
//! Unreachable servers: IGNORED (FAILED under `CI=true` /
//! `IDEM_REQUIRE_BACKENDS=1`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::Body;
use axum::{Router, routing::post};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use idem_testkit::runner::Suite;
use idem_testkit::{BackendKind, Isolated};
use idemkit::{
    Engine, Scope,
    tower::{IdempotencyLayer, scope_from_extension},
};
use tower::ServiceExt;

#[derive(Clone)]
struct Tenant(String);

/// The README's app, with a handler that counts its runs, over the store
/// `url` names; the tenant comes from the `x-tenant` header (the README's
/// "authentication middleware").
async fn readme_app(url: &str, runs: Arc<AtomicU64>) -> Router {
    let engine = Engine::new(idemkit::store_from_url(url).await.expect("store_from_url"));
    let scope = scope_from_extension(|t: &Tenant| Scope::tenant(t.0.clone()));
    let charge = move || {
        let runs = runs.clone();
        async move {
            let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
            format!("charge #{n}")
        }
    };
    Router::new()
        .route("/payments", post(charge))
        .layer(IdempotencyLayer::new(engine, scope))
        .layer(axum::middleware::from_fn(
            |mut request: axum::extract::Request, next: axum::middleware::Next| async move {
                let tenant = request
                    .headers()
                    .get("x-tenant")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("anonymous")
                    .to_string();
                request.extensions_mut().insert(Tenant(tenant));
                next.run(request).await
            },
        ))
}

/// Sends one payment; the status, whether it was a replay, and the body.
async fn pay(app: &Router, tenant: &str, key: &str, body: &str) -> (StatusCode, bool, String) {
    let request = Request::post("/payments")
        .header("x-tenant", tenant)
        .header("idempotency-key", format!("\"{key}\""))
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .expect("request");
    let response = app.clone().oneshot(request).await.expect("infallible");
    let status = response.status();
    let replayed = response
        .headers()
        .get(idemkit::tower::IDEMPOTENT_REPLAYED)
        .is_some_and(|v| v == "true");
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (
        status,
        replayed,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

async fn layer_runs_once(kind: BackendKind) {
    let fixture = Isolated::fresh(kind).await;
    let url = fixture.url().to_string();
    let runs = Arc::new(AtomicU64::new(0));
    let app = readme_app(&url, runs.clone()).await;
    let body = r#"{"amount":1000,"currency":"EUR"}"#;

    let first = pay(&app, "acme", "order-1", body).await;
    assert_eq!(first, (StatusCode::OK, false, "charge #1".into()), "{url}");
    for _ in 0..2 {
        let retry = pay(&app, "acme", "order-1", body).await;
        assert_eq!(retry, (StatusCode::OK, true, "charge #1".into()), "{url}");
    }
    let other_body = pay(&app, "acme", "order-1", r#"{"amount":1}"#).await;
    assert_eq!(other_body.0, StatusCode::UNPROCESSABLE_ENTITY, "{url}");
    let other_tenant = pay(&app, "globex", "order-1", body).await;
    assert_eq!(other_tenant, (StatusCode::OK, false, "charge #2".into()));
    assert_eq!(runs.load(Ordering::SeqCst), 2, "one run per (tenant, key)");
    fixture.close().await.expect("clean up");
}

async fn bad_parameter_is_named(kind: BackendKind) {
    let base = kind.url().expect("backend url").to_string();
    let join = if base.contains('?') { '&' } else { '?' };
    let (unknown, malformed) = match kind {
        BackendKind::Memory => ("colour", None),
        BackendKind::Sqlite => ("colour", Some(("durability", "sometimes"))),
        BackendKind::Postgres => ("colour", Some(("max_connections", "0"))),
        BackendKind::Redis | BackendKind::RedisCluster | BackendKind::Valkey => {
            ("colour", Some(("response_timeout", "soon")))
        }
    };
    let url = format!("{base}{join}{unknown}=blue");
    let err = idemkit::store_from_url(&url).await.err().expect("refused");
    assert!(
        err.to_string().contains(unknown),
        "the error names `{unknown}`: {err}"
    );
    if let Some((name, value)) = malformed {
        let url = format!("{base}{join}{name}={value}");
        let err = idemkit::store_from_url(&url).await.err().expect("refused");
        assert!(
            err.to_string().contains(name),
            "the error names `{name}`: {err}"
        );
    }
}

fn main() -> std::process::ExitCode {
    idem_reliability::each!(Suite::new("readme"), &BackendKind::ALL, {
        "readme::layer_runs_once" => layer_runs_once,
        "readme::bad_parameter_is_named" => bad_parameter_is_named,
    })
    .run()
}
