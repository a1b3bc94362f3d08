//! The HTTP test service: an axum app behind the `idem-tower` layer on a
//! real loopback port, driven with reqwest.
//!
//! # The handler (`POST /charge`)
//! Counts its executions ([`Service::executions`]) and answers `201` with a
//! JSON body `{"execution": n, "tenant": …, "principal": …, "attempt": …,
//! "echo": <request body>}` and the header `x-execution: n`. Request headers
//! change what it does (they are not part of the request fingerprint, so a
//! retry may carry other ones):
//!
//! | request header | effect |
//! |---|---|
//! | `x-stall: 1` | after counting, waits until [`Service::open_gate`] (see [`Service::wait_stalled`]) |
//! | `x-status: NNN` | answers with that status instead of 201 |
//! | `x-response-bytes: N` | the body is `N` bytes of `x` instead of the JSON |
//! | `x-response-header-bytes: N` | adds a header `x-padding` of `N` bytes |
//!
//! # Scope
//! [`bearer_scope`]: `Authorization: Bearer <tenant>` is the tenant, the
//! optional `x-principal` header the principal ([`scope_for`] builds the
//! same scope in a test, for [`idem_core::RecordKey`]s). No `Authorization`:
//! 401, nothing claimed. (A real service takes the authenticated principal.)

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use http::request::Parts;
use idem_core::{Clock, Engine, IdempotencyKey, RecordKey, Scope, Store};
use idem_tower::{IdempotencyClaim, IdempotencyLayer, IdempotencyLayerBuilder, ProblemType};
use idem_tower::{PROBLEM_JSON, Rejection};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the handler shares with the test: counters and the stall gate.
/// Clones share them (several servers may serve one service).
#[derive(Clone, Debug)]
pub struct Service {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    executions: AtomicU64,
    stalled: watch::Sender<u64>,
    gate: watch::Sender<bool>,
}

impl Default for Service {
    fn default() -> Self {
        Self::new()
    }
}

impl Service {
    /// A service with no execution yet and the gate closed.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                executions: AtomicU64::new(0),
                stalled: watch::channel(0).0,
                gate: watch::channel(false).0,
            }),
        }
    }

    /// How many times the handler ran.
    pub fn executions(&self) -> u64 {
        self.inner.executions.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` requests with `x-stall` are inside the
    /// handler (10 s at most).
    pub async fn wait_stalled(&self, n: u64) {
        let mut rx = self.inner.stalled.subscribe();
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|seen| *seen >= n))
            .await
            .unwrap_or_else(|_| panic!("{n} stalled request(s) never reached the handler"))
            .expect("the service is alive");
    }

    /// Lets every stalled request (and every later one) finish.
    pub fn open_gate(&self) {
        self.inner.gate.send_replace(true);
    }

    /// The routes (`POST /charge`), without the idempotency layer.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/charge", post(charge))
            .with_state(self.clone())
    }
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

async fn charge(
    State(service): State<Service>,
    claim: Option<axum::Extension<IdempotencyClaim>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let n = service.inner.executions.fetch_add(1, Ordering::SeqCst) + 1;
    if headers.contains_key("x-stall") {
        service.inner.stalled.send_modify(|seen| *seen += 1);
        let mut gate = service.inner.gate.subscribe();
        let _ = gate.wait_for(|open| *open).await;
    }
    let status = header_u64(&headers, "x-status")
        .and_then(|s| u16::try_from(s).ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::CREATED);
    let mut out = HeaderMap::new();
    out.insert("x-execution", HeaderValue::from(n));
    if let Some(len) = header_u64(&headers, "x-response-header-bytes") {
        let padding = "p".repeat(usize::try_from(len).unwrap_or(0));
        out.insert(
            "x-padding",
            HeaderValue::from_str(&padding).expect("ASCII padding"),
        );
    }
    let body = match header_u64(&headers, "x-response-bytes") {
        Some(len) => {
            out.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            "x".repeat(usize::try_from(len).unwrap_or(0))
        }
        None => {
            out.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            let (tenant, principal, attempt) = match &claim {
                Some(claim) => (
                    Some(claim.scope().tenant_id().to_string()),
                    claim.scope().principal().map(str::to_string),
                    Some(claim.attempt()),
                ),
                None => (None, None, None),
            };
            serde_json::json!({
                "execution": n,
                "tenant": tenant,
                "principal": principal,
                "attempt": attempt,
                "echo": String::from_utf8_lossy(&body),
            })
            .to_string()
        }
    };
    (status, out, body).into_response()
}

/// The scope of a test request: `Authorization: Bearer <tenant>`, and the
/// `x-principal` header if present; 401 without `Authorization`.
pub fn bearer_scope(parts: &Parts) -> Result<Scope, Rejection> {
    let tenant = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| Rejection::new(StatusCode::UNAUTHORIZED, "no bearer token"))?;
    let principal = parts
        .headers
        .get("x-principal")
        .and_then(|v| v.to_str().ok());
    Ok(scope_for(tenant, principal))
}

/// The scope [`bearer_scope`] derives for `tenant` and `principal`.
pub fn scope_for(tenant: &str, principal: Option<&str>) -> Scope {
    let scope = Scope::tenant(tenant);
    match principal {
        Some(p) => scope.with_principal(p),
        None => scope,
    }
}

/// The record key of `key` sent by `tenant` (no principal).
pub fn record_key(tenant: &str, key: &str) -> RecordKey {
    RecordKey::new(
        &scope_for(tenant, None),
        &IdempotencyKey::parse(key).expect("a valid test key"),
    )
}

/// The service's routes behind an idempotency layer over `engine` (scope:
/// [`bearer_scope`]), configured by `configure`.
pub fn app<S: Store, C: Clock>(
    engine: Arc<Engine<S, C>>,
    service: &Service,
    configure: impl FnOnce(IdempotencyLayerBuilder<S, C>) -> IdempotencyLayerBuilder<S, C>,
) -> Router {
    let layer = configure(IdempotencyLayer::builder(engine, bearer_scope)).build();
    service.router().layer(layer)
}

/// An HTTP server on `127.0.0.1:<ephemeral>`; stops when dropped.
#[derive(Debug)]
pub struct Server {
    base: String,
    client: reqwest::Client,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `router` on a fresh loopback port.
pub async fn serve(router: Router) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    let addr = listener.local_addr().expect("the bound address");
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    Server {
        base: format!("http://{addr}"),
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("a reqwest client"),
        task,
    }
}

/// Serves `service` behind a layer over `engine` (see [`app`]).
pub async fn start<S: Store, C: Clock>(
    engine: Arc<Engine<S, C>>,
    service: &Service,
    configure: impl FnOnce(IdempotencyLayerBuilder<S, C>) -> IdempotencyLayerBuilder<S, C>,
) -> Server {
    serve(app(engine, service, configure)).await
}

impl Server {
    /// `http://127.0.0.1:<port>`.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The client (for requests the helpers below do not cover).
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// `POST /charge` as `tenant`, with `key` (if any) and `body`; add headers
    /// (`x-stall`, …) to the builder, then [`send`](Self::send) it.
    pub fn charge_request(
        &self,
        tenant: &str,
        key: Option<&str>,
        body: &str,
    ) -> reqwest::RequestBuilder {
        let mut req = self
            .client
            .post(format!("{}/charge", self.base))
            .header(header::AUTHORIZATION, format!("Bearer {tenant}"))
            .body(body.to_owned());
        if let Some(key) = key {
            req = req.header("idempotency-key", key);
        }
        req
    }

    /// `POST /charge` as `tenant` with `key` and `body`, read in full.
    pub async fn charge(&self, tenant: &str, key: &str, body: &str) -> Reply {
        self.send(self.charge_request(tenant, Some(key), body))
            .await
    }

    /// Sends `req` and reads the response in full.
    pub async fn send(&self, req: reqwest::RequestBuilder) -> Reply {
        Reply::of(req.send().await.expect("the HTTP request")).await
    }
}

