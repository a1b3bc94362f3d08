//! idem-nats against a real NATS server with JetStream (`IDEM_NATS_URL`,
//! default nats://127.0.0.1:4222): each test makes its own stream and durable
//! pull consumer (names with a random suffix) and deletes them at the end.
//! With the server unreachable every test is reported IGNORED with a banner
//! (FAILED under CI=true / IDEM_REQUIRE_BACKENDS=1).
//!
//! What is counted is the promise: how many times each handler ran, what
//! JetStream was told, and what JetStream still holds.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::{PullConsumer, pull};
use async_nats::jetstream::{self, stream};
use futures_util::StreamExt;
use idem_core::{
    Clock as _, DeadLetterReason, Delivery, Engine, Handled, MIN_RETRY, ManualClock, MemoryStore,
    Outcome, Policy, RetryReason, Scope, SystemClock,
};
use idem_nats::{
    Config, Consumer, DEAD_LETTER_KEY_HEADER, DEAD_LETTER_REASON_HEADER, DeadLetterCause, Event,
    KeySource, ORIGINAL_SUBJECT_HEADER, Settlement,
};
use idem_testkit::runner::{Runner, Trial};
use idem_testkit::wait;

const NATS: &str = "nats";
const KEY: &str = "Idempotency-Key";
const MSG_ID: &str = "Nats-Msg-Id";

fn main() -> ExitCode {
    Runner::new("idem-nats")
        .with_default_test_threads(4)
        .requirement(NATS, probe)
        .trial(trial("fresh_message_runs_once_and_is_acked", fresh))
        .trial(trial(
            "copies_with_one_key_run_once_and_are_all_acked",
            copies,
        ))
        .trial(trial(
            "msg_id_fallback_outside_the_duplicate_window",
            msg_id_fallback,
        ))
        .trial(trial(
            "in_flight_elsewhere_is_naked_with_a_delay_not_spun",
            in_flight,
        ))
        .trial(trial(
            "payload_mismatch_is_terminated_and_copied_to_the_dead_letter_subject",
            mismatch,
        ))
        .trial(trial("missing_key_is_terminated_unrun", missing_key))
        .trial(trial("progress_keeps_a_long_handler_s_delivery", progress))
        .trial(trial(
            "run_handles_a_stream_of_duplicates_once_each",
            run_loop,
        ))
        .trial(trial(
            "run_keeps_the_deliveries_waiting_for_a_slot",
            run_waiting,
        ))
        .trial(trial(
            "run_over_a_push_consumer_shared_by_two_processes",
            run_push,
        ))
        .run()
}

/// The NATS server, reachable and with JetStream.
async fn probe() -> Result<(), String> {
    let url = idem_testkit::env::nats_url();
    let hint = "start nats-server -js, or set IDEM_NATS_URL";
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(3))
        .connect(url.as_str())
        .await
        .map_err(|e| format!("NATS is unreachable at {url}: {e} ({hint})"))?;
    // `$JS.API.INFO` answers with an error (or no responders) where
    // JetStream is off. A raw request: the client's typed account info
    // wants fields older servers do not send.
    let reply = tokio::time::timeout(
        Duration::from_secs(3),
        client.request("$JS.API.INFO", "".into()),
    )
    .await
    .map_err(|_| format!("NATS at {url} did not answer a JetStream request ({hint})"))?
    .map_err(|e| format!("NATS at {url} has no JetStream: {e} ({hint})"))?;
    let body = String::from_utf8_lossy(&reply.payload);
    if body.contains("\"error\"") {
        return Err(format!("NATS at {url} has no JetStream: {body} ({hint})"));
    }
    Ok(())
}

async fn connect() -> jetstream::Context {
    let client = async_nats::connect(idem_testkit::env::nats_url())
        .await
        .expect("NATS (probed)");
    jetstream::new(client)
}

