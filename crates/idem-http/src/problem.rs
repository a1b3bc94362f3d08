//! RFC 9457 problem details for every answer the contract gives by itself.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;

use crate::reply::Reply;

/// The media type of problem details (RFC 9457).
pub const PROBLEM_JSON: &str = "application/problem+json";

/// Every kind of answer the layer gives instead of (or in place of) the
/// handler's, each with a stable `type` URI (listed in docs/http-contract.md).
///
/// # Behavior
/// The URIs, statuses and titles never change between versions: clients may
/// match on [`uri`](Self::uri).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ProblemType {
    /// 400: the endpoint requires an `Idempotency-Key` and none was sent.
    MissingKey,
    /// 400: the key is empty, too long, not visible ASCII, badly quoted, or
    /// sent more than once.
    InvalidKey,
    /// 422: the key was already used with a different request.
    KeyReused,
    /// 409: a request with this key is still being processed.
    RequestInProgress,
    /// 413: the request body exceeds the layer's limit.
    BodyTooLarge,
    /// 400: the request body could not be read.
    BodyUnreadable,
    /// 503: the idempotency store cannot be reached; nothing was executed.
    StoreUnavailable,
    /// 500: the idempotency store failed permanently; nothing was executed.
    StoreFailed,
    /// 500: the stored record for this key cannot be read; nothing was executed.
    CorruptRecord,
    /// 500 (stored and replayed): the operation was executed, but its response
    /// was too large to keep, so it cannot be replayed.
    ResponseNotStored,
    /// 500 (replayed): the request with this key ended without a known
    /// result (its handler failed, panicked, was stopped by a shutdown, or its
    /// response broke off) and may or may not have taken effect. It is never
    /// run again with this key: check the resource, then use a new key.
    OutcomeUnknown,
    /// 503 + `Retry-After`: this instance is shutting down and takes no new
    /// requests with a key; nothing was executed. Retry (elsewhere) with the
    /// same key.
    ShuttingDown,
}

impl ProblemType {
    /// Every problem type.
    pub const ALL: [Self; 12] = [
        Self::MissingKey,
        Self::InvalidKey,
        Self::KeyReused,
        Self::RequestInProgress,
        Self::BodyTooLarge,
        Self::BodyUnreadable,
        Self::StoreUnavailable,
        Self::StoreFailed,
        Self::CorruptRecord,
        Self::ResponseNotStored,
        Self::OutcomeUnknown,
        Self::ShuttingDown,
    ];

    /// The stable `type` URI.
    pub const fn uri(self) -> &'static str {
        match self {
            Self::MissingKey => "https://idem.dev/problems/missing-key",
            Self::InvalidKey => "https://idem.dev/problems/invalid-key",
            Self::KeyReused => "https://idem.dev/problems/key-reused",
            Self::RequestInProgress => "https://idem.dev/problems/request-in-progress",
            Self::BodyTooLarge => "https://idem.dev/problems/body-too-large",
            Self::BodyUnreadable => "https://idem.dev/problems/body-unreadable",
            Self::StoreUnavailable => "https://idem.dev/problems/store-unavailable",
            Self::StoreFailed => "https://idem.dev/problems/store-failed",
            Self::CorruptRecord => "https://idem.dev/problems/corrupt-record",
            Self::ResponseNotStored => "https://idem.dev/problems/response-not-stored",
            Self::OutcomeUnknown => "https://idem.dev/problems/outcome-unknown",
            Self::ShuttingDown => "https://idem.dev/problems/shutting-down",
        }
    }

    /// The problem type of `uri`, if it is one of these.
    pub fn from_uri(uri: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.uri() == uri)
    }

    /// Whether the contract tells the client to re-send the request with
    /// the same key after this answer: nothing was executed (store
    /// unavailable or failed, shutting down, body unreadable), or the first
    /// request is still running (in progress). Every other answer is final
    /// for the key.
    pub const fn is_retryable(self) -> bool {
        matches!(
            self,
            Self::BodyUnreadable
                | Self::RequestInProgress
                | Self::StoreFailed
                | Self::StoreUnavailable
                | Self::ShuttingDown
        )
    }

    /// The HTTP status.
    pub const fn status(self) -> StatusCode {
        match self {
            Self::MissingKey | Self::InvalidKey | Self::BodyUnreadable => StatusCode::BAD_REQUEST,
            Self::KeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::RequestInProgress => StatusCode::CONFLICT,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::StoreUnavailable | Self::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            Self::StoreFailed
            | Self::CorruptRecord
            | Self::ResponseNotStored
            | Self::OutcomeUnknown => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The short, fixed human-readable summary (`title`).
    pub const fn title(self) -> &'static str {
        match self {
            Self::MissingKey => "Idempotency-Key header required",
            Self::InvalidKey => "Invalid Idempotency-Key",
            Self::KeyReused => "Idempotency-Key reused with a different request",
            Self::RequestInProgress => "A request with this Idempotency-Key is in progress",
            Self::BodyTooLarge => "Request body too large",
            Self::BodyUnreadable => "Request body could not be read",
            Self::StoreUnavailable => "Idempotency store unavailable",
            Self::StoreFailed => "Idempotency store failed",
            Self::CorruptRecord => "Stored idempotency record unreadable",
            Self::ResponseNotStored => "Response too large to replay",
            Self::OutcomeUnknown => "Outcome of the request with this Idempotency-Key is unknown",
            Self::ShuttingDown => "Shutting down",
        }
    }
}

