//! idem over gRPC: a real tonic server behind `idem_tower::tonic::GrpcLayer`
//! (and once behind `IdempotencyLayer` with `.grpc()` and a `map_request`),
//! and real tonic clients, over loopback.
//!
//! Each test counts the handler's runs (its effect) and checks what a retry
//! gets: the promise is that no key runs the handler twice and no client
//! gets an answer that belongs to another request.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::request::Parts;
use idem_conformance::faulty::{Fault, FaultKind, FaultyStore, Op};
use idem_core::{Engine, MemoryStore, Policy, Scope};
use idem_testkit::wait::until;
use idem_tonic_tests::payments::payments_client::PaymentsClient;
use idem_tonic_tests::payments::payments_server::{Payments, PaymentsServer};
use idem_tonic_tests::payments::{ChargeReply, ChargeRequest, Event, WatchRequest};
use idem_tower::tonic::{GrpcLayer, GrpcLayerBuilder};
use idem_tower::{IdempotencyClaim, IdempotencyLayer, Rejection, grpc};
use tokio::sync::{Barrier, Notify, mpsc, watch};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tonic::{Code, Request, Response, Status};
use tonic_types::StatusExt as _;
use tower::ServiceBuilder;

type TestStore = FaultyStore<MemoryStore>;

const CHARGE: &str = "/payments.v1.Payments/Charge";
const WITHIN: Duration = Duration::from_secs(10);

/// What the next run of `Charge` does.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// Charge and answer OK.
    Charge,
    /// Charge, signal `entered`, wait for the gate, answer OK.
    Slow,
    /// Charge, then fail with this code (ambiguous, or a final refusal).
    FailAfterEffect(Code),
    /// Declare no effect, then fail with this code without charging.
    FailWithoutEffect(Code),
}

/// The service's state, shared with the test.
#[derive(Clone)]
struct App {
    /// Runs of `Charge` that charged (the effect).
    charges: Arc<AtomicU64>,
    /// Runs of `Charge`, with or without effect.
    runs: Arc<AtomicU64>,
    /// Runs of `Watch`.
    watches: Arc<AtomicU64>,
    /// What the next runs do (then `Step::Charge`).
    script: Arc<Mutex<VecDeque<Step>>>,
    entered: Arc<Notify>,
    gate: watch::Receiver<bool>,
}

impl App {
    fn next(&self) -> Step {
        let mut script = self.script.lock().unwrap_or_else(|e| e.into_inner());
        script.pop_front().unwrap_or(Step::Charge)
    }
}

struct PaymentsService(App);

#[tonic::async_trait]
impl Payments for PaymentsService {
    async fn charge(
        &self,
        request: Request<ChargeRequest>,
    ) -> Result<Response<ChargeReply>, Status> {
        let app = &self.0;
        app.runs.fetch_add(1, Ordering::SeqCst);
        let claim = request.extensions().get::<IdempotencyClaim>().cloned();
        let step = app.next();
        if let Step::FailWithoutEffect(code) = step {
            if let Some(claim) = &claim {
                claim.declare_no_effect();
            }
            return Err(Status::new(code, "processor down; nothing was charged"));
        }
        let n = app.charges.fetch_add(1, Ordering::SeqCst) + 1;
        match step {
            Step::Slow => {
                app.entered.notify_one();
                let mut gate = app.gate.clone();
                let _ = gate.wait_for(|open| *open).await;
            }
            Step::FailAfterEffect(code) => {
                return Err(Status::new(code, format!("charge {n} failed")));
            }
            Step::Charge | Step::FailWithoutEffect(_) => {}
        }
        let request = request.into_inner();
        let mut response = Response::new(ChargeReply {
            id: format!("ch_{n}_{}_{}", request.account, request.amount),
            execution: n,
            claim_key: claim
                .as_ref()
                .map(|c| c.key().as_str().to_owned())
                .unwrap_or_default(),
            attempt: claim.as_ref().map_or(0, IdempotencyClaim::attempt),
        });
        response
            .metadata_mut()
            .insert("x-execution", n.to_string().parse().unwrap());
        Ok(response)
    }

