//! [`Consumer`]: one delivery through the engine, then its settlement with
//! JetStream.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use async_nats::{HeaderMap, header};
use futures_util::stream::FuturesUnordered;
use futures_util::{Stream, StreamExt};
use idem_core::store::Store;
use idem_core::{Clock, DeadLetterReason, DefaultClock, Delivery, Engine, Handled, Lease, Scope};
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::{Config, Error, Message};

/// Told about every delivery [`Consumer::process`] handles; see [`Event`].
pub type Observer = Arc<dyn Fn(Event<'_>) + Send + Sync>;

/// What an [`Observer`] is told.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event<'a> {
    /// A delivery arrived; the engine has not seen it yet (so a delivery cut
    /// short by a crash is reported too).
    Received(&'a Message),
    /// The delivery was settled with JetStream.
    Settled(&'a Message, &'a Processed),
    /// The delivery could not be settled as decided (see [`Error`]).
    Failed(&'a Message, &'a Error),
    /// The message stream given to [`Consumer::run`] yielded an error (a
    /// missed heartbeat, a failed pull); the run goes on.
    StreamError(&'a str),
}

/// What [`Consumer::process`] did with a delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Processed {
    /// The key it was consumed under (`None`: the message had none).
    pub key: Option<String>,
    /// The engine's answer (`None` when the engine was not asked: no key).
    pub delivery: Option<Delivery>,
    /// What JetStream was told.
    pub settlement: Settlement,
}

/// What JetStream was told about a delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Settlement {
    /// `+ACK`: the handler ran now (`replayed: false`), or an earlier
    /// delivery's result was found (`replayed: true`).
    Acked {
        /// Whether the result was an earlier delivery's.
        replayed: bool,
    },
    /// `-NAK` with a delay: JetStream redelivers no sooner than `delay`.
    Naked {
        /// The delay asked for ([`Config::retry_delay`]).
        delay: Duration,
    },
    /// `+TERM`: JetStream never redelivers it (after a copy to the
    /// dead-letter subject, if one is configured).
    Terminated {
        /// Why.
        cause: DeadLetterCause,
        /// The copy on the dead-letter subject, if one is configured.
        copy: Option<DeadLetterCopy>,
    },
}

/// Why a delivery was dead-lettered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeadLetterCause {
    /// The message has neither the key header nor (with the fallback on)
    /// a `Nats-Msg-Id`: it cannot be deduplicated, so it is not run.
    MissingKey,
    /// The engine's answer (payload mismatch, invalid key, permanent
    /// failure, outcome unknown, store refusal).
    Engine(DeadLetterReason),
}

impl DeadLetterCause {
    /// A short name for headers and logs: `missing-key`,
    /// `payload-mismatch`, `invalid-key`, `failed`, `outcome-unknown`,
    /// `store-refused`.
    pub fn name(self) -> &'static str {
        match self {
            Self::MissingKey => "missing-key",
            Self::Engine(DeadLetterReason::PayloadMismatch) => "payload-mismatch",
            Self::Engine(DeadLetterReason::InvalidKey) => "invalid-key",
            Self::Engine(DeadLetterReason::Failed) => "failed",
            Self::Engine(DeadLetterReason::OutcomeUnknown) => "outcome-unknown",
            Self::Engine(DeadLetterReason::StoreRefused) => "store-refused",
            Self::Engine(_) => "dead-letter",
        }
    }
}

impl fmt::Display for DeadLetterCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where the copy of a dead letter was stored.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetterCopy {
    /// The dead-letter subject.
    pub subject: String,
    /// The stream that stored it.
    pub stream: String,
    /// Its sequence there.
    pub sequence: u64,
    /// Whether the stream dropped it as a duplicate of a copy sent before
    /// (a consumer that crashed between the copy and the `+TERM`).
    pub duplicate: bool,
}

/// Header of a dead-letter copy: why.
pub const DEAD_LETTER_REASON_HEADER: &str = "Idem-Dead-Letter-Reason";
/// Header of a dead-letter copy: the key it was consumed under.
pub const DEAD_LETTER_KEY_HEADER: &str = "Idem-Key";
/// Header of a dead-letter copy: the original subject.
pub const ORIGINAL_SUBJECT_HEADER: &str = "Idem-Original-Subject";
/// Header of a dead-letter copy: the original stream.
pub const ORIGINAL_STREAM_HEADER: &str = "Idem-Original-Stream";
/// Header of a dead-letter copy: the original stream sequence.
pub const ORIGINAL_SEQUENCE_HEADER: &str = "Idem-Original-Sequence";

