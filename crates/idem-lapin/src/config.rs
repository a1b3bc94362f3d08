//! [`Config`]: where the key comes from, how redeliveries are delayed,
//! how many deliveries run at once.

use std::time::Duration;

use idem_core::{Fingerprint, MIN_RETRY};
use lapin::message::Delivery;

/// The header the key is read from by default.
pub const DEFAULT_KEY_HEADER: &str = "Idempotency-Key";

/// The delay queues' TTLs by default (see [`Redelivery::DelayQueues`]).
pub const DEFAULT_DELAY_TIERS: [Duration; 9] = [
    Duration::from_millis(100),
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(5),
    Duration::from_secs(10),
    Duration::from_secs(30),
    Duration::from_secs(60),
];

/// The header a delayed copy carries: how many times the message went
/// through a delay queue (an AMQP long-long-int).
pub const DELAYS_HEADER: &str = "x-idem-delays";

/// How a delivery the engine answered [`Retry`](idem_core::Delivery::Retry)
/// is redelivered later. RabbitMQ has no per-message delay on a negative
/// acknowledgement: `basic.nack(requeue = true)` puts the message back at
/// once, so a consumer would spin on a key another consumer holds.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Redelivery {
    /// Republish a copy of the message (body, properties and headers) to a
    /// delay queue, wait for the broker's confirm, then acknowledge the
    /// original. Each delay queue has a fixed TTL (`x-message-ttl`) and
    /// dead-letters to the default exchange with the work queue's name as
    /// routing key, so the copy comes back to the work queue after the TTL.
    ///
    /// # Behavior
    /// - The delay is the smallest tier at least the engine's `after` (the
    ///   largest tier if none is): a redelivery never comes before the
    ///   engine asked, and a key in flight longer than the largest tier costs
    ///   one extra trip per tier, never a spin. One TTL per queue keeps each
    ///   queue first-in first-out, so no message waits behind a longer one
    ///   (per-message TTLs only expire at the head of a queue).
    /// - Delay queues are named `<queue>.idem-delay.<ms>ms` and declared
    ///   durable on first use (RabbitMQ answers a redeclaration with the same
    ///   arguments; the name carries the TTL so that the arguments never
    ///   differ). The consumer's channel is put in confirm mode.
    /// - A crash between the copy's confirm and the original's
    ///   acknowledgement leaves both: one more delivery of the same key,
    ///   which the engine answers. Nothing is lost: the original is only
    ///   acknowledged once the copy is confirmed.
    /// - The copy is a new message: a quorum queue's delivery count
    ///   (`x-delivery-limit`) starts again, so waiting for a key in flight
    ///   never uses up a message's delivery limit; the [`DELAYS_HEADER`]
    ///   counts the trips instead.
    /// - If the copy cannot be published (refused, unroutable, not
    ///   confirmed), the consumer falls back to [`Redelivery::HoldAndRequeue`]
    ///   for that delivery.
    DelayQueues {
        /// The delay queues' TTLs, ascending, each at least
        /// [`MIN_RETRY`].
        tiers: Vec<Duration>,
    },
    /// Keep the delivery unacknowledged for the delay, then
    /// `basic.nack(requeue = true)`. Needs no queue of its own, but each
    /// waiting delivery holds one of the consumer's prefetch slots (a
    /// consumer whose whole prefetch waits handles nothing else meanwhile),
    /// and every requeue counts against a quorum queue's `x-delivery-limit`.
    HoldAndRequeue,
}

impl Default for Redelivery {
    fn default() -> Self {
        Self::DelayQueues {
            tiers: DEFAULT_DELAY_TIERS.to_vec(),
        }
    }
}

/// How a delivery's fingerprint is computed: see [`Config::with_fingerprint`].
pub type FingerprintFn = fn(&Delivery) -> Fingerprint;

