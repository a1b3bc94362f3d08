//! Brokers under the messaging crash test (`tests/messaging.rs`, the
//! `crash_consumer` binary): one broker-neutral [`Broker`] trait, driven the
//! same way for RabbitMQ ([`rabbit`], through `idem-lapin`) and NATS
//! JetStream ([`nats`], through `idem-nats`).
//!
//! The test publishes every message two or more times (a publisher retrying
//! after a lost confirm: the same key, the same payload), runs the
//! `crash_consumer` binary on the queue and SIGKILLs it at random moments,
//! restarting it each time, until the queue is drained; then it counts the
//! effects per message and the deliveries the consumers logged.
//!
//! A driver is a thin layer over its adapter crate: [`Broker::consume`] MUST
//! go through the adapter's own consumer loop (key from the header, falling
//! back to the broker's message id; acknowledge only after the engine
//! settled; the adapter's delayed redelivery; dead-lettering), since that
//! loop is what the test tests. What the driver adds is the topology of a
//! test queue ([`declare`](Broker::declare) / [`delete`](Broker::delete)),
//! publishing with confirms ([`publish`](Broker::publish)), counting what
//! is left ([`backlog`](Broker::backlog)), and reporting every delivery to an
//! [`Observer`].
//!
//! # Conventions every driver follows
//! - A "queue" is named by the test (`[a-z0-9-]`, at most 48 characters,
//!   unique per run): a RabbitMQ queue, or a JetStream stream. Whatever else
//!   the driver needs (dead-letter queue, delay queues, subjects, a durable
//!   consumer) is derived from that name, created by `declare` and removed by
//!   `delete`.
//! - Messages carry the key in the `Idempotency-Key` header and the copy
//!   number (0, 1, … for the publisher's retries of one message) in the
//!   [`COPY_HEADER`] header. The copy number is not part of the fingerprint
//!   (the payload alone is): it only lets the test tell the copies' deliveries
//!   apart.
//! - The consumer is durable: a consumer process killed and restarted on the
//!   same queue resumes it, and messages that the dead process held
//!   unacknowledged are delivered again (RabbitMQ: when its connection
//!   closes; JetStream: after the consumer's `ack_wait`, which the driver
//!   keeps short, see [`Backlog`]).
pub mod nats;
pub mod rabbit;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use idem_core::store::Store;
use idem_core::{BoxFuture, Engine, Handled, Lease, Scope};

/// The header that numbers a message's copies (the publisher's retries);
/// informational, never fingerprinted.
pub const COPY_HEADER: &str = "X-Idem-Copy";

/// The header that carries the idempotency key (the adapters' default).
pub const KEY_HEADER: &str = "Idempotency-Key";

/// The engine a consumer runs on: any store, type-erased (the handler keeps
/// the concrete store it commits its effect through).
pub type MessageEngine = Engine<Arc<dyn Store>>;

/// The work of one message: called by the adapter (through
/// [`Engine::consume`]) only for a delivery whose key the engine claimed,
/// with the claim's [`Lease`]; its [`Handled`] is what the adapter gives
/// back to the engine.
pub type Handler = Arc<dyn Fn(Lease, Incoming) -> BoxFuture<Handled> + Send + Sync>;

/// Told about every delivery; see [`Event`]. Called on the consumer's tasks:
/// keep it short (the crash test appends a line to a file).
pub type Observer = Arc<dyn Fn(Event) + Send + Sync>;

/// Which broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BrokerKind {
    /// RabbitMQ through `lapin` and `idem-lapin` ([`rabbit`]).
    Rabbit,
    /// NATS JetStream through `async-nats` and `idem-nats` ([`nats`]).
    Nats,
}

impl BrokerKind {
    /// Every broker, in test order.
    pub const ALL: [Self; 2] = [Self::Rabbit, Self::Nats];

    /// The name used in test names, figures and the binary's arguments:
    /// `rabbitmq`, `nats`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Rabbit => "rabbitmq",
            Self::Nats => "nats",
        }
    }

    /// The kind [`name`](Self::name) names.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The broker's URL, from idem-testkit's environment
    /// ([`idem_testkit::env::amqp_url`], [`idem_testkit::env::nats_url`]).
    pub fn url(self) -> String {
        match self {
            Self::Rabbit => idem_testkit::env::amqp_url(),
            Self::Nats => idem_testkit::env::nats_url(),
        }
    }

    /// Connects to the broker at `url` with this kind's driver.
    ///
    /// # Behavior
    /// A broker that cannot be reached is [`BrokerError::Unreachable`] (the
    /// test then reports itself IGNORED, or FAILED under CI).
    pub async fn connect(self, url: &str) -> Result<Arc<dyn Broker>, BrokerError> {
        match self {
            Self::Rabbit => rabbit::connect(url).await,
            Self::Nats => nats::connect(url).await,
        }
    }
}

impl fmt::Display for BrokerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One message as the test publishes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    /// The idempotency key: the [`KEY_HEADER`] header.
    pub key: String,
    /// The body (the only fingerprinted part).
    pub payload: Bytes,
    /// Which copy of the message this is: the [`COPY_HEADER`] header.
    pub copy: u32,
}

