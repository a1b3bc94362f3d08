//! `Consumer` against the real RabbitMQ (`IDEM_AMQP_URL`, default
//! amqp://guest:guest@127.0.0.1:5672/%2f): each test declares queues of its
//! own (random suffix, deleted at the end, also when the test fails) and
//! counts handler runs, deliveries and what was done with each.
//!
//! RabbitMQ unreachable: every test is IGNORED with a banner; under
//! `CI=true` / `IDEM_REQUIRE_BACKENDS=1` they FAIL.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use idem_core::{
    Begin, Clock, DeadLetterReason, Delivery, Engine, Fingerprint, Handled, IdempotencyKey,
    MIN_RETRY, ManualClock, MemoryStore, Outcome, Policy, RetryReason, Scope, SystemClock,
};
use idem_lapin::{Action, Config, Consumer, Event, Redelivery, Settled};
use idem_testkit::runner::{Runner, Trial};
use idem_testkit::wait;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::sync::oneshot;

const RABBITMQ: &str = "rabbitmq";

type Body = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;
type BodyFn = fn() -> Body;

/// How long anything the tests wait for may take.
const DEADLINE: Duration = Duration::from_secs(20);

fn main() -> std::process::ExitCode {
    let tests: Vec<(&str, BodyFn)> = vec![
        ("a_fresh_message_runs_once_and_is_acknowledged", || {
            Box::pin(fresh())
        }),
        (
            "a_message_published_twice_runs_once_and_both_are_acknowledged",
            || Box::pin(duplicate()),
        ),
        (
            "a_key_in_flight_elsewhere_comes_back_through_a_delay_queue_and_replays",
            || Box::pin(in_flight(Redelivery::default(), Other::Completes)),
        ),
        (
            "a_key_whose_holder_died_comes_back_through_a_delay_queue_and_runs",
            || Box::pin(in_flight(Redelivery::default(), Other::Dies)),
        ),
        (
            "a_key_whose_holder_died_is_held_then_requeued_and_runs",
            || Box::pin(in_flight(Redelivery::HoldAndRequeue, Other::Dies)),
        ),
        ("the_same_key_with_another_payload_is_dead_lettered", || {
            Box::pin(mismatch())
        }),
        (
            "the_key_comes_from_the_header_else_the_message_id_else_dead_letters",
            || Box::pin(key_sources()),
        ),
        (
            "a_failed_message_is_dead_lettered_and_never_run_again",
            || Box::pin(failed()),
        ),
        (
            "a_released_message_runs_again_after_the_default_delay",
            || Box::pin(released()),
        ),
    ];
    let runner = Runner::new("idem-lapin (RabbitMQ)")
        .with_default_test_threads(4)
        .requirement(RABBITMQ, probe);
    tests
        .into_iter()
        .fold(runner, |runner, (name, body)| {
            runner.trial(Trial::test(name, body).requires(RABBITMQ))
        })
        .run()
}

/// RabbitMQ answers a connection within a few seconds.
async fn probe() -> Result<(), String> {
    let url = idem_testkit::env::amqp_url();
    let shown = redact(&url);
    match tokio::time::timeout(Duration::from_secs(3), connect(&url)).await {
        Ok(Ok(connection)) => {
            let _ = connection.close(200, "probe".into()).await;
            Ok(())
        }
        Ok(Err(e)) => Err(format!(
            "RabbitMQ not reachable at {shown} (set IDEM_AMQP_URL): {e}"
        )),
        Err(_) => Err(format!(
            "RabbitMQ not reachable at {shown} (set IDEM_AMQP_URL): no answer within 3 s"
        )),
    }
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}***{}", &url[..s + 3], &url[at..]),
        _ => url.to_string(),
    }
}

async fn connect(url: &str) -> Result<Connection, lapin::Error> {
    Connection::connect(url, ConnectionProperties::default()).await
}

fn scope() -> Scope {
    Scope::tenant("idem-lapin-test").with_operation("messages")
}

fn engine(lease: Duration) -> Engine<MemoryStore> {
    Engine::new(MemoryStore::new())
        .with_policy(Policy::default().with_lease(lease))
        .unwrap()
}

/// What the observer saw, with the moment it saw it.
#[derive(Clone, Debug)]
enum Seen {
    Received {
        key: Option<String>,
        at: Instant,
    },
    Settled {
        key: Option<String>,
        settled: Settled,
    },
}

