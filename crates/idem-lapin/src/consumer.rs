//! [`Consumer`]: the consumer loop (key, engine, settlement with the
//! broker).

use std::collections::HashSet;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use idem_core::store::Store;
use idem_core::{Clock, DeadLetterReason, DefaultClock, Delivery, Engine, Handled, Lease, Scope};
use lapin::message::Delivery as AmqpDelivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Confirmation};
use tokio::task::JoinSet;

use crate::config::{Config, Redelivery};
use crate::message::{Message, header};
use crate::{DELAYS_HEADER, Error};

/// What the consumer did with a delivery: see [`Settled`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Action {
    /// `basic.ack`: the handler ran now (`replayed: false`) or an earlier
    /// delivery's result was found (`replayed: true`).
    Acked {
        /// Whether the result was an earlier delivery's.
        replayed: bool,
    },
    /// Handed back for a redelivery no sooner than `delay`: a copy was
    /// published to the delay queue `queue` (confirmed) and the original
    /// acknowledged, or (`queue: None`) the delivery was held for `delay`
    /// and then `basic.nack(requeue = true)`.
    Delayed {
        /// The delay the broker was asked for (the engine's, rounded up to a
        /// delay tier).
        delay: Duration,
        /// The delay queue, if one was used.
        queue: Option<String>,
    },
    /// `basic.reject(requeue = false)`: the queue's dead-letter exchange, if
    /// it has one, gets the message; RabbitMQ drops it otherwise.
    DeadLettered,
}

/// A delivery settled with the broker: what the engine decided and what
/// the consumer did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Settled {
    /// The engine's decision ([`Engine::consume`]); `None` when the message
    /// had no key (dead-lettered without asking the engine).
    pub decision: Option<Delivery>,
    /// What was done with the delivery.
    pub action: Action,
}

/// What an [observer](Consumer::observe) is told.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub enum Event<'a> {
    /// A delivery arrived; nothing was done with it yet.
    Received(&'a Message),
    /// A delivery was settled with the broker.
    Settled(&'a Message, &'a Settled),
}

