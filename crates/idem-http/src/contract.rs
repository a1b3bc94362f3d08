//! [`Contract`]: the engine and every option of an integration, once, and
//! the [`Builder`] every adapter's builder is.
//!
//! An adapter (`idem-tower`, `idem-actix`) names its builder as
//! `Builder<S, C, Its>` where `Its` implements [`Integration`]: the options,
//! their defaults and their documentation exist once, here.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, Method, StatusCode, request, response};
use idem_core::{Engine, Error, Outcome};

use crate::extract::KeySource;
use crate::fingerprint::{Fingerprinter, RequestView};
use crate::problem::Problem;
use crate::reply::Reply;
use crate::stored::{HeaderFilter, StoredResponse};

/// The default header name, `Idempotency-Key`.
pub const DEFAULT_HEADER: HeaderName = HeaderName::from_static("idempotency-key");

/// The default request body limit: 2 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

/// The longest `Retry-After` the contract sends (a day); longer settings
/// are capped to it.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

/// Decides whether a response is stored.
type StoreIfFn = dyn Fn(&response::Parts) -> bool + Send + Sync;

/// Decides whether a request is covered.
type CoversFn = dyn Fn(&request::Parts) -> bool + Send + Sync;

/// Edits a replayed response.
type ReplayFn = dyn Fn(&RequestView<'_>, &mut Reply) + Send + Sync;

/// The default storage predicate: every response below 500 is stored.
fn default_store_if(parts: &response::Parts) -> bool {
    !parts.status.is_server_error()
}

/// How the contract speaks: plain HTTP, or gRPC over HTTP/2.
///
/// # Behavior
/// - `Http`: the contract's own answers are RFC 9457 problem+json with the
///   statuses of [`ProblemType`](crate::ProblemType); what is stored is
///   chosen by [`store_response_if`](Builder::store_response_if).
/// - `Grpc`: the same answers as gRPC statuses (trailers-only responses),
///   and a response's gRPC status decides what is stored (see the
///   `grpc` module docs of this crate); the key defaults to the
///   `idempotency-key` metadata entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Dialect {
    /// HTTP with problem+json answers.
    #[default]
    Http,
    /// gRPC: answers and stored outcomes by gRPC status.
    Grpc,
}

/// The engine and the options of one integration; set with [`Builder`],
/// shared by the adapter's layer/middleware and every request behind one
/// `Arc`.
pub struct Contract<S, C> {
    pub(crate) engine: Arc<Engine<S, C>>,
    pub(crate) key: KeySource,
    pub(crate) methods: Vec<Method>,
    pub(crate) covers: Option<Box<CoversFn>>,
    pub(crate) required: bool,
    pub(crate) max_body_bytes: usize,
    pub(crate) fingerprint_headers: Vec<HeaderName>,
    pub(crate) fingerprint: Fingerprinter,
    pub(crate) filter: Arc<HeaderFilter>,
    pub(crate) store_if: Box<StoreIfFn>,
    pub(crate) on_replay: Option<Box<ReplayFn>>,
    pub(crate) dialect: Dialect,
    pub(crate) fail_open: bool,
    pub(crate) store_retry_after: Duration,
    pub(crate) max_retry_after: Duration,
    pub(crate) release_on_cancel: bool,
}

impl<S, C> Contract<S, C> {
    /// The defaults over `engine`.
    fn new(engine: Arc<Engine<S, C>>) -> Self {
        Self {
            engine,
            key: KeySource::header(DEFAULT_HEADER),
            methods: vec![Method::POST, Method::PATCH],
            covers: None,
            required: false,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            fingerprint_headers: Vec::new(),
            fingerprint: Fingerprinter::request(),
            filter: Arc::new(HeaderFilter::default()),
            store_if: Box::new(default_store_if),
            on_replay: None,
            dialect: Dialect::Http,
            fail_open: false,
            store_retry_after: Duration::from_secs(1),
            max_retry_after: Duration::from_secs(2),
            release_on_cancel: false,
        }
    }

    /// The engine.
    pub fn engine(&self) -> &Arc<Engine<S, C>> {
        &self.engine
    }

    /// Whether requests with `method` are among the covered
    /// [`methods`](Builder::methods); others pass through untouched, key or
    /// not.
    ///
    /// # Behavior
    /// The methods only: it ignores a [`covers`](Builder::covers)
    /// predicate. Adapters ask [`covers_request`](Self::covers_request),
    /// which applies it.
    pub fn covers(&self, method: &Method) -> bool {
        self.methods.contains(method)
    }

