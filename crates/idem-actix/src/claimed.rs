//! The claimed path: the handler runs under a fresh claim, with a heartbeat
//! beside it, and the claim is finished by what it did
//! ([`idem_http::Claimed::finish`]).
//!
//! The handler, the buffering of its response and the storing of it run to
//! completion in a task of their own on the worker's runtime (unless
//! `release_on_cancel`), so that a dropped request (the client went away)
//! cannot stop them half-way. actix futures are not `Send`: the task is a
//! local one (`actix_web::rt::spawn`).

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::rc::Rc;
use std::sync::Arc;

use actix_web::body::{BoxBody, EitherBody, MessageBody};
use actix_web::dev::{Payload, Service, ServiceRequest, ServiceResponse};
use actix_web::error::InternalError;
use actix_web::{Error, HttpMessage as _, HttpRequest, HttpResponse};
use bytes::Bytes;
use futures_util::FutureExt as _;
use http::response;
use idem_core::Clock;
use idem_core::store::Store;
use idem_http::{Claimed, Contract, Exit, Finished, NoEffect, Reply};
use tracing::{Instrument as _, Span};

use crate::body::{self, Cut, Resumed};
use crate::convert;
use crate::service::Inner;

/// A panic of the handler, to resume once its claim is finished.
type Panic = Box<dyn Any + Send>;

/// What the request gets: a response or the inner service's error, or the
/// handler's panic to resume.
type Answered<B> = Result<Result<ServiceResponse<EitherBody<B>>, Error>, Panic>;

/// Runs the inner service under `claimed` with the claim in the request's
/// extensions and `bytes` as its payload, to completion in a task of its
/// own unless `release_on_cancel`, and answers with what it produced (or
/// resumes its panic).
pub(crate) async fn run<T: Inner<B>, B: MessageBody + 'static, S: Store, C: Clock>(
    claimed: Claimed<S, C>,
    service: Rc<T>,
    mut req: ServiceRequest,
    bytes: Bytes,
) -> Result<ServiceResponse<EitherBody<B>>, Error> {
    req.extensions_mut().insert(claimed.claim());
    req.set_payload(Payload::from(bytes));
    let contract = Arc::clone(claimed.contract());
    let work = under_claim(claimed, service, req).instrument(Span::current());
    let answered = if contract.release_on_cancel() {
        work.await
    } else {
        match actix_web::rt::spawn(work).await {
            Ok(answered) => answered,
            Err(e) if e.is_panic() => Err(e.into_panic()),
            // The runtime is stopping and cancelled the task: the engine's
            // shutdown (or its drop guard) deals with the key.
            Err(_) => Ok(Err(replied(contract.stopped()))),
        }
    };
    answered.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// The inner service under the claim, then the claim finished by how it
/// ended.
async fn under_claim<T, B, S, C>(
    claimed: Claimed<S, C>,
    service: Rc<T>,
    req: ServiceRequest,
) -> Answered<B>
where
    T: Inner<B>,
    B: MessageBody + 'static,
    S: Store,
    C: Clock,
{
    let mut guard = claimed.release_guard();
    let handler = AssertUnwindSafe(async {
        match service.call(req).await {
            Ok(res) => classify(claimed.contract(), res, claimed.outcome_limit()).await,
            Err(e) => Ran::Errored(e),
        }
    });
    let ran = claimed
        .run(handler.catch_unwind())
        .await
        .unwrap_or_else(Ran::Panicked);
    // From here on, finishing the claim runs to its end even if the client
    // goes away.
    guard.disarm();
    match claimed.finish(ran.exit()).await {
        Finished::Superseded(reply) => Ok(ran.superseded(reply)),
        _ => ran.answer(),
    }
}

/// Sorts a response by what finishing its claim needs: left as it is
/// ([`NoEffect`], or refused by the storage predicate), or its body kept.
async fn classify<B: MessageBody, S, C>(
    contract: &Contract<S, C>,
    res: ServiceResponse<B>,
    limit: usize,
) -> Ran<B> {
    let no_effect = res.response().extensions().get::<NoEffect>().is_some();
    let head = convert::response_head(res.response());
    if no_effect || !contract.stores(&head) {
        return Ran::AsIs { res, no_effect };
    }
    let (req, res) = res.into_parts();
    let (res, body) = res.into_parts();
    let kept = body::keep(body, limit).await;
    Ran::Kept {
        head,
        req,
        res,
        kept,
    }
}

/// What the inner service did under the claim.
enum Ran<B> {
    Panicked(Panic),
    Errored(Error),
    /// Returned as it is: marked [`NoEffect`] (release), or refused by the
    /// storage predicate (ambiguous).
    AsIs {
        res: ServiceResponse<B>,
        no_effect: bool,
    },
    /// Its body read to store it: whole, or cut short.
    Kept {
        head: response::Parts,
        req: HttpRequest,
        res: HttpResponse<()>,
        kept: Result<Bytes, (Cut, Resumed<B>)>,
    },
}

impl<B: MessageBody + 'static> Ran<B> {
    /// How it ended, for [`Claimed::finish`].
    fn exit(&self) -> Exit<'_> {
        match self {
            Self::Panicked(_) => Exit::Panicked,
            Self::Errored(_) => Exit::Errored,
            Self::AsIs {
                no_effect: true, ..
            } => Exit::NoEffect,
            Self::AsIs { .. } => Exit::Unstored,
            Self::Kept {
                head,
                kept: Ok(body),
                ..
            } => Exit::Response {
                parts: head,
                body,
                trailers: None,
            },
            Self::Kept {
                kept: Err((Cut::TooLarge, _)),
                ..
            } => Exit::TooLarge,
            Self::Kept {
                kept: Err((Cut::Failed, _)),
                ..
            } => Exit::BodyFailed,
        }
    }

    /// What the client gets: the handler's response (the body it read,
    /// then the rest), its error, or its panic.
    fn answer(self) -> Answered<B> {
        match self {
            Self::Panicked(panic) => Err(panic),
            Self::Errored(e) => Ok(Err(e)),
            Self::AsIs { res, .. } => Ok(Ok(res.map_into_left_body())),
            Self::Kept { req, res, kept, .. } => {
                let body = match kept {
                    Ok(whole) => BoxBody::new(whole),
                    Err((_, resumed)) => BoxBody::new(resumed),
                };
                Ok(Ok(
                    ServiceResponse::new(req, res.set_body(body)).map_into_right_body()
                ))
            }
        }
    }

    /// `reply` instead of the handler's response: a later request took the
    /// key over while it ran.
    fn superseded(self, reply: Reply) -> Result<ServiceResponse<EitherBody<B>>, Error> {
        let req = match self {
            Self::AsIs { res, .. } => res.into_parts().0,
            Self::Kept { req, .. } => req,
            Self::Panicked(_) | Self::Errored(_) => return Err(replied(reply)),
        };
        Ok(ServiceResponse::new(req, convert::response(reply)).map_into_right_body())
    }
}

/// `reply` where no request is left to answer with: an error whose
/// response it is (actix sends it as is).
fn replied(reply: Reply) -> Error {
    let status = reply.status;
    InternalError::from_response(status, convert::response(reply)).into()
}
