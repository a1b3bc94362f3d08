//! The layer's metrics: every metric name, and a typed value for every
//! label, in one place.
//!
//! The names and label values are the ones listed in the crate docs
//! ("Observability"); dashboards and alerts depend on them, so a variant's
//! [`as_str`](Outcome::as_str) must never change. The rest of the crate
//! counts only through the functions here, never with a bare string.

use std::time::Duration;

use tracing::Span;

/// What the layer did with a covered request: the `outcome` label of
/// `idem_requests_total` and the `outcome` field of the `idem` span.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// A new key: the handler runs under a claim.
    Fresh,
    /// The stored response was replayed.
    Replayed,
    /// 409: the key is in flight (or contended).
    Conflict,
    /// 422: the key was used with a different request.
    Mismatch,
    /// 400 or 413: missing or invalid key, body too large or unreadable.
    Invalid,
    /// The scope function rejected the request.
    Rejected,
    /// 503 or 500: the store is unavailable, failed, or holds an unreadable
    /// record.
    StoreError,
    /// No key on a method where it is not required: run unprotected.
    Passthrough,
    /// The store is unavailable and fail-open ran the handler unprotected.
    FailOpen,
    /// A replayed outcome-unknown (500).
    Unknown,
    /// 503: the layer is shutting down.
    ShuttingDown,
}

impl Outcome {
    /// The label value.
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Self::Fresh => "fresh",
            Self::Replayed => "replayed",
            Self::Conflict => "conflict",
            Self::Mismatch => "mismatch",
            Self::Invalid => "invalid",
            Self::Rejected => "rejected",
            Self::StoreError => "store_error",
            Self::Passthrough => "passthrough",
            Self::FailOpen => "fail_open",
            Self::Unknown => "unknown",
            Self::ShuttingDown => "shutting_down",
        }
    }

    /// Counts the request (`idem_requests_total{outcome}`) and records the
    /// outcome on the current `idem` span.
    pub(crate) fn record(self) {
        let label = self.as_str();
        Span::current().record("outcome", label);
        ::metrics::counter!("idem_requests_total", "outcome" => label).increment(1);
    }
}

/// Why a claim was released, so that a retry runs the handler afresh: the
/// `reason` label of `idem_released_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReleaseReason {
    /// The response carried [`NoEffect`](crate::NoEffect).
    NoEffect,
    /// A response the storage predicate refused, after a declared no-effect.
    Status,
    /// An error of the inner service, after a declared no-effect.
    Error,
    /// A panic of the handler, after a declared no-effect.
    Panic,
    /// A response body that failed mid-stream, after a declared no-effect.
    BodyError,
    /// The request's future was dropped (`release_on_cancel`).
    Cancelled,
}

impl ReleaseReason {
    /// The label value.
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Self::NoEffect => "no_effect",
            Self::Status => "status",
            Self::Error => "error",
            Self::Panic => "panic",
            Self::BodyError => "body_error",
            Self::Cancelled => "cancelled",
        }
    }

    /// Counts the release (`idem_released_total{reason}`).
    pub(crate) fn record(self) {
        ::metrics::counter!("idem_released_total", "reason" => self.as_str()).increment(1);
    }
}

/// Why a key was finished as outcome unknown (never run again): the
/// `reason` label of `idem_outcome_unknown_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum UnknownReason {
    /// A response the storage predicate refused (by default a 5xx).
    Status,
    /// An error of the inner service.
    Error,
    /// A panic of the handler.
    Panic,
    /// A response body that failed mid-stream.
    BodyError,
    /// Not even the response-not-stored marker fits the store.
    Unstorable,
    /// The store refused the completion permanently.
    Complete,
}

impl UnknownReason {
    /// The label value.
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Self::Status => "status",
            Self::Error => "error",
            Self::Panic => "panic",
            Self::BodyError => "body_error",
            Self::Unstorable => "unstorable",
            Self::Complete => "complete",
        }
    }

    /// Counts the key (`idem_outcome_unknown_total{reason}`).
    pub(crate) fn record(self) {
        ::metrics::counter!("idem_outcome_unknown_total", "reason" => self.as_str()).increment(1);
    }
}

/// Why a claim could not be ended: the `reason` label of
/// `idem_completion_failures_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CompletionFailure {
    /// The store failed (for the whole retry window).
    Store,
    /// The lease was no longer this request's.
    LeaseLost,
}

impl CompletionFailure {
    /// The label value.
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Self::Store => "store",
            Self::LeaseLost => "lease_lost",
        }
    }

    /// Counts the failure (`idem_completion_failures_total{reason}`).
    pub(crate) fn record(self) {
        ::metrics::counter!("idem_completion_failures_total", "reason" => self.as_str())
            .increment(1);
    }
}

/// Counts a lease lost while its handler ran (`idem_lease_lost_total`).
pub(crate) fn lease_lost() {
    ::metrics::counter!("idem_lease_lost_total").increment(1);
}

/// Records how long a handler ran under its claim, response buffering
/// included (`idem_handler_duration_seconds`).
pub(crate) fn handler_duration(elapsed: Duration) {
    ::metrics::histogram!("idem_handler_duration_seconds").record(elapsed.as_secs_f64());
}
