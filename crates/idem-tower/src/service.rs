//! The service: the call path of a covered request up to its claim.
//!
//! [`Idempotency`] hands a covered request to the contract
//! ([`idem_http::Contract::admit`]: key, scope, body, fingerprint, `begin`),
//! sends its answers, and hands a fresh claim to the claimed path
//! (`crate::claimed`).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::request::Parts;
use http::{Request, Response};
use http_body::Body;
use http_body_util::{BodyExt as _, LengthLimitError, Limited};
use idem_core::store::{BoxError, Store};
use idem_core::{Clock, DefaultClock};
use idem_http::{Admission, PassBody, ReadBody, ReadError};
use tower::Service;
use tracing::Instrument as _;

use crate::body::ResponseBody;
use crate::claimed;
use crate::layer::Shared;

/// The service made by [`IdempotencyLayer`](crate::IdempotencyLayer) around
/// an inner service `T`.
///
/// # Behavior
/// Readiness is the inner service's. Each call takes the readied inner
/// service and leaves a clone in its place, since the call's future outlives
/// `call`. Requests the layer does not cover (by method, or by its
/// [`covers`](idem_http::Builder::covers) predicate) go to the inner
/// service untouched; covered ones are handled as the [crate docs](crate)
/// describe.
pub struct Idempotency<T, S, C = DefaultClock> {
    inner: T,
    shared: Arc<Shared<S, C>>,
}

impl<T, S, C> Idempotency<T, S, C> {
    pub(crate) fn new(inner: T, shared: Arc<Shared<S, C>>) -> Self {
        Self { inner, shared }
    }
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
        let shared = self.shared.clone();
        let (parts, body) = req.into_parts();
        if !shared.contract.covers_request(&parts) {
            return Box::pin(pass(inner, Request::from_parts(parts, body)));
        }
        let span = shared.contract.span(&parts.method);
        Box::pin(handle(shared, inner, parts, body).instrument(span))
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

/// The request body, as the contract reads it: up to the limit, whole.
struct Incoming<B>(B);

impl<B> ReadBody for Incoming<B>
where
    B: Body<Data: Send, Error: Into<BoxError>> + Send + 'static,
{
    type Read = Pin<Box<dyn Future<Output = Result<Bytes, ReadError>> + Send>>;

    fn read(self, limit: usize) -> Self::Read {
        Box::pin(async move {
            match Limited::new(self.0, limit).collect().await {
                Ok(collected) => Ok(collected.to_bytes()),
                Err(e) if e.is::<LengthLimitError>() => Err(ReadError::TooLarge),
                Err(e) => Err(ReadError::Unreadable(e)),
            }
        })
    }
}

/// The path and query the client sent: axum's `OriginalUri` when a router
/// put it in the extensions (a router nested with `nest`/`nest_service`
/// sees a stripped path), else the request's own.
fn target(parts: &Parts) -> &str {
    #[cfg(feature = "axum")]
    let uri = match parts.extensions.get() {
        Some(axum::extract::OriginalUri(uri)) => uri,
        None => &parts.uri,
    };
    #[cfg(not(feature = "axum"))]
    let uri = &parts.uri;
    uri.path_and_query()
        .map_or_else(|| uri.path(), |pq| pq.as_str())
}

/// Admits the request through the contract, then runs it as it decided.
async fn handle<T, S, C, ReqBody, ResBody>(
    shared: Arc<Shared<S, C>>,
    inner: T,
    parts: Parts,
    body: ReqBody,
) -> Result<Response<ResponseBody<ResBody>>, T::Error>
where
    T: Inner<ReqBody, ResBody>,
    S: Store,
    C: Clock,
    ReqBody: Body<Data: Send, Error: Into<BoxError>> + From<Bytes> + Send + 'static,
    ResBody: StoredBody,
{
    let contract = &shared.contract;
    let admission = contract
        .admit(
            &parts,
            target(&parts),
            || (shared.scope)(&parts),
            Incoming(body),
        )
        .await;
    match admission {
        Admission::Pass(PassBody::Unread(Incoming(body))) => {
            pass(inner, Request::from_parts(parts, body)).await
        }
        Admission::Pass(PassBody::Read(bytes)) | Admission::FailOpen(bytes) => {
            pass(inner, Request::from_parts(parts, ReqBody::from(bytes))).await
        }
        Admission::Answer(reply) => Ok(crate::body::reply(reply)),
        Admission::Proceed(claimed, bytes) => claimed::run(claimed, inner, parts, bytes).await,
    }
}