    /// Whether the request with head `parts` is covered; others pass
    /// through untouched (streamed), key or not.
    ///
    /// # Behavior
    /// The [`covers`](Builder::covers) predicate when one is set, else
    /// whether its method is among the [`methods`](Builder::methods).
    pub fn covers_request(&self, parts: &request::Parts) -> bool {
        match &self.covers {
            Some(predicate) => predicate(parts),
            None => self.covers(&parts.method),
        }
    }

    /// The `idem` span of a covered request: `method` now, and `key`,
    /// `attempt` and `outcome` recorded by [`admit`](Self::admit) and the
    /// claim. Adapters run each covered request in it, so that every
    /// integration reports the same fields.
    pub fn span(&self, method: &Method) -> tracing::Span {
        tracing::info_span!(
            "idem",
            method = %method,
            key = tracing::field::Empty,
            attempt = tracing::field::Empty,
            outcome = tracing::field::Empty,
        )
    }

    /// Whether a covered request's future dropped while its handler runs
    /// releases the key ([`Builder::release_on_cancel`]).
    pub fn release_on_cancel(&self) -> bool {
        self.release_on_cancel
    }

    /// The dialect.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Whether the response head `parts` is to be buffered and stored (the
    /// [`store_response_if`](Builder::store_response_if) predicate; under
    /// gRPC every response is buffered, its status decides later).
    pub fn stores(&self, parts: &response::Parts) -> bool {
        match self.dialect {
            Dialect::Http => (self.store_if)(parts),
            Dialect::Grpc => true,
        }
    }

    /// `problem` in this contract's dialect.
    pub fn render(&self, problem: &Problem) -> Reply {
        match self.dialect {
            Dialect::Http => problem.to_http(),
            Dialect::Grpc => crate::grpc::render(problem),
        }
    }

    /// The outcome stored for a response: `status`, `headers` (minus the
    /// hop-by-hop and denied ones) and `body`, encoded exactly as the
    /// contract encodes a handler's response, so that a retry replays it
    /// like any other.
    ///
    /// # Behavior
    /// For code that ends a key outside a request: a
    /// [`Completer`](idem_core::Completer) resuming an abandoned multi-step
    /// operation returns `Ending::Complete(contract.outcome_of(..)?)`.
    /// [`Error::Codec`] if it cannot be encoded.
    pub fn outcome_of(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<Outcome, Error> {
        StoredResponse::new(
            status,
            headers,
            Bytes::copy_from_slice(body),
            None,
            &self.filter,
            None,
        )
        .encode()
        .map_err(Error::from)
    }

    /// The options (not the engine nor the functions) as the fields of a
    /// debug struct named `name`.
    pub fn debug(&self, name: &str, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct(name)
            .field("key", &self.key)
            .field("methods", &self.methods)
            .field(
                "covers",
                &self.covers.as_ref().map(|_| "fn(&Parts) -> bool"),
            )
            .field("required", &self.required)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("fingerprint_headers", &self.fingerprint_headers)
            .field("replay_deny", &self.filter.denied())
            .field("dialect", &self.dialect)
            .field("fail_open", &self.fail_open)
            .field("release_on_cancel", &self.release_on_cancel)
            .finish_non_exhaustive()
    }
}

/// What an adapter builds from a [`Contract`]: its layer or middleware.
pub trait Integration<S, C>: Sized {
    /// How the adapter derives a request's scope (a function of its
    /// framework's request).
    type Scope;
    /// The layer or middleware.
    type Built;
    /// Builds it.
    fn build(contract: Contract<S, C>, scope: Self::Scope) -> Self::Built;
}

/// Configures an integration (`idem_tower::IdempotencyLayerBuilder`,
/// `idem_actix::IdempotencyBuilder`); made by the adapter's `builder`.
///
/// # Behavior
/// Every option has a safe default:
///
/// | option | default |
/// |---|---|
/// | [`header_name`](Self::header_name) / [`key_source`](Self::key_source) | the `Idempotency-Key` header |
/// | [`methods`](Self::methods) / [`covers`](Self::covers) | `POST`, `PATCH` |
/// | [`required`](Self::required) | `false`: requests without a key pass through |
/// | [`max_body_bytes`](Self::max_body_bytes) | 2 MiB (413 beyond) |
/// | [`fingerprint_header`](Self::fingerprint_header) | none: method, path and query, body |
/// | [`fingerprint`](Self::fingerprint) | [`Fingerprinter::request`] |
/// | [`replay_deny_headers`](Self::replay_deny_headers) | `set-cookie`, `date` |
/// | [`store_response_if`](Self::store_response_if) | status below 500 |
/// | [`on_replay`](Self::on_replay) | none |
/// | [`fail_open`](Self::fail_open) | `false`: 503 when the store is down |
/// | [`store_retry_after`](Self::store_retry_after) | 1 s |
/// | [`max_retry_after`](Self::max_retry_after) | 2 s |
/// | [`release_on_cancel`](Self::release_on_cancel) | `false`: handlers run to completion |
///
/// Time-related engine settings (how long keys live, the lease, waiting for
/// an in-flight original instead of answering 409) are the engine's
/// [`Policy`](idem_core::Policy).
pub struct Builder<S, C, I: Integration<S, C>> {
    contract: Contract<S, C>,
    scope: I::Scope,
    integration: PhantomData<fn() -> I>,
}

impl<S, C, I: Integration<S, C>> fmt::Debug for Builder<S, C, I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.contract.debug("Builder", f)
    }
}

