//! The test server: an actix-web `HttpServer` on 127.0.0.1:0 in a thread
//! with its own actix `System`, behind the middleware, with handlers that
//! count their effects; the tests drive it with reqwest from a Tokio
//! runtime of their own.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use actix_web::body::BodyStream;
use actix_web::dev::ServerHandle;
use actix_web::http::{StatusCode, header};
use actix_web::{HttpRequest, HttpResponse, HttpServer, web};
use bytes::Bytes;
use idem_actix::{
    ClaimExt as _, Idempotency, IdempotencyBuilder, IdempotencyClaim, NoEffect, Rejection,
};
use idem_conformance::faulty::{Fault, FaultKind, FaultyStore, Op};
use idem_core::store::{State, Store, SwapOutcome};
use idem_core::{Clock, Engine, IdempotencyKey, MemoryStore, RecordKey, Scope, Transition};
use tokio::sync::{Notify, oneshot, watch};

/// A memory store with idem-conformance's fault switches.
pub type TestStore = FaultyStore<MemoryStore>;

/// Every store call fails as unavailable from now on.
pub fn store_down(store: &TestStore) {
    for op in Op::ALL {
        store.inject(Fault::new(op, FaultKind::Unavailable));
    }
}

/// What the handlers share with the test: effect counter, gate of `/slow`.
#[derive(Clone)]
pub struct Effects {
    /// The store under the engine (to switch it off).
    pub store: TestStore,
    /// Open: every `/slow` handler (now and later) finishes.
    pub gate: watch::Sender<bool>,
    /// Notified each time a `/slow` handler starts.
    pub entered: Arc<Notify>,
    runs: Arc<AtomicUsize>,
}

impl Effects {
    fn run(&self) -> usize {
        self.runs.fetch_add(1, Ordering::SeqCst) + 1
    }
}

fn tenant_of(req: &HttpRequest) -> Option<&str> {
    req.headers().get("x-tenant").and_then(|v| v.to_str().ok())
}

/// The tests' scope: the `x-tenant` header (a real service takes its
/// authenticated principal), 401 without it.
pub fn tenant_scope(req: &HttpRequest) -> Result<Scope, Rejection> {
    tenant_of(req)
        .map(Scope::tenant)
        .ok_or_else(|| Rejection::new(http::StatusCode::UNAUTHORIZED, "no tenant"))
}

/// 201, JSON naming the run, custom headers, a cookie.
async fn charge(fx: web::Data<Effects>, req: HttpRequest, body: web::Bytes) -> HttpResponse {
    let n = fx.run();
    let json = serde_json::json!({
        "run": n,
        "tenant": tenant_of(&req),
        "echo": String::from_utf8_lossy(&body),
    });
    HttpResponse::Created()
        .content_type("application/json")
        .insert_header(("x-run", n.to_string()))
        .insert_header((header::SET_COOKIE, "sid=secret"))
        .body(json.to_string())
}

/// The status in the path.
async fn status(fx: web::Data<Effects>, code: web::Path<u16>) -> HttpResponse {
    let n = fx.run();
    let status = StatusCode::from_u16(*code).unwrap_or(StatusCode::IM_A_TEAPOT);
    HttpResponse::build(status).body(format!("status {code}, run {n}"))
}

/// 503 declaring that nothing took effect.
async fn no_effect(fx: web::Data<Effects>) -> HttpResponse {
    fx.run();
    let mut res = HttpResponse::ServiceUnavailable().body("down, nothing done");
    res.extensions_mut().insert(NoEffect);
    res
}

/// Signals `entered`, then waits for the gate.
async fn slow(fx: web::Data<Effects>) -> HttpResponse {
    let n = fx.run();
    fx.entered.notify_one();
    let mut gate = fx.gate.subscribe();
    let _ = gate.wait_for(|open| *open).await;
    HttpResponse::Ok().body(format!("slow run {n}"))
}

/// 4096 bytes at once.
async fn big(fx: web::Data<Effects>) -> HttpResponse {
    fx.run();
    HttpResponse::Created().body(vec![b'x'; 4096])
}

/// 4096 bytes streamed in four chunks.
async fn big_stream(fx: web::Data<Effects>) -> HttpResponse {
    fx.run();
    let chunks = (0..4).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b'y'; 1024])));
    HttpResponse::Created().body(BodyStream::new(futures_util::stream::iter(chunks)))
}

