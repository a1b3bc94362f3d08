//! The layer and its builder.
//!
//! [`IdempotencyLayerBuilder`] sets the options of a
//! [`Config`](crate::config::Config); [`IdempotencyLayer`] holds it behind an
//! `Arc` and hands it to each [`Idempotency`] service it makes.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, HeaderName, Method, StatusCode, response};
use idem_core::store::Store;
use idem_core::{Clock, DefaultClock, Engine, Error, Outcome, Scope, Shutdown};
use tower::Layer;

use crate::config::{Config, MAX_RETRY_AFTER};
use crate::scope::Rejection;
use crate::service::Idempotency;
use crate::stored::{HeaderFilter, StoredResponse};

/// A [`tower::Layer`] that makes `POST`/`PATCH` endpoints idempotent by the
/// `Idempotency-Key` request header; see the [crate docs](crate) for the
/// behaviour and [`IdempotencyLayerBuilder`] for the options.
///
/// Cloning is cheap (one `Arc`).
pub struct IdempotencyLayer<S, C = DefaultClock> {
    config: Arc<Config<S, C>>,
}

impl<S, C> Clone for IdempotencyLayer<S, C> {
    fn clone(&self) -> Self {
        Self {
            config: self.config.clone(),
        }
    }
}

impl<S, C> fmt::Debug for IdempotencyLayer<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.config.debug("IdempotencyLayer", f)
    }
}

impl<S: Store, C: Clock> IdempotencyLayer<S, C> {
    /// A layer with the default options over `engine`, deriving each
    /// request's scope with `scope`.
    ///
    /// `scope` decides whose key a request carries: use the authenticated
    /// principal or tenant ([`scope_from_extension`](crate::scope_from_extension)),
    /// so that one client can never replay another's response.
    /// [`single_client_scope`](crate::single_client_scope) is for services
    /// with one client only.
    pub fn new<F>(engine: impl Into<Arc<Engine<S, C>>>, scope: F) -> Self
    where
        F: Fn(&Parts) -> Result<Scope, Rejection> + Send + Sync + 'static,
    {
        Self::builder(engine, scope).build()
    }

    /// A builder, to change the defaults; see [`new`](Self::new) for `scope`.
    pub fn builder<F>(
        engine: impl Into<Arc<Engine<S, C>>>,
        scope: F,
    ) -> IdempotencyLayerBuilder<S, C>
    where
        F: Fn(&Parts) -> Result<Scope, Rejection> + Send + Sync + 'static,
    {
        IdempotencyLayerBuilder {
            config: Config::new(engine.into(), scope),
        }
    }

    /// The engine.
    pub fn engine(&self) -> &Arc<Engine<S, C>> {
        &self.config.engine
    }

    /// A graceful shutdown: stops taking new keyed requests (503
    /// [`shutting-down`](crate::ProblemType::ShuttingDown) + `Retry-After`) and waits
    /// up to `grace` for the running handlers to finish and store their
    /// responses; see [`Engine::shutdown`].
    ///
    /// # Behavior
    /// Nothing that ran is released. Handlers still running after `grace`
    /// have their keys finished as `outcome-unknown` (never run again), since
    /// the process is about to stop them. Call it after the server stopped
    /// accepting connections, before the runtime ends:
    ///
    /// ```no_run
    /// # use std::{sync::Arc, time::Duration};
    /// # use axum::{Router, routing::post};
    /// # use idem_core::{Engine, MemoryStore};
    /// # use idem_tower::{IdempotencyLayer, single_client_scope};
    /// # #[tokio::main] async fn main() -> std::io::Result<()> {
    /// # async fn stop_signal() {}
    /// let layer = IdempotencyLayer::new(Arc::new(Engine::new(MemoryStore::new())), single_client_scope);
    /// let app: Router = Router::new().route("/payments", post(|| async { "ok" })).layer(layer.clone());
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    /// axum::serve(listener, app)
    ///     .with_graceful_shutdown(stop_signal()) // e.g. tokio::signal::ctrl_c
    ///     .await?;
    /// let report = layer.shutdown(Duration::from_secs(30)).await;
    /// assert_eq!(report.left_in_flight, 0);
    /// # Ok(()) }
    /// ```
    pub async fn shutdown(&self, grace: Duration) -> Shutdown {
        self.config.engine.shutdown(grace).await
    }

    /// The outcome this layer stores for a response: `status`, `headers`
    /// (minus the hop-by-hop and denied ones) and `body`, encoded exactly as
    /// the layer encodes a handler's response, so that a retry replays it
    /// like any other.
    ///
    /// # Behavior
    /// For code that ends a key of this layer's routes outside a request: a
    /// [`Completer`](idem_core::Completer) resuming an abandoned multi-step
    /// operation returns `Ending::Complete(layer.outcome_of(..)?)`.
    /// [`Error::Codec`](idem_core::Error::Codec) if it cannot be encoded.
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
            &self.config.filter,
        )
        .encode()
        .map_err(Error::from)
    }
}