impl<S, C, I: Integration<S, C>> Builder<S, C, I> {
    /// The defaults over `engine`, with the adapter's `scope`.
    pub fn new(engine: Arc<Engine<S, C>>, scope: I::Scope) -> Self {
        Self {
            contract: Contract::new(engine),
            scope,
            integration: PhantomData,
        }
    }

    /// gRPC: the contract's answers as gRPC statuses, and a response's gRPC
    /// status decides what is stored (see [`Dialect::Grpc`]). The key is
    /// the `idempotency-key` metadata entry unless set otherwise.
    #[must_use]
    pub fn grpc(mut self) -> Self {
        self.contract.dialect = Dialect::Grpc;
        self
    }

    /// The request header carrying the key.
    #[must_use]
    pub fn header_name(mut self, name: HeaderName) -> Self {
        self.contract.key = KeySource::header(name);
        self
    }

    /// Where the key comes from: a header, a function of the request head,
    /// or of its buffered body (see [`KeySource`]).
    #[must_use]
    pub fn key_source(mut self, source: KeySource) -> Self {
        self.contract.key = source;
        self
    }

    /// The methods covered; requests with other methods pass through
    /// untouched, key or not. Replaces a [`covers`](Self::covers)
    /// predicate set before.
    #[must_use]
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.contract.methods = methods.into_iter().collect();
        self.contract.covers = None;
        self
    }

    /// Which requests are covered, by a function of the request head:
    /// instead of the [`methods`](Self::methods) check (the last of the two
    /// set wins).
    ///
    /// # Behavior
    /// A request the predicate refuses passes through untouched: no key is
    /// read, its body is streamed, [`required`](Self::required) does not
    /// apply, and its response is not buffered. A covered request is
    /// handled as any other (key, scope, body limit, fingerprint). The
    /// predicate sees only the head, before anything is read; it should be
    /// cheap, and it replaces the method check entirely (test
    /// `parts.method` in it to keep one).
    ///
    /// For gRPC, [`grpc::unary_methods`](crate::grpc::unary_methods) covers
    /// the unary methods you list and leaves the others (streaming ones
    /// among them) alone, so keys can be [`required`](Self::required) on
    /// exactly those methods. Over HTTP, cover some paths only:
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use idem_core::{Engine, MemoryStore};
    /// # struct Adapter;
    /// # impl<S, C> idem_http::Integration<S, C> for Adapter { type Scope = (); type Built = (); fn build(_: idem_http::Contract<S, C>, _: ()) {} }
    /// use http::Method;
    /// # let engine = Arc::new(Engine::new(MemoryStore::new()));
    /// let builder = idem_http::Builder::<_, _, Adapter>::new(engine, ())
    ///     .covers(|parts| parts.method == Method::POST && parts.uri.path().starts_with("/payments"))
    ///     .required(true);
    /// # let _ = builder;
    /// ```
    #[must_use]
    pub fn covers<F>(mut self, predicate: F) -> Self
    where
        F: Fn(&request::Parts) -> bool + Send + Sync + 'static,
    {
        self.contract.covers = Some(Box::new(predicate));
        self
    }

    /// Whether a key is required on covered requests: a request without one is
    /// then answered 400 ([`ProblemType::MissingKey`](crate::ProblemType::MissingKey))
    /// and the handler is not called. When not required, such requests pass
    /// through unprotected.
    #[must_use]
    pub fn required(mut self, required: bool) -> Self {
        self.contract.required = required;
        self
    }

    /// The largest request body buffered (it is part of the fingerprint);
    /// larger requests are answered 413 ([`ProblemType::BodyTooLarge`](crate::ProblemType::BodyTooLarge)).
    #[must_use]
    pub fn max_body_bytes(mut self, limit: usize) -> Self {
        self.contract.max_body_bytes = limit;
        self
    }

    /// Adds a request header to the fingerprint (for example `content-type`
    /// or an API version header): the same key with a different value of it
    /// is then a different request (422).
    #[must_use]
    pub fn fingerprint_header(mut self, name: HeaderName) -> Self {
        self.contract.fingerprint_headers.push(name);
        self
    }

    /// What the fingerprint covers (see [`Fingerprinter`]); the
    /// [`fingerprint_header`](Self::fingerprint_header)s are part of
    /// [`RequestView::fingerprint_with`].
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use idem_core::{Engine, MemoryStore};
    /// # struct Adapter;
    /// # impl<S, C> idem_http::Integration<S, C> for Adapter { type Scope = (); type Built = (); fn build(_: idem_http::Contract<S, C>, _: ()) {} }
    /// use idem_http::{Builder, Fingerprinter};
    /// # let engine = Arc::new(Engine::new(MemoryStore::new()));
    /// let builder = Builder::<_, _, Adapter>::new(engine, ())
    ///     .fingerprint(Fingerprinter::canonical_json_without(["/sent_at"]));
    /// # let _ = builder;
    /// ```
    #[must_use]
    pub fn fingerprint(mut self, fingerprinter: Fingerprinter) -> Self {
        self.contract.fingerprint = fingerprinter;
        self
    }

    /// Adds a response header that is neither stored nor replayed.
    #[must_use]
    pub fn deny_replay_header(mut self, name: HeaderName) -> Self {
        Arc::make_mut(&mut self.contract.filter).deny(name);
        self
    }

    /// Replaces the list of response headers that are neither stored nor
    /// replayed (default: `set-cookie`, `date`). Hop-by-hop headers,
    /// `content-length` and `idempotent-replayed` are never stored, whatever
    /// this list says.
    #[must_use]
    pub fn replay_deny_headers(mut self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        self.contract.filter = Arc::new(HeaderFilter::new(names.into_iter().collect()));
        self
    }

    /// Which responses are stored (and replayed to retries).
    ///
    /// # Behavior
    /// Default: every status below 500 is stored (2xx, 3xx and 4xx: the
    /// request was processed and its answer is final). A response the
    /// predicate refuses (by default a 5xx) is returned to this client but
    /// is ambiguous: the handler may have taken effect before it failed. The
    /// key is then finished as [`outcome-unknown`](crate::ProblemType::OutcomeUnknown)
    /// and never run again, unless the handler declared that nothing took
    /// effect ([`NoEffect`](crate::NoEffect) on the response, or
    /// [`IdempotencyClaim::declare_no_effect`](crate::IdempotencyClaim::declare_no_effect)):
    /// then the key is released and a retry runs the handler afresh. A
    /// response carrying `NoEffect` is never stored, whatever the predicate
    /// says. Not used under [`grpc`](Self::grpc), where the gRPC status
    /// decides.
    #[must_use]
    pub fn store_response_if<F>(mut self, predicate: F) -> Self
    where
        F: Fn(&response::Parts) -> bool + Send + Sync + 'static,
    {
        self.contract.store_if = Box::new(predicate);
        self
    }

    /// Edits every replayed response before it is sent: add a header,
    /// rewrite a field of the body.
    ///
    /// # Behavior
    /// Called with the retry's request and the stored response as it will
    /// be sent (`Idempotent-Replayed: true` already added), for replays
    /// only: not for the first response, nor for the contract's problem
    /// answers (409, 422, outcome-unknown). What it changes is not stored;
    /// every replay starts from the stored response.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use idem_core::{Engine, MemoryStore};
    /// # struct Adapter;
    /// # impl<S, C> idem_http::Integration<S, C> for Adapter { type Scope = (); type Built = (); fn build(_: idem_http::Contract<S, C>, _: ()) {} }
    /// use http::HeaderValue;
    /// # let engine = Arc::new(Engine::new(MemoryStore::new()));
    /// let builder = idem_http::Builder::<_, _, Adapter>::new(engine, ())
    ///     .on_replay(|_request, reply| {
    ///         reply.headers.insert("x-cache", HeaderValue::from_static("replay"));
    ///     });
    /// # let _ = builder;
    /// ```
    #[must_use]
    pub fn on_replay<F>(mut self, hook: F) -> Self
    where
        F: Fn(&RequestView<'_>, &mut Reply) + Send + Sync + 'static,
    {
        self.contract.on_replay = Some(Box::new(hook));
        self
    }

    /// **Unsafe for exactly-once semantics; off by default.** When the store
    /// is unreachable, run the handler anyway, without idempotency
    /// protection, instead of answering 503.
    ///
    /// # Behavior
    /// With fail-open, every retry sent while the store is down runs the
    /// handler again: duplicate payments, orders, emails. Use it only for
    /// endpoints where a duplicate is harmless and availability matters more.
    #[must_use]
    pub fn fail_open(mut self, fail_open: bool) -> Self {
        self.contract.fail_open = fail_open;
        self
    }

    /// The `Retry-After` sent with 503 when the store is unreachable or the
    /// integration is shutting down (at most [`MAX_RETRY_AFTER`]).
    #[must_use]
    pub fn store_retry_after(mut self, retry_after: Duration) -> Self {
        self.contract.store_retry_after = retry_after.min(MAX_RETRY_AFTER);
        self
    }

    /// **Only for handlers without external effects.** Releases the key when
    /// the request's future is dropped while the handler runs (client gone,
    /// an outer timeout), and stops the handler there.
    ///
    /// # Behavior
    /// Default `false`: the handler and the storing of its response run in a
    /// task of their own, to completion, whatever happens to the request's
    /// future; a retry meanwhile gets 409 + `Retry-After`, afterwards the
    /// stored response. With `true`, a dropped request releases the key in
    /// the background and a retry runs the handler again at once: if the
    /// dropped handler had already made an external call (a payment, an
    /// email), that call happens twice.
    #[must_use]
    pub fn release_on_cancel(mut self, release: bool) -> Self {
        self.contract.release_on_cancel = release;
        self
    }

    /// The longest `Retry-After` sent with 409 (request in progress).
    ///
    /// # Behavior
    /// The 409's `Retry-After` is the time left on the original's lease,
    /// rounded up to whole seconds, at least 1, at most this. The lease
    /// (default 60 s, renewed by heartbeats) bounds a crashed original; a live
    /// one usually finishes much sooner, so a short retry interval gets
    /// clients their replay sooner.
    /// Capped to [`MAX_RETRY_AFTER`].
    #[must_use]
    pub fn max_retry_after(mut self, max: Duration) -> Self {
        self.contract.max_retry_after = max.min(MAX_RETRY_AFTER);
        self
    }

    /// The adapter's layer or middleware.
    pub fn build(self) -> I::Built {
        I::build(self.contract, self.scope)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use idem_core::MemoryStore;

    /// An integration that builds the contract itself.
    struct Bare;

    impl<S, C> Integration<S, C> for Bare {
        type Scope = ();
        type Built = Contract<S, C>;
        fn build(contract: Contract<S, C>, (): ()) -> Contract<S, C> {
            contract
        }
    }

    fn builder() -> Builder<MemoryStore, idem_core::DefaultClock, Bare> {
        Builder::new(Arc::new(Engine::new(MemoryStore::new())), ())
    }

    fn head(method: Method, path: &str) -> request::Parts {
        http::Request::builder()
            .method(method)
            .uri(path)
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    #[test]
    fn the_methods_decide_without_a_predicate() {
        let contract = builder().build();
        assert!(contract.covers_request(&head(Method::POST, "/a")));
        assert!(contract.covers_request(&head(Method::PATCH, "/a")));
        assert!(!contract.covers_request(&head(Method::PUT, "/a")));
        let contract = builder().methods([Method::PUT]).build();
        assert!(contract.covers_request(&head(Method::PUT, "/a")));
        assert!(!contract.covers_request(&head(Method::POST, "/a")));
    }

    #[test]
    fn a_predicate_replaces_the_methods_and_the_last_setting_wins() {
        let contract = builder().covers(|parts| parts.uri.path() == "/pay").build();
        assert!(contract.covers_request(&head(Method::PUT, "/pay")));
        assert!(!contract.covers_request(&head(Method::POST, "/other")));
        // `covers(&Method)` is the methods only.
        assert!(contract.covers(&Method::POST) && !contract.covers(&Method::PUT));

        let contract = builder().covers(|_| false).methods([Method::POST]).build();
        assert!(contract.covers_request(&head(Method::POST, "/pay")));
        let contract = builder().methods([Method::POST]).covers(|_| false).build();
        assert!(!contract.covers_request(&head(Method::POST, "/pay")));
        assert!(format!("{:?}", builder().covers(|_| true)).contains("covers: Some"));
    }
}
