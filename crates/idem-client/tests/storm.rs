//! The client's promise, tested for real: ≥ 500 logical calls through
//! idem-client to an axum server with the `idem-tower` layer, behind
//! idem-faults' proxy, through cut connections, lost replies, slow and
//! refused connections, and 409s from re-sends that overtake their original
//! — and every call takes effect exactly once, its final answer is the one
//! the server stored first, and no call is ever re-sent after a 422.
//!
//! # The server
//! `POST /effects` counts one effect per execution, keyed by the request's
//! idempotency key, and records the first answer it made for the key. An
//! outer middleware (outside the layer, so the layer has stored the answer
//! before it acts) counts what reached the server and what it answered, and
//! misbehaves on the *first* arrival of a key as its `x-mode` header asks
//! (not part of the fingerprint; the client sends the same every time):
//!
//! | mode | first arrival | then |
//! |---|---|---|
//! | `hold` | the handler waits until the server has answered a 409 for its key | the client's attempt times out, its re-send gets 409 + `Retry-After`, which releases the handler; the next re-send gets the replay |
//! | `lose` | the answer is held back until the client has re-sent (a lost reply) | the re-send gets the replay |
//! | `cut` | the head and half the body are sent, then the connection breaks | the client re-sends on the broken body and gets the replay |
//! | `plain` | — | — |
//!
//! Meanwhile a chaos task drives the proxy in a loop: forward, cut every
//! connection, swallow replies, delay, refuse. Nothing in the assertions
//! depends on that timing: the deterministic modes guarantee each signal,
//! and the chaos can only add re-sends.
//!
//! Every 13th call is followed by a second logical call with the same
//! caller-supplied key and another body: it must get 422 `key-reused`, and
//! no attempt may follow a 422. After the storm, with the proxy healed, 20
//! more such pairs must take exactly one attempt each.
//!
//! On MemoryStore and SQLite always; PostgreSQL and Redis through
//! idem-testkit (ignored with a banner when unreachable, failed under CI).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Extension;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use http_body_util::BodyExt as _;
use idem_client::reqwest_middleware::ClientBuilder;
use idem_client::{
    IdempotencyError, IdempotencyMiddleware, IdempotencyResponseExt, Key, Problem, RetryPolicy,
};
use idem_core::Engine;
use idem_core::store::Store;
use idem_faults::{Fault, FaultProxy};
use idem_testkit::runner::Suite;
use idem_testkit::{BackendKind, Isolated};
use idem_tower::{IdempotencyClaim, IdempotencyLayer, single_client_scope};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

/// Logical calls that take effect (each 13th also gets a key-reuse call).
const CALLS: u32 = 520;
/// Key-reuse pairs after the storm, with the proxy healed.
const CALM_REUSES: u32 = 20;
/// The engine's lease: the default. A claim left without a handler (a
/// request dropped while its claim was written) would hold its key for
/// this long and outlast the client's budget: the layer releases such
/// claims, and the test asserts that no claim was ever taken over.
const LEASE: Duration = Duration::from_secs(60);
/// Logical calls in flight at once.
const CONCURRENCY: usize = 32;
/// The longest a deliberately held request waits for what releases it (a
/// safety net: the release always comes first unless the client is broken).
const SAFETY: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    Suite::new("idem-client (storm)")
        .with_default_test_threads(2)
        .each(
            &[
                BackendKind::Memory,
                BackendKind::Sqlite,
                BackendKind::Postgres,
                BackendKind::Redis,
            ],
            "every_call_takes_effect_once_through_faults",
            |kind| async move {
                let isolated = Isolated::fresh(kind).await;
                storm(kind.name(), isolated.store()).await;
                isolated.close().await.unwrap();
            },
        )
        .run()
}

// ---------------------------------------------------------------- server

/// What the server saw, per idempotency key.
#[derive(Default, Debug)]
struct Seen {
    /// Executions of the handler.
    effects: HashMap<String, u32>,
    /// The first answer the handler made.
    answers: HashMap<String, Bytes>,
    /// Requests that reached the server (outside the layer).
    arrivals: HashMap<String, u32>,
    /// 409s the server answered.
    conflicts: HashMap<String, u32>,
    /// 422s the server answered.
    mismatches: HashMap<String, u32>,
    /// Keys whose handler ran under a claim taken over after a lease lapsed
    /// (attempt > 1): the first claim's request was dropped before its
    /// handler started.
    takeovers: u32,
}

