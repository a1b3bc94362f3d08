//! A fresh claim in an adapter's hands: the handler runs with a heartbeat
//! beside it, and [`Claimed::finish`] ends the key by what the handler did,
//! per the exit table of docs/reliability.md.

use std::fmt;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::future::{Either, select};
use http::{HeaderMap, response};
use idem_core::store::Store;
use idem_core::{Clock, Lease};
use tracing::{Instrument as _, Span};

use crate::claim::IdempotencyClaim;
use crate::contract::{Contract, Dialect};
use crate::effect::NoEffectFlag;
use crate::metrics::{self, ReleaseReason};
use crate::reply::Reply;
use crate::settle::{Ambiguous, Settle, Settled, end};
use crate::stored::Origin;

/// How the handler of a claimed request ended, as the adapter saw it.
#[derive(Debug)]
#[non_exhaustive]
pub enum Exit<'a> {
    /// It panicked.
    Panicked,
    /// The inner service returned an error instead of a response.
    Errored,
    /// Its response carried [`NoEffect`](crate::NoEffect): nothing took
    /// effect.
    NoEffect,
    /// Its response was refused by [`Contract::stores`] and not buffered.
    Unstored,
    /// Its response, buffered whole (within the engine's outcome limit).
    Response {
        /// The head.
        parts: &'a response::Parts,
        /// The body.
        body: &'a Bytes,
        /// The trailers, if any.
        trailers: Option<&'a HeaderMap>,
    },
    /// Its response body is larger than the engine's outcome limit; the
    /// adapter streams it to the client.
    TooLarge,
    /// Its response body failed mid-stream.
    BodyFailed,
}

/// How finishing went.
#[derive(Debug)]
#[non_exhaustive]
// Returned once per claimed request and matched at once: boxing the reply
// would only add an allocation to the rare path.
#[allow(clippy::large_enum_variant)]
pub enum Finished {
    /// The key ended (stored, released, outcome unknown, or retried in the
    /// background): send the handler's response.
    Done,
    /// A later request took the key over while this handler ran: send
    /// this instead of the handler's response.
    Superseded(Reply),
}

/// A fresh claim, from [`Admission::Proceed`](crate::Admission::Proceed).
pub struct Claimed<S, C> {
    contract: Arc<Contract<S, C>>,
    lease: Lease,
    origin: Origin,
    no_effect: NoEffectFlag,
}

