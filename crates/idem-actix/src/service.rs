//! [`IdempotencyMiddleware`]: the call path of a covered request up to its
//! claim. The request head goes to the contract
//! ([`idem_http::Contract::admit`]: key, scope, body, fingerprint, `begin`),
//! its answers are sent, and a fresh claim goes on to `crate::claimed`.

use std::fmt;
use std::rc::Rc;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{Payload, Service, ServiceRequest, ServiceResponse, forward_ready};
use actix_web::{Error, HttpMessage as _};
use futures_util::future::LocalBoxFuture;
use idem_core::store::Store;
use idem_core::{Clock, DefaultClock};
use idem_http::{Admission, PassBody, Reply};
use tracing::Instrument as _;

use crate::body::Incoming;
use crate::transform::Idempotency;
use crate::{claimed, convert};

/// The inner services the middleware wraps (a trait alias): actix-web
/// services of requests answering responses with bodies `B`.
pub(crate) trait Inner<B>:
    Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static
{
}

impl<T, B> Inner<B> for T where
    T: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static
{
}

/// The service [`Idempotency`] wraps around the inner service `T` (what
/// `App::wrap` runs).
///
/// # Behavior
/// Readiness is the inner service's. Requests whose method the middleware
/// does not cover go to the inner service untouched; covered ones are
/// handled as the [crate docs](crate) describe. The response body is the
/// inner one ([`EitherBody::Left`]) where the middleware passes it on as
/// it is, else a [`BoxBody`](actix_web::body::BoxBody) of its own
/// (replays, problem answers, responses it buffered to store them).
pub struct IdempotencyMiddleware<T, S, C = DefaultClock> {
    service: Rc<T>,
    idem: Idempotency<S, C>,
}

impl<T, S, C> IdempotencyMiddleware<T, S, C> {
    pub(crate) fn new(service: Rc<T>, idem: Idempotency<S, C>) -> Self {
        Self { service, idem }
    }
}

impl<T, S, C> fmt::Debug for IdempotencyMiddleware<T, S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyMiddleware")
            .field("idem", &self.idem)
            .finish_non_exhaustive()
    }
}

impl<T, B, S, C> Service<ServiceRequest> for IdempotencyMiddleware<T, S, C>
where
    T: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
    S: Store,
    C: Clock,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = Error;
    type Future = LocalBoxFuture<'static, Result<Self::Response, Error>>;

    forward_ready!(service);

    fn call(&self, req: ServiceRequest) -> Self::Future {
        let contract = self.idem.contract();
        match convert::request_head(&req) {
            Some(head) if contract.covers_request(&head) => {
                let span = contract.span(&head.method);
                let admitted = admit(self.idem.clone(), Rc::clone(&self.service), req, head);
                Box::pin(admitted.instrument(span))
            }
            Some(_) => {
                let call = self.service.call(req);
                Box::pin(async move { Ok(call.await?.map_into_left_body()) })
            }
            // Unreachable for a request actix parsed (one grammar for both);
            // refused rather than run unprotected, since whether it is
            // covered cannot be told.
            None => Box::pin(async {
                Err(actix_web::error::ErrorBadRequest(
                    "the request head cannot be represented",
                ))
            }),
        }
    }
}

/// Admits the request through the contract, then runs it as it decided.
async fn admit<T, B, S, C>(
    idem: Idempotency<S, C>,
    service: Rc<T>,
    mut req: ServiceRequest,
    head: http::request::Parts,
) -> Result<ServiceResponse<EitherBody<B>>, Error>
where
    T: Inner<B>,
    B: MessageBody + 'static,
    S: Store,
    C: Clock,
{
    // The path and query the client sent: actix's URI is the whole one,
    // also under `web::scope`.
    let target = head
        .uri
        .path_and_query()
        .map_or_else(|| head.uri.path(), |pq| pq.as_str());
    let payload = Incoming(req.take_payload());
    let admission = idem
        .contract
        .admit(&head, target, || (idem.scope)(req.request()), payload)
        .await;
    let bytes = match admission {
        Admission::Answer(reply) => return Ok(answer(req, reply)),
        Admission::Proceed(claimed, bytes) => {
            return claimed::run(claimed, service, req, bytes).await;
        }
        Admission::Pass(PassBody::Unread(Incoming(payload))) => payload,
        Admission::Pass(PassBody::Read(bytes)) | Admission::FailOpen(bytes) => Payload::from(bytes),
    };
    req.set_payload(bytes);
    Ok(service.call(req).await?.map_into_left_body())
}

/// `req` answered with a reply of the contract.
pub(crate) fn answer<B>(req: ServiceRequest, reply: Reply) -> ServiceResponse<EitherBody<B>> {
    req.into_response(convert::response(reply))
        .map_into_right_body()
}
