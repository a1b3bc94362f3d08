//! Store faults (issue 9, item 1): an `idem_faults::FaultProxy` between the
//! store client and the real PostgreSQL / Redis server on loopback.
//!
//! For each fault — a delay beyond the store's timeout, a black hole,
//! connections cut in the middle of a command, refused connections, lost
//! replies — and each networked backend:
//!
//! - `engine::<fault>`: `begin` and `complete` under the fault report a
//!   transient store error (`Error::is_transient`), the guarded work never
//!   runs without a claim, and after `heal()` the engine works again. Where
//!   the command still reached the server (late, or with its reply lost:
//!   the **ambiguous case**), the retry meets the orphaned claim: "in
//!   progress" for exactly the rest of its lease, then a takeover (attempt
//!   2) runs the work once. Time for leases is a `ManualClock`; store
//!   timeouts are real.
//! - `http::<fault>`: through the `idem-tower` layer on a real port: 503
//!   `store-unavailable` problem+json with `Retry-After`, the handler not
//!   called; the client's retries (same key) end in one 201, exactly one
//!   execution, and a replay of it.
//! - `http::completion_lost`: the fault hits after the handler ran, while
//!   its response is being stored, and heals within the lease. The client
//!   gets the response; the layer retries the completion in the background,
//!   so the retry gets the replay: exactly one execution. (An outage longer
//!   than the lease is window W1 of docs/reliability.md.)
//!
//! SQLite has no network and the cluster client dials nodes around any
//! proxy, so neither is here. Unreachable servers: IGNORED (FAILED under
//! `CI=true` / `IDEM_REQUIRE_BACKENDS=1`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use idem_core::store::{State, Store, Versioned};
use idem_core::{
    Begin, Clock, Engine, Error, Fingerprint, IdempotencyKey, Lease, ManualClock, Outcome, Policy,
    RecordKey, ReplayKind, Scope, SystemClock,
};
use idem_faults::{Fault as ProxyFault, FaultProxy};
use idem_postgres::PostgresStore;
use idem_reliability::engine::{engine, key, proceed};
use idem_reliability::http::{self, Reply, Service};
use idem_reliability::{redis, wait};
use idem_testkit::postgres;
use idem_testkit::runner::Suite;
use idem_testkit::{BackendKind, Isolated};
use idem_tower::ProblemType;

/// The store's own bound on one call through the proxy.
const TIMEOUT: Duration = Duration::from_millis(250);
/// The `Delay` fault: well beyond [`TIMEOUT`] (Redis re-sends a timed-out
/// call once on a fresh connection, so a call may take 2-3 timeouts).
const DELAY: Duration = Duration::from_millis(1200);
/// The lease of the engine-level tests (on a `ManualClock`).
const LEASE: Duration = Duration::from_secs(10);
/// The lease of the HTTP-level fault tests (real time): the orphaned claim
/// of an ambiguous fault must lapse within the test.
const HTTP_LEASE: Duration = Duration::from_secs(1);
/// The lease of `http::completion_lost` (real time). That case never needs
/// a lease to lapse: its promise is that the completion, retried in the
/// background after the outage, lands *within* the lease. A short lease only
/// races the black-holed completion (one store timeout; on Redis up to two
/// or three) and the store's reconnection against the clock, and a loaded
/// machine loses that race: a retry takes the key over and the operation
/// runs twice for a reason that has nothing to do with the layer.
const COMPLETION_LEASE: Duration = Duration::from_secs(10);
/// How long a recovery may take before the test fails.
const RECOVERY: Duration = Duration::from_secs(20);

/// The faults, in the order they are listed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// Every chunk held for [`DELAY`]: the call times out, the command
    /// reaches the server late.
    Delay,
    /// Every chunk swallowed: the call times out, nothing reaches the server.
    BlackHole,
    /// The command is in flight (swallowed) when every connection is cut and
    /// new ones are refused: nothing reaches the server.
    CutMidCommand,
    /// Every connection cut and new ones refused before the call.
    Refuse,
    /// Requests reach the server, replies are lost: the command takes effect,
    /// the caller cannot know (the ambiguous case).
    DropReplies,
}