/// A delivered message, as a [`Handler`] sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Incoming {
    /// The key the adapter consumed it under.
    pub key: String,
    /// The body.
    pub payload: Bytes,
    /// The [`COPY_HEADER`] header, if present and a number.
    pub copy: Option<u32>,
}

impl Incoming {
    /// A delivered message.
    pub fn new(key: impl Into<String>, payload: Bytes, copy: Option<u32>) -> Self {
        Self {
            key: key.into(),
            payload,
            copy,
        }
    }
}

/// What a driver reports to the [`Observer`] for each delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A delivery arrived, before the engine saw it (so that a delivery cut
    /// short by a kill is counted too).
    Received {
        /// The key as the adapter will take it (header, else message id);
        /// `None` when the message has none.
        key: Option<String>,
        /// The [`COPY_HEADER`] header.
        copy: Option<u32>,
        /// The broker's own redelivery mark (RabbitMQ's `redelivered` flag,
        /// JetStream's delivery count above 1), if it gives one.
        redelivered: bool,
    },
    /// The adapter settled the delivery with the broker: the acknowledgement,
    /// delayed redelivery or dead-lettering was sent (and, where the broker
    /// confirms it, confirmed).
    Settled {
        /// As in [`Event::Received`].
        key: Option<String>,
        /// As in [`Event::Received`].
        copy: Option<u32>,
        /// What was done.
        settlement: Settlement,
    },
}

/// What the adapter did with a delivery, as reported in [`Event::Settled`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Settlement {
    /// Acknowledged: the handler ran now (`replayed: false`) or an earlier
    /// delivery's result was found (`replayed: true`).
    Acked {
        /// Whether the result was an earlier delivery's.
        replayed: bool,
    },
    /// Handed back for a redelivery no sooner than `delay` from now (the
    /// delay the broker was actually asked for, after any rounding).
    Retried {
        /// The redelivery delay.
        delay: Duration,
    },
    /// Rejected to the dead letters (payload mismatch, missing or invalid
    /// key, permanent failure, outcome unknown).
    DeadLettered,
}

/// What is left on a queue; see [`Broker::backlog`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Backlog {
    /// Messages waiting to be delivered (RabbitMQ: ready; JetStream: the
    /// consumer's pending).
    pub ready: u64,
    /// Messages delivered and neither acknowledged nor handed back
    /// (RabbitMQ: unacked; JetStream: ack pending, which includes messages
    /// of a killed consumer until `ack_wait` lapses).
    pub unacked: u64,
    /// Messages waiting out a redelivery delay outside the work queue
    /// (RabbitMQ: in the adapter's delay queues; 0 where the broker keeps
    /// them in `ready`/`unacked`).
    pub delayed: u64,
    /// Messages dead-lettered (RabbitMQ: in the dead-letter queue;
    /// JetStream: terminated, as the driver counts them).
    pub dead_lettered: u64,
    /// Consumers the broker still counts on the queue, where it says
    /// (RabbitMQ: a killed consumer's messages return to `ready` only once
    /// the broker has noticed its connection closed, i.e. this is 0; AMQP
    /// cannot count unacknowledged messages, so `unacked` is 0 there).
    /// `None` where `unacked` is counted directly (JetStream).
    pub consumers: Option<u64>,
}

impl Backlog {
    /// A backlog.
    pub fn new(ready: u64, unacked: u64, delayed: u64, dead_lettered: u64) -> Self {
        Self {
            ready,
            unacked,
            delayed,
            dead_lettered,
            consumers: None,
        }
    }

    /// Sets [`consumers`](Self::consumers).
    pub fn with_consumers(mut self, consumers: u64) -> Self {
        self.consumers = Some(consumers);
        self
    }

    /// Whether the counts are final once the test stopped every consumer:
    /// the broker counts no consumer any more (or does not say).
    pub fn is_settled(&self) -> bool {
        self.consumers.is_none_or(|n| n == 0)
    }

    /// Whether nothing is waiting for a consumer: no ready, unacked or
    /// delayed message (dead letters are not waiting).
    pub fn is_drained(&self) -> bool {
        self.ready == 0 && self.unacked == 0 && self.delayed == 0
    }
}

/// How a consumer process consumes; see [`Broker::consume`].
#[derive(Clone)]
#[non_exhaustive]
pub struct ConsumerSetup {
    /// The engine (its policy's lease decides how long a killed consumer's
    /// keys stay in flight).
    pub engine: Arc<MessageEngine>,
    /// The scope of every key.
    pub scope: Scope,
    /// The work of a message.
    pub handler: Handler,
    /// Told about every delivery.
    pub observer: Observer,
    /// Deliveries handled at once (RabbitMQ prefetch, JetStream
    /// `max_ack_pending` / concurrency).
    pub prefetch: u16,
    /// The redelivery delay for a [`Delivery::Retry`](idem_core::Delivery::Retry)
    /// without one of its own (a released key, a store unreachable).
    pub default_retry: Duration,
}