/// This run's random tag: stream names are `IDEM_NATS_<run>_<n>`.
fn unique() -> String {
    static RUN: OnceLock<String> = OnceLock::new();
    static N: AtomicUsize = AtomicUsize::new(0);
    let run = RUN.get_or_init(|| format!("{:08x}", fastrand::u32(..)));
    format!("IDEM_NATS_{run}_{}", N.fetch_add(1, Ordering::SeqCst))
}

/// A trial on a stream of its own, deleted afterwards whatever happened.
fn trial<F, Fut>(name: &str, body: F) -> Trial
where
    F: FnOnce(String) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let stream = unique();
    let doomed = stream.clone();
    Trial::test(name, move || body(stream))
        .requires(NATS)
        .with_teardown(move || async move {
            match connect().await.delete_stream(&doomed).await {
                Ok(_) => Ok(()),
                Err(e) if e.to_string().contains("not found") => Ok(()),
                Err(e) => Err(format!("deleting stream {doomed}: {e}")),
            }
        })
}

/// A test stream: work subject `<s>.in` (the consumer's), dead letters on
/// `<s>.dead`, one durable pull consumer.
struct Fixture {
    js: jetstream::Context,
    work: String,
    dead: String,
    consumer: PullConsumer,
}

impl Fixture {
    async fn new(name: &str, ack_wait: Duration, duplicate_window: Option<Duration>) -> Self {
        let js = connect().await;
        let base = name.to_ascii_lowercase();
        let work = format!("{base}.in");
        let dead = format!("{base}.dead");
        let stream = js
            .create_stream(stream::Config {
                name: name.to_string(),
                subjects: vec![format!("{base}.>")],
                duplicate_window: duplicate_window.unwrap_or(Duration::from_secs(120)),
                ..Default::default()
            })
            .await
            .expect("create stream");
        let consumer = stream
            .create_consumer(pull::Config {
                durable_name: Some("work".into()),
                filter_subject: work.clone(),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait,
                ..Default::default()
            })
            .await
            .expect("create consumer");
        Self {
            js,
            work,
            dead,
            consumer,
        }
    }

    async fn publish(
        &self,
        key: Option<&str>,
        msg_id: Option<&str>,
        payload: &'static [u8],
    ) -> jetstream::publish::PublishAck {
        let mut headers = HeaderMap::new();
        if let Some(key) = key {
            headers.insert(KEY, key);
        }
        if let Some(id) = msg_id {
            headers.insert(MSG_ID, id);
        }
        self.js
            .publish_with_headers(self.work.clone(), headers, payload.into())
            .await
            .expect("publish")
            .await
            .expect("publish ack")
    }

    /// The next delivery, waiting at most `wait` for one.
    async fn next(&self, wait: Duration) -> Option<jetstream::Message> {
        let mut batch = self
            .consumer
            .fetch()
            .max_messages(1)
            .expires(wait)
            .messages()
            .await
            .expect("fetch");
        batch.next().await.map(|m| m.expect("message"))
    }

    async fn info(&self) -> jetstream::consumer::Info {
        self.consumer.get_info().await.expect("consumer info")
    }

    /// Waits (polling, with a deadline) until nothing is pending or
    /// unacknowledged, and returns the consumer's info then.
    async fn drained(&self) -> jetstream::consumer::Info {
        wait::until(
            "nothing pending or unacknowledged",
            Duration::from_secs(10),
            || async {
                let info = self.info().await;
                (info.num_pending == 0 && info.num_ack_pending == 0).then_some(info)
            },
        )
        .await
    }
}

fn engine(lease: Duration) -> Engine<Arc<MemoryStore>> {
    Engine::new(Arc::new(MemoryStore::new()))
        .with_policy(Policy::default().with_lease(lease))
        .expect("policy")
}

fn scope() -> Scope {
    Scope::tenant("billing").with_operation("invoice.paid")
}

