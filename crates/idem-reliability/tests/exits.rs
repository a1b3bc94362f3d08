//! The exit matrix (issue 16, "test the class, not the cases"): every way a
//! guarded request can end, on every backend, each asserting exactly how
//! many times the handler's external effect ran and what a retry gets.
//!
//! The handler is a real axum handler (`POST /charge`) under the
//! `idem-tower` layer, driven with `tower::ServiceExt::oneshot` so that a
//! panic, an inner error or a dropped request future can be produced and
//! observed exactly. It counts its **external effect** (a counter outside
//! the store, as a payment call would be) and reports the effect number in
//! `x-effect`. The `x-mode` request header (not part of the fingerprint, so
//! a retry may change it) picks how the request ends. Between the layer and
//! the router sits a middleware that can fail after the handler ran
//! (`x-inner-error`), the only way to get an inner service error under an
//! axum router.
//!
//! Every store is the backend's isolated fixture wrapped in an
//! [`idem_conformance::FaultyStore`] (transparent until a fault is
//! injected); time is a `ManualClock` (lease 30 s), moved by the test in
//! small steps while it polls the condition it waits for: nothing sleeps
//! for a condition, and no lease lapses unless a row says so.
//!
//! | case (`exits::…::<backend>`) | how the request ends | effects | what the retry gets |
//! |---|---|---|---|
//! | `ok_2xx` | 201 | 1 | the stored 201, replayed |
//! | `client_error_4xx` | 400 | 1 | the stored 400, replayed |
//! | `server_error_5xx` | 500 (ambiguous) | 1 | 500 `outcome-unknown` |
//! | `server_error_5xx_no_effect` | 503 + `NoEffect` / 500 after `declare_no_effect` | 1 | released: runs afresh (the effect happens then), then replays |
//! | `inner_error` | the inner service's error | 1 | 500 `outcome-unknown` |
//! | `panic` | the handler panics after its effect | 1 | 500 `outcome-unknown` |
//! | `dropped_future` | the request future is dropped mid-handler | 1 | 409 while it runs, then the stored 201 |
//! | `body_error_mid_stream` | the body fails after a chunk | 1 | 500 `outcome-unknown` |
//! | `too_large_for_engine` | 201 over `max_outcome_bytes` | 1 | 500 `response-not-stored`, replayed |
//! | `too_large_for_store` | 201 over the store's declared `max_record_bytes` | 1 | 500 `response-not-stored`, replayed |
//! | `completion_fails_transient_once` | the completion write fails once (`Unavailable`, not applied) | 1 | the stored 201 |
//! | `completion_fails_transient_after_apply` | the completion is written, its reply lost | 1 | the stored 201 |
//! | `completion_fails_permanent` | the completion fails `Generic` / `Rejected` before it is written (and, once, `Generic` after: the reply lost) | 1 | 500 `outcome-unknown` (after apply: the stored 201) |
//! | `completion_fails_past_lease` | the completion fails for longer than lease + lease | **2** (the named window) | 409 until the lease lapses, then a run of its own, stored and replayed |
//! | `heartbeat_fails_once_transient` | one heartbeat fails `Unavailable` | 1 | 409 past the original lease deadline, then the stored 201 |
//! | `heartbeat_fails_once_permanent` | one heartbeat fails `Generic` | 1 | the same |
//! | `heartbeat_fails_past_lease` | every heartbeat fails past the lease | **2** (the named window) | takes over and runs; the original gets 409 (superseded), its `Lease::lost` fired |
//! | `max_hold_exceeded` | the handler hangs past `Policy::max_hold` after its effect | 1 | 500 `outcome-unknown` (the hung handler's own client gets its 201 when it returns) |
//! | `shutdown_within_grace` | a graceful shutdown while the handler runs; it finishes in time | 1 (0 for a request during the shutdown: 503 `shutting-down`) | the stored 201 (another instance) |
//! | `shutdown_past_grace` | the handler outlives the grace period | 1 | 500 `outcome-unknown` (another instance; the handler's own client gets its 201) |
//!
//! Every row runs twice on every backend: as `exits::<row>::<backend>`, and
//! as `exits_cached::<row>::<backend>` with the engines' cache of finished
//! records on (`Engine::with_finished_cache`): the same effects and answers
//! must hold whether a retry is answered from the store or from the cache.
//!
//! Unreachable servers: IGNORED (FAILED under `CI=true` /
//! `IDEM_REQUIRE_BACKENDS=1`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use futures_util::FutureExt as _;
use idem_conformance::{Fault, FaultKind, FaultyStore, Op};
use idem_core::store::codec::RECORD_OVERHEAD;
use idem_core::store::{BoxError, State as KeyState, Store, Versioned};
use idem_core::{CacheStats, Clock, Engine, ManualClock, Policy, Shutdown, SystemClock};
use idem_reliability::engine::engine;
use idem_reliability::http::{Reply, Service, bearer_scope, record_key};
use idem_reliability::wait;
use idem_testkit::runner::Suite;
use idem_testkit::{BackendKind, Isolated};
use idem_tower::{IdempotencyClaim, IdempotencyLayer, NoEffect, ProblemType, ResponseBody};
use tower::ServiceExt as _;
use tower::util::BoxCloneSyncService;