impl<S, C> fmt::Debug for Claimed<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Claimed")
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl<S: Store, C: Clock> Claimed<S, C> {
    pub(crate) fn new(contract: Arc<Contract<S, C>>, lease: Lease, origin: Origin) -> Self {
        Self {
            contract,
            lease,
            origin,
            no_effect: NoEffectFlag::default(),
        }
    }

    /// The claim to hand to the handler (in its request's extensions).
    pub fn claim(&self) -> IdempotencyClaim {
        let engine: Arc<dyn crate::claim::Prepare> = self.contract.engine.clone();
        IdempotencyClaim::new(
            self.lease.clone(),
            engine,
            self.contract.filter.clone(),
            self.no_effect.clone(),
            self.origin.clone(),
        )
    }

    /// The lease.
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// The contract.
    pub fn contract(&self) -> &Arc<Contract<S, C>> {
        &self.contract
    }

    /// The largest response body kept: buffer up to this, and report
    /// [`Exit::TooLarge`] beyond.
    pub fn outcome_limit(&self) -> usize {
        self.contract.engine.outcome_limit()
    }

    /// Runs `work` (the handler, and the buffering of its response) with
    /// the lease's heartbeat beside it, and records its duration.
    ///
    /// # Behavior
    /// If the lease is lost meanwhile (taken over, ended by `max_hold` or a
    /// shutdown), `work` still runs to its end; storing its response is then
    /// refused by the fencing token and [`finish`](Self::finish) says
    /// [`Finished::Superseded`].
    pub async fn run<F: Future>(&self, work: F) -> F::Output {
        let started = Instant::now();
        let work = pin!(work);
        let beat = pin!(self.contract.engine.keep_alive(&self.lease));
        let output = match select(work, beat).await {
            Either::Left((value, _)) => value,
            Either::Right((beat, work)) => {
                if let Err(e) = beat {
                    metrics::lease_lost();
                    tracing::error!(error = %e, "idem: lease lost while the handler runs; its response will not be stored");
                }
                work.await
            }
        };
        metrics::handler_duration(started.elapsed());
        output
    }

    /// A guard that, with [`release_on_cancel`](crate::Builder::release_on_cancel)
    /// only, releases the key if it is dropped armed (the request's future
    /// was dropped while the handler ran). Disarm it once the handler
    /// ended.
    pub fn release_guard(&self) -> ReleaseGuard<S, C> {
        ReleaseGuard {
            armed: self
                .contract
                .release_on_cancel
                .then(|| (self.contract.clone(), self.lease.clone())),
        }
    }

    /// Ends the key by how the handler ended, in a task of its own so that
    /// it finishes even if this future is dropped.
    ///
    /// # Behavior
    /// The exit table of docs/reliability.md:
    /// - a response to store ([`Exit::Response`], under gRPC only with a
    ///   final status) is stored; one too large to keep is completed with a
    ///   `response-not-stored` marker;
    /// - [`Exit::NoEffect`] releases the key;
    /// - the ambiguous endings ([`Exit::Unstored`], [`Exit::Errored`],
    ///   [`Exit::Panicked`], [`Exit::BodyFailed`], and a gRPC status that
    ///   may follow an effect) finish the key as outcome unknown, or
    ///   release it if the handler declared no effect
    ///   ([`IdempotencyClaim::declare_no_effect`]); with recorded progress
    ///   (phases, checkpoints) the engine keeps the record as a retryable
    ///   failure instead.
    pub async fn finish(&self, exit: Exit<'_>) -> Finished {
        let ambiguous = |why| Settle::ambiguous(why, self.no_effect.is_set());
        let limit = self.outcome_limit();
        let origin = Some(self.origin.clone());
        let how = match exit {
            Exit::Panicked => ambiguous(Ambiguous::Panic),
            Exit::Errored => ambiguous(Ambiguous::Error),
            Exit::NoEffect => Settle::Release(ReleaseReason::NoEffect),
            Exit::Unstored => ambiguous(Ambiguous::Status),
            Exit::BodyFailed => ambiguous(Ambiguous::BodyError),
            Exit::TooLarge => {
                tracing::warn!(
                    limit,
                    "idem: response body too large to store; storing a response-not-stored marker"
                );
                Settle::not_stored(&self.contract, limit, origin)
            }
            Exit::Response {
                parts,
                body,
                trailers,
            } => {
                let keep = match self.contract.dialect {
                    Dialect::Http => true,
                    Dialect::Grpc => {
                        parts.status == http::StatusCode::OK
                            && crate::grpc::is_final(&parts.headers, trailers)
                    }
                };
                if keep {
                    Settle::store(parts, body, trailers, limit, origin, &self.contract)
                } else {
                    ambiguous(Ambiguous::Status)
                }
            }
        };
        match end(&self.contract.engine, &self.lease, how).await {
            Settled::Done => Finished::Done,
            Settled::Superseded => Finished::Superseded(self.contract.superseded()),
        }
    }
}

/// See [`Claimed::release_guard`].
pub struct ReleaseGuard<S: Store, C: Clock> {
    armed: Option<(Arc<Contract<S, C>>, Lease)>,
}

impl<S: Store, C: Clock> fmt::Debug for ReleaseGuard<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReleaseGuard")
            .field("armed", &self.armed.is_some())
            .finish()
    }
}

impl<S: Store, C: Clock> ReleaseGuard<S, C> {
    /// The handler ended: dropping the guard no longer releases the key.
    pub fn disarm(&mut self) {
        self.armed = None;
    }
}

impl<S: Store, C: Clock> Drop for ReleaseGuard<S, C> {
    fn drop(&mut self) {
        if let Some((contract, lease)) = self.armed.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let span = Span::current();
            runtime.spawn(
                async move {
                    end(
                        &contract.engine,
                        &lease,
                        Settle::Release(ReleaseReason::Cancelled),
                    )
                    .await
                }
                .instrument(span),
            );
        }
    }
}