/// One answer of the contract's own: a [`ProblemType`], a detail for the
/// client, an optional `Retry-After`, and extra members.
///
/// # Behavior
/// Over HTTP it is an RFC 9457 `application/problem+json` body with `type`,
/// `title`, `status`, `detail` and the extra members, plus `Retry-After` in
/// whole seconds (rounded up, at least 1). Over gRPC the
/// [`Dialect`](crate::Dialect) maps it to a status (see `crate::grpc`).
#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    kind: ProblemType,
    detail: String,
    retry_after: Option<Duration>,
    members: serde_json::Map<String, serde_json::Value>,
}

impl Problem {
    /// A problem of `kind` with `detail`.
    pub fn new(kind: ProblemType, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: detail.into(),
            retry_after: None,
            members: serde_json::Map::new(),
        }
    }

    /// With a `Retry-After`.
    #[must_use]
    pub fn retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// With an extra member (an RFC 9457 extension member).
    #[must_use]
    pub fn member(mut self, name: &str, value: impl Into<serde_json::Value>) -> Self {
        self.members.insert(name.to_owned(), value.into());
        self
    }

    /// The kind.
    pub fn kind(&self) -> ProblemType {
        self.kind
    }

    /// The detail.
    pub fn detail(&self) -> &str {
        &self.detail
    }

    /// The `Retry-After`, if any.
    pub fn retry_after_duration(&self) -> Option<Duration> {
        self.retry_after
    }

    /// The extra members.
    pub fn members(&self) -> &serde_json::Map<String, serde_json::Value> {
        &self.members
    }

    /// The problem as an HTTP problem+json reply.
    pub fn to_http(&self) -> Reply {
        let kind = self.kind;
        let mut object = serde_json::Map::new();
        object.insert("type".into(), kind.uri().into());
        object.insert("title".into(), kind.title().into());
        object.insert("status".into(), kind.status().as_u16().into());
        object.insert("detail".into(), self.detail.clone().into());
        for (name, value) in &self.members {
            object.entry(name.clone()).or_insert_with(|| value.clone());
        }
        let body =
            serde_json::to_vec(&object).map_or_else(|_| Bytes::from_static(b"{}"), Bytes::from);
        let mut reply = with_status(kind.status(), body);
        if let Some(after) = self.retry_after {
            reply.headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after_secs(after)),
            );
        }
        reply
    }
}

#[derive(Serialize)]
struct Body<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    title: &'a str,
    status: u16,
    detail: &'a str,
}

/// A problem-details JSON body.
pub(crate) fn body(kind: &str, title: &str, status: StatusCode, detail: &str) -> Bytes {
    let body = Body {
        kind,
        title,
        status: status.as_u16(),
        detail,
    };
    // Serializing plain strings and a number cannot fail; fall back to an
    // empty object rather than panic.
    serde_json::to_vec(&body).map_or_else(|_| Bytes::from_static(b"{}"), Bytes::from)
}

/// A problem+json reply of `status` with `body`.
pub(crate) fn with_status(status: StatusCode, body: Bytes) -> Reply {
    let mut reply = Reply::new(status, body);
    reply
        .headers
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    reply
}

/// Whole seconds, rounded up, at least 1.
pub fn retry_after_secs(d: Duration) -> u64 {
    let secs = d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0));
    secs.max(1)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn retry_after_rounds_up_to_at_least_one() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
    }

    #[test]
    fn bodies_are_problem_json() {
        let r = Problem::new(ProblemType::KeyReused, "d\"etail")
            .member("first_method", "POST")
            .member("status", 1)
            .to_http();
        assert_eq!(r.status, 422);
        assert_eq!(r.headers[header::CONTENT_TYPE], PROBLEM_JSON);
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["first_method"], "POST");
        assert_eq!(v["type"], ProblemType::KeyReused.uri());
        assert_eq!(v["status"], 422);
        assert_eq!(v["detail"], "d\"etail");
    }

    #[test]
    fn uris_are_distinct() {
        let mut uris: Vec<_> = ProblemType::ALL.iter().map(|p| p.uri()).collect();
        uris.sort_unstable();
        uris.dedup();
        assert_eq!(uris.len(), ProblemType::ALL.len());
    }
}
