//! The middleware against a scripted server (a last middleware that answers
//! from a script, or dials a closed port for a real connection error):
//! which requests it touches, the key, when it re-sends, what it returns.
//! Waits run on Tokio's paused clock where the script has no I/O, so
//! `Retry-After` and the budget are checked to the millisecond without
//! sleeping.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Extensions, HeaderMap, HeaderValue, Method, StatusCode};
use idem_client::reqwest_middleware::{
    self, ClientBuilder, ClientWithMiddleware, Middleware, Next,
};
use idem_client::{
    Failure, IdempotencyError, IdempotencyMiddleware, IdempotencyResponseExt, Jitter, Key,
    KeyError, Problem, Protected, RetryPolicy, Unprotected,
};
use reqwest::{Request, Response};
use tokio::time::Instant;

const MS: Duration = Duration::from_millis(1);

/// What the scripted server does with one request.
#[derive(Clone, Debug)]
enum Step {
    /// Answer with this status, headers and body.
    Answer(u16, Vec<(&'static str, &'static str)>, &'static str),
    /// A real connection error (dials a closed loopback port).
    Refuse,
    /// Never answer.
    Hang,
}

fn answer(status: u16) -> Step {
    Step::Answer(status, vec![], "")
}

fn problem(problem: Problem, extra: Vec<(&'static str, &'static str)>) -> Step {
    let mut headers = vec![("content-type", "application/problem+json")];
    headers.extend(extra);
    let body: &'static str = Box::leak(
        format!(
            r#"{{"type":"{}","title":"t","status":{},"detail":"d"}}"#,
            problem.uri(),
            problem.status().as_u16()
        )
        .into_boxed_str(),
    );
    Step::Answer(problem.status().as_u16(), headers, body)
}

/// A request as the server got it.
#[derive(Clone, Debug)]
struct Received {
    method: Method,
    headers: HeaderMap,
    body: Option<Vec<u8>>,
    at: Instant,
}

impl Received {
    fn key_header(&self) -> Option<&HeaderValue> {
        self.headers.get("idempotency-key")
    }
}

#[derive(Clone, Default)]
struct Script {
    steps: Arc<Mutex<VecDeque<Step>>>,
    received: Arc<Mutex<Vec<Received>>>,
}

