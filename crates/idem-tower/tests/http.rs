//! The layer driven by real HTTP requests (reqwest → axum on 127.0.0.1:0).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderName, Method};
use common::{
    Reply, engine, eventually, fail_cas, in_flight_deadline, start, switch_off, switch_on,
    test_store,
};
use idem_core::store::{Revision, State, Versioned};
use idem_core::{Clock, Engine, InFlightPolicy, ManualClock, Outcome, Policy, Timestamp};
use idem_tower::ProblemType;
use tokio::sync::Barrier;

const T0: Timestamp = Timestamp::from_millis(1_700_000_000_000);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_then_replay_of_status_headers_and_body() {
    let h = start(engine(test_store()), |b| b).await;
    let first = h
        .post("/charge", Some("k-1"), "t1", r#"{"amount":100}"#)
        .await;
    assert_eq!(first.status, 201);
    assert!(!first.replayed());
    assert_eq!(first.header("set-cookie"), Some("sid=secret"));
    assert_eq!(first.json()["execution"], 1);

    let again = h
        .post("/charge", Some("k-1"), "t1", r#"{"amount":100}"#)
        .await;
    assert_eq!(h.calls(), 1, "the handler ran again");
    assert_eq!(again.status, 201);
    assert!(again.replayed());
    assert_eq!(again.body, first.body);
    assert_eq!(again.header("content-type"), Some("application/json"));
    assert_eq!(again.header("x-execution"), Some("1"));
    assert_eq!(
        again.header("content-length"),
        Some(first.body.len().to_string().as_str())
    );
    // Denied by default: cookies are not stored nor re-issued.
    assert_eq!(again.header("set-cookie"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quoted_and_bare_keys_are_the_same_key() {
    let h = start(engine(test_store()), |b| b).await;
    let first = h.post("/charge", Some("\"k-2\""), "t1", "{}").await;
    assert_eq!(first.status, 201);
    let bare = h.post("/charge", Some("k-2"), "t1", "{}").await;
    assert!(bare.replayed());
    assert_eq!(bare.body, first.body);
    let escaped = h.post("/charge", Some(r#""k\"3""#), "t1", "{}").await;
    assert!(!escaped.replayed());
    let bare = h.post("/charge", Some(r#"k"3"#), "t1", "{}").await;
    assert!(bare.replayed());
    assert_eq!(h.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_key_with_a_different_request_is_422() {
    let h = start(engine(test_store()), |b| b).await;
    assert_eq!(h.post("/charge", Some("k"), "t1", "a").await.status, 201);
    let other_body = h.post("/charge", Some("k"), "t1", "b").await;
    assert_eq!(other_body.status, 422);
    assert_eq!(other_body.problem(), ProblemType::KeyReused.uri());
    assert_eq!(other_body.json()["status"], 422);
    let other_query = h.post("/charge?x=1", Some("k"), "t1", "a").await;
    assert_eq!(other_query.status, 422);
    let other_path = h.post("/status/200", Some("k"), "t1", "a").await;
    assert_eq!(other_path.status, 422);
    let other_method = Reply::of(
        h.request(Method::PATCH, "/charge", Some(b"k"), "t1", "a")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(other_method.status, 422);
    assert_eq!(h.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selected_headers_are_part_of_the_fingerprint() {
    let h = start(engine(test_store()), |b| {
        b.fingerprint_header(HeaderName::from_static("content-type"))
    })
    .await;
    let send = |ct: &'static str| {
        h.request(Method::POST, "/charge", Some(b"k"), "t1", "{}")
            .header("content-type", ct)
            .send()
    };
    assert_eq!(send("application/json").await.unwrap().status(), 201);
    assert_eq!(send("text/plain").await.unwrap().status(), 422);
    let again = Reply::of(send("application/json").await.unwrap()).await;
    assert!(again.replayed());
    assert_eq!(h.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_while_in_flight_is_409_with_retry_after() {
    let h = start(engine(test_store()), |b| b).await;
    let first = h.spawn_slow("k");
    h.app.entered.notified().await;

    let dup = h.post("/slow", Some("k"), "t1", "").await;
    assert_eq!(dup.status, 409);
    assert_eq!(dup.problem(), ProblemType::RequestInProgress.uri());
    // min(ceil(time left on the 60 s lease), max_retry_after = 2 s)
    assert_eq!(dup.header("retry-after"), Some("2"));
    assert_eq!(h.calls(), 1);

    h.finish_slow(first, "k").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_mode_returns_the_original_response() {
    let clock = ManualClock::new(T0);
    let policy = Policy::default().with_in_flight(InFlightPolicy::Wait {
        max: Duration::from_secs(30),
        poll: Duration::from_millis(100),
    });
    let engine = Engine::with_clock(test_store(), clock.clone())
        .with_policy(policy)
        .expect("valid policy");
    let h = start(engine, |b| b).await;
    let first = h.spawn_slow("w");
    h.app.entered.notified().await;
    // The handler's heartbeat sleeps on the clock.
    eventually("the heartbeat to sleep", || async {
        clock.pending_sleepers() >= 1
    })
    .await;
    let dup = h.spawn_slow("w");
    // …and now the duplicate waits on it too.
    eventually("the duplicate to wait", || async {
        clock.pending_sleepers() >= 2
    })
    .await;
    assert!(!dup.is_finished());

    h.open.send(true).unwrap();
    let first = first.await.unwrap();
    assert_eq!(first.status, 200);
    clock.advance(Duration::from_millis(100));
    let dup = dup.await.unwrap();
    assert_eq!(dup.status, 200);
    assert!(dup.replayed());
    assert_eq!(dup.body, first.body);
    assert_eq!(h.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_key_passes_through_unless_required() {
    let h = start(engine(test_store()), |b| b).await;
    assert_eq!(h.post("/charge", None, "t1", "{}").await.status, 201);
    assert_eq!(h.post("/charge", None, "t1", "{}").await.status, 201);
    assert_eq!(h.calls(), 2, "without a key there is no protection");

    let h = start(engine(test_store()), |b| b.required(true)).await;
    let r = h.post("/charge", None, "t1", "{}").await;
    assert_eq!(r.status, 400);
    assert_eq!(r.problem(), ProblemType::MissingKey.uri());
    assert_eq!(h.calls(), 0);
    // Methods not covered need no key.
    let get = h
        .request(Method::GET, "/charge", None, "t1", "")
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_keys_are_400() {
    let h = start(engine(test_store()), |b| b).await;
    let long = "a".repeat(256);
    let cases: [&[u8]; 8] = [
        b"",
        b"\"\"",
        long.as_bytes(),
        "clé".as_bytes(),
        b"\"unterminated",
        b"\"bad\\escape\"",
        b"\"has space\"",
        b"\"a\";param=1",
    ];
    for key in cases {
        let r = Reply::of(
            h.request(Method::POST, "/charge", Some(key), "t1", "{}")
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, 400, "key {:?}", String::from_utf8_lossy(key));
        assert_eq!(r.problem(), ProblemType::InvalidKey.uri());
    }
    let twice = h
        .request(Method::POST, "/charge", Some(b"k"), "t1", "{}")
        .header("idempotency-key", "k")
        .send()
        .await
        .unwrap();
    assert_eq!(twice.status(), 400);
    assert_eq!(h.calls(), 0);
    // 255 bytes is fine.
    let max = "a".repeat(255);
    assert_eq!(h.post("/charge", Some(&max), "t1", "{}").await.status, 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_the_limit_is_413() {
    let h = start(engine(test_store()), |b| b.max_body_bytes(16)).await;
    let r = h.post("/charge", Some("k"), "t1", &"x".repeat(17)).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.problem(), ProblemType::BodyTooLarge.uri());
    assert_eq!(h.calls(), 0);
    let ok = h.post("/charge", Some("k"), "t1", &"x".repeat(16)).await;
    assert_eq!(ok.status, 201);
    // The handler received the body intact.
    assert_eq!(ok.json()["echo"], "x".repeat(16));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_scopes_same_key_are_two_operations() {
    let h = start(engine(test_store()), |b| b).await;
    let a = h.post("/charge", Some("shared"), "tenant-a", "{}").await;
    let b = h.post("/charge", Some("shared"), "tenant-b", "{}").await;
    assert_eq!((a.status, b.status), (201, 201));
    assert!(!b.replayed(), "tenant b got tenant a's response");
    assert_eq!(h.calls(), 2);
    assert_eq!(a.json()["tenant"], "tenant-a");
    assert_eq!(b.json()["tenant"], "tenant-b");
    let a2 = h.post("/charge", Some("shared"), "tenant-a", "{}").await;
    let b2 = h.post("/charge", Some("shared"), "tenant-b", "{}").await;
    assert!(a2.replayed() && b2.replayed());
    assert_eq!(a2.body, a.body);
    assert_eq!(b2.body, b.body);
    assert_eq!(h.calls(), 2);
    // No scope (unauthenticated): the scope function's rejection, nothing run.
    let anonymous = Reply::of(
        h.http
            .post(format!("{}/charge", h.base))
            .header("idempotency-key", "shared")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(anonymous.status, 401);
    assert_eq!(anonymous.problem(), "about:blank");
    assert_eq!(h.calls(), 2);
}

/// A 5xx the handler did not declare effect-free is ambiguous: the client
/// gets it, the key ends as outcome unknown, and the retry gets a 500
/// `outcome-unknown` without running the handler again. 4xx are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_end_the_key_unknown_and_client_errors_are_stored() {
    let h = start(engine(test_store()), |b| b).await;
    let e1 = h.post("/status/503", Some("k5"), "t1", "").await;
    assert_eq!(e1.status, 503);
    assert_eq!(
        h.record("t1", "k5").await.map(|v| v.record.state.name()),
        Some("failed_unknown"),
    );
    let e2 = h.post("/status/503", Some("k5"), "t1", "").await;
    assert_eq!(e2.status, 500);
    assert_eq!(e2.problem(), ProblemType::OutcomeUnknown.uri());
    assert_eq!(
        h.calls(),
        1,
        "a retry after an ambiguous 5xx must not run again"
    );

    let c1 = h.post("/status/404", Some("k4"), "t1", "").await;
    assert_eq!(c1.status, 404);
    let c2 = h.post("/status/404", Some("k4"), "t1", "").await;
    assert_eq!(c2.status, 404);
    assert!(c2.replayed());
    assert_eq!(c2.body, c1.body);
    assert_eq!(h.calls(), 2);
}

/// Responses the storage predicate refuses are not stored, and not run
/// again either: the retry gets `outcome-unknown`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_policy_is_a_predicate() {
    let h = start(engine(test_store()), |b| {
        b.store_response_if(|parts| parts.status.is_success())
    })
    .await;
    assert_eq!(h.post("/status/409", Some("k"), "t1", "").await.status, 409);
    let again = h.post("/status/409", Some("k"), "t1", "").await;
    assert!(!again.replayed());
    assert_eq!(again.problem(), ProblemType::OutcomeUnknown.uri());
    assert_eq!(h.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_unavailable_is_503_and_the_handler_does_not_run() {
    let store = test_store();
    let h = start(engine(store.clone()), |b| b).await;
    switch_off(&store);
    let r = h.post("/charge", Some("k"), "t1", "{}").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.problem(), ProblemType::StoreUnavailable.uri());
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(h.calls(), 0, "fail closed: the handler must not run");
    switch_on(&store);
    assert_eq!(h.post("/charge", Some("k"), "t1", "{}").await.status, 201);
    assert_eq!(h.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_runs_unprotected_when_configured() {
    let store = test_store();
    let h = start(engine(store.clone()), |b| b.fail_open(true)).await;
    switch_off(&store);
    assert_eq!(h.post("/charge", Some("k"), "t1", "{}").await.status, 201);
    assert_eq!(h.post("/charge", Some("k"), "t1", "{}").await.status, 201);
    assert_eq!(h.calls(), 2, "fail-open gives no protection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_error_at_completion_still_returns_the_response() {
    let store = test_store();
    let h = start(engine(store.clone()), |b| b).await;
    fail_cas(&store);
    let r = h.post("/charge", Some("k"), "t1", "{}").await;
    assert_eq!(
        r.status, 201,
        "the work happened: the client gets its result"
    );
    // Not stored: the key stays in flight until its lease lapses.
    let dup = h.post("/charge", Some("k"), "t1", "{}").await;
    assert_eq!(dup.status, 409);
    assert_eq!(h.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_identical_requests_run_the_handler_once() {
    const N: usize = 48;
    let h = Arc::new(start(engine(test_store()), |b| b).await);
    let barrier = Arc::new(Barrier::new(N));
    let tasks: Vec<_> = (0..N)
        .map(|_| {
            let h = h.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                let req = h.request(Method::POST, "/charge", Some(b"race"), "t1", "{}");
                barrier.wait().await;
                Reply::of(req.send().await.unwrap()).await
            })
        })
        .collect();
    let mut replies = Vec::new();
    for t in tasks {
        replies.push(t.await.unwrap());
    }
    assert_eq!(h.calls(), 1, "the handler ran more than once");
    let fresh: Vec<_> = replies
        .iter()
        .filter(|r| r.status == 201 && !r.replayed())
        .collect();
    assert_eq!(fresh.len(), 1);
    for r in &replies {
        match r.status {
            201 => assert_eq!(r.body, fresh[0].body),
            409 => assert_eq!(r.problem(), ProblemType::RequestInProgress.uri()),
            other => panic!("unexpected status {other}: {r:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_handler_is_kept_alive_and_never_taken_over() {
    let clock = ManualClock::new(T0);
    let lease = Duration::from_secs(3);
    let engine = Engine::with_clock(test_store(), clock.clone())
        .with_policy(Policy::default().with_lease(lease))
        .expect("valid policy");
    let h = start(engine, |b| b).await;
    let first = h.spawn_slow("hb");
    h.app.entered.notified().await;
    let claimed = h.record("t1", "hb").await.unwrap();
    let first_deadline = in_flight_deadline(&claimed).unwrap();
    assert_eq!(first_deadline, T0.plus(lease));

    // Nine heartbeats of a third of the lease: three lease periods.
    for _ in 0..9 {
        eventually("the heartbeat to sleep", || async {
            clock.pending_sleepers() >= 1
        })
        .await;
        clock.advance(lease / 3);
        let want = clock.now().plus(lease);
        eventually("the lease to be extended", || async {
            h.record("t1", "hb")
                .await
                .and_then(|v| in_flight_deadline(&v))
                == Some(want)
        })
        .await;
    }
    assert!(clock.now().since(T0) >= lease * 3);
    assert!(
        clock.now() > first_deadline,
        "the original lease would have lapsed"
    );
    let still = h.record("t1", "hb").await.unwrap();
    assert_eq!(still.record.attempts, 1, "the lease was taken over");

    let dup = h.post("/slow", Some("hb"), "t1", "").await;
    assert_eq!(dup.status, 409, "a live slow request was taken over");
    assert_eq!(h.calls(), 1);

    h.finish_slow(first, "hb").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_completes_inside_its_transaction() {
    let h = start(engine(test_store()), |b| b).await;
    let first = h.post("/tx", Some("tx-1"), "t1", "pay").await;
    assert_eq!(first.status, 201);
    assert_eq!(first.header("x-claim-key"), Some("tx-1"));
    assert_eq!(first.header("x-claim-attempt"), Some("1"));
    let prepared: Revision = h.app.prepared.lock().unwrap().expect("handler prepared");
    let record = h.record("t1", "tx-1").await.unwrap();
    assert_eq!(
        record.revision, prepared,
        "the layer stored the response a second time"
    );
    assert!(matches!(record.record.state, State::Completed { .. }));

    let replay = h.post("/tx", Some("tx-1"), "t1", "pay").await;
    assert!(replay.replayed());
    assert_eq!(replay.status, 201);
    assert_eq!(replay.body, first.body);
    for name in ["content-type", "x-execution", "x-claim-key"] {
        assert_eq!(replay.header(name), first.header(name), "{name}");
    }
    assert_eq!(h.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_stored_record_is_500_and_nothing_runs() {
    let h = start(engine(test_store()), |b| b).await;
    assert_eq!(h.post("/charge", Some("c"), "t1", "{}").await.status, 201);
    let current = h.record("t1", "c").await.unwrap();
    let State::Completed { token, .. } = current.record.state else {
        panic!("not completed");
    };
    let mut broken = current.record.clone();
    broken.state = State::Completed {
        token,
        outcome: Outcome::new(vec![1u8, 2, 3]),
    };
    let rk = idem_core::RecordKey::new(
        &idem_core::Scope::tenant("t1"),
        &idem_core::IdempotencyKey::parse("c").unwrap(),
    );
    let next = Versioned {
        revision: Revision::from_u64(42),
        record: broken,
    };
    let swapped = idem_core::store::Store::compare_and_swap(
        h.engine.store().inner(),
        &rk,
        &current,
        &next,
        h.engine.clock().now(),
    )
    .await
    .unwrap();
    assert_eq!(swapped, idem_core::store::SwapOutcome::Swapped);
    let r = h.post("/charge", Some("c"), "t1", "{}").await;
    assert_eq!(r.status, 500);
    assert_eq!(r.problem(), ProblemType::CorruptRecord.uri());
    assert_eq!(h.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_too_large_to_store_is_returned_once_and_never_rerun() {
    let engine = common::engine(test_store());
    let engine = engine
        .with_policy(Policy::default().with_max_outcome_bytes(1024))
        .expect("valid policy");
    let h = start(engine, |b| b).await;
    let first = h.post("/big", Some("big"), "t1", "").await;
    assert_eq!(first.status, 201);
    assert_eq!(first.body.len(), 4096);
    let again = h.post("/big", Some("big"), "t1", "").await;
    assert_eq!(again.status, 500);
    assert!(again.replayed());
    assert_eq!(again.problem(), ProblemType::ResponseNotStored.uri());
    assert_eq!(h.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_are_configurable() {
    let h = start(engine(test_store()), |b| b.methods([Method::PUT])).await;
    for _ in 0..2 {
        assert_eq!(h.post("/charge", Some("m"), "t1", "").await.status, 201);
    }
    assert_eq!(h.calls(), 2, "POST is not covered any more");
    for _ in 0..2 {
        let r = h
            .request(Method::PUT, "/charge", Some(b"m"), "t1", "")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    assert_eq!(h.calls(), 3, "PUT is covered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_name_and_deny_list_are_configurable() {
    let h = start(engine(test_store()), |b| {
        b.header_name(HeaderName::from_static("x-request-key"))
            .replay_deny_headers([HeaderName::from_static("x-execution")])
    })
    .await;
    let send = || {
        h.http
            .post(format!("{}/charge", h.base))
            .header("x-tenant", "t1")
            .header("x-request-key", "n")
            .send()
    };
    let first = Reply::of(send().await.unwrap()).await;
    let again = Reply::of(send().await.unwrap()).await;
    assert!(again.replayed());
    assert_eq!(first.header("x-execution"), Some("1"));
    assert_eq!(again.header("x-execution"), None);
    assert_eq!(again.header("set-cookie"), Some("sid=secret"));
    assert_eq!(h.calls(), 1);
}