#[derive(Clone, Default)]
struct Ledger {
    seen: Arc<Mutex<Seen>>,
    tick: Arc<watch::Sender<u64>>,
}

impl Ledger {
    fn update<T>(&self, f: impl FnOnce(&mut Seen) -> T) -> T {
        let out = f(&mut self.seen.lock().unwrap());
        self.tick.send_modify(|n| *n += 1);
        out
    }

    fn read<T>(&self, f: impl FnOnce(&Seen) -> T) -> T {
        f(&self.seen.lock().unwrap())
    }

    /// Waits until `ready` holds (false after [`SAFETY`]).
    async fn wait_until(&self, ready: impl Fn(&Seen) -> bool) -> bool {
        let mut tick = self.tick.subscribe();
        let deadline = tokio::time::Instant::now() + SAFETY;
        loop {
            if self.read(&ready) {
                return true;
            }
            if tokio::time::timeout_at(deadline, tick.changed())
                .await
                .is_err()
            {
                return false;
            }
        }
    }
}

fn count(map: &HashMap<String, u32>, key: &str) -> u32 {
    map.get(key).copied().unwrap_or(0)
}

fn mode(headers: &HeaderMap) -> &str {
    headers
        .get("x-mode")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("plain")
}

async fn effect(
    State(ledger): State<Ledger>,
    claim: Option<Extension<IdempotencyClaim>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(Extension(claim)) = claim else {
        return (StatusCode::BAD_REQUEST, "no idempotency claim").into_response();
    };
    let key = claim.key().as_str().to_string();
    let answer = Bytes::from(format!(
        r#"{{"key":{key:?},"effect":"{:016x}","request_bytes":{}}}"#,
        fastrand::u64(..),
        body.len()
    ));
    let taken_over = claim.attempt() > 1;
    ledger.update(|s| {
        s.takeovers += u32::from(taken_over);
        *s.effects.entry(key.clone()).or_default() += 1;
        s.answers
            .entry(key.clone())
            .or_insert_with(|| answer.clone());
    });
    if mode(&headers) == "hold" {
        // Until a re-send of this key has been answered 409.
        ledger.wait_until(|s| count(&s.conflicts, &key) > 0).await;
    }
    (
        StatusCode::CREATED,
        [(header::CONTENT_TYPE, "application/json")],
        answer,
    )
        .into_response()
}

/// Outside the layer: counts, and misbehaves on a key's first arrival.
async fn faults(State(ledger): State<Ledger>, request: Request, next: Next) -> Response {
    let key = request
        .headers()
        .get("idempotency-key")
        .and_then(|v| idem_tower::parse_key_value(v.as_bytes()).ok())
        .map(|k| k.as_str().to_string());
    let Some(key) = key else {
        return next.run(request).await;
    };
    let mode = mode(request.headers()).to_string();
    let arrival = ledger.update(|s| {
        let n = s.arrivals.entry(key.clone()).or_default();
        *n += 1;
        *n
    });
    let response = next.run(request).await;
    match response.status() {
        StatusCode::CONFLICT => {
            ledger.update(|s| *s.conflicts.entry(key.clone()).or_default() += 1)
        }
        StatusCode::UNPROCESSABLE_ENTITY => {
            ledger.update(|s| *s.mismatches.entry(key.clone()).or_default() += 1);
        }
        _ => {}
    }
    if arrival != 1 {
        return response;
    }
    match mode.as_str() {
        "lose" => {
            // The answer is stored; it never reaches the client, who gives
            // up and re-sends.
            ledger.wait_until(|s| count(&s.arrivals, &key) > 1).await;
            response
        }
        "cut" => {
            // The head and half the body, then the connection breaks.
            let (parts, body) = response.into_parts();
            let bytes = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let half = bytes.slice(..bytes.len() / 2);
            let chunks: [Result<Bytes, std::io::Error>; 2] =
                [Ok(half), Err(std::io::Error::other("cut mid-body"))];
            let mut response =
                Response::from_parts(parts, Body::from_stream(futures_util::stream::iter(chunks)));
            response
                .headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
            response
        }
        _ => response,
    }
}

