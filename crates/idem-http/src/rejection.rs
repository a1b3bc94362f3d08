//! [`Rejection`]: the answer to a request whose scope cannot be derived.

use bytes::Bytes;
use http::{Response, StatusCode};

use crate::problem;
use crate::reply::Reply;

/// The answer to a request whose scope cannot be determined (for example an
/// unauthenticated one). The adapter returns it as is; nothing is claimed
/// and the handler is not called.
#[derive(Debug)]
pub struct Rejection(Box<Response<Bytes>>);

impl Rejection {
    /// An RFC 9457 problem response with `type` `about:blank`, the status's
    /// reason phrase as `title`, and `detail`.
    pub fn new(status: StatusCode, detail: &str) -> Self {
        let title = status.canonical_reason().unwrap_or("Error");
        let (response, _) =
            problem::with_status(status, problem::body("about:blank", title, status, detail))
                .into_response();
        Self(Box::new(response))
    }

    /// The 401 of a request that carries no authenticated principal, so
    /// that its key has no scope (what the adapters' `scope_from_extension`
    /// answers without the extension).
    pub fn unauthenticated() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "the request is not authenticated, so its idempotency key has no scope",
        )
    }

    /// Any response.
    pub fn from_response(response: Response<Bytes>) -> Self {
        Self(Box::new(response))
    }

    /// The response.
    pub fn into_response(self) -> Response<Bytes> {
        *self.0
    }

    /// The response as a [`Reply`].
    pub fn into_reply(self) -> Reply {
        Reply::from_response(*self.0)
    }
}

impl From<Response<Bytes>> for Rejection {
    fn from(response: Response<Bytes>) -> Self {
        Self::from_response(response)
    }
}
