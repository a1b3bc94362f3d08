//! The layer, its builder, and the service doing the work.

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt as _;
use futures_util::future::{Either, select};
use http::request::Parts;
use http::{HeaderName, HeaderValue, Method, Request, Response, header, response};
use http_body::Body;
use http_body_util::{BodyExt as _, LengthLimitError, Limited};
use idem_core::{
    Begin, BoxError, Clock, DefaultClock, Engine, Error, Fenced, Fingerprint, Lease, Outcome,
    RecordKey, Scope, Store, StoreError,
};
use tower::{Layer, Service};
use tracing::{Instrument as _, Span, field};

use crate::body::{self, Buffered, ResponseBody};
use crate::claim::{IdempotencyClaim, Prepare};
use crate::header::parse_key_header;
use crate::problem::{self, ProblemType};
use crate::scope::Rejection;
use crate::stored::{DEFAULT_DENIED, HeaderFilter, IDEMPOTENT_REPLAYED, StoredResponse};

/// The default header name, `Idempotency-Key`.
pub const DEFAULT_HEADER: HeaderName = HeaderName::from_static("idempotency-key");

/// The default request body limit: 2 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

type ScopeFn = dyn Fn(&Parts) -> Result<Scope, Rejection> + Send + Sync;
type StoreIfFn = dyn Fn(&response::Parts) -> bool + Send + Sync;

/// The default storage predicate: every response below 500 is stored.
fn default_store_if(parts: &response::Parts) -> bool {
    !parts.status.is_server_error()
}

struct Shared<S, C> {
    engine: Arc<Engine<S, C>>,
    prepare: Arc<dyn Prepare>,
    header: HeaderName,
    methods: Vec<Method>,
    required: bool,
    scope: Box<ScopeFn>,
    max_body_bytes: usize,
    fingerprint_headers: Vec<HeaderName>,
    filter: Arc<HeaderFilter>,
    store_if: Box<StoreIfFn>,
    fail_open: bool,
    store_retry_after: Duration,
    max_retry_after: Duration,
}

/// A [`tower::Layer`] that makes `POST`/`PATCH` endpoints idempotent by the
/// `Idempotency-Key` request header; see the [crate docs](crate) for the
/// behaviour and [`IdempotencyLayerBuilder`] for the options.
///
/// Cloning is cheap (one `Arc`).
pub struct IdempotencyLayer<S, C = DefaultClock> {
    shared: Arc<Shared<S, C>>,
}

impl<S, C> Clone for IdempotencyLayer<S, C> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<S, C> fmt::Debug for IdempotencyLayer<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.shared;
        f.debug_struct("IdempotencyLayer")
            .field("header", &s.header)
            .field("methods", &s.methods)
            .field("required", &s.required)
            .field("max_body_bytes", &s.max_body_bytes)
            .field("fingerprint_headers", &s.fingerprint_headers)
            .field("replay_deny", &s.filter.denied())
            .field("fail_open", &s.fail_open)
            .finish_non_exhaustive()
    }
}

impl<S: Store, C: Clock> IdempotencyLayer<S, C> {
    /// A layer with the default options over `engine`, deriving each
    /// request's scope with `scope`.
    ///
    /// `scope` decides whose key a request carries: use the authenticated
    /// principal or tenant ([`scope_from_extension`](crate::scope_from_extension)),
    /// so that one client can never replay another's response.
    /// [`single_client_scope`](crate::single_client_scope) is for services
    /// with one client only.
    pub fn new<F>(engine: impl Into<Arc<Engine<S, C>>>, scope: F) -> Self
    where
        F: Fn(&Parts) -> Result<Scope, Rejection> + Send + Sync + 'static,
    {
        Self::builder(engine, scope).build()
    }