/// A handler that counts its runs per key and completes.
fn counting(
    runs: &Arc<Mutex<HashMap<String, usize>>>,
) -> impl Fn(idem_core::Lease, idem_nats::Message) -> std::future::Ready<Handled> + Clone + use<> {
    let runs = runs.clone();
    move |_lease, message| {
        *runs
            .lock()
            .unwrap()
            .entry(message.key().unwrap_or("").to_string())
            .or_default() += 1;
        std::future::ready(Handled::Complete(Outcome::new(&b"done"[..])))
    }
}

fn runs_of(runs: &Arc<Mutex<HashMap<String, usize>>>, key: &str) -> usize {
    runs.lock().unwrap().get(key).copied().unwrap_or(0)
}

const WAIT: Duration = Duration::from_secs(5);

async fn fresh(stream: String) {
    let f = Fixture::new(&stream, Duration::from_secs(30), None).await;
    let consumer = Consumer::new(engine(Duration::from_secs(30)), scope());
    let runs = Arc::default();
    f.publish(Some("order-1"), None, b"{\"order\":1}").await;

    let message = f.next(WAIT).await.expect("delivered");
    let processed = consumer
        .process(&message, counting(&runs))
        .await
        .expect("settled");
    assert_eq!(processed.key.as_deref(), Some("order-1"));
    assert_eq!(processed.settlement, Settlement::Acked { replayed: false });
    assert!(matches!(
        processed.delivery,
        Some(Delivery::Ack {
            replayed: false,
            ..
        })
    ));
    assert_eq!(runs_of(&runs, "order-1"), 1);
    let info = f.drained().await;
    assert_eq!(info.num_redelivered, 0);
    assert_eq!(info.delivered.stream_sequence, 1, "delivered once");
    assert!(
        f.next(Duration::from_millis(300)).await.is_none(),
        "an acknowledged message came back"
    );
}

async fn copies(stream: String) {
    let f = Fixture::new(&stream, Duration::from_secs(30), None).await;
    let consumer = Consumer::new(engine(Duration::from_secs(30)), scope());
    let runs = Arc::default();
    // A publisher retrying with a new Nats-Msg-Id each time: JetStream
    // stores every copy (its deduplication only knows the id)...
    let first = f
        .publish(Some("order-2"), Some("try-1"), b"{\"order\":2}")
        .await;
    let second = f
        .publish(Some("order-2"), Some("try-2"), b"{\"order\":2}")
        .await;
    assert!(!first.duplicate && !second.duplicate);
    // ...while a copy with the same Nats-Msg-Id within the window is dropped.
    let third = f
        .publish(Some("order-2"), Some("try-2"), b"{\"order\":2}")
        .await;
    assert!(third.duplicate, "JetStream's own window deduplicates");

    let mut settlements = Vec::new();
    for _ in 0..2 {
        let message = f.next(WAIT).await.expect("delivered");
        let processed = consumer
            .process(&message, counting(&runs))
            .await
            .expect("settled");
        settlements.push(processed.settlement);
    }
    assert_eq!(
        settlements,
        [
            Settlement::Acked { replayed: false },
            Settlement::Acked { replayed: true }
        ]
    );
    assert_eq!(runs_of(&runs, "order-2"), 1, "the handler ran once");
    let info = f.drained().await;
    assert_eq!(info.num_redelivered, 0);
    assert_eq!(info.delivered.stream_sequence, 2);
}

