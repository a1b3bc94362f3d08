//! What a finished key keeps: its [`Outcome`] bytes and, for a failure, its
//! [`FailureKind`].

use std::fmt;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// The bytes an integration stored as a key's result (for HTTP: status,
/// headers and body, encoded by `idem-tower`). Opaque to the core and to stores.
#[derive(Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Outcome(Bytes);

impl Outcome {
    /// Wraps result bytes.
    pub fn new(bytes: impl Into<Bytes>) -> Self {
        Self(bytes.into())
    }
    /// The result bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
    /// The result bytes, shared without copying.
    pub fn bytes(&self) -> &Bytes {
        &self.0
    }
    /// The length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Outcome({} bytes)", self.0.len())
    }
}

/// Whether a stored failure lets the same request run again.
///
/// # Behavior
/// Only [`Retryable`](Self::Retryable) lets the same request run again; the
/// other kinds are final and replayed. New kinds are final too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum FailureKind {
    /// The same request may run again; the key keeps its fingerprint. Use it
    /// only when the work declared that nothing took effect.
    Retryable,
    /// The failure is final and replayed like a completion.
    Permanent,
    /// The work may or may not have taken effect and its result is not known
    /// (it panicked, was dropped, its response broke mid-stream, its process
    /// shut down before it finished, or it held the key past
    /// [`Policy::max_hold`](crate::Policy::max_hold)). Final: it is never run
    /// again automatically, and retries get an "outcome unknown" answer.
    Unknown,
}

impl FailureKind {
    /// A short name (`retryable`, `permanent`, `unknown`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Retryable => "retryable",
            Self::Permanent => "permanent",
            Self::Unknown => "unknown",
        }
    }
}