/// Runs JetStream deliveries through [`Engine::consume`] and settles each
/// with JetStream once the engine settled; see the [crate docs](crate).
pub struct Consumer<S, C = DefaultClock> {
    engine: Engine<S, C>,
    scope: Scope,
    config: Config,
    observer: Option<Observer>,
}

impl<S, C> Clone for Consumer<S, C> {
    fn clone(&self) -> Self {
        Self {
            engine: self.engine.clone(),
            scope: self.scope.clone(),
            config: self.config.clone(),
            observer: self.observer.clone(),
        }
    }
}

impl<S, C> fmt::Debug for Consumer<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("scope", &self.scope)
            .field("config", &self.config)
            .field("observer", &self.observer.is_some())
            .finish_non_exhaustive()
    }
}

impl<S: Store, C: Clock> Consumer<S, C> {
    /// A consumer of messages for `engine`, every key in `scope`, with
    /// [`Config::default`].
    pub fn new(engine: Engine<S, C>, scope: Scope) -> Self {
        Self {
            engine,
            scope,
            config: Config::default(),
            observer: None,
        }
    }

    /// The same consumer with `config`.
    #[must_use]
    pub fn with_config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// The same consumer, telling `observer` about every delivery.
    #[must_use]
    pub fn with_observer(mut self, observer: impl Fn(Event<'_>) + Send + Sync + 'static) -> Self {
        self.observer = Some(Arc::new(observer));
        self
    }

    /// The settings.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The scope of every key.
    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    /// The engine.
    pub fn engine(&self) -> &Engine<S, C> {
        &self.engine
    }

    /// The view of `message` the handler gets: its key and where it came
    /// from ([`Message::new`] with this consumer's settings).
    pub fn message(&self, message: &jetstream::Message) -> Message {
        Message::new(message, &self.config)
    }

    /// Handles one delivery: runs `handler` at most once per key through
    /// [`Engine::consume`], then settles the delivery with JetStream.
    ///
    /// # Behavior
    /// - The key: see [`Message::new`]. No key → `+TERM` (and the
    ///   dead-letter copy), `handler` not run.
    /// - The fingerprint: [`Config::with_fingerprint`] (the payload by
    ///   default).
    /// - While the engine works, `+WPI` (in progress) every
    ///   [`Config::progress_every`], so that `ack_wait` does not lapse
    ///   under a long handler.
    /// - Only once the engine returned, exactly one settlement:
    ///   [`Delivery::Ack`] → `+ACK`; [`Delivery::Retry`] → `-NAK` with
    ///   [`Config::retry_delay`] (never zero: no busy loop on a key in
    ///   flight elsewhere); [`Delivery::DeadLetter`] → the copy to the
    ///   dead-letter subject if configured, then `+TERM`.
    /// - Acknowledgements wait for the server's reply if
    ///   [`Config::with_confirmed_acks`] (the default).
    ///
    /// # Errors
    /// - [`Error::NotJetStream`]: `message` has no acknowledgement subject;
    ///   nothing ran.
    /// - [`Error::Acknowledge`]: the engine settled but the settlement did not
    ///   reach the server; JetStream redelivers after `ack_wait` and the
    ///   engine answers the redelivery (a replay, the same retry or
    ///   dead letter): the handler does not run twice for it.
    /// - [`Error::DeadLetter`]: the copy could not be stored; the delivery
    ///   was handed back (`-NAK` with the default retry delay) instead of
    ///   terminated.
    pub async fn process<F, Fut>(
        &self,
        message: &jetstream::Message,
        handler: F,
    ) -> Result<Processed, Error>
    where
        F: FnOnce(Lease, Message) -> Fut,
        Fut: Future<Output = Handled>,
    {
        let view = self.message(message);
        self.observe(Event::Received(&view));
        let result = self.settle(message, &view, handler).await;
        match &result {
            Ok(processed) => {
                tracing::debug!(
                    key = view.key(),
                    subject = view.subject(),
                    settlement = ?processed.settlement,
                    "idem-nats: delivery settled"
                );
                self.observe(Event::Settled(&view, processed));
            }
            Err(e) => {
                tracing::warn!(
                    key = view.key(),
                    subject = view.subject(),
                    error = %e,
                    "idem-nats: delivery not settled as decided"
                );
                self.observe(Event::Failed(&view, e));
            }
        }
        result
    }

    /// Handles every message of `messages` with [`process`](Self::process),
    /// up to [`Config::concurrency`] at a time, until the stream ends.
    ///
    /// # Behavior
    /// - Up to twice [`Config::concurrency`] messages are taken from the
    ///   stream at once: the ones beyond the concurrency wait for a slot, and
    ///   are reported in progress (`+WPI`) right away and every
    ///   [`Config::progress_every`] meanwhile, so that their `ack_wait` does
    ///   not lapse in the queue. (Messages still in the client's own buffer
    ///   cannot be reported: see [`Config::with_concurrency`] for how far
    ///   ahead to deliver.)
    /// - An error item of the stream (JetStream's pull stream yields missed
    ///   heartbeats and failed pulls, and recovers by itself) is logged and
    ///   reported as [`Event::StreamError`]; the run goes on.
    /// - An error of one delivery ([`Error`]) is logged and reported as
    ///   [`Event::Failed`]; the run goes on (JetStream redelivers).
    pub async fn run<St, E, F, Fut>(&self, messages: St, handler: F)
    where
        St: Stream<Item = Result<jetstream::Message, E>>,
        E: fmt::Display,
        F: Fn(Lease, Message) -> Fut,
        Fut: Future<Output = Handled>,
    {
        let concurrency = self.config.concurrency();
        let intake = concurrency.saturating_mul(2);
        let slots = Semaphore::new(concurrency);
        let (slots, handler) = (&slots, &handler);
        let mut messages = std::pin::pin!(messages);
        let mut running = FuturesUnordered::new();
        let mut ended = false;
        loop {
            tokio::select! {
                item = messages.next(), if !ended && running.len() < intake => match item {
                    Some(Ok(message)) => running.push(async move {
                        let _slot = self.slot(&message, slots).await;
                        // Errors are logged and observed by `process`.
                        let _ = self.process(&message, handler).await;
                    }),
                    Some(Err(e)) => {
                        let e = e.to_string();
                        tracing::warn!(error = %e, "idem-nats: message stream error");
                        self.observe(Event::StreamError(&e));
                    }
                    None => ended = true,
                },
                Some(()) = running.next(), if !running.is_empty() => {}
                else => break,
            }
        }
    }

    /// A slot to process `message` in; while it waits for one, the delivery
    /// is reported in progress (once at once, then periodically).
    async fn slot<'s>(
        &self,
        message: &jetstream::Message,
        slots: &'s Semaphore,
    ) -> Option<SemaphorePermit<'s>> {
        if let Ok(permit) = slots.try_acquire() {
            return Some(permit);
        }
        if self.config.progress_every().is_some() {
            self.progress(message).await;
        }
        self.in_progress(message, slots.acquire()).await.ok()
    }

    /// Sends one in-progress acknowledgement (never confirmed: a lost one
    /// costs at worst a redelivery, which the engine answers).
    async fn progress(&self, message: &jetstream::Message) {
        if let Err(e) = message.ack_with(AckKind::Progress).await {
            tracing::warn!(error = %e, "idem-nats: in-progress acknowledgement not sent");
        }
    }

    fn observe(&self, event: Event<'_>) {
        if let Some(observer) = &self.observer {
            observer(event);
        }
    }

    async fn settle<F, Fut>(
        &self,
        message: &jetstream::Message,
        view: &Message,
        handler: F,
    ) -> Result<Processed, Error>
    where
        F: FnOnce(Lease, Message) -> Fut,
        Fut: Future<Output = Handled>,
    {
        if message.reply.is_none() {
            return Err(Error::NotJetStream {
                subject: view.subject().to_string(),
            });
        }
        let Some(key) = view.key() else {
            let settlement = self
                .dead_letter(message, view, DeadLetterCause::MissingKey)
                .await?;
            return Ok(Processed {
                key: None,
                delivery: None,
                settlement,
            });
        };
        let fingerprint = (self.config.fingerprint)(view);
        let handler_view = view.clone();
        let consume = self
            .engine
            .consume(&self.scope, key, fingerprint, move |lease| {
                handler(lease, handler_view)
            });
        let delivery = self.in_progress(message, consume).await;
        let settlement = match &delivery {
            Delivery::Ack { replayed, .. } => {
                self.acknowledge(message, AckKind::Ack).await?;
                Settlement::Acked {
                    replayed: *replayed,
                }
            }
            Delivery::DeadLetter { reason } => {
                self.dead_letter(message, view, DeadLetterCause::Engine(*reason))
                    .await?
            }
            Delivery::Retry { after, .. } => self.nak(message, *after).await?,
            // A delivery this version does not know: hand it back, never
            // lose it.
            _ => self.nak(message, None).await?,
        };
        Ok(Processed {
            key: Some(key.to_string()),
            delivery: Some(delivery),
            settlement,
        })
    }

    /// Runs `work`, reporting the delivery in progress every
    /// [`Config::progress_every`] meanwhile.
    async fn in_progress<T>(
        &self,
        message: &jetstream::Message,
        work: impl Future<Output = T>,
    ) -> T {
        let Some(every) = self.config.progress_every() else {
            return work.await;
        };
        let mut work = std::pin::pin!(work);
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                out = &mut work => return out,
                _ = ticks.tick() => self.progress(message).await,
            }
        }
    }

    async fn nak(
        &self,
        message: &jetstream::Message,
        after: Option<Duration>,
    ) -> Result<Settlement, Error> {
        let delay = self.config.retry_delay(after);
        self.acknowledge(message, AckKind::Nak(Some(delay))).await?;
        Ok(Settlement::Naked { delay })
    }

    async fn acknowledge(&self, message: &jetstream::Message, kind: AckKind) -> Result<(), Error> {
        let name = match kind {
            AckKind::Ack => "+ACK",
            AckKind::Nak(_) => "-NAK",
            AckKind::Term => "+TERM",
            AckKind::Progress => "+WPI",
            AckKind::Next => "+NXT",
        };
        let sent = if self.config.confirm_acks {
            message.double_ack_with(kind).await
        } else {
            message.ack_with(kind).await
        };
        sent.map_err(|source| Error::Acknowledge { kind: name, source })
    }

    /// Copies the message to the dead-letter subject (if any), then
    /// terminates the delivery; if the copy fails, hands the delivery back.
    async fn dead_letter(
        &self,
        message: &jetstream::Message,
        view: &Message,
        cause: DeadLetterCause,
    ) -> Result<Settlement, Error> {
        tracing::warn!(
            key = view.key(),
            subject = view.subject(),
            stream = view.stream(),
            sequence = view.stream_sequence(),
            cause = cause.name(),
            "idem-nats: dead-lettering a message"
        );
        let copy = match &self.config.dead_letter_subject {
            None => None,
            Some(subject) => match publish_copy(message, view, cause, subject).await {
                Ok(copy) => Some(copy),
                Err(source) => {
                    let retry = self.config.default_retry();
                    self.acknowledge(message, AckKind::Nak(Some(retry))).await?;
                    return Err(Error::DeadLetter {
                        subject: subject.clone(),
                        retry,
                        source,
                    });
                }
            },
        };
        self.acknowledge(message, AckKind::Term).await?;
        Ok(Settlement::Terminated { cause, copy })
    }
}