type Observer = Arc<dyn Fn(&Event<'_>) + Send + Sync>;

/// A RabbitMQ consumer that processes each message at most once per key
/// with an [`Engine`]; see the [crate docs](crate) for the recipe.
///
/// # Behavior
/// For each delivery of the queue, on a task of its own (at most
/// [`Config::with_prefetch`] at once, which the broker enforces):
/// 1. The key is read from the key header, else the AMQP `message_id`
///    property. Without a key the message is rejected without requeue
///    (dead-lettered) and the engine is not asked.
/// 2. [`Engine::consume`] runs the handler if the key is new, under the
///    consumer's scope, with the fingerprint of the body (or
///    [`Config::with_fingerprint`]).
/// 3. Only then is the delivery settled, following the engine's
///    [`Delivery`]: `Ack` → `basic.ack`; `Retry` → a redelivery no sooner
///    than the engine asked ([`Redelivery`]), never an immediate requeue;
///    `DeadLetter` → `basic.reject(requeue = false)`. A handler that panics
///    is dead-lettered (the engine finishes its key as outcome unknown).
///
/// A consumer killed at any point leaves its deliveries unacknowledged:
/// RabbitMQ redelivers them when the connection closes, and the engine
/// answers the redelivery (the stored result, or a wait while the dead
/// consumer's lease lapses).
pub struct Consumer<S, C = DefaultClock> {
    engine: Engine<S, C>,
    scope: Scope,
    config: Arc<Config>,
    observer: Option<Observer>,
    declared: Arc<Mutex<HashSet<String>>>,
}

impl<S, C> Clone for Consumer<S, C> {
    fn clone(&self) -> Self {
        Self {
            engine: self.engine.clone(),
            scope: self.scope.clone(),
            config: self.config.clone(),
            observer: self.observer.clone(),
            declared: self.declared.clone(),
        }
    }
}

impl<S, C> std::fmt::Debug for Consumer<S, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("scope", &self.scope)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<S, C> Consumer<S, C>
where
    S: Store + 'static,
    C: Clock + 'static,
{
    /// A consumer of messages under `scope` (one scope per kind of message:
    /// the same key in two scopes is two messages), with the default
    /// [`Config`].
    pub fn new(engine: Engine<S, C>, scope: Scope) -> Self {
        Self {
            engine,
            scope,
            config: Arc::new(Config::default()),
            observer: None,
            declared: Arc::default(),
        }
    }

    /// Sets the configuration.
    pub fn with_config(mut self, config: Config) -> Self {
        self.config = Arc::new(config);
        self
    }

    /// Calls `observer` for every delivery: when it arrives and once it is
    /// settled (for metrics and logs). It runs on the delivery's task: keep
    /// it short and non-blocking.
    pub fn observe(mut self, observer: impl Fn(&Event<'_>) + Send + Sync + 'static) -> Self {
        self.observer = Some(Arc::new(observer));
        self
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Consumes `queue` on `channel` until the broker cancels the consumer
    /// or the channel fails; see [`run_until`](Self::run_until).
    pub async fn run<H, Fut>(&self, channel: &Channel, queue: &str, handler: H) -> Result<(), Error>
    where
        H: Fn(Lease, Message) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Handled> + Send + 'static,
    {
        self.run_until(channel, queue, handler, std::future::pending())
            .await
    }

    /// Consumes `queue` on `channel` until `shutdown` completes, the broker
    /// cancels the consumer or the channel fails.
    ///
    /// # Behavior
    /// - Sets the channel's prefetch (`basic.qos`) and, with
    ///   [`Redelivery::DelayQueues`], puts it in confirm mode; then
    ///   `basic.consume` with manual acknowledgements.
    /// - On `shutdown`: cancels the consumer, waits for the deliveries being
    ///   handled to be settled, and returns `Ok`. Deliveries the broker sent
    ///   but no task started stay unacknowledged until the channel closes
    ///   (then RabbitMQ redelivers them): close the channel afterwards.
    /// - Dropping the returned future does not stop the deliveries being
    ///   handled: each settles on its own task (a handler stopped halfway
    ///   would leave its key's outcome unknown).
    /// - Errors: setting up the channel or the consumer; the consumer
    ///   stream's error (a closed channel or connection); otherwise the
    ///   first delivery that could not be settled (its channel failed: the
    ///   broker redelivers it).
    pub async fn run_until<H, Fut, D>(
        &self,
        channel: &Channel,
        queue: &str,
        handler: H,
        shutdown: D,
    ) -> Result<(), Error>
    where
        H: Fn(Lease, Message) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Handled> + Send + 'static,
        D: Future<Output = ()>,
    {
        channel
            .basic_qos(self.config.prefetch, BasicQosOptions::default())
            .await
            .map_err(Error::amqp("basic.qos"))?;
        if matches!(self.config.redelivery, Redelivery::DelayQueues { .. }) {
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(Error::amqp("confirm.select"))?;
        }
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                self.config.consumer_tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(Error::amqp("basic.consume"))?;
        let handler = Arc::new(handler);
        let queue: Arc<str> = Arc::from(queue);
        let mut tasks = Tasks(JoinSet::new());
        let mut failed: Option<Error> = None;
        let mut shutdown = std::pin::pin!(shutdown);
        let ended = loop {
            tokio::select! {
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        let (this, channel, queue, handler) =
                            (self.clone(), channel.clone(), queue.clone(), handler.clone());
                        tasks.0.spawn(async move {
                            this.handle(&channel, &queue, delivery, handler).await
                        });
                    }
                    Some(Err(e)) => break Err(Error::Amqp { operation: "basic.consume", source: e }),
                    None => break Ok(()),
                },
                () = &mut shutdown => {
                    let cancelled = channel
                        .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                        .await
                        .map_err(Error::amqp("basic.cancel"));
                    break cancelled;
                }
                Some(done) = tasks.0.join_next(), if !tasks.0.is_empty() => {
                    note(&mut failed, done);
                }
            }
        };
        while let Some(done) = tasks.0.join_next().await {
            note(&mut failed, done);
        }
        match (ended, failed) {
            (Err(e), _) | (Ok(()), Some(e)) => Err(e),
            (Ok(()), None) => Ok(()),
        }
    }

    /// Handles one delivery: see the type's docs.
    async fn handle<H, Fut>(
        &self,
        channel: &Channel,
        queue: &str,
        delivery: AmqpDelivery,
        handler: Arc<H>,
    ) -> Result<Settled, Error>
    where
        H: Fn(Lease, Message) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Handled> + Send + 'static,
    {
        let config = &self.config;
        let message = Message::of(&delivery, &config.key_header, config.message_id_fallback);
        self.tell(&Event::Received(&message));
        let Some(key) = message.key() else {
            reject(&delivery).await?;
            return Ok(self.settled(&message, None, Action::DeadLettered));
        };
        let fingerprint = (config.fingerprint)(&delivery);
        let for_handler = message.clone();
        let run = self
            .engine
            .consume(&self.scope, key, fingerprint, move |lease| {
                handler(lease, for_handler)
            });
        // A panicking handler: the engine finishes the key as outcome
        // unknown; the delivery is dead-lettered, as its redeliveries would be.
        let decision = AssertUnwindSafe(run)
            .catch_unwind()
            .await
            .unwrap_or(Delivery::DeadLetter {
                reason: DeadLetterReason::OutcomeUnknown,
            });
        let action = match &decision {
            Delivery::Ack { replayed, .. } => {
                delivery
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(Error::amqp("basic.ack"))?;
                Action::Acked {
                    replayed: *replayed,
                }
            }
            Delivery::DeadLetter { .. } => {
                reject(&delivery).await?;
                Action::DeadLettered
            }
            Delivery::Retry { after, .. } => self.delay(channel, queue, &delivery, *after).await?,
            // A decision this version does not know: redeliver later.
            _ => self.delay(channel, queue, &delivery, None).await?,
        };
        Ok(self.settled(&message, Some(decision), action))
    }

    /// Redelivers `delivery` no sooner than `after` (see [`Redelivery`]).
    async fn delay(
        &self,
        channel: &Channel,
        queue: &str,
        delivery: &AmqpDelivery,
        after: Option<Duration>,
    ) -> Result<Action, Error> {
        let (delay, target) = self.config.delay_for(queue, after);
        if let Some(target) = target {
            match self
                .republish(channel, queue, &target, delay, delivery)
                .await
            {
                Ok(()) => {
                    delivery
                        .ack(BasicAckOptions::default())
                        .await
                        .map_err(Error::amqp("basic.ack"))?;
                    return Ok(Action::Delayed {
                        delay,
                        queue: Some(target),
                    });
                }
                Err(e) => tracing::warn!(
                    error = %e,
                    "idem-lapin: could not delay a delivery through {target}; holding it for {delay:?} and requeueing it instead"
                ),
            }
        }
        tokio::time::sleep(delay).await;
        delivery
            .nack(BasicNackOptions {
                multiple: false,
                requeue: true,
            })
            .await
            .map_err(Error::amqp("basic.nack"))?;
        Ok(Action::Delayed { delay, queue: None })
    }

    /// Publishes a copy of `delivery` to the delay queue `target` (declared
    /// first if this consumer has not yet) and waits for its confirm.
    async fn republish(
        &self,
        channel: &Channel,
        queue: &str,
        target: &str,
        delay: Duration,
        delivery: &AmqpDelivery,
    ) -> Result<(), Error> {
        let known = self
            .declared
            .lock()
            .map(|d| d.contains(target))
            .unwrap_or(false);
        if !known {
            declare_delay_queue(channel, queue, target, delay).await?;
            if let Ok(mut d) = self.declared.lock() {
                d.insert(target.to_string());
            }
        }
        let properties = copy_properties(&delivery.properties);
        let confirm = channel
            .basic_publish(
                "".into(),
                target.into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &delivery.data,
                properties,
            )
            .await
            .map_err(Error::amqp("basic.publish"))?
            .await
            .map_err(Error::amqp("basic.publish (confirm)"))?;
        let refused = |reason| {
            Err(Error::NotConfirmed {
                queue: target.to_string(),
                reason,
            })
        };
        match confirm {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_)) => refused("returned unroutable"),
            Confirmation::Nack(_) => refused("refused by the broker"),
            Confirmation::NotRequested => refused("the channel is not in confirm mode"),
        }
    }

    fn settled(&self, message: &Message, decision: Option<Delivery>, action: Action) -> Settled {
        let settled = Settled { decision, action };
        self.tell(&Event::Settled(message, &settled));
        settled
    }

    fn tell(&self, event: &Event<'_>) {
        if let Some(observer) = &self.observer {
            observer(event);
        }
    }
}