/// One test's queue, its dead-letter queue, a publishing channel and the
/// consumer's record.
struct Bench {
    connection: Connection,
    publisher: Channel,
    queue: String,
    dead: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Bench {
    async fn new(test: &str) -> Self {
        let connection = connect(&idem_testkit::env::amqp_url()).await.unwrap();
        let publisher = connection.create_channel().await.unwrap();
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let queue = format!("idem-lapin-test.{test}.{:08x}", fastrand::u32(..));
        let dead = format!("{queue}.dead");
        let mut args = FieldTable::default();
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(LongString::from("")),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(LongString::from(dead.as_str())),
        );
        publisher
            .queue_declare(queue.as_str().into(), QueueDeclareOptions::durable(), args)
            .await
            .unwrap();
        publisher
            .queue_declare(
                dead.as_str().into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        Self {
            connection,
            publisher,
            queue,
            dead,
            seen: Arc::default(),
        }
    }

    /// Publishes `body` with the key header (if any) and `message_id` (if
    /// any), and waits for the broker's confirm.
    async fn publish(&self, key: Option<&str>, message_id: Option<&str>, body: &[u8]) {
        let mut props = BasicProperties::default();
        if let Some(key) = key {
            let mut headers = FieldTable::default();
            headers.insert(
                "Idempotency-Key".into(),
                AMQPValue::LongString(LongString::from(key)),
            );
            props = props.with_headers(headers);
        }
        if let Some(id) = message_id {
            props = props.with_message_id(id.into());
        }
        let confirm = self
            .publisher
            .basic_publish(
                "".into(),
                self.queue.as_str().into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack(), "publish not confirmed");
    }

    /// Starts `consumer` (observed into `self.seen`) on a channel of its own;
    /// returns the signal that stops it and its task.
    async fn start<C, H, Fut>(
        &self,
        consumer: Consumer<MemoryStore, C>,
        handler: H,
    ) -> (
        oneshot::Sender<()>,
        tokio::task::JoinHandle<Result<(), idem_lapin::Error>>,
    )
    where
        C: Clock,
        H: Fn(idem_core::Lease, idem_lapin::Message) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Handled> + Send + 'static,
    {
        let seen = self.seen.clone();
        let consumer = consumer.observe(move |event| {
            let at = Instant::now();
            let entry = match event {
                Event::Received(m) => Seen::Received {
                    key: m.key().map(String::from),
                    at,
                },
                Event::Settled(m, settled) => Seen::Settled {
                    key: m.key().map(String::from),
                    settled: (*settled).clone(),
                },
                _ => return,
            };
            seen.lock().unwrap().push(entry);
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let channel = self.connection.create_channel().await.unwrap();
        let queue = self.queue.clone();
        let task = tokio::spawn(async move {
            let ended = consumer
                .run_until(&channel, &queue, handler, async {
                    let _ = stopped.await;
                })
                .await;
            let _ = channel.close(200, "done".into()).await;
            ended
        });
        (stop, task)
    }

    fn settled(&self) -> Vec<(Option<String>, Settled)> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter_map(|s| match s {
                Seen::Settled { key, settled, .. } => Some((key.clone(), settled.clone())),
                Seen::Received { .. } => None,
            })
            .collect()
    }

    fn received(&self) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| matches!(s, Seen::Received { .. }))
            .count()
    }

    /// Polls until `n` deliveries were settled.
    async fn until_settled(&self, n: usize) -> Vec<(Option<String>, Settled)> {
        wait::until(&format!("{n} deliveries settled"), DEADLINE, || {
            let settled = self.settled();
            async move { (settled.len() >= n).then_some(settled) }
        })
        .await
    }

    /// Stops the consumer (it returns `Ok`), then checks the broker's own
    /// count: nothing left on the queue once no consumer holds anything
    /// (an unacknowledged message would be back to ready), and `dead`
    /// messages on the dead-letter queue.
    async fn finish(
        &self,
        stop: oneshot::Sender<()>,
        task: tokio::task::JoinHandle<Result<(), idem_lapin::Error>>,
        dead: u32,
    ) {
        let _ = stop.send(());
        task.await
            .unwrap()
            .expect("the consumer returns Ok on shutdown");
        let what = format!("an empty queue with no consumer, and {dead} dead letters");
        wait::until_true(&what, DEADLINE, || async {
            let q = self.passive(&self.queue).await;
            let d = self.passive(&self.dead).await;
            q.consumer_count() == 0 && q.message_count() == 0 && d.message_count() == dead
        })
        .await;
    }