/// The consumer's settings: build with [`Config::default`] and the `with_*`
/// methods.
///
/// ```
/// use std::time::Duration;
/// use idem_lapin::{Config, Redelivery};
///
/// let config = Config::default()
///     .with_key_header("X-Message-Key")
///     .with_prefetch(64)
///     .with_default_retry(Duration::from_secs(2))
///     .with_redelivery(Redelivery::DelayQueues {
///         tiers: vec![Duration::from_millis(200), Duration::from_secs(2), Duration::from_secs(20)],
///     });
/// assert_eq!(config.key_header(), "X-Message-Key");
/// ```
#[derive(Clone, Debug)]
pub struct Config {
    pub(crate) key_header: String,
    pub(crate) message_id_fallback: bool,
    pub(crate) redelivery: Redelivery,
    pub(crate) default_retry: Duration,
    pub(crate) prefetch: u16,
    pub(crate) consumer_tag: String,
    pub(crate) fingerprint: FingerprintFn,
}

impl Default for Config {
    /// Key from `Idempotency-Key`, falling back to the AMQP `message_id`;
    /// [`Redelivery::DelayQueues`] with [`DEFAULT_DELAY_TIERS`]; a default
    /// retry delay of 1 s; prefetch 32; a server-named consumer; the
    /// fingerprint of the body alone.
    fn default() -> Self {
        Self {
            key_header: DEFAULT_KEY_HEADER.to_string(),
            message_id_fallback: true,
            redelivery: Redelivery::default(),
            default_retry: Duration::from_secs(1),
            prefetch: 32,
            consumer_tag: String::new(),
            fingerprint: body_fingerprint,
        }
    }
}

/// The fingerprint of a delivery's body alone (the default).
///
/// The routing key and exchange are left out on purpose: the same message
/// reaches a queue through different bindings, and comes back from a delay
/// or dead-letter queue under another routing key; a fingerprint over them
/// would refuse the message's own redeliveries.
pub fn body_fingerprint(delivery: &Delivery) -> Fingerprint {
    Fingerprint::of(&delivery.data)
}

impl Config {
    /// Reads the key from header `name` (matched ignoring ASCII case, since
    /// publishers spell it differently; an exact match wins). Its value must
    /// be an AMQP string (long or short, UTF-8).
    pub fn with_key_header(mut self, name: impl Into<String>) -> Self {
        self.key_header = name.into();
        self
    }

    /// Whether a message without the key header is consumed under its AMQP
    /// `message_id` property (default `true`). Without either, the message
    /// is dead-lettered unrun.
    pub fn with_message_id_fallback(mut self, fallback: bool) -> Self {
        self.message_id_fallback = fallback;
        self
    }

    /// How retries are redelivered (default [`Redelivery::DelayQueues`]).
    ///
    /// # Behavior
    /// Delay tiers are sorted, deduplicated and raised to at least
    /// [`MIN_RETRY`]; an empty list means [`DEFAULT_DELAY_TIERS`].
    pub fn with_redelivery(mut self, redelivery: Redelivery) -> Self {
        self.redelivery = match redelivery {
            Redelivery::DelayQueues { tiers } => {
                let mut tiers: Vec<Duration> =
                    tiers.into_iter().map(|t| t.max(MIN_RETRY)).collect();
                tiers.sort();
                tiers.dedup_by_key(|t| t.as_millis());
                if tiers.is_empty() {
                    tiers = DEFAULT_DELAY_TIERS.to_vec();
                }
                Redelivery::DelayQueues { tiers }
            }
            other => other,
        };
        self
    }

    /// The delay of a retry for which the engine names none (a released
    /// key, a store that could not be reached, a shutdown); default 1 s,
    /// never below [`MIN_RETRY`].
    pub fn with_default_retry(mut self, delay: Duration) -> Self {
        self.default_retry = delay.max(MIN_RETRY);
        self
    }

