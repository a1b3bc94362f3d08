//! Errors of stores and of the engine.

use std::time::Duration;

use crate::KeyError;
use crate::machine::Fenced;
use crate::store::codec::CodecError;

/// Any error a store's driver raised, kept as the source.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An error raised by a [`Store`](crate::store::Store).
///
/// # Behavior
/// - [`Unavailable`](Self::Unavailable) is transient: the store could not be
///   reached or timed out; the operation may or may not have taken effect, and
///   retrying it later is safe (every primitive is conditional).
/// - Every other variant is permanent: retrying the same call fails the same way.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store could not be reached, or the call timed out (transient).
    #[error("store `{store}` is unavailable")]
    Unavailable {
        /// The backend's name (`"redis"`, `"postgres"`, …).
        store: &'static str,
        /// The driver's error.
        #[source]
        source: BoxError,
    },
    /// A stored record could not be decoded (corrupt, foreign, or written by a newer version).
    #[error("store `{store}` holds a record that cannot be read")]
    Corrupt {
        /// The backend's name.
        store: &'static str,
        /// Why it could not be read.
        #[source]
        source: BoxError,
    },
    /// The store refused a record or its configuration (too large, schema too new, …).
    #[error("store `{store}` refused the operation")]
    Rejected {
        /// The backend's name.
        store: &'static str,
        /// Why.
        #[source]
        source: BoxError,
    },
    /// The store does not offer an optional operation (see
    /// [`Capabilities`](crate::store::Capabilities)); permanent.
    #[error("store `{store}` does not support `{operation}`")]
    Unsupported {
        /// The backend's name.
        store: &'static str,
        /// The operation asked for (`"census"`, …).
        operation: &'static str,
    },
    /// Any other permanent store error.
    #[error("store `{store}` failed")]
    Generic {
        /// The backend's name.
        store: &'static str,
        /// The driver's error.
        #[source]
        source: BoxError,
    },
}

impl StoreError {
    /// Whether retrying later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }

    /// An [`Unavailable`](Self::Unavailable) error: `store` (the backend's
    /// name) could not be reached or timed out; `source` is the driver's error.
    pub fn unavailable(store: &'static str, source: impl Into<BoxError>) -> Self {
        Self::Unavailable {
            store,
            source: source.into(),
        }
    }

    /// A [`Corrupt`](Self::Corrupt) error for a record that failed to decode
    /// (usually a [`CodecError`]).
    pub fn corrupt(store: &'static str, source: impl Into<BoxError>) -> Self {
        Self::Corrupt {
            store,
            source: source.into(),
        }
    }

    /// A [`Rejected`](Self::Rejected) error: the store refused the record or
    /// its configuration, for the reason `source` (an error, or a message:
    /// `StoreError::rejected("mystore", "record too large")`).
    pub fn rejected(store: &'static str, source: impl Into<BoxError>) -> Self {
        Self::Rejected {
            store,
            source: source.into(),
        }
    }

    /// A [`Generic`](Self::Generic) error: any other permanent failure of
    /// `store`, caused by `source`.
    pub fn generic(store: &'static str, source: impl Into<BoxError>) -> Self {
        Self::Generic {
            store,
            source: source.into(),
        }
    }

    /// An [`Unsupported`](Self::Unsupported) error: `store` does not offer
    /// the optional `operation`.
    pub fn unsupported(store: &'static str, operation: &'static str) -> Self {
        Self::Unsupported { store, operation }
    }

    /// The name of the backend that raised the error.
    pub fn store(&self) -> &'static str {
        match self {
            Self::Unavailable { store, .. }
            | Self::Corrupt { store, .. }
            | Self::Rejected { store, .. }
            | Self::Generic { store, .. }
            | Self::Unsupported { store, .. } => store,
        }
    }
}

/// An error of the engine.
///
/// # Behavior
/// [`is_transient`](Self::is_transient) tells errors worth retrying later
/// (store unavailable, contention, a request still in progress) from permanent
/// ones (bad key, mismatch, lost lease, corrupt record). Nothing is stored or
/// executed when `begin` fails.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The idempotency key is malformed.
    #[error(transparent)]
    InvalidKey(#[from] KeyError),
    /// The key is bound to a different request.
    #[error("the idempotency key was already used with a different request")]
    FingerprintMismatch,
    /// Another request with this key is still in flight.
    #[error(
        "a request with this idempotency key is still in progress; retry after {retry_after:?}"
    )]
    InProgress {
        /// Time left on the other request's lease.
        retry_after: Duration,
    },
    /// The caller no longer holds the key's lease: it was taken over, expired,
    /// or already finished. Nothing was changed.
    #[error("the lease on this idempotency key was lost")]
    LeaseLost(#[source] Fenced),
    /// The outcome is larger than the policy allows.
    #[error("outcome of {size} bytes exceeds the limit of {limit} bytes")]
    OutcomeTooLarge {
        /// The outcome's size.
        size: usize,
        /// The policy's limit.
        limit: usize,
    },
    /// A value could not be encoded, or a stored value decoded.
    #[error("value could not be encoded or decoded")]
    Codec(#[from] CodecError),
    /// Too many compare-and-swap races lost in a row (transient).
    #[error("too much contention on this idempotency key")]
    Contention,
    /// The request with this key ended without a known result: it may or may
    /// not have taken effect ([`FailureKind::Unknown`](crate::FailureKind::Unknown)).
    /// Permanent: the engine never runs it again; find out what happened
    /// (for example by reading the resource) before sending a new request
    /// with a new key.
    #[error(
        "the request with this idempotency key ended and its outcome is unknown; it will not run again"
    )]
    OutcomeUnknown,
    /// The engine is shutting down and takes no new claims (transient: retry
    /// against another instance, or later).
    #[error("the idempotency engine is shutting down")]
    ShuttingDown,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Error {
    /// Whether retrying the same request later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::InProgress { .. } | Self::Contention | Self::ShuttingDown => true,
            Self::Store(e) => e.is_transient(),
            _ => false,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn constructors_make_their_variant_and_keep_the_source() {
        let cases = [
            (StoreError::unavailable("a", "down"), true, "a"),
            (StoreError::corrupt("b", CodecError::Empty), false, "b"),
            (StoreError::rejected("c", "too large"), false, "c"),
            (StoreError::generic("d", std::fmt::Error), false, "d"),
        ];
        for (error, transient, store) in &cases {
            assert_eq!(error.is_transient(), *transient, "{error:?}");
            assert_eq!(error.store(), *store);
            assert!(std::error::Error::source(error).is_some(), "{error:?}");
        }
        assert!(matches!(cases[0].0, StoreError::Unavailable { .. }));
        assert!(matches!(cases[1].0, StoreError::Corrupt { .. }));
        assert!(matches!(cases[2].0, StoreError::Rejected { .. }));
        assert!(matches!(cases[3].0, StoreError::Generic { .. }));
        assert_eq!(
            std::error::Error::source(&cases[2].0).unwrap().to_string(),
            "too large"
        );
    }
}
