//! Admission: everything before a handler runs under a claim. The key, the
//! scope, the body, the fingerprint and `begin` decide whether the request
//! runs, is answered by the contract (a replay, a 409, a 422, an error), or
//! passes through unprotected.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderValue, header};
use idem_core::store::{BoxError, Store, StoreError};
use idem_core::{Begin, Clock, Error, Mismatch, RecordKey, Replay, ReplayKind, Scope};
use tracing::Span;

use crate::claimed::Claimed;
use crate::contract::{Contract, Dialect};
use crate::fingerprint::RequestView;
use crate::metrics::Outcome;
use crate::problem::{Problem, ProblemType};
use crate::rejection::Rejection;
use crate::reply::Reply;
use crate::stored::{IDEMPOTENT_REPLAYED, Origin, StoredResponse};

/// Why a request body could not be buffered.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// It is longer than the limit (413).
    #[error("the request body exceeds the limit")]
    TooLarge,
    /// Reading it failed (400).
    #[error("the request body could not be read")]
    Unreadable(#[source] BoxError),
}

/// A request body an adapter can buffer, up to a limit.
pub trait ReadBody: Sized {
    /// The future reading it.
    type Read: Future<Output = Result<Bytes, ReadError>>;
    /// Reads the whole body, or fails with [`ReadError::TooLarge`] as soon
    /// as it exceeds `limit` bytes.
    fn read(self, limit: usize) -> Self::Read;
}

/// The body of a request that passes through.
#[derive(Debug)]
pub enum PassBody<B> {
    /// Not read: hand it on as it is (streamed).
    Unread(B),
    /// Read (to find the key in it): hand these bytes on.
    Read(Bytes),
}

/// What the contract decided for a covered request.
#[derive(Debug)]
#[must_use = "a Proceed claim must be finished"]
pub enum Admission<S: Store, C: Clock, B> {
    /// No key and none required: call the handler unprotected.
    Pass(PassBody<B>),
    /// Answer with this; the handler is not called.
    Answer(Reply),
    /// The store is unreachable and fail-open is on: call the handler
    /// unprotected with this body.
    FailOpen(Bytes),
    /// A fresh claim: run the handler under it with this body, then
    /// [`Claimed::finish`].
    Proceed(Claimed<S, C>, Bytes),
}

impl<S: Store, C: Clock> Contract<S, C> {
    /// Admits a covered request (see [`covers_request`](Self::covers_request)): `parts` is
    /// its head, `target` the path and query the client sent, `scope`
    /// derives whose key it is, `body` is read up to the limit.
    ///
    /// # Behavior
    /// In order: the key ([`KeySource`](crate::KeySource); a request without
    /// one passes through), the scope, the declared then the actual body
    /// length (for a key read from the body, the body comes first), the
    /// fingerprint, then `Engine::begin_key`, run to its end
    /// even if this future is dropped (a claim made for a request that is
    /// gone is released at once). Every answer is the table of the crate
    /// docs; the handler runs only on [`Admission::Proceed`] (and
    /// unprotected on `Pass` and `FailOpen`). Counts
    /// `idem_requests_total{outcome}` and records `key`, `attempt` and
    /// `outcome` on the current span.
    pub async fn admit<B: ReadBody>(
        self: &Arc<Self>,
        parts: &Parts,
        target: &str,
        scope: impl FnOnce() -> Result<Scope, Rejection>,
        body: B,
    ) -> Admission<S, C, B> {
        // A key in the head is known before the body is read; a key in the
        // body only after. Either way, a request without a key passes
        // through before its scope is derived (only keyed requests need one).
        let (key, body) = if self.key.needs_body() {
            let bytes = match self.read(parts, body).await {
                Ok(bytes) => bytes,
                Err(answer) => return Admission::Answer(answer),
            };
            match self.key_of(parts, Some(&bytes)) {
                Ok(Some(key)) => (key, Ok(bytes)),
                Ok(None) => return Admission::Pass(PassBody::Read(bytes)),
                Err(answer) => return Admission::Answer(answer),
            }
        } else {
            match self.key_of(parts, None) {
                Ok(Some(key)) => (key, Err(body)),
                Ok(None) => return Admission::Pass(PassBody::Unread(body)),
                Err(answer) => return Admission::Answer(answer),
            }
        };
        let scope = match scope() {
            Ok(scope) => scope,
            Err(rejection) => {
                Outcome::Rejected.record();
                let reply = rejection.into_reply();
                // Under gRPC an HTTP rejection becomes a gRPC status of the
                // same intent; a gRPC one is sent as it is.
                return Admission::Answer(match self.dialect {
                    Dialect::Http => reply,
                    Dialect::Grpc => crate::grpc::rejected(reply),
                });
            }
        };
        let bytes = match body {
            Ok(bytes) => bytes,
            Err(unread) => match self.read(parts, unread).await {
                Ok(bytes) => bytes,
                Err(answer) => return Admission::Answer(answer),
            },
        };
        let record_key = RecordKey::new(&scope, &key);
        // Never log the client's key: its scoped digest identifies it.
        Span::current().record("key", record_key.hex().get(..16).unwrap_or_default());
        let view = RequestView::new(parts, target, &bytes, &self.fingerprint_headers);
        let fingerprint = self.fingerprint.fingerprint(&view);

        match crate::begin::begin(&self.engine, record_key, fingerprint).await {
            Ok(Begin::Proceed(lease)) => {
                Outcome::Fresh.record();
                Span::current().record("attempt", lease.attempt());
                let origin = Origin {
                    method: parts.method.as_str().to_owned(),
                    path: view.path().to_owned(),
                };
                Admission::Proceed(Claimed::new(self.clone(), lease, origin), bytes)
            }
            Ok(Begin::Replay(replay)) => Admission::Answer(self.replay(&view, replay)),
            Ok(Begin::InProgress { retry_after }) => {
                Outcome::Conflict.record();
                Admission::Answer(self.in_progress(retry_after.min(self.max_retry_after)))
            }
            Ok(Begin::Mismatch(mismatch)) => {
                Outcome::Mismatch.record();
                Admission::Answer(self.render(&mismatch_problem(&mismatch)))
            }
            Err(e) => self.begin_failed(&e, bytes),
        }
    }

