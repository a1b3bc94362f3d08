//! The layer and its builder.
//!
//! [`IdempotencyLayerBuilder`] (the shared [`idem_http::Builder`]) sets the
//! options of a [`Contract`]; [`IdempotencyLayer`] holds it and the scope
//! function behind one `Arc` and hands it to each [`Idempotency`] service
//! it makes.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;
use http::{HeaderMap, StatusCode};
use idem_core::store::Store;
use idem_core::{Clock, DefaultClock, Engine, Error, Outcome, Scope, Shutdown};
use idem_http::{Builder, Contract, Integration, Rejection};
use tower::Layer;

use crate::service::Idempotency;

/// Derives a request's scope (whose key it is), or rejects the request.
pub(crate) type ScopeFn = dyn Fn(&Parts) -> Result<Scope, Rejection> + Send + Sync;

/// What the layer and its services share: the contract and the scope
/// function.
pub(crate) struct Shared<S, C> {
    pub(crate) contract: Arc<Contract<S, C>>,
    pub(crate) scope: Arc<ScopeFn>,
}

/// A [`tower::Layer`] that makes `POST`/`PATCH` endpoints idempotent by the
/// `Idempotency-Key` request header; see the [crate docs](crate) for the
/// behaviour and [`IdempotencyLayerBuilder`] for the options.
///
/// Cloning is cheap (one `Arc`).
pub struct IdempotencyLayer<S, C = DefaultClock> {
    pub(crate) shared: Arc<Shared<S, C>>,
}

impl<S, C> Clone for IdempotencyLayer<S, C> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<S, C> fmt::Debug for IdempotencyLayer<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.shared.contract.debug("IdempotencyLayer", f)
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
        let scope: Arc<ScopeFn> = Arc::new(scope);
        Builder::new(engine.into(), scope)
    }

    /// The engine.
    pub fn engine(&self) -> &Arc<Engine<S, C>> {
        self.shared.contract.engine()
    }

    /// The shared contract (options and engine).
    pub fn contract(&self) -> &Arc<Contract<S, C>> {
        &self.shared.contract
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
        self.shared.contract.engine().shutdown(grace).await
    }

    /// The outcome this layer stores for a response: `status`, `headers`
    /// (minus the hop-by-hop and denied ones) and `body`, encoded exactly as
    /// the layer encodes a handler's response, so that a retry replays it
    /// like any other.
    ///
    /// # Behavior
    /// As [`Contract::outcome_of`] (for a [`Completer`](idem_core::Completer)
    /// ending a key of this layer's routes outside a request).
    pub fn outcome_of(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<Outcome, Error> {
        self.shared.contract.outcome_of(status, headers, body)
    }
}

/// Configures an [`IdempotencyLayer`]; made by [`IdempotencyLayer::builder`].
///
/// It is [`idem_http::Builder`], shared with every idem integration: see
/// there for the options and their defaults.
pub type IdempotencyLayerBuilder<S, C = DefaultClock> = Builder<S, C, Tower>;

/// The tower integration of [`idem_http`]: what an [`IdempotencyLayerBuilder`]
/// builds.
#[derive(Debug)]
pub struct Tower;

impl<S, C> Integration<S, C> for Tower {
    type Scope = Arc<ScopeFn>;
    type Built = IdempotencyLayer<S, C>;

    fn build(contract: Contract<S, C>, scope: Arc<ScopeFn>) -> IdempotencyLayer<S, C> {
        IdempotencyLayer {
            shared: Arc::new(Shared {
                contract: Arc::new(contract),
                scope,
            }),
        }
    }
}

impl<T, S, C> Layer<T> for IdempotencyLayer<S, C> {
    type Service = Idempotency<T, S, C>;

    fn layer(&self, inner: T) -> Self::Service {
        Idempotency::new(inner, self.shared.clone())
    }
}
