#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Slowloris-style requests (issue 9, item 4): a client that sends the
//! headers and part of the body, then stalls or disconnects, must not hold
//! an idempotency key.
//!
//! `idem-tower` reads the whole body (it is part of the fingerprint) before
//! it claims the key, so a stalled body holds no lease and no record; these
//! tests prove it through the store, over raw TCP on a real loopback port,
//! for the in-memory store and SQLite. The layer has no body-read timeout of
//! its own (nor does `axum::serve`): a stalled client holds its connection
//! and the bytes sent so far (at most `max_body_bytes`) until it goes away;
//! the last tests show the mitigation, a timeout outside the layer, and what
//! a client that disconnects while the handler runs does to the key.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::middleware::{self, Next};
use axum::response::IntoResponse;
use idem_core::store::{State as KeyState, Versioned};
use idem_core::{Policy, Scope};
use idem_reliability::http::{Reply, Server as HttpServer, serve};
use idem_reliability::pay::PayApp;
use idem_reliability::wait;
use idem_testkit::{BackendKind, Isolated};
use idem_tower::ProblemType;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;

const BACKENDS: [BackendKind; 2] = [BackendKind::Memory, BackendKind::Sqlite];

/// The body every request of these tests sends: 100 bytes of JSON.
fn body() -> Vec<u8> {
    let mut s = String::from(r#"{"amount":1000,"currency":"EUR"}"#);
    s.insert_str(1, &" ".repeat(100 - s.len()));
    s.into_bytes()
}

fn scope() -> Scope {
    Scope::tenant("slow-body")
}

struct Server {
    app: PayApp,
    http: HttpServer,
    _store: Isolated,
}

/// The header that puts a request under the outer timeout of [`start`].
const TIMED: &str = "x-outer-timeout";

/// Serves the app behind the layer; with `timeout`, behind a timeout
/// middleware outside the layer as well (answering 408 when it fires), for
/// the requests that carry the [`TIMED`] header: the stalled request that
/// must be cut, not the normal request after it, which a loaded machine
/// may answer later than a timeout short enough to keep the test quick.
async fn start(backend: BackendKind, timeout: Option<Duration>) -> Server {
    let isolated = Isolated::fresh(backend).await;
    let max_body = idem_tower::DEFAULT_MAX_BODY_BYTES;
    let app = PayApp::new(isolated.store(), scope(), Policy::default(), max_body);
    let mut router = app.router();
    if let Some(limit) = timeout {
        router = router.layer(middleware::from_fn(
            move |req: Request<Body>, next: Next| async move {
                if !req.headers().contains_key(TIMED) {
                    return next.run(req).await;
                }
                match tokio::time::timeout(limit, next.run(req)).await {
                    Ok(response) => response,
                    Err(_) => StatusCode::REQUEST_TIMEOUT.into_response(),
                }
            },
        ));
    }
    Server {
        app,
        http: serve(router).await,
        _store: isolated,
    }
}

impl Server {
    async fn record(&self, key: &str) -> Option<Versioned> {
        self.app.stored(key).await
    }

    fn executions(&self) -> usize {
        self.app.executions()
    }

    /// Opens a connection and sends the head of a `path` request with `key`
    /// announcing `Content-Length: 100`, plus the first `partial` body bytes.
    async fn stall(&self, path: &str, key: &str, partial: usize) -> TcpStream {
        self.stall_with(path, key, partial, "").await
    }

    /// [`stall`](Self::stall) with `extra` header lines (each ending in
    /// CRLF).
    async fn stall_with(&self, path: &str, key: &str, partial: usize, extra: &str) -> TcpStream {
        let mut head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
             Idempotency-Key: {key}\r\nContent-Type: application/json\r\n\
             {extra}Content-Length: {}\r\n\r\n",
            body().len()
        )
        .into_bytes();
        head.extend_from_slice(&body()[..partial]);
        self.http.connect_raw(&head).await
    }

    /// A complete request on a connection of its own.
    async fn post(&self, path: &str, key: &str) -> Reply {
        Reply::read(&mut self.stall(path, key, body().len()).await).await
    }

    /// Waits until the server has read at least `n` body bytes in total.
    async fn until_read(&self, n: usize) {
        wait::until_true(
            &format!("the server to read {n} body bytes"),
            Duration::from_secs(10),
            || async move { self.app.body_bytes_read() >= n },
        )
        .await;
    }
}