    /// The channel's prefetch (`basic.qos`), which is also the most
    /// deliveries handled at once; default 32, at least 1.
    ///
    /// Advice: a few times the number of deliveries one consumer can handle
    /// at once. Every delivery in flight is redelivered when the consumer
    /// dies, and with [`Redelivery::HoldAndRequeue`] a delivery waiting out
    /// its delay holds its slot.
    pub fn with_prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = prefetch.max(1);
        self
    }

    /// The consumer tag (default empty: the broker names the consumer).
    pub fn with_consumer_tag(mut self, tag: impl Into<String>) -> Self {
        self.consumer_tag = tag.into();
        self
    }

    /// How a delivery is fingerprinted (default [`body_fingerprint`]). The
    /// fingerprint must be the same for every redelivery of a message,
    /// including copies that come back from a delay queue (same body,
    /// properties and headers, plus [`DELAYS_HEADER`]; the routing key is
    /// the work queue's name).
    pub fn with_fingerprint(mut self, fingerprint: FingerprintFn) -> Self {
        self.fingerprint = fingerprint;
        self
    }

    /// The key header.
    pub fn key_header(&self) -> &str {
        &self.key_header
    }

    /// The redelivery.
    pub fn redelivery(&self) -> &Redelivery {
        &self.redelivery
    }

    /// The prefetch.
    pub fn prefetch(&self) -> u16 {
        self.prefetch
    }

    /// The default retry delay.
    pub fn default_retry(&self) -> Duration {
        self.default_retry
    }

    /// The delay the broker is asked for when the engine asks for `after`
    /// (`None`: [`default_retry`](Self::default_retry)), and the delay queue
    /// that gives it, if any.
    pub fn delay_for(&self, queue: &str, after: Option<Duration>) -> (Duration, Option<String>) {
        let wanted = after.unwrap_or(self.default_retry).max(MIN_RETRY);
        match &self.redelivery {
            Redelivery::DelayQueues { tiers } => {
                let tier = tiers
                    .iter()
                    .copied()
                    .find(|t| *t >= wanted)
                    .or_else(|| tiers.last().copied())
                    .unwrap_or(wanted);
                (tier, Some(delay_queue_name(queue, tier)))
            }
            Redelivery::HoldAndRequeue => (wanted, None),
        }
    }

    /// The names of every delay queue this configuration may declare for
    /// `queue` (for clean-up: see [`delete_delay_queues`](crate::delete_delay_queues)).
    pub fn delay_queues(&self, queue: &str) -> Vec<String> {
        match &self.redelivery {
            Redelivery::DelayQueues { tiers } => tiers
                .iter()
                .map(|tier| delay_queue_name(queue, *tier))
                .collect(),
            Redelivery::HoldAndRequeue => Vec::new(),
        }
    }
}

/// `<queue>.idem-delay.<ms>ms`.
pub(crate) fn delay_queue_name(queue: &str, tier: Duration) -> String {
    format!("{queue}.idem-delay.{}ms", tier.as_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_round_up_to_a_tier_and_never_below_min_retry() {
        let config = Config::default().with_redelivery(Redelivery::DelayQueues {
            tiers: vec![
                Duration::from_secs(1),
                Duration::from_millis(10),
                Duration::from_millis(300),
            ],
        });
        let ms = |d: Duration| d.as_millis();
        let (d, q) = config.delay_for("work", Some(Duration::ZERO));
        assert_eq!((ms(d), q.as_deref()), (100, Some("work.idem-delay.100ms")));
        let (d, _) = config.delay_for("work", Some(Duration::from_millis(301)));
        assert_eq!(ms(d), 1000);
        // Beyond the largest tier: the largest (one more trip later).
        let (d, _) = config.delay_for("work", Some(Duration::from_secs(7)));
        assert_eq!(ms(d), 1000);
        // No delay named: the default retry, rounded up.
        let (d, _) = config.delay_for("work", None);
        assert_eq!(ms(d), 1000);
        assert_eq!(config.delay_queues("work").len(), 3);
    }

    #[test]
    fn hold_and_requeue_waits_what_the_engine_asks() {
        let config = Config::default()
            .with_redelivery(Redelivery::HoldAndRequeue)
            .with_default_retry(Duration::from_millis(1));
        assert_eq!(config.delay_for("q", None), (MIN_RETRY, None));
        assert_eq!(
            config.delay_for("q", Some(Duration::from_millis(1234))),
            (Duration::from_millis(1234), None)
        );
        assert!(config.delay_queues("q").is_empty());
    }
}
