//! [`Config`]: where the key comes from, how a message is fingerprinted, how
//! redeliveries are delayed, how a long handler keeps its delivery, where dead
//! letters go.

use std::str::FromStr;
use std::time::Duration;

use async_nats::HeaderName;
use idem_core::{Fingerprint, MIN_RETRY};

use crate::Message;

/// The header the key is read from by default.
pub const DEFAULT_KEY_HEADER: &str = "Idempotency-Key";

/// The redelivery delay of a retry for which the engine names none, by
/// default (see [`Config::with_default_retry`]).
pub const DEFAULT_RETRY: Duration = Duration::from_secs(1);

/// How often a delivery still being handled is reported in progress, by
/// default: a third of JetStream's default `ack_wait` (30 s). See
/// [`Config::with_progress_every`].
pub const DEFAULT_PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// The shortest progress interval [`Config::with_ack_wait`] derives.
pub const MIN_PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// How many deliveries [`Consumer::run`](crate::Consumer::run) handles at
/// once, by default.
pub const DEFAULT_CONCURRENCY: usize = 32;

/// How a message is fingerprinted: see [`Config::with_fingerprint`].
pub type FingerprintFn = fn(&Message) -> Fingerprint;

/// The fingerprint of a message's payload alone (the default).
///
/// Why not the subject too: the scope already names the operation, and a
/// subject often carries tokens that differ between copies of one logical
/// message (a subject transform on a mirror or source stream, a republish
/// from a dead-letter subject, a tenant or shard token). A fingerprint over
/// it would refuse a genuine duplicate as a "payload mismatch". Where one key
/// may travel on two subjects that mean different things, use
/// [`subject_and_payload_fingerprint`] or put the subject's meaning in the
/// [`Scope`](idem_core::Scope).
pub fn payload_fingerprint(message: &Message) -> Fingerprint {
    Fingerprint::of(message.payload())
}

/// The fingerprint of a message's subject and payload: the same key on
/// another subject is a mismatch (dead-lettered), not a replay.
pub fn subject_and_payload_fingerprint(message: &Message) -> Fingerprint {
    Fingerprint::builder()
        .field("subject", message.subject().as_bytes())
        .field("payload", message.payload())
        .finish()
}

/// A setting that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// Not a valid NATS header name (empty, `:`, control or non-ASCII
    /// characters).
    #[error("`{name}` is not a valid NATS header name")]
    HeaderName {
        /// The name given.
        name: String,
    },
    /// Not a subject a message can be published to (empty, whitespace, an
    /// empty token, or a wildcard `*` / `>`).
    #[error("`{subject}` is not a subject a dead letter can be published to")]
    Subject {
        /// The subject given.
        subject: String,
    },
}

/// The consumer's settings: [`Config::default`] and the `with_*` methods.
///
/// ```
/// use std::time::Duration;
/// use idem_nats::Config;
///
/// # fn main() -> Result<(), idem_nats::ConfigError> {
/// let config = Config::default()
///     .with_key_header("X-Message-Key")?
///     .with_ack_wait(Duration::from_secs(30)) // the consumer's ack_wait: progress every 10 s
///     .with_default_retry(Duration::from_secs(2))
///     .with_dead_letter_subject("orders.dead")?
///     .with_concurrency(16);
/// assert_eq!(config.key_header(), "X-Message-Key");
/// assert_eq!(config.progress_every(), Some(Duration::from_secs(10)));
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Config {
    pub(crate) key_header: HeaderName,
    key_header_text: String,
    pub(crate) msg_id_fallback: bool,
    pub(crate) fingerprint: FingerprintFn,
    default_retry: Duration,
    progress_every: Option<Duration>,
    pub(crate) confirm_acks: bool,
    pub(crate) dead_letter_subject: Option<String>,
    concurrency: usize,
}

impl Default for Config {
    /// Key from `Idempotency-Key`, falling back to `Nats-Msg-Id`; the
    /// payload's fingerprint ([`payload_fingerprint`]); retries without a
    /// delay of their own after [`DEFAULT_RETRY`]; in-progress
    /// acknowledgements every [`DEFAULT_PROGRESS_EVERY`]; acknowledgements
    /// confirmed by the server; no dead-letter subject (`Term` only);
    /// [`DEFAULT_CONCURRENCY`] deliveries at once.
    fn default() -> Self {
        Self {
            key_header: HeaderName::from_static(DEFAULT_KEY_HEADER),
            key_header_text: DEFAULT_KEY_HEADER.to_string(),
            msg_id_fallback: true,
            fingerprint: payload_fingerprint,
            default_retry: DEFAULT_RETRY,
            progress_every: Some(DEFAULT_PROGRESS_EVERY),
            confirm_acks: true,
            dead_letter_subject: None,
            concurrency: DEFAULT_CONCURRENCY,
        }
    }
}

