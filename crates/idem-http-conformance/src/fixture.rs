//! What an adapter serves: one catch-all handler that asks the suite's
//! [`App`] what to do ([`App::handle`]) and does it, and the options and
//! scope every adapter applies the same way.
//!
//! An adapter's fixture is therefore small and framework-specific only: it
//! builds its middleware from [`Setup::configure`] and [`Setup::scope_of`],
//! routes every path to one handler, converts the request into a [`Call`],
//! awaits [`App::handle`], and turns the [`Handled`] into its framework's
//! response (inserting [`idem_http::NoEffect`] when asked, panicking when
//! asked).

use std::sync::Arc;

use bytes::Bytes;
pub use futures_util::future::BoxFuture;
use http::{HeaderMap, Method, StatusCode};
use idem_core::{Engine, Scope};
use idem_http::{Builder, IdempotencyClaim, Integration, Rejection};

/// The store every fixture runs on: a memory store behind
/// idem-conformance's fault switches (store outages).
pub type TestStore = idem_conformance::faulty::FaultyStore<idem_core::MemoryStore>;

/// The clock every fixture's engine runs on: a manual clock
/// ([`ManualClock`](idem_core::ManualClock); clones share it), started at
/// the system time when the case begins and moved only by the case.
///
/// # Behavior
/// Lease deadlines, heartbeats (a beat every third of the lease, sleeping
/// on this clock), a waiting duplicate's polls, the background retries of a
/// completion, and `first_used_at` all read it: a case makes time pass with
/// [`ManualClock::advance`](idem_core::ManualClock::advance), never by
/// sleeping. An adapter only passes it on (it is the `C` of
/// [`Setup::engine`] and of the builder [`Setup::configure`] takes).
pub type TestClock = idem_core::ManualClock;

/// A request as the handler received it.
#[derive(Debug)]
pub struct Call {
    /// The method.
    pub method: Method,
    /// The path as the handler sees it.
    pub path: String,
    /// The headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
    /// The claim the middleware put in the request, if any.
    pub claim: Option<IdempotencyClaim>,
}

/// What the handler must do.
#[derive(Debug)]
pub enum Handled {
    /// Answer with this response.
    Respond(Answer),
    /// Panic with [`PLANNED_PANIC`] (`panic!("{PLANNED_PANIC}")`): the
    /// suite's runner does not print it.
    Panic,
}

/// A response for the fixture to send.
#[derive(Debug)]
pub struct Answer {
    /// The status.
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
    /// Insert [`idem_http::NoEffect`] in the response's extensions.
    pub no_effect: bool,
}

/// What an adapter is given to serve.
///
/// # Behavior
/// Made by the suite for each case: a fresh engine over a fresh
/// [`TestStore`] (with the case's [`Policy`](idem_core::Policy)) on a fresh
/// [`TestClock`] (`engine.clock()`), a fresh [`App`], and the case's
/// [`Options`]. The adapter builds its middleware
/// over `engine` with [`configure`](Self::configure) and
/// [`scope_of`](Self::scope_of), and nothing else.
#[derive(Clone, Debug)]
pub struct Setup {
    /// The engine, over [`TestStore`], on the case's [`TestClock`].
    pub engine: Arc<Engine<TestStore, TestClock>>,
    /// The application behind the middleware.
    pub app: App,
    /// The options of this case.
    pub options: Options,
}

impl Setup {
    /// Applies this case's options to an adapter's builder (every adapter
    /// builder is an [`idem_http::Builder`]).
    pub fn configure<I>(
        &self,
        builder: Builder<TestStore, TestClock, I>,
    ) -> Builder<TestStore, TestClock, I>
    where
        I: Integration<TestStore, TestClock>,
    {
        self.options.apply(builder)
    }

    /// The scope of a request from its headers: the `x-tenant` header, or
    /// a 401 rejection without one.
    pub fn scope_of(&self, headers: &HeaderMap) -> Result<Scope, Rejection> {
        crate::app::scope_of(headers)
    }
}

pub use crate::app::App;
pub use crate::options::Options;

/// The message of the handler's planned panic ([`Handled::Panic`]).
pub const PLANNED_PANIC: &str = "idem-http-conformance: planned panic";

/// A running server.
pub struct Server {
    /// Its loopback address, e.g. `http://127.0.0.1:40123`.
    pub base: String,
    /// Dropped (or [`stop`](Self::stop)ped) to stop the server.
    pub guard: Box<dyn std::any::Any + Send>,
}

impl Server {
    /// A server at `base` (`http://127.0.0.1:port`, no trailing slash),
    /// stopped when `guard` is dropped.
    pub fn new(base: impl Into<String>, guard: impl std::any::Any + Send) -> Self {
        Self {
            base: base.into(),
            guard: Box::new(guard),
        }
    }

    /// Stops the server (drops its guard).
    pub fn stop(self) {
        drop(self.guard);
    }
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// An adapter under test.
pub trait Adapter: Send + Sync + 'static {
    /// Its name, in test names (`tower`, `actix`).
    fn name(&self) -> &'static str;

    /// Starts a loopback HTTP/1.1 server on `127.0.0.1:0` whose every path
    /// (all methods) goes through the adapter's middleware, built from
    /// `setup` (its options and scope), to one handler that calls
    /// [`App::handle`] and answers with what it says.
    ///
    /// # Behavior
    /// - The middleware is built over `setup.engine` with
    ///   [`Setup::configure`] and a scope function that calls
    ///   [`Setup::scope_of`] with the request's headers; nothing else.
    /// - The handler's [`Call`] has the method, the path without the query,
    ///   every header field (repeated fields kept), the whole body, and the
    ///   [`IdempotencyClaim`] the middleware put in the request, if any.
    /// - [`Handled::Respond`]: the status, every header field of the
    ///   [`Answer`] (repeated fields kept, in order; the `date` kept) and
    ///   the body, with [`idem_http::NoEffect`] in the response's extensions
    ///   when `no_effect`. [`Handled::Panic`]: panic in the handler.
    /// - Claimed handlers run under [`idem_http::Claimed::run`] (or another
    ///   heartbeat over `setup.engine`): time is the engine's
    ///   [`TestClock`], which the lease cases move while a handler runs;
    ///   an adapter uses no timer of its own for the heartbeat.
    /// - The server runs until [`Server::guard`] is dropped; the suite drops
    ///   it when the case ends, on the case's runtime.
    /// - The returned future may run on any Tokio runtime of the suite; an
    ///   adapter whose framework needs a runtime of its own (actix) starts
    ///   it on a thread of its own.
    fn serve(&self, setup: Setup) -> BoxFuture<'static, Server>;
}
