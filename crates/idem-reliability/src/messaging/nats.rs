//! NATS JetStream driver, through `idem-nats`.
//!
//! # Topology of a test queue `q`
//! - A stream named `q` (limits retention, file storage) on subjects
//!   `q.>`: the work subject `q.work`, the dead-letter subject `q.dead`.
//! - A durable **push** consumer `work` on `q.work`, delivering to
//!   `_idem.deliver.q` in the queue group `work` (every consumer process
//!   shares it): explicit acks, an `ack_wait` of [`ACK_WAIT`] (a killed
//!   consumer's deliveries come back after it), unlimited `max_deliver` (no
//!   message may be dropped by a delivery limit: every one must end
//!   acknowledged or dead-lettered), and `max_ack_pending`
//!   [`MAX_ACK_PENDING`]: no more deliveries outstanding than the adapter
//!   takes in at once (twice its concurrency), so none waits in the client's
//!   buffer without in-progress acknowledgements.
//! - A durable pull consumer `dead` on `q.dead` that nobody pulls: its
//!   pending count is the number of dead-letter copies
//!   ([`Backlog::dead_lettered`]). The adapter copies a dead letter to
//!   `q.dead` before it terminates the delivery, with a `Nats-Msg-Id` per
//!   original message, so a consumer killed between the copy and the `+TERM`
//!   does not count it twice (within the stream's duplicate window).
//!
//! Why push and not pull: nats-server 2.9 (the one this machine runs) has a
//! pull-consumer flaw that the crash test trips over at every kill. When a
//! redelivery falls due while the only waiting pull requests belong to a
//! client that is gone, the server rewinds the consumer's next sequence by
//! one (`o.sseq--` in `loopAndGatherMsgs`, meant for a new message, applied
//! to a redelivery too), so the newest message already delivered, often
//! already acknowledged, is delivered again as new (delivery count 1). The
//! engine answers those as replays (no effect runs twice) but they are
//! redeliveries nothing in the test explains. A push consumer has no
//! waiting requests.
//!
//! [`Broker::consume`] runs [`idem_nats::Consumer::run`] over the `work`
//! consumer's push subscription, with the in-progress interval derived from
//! [`ACK_WAIT`], `setup.prefetch` deliveries at once, and
//! `setup.default_retry` for retries without a delay of their own.

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::{AckPolicy, Consumer as JsConsumer, pull, push};
use async_nats::jetstream::{self, stream};
use async_trait::async_trait;
use idem_nats::{Config, Consumer, Event as NatsEvent, Settlement as NatsSettlement};

use super::{
    Backlog, Broker, BrokerError, BrokerKind, COPY_HEADER, ConsumerSetup, Event, Incoming,
    KEY_HEADER, Outgoing, Settlement, redact,
};

/// The work consumer's `ack_wait`: how long a killed consumer's deliveries
/// stay with it before JetStream redelivers them.
pub const ACK_WAIT: Duration = Duration::from_secs(2);

/// The work consumer's `max_ack_pending`: twice the crash test's prefetch
/// (32), what the adapter takes in at once.
pub const MAX_ACK_PENDING: i64 = 64;

/// Publishes in flight at once (awaiting their acknowledgements).
const PUBLISH_WINDOW: usize = 256;

/// How long a JetStream API request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

const WORK_CONSUMER: &str = "work";
const DEAD_CONSUMER: &str = "dead";

const KIND: BrokerKind = BrokerKind::Nats;

fn work_subject(queue: &str) -> String {
    format!("{queue}.work")
}

fn dead_subject(queue: &str) -> String {
    format!("{queue}.dead")
}

fn deliver_subject(queue: &str) -> String {
    format!("_idem.deliver.{queue}")
}

