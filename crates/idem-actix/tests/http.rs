//! The middleware driven by real HTTP requests: reqwest → actix-web
//! `HttpServer` on 127.0.0.1:0.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Got, WITHIN, serve, store_down};
use idem_actix::{KeySource, ProblemType};
use idem_core::{Engine, Policy};
use idem_testkit::wait::until;
use tokio::sync::Barrier;

fn engine() -> Engine<common::TestStore> {
    Engine::new(idem_conformance::faulty::FaultyStore::new(
        idem_core::MemoryStore::new(),
    ))
}

#[tokio::test]
async fn a_fresh_request_runs_and_a_retry_replays_status_headers_and_body() {
    let s = serve(engine(), |b| b).await;
    let first = s
        .send(s.post("/charge", Some("k-1"), r#"{"amount":100}"#))
        .await;
    assert_eq!(first.status, 201);
    assert!(!first.replayed);
    assert_eq!(first.get("set-cookie"), Some("sid=secret"));
    assert_eq!(first.json()["run"], 1);
    assert_eq!(first.json()["echo"], r#"{"amount":100}"#);

    let again = s
        .send(s.post("/charge", Some("k-1"), r#"{"amount":100}"#))
        .await;
    assert_eq!((again.status, again.replayed, s.runs()), (201, true, 1));
    assert_eq!(again.body, first.body);
    for (name, value) in [("content-type", "application/json"), ("x-run", "1")] {
        assert_eq!(again.get(name), Some(value), "{name}");
    }
    let length = first.body.len().to_string();
    assert_eq!(again.get("content-length"), Some(length.as_str()));
    // Denied by default: a cookie is neither stored nor issued again.
    assert_eq!(again.get("set-cookie"), None);
}

#[tokio::test]
async fn concurrent_duplicates_run_the_handler_once() {
    const N: usize = 8;
    let s = Arc::new(serve(engine(), |b| b).await);
    let barrier = Arc::new(Barrier::new(N));
    let tasks: Vec<_> = (0..N)
        .map(|_| {
            let (s, barrier) = (s.clone(), barrier.clone());
            tokio::spawn(async move {
                let req = s.post("/charge", Some("dup"), "same");
                barrier.wait().await;
                s.send(req).await
            })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    assert_eq!(s.runs(), 1, "one effect for one key");
    let fresh: Vec<&Got> = answers
        .iter()
        .filter(|a| a.status == 201 && !a.replayed)
        .collect();
    assert_eq!(fresh.len(), 1, "{answers:?}");
    for other in answers.iter().filter(|a| a.replayed || a.status != 201) {
        if other.status == 409 {
            other.assert_problem(409, ProblemType::RequestInProgress);
            assert!(other.get("retry-after").is_some(), "{other:?}");
        } else {
            assert!(other.replayed, "{other:?}");
            assert_eq!(other.body, fresh[0].body);
        }
    }
}

#[tokio::test]
async fn the_same_key_with_another_request_is_422_saying_when_and_for_what() {
    let s = serve(engine(), |b| b).await;
    assert_eq!(s.send(s.post("/charge", Some("k"), "a")).await.status, 201);
    let other_body = s.send(s.post("/charge", Some("k"), "b")).await;
    let problem = other_body.assert_problem(422, ProblemType::KeyReused);
    assert!(
        problem["first_used_at"]
            .as_str()
            .is_some_and(|at| at.ends_with('Z')),
        "{problem}"
    );
    assert_eq!(problem["first_request_state"], "finished");
    assert_eq!(problem["first_method"], "POST");
    assert_eq!(problem["first_path"], "/charge");
    let other_query = s.send(s.post("/charge?x=1", Some("k"), "a")).await;
    other_query.assert_problem(422, ProblemType::KeyReused);
    assert_eq!(s.runs(), 1);
}

#[tokio::test]
async fn the_fingerprint_covers_the_whole_path_under_a_web_scope() {
    let s = serve(engine(), |b| b).await;
    let a = s
        .send(s.post("/accounts/A/transfers", Some("t"), "{}"))
        .await;
    assert_eq!(a.status, 201);
    let b = s
        .send(s.post("/accounts/B/transfers", Some("t"), "{}"))
        .await;
    let problem = b.assert_problem(422, ProblemType::KeyReused);
    assert_eq!(problem["first_path"], "/accounts/A/transfers");
    assert_eq!(s.runs(), 1);
}

#[tokio::test]
async fn without_a_key_requests_pass_through_unprotected() {
    let s = serve(engine(), |b| b).await;
    for run in 1..=2 {
        let got = s.send(s.post("/charge", None, "body")).await;
        assert_eq!(got.status, 201);
        assert!(!got.replayed);
        assert_eq!(got.json()["run"], run);
        assert_eq!(got.json()["echo"], "body");
    }
    // Methods not covered pass through even with a key.
    let put = s
        .http
        .put(format!("{}/charge", s.base))
        .header("idempotency-key", "k")
        .header("x-tenant", "t1");
    assert_eq!(s.send(put.try_clone().unwrap()).await.json()["run"], 3);
    assert_eq!(s.send(put).await.json()["run"], 4);
}

#[tokio::test]
async fn a_required_key_that_is_missing_is_400() {
    let s = serve(engine(), |b| b.required(true)).await;
    let got = s.send(s.post("/charge", None, "{}")).await;
    let problem = got.assert_problem(400, ProblemType::MissingKey);
    assert!(
        problem["detail"].as_str().unwrap().contains("/charge"),
        "{problem}"
    );
    assert_eq!(s.runs(), 0);
}

#[tokio::test]
async fn an_invalid_key_is_400() {
    let s = serve(engine(), |b| b).await;
    let empty = s.send(s.post("/charge", Some(""), "{}")).await;
    empty.assert_problem(400, ProblemType::InvalidKey);
    let long = "k".repeat(256);
    let too_long = s.send(s.post("/charge", Some(&long), "{}")).await;
    too_long.assert_problem(400, ProblemType::InvalidKey);
    let twice = s
        .post("/charge", Some("a"), "{}")
        .header("idempotency-key", "b");
    s.send(twice)
        .await
        .assert_problem(400, ProblemType::InvalidKey);
    assert_eq!(s.runs(), 0);
}

#[tokio::test]
async fn a_request_without_a_scope_is_rejected_by_the_scope_function() {
    let s = serve(engine(), |b| b).await;
    let anonymous = s
        .http
        .post(format!("{}/charge", s.base))
        .header("idempotency-key", "k")
        .body("{}");
    let got = s.send(anonymous).await;
    assert_eq!(got.status, 401);
    assert_eq!(got.get("content-type"), Some("application/problem+json"));
    assert_eq!(s.runs(), 0);
}

#[tokio::test]
async fn a_body_above_the_limit_is_413_declared_or_chunked() {
    let s = serve(engine(), |b| b.max_body_bytes(16)).await;
    let declared = s.send(s.post("/charge", Some("big"), "x".repeat(64))).await;
    declared.assert_problem(413, ProblemType::BodyTooLarge);

    let chunks = (0..8).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"0123456789")));
    let chunked = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let req = s.post("/charge", Some("big-chunked"), chunked);
    let got = s.send(req).await;
    assert_eq!(got.get("content-length").map(|_| ()), Some(()));
    got.assert_problem(413, ProblemType::BodyTooLarge);

    let within = s
        .send(s.post("/charge", Some("small"), "0123456789abcdef"))
        .await;
    assert_eq!(within.status, 201);
    assert_eq!(within.json()["echo"], "0123456789abcdef");
    assert_eq!(s.runs(), 1);
}

#[tokio::test]
async fn a_5xx_is_returned_once_and_its_retry_gets_outcome_unknown() {
    let s = serve(engine(), |b| b).await;
    let first = s.send(s.post("/status/500", Some("boom"), "")).await;
    assert_eq!(first.status, 500);
    assert_eq!(first.body, "status 500, run 1");
    let retry = s.send(s.post("/status/500", Some("boom"), "")).await;
    retry.assert_problem(500, ProblemType::OutcomeUnknown);
    assert_eq!(s.runs(), 1, "an ambiguous ending never runs again");
}

#[tokio::test]
async fn a_4xx_is_stored_and_replayed() {
    let s = serve(engine(), |b| b).await;
    let first = s.send(s.post("/status/404", Some("nf"), "")).await;
    assert_eq!(first.status, 404);
    let retry = s.send(s.post("/status/404", Some("nf"), "")).await;
    assert_eq!(retry.status, 404);
    assert!(retry.replayed);
    assert_eq!(retry.body, first.body);
    assert_eq!(s.runs(), 1);
}

#[tokio::test]
async fn no_effect_on_the_response_releases_the_key_for_a_fresh_retry() {
    let s = serve(engine(), |b| b).await;
    for run in 1..=2 {
        let got = s.send(s.post("/no-effect", Some("ne"), "")).await;
        assert_eq!(got.status, 503);
        assert!(!got.replayed);
        assert_eq!(got.body, "down, nothing done");
        assert_eq!(s.runs(), run);
    }
}

#[tokio::test]
async fn a_client_that_disconnects_mid_handler_does_not_stop_it() {
    let s = Arc::new(serve(engine(), |b| b).await);
    let entered = s.fx.entered.clone();
    let client = {
        let req = s.post("/slow", Some("gone"), "");
        tokio::spawn(async move { req.send().await })
    };
    entered.notified().await;
    client.abort();
    assert!(client.await.unwrap_err().is_cancelled());
    // The handler still holds the key: a retry meanwhile gets 409.
    let meanwhile = s.send(s.post("/slow", Some("gone"), "")).await;
    meanwhile.assert_problem(409, ProblemType::RequestInProgress);

    s.open_gate();
    let replay = until("the handler to finish and store", WITHIN, || {
        let s = s.clone();
        async move {
            let got = s.send(s.post("/slow", Some("gone"), "")).await;
            (got.status != 409).then_some(got)
        }
    })
    .await;
    assert_eq!(replay.status, 200);
    assert!(replay.replayed);
    assert_eq!(replay.body, "slow run 1");
    assert_eq!(s.runs(), 1);
}

#[tokio::test]
async fn with_release_on_cancel_a_disconnect_stops_the_handler_and_releases_the_key() {
    let s = Arc::new(serve(engine(), |b| b.release_on_cancel(true)).await);
    let entered = s.fx.entered.clone();
    let client = {
        let req = s.post("/slow", Some("cancel"), "");
        tokio::spawn(async move { req.send().await })
    };
    entered.notified().await;
    assert!(s.in_flight("cancel").await);
    client.abort();
    let _ = client.await;
    until("the key to be released", WITHIN, || {
        let s = s.clone();
        async move { (!s.in_flight("cancel").await).then_some(()) }
    })
    .await;
    s.open_gate();
    let retry = s.send(s.post("/slow", Some("cancel"), "")).await;
    assert_eq!(retry.status, 200);
    assert!(!retry.replayed);
    assert_eq!(retry.body, "slow run 2", "the retry ran afresh");
}

#[tokio::test]
async fn a_store_outage_is_503_and_nothing_runs() {
    let s = serve(engine(), |b| b).await;
    store_down(&s.fx.store);
    let got = s.send(s.post("/charge", Some("down"), "{}")).await;
    got.assert_problem(503, ProblemType::StoreUnavailable);
    assert_eq!(got.get("retry-after"), Some("1"));
    assert_eq!(s.runs(), 0);
}

#[tokio::test]
async fn fail_open_runs_the_handler_with_its_body_while_the_store_is_down() {
    let s = serve(engine(), |b| b.fail_open(true)).await;
    store_down(&s.fx.store);
    let got = s.send(s.post("/charge", Some("open"), "kept")).await;
    assert_eq!(got.status, 201);
    assert_eq!(got.json()["echo"], "kept");
    assert_eq!(s.runs(), 1);
}

#[tokio::test]
async fn a_key_in_the_body_is_found_and_the_body_reaches_the_handler() {
    let s = serve(engine(), |b| b.key_source(KeySource::json_field("/id"))).await;
    let first = s.send(s.post("/charge", None, r#"{"id":"evt-1"}"#)).await;
    assert_eq!(first.json()["echo"], r#"{"id":"evt-1"}"#);
    let again = s.send(s.post("/charge", None, r#"{"id":"evt-1"}"#)).await;
    assert!(again.replayed);
    // No key in the body: passed through, the body read once and handed on.
    let keyless = s.send(s.post("/charge", None, r#"{"other":1}"#)).await;
    assert_eq!(keyless.json()["echo"], r#"{"other":1}"#);
    assert_eq!(s.runs(), 2);
}

#[tokio::test]
async fn the_handler_gets_the_claim_in_its_request() {
    let s = serve(engine(), |b| b).await;
    let with_key = s.send(s.post("/claim", Some("mine"), "")).await;
    let json = with_key.json();
    assert_eq!(json["key"], "mine");
    assert_eq!(json["tenant"], "t1");
    assert_eq!(json["attempt"], 1);
    let without = s.send(s.post("/claim", None, "")).await;
    assert_eq!(without.json()["key"], serde_json::Value::Null);
}

#[tokio::test]
async fn a_handler_completes_the_key_in_its_own_transaction() {
    let s = serve(engine(), |b| b).await;
    let first = s.send(s.post("/tx", Some("tx"), "pay")).await;
    assert_eq!(first.status, 201);
    assert_eq!(first.get("x-run"), Some("1"));
    let again = s.send(s.post("/tx", Some("tx"), "pay")).await;
    assert!(again.replayed);
    assert_eq!(again.status, 201);
    assert_eq!(again.body, first.body);
    assert_eq!(again.get("x-run"), Some("1"));
    assert_eq!(again.get("content-type"), Some("application/json"));
    assert_eq!(s.runs(), 1);
}

#[tokio::test]
async fn a_panic_ends_the_key_as_outcome_unknown() {
    let s = serve(engine(), |b| b).await;
    // The panic is resumed: actix drops the connection.
    assert!(s.post("/panic", Some("p"), "").send().await.is_err());
    let retry = s.send(s.post("/panic", Some("p"), "")).await;
    retry.assert_problem(500, ProblemType::OutcomeUnknown);
    assert_eq!(s.runs(), 1);
}

#[tokio::test]
async fn a_response_too_large_to_store_is_sent_whole_and_marked_not_stored() {
    let policy = Policy::default().with_max_outcome_bytes(1024);
    let s = serve(engine().with_policy(policy).unwrap(), |b| b).await;
    for (path, byte) in [("/big", b'x'), ("/big-stream", b'y')] {
        let first = s.send(s.post(path, Some(path), "")).await;
        assert_eq!(first.status, 201);
        assert_eq!(first.body.len(), 4096, "{path}");
        assert!(first.body.iter().all(|b| *b == byte));
        let retry = s.send(s.post(path, Some(path), "")).await;
        retry.assert_problem(500, ProblemType::ResponseNotStored);
    }
    assert_eq!(s.runs(), 2);
}

#[tokio::test]
async fn a_body_that_fails_mid_stream_ends_the_key_as_outcome_unknown() {
    let s = serve(engine(), |b| b).await;
    let first = s.post("/broken", Some("br"), "").send().await;
    // The first client gets what was read, then a broken body.
    if let Ok(res) = first {
        assert!(res.bytes().await.is_err());
    }
    let retry = s.send(s.post("/broken", Some("br"), "")).await;
    retry.assert_problem(500, ProblemType::OutcomeUnknown);
    assert_eq!(s.runs(), 1);
}

#[tokio::test]
async fn after_shutdown_keyed_requests_get_503_and_nothing_runs() {
    let s = serve(engine(), |b| b).await;
    let report = s.idem.shutdown(Duration::ZERO).await;
    assert_eq!(report.left_in_flight, 0);
    let got = s.send(s.post("/charge", Some("late"), "{}")).await;
    got.assert_problem(503, ProblemType::ShuttingDown);
    assert!(got.get("retry-after").is_some());
    assert_eq!(s.runs(), 0);
}