    type WatchStream =
        Pin<Box<dyn tonic::codegen::tokio_stream::Stream<Item = Result<Event, Status>> + Send>>;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let n = self.0.watches.fetch_add(1, Ordering::SeqCst) + 1;
        let count = request.into_inner().count;
        let events = (1..=count).map(move |seq| Ok(Event { seq, execution: n }));
        Ok(Response::new(Box::pin(tonic::codegen::tokio_stream::iter(
            events,
        ))))
    }
}

/// The scope: the `x-tenant` metadata entry (tests only: a real service
/// takes the authenticated principal), else `UNAUTHENTICATED`. A few
/// tenants are refused with HTTP rejections, which the layer translates.
fn tenant_scope(parts: &Parts) -> Result<Scope, Rejection> {
    let tenant = parts
        .headers
        .get("x-tenant")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| grpc::rejection(grpc::code::UNAUTHENTICATED, "no tenant"))?;
    match tenant {
        "anonymous" => Err(Rejection::unauthenticated()),
        "suspended" => Err(Rejection::new(
            http::StatusCode::FORBIDDEN,
            "tenant suspended",
        )),
        "throttled" => {
            let mut response =
                Rejection::new(http::StatusCode::TOO_MANY_REQUESTS, "too many calls")
                    .into_response();
            response
                .headers_mut()
                .insert("retry-after", http::HeaderValue::from_static("3"));
            Err(Rejection::from_response(response))
        }
        tenant => Ok(Scope::tenant(tenant)),
    }
}

/// tonic hands its layers `tonic::body::Body`, which is not `From<Bytes>`:
/// `IdempotencyLayer` (rather than `GrpcLayer`) needs a body it can rebuild
/// from the buffered message.
fn to_axum_body(request: http::Request<tonic::body::Body>) -> http::Request<axum::body::Body> {
    request.map(axum::body::Body::new)
}

struct Harness {
    addr: SocketAddr,
    app: App,
    store: TestStore,
    open: watch::Sender<bool>,
}

/// Serves `Payments` behind a `GrpcLayer` configured by `configure`.
async fn start(
    configure: impl FnOnce(GrpcLayerBuilder<TestStore>) -> GrpcLayerBuilder<TestStore>,
) -> Harness {
    start_with(Policy::default(), configure).await
}

/// [`start`] with an engine of `policy`.
async fn start_with(
    policy: Policy,
    configure: impl FnOnce(GrpcLayerBuilder<TestStore>) -> GrpcLayerBuilder<TestStore>,
) -> Harness {
    serve(policy, |engine, payments, incoming| {
        let layer = configure(GrpcLayer::builder(engine, tenant_scope)).build();
        tokio::spawn(
            Server::builder()
                .layer(layer)
                .add_service(payments)
                .serve_with_incoming(incoming),
        );
    })
    .await
}