/// Connects to the NATS server at `url` (JetStream enabled); see
/// [`BrokerKind::connect`].
///
/// # Behavior
/// A server that cannot be reached within a few seconds, or that answers
/// JetStream's `$JS.API.INFO` with an error (JetStream off), is
/// [`BrokerError::Unreachable`].
pub async fn connect(url: &str) -> Result<Arc<dyn Broker>, BrokerError> {
    let unreachable = |source: Box<dyn std::error::Error + Send + Sync>| BrokerError::Unreachable {
        broker: KIND,
        url: redact(url),
        source,
    };
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .map_err(|e| unreachable(e.into()))?;
    // A raw request: the client's typed account info wants fields that
    // older servers (2.9) do not send.
    let reply = tokio::time::timeout(
        Duration::from_secs(5),
        client.request("$JS.API.INFO", "".into()),
    )
    .await
    .map_err(|_| unreachable("no answer to a JetStream request within 5 s".into()))?
    .map_err(|e| unreachable(format!("JetStream is not enabled: {e}").into()))?;
    let body = String::from_utf8_lossy(&reply.payload);
    if body.contains("\"error\"") {
        return Err(unreachable(
            format!("JetStream is not enabled: {body}").into(),
        ));
    }
    let mut js = jetstream::new(client);
    js.set_timeout(REQUEST_TIMEOUT);
    Ok(Arc::new(NatsBroker { js }))
}

/// The JetStream driver; see the [module docs](self).
#[derive(Clone)]
struct NatsBroker {
    js: jetstream::Context,
}

impl std::fmt::Debug for NatsBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBroker").finish_non_exhaustive()
    }
}

fn failed(what: impl Into<String>) -> impl FnOnce(BoxedError) -> BrokerError {
    let what = what.into();
    move |source| BrokerError::broker(KIND, what, source)
}

type BoxedError = Box<dyn std::error::Error + Send + Sync>;

impl NatsBroker {
    async fn consumer<C>(&self, queue: &str, name: &str) -> Result<JsConsumer<C>, BrokerError>
    where
        C: jetstream::consumer::IntoConsumerConfig + jetstream::consumer::FromConsumer,
    {
        self.js
            .get_consumer_from_stream(name, queue)
            .await
            .map_err(|e| failed(format!("consumer {name} of stream {queue}"))(e.into()))
    }

    async fn info<C>(
        &self,
        queue: &str,
        name: &str,
    ) -> Result<jetstream::consumer::Info, BrokerError>
    where
        C: jetstream::consumer::IntoConsumerConfig + jetstream::consumer::FromConsumer,
    {
        self.consumer::<C>(queue, name)
            .await?
            .get_info()
            .await
            .map_err(|e| failed(format!("info of consumer {name} of stream {queue}"))(e.into()))
    }
}

#[async_trait]
impl Broker for NatsBroker {
    fn kind(&self) -> BrokerKind {
        KIND
    }