async fn msg_id_fallback(stream: String) {
    // A duplicate window of 100 ms: the publisher's retry after it is stored
    // again, under the same Nats-Msg-Id.
    let f = Fixture::new(
        &stream,
        Duration::from_secs(30),
        Some(Duration::from_millis(100)),
    )
    .await;
    let consumer = Consumer::new(engine(Duration::from_secs(30)), scope());
    let runs = Arc::default();
    assert!(
        !f.publish(None, Some("evt-7"), b"{\"event\":7}")
            .await
            .duplicate
    );
    wait::until_true(
        "the end of the duplicate window",
        Duration::from_secs(10),
        || async {
            !f.publish(None, Some("evt-7"), b"{\"event\":7}")
                .await
                .duplicate
        },
    )
    .await;

    let mut settlements = Vec::new();
    for _ in 0..2 {
        let message = f.next(WAIT).await.expect("delivered");
        let view = consumer.message(&message);
        assert_eq!(view.key(), Some("evt-7"));
        assert_eq!(view.key_source(), KeySource::MsgId);
        let processed = consumer
            .process(&message, counting(&runs))
            .await
            .expect("settled");
        settlements.push(processed.settlement);
    }
    assert_eq!(
        settlements,
        [
            Settlement::Acked { replayed: false },
            Settlement::Acked { replayed: true }
        ]
    );
    assert_eq!(runs_of(&runs, "evt-7"), 1);
    f.drained().await;

    // The header wins over Nats-Msg-Id.
    f.publish(Some("order-8"), Some("evt-8"), b"{\"order\":8}")
        .await;
    let message = f.next(WAIT).await.expect("delivered");
    assert_eq!(consumer.message(&message).key(), Some("order-8"));
    assert_eq!(consumer.message(&message).key_source(), KeySource::Header);
    consumer
        .process(&message, counting(&runs))
        .await
        .expect("settled");
}

async fn in_flight(stream: String) {
    let f = Fixture::new(&stream, Duration::from_secs(30), None).await;
    // Two consumer processes: separate engines over one store. Their time is
    // a `ManualClock` that never moves: A's lease cannot lapse while B looks
    // at the key (on real time a late heartbeat of A would let B take it
    // over), and the delay B is given is the whole lease. JetStream's
    // redelivery delay is real time.
    let store = Arc::new(MemoryStore::new());
    let lease = Duration::from_millis(1500);
    let clock = ManualClock::new(SystemClock.now());
    let engine = |store: &Arc<MemoryStore>| {
        Engine::with_clock(store.clone(), clock.clone())
            .with_policy(Policy::default().with_lease(lease))
            .expect("policy")
    };
    let a = Consumer::new(engine(&store), scope());
    let b = Consumer::new(engine(&store), scope());
    f.publish(Some("order-3"), Some("try-1"), b"{\"order\":3}")
        .await;
    f.publish(Some("order-3"), Some("try-2"), b"{\"order\":3}")
        .await;

    // A takes the first copy and holds it in its handler.
    let runs = Arc::new(AtomicUsize::new(0));
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let first = f.next(WAIT).await.expect("first copy");
    let holder = {
        let runs = runs.clone();
        tokio::spawn(async move {
            a.process(&first, move |_lease, _message| async move {
                runs.fetch_add(1, Ordering::SeqCst);
                let _ = started_tx.send(());
                let _ = release_rx.await;
                Handled::Complete(Outcome::new(&b"done"[..]))
            })
            .await
        })
    };
    started_rx.await.expect("A's handler started");

    // B gets the second copy: the key is in flight on A.
    let second = f.next(WAIT).await.expect("second copy");
    assert_eq!(consumer_seq(&second), 2);
    // Before the -NAK is sent, so that the redelivery, timed by JetStream
    // from when it got the -NAK, comes no sooner than `delay` after this.
    let naked_at = Instant::now();
    let processed = b
        .process(&second, |_lease, _message| async {
            panic!("B ran the handler of a key in flight on A")
        })
        .await
        .expect("settled");
    let Settlement::Naked { delay } = processed.settlement else {
        panic!("expected a -NAK, got {processed:?}");
    };
    assert!(matches!(
        processed.delivery,
        Some(Delivery::Retry {
            reason: RetryReason::InProgress,
            ..
        })
    ));
    assert_eq!(
        delay, lease,
        "the time left on A's lease (the clock stands)"
    );
    assert!(delay >= MIN_RETRY);

    // A finishes; the second copy comes back no sooner than the delay, once.
    release_tx.send(()).expect("A waiting");
    let held = holder.await.expect("A's task").expect("A settled");
    assert_eq!(held.settlement, Settlement::Acked { replayed: false });
    let again = f.next(delay + WAIT).await.expect("redelivered");
    let waited = naked_at.elapsed();
    assert_eq!(consumer_seq(&again), 2, "the same copy");
    assert_eq!(again.info().unwrap().delivered, 2, "its second delivery");
    assert!(
        waited >= delay,
        "redelivered after {waited:?}, asked {delay:?}"
    );
    let processed = b
        .process(&again, |_lease, _message| async {
            panic!("the handler ran again")
        })
        .await
        .expect("settled");
    assert_eq!(processed.settlement, Settlement::Acked { replayed: true });
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let info = f.drained().await;
    assert_eq!(
        info.num_redelivered, 0,
        "nothing left waiting for a redelivery"
    );
    // Two copies, three deliveries in all: no loop.
    assert_eq!(info.delivered.consumer_sequence, 3);
}