impl ConsumerSetup {
    /// A setup with `prefetch` 32 and `default_retry` 500 ms.
    pub fn new(
        engine: Arc<MessageEngine>,
        scope: Scope,
        handler: Handler,
        observer: Observer,
    ) -> Self {
        Self {
            engine,
            scope,
            handler,
            observer,
            prefetch: 32,
            default_retry: Duration::from_millis(500),
        }
    }

    /// Sets the number of deliveries handled at once.
    pub fn with_prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = prefetch;
        self
    }

    /// Sets the delay for a retry without one of its own.
    pub fn with_default_retry(mut self, delay: Duration) -> Self {
        self.default_retry = delay;
        self
    }
}

impl fmt::Debug for ConsumerSetup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsumerSetup")
            .field("scope", &self.scope)
            .field("prefetch", &self.prefetch)
            .field("default_retry", &self.default_retry)
            .finish_non_exhaustive()
    }
}

/// A broker, as the messaging crash test drives it. Object-safe: the test
/// and the binary hold an `Arc<dyn Broker>` from [`BrokerKind::connect`].
///
/// Every method may be called from a process other than the one that
/// declared the queue (the test declares and publishes; the binary
/// consumes; the test counts and deletes).
#[async_trait]
pub trait Broker: Send + Sync + fmt::Debug {
    /// Which broker this is.
    fn kind(&self) -> BrokerKind;

    /// Creates `queue` and everything its consumers need, empty.
    ///
    /// # Behavior
    /// - RabbitMQ: a durable queue `queue` whose dead letters go to the queue
    ///   `queue.dead` (`x-dead-letter-exchange` to the default exchange,
    ///   `x-dead-letter-routing-key`), plus whatever delay queues the
    ///   adapter uses.
    /// - JetStream: a stream `queue` (subjects `queue.>`, work-queue or
    ///   limits retention as the driver needs) and a durable consumer (pull
    ///   or push, the driver's choice) with explicit acks and an `ack_wait` of a few seconds at most (a
    ///   killed consumer's messages come back after it), and a way to count
    ///   terminated messages (for [`Backlog::dead_lettered`]).
    /// - Declaring an existing queue again with the same settings succeeds.
    async fn declare(&self, queue: &str) -> Result<(), BrokerError>;

    /// Publishes `messages` to `queue`, in order, and returns once the
    /// broker has confirmed every one (RabbitMQ publisher confirms;
    /// JetStream publish acks). The key goes in [`KEY_HEADER`], the copy in
    /// [`COPY_HEADER`], the payload as the body; where the broker has a
    /// message-id property of its own (AMQP `message_id`, JetStream
    /// `Nats-Msg-Id`) the driver does NOT set it (JetStream would deduplicate
    /// the copies itself, which is not what the test tests).
    async fn publish(&self, queue: &str, messages: &[Outgoing]) -> Result<(), BrokerError>;

    /// Consumes `queue` through the adapter's consumer loop until the
    /// connection fails (it never returns `Ok` by itself; the crash test
    /// kills the process running it).
    ///
    /// # Behavior
    /// - Reports [`Event::Received`] for every delivery before the adapter
    ///   handles it, and [`Event::Settled`] once the adapter settled it with
    ///   the broker.
    /// - Handles up to `setup.prefetch` deliveries at once.
    /// - A `Retry` is redelivered by the broker no sooner than the engine's
    ///   `after` (or `setup.default_retry`), and never before
    ///   [`idem_core::MIN_RETRY`].
    async fn consume(&self, queue: &str, setup: ConsumerSetup) -> Result<(), BrokerError>;

    /// What is left on `queue`: see [`Backlog`]. Counts as the broker
    /// reports them (RabbitMQ: passive queue declarations; JetStream:
    /// consumer and stream info), a snapshot.
    ///
    /// The crash test calls it once every consumer process is dead, polling
    /// until [`Backlog::is_settled`] (the broker noticed the last consumer
    /// gone), then requires [`Backlog::is_drained`]: a message a dead
    /// consumer held unacknowledged must show in `ready` or `unacked`.
    async fn backlog(&self, queue: &str) -> Result<Backlog, BrokerError>;

    /// Deletes `queue` and everything `declare` created for it; deleting a
    /// queue that does not exist succeeds.
    async fn delete(&self, queue: &str) -> Result<(), BrokerError>;
}

/// A broker operation that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// The broker could not be reached at `url`.
    #[error("{broker} is unreachable at {url}: {source}")]
    Unreachable {
        /// Which broker.
        broker: BrokerKind,
        /// Where (without credentials).
        url: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The broker refused or failed an operation.
    #[error("{broker}: {what}: {source}")]
    Broker {
        /// Which broker.
        broker: BrokerKind,
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// This broker's driver is not there yet.
    #[error("{0} has no driver yet")]
    NoDriver(BrokerKind),
}

impl BrokerError {
    /// An operation's failure.
    pub fn broker(
        broker: BrokerKind,
        what: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self::Broker {
            broker,
            what: what.into(),
            source: source.into(),
        }
    }

    /// Whether the broker could not be reached (the test is then IGNORED,
    /// or FAILED under CI), or has no driver.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Self::Unreachable { .. } | Self::NoDriver(_))
    }
}

/// `url` without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}