    /// A builder, to change the defaults; see [`new`](Self::new) for `scope`.
    pub fn builder<F>(
        engine: impl Into<Arc<Engine<S, C>>>,
        scope: F,
    ) -> IdempotencyLayerBuilder<S, C>
    where
        F: Fn(&Parts) -> Result<Scope, Rejection> + Send + Sync + 'static,
    {
        IdempotencyLayerBuilder {
            engine: engine.into(),
            header: DEFAULT_HEADER,
            methods: vec![Method::POST, Method::PATCH],
            required: false,
            scope: Box::new(scope),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            fingerprint_headers: Vec::new(),
            deny: DEFAULT_DENIED
                .iter()
                .map(|h| HeaderName::from_static(h))
                .collect(),
            store_if: Box::new(default_store_if),
            fail_open: false,
            store_retry_after: Duration::from_secs(1),
            max_retry_after: Duration::from_secs(2),
        }
    }

    /// The engine.
    pub fn engine(&self) -> &Arc<Engine<S, C>> {
        &self.shared.engine
    }
}

/// Configures an [`IdempotencyLayer`]; made by [`IdempotencyLayer::builder`].
///
/// # Behavior
/// Every option has a safe default:
///
/// | option | default |
/// |---|---|
/// | [`header_name`](Self::header_name) | `Idempotency-Key` |
/// | [`methods`](Self::methods) | `POST`, `PATCH` |
/// | [`required`](Self::required) | `false`: requests without a key pass through |
/// | [`max_body_bytes`](Self::max_body_bytes) | 2 MiB (413 beyond) |
/// | [`fingerprint_header`](Self::fingerprint_header) | none: method, path and query, body |
/// | [`replay_deny_headers`](Self::replay_deny_headers) | `set-cookie`, `date` |
/// | [`store_response_if`](Self::store_response_if) | status below 500 |
/// | [`fail_open`](Self::fail_open) | `false`: 503 when the store is down |
/// | [`store_retry_after`](Self::store_retry_after) | 1 s |
/// | [`max_retry_after`](Self::max_retry_after) | 2 s |
///
/// Time-related engine settings (how long keys live, the lease, waiting for
/// an in-flight original instead of answering 409) are the engine's
/// [`Policy`](idem_core::Policy).
pub struct IdempotencyLayerBuilder<S, C = DefaultClock> {
    engine: Arc<Engine<S, C>>,
    header: HeaderName,
    methods: Vec<Method>,
    required: bool,
    scope: Box<ScopeFn>,
    max_body_bytes: usize,
    fingerprint_headers: Vec<HeaderName>,
    deny: Vec<HeaderName>,
    store_if: Box<StoreIfFn>,
    fail_open: bool,
    store_retry_after: Duration,
    max_retry_after: Duration,
}

impl<S, C> fmt::Debug for IdempotencyLayerBuilder<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayerBuilder")
            .field("header", &self.header)
            .field("methods", &self.methods)
            .field("required", &self.required)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("fingerprint_headers", &self.fingerprint_headers)
            .field("replay_deny", &self.deny)
            .field("fail_open", &self.fail_open)
            .finish_non_exhaustive()
    }
}

impl<S: Store, C: Clock> IdempotencyLayerBuilder<S, C> {
    /// The request header carrying the key.
    #[must_use]
    pub fn header_name(mut self, name: HeaderName) -> Self {
        self.header = name;
        self
    }