/// A body that fails after its first chunk.
async fn broken(fx: web::Data<Effects>) -> HttpResponse {
    fx.run();
    let chunks = [
        Ok(Bytes::from_static(b"partial")),
        Err(std::io::Error::other("the body broke")),
    ];
    HttpResponse::Ok().body(BodyStream::new(futures_util::stream::iter(chunks)))
}

async fn panics(fx: web::Data<Effects>) -> HttpResponse {
    fx.run();
    panic!("planned panic in the handler");
}

/// Whether the handler got a claim, and what it says.
async fn claim(
    fx: web::Data<Effects>,
    claim: Option<web::ReqData<IdempotencyClaim>>,
) -> HttpResponse {
    let n = fx.run();
    let json = match claim {
        Some(claim) => serde_json::json!({
            "run": n,
            "key": claim.key().as_str(),
            "tenant": claim.scope().tenant_id(),
            "attempt": claim.attempt(),
        }),
        None => serde_json::json!({ "run": n, "key": null }),
    };
    HttpResponse::Ok().json(json)
}

/// Completes the key "in its transaction" through the claim.
async fn tx(
    fx: web::Data<Effects>,
    claim: web::ReqData<IdempotencyClaim>,
    body: web::Bytes,
) -> HttpResponse {
    let n = fx.run();
    let text = format!(
        "{{\"run\":{n},\"echo\":{:?}}}",
        String::from_utf8_lossy(&body)
    );
    let mut res = HttpResponse::with_body(StatusCode::CREATED, text);
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    res.headers_mut().insert(
        header::HeaderName::from_static("x-run"),
        header::HeaderValue::from(n),
    );
    let Ok(done) = claim.prepare_actix_response(&res) else {
        return HttpResponse::InternalServerError().finish();
    };
    // BEGIN; business write; apply; COMMIT.
    if apply(&fx.store, &done).await.is_err() {
        return HttpResponse::InternalServerError().finish();
    }
    res.map_into_boxed_body()
}

/// Applies a transition as a SQL store does inside a transaction: replace
/// the record if it is in flight under the transition's token.
async fn apply(store: &TestStore, t: &Transition) -> Result<(), idem_core::Error> {
    let (inner, now) = (store.inner(), t.next.record.updated_at);
    let current = inner
        .get(&t.key, now)
        .await?
        .ok_or(idem_core::Error::Contention)?;
    current
        .record
        .check_holder(t.token, now)
        .map_err(idem_core::Error::LeaseLost)?;
    match inner
        .compare_and_swap(&t.key, &current, &t.next, now)
        .await?
    {
        SwapOutcome::Swapped => Ok(()),
        SwapOutcome::Conflict(_) => Err(idem_core::Error::Contention),
    }
}

/// The routes; `/accounts/{id}/transfers` is in a `web::scope`.
fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/charge", web::route().to(charge))
        .route("/status/{code}", web::post().to(status))
        .route("/no-effect", web::post().to(no_effect))
        .route("/slow", web::post().to(slow))
        .route("/big", web::post().to(big))
        .route("/big-stream", web::post().to(big_stream))
        .route("/broken", web::post().to(broken))
        .route("/panic", web::post().to(panics))
        .route("/claim", web::post().to(claim))
        .route("/tx", web::post().to(tx))
        .service(web::scope("/accounts/{id}").route("/transfers", web::post().to(charge)));
}

/// A running server and what the test needs of it.
pub struct Server<C: Clock = idem_core::DefaultClock> {
    pub base: String,
    pub http: reqwest::Client,
    pub fx: Effects,
    pub engine: Arc<Engine<TestStore, C>>,
    pub idem: Idempotency<TestStore, C>,
    handle: ServerHandle,
}

impl<C: Clock> Drop for Server<C> {
    fn drop(&mut self) {
        // The stop command is sent at once; nothing needs to await it.
        drop(self.handle.stop(false));
    }
}

