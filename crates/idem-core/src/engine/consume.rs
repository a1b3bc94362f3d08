//! Processing at-least-once messages exactly once: [`Engine::consume`]
//! runs a message's handler at most once per key and tells the consumer
//! what to do with the delivery ([`Delivery`]), for any broker.

use std::future::Future;
use std::time::Duration;

use crate::engine::settle::SettleOnDrop;
use crate::engine::{Begin, Ending, Engine, Replay, ReplayKind};
use crate::store::Store;
use crate::{Clock, Error, FailureKind, Fingerprint, IdempotencyKey, Lease, Outcome, Scope};

/// How a message handler ended; see [`Engine::consume`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Handled {
    /// The effect took place; store this result (the engine completes the
    /// key). Between the effect and the completion lies window W3 of
    /// docs/reliability.md: a consumer killed there lets a redelivery run
    /// the handler again once the lease lapses. Use [`Committed`](Self::Committed)
    /// where the effect is a database write.
    Complete(Outcome),
    /// The handler committed the key's completion itself, in the same
    /// transaction as its effect (`Engine::prepare_complete` then the
    /// store's `apply_in`, SQLite and PostgreSQL), with this result; the
    /// engine writes nothing. A consumer killed at any point leaves either
    /// both or neither, so no redelivery runs the effect twice.
    Committed(Outcome),
    /// Nothing took effect (a transient failure before any effect, or the
    /// handler's transaction rolled back): release the key so that a
    /// redelivery runs the handler again.
    Release,
    /// The message can never succeed: store this failure; the delivery and
    /// every redelivery are dead-lettered.
    Fail(Outcome),
    /// The effect may have happened but the result is not known: finish the
    /// key as outcome unknown; the delivery and every redelivery are
    /// dead-lettered, never run again.
    Unknown,
}

/// What the consumer should do with a delivery; see [`Engine::consume`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Delivery {
    /// Acknowledge it: the handler ran now and its result is stored
    /// (`replayed: false`), or an earlier delivery's result was found
    /// (`replayed: true`).
    Ack {
        /// Whether an earlier delivery ran the handler.
        replayed: bool,
        /// The stored result.
        outcome: Outcome,
    },
    /// Negative-acknowledge it and have it redelivered later, after `after`
    /// if given (the broker's own delay otherwise). Never redeliver at once:
    /// a key in flight elsewhere stays so for up to a lease.
    Retry {
        /// Why.
        reason: RetryReason,
        /// The least time worth waiting before the redelivery.
        after: Option<Duration>,
    },
    /// Reject it to the dead-letter queue: no redelivery can succeed.
    DeadLetter {
        /// Why.
        reason: DeadLetterReason,
    },
}

impl Delivery {
    /// Whether the delivery should be acknowledged.
    pub fn is_ack(&self) -> bool {
        matches!(self, Self::Ack { .. })
    }
}

/// Why a delivery should be redelivered; see [`Delivery::Retry`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RetryReason {
    /// Another consumer holds the key and is running its handler.
    InProgress,
    /// The handler released the key ([`Handled::Release`]): it runs again on
    /// redelivery.
    Released,
    /// The store could not be reached or lost a race too often (transient).
    StoreUnavailable,
    /// The handler's result could not be stored before the lease lapsed
    /// (window W1 of docs/reliability.md): a redelivery finds the result if
    /// the engine stored it meanwhile, and runs the handler again otherwise.
    NotStored,
    /// This consumer's lease was taken over by another one while the handler
    /// ran; that consumer's result is the key's.
    LeaseLost,
    /// The engine is shutting down.
    ShuttingDown,
}

