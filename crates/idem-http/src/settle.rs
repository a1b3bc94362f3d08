//! Settling: how a claim ends once its handler has run (the response stored,
//! the key released, or finished as outcome unknown), in a task of its own,
//! with one attempt inline and the rest in the background.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, response};
use idem_core::machine::Fenced;
use idem_core::store::Store;
use idem_core::{Clock, Ending, Engine, Error, Lease, Outcome};
use tracing::{Instrument as _, Span};

use crate::contract::Contract;
use crate::metrics::{CompletionFailure, ReleaseReason, UnknownReason};
use crate::problem::{Problem, ProblemType};
use crate::stored::{Origin, StoredResponse};

/// How the layer ends a claim.
pub(crate) enum Settle {
    /// Store this outcome: retries replay it.
    Complete(Outcome),
    /// Release the key: a retry runs the handler afresh.
    Release(ReleaseReason),
    /// Finish the key as outcome unknown: never run again.
    Unknown(UnknownReason),
}

/// An ending that may come after the handler's effect: the key is finished
/// as outcome unknown, or released if the handler declared no effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ambiguous {
    /// A response the storage predicate refused.
    Status,
    /// An error of the inner service.
    Error,
    /// A panic of the handler.
    Panic,
    /// A response body that failed mid-stream.
    BodyError,
}

impl Settle {
    /// The ending of an [`Ambiguous`] one: a release if the handler declared
    /// that nothing took effect, else outcome unknown.
    pub(crate) fn ambiguous(why: Ambiguous, no_effect: bool) -> Self {
        if no_effect {
            Self::Release(match why {
                Ambiguous::Status => ReleaseReason::Status,
                Ambiguous::Error => ReleaseReason::Error,
                Ambiguous::Panic => ReleaseReason::Panic,
                Ambiguous::BodyError => ReleaseReason::BodyError,
            })
        } else {
            Self::Unknown(match why {
                Ambiguous::Status => UnknownReason::Status,
                Ambiguous::Error => UnknownReason::Error,
                Ambiguous::Panic => UnknownReason::Panic,
                Ambiguous::BodyError => UnknownReason::BodyError,
            })
        }
    }

    /// The completion storing a buffered response, or the
    /// [`not_stored`](Self::not_stored) marker if it cannot be encoded or
    /// exceeds `limit`.
    pub(crate) fn store<S, C>(
        parts: &response::Parts,
        data: &Bytes,
        trailers: Option<&HeaderMap>,
        limit: usize,
        origin: Option<Origin>,
        contract: &Contract<S, C>,
    ) -> Self {
        let stored = StoredResponse::new(
            parts.status,
            &parts.headers,
            data.clone(),
            trailers,
            &contract.filter,
            origin.clone(),
        );
        match stored.encode() {
            Ok(outcome) if outcome.len() <= limit => Self::Complete(outcome),
            Ok(outcome) => {
                tracing::warn!(
                    size = outcome.len(),
                    limit,
                    "idem: response too large to store; storing a response-not-stored marker"
                );
                Self::not_stored(contract, limit, origin)
            }
            Err(e) => {
                tracing::error!(error = %e, "idem: response cannot be encoded; storing a response-not-stored marker");
                Self::not_stored(contract, limit, origin)
            }
        }
    }

    /// The completion stored in place of a response too large to keep: the
    /// operation ran, so a retry must not run it again, but it cannot get the
    /// original response either. If even the marker does not fit, the key ends
    /// as outcome unknown (also never run again).
    pub(crate) fn not_stored<S, C>(
        contract: &Contract<S, C>,
        limit: usize,
        origin: Option<Origin>,
    ) -> Self {
        let marker = contract.render(&Problem::new(
            ProblemType::ResponseNotStored,
            format!(
                "the operation was executed, but its response exceeded {limit} bytes and was not kept; it will not be executed again with this key"
            ),
        ));
        let stored = StoredResponse::new(
            marker.status,
            &marker.headers,
            marker.body,
            marker.trailers.as_ref(),
            &contract.filter,
            origin,
        );
        match stored.encode() {
            Ok(outcome) if outcome.len() <= limit => Self::Complete(outcome),
            _ => Self::Unknown(UnknownReason::Unstorable),
        }
    }
}

/// How ending a claim went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Settled {
    /// Stored, released, or (on a store error) logged: the handler's own
    /// response is the answer.
    Done,
    /// The lease was taken over by a later request (this one outlived its
    /// lease): the key's answer is that request's, not this one's.
    Superseded,
}

/// Ends the claim in a task of its own, so that it finishes even if the
/// request's future is dropped meanwhile, retrying store errors
/// ([`Engine::settle`]).
pub(crate) async fn end<S: Store, C: Clock>(
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
    // Why the key would end as outcome unknown: a release never does (the
    // engine switches only a refused result to unknown).
    let (ending, if_unknown) = match how {
        Settle::Complete(outcome) => (Ending::Complete(outcome), Some(UnknownReason::Complete)),
        Settle::Release(reason) => {
            reason.record();
            (Ending::Release, None)
        }
        Settle::Unknown(reason) => (Ending::Unknown, Some(reason)),
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
                        report(settled, if_unknown);
                    }
                    .instrument(Span::current()),
                );
                return Settled::Done;
            }
            Err(e)
        }
        other => other,
    };
    report(settled, if_unknown)
}

/// Logs and counts how ending a claim went.
fn report(settled: Result<Ending, Error>, if_unknown: Option<UnknownReason>) -> Settled {
    match settled {
        Ok(Ending::Unknown) => {
            if let Some(reason) = if_unknown {
                reason.record();
            }
            tracing::warn!(
                reason = if_unknown.map(UnknownReason::as_str),
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
            CompletionFailure::LeaseLost.record();
            tracing::error!(
                error = %e,
                "idem: a later request took this key over while the handler ran (it outlived its lease); its response is not kept and the client is told to retry"
            );
            Settled::Superseded
        }
        Err(e) => {
            let reason = if matches!(e, Error::LeaseLost(_)) {
                CompletionFailure::LeaseLost
            } else {
                CompletionFailure::Store
            };
            reason.record();
            tracing::error!(
                error = %e,
                "idem: the request ran but its ending could not be stored; the key stays in flight until its lease lapses, then a retry runs the operation again"
            );
            Settled::Done
        }
    }
}