    // The answer is sent at once: boxing it would only add an allocation.
    #[allow(clippy::result_large_err)]
    /// The whole body, or the answer refusing it (413 as soon as the
    /// declared or the read length exceeds the limit, 400 if unreadable).
    async fn read<B: ReadBody>(&self, parts: &Parts, body: B) -> Result<Bytes, Reply> {
        let limit = self.max_body_bytes;
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > limit as u64) {
            Outcome::Invalid.record();
            return Err(self.body_too_large());
        }
        match body.read(limit).await {
            Ok(bytes) => Ok(bytes),
            Err(ReadError::TooLarge) => {
                Outcome::Invalid.record();
                Err(self.body_too_large())
            }
            Err(ReadError::Unreadable(e)) => {
                Outcome::Invalid.record();
                tracing::debug!(error = %e, "idem: request body unreadable");
                Err(self.render(&Problem::new(
                    ProblemType::BodyUnreadable,
                    "the request body could not be read",
                )))
            }
        }
    }

    #[allow(clippy::result_large_err)]
    /// The key of a request, or the answer refusing it; `Ok(None)` is a
    /// request without a key that is not required.
    fn key_of(
        &self,
        parts: &Parts,
        body: Option<&Bytes>,
    ) -> Result<Option<idem_core::IdempotencyKey>, Reply> {
        match self.key.extract(parts, body) {
            Ok(Some(key)) => Ok(Some(key)),
            Ok(None) if self.required => {
                Outcome::Invalid.record();
                let detail = format!(
                    "{} {} requires {}; generate a new UUID for each new operation",
                    parts.method,
                    parts.uri.path(),
                    self.key.describe()
                );
                Err(self.render(&Problem::new(ProblemType::MissingKey, detail)))
            }
            Ok(None) => {
                Outcome::Passthrough.record();
                Ok(None)
            }
            Err(e) => {
                Outcome::Invalid.record();
                Err(self.render(&Problem::new(ProblemType::InvalidKey, e.to_string())))
            }
        }
    }

    /// The answer to a retry of a finished key.
    fn replay(&self, view: &RequestView<'_>, replay: Replay) -> Reply {
        if replay.kind == ReplayKind::Unknown {
            Outcome::Unknown.record();
            return self.render(&Problem::new(
                ProblemType::OutcomeUnknown,
                "the request with this idempotency key ended without a known result and may or may not have taken effect; it will not be executed again with this key: check the resource, then use a new key",
            ));
        }
        match StoredResponse::decode(&replay.outcome, &self.filter) {
            Ok(decoded) => {
                Outcome::Replayed.record();
                let mut reply = Reply::new(decoded.status, decoded.body);
                reply.headers = decoded.headers;
                reply.trailers = decoded.trailers;
                reply
                    .headers
                    .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
                if let Some(hook) = &self.on_replay {
                    hook(view, &mut reply);
                }
                reply
            }
            Err(e) => {
                Outcome::StoreError.record();
                tracing::error!(error = %e, "idem: the stored response cannot be decoded");
                self.render(&Problem::new(
                    ProblemType::CorruptRecord,
                    "the stored result of this request cannot be read; it was not executed again",
                ))
            }
        }
    }

    fn begin_failed<B>(&self, e: &Error, bytes: Bytes) -> Admission<S, C, B> {
        let answer = match e {
            Error::Contention => {
                Outcome::Conflict.record();
                self.in_progress(Duration::from_secs(1))
            }
            // Never fail open here: the instance is stopping, not the store.
            Error::ShuttingDown => {
                Outcome::ShuttingDown.record();
                self.render(
                    &Problem::new(
                        ProblemType::ShuttingDown,
                        "this instance is shutting down; the request was not executed, retry it with the same key",
                    )
                    .retry_after(self.store_retry_after),
                )
            }
            e if e.is_transient() && self.fail_open => {
                Outcome::FailOpen.record();
                tracing::warn!(error = %e, "idem: store unavailable; running the request UNPROTECTED (fail-open)");
                return Admission::FailOpen(bytes);
            }
            e if e.is_transient() => {
                Outcome::StoreError.record();
                tracing::warn!(error = %e, "idem: store unavailable; answering 503");
                self.render(
                    &Problem::new(
                        ProblemType::StoreUnavailable,
                        "the idempotency store is unavailable; the request was not executed, retry it with the same key",
                    )
                    .retry_after(self.store_retry_after),
                )
            }
            Error::Store(StoreError::Corrupt { .. }) | Error::Codec(_) => {
                Outcome::StoreError.record();
                tracing::error!(error = %e, "idem: the stored record cannot be read");
                self.render(&Problem::new(
                    ProblemType::CorruptRecord,
                    "the stored record of this key cannot be read; the request was not executed",
                ))
            }
            e => {
                Outcome::StoreError.record();
                tracing::error!(error = %e, "idem: store failed");
                self.render(&Problem::new(
                    ProblemType::StoreFailed,
                    "the idempotency store failed; the request was not executed",
                ))
            }
        };
        Admission::Answer(answer)
    }

    fn body_too_large(&self) -> Reply {
        self.render(&Problem::new(
            ProblemType::BodyTooLarge,
            format!("the request body exceeds {} bytes", self.max_body_bytes),
        ))
    }

    fn in_progress(&self, retry_after: Duration) -> Reply {
        self.render(
            &Problem::new(
                ProblemType::RequestInProgress,
                "a request with this idempotency key is still being processed; retry after the time in Retry-After to get its result",
            )
            .retry_after(retry_after),
        )
    }

    /// The answer of a request whose claim was taken over while its handler
    /// ran: its response was not kept, and the key's answer is the later
    /// request's, so the client is told to retry and gets that one (never
    /// two different answers for one key).
    pub fn superseded(&self) -> Reply {
        self.render(
            &Problem::new(
                ProblemType::RequestInProgress,
                "this request outlived its claim on the idempotency key and a later request with the same key took the operation over; this request's response was not kept; retry to get the answer of the request that holds the key",
            )
            .retry_after(Duration::from_secs(1)),
        )
    }

    /// The answer of a request whose handler's task was cancelled because
    /// the runtime is stopping: the key is dealt with by the engine's
    /// shutdown, the client retries with the same key.
    pub fn stopped(&self) -> Reply {
        self.render(
            &Problem::new(
                ProblemType::ShuttingDown,
                "this instance stopped while the request ran; its outcome is not known here, retry with the same key to get it",
            )
            .retry_after(Duration::from_secs(1)),
        )
    }
}

