//! # idem-lapin
//!
//! Exactly-once processing of RabbitMQ messages with **idem**: a
//! [`lapin`] consumer ([`Consumer`]) that runs each message's handler at
//! most once per idempotency key through [`idem_core::Engine::consume`], and
//! acknowledges a delivery only once the engine settled it.
//!
//! RabbitMQ delivers at least once: a consumer that dies after its effect
//! and before its `basic.ack` gets the message again, and a publisher that
//! retries after a lost confirm sends it twice. With a key per message, the
//! second delivery finds the first one's stored result and is acknowledged
//! without running the handler again.
//!
//! ## The recipe
//! - **Key**: the publisher puts one key per logical message in the
//!   `Idempotency-Key` header (configurable: [`Config::with_key_header`]),
//!   and keeps it when it retries a publish; without the header, the AMQP
//!   `message_id` property is the key. A message with neither is
//!   dead-lettered unrun.
//! - **Fingerprint**: the body alone ([`body_fingerprint`]; the routing key
//!   changes when a message comes back from a delay or dead-letter queue).
//!   The same key with another body is dead-lettered
//!   ([`DeadLetterReason::PayloadMismatch`](idem_core::DeadLetterReason::PayloadMismatch)).
//! - **Acknowledgement order**: the handler runs, its result is stored (or
//!   committed with its effect: [`Handled::Committed`](idem_core::Handled::Committed)),
//!   then `basic.ack`. Never acknowledge first: a consumer dying in between
//!   would lose the message.
//! - **In flight elsewhere**: a key another consumer is running is
//!   redelivered later, no sooner than the engine asks (the time left on the
//!   holder's lease) and never before [`MIN_RETRY`](idem_core::MIN_RETRY):
//!   by default through per-queue delay queues ([`Redelivery::DelayQueues`]),
//!   never by an immediate requeue (which would spin).
//! - **Dead letters**: a payload mismatch, a permanent failure
//!   ([`Handled::Fail`](idem_core::Handled::Fail)), an unknown outcome, a
//!   missing or invalid key → `basic.reject(requeue = false)`: declare the
//!   work queue with `x-dead-letter-exchange` (and, for a quorum queue, an
//!   `x-delivery-limit` for messages that crash their consumer) so that they
//!   land somewhere you look.
//! - **Exactly once**: when the effect is a write to the same SQLite or
//!   PostgreSQL database as the idempotency records, commit the key's
//!   completion in the effect's transaction ([`Handled::Committed`](idem_core::Handled::Committed)):
//!   a consumer killed at any point leaves both or neither. With
//!   [`Handled::Complete`](idem_core::Handled::Complete) (another store, an
//!   external call) a consumer killed between the effect and the completion
//!   lets the redelivery run the handler again once the lease lapses: that
//!   window is at-least-once.
//!
//! ## Example
//! ```no_run
//! use idem_core::{Engine, Handled, MemoryStore, Outcome, Scope};
//! use idem_lapin::{Config, Consumer};
//! use lapin::options::QueueDeclareOptions;
//! use lapin::types::{AMQPValue, FieldTable, LongString};
//! use lapin::{Connection, ConnectionProperties};
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let connection =
//!     Connection::connect("amqp://guest:guest@127.0.0.1:5672/%2f", ConnectionProperties::default())
//!         .await?;
//! let channel = connection.create_channel().await?;
//! // The work queue dead-letters to `invoices.dead`.
//! let mut args = FieldTable::default();
//! args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(LongString::from("")));
//! args.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(LongString::from("invoices.dead")));
//! channel.queue_declare("invoices".into(), QueueDeclareOptions::durable(), args).await?;
//! channel
//!     .queue_declare("invoices.dead".into(), QueueDeclareOptions::durable(), FieldTable::default())
//!     .await?;
//!
//! let engine = Engine::new(MemoryStore::new()); // SQLite, PostgreSQL or Redis in production
//! let consumer = Consumer::new(engine, Scope::tenant("billing").with_operation("invoice.paid"))
//!     .with_config(Config::default().with_prefetch(16));
//! consumer
//!     .run(&channel, "invoices", |_lease, message| async move {
//!         println!("crediting {} bytes", message.payload().len()); // the effect
//!         Handled::Complete(Outcome::new(&b"credited"[..]))
//!     })
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! TLS (`amqps://`) is a feature of `lapin` itself: enable `lapin`'s
//! `rustls` (or `native-tls`, `openssl`) feature in your own `Cargo.toml`;
//! this crate enables none.
#![forbid(unsafe_code)]

mod config;
mod consumer;
mod error;
mod message;

pub use config::{
    Config, DEFAULT_DELAY_TIERS, DEFAULT_KEY_HEADER, DELAYS_HEADER, FingerprintFn, Redelivery,
    body_fingerprint,
};
pub use consumer::{Action, Consumer, Event, Settled, declare_delay_queues, delete_delay_queues};
pub use error::Error;
pub use message::{KeySource, Message};

/// The `lapin` this crate is built against.
pub use lapin;