/// Serves `Payments` with `spawn`, which puts the layer it makes over
/// `engine` in front of the service and spawns the server on `incoming`.
async fn serve(
    policy: Policy,
    spawn: impl FnOnce(Arc<Engine<TestStore>>, PaymentsServer<PaymentsService>, TcpIncoming),
) -> Harness {
    let store: TestStore = FaultyStore::new(MemoryStore::new()).with_name("grpc");
    let engine = Arc::new(Engine::new(store.clone()).with_policy(policy).unwrap());
    let (open, gate) = watch::channel(false);
    let app = App {
        charges: Arc::default(),
        runs: Arc::default(),
        watches: Arc::default(),
        script: Arc::default(),
        entered: Arc::default(),
        gate,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    spawn(
        engine,
        PaymentsServer::new(PaymentsService(app.clone())),
        TcpIncoming::from(listener),
    );
    Harness {
        addr,
        app,
        store,
        open,
    }
}

impl Harness {
    async fn client(&self) -> PaymentsClient<Channel> {
        PaymentsClient::connect(format!("http://{}", self.addr))
            .await
            .unwrap()
    }

    fn charges(&self) -> u64 {
        self.app.charges.load(Ordering::SeqCst)
    }

    fn runs(&self) -> u64 {
        self.app.runs.load(Ordering::SeqCst)
    }

    fn script(&self, steps: impl IntoIterator<Item = Step>) {
        let mut script = self.app.script.lock().unwrap();
        script.extend(steps);
    }

    async fn charge(
        &self,
        key: Option<&str>,
        amount: i64,
    ) -> Result<Response<ChargeReply>, Status> {
        self.charge_as("t1", key, amount).await
    }

    async fn charge_as(
        &self,
        tenant: &str,
        key: Option<&str>,
        amount: i64,
    ) -> Result<Response<ChargeReply>, Status> {
        self.client()
            .await
            .charge(request(key, tenant, amount))
            .await
    }

    /// The events of one `Watch` of `count`, sent with `key` if any.
    async fn watch(&self, key: Option<&str>, count: u32) -> Vec<(u32, u64)> {
        let mut watch = Request::new(WatchRequest { count });
        if let Some(key) = key {
            watch
                .metadata_mut()
                .insert("idempotency-key", key.parse().unwrap());
        }
        watch
            .metadata_mut()
            .insert("x-tenant", "t1".parse().unwrap());
        let mut stream = self.client().await.watch(watch).await.unwrap().into_inner();
        let mut events = Vec::new();
        while let Some(event) = stream.message().await.unwrap() {
            events.push((event.seq, event.execution));
        }
        events
    }

    fn switch_off(&self) {
        for op in Op::ALL {
            self.store.inject(Fault::new(op, FaultKind::Unavailable));
        }
    }
}

/// A `Charge` request of `amount` to `acct_1` with `key` and `tenant` in its
/// metadata.
fn request(key: Option<&str>, tenant: &str, amount: i64) -> Request<ChargeRequest> {
    request_to("acct_1", key, tenant, amount)
}

/// A `Charge` request of `amount` to `account`, with `key` and `tenant` in
/// its metadata.
fn request_to(
    account: &str,
    key: Option<&str>,
    tenant: &str,
    amount: i64,
) -> Request<ChargeRequest> {
    let mut request = Request::new(ChargeRequest {
        account: account.into(),
        amount,
    });
    if let Some(key) = key {
        request
            .metadata_mut()
            .insert("idempotency-key", key.parse().unwrap());
    }
    request
        .metadata_mut()
        .insert("x-tenant", tenant.parse().unwrap());
    request
}

fn replayed(metadata: &tonic::metadata::MetadataMap) -> bool {
    metadata
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true")
}

/// The `google.rpc.ErrorInfo` of an answer of the layer: its reason, after
/// checking the domain and that its `type` is the `idem-problem` entry.
fn reason(status: &Status) -> String {
    let info = status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(info.domain, "idem.dev");
    let problem = status.metadata().get("idem-problem").unwrap();
    assert_eq!(problem.to_str().unwrap(), info.metadata["type"]);
    info.reason
}

/// The `google.rpc.RetryInfo` delay of an answer, after checking it agrees
/// with `grpc-retry-pushback-ms`.
fn retry_delay(status: &Status) -> Duration {
    let delay = status
        .get_details_retry_info()
        .and_then(|r| r.retry_delay)
        .unwrap_or_else(|| panic!("no RetryInfo in {status:?}"));
    let pushback: u128 = status
        .metadata()
        .get("grpc-retry-pushback-ms")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(delay.as_millis(), pushback);
    delay
}

#[tokio::test]
async fn fresh_then_replayed() {
    let h = start(|b| b).await;
    let first = h.charge(Some("k-fresh"), 100).await.unwrap();
    assert!(!replayed(first.metadata()));
    assert_eq!(first.metadata().get("x-execution").unwrap(), "1");
    let first = first.into_inner();
    assert_eq!(first.execution, 1);
    // The claim is in the handler's request extensions.
    assert_eq!(first.claim_key, "k-fresh");
    assert_eq!(first.attempt, 1);

    for _ in 0..2 {
        let again = h.charge(Some("k-fresh"), 100).await.unwrap();
        assert!(replayed(again.metadata()), "{:?}", again.metadata());
        assert_eq!(again.metadata().get("x-execution").unwrap(), "1");
        assert_eq!(again.into_inner(), first);
    }
    assert_eq!(h.charges(), 1);

    // Another tenant's key of the same name is another operation.
    let other = h
        .client()
        .await
        .charge(request(Some("k-fresh"), "t2", 100))
        .await
        .unwrap();
    assert!(!replayed(other.metadata()));
    assert_eq!(other.into_inner().execution, 2);
    assert_eq!(h.charges(), 2);
}

#[tokio::test]
async fn concurrent_duplicates_run_once() {
    const N: usize = 6;
    let h = start(|b| b).await;
    h.script([Step::Slow]);
    let barrier = Arc::new(Barrier::new(N));
    let (tx, mut rx) = mpsc::unbounded_channel();
    for _ in 0..N {
        let mut client = h.client().await;
        let (barrier, tx) = (barrier.clone(), tx.clone());
        tokio::spawn(async move {
            barrier.wait().await;
            let _ = tx.send(client.charge(request(Some("k-race"), "t1", 100)).await);
        });
    }
    // While the one handler waits on the gate, every other client is told
    // to come back later.
    for _ in 0..N - 1 {
        let status = rx.recv().await.unwrap().unwrap_err();
        assert_eq!(status.code(), Code::Aborted, "{status:?}");
        assert_eq!(reason(&status), "REQUEST_IN_PROGRESS");
        let delay = retry_delay(&status);
        assert!(
            delay > Duration::ZERO && delay <= Duration::from_secs(2),
            "{delay:?}"
        );
    }
    assert_eq!(h.charges(), 1);
    h.open.send(true).unwrap();
    let first = rx.recv().await.unwrap().unwrap().into_inner();
    assert_eq!(first.execution, 1);
    let replay = h.charge(Some("k-race"), 100).await.unwrap();
    assert!(replayed(replay.metadata()));
    assert_eq!(replay.into_inner(), first);
    assert_eq!(h.charges(), 1);
}

#[tokio::test]
async fn a_key_reused_for_another_message_fails_its_precondition() {
    let h = start(|b| b).await;
    h.charge(Some("k-reuse"), 100).await.unwrap();
    let status = h.charge(Some("k-reuse"), 200).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(reason(&status), "KEY_REUSED");
    let info = status.get_details_error_info().unwrap();
    assert_eq!(info.metadata["first_method"], "POST");
    assert_eq!(info.metadata["first_path"], CHARGE);
    assert_eq!(info.metadata["first_request_state"], "finished");
    assert!(info.metadata.contains_key("first_used_at"));
    assert!(status.message().contains(CHARGE), "{}", status.message());
    assert_eq!(h.charges(), 1);
}

#[tokio::test]
async fn an_ambiguous_failure_is_never_run_again() {
    let h = start(|b| b).await;
    h.script([Step::FailAfterEffect(Code::Internal)]);
    let first = h.charge(Some("k-ambiguous"), 100).await.unwrap_err();
    assert_eq!(first.code(), Code::Internal);
    assert_eq!(first.message(), "charge 1 failed");
    for _ in 0..2 {
        let retry = h.charge(Some("k-ambiguous"), 100).await.unwrap_err();
        assert_eq!(retry.code(), Code::Unknown, "{retry:?}");
        assert_eq!(reason(&retry), "OUTCOME_UNKNOWN");
        assert!(retry.get_details_retry_info().is_none());
    }
    assert_eq!(h.charges(), 1);
    assert_eq!(h.runs(), 1);
}

#[tokio::test]
async fn a_failure_declared_without_effect_releases_the_key() {
    let h = start(|b| b).await;
    h.script([Step::FailWithoutEffect(Code::Unavailable)]);
    let first = h.charge(Some("k-released"), 100).await.unwrap_err();
    assert_eq!(first.code(), Code::Unavailable);
    assert!(
        first.get_details_error_info().is_none(),
        "the handler's own status"
    );
    assert_eq!(h.charges(), 0);
    // The retry runs afresh, and its answer is the key's.
    let retry = h.charge(Some("k-released"), 100).await.unwrap();
    assert!(!replayed(retry.metadata()));
    let retry = retry.into_inner();
    // A released key holds no record: the retry is a first attempt again.
    assert_eq!((retry.execution, retry.attempt), (1, 1));
    let replay = h.charge(Some("k-released"), 100).await.unwrap();
    assert!(replayed(replay.metadata()));
    assert_eq!(replay.into_inner(), retry);
    assert_eq!((h.charges(), h.runs()), (1, 2));
}

#[tokio::test]
async fn a_final_error_status_is_stored_and_replayed() {
    let h = start(|b| b).await;
    h.script([Step::FailAfterEffect(Code::InvalidArgument)]);
    let first = h.charge(Some("k-final"), 100).await.unwrap_err();
    assert_eq!(first.code(), Code::InvalidArgument);
    assert!(!replayed(first.metadata()));
    for _ in 0..2 {
        let retry = h.charge(Some("k-final"), 100).await.unwrap_err();
        assert_eq!(retry.code(), Code::InvalidArgument, "{retry:?}");
        assert_eq!(retry.message(), first.message());
        assert!(replayed(retry.metadata()), "{:?}", retry.metadata());
    }
    assert_eq!(h.runs(), 1);
}

#[tokio::test]
async fn a_store_outage_runs_nothing_and_says_when_to_retry() {
    let h = start(|b| b.store_retry_after(Duration::from_millis(1500))).await;
    h.switch_off();
    let status = h.charge(Some("k-outage"), 100).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(reason(&status), "STORE_UNAVAILABLE");
    assert_eq!(retry_delay(&status), Duration::from_millis(1500));
    assert_eq!(status.metadata().get("retry-after").unwrap(), "2");
    assert_eq!(h.runs(), 0);
    h.store.clear();
    let retry = h.charge(Some("k-outage"), 100).await.unwrap().into_inner();
    assert_eq!(retry.execution, 1);
    assert_eq!(h.charges(), 1);
}

#[tokio::test]
async fn a_response_too_large_to_store_is_never_run_again() {
    let h = start_with(Policy::default().with_max_outcome_bytes(2048), |b| b).await;
    let account = "a".repeat(8192);
    let mut client = h.client().await;
    let first = client
        .charge(request_to(&account, Some("k-big"), "t1", 100))
        .await
        .unwrap();
    assert_eq!(first.into_inner().id.len(), 8192 + "ch_1__100".len());
    for _ in 0..2 {
        let retry = client
            .charge(request_to(&account, Some("k-big"), "t1", 100))
            .await
            .unwrap_err();
        assert_eq!(retry.code(), Code::Internal, "{retry:?}");
        assert_eq!(reason(&retry), "RESPONSE_NOT_STORED");
        assert!(replayed(retry.metadata()));
    }
    assert_eq!(h.charges(), 1);
}

#[tokio::test]
async fn an_invalid_key_is_an_invalid_argument() {
    let h = start(|b| b).await;
    let long = "k".repeat(256);
    let status = h.charge(Some(&long), 100).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(reason(&status), "INVALID_KEY");

    let mut twice = request(Some("k-1"), "t1", 100);
    twice
        .metadata_mut()
        .append("idempotency-key", "k-2".parse().unwrap());
    let status = h.client().await.charge(twice).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(reason(&status), "INVALID_KEY");
    assert_eq!(h.runs(), 0);
}

#[tokio::test]
async fn a_request_without_a_key_passes_through() {
    let h = start(|b| b).await;
    for execution in 1..=2 {
        let reply = h.charge(None, 100).await.unwrap();
        assert!(!replayed(reply.metadata()));
        let reply = reply.into_inner();
        assert_eq!(reply.execution, execution);
        // No claim without a key.
        assert_eq!((reply.claim_key.as_str(), reply.attempt), ("", 0));
    }
}

#[tokio::test]
async fn a_required_key_is_an_invalid_argument_when_missing() {
    let h = start(|b| b.required(true)).await;
    let status = h.charge(None, 100).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(reason(&status), "MISSING_KEY");
    assert_eq!(h.runs(), 0);
}

#[tokio::test]
async fn the_scope_function_answers_a_grpc_status() {
    let h = start(|b| b).await;
    let mut anonymous = Request::new(ChargeRequest::default());
    anonymous
        .metadata_mut()
        .insert("idempotency-key", "k-anon".parse().unwrap());
    let status = h.client().await.charge(anonymous).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(status.message(), "no tenant");
    assert_eq!(h.runs(), 0);
}

#[tokio::test]
async fn a_passed_deadline_does_not_stop_the_handler() {
    let h = start(|b| b).await;
    h.script([Step::Slow]);
    let entered = h.app.entered.notified();
    let mut client = h.client().await;
    let mut late = request(Some("k-deadline"), "t1", 100);
    // Long enough for the request to reach the handler first on a loaded
    // machine (a deadline that passes before the key is claimed tests
    // nothing of the handler); the handler then waits on the gate, so the
    // deadline passes while it runs.
    late.set_timeout(Duration::from_secs(2));
    let call = tokio::spawn(async move { client.charge(late).await });
    tokio::time::timeout(WITHIN, entered).await.unwrap();
    // The handler waits on the gate: the deadline passes.
    let status = call.await.unwrap().unwrap_err();
    assert!(
        matches!(status.code(), Code::Cancelled | Code::DeadlineExceeded),
        "{status:?}"
    );
    // Its key is still held: a retry is told to come back…
    let busy = h.charge(Some("k-deadline"), 100).await.unwrap_err();
    assert_eq!(busy.code(), Code::Aborted, "{busy:?}");
    // …and once the handler finished, gets its stored answer.
    h.open.send(true).unwrap();
    let replay = until("the stored answer", WITHIN, || async {
        h.charge(Some("k-deadline"), 100).await.ok()
    })
    .await;
    assert!(replayed(replay.metadata()));
    assert_eq!(replay.into_inner().execution, 1);
    assert_eq!(h.charges(), 1);
}

#[tokio::test]
async fn streaming_methods_pass_through_when_only_unary_ones_are_covered() {
    let h = start(|b| b.covers(grpc::unary_methods([CHARGE])).required(true)).await;
    // Not covered: with a key, or without one though keys are required,
    // the stream runs each time and is streamed back whole.
    for (execution, key) in [(1, Some("k-watch")), (2, Some("k-watch")), (3, None)] {
        let events = h.watch(key, 3).await;
        assert_eq!(events, [(1, execution), (2, execution), (3, execution)]);
    }
    assert_eq!(h.app.watches.load(Ordering::SeqCst), 3);
    // The unary method is protected, and its key required.
    let missing = h.charge(None, 100).await.unwrap_err();
    assert_eq!(missing.code(), Code::InvalidArgument, "{missing:?}");
    assert_eq!(reason(&missing), "MISSING_KEY");
    assert!(missing.message().contains(CHARGE), "{}", missing.message());
    let first = h.charge(Some("k-watch"), 100).await.unwrap().into_inner();
    let again = h.charge(Some("k-watch"), 100).await.unwrap();
    assert!(replayed(again.metadata()));
    assert_eq!(again.into_inner(), first);
    assert_eq!((h.charges(), h.runs()), (1, 1));
}

#[tokio::test]
async fn http_rejections_of_the_scope_become_grpc_statuses() {
    let h = start(|b| b).await;
    let suspended = h
        .charge_as("suspended", Some("k-scope"), 100)
        .await
        .unwrap_err();
    assert_eq!(suspended.code(), Code::PermissionDenied, "{suspended:?}");
    assert_eq!(suspended.message(), "tenant suspended");
    // Not one of idem's own problems: no ErrorInfo, no idem-problem.
    assert!(suspended.get_details_error_info().is_none());
    assert!(suspended.metadata().get("idem-problem").is_none());

    let anonymous = h
        .charge_as("anonymous", Some("k-scope"), 100)
        .await
        .unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated, "{anonymous:?}");
    assert!(
        anonymous.message().contains("not authenticated"),
        "{}",
        anonymous.message()
    );

    let throttled = h
        .charge_as("throttled", Some("k-scope"), 100)
        .await
        .unwrap_err();
    assert_eq!(throttled.code(), Code::ResourceExhausted, "{throttled:?}");
    assert_eq!(throttled.message(), "too many calls");
    assert_eq!(retry_delay(&throttled), Duration::from_secs(3));
    assert_eq!(throttled.metadata().get("retry-after").unwrap(), "3");
    assert_eq!(h.runs(), 0);

    // Nothing was claimed: the key is free for the tenant that may use it.
    let charged = h.charge(Some("k-scope"), 100).await.unwrap();
    assert!(!replayed(charged.metadata()));
    assert_eq!(h.charges(), 1);
}

