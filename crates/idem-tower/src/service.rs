//! The service: the call path of a covered request up to its claim.
//!
//! [`Idempotency`] parses the key, derives the scope, buffers the body,
//! fingerprints the request and asks the engine to begin the key; it answers
//! replays, conflicts and errors itself, and hands a fresh claim to the
//! claimed path (`crate::claimed`).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderValue, Request, Response, header};
use http_body::Body;
use http_body_util::{BodyExt as _, LengthLimitError, Limited};
use idem_core::store::{BoxError, Store, StoreError};
use idem_core::{Begin, Clock, DefaultClock, Error, RecordKey, ReplayKind};
use tower::Service;
use tracing::{Instrument as _, Span, field};

use crate::body::ResponseBody;
use crate::claimed;
use crate::config::Config;
use crate::fingerprint::fingerprint;
use crate::header::parse_key_header;
use crate::metrics::Outcome;
use crate::problem::{ProblemType, answer, answer_retry};
use crate::stored::{IDEMPOTENT_REPLAYED, StoredResponse};

/// The service made by [`IdempotencyLayer`](crate::IdempotencyLayer) around
/// an inner service `T`.
///
/// # Behavior
/// Readiness is the inner service's. Each call takes the readied inner
/// service and leaves a clone in its place, since the call's future outlives
/// `call`. Requests whose method the layer does not cover go to the inner
/// service untouched; covered ones are handled as the [crate docs](crate)
/// describe.
pub struct Idempotency<T, S, C = DefaultClock> {
    inner: T,
    config: Arc<Config<S, C>>,
}

impl<T, S, C> Idempotency<T, S, C> {
    pub(crate) fn new(inner: T, config: Arc<Config<S, C>>) -> Self {
        Self { inner, config }
    }
}

impl<T: Clone, S, C> Clone for Idempotency<T, S, C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            config: self.config.clone(),
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

/// The inner services the claimed path runs (a trait alias): a service of
/// `Request<ReqBody>` answering `Response<ResBody>`, which can move to a
/// task of its own with its future and error.
pub(crate) trait Inner<ReqBody, ResBody>:
    Service<
        Request<ReqBody>,
        Response = Response<ResBody>,
        Future: Send + 'static,
        Error: Send + 'static,
    > + Send
    + 'static
{
}

impl<T, ReqBody, ResBody> Inner<ReqBody, ResBody> for T where
    T: Service<
            Request<ReqBody>,
            Response = Response<ResBody>,
            Future: Send + 'static,
            Error: Send + 'static,
        > + Send
        + 'static
{
}

/// The response bodies the claimed path buffers and stores (a trait alias).
pub(crate) trait StoredBody:
    Body<Data = Bytes, Error: Send + 'static> + Send + 'static
{
}

impl<B> StoredBody for B where B: Body<Data = Bytes, Error: Send + 'static> + Send + 'static {}

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
        let config = self.config.clone();
        if !config.methods.contains(req.method()) {
            return Box::pin(pass(inner, req));
        }
        let span = tracing::info_span!(
            "idem",
            method = %req.method(),
            key = field::Empty,
            attempt = field::Empty,
            outcome = field::Empty,
        );
        Box::pin(handle(config, inner, req).instrument(span))
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