    /// The methods the layer applies to; requests with other methods pass
    /// through untouched, key or not.
    #[must_use]
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.methods = methods.into_iter().collect();
        self
    }

    /// Whether a key is required on those methods: a request without one is
    /// then answered 400 ([`ProblemType::MissingKey`]) and the handler is not
    /// called. When not required, such requests pass through unprotected.
    #[must_use]
    pub fn required(mut self, required: bool) -> Self {
        self.required = required;
        self
    }

    /// The largest request body buffered (it is part of the fingerprint);
    /// larger requests are answered 413 ([`ProblemType::BodyTooLarge`]).
    #[must_use]
    pub fn max_body_bytes(mut self, limit: usize) -> Self {
        self.max_body_bytes = limit;
        self
    }

    /// Adds a request header to the fingerprint (for example `content-type`
    /// or an API version header): the same key with a different value of it
    /// is then a different request (422).
    #[must_use]
    pub fn fingerprint_header(mut self, name: HeaderName) -> Self {
        self.fingerprint_headers.push(name);
        self
    }

    /// Adds a response header that is neither stored nor replayed.
    #[must_use]
    pub fn deny_replay_header(mut self, name: HeaderName) -> Self {
        self.deny.push(name);
        self
    }

    /// Replaces the list of response headers that are neither stored nor
    /// replayed (default: `set-cookie`, `date`). Hop-by-hop headers,
    /// `content-length` and `idempotent-replayed` are never stored, whatever
    /// this list says.
    #[must_use]
    pub fn replay_deny_headers(mut self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        self.deny = names.into_iter().collect();
        self
    }

    /// Which responses are stored (and replayed to retries); the others
    /// release the key, so a retry runs the handler again.
    ///
    /// # Behavior
    /// Default: every status below 500 is stored (2xx, 3xx and 4xx: the
    /// request was processed and its answer is final); 5xx releases the key
    /// so clients are never stuck on a cached server error. The predicate sees
    /// the status, headers and extensions of the handler's response, so a
    /// handler can mark a 4xx as transient, for example with a response
    /// extension the predicate looks for.
    #[must_use]
    pub fn store_response_if<F>(mut self, predicate: F) -> Self
    where
        F: Fn(&response::Parts) -> bool + Send + Sync + 'static,
    {
        self.store_if = Box::new(predicate);
        self
    }

    /// **Unsafe for exactly-once semantics; off by default.** When the store
    /// is unreachable, run the handler anyway, without idempotency
    /// protection, instead of answering 503.
    ///
    /// # Behavior
    /// With fail-open, every retry sent while the store is down runs the
    /// handler again: duplicate payments, orders, emails. Use it only for
    /// endpoints where a duplicate is harmless and availability matters more.
    #[must_use]
    pub fn fail_open(mut self, fail_open: bool) -> Self {
        self.fail_open = fail_open;
        self
    }

    /// The `Retry-After` sent with 503 when the store is unreachable.
    #[must_use]
    pub fn store_retry_after(mut self, retry_after: Duration) -> Self {
        self.store_retry_after = retry_after;
        self
    }

    /// The longest `Retry-After` sent with 409 (request in progress).
    ///
    /// # Behavior
    /// The 409's `Retry-After` is the time left on the original's lease,
    /// rounded up to whole seconds, at least 1, at most this. The lease
    /// (default 60 s, renewed by heartbeats) bounds a crashed original; a live
    /// one usually finishes much sooner, so a short retry interval gets
    /// clients their replay sooner.
    #[must_use]
    pub fn max_retry_after(mut self, max: Duration) -> Self {
        self.max_retry_after = max;
        self
    }

    /// The layer.
    pub fn build(self) -> IdempotencyLayer<S, C> {
        let prepare: Arc<dyn Prepare> = self.engine.clone();
        IdempotencyLayer {
            shared: Arc::new(Shared {
                engine: self.engine,
                prepare,
                header: self.header,
                methods: self.methods,
                required: self.required,
                scope: self.scope,
                max_body_bytes: self.max_body_bytes,
                fingerprint_headers: self.fingerprint_headers,
                filter: Arc::new(HeaderFilter::new(self.deny)),
                store_if: self.store_if,
                fail_open: self.fail_open,
                store_retry_after: self.store_retry_after,
                max_retry_after: self.max_retry_after,
            }),
        }
    }
}

impl<T, S, C> Layer<T> for IdempotencyLayer<S, C> {
    type Service = Idempotency<T, S, C>;

