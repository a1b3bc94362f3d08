//! RabbitMQ driver, through `idem-lapin`'s [`Consumer`].
//!
//! Topology of a test queue `q` ([`Broker::declare`]): the durable classic
//! queue `q`, dead-lettering (`x-dead-letter-exchange` = the default
//! exchange, `x-dead-letter-routing-key` = `q.dead`) to the durable queue
//! `q.dead`, and the adapter's delay queues `q.idem-delay.<ms>ms` (declared
//! up front, so that [`Broker::backlog`] can count them passively).
//! Messages are published through the default exchange with publisher
//! confirms, the key in `Idempotency-Key`, the copy in
//! [`COPY_HEADER`], no `message_id`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use idem_lapin::lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use idem_lapin::lapin::types::{AMQPValue, FieldTable, LongString};
use idem_lapin::lapin::{self, BasicProperties, Channel, Connection, ConnectionProperties};
use idem_lapin::{Action, Config, Consumer, Message};

use super::{
    Backlog, Broker, BrokerError, BrokerKind, COPY_HEADER, ConsumerSetup, Event, Incoming,
    KEY_HEADER, Outgoing, Settlement, redact,
};

/// How long connecting may take before the broker counts as unreachable.
const CONNECT_LIMIT: Duration = Duration::from_secs(3);

/// Publishes awaited at once (pipelined confirms).
const PUBLISH_WINDOW: usize = 256;

/// The adapter's configuration for a consumer of the crash test (the delay
/// tiers are idem-lapin's defaults: the driver declares and deletes the same
/// delay queues in every process).
pub fn config(setup: &ConsumerSetup) -> Config {
    Config::default()
        .with_prefetch(setup.prefetch)
        .with_default_retry(setup.default_retry)
}

/// Connects to the RabbitMQ broker at `url`; see [`BrokerKind::connect`].
pub async fn connect(url: &str) -> Result<Arc<dyn Broker>, BrokerError> {
    let unreachable = |source: Box<dyn std::error::Error + Send + Sync>| BrokerError::Unreachable {
        broker: BrokerKind::Rabbit,
        url: redact(url),
        source,
    };
    let connection = tokio::time::timeout(
        CONNECT_LIMIT,
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    .map_err(|_| unreachable(format!("no connection within {CONNECT_LIMIT:?}").into()))?
    .map_err(|e| unreachable(Box::new(e)))?;
    Ok(Arc::new(Rabbit { connection }))
}

/// A connection to RabbitMQ; every operation opens a channel of its own (a
/// refused operation closes its channel only).
pub struct Rabbit {
    connection: Connection,
}

impl std::fmt::Debug for Rabbit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rabbit").finish_non_exhaustive()
    }
}

fn failed(what: impl Into<String>) -> impl FnOnce(lapin::Error) -> BrokerError {
    let what = what.into();
    move |e| BrokerError::broker(BrokerKind::Rabbit, what, e)
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// The dead-letter queue of `queue`.
pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dead")
}

impl Rabbit {
    async fn channel(&self) -> Result<Channel, BrokerError> {
        self.connection
            .create_channel()
            .await
            .map_err(failed("open a channel"))
    }

    /// (messages ready, consumers) of `queue`, by a passive declaration.
    async fn count(&self, queue: &str) -> Result<(u64, u64), BrokerError> {
        let channel = self.channel().await?;
        let q = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions::default().passive(),
                FieldTable::default(),
            )
            .await
            .map_err(failed(format!("count {queue}")))?;
        let _ = channel.close(200, "counted".into()).await;
        Ok((u64::from(q.message_count()), u64::from(q.consumer_count())))
    }

    fn delay_queues(queue: &str) -> Vec<String> {
        Config::default().delay_queues(queue)
    }
}

#[async_trait]
impl Broker for Rabbit {
    fn kind(&self) -> BrokerKind {
        BrokerKind::Rabbit
    }

