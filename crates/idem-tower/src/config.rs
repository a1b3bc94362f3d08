//! The layer's configuration: the engine and every option, once.
//!
//! [`IdempotencyLayerBuilder`](crate::IdempotencyLayerBuilder) sets the
//! fields of a [`Config`]; the layer and each service it makes share it
//! behind one `Arc`.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;
use http::{HeaderName, Method, response};
use idem_core::{Engine, Scope};

use crate::scope::Rejection;
use crate::stored::HeaderFilter;

/// The default header name, `Idempotency-Key`.
pub const DEFAULT_HEADER: HeaderName = HeaderName::from_static("idempotency-key");

/// The default request body limit: 2 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

/// The longest `Retry-After` the layer sends (a day); longer settings are
/// capped to it.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

/// Derives a request's scope (whose key it is), or rejects the request.
pub(crate) type ScopeFn = dyn Fn(&Parts) -> Result<Scope, Rejection> + Send + Sync;

/// Decides whether a response is stored.
pub(crate) type StoreIfFn = dyn Fn(&response::Parts) -> bool + Send + Sync;

/// The default storage predicate: every response below 500 is stored.
fn default_store_if(parts: &response::Parts) -> bool {
    !parts.status.is_server_error()
}

/// The engine and the options of one layer; the defaults are listed on
/// [`IdempotencyLayerBuilder`](crate::IdempotencyLayerBuilder), which
/// documents each option.
pub(crate) struct Config<S, C> {
    pub(crate) engine: Arc<Engine<S, C>>,
    /// The request header carrying the key.
    pub(crate) header: HeaderName,
    /// The methods the layer applies to.
    pub(crate) methods: Vec<Method>,
    /// Whether a key is required on those methods.
    pub(crate) required: bool,
    pub(crate) scope: Box<ScopeFn>,
    /// The largest request body buffered.
    pub(crate) max_body_bytes: usize,
    /// Request headers added to the fingerprint.
    pub(crate) fingerprint_headers: Vec<HeaderName>,
    /// Which response headers are stored and replayed (shared with each
    /// request's [`IdempotencyClaim`](crate::IdempotencyClaim)).
    pub(crate) filter: Arc<HeaderFilter>,
    pub(crate) store_if: Box<StoreIfFn>,
    pub(crate) fail_open: bool,
    /// `Retry-After` of the 503s (store unavailable, shutting down).
    pub(crate) store_retry_after: Duration,
    /// The cap on the 409's `Retry-After`.
    pub(crate) max_retry_after: Duration,
    pub(crate) release_on_cancel: bool,
}

impl<S, C> Config<S, C> {
    /// The defaults, over `engine` with `scope`.
    pub(crate) fn new<F>(engine: Arc<Engine<S, C>>, scope: F) -> Self
    where
        F: Fn(&Parts) -> Result<Scope, Rejection> + Send + Sync + 'static,
    {
        Self {
            engine,
            header: DEFAULT_HEADER,
            methods: vec![Method::POST, Method::PATCH],
            required: false,
            scope: Box::new(scope),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            fingerprint_headers: Vec::new(),
            filter: Arc::new(HeaderFilter::default()),
            store_if: Box::new(default_store_if),
            fail_open: false,
            store_retry_after: Duration::from_secs(1),
            max_retry_after: Duration::from_secs(2),
            release_on_cancel: false,
        }
    }

    /// The options (not the engine nor the functions) as the fields of a
    /// debug struct named `name`.
    pub(crate) fn debug(&self, name: &str, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct(name)
            .field("header", &self.header)
            .field("methods", &self.methods)
            .field("required", &self.required)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("fingerprint_headers", &self.fingerprint_headers)
            .field("replay_deny", &self.filter.denied())
            .field("fail_open", &self.fail_open)
            .field("release_on_cancel", &self.release_on_cancel)
            .finish_non_exhaustive()
    }
}