    async fn declare(&self, queue: &str) -> Result<(), BrokerError> {
        let stream = self
            .js
            .get_or_create_stream(stream::Config {
                name: queue.to_string(),
                subjects: vec![format!("{queue}.>")],
                retention: stream::RetentionPolicy::Limits,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| failed(format!("create stream {queue}"))(e.into()))?;
        stream
            .get_or_create_consumer::<push::Config>(
                WORK_CONSUMER,
                push::Config {
                    durable_name: Some(WORK_CONSUMER.to_string()),
                    deliver_subject: deliver_subject(queue),
                    deliver_group: Some(WORK_CONSUMER.to_string()),
                    filter_subject: work_subject(queue),
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: ACK_WAIT,
                    max_deliver: -1,
                    max_ack_pending: MAX_ACK_PENDING,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| failed(format!("create consumer {WORK_CONSUMER} on {queue}"))(e.into()))?;
        stream
            .get_or_create_consumer::<pull::Config>(
                DEAD_CONSUMER,
                pull::Config {
                    durable_name: Some(DEAD_CONSUMER.to_string()),
                    filter_subject: dead_subject(queue),
                    ack_policy: AckPolicy::Explicit,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| failed(format!("create consumer {DEAD_CONSUMER} on {queue}"))(e.into()))?;
        Ok(())
    }

    async fn publish(&self, queue: &str, messages: &[Outgoing]) -> Result<(), BrokerError> {
        let subject = work_subject(queue);
        for chunk in messages.chunks(PUBLISH_WINDOW) {
            let mut acks = Vec::with_capacity(chunk.len());
            for message in chunk {
                let mut headers = HeaderMap::new();
                let key = message
                    .key
                    .parse::<async_nats::HeaderValue>()
                    .map_err(|e| failed(format!("key {:?} as a header", message.key))(e.into()))?;
                headers.insert(KEY_HEADER, key);
                headers.insert(COPY_HEADER, message.copy.to_string().as_str());
                // No Nats-Msg-Id: JetStream would drop the copies itself.
                let ack = self
                    .js
                    .publish_with_headers(subject.clone(), headers, message.payload.clone())
                    .await
                    .map_err(|e| failed(format!("publish to {subject}"))(e.into()))?;
                acks.push(ack);
            }
            for ack in acks {
                ack.await
                    .map_err(|e| failed(format!("publish ack from {queue}"))(e.into()))?;
            }
        }
        Ok(())
    }

    async fn consume(&self, queue: &str, setup: ConsumerSetup) -> Result<(), BrokerError> {
        let prefetch = usize::from(setup.prefetch.max(1));
        let config = Config::default()
            .with_ack_wait(ACK_WAIT)
            .with_default_retry(setup.default_retry)
            .with_concurrency(prefetch)
            .with_dead_letter_subject(dead_subject(queue))
            .map_err(|e| failed("dead-letter subject")(e.into()))?;
        let observer = setup.observer.clone();
        let consumer = Consumer::new((*setup.engine).clone(), setup.scope.clone())
            .with_config(config)
            .with_observer(move |event| match event {
                NatsEvent::Received(message) => observer(Event::Received {
                    key: message.key().map(str::to_string),
                    copy: copy_of(message),
                    redelivered: message.is_redelivery(),
                }),
                NatsEvent::Settled(message, processed) => observer(Event::Settled {
                    key: message.key().map(str::to_string),
                    copy: copy_of(message),
                    settlement: match processed.settlement {
                        NatsSettlement::Acked { replayed } => Settlement::Acked { replayed },
                        NatsSettlement::Naked { delay } => Settlement::Retried { delay },
                        _ => Settlement::DeadLettered,
                    },
                }),
                // Not settled as decided (JetStream redelivers) or a stream
                // hiccup: the adapter logged it; the test sees the
                // redelivery.
                _ => {}
            });
        let messages = self
            .consumer::<push::Config>(queue, WORK_CONSUMER)
            .await?
            .messages()
            .await
            .map_err(|e| failed(format!("subscribe to {queue}"))(e.into()))?;
        let handler = setup.handler.clone();
        consumer
            .run(messages, move |lease, message| {
                let incoming = Incoming::new(
                    message.key().unwrap_or_default(),
                    message.payload().clone(),
                    copy_of(&message),
                );
                handler(lease, incoming)
            })
            .await;
        Err(BrokerError::broker(
            KIND,
            format!("consume {queue}"),
            "the push subscription ended",
        ))
    }

    async fn backlog(&self, queue: &str) -> Result<Backlog, BrokerError> {
        let work = self.info::<push::Config>(queue, WORK_CONSUMER).await?;
        let dead = self.info::<pull::Config>(queue, DEAD_CONSUMER).await?;
        Ok(Backlog::new(
            work.num_pending,
            u64::try_from(work.num_ack_pending).unwrap_or(u64::MAX),
            0,
            dead.num_pending,
        ))
    }

    async fn delete(&self, queue: &str) -> Result<(), BrokerError> {
        match self.js.delete_stream(queue).await {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(failed(format!("delete stream {queue}"))(e.into())),
        }
    }
}

/// The copy number of a delivery ([`COPY_HEADER`]).
fn copy_of(message: &idem_nats::Message) -> Option<u32> {
    message.header(COPY_HEADER).and_then(|v| v.parse().ok())
}

/// Whether JetStream answered "stream not found" (error code 10059).
fn is_not_found(e: &jetstream::context::DeleteStreamError) -> bool {
    let text = e.to_string();
    text.contains("10059") || text.contains("not found")
}
