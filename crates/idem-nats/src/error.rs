//! [`Error`]: a delivery that could not be settled as the engine decided.

use std::time::Duration;

/// A delivery [`Consumer::process`](crate::Consumer::process) could not
/// settle as the engine decided. In every case JetStream still holds the
/// message and redelivers it (after `ack_wait`, or the delay given); the
/// engine answers the redelivery, so the handler never runs twice for it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The message has no acknowledgement subject: it was not delivered by a
    /// JetStream consumer (a core NATS subscription, a direct get). Nothing
    /// ran.
    #[error("the message on `{subject}` has no JetStream acknowledgement subject; nothing ran")]
    NotJetStream {
        /// The message's subject.
        subject: String,
    },
    /// The settlement (`kind`: `+ACK`, `-NAK`, `+TERM`) was not sent, or
    /// not confirmed by the server.
    #[error("{kind} was not acknowledged by the NATS server: {source}")]
    Acknowledge {
        /// Which settlement.
        kind: &'static str,
        /// Why.
        #[source]
        source: async_nats::Error,
    },
    /// The dead-letter copy could not be stored on `subject`; the delivery
    /// was handed back (`-NAK` after `retry`) instead of terminated.
    #[error(
        "the dead-letter copy could not be stored on `{subject}` ({source}); handed back for a redelivery after {retry:?}"
    )]
    DeadLetter {
        /// The dead-letter subject.
        subject: String,
        /// The redelivery delay asked instead.
        retry: Duration,
        /// Why.
        #[source]
        source: idem_core::BoxError,
    },
}
