//! [`Idempotency`], the middleware factory passed to `App::wrap`, and its
//! builder (the shared [`idem_http::Builder`]).

use std::fmt;
use std::future::{Ready, ready};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{Service, ServiceRequest, ServiceResponse, Transform};
use actix_web::{HttpRequest, HttpResponse};
use idem_core::store::Store;
use idem_core::{Clock, DefaultClock, Engine, Error, Outcome, Scope, Shutdown};
use idem_http::{Builder, Contract, Integration, Rejection};

use crate::convert;
use crate::scope::ScopeFunction;
use crate::service::IdempotencyMiddleware;

/// Derives a request's scope (whose key it is), or rejects the request.
pub(crate) type ScopeFn = dyn Fn(&HttpRequest) -> Result<Scope, Rejection> + Send + Sync;

/// Configures an [`Idempotency`] middleware; made by
/// [`Idempotency::builder`].
///
/// It is [`idem_http::Builder`], shared with every idem integration: see
/// there for the options and their defaults.
pub type IdempotencyBuilder<S, C = DefaultClock> = Builder<S, C, Actix>;

/// The actix-web middleware that makes `POST`/`PATCH` endpoints idempotent
/// by the `Idempotency-Key` request header: pass it to `App::wrap` (or
/// `Scope::wrap`, `Resource::wrap`). See the [crate docs](crate) for the
/// behaviour and [`IdempotencyBuilder`] for the options.
///
/// Cloning is cheap (two `Arc`s): build it once, outside
/// `HttpServer::new`, and clone it into each worker's `App`, so that every
/// worker shares one engine.
pub struct Idempotency<S, C = DefaultClock> {
    pub(crate) contract: Arc<Contract<S, C>>,
    pub(crate) scope: Arc<ScopeFn>,
}

impl<S, C> Clone for Idempotency<S, C> {
    fn clone(&self) -> Self {
        Self {
            contract: Arc::clone(&self.contract),
            scope: Arc::clone(&self.scope),
        }
    }
}

impl<S, C> fmt::Debug for Idempotency<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.contract.debug("Idempotency", f)
    }
}

impl<S: Store, C: Clock> Idempotency<S, C> {
    /// The middleware with the default options over `engine`, deriving each
    /// request's scope with `scope`.
    ///
    /// `scope` decides whose key a request carries: use the authenticated
    /// principal or tenant ([`scope_from_extension`](crate::scope_from_extension)),
    /// so that one client can never replay another's response.
    /// [`single_client_scope`](crate::single_client_scope) is for services
    /// with one client only.
    pub fn new(engine: impl Into<Arc<Engine<S, C>>>, scope: impl ScopeFunction) -> Self {
        Self::builder(engine, scope).build()
    }

    /// A builder, to change the defaults; see [`new`](Self::new) for `scope`.
    pub fn builder(
        engine: impl Into<Arc<Engine<S, C>>>,
        scope: impl ScopeFunction,
    ) -> IdempotencyBuilder<S, C> {
        Builder::new(engine.into(), Arc::new(scope) as Arc<ScopeFn>)
    }

    /// The engine.
    pub fn engine(&self) -> &Arc<Engine<S, C>> {
        self.contract.engine()
    }

    /// The shared contract (options and engine).
    pub fn contract(&self) -> &Arc<Contract<S, C>> {
        &self.contract
    }