/// The 422: when the key was first used, and for which method and path when
/// its stored response says (never the first request's body).
fn mismatch_problem(mismatch: &Mismatch) -> Problem {
    let at = UNIX_EPOCH + Duration::from_millis(mismatch.first_used_at.as_millis());
    let at = humantime::format_rfc3339_millis(at).to_string();
    let origin = mismatch
        .finished
        .as_ref()
        .and_then(|replay| StoredResponse::origin_of(&replay.outcome));
    // Not final: still running, or failed in a way that lets the same
    // request run again (a retryable failure of a multi-step operation).
    let state = if mismatch.finished.is_some() {
        "finished"
    } else {
        "unfinished"
    };
    let detail = match &origin {
        Some(o) => format!(
            "this idempotency key was first used at {at} for {} {}, with a different request (method, path, query or body); use a new key for a new operation",
            o.method, o.path
        ),
        None => format!(
            "this idempotency key was first used at {at} with a different request (method, path, query or body); use a new key for a new operation"
        ),
    };
    let mut problem = Problem::new(ProblemType::KeyReused, detail)
        .member("first_used_at", at)
        .member("first_request_state", state);
    if let Some(o) = origin {
        problem = problem
            .member("first_method", o.method)
            .member("first_path", o.path);
    }
    problem
}
