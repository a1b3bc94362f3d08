//! The layer as a tower service (`oneshot`), for what HTTP cannot show
//! directly: panics, inner errors, dropped futures, streamed bodies, trailers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, Request, Response};
use common::{TestStore, engine, eventually, tenant_scope};
use futures_util::FutureExt as _;
use http_body::Frame;
use http_body_util::BodyExt as _;
use idem_core::{Clock, IdempotencyKey, RecordKey, Scope, Store};
use idem_tower::{IdempotencyLayer, ProblemType};
use tokio::sync::Notify;
use tower::{Layer, ServiceExt, service_fn};

fn request(key: &str, body: Body) -> Request<Body> {
    Request::post("/x")
        .header("idempotency-key", key)
        .header("x-tenant", "t1")
        .body(body)
        .unwrap()
}

async fn is_absent<C: Clock>(engine: &idem_core::Engine<TestStore, C>, key: &str) -> bool {
    let rk = RecordKey::new(&Scope::tenant("t1"), &IdempotencyKey::parse(key).unwrap());
    engine
        .store()
        .get(&rk, engine.clock().now())
        .await
        .unwrap()
        .is_none()
}

/// A body of given frames, with no size hint; `Err` after the frames if `fail`.
struct Frames {
    frames: VecDeque<Frame<Bytes>>,
    fail: bool,
}

impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(frame) = self.frames.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        if std::mem::take(&mut self.fail) {
            return Poll::Ready(Some(Err(std::io::Error::other("body broke"))));
        }
        Poll::Ready(None)
    }
}

fn frames(chunks: &[&'static str], trailers: Option<HeaderMap>, fail: bool) -> Body {
    let mut frames: VecDeque<_> = chunks
        .iter()
        .map(|c| Frame::data(Bytes::from_static(c.as_bytes())))
        .collect();
    if let Some(t) = trailers {
        frames.push_back(Frame::trailers(t));
    }
    Body::new(Frames { frames, fail })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_releases_the_key_and_the_panic_goes_on() {
    let engine = Arc::new(engine(TestStore::default()));
    let calls = Arc::new(AtomicUsize::new(0));
    let inner = service_fn({
        let calls = calls.clone();
        move |_: Request<Body>| {
            let calls = calls.clone();
            async move {
                if calls.fetch_add(1, Ordering::SeqCst) < 10 {
                    panic!("handler bug");
                }
                Ok::<_, Infallible>(Response::new(Body::empty()))
            }
        }
    });
    let svc = IdempotencyLayer::new(engine.clone(), tenant_scope).layer(inner);
    for round in 1..=2 {
        let outcome = AssertUnwindSafe(svc.clone().oneshot(request("p", Body::from("{}"))))
            .catch_unwind()
            .await;
        assert!(outcome.is_err(), "the panic was swallowed");
        assert!(is_absent(&engine, "p").await, "the key was not released");
        assert_eq!(calls.load(Ordering::SeqCst), round, "a retry runs again");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inner_error_releases_the_key_and_is_returned() {
    let engine = Arc::new(engine(TestStore::default()));
    let calls = Arc::new(AtomicUsize::new(0));
    let inner = service_fn({
        let calls = calls.clone();
        move |_: Request<Body>| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err::<Response<Body>, _>("boom") }
        }
    });
    let svc = IdempotencyLayer::new(engine.clone(), tenant_scope).layer(inner);
    for round in 1..=2 {
        let err = svc
            .clone()
            .oneshot(request("e", Body::from("{}")))
            .await
            .unwrap_err();
        assert_eq!(err, "boom");
        assert!(is_absent(&engine, "e").await);
        assert_eq!(calls.load(Ordering::SeqCst), round);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_request_releases_the_key() {
    let engine = Arc::new(engine(TestStore::default()));
    let entered = Arc::new(Notify::new());
    let inner = service_fn({
        let entered = entered.clone();
        move |_: Request<Body>| {
            let entered = entered.clone();
            async move {
                entered.notify_one();
                std::future::pending::<()>().await;
                Ok::<_, Infallible>(Response::new(Body::empty()))
            }
        }
    });
    let svc = IdempotencyLayer::new(engine.clone(), tenant_scope).layer(inner);
    let task = tokio::spawn(svc.oneshot(request("d", Body::from("{}"))));
    entered.notified().await;
    assert!(!is_absent(&engine, "d").await, "the key is claimed");
    task.abort();
    eventually("the key to be released", || is_absent(&engine, "d")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_body_over_the_limit_is_413() {
    let engine = Arc::new(engine(TestStore::default()));
    let calls = Arc::new(AtomicUsize::new(0));
    let inner = service_fn({
        let calls = calls.clone();
        move |_: Request<Body>| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, Infallible>(Response::new(Body::empty())) }
        }
    });
    let svc = IdempotencyLayer::builder(engine, tenant_scope)
        .max_body_bytes(10)
        .build()
        .layer(inner);
    let response = svc
        .clone()
        .oneshot(request("s", frames(&["12345", "67890", "1"], None, false)))
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    let ok = svc
        .clone()
        .oneshot(request("s", frames(&["12345", "67890"], None, false)))
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let unreadable = svc
        .oneshot(request("u", frames(&["12"], None, true)))
        .await
        .unwrap();
    assert_eq!(unreadable.status(), 400);
    let body = unreadable.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["type"], ProblemType::BodyUnreadable.uri());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_are_stored_and_replayed() {
    let engine = Arc::new(engine(TestStore::default()));
    let inner = service_fn(|_: Request<Body>| async {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", HeaderValue::from_static("abc"));
        Ok::<_, Infallible>(Response::new(frames(&["par", "t"], Some(trailers), false)))
    });
    let svc = IdempotencyLayer::new(engine, tenant_scope).layer(inner);
    for replayed in [false, true] {
        let response = svc
            .clone()
            .oneshot(request("t", Body::from("{}")))
            .await
            .unwrap();
        assert_eq!(
            response.headers().contains_key("idempotent-replayed"),
            replayed
        );
        let collected = response.into_body().collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["x-checksum"], "abc");
        assert_eq!(collected.to_bytes(), "part");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_body_that_fails_releases_the_key_and_the_error_goes_on() {
    let engine = Arc::new(engine(TestStore::default()));
    let inner = service_fn(|_: Request<Body>| async {
        Ok::<_, Infallible>(Response::new(frames(&["partial"], None, true)))
    });
    let svc = IdempotencyLayer::new(engine.clone(), tenant_scope).layer(inner);
    let response = svc.oneshot(request("f", Body::from("{}"))).await.unwrap();
    assert!(is_absent(&engine, "f").await);
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), "partial");
    assert!(body.frame().await.unwrap().is_err());
}