/// A response read in full.
#[derive(Clone, Debug)]
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// The headers.
    pub headers: reqwest::header::HeaderMap,
    /// The body.
    pub body: Vec<u8>,
}

impl Reply {
    /// Reads `r` in full.
    pub async fn of(r: reqwest::Response) -> Self {
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let body = r.bytes().await.expect("the response body").to_vec();
        Self {
            status,
            headers,
            body,
        }
    }

    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Whether the layer marked it as a replay (`Idempotent-Replayed: true`).
    pub fn replayed(&self) -> bool {
        self.header("idempotent-replayed") == Some("true")
    }

    /// The handler execution that produced it (`x-execution`).
    pub fn execution(&self) -> Option<u64> {
        self.header("x-execution")?.parse().ok()
    }

    /// `Retry-After`, in seconds.
    pub fn retry_after(&self) -> Option<u64> {
        self.header("retry-after")?.parse().ok()
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// The problem `type` of a problem+json body, `None` for any other body.
    pub fn problem_type(&self) -> Option<String> {
        (self.header("content-type") == Some(PROBLEM_JSON))
            .then(|| self.json()["type"].as_str().map(str::to_string))
            .flatten()
    }

    /// Asserts that this is the layer's `kind` problem: its status,
    /// `application/problem+json`, and the stable `type` URI and status in
    /// the body.
    #[track_caller]
    pub fn assert_problem(&self, kind: ProblemType) {
        assert_eq!(
            self.status,
            kind.status().as_u16(),
            "expected {kind:?}, got {self}"
        );
        assert_eq!(
            self.header("content-type"),
            Some(PROBLEM_JSON),
            "expected problem+json, got {self}"
        );
        let json = self.json();
        assert_eq!(json["type"], kind.uri(), "expected {kind:?}, got {self}");
        assert_eq!(json["status"], kind.status().as_u16(), "{self}");
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = String::from_utf8_lossy(&self.body);
        let mut body: String = text.chars().take(300).collect();
        if body.len() < text.len() {
            body.push('…');
        }
        write!(f, "{} {:?} {body}", self.status, self.headers)
    }
}

/// The name of the header carrying the handler's execution number.
pub const EXECUTION_HEADER: HeaderName = HeaderName::from_static("x-execution");