fn consumer_seq(message: &jetstream::Message) -> u64 {
    message.info().unwrap().stream_sequence
}

async fn mismatch(stream: String) {
    let f = Fixture::new(&stream, Duration::from_secs(30), None).await;
    let config = Config::default()
        .with_dead_letter_subject(f.dead.clone())
        .unwrap();
    let consumer = Consumer::new(engine(Duration::from_secs(30)), scope()).with_config(config);
    let runs = Arc::default();
    f.publish(Some("order-4"), None, b"{\"order\":4}").await;
    f.publish(Some("order-4"), None, b"{\"order\":5}").await;

    let message = f.next(WAIT).await.expect("first");
    let ok = consumer
        .process(&message, counting(&runs))
        .await
        .expect("settled");
    assert_eq!(ok.settlement, Settlement::Acked { replayed: false });
    let message = f.next(WAIT).await.expect("second");
    let refused = consumer
        .process(&message, counting(&runs))
        .await
        .expect("settled");
    let Settlement::Terminated {
        cause: DeadLetterCause::Engine(DeadLetterReason::PayloadMismatch),
        copy: Some(copy),
    } = &refused.settlement
    else {
        panic!("expected a dead letter, got {refused:?}");
    };
    assert_eq!(copy.subject, f.dead);
    assert!(!copy.duplicate);
    assert_eq!(runs_of(&runs, "order-4"), 1, "the mismatch did not run");

    // The copy: the refused payload, why, and where from.
    let stored =
        f.js.get_stream(&stream)
            .await
            .expect("stream")
            .get_raw_message(copy.sequence)
            .await
            .expect("dead letter");
    assert_eq!(stored.subject.as_str(), f.dead);
    assert_eq!(&stored.payload[..], b"{\"order\":5}");
    let header = |name: &str| {
        stored
            .headers
            .get(name)
            .map(|v| v.as_str().to_string())
            .unwrap_or_default()
    };
    assert_eq!(header(DEAD_LETTER_REASON_HEADER), "payload-mismatch");
    assert_eq!(header(DEAD_LETTER_KEY_HEADER), "order-4");
    assert_eq!(header(KEY), "order-4");
    assert_eq!(header(ORIGINAL_SUBJECT_HEADER), f.work);

    // Terminated: never redelivered, nothing pending.
    let info = f.drained().await;
    assert_eq!(info.num_redelivered, 0);
    assert!(f.next(Duration::from_millis(300)).await.is_none());

    // Without a dead-letter subject: +TERM only.
    let plain = Consumer::new(consumer.engine().clone(), scope());
    f.publish(Some("order-4"), None, b"{\"order\":6}").await;
    let message = f.next(WAIT).await.expect("third");
    let refused = plain
        .process(&message, counting(&runs))
        .await
        .expect("settled");
    assert_eq!(
        refused.settlement,
        Settlement::Terminated {
            cause: DeadLetterCause::Engine(DeadLetterReason::PayloadMismatch),
            copy: None
        }
    );
    f.drained().await;
}