/// `basic.reject(requeue = false)`.
async fn reject(delivery: &AmqpDelivery) -> Result<(), Error> {
    delivery
        .reject(BasicRejectOptions { requeue: false })
        .await
        .map_err(Error::amqp("basic.reject"))?;
    Ok(())
}

/// The properties of a delayed copy: the original's, without the
/// broker's dead-lettering history, with [`DELAYS_HEADER`] one higher.
fn copy_properties(original: &BasicProperties) -> BasicProperties {
    let headers = original.headers().as_ref();
    let delays = header(headers, DELAYS_HEADER)
        .and_then(|v| match v {
            AMQPValue::LongLongInt(n) => Some(*n),
            _ => None,
        })
        .unwrap_or(0);
    let mut copied = FieldTable::default();
    if let Some(headers) = headers {
        for (k, v) in headers.inner() {
            let name = k.as_str();
            let broker_history = name == "x-death"
                || name.starts_with("x-first-death-")
                || name.starts_with("x-last-death-")
                || name.eq_ignore_ascii_case(DELAYS_HEADER);
            if !broker_history {
                copied.insert(k.clone(), v.clone());
            }
        }
    }
    copied.insert(
        DELAYS_HEADER.into(),
        AMQPValue::LongLongInt(delays.saturating_add(1)),
    );
    original.clone().with_headers(copied)
}