/// A client stalls after 40 of 100 body bytes: no record exists for its key
/// (no lease held), and another request with the same key runs meanwhile.
/// When the stalled client finally sends the rest, it gets that request's
/// result, replayed: the handler ran once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_holds_no_lease() {
    for backend in BACKENDS {
        let server = start(backend, None).await;
        let mut stalled = server.stall("/pay", "slow-1", 40).await;
        server.until_read(40).await;
        assert!(
            server.record("slow-1").await.is_none(),
            "{backend:?}: a record exists while the body is still arriving"
        );
        assert_eq!(server.executions(), 0);

        let other = server.post("/pay", "slow-1").await;
        assert_eq!(other.status, 201, "{backend:?}: {other:?}");
        assert!(!other.replayed());
        assert_eq!(server.executions(), 1);
        let record = server.record("slow-1").await.unwrap();
        assert!(matches!(record.record.state, KeyState::Completed { .. }));
        assert_eq!(record.record.attempts, 1);

        stalled.write_all(&body()[40..]).await.unwrap();
        let late = Reply::read(&mut stalled).await;
        assert_eq!(late.status, 201, "{backend:?}: {late:?}");
        assert!(late.replayed(), "{backend:?}: the late request ran again");
        assert_eq!(late.body, other.body);
        assert_eq!(server.executions(), 1, "{backend:?}");
    }
}

/// A client disconnects in the middle of its body: nothing is stored, and
/// the next request with the same key runs at once, as the key's first
/// claim (no lease to wait out, no takeover).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_mid_body_leaves_nothing() {
    for backend in BACKENDS {
        let server = start(backend, None).await;
        let stalled = server.stall("/pay", "gone-1", 60).await;
        server.until_read(60).await;
        drop(stalled);
        assert!(server.record("gone-1").await.is_none(), "{backend:?}");
        let next = server.post("/pay", "gone-1").await;
        assert_eq!(next.status, 201, "{backend:?}: {next:?}");
        assert!(!next.replayed());
        let record = server.record("gone-1").await.unwrap();
        assert_eq!(
            record.record.attempts, 1,
            "{backend:?}: a claim was taken over"
        );
        assert_eq!(server.executions(), 1);
    }
}

/// Many stalled clients, on one key and on keys of their own: the store
/// stays empty, and a normal request with each key runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_stalled_clients_hold_nothing() {
    const STALLED: usize = 40;
    for backend in BACKENDS {
        let server = start(backend, None).await;
        let mut conns = Vec::new();
        for i in 0..STALLED {
            let key = if i % 2 == 0 {
                "shared".to_string()
            } else {
                format!("own-{i}")
            };
            conns.push(server.stall("/pay", &key, 1 + i % 99).await);
        }
        let expected: usize = (0..STALLED).map(|i| 1 + i % 99).sum();
        server.until_read(expected).await;
        for i in (1..STALLED).step_by(2) {
            assert!(server.record(&format!("own-{i}")).await.is_none());
        }
        assert!(server.record("shared").await.is_none(), "{backend:?}");
        assert_eq!(server.executions(), 0);
        let shared = server.post("/pay", "shared").await;
        let own = server.post("/pay", "own-1").await;
        assert_eq!((shared.status, own.status), (201, 201), "{backend:?}");
        assert!(!shared.replayed() && !own.replayed());
        assert_eq!(server.executions(), 2);
        drop(conns);
    }
}