/// The lease (on the `ManualClock`: it lapses only when a test moves time).
const LEASE: Duration = Duration::from_secs(30);
/// The grace period of the shutdown rows.
const GRACE: Duration = Duration::from_secs(10);
/// How long a condition may take in real time before the test fails.
const WITHIN: Duration = Duration::from_secs(20);
/// The engine's outcome limit of the `too_large_*` rows.
const SMALL_LIMIT: usize = 4096;
/// The response body of `x-mode: large`.
const LARGE: usize = 20_000;
const TENANT: &str = "acme";
const BODY: &str = r#"{"amount":1000,"currency":"EUR"}"#;
/// Marks the panics this test causes on purpose (kept off stderr).
const PANIC_MARKER: &str = "exits: deliberate panic";

type Faulty = FaultyStore<Arc<dyn Store>>;
type Eng = Engine<Faulty, ManualClock>;
type Svc = BoxCloneSyncService<Request<Body>, Response<ResponseBody<Body>>, BoxError>;

// ---------------------------------------------------------------------------
// The handler and its external effect.
// ---------------------------------------------------------------------------

/// What the handler shares with the test: the count of its external
/// effect and the gate (an [`idem_reliability::http::Service`]), and the
/// claims of the gated handlers, in order. Clones share them.
#[derive(Clone, Default)]
struct App {
    effects: Service,
    claims: Arc<Mutex<Vec<IdempotencyClaim>>>,
}

impl App {
    fn effects(&self) -> u64 {
        self.effects.executions()
    }

    /// Waits until `n` gated handlers are inside (after their effect).
    async fn wait_entered(&self, n: u64) {
        self.effects.wait_stalled(n).await;
    }

    fn open_gate(&self) {
        self.effects.open_gate();
    }

    /// The claim of the `i`-th gated handler.
    fn claim(&self, i: usize) -> IdempotencyClaim {
        self.claims.lock().unwrap()[i].clone()
    }
}