/// Declares the delay queue `name` of `queue`: durable, TTL `delay`,
/// dead-lettering to `queue` through the default exchange.
async fn declare_delay_queue(
    channel: &Channel,
    queue: &str,
    name: &str,
    delay: Duration,
) -> Result<(), Error> {
    let ttl = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
    let mut args = FieldTable::default();
    args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from("")),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(LongString::from(queue)),
    );
    channel
        .queue_declare(name.into(), QueueDeclareOptions::durable(), args)
        .await
        .map_err(Error::amqp("queue.declare (delay queue)"))?;
    Ok(())
}

/// Declares every delay queue `config` may use for `queue` (the consumer
/// declares each on first use otherwise: declare them beforehand where the
/// consumer's user may not declare queues).
///
/// # Behavior
/// Declaring a delay queue that exists succeeds; one that exists with other
/// arguments closes the channel with `PRECONDITION_FAILED` (an error here).
pub async fn declare_delay_queues(
    channel: &Channel,
    queue: &str,
    config: &Config,
) -> Result<(), Error> {
    if let Redelivery::DelayQueues { tiers } = &config.redelivery {
        for tier in tiers {
            let name = crate::config::delay_queue_name(queue, *tier);
            declare_delay_queue(channel, queue, &name, *tier).await?;
        }
    }
    Ok(())
}

/// Deletes every delay queue `config` may have declared for `queue` (with
/// the messages waiting in them: stop the consumers and let the delays run
/// out first), and returns how many messages they held.
pub async fn delete_delay_queues(
    channel: &Channel,
    queue: &str,
    config: &Config,
) -> Result<u64, Error> {
    let mut held = 0u64;
    for name in config.delay_queues(queue) {
        held += u64::from(
            channel
                .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                .await
                .map_err(Error::amqp("queue.delete (delay queue)"))?,
        );
    }
    Ok(held)
}

/// Keeps the first task failure.
fn note(failed: &mut Option<Error>, done: Result<Result<Settled, Error>, tokio::task::JoinError>) {
    let error = match done {
        Ok(Ok(_)) => return,
        Ok(Err(e)) => e,
        Err(e) => Error::Task(e.to_string()),
    };
    tracing::warn!(error = %error, "idem-lapin: a delivery could not be settled; the broker redelivers it");
    failed.get_or_insert(error);
}

/// The deliveries being handled: detached (never aborted) when the
/// consumer's future is dropped.
struct Tasks(JoinSet<Result<Settled, Error>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        self.0.detach_all();
    }
}