impl Config {
    /// Reads the key from header `name` (default [`DEFAULT_KEY_HEADER`]).
    ///
    /// # Behavior
    /// An exact match of the name wins; otherwise the first header whose
    /// name matches ignoring ASCII case (publishers spell it differently).
    /// With several values, the first is the key.
    ///
    /// # Errors
    /// [`ConfigError::HeaderName`] for a name NATS cannot carry.
    pub fn with_key_header(mut self, name: impl Into<String>) -> Result<Self, ConfigError> {
        let name = name.into();
        let parsed = if name.is_empty() {
            None
        } else {
            HeaderName::from_str(&name).ok()
        };
        match parsed {
            Some(header) => {
                self.key_header = header;
                self.key_header_text = name;
                Ok(self)
            }
            None => Err(ConfigError::HeaderName { name }),
        }
    }

    /// Whether a message without the key header is consumed under its
    /// `Nats-Msg-Id` header, JetStream's publish-deduplication id (default
    /// `true`). A message with neither is dead-lettered unrun
    /// ([`DeadLetterCause::MissingKey`](crate::DeadLetterCause::MissingKey)).
    pub fn with_msg_id_fallback(mut self, fallback: bool) -> Self {
        self.msg_id_fallback = fallback;
        self
    }

    /// How a message is fingerprinted (default [`payload_fingerprint`]). The
    /// fingerprint must be the same for every delivery of a message and for
    /// every copy a publisher sends of it.
    pub fn with_fingerprint(mut self, fingerprint: FingerprintFn) -> Self {
        self.fingerprint = fingerprint;
        self
    }

    /// The delay of a retry for which the engine names none (a released
    /// key, a store that could not be reached, a shutdown); default
    /// [`DEFAULT_RETRY`], never below [`MIN_RETRY`].
    pub fn with_default_retry(mut self, delay: Duration) -> Self {
        self.default_retry = delay.max(MIN_RETRY);
        self
    }

    /// Sends an in-progress acknowledgement (`+WPI`) every `every` while a
    /// delivery is being handled, so that JetStream does not redeliver it
    /// when the consumer's `ack_wait` lapses mid-handler; `None` sends none.
    /// Default [`DEFAULT_PROGRESS_EVERY`]; never below [`MIN_PROGRESS_EVERY`].
    ///
    /// Pick less than the consumer's `ack_wait` (a third of it leaves room
    /// for a late timer): [`with_ack_wait`](Self::with_ack_wait) does that.
    pub fn with_progress_every(mut self, every: Option<Duration>) -> Self {
        self.progress_every = every.map(|e| e.max(MIN_PROGRESS_EVERY));
        self
    }

    /// Sets the progress interval from the consumer's `ack_wait`: a third of
    /// it, at least [`MIN_PROGRESS_EVERY`].
    pub fn with_ack_wait(self, ack_wait: Duration) -> Self {
        self.with_progress_every(Some(ack_wait / 3))
    }

    /// Whether acknowledgements (`+ACK`, `-NAK`, `+TERM`) wait for the
    /// server's reply (`double_ack`; default `true`).
    ///
    /// # Behavior
    /// Confirmed, a settlement the consumer reports is one the server
    /// received; a lost one is an [`Error::Acknowledge`](crate::Error::Acknowledge).
    /// Unconfirmed, it is one round trip cheaper and a lost acknowledgement
    /// goes unnoticed. Either way a lost acknowledgement costs one
    /// redelivery after `ack_wait`, which the engine answers with the stored
    /// result (the handler does not run again): the exactly-once effect
    /// comes from the engine, not from the acknowledgement.
    pub fn with_confirmed_acks(mut self, confirm: bool) -> Self {
        self.confirm_acks = confirm;
        self
    }

    /// Publishes a copy of every dead-lettered message to `subject` (through
    /// JetStream, awaiting its publish acknowledgement) before terminating
    /// the delivery.
    ///
    /// # Behavior
    /// - The copy has the original payload and headers (except JetStream's
    ///   own `Nats-*` headers), plus `Idem-Dead-Letter-Reason`, `Idem-Key`
    ///   (when the message had one), `Idem-Original-Subject`,
    ///   `Idem-Original-Stream` and `Idem-Original-Sequence`; its
    ///   `Nats-Msg-Id` is `idem-dead-letter:<stream>:<sequence>`, so a copy
    ///   sent again after a crash is dropped by the dead-letter stream's
    ///   duplicate window.
    /// - If the copy cannot be stored (no stream captures `subject`, a
    ///   timeout), the delivery is not terminated: it is handed back with a
    ///   [`default_retry`](Self::default_retry) delay and the call answers
    ///   [`Error::DeadLetter`](crate::Error::DeadLetter). A dead letter is
    ///   never dropped for want of a copy.
    /// - `subject` must belong to a stream and must not match the filter of
    ///   the consumer that dead-letters to it (the copy would come back to
    ///   it).
    ///
    /// # Errors
    /// [`ConfigError::Subject`] for a subject that cannot be published to.
    pub fn with_dead_letter_subject(
        mut self,
        subject: impl Into<String>,
    ) -> Result<Self, ConfigError> {
        let subject = subject.into();
        let valid = !subject.is_empty()
            && subject.split('.').all(|token| {
                !token.is_empty()
                    && token != "*"
                    && token != ">"
                    && !token.chars().any(|c| c.is_whitespace() || c.is_control())
            });
        if valid {
            self.dead_letter_subject = Some(subject);
            Ok(self)
        } else {
            Err(ConfigError::Subject { subject })
        }
    }

