//! The layer as a tower service (`oneshot`), for what HTTP cannot show
//! directly: panics, inner errors, dropped futures, streamed bodies, trailers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, Request, Response};
use common::{TestStore, engine, eventually, tenant_scope, test_store};
use futures_util::FutureExt as _;
use http_body::Frame;
use http_body_util::BodyExt as _;
use idem_core::store::Store;
use idem_core::{Clock, IdempotencyKey, RecordKey, Scope};
use idem_tower::{IdempotencyClaim, IdempotencyLayer, ProblemType};
use tokio::sync::Notify;
use tower::util::ServiceFn;
use tower::{Layer, ServiceExt, service_fn};

/// A request for `key` with an empty JSON body.
fn post(key: &str) -> Request<Body> {
    request(key, Body::from("{}"))
}

fn request(key: &str, body: Body) -> Request<Body> {
    Request::post("/x")
        .header("idempotency-key", key)
        .header("x-tenant", "t1")
        .body(body)
        .unwrap()
}

async fn is_absent<C: Clock>(engine: &idem_core::Engine<TestStore, C>, key: &str) -> bool {
    state_of(engine, key).await.is_none()
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

/// The state the key was left in (`None`: absent).
async fn state_of<C: Clock>(
    engine: &idem_core::Engine<TestStore, C>,
    key: &str,
) -> Option<&'static str> {
    let rk = RecordKey::new(&Scope::tenant("t1"), &IdempotencyKey::parse(key).unwrap());
    engine
        .store()
        .get(&rk, engine.clock().now())
        .await
        .unwrap()
        .map(|v| v.record.state.name())
}

/// The status and problem `type` (if any) of a response.
async fn answer(response: Response<idem_tower::ResponseBody<Body>>) -> (u16, Option<String>) {
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let kind = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["type"].as_str().map(str::to_owned));
    (status, kind)
}

/// A handler that counts its calls and answers what `answer` gives for the
/// request and the number of calls before it; and its count.
fn counting<A, Fut, E>(
    answer: A,
) -> (
    Arc<AtomicUsize>,
    ServiceFn<impl FnMut(Request<Body>) -> Fut + Clone>,
)
where
    A: Fn(usize, Request<Body>) -> Fut + Clone,
    Fut: Future<Output = Result<Response<Body>, E>>,
{
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let inner = service_fn(move |req| answer(counted.fetch_add(1, Ordering::SeqCst), req));
    (calls, inner)
}

fn unknown() -> Option<String> {
    Some(ProblemType::OutcomeUnknown.uri().to_owned())
}

/// Situation: the handler panics after (maybe) an effect. The panic goes
/// on; the key ends as outcome unknown; the retry does not run the handler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_ends_the_key_unknown_and_the_panic_goes_on() {
    let engine = Arc::new(engine(test_store()));
    let (calls, inner) = counting(|_, _| async {
        panic!("handler bug after the charge");
        #[allow(unreachable_code)]
        Ok::<_, Infallible>(Response::new(Body::empty()))
    });
    let svc = IdempotencyLayer::new(engine.clone(), tenant_scope).layer(inner);
    let outcome = AssertUnwindSafe(svc.clone().oneshot(post("p")))
        .catch_unwind()
        .await;
    assert!(outcome.is_err(), "the panic was swallowed");
    assert_eq!(state_of(&engine, "p").await, Some("failed_unknown"));
    let retry = svc.oneshot(post("p")).await.unwrap();
    assert_eq!(answer(retry).await, (500, unknown()));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the retry ran the handler again"
    );
}

/// A handler that declared "no effect" before it failed (error or panic)
/// releases the key: the retry runs afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_no_effect_failures_release_the_key() {
    let engine = Arc::new(engine(test_store()));
    let (calls, inner) = counting(|n, req| {
        let claim = req.extensions().get::<IdempotencyClaim>().cloned().unwrap();
        async move {
            claim.declare_no_effect();
            match n {
                0 => Err("dependency down before anything was written"),
                1 => panic!("bug before anything was written"),
                _ => Ok(Response::new(Body::from("done"))),
            }
        }
    });
    let svc = IdempotencyLayer::new(engine.clone(), tenant_scope).layer(inner);
    let err = svc.clone().oneshot(post("n")).await.unwrap_err();
    assert_eq!(err, "dependency down before anything was written");
    assert_eq!(state_of(&engine, "n").await, None);
    let panicked = AssertUnwindSafe(svc.clone().oneshot(post("n")))
        .catch_unwind()
        .await;
    assert!(panicked.is_err());
    assert_eq!(state_of(&engine, "n").await, None);
    let ok = svc.clone().oneshot(post("n")).await.unwrap();
    assert_eq!(answer(ok).await.0, 200);
    let replay = svc.oneshot(post("n")).await.unwrap();
    assert!(replay.headers().contains_key("idempotent-replayed"));
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