    fn layer(&self, inner: T) -> Self::Service {
        Idempotency {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service made by [`IdempotencyLayer`] around an inner service `T`.
pub struct Idempotency<T, S, C = DefaultClock> {
    inner: T,
    shared: Arc<Shared<S, C>>,
}

impl<T: Clone, S, C> Clone for Idempotency<T, S, C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<T: fmt::Debug, S, C> fmt::Debug for Idempotency<T, S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

/// The future returned by [`Idempotency`].
pub type ResponseFuture<R, E> = Pin<Box<dyn Future<Output = Result<R, E>> + Send>>;

impl<T, S, C, ReqBody, ResBody> Service<Request<ReqBody>> for Idempotency<T, S, C>
where
    T: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    T::Future: Send + 'static,
    T::Error: Send + 'static,
    S: Store,
    C: Clock,
    ReqBody: Body + From<Bytes> + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Send + 'static,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = T::Error;
    type Future = ResponseFuture<Self::Response, T::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), T::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        // The clone is not ready; the instance `poll_ready` readied is.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        if !shared.methods.contains(req.method()) {
            return Box::pin(pass(inner, req));
        }
        let span = tracing::info_span!(
            "idem",
            method = %req.method(),
            key = field::Empty,
            attempt = field::Empty,
            outcome = field::Empty,
        );
        Box::pin(handle(shared, inner, req).instrument(span))
    }
}

/// Calls the inner service unprotected.
async fn pass<T, ReqBody, ResBody>(
    mut inner: T,
    req: Request<ReqBody>,
) -> Result<Response<ResponseBody<ResBody>>, T::Error>
where
    T: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body,
{
    Ok(inner.call(req).await?.map(ResponseBody::inner))
}

/// Counts and records the request's outcome.
fn outcome(label: &'static str) {
    Span::current().record("outcome", label);
    metrics::counter!("idem_requests_total", "outcome" => label).increment(1);
}

fn problem<B: Body>(kind: ProblemType, detail: &str) -> Response<ResponseBody<B>> {
    problem::response(kind, detail).map(ResponseBody::full)
}

fn problem_retry<B: Body>(
    kind: ProblemType,
    detail: &str,
    retry_after: Duration,
) -> Response<ResponseBody<B>> {
    problem::response_retry(kind, detail, retry_after).map(ResponseBody::full)
}

/// Everything before the claim: key, scope, body, fingerprint, `begin`.
async fn handle<T, S, C, ReqBody, ResBody>(
    shared: Arc<Shared<S, C>>,
    inner: T,
    req: Request<ReqBody>,
) -> Result<Response<ResponseBody<ResBody>>, T::Error>
where
    T: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    T::Future: Send + 'static,
    T::Error: Send + 'static,
    S: Store,
    C: Clock,
    ReqBody: Body + From<Bytes> + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Send + 'static,
{
    let (parts, body) = req.into_parts();
    let key = match parse_key_header(&parts.headers, &shared.header) {
        Ok(Some(key)) => key,
        Ok(None) if shared.required => {
            outcome("invalid");
            let detail = format!(
                "{} {} requires an {} header; generate a new UUID for each new operation",
                parts.method,
                parts.uri.path(),
                shared.header
            );
            return Ok(problem(ProblemType::MissingKey, &detail));
        }
        Ok(None) => {
            outcome("passthrough");
            return pass(inner, Request::from_parts(parts, body)).await;
        }
        Err(e) => {
            outcome("invalid");
            return Ok(problem(ProblemType::InvalidKey, &e.to_string()));
        }
    };
    let scope = match (shared.scope)(&parts) {
        Ok(scope) => scope,
        Err(rejection) => {
            outcome("rejected");
            return Ok(rejection.into_response().map(ResponseBody::full));
        }
    };
    let record_key = RecordKey::new(&scope, &key);
    // Never log the client's key: its scoped digest identifies it.
    Span::current().record("key", record_key.hex().get(..16).unwrap_or_default());

    let limit = shared.max_body_bytes;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        outcome("invalid");
        return Ok(body_too_large(limit));
    }
    let bytes = match Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<LengthLimitError>() => {
            outcome("invalid");
            return Ok(body_too_large(limit));
        }
        Err(e) => {
            outcome("invalid");
            tracing::debug!(error = %e, "idem: request body unreadable");
            return Ok(problem(
                ProblemType::BodyUnreadable,
                "the request body could not be read",
            ));
        }
    };
    let fingerprint = fingerprint(&parts, &shared.fingerprint_headers, &bytes);

    match shared.engine.begin_key(record_key, fingerprint).await {
        Ok(Begin::Proceed(lease)) => {
            outcome("fresh");
            Span::current().record("attempt", lease.attempt());
            fresh(shared, inner, parts, bytes, lease).await
        }
        Ok(Begin::Replay(replay)) => {
            match StoredResponse::decode(&replay.outcome, &shared.filter) {
                Ok(decoded) => {
                    outcome("replayed");
                    let mut response = Response::new(ResponseBody::full_with_trailers(
                        decoded.body,
                        decoded.trailers,
                    ));
                    *response.status_mut() = decoded.status;
                    *response.headers_mut() = decoded.headers;
                    response
                        .headers_mut()
                        .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
                    Ok(response)
                }
                Err(e) => {
                    outcome("store_error");
                    tracing::error!(error = %e, "idem: the stored response cannot be decoded");
                    Ok(problem(
                        ProblemType::CorruptRecord,
                        "the stored result of this request cannot be read; it was not executed again",
                    ))
                }
            }
        }
        Ok(Begin::InProgress { retry_after }) => {
            outcome("conflict");
            Ok(in_progress(retry_after.min(shared.max_retry_after)))
        }
        Ok(Begin::Mismatch) => {
            outcome("mismatch");
            Ok(problem(
                ProblemType::KeyReused,
                "this idempotency key was already used with a different request (method, path, query or body); use a new key for a new operation",
            ))
        }
        Err(e) => begin_failed(shared, inner, parts, bytes, &e).await,
    }
}

