//! Shared test fixtures: a store with failure switches, an axum app
//! with counting handlers, and a server on 127.0.0.1:0.
#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Router};
use idem_conformance::faulty::{Fault, FaultKind, FaultyStore, Op};
use idem_core::store::{Revision, State as KeyState, Store, SwapOutcome, Versioned};
use idem_core::{
    Clock, Engine, Error, IdempotencyKey, MemoryStore, RecordKey, Scope, Timestamp, Transition,
};
use idem_tower::{IdempotencyClaim, IdempotencyLayerBuilder, Rejection};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

/// A [`MemoryStore`] behind idem-conformance's [`FaultyStore`]: a test
/// switches it off ([`switch_off`]: every call fails as unavailable) or
/// fails only its compare-and-swap ([`fail_cas`]: completion, heartbeat).
pub type TestStore = FaultyStore<MemoryStore>;

/// A new, empty [`TestStore`].
pub fn test_store() -> TestStore {
    FaultyStore::new(MemoryStore::new()).with_name("test")
}

/// Makes every call of `store` fail as unavailable, until [`switch_on`].
pub fn switch_off(store: &TestStore) {
    for op in Op::ALL {
        store.inject(Fault::new(op, FaultKind::Unavailable));
    }
}

/// Undoes [`switch_off`] and [`fail_cas`].
pub fn switch_on(store: &TestStore) {
    store.clear();
}

/// Makes every compare-and-swap of `store` fail as unavailable.
pub fn fail_cas(store: &TestStore) {
    store.inject(Fault::new(Op::CompareAndSwap, FaultKind::Unavailable));
}

/// Applies a transition the way the SQL stores do inside a transaction:
/// replace the record if it is in flight under the transition's token.
pub async fn apply(store: &TestStore, t: &Transition) -> Result<(), Error> {
    let (store, now) = (store.inner(), t.next.record.updated_at);
    let Some(current) = store.get(&t.key, now).await? else {
        return Err(Error::LeaseLost(idem_core::machine::Fenced::Expired));
    };
    current
        .record
        .check_holder(t.token, now)
        .map_err(Error::LeaseLost)?;
    match store
        .compare_and_swap(&t.key, &current, &t.next, now)
        .await?
    {
        SwapOutcome::Swapped => Ok(()),
        SwapOutcome::Conflict(_) => Err(Error::Contention),
    }
}

/// What the handlers share with the test.
#[derive(Clone)]
pub struct App {
    pub calls: Arc<AtomicUsize>,
    pub entered: Arc<Notify>,
    pub gate: watch::Receiver<bool>,
    pub store: TestStore,
    pub prepared: Arc<Mutex<Option<Revision>>>,
}

fn tenant(headers: &HeaderMap) -> String {
    headers
        .get("x-tenant")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// 201 with a JSON body naming the execution, custom headers and a cookie.
async fn charge(State(app): State<App>, headers: HeaderMap, body: Bytes) -> Response {
    let n = app.calls.fetch_add(1, Ordering::SeqCst) + 1;
    let json = serde_json::json!({
        "execution": n,
        "tenant": tenant(&headers),
        "echo": String::from_utf8_lossy(&body),
    });
    (
        StatusCode::CREATED,
        [
            (header::CONTENT_TYPE, "application/json".to_owned()),
            (
                header::HeaderName::from_static("x-execution"),
                n.to_string(),
            ),
            (header::SET_COOKIE, "sid=secret".to_owned()),
        ],
        json.to_string(),
    )
        .into_response()
}

/// Answers with the status in the path.
async fn status(State(app): State<App>, Path(code): Path<u16>) -> Response {
    let n = app.calls.fetch_add(1, Ordering::SeqCst) + 1;
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::IM_A_TEAPOT);
    (status, format!("status {code}, execution {n}")).into_response()
}

/// Signals `entered`, then waits for the gate to open.
async fn slow(State(app): State<App>) -> Response {
    let n = app.calls.fetch_add(1, Ordering::SeqCst) + 1;
    app.entered.notify_one();
    let mut gate = app.gate.clone();
    let _ = gate.wait_for(|open| *open).await;
    (StatusCode::OK, format!("slow execution {n}")).into_response()
}

/// 4096 bytes.
async fn big(State(app): State<App>) -> Response {
    app.calls.fetch_add(1, Ordering::SeqCst);
    (StatusCode::CREATED, "x".repeat(4096)).into_response()
}

/// Completes the key "inside its transaction" through the claim.
async fn tx(
    State(app): State<App>,
    Extension(claim): Extension<IdempotencyClaim>,
    body: Bytes,
) -> Response {
    let n = app.calls.fetch_add(1, Ordering::SeqCst) + 1;
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert("x-execution", HeaderValue::from(n));
    headers.insert(
        "x-claim-key",
        HeaderValue::from_str(claim.key().as_str()).unwrap_or(HeaderValue::from_static("?")),
    );
    headers.insert("x-claim-attempt", HeaderValue::from(claim.attempt()));
    let body = serde_json::json!({
        "execution": n,
        "tenant": claim.scope().tenant_id(),
        "echo": String::from_utf8_lossy(&body),
    })
    .to_string();
    let Ok(done) = claim.prepare_response(StatusCode::CREATED, &headers, body.as_bytes()) else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    // BEGIN; business write; apply; COMMIT.
    if apply(&app.store, &done).await.is_err() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    *app.prepared.lock().unwrap_or_else(|e| e.into_inner()) = Some(done.next.revision);
    (StatusCode::CREATED, headers, body).into_response()
}