/// Situation: the inner service returns an error: it is returned unchanged,
/// the key ends as outcome unknown, the retry does not run the handler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inner_error_ends_the_key_unknown_and_is_returned() {
    let engine = Arc::new(engine(test_store()));
    let (calls, inner) = counting(|_, _| async { Err("boom") });
    let svc = IdempotencyLayer::new(engine.clone(), tenant_scope).layer(inner);
    let err = svc.clone().oneshot(post("e")).await.unwrap_err();
    assert_eq!(err, "boom");
    assert_eq!(state_of(&engine, "e").await, Some("failed_unknown"));
    let retry = svc.oneshot(post("e")).await.unwrap();
    assert_eq!(answer(retry).await, (500, unknown()));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// A handler whose effect happens after `go` is notified, counting effects.
fn gated_handler(
    entered: Arc<Notify>,
    go: Arc<Notify>,
    effects: Arc<AtomicUsize>,
) -> impl tower::Service<
    Request<Body>,
    Response = Response<Body>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    service_fn(move |_: Request<Body>| {
        let (entered, go, effects) = (entered.clone(), go.clone(), effects.clone());
        async move {
            entered.notify_one();
            go.notified().await;
            effects.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Infallible>(
                Response::builder()
                    .status(201)
                    .body(Body::from("charged"))
                    .unwrap(),
            )
        }
    })
}

/// Situation 1: the request's future is dropped (client gone, an outer
/// timeout) while the handler runs. The handler runs to completion, its
/// response is stored, and the retry gets it: the effect happens once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_request_runs_to_completion_and_the_retry_gets_its_answer() {
    let engine = Arc::new(engine(test_store()));
    let (entered, go, effects) = (
        Arc::new(Notify::new()),
        Arc::new(Notify::new()),
        Arc::new(AtomicUsize::new(0)),
    );
    let inner = gated_handler(entered.clone(), go.clone(), effects.clone());
    let svc = IdempotencyLayer::new(engine.clone(), tenant_scope).layer(inner);
    let task = tokio::spawn(svc.clone().oneshot(post("d")));
    entered.notified().await;
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    let meanwhile = svc.clone().oneshot(post("d")).await.unwrap();
    assert_eq!(
        answer(meanwhile).await,
        (409, Some(ProblemType::RequestInProgress.uri().to_owned())),
        "a retry while the handler still runs gets 409"
    );
    go.notify_one();
    eventually(
        "the dropped request's handler to complete the key",
        || async { state_of(&engine, "d").await == Some("completed") },
    )
    .await;
    let retry = svc.oneshot(post("d")).await.unwrap();
    assert!(retry.headers().contains_key("idempotent-replayed"));
    assert_eq!(answer(retry).await, (201, None));
    assert_eq!(effects.load(Ordering::SeqCst), 1, "the effect ran twice");
}

/// `release_on_cancel(true)` (opt-in, for handlers without external effects)
/// keeps the old behaviour: a dropped request stops its handler and releases
/// the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_on_cancel_releases_a_dropped_request() {
    let engine = Arc::new(engine(test_store()));
    let (entered, go, effects) = (
        Arc::new(Notify::new()),
        Arc::new(Notify::new()),
        Arc::new(AtomicUsize::new(0)),
    );
    let inner = gated_handler(entered.clone(), go, effects.clone());
    let svc = IdempotencyLayer::builder(engine.clone(), tenant_scope)
        .release_on_cancel(true)
        .build()
        .layer(inner);
    let task = tokio::spawn(svc.oneshot(post("r")));
    entered.notified().await;
    assert!(!is_absent(&engine, "r").await, "the key is claimed");
    task.abort();
    eventually("the key to be released", || is_absent(&engine, "r")).await;
    assert_eq!(
        effects.load(Ordering::SeqCst),
        0,
        "the handler was not stopped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_body_over_the_limit_is_413() {
    let engine = Arc::new(engine(test_store()));
    let (calls, inner) =
        counting(|_, _| async { Ok::<_, Infallible>(Response::new(Body::empty())) });
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
    let engine = Arc::new(engine(test_store()));
    let inner = service_fn(|_: Request<Body>| async {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", HeaderValue::from_static("abc"));
        Ok::<_, Infallible>(Response::new(frames(&["par", "t"], Some(trailers), false)))
    });
    let svc = IdempotencyLayer::new(engine, tenant_scope).layer(inner);
    for replayed in [false, true] {
        let response = svc.clone().oneshot(post("t")).await.unwrap();
        assert_eq!(
            response.headers().contains_key("idempotent-replayed"),
            replayed
        );
        let collected = response.into_body().collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["x-checksum"], "abc");
        assert_eq!(collected.to_bytes(), "part");
    }
}