    async fn passive(&self, queue: &str) -> lapin::Queue {
        self.publisher
            .queue_declare(
                queue.into(),
                QueueDeclareOptions::default().passive(),
                FieldTable::default(),
            )
            .await
            .unwrap()
    }

    /// Deletes the test's queues (the work queue, its dead letters, every
    /// delay queue the default config may use).
    async fn delete(queue: String) -> Result<(), String> {
        let connection = connect(&idem_testkit::env::amqp_url())
            .await
            .map_err(|e| e.to_string())?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| e.to_string())?;
        let mut names = vec![queue.clone(), format!("{queue}.dead")];
        names.extend(Config::default().delay_queues(&queue));
        for name in names {
            channel
                .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                .await
                .map_err(|e| format!("delete {name}: {e}"))?;
        }
        let _ = connection.close(200, "cleanup".into()).await;
        Ok(())
    }
}

/// Runs `test` on a fresh bench and deletes its queues afterwards, passed
/// or not.
async fn with_bench<F, Fut>(name: &str, test: F)
where
    F: FnOnce(Arc<Bench>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let bench = Arc::new(Bench::new(name).await);
    let queue = bench.queue.clone();
    let outcome = tokio::spawn(test(bench)).await;
    let cleaned = Bench::delete(queue).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic.into_panic());
    }
    cleaned.unwrap();
}

/// A handler that counts its runs and answers `how`.
fn counting(
    runs: &Arc<AtomicUsize>,
    how: Handled,
) -> impl Fn(idem_core::Lease, idem_lapin::Message) -> std::future::Ready<Handled> + Send + Sync + 'static
{
    let runs = runs.clone();
    move |_lease, _message| {
        runs.fetch_add(1, Ordering::SeqCst);
        std::future::ready(how.clone())
    }
}

fn ok() -> Handled {
    Handled::Complete(Outcome::new(&b"done"[..]))
}

fn acked(replayed: bool) -> Action {
    Action::Acked { replayed }
}

async fn fresh() {
    with_bench("fresh", |bench| async move {
        let runs = Arc::new(AtomicUsize::new(0));
        let consumer = Consumer::new(engine(Duration::from_secs(10)), scope());
        let (stop, task) = bench.start(consumer, counting(&runs, ok())).await;
        bench.publish(Some("fresh-1"), None, b"{\"n\":1}").await;
        let settled = bench.until_settled(1).await;
        assert_eq!(settled[0].0.as_deref(), Some("fresh-1"));
        assert_eq!(settled[0].1.action, acked(false));
        bench.finish(stop, task, 0).await;
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(bench.received(), 1);
        assert_eq!(bench.settled().len(), 1);
    })
    .await;
}

async fn duplicate() {
    with_bench("duplicate", |bench| async move {
        let runs = Arc::new(AtomicUsize::new(0));
        let consumer = Consumer::new(engine(Duration::from_secs(10)), scope());
        // Published twice (a publisher retry) before the consumer starts: both
        // copies may be handled at once, one waiting for the other.
        bench.publish(Some("dup-1"), None, b"{\"n\":2}").await;
        bench.publish(Some("dup-1"), None, b"{\"n\":2}").await;
        let (stop, task) = bench.start(consumer, counting(&runs, ok())).await;
        // Both acknowledged (a copy that met the first in flight was delayed
        // once, then replayed).
        wait::until_true("both copies acknowledged", DEADLINE, || {
            let acked = bench
                .settled()
                .iter()
                .filter(|(_, s)| matches!(s.action, Action::Acked { .. }))
                .count();
            async move { acked >= 2 }
        })
        .await;
        bench.finish(stop, task, 0).await;
        assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran once");
        let actions: Vec<Action> = bench.settled().into_iter().map(|(_, s)| s.action).collect();
        assert!(
            actions.contains(&acked(false)) && actions.contains(&acked(true)),
            "{actions:?}"
        );
        assert!(actions.len() <= 3, "at most one delay: {actions:?}");
    })
    .await;
}