struct Server {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

async fn serve<S: Store + 'static>(store: S, ledger: Ledger) -> Server {
    let policy = idem_core::Policy::default().with_lease(LEASE);
    let engine = Arc::new(Engine::new(store).with_policy(policy).unwrap());
    let layer = IdempotencyLayer::builder(engine, single_client_scope)
        .required(true)
        .build();
    let app = Router::new()
        .route("/effects", post(effect))
        .layer(layer)
        .layer(middleware::from_fn_with_state(ledger.clone(), faults))
        .with_state(ledger);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Server { addr, task }
}

// ---------------------------------------------------------------- client

/// A call's id, in its middleware extensions, for the attempt log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct CallId(u32);

/// One attempt, as the observer saw it.
#[derive(Clone, Debug)]
struct Attempt {
    status: Option<u16>,
    problem: Option<Problem>,
    last: bool,
}

type AttemptLog = Arc<Mutex<HashMap<CallId, Vec<Attempt>>>>;

/// What one logical call ended with.
#[derive(Debug)]
struct Outcome {
    id: CallId,
    mode: &'static str,
    key: Key,
    status: StatusCode,
    attempts: u32,
    body: Bytes,
    key_reused: bool,
}

/// What every call needs: the client, where to send, and (for the
/// diagnostics of a call that got no answer) the attempt log and the ledger.
#[derive(Clone)]
struct Caller {
    client: idem_client::reqwest_middleware::ClientWithMiddleware,
    url: String,
    log: AttemptLog,
    ledger: Ledger,
}

