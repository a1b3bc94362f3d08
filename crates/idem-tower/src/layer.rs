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
    Begin, BoxError, Clock, DefaultClock, Ending, Engine, Error, Fenced, Fingerprint, Lease,
    Outcome, RecordKey, ReplayKind, Scope, Shutdown, Store, StoreError,
};
use tower::{Layer, Service};
use tracing::{Instrument as _, Span, field};

use crate::body::{self, Buffered, ResponseBody};
use crate::claim::{IdempotencyClaim, Prepare};
use crate::effect::{NoEffect, NoEffectFlag};
use crate::header::parse_key_header;
use crate::problem::{self, ProblemType};
use crate::scope::Rejection;
use crate::stored::{DEFAULT_DENIED, HeaderFilter, IDEMPOTENT_REPLAYED, StoredResponse};

/// The default header name, `Idempotency-Key`.
pub const DEFAULT_HEADER: HeaderName = HeaderName::from_static("idempotency-key");

/// The default request body limit: 2 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

/// The longest `Retry-After` the layer sends (a day); longer settings are
/// capped to it.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

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
    release_on_cancel: bool,
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
            .field("release_on_cancel", &s.release_on_cancel)
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
            release_on_cancel: false,
        }
    }

    /// The engine.
    pub fn engine(&self) -> &Arc<Engine<S, C>> {
        &self.shared.engine
    }

    /// A graceful shutdown: stops taking new keyed requests (503
    /// [`shutting-down`](ProblemType::ShuttingDown) + `Retry-After`) and waits
    /// up to `grace` for the running handlers to finish and store their
    /// responses; see [`Engine::shutdown`].
    ///
    /// # Behavior
    /// Nothing that ran is released. Handlers still running after `grace`
    /// have their keys finished as `outcome-unknown` (never run again), since
    /// the process is about to stop them. Call it after the server stopped
    /// accepting connections, before the runtime ends:
    ///
    /// ```no_run
    /// # use std::{sync::Arc, time::Duration};
    /// # use axum::{Router, routing::post};
    /// # use idem_core::{Engine, MemoryStore};
    /// # use idem_tower::{IdempotencyLayer, single_client_scope};
    /// # #[tokio::main] async fn main() -> std::io::Result<()> {
    /// # async fn stop_signal() {}
    /// let layer = IdempotencyLayer::new(Arc::new(Engine::new(MemoryStore::new())), single_client_scope);
    /// let app: Router = Router::new().route("/payments", post(|| async { "ok" })).layer(layer.clone());
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    /// axum::serve(listener, app)
    ///     .with_graceful_shutdown(stop_signal()) // e.g. tokio::signal::ctrl_c
    ///     .await?;
    /// let report = layer.shutdown(Duration::from_secs(30)).await;
    /// assert_eq!(report.left_in_flight, 0);
    /// # Ok(()) }
    /// ```
    pub async fn shutdown(&self, grace: Duration) -> Shutdown {
        self.shared.engine.shutdown(grace).await
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
/// | [`release_on_cancel`](Self::release_on_cancel) | `false`: handlers run to completion |
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
    release_on_cancel: bool,
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

    /// Which responses are stored (and replayed to retries).
    ///
    /// # Behavior
    /// Default: every status below 500 is stored (2xx, 3xx and 4xx: the
    /// request was processed and its answer is final). A response the
    /// predicate refuses (by default a 5xx) is returned to this client but
    /// is ambiguous: the handler may have taken effect before it failed. The
    /// key is then finished as [`outcome-unknown`](ProblemType::OutcomeUnknown)
    /// and never run again, unless the handler declared that nothing took
    /// effect ([`NoEffect`](crate::NoEffect) on the response, or
    /// [`IdempotencyClaim::declare_no_effect`]): then the key is released and
    /// a retry runs the handler afresh. A response carrying `NoEffect` is
    /// never stored, whatever the predicate says.
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

    /// The `Retry-After` sent with 503 when the store is unreachable or the
    /// layer is shutting down (at most [`MAX_RETRY_AFTER`]).
    #[must_use]
    pub fn store_retry_after(mut self, retry_after: Duration) -> Self {
        self.store_retry_after = retry_after.min(MAX_RETRY_AFTER);
        self
    }

    /// **Only for handlers without external effects.** Releases the key when
    /// the request's future is dropped while the handler runs (client gone,
    /// an outer timeout), and stops the handler there.
    ///
    /// # Behavior
    /// Default `false`: the handler and the storing of its response run in a
    /// task of their own, to completion, whatever happens to the request's
    /// future; a retry meanwhile gets 409 + `Retry-After`, afterwards the
    /// stored response. With `true`, a dropped request releases the key in
    /// the background and a retry runs the handler again at once: if the
    /// dropped handler had already made an external call (a payment, an
    /// email), that call happens twice.
    #[must_use]
    pub fn release_on_cancel(mut self, release: bool) -> Self {
        self.release_on_cancel = release;
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
    /// Capped to [`MAX_RETRY_AFTER`].
    #[must_use]
    pub fn max_retry_after(mut self, max: Duration) -> Self {
        self.max_retry_after = max.min(MAX_RETRY_AFTER);
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
                release_on_cancel: self.release_on_cancel,
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
        Ok(Begin::Replay(replay)) if replay.kind == ReplayKind::Unknown => {
            outcome("unknown");
            Ok(problem(
                ProblemType::OutcomeUnknown,
                "the request with this idempotency key ended without a known result and may or may not have taken effect; it will not be executed again with this key: check the resource, then use a new key",
            ))
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
        // Never fail open here: the instance is stopping, not the store.
        Error::ShuttingDown => {
            outcome("shutting_down");
            Ok(problem_retry(
                ProblemType::ShuttingDown,
                "this instance is shutting down; the request was not executed, retry it with the same key",
                shared.store_retry_after,
            ))
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

/// The URI the client sent: axum's `OriginalUri` when a router put it in
/// the extensions (a router nested with `nest`/`nest_service` sees a stripped
/// path), else the request's own.
fn original_uri(parts: &Parts) -> &http::Uri {
    #[cfg(feature = "axum")]
    if let Some(axum::extract::OriginalUri(uri)) = parts.extensions.get() {
        return uri;
    }
    &parts.uri
}

/// The request fingerprint: `method`, `target` (the path and query the
/// client sent, see [`original_uri`]), each selected `header:NAME` (one field
/// per value, absent headers add none), `body`.
fn fingerprint(parts: &Parts, headers: &[HeaderName], body: &[u8]) -> Fingerprint {
    let uri = original_uri(parts);
    let target = uri
        .path_and_query()
        .map_or_else(|| uri.path(), |pq| pq.as_str());
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
    /// Marked [`NoEffect`]: release the key, return the response as is.
    NoEffect(response::Parts, R),
    /// Refused by the storage predicate: ambiguous, return the response as is.
    Unstored(response::Parts, R),
    Store(response::Parts, Buffered<R>),
}

/// What a claimed request's task hands back: the response (or the inner
/// service's error), or the handler's panic to resume.
type Claimed<R, E> = Result<Result<R, E>, Box<dyn std::any::Any + Send>>;

/// With [`release_on_cancel`](IdempotencyLayerBuilder::release_on_cancel)
/// only: releases the claim if the request's future is dropped while the
/// handler runs.
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
            runtime.spawn(
                async move { end(&engine, &lease, Settle::Release("cancelled")).await }
                    .instrument(span),
            );
        }
    }
}

/// The claimed path: the handler and the storing of its response run to
/// completion in a task of their own (unless `release_on_cancel`), so that
/// dropping the request's future cannot stop them half-way.
async fn fresh<T, S, C, ReqBody, ResBody>(
    shared: Arc<Shared<S, C>>,
    inner: T,
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
    ReqBody: From<Bytes> + Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Send + 'static,
{
    let no_effect = NoEffectFlag::default();
    parts.extensions.insert(IdempotencyClaim::new(
        lease.clone(),
        shared.prepare.clone(),
        shared.filter.clone(),
        no_effect.clone(),
    ));
    let req = Request::from_parts(parts, ReqBody::from(bytes));
    let release_on_cancel = shared.release_on_cancel;
    let guard = ReleaseOnDrop {
        armed: release_on_cancel.then(|| (shared.engine.clone(), lease.clone())),
    };
    let run = run_claimed(shared, inner, req, lease, no_effect, guard).instrument(Span::current());
    let claimed = match tokio::runtime::Handle::try_current() {
        Ok(runtime) if !release_on_cancel => match runtime.spawn(run).await {
            Ok(claimed) => claimed,
            // The runtime is shutting down and cancelled the task; the
            // engine's shutdown (or its drop guard) deals with the key.
            Err(e) if e.is_cancelled() => {
                return Ok(problem_retry(
                    ProblemType::ShuttingDown,
                    "this instance stopped while the request ran; its outcome is not known here, retry with the same key to get it",
                    Duration::from_secs(1),
                ));
            }
            Err(e) => Err(e.into_panic()),
        },
        _ => run.await,
    };
    match claimed {
        Ok(result) => result,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Runs the handler under the claim with a heartbeat, then ends the claim.
async fn run_claimed<T, S, C, ReqBody, ResBody>(
    shared: Arc<Shared<S, C>>,
    mut inner: T,
    req: Request<ReqBody>,
    lease: Lease,
    no_effect: NoEffectFlag,
    mut guard: ReleaseOnDrop<S, C>,
) -> Claimed<Response<ResponseBody<ResBody>>, T::Error>
where
    T: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    T::Future: Send + 'static,
    T::Error: Send + 'static,
    S: Store,
    C: Clock,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Send + 'static,
{
    let engine = shared.engine.clone();
    let limit = engine.outcome_limit();
    let store_if = &shared.store_if;
    let started = Instant::now();
    let call = AssertUnwindSafe(async move {
        match inner.call(req).await {
            Err(e) => Ran::Errored(e),
            Ok(response) => {
                let (parts, body) = response.into_parts();
                if parts.extensions.get::<NoEffect>().is_some() {
                    Ran::NoEffect(parts, body)
                } else if store_if(&parts) {
                    Ran::Store(parts, body::buffer(body, limit).await)
                } else {
                    Ran::Unstored(parts, body)
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
    // From here on, ending the claim runs to its end even if the client
    // goes away (see `end`).
    guard.disarm();
    // An ambiguous ending releases the key only if the handler said that
    // nothing took effect.
    let ambiguous = |reason| {
        if no_effect.is_set() {
            Settle::Release(reason)
        } else {
            Settle::Unknown(reason)
        }
    };

    match ran {
        Ran::Panicked(panic) => {
            end(&engine, &lease, ambiguous("panic")).await;
            Err(panic)
        }
        Ran::Errored(e) => {
            end(&engine, &lease, ambiguous("error")).await;
            Ok(Err(e))
        }
        Ran::NoEffect(parts, body) => {
            end(&engine, &lease, Settle::Release("no_effect")).await;
            Ok(Ok(Response::from_parts(parts, ResponseBody::inner(body))))
        }
        Ran::Unstored(parts, body) => {
            end(&engine, &lease, ambiguous("status")).await;
            Ok(Ok(Response::from_parts(parts, ResponseBody::inner(body))))
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
            let how = match outcome {
                Some(outcome) => Settle::Complete(outcome),
                None => not_stored(&shared.filter, limit),
            };
            if end(&engine, &lease, how).await == Settled::Superseded {
                return Ok(Ok(superseded()));
            }
            Ok(Ok(Response::from_parts(
                parts,
                ResponseBody::full_with_trailers(data, trailers),
            )))
        }
        Ran::Store(parts, Buffered::TooLarge { prefix, rest }) => {
            tracing::warn!(
                limit,
                "idem: response body too large to store; storing a response-not-stored marker"
            );
            if end(&engine, &lease, not_stored(&shared.filter, limit)).await == Settled::Superseded
            {
                return Ok(Ok(superseded()));
            }
            Ok(Ok(Response::from_parts(
                parts,
                ResponseBody::chain(prefix, rest),
            )))
        }
        Ran::Store(parts, Buffered::Failed { prefix, error }) => {
            end(&engine, &lease, ambiguous("body_error")).await;
            Ok(Ok(Response::from_parts(
                parts,
                ResponseBody::failed(prefix, error),
            )))
        }
    }
}

/// The completion stored in place of a response too large to keep: the
/// operation ran, so a retry must not run it again, but it cannot get the
/// original response either. If even the marker does not fit, the key ends
/// as outcome unknown (also never run again).
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
        _ => Settle::Unknown("unstorable"),
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
                // The lease was taken over or ended (max_hold, shutdown): let
                // the handler finish; storing its response will be refused
                // by the fencing token.
                metrics::counter!("idem_lease_lost_total").increment(1);
                tracing::error!(error = %e, "idem: lease lost while the handler runs; its response will not be stored");
            }
            work.await
        }
    }
}

/// How the layer ends a claim.
enum Settle {
    Complete(Outcome),
    Release(&'static str),
    Unknown(&'static str),
}

/// How ending a claim went.
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

/// Ends the claim in a task of its own, so that it finishes even if the
/// request's future is dropped meanwhile, retrying store errors
/// ([`Engine::settle`]).
async fn end<S: Store, C: Clock>(
    engine: &Arc<Engine<S, C>>,
    lease: &Lease,
    how: Settle,
) -> Settled {
    let engine = engine.clone();
    let lease = lease.clone();
    let task = async move { end_now(&engine, &lease, how).await }.instrument(Span::current());
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => match runtime.spawn(task).await {
            Ok(settled) => settled,
            Err(e) => {
                tracing::error!(error = %e, "idem: ending the claim failed");
                Settled::Done
            }
        },
        Err(_) => task.await,
    }
}

async fn end_now<S: Store, C: Clock>(
    engine: &Arc<Engine<S, C>>,
    lease: &Lease,
    how: Settle,
) -> Settled {
    if lease.is_finished() {
        // The handler completed the key in its transaction and said so
        // (`IdempotencyClaim::mark_applied`): nothing left to store.
        tracing::debug!("idem: key completed by the handler");
        return Settled::Done;
    }
    let (ending, reason) = match how {
        Settle::Complete(outcome) => (Ending::Complete(outcome), "complete"),
        Settle::Release(reason) => {
            metrics::counter!("idem_released_total", "reason" => reason).increment(1);
            (Ending::Release, reason)
        }
        Settle::Unknown(reason) => (Ending::Unknown, reason),
    };
    // One attempt inline, so the client gets its response without waiting
    // out a store outage; if it fails, keep trying in the background for as
    // long as the write can matter (a retry meanwhile gets 409).
    let now = engine.clock().now();
    let first = engine.settle_until(lease, ending.clone(), now).await;
    let settled = match first {
        Err(e) if !matches!(e, Error::LeaseLost(_)) => {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                tracing::warn!(error = %e, "idem: ending the claim failed; retrying in the background");
                let engine = engine.clone();
                let lease = lease.clone();
                runtime.spawn(
                    async move {
                        let settled = engine.settle(&lease, ending).await;
                        report(settled, reason);
                    }
                    .instrument(Span::current()),
                );
                return Settled::Done;
            }
            Err(e)
        }
        other => other,
    };
    report(settled, reason)
}

/// Logs and counts how ending a claim went.
fn report(settled: Result<Ending, Error>, reason: &'static str) -> Settled {
    match settled {
        Ok(Ending::Unknown) => {
            metrics::counter!("idem_outcome_unknown_total", "reason" => reason).increment(1);
            tracing::warn!(
                reason,
                "idem: the request ended without a stored result; the key answers outcome-unknown and is never run again"
            );
            Settled::Done
        }
        Ok(_) => Settled::Done,
        Err(Error::LeaseLost(Fenced::Finished {
            by_holder: true, ..
        })) => {
            // The handler completed the key itself (in its transaction), or
            // the engine ended it (max_hold, shutdown).
            tracing::debug!("idem: key already finished by this claim");
            Settled::Done
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
            Settled::Superseded
        }
        Err(e) => {
            let reason = if matches!(e, Error::LeaseLost(_)) {
                "lease_lost"
            } else {
                "store"
            };
            metrics::counter!("idem_completion_failures_total", "reason" => reason).increment(1);
            tracing::error!(
                error = %e,
                "idem: the request ran but its ending could not be stored; the key stays in flight until its lease lapses, then a retry runs the operation again"
            );
            Settled::Done
        }
    }
}