async fn begin_failed<T, S, C, ReqBody, ResBody>(
    shared: Arc<Shared<S, C>>,
    inner: T,
    parts: Parts,
    bytes: Bytes,
    e: &Error,
) -> Result<Response<ResponseBody<ResBody>>, T::Error>
where
    T: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ReqBody: From<Bytes>,
    ResBody: Body,
{
    match e {
        Error::Contention => {
            outcome("conflict");
            Ok(in_progress(Duration::from_secs(1)))
        }
        e if e.is_transient() && shared.fail_open => {
            outcome("fail_open");
            tracing::warn!(error = %e, "idem: store unavailable; running the request UNPROTECTED (fail-open)");
            pass(inner, Request::from_parts(parts, ReqBody::from(bytes))).await
        }
        e if e.is_transient() => {
            outcome("store_error");
            tracing::warn!(error = %e, "idem: store unavailable; answering 503");
            Ok(problem_retry(
                ProblemType::StoreUnavailable,
                "the idempotency store is unavailable; the request was not executed, retry it with the same key",
                shared.store_retry_after,
            ))
        }
        Error::Store(StoreError::Corrupt { .. }) | Error::Codec(_) => {
            outcome("store_error");
            tracing::error!(error = %e, "idem: the stored record cannot be read");
            Ok(problem(
                ProblemType::CorruptRecord,
                "the stored record of this key cannot be read; the request was not executed",
            ))
        }
        e => {
            outcome("store_error");
            tracing::error!(error = %e, "idem: store failed");
            Ok(problem(
                ProblemType::StoreFailed,
                "the idempotency store failed; the request was not executed",
            ))
        }
    }
}

fn body_too_large<B: Body>(limit: usize) -> Response<ResponseBody<B>> {
    problem(
        ProblemType::BodyTooLarge,
        &format!("the request body exceeds {limit} bytes"),
    )
}

fn in_progress<B: Body>(retry_after: Duration) -> Response<ResponseBody<B>> {
    problem_retry(
        ProblemType::RequestInProgress,
        "a request with this idempotency key is still being processed; retry after the time in Retry-After to get its result",
        retry_after,
    )
}