/// Everything before the claim: key, scope, body, fingerprint, `begin`.
async fn handle<T, S, C, ReqBody, ResBody>(
    config: Arc<Config<S, C>>,
    inner: T,
    req: Request<ReqBody>,
) -> Result<Response<ResponseBody<ResBody>>, T::Error>
where
    T: Inner<ReqBody, ResBody>,
    S: Store,
    C: Clock,
    ReqBody: Body<Data: Send, Error: Into<BoxError>> + From<Bytes> + Send + 'static,
    ResBody: StoredBody,
{
    let (parts, body) = req.into_parts();
    let key = match parse_key_header(&parts.headers, &config.header) {
        Ok(Some(key)) => key,
        Ok(None) if config.required => {
            Outcome::Invalid.record();
            let detail = format!(
                "{} {} requires an {} header; generate a new UUID for each new operation",
                parts.method,
                parts.uri.path(),
                config.header
            );
            return Ok(answer(ProblemType::MissingKey, &detail));
        }
        Ok(None) => {
            Outcome::Passthrough.record();
            return pass(inner, Request::from_parts(parts, body)).await;
        }
        Err(e) => {
            Outcome::Invalid.record();
            return Ok(answer(ProblemType::InvalidKey, &e.to_string()));
        }
    };
    let scope = match (config.scope)(&parts) {
        Ok(scope) => scope,
        Err(rejection) => {
            Outcome::Rejected.record();
            return Ok(rejection.into_response().map(ResponseBody::full));
        }
    };
    let record_key = RecordKey::new(&scope, &key);
    // Never log the client's key: its scoped digest identifies it.
    Span::current().record("key", record_key.hex().get(..16).unwrap_or_default());

    let limit = config.max_body_bytes;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        Outcome::Invalid.record();
        return Ok(body_too_large(limit));
    }
    let bytes = match Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<LengthLimitError>() => {
            Outcome::Invalid.record();
            return Ok(body_too_large(limit));
        }
        Err(e) => {
            Outcome::Invalid.record();
            tracing::debug!(error = %e, "idem: request body unreadable");
            return Ok(answer(
                ProblemType::BodyUnreadable,
                "the request body could not be read",
            ));
        }
    };
    let fingerprint = fingerprint(&parts, &config.fingerprint_headers, &bytes);

    match crate::begin::begin(&config.engine, record_key, fingerprint).await {
        Ok(Begin::Proceed(lease)) => {
            Outcome::Fresh.record();
            Span::current().record("attempt", lease.attempt());
            claimed::run(config, inner, parts, bytes, lease).await
        }
        Ok(Begin::Replay(replay)) if replay.kind == ReplayKind::Unknown => {
            Outcome::Unknown.record();
            Ok(answer(
                ProblemType::OutcomeUnknown,
                "the request with this idempotency key ended without a known result and may or may not have taken effect; it will not be executed again with this key: check the resource, then use a new key",
            ))
        }
        Ok(Begin::Replay(replay)) => {
            match StoredResponse::decode(&replay.outcome, &config.filter) {
                Ok(decoded) => {
                    Outcome::Replayed.record();
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
                    Outcome::StoreError.record();
                    tracing::error!(error = %e, "idem: the stored response cannot be decoded");
                    Ok(answer(
                        ProblemType::CorruptRecord,
                        "the stored result of this request cannot be read; it was not executed again",
                    ))
                }
            }
        }
        Ok(Begin::InProgress { retry_after }) => {
            Outcome::Conflict.record();
            Ok(in_progress(retry_after.min(config.max_retry_after)))
        }
        Ok(Begin::Mismatch) => {
            Outcome::Mismatch.record();
            Ok(answer(
                ProblemType::KeyReused,
                "this idempotency key was already used with a different request (method, path, query or body); use a new key for a new operation",
            ))
        }
        Err(e) => begin_failed(config, inner, parts, bytes, &e).await,
    }
}

async fn begin_failed<T, S, C, ReqBody, ResBody>(
    config: Arc<Config<S, C>>,
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
            Outcome::Conflict.record();
            Ok(in_progress(Duration::from_secs(1)))
        }
        // Never fail open here: the instance is stopping, not the store.
        Error::ShuttingDown => {
            Outcome::ShuttingDown.record();
            Ok(answer_retry(
                ProblemType::ShuttingDown,
                "this instance is shutting down; the request was not executed, retry it with the same key",
                config.store_retry_after,
            ))
        }
        e if e.is_transient() && config.fail_open => {
            Outcome::FailOpen.record();
            tracing::warn!(error = %e, "idem: store unavailable; running the request UNPROTECTED (fail-open)");
            pass(inner, Request::from_parts(parts, ReqBody::from(bytes))).await
        }
        e if e.is_transient() => {
            Outcome::StoreError.record();
            tracing::warn!(error = %e, "idem: store unavailable; answering 503");
            Ok(answer_retry(
                ProblemType::StoreUnavailable,
                "the idempotency store is unavailable; the request was not executed, retry it with the same key",
                config.store_retry_after,
            ))
        }
        Error::Store(StoreError::Corrupt { .. }) | Error::Codec(_) => {
            Outcome::StoreError.record();
            tracing::error!(error = %e, "idem: the stored record cannot be read");
            Ok(answer(
                ProblemType::CorruptRecord,
                "the stored record of this key cannot be read; the request was not executed",
            ))
        }
        e => {
            Outcome::StoreError.record();
            tracing::error!(error = %e, "idem: store failed");
            Ok(answer(
                ProblemType::StoreFailed,
                "the idempotency store failed; the request was not executed",
            ))
        }
    }
}

fn body_too_large<B: Body>(limit: usize) -> Response<ResponseBody<B>> {
    answer(
        ProblemType::BodyTooLarge,
        &format!("the request body exceeds {limit} bytes"),
    )
}

fn in_progress<B: Body>(retry_after: Duration) -> Response<ResponseBody<B>> {
    answer_retry(
        ProblemType::RequestInProgress,
        "a request with this idempotency key is still being processed; retry after the time in Retry-After to get its result",
        retry_after,
    )
}
