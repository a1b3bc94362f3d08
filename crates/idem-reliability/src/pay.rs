//! A payment app with one fixed scope, for the tests that speak raw
//! HTTP/1.1 to the layer (bad input, slow bodies): no authentication, and
//! counters outside the handlers.
//!
//! | route | what it does |
//! |---|---|
//! | `POST /pay` | parses a JSON payment (`{"amount": …, "currency": …}`; a body that does not parse is the router's 4xx), counts an execution, answers 201 `{"execution": n, "amount": …}` |
//! | `POST /big/{n}` | counts an execution, answers 201 with `n` bytes of `x` |
//! | `POST /slow` | counts an execution, signals [`PayApp::entered`], waits for [`PayApp::open_gate`], answers 201 |
//!
//! [`PayApp::router`] puts the idempotency layer over these routes, a
//! counter of the requests that reach the router inside it
//! ([`PayApp::inner_calls`]) and a counter of the body bytes the layer
//! reads outside it ([`PayApp::body_bytes_read`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{Request, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use http_body_util::BodyExt as _;
use idem_core::store::{Store, Versioned};
use idem_core::{Clock, Engine, Policy, RecordKey, Scope};
use idem_tower::IdempotencyLayer;
use tokio::sync::Notify;

/// A payment request body.
#[derive(serde::Deserialize)]
struct Payment {
    amount: u64,
    #[allow(dead_code)]
    currency: String,
}

/// The app: its engine and counters. Clones share them.
#[derive(Clone)]
pub struct PayApp {
    engine: Arc<Engine<Arc<dyn Store>>>,
    scope: Scope,
    max_body: usize,
    counters: Arc<Counters>,
}

#[derive(Default)]
struct Counters {
    /// Request body bytes the layer has read.
    read: AtomicUsize,
    /// Requests that reached the router.
    inner: AtomicUsize,
    /// Handler executions.
    executed: AtomicUsize,
    /// `/slow` signals here once it has counted its execution.
    entered: Notify,
    /// `/slow` waits here.
    gate: Notify,
}

impl PayApp {
    /// The app over `store`: every request in `scope`, bodies up to
    /// `max_body` bytes, an engine with `policy`.
    pub fn new(store: Arc<dyn Store>, scope: Scope, policy: Policy, max_body: usize) -> Self {
        let engine = crate::engine::engine(store, idem_core::SystemClock, policy);
        Self {
            engine: Arc::new(engine),
            scope,
            max_body,
            counters: Arc::default(),
        }
    }

    /// The engine.
    pub fn engine(&self) -> &Engine<Arc<dyn Store>> {
        &self.engine
    }

    /// How many times a handler ran.
    pub fn executions(&self) -> usize {
        self.counters.executed.load(Ordering::SeqCst)
    }

    /// How many requests reached the router (under the layer) at all.
    pub fn inner_calls(&self) -> usize {
        self.counters.inner.load(Ordering::SeqCst)
    }

    /// How many request body bytes the layer has read.
    pub fn body_bytes_read(&self) -> usize {
        self.counters.read.load(Ordering::SeqCst)
    }

    /// Notified when `/slow` has counted its execution (register with
    /// `notified()` before sending the request).
    pub fn entered(&self) -> &Notify {
        &self.counters.entered
    }

    /// Lets one waiting `/slow` answer.
    pub fn open_gate(&self) {
        self.counters.gate.notify_one();
    }

    /// What the store holds for `key` (in the app's scope).
    pub async fn stored(&self, key: &str) -> Option<Versioned> {
        let rk = RecordKey::new(&self.scope, &crate::engine::key(key));
        let now = self.engine.clock().now();
        self.engine
            .store()
            .get(&rk, now)
            .await
            .expect("read the store")
    }

    /// The routes under the layer, with both counters.
    pub fn router(&self) -> Router {
        let counters = self.counters.clone();
        let inner = middleware::from_fn(move |req: Request<Body>, next: Next| {
            counters.inner.fetch_add(1, Ordering::SeqCst);
            next.run(req)
        });
        let scope = self.scope.clone();
        let layer =
            IdempotencyLayer::builder(self.engine.clone(), move |_: &http::request::Parts| {
                Ok(scope.clone())
            })
            .max_body_bytes(self.max_body)
            .build();
        let counters = self.counters.clone();
        let read = middleware::from_fn(move |req: Request<Body>, next: Next| {
            let counters = counters.clone();
            let (parts, body) = req.into_parts();
            let body = body.map_frame(move |frame| {
                if let Some(data) = frame.data_ref() {
                    counters.read.fetch_add(data.len(), Ordering::SeqCst);
                }
                frame
            });
            next.run(Request::from_parts(parts, Body::new(body)))
        });
        Router::new()
            .route("/pay", post(pay))
            .route("/big/{n}", post(big))
            .route("/slow", post(slow))
            .with_state(self.clone())
            .layer(inner)
            .layer(layer)
            .layer(read)
    }

    fn execute(&self) -> usize {
        self.counters.executed.fetch_add(1, Ordering::SeqCst) + 1
    }
}

async fn pay(State(app): State<PayApp>, axum::Json(p): axum::Json<Payment>) -> Response {
    let n = app.execute();
    let body = serde_json::json!({"execution": n, "amount": p.amount});
    (StatusCode::CREATED, axum::Json(body)).into_response()
}

async fn big(State(app): State<PayApp>, Path(n): Path<usize>) -> Response {
    app.execute();
    (StatusCode::CREATED, vec![b'x'; n]).into_response()
}

async fn slow(State(app): State<PayApp>) -> Response {
    let n = app.execute();
    app.counters.entered.notify_one();
    app.counters.gate.notified().await;
    (StatusCode::CREATED, format!("slow payment {n}")).into_response()
}