/// Why a delivery should be dead-lettered; see [`Delivery::DeadLetter`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeadLetterReason {
    /// The message id is not a valid idempotency key.
    InvalidKey,
    /// The key is bound to a message with another payload.
    PayloadMismatch,
    /// The handler failed permanently ([`Handled::Fail`]), now or on an
    /// earlier delivery.
    Failed,
    /// The handler's effect may have happened but its result is not known
    /// ([`Handled::Unknown`], a panic, a result too large to store), now or on
    /// an earlier delivery: the message is never run again.
    OutcomeUnknown,
    /// The store refused the key permanently (a corrupt record, a
    /// misconfigured store): redelivery would fail the same way.
    StoreRefused,
}

impl<S: Store, C: Clock> Engine<S, C> {
    /// Runs `handler` for a delivered message at most once per (scope,
    /// `message_id`), and says what to do with the delivery.
    ///
    /// `message_id` is the message's idempotency key (a header set by the
    /// publisher, or the broker's message id); `fingerprint` covers the
    /// payload, so that an id reused for another payload is refused.
    ///
    /// # Behavior
    /// - Fresh key: `handler` runs with the claim's [`Lease`] (a heartbeat
    ///   beside it) and its [`Handled`] decides the rest:
    ///   `Complete`/`Committed` → [`Delivery::Ack`] once the result is stored;
    ///   `Release` → [`Delivery::Retry`] ([`RetryReason::Released`]);
    ///   `Fail` → [`Delivery::DeadLetter`] ([`DeadLetterReason::Failed`]);
    ///   `Unknown` → [`Delivery::DeadLetter`] ([`DeadLetterReason::OutcomeUnknown`]).
    ///   A result over the engine's outcome limit becomes `Unknown` (the
    ///   effect happened). If `handler` panics or this future is dropped once
    ///   it started, the key is finished as outcome unknown in the
    ///   background, as by [`execute`](Self::execute).
    /// - Completed key: [`Delivery::Ack`] with `replayed: true` and the
    ///   stored result; `handler` does not run.
    /// - Key failed permanently or with its outcome unknown:
    ///   [`Delivery::DeadLetter`]; `handler` does not run.
    /// - Key in flight on another consumer: [`Delivery::Retry`]
    ///   ([`RetryReason::InProgress`]) after the time left on its lease, at
    ///   least [`MIN_RETRY`]; `handler` does not run.
    /// - Same id, another payload: [`Delivery::DeadLetter`]
    ///   ([`DeadLetterReason::PayloadMismatch`]).
    /// - Invalid id: [`DeadLetterReason::InvalidKey`]; a store that cannot be
    ///   reached: [`RetryReason::StoreUnavailable`]; a permanent store error
    ///   before the handler ran: [`DeadLetterReason::StoreRefused`]. Nothing
    ///   runs in these cases.
    /// - After the handler: the result is written by
    ///   [`settle`](Self::settle) (retried while it can matter). If it still
    ///   cannot be written, [`RetryReason::NotStored`]; if the lease was
    ///   taken over meanwhile, [`RetryReason::LeaseLost`].
    ///
    /// Acknowledge only after this returns: an acknowledgement sent before
    /// the result is stored loses the message if the consumer dies.
    ///
    /// ```
    /// # use idem_core::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let engine = Engine::new(MemoryStore::new());
    /// let scope = Scope::tenant("billing").with_operation("invoice.paid");
    /// let body = br#"{"invoice":17}"#;
    /// for delivery in 0..3 {
    ///     let next = engine
    ///         .consume(&scope, "msg-0001", Fingerprint::of(body), |_lease| async {
    ///             Handled::Complete(Outcome::new(&b"credited"[..]))
    ///         })
    ///         .await;
    ///     assert!(next.is_ack(), "delivery {delivery}: {next:?}");
    /// }
    /// # }
    /// ```
    pub async fn consume<F, Fut>(
        &self,
        scope: &Scope,
        message_id: &str,
        fingerprint: Fingerprint,
        handler: F,
    ) -> Delivery
    where
        F: FnOnce(Lease) -> Fut,
        Fut: Future<Output = Handled>,
    {
        let key = match IdempotencyKey::parse(message_id) {
            Ok(key) => key,
            Err(_) => {
                return Delivery::DeadLetter {
                    reason: DeadLetterReason::InvalidKey,
                };
            }
        };
        let lease = match self.begin(scope, &key, fingerprint).await {
            Ok(Begin::Proceed(lease)) => lease,
            Ok(Begin::Replay(Replay { outcome, kind })) => {
                return match kind {
                    ReplayKind::Completed => Delivery::Ack {
                        replayed: true,
                        outcome,
                    },
                    ReplayKind::Failed => Delivery::DeadLetter {
                        reason: DeadLetterReason::Failed,
                    },
                    _ => Delivery::DeadLetter {
                        reason: DeadLetterReason::OutcomeUnknown,
                    },
                };
            }
            Ok(Begin::InProgress { retry_after }) => {
                return Delivery::Retry {
                    reason: RetryReason::InProgress,
                    after: Some(retry_after.max(MIN_RETRY)),
                };
            }
            Ok(Begin::Mismatch(_)) => {
                return Delivery::DeadLetter {
                    reason: DeadLetterReason::PayloadMismatch,
                };
            }
            Err(e) => return before_the_handler(&e),
        };
        let mut guard = SettleOnDrop::new(self, &lease);
        let handled = self
            .run_with_heartbeat(&lease, handler(lease.clone()))
            .await;
        let ending = match handled {
            Handled::Committed(outcome) => {
                guard.disarm();
                return Delivery::Ack {
                    replayed: false,
                    outcome,
                };
            }
            Handled::Complete(outcome) => Ending::Complete(outcome),
            Handled::Release => Ending::Release,
            Handled::Fail(outcome) => Ending::Fail(FailureKind::Permanent, outcome),
            Handled::Unknown => Ending::Unknown,
        };
        guard.pending(ending.clone());
        let settled = self.settle(&lease, ending).await;
        guard.disarm();
        match settled {
            Ok(Ending::Complete(outcome)) => Delivery::Ack {
                replayed: false,
                outcome,
            },
            Ok(Ending::Release) => Delivery::Retry {
                reason: RetryReason::Released,
                after: None,
            },
            Ok(Ending::Fail(FailureKind::Permanent, _)) => Delivery::DeadLetter {
                reason: DeadLetterReason::Failed,
            },
            Ok(Ending::Fail(FailureKind::Retryable, _)) => Delivery::Retry {
                reason: RetryReason::Released,
                after: None,
            },
            Ok(_) => Delivery::DeadLetter {
                reason: DeadLetterReason::OutcomeUnknown,
            },
            Err(Error::LeaseLost(_)) => Delivery::Retry {
                reason: RetryReason::LeaseLost,
                after: Some(MIN_RETRY),
            },
            Err(_) => Delivery::Retry {
                reason: RetryReason::NotStored,
                after: Some(self.policy.lease),
            },
        }
    }
}

/// The shortest redelivery delay [`Engine::consume`] asks for a key in
/// flight elsewhere: a consumer never spins on a key another one holds.
pub const MIN_RETRY: Duration = Duration::from_millis(100);

/// The delivery for an error of `begin` (nothing ran).
fn before_the_handler(e: &Error) -> Delivery {
    match e {
        Error::InvalidKey(_) => Delivery::DeadLetter {
            reason: DeadLetterReason::InvalidKey,
        },
        Error::ShuttingDown => Delivery::Retry {
            reason: RetryReason::ShuttingDown,
            after: None,
        },
        Error::InProgress { retry_after } => Delivery::Retry {
            reason: RetryReason::InProgress,
            after: Some((*retry_after).max(MIN_RETRY)),
        },
        e if e.is_transient() => Delivery::Retry {
            reason: RetryReason::StoreUnavailable,
            after: None,
        },
        _ => Delivery::DeadLetter {
            reason: DeadLetterReason::StoreRefused,
        },
    }
}