async fn missing_key(stream: String) {
    let f = Fixture::new(&stream, Duration::from_secs(30), None).await;
    let consumer = Consumer::new(engine(Duration::from_secs(30)), scope()).with_config(
        Config::default()
            .with_dead_letter_subject(f.dead.clone())
            .unwrap(),
    );
    f.publish(None, None, b"{\"anonymous\":true}").await;
    let message = f.next(WAIT).await.expect("delivered");
    let processed = consumer
        .process(&message, |_lease, _message| async {
            panic!("a message without a key ran")
        })
        .await
        .expect("settled");
    assert_eq!(processed.key, None);
    assert_eq!(processed.delivery, None);
    assert!(matches!(
        processed.settlement,
        Settlement::Terminated {
            cause: DeadLetterCause::MissingKey,
            copy: Some(_)
        }
    ));
    f.drained().await;

    // Without the fallback, a Nats-Msg-Id is not a key.
    let strict = consumer
        .clone()
        .with_config(Config::default().with_msg_id_fallback(false));
    f.publish(None, Some("evt-9"), b"{}").await;
    let message = f.next(WAIT).await.expect("delivered");
    assert_eq!(strict.message(&message).key_source(), KeySource::Missing);
    let processed = strict
        .process(&message, |_lease, _message| async {
            panic!("a message without a key ran")
        })
        .await
        .expect("settled");
    assert_eq!(
        processed.settlement,
        Settlement::Terminated {
            cause: DeadLetterCause::MissingKey,
            copy: None
        }
    );
    f.drained().await;
}

/// The consumers' `ack_wait` in [`progress`] and [`run_waiting`]. Progress
/// goes every third of it (`Config::with_ack_wait`), so a progress timer
/// may be two seconds late on a loaded machine before JetStream
/// redelivers; the tests watch for two `ack_wait`s.
const PROGRESS_ACK_WAIT: Duration = Duration::from_secs(3);

/// A handler that outlives the consumer's `ack_wait` keeps its delivery
/// when progress is on; without it JetStream redelivers mid-handler (and the
/// engine answers that redelivery with a -NAK: the effect still runs once).
async fn progress(stream: String) {
    let ack_wait = PROGRESS_ACK_WAIT;
    let f = Fixture::new(&stream, ack_wait, None).await;
    let store = Arc::new(MemoryStore::new());
    let engine = Engine::new(store)
        .with_policy(Policy::default().with_lease(Duration::from_secs(30)))
        .expect("policy");
    for (key, with_progress) in [("long-1", true), ("long-2", false)] {
        let config = if with_progress {
            Config::default().with_ack_wait(ack_wait)
        } else {
            Config::default().with_progress_every(None)
        };
        let consumer = Consumer::new(engine.clone(), scope()).with_config(config);
        f.publish(Some(key), None, b"{\"long\":true}").await;
        let message = f.next(WAIT).await.expect("delivered");
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
        let runs = Arc::new(AtomicUsize::new(0));
        let worker = {
            let (consumer, runs) = (consumer.clone(), runs.clone());
            tokio::spawn(async move {
                consumer
                    .process(&message, move |_lease, _message| async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        let _ = started_tx.send(());
                        let _ = release_rx.await;
                        Handled::Complete(Outcome::new(&b"done"[..]))
                    })
                    .await
            })
        };
        started_rx.await.expect("handler started");
        // Wait up to two ack_waits for a redelivery while the handler runs.
        let redelivered = f.next(2 * ack_wait).await;
        if with_progress {
            assert!(
                redelivered.is_none(),
                "redelivered although in progress was reported"
            );
        } else {
            let again = redelivered.expect("without progress, ack_wait lapses");
            assert_eq!(again.info().unwrap().delivered, 2);
            let processed = consumer
                .process(&again, |_lease, _message| async { panic!("ran twice") })
                .await
                .expect("settled");
            assert!(matches!(
                processed.delivery,
                Some(Delivery::Retry {
                    reason: RetryReason::InProgress,
                    ..
                })
            ));
        }
        release_tx.send(()).expect("handler waiting");
        let done = worker.await.expect("task").expect("settled");
        assert_eq!(done.settlement, Settlement::Acked { replayed: false });
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        f.drained().await;
    }
}