/// The request fingerprint: `method`, `target`, each selected
/// `header:NAME` (one field per value, absent headers add none), `body`.
fn fingerprint(parts: &Parts, headers: &[HeaderName], body: &[u8]) -> Fingerprint {
    let target = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path(), |pq| pq.as_str());
    let mut fp = Fingerprint::builder();
    fp.add("method", parts.method.as_str().as_bytes());
    fp.add("target", target.as_bytes());
    for name in headers {
        let field = format!("header:{name}");
        for value in parts.headers.get_all(name) {
            fp.add(&field, value.as_bytes());
        }
    }
    fp.add("body", body);
    fp.finish()
}

/// What the inner service did under the claim.
enum Ran<R: Body, E> {
    Panicked(Box<dyn std::any::Any + Send>),
    Errored(E),
    /// Not to be stored: release the key, return the response as is.
    Release(response::Parts, R),
    Store(response::Parts, Buffered<R>),
}

/// Releases the claim if the request's future is dropped while the handler
/// runs (client gone, timeout): a retry then runs at once instead of waiting
/// for the lease to lapse.
struct ReleaseOnDrop<S: Store, C: Clock> {
    armed: Option<(Arc<Engine<S, C>>, Lease)>,
}

impl<S: Store, C: Clock> ReleaseOnDrop<S, C> {
    fn disarm(&mut self) {
        self.armed = None;
    }
}

impl<S: Store, C: Clock> Drop for ReleaseOnDrop<S, C> {
    fn drop(&mut self) {
        if let Some((engine, lease)) = self.armed.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let span = Span::current();
            runtime
                .spawn(async move { release(&engine, &lease, "cancelled").await }.instrument(span));
        }
    }
}

/// The claimed path: run the handler with a heartbeat, then store or release.
async fn fresh<T, S, C, ReqBody, ResBody>(
    shared: Arc<Shared<S, C>>,
    mut inner: T,
    mut parts: Parts,
    bytes: Bytes,
    lease: Lease,
) -> Result<Response<ResponseBody<ResBody>>, T::Error>
where
    T: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    T::Future: Send + 'static,
    T::Error: Send + 'static,
    S: Store,
    C: Clock,
    ReqBody: From<Bytes>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Send + 'static,
{
    let engine = shared.engine.clone();
    parts.extensions.insert(IdempotencyClaim::new(
        lease.clone(),
        shared.prepare.clone(),
        shared.filter.clone(),
    ));
    let req = Request::from_parts(parts, ReqBody::from(bytes));
    let mut guard = ReleaseOnDrop {
        armed: Some((engine.clone(), lease.clone())),
    };
    let limit = engine.policy().max_outcome_bytes;
    let store_if = &shared.store_if;
    let started = Instant::now();
    let call = AssertUnwindSafe(async move {
        match inner.call(req).await {
            Err(e) => Ran::Errored(e),
            Ok(response) => {
                let (parts, body) = response.into_parts();
                if store_if(&parts) {
                    Ran::Store(parts, body::buffer(body, limit).await)
                } else {
                    Ran::Release(parts, body)
                }
            }
        }
    })
    .catch_unwind();
    let work = async move {
        match call.await {
            Ok(ran) => ran,
            Err(panic) => Ran::Panicked(panic),
        }
    };
    let ran = with_heartbeat(&engine, &lease, work).await;
    metrics::histogram!("idem_handler_duration_seconds").record(started.elapsed().as_secs_f64());
    // From here on, finishing the claim runs to its end even if the client
    // goes away (see `settle`).
    guard.disarm();

    match ran {
        Ran::Panicked(panic) => {
            settle(&engine, &lease, Settle::Release("panic")).await;
            std::panic::resume_unwind(panic)
        }
        Ran::Errored(e) => {
            settle(&engine, &lease, Settle::Release("error")).await;
            Err(e)
        }
        Ran::Release(parts, body) => {
            settle(&engine, &lease, Settle::Release("status")).await;
            Ok(Response::from_parts(parts, ResponseBody::inner(body)))
        }
        Ran::Store(parts, Buffered::Complete { data, trailers }) => {
            let stored = StoredResponse::new(
                parts.status,
                &parts.headers,
                data.clone(),
                trailers.as_ref(),
                &shared.filter,
            );
            let outcome = match stored.encode() {
                Ok(outcome) if outcome.len() <= limit => Some(outcome),
                Ok(outcome) => {
                    tracing::warn!(
                        size = outcome.len(),
                        limit,
                        "idem: response too large to store; storing a response-not-stored marker"
                    );
                    None
                }
                Err(e) => {
                    tracing::error!(error = %e, "idem: response cannot be encoded; storing a response-not-stored marker");
                    None
                }
            };
            let settle_with = match outcome {
                Some(outcome) => Settle::Complete(outcome),
                None => not_stored(&shared.filter, limit),
            };
            if settle(&engine, &lease, settle_with).await == Settled::Superseded {
                return Ok(superseded());
            }
            Ok(Response::from_parts(
                parts,
                ResponseBody::full_with_trailers(data, trailers),
            ))
        }
        Ran::Store(parts, Buffered::TooLarge { prefix, rest }) => {
            tracing::warn!(
                limit,
                "idem: response body too large to store; storing a response-not-stored marker"
            );
            if settle(&engine, &lease, not_stored(&shared.filter, limit)).await
                == Settled::Superseded
            {
                return Ok(superseded());
            }
            Ok(Response::from_parts(
                parts,
                ResponseBody::chain(prefix, rest),
            ))
        }
        Ran::Store(parts, Buffered::Failed { prefix, error }) => {
            settle(&engine, &lease, Settle::Release("body_error")).await;
            Ok(Response::from_parts(
                parts,
                ResponseBody::failed(prefix, error),
            ))
        }
    }
}

