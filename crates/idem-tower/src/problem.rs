//! RFC 9457 problem details for every answer the layer gives by itself.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use serde::Serialize;

use crate::body::ResponseBody;

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

/// A problem-details response of `kind`.
pub(crate) fn response(kind: ProblemType, detail: &str) -> Response<Bytes> {
    with_status(
        kind.status(),
        body(kind.uri(), kind.title(), kind.status(), detail),
    )
}

/// A problem response with `Retry-After`.
pub(crate) fn response_retry(
    kind: ProblemType,
    detail: &str,
    retry_after: Duration,
) -> Response<Bytes> {
    let mut response = response(kind, detail);
    response.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from(retry_after_secs(retry_after)),
    );
    response
}

/// [`response`] as the layer's answer.
pub(crate) fn answer<B: http_body::Body>(
    kind: ProblemType,
    detail: &str,
) -> Response<ResponseBody<B>> {
    response(kind, detail).map(ResponseBody::full)
}

/// [`response_retry`] as the layer's answer.
pub(crate) fn answer_retry<B: http_body::Body>(
    kind: ProblemType,
    detail: &str,
    retry_after: Duration,
) -> Response<ResponseBody<B>> {
    response_retry(kind, detail, retry_after).map(ResponseBody::full)
}

pub(crate) fn with_status(status: StatusCode, body: Bytes) -> Response<Bytes> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    response
}

/// Whole seconds, rounded up, at least 1.
pub(crate) fn retry_after_secs(d: Duration) -> u64 {
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
        let r = response(ProblemType::KeyReused, "d\"etail");
        assert_eq!(r.status(), 422);
        assert_eq!(r.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
        let v: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
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
