//! Exits of the HTTP layer that the service tests do not cover: nested
//! routers (the fingerprint sees the URI the client sent), a store whose
//! record limit is below the engine's, durations at their extremes, and the
//! graceful shutdown. Effects are counted; what a retry gets is checked.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use http_body_util::BodyExt as _;
use idem_core::{Engine, MemoryStore};
use idem_sqlite::SqliteStore;
use idem_tower::{IdempotencyLayer, ProblemType, single_client_scope};
use tokio::sync::Notify;
use tower::{ServiceExt, service_fn};

fn post_to(path: &str, key: &str, body: &'static str) -> Request<Body> {
    Request::post(path)
        .header("idempotency-key", key)
        .body(Body::from(body))
        .unwrap()
}

/// Sends a POST of `body` with `key` to `path` through `app`.
async fn send(app: &Router, path: &str, key: &str, body: &'static str) -> Response<Body> {
    app.clone().oneshot(post_to(path, key, body)).await.unwrap()
}

/// Status, problem `type` (if any) and whether the answer is a replay.
async fn answer(response: Response<Body>) -> (u16, Option<String>, bool) {
    let status = response.status().as_u16();
    let replayed = response.headers().contains_key("idempotent-replayed");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let kind = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["type"].as_str().map(str::to_owned));
    (status, kind, replayed)
}

/// A router whose POST `path` answers `reply`, and the count of its calls.
fn counted<R>(path: &str, reply: R) -> (Router, Arc<AtomicUsize>)
where
    R: IntoResponse + Clone + Send + Sync + 'static,
{
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let route = post(move || async move {
        counter.fetch_add(1, Ordering::SeqCst);
        reply
    });
    (Router::new().route(path, route), calls)
}

fn reused() -> Option<String> {
    Some(ProblemType::KeyReused.uri().to_owned())
}

/// Situation 5: the layer on a router nested under `/accounts/{id}` sees
/// the stripped path `/transfers`. The same key and body sent for account B
/// must not replay account A's answer: the fingerprint covers the URI the
/// client sent, so it is a different request (422), and the retry for A
/// still gets A's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nested_router_fingerprints_the_path_the_client_sent() {
    let engine = Arc::new(Engine::new(MemoryStore::new()));
    let (accounts, transfers) = counted("/transfers", (StatusCode::CREATED, "transferred"));
    let accounts = accounts.layer(IdempotencyLayer::new(engine, single_client_scope));
    let app: Router = Router::new().nest("/accounts/{id}", accounts);
    let a = send(&app, "/accounts/A/transfers", "k", "{\"amount\":5}").await;
    assert_eq!(answer(a).await, (201, None, false));
    let b = send(&app, "/accounts/B/transfers", "k", "{\"amount\":5}").await;
    assert_eq!(answer(b).await, (422, reused(), false), "B got A's answer");
    let a_again = send(&app, "/accounts/A/transfers", "k", "{\"amount\":5}").await;
    assert_eq!(answer(a_again).await, (201, None, true));
    assert_eq!(transfers.load(Ordering::SeqCst), 1);
}

/// The same with `nest_service`: one protected service mounted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nest_service_fingerprints_the_path_the_client_sent() {
    let engine = Arc::new(Engine::new(MemoryStore::new()));
    let calls = Arc::new(AtomicUsize::new(0));
    let service = tower::ServiceBuilder::new()
        .layer(IdempotencyLayer::new(engine, single_client_scope))
        .service(service_fn({
            let calls = calls.clone();
            move |_: Request<Body>| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Ok::<_, Infallible>(Response::new(Body::from("done"))) }
            }
        }));
    let app: Router = Router::new()
        .nest_service("/v1", service.clone())
        .nest_service("/v2", service);
    let first = send(&app, "/v1/pay", "k", "{}").await;
    assert_eq!(answer(first).await, (200, None, false));
    let other = send(&app, "/v2/pay", "k", "{}").await;
    assert_eq!(answer(other).await, (422, reused(), false));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// Situation 3: a store whose record limit (1 KiB) is below the engine's
/// `max_outcome_bytes` (8 MiB). A 4 KiB response goes to the first client in
/// full; the key is completed with the `response-not-stored` marker, so the
/// retry gets that marker and the handler does not run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_too_large_for_the_store_completes_with_the_marker() {
    let store = SqliteStore::builder()
        .with_max_record_bytes(1024)
        .open_in_memory()
        .unwrap();
    let engine = Arc::new(Engine::new(store));
    assert_eq!(
        engine.outcome_limit(),
        1024 - idem_core::store::codec::RECORD_OVERHEAD
    );
    let (app, calls) = counted("/report", "x".repeat(4096));
    let app = app.layer(IdempotencyLayer::new(engine, single_client_scope));
    let first = send(&app, "/report", "k", "{}").await;
    assert_eq!(first.status(), 200);
    let body = first.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.len(), 4096, "the first client gets the whole response");
    let retry = send(&app, "/report", "k", "{}").await;
    assert_eq!(
        answer(retry).await,
        (
            500,
            Some(ProblemType::ResponseNotStored.uri().to_owned()),
            true
        )
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// `Retry-After` settings at `Duration::MAX` are capped, not overflowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extreme_retry_after_settings_are_capped() {
    let engine = Arc::new(Engine::new(MemoryStore::new()));
    let entered = Arc::new(Notify::new());
    let go = Arc::new(Notify::new());
    let app: Router = Router::new()
        .route(
            "/slow",
            post({
                let (entered, go) = (entered.clone(), go.clone());
                move || async move {
                    entered.notify_one();
                    go.notified().await;
                    "done"
                }
            }),
        )
        .layer(
            IdempotencyLayer::builder(engine, single_client_scope)
                .max_retry_after(Duration::MAX)
                .store_retry_after(Duration::MAX)
                .build(),
        );
    let first = tokio::spawn(app.clone().oneshot(post_to("/slow", "k", "{}")));
    entered.notified().await;
    let dup = send(&app, "/slow", "k", "{}").await;
    assert_eq!(dup.status(), 409);
    let retry_after: u64 = dup.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "Retry-After {retry_after}");
    go.notify_one();
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
    assert_eq!(idem_tower::MAX_RETRY_AFTER, Duration::from_secs(86_400));
}