/// Without the `tonic` feature's `GrpcLayer`: `IdempotencyLayer` with
/// `.grpc()` behind a `map_request` to a body it can rebuild.
#[tokio::test]
async fn the_plain_layer_works_behind_a_body_conversion() {
    let h = serve(Policy::default(), |engine, payments, incoming| {
        let layer = IdempotencyLayer::builder(engine, tenant_scope)
            .grpc()
            .build();
        tokio::spawn(
            Server::builder()
                .layer(ServiceBuilder::new().map_request(to_axum_body).layer(layer))
                .add_service(payments)
                .serve_with_incoming(incoming),
        );
    })
    .await;
    let first = h.charge(Some("k-mapped"), 100).await.unwrap();
    assert!(!replayed(first.metadata()));
    let first = first.into_inner();
    assert_eq!((first.claim_key.as_str(), first.attempt), ("k-mapped", 1));
    let again = h.charge(Some("k-mapped"), 100).await.unwrap();
    assert!(replayed(again.metadata()));
    assert_eq!(again.into_inner(), first);
    let reused = h.charge(Some("k-mapped"), 200).await.unwrap_err();
    assert_eq!(reused.code(), Code::FailedPrecondition, "{reused:?}");
    let suspended = h
        .charge_as("suspended", Some("k-mapped"), 100)
        .await
        .unwrap_err();
    assert_eq!(suspended.code(), Code::PermissionDenied, "{suspended:?}");
    assert_eq!(h.charges(), 1);
}

/// The raw HTTP/2 exchange of an answer of the layer: status 200, the gRPC
/// status in the headers, and the stream ended by that HEADERS frame (no
/// message, no trailers).
#[tokio::test]
async fn answers_are_trailers_only_responses() {
    use http_body::Body as _;
    use http_body_util::{BodyExt as _, Full};
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let h = start(|b| b).await;
    let tcp = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(connection);
    // A framed empty message: uncompressed, length 0.
    let message = bytes::Bytes::from_static(&[0, 0, 0, 0, 0]);
    let request = http::Request::post(format!("http://{}{CHARGE}", h.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("x-tenant", "t1")
        .header("idempotency-key", "\"unterminated")
        .body(Full::new(message))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["grpc-status"], "3");
    assert!(response.headers().contains_key("grpc-status-details-bin"));
    assert!(response.body().is_end_stream(), "END_STREAM on the headers");
    let collected = response.into_body().collect().await.unwrap();
    assert!(collected.trailers().is_none());
    assert!(collected.to_bytes().is_empty());
    assert_eq!(h.runs(), 0);
}