impl Fault {
    const ALL: [Self; 5] = [
        Self::Delay,
        Self::BlackHole,
        Self::CutMidCommand,
        Self::Refuse,
        Self::DropReplies,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Delay => "delay",
            Self::BlackHole => "black_hole",
            Self::CutMidCommand => "cut_mid_command",
            Self::Refuse => "refuse",
            Self::DropReplies => "drop_replies",
        }
    }

    /// What the proxy does first (a cut mid-command starts as a black hole).
    fn proxy_fault(self) -> ProxyFault {
        match self {
            Self::Delay => ProxyFault::Delay(DELAY),
            Self::BlackHole | Self::CutMidCommand => ProxyFault::BlackHole,
            Self::Refuse => ProxyFault::Refuse,
            Self::DropReplies => ProxyFault::DropReplies,
        }
    }

    /// Whether the command sent under the fault still takes effect on the
    /// server (late, or with its reply lost).
    fn lands(self) -> bool {
        matches!(self, Self::Delay | Self::DropReplies)
    }
}

/// A store reached through a fault proxy, and the same records reached
/// directly (to see what really is stored).
struct Net {
    proxy: FaultProxy,
    faulty: Arc<dyn Store>,
    direct: Arc<dyn Store>,
    pg: Option<PostgresStore>,
    _fixture: Isolated,
}

async fn net(backend: BackendKind) -> Net {
    let fixture = Isolated::fresh(backend).await;
    let (proxy, faulty, pg): (_, Arc<dyn Store>, _) = match backend {
        BackendKind::Postgres => {
            let proxy = postgres::proxy().await;
            let store = postgres::store_via(&proxy, fixture.postgres().table(), TIMEOUT);
            (proxy, Arc::new(store.clone()), Some(store))
        }
        BackendKind::Redis => {
            let proxy = redis::proxy().await;
            let store = redis::store_via(&proxy, fixture.redis().prefix(), TIMEOUT).await;
            (proxy, Arc::new(store), None)
        }
        other => panic!("{other} is not reached through a proxy"),
    };
    Net {
        proxy,
        faulty,
        direct: fixture.store(),
        pg,
        _fixture: fixture,
    }
}

impl Net {
    /// Waits until the faulty store's connections are idle (PostgreSQL: the
    /// pool pings a returned connection in the background).
    async fn settle(&self) {
        if let Some(pg) = &self.pg {
            postgres::settled(pg).await;
        }
    }

    /// Runs `op` with `fault` switched on (the way each fault needs), and
    /// heals the proxy once `op` is done.
    async fn under<T>(&self, fault: Fault, op: impl Future<Output = T>) -> T {
        self.settle().await;
        self.proxy.set(fault.proxy_fault());
        let result = match fault {
            Fault::Refuse => {
                self.proxy.cut_all();
                wait::until_true("the proxy to close its connections", RECOVERY, || async {
                    self.proxy.open_connections() == 0
                })
                .await;
                op.await
            }
            Fault::CutMidCommand => {
                let before = self.proxy.swallowed_bytes();
                let cut = async {
                    wait::until_true("the command to be in flight", RECOVERY, || async {
                        self.proxy.swallowed_bytes() > before
                    })
                    .await;
                    self.proxy.set(ProxyFault::Refuse);
                    self.proxy.cut_all();
                };
                let (result, ()) = tokio::join!(op, cut);
                result
            }
            Fault::Delay | Fault::BlackHole | Fault::DropReplies => op.await,
        };
        self.proxy.heal();
        result
    }

    /// The record under `key` as stored, read directly.
    async fn stored(&self, key: &RecordKey, now: idem_core::Timestamp) -> Option<Versioned> {
        wait::until_ok(
            "read the store directly",
            RECOVERY,
            Error::is_transient,
            || async { Ok::<_, Error>(self.direct.get(key, now).await?) },
        )
        .await
        .unwrap()
    }
}

fn scope() -> Scope {
    Scope::tenant("faults").with_operation("charge")
}