/// Publishes the dead-letter copy of `message` and waits for the stream's
/// acknowledgement.
async fn publish_copy(
    message: &jetstream::Message,
    view: &Message,
    cause: DeadLetterCause,
    subject: &str,
) -> Result<DeadLetterCopy, idem_core::BoxError> {
    let mut headers = HeaderMap::new();
    for (name, values) in view.headers().iter() {
        let text: &str = name.as_ref();
        if text.len() >= 5 && text[..5].eq_ignore_ascii_case("nats-") {
            continue;
        }
        for value in values {
            headers.append(name.clone(), value.clone());
        }
    }
    put(&mut headers, DEAD_LETTER_REASON_HEADER, cause.name());
    if let Some(key) = view.key() {
        put(&mut headers, DEAD_LETTER_KEY_HEADER, key);
    }
    put(&mut headers, ORIGINAL_SUBJECT_HEADER, view.subject());
    if let (Some(stream), Some(sequence)) = (view.stream(), view.stream_sequence()) {
        put(&mut headers, ORIGINAL_STREAM_HEADER, stream);
        put(
            &mut headers,
            ORIGINAL_SEQUENCE_HEADER,
            &sequence.to_string(),
        );
        put(
            &mut headers,
            header::NATS_MESSAGE_ID.as_ref(),
            &format!("idem-dead-letter:{stream}:{sequence}"),
        );
    }
    let ack = message
        .context
        .publish_with_headers(subject.to_string(), headers, view.payload().clone())
        .await?
        .await?;
    Ok(DeadLetterCopy {
        subject: subject.to_string(),
        stream: ack.stream,
        sequence: ack.sequence,
        duplicate: ack.duplicate,
    })
}

/// Sets header `name` to `value`, unless either cannot be carried (then the
/// header is left out: a copy is never refused for a header).
fn put(headers: &mut HeaderMap, name: &str, value: &str) {
    if let (Ok(name), Ok(value)) = (
        name.parse::<header::HeaderName>(),
        value.parse::<async_nats::HeaderValue>(),
    ) {
        headers.insert(name, value);
    }
}