async fn run_loop(stream: String) {
    const MESSAGES: usize = 60;
    const COPIES: usize = 3;
    let f = Fixture::new(&stream, Duration::from_secs(30), None).await;
    let settled = Arc::new(AtomicUsize::new(0));
    let replays = Arc::new(AtomicUsize::new(0));
    let consumer = Consumer::new(engine(Duration::from_secs(30)), scope())
        .with_config(Config::default().with_concurrency(8))
        .with_observer({
            let (settled, replays) = (settled.clone(), replays.clone());
            move |event| {
                if let Event::Settled(_, processed) = event {
                    settled.fetch_add(1, Ordering::SeqCst);
                    if processed.settlement == (Settlement::Acked { replayed: true }) {
                        replays.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        });
    for copy in 0..COPIES {
        for n in 0..MESSAGES {
            let key = format!("msg-{n}");
            let mut headers = HeaderMap::new();
            headers.insert(KEY, key.as_str());
            headers.insert(MSG_ID, format!("{key}-copy-{copy}").as_str());
            f.js.publish_with_headers(f.work.clone(), headers, format!("{{\"n\":{n}}}").into())
                .await
                .expect("publish")
                .await
                .expect("publish ack");
        }
    }
    let runs = Arc::default();
    let messages = f
        .consumer
        .stream()
        .max_messages_per_batch(8)
        .messages()
        .await
        .expect("messages");
    let total = MESSAGES * COPIES;
    let run = consumer.run(messages, counting(&runs));
    let watch = wait::until_true("every copy settled", Duration::from_secs(60), || {
        let done = settled.load(Ordering::SeqCst) >= total;
        async move { done }
    });
    tokio::select! {
        () = run => panic!("the message stream ended"),
        () = watch => {}
    }
    for n in 0..MESSAGES {
        assert_eq!(runs_of(&runs, &format!("msg-{n}")), 1, "msg-{n}");
    }
    assert_eq!(replays.load(Ordering::SeqCst), MESSAGES * (COPIES - 1));
    let info = f.drained().await;
    assert_eq!(info.num_redelivered, 0);
    assert_eq!(info.delivered.consumer_sequence, total as u64);
}

/// With every slot taken by a long handler, a delivery waiting for one is
/// reported in progress: JetStream does not redeliver it when `ack_wait`
/// lapses.
async fn run_waiting(stream: String) {
    let ack_wait = PROGRESS_ACK_WAIT;
    let f = Fixture::new(&stream, ack_wait, None).await;
    let received: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let consumer = Consumer::new(engine(Duration::from_secs(30)), scope())
        .with_config(
            Config::default()
                .with_ack_wait(ack_wait)
                .with_concurrency(1),
        )
        .with_observer({
            let received = received.clone();
            move |event| {
                if let Event::Received(message) = event {
                    *received
                        .lock()
                        .unwrap()
                        .entry(message.key().unwrap_or("").to_string())
                        .or_default() += 1;
                }
            }
        });
    f.publish(Some("slow"), None, b"{\"slow\":true}").await;
    f.publish(Some("next"), None, b"{\"next\":true}").await;
    let runs: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let handler = {
        let (runs, gate) = (runs.clone(), gate.clone());
        move |_lease, message: idem_nats::Message| {
            let (runs, gate) = (runs.clone(), gate.clone());
            async move {
                let key = message.key().unwrap_or("").to_string();
                *runs.lock().unwrap().entry(key.clone()).or_default() += 1;
                if key == "slow" {
                    let _ = gate.acquire().await;
                }
                Handled::Complete(Outcome::new(&b"done"[..]))
            }
        }
    };
    let messages = f
        .consumer
        .stream()
        .max_messages_per_batch(2)
        .messages()
        .await
        .expect("messages");
    let run = consumer.run(messages, handler);
    let watch = async {
        // Both delivered, one running, one waiting for the slot...
        wait::until_true("both delivered", Duration::from_secs(10), || async {
            f.info().await.delivered.consumer_sequence >= 2
        })
        .await;
        // ...for two ack_waits: neither comes back.
        wait::holds_for("no redelivery", 2 * ack_wait, || async {
            let info = f.info().await;
            info.num_redelivered == 0 && info.delivered.consumer_sequence == 2
        })
        .await;
        assert_eq!(runs_of(&runs, "next"), 0, "the slot was taken");
        gate.add_permits(1);
        f.drained().await;
    };
    tokio::select! {
        () = run => panic!("the message stream ended"),
        () = watch => {}
    }
    assert_eq!(runs_of(&runs, "slow"), 1);
    assert_eq!(runs_of(&runs, "next"), 1);
    assert_eq!(runs_of(&received, "slow"), 1);
    assert_eq!(runs_of(&received, "next"), 1);
    assert_eq!(f.info().await.delivered.consumer_sequence, 2);
}

/// The same loop over a durable push consumer with a deliver group, shared
/// by two consumers (two processes' worth: separate engines over one store).
async fn run_push(stream: String) {
    const MESSAGES: usize = 40;
    const COPIES: usize = 2;
    let f = Fixture::new(&stream, Duration::from_secs(30), None).await;
    let deliver = format!("_idem_test.deliver.{}", stream.to_ascii_lowercase());
    let push: jetstream::consumer::PushConsumer =
        f.js.get_stream(&stream)
            .await
            .expect("stream")
            .create_consumer(jetstream::consumer::push::Config {
                durable_name: Some("pushed".into()),
                deliver_subject: deliver,
                deliver_group: Some("pushed".into()),
                filter_subject: f.work.clone(),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                max_ack_pending: 16,
                ..Default::default()
            })
            .await
            .expect("push consumer");
    for copy in 0..COPIES {
        for n in 0..MESSAGES {
            let key = format!("push-{n}");
            let mut headers = HeaderMap::new();
            headers.insert(KEY, key.as_str());
            headers.insert(MSG_ID, format!("{key}-copy-{copy}").as_str());
            f.js.publish_with_headers(f.work.clone(), headers, format!("{{\"n\":{n}}}").into())
                .await
                .expect("publish")
                .await
                .expect("publish ack");
        }
    }
    let store = Arc::new(MemoryStore::new());
    let settled = Arc::new(AtomicUsize::new(0));
    let runs = Arc::default();
    let consumer = |store: &Arc<MemoryStore>| {
        let settled = settled.clone();
        Consumer::new(Engine::new(store.clone()), scope())
            .with_config(Config::default().with_concurrency(8))
            .with_observer(move |event| {
                if let Event::Settled(_, processed) = event {
                    assert!(
                        matches!(
                            processed.settlement,
                            Settlement::Acked { .. } | Settlement::Naked { .. }
                        ),
                        "{processed:?}"
                    );
                    settled.fetch_add(1, Ordering::SeqCst);
                }
            })
    };
    let (a, b) = (consumer(&store), consumer(&store));
    let (ma, mb) = (
        push.messages().await.expect("subscribe"),
        push.messages().await.expect("subscribe"),
    );
    let run_a = a.run(ma, counting(&runs));
    let run_b = b.run(mb, counting(&runs));
    let watch = wait::until_true(
        "the push consumer drained",
        Duration::from_secs(60),
        || async {
            let info = push.get_info().await.expect("info");
            info.num_pending == 0 && info.num_ack_pending == 0
        },
    );
    tokio::select! {
        () = run_a => panic!("the push subscription ended"),
        () = run_b => panic!("the push subscription ended"),
        () = watch => {}
    }
    for n in 0..MESSAGES {
        assert_eq!(runs_of(&runs, &format!("push-{n}")), 1, "push-{n}");
    }
    // Every copy settled once, plus one per -NAK (a copy whose key was in
    // flight on the other consumer).
    assert!(settled.load(Ordering::SeqCst) >= MESSAGES * COPIES);
}