fn fingerprint() -> Fingerprint {
    Fingerprint::of(br#"{"amount":1000,"currency":"EUR"}"#)
}

#[track_caller]
fn assert_transient<T: std::fmt::Debug>(result: Result<T, Error>, what: &str, fault: Fault) {
    match result {
        Err(e) if e.is_transient() => {
            assert!(
                matches!(e, Error::Store(_)),
                "{what} under {fault:?}: a store error, got {e:?}"
            );
        }
        other => {
            panic!("{what} under {fault:?} must fail with a transient store error, got {other:?}")
        }
    }
}

fn in_flight_token(v: &Versioned) -> Option<idem_core::store::FencingToken> {
    match v.record.state {
        State::InFlight { token, .. } => Some(token),
        _ => None,
    }
}

/// `begin`, retried while the store is still recovering.
async fn begin<S: Store, C: Clock>(engine: &Engine<S, C>, k: &IdempotencyKey) -> Begin {
    let s = scope();
    wait::until_ok("begin after heal", RECOVERY, Error::is_transient, || {
        engine.begin(&s, k, fingerprint())
    })
    .await
    .unwrap_or_else(|e| panic!("begin after heal: {e:?}"))
}

/// Engine level: `begin` and `complete` under `fault`.
async fn engine_case(backend: BackendKind, fault: Fault) {
    let net = net(backend).await;
    let clock = ManualClock::new(SystemClock.now());
    let engine = engine(
        net.faulty.clone(),
        clock.clone(),
        Policy::default().with_lease(LEASE),
    );
    let runs = AtomicU64::new(0);
    let run = |lease: &Lease| {
        assert!(!lease.is_finished(), "work runs only under a live claim");
        runs.fetch_add(1, Ordering::SeqCst);
    };

    // 1. `begin` under the fault. Right before it, a claim on another key
    // prepares the claim statement on the proxied connection (PostgreSQL),
    // so that under lost replies the claim itself is executed.
    let warm = proceed(begin(&engine, &key("warm-1")).await, 1, "warm-up");
    let k1 = key("begin-under-fault");
    let rk1 = RecordKey::new(&scope(), &k1);
    let failed = net
        .under(fault, engine.begin(&scope(), &k1, fingerprint()))
        .await;
    assert_transient(failed, "begin", fault);
    assert_eq!(runs.load(Ordering::SeqCst), 0, "no claim, no work");
    let lease = if fault.lands() {
        // The ambiguous case: the claim reached the store, but its reply
        // was lost (or came after the timeout). Nobody holds it.
        let orphan = wait::until(
            "the claim sent under the fault to reach the store",
            RECOVERY,
            || async { net.stored(&rk1, clock.now()).await },
        )
        .await;
        assert!(in_flight_token(&orphan).is_some(), "{orphan:?}");
        assert_eq!(orphan.record.attempts, 1);
        // The retry meets it: in progress for exactly the rest of its
        // lease (the clock has not moved), and the work does not run.
        match begin(&engine, &k1).await {
            Begin::InProgress { retry_after } => assert_eq!(retry_after, LEASE),
            other => panic!("the retry must see the orphaned claim in progress, got {other:?}"),
        }
        assert_eq!(runs.load(Ordering::SeqCst), 0);
        // Once its lease lapses, a retry takes it over and runs the work.
        clock.advance(LEASE);
        let lease = proceed(
            begin(&engine, &k1).await,
            2,
            "takeover of the orphaned claim",
        );
        assert_ne!(Some(lease.token()), in_flight_token(&orphan));
        lease
    } else {
        assert_eq!(
            net.stored(&rk1, clock.now()).await,
            None,
            "nothing reached the store under {fault:?}"
        );
        proceed(begin(&engine, &k1).await, 1, "claim after heal")
    };
    run(&lease);
    let out1 = Outcome::new(&b"charged once"[..]);
    wait::until_ok("complete after heal", RECOVERY, Error::is_transient, || {
        engine.complete(&lease, out1.clone())
    })
    .await
    .unwrap();
    match begin(&engine, &k1).await {
        Begin::Replay(replay) => {
            assert_eq!(replay.outcome, out1);
            assert_eq!(replay.kind, ReplayKind::Completed);
        }
        other => panic!("expected the replay, got {other:?}"),
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "exactly one execution");
    drop(warm);

    // 2. `complete` under the fault, after the work ran.
    let k2 = key("complete-under-fault");
    let rk2 = RecordKey::new(&scope(), &k2);
    let lease = proceed(begin(&engine, &k2).await, 1, "second key");
    run(&lease);
    // A heartbeat first: it prepares the compare-and-swap statement on the
    // connection (PostgreSQL), so that under lost replies the completion
    // itself is executed.
    wait::until_ok("heartbeat", RECOVERY, Error::is_transient, || {
        engine.extend(&lease)
    })
    .await
    .unwrap();
    let out2 = Outcome::new(&b"charged twice? no"[..]);
    let failed = net
        .under(fault, engine.complete(&lease, out2.clone()))
        .await;
    assert_transient(failed, "complete", fault);
    if fault.lands() {
        wait::until_true(
            "the completion sent under the fault to reach the store",
            RECOVERY,
            || async {
                net.stored(&rk2, clock.now()).await.is_some_and(|v| {
                    v.record.state
                        == State::Completed {
                            token: lease.token(),
                            outcome: out2.clone(),
                        }
                })
            },
        )
        .await;
    } else {
        let stored = net.stored(&rk2, clock.now()).await.unwrap();
        assert_eq!(
            in_flight_token(&stored),
            Some(lease.token()),
            "the completion did not reach the store: still our claim"
        );
    }
    // The holder retries its completion: it succeeds whether or not the
    // first attempt took effect.
    wait::until_ok(
        "complete again after heal",
        RECOVERY,
        Error::is_transient,
        || engine.complete(&lease, out2.clone()),
    )
    .await
    .unwrap_or_else(|e| panic!("retrying the completion must succeed, got {e:?}"));
    match begin(&engine, &k2).await {
        Begin::Replay(replay) => assert_eq!(replay.outcome, out2),
        other => panic!("expected the replay, got {other:?}"),
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2, "one execution per key");
}

const BODY: &str = r#"{"amount":1000,"currency":"EUR"}"#;

/// The HTTP service over `net`'s faulty store (lease `lease`), warmed up: a
/// full request on a throwaway key prepares the claim and completion
/// statements on the proxied connection (retried while the store recovers).
/// Returns the executions so far too.
async fn serve(net: &Net, lease: Duration) -> (Service, http::Server, u64) {
    let policy = Policy::default().with_lease(lease);
    let service = Service::new();
    let engine = Arc::new(engine(net.faulty.clone(), SystemClock, policy));
    let server = http::start(engine, &service).await;
    wait::until("the warm-up request to succeed", RECOVERY, || async {
        let reply = server.charge("acme", "warm-up", BODY).await;
        match reply.status {
            201 => Some(()),
            503 => None,
            _ => panic!("warm-up: {reply}"),
        }
    })
    .await;
    let before = service.executions();
    (service, server, before)
}

/// Retries `key` as a client would until a final answer; returns it and
/// how many 409s came first. 409 is accepted only if `conflict_ok`.
async fn retry_until_final(server: &http::Server, key: &str, conflict_ok: bool) -> (Reply, usize) {
    let deadline = Instant::now() + RECOVERY;
    let mut conflicts = 0;
    let mut seen = Vec::new();
    loop {
        let reply = server.charge("acme", key, BODY).await;
        seen.push(reply.status);
        match reply.status {
            201 => return (reply, conflicts),
            409 if conflict_ok => {
                reply.assert_problem(ProblemType::RequestInProgress);
                assert!(reply.retry_after().is_some_and(|s| s >= 1), "{reply}");
                conflicts += 1;
            }
            // Right after the heal, the store may still be reconnecting.
            503 => reply.assert_problem(ProblemType::StoreUnavailable),
            _ => panic!("unexpected answer to a retry: {reply}"),
        }
        assert!(
            Instant::now() < deadline,
            "no final answer after {RECOVERY:?}; answers: {seen:?}; last: {reply}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// HTTP level: the request that meets the fault is answered 503 without
/// running the handler; the retries end in exactly one execution.
async fn http_case(backend: BackendKind, fault: Fault) {
    let net = net(backend).await;
    let (service, server, before) = serve(&net, HTTP_LEASE).await;

    let reply = net
        .under(fault, server.charge("acme", "order-1", BODY))
        .await;
    reply.assert_problem(ProblemType::StoreUnavailable);
    assert!(
        reply.retry_after().is_some_and(|s| s >= 1),
        "503 carries Retry-After: {reply}"
    );
    assert_eq!(
        service.executions(),
        before,
        "the handler must not run without a claim"
    );

    let rk = http::record_key("acme", "order-1");
    let now = || SystemClock.now();
    if fault.lands() {
        let orphan = wait::until(
            "the claim sent under the fault to reach the store",
            RECOVERY,
            || async { net.stored(&rk, now()).await },
        )
        .await;
        assert!(in_flight_token(&orphan).is_some(), "{orphan:?}");
    } else {
        assert_eq!(
            net.stored(&rk, now()).await,
            None,
            "nothing reached the store"
        );
    }
    assert_eq!(service.executions(), before);

    let (done, conflicts) = retry_until_final(&server, "order-1", fault.lands()).await;
    assert_eq!(
        service.executions(),
        before + 1,
        "exactly one execution ({conflicts} retries answered 409 first)"
    );
    assert_eq!(done.execution(), Some(before + 1), "{done}");
    assert!(!done.replayed(), "{done}");
    let stored = net.stored(&rk, now()).await.expect("the record");
    assert!(
        matches!(stored.record.state, State::Completed { .. }),
        "{stored:?}"
    );
    assert_eq!(
        stored.record.attempts,
        if fault.lands() { 2 } else { 1 },
        "the orphaned claim (if any) was taken over, not run beside"
    );

    let again = server.charge("acme", "order-1", BODY).await;
    assert_eq!(again.status, 201, "{again}");
    assert!(again.replayed(), "{again}");
    assert_eq!(again.body, done.body);
    assert_eq!(service.executions(), before + 1);
}

/// HTTP level: the store goes silent after the handler ran, while its
/// response is stored, and comes back within the lease
/// ([`COMPLETION_LEASE`]). The response still reaches the client; the layer
/// keeps retrying the completion in the background, so once the store is
/// back the retry gets the replay: one execution. (An outage longer than the
/// lease is window W1 of docs/reliability.md:
/// `exits::completion_fails_past_lease`.)
async fn completion_lost(backend: BackendKind) {
    let net = net(backend).await;
    let (service, server, before) = serve(&net, COMPLETION_LEASE).await;

    // The stalled request, sent until it reaches the handler: on a loaded
    // machine its claim may miss the store's short timeout (503, the handler
    // not run). Each attempt has a key of its own: a claim that landed
    // although its reply came late would answer a retry with 409 for a whole
    // lease.
    let deadline = Instant::now() + RECOVERY;
    let mut attempt = 0;
    let (key, first) = loop {
        attempt += 1;
        let key = format!("order-2-{attempt}");
        let req = server
            .charge_request("acme", Some(&key), BODY)
            .header("x-stall", "1");
        let mut first = tokio::spawn(async move { Reply::of(req.send().await.unwrap()).await });
        tokio::select! {
            () = service.wait_stalled(1) => break (key, first),
            reply = &mut first => {
                let reply = reply.unwrap();
                reply.assert_problem(ProblemType::StoreUnavailable);
                assert_eq!(service.executions(), before, "a 503 runs nothing");
                assert!(
                    Instant::now() < deadline,
                    "the stalled request never reached the handler in {RECOVERY:?}: {reply}"
                );
            }
        }
    };
    // No connection returning to the pool now: sqlx pings a returned
    // connection without a time limit, and a ping swallowed by the black
    // hole would hold the pool's only connection for good (see
    // notes/reliability-findings.md). The calls under test time out instead.
    net.settle().await;
    net.proxy.set(ProxyFault::BlackHole);
    service.open_gate();
    let first = first.await.unwrap();
    net.proxy.heal();
    assert_eq!(
        first.status, 201,
        "the work happened: its response is returned: {first}"
    );
    assert_eq!(first.execution(), Some(before + 1));

    let rk = http::record_key("acme", &key);
    let (second, conflicts) = retry_until_final(&server, &key, true).await;
    assert!(
        second.replayed() && second.execution() == Some(before + 1),
        "the retry must get the first response once the store is back ({conflicts} × 409 before): {second}"
    );
    assert_eq!(second.body, first.body);
    assert_eq!(service.executions(), before + 1, "the operation ran twice");
    let stored = net
        .stored(&rk, SystemClock.now())
        .await
        .expect("the record");
    assert!(matches!(stored.record.state, State::Completed { .. }));
    assert_eq!(stored.record.attempts, 1);
}

fn main() -> std::process::ExitCode {
    let net = &BackendKind::NETWORKED;
    let mut suite = Suite::new("faults");
    for fault in Fault::ALL {
        let name = fault.name();
        suite = suite
            .each(net, &format!("engine::{name}"), move |b| {
                engine_case(b, fault)
            })
            .each(net, &format!("http::{name}"), move |b| http_case(b, fault));
    }
    suite
        .each(net, "http::completion_lost", completion_lost)
        .run()
}
