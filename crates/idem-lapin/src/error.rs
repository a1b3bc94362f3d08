//! [`Error`]: what can stop the consumer or a delivery's settlement.

/// A failure of the consumer or of a delivery's settlement.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An AMQP operation failed (the channel or connection is closed, the
    /// broker refused a declaration, …).
    #[error("AMQP {operation} failed: {source}")]
    Amqp {
        /// The operation (`basic.ack`, `queue.declare (delay queue)`, …).
        operation: &'static str,
        /// lapin's error.
        #[source]
        source: lapin::Error,
    },
    /// A delayed copy was not confirmed by the broker (the consumer then
    /// holds the delivery for its delay and requeues it instead).
    #[error("the delayed copy for {queue} was not confirmed: {reason}")]
    NotConfirmed {
        /// The delay queue.
        queue: String,
        /// Why.
        reason: &'static str,
    },
    /// A delivery's task ended abnormally (the runtime shut down).
    #[error("a delivery's task failed: {0}")]
    Task(String),
}

impl Error {
    pub(crate) fn amqp(operation: &'static str) -> impl FnOnce(lapin::Error) -> Self {
        move |source| Self::Amqp { operation, source }
    }
}