/// `POST /charge`. `x-mode`: `ok` (default: effect, 201), `status:NNN`
/// (effect, that status), `no-effect-503` (no effect, 503 + `NoEffect`),
/// `declare-no-effect-500` (no effect, `declare_no_effect`, 500), `panic`
/// (effect, panic), `body-error` (effect, a body that fails after one
/// chunk), `large` (effect, a 201 of [`LARGE`] bytes), `gate` (effect, then
/// waits for [`App::open_gate`], then 201).
async fn charge(
    State(app): State<App>,
    claim: Option<axum::Extension<IdempotencyClaim>>,
    headers: HeaderMap,
) -> Response<Body> {
    let mode = headers
        .get("x-mode")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("ok")
        .to_owned();
    let claim = claim.map(|axum::Extension(c)| c);
    match mode.as_str() {
        "no-effect-503" => {
            let mut response = (
                StatusCode::SERVICE_UNAVAILABLE,
                "processor down, nothing charged",
            )
                .into_response();
            response.extensions_mut().insert(NoEffect);
            return response;
        }
        "declare-no-effect-500" => {
            claim.expect("a claim").declare_no_effect();
            return (StatusCode::INTERNAL_SERVER_ERROR, "nothing charged").into_response();
        }
        _ => {}
    }
    // The external effect.
    let n = app.effects.execute();
    if mode == "panic" {
        panic!("{PANIC_MARKER}: the handler panicked after its effect");
    }
    if mode == "gate" {
        let claim = claim.clone().expect("a claim");
        app.claims.lock().unwrap().push(claim);
        app.effects.stall().await;
    }
    let status = mode
        .strip_prefix("status:")
        .and_then(|s| s.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::CREATED);
    let mut out = HeaderMap::new();
    out.insert("x-effect", HeaderValue::from(n));
    let body = match mode.as_str() {
        "body-error" => Body::from_stream(futures_util::stream::iter([
            Ok(Bytes::from_static(b"partial")),
            Err(std::io::Error::other("the response body broke mid-stream")),
        ])),
        "large" => Body::from("x".repeat(LARGE)),
        _ => Body::from(format!(r#"{{"effect":{n}}}"#)),
    };
    (status, out, body).into_response()
}

/// The router with the handler, under a middleware that fails after the
/// handler ran when the request carries `x-inner-error`.
fn inner(app: &App) -> BoxCloneSyncService<Request<Body>, Response<Body>, BoxError> {
    let router = Router::new()
        .route("/charge", post(charge))
        .with_state(app.clone());
    BoxCloneSyncService::new(tower::service_fn(move |req: Request<Body>| {
        let router = router.clone();
        async move {
            let fail = req.headers().contains_key("x-inner-error");
            let response = router
                .oneshot(req)
                .await
                .unwrap_or_else(|e: Infallible| match e {});
            if fail {
                return Err::<Response<Body>, BoxError>(
                    "the middleware under the layer failed after the handler ran".into(),
                );
            }
            Ok(response)
        }
    }))
}

fn request(key: &str, mode: &str) -> Request<Body> {
    Request::post("/charge")
        .header("authorization", format!("Bearer {TENANT}"))
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .header("x-mode", mode)
        .body(Body::from(BODY))
        .unwrap()
}

// ---------------------------------------------------------------------------
// Answers.
// ---------------------------------------------------------------------------

/// What the matrix asserts of an answer.
trait Answer {
    /// The effect number of the handler run that produced it (`x-effect`).
    fn effect(&self) -> Option<u64>;
    /// A fresh answer of the handler's run number `effect`.
    fn assert_fresh(&self, status: u16, effect: u64);
    /// A replay of `first`, byte for byte.
    fn assert_replay_of(&self, first: &Self);
}

impl Answer for Reply {
    fn effect(&self) -> Option<u64> {
        self.header("x-effect")?.parse().ok()
    }

    #[track_caller]
    fn assert_fresh(&self, status: u16, effect: u64) {
        assert_eq!(self.status, status, "{self}");
        assert!(!self.replayed(), "a fresh answer is not a replay: {self}");
        assert_eq!(self.effect(), Some(effect), "{self}");
        assert!(!self.body_error, "{self}");
    }

    #[track_caller]
    fn assert_replay_of(&self, first: &Self) {
        assert!(self.replayed(), "expected a replay, got {self}");
        assert_eq!(self.status, first.status, "{self}");
        assert_eq!(self.effect(), first.effect(), "{self}");
        assert_eq!(self.body, first.body, "the replay's body: {self}");
    }
}

// ---------------------------------------------------------------------------
// The rig: a backend's store, wrapped; an engine on a manual clock; the layer.
// ---------------------------------------------------------------------------

struct Rig {
    fixture: Isolated,
    clock: ManualClock,
    policy: Policy,
    engine: Arc<Engine<Faulty, ManualClock>>,
    layer: IdempotencyLayer<Faulty, ManualClock>,
    svc: Svc,
    app: App,
}

fn policy() -> Policy {
    Policy::default()
        .with_lease(LEASE)
        .with_ttl(Duration::from_secs(3600))
}

fn service(
    engine: Arc<Engine<Faulty, ManualClock>>,
    app: &App,
) -> (IdempotencyLayer<Faulty, ManualClock>, Svc) {
    let layer = IdempotencyLayer::builder(engine, bearer_scope)
        .required(true)
        .build();
    let svc = BoxCloneSyncService::new(tower::Layer::layer(&layer, inner(app)));
    (layer, svc)
}

impl Rig {
    async fn open(backend: BackendKind) -> Self {
        Self::with(backend, |s| s, |p| p).await
    }

    async fn with(
        backend: BackendKind,
        store: impl FnOnce(Faulty) -> Faulty,
        policy_of: impl FnOnce(Policy) -> Policy,
    ) -> Self {
        let fixture = Isolated::fresh(backend).await;
        let clock = ManualClock::new(SystemClock.now());
        let policy = policy_of(policy());
        let store = store(FaultyStore::new(fixture.store()));
        let engine = engine(store, clock.clone(), policy.clone());
        let engine = Arc::new(cache_if_cached(engine));
        let app = App::default();
        let (layer, svc) = service(engine.clone(), &app);
        Self {
            fixture,
            clock,
            policy,
            engine,
            layer,
            svc,
            app,
        }
    }

    /// The fault-injecting store under the engine.
    fn faults(&self) -> &Faulty {
        self.engine.store()
    }

    /// Sends a request and reads its answer.
    async fn send(&self, key: &str, mode: &str) -> Reply {
        self.send_req(request(key, mode)).await
    }

    async fn send_req(&self, req: Request<Body>) -> Reply {
        let response = self.svc.clone().oneshot(req).await.expect("no inner error");
        Reply::of_response(response).await
    }

    /// Sends a request in a task of its own (to stall, drop or race it).
    fn spawn(&self, key: &str, mode: &str) -> tokio::task::JoinHandle<Reply> {
        let call = self.svc.clone().oneshot(request(key, mode));
        tokio::spawn(async move { Reply::of_response(call.await.expect("no inner error")).await })
    }

    /// What the store holds for `key`, read directly (not through the faults).
    async fn record(&self, key: &str) -> Option<Versioned> {
        self.fixture
            .store()
            .get(&record_key(TENANT, key), self.clock.now())
            .await
            .expect("read the record directly")
    }

    async fn state(&self, key: &str) -> Option<&'static str> {
        self.record(key).await.map(|v| v.record.state.name())
    }

    /// A second application instance over the same records (its own store
    /// connections, engine and layer; the same clock and handler).
    async fn second(&self) -> Svc {
        let store = self.fixture.reopen().await.expect("a second instance");
        let store = FaultyStore::new(store.erased());
        let engine = engine(store, self.clock.clone(), self.policy.clone());
        service(Arc::new(cache_if_cached(engine)), &self.app).1
    }

    /// Moves the clock forward `step` at a time, each time one of the
    /// engine's tasks waits on it, by at most `max` in all, until `cond`
    /// holds; once the clock has moved `max` (or nothing waits on it), waits
    /// for `cond` in real time (polling, with a deadline of `WITHIN`) while
    /// store calls in flight finish.
    async fn drive<F, Fut>(&self, what: &str, step: Duration, max: Duration, mut cond: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let mut moved = Duration::ZERO;
        let mut still_since = Instant::now();
        loop {
            if cond().await {
                return;
            }
            if moved < max && self.clock.pending_sleepers() > 0 {
                self.clock.advance(step);
                moved += step;
                still_since = Instant::now();
            } else {
                assert!(
                    still_since.elapsed() < WITHIN,
                    "{what}: not the case after moving the clock by {moved:?} and waiting {WITHIN:?}"
                );
            }
            tokio::task::yield_now().await;
        }
    }

    /// Sends `mode: gate` with key `k` in a task of its own and waits until
    /// its handler is inside (after its effect).
    async fn spawn_gated(&self) -> tokio::task::JoinHandle<Reply> {
        let running = self.spawn("k", "gate");
        self.app.wait_entered(1).await;
        running
    }

    /// `key` ended `failed_unknown`: a retry gets `outcome-unknown` and runs
    /// nothing (`effects` in all).
    async fn assert_unknown(&self, key: &str, effects: u64) {
        assert_eq!(self.state(key).await, Some("failed_unknown"), "{key}");
        self.send(key, "ok")
            .await
            .assert_problem(ProblemType::OutcomeUnknown);
        assert_eq!(
            self.app.effects(),
            effects,
            "{key}: the retry ran the handler"
        );
    }

    /// Starts a graceful shutdown of the layer (grace [`GRACE`]) and waits
    /// until the engine has begun it.
    async fn shutdown(&self) -> tokio::task::JoinHandle<Shutdown> {
        let layer = self.layer.clone();
        let shutdown = tokio::spawn(async move { layer.shutdown(GRACE).await });
        wait::until_true("the shutdown to begin", WITHIN, || async {
            self.engine.is_shutting_down()
        })
        .await;
        shutdown
    }

    /// Waits in real time (the clock standing still) until `key` is in `state`.
    async fn wait_state(&self, key: &str, state: &'static str) {
        wait::until_true(&format!("key {key} to be {state}"), WITHIN, || async {
            self.state(key).await == Some(state)
        })
        .await;
    }
}

impl Drop for Rig {
    /// In a cached run, reports what the rig's engine cache did.
    fn drop(&mut self) {
        let stats = self.engine.finished_cache();
        let _ = CACHED.try_with(|seen| seen.lock().unwrap().push(stats));
    }
}

// ---------------------------------------------------------------------------
// The cached runs.
// ---------------------------------------------------------------------------

/// The cache of finished records each engine of a cached run keeps.
const CACHE_BYTES: usize = 64 << 20;

tokio::task_local! {
    /// Set while a row runs as `exits_cached::…`: its engines keep finished
    /// records, and each rig reports its engine's cache here when dropped.
    static CACHED: Arc<Mutex<Vec<Option<CacheStats>>>>;
}

/// `engine` with the cache of finished records on, in a cached run.
fn cache_if_cached(engine: Eng) -> Eng {
    if CACHED.try_with(|_| ()).is_ok() {
        engine.with_finished_cache(CACHE_BYTES)
    } else {
        engine
    }
}

/// Runs `row` as a cached run; fails if its rig's engine never consulted
/// the cache (the run would test nothing).
async fn cached(row: impl Future<Output = ()>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    CACHED.scope(seen.clone(), row).await;
    let seen = seen.lock().unwrap();
    assert!(!seen.is_empty(), "the row built no rig");
    assert!(
        seen.iter().all(Option::is_some),
        "a rig of the cached run has no cache: {seen:?}"
    );
    assert!(
        seen.iter().flatten().any(|s| s.hits + s.misses > 0),
        "no request of the cached run consulted the cache: {seen:?}"
    );
}

/// Registers each row twice on every backend: `<name>` and, with the
/// cache of finished records on, `<module>_cached::<row>`.
macro_rules! rows {
    ($suite:expr, { $($name:literal => $test:expr),* $(,)? }) => {{
        let suite = $suite $(.each(&BackendKind::ALL, $name, $test))*;
        suite $(.each(
            &BackendKind::ALL,
            &$name.replacen("::", "_cached::", 1),
            move |b| cached(($test)(b)),
        ))*
    }};
}

async fn replay_on(svc: &Svc, key: &str) -> Reply {
    Reply::of_response(svc.clone().oneshot(request(key, "ok")).await.unwrap()).await
}

// ---------------------------------------------------------------------------
// The rows.
// ---------------------------------------------------------------------------

/// 2xx and 4xx (`mode` answers `status`): stored like a success (the
/// request was processed); the retry replays it; one effect.
async fn stored_and_replayed(backend: BackendKind, mode: &str, status: u16) {
    let rig = Rig::open(backend).await;
    let first = rig.send("k", mode).await;
    first.assert_fresh(status, 1);
    assert_eq!(rig.state("k").await, Some("completed"));
    let retry = rig.send("k", "ok").await;
    retry.assert_replay_of(&first);
    assert_eq!(rig.app.effects(), 1);
}

/// 5xx without a declaration: ambiguous, so the key ends `failed_unknown`;
/// the client gets its 500, the retry `outcome-unknown`; one effect.
async fn server_error_5xx(backend: BackendKind) {
    let rig = Rig::open(backend).await;
    let first = rig.send("k", "status:500").await;
    first.assert_fresh(500, 1);
    rig.assert_unknown("k", 1).await;
}

/// 5xx that declared "no effect" (a `NoEffect` response extension, or the
/// claim's `declare_no_effect`): released; the retry runs afresh (the
/// effect happens then, once), and its answer is replayed.
async fn server_error_5xx_no_effect(backend: BackendKind) {
    let rig = Rig::open(backend).await;
    for (key, mode, status) in [
        ("ext", "no-effect-503", 503),
        ("claim", "declare-no-effect-500", 500),
    ] {
        let before = rig.app.effects();
        let first = rig.send(key, mode).await;
        assert_eq!(first.status, status, "{key}: {first}");
        assert!(!first.replayed(), "{key}: {first}");
        assert_eq!(rig.state(key).await, None, "{key}: released");
        assert_eq!(rig.app.effects(), before, "{key}: no effect yet");
        let fresh = rig.send(key, "ok").await;
        fresh.assert_fresh(201, before + 1);
        let replay = rig.send(key, "ok").await;
        replay.assert_replay_of(&fresh);
        assert_eq!(rig.app.effects(), before + 1, "{key}: exactly one effect");
    }
}

/// The inner service fails after the handler ran: the error is returned,
/// the key ends `failed_unknown`, the retry gets `outcome-unknown`.
async fn inner_error(backend: BackendKind) {
    let rig = Rig::open(backend).await;
    let mut req = request("k", "ok");
    req.headers_mut()
        .insert("x-inner-error", HeaderValue::from_static("1"));
    let err = rig.svc.clone().oneshot(req).await.unwrap_err();
    assert!(err.to_string().contains("middleware"), "{err}");
    rig.assert_unknown("k", 1).await;
}

/// The handler panics after its effect: the panic goes on, the key ends
/// `failed_unknown`, the retry gets `outcome-unknown`.
async fn panic_row(backend: BackendKind) {
    let rig = Rig::open(backend).await;
    let outcome = AssertUnwindSafe(rig.svc.clone().oneshot(request("k", "panic")))
        .catch_unwind()
        .await;
    let payload = outcome.expect_err("the panic must go on to the caller");
    let message = payload
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default();
    assert!(message.contains(PANIC_MARKER), "{message:?}");
    rig.assert_unknown("k", 1).await;
}

/// The request's future is dropped after the handler's effect: the handler
/// runs to completion, its response is stored; a retry meanwhile gets 409,
/// afterwards the stored 201.
async fn dropped_future(backend: BackendKind) {
    let rig = Rig::open(backend).await;
    let task = rig.spawn_gated().await;
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    assert_eq!(rig.state("k").await, Some("in_flight"));
    rig.send("k", "ok")
        .await
        .assert_problem(ProblemType::RequestInProgress);
    rig.app.open_gate();
    rig.wait_state("k", "completed").await;
    let retry = rig.send("k", "ok").await;
    assert!(retry.replayed(), "{retry}");
    assert_eq!((retry.status, retry.effect()), (201, Some(1)), "{retry}");
    assert_eq!(rig.app.effects(), 1, "the effect ran twice");
}

/// The response body fails after a chunk: the client sees the chunk and the
/// error; the key ends `failed_unknown`; the retry gets `outcome-unknown`.
async fn body_error_mid_stream(backend: BackendKind) {
    let rig = Rig::open(backend).await;
    let first = rig.send("k", "body-error").await;
    assert_eq!(first.status, 201, "{first}");
    assert_eq!(first.body, b"partial", "{first}");
    assert!(
        first.body_error,
        "the body's error must reach the client: {first}"
    );
    rig.assert_unknown("k", 1).await;
}

/// Shared by the two `too_large_*` rows: the first client gets the whole
/// response; the key is completed with the `response-not-stored` marker,
/// which the retry gets (replayed); one effect.
async fn too_large(rig: &Rig) {
    assert_eq!(rig.engine.outcome_limit(), SMALL_LIMIT);
    let first = rig.send("k", "large").await;
    first.assert_fresh(201, 1);
    assert_eq!(first.body.len(), LARGE, "the first client gets it all");
    assert_eq!(rig.state("k").await, Some("completed"));
    let retry = rig.send("k", "ok").await;
    retry.assert_problem(ProblemType::ResponseNotStored);
    assert!(retry.replayed(), "{retry}");
    assert_eq!(rig.app.effects(), 1);
}

async fn too_large_for_engine(backend: BackendKind) {
    let rig = Rig::with(backend, |s| s, |p| p.with_max_outcome_bytes(SMALL_LIMIT)).await;
    too_large(&rig).await;
}

/// The store declares a record limit below the engine's: the engine honours
/// it (it never even tries to write a record the store would refuse).
async fn too_large_for_store(backend: BackendKind) {
    let rig = Rig::with(
        backend,
        |s| s.with_max_record_bytes(Some(RECORD_OVERHEAD + SMALL_LIMIT)),
        |p| p,
    )
    .await;
    assert!(rig.engine.policy().max_outcome_bytes > SMALL_LIMIT);
    too_large(&rig).await;
    for op in [Op::InsertIfAbsent, Op::CompareAndSwap] {
        assert_eq!(
            rig.faults().oversized(op),
            0,
            "{op}: an oversized write was tried"
        );
    }
}

/// The completion's first write fails transiently, before it reaches the
/// store (`once`) or after it was written with its reply lost
/// (`after_apply`): the client still gets its 201, the completion is
/// retried (and finds the holder's own record when it was written), the
/// retry replays it.
async fn completion_fails_transient(backend: BackendKind, after_apply: bool) {
    let rig = Rig::open(backend).await;
    let fault = Fault::new(Op::CompareAndSwap, FaultKind::Unavailable)
        .writing_finished()
        .next(1);
    let fault = rig.faults().inject(if after_apply {
        fault.after_apply()
    } else {
        fault
    });
    let first = rig.send("k", "ok").await;
    first.assert_fresh(201, 1);
    assert_eq!(rig.faults().hits(fault), 1);
    rig.drive(
        "the completion to be retried",
        LEASE / 50,
        LEASE / 2,
        || async { rig.state("k").await == Some("completed") },
    )
    .await;
    rig.send("k", "ok").await.assert_replay_of(&first);
    assert_eq!(rig.app.effects(), 1);
}

/// The completion fails permanently (`Generic`, `Rejected`): the response
/// cannot be stored, so the key ends `failed_unknown` (never run again).
async fn completion_fails_permanent(backend: BackendKind) {
    let rig = Rig::open(backend).await;
    for (n, (key, kind)) in [
        ("generic", FaultKind::Generic),
        ("rejected", FaultKind::Rejected),
    ]
    .into_iter()
    .enumerate()
    {
        let n = n as u64 + 1;
        let fault = rig.faults().inject(
            Fault::new(Op::CompareAndSwap, kind)
                .writing_finished()
                .next(1),
        );
        let first = rig.send(key, "ok").await;
        first.assert_fresh(201, n);
        assert_eq!(rig.faults().hits(fault), 1, "{key}");
        rig.assert_unknown(key, n).await;
    }
    // The same permanent error after the completion was written (its reply
    // lost): the switch to "unknown" finds the holder's own completion, which
    // stays and is replayed.
    let fault = rig.faults().inject(
        Fault::new(Op::CompareAndSwap, FaultKind::Generic)
            .writing_finished()
            .after_apply()
            .next(1),
    );
    let first = rig.send("after-apply", "ok").await;
    first.assert_fresh(201, 3);
    assert_eq!(rig.faults().hits(fault), 1);
    assert_eq!(rig.state("after-apply").await, Some("completed"));
    rig.send("after-apply", "ok").await.assert_replay_of(&first);
    assert_eq!(rig.app.effects(), 3);
}

/// The named window: the store refuses the completion (transiently) for
/// longer than the lease plus a lease. The key stays in flight (409) until
/// the lease lapses; then a retry takes it over and runs the handler again:
/// exactly 2 effects, and the record is the second run's.
async fn completion_fails_past_lease(backend: BackendKind) {
    let rig = Rig::open(backend).await;
    // Only the first claim's completions (attempt 1) fail.
    let fault = rig.faults().inject(
        Fault::new(Op::CompareAndSwap, FaultKind::Unavailable)
            .when(|c| c.writes_finished() && c.record.is_some_and(|v| v.record.attempts == 1)),
    );
    let first = rig.send("k", "ok").await;
    first.assert_fresh(201, 1);
    let claim = rig.record("k").await.expect("the claim");
    assert_eq!(claim.record.state.name(), "in_flight");
    rig.send("k", "ok")
        .await
        .assert_problem(ProblemType::RequestInProgress);

    // The lease lapses; the retry takes over and runs the handler again.
    rig.clock.advance(LEASE + Duration::from_millis(1));
    let second = rig.send("k", "ok").await;
    second.assert_fresh(201, 2);
    let done = rig.record("k").await.expect("the second run's record");
    assert_eq!(done.record.state.name(), "completed", "{done:?}");
    assert_eq!(done.record.attempts, 2);
    assert_ne!(done.record.state.token(), claim.record.state.token());
    rig.send("k", "ok").await.assert_replay_of(&second);

    // The first run's completion keeps failing until it gives up (one lease
    // after its lease deadline); it never overwrites the second run's.
    let KeyState::InFlight { lease_deadline, .. } = claim.record.state else {
        panic!("the first run's claim is in flight: {claim:?}")
    };
    let gives_up = lease_deadline.plus(LEASE);
    rig.drive(
        "the first run's completion to give up",
        LEASE / 3,
        3 * LEASE,
        || async { rig.clock.now() > gives_up },
    )
    .await;
    let hits = rig.faults().hits(fault);
    assert!(
        hits >= 3,
        "the completion was retried ({hits} failed attempts)"
    );
    assert_eq!(rig.record("k").await, Some(done));
    assert_eq!(
        rig.app.effects(),
        2,
        "exactly two effects: the named window"
    );
}

/// One heartbeat fails (either kind): the heartbeat goes on, so a duplicate
/// sent after the original lease deadline gets 409 and never takes over.
async fn heartbeat_fails_once(backend: BackendKind, kind: FaultKind) {
    let rig = Rig::open(backend).await;
    let running = rig.spawn_gated().await;
    let claim = rig.record("k").await.expect("the claim");
    let KeyState::InFlight {
        lease_deadline: original,
        ..
    } = claim.record.state
    else {
        panic!("{claim:?}")
    };
    let fault = rig.faults().inject(
        Fault::new(Op::CompareAndSwap, kind)
            .writing_in_flight()
            .next(1),
    );

    // Time passes, a heartbeat at a time, past the original deadline.
    rig.drive(
        "the heartbeat to fail once and extend past the original deadline",
        LEASE / 12,
        3 * LEASE,
        || async {
            let now = rig.clock.now();
            match rig.record("k").await.map(|v| v.record.state) {
                Some(KeyState::InFlight { lease_deadline, .. }) => {
                    rig.faults().hits(fault) == 1 && now > original && lease_deadline > now
                }
                other => panic!("the key must stay in flight, got {other:?}"),
            }
        },
    )
    .await;
    let duplicate = rig.send("k", "ok").await;
    duplicate.assert_problem(ProblemType::RequestInProgress);
    assert_eq!(rig.app.effects(), 1, "the duplicate ran the handler");
    assert_eq!(rig.record("k").await.unwrap().record.attempts, 1);
    assert!(!rig.app.claim(0).lease().is_lost(), "Lease::lost fired");

    rig.app.open_gate();
    let first = running.await.unwrap();
    first.assert_fresh(201, 1);
    rig.send("k", "ok").await.assert_replay_of(&first);
    assert_eq!(rig.app.effects(), 1);
}

/// The named window: every heartbeat of the holder fails past its lease.
/// `Lease::lost` fires, a duplicate takes over and runs (2 effects), and the
/// original's response becomes the 409 "superseded" answer.
async fn heartbeat_fails_past_lease(backend: BackendKind) {
    let rig = Rig::open(backend).await;
    let running = rig.spawn_gated().await;
    let claim = rig.record("k").await.expect("the claim");
    // Only the first claim's heartbeats (attempt 1) fail.
    rig.faults().inject(
        Fault::new(Op::CompareAndSwap, FaultKind::Unavailable)
            .when(|c| c.writes_in_flight() && c.record.is_some_and(|v| v.record.attempts == 1)),
    );
    let holder = rig.app.claim(0);
    rig.drive(
        "the holder to learn its lease is lost",
        LEASE / 12,
        3 * LEASE,
        || async { holder.lease().is_lost() },
    )
    .await;
    assert!(rig.clock.now() >= holder.lease().deadline());

    let second = rig.send("k", "ok").await;
    second.assert_fresh(201, 2);
    let done = rig.record("k").await.expect("the takeover's record");
    assert_eq!(done.record.state.name(), "completed");
    assert_eq!(done.record.attempts, 2);
    assert_ne!(done.record.state.token(), claim.record.state.token());

    rig.app.open_gate();
    let original = running.await.unwrap();
    original.assert_problem(ProblemType::RequestInProgress);
    assert_eq!(original.effect(), None, "{original}");
    assert_eq!(rig.record("k").await, Some(done));
    rig.send("k", "ok").await.assert_replay_of(&second);
    assert_eq!(
        rig.app.effects(),
        2,
        "exactly two effects: the named window"
    );
}

/// The handler hangs after its effect past `Policy::max_hold`: the key ends
/// `failed_unknown`, `Lease::lost` fires, a duplicate gets `outcome-unknown`.
async fn max_hold_exceeded(backend: BackendKind) {
    let rig = Rig::with(backend, |s| s, |p| p.with_max_hold(Some(2 * LEASE))).await;
    let running = rig.spawn_gated().await;
    rig.drive(
        "the hold ceiling to end the key",
        LEASE / 12,
        4 * LEASE,
        || async {
            match rig.state("k").await {
                Some("in_flight") => false,
                Some("failed_unknown") => true,
                other => panic!("the key must stay in flight, then end unknown; got {other:?}"),
            }
        },
    )
    .await;
    assert!(rig.app.claim(0).lease().is_lost(), "Lease::lost fired");
    rig.assert_unknown("k", 1).await;

    // The hung handler finally returns: nothing changes for the key.
    rig.app.open_gate();
    assert_original_after_unknown(&running.await.unwrap());
    rig.assert_unknown("k", 1).await;
}

/// What the client of a handler whose key was already ended as unknown (by
/// `max_hold` or a shutdown) gets when the handler finally returns: its own
/// response (it did finish), never another request's.
#[track_caller]
fn assert_original_after_unknown(original: &Reply) {
    original.assert_fresh(201, 1);
}

/// The shutdown's report: running, finished, marked unknown, left in flight.
#[track_caller]
fn assert_report(report: &Shutdown, want: [usize; 4]) {
    let got = [
        report.running,
        report.finished,
        report.marked_unknown,
        report.left_in_flight,
    ];
    assert_eq!(got, want, "{report:?}");
}

/// A graceful shutdown while a handler runs: new keyed requests get 503
/// `shutting-down` and run nothing; the running handler finishes within the
/// grace period and its response is stored (a retry on another instance
/// replays it).
async fn shutdown_within_grace(backend: BackendKind) {
    let rig = Rig::open(backend).await;
    let running = rig.spawn_gated().await;
    let shutdown = rig.shutdown().await;
    let refused = rig.send("new", "ok").await;
    refused.assert_problem(ProblemType::ShuttingDown);
    assert!(refused.header("retry-after").is_some(), "{refused}");
    assert_eq!(rig.state("new").await, None);
    assert_eq!(rig.app.effects(), 1, "a request during the shutdown ran");

    rig.app.open_gate();
    let first = running.await.unwrap();
    first.assert_fresh(201, 1);
    assert_report(&shutdown.await.unwrap(), [1, 1, 0, 0]);
    assert_eq!(rig.state("k").await, Some("completed"));
    let other = rig.second().await;
    replay_on(&other, "k").await.assert_replay_of(&first);
    assert_eq!(rig.app.effects(), 1);
}

/// The handler outlives the grace period: its key ends `failed_unknown`
/// (nothing that ran is released), `Lease::lost` fires, and a retry on
/// another instance gets `outcome-unknown`.
async fn shutdown_past_grace(backend: BackendKind) {
    let rig = Rig::open(backend).await;
    let running = rig.spawn_gated().await;
    let shutdown = rig.shutdown().await;
    rig.drive(
        "the grace period to run out",
        GRACE / 4,
        2 * GRACE,
        || async { shutdown.is_finished() },
    )
    .await;
    assert_report(&shutdown.await.unwrap(), [1, 0, 1, 0]);
    assert_eq!(rig.state("k").await, Some("failed_unknown"));
    assert!(rig.app.claim(0).lease().is_lost(), "Lease::lost fired");
    let other = rig.second().await;
    replay_on(&other, "k")
        .await
        .assert_problem(ProblemType::OutcomeUnknown);

    rig.app.open_gate();
    assert_original_after_unknown(&running.await.unwrap());
    assert_eq!(rig.state("k").await, Some("failed_unknown"));
    assert_eq!(rig.app.effects(), 1);
}

fn main() -> std::process::ExitCode {
    // The `panic` row panics on purpose: keep that panic off stderr.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if !message.contains(PANIC_MARKER) {
            default_hook(info);
        }
    }));
    rows!(Suite::new("exits"), {
        "exits::ok_2xx" => |b| stored_and_replayed(b, "ok", 201),
        "exits::client_error_4xx" => |b| stored_and_replayed(b, "status:400", 400),
        "exits::server_error_5xx" => server_error_5xx,
        "exits::server_error_5xx_no_effect" => server_error_5xx_no_effect,
        "exits::inner_error" => inner_error,
        "exits::panic" => panic_row,
        "exits::dropped_future" => dropped_future,
        "exits::body_error_mid_stream" => body_error_mid_stream,
        "exits::too_large_for_engine" => too_large_for_engine,
        "exits::too_large_for_store" => too_large_for_store,
        "exits::completion_fails_transient_once" => |b| completion_fails_transient(b, false),
        "exits::completion_fails_transient_after_apply" => |b| completion_fails_transient(b, true),
        "exits::completion_fails_permanent" => completion_fails_permanent,
        "exits::completion_fails_past_lease" => completion_fails_past_lease,
        "exits::heartbeat_fails_once_transient" => |b| heartbeat_fails_once(b, FaultKind::Unavailable),
        "exits::heartbeat_fails_once_permanent" => |b| heartbeat_fails_once(b, FaultKind::Generic),
        "exits::heartbeat_fails_past_lease" => heartbeat_fails_past_lease,
        "exits::max_hold_exceeded" => max_hold_exceeded,
        "exits::shutdown_within_grace" => shutdown_within_grace,
        "exits::shutdown_past_grace" => shutdown_past_grace,
    })
    .run()
}