/// The completion stored in place of a response too large to keep: the
/// operation ran, so a retry must not run it again, but it cannot get the
/// original response either.
fn not_stored(filter: &HeaderFilter, limit: usize) -> Settle {
    let kind = ProblemType::ResponseNotStored;
    let marker = problem::response(
        kind,
        &format!(
            "the operation was executed, but its response exceeded {limit} bytes and was not kept; it will not be executed again with this key"
        ),
    );
    let stored = StoredResponse::new(
        marker.status(),
        marker.headers(),
        marker.body().clone(),
        None,
        filter,
    );
    match stored.encode() {
        Ok(outcome) if outcome.len() <= limit => Settle::Complete(outcome),
        _ => Settle::Release("unstorable"),
    }
}

/// Runs `work` with the lease's heartbeat beside it.
async fn with_heartbeat<S: Store, C: Clock, F: Future>(
    engine: &Engine<S, C>,
    lease: &Lease,
    work: F,
) -> F::Output {
    let work = pin!(work);
    let beat = pin!(engine.keep_alive(lease));
    match select(work, beat).await {
        Either::Left((value, _)) => value,
        Either::Right((beat, work)) => {
            if let Err(e) = beat {
                // The lease was taken over (the heartbeat could not reach the
                // store for a whole lease): let the handler finish; storing
                // its response will be refused by the fencing token.
                metrics::counter!("idem_lease_lost_total").increment(1);
                tracing::error!(error = %e, "idem: lease lost while the handler runs; another request may run this operation too");
            }
            work.await
        }
    }
}

enum Settle {
    Complete(Outcome),
    Release(&'static str),
}

/// How finishing a claim ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Settled {
    /// Stored, released, or (on a store error) logged: the handler's own
    /// response is the answer.
    Done,
    /// The lease was taken over by a later request (this one outlived its
    /// lease): the key's answer is that request's, not this one's.
    Superseded,
}

/// The answer of a request whose claim was taken over while its handler
/// ran: its response was not kept, and the key's answer is the later
/// request's, so the client is told to retry and gets that one (never two
/// different answers for one key).
fn superseded<B: Body>() -> Response<ResponseBody<B>> {
    problem_retry(
        ProblemType::RequestInProgress,
        "this request outlived its claim on the idempotency key and a later request with the same key took the operation over; this request's response was not kept; retry to get the answer of the request that holds the key",
        Duration::from_secs(1),
    )
}

