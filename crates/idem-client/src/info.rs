//! What the middleware tells the caller about an answer, and what it tells
//! an observer about each attempt.

use std::time::Duration;

use http::{Extensions, StatusCode};

use crate::error::Failure;
use crate::key::Key;
use crate::problem::Problem;

/// How a protected request's final answer came about; in the response's
/// extensions (read it with [`IdempotencyResponseExt::idempotency`]).
///
/// # Behavior
/// Present on every response to a protected request, absent on unprotected
/// ones (which the middleware does not touch).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct IdempotencyInfo {
    /// The key every attempt carried.
    pub key: Key,
    /// How many times the request was sent (1 = no re-send).
    pub attempts: u32,
    /// Whether the answer is a replay of an earlier attempt's
    /// (`Idempotent-Replayed: true`): the operation ran before, not now.
    pub replayed: bool,
    /// The idempotency layer's problem type, when the answer is one of its
    /// final problems: [`Problem::KeyReused`] (422: the key was used with
    /// another request; nothing ran, nothing was re-sent),
    /// [`Problem::OutcomeUnknown`], [`Problem::ResponseNotStored`],
    /// [`Problem::CorruptRecord`], or a 4xx such as
    /// [`Problem::InvalidKey`]. `None` for the API's own answers.
    pub problem: Option<Problem>,
}

impl IdempotencyInfo {
    /// Whether the server refused the request because its key was already
    /// used with a different request (422 `key-reused`). Retrying stopped
    /// there: use a new key for a new operation, or send the original
    /// request unchanged.
    pub fn key_reused(&self) -> bool {
        self.problem == Some(Problem::KeyReused)
    }
}

/// Reads [`IdempotencyInfo`] from a response.
///
/// ```
/// use idem_client::IdempotencyResponseExt;
///
/// fn describe(response: &reqwest::Response) -> String {
///     match response.idempotency() {
///         Some(info) if info.key_reused() => format!("key {} was used for another request", info.key),
///         Some(info) => format!("{} after {} attempt(s), replayed: {}", response.status(), info.attempts, info.replayed),
///         None => "not protected".to_string(),
///     }
/// }
/// # let _ = describe;
/// ```
pub trait IdempotencyResponseExt {
    /// The middleware's account of this answer; `None` if the request was
    /// not protected.
    fn idempotency(&self) -> Option<&IdempotencyInfo>;
}

impl IdempotencyResponseExt for reqwest::Response {
    fn idempotency(&self) -> Option<&IdempotencyInfo> {
        self.extensions().get::<IdempotencyInfo>()
    }
}

impl IdempotencyResponseExt for http::Extensions {
    fn idempotency(&self) -> Option<&IdempotencyInfo> {
        self.get::<IdempotencyInfo>()
    }
}

/// One attempt of a protected request, as reported to the observer set with
/// [`IdempotencyMiddlewareBuilder::on_attempt`](crate::IdempotencyMiddlewareBuilder::on_attempt)
/// (for metrics and logs).
#[derive(Debug)]
#[non_exhaustive]
pub struct AttemptEvent<'a> {
    /// The request's key.
    pub key: &'a Key,
    /// The attempt's number, from 1.
    pub attempt: u32,
    /// How long the attempt took (up to its response headers and buffered
    /// body, or its failure).
    pub elapsed: Duration,
    /// The answer's status, if an answer came.
    pub status: Option<StatusCode>,
    /// Whether the answer carried `Idempotent-Replayed: true`.
    pub replayed: bool,
    /// The idempotency layer's problem type, if recognised.
    pub problem: Option<Problem>,
    /// Why the attempt was not the final answer: a status that asks for a
    /// re-send, a transport error, a timeout. `None` for a final answer.
    pub failure: Option<&'a Failure>,
    /// Whether this attempt ended the logical request (a final answer, or
    /// the middleware gave up).
    pub last: bool,
    /// The request's middleware extensions (tags a caller put there with
    /// `RequestBuilder::with_extension`).
    pub extensions: &'a Extensions,
}

impl AttemptEvent<'_> {
    /// Whether no answer came (transport error, lost reply, timeout).
    pub fn no_answer(&self) -> bool {
        self.status.is_none()
    }
}