impl Caller {
    /// One logical call; panics with the attempts and the server's counts if
    /// it gets no answer.
    async fn call(
        &self,
        id: CallId,
        mode: &'static str,
        key: Option<Key>,
        payload: &str,
    ) -> Outcome {
        let Caller {
            client,
            url,
            log,
            ledger,
        } = self;
        let mut request = client
            .post(url)
            .header("x-mode", mode)
            .header(header::CONTENT_TYPE, "application/json")
            .body(format!(r#"{{"call":{},"payload":{payload:?}}}"#, id.0))
            .with_extension(id);
        if let Some(key) = key {
            // Half the caller keys as an extension, half as a header.
            request = if id.0.is_multiple_of(2) {
                request.with_extension(key)
            } else {
                request.header("idempotency-key", key.as_str())
            };
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(error) => {
                let attempts = log.lock().unwrap().get(&id).cloned().unwrap_or_default();
                let mut runs: Vec<(Option<u16>, usize)> = Vec::new();
                for a in &attempts {
                    match runs.last_mut() {
                        Some((status, n)) if *status == a.status => *n += 1,
                        _ => runs.push((a.status, 1)),
                    }
                }
                let key = IdempotencyError::of(&error)
                    .and_then(|e| e.key())
                    .map(|k| k.as_str().to_string())
                    .unwrap_or_default();
                let server = ledger.read(|s| {
                    (
                        count(&s.effects, &key),
                        count(&s.arrivals, &key),
                        count(&s.conflicts, &key),
                    )
                });
                panic!(
                    "call {id:?} ({mode}) got no answer (server: effects, arrivals, 409s = {server:?}): {}; attempts (status, run length): {runs:?}",
                    IdempotencyError::of(&error)
                        .map_or_else(|| error.to_string(), |e| format!("{e}: {:?}", e.last()))
                )
            }
        };
        let info = response.idempotency().expect("POST is protected").clone();
        let status = response.status();
        let body = response.bytes().await.expect("buffered body");
        Outcome {
            id,
            mode,
            key: info.key.clone(),
            status,
            attempts: info.attempts,
            body,
            key_reused: info.key_reused(),
        }
    }
}

fn mode_of(i: u32) -> &'static str {
    match i % 13 {
        0 => "hold",
        1 => "lose",
        2 => "cut",
        _ => "plain",
    }
}

/// Drives the proxy through its faults until `stop`.
async fn chaos(proxy: Arc<FaultProxy>, stop: Arc<AtomicBool>) {
    let ms = Duration::from_millis;
    while !stop.load(Ordering::SeqCst) {
        proxy.heal();
        tokio::time::sleep(ms(30)).await;
        proxy.cut_all();
        tokio::time::sleep(ms(20)).await;
        proxy.set(Fault::DropReplies);
        tokio::time::sleep(ms(10)).await;
        proxy.heal();
        tokio::time::sleep(ms(30)).await;
        proxy.set(Fault::Delay(ms(3)));
        tokio::time::sleep(ms(30)).await;
        proxy.set(Fault::Refuse);
        tokio::time::sleep(ms(10)).await;
        proxy.heal();
        proxy.cut_all();
    }
    proxy.heal();
}

/// The storm's attempt timeout: short, so that the `hold` mode's first
/// attempt times out and the storm keeps moving.
const STORM_ATTEMPT_TIMEOUT: Duration = Duration::from_millis(400);
/// The calm phase's attempt timeout: an answer always comes (no fault), so
/// no attempt may time out there, however loaded the machine: the phase
/// asserts that a reused key takes exactly one attempt.
const CALM_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// A client through the idempotency middleware to `url`, with
/// `attempt_timeout`, recording every attempt into `log`.
fn caller(url: String, log: &AttemptLog, ledger: &Ledger, attempt_timeout: Duration) -> Caller {
    let sink = log.clone();
    let middleware = IdempotencyMiddleware::builder()
        .policy(
            RetryPolicy::default()
                .max_attempts(10_000)
                .backoff(Duration::from_millis(1), Duration::from_millis(20))
                .budget(Duration::from_secs(60))
                .attempt_timeout(attempt_timeout)
                // idem-tower's 409 says "Retry-After: 1" (whole seconds);
                // the held requests finish within milliseconds.
                .retry_after_cap(Duration::from_millis(20)),
        )
        .on_attempt(move |e| {
            let id = *e.extensions.get::<CallId>().expect("every call is tagged");
            sink.lock().unwrap().entry(id).or_default().push(Attempt {
                status: e.status.map(|s| s.as_u16()),
                problem: e.problem,
                last: e.last,
            });
        })
        .build();
    Caller {
        client: ClientBuilder::new(reqwest::Client::new())
            .with(middleware)
            .build(),
        url,
        log: log.clone(),
        ledger: ledger.clone(),
    }
}

async fn storm(backend: &str, store: Arc<dyn Store>) {
    let ledger = Ledger::default();
    let server = serve(store, ledger.clone()).await;
    let proxy = Arc::new(FaultProxy::start(server.addr).await.unwrap());
    let log: AttemptLog = Arc::default();
    let url = format!("http://{}/effects", proxy.addr());
    let caller = caller(url.clone(), &log, &ledger, STORM_ATTEMPT_TIMEOUT);

    // The storm.
    let stop = Arc::new(AtomicBool::new(false));
    let chaos = tokio::spawn(chaos(proxy.clone(), stop.clone()));
    let gate = Arc::new(Semaphore::new(CONCURRENCY));
    let mut tasks = JoinSet::new();
    for i in 0..CALLS {
        let (caller, gate) = (caller.clone(), gate.clone());
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await.unwrap();
            let mode = mode_of(i);
            let reuse = i % 13 == 3;
            let key = (reuse || i % 13 == 4).then(|| Key::new(format!("caller-{i}")).unwrap());
            let first = caller.call(CallId(i), mode, key.clone(), "original").await;
            let second = match key.filter(|_| reuse) {
                // The same key, another body: a caller's bug.
                Some(key) => Some(
                    caller
                        .call(CallId(CALLS + i), "plain", Some(key), "changed")
                        .await,
                ),
                None => None,
            };
            (first, second)
        });
    }
    let mut firsts = Vec::new();
    let mut reuses = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let (first, second) = joined.unwrap();
        firsts.push(first);
        reuses.extend(second);
    }
    stop.store(true, Ordering::SeqCst);
    chaos.await.unwrap();

    // Calm: key reuse takes exactly one attempt. A client of its own, with
    // a timeout no answer of a healed proxy misses.
    let caller = self::caller(url, &log, &ledger, CALM_ATTEMPT_TIMEOUT);
    let mut calm = Vec::new();
    for j in 0..CALM_REUSES {
        let key = Key::new(format!("calm-{j}")).unwrap();
        let id = CallId(10 * CALLS + 2 * j);
        let first = caller
            .call(id, "plain", Some(key.clone()), "original")
            .await;
        let second = caller
            .call(CallId(id.0 + 1), "plain", Some(key), "changed")
            .await;
        calm.push((first, second));
    }

    let log = log.lock().unwrap().clone();
    let attempts: usize = log.values().map(Vec::len).sum();
    let no_answer = log
        .values()
        .flatten()
        .filter(|a| a.status.is_none())
        .count();
    let client_409s = log
        .values()
        .flatten()
        .filter(|a| a.status == Some(409))
        .count();
    println!(
        "{backend}: {} logical calls + {} key reuses: {attempts} attempts, {no_answer} without an answer, \
         {client_409s} 409s received; proxy: {} connections, {} bytes swallowed; \
         {} claims orphaned by a cut and taken over after the lease",
        CALLS + CALM_REUSES,
        reuses.len() + calm.len(),
        proxy.accepted_connections(),
        proxy.swallowed_bytes(),
        ledger.read(|s| s.takeovers),
    );

    let mut errors = Vec::new();
    let takeovers = ledger.read(|s| s.takeovers);
    if takeovers > 0 {
        errors.push(format!(
            "{takeovers} claims were left without a handler and taken over after the lease"
        ));
    }
    let seen = ledger.seen.lock().unwrap();
    // Exactly once, and the first answer.
    let effect_calls: Vec<&Outcome> = firsts.iter().chain(calm.iter().map(|(f, _)| f)).collect();
    for o in &effect_calls {
        let k = o.key.as_str();
        if o.status != StatusCode::CREATED {
            errors.push(format!("{:?} ({}): status {}", o.id, o.mode, o.status));
        }
        if count(&seen.effects, k) != 1 {
            errors.push(format!(
                "{:?} ({}): {} effects",
                o.id,
                o.mode,
                count(&seen.effects, k)
            ));
        }
        if seen.answers.get(k) != Some(&o.body) {
            errors.push(format!("{:?} ({}): not the first answer", o.id, o.mode));
        }
        // The deliberate faults forced re-sends.
        let forced = match o.mode {
            "hold" => count(&seen.conflicts, k) >= 1 && o.attempts >= 3,
            "lose" | "cut" => count(&seen.arrivals, k) >= 2 && o.attempts >= 2,
            _ => true,
        };
        if !forced {
            errors.push(format!(
                "{:?} ({}): the fault did not happen ({} attempts, {} arrivals, {} 409s)",
                o.id,
                o.mode,
                o.attempts,
                count(&seen.arrivals, k),
                count(&seen.conflicts, k)
            ));
        }
    }
    let total_effects: u32 = seen.effects.values().sum();
    if total_effects as usize != effect_calls.len() || seen.effects.len() != effect_calls.len() {
        errors.push(format!(
            "{total_effects} effects on {} keys for {} calls",
            seen.effects.len(),
            effect_calls.len()
        ));
    }
    // Key reuse: 422 key-reused, nothing executed, never re-sent after it.
    for o in reuses.iter().chain(calm.iter().map(|(_, s)| s)) {
        if o.status != StatusCode::UNPROCESSABLE_ENTITY || !o.key_reused {
            errors.push(format!(
                "{:?}: reuse answered {} ({:?})",
                o.id, o.status, o.body
            ));
        }
    }
    for (id, attempts) in &log {
        for (n, a) in attempts.iter().enumerate() {
            if a.status == Some(422) && n + 1 != attempts.len() {
                errors.push(format!("{id:?}: re-sent after a 422: {attempts:?}"));
            }
            if a.problem == Some(Problem::KeyReused) && !a.last {
                errors.push(format!("{id:?}: key-reused not last: {attempts:?}"));
            }
        }
    }
    for (first, second) in &calm {
        let attempts = log.get(&second.id).map_or(0, Vec::len);
        if second.attempts != 1 || attempts != 1 {
            errors.push(format!(
                "{:?}: {} attempts for a reused key with no faults (want 1)",
                second.id, second.attempts
            ));
        }
        if count(&seen.mismatches, first.key.as_str()) != 1 {
            errors.push(format!(
                "{:?}: the server answered 422 more than once",
                second.id
            ));
        }
    }
    if reuses.len() != (0..CALLS).filter(|i| i % 13 == 3).count() {
        errors.push(format!("{} reuse calls", reuses.len()));
    }
    if no_answer == 0 || client_409s == 0 {
        errors.push("the storm had no lost answers or no 409s".to_string());
    }
    drop(seen);
    server.task.abort();
    assert!(
        errors.is_empty(),
        "{} violations:\n{}",
        errors.len(),
        errors.join("\n")
    );
}