impl Script {
    fn new(steps: impl IntoIterator<Item = Step>) -> Self {
        let script = Self::default();
        script.steps.lock().unwrap().extend(steps);
        script
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

#[async_trait::async_trait]
impl Middleware for Script {
    async fn handle(
        &self,
        mut request: Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<Response> {
        self.received.lock().unwrap().push(Received {
            method: request.method().clone(),
            headers: request.headers().clone(),
            body: request
                .body()
                .and_then(|b| b.as_bytes())
                .map(<[u8]>::to_vec),
            at: Instant::now(),
        });
        let step = self
            .steps
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or_else(|| Step::Answer(200, vec![], "default"));
        match step {
            Step::Answer(status, headers, body) => {
                let mut response = http::Response::new(body);
                *response.status_mut() = StatusCode::from_u16(status).unwrap();
                for (name, value) in headers {
                    response
                        .headers_mut()
                        .append(name, HeaderValue::from_static(value));
                }
                response
                    .headers_mut()
                    .insert("content-length", HeaderValue::from(body.len()));
                Ok(Response::from(response))
            }
            Step::Refuse => {
                *request.url_mut() = "http://127.0.0.1:1/".parse().unwrap();
                next.run(request, extensions).await
            }
            Step::Hang => std::future::pending().await,
        }
    }
}

/// Tiny, deterministic waits.
fn fast() -> RetryPolicy {
    RetryPolicy::default()
        .backoff(MS, 20 * MS)
        .jitter(Jitter::None)
        .budget(Duration::from_secs(30))
}

fn client(middleware: IdempotencyMiddleware, script: &Script) -> ClientWithMiddleware {
    ClientBuilder::new(reqwest::Client::new())
        .with(middleware)
        .with(script.clone())
        .build()
}

fn fast_client(script: &Script) -> ClientWithMiddleware {
    client(
        IdempotencyMiddleware::builder().policy(fast()).build(),
        script,
    )
}

fn gave_up(error: reqwest_middleware::Error) -> IdempotencyError {
    match error {
        reqwest_middleware::Error::Middleware(e) => e
            .downcast::<IdempotencyError>()
            .expect("the middleware's own error"),
        other => panic!("not the middleware's error: {other:?}"),
    }
}

const URL: &str = "http://api.test/payments";

#[tokio::test(start_paused = true)]
async fn unprotected_requests_pass_through_untouched() {
    for method in [Method::GET, Method::PUT, Method::DELETE, Method::HEAD] {
        let script = Script::new([answer(503), answer(200)]);
        let response = fast_client(&script)
            .request(method.clone(), URL)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 503, "{method}: not re-sent");
        assert!(response.idempotency().is_none(), "{method}");
        let received = script.received();
        assert_eq!(received.len(), 1, "{method}");
        assert_eq!(received[0].key_header(), None, "{method}: no key added");
    }
    // The Unprotected marker opts a POST out, even with a Key extension;
    // a caller's own header is left as it is.
    let script = Script::new([answer(503)]);
    let response = fast_client(&script)
        .post(URL)
        .header("idempotency-key", "not a key, not our business")
        .with_extension(Unprotected)
        .with_extension(Key::new("k").unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert!(response.idempotency().is_none());
    let received = script.received();
    assert_eq!(received.len(), 1);
    assert_eq!(
        received[0].key_header().unwrap(),
        "not a key, not our business"
    );
}

#[tokio::test(start_paused = true)]
async fn each_logical_request_gets_a_fresh_key_sent_on_every_resend() {
    let script = Script::new([
        answer(503),
        Step::Answer(409, vec![("retry-after", "1")], ""),
        answer(502),
        Step::Answer(201, vec![("idempotent-replayed", "true")], "paid"),
    ]);
    let client = fast_client(&script);
    let response = client
        .post(URL)
        .body("{\"amount\":1}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let info = response.idempotency().unwrap().clone();
    assert_eq!(info.attempts, 4);
    assert!(info.replayed);
    assert_eq!(info.problem, None);
    assert_eq!(response.text().await.unwrap(), "paid");

    let received = script.received();
    assert_eq!(received.len(), 4);
    let sent = received[0]
        .key_header()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    // A quoted (RFC 8941) UUID v4, the one in the info.
    assert_eq!(sent, format!("\"{}\"", info.key));
    assert_eq!(info.key.as_str().len(), 36);
    for r in &received {
        assert_eq!(
            r.key_header().unwrap(),
            sent.as_str(),
            "same key every time"
        );
        assert_eq!(r.body.as_deref(), Some(&b"{\"amount\":1}"[..]), "same body");
        assert_eq!(r.method, Method::POST);
    }

    // A second logical request: a new key.
    let response = client.post(URL).body("{}").send().await.unwrap();
    let second = response.idempotency().unwrap();
    assert_eq!(second.attempts, 1);
    assert_ne!(second.key, info.key);
    // PATCH is protected by default too.
    let response = client.patch(URL).body("{}").send().await.unwrap();
    assert!(response.idempotency().is_some());
}

#[tokio::test(start_paused = true)]
async fn a_callers_key_is_kept() {
    // A bare header value is sent byte for byte.
    let script = Script::new([answer(503), answer(201)]);
    let client = fast_client(&script);
    let response = client
        .post(URL)
        .header("Idempotency-Key", "order-1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.idempotency().unwrap().key.as_str(), "order-1");
    for r in script.received() {
        assert_eq!(r.key_header().unwrap(), "order-1");
    }

    // A Key extension is sent quoted; a matching header is fine.
    let script = Script::new([answer(429), answer(201)]);
    let client = fast_client(&script);
    let key = Key::new("order-\"2\"").unwrap();
    let response = client
        .post(URL)
        .with_extension(key.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.idempotency().unwrap().key, key);
    assert_eq!(response.idempotency().unwrap().attempts, 2);
    for r in script.received() {
        assert_eq!(r.key_header().unwrap(), r#""order-\"2\"""#);
    }
    let response = client
        .post(URL)
        .header("idempotency-key", "\"k3\"")
        .with_extension(Key::new("k3").unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.idempotency().unwrap().key.as_str(), "k3");

    // A Key extension protects any method.
    let script = Script::new([answer(503), answer(200)]);
    let response = fast_client(&script)
        .put(URL)
        .with_extension(Key::new("put-1").unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.idempotency().unwrap().attempts, 2);
    // So does the Protected marker (with a fresh key).
    let script = Script::new([answer(503), answer(200)]);
    let response = fast_client(&script)
        .get(URL)
        .with_extension(Protected)
        .send()
        .await
        .unwrap();
    assert_eq!(response.idempotency().unwrap().attempts, 2);
    assert!(script.received()[0].key_header().is_some());
}

#[tokio::test(start_paused = true)]
async fn bad_caller_keys_send_nothing() {
    let script = Script::default();
    let client = fast_client(&script);
    let error = gave_up(
        client
            .post(URL)
            .header("idempotency-key", "two words")
            .send()
            .await
            .unwrap_err(),
    );
    assert!(matches!(
        error,
        IdempotencyError::InvalidKey(KeyError::InvalidByte { byte: b' ', .. })
    ));
    let error = gave_up(
        client
            .post(URL)
            .header("idempotency-key", "a")
            .header("idempotency-key", "b")
            .send()
            .await
            .unwrap_err(),
    );
    assert!(matches!(
        error,
        IdempotencyError::InvalidKey(KeyError::Multiple { count: 2 })
    ));
    let error = gave_up(
        client
            .post(URL)
            .header("idempotency-key", "a")
            .with_extension(Key::new("b").unwrap())
            .send()
            .await
            .unwrap_err(),
    );
    assert!(matches!(error, IdempotencyError::ConflictingKeys { .. }));
    assert_eq!(error.key(), None);
    assert_eq!(error.attempts(), 0);
    assert!(script.received().is_empty());
}

#[tokio::test(start_paused = true)]
async fn final_answers_are_never_resent() {
    let cases = [
        (
            problem(Problem::KeyReused, vec![]),
            Some(Problem::KeyReused),
        ),
        (
            problem(Problem::OutcomeUnknown, vec![]),
            Some(Problem::OutcomeUnknown),
        ),
        (
            problem(
                Problem::ResponseNotStored,
                vec![("idempotent-replayed", "true")],
            ),
            Some(Problem::ResponseNotStored),
        ),
        (
            problem(Problem::CorruptRecord, vec![]),
            Some(Problem::CorruptRecord),
        ),
        (
            problem(Problem::InvalidKey, vec![]),
            Some(Problem::InvalidKey),
        ),
        (
            problem(Problem::BodyTooLarge, vec![]),
            Some(Problem::BodyTooLarge),
        ),
        // The API's own 422 (another problem type), 4xx, a 409 without
        // Retry-After, a 501.
        (
            Step::Answer(
                422,
                vec![("content-type", "application/problem+json")],
                r#"{"type":"https://example.com/invalid-payment","status":422}"#,
            ),
            None,
        ),
        (answer(400), None),
        (answer(404), None),
        (answer(408), None),
        (answer(409), None),
        (answer(501), None),
        (answer(200), None),
        (answer(303), None),
        // A replayed answer is final whatever its status.
        (
            Step::Answer(503, vec![("idempotent-replayed", "true")], ""),
            None,
        ),
        (
            Step::Answer(
                429,
                vec![("idempotent-replayed", "true"), ("retry-after", "1")],
                "",
            ),
            None,
        ),
    ];
    for (step, want) in cases {
        let script = Script::new([step.clone(), answer(201)]);
        let response = fast_client(&script).post(URL).send().await.unwrap();
        let info = response.idempotency().unwrap();
        assert_eq!(info.attempts, 1, "{step:?}");
        assert_eq!(info.problem, want, "{step:?}");
        assert_eq!(info.key_reused(), want == Some(Problem::KeyReused));
        assert_eq!(script.received().len(), 1, "{step:?}: never re-sent");
        assert_ne!(response.status(), 201, "{step:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn resendable_answers_are_resent() {
    let cases = [
        problem(Problem::RequestInProgress, vec![("retry-after", "1")]),
        problem(Problem::StoreUnavailable, vec![("retry-after", "1")]),
        problem(Problem::ShuttingDown, vec![("retry-after", "1")]),
        problem(Problem::StoreFailed, vec![]),
        problem(Problem::BodyUnreadable, vec![]),
        Step::Answer(409, vec![("retry-after", "0")], ""),
        answer(429),
        answer(500),
        answer(502),
        answer(503),
        answer(504),
    ];
    for step in cases {
        let script = Script::new([step.clone(), answer(201)]);
        let response = fast_client(&script).post(URL).send().await.unwrap();
        assert_eq!(response.status(), 201, "{step:?}");
        assert_eq!(response.idempotency().unwrap().attempts, 2, "{step:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured_and_never_waited_past_the_budget() {
    // Wait at least Retry-After (2 s), far above the backoff.
    let script = Script::new([
        Step::Answer(409, vec![("retry-after", "2")], ""),
        Step::Answer(503, vec![("retry-after", "1")], ""),
        answer(201),
    ]);
    let response = fast_client(&script).post(URL).send().await.unwrap();
    assert_eq!(response.idempotency().unwrap().attempts, 3);
    let r = script.received();
    assert!(r[1].at - r[0].at >= Duration::from_secs(2));
    assert!(r[1].at - r[0].at < Duration::from_secs(2) + 10 * MS);
    assert!(r[2].at - r[1].at >= Duration::from_secs(1));

    // A cap shortens a long Retry-After.
    let script = Script::new([
        Step::Answer(409, vec![("retry-after", "2")], ""),
        answer(201),
    ]);
    let middleware = IdempotencyMiddleware::builder()
        .policy(fast().retry_after_cap(5 * MS))
        .build();
    client(middleware, &script).post(URL).send().await.unwrap();
    let r = script.received();
    assert!(r[1].at - r[0].at >= 5 * MS);
    assert!(r[1].at - r[0].at < 10 * MS);

    // A Retry-After beyond the budget: stop at once, do not sleep into it.
    let script = Script::new([
        Step::Answer(503, vec![("retry-after", "5")], "store down"),
        answer(201),
    ]);
    let middleware = IdempotencyMiddleware::builder()
        .policy(fast().budget(Duration::from_secs(1)))
        .build();
    let started = Instant::now();
    let error = gave_up(
        client(middleware, &script)
            .post(URL)
            .send()
            .await
            .unwrap_err(),
    );
    assert!(started.elapsed() < 10 * MS, "did not sleep");
    let IdempotencyError::BudgetSpent {
        attempts,
        budget,
        last,
        key,
    } = &error
    else {
        panic!("{error:?}");
    };
    assert_eq!((*attempts, *budget), (1, Duration::from_secs(1)));
    assert_eq!(error.key(), Some(key));
    let Failure::Status {
        status,
        retry_after,
        body,
        ..
    } = last
    else {
        panic!("{last:?}");
    };
    assert_eq!(*status, 503);
    assert_eq!(*retry_after, Some(Duration::from_secs(5)));
    assert_eq!(body, &Bytes::from_static(b"store down"));
    assert_eq!(script.received().len(), 1);
    // The source chain names the last failure.
    let source = std::error::Error::source(&error).unwrap().to_string();
    assert!(source.contains("503"), "{source}");
}

#[tokio::test(start_paused = true)]
async fn the_budget_cuts_a_hanging_attempt_and_attempts_are_counted() {
    // A hung attempt is cut off by the attempt timeout and re-sent.
    let script = Script::new([Step::Hang, answer(201)]);
    let middleware = IdempotencyMiddleware::builder()
        .policy(fast().attempt_timeout(100 * MS))
        .build();
    let response = client(middleware, &script).post(URL).send().await.unwrap();
    assert_eq!(response.idempotency().unwrap().attempts, 2);
    let r = script.received();
    assert!(r[1].at - r[0].at >= 100 * MS);

    // Hanging until the budget: given up when it runs out.
    let script = Script::new([Step::Hang]);
    let middleware = IdempotencyMiddleware::builder()
        .policy(fast().budget(Duration::from_secs(3)))
        .build();
    let started = Instant::now();
    let error = gave_up(
        client(middleware, &script)
            .post(URL)
            .send()
            .await
            .unwrap_err(),
    );
    assert_eq!(started.elapsed(), Duration::from_secs(3));
    assert!(matches!(
        error,
        IdempotencyError::BudgetSpent {
            attempts: 1,
            last: Failure::TimedOut(_),
            ..
        }
    ));
    assert!(error.last().unwrap().is_timeout());

    // Max attempts.
    let script = Script::new([answer(503), answer(503), answer(503), answer(201)]);
    let middleware = IdempotencyMiddleware::builder()
        .policy(fast().max_attempts(3))
        .build();
    let error = gave_up(
        client(middleware, &script)
            .post(URL)
            .send()
            .await
            .unwrap_err(),
    );
    assert!(matches!(
        error,
        IdempotencyError::AttemptsExhausted { attempts: 3, .. }
    ));
    assert_eq!(
        error.last().unwrap().status(),
        Some(StatusCode::SERVICE_UNAVAILABLE)
    );
    assert_eq!(script.received().len(), 3);

    // Exponential backoff without jitter: 1, 2, 4, 8 ms.
    let script = Script::new([
        answer(503),
        answer(503),
        answer(503),
        answer(503),
        answer(201),
    ]);
    fast_client(&script).post(URL).send().await.unwrap();
    let r = script.received();
    let gaps: Vec<Duration> = r.windows(2).map(|w| w[1].at - w[0].at).collect();
    assert_eq!(gaps, [MS, 2 * MS, 4 * MS, 8 * MS]);
}

#[tokio::test(start_paused = true)]
async fn a_request_policy_replaces_the_middlewares() {
    let script = Script::new([answer(503), answer(201)]);
    let error = gave_up(
        fast_client(&script)
            .post(URL)
            .with_extension(RetryPolicy::no_retry())
            .send()
            .await
            .unwrap_err(),
    );
    assert!(matches!(
        error,
        IdempotencyError::AttemptsExhausted { attempts: 1, .. }
    ));
}

#[tokio::test]
async fn connection_errors_are_resent() {
    let script = Script::new([Step::Refuse, Step::Refuse, answer(201)]);
    let response = fast_client(&script)
        .post(URL)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(response.idempotency().unwrap().attempts, 3);

    let script = Script::new([Step::Refuse, Step::Refuse]);
    let middleware = IdempotencyMiddleware::builder()
        .policy(fast().max_attempts(2))
        .build();
    let error = gave_up(
        client(middleware, &script)
            .post(URL)
            .send()
            .await
            .unwrap_err(),
    );
    let Some(Failure::Transport(e)) = error.last() else {
        panic!("{error:?}");
    };
    assert!(e.is_connect(), "{e:?}");
}

#[tokio::test(start_paused = true)]
async fn a_streaming_body_is_sent_once() {
    let stream = || reqwest::Body::wrap(http_body_util::Full::new(Bytes::from_static(b"{}")));
    // Fine when the first attempt is final...
    let script = Script::new([answer(201)]);
    let response = fast_client(&script)
        .post(URL)
        .body(stream())
        .send()
        .await
        .unwrap();
    assert_eq!(response.idempotency().unwrap().attempts, 1);
    // ...reported when it is not: no re-send was possible.
    let script = Script::new([answer(503), answer(201)]);
    let error = gave_up(
        fast_client(&script)
            .post(URL)
            .body(stream())
            .send()
            .await
            .unwrap_err(),
    );
    assert!(matches!(
        error,
        IdempotencyError::NotResendable { attempts: 1, .. }
    ));
    assert!(error.key().is_some());
    assert_eq!(script.received().len(), 1);
}

#[tokio::test]
async fn the_observer_sees_every_attempt() {
    #[derive(Clone, Debug, PartialEq)]
    struct Tag(&'static str);
    type Log = Vec<(Option<&'static str>, u32, Option<u16>, bool, bool)>;
    let log: Arc<Mutex<Log>> = Arc::default();
    let sink = log.clone();
    let middleware = IdempotencyMiddleware::builder()
        .policy(fast())
        .on_attempt(move |e| {
            sink.lock().unwrap().push((
                e.extensions.get::<Tag>().map(|t| t.0),
                e.attempt,
                e.status.map(|s| s.as_u16()),
                e.failure.is_some(),
                e.last,
            ));
        })
        .jitter_seed(7)
        .build();
    let script = Script::new([
        Step::Refuse,
        Step::Answer(409, vec![("retry-after", "0")], ""),
        problem(Problem::KeyReused, vec![]),
    ]);
    let response = client(middleware, &script)
        .post(URL)
        .with_extension(Tag("t1"))
        .send()
        .await
        .unwrap();
    assert!(response.idempotency().unwrap().key_reused());
    assert_eq!(
        *log.lock().unwrap(),
        [
            (Some("t1"), 1, None, true, false),
            (Some("t1"), 2, Some(409), true, false),
            (Some("t1"), 3, Some(422), false, true),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn buffered_answers_keep_their_parts() {
    let script = Script::new([Step::Answer(
        201,
        vec![("content-type", "application/json"), ("x-id", "1")],
        "{\"id\":1}",
    )]);
    let response = fast_client(&script).post(URL).send().await.unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(response.headers()["x-id"], "1");
    assert_eq!(response.content_length(), Some(8));
    assert!(response.idempotency().is_some());
    assert_eq!(response.bytes().await.unwrap(), "{\"id\":1}");
}

#[test]
fn names_match_the_server() {
    for p in Problem::ALL {
        let server = idem_tower::ProblemType::ALL
            .into_iter()
            .find(|t| t.uri() == p.uri())
            .unwrap_or_else(|| panic!("{p:?} is not an idem-tower problem type"));
        assert_eq!(server.status(), p.status(), "{p:?}");
    }
    assert_eq!(Problem::ALL.len(), idem_tower::ProblemType::ALL.len());
    assert_eq!(
        idem_client::IDEMPOTENT_REPLAYED,
        idem_tower::IDEMPOTENT_REPLAYED
    );
    assert_eq!(idem_client::IDEMPOTENCY_KEY, idem_tower::DEFAULT_HEADER);
}