/// The mitigation for stalled bodies: a timeout outside the layer. It fires
/// while the layer is still reading the body: the client gets 408, nothing
/// was claimed or stored, and the key is free at once. (The normal request
/// after it is not under the timeout: see [`start`].)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_outside_the_layer_cuts_a_stalled_body() {
    for backend in BACKENDS {
        let server = start(backend, Some(Duration::from_millis(300))).await;
        let mut stalled = server
            .stall_with("/pay", "timed-1", 10, &format!("{TIMED}: 1\r\n"))
            .await;
        let reply = Reply::read(&mut stalled).await;
        assert_eq!(reply.status, 408, "{backend:?}: {reply:?}");
        assert!(server.record("timed-1").await.is_none(), "{backend:?}");
        assert_eq!(server.executions(), 0);
        let next = server.post("/pay", "timed-1").await;
        assert_eq!(next.status, 201, "{backend:?}: {next:?}");
        assert_eq!(server.record("timed-1").await.unwrap().record.attempts, 1);
    }
}

/// What a client that disconnects *while the handler runs* does (hyper then
/// drops the request's future): the handler runs to completion in a task of
/// its own and its response is stored; a retry meanwhile gets 409, and after
/// it the replay. The handler runs once (docs/reliability.md, "Every way a
/// request ends": request future dropped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_while_the_handler_runs_does_not_stop_it() {
    for backend in BACKENDS {
        let server = start(backend, None).await;
        let entered = server.app.entered().notified();
        let conn = server.stall("/slow", "cancel-1", body().len()).await;
        entered.await;
        let held = server.record("cancel-1").await.unwrap();
        assert!(
            matches!(held.record.state, KeyState::InFlight { .. }),
            "{backend:?}: {:?}",
            held.record.state
        );
        drop(conn);
        // The client is gone; the handler still waits at its gate. A retry
        // now finds the key in progress.
        let meanwhile = server.post("/slow", "cancel-1").await;
        assert_eq!(meanwhile.status, 409, "{backend:?}: {meanwhile:?}");
        server.app.open_gate();
        wait::until_true(
            &format!("{backend:?}: the abandoned handler's response to be stored"),
            Duration::from_secs(10),
            || async {
                server
                    .record("cancel-1")
                    .await
                    .is_some_and(|v| matches!(v.record.state, KeyState::Completed { .. }))
            },
        )
        .await;
        let retry = server.post("/slow", "cancel-1").await;
        assert_eq!(retry.status, 201, "{backend:?}: {retry:?}");
        assert!(retry.replayed(), "{backend:?}: {retry:?}");
        assert_eq!(
            server.executions(),
            1,
            "{backend:?}: the handler ran again after its client left"
        );
    }
}

/// A body that never ends, without `Content-Length` (chunked): the layer
/// stops reading at its limit and answers 413, claiming nothing, however
/// slowly the chunks arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_endless_chunked_body_is_cut_at_the_limit() {
    for backend in BACKENDS {
        let server = start(backend, None).await;
        let mut conn = server
            .http
            .connect_raw(
                b"POST /pay HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
                  Idempotency-Key: endless-1\r\nTransfer-Encoding: chunked\r\n\r\n",
            )
            .await;
        let limit = idem_tower::DEFAULT_MAX_BODY_BYTES;
        let chunk = vec![b' '; 64 * 1024];
        let mut sent = 0;
        // Send until the server answers (it stops reading past the limit).
        while sent <= limit {
            let mut frame = format!("{:x}\r\n", chunk.len()).into_bytes();
            frame.extend_from_slice(&chunk);
            frame.extend_from_slice(b"\r\n");
            if conn.write_all(&frame).await.is_err() {
                break;
            }
            sent += chunk.len();
            assert!(
                server.record("endless-1").await.is_none(),
                "{backend:?}: claimed after {sent} body bytes"
            );
        }
        let reply = Reply::read(&mut conn).await;
        reply.assert_problem(ProblemType::BodyTooLarge);
        assert!(server.record("endless-1").await.is_none());
        assert_eq!(server.executions(), 0);
    }
}
