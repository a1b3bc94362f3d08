//! The claimed path: the handler runs under a fresh claim, with a heartbeat
//! beside it, and the claim is finished by what it did
//! ([`idem_http::Claimed::finish`]).
//!
//! The handler, the buffering of its response and the storing of it run to
//! completion in a task of their own (unless `release_on_cancel`), so that
//! dropping the request's future cannot stop them half-way.

use std::panic::AssertUnwindSafe;

use bytes::Bytes;
use futures_util::FutureExt as _;
use http::request::Parts;
use http::{Request, Response, response};
use http_body::Body;
use idem_core::Clock;
use idem_core::store::Store;
use idem_http::{Claimed, Exit, Finished, NoEffect};
use tracing::{Instrument as _, Span};

use crate::body::{self, Buffered, ResponseBody};
use crate::service::{Inner, StoredBody};

/// Runs the inner service under `claimed`, to completion in a task of its
/// own unless `release_on_cancel`, and answers with what it produced (or
/// resumes its panic).
pub(crate) async fn run<T, S, C, ReqBody, ResBody>(
    claimed: Claimed<S, C>,
    inner: T,
    mut parts: Parts,
    bytes: Bytes,
) -> Result<Response<ResponseBody<ResBody>>, T::Error>
where
    T: Inner<ReqBody, ResBody>,
    S: Store,
    C: Clock,
    ReqBody: From<Bytes> + Send + 'static,
    ResBody: StoredBody,
{
    parts.extensions.insert(claimed.claim());
    let req = Request::from_parts(parts, ReqBody::from(bytes));
    let release_on_cancel = claimed.contract().release_on_cancel();
    let stopped = claimed.contract().stopped();
    let run = run_claimed(claimed, inner, req).instrument(Span::current());
    let outcome = match tokio::runtime::Handle::try_current() {
        Ok(runtime) if !release_on_cancel => match runtime.spawn(run).await {
            Ok(outcome) => outcome,
            // The runtime is shutting down and cancelled the task; the
            // engine's shutdown (or its drop guard) deals with the key.
            Err(e) if e.is_cancelled() => return Ok(body::reply(stopped)),
            Err(e) => Err(e.into_panic()),
        },
        _ => run.await,
    };
    match outcome {
        Ok(result) => result,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Runs the handler under the claim with a heartbeat, then finishes the
/// claim.
async fn run_claimed<T, S, C, ReqBody, ResBody>(
    claimed: Claimed<S, C>,
    mut inner: T,
    req: Request<ReqBody>,
) -> Outcome<Response<ResponseBody<ResBody>>, T::Error>
where
    T: Inner<ReqBody, ResBody>,
    S: Store,
    C: Clock,
    ResBody: StoredBody,
{
    let mut guard = claimed.release_guard();
    let limit = claimed.outcome_limit();
    let contract = claimed.contract().clone();
    let call = AssertUnwindSafe(async move {
        match inner.call(req).await {
            Err(e) => Ran::Errored(e),
            Ok(response) => {
                let (parts, body) = response.into_parts();
                if parts.extensions.get::<NoEffect>().is_some() {
                    Ran::NoEffect(parts, body)
                } else if contract.stores(&parts) {
                    Ran::Store(parts, body::buffer(body, limit).await)
                } else {
                    Ran::Unstored(parts, body)
                }
            }
        }
    })
    .catch_unwind();
    let ran = claimed
        .run(async move {
            match call.await {
                Ok(ran) => ran,
                Err(panic) => Ran::Panicked(panic),
            }
        })
        .await;
    // From here on, finishing the claim runs to its end even if the client
    // goes away.
    guard.disarm();
    let exit = match &ran {
        Ran::Panicked(_) => Exit::Panicked,
        Ran::Errored(_) => Exit::Errored,
        Ran::NoEffect(..) => Exit::NoEffect,
        Ran::Unstored(..) => Exit::Unstored,
        Ran::Store(parts, Buffered::Complete { data, trailers }) => Exit::Response {
            parts,
            body: data,
            trailers: trailers.as_ref(),
        },
        Ran::Store(_, Buffered::TooLarge { .. }) => Exit::TooLarge,
        Ran::Store(_, Buffered::Failed { .. }) => Exit::BodyFailed,
    };
    if let Finished::Superseded(reply) = claimed.finish(exit).await {
        return Ok(Ok(body::reply(reply)));
    }
    match ran {
        Ran::Panicked(panic) => Err(panic),
        Ran::Errored(e) => Ok(Err(e)),
        Ran::NoEffect(parts, body) | Ran::Unstored(parts, body) => {
            Ok(Ok(Response::from_parts(parts, ResponseBody::inner(body))))
        }
        Ran::Store(parts, Buffered::Complete { data, trailers }) => Ok(Ok(Response::from_parts(
            parts,
            ResponseBody::full_with_trailers(data, trailers),
        ))),
        Ran::Store(parts, Buffered::TooLarge { prefix, rest }) => Ok(Ok(Response::from_parts(
            parts,
            ResponseBody::chain(prefix, rest),
        ))),
        Ran::Store(parts, Buffered::Failed { prefix, error }) => Ok(Ok(Response::from_parts(
            parts,
            ResponseBody::failed(prefix, error),
        ))),
    }
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
type Outcome<R, E> = Result<Result<R, E>, Box<dyn std::any::Any + Send>>;
