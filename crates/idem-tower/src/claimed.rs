//! The claimed path: the handler runs under a fresh claim, with a heartbeat
//! beside it, and the claim is settled by what it did.
//!
//! The handler, the buffering of its response and the storing of it run to
//! completion in a task of their own (unless `release_on_cancel`), so that
//! dropping the request's future cannot stop them half-way.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt as _;
use futures_util::future::{Either, select};
use http::request::Parts;
use http::{Request, Response, response};
use http_body::Body;
use idem_core::store::Store;
use idem_core::{Clock, Engine, Lease};
use tracing::{Instrument as _, Span};

use crate::body::{self, Buffered, ResponseBody};
use crate::claim::{IdempotencyClaim, Prepare};
use crate::config::Config;
use crate::effect::{NoEffect, NoEffectFlag};
use crate::metrics::{self, ReleaseReason};
use crate::problem::{ProblemType, answer_retry};
use crate::service::{Inner, StoredBody};
use crate::settle::{Ambiguous, Settle, Settled, end};

/// Runs the inner service under the fresh claim `lease`, to completion in a
/// task of its own unless `release_on_cancel`, and answers with what it
/// produced (or resumes its panic).
pub(crate) async fn run<T, S, C, ReqBody, ResBody>(
    config: Arc<Config<S, C>>,
    inner: T,
    mut parts: Parts,
    bytes: Bytes,
    lease: Lease,
) -> Result<Response<ResponseBody<ResBody>>, T::Error>
where
    T: Inner<ReqBody, ResBody>,
    S: Store,
    C: Clock,
    ReqBody: From<Bytes> + Send + 'static,
    ResBody: StoredBody,
{
    let no_effect = NoEffectFlag::default();
    parts.extensions.insert(IdempotencyClaim::new(
        lease.clone(),
        prepare(&config.engine),
        config.filter.clone(),
        no_effect.clone(),
    ));
    let req = Request::from_parts(parts, ReqBody::from(bytes));
    let release_on_cancel = config.release_on_cancel;
    let guard = ReleaseOnDrop {
        armed: release_on_cancel.then(|| (config.engine.clone(), lease.clone())),
    };
    let run = run_claimed(config, inner, req, lease, no_effect, guard).instrument(Span::current());
    let claimed = match tokio::runtime::Handle::try_current() {
        Ok(runtime) if !release_on_cancel => match runtime.spawn(run).await {
            Ok(claimed) => claimed,
            // The runtime is shutting down and cancelled the task; the
            // engine's shutdown (or its drop guard) deals with the key.
            Err(e) if e.is_cancelled() => {
                return Ok(answer_retry(
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
    config: Arc<Config<S, C>>,
    mut inner: T,
    req: Request<ReqBody>,
    lease: Lease,
    no_effect: NoEffectFlag,
    mut guard: ReleaseOnDrop<S, C>,
) -> Claimed<Response<ResponseBody<ResBody>>, T::Error>
where
    T: Inner<ReqBody, ResBody>,
    S: Store,
    C: Clock,
    ResBody: StoredBody,
{
    let engine = config.engine.clone();
    let limit = engine.outcome_limit();
    let store_if = &config.store_if;
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
    metrics::handler_duration(started.elapsed());
    // From here on, ending the claim runs to its end even if the client
    // goes away (see `end`).
    guard.disarm();
    // An ambiguous ending releases the key only if the handler said that
    // nothing took effect.
    let ambiguous = |why| Settle::ambiguous(why, no_effect.is_set());

    match ran {
        Ran::Panicked(panic) => {
            end(&engine, &lease, ambiguous(Ambiguous::Panic)).await;
            Err(panic)
        }
        Ran::Errored(e) => {
            end(&engine, &lease, ambiguous(Ambiguous::Error)).await;
            Ok(Err(e))
        }
        Ran::NoEffect(parts, body) => {
            end(&engine, &lease, Settle::Release(ReleaseReason::NoEffect)).await;
            Ok(Ok(Response::from_parts(parts, ResponseBody::inner(body))))
        }
        Ran::Unstored(parts, body) => {
            end(&engine, &lease, ambiguous(Ambiguous::Status)).await;
            Ok(Ok(Response::from_parts(parts, ResponseBody::inner(body))))
        }
        Ran::Store(parts, Buffered::Complete { data, trailers }) => {
            let how = Settle::store(&parts, &data, trailers.as_ref(), &config.filter, limit);
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
            if end(&engine, &lease, Settle::not_stored(&config.filter, limit)).await
                == Settled::Superseded
            {
                return Ok(Ok(superseded()));
            }
            Ok(Ok(Response::from_parts(
                parts,
                ResponseBody::chain(prefix, rest),
            )))
        }
        Ran::Store(parts, Buffered::Failed { prefix, error }) => {
            end(&engine, &lease, ambiguous(Ambiguous::BodyError)).await;
            Ok(Ok(Response::from_parts(
                parts,
                ResponseBody::failed(prefix, error),
            )))
        }
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
                metrics::lease_lost();
                tracing::error!(error = %e, "idem: lease lost while the handler runs; its response will not be stored");
            }
            work.await
        }
    }
}

/// The answer of a request whose claim was taken over while its handler
/// ran: its response was not kept, and the key's answer is the later
/// request's, so the client is told to retry and gets that one (never two
/// different answers for one key).
fn superseded<B: Body>() -> Response<ResponseBody<B>> {
    answer_retry(
        ProblemType::RequestInProgress,
        "this request outlived its claim on the idempotency key and a later request with the same key took the operation over; this request's response was not kept; retry to get the answer of the request that holds the key",
        Duration::from_secs(1),
    )
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

/// With [`release_on_cancel`](crate::IdempotencyLayerBuilder::release_on_cancel)
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
                async move { end(&engine, &lease, Settle::Release(ReleaseReason::Cancelled)).await }
                    .instrument(span),
            );
        }
    }
}

/// The engine as the claim's [`Prepare`].
fn prepare<S: Store, C: Clock>(engine: &Arc<Engine<S, C>>) -> Arc<dyn Prepare> {
    engine.clone()
}