/// Configures an [`IdempotencyLayer`]; made by [`IdempotencyLayer::builder`].
///
/// # Behavior
/// Every option has a safe default:
///
/// | option | default |
/// |---|---|
/// | [`header_name`](Self::header_name) | `Idempotency-Key` |
/// | [`methods`](Self::methods) | `POST`, `PATCH` |
/// | [`required`](Self::required) | `false`: requests without a key pass through |
/// | [`max_body_bytes`](Self::max_body_bytes) | 2 MiB (413 beyond) |
/// | [`fingerprint_header`](Self::fingerprint_header) | none: method, path and query, body |
/// | [`replay_deny_headers`](Self::replay_deny_headers) | `set-cookie`, `date` |
/// | [`store_response_if`](Self::store_response_if) | status below 500 |
/// | [`fail_open`](Self::fail_open) | `false`: 503 when the store is down |
/// | [`store_retry_after`](Self::store_retry_after) | 1 s |
/// | [`max_retry_after`](Self::max_retry_after) | 2 s |
/// | [`release_on_cancel`](Self::release_on_cancel) | `false`: handlers run to completion |
///
/// Time-related engine settings (how long keys live, the lease, waiting for
/// an in-flight original instead of answering 409) are the engine's
/// [`Policy`](idem_core::Policy).
pub struct IdempotencyLayerBuilder<S, C = DefaultClock> {
    config: Config<S, C>,
}

impl<S, C> fmt::Debug for IdempotencyLayerBuilder<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.config.debug("IdempotencyLayerBuilder", f)
    }
}

impl<S: Store, C: Clock> IdempotencyLayerBuilder<S, C> {
    /// The request header carrying the key.
    #[must_use]
    pub fn header_name(mut self, name: HeaderName) -> Self {
        self.config.header = name;
        self
    }

    /// The methods the layer applies to; requests with other methods pass
    /// through untouched, key or not.
    #[must_use]
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.config.methods = methods.into_iter().collect();
        self
    }

    /// Whether a key is required on those methods: a request without one is
    /// then answered 400 ([`ProblemType::MissingKey`](crate::ProblemType::MissingKey)) and the handler is not
    /// called. When not required, such requests pass through unprotected.
    #[must_use]
    pub fn required(mut self, required: bool) -> Self {
        self.config.required = required;
        self
    }

    /// The largest request body buffered (it is part of the fingerprint);
    /// larger requests are answered 413 ([`ProblemType::BodyTooLarge`](crate::ProblemType::BodyTooLarge)).
    #[must_use]
    pub fn max_body_bytes(mut self, limit: usize) -> Self {
        self.config.max_body_bytes = limit;
        self
    }

    /// Adds a request header to the fingerprint (for example `content-type`
    /// or an API version header): the same key with a different value of it
    /// is then a different request (422).
    #[must_use]
    pub fn fingerprint_header(mut self, name: HeaderName) -> Self {
        self.config.fingerprint_headers.push(name);
        self
    }

    /// Adds a response header that is neither stored nor replayed.
    #[must_use]
    pub fn deny_replay_header(mut self, name: HeaderName) -> Self {
        Arc::make_mut(&mut self.config.filter).deny(name);
        self
    }

    /// Replaces the list of response headers that are neither stored nor
    /// replayed (default: `set-cookie`, `date`). Hop-by-hop headers,
    /// `content-length` and `idempotent-replayed` are never stored, whatever
    /// this list says.
    #[must_use]
    pub fn replay_deny_headers(mut self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        self.config.filter = Arc::new(HeaderFilter::new(names.into_iter().collect()));
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
    /// then the key is released and a retry runs the handler afresh. A response carrying `NoEffect` is
    /// never stored, whatever the predicate says.
    #[must_use]
    pub fn store_response_if<F>(mut self, predicate: F) -> Self
    where
        F: Fn(&response::Parts) -> bool + Send + Sync + 'static,
    {
        self.config.store_if = Box::new(predicate);
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
        self.config.fail_open = fail_open;
        self
    }

    /// The `Retry-After` sent with 503 when the store is unreachable or the
    /// layer is shutting down (at most [`MAX_RETRY_AFTER`]).
    #[must_use]
    pub fn store_retry_after(mut self, retry_after: Duration) -> Self {
        self.config.store_retry_after = retry_after.min(MAX_RETRY_AFTER);
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
        self.config.release_on_cancel = release;
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
        self.config.max_retry_after = max.min(MAX_RETRY_AFTER);
        self
    }

    /// The layer.
    pub fn build(self) -> IdempotencyLayer<S, C> {
        IdempotencyLayer {
            config: Arc::new(self.config),
        }
    }
}

impl<T, S, C> Layer<T> for IdempotencyLayer<S, C> {
    type Service = Idempotency<T, S, C>;

    fn layer(&self, inner: T) -> Self::Service {
        Idempotency::new(inner, self.config.clone())
    }
}