    /// A graceful shutdown: stops taking new keyed requests (503
    /// [`shutting-down`](crate::ProblemType::ShuttingDown) + `Retry-After`)
    /// and waits up to `grace` for the running handlers to finish and store
    /// their responses; see [`Engine::shutdown`].
    ///
    /// # Behavior
    /// Nothing that ran is released. Handlers still running after `grace`
    /// have their keys finished as `outcome-unknown` (never run again), since
    /// the process is about to stop them.
    ///
    /// Call it **before** stopping the server: the handlers of covered
    /// requests run in tasks of their own on the workers' runtimes (so that
    /// a client that goes away cannot stop them), and actix-web ends those
    /// runtimes when the server stops. So: on the stop signal, shut the
    /// middleware down, then stop the server (its own graceful stop then
    /// waits for the connections still open).
    ///
    /// ```no_run
    /// # use std::{sync::Arc, time::Duration};
    /// use actix_web::{App, HttpServer, web};
    /// use idem_actix::{Idempotency, single_client_scope};
    /// use idem_core::{Engine, MemoryStore};
    ///
    /// # async fn stop_signal() {}
    /// #[actix_web::main]
    /// async fn main() -> std::io::Result<()> {
    ///     let idem = Idempotency::new(Arc::new(Engine::new(MemoryStore::new())), single_client_scope);
    ///     let wrap = idem.clone();
    ///     let server = HttpServer::new(move || {
    ///         App::new()
    ///             .wrap(wrap.clone())
    ///             .route("/payments", web::post().to(|| async { "charged" }))
    ///     })
    ///     .disable_signals() // the stop signal is handled below
    ///     .bind(("127.0.0.1", 8080))?
    ///     .run();
    ///     let handle = server.handle();
    ///     actix_web::rt::spawn(async move {
    ///         stop_signal().await; // e.g. actix_web::rt::signal::ctrl_c()
    ///         let report = idem.shutdown(Duration::from_secs(30)).await;
    ///         assert_eq!(report.left_in_flight, 0);
    ///         handle.stop(true).await;
    ///     });
    ///     server.await
    /// }
    /// ```
    pub async fn shutdown(&self, grace: Duration) -> Shutdown {
        self.contract.engine().shutdown(grace).await
    }

    /// The outcome this middleware stores for `response`: its status,
    /// headers (minus the hop-by-hop and denied ones) and body, encoded
    /// exactly as the middleware encodes a handler's response, so that a
    /// retry replays it like any other.
    ///
    /// # Behavior
    /// As [`Contract::outcome_of`], from an actix-web response. For code
    /// that ends a key of this middleware's routes outside a request: a
    /// [`Completer`](idem_core::Completer) resuming an abandoned multi-step
    /// operation returns `Ending::Complete(idem.outcome_of(&response)?)`.
    /// [`Error::Codec`] if it cannot be encoded.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// use actix_web::HttpResponse;
    /// use actix_web::http::StatusCode;
    /// # use idem_core::{Engine, MemoryStore};
    /// # let idem = idem_actix::Idempotency::new(Arc::new(Engine::new(MemoryStore::new())), idem_actix::single_client_scope);
    /// let response = HttpResponse::with_body(StatusCode::CREATED, r#"{"id":"pay_1"}"#);
    /// let outcome = idem.outcome_of(&response)?;
    /// # let _ = outcome;
    /// # Ok::<(), idem_core::Error>(())
    /// ```
    pub fn outcome_of<B: AsRef<[u8]>>(&self, response: &HttpResponse<B>) -> Result<Outcome, Error> {
        let head = convert::response_head(response);
        let body = response.body().as_ref();
        self.contract.outcome_of(head.status, &head.headers, body)
    }
}

/// The actix-web integration of [`idem_http`]: what an
/// [`IdempotencyBuilder`] builds.
#[derive(Debug)]
pub struct Actix;

impl<S, C> Integration<S, C> for Actix {
    type Built = Idempotency<S, C>;
    type Scope = Arc<ScopeFn>;

    fn build(contract: Contract<S, C>, scope: Self::Scope) -> Self::Built {
        Idempotency {
            scope,
            contract: Arc::new(contract),
        }
    }
}

impl<T, B, S, C> Transform<T, ServiceRequest> for Idempotency<S, C>
where
    T: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: MessageBody + 'static,
    S: Store,
    C: Clock,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = actix_web::Error;
    type Transform = IdempotencyMiddleware<T, S, C>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, ()>>;

    fn new_transform(&self, service: T) -> Self::Future {
        ready(Ok(IdempotencyMiddleware::new(
            Rc::new(service),
            self.clone(),
        )))
    }
}