    async fn declare(&self, queue: &str) -> Result<(), BrokerError> {
        let channel = self.channel().await?;
        let dead = dead_letter_queue(queue);
        let mut args = FieldTable::default();
        args.insert("x-dead-letter-exchange".into(), long(""));
        args.insert("x-dead-letter-routing-key".into(), long(&dead));
        channel
            .queue_declare(queue.into(), QueueDeclareOptions::durable(), args)
            .await
            .map_err(failed(format!("declare {queue}")))?;
        channel
            .queue_declare(
                dead.as_str().into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await
            .map_err(failed(format!("declare {dead}")))?;
        idem_lapin::declare_delay_queues(&channel, queue, &Config::default())
            .await
            .map_err(|e| BrokerError::broker(BrokerKind::Rabbit, "declare the delay queues", e))?;
        let _ = channel.close(200, "declared".into()).await;
        Ok(())
    }

    async fn publish(&self, queue: &str, messages: &[Outgoing]) -> Result<(), BrokerError> {
        let channel = self.channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(failed("confirm.select"))?;
        for window in messages.chunks(PUBLISH_WINDOW) {
            let mut confirms = Vec::with_capacity(window.len());
            for m in window {
                let mut headers = FieldTable::default();
                headers.insert(KEY_HEADER.into(), long(&m.key));
                headers.insert(
                    COPY_HEADER.into(),
                    AMQPValue::LongLongInt(i64::from(m.copy)),
                );
                let confirm = channel
                    .basic_publish(
                        "".into(),
                        queue.into(),
                        BasicPublishOptions {
                            mandatory: true,
                            immediate: false,
                        },
                        &m.payload,
                        BasicProperties::default().with_headers(headers),
                    )
                    .await
                    .map_err(failed(format!("publish to {queue}")))?;
                confirms.push(confirm);
            }
            for confirm in confirms {
                let confirmation = confirm
                    .await
                    .map_err(failed(format!("confirm of a publish to {queue}")))?;
                let refused = match confirmation {
                    lapin::Confirmation::Ack(None) => None,
                    lapin::Confirmation::Ack(Some(_)) => Some("returned unroutable"),
                    lapin::Confirmation::Nack(_) => Some("refused"),
                    lapin::Confirmation::NotRequested => Some("not confirmed"),
                };
                if let Some(why) = refused {
                    return Err(BrokerError::broker(
                        BrokerKind::Rabbit,
                        format!("publish to {queue}"),
                        why,
                    ));
                }
            }
        }
        let _ = channel.close(200, "published".into()).await;
        Ok(())
    }

    async fn consume(&self, queue: &str, setup: ConsumerSetup) -> Result<(), BrokerError> {
        let channel = self.channel().await?;
        let config = config(&setup);
        let ConsumerSetup {
            engine,
            scope,
            handler,
            observer,
            ..
        } = setup;
        let consumer = Consumer::new((*engine).clone(), scope)
            .with_config(config)
            .observe(move |event| match event {
                idem_lapin::Event::Received(m) => observer(Event::Received {
                    key: m.key().map(String::from),
                    copy: copy_of(m),
                    redelivered: m.redelivered(),
                }),
                idem_lapin::Event::Settled(m, settled) => observer(Event::Settled {
                    key: m.key().map(String::from),
                    copy: copy_of(m),
                    settlement: match &settled.action {
                        Action::Acked { replayed } => Settlement::Acked {
                            replayed: *replayed,
                        },
                        Action::Delayed { delay, .. } => Settlement::Retried { delay: *delay },
                        _ => Settlement::DeadLettered,
                    },
                }),
                _ => {}
            });
        consumer
            .run(&channel, queue, move |lease, message: Message| {
                let incoming = Incoming::new(
                    message.key().unwrap_or_default(),
                    Bytes::copy_from_slice(message.payload()),
                    copy_of(&message),
                );
                handler(lease, incoming)
            })
            .await
            .map_err(|e| BrokerError::broker(BrokerKind::Rabbit, format!("consume {queue}"), e))
    }

    async fn backlog(&self, queue: &str) -> Result<Backlog, BrokerError> {
        let (ready, consumers) = self.count(queue).await?;
        let mut delayed = 0;
        for name in Self::delay_queues(queue) {
            delayed += self.count(&name).await?.0;
        }
        let (dead, _) = self.count(&dead_letter_queue(queue)).await?;
        Ok(Backlog::new(ready, 0, delayed, dead).with_consumers(consumers))
    }

    async fn delete(&self, queue: &str) -> Result<(), BrokerError> {
        let channel = self.channel().await?;
        let mut names = vec![queue.to_string(), dead_letter_queue(queue)];
        names.extend(Self::delay_queues(queue));
        for name in names {
            channel
                .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                .await
                .map_err(failed(format!("delete {name}")))?;
        }
        let _ = channel.close(200, "deleted".into()).await;
        Ok(())
    }
}

/// The [`COPY_HEADER`] of `message`.
fn copy_of(message: &Message) -> Option<u32> {
    message
        .header_str(COPY_HEADER)
        .and_then(|s| s.parse().ok())
        .or_else(|| {
            let headers = message.properties().headers().as_ref()?;
            headers
                .inner()
                .iter()
                .find(|(k, _)| k.as_str().eq_ignore_ascii_case(COPY_HEADER))
                .and_then(|(_, v)| match *v {
                    AMQPValue::LongLongInt(n) => u32::try_from(n).ok(),
                    AMQPValue::LongInt(n) => u32::try_from(n).ok(),
                    AMQPValue::LongUInt(n) => Some(n),
                    _ => None,
                })
        })
}