/// What the other consumer holding the key does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Other {
    /// Completes the key once our consumer handed the delivery back: the
    /// redelivery replays.
    Completes,
    /// Dies (its lease lapses): a redelivery takes the key over and runs.
    Dies,
}

/// The lease of the other consumer in [`in_flight`], on a [`ManualClock`]:
/// also the delay its first retry asks for (a delay tier of its own).
const IN_FLIGHT_LEASE: Duration = Duration::from_secs(2);

/// Another consumer holds the key (claimed through the same store, lease
/// [`IN_FLIGHT_LEASE`]). Our consumer hands the delivery back, and each
/// redelivery comes no sooner than the delay asked: two deliveries, never a
/// loop.
///
/// The engine's time is a [`ManualClock`], so the other consumer's lease
/// lapses exactly when the test says (right after the first delivery was
/// handed back, for [`Other::Dies`]) and never on its own: on real time, a
/// slow channel, publish confirm or delivery on a loaded machine let the
/// lease lapse before the first delivery, which then ran at once. The
/// broker's delays are real time. A third delivery only if the test itself
/// completes the key (or moves the clock) later than the first delay.
async fn in_flight(redelivery: Redelivery, other: Other) {
    let name = match (&redelivery, other) {
        (Redelivery::HoldAndRequeue, _) => "in-flight-hold",
        (_, Other::Completes) => "in-flight-delay",
        _ => "in-flight-delay-dies",
    };
    with_bench(name, move |bench| async move {
        let clock = ManualClock::new(SystemClock.now());
        let engine = Engine::with_clock(MemoryStore::new(), clock.clone())
            .with_policy(Policy::default().with_lease(IN_FLIGHT_LEASE))
            .unwrap();
        let body = b"{\"n\":3}";
        let key = IdempotencyKey::parse("busy-1").unwrap();
        let Begin::Proceed(lease) = engine
            .begin(&scope(), &key, Fingerprint::of(body))
            .await
            .unwrap()
        else {
            panic!("the other consumer could not claim the key");
        };
        let runs = Arc::new(AtomicUsize::new(0));
        let consumer = Consumer::new(engine.clone(), scope())
            .with_config(Config::default().with_redelivery(redelivery));
        let (stop, task) = bench.start(consumer, counting(&runs, ok())).await;
        bench.publish(Some("busy-1"), None, body).await;
        let first = bench.until_settled(1).await;
        assert!(
            matches!(
                first[0].1.decision,
                Some(Delivery::Retry {
                    reason: RetryReason::InProgress,
                    ..
                })
            ),
            "{first:?}"
        );
        match other {
            Other::Completes => engine
                .complete(&lease, Outcome::new(&b"theirs"[..]))
                .await
                .unwrap(),
            // The other consumer is gone: its lease lapses now.
            Other::Dies => clock.advance(IN_FLIGHT_LEASE),
        }
        let settled = wait::until("the delivery acknowledged", DEADLINE, || {
            let settled = bench.settled();
            let acked = settled
                .last()
                .is_some_and(|(_, s)| matches!(s.action, Action::Acked { .. }));
            async move { acked.then_some(settled) }
        })
        .await;
        bench.finish(stop, task, 0).await;
        let want = match other {
            Other::Completes => (acked(true), 0),
            Other::Dies => (acked(false), 1),
        };
        assert_eq!(
            (
                settled.last().unwrap().1.action.clone(),
                runs.load(Ordering::SeqCst)
            ),
            want,
            "{settled:?}"
        );
        // Each redelivery no sooner than the delay its delivery was given.
        let seen = bench.seen.lock().unwrap().clone();
        let received: Vec<Instant> = seen
            .iter()
            .filter_map(|s| match s {
                Seen::Received { key, at } => {
                    assert_eq!(key.as_deref(), Some("busy-1"));
                    Some(*at)
                }
                Seen::Settled { .. } => None,
            })
            .collect();
        assert!((2..=3).contains(&received.len()), "no hot loop: {seen:?}");
        assert_eq!(received.len(), settled.len());
        for (i, (_, s)) in settled[..settled.len() - 1].iter().enumerate() {
            let Action::Delayed { delay, .. } = s.action else {
                panic!("not delayed: {settled:?}");
            };
            assert!(delay >= MIN_RETRY, "a delay of {delay:?} spins");
            let waited = received[i + 1] - received[i];
            assert!(
                waited >= delay,
                "redelivered after {waited:?}, before the {delay:?} asked"
            );
        }
    })
    .await;
}