/// Situation 4: the response body fails mid-stream after the handler ran.
/// The error reaches the client; the key ends as outcome unknown and the
/// retry does not run the handler again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_body_that_fails_ends_the_key_unknown_and_the_error_goes_on() {
    let engine = Arc::new(engine(test_store()));
    let (calls, inner) = counting(|_, _| async {
        Ok::<_, Infallible>(Response::new(frames(&["partial"], None, true)))
    });
    let svc = IdempotencyLayer::new(engine.clone(), tenant_scope).layer(inner);
    let response = svc.clone().oneshot(post("f")).await.unwrap();
    assert_eq!(state_of(&engine, "f").await, Some("failed_unknown"));
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), "partial");
    assert!(body.frame().await.unwrap().is_err());
    let retry = svc.oneshot(post("f")).await.unwrap();
    assert_eq!(answer(retry).await, (500, unknown()));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the retry ran the handler again"
    );
}

/// A `MemoryStore` whose next claim is written, then held before its reply
/// returns (a slow store, or a reply still on the wire), until `go`.
#[derive(Clone, Default)]
struct SlowClaim {
    inner: idem_core::MemoryStore,
    hold_next: Arc<std::sync::atomic::AtomicBool>,
    written: Arc<Notify>,
    go: Arc<Notify>,
}

#[async_trait::async_trait]
impl Store for SlowClaim {
    fn capabilities(&self) -> idem_core::store::Capabilities {
        self.inner.capabilities()
    }
    async fn insert_if_absent(
        &self,
        key: &RecordKey,
        record: &idem_core::store::Versioned,
        now: idem_core::Timestamp,
    ) -> Result<idem_core::store::InsertOutcome, idem_core::StoreError> {
        let outcome = self.inner.insert_if_absent(key, record, now).await;
        if self.hold_next.swap(false, Ordering::SeqCst) {
            self.written.notify_one();
            self.go.notified().await;
        }
        outcome
    }
    async fn get(
        &self,
        key: &RecordKey,
        now: idem_core::Timestamp,
    ) -> Result<Option<idem_core::store::Versioned>, idem_core::StoreError> {
        self.inner.get(key, now).await
    }
    async fn compare_and_swap(
        &self,
        key: &RecordKey,
        expected: &idem_core::store::Versioned,
        record: &idem_core::store::Versioned,
        now: idem_core::Timestamp,
    ) -> Result<idem_core::store::SwapOutcome, idem_core::StoreError> {
        self.inner
            .compare_and_swap(key, expected, record, now)
            .await
    }
    async fn delete_if(
        &self,
        key: &RecordKey,
        expected: &idem_core::store::Versioned,
        now: idem_core::Timestamp,
    ) -> Result<bool, idem_core::StoreError> {
        self.inner.delete_if(key, expected, now).await
    }
    async fn purge_expired(
        &self,
        now: idem_core::Timestamp,
        limit: usize,
    ) -> Result<u64, idem_core::StoreError> {
        self.inner.purge_expired(now, limit).await
    }
    async fn abandoned(
        &self,
        now: idem_core::Timestamp,
        limit: usize,
    ) -> Result<Vec<idem_core::store::Versioned>, idem_core::StoreError> {
        self.inner.abandoned(now, limit).await
    }
}

/// A client that gives up while its claim is on the way to the store (a
/// cut connection, a client timeout) must not leave the key claimed by
/// nobody: the claim is released once written, and the retry runs at once
/// instead of getting `409` for a whole lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_dropped_while_claiming_releases_its_claim() {
    let store = SlowClaim::default();
    store.hold_next.store(true, Ordering::SeqCst);
    let engine = Arc::new(idem_core::Engine::new(store.clone()));
    let (calls, inner) =
        counting(|_, _| async { Ok::<_, Infallible>(Response::new(Body::from("done"))) });
    let svc = IdempotencyLayer::new(engine.clone(), tenant_scope).layer(inner);
    let task = tokio::spawn(svc.clone().oneshot(post("d")));
    store.written.notified().await;
    let rk = RecordKey::new(&Scope::tenant("t1"), &IdempotencyKey::parse("d").unwrap());
    let now = || engine.clock().now();
    assert!(
        store.inner.get(&rk, now()).await.unwrap().is_some(),
        "claimed"
    );
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    store.go.notify_one();
    eventually("the orphan claim to be released", || async {
        store.inner.get(&rk, now()).await.unwrap().is_none()
    })
    .await;
    assert_eq!(calls.load(Ordering::SeqCst), 0, "nothing ran");
    let retry = svc.oneshot(post("d")).await.unwrap();
    assert_eq!(retry.status(), 200, "the retry runs at once, no 409");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}
