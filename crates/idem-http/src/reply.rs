//! [`Reply`]: an answer the contract gives by itself (a problem, a replay),
//! in plain `http` types that every adapter turns into its framework's
//! response.

use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode};

/// A complete response of the contract's own: a problem answer, a replayed
/// response, a rejection of the scope function.
///
/// # Behavior
/// An adapter sends `status`, `headers` and `body` as they are, and the
/// `trailers` after the body when there are some (a replayed gRPC response
/// keeps its status there). It adds nothing but what its framework must
/// (`content-length`, `date`).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Reply {
    /// The status.
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
    /// The trailers, if any.
    pub trailers: Option<HeaderMap>,
}

impl Reply {
    /// A reply of `status` with `body` and no headers.
    pub fn new(status: StatusCode, body: impl Into<Bytes>) -> Self {
        Self {
            status,
            headers: HeaderMap::new(),
            body: body.into(),
            trailers: None,
        }
    }

    /// The reply as a response with its body, and its trailers.
    pub fn into_response(self) -> (Response<Bytes>, Option<HeaderMap>) {
        let mut response = Response::new(self.body);
        *response.status_mut() = self.status;
        *response.headers_mut() = self.headers;
        (response, self.trailers)
    }

    /// A reply from a response without trailers.
    pub fn from_response(response: Response<Bytes>) -> Self {
        let (parts, body) = response.into_parts();
        Self {
            status: parts.status,
            headers: parts.headers,
            body,
            trailers: None,
        }
    }
}