async fn mismatch() {
    with_bench("mismatch", |bench| async move {
        let runs = Arc::new(AtomicUsize::new(0));
        let consumer = Consumer::new(engine(Duration::from_secs(10)), scope());
        let (stop, task) = bench.start(consumer, counting(&runs, ok())).await;
        bench.publish(Some("mm-1"), None, b"{\"amount\":100}").await;
        bench.until_settled(1).await;
        bench.publish(Some("mm-1"), None, b"{\"amount\":999}").await;
        let settled = bench.until_settled(2).await;
        assert_eq!(settled[0].1.action, acked(false));
        assert_eq!(settled[1].1.action, Action::DeadLettered);
        assert_eq!(
            settled[1].1.decision,
            Some(Delivery::DeadLetter {
                reason: DeadLetterReason::PayloadMismatch
            })
        );
        bench.finish(stop, task, 1).await;
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    })
    .await;
}

async fn key_sources() {
    with_bench("keys", |bench| async move {
        let runs = Arc::new(AtomicUsize::new(0));
        let consumer = Consumer::new(engine(Duration::from_secs(10)), scope());
        let (stop, task) = bench.start(consumer, counting(&runs, ok())).await;
        // The header wins over the message id; the message id is the
        // fallback (the same key as the header's: a replay); neither: dead.
        bench.publish(Some("ks-1"), Some("other-id"), b"a").await;
        bench.until_settled(1).await;
        bench.publish(None, Some("ks-1"), b"a").await;
        bench.until_settled(2).await;
        bench.publish(None, None, b"a").await;
        let settled = bench.until_settled(3).await;
        assert_eq!(
            (settled[0].0.as_deref(), &settled[0].1.action),
            (Some("ks-1"), &acked(false))
        );
        assert_eq!(
            (settled[1].0.as_deref(), &settled[1].1.action),
            (Some("ks-1"), &acked(true))
        );
        assert_eq!(
            (settled[2].0.as_deref(), &settled[2].1.action),
            (None, &Action::DeadLettered)
        );
        assert_eq!(settled[2].1.decision, None, "the engine was not asked");
        bench.finish(stop, task, 1).await;
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    })
    .await;
}

async fn failed() {
    with_bench("failed", |bench| async move {
        let runs = Arc::new(AtomicUsize::new(0));
        let consumer = Consumer::new(engine(Duration::from_secs(10)), scope());
        let how = Handled::Fail(Outcome::new(&b"no such invoice"[..]));
        let (stop, task) = bench.start(consumer, counting(&runs, how)).await;
        bench.publish(Some("fail-1"), None, b"x").await;
        // The copy comes after the first failed: published together, it may
        // meet the first in flight and be delayed instead (another case).
        bench.until_settled(1).await;
        bench.publish(Some("fail-1"), None, b"x").await;
        let settled = bench.until_settled(2).await;
        for (_, s) in &settled {
            assert_eq!(s.action, Action::DeadLettered, "{settled:?}");
        }
        bench.finish(stop, task, 2).await;
        assert_eq!(runs.load(Ordering::SeqCst), 1, "never run again");
    })
    .await;
}

async fn released() {
    with_bench("released", |bench| async move {
        let runs = Arc::new(AtomicUsize::new(0));
        let consumer = Consumer::new(engine(Duration::from_secs(10)), scope())
            .with_config(Config::default().with_default_retry(Duration::from_millis(250)));
        // The first run releases (a transient failure before any effect);
        // the second completes.
        let handler = {
            let runs = runs.clone();
            move |_lease, _message| {
                let n = runs.fetch_add(1, Ordering::SeqCst);
                std::future::ready(if n == 0 { Handled::Release } else { ok() })
            }
        };
        let (stop, task) = bench.start(consumer, handler).await;
        bench.publish(Some("rel-1"), None, b"x").await;
        let settled = bench.until_settled(2).await;
        assert_eq!(
            settled[0].1.action,
            Action::Delayed {
                delay: Duration::from_millis(250),
                queue: Some(format!("{}.idem-delay.250ms", bench.queue)),
            }
        );
        assert_eq!(settled[1].1.action, acked(false));
        bench.finish(stop, task, 0).await;
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    })
    .await;
}