/// Serves the routes behind the middleware `configure` sets up over
/// `engine`.
pub async fn serve<C: Clock>(
    engine: Engine<TestStore, C>,
    configure: impl FnOnce(IdempotencyBuilder<TestStore, C>) -> IdempotencyBuilder<TestStore, C>,
) -> Server<C> {
    let engine = Arc::new(engine);
    let fx = Effects {
        runs: Arc::new(AtomicUsize::new(0)),
        entered: Arc::new(Notify::new()),
        gate: watch::Sender::new(false),
        store: engine.store().clone(),
    };
    let idem = configure(Idempotency::builder(engine.clone(), tenant_scope)).build();
    let (addr, handle) = spawn_server(idem.clone(), fx.clone()).await;
    Server {
        base: format!("http://{addr}"),
        http: reqwest::Client::new(),
        fx,
        engine,
        idem,
        handle,
    }
}

async fn spawn_server<C: Clock>(
    idem: Idempotency<TestStore, C>,
    fx: Effects,
) -> (SocketAddr, ServerHandle) {
    let (ready, started) = oneshot::channel();
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let data = web::Data::new(fx);
            let server = HttpServer::new(move || {
                actix_web::App::new()
                    .app_data(data.clone())
                    .wrap(idem.clone())
                    .configure(routes)
            })
            .workers(1)
            // A client's EOF drops its request's future at once: the worst
            // case for a handler that must run to completion.
            .h1_allow_half_closed(false)
            .disable_signals()
            .shutdown_timeout(1)
            .bind(("127.0.0.1", 0))
            .expect("bind 127.0.0.1:0");
            let addr = server.addrs()[0];
            let server = server.run();
            let _ = ready.send((addr, server.handle()));
            server.await
        })
    });
    started.await.expect("the server thread started")
}

impl<C: Clock> Server<C> {
    pub fn runs(&self) -> usize {
        self.fx.runs.load(Ordering::SeqCst)
    }

    /// A POST of `body` to `path` by tenant `t1`, with `key` if any.
    pub fn post(
        &self,
        path: &str,
        key: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::RequestBuilder {
        let req = self
            .http
            .post(format!("{}{path}", self.base))
            .header("x-tenant", "t1")
            .body(body);
        match key {
            Some(key) => req.header("idempotency-key", key),
            None => req,
        }
    }

    /// Sends `req` and reads the whole answer.
    pub async fn send(&self, req: reqwest::RequestBuilder) -> Got {
        Got::read(req.send().await.expect("the request is answered")).await
    }

    /// Lets every `/slow` call finish.
    pub fn open_gate(&self) {
        self.fx.gate.send_replace(true);
    }

    /// Whether the key `key` of tenant `t1` is held by a running request.
    pub async fn in_flight(&self, key: &str) -> bool {
        let key = RecordKey::new(&Scope::tenant("t1"), &IdempotencyKey::parse(key).unwrap());
        let now = self.engine.clock().now();
        let record = self.engine.store().inner().get(&key, now).await.unwrap();
        record.is_some_and(|r| matches!(r.record.state, State::InFlight { .. }))
    }
}

/// An answer read in full.
#[derive(Debug)]
pub struct Got {
    pub status: u16,
    /// Whether it carries `Idempotent-Replayed: true`.
    pub replayed: bool,
    pub headers: reqwest::header::HeaderMap,
    pub body: Bytes,
}

impl Got {
    pub async fn read(res: reqwest::Response) -> Self {
        let replayed = res
            .headers()
            .get_all("idempotent-replayed")
            .iter()
            .any(|v| v == "true");
        Self {
            status: res.status().as_u16(),
            replayed,
            headers: res.headers().clone(),
            body: res.bytes().await.expect("the whole body"),
        }
    }

    /// The value of header `name`, if one (UTF-8).
    pub fn get(&self, name: &str) -> Option<&str> {
        let value = self.headers.get(name)?;
        Some(value.to_str().expect("a UTF-8 header"))
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }

    /// Asserts a problem+json answer of `status` and `kind`; its body.
    pub fn assert_problem(&self, status: u16, kind: idem_actix::ProblemType) -> serde_json::Value {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(
            self.get("content-type"),
            Some("application/problem+json"),
            "{self:?}"
        );
        let json = self.json();
        assert_eq!(json["type"], kind.uri(), "{json}");
        json
    }
}

pub const WITHIN: Duration = Duration::from_secs(10);
