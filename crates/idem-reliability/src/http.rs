//! The HTTP test service: an axum app behind the `idem-tower` layer on a
//! real loopback port, driven with reqwest.
//!
//! # The handler (`POST /charge`)
//! Counts its executions ([`Service::executions`]) and answers `201` with a
//! JSON body `{"execution": n, "tenant": …, "principal": …, "attempt": …,
//! "echo": <request body>}` and the header `x-execution: n`. With the
//! request header `x-stall: 1` (not part of the fingerprint, so a retry may
//! leave it out) it waits, after counting, until [`Service::open_gate`] (see
//! [`Service::wait_stalled`]).
//!
//! # Scope
//! [`bearer_scope`]: `Authorization: Bearer <tenant>` is the tenant, the
//! optional `x-principal` header the principal ([`scope_for`] builds the
//! same scope in a test, for [`idem_core::RecordKey`]s). No `Authorization`:
//! 401, nothing claimed. (A real service takes the authenticated principal.)

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Bytes, HttpBody};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Buf as _;
use http::request::Parts;
use http_body_util::BodyExt as _;
use idem_core::store::Store;
use idem_core::{Clock, Engine, IdempotencyKey, RecordKey, Scope};
use idem_tower::{IdempotencyClaim, IdempotencyLayer, ProblemType};
use idem_tower::{PROBLEM_JSON, Rejection};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
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

    /// Counts one execution (of this handler or a test's own); its number,
    /// from 1.
    pub fn execute(&self) -> u64 {
        self.inner.executions.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Counts the caller as stalled and waits until [`open_gate`](Self::open_gate).
    pub async fn stall(&self) {
        self.inner.stalled.send_modify(|seen| *seen += 1);
        let mut gate = self.inner.gate.subscribe();
        let _ = gate.wait_for(|open| *open).await;
    }

    /// Waits until at least `n` requests with `x-stall` (or callers of
    /// [`stall`](Self::stall)) are stalled (20 s at most).
    pub async fn wait_stalled(&self, n: u64) {
        let mut rx = self.inner.stalled.subscribe();
        tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|seen| *seen >= n))
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

async fn charge(
    State(service): State<Service>,
    claim: Option<axum::Extension<IdempotencyClaim>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let n = service.execute();
    if headers.contains_key("x-stall") {
        service.stall().await;
    }
    let scope = claim.as_ref().map(|c| c.scope());
    let body = serde_json::json!({
        "execution": n,
        "tenant": scope.map(|s| s.tenant_id()),
        "principal": scope.and_then(|s| s.principal()),
        "attempt": claim.as_ref().map(|c| c.attempt()),
        "echo": String::from_utf8_lossy(&body),
    });
    let headers = [
        ("x-execution", HeaderValue::from(n)),
        (
            header::CONTENT_TYPE.as_str(),
            HeaderValue::from_static("application/json"),
        ),
    ];
    (StatusCode::CREATED, headers, body.to_string()).into_response()
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

/// An HTTP server on `127.0.0.1:<ephemeral>`; stops when dropped.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
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
        addr,
        base: format!("http://{addr}"),
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("a reqwest client"),
        task,
    }
}

/// Serves `service`'s routes behind an idempotency layer over `engine`
/// (scope: [`bearer_scope`]; a key is required).
pub async fn start<S: Store, C: Clock>(engine: Arc<Engine<S, C>>, service: &Service) -> Server {
    let layer = IdempotencyLayer::builder(engine, bearer_scope)
        .required(true)
        .build();
    serve(service.router().layer(layer)).await
}

impl Server {
    /// The loopback address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

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

    /// Opens a connection and writes `bytes` on it (a request, or its
    /// start: the test sends the rest, or stalls).
    pub async fn connect_raw(&self, bytes: &[u8]) -> TcpStream {
        let mut conn = TcpStream::connect(self.addr).await.expect("connect");
        conn.write_all(bytes).await.expect("write the request");
        conn
    }

    /// Sends `bytes` (a whole request, with `Connection: close`) on a
    /// connection of its own and reads the answer ([`Reply::read`]).
    pub async fn raw(&self, bytes: &[u8]) -> Reply {
        Reply::read(&mut self.connect_raw(bytes).await).await
    }
}

/// A response read in full.
#[derive(Clone, Debug)]
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// The headers.
    pub headers: reqwest::header::HeaderMap,
    /// The body (up to its error, if it failed).
    pub body: Vec<u8>,
    /// Whether the body failed part-way ([`of_response`](Self::of_response)
    /// only: the other readers fail the test).
    pub body_error: bool,
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
            body_error: false,
        }
    }

    /// Reads a response of a service driven in the test (with `oneshot`, no
    /// socket) in full, or up to its body's error.
    pub async fn of_response<B: HttpBody + Unpin>(response: http::Response<B>) -> Self {
        let (parts, mut body) = response.into_parts();
        let mut bytes = Vec::new();
        let mut body_error = false;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => {
                    bytes.extend_from_slice(frame.data_ref().map_or(&[][..], |d| d.chunk()))
                }
                Err(_) => {
                    body_error = true;
                    break;
                }
            }
        }
        Self {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: bytes,
            body_error,
        }
    }

    /// Reads an HTTP/1.1 response from `conn` until the server closes the
    /// connection (10 s at most; the request said `Connection: close`). A
    /// read error after the answer (a reset: the server may answer before
    /// it read everything it was sent) ends the reading.
    pub async fn read(conn: &mut TcpStream) -> Self {
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut buf)).await;
        assert!(read.is_ok(), "no response within 10 s");
        Self::parse(&buf)
    }

    /// Parses an HTTP/1.1 response (`Content-Length` or close-delimited body).
    pub fn parse(buf: &[u8]) -> Self {
        let end = buf
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no complete response: {:?}", String::from_utf8_lossy(buf)));
        let head = String::from_utf8_lossy(&buf[..end]);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not a status line: {status_line:?}"));
        let mut headers = reqwest::header::HeaderMap::new();
        for (name, value) in lines.filter_map(|l| l.split_once(':')) {
            headers.append(
                HeaderName::from_bytes(name.trim().as_bytes()).expect("a header name"),
                HeaderValue::from_str(value.trim()).expect("a header value"),
            );
        }
        let mut body = buf[end + 4..].to_vec();
        if let Some(len) = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok())
        {
            body.truncate(len);
        }
        Self {
            status,
            headers,
            body,
            body_error: false,
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
