//! Why the middleware stopped without an answer.

use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;

use crate::key::{Key, KeyError, RandomError};
use crate::problem::Problem;

/// Why the middleware gave up on a protected request without a final
/// answer, or could not send it at all.
///
/// # Behavior
/// The middleware returns it as `reqwest_middleware::Error::Middleware`
/// (an `anyhow::Error`); get it back with [`IdempotencyError::of`] (or
/// `anyhow::Error::downcast_ref`). Every variant about a sent request carries
/// the [`Key`]: the operation may still be pending or done on the server,
/// so a later retry of the same operation must send that key again. The
/// last attempt's failure is the [`source`](std::error::Error::source).
///
/// A final answer — including 422 `key-reused` and 500 `outcome-unknown` —
/// is never an error: it is returned as the response, and
/// [`IdempotencyInfo::problem`](crate::IdempotencyInfo::problem) names it.
///
/// ```
/// use idem_client::{IdempotencyError, reqwest_middleware};
///
/// fn why(error: &reqwest_middleware::Error) -> String {
///     match IdempotencyError::of(error) {
///         Some(IdempotencyError::BudgetSpent { key, attempts, .. }) => {
///             format!("no answer after {attempts} attempts; retry later with key {key}")
///         }
///         Some(other) => other.to_string(),
///         None => error.to_string(), // not from this middleware
///     }
/// }
/// # let _ = why;
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdempotencyError {
    /// The time budget ran out (an attempt was cut off by it, or the next
    /// wait — backoff or the server's `Retry-After` — would end after it).
    #[error(
        "no final answer within the retry budget of {budget:?} after {attempts} attempt(s) (idempotency key {key})"
    )]
    BudgetSpent {
        /// The key every attempt carried.
        key: Key,
        /// Attempts made.
        attempts: u32,
        /// The budget.
        budget: Duration,
        /// What the last attempt got.
        #[source]
        last: Failure,
    },
    /// The policy's `max_attempts` were all made.
    #[error(
        "no final answer after {attempts} attempt(s), the most allowed (idempotency key {key})"
    )]
    AttemptsExhausted {
        /// The key every attempt carried.
        key: Key,
        /// Attempts made.
        attempts: u32,
        /// What the last attempt got.
        #[source]
        last: Failure,
    },
    /// An attempt needed a re-send but the request body is a stream
    /// (`reqwest::Request::try_clone` returned `None`), so it could not be
    /// sent again. Send a body of bytes to be protected by re-sends.
    #[error(
        "no final answer, and the request cannot be re-sent because its body is a stream (idempotency key {key})"
    )]
    NotResendable {
        /// The key the attempt carried.
        key: Key,
        /// Attempts made (1).
        attempts: u32,
        /// What the attempt got.
        #[source]
        last: Failure,
    },
    /// The caller's key (the `Key` extension or the `Idempotency-Key`
    /// header) is not a valid key. Nothing was sent.
    #[error("the caller's idempotency key is invalid")]
    InvalidKey(#[source] KeyError),
    /// The `Key` extension and the `Idempotency-Key` header name different
    /// keys. Nothing was sent.
    #[error("the Key extension ({extension}) and the idempotency key header ({header}) differ")]
    ConflictingKeys {
        /// The key in the header.
        header: Key,
        /// The key in the extension.
        extension: Key,
    },
    /// No key could be generated. Nothing was sent.
    #[error("no idempotency key could be generated")]
    KeyGeneration(#[source] RandomError),
}

impl IdempotencyError {
    /// The middleware's error inside `error`, if it is one.
    pub fn of(error: &reqwest_middleware::Error) -> Option<&Self> {
        match error {
            reqwest_middleware::Error::Middleware(e) => e.downcast_ref::<Self>(),
            reqwest_middleware::Error::Reqwest(_) => None,
        }
    }

    /// The key the request was sent with (`None` if nothing was sent).
    pub fn key(&self) -> Option<&Key> {
        match self {
            Self::BudgetSpent { key, .. }
            | Self::AttemptsExhausted { key, .. }
            | Self::NotResendable { key, .. } => Some(key),
            Self::InvalidKey(_) | Self::ConflictingKeys { .. } | Self::KeyGeneration(_) => None,
        }
    }

    /// How many attempts were made.
    pub fn attempts(&self) -> u32 {
        match self {
            Self::BudgetSpent { attempts, .. }
            | Self::AttemptsExhausted { attempts, .. }
            | Self::NotResendable { attempts, .. } => *attempts,
            Self::InvalidKey(_) | Self::ConflictingKeys { .. } | Self::KeyGeneration(_) => 0,
        }
    }

    /// What the last attempt got, if one was made.
    pub fn last(&self) -> Option<&Failure> {
        match self {
            Self::BudgetSpent { last, .. }
            | Self::AttemptsExhausted { last, .. }
            | Self::NotResendable { last, .. } => Some(last),
            Self::InvalidKey(_) | Self::ConflictingKeys { .. } | Self::KeyGeneration(_) => None,
        }
    }
}

/// What an attempt got that was not a final answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Failure {
    /// An answer that asks for a re-send (409 in progress, 429, 5xx other
    /// than the final problems).
    #[error("{status}{}{}", problem.map(|p| format!(" ({})", p.uri())).unwrap_or_default(), retry_after.map(|d| format!(", Retry-After {}s", d.as_secs())).unwrap_or_default())]
    Status {
        /// Its status.
        status: StatusCode,
        /// The layer's problem type, if recognised.
        problem: Option<Problem>,
        /// Its `Retry-After`, if any.
        retry_after: Option<Duration>,
        /// Its body, if it was buffered (empty otherwise).
        body: Bytes,
    },
    /// No answer: the connection failed, was cut, or the reply was lost
    /// (reqwest's timeout), or the answer's body broke off.
    #[error("no answer: transport error")]
    Transport(#[source] reqwest::Error),
    /// No answer within the attempt's time limit (the policy's
    /// `attempt_timeout` or what was left of the budget).
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
}

impl Failure {
    /// The status of the answer, if one came.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Status { status, .. } => Some(*status),
            Self::Transport(_) | Self::TimedOut(_) => None,
        }
    }

    /// Whether no answer came in time (the middleware's limit or reqwest's
    /// timeout).
    pub fn is_timeout(&self) -> bool {
        match self {
            Self::TimedOut(_) => true,
            Self::Transport(e) => e.is_timeout(),
            Self::Status { .. } => false,
        }
    }
}