/// Finishes the claim in a task of its own, so that it completes even if the
/// request's future is dropped meanwhile (a dropped completion would leave the
/// key in flight until its lease lapses, and the retry would run again).
async fn settle<S: Store, C: Clock>(
    engine: &Arc<Engine<S, C>>,
    lease: &Lease,
    how: Settle,
) -> Settled {
    let engine = engine.clone();
    let lease = lease.clone();
    let task = async move {
        match how {
            Settle::Complete(outcome) => complete(&engine, &lease, outcome).await,
            Settle::Release(reason) => {
                release(&engine, &lease, reason).await;
                Settled::Done
            }
        }
    }
    .instrument(Span::current());
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => match runtime.spawn(task).await {
            Ok(settled) => settled,
            Err(e) => {
                tracing::error!(error = %e, "idem: finishing the claim failed");
                Settled::Done
            }
        },
        Err(_) => task.await,
    }
}

async fn complete<S: Store, C: Clock>(
    engine: &Engine<S, C>,
    lease: &Lease,
    outcome: Outcome,
) -> Settled {
    const ATTEMPTS: u32 = 3;
    if lease.is_finished() {
        // The handler completed the key in its transaction and said so
        // (`IdempotencyClaim::mark_applied`): nothing left to store.
        tracing::debug!("idem: key completed by the handler");
        return Settled::Done;
    }
    for attempt in 1..=ATTEMPTS {
        match engine.complete(lease, outcome.clone()).await {
            Ok(()) => return Settled::Done,
            Err(Error::LeaseLost(Fenced::Finished {
                by_holder: true, ..
            })) => {
                // The handler completed the key itself (in its transaction).
                tracing::debug!("idem: key completed by the handler");
                return Settled::Done;
            }
            Err(
                e @ Error::LeaseLost(
                    Fenced::TakenOver
                    | Fenced::Finished {
                        by_holder: false, ..
                    },
                ),
            ) => {
                metrics::counter!("idem_completion_failures_total", "reason" => "lease_lost")
                    .increment(1);
                tracing::error!(
                    error = %e,
                    "idem: a later request took this key over while the handler ran (it outlived its lease); its response is not kept and the client is told to retry"
                );
                return Settled::Superseded;
            }
            Err(e) if e.is_transient() && attempt < ATTEMPTS => {
                tracing::warn!(error = %e, attempt, "idem: storing the response failed; retrying");
                engine
                    .clock()
                    .sleep(Duration::from_millis(25 * u64::from(attempt * attempt)))
                    .await;
            }
            Err(e) => {
                let reason = if matches!(e, Error::LeaseLost(_)) {
                    "lease_lost"
                } else {
                    "store"
                };
                metrics::counter!("idem_completion_failures_total", "reason" => reason)
                    .increment(1);
                tracing::error!(
                    error = %e,
                    "idem: the response was sent but not stored; the key stays in flight until its lease lapses, then a retry runs the operation again"
                );
                return Settled::Done;
            }
        }
    }
    Settled::Done
}

async fn release<S: Store, C: Clock>(engine: &Engine<S, C>, lease: &Lease, reason: &'static str) {
    if lease.is_finished() {
        tracing::debug!("idem: key completed by the handler; not released");
        return;
    }
    metrics::counter!("idem_released_total", "reason" => reason).increment(1);
    match engine.release(lease).await {
        Ok(()) => tracing::debug!(reason, "idem: key released"),
        Err(Error::LeaseLost(Fenced::Finished {
            by_holder: true, ..
        })) => tracing::debug!("idem: key completed by the handler; not released"),
        Err(e) => {
            metrics::counter!("idem_completion_failures_total", "reason" => "release").increment(1);
            tracing::warn!(error = %e, reason, "idem: releasing the key failed; it stays in flight until its lease lapses");
        }
    }
}