/// Graceful shutdown of the layer: new keyed requests get 503
/// `shutting-down` and do not run; a running handler finishes and its
/// answer is stored; the retry gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_running_handlers_and_refuses_new_ones() {
    let engine = Arc::new(Engine::new(MemoryStore::new()));
    let effects = Arc::new(AtomicUsize::new(0));
    let (entered, go) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let layer = IdempotencyLayer::new(engine, single_client_scope);
    let app: Router = Router::new()
        .route(
            "/pay",
            post({
                let (entered, go, effects) = (entered.clone(), go.clone(), effects.clone());
                move || async move {
                    effects.fetch_add(1, Ordering::SeqCst);
                    entered.notify_one();
                    go.notified().await;
                    (StatusCode::CREATED, "paid")
                }
            }),
        )
        .layer(layer.clone());
    let running = tokio::spawn(app.clone().oneshot(post_to("/pay", "a", "{}")));
    entered.notified().await;
    let shutdown = tokio::spawn({
        let layer = layer.clone();
        async move { layer.shutdown(Duration::from_secs(30)).await }
    });
    while !layer.engine().is_shutting_down() {
        tokio::task::yield_now().await;
    }
    let refused = send(&app, "/pay", "b", "{}").await;
    let (status, kind, _) = answer(refused).await;
    assert_eq!(
        (status, kind),
        (503, Some(ProblemType::ShuttingDown.uri().to_owned()))
    );
    go.notify_one();
    assert_eq!(running.await.unwrap().unwrap().status(), 201);
    let report = shutdown.await.unwrap();
    assert_eq!(
        (report.running, report.finished, report.marked_unknown),
        (1, 1, 0)
    );
    assert_eq!(effects.load(Ordering::SeqCst), 1, "the refused request ran");
}

/// A handler written with phases (`IdempotencyClaim::phases`) that fails
/// after its external phase: the 5xx does not end the key as
/// outcome-unknown; the retry resumes after the recorded phase (the effect
/// is not repeated) and its answer is then replayed.
#[tokio::test]
async fn a_phased_handler_that_fails_after_a_phase_is_resumed_by_the_retry() {
    use axum::Extension;
    use idem_tower::IdempotencyClaim;

    let charges = Arc::new(AtomicUsize::new(0));
    let runs = Arc::new(AtomicUsize::new(0));
    let (c, r) = (charges.clone(), runs.clone());
    let route = post(move |Extension(claim): Extension<IdempotencyClaim>| {
        let (charges, runs) = (c.clone(), r.clone());
        async move {
            let run = runs.fetch_add(1, Ordering::SeqCst);
            let mut phases = claim.phases().unwrap();
            let charge: String = phases
                .external("charge", |key| async move {
                    charges.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, std::io::Error>(format!("ch_{}", &key[5..13]))
                })
                .await
                .unwrap();
            if run == 0 {
                // The receipt step fails after the charge was recorded.
                return (StatusCode::INTERNAL_SERVER_ERROR, "receipt failed").into_response();
            }
            (StatusCode::CREATED, charge).into_response()
        }
    });
    let engine = Arc::new(Engine::new(MemoryStore::new()));
    let app = Router::new()
        .route("/orders", route)
        .layer(IdempotencyLayer::new(engine, single_client_scope));

    let first = send(&app, "/orders", "\"o-1\"", "{}").await;
    assert_eq!(answer(first).await, (500, None, false));
    let second = send(&app, "/orders", "\"o-1\"", "{}").await;
    assert_eq!(second.status(), StatusCode::CREATED);
    assert!(!second.headers().contains_key("idempotent-replayed"));
    let body = second.into_body().collect().await.unwrap().to_bytes();
    let third = send(&app, "/orders", "\"o-1\"", "{}").await;
    assert_eq!(third.status(), StatusCode::CREATED);
    assert!(third.headers().contains_key("idempotent-replayed"));
    assert_eq!(third.into_body().collect().await.unwrap().to_bytes(), body);
    assert_eq!(charges.load(Ordering::SeqCst), 1, "the charge ran once");
    assert_eq!(runs.load(Ordering::SeqCst), 2, "the handler ran twice");
}
