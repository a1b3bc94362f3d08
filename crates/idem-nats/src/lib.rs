//! # idem-nats
//!
//! NATS JetStream consumers for **idem**: every message's effect once,
//! however many times JetStream delivers it and however many copies its
//! publisher sent. A [`Consumer`] runs each delivery through
//! [`Engine::consume`](idem_core::Engine::consume) and tells JetStream what
//! to do with it only once the engine settled.
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use async_nats::jetstream::{self, consumer::pull};
//! use idem_core::{Engine, Handled, MemoryStore, Outcome, Scope};
//! use idem_nats::{Config, Consumer};
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let js = jetstream::new(async_nats::connect("nats://127.0.0.1:4222").await?);
//! let ack_wait = Duration::from_secs(30);
//! let orders = js
//!     .get_stream("ORDERS")
//!     .await?
//!     .get_or_create_consumer(
//!         "billing",
//!         pull::Config {
//!             durable_name: Some("billing".into()),
//!             filter_subject: "orders.paid".into(),
//!             ack_wait,
//!             max_deliver: 20, // a poison message that kills the process ends here
//!             max_ack_pending: 64,
//!             ..Default::default()
//!         },
//!     )
//!     .await?;
//!
//! let engine = Engine::new(MemoryStore::new()); // a shared store in production
//! let consumer = Consumer::new(engine, Scope::tenant("billing").with_operation("order.paid"))
//!     .with_config(
//!         Config::default()
//!             .with_ack_wait(ack_wait) // +WPI every 10 s while a handler runs
//!             .with_dead_letter_subject("orders.dead")? // a subject of some stream
//!             .with_concurrency(16),
//!     );
//! let messages = orders.stream().max_messages_per_batch(16).messages().await?;
//! consumer
//!     .run(messages, |_lease, message| async move {
//!         // The effect, once per key: message.key(), message.payload().
//!         let _ = message.payload();
//!         Handled::Complete(Outcome::new(&b"billed"[..]))
//!     })
//!     .await;
//! # Ok(()) }
//! ```
//!
//! ## Where the key comes from
//!
//! 1. The `Idempotency-Key` header ([`Config::with_key_header`] names
//!    another): the application's id of the logical message, the same in
//!    every copy the publisher sends.
//! 2. Else `Nats-Msg-Id`, JetStream's publish-deduplication id
//!    ([`Config::with_msg_id_fallback`]).
//! 3. Else none: the message is dead-lettered unrun
//!    ([`DeadLetterCause::MissingKey`]); without a key it cannot be
//!    deduplicated, and running it would silently break the promise.
//!
//! The explicit header comes first because it says what the application
//! means; `Nats-Msg-Id` is a transport id that tools and republishers set
//! to other things. Publishers should set **both to the same value**:
//! JetStream then drops copies sent within the stream's duplicate window
//! (`duplicate_window`, 2 minutes by default) before anyone sees them, and
//! the engine deduplicates the rest — copies sent after the window, copies
//! published to another stream, and every redelivery. JetStream's own
//! deduplication covers only that window; the engine's covers the key's
//! whole retention.
//!
//! The fingerprint is over the payload ([`payload_fingerprint`]): the same
//! key with another payload is dead-lettered as a mismatch. Headers are not
//! fingerprinted (tracing headers and `Nats-*` headers differ between
//! copies), and neither is the subject by default (see
//! [`payload_fingerprint`] for why; [`subject_and_payload_fingerprint`]
//! adds it).
//!
//! ## Acknowledgement order
//!
//! Nothing is acknowledged before the engine returned, and each delivery is
//! settled exactly once:
//!
//! | the engine answers | JetStream is told |
//! |---|---|
//! | [`Delivery::Ack`](idem_core::Delivery::Ack) (ran now, or a replay) | `+ACK` |
//! | [`Delivery::Retry`](idem_core::Delivery::Retry) (key in flight elsewhere, released, store down) | `-NAK {"delay": …}`: the engine's `after`, or [`Config::with_default_retry`], never below [`MIN_RETRY`](idem_core::MIN_RETRY) |
//! | [`Delivery::DeadLetter`](idem_core::Delivery::DeadLetter) (mismatch, permanent failure, outcome unknown) | a copy to the dead-letter subject if configured, then `+TERM` |
//!
//! A consumer that dies before its `+ACK` leaves the delivery pending:
//! JetStream redelivers it after `ack_wait`, and the engine answers with the
//! stored result (the handler does not run again) — or, if the first
//! consumer died with the handler mid-run, with a retry until its lease
//! lapses. Whether an effect can run twice depends on where the handler's
//! effect commits: [`Handled::Committed`](idem_core::Handled::Committed)
//! (the effect and the key's completion in one SQL transaction) closes the
//! window; [`Handled::Complete`](idem_core::Handled::Complete) leaves window
//! W3 of docs/reliability.md open between the effect and the completion.
//!
//! `+ACK`, `-NAK` and `+TERM` wait for the server's reply by default
//! (`double_ack`; [`Config::with_confirmed_acks`]). That guarantees the
//! server received the settlement, not that the effect happened once: a lost
//! acknowledgement only costs a redelivery, which the engine answers. The
//! exactly-once effect comes from the engine.
//!
//! ## `ack_wait`, progress and `max_deliver`
//!
//! - While the engine works on a delivery, the consumer sends `+WPI` (in
//!   progress) every [`Config::progress_every`] (default 10 s, a third of
//!   JetStream's default `ack_wait`; [`Config::with_ack_wait`] derives it
//!   from yours), so that a handler longer than `ack_wait` does not get its
//!   message redelivered to another consumer meanwhile. If it were, the other
//!   consumer would find the key in flight and `-NAK` it with a delay:
//!   harmless, but wasted.
//! - Every `-NAK` counts as a delivery against the consumer's `max_deliver`.
//!   The engine's delay for a key in flight is the time left on the holder's
//!   lease, so a key held by a live consumer costs about one redelivery per
//!   lease. A finite `max_deliver` is still wise: it is what stops a message
//!   that crashes its consumer every time (each crash leaves the key to be
//!   claimed again once its lease lapses). Size it for the longest wait you
//!   accept, and watch for the messages it drops (below).
//! - [`Consumer::run`] takes up to twice [`Config::concurrency`] messages
//!   from the stream at once and reports the waiting ones in progress too;
//!   messages still buffered inside the client are not reported, and their
//!   `ack_wait` runs while they wait. So deliver no more than that ahead: a
//!   pull stream's `max_messages_per_batch` at most the concurrency, a push
//!   consumer's `max_ack_pending` at most twice the concurrency (per
//!   consumer process).
//!
//! ## Pull or push
//!
//! [`Consumer::run`] takes any stream of JetStream messages: a pull
//! consumer's (`consumer.stream()…messages()`) or a push consumer's
//! (`consumer.messages()`, with a `deliver_group` when several processes
//! share it). One server flaw decides between them on nats-server 2.9: when
//! a redelivery falls due while the only pull requests waiting belong to a
//! client that is gone (a consumer process that just died), the server
//! rewinds the consumer by one message, and the newest message already
//! delivered, often already acknowledged, is delivered again as new. The
//! engine answers it as a replay (nothing runs twice), but where consumers
//! die often, a push consumer (which has no waiting requests) avoids the
//! extra deliveries. idem's crash test uses a push consumer for that reason.
//!
//! ## Dead letters
//!
//! JetStream has no dead-letter queue of its own: `+TERM` and an exhausted
//! `max_deliver` only stop redelivery and publish an advisory
//! (`$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.<stream>.<consumer>` and
//! `$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.<stream>.<consumer>`, each
//! naming the stream sequence), which a listener can turn into a dead-letter
//! record (the message stays in a limits-retention stream until its limits
//! remove it). For the terminations this crate decides, it can do that
//! itself: [`Config::with_dead_letter_subject`] publishes a copy to a
//! subject of your choice (with the reason, key and origin in `Idem-*`
//! headers, see [`DEAD_LETTER_REASON_HEADER`] and the like) and terminates
//! the delivery only once the copy is stored. Messages dropped by
//! `max_deliver` still need the advisory listener.
//!
//! ## What a publisher should send
//!
//! ```text
//! Idempotency-Key: <the logical message's id, the same in every copy>
//! Nats-Msg-Id:     <the same value>
//! ```
//!
//! and the same payload in every copy. A publisher that retries after a lost
//! publish acknowledgement sends an identical copy; JetStream drops it within
//! the duplicate window, and the engine acknowledges it as a replay outside
//! it.

mod config;
mod consumer;
mod error;
mod message;

pub use config::{
    Config, ConfigError, DEFAULT_CONCURRENCY, DEFAULT_KEY_HEADER, DEFAULT_PROGRESS_EVERY,
    DEFAULT_RETRY, FingerprintFn, MIN_PROGRESS_EVERY, payload_fingerprint,
    subject_and_payload_fingerprint,
};
pub use consumer::{
    Consumer, DEAD_LETTER_KEY_HEADER, DEAD_LETTER_REASON_HEADER, DeadLetterCause, DeadLetterCopy,
    Event, ORIGINAL_SEQUENCE_HEADER, ORIGINAL_STREAM_HEADER, ORIGINAL_SUBJECT_HEADER, Observer,
    Processed, Settlement,
};
pub use error::Error;
pub use message::{KeySource, Message};

/// The `async-nats` this crate is built on.
pub use async_nats;