pub fn router(app: App) -> Router {
    Router::new()
        .route(
            "/charge",
            post(charge).get(charge).put(charge).patch(charge),
        )
        .route("/status/{code}", post(status))
        .route("/slow", post(slow))
        .route("/big", post(big))
        .route("/tx", post(tx))
        .with_state(app)
}

/// The test scope: the `x-tenant` header (tests only: a real service takes
/// the authenticated principal).
pub fn tenant_scope(parts: &axum::http::request::Parts) -> Result<Scope, Rejection> {
    parts
        .headers
        .get("x-tenant")
        .and_then(|v| v.to_str().ok())
        .map(Scope::tenant)
        .ok_or_else(|| Rejection::new(StatusCode::UNAUTHORIZED, "no tenant"))
}

pub struct Harness<C: Clock> {
    pub base: String,
    pub http: reqwest::Client,
    pub app: App,
    pub engine: Arc<Engine<TestStore, C>>,
    pub open: watch::Sender<bool>,
}

pub async fn serve(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    addr
}

pub fn app(store: TestStore) -> (App, watch::Sender<bool>) {
    let (open, gate) = watch::channel(false);
    let app = App {
        calls: Arc::new(AtomicUsize::new(0)),
        entered: Arc::new(Notify::new()),
        gate,
        store,
        prepared: Arc::new(Mutex::new(None)),
    };
    (app, open)
}

/// Serves the test app behind the layer configured by `configure`.
pub async fn start<C: Clock>(
    engine: Engine<TestStore, C>,
    configure: impl FnOnce(
        IdempotencyLayerBuilder<TestStore, C>,
    ) -> IdempotencyLayerBuilder<TestStore, C>,
) -> Harness<C> {
    let engine = Arc::new(engine);
    let (app, open) = app(engine.store().clone());
    let layer = configure(idem_tower::IdempotencyLayer::builder(
        engine.clone(),
        tenant_scope,
    ))
    .build();
    let addr = serve(router(app.clone()).layer(layer)).await;
    Harness {
        base: format!("http://{addr}"),
        http: reqwest::Client::new(),
        app,
        engine,
        open,
    }
}

pub fn engine(store: TestStore) -> Engine<TestStore> {
    Engine::new(store)
}

impl<C: Clock> Harness<C> {
    pub fn calls(&self) -> usize {
        self.app.calls.load(Ordering::SeqCst)
    }

    pub fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        key: Option<&[u8]>,
        tenant: &str,
        body: &str,
    ) -> reqwest::RequestBuilder {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header("x-tenant", tenant)
            .body(body.to_owned());
        if let Some(key) = key {
            req = req.header("idempotency-key", HeaderValue::from_bytes(key).unwrap());
        }
        req
    }

    pub async fn post(&self, path: &str, key: Option<&str>, tenant: &str, body: &str) -> Reply {
        Reply::of(
            self.request(
                reqwest::Method::POST,
                path,
                key.map(str::as_bytes),
                tenant,
                body,
            )
            .send()
            .await
            .unwrap(),
        )
        .await
    }

    /// Starts a POST of `key` to `/slow` (tenant t1) in a task of its own:
    /// its handler waits for [`open`](Self::open).
    pub fn spawn_slow(&self, key: &str) -> JoinHandle<Reply> {
        let req = self.request(
            reqwest::Method::POST,
            "/slow",
            Some(key.as_bytes()),
            "t1",
            "",
        );
        tokio::spawn(async move { Reply::of(req.send().await.unwrap()).await })
    }

    /// Lets the `/slow` handler of `first` (for `key`) finish: it answers
    /// 200, a retry replays its body, and the handler ran once in all.
    pub async fn finish_slow(&self, first: JoinHandle<Reply>, key: &str) {
        self.open.send(true).unwrap();
        let first = first.await.unwrap();
        assert_eq!(first.status, 200);
        let replay = self.post("/slow", Some(key), "t1", "").await;
        assert!(replay.replayed());
        assert_eq!(replay.body, first.body);
        assert_eq!(self.calls(), 1);
    }

    pub async fn record(&self, tenant: &str, key: &str) -> Option<Versioned> {
        let rk = RecordKey::new(&Scope::tenant(tenant), &IdempotencyKey::parse(key).unwrap());
        self.engine
            .store()
            .inner()
            .get(&rk, self.engine.clock().now())
            .await
            .unwrap()
    }
}

/// A response read in full.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    pub async fn of(r: reqwest::Response) -> Self {
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let body = r.bytes().await.unwrap().to_vec();
        Self {
            status,
            headers,
            body,
        }
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    pub fn replayed(&self) -> bool {
        self.header("idempotent-replayed") == Some("true")
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
    /// The problem `type` of a problem+json body.
    pub fn problem(&self) -> String {
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "{self:?}"
        );
        self.json()["type"].as_str().unwrap().to_owned()
    }
}

/// Polls `check` until it holds, failing after 10 s of wall time.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::task::yield_now().await;
    }
}

pub fn in_flight_deadline(v: &Versioned) -> Option<Timestamp> {
    match v.record.state {
        KeyState::InFlight { lease_deadline, .. } => Some(lease_deadline),
        _ => None,
    }
}