    /// How many deliveries [`Consumer::run`](crate::Consumer::run) handles at
    /// once; default [`DEFAULT_CONCURRENCY`], at least 1.
    ///
    /// [`Consumer::run`](crate::Consumer::run) takes in up to twice this
    /// many and reports the waiting ones in progress. Advice: deliver no more
    /// than that ahead (a pull stream's `max_messages_per_batch` at most
    /// this, a push consumer's `max_ack_pending` at most twice this): a
    /// message still in the client's buffer is already counting down its
    /// `ack_wait`, and no progress is sent for it.
    pub fn with_concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }

    /// The key header.
    pub fn key_header(&self) -> &str {
        &self.key_header_text
    }

    /// Whether `Nats-Msg-Id` is the key of a message without the key header.
    pub fn msg_id_fallback(&self) -> bool {
        self.msg_id_fallback
    }

    /// The delay of a retry for which the engine names none.
    pub fn default_retry(&self) -> Duration {
        self.default_retry
    }

    /// The progress interval, if any.
    pub fn progress_every(&self) -> Option<Duration> {
        self.progress_every
    }

    /// Whether acknowledgements are confirmed by the server.
    pub fn confirmed_acks(&self) -> bool {
        self.confirm_acks
    }

    /// The dead-letter subject, if any.
    pub fn dead_letter_subject(&self) -> Option<&str> {
        self.dead_letter_subject.as_deref()
    }

    /// Deliveries handled at once by [`Consumer::run`](crate::Consumer::run).
    pub fn concurrency(&self) -> usize {
        self.concurrency
    }

    /// The redelivery delay asked of JetStream (`-NAK {"delay": …}`) when the
    /// engine answers [`Retry`](idem_core::Delivery::Retry) with `after`:
    /// `after`, or [`default_retry`](Self::default_retry) when `None`, and
    /// never below [`MIN_RETRY`] (a zero delay would redeliver at once: a
    /// busy loop on a key in flight elsewhere).
    pub fn retry_delay(&self, after: Option<Duration>) -> Duration {
        after.unwrap_or(self.default_retry).max(MIN_RETRY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_are_never_zero() {
        let config = Config::default().with_default_retry(Duration::ZERO);
        assert_eq!(config.default_retry(), MIN_RETRY);
        assert_eq!(config.retry_delay(None), MIN_RETRY);
        assert_eq!(config.retry_delay(Some(Duration::ZERO)), MIN_RETRY);
        assert_eq!(
            config.retry_delay(Some(Duration::from_secs(3))),
            Duration::from_secs(3)
        );
        assert_eq!(Config::default().retry_delay(None), DEFAULT_RETRY);
    }

    #[test]
    fn progress_follows_the_ack_wait() {
        let config = Config::default().with_ack_wait(Duration::from_secs(3));
        assert_eq!(config.progress_every(), Some(Duration::from_secs(1)));
        let config = Config::default().with_ack_wait(Duration::from_millis(30));
        assert_eq!(config.progress_every(), Some(MIN_PROGRESS_EVERY));
        let config = Config::default().with_progress_every(None);
        assert_eq!(config.progress_every(), None);
    }

    #[test]
    fn bad_names_and_subjects_are_refused_not_panicked_on() {
        for name in ["", "Has Space", "colon:", "é", "new\nline"] {
            assert!(
                matches!(
                    Config::default().with_key_header(name),
                    Err(ConfigError::HeaderName { .. })
                ),
                "{name:?}"
            );
        }
        assert_eq!(
            Config::default()
                .with_key_header("X-Key")
                .map(|c| c.key_header().to_string())
                .ok()
                .as_deref(),
            Some("X-Key")
        );
        for subject in ["", "a..b", "a.*", "a.>", ">", "a b", ".a", "a."] {
            assert!(
                matches!(
                    Config::default().with_dead_letter_subject(subject),
                    Err(ConfigError::Subject { .. })
                ),
                "{subject:?}"
            );
        }
        assert!(
            Config::default()
                .with_dead_letter_subject("orders.dead")
                .is_ok()
        );
    }
}
