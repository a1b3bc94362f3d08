//! Running work at most once: [`Engine::execute`] and
//! [`Engine::try_execute`], which claim, run with a heartbeat, store the
//! result and replay it.

use std::future::Future;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::engine::settle::SettleOnDrop;
use crate::engine::{Begin, Ending, Engine, Replay, ReplayKind};
use crate::store::Store;
use crate::store::codec::{self, CodecError};
use crate::{Clock, Error, FailureKind, Fingerprint, IdempotencyKey, Outcome, Scope};

/// The result of [`Engine::execute`]: whether the work ran now or its stored
/// result was replayed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Executed<T> {
    /// The work ran in this call.
    Fresh(T),
    /// An earlier call ran it; this is its stored result.
    Replayed(T),
}

impl<T> Executed<T> {
    /// The value, fresh or replayed.
    pub fn into_inner(self) -> T {
        match self {
            Self::Fresh(v) | Self::Replayed(v) => v,
        }
    }
    /// Whether the value was replayed.
    pub fn is_replayed(&self) -> bool {
        matches!(self, Self::Replayed(_))
    }
}

/// What [`Engine::try_execute`] does with an error of the work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnError {
    /// Release the key without storing anything: a retry runs the work again
    /// (for failures before any side effect).
    Release,
    /// Store the error as a retryable failure: the key stays bound to this
    /// request's fingerprint, and a retry of it runs the work again.
    StoreRetryable,
    /// Store the error as the key's final outcome: retries replay it.
    StorePermanent,
}

impl<S: Store, C: Clock> Engine<S, C> {
    /// Runs `work` at most once per (scope, key): the first call runs it and
    /// stores its result; later calls with the same fingerprint get the stored
    /// result back.
    ///
    /// # Behavior
    /// - Fresh: `work` runs with a heartbeat beside it, its value is encoded
    ///   with the [`codec`] and stored ([`settle`](Self::settle)), then
    ///   returned as [`Executed::Fresh`]. A value that cannot be stored (too
    ///   large, not encodable, refused by the store) is still returned; the
    ///   key is finished as [`FailureKind::Unknown`] and retries get
    ///   [`Error::OutcomeUnknown`].
    /// - Once `work` has started, the key is never left to run again: if
    ///   this future is dropped or `work` panics, a task on the current tokio
    ///   runtime finishes the key as [`FailureKind::Unknown`] (or stores the
    ///   value, if it was already produced). Without a runtime (or without the
    ///   `tokio` feature) the key stays in flight until its lease lapses.
    /// - Replay: the stored value is decoded and returned as
    ///   [`Executed::Replayed`]; a key that ended with its outcome unknown
    ///   gives [`Error::OutcomeUnknown`].
    /// - In flight elsewhere: [`Error::InProgress`]; bound to another request:
    ///   [`Error::FingerprintMismatch`]. `work` does not run in either case.
    /// - If storing the result keeps failing (see [`settle`](Self::settle)),
    ///   the error is returned and the key stays in flight until its lease
    ///   lapses.
    ///
    /// The same call serves an HTTP handler and a queue consumer:
    ///
    /// ```
    /// # use idem_core::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Error> {
    /// let engine = Engine::new(MemoryStore::new());
    /// // A message redelivered by the broker carries the same id.
    /// let scope = Scope::tenant("billing").with_operation("invoice.paid");
    /// for _delivery in 0..3 {
    ///     let message_id = IdempotencyKey::parse("msg-0001")?;
    ///     let body = br#"{"invoice":17}"#;
    ///     let done = engine
    ///         .execute(&scope, &message_id, Fingerprint::of(body), || async { "credited".to_string() })
    ///         .await?;
    ///     assert_eq!(done.into_inner(), "credited");
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn execute<T, F, Fut>(
        &self,
        scope: &Scope,
        key: &IdempotencyKey,
        fingerprint: Fingerprint,
        work: F,
    ) -> Result<Executed<T>, Error>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = T>,
    {
        match self.begin(scope, key, fingerprint).await? {
            Begin::Proceed(lease) => {
                let mut guard = SettleOnDrop::new(self, &lease);
                let value = self.run_with_heartbeat(&lease, work()).await;
                let ending = match codec::encode(&value) {
                    Ok(bytes) => Ending::Complete(Outcome::new(bytes)),
                    Err(e) => {
                        tracing::error!(error = %e, "idem: the work's value cannot be encoded; finishing the key as outcome unknown");
                        Ending::Unknown
                    }
                };
                guard.pending(ending.clone());
                let settled = self.settle(&lease, ending).await;
                guard.disarm();
                settled?;
                Ok(Executed::Fresh(value))
            }
            Begin::Replay(Replay {
                kind: ReplayKind::Unknown,
                ..
            }) => Err(Error::OutcomeUnknown),
            Begin::Replay(replay) => Ok(Executed::Replayed(codec::decode(
                replay.outcome.as_bytes(),
            )?)),
            Begin::InProgress { retry_after } => Err(Error::InProgress { retry_after }),
            Begin::Mismatch(_) => Err(Error::FingerprintMismatch),
        }
    }

    /// [`execute`](Self::execute) for fallible work: `on_error` decides what
    /// an error does to the key ([`OnError`]).
    ///
    /// # Behavior
    /// `Ok` values are stored and replayed as `Ok`; errors stored as permanent
    /// are replayed as `Err`; released and retryable errors are returned as
    /// fresh and the next call runs the work again. Drops, panics and values
    /// that cannot be stored behave as in [`execute`](Self::execute).
    pub async fn try_execute<T, E, F, Fut>(
        &self,
        scope: &Scope,
        key: &IdempotencyKey,
        fingerprint: Fingerprint,
        work: F,
        on_error: impl FnOnce(&E) -> OnError,
    ) -> Result<Executed<Result<T, E>>, Error>
    where
        T: Serialize + DeserializeOwned,
        E: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        match self.begin(scope, key, fingerprint).await? {
            Begin::Proceed(lease) => {
                let mut guard = SettleOnDrop::new(self, &lease);
                let result = self.run_with_heartbeat(&lease, work()).await;
                let encoded = |value: Result<Vec<u8>, CodecError>| match value {
                    Ok(bytes) => Some(Outcome::new(bytes)),
                    Err(e) => {
                        tracing::error!(error = %e, "idem: the work's result cannot be encoded; finishing the key as outcome unknown");
                        None
                    }
                };
                let ending = match &result {
                    Ok(value) => encoded(codec::encode(value)).map(Ending::Complete),
                    Err(error) => match on_error(error) {
                        OnError::Release => Some(Ending::Release),
                        OnError::StoreRetryable => encoded(codec::encode(error))
                            .map(|o| Ending::Fail(FailureKind::Retryable, o)),
                        OnError::StorePermanent => encoded(codec::encode(error))
                            .map(|o| Ending::Fail(FailureKind::Permanent, o)),
                    },
                }
                .unwrap_or(Ending::Unknown);
                guard.pending(ending.clone());
                let settled = self.settle(&lease, ending).await;
                guard.disarm();
                settled?;
                Ok(Executed::Fresh(result))
            }
            Begin::Replay(Replay {
                outcome,
                kind: ReplayKind::Completed,
            }) => Ok(Executed::Replayed(Ok(codec::decode(outcome.as_bytes())?))),
            Begin::Replay(Replay {
                outcome,
                kind: ReplayKind::Failed,
            }) => Ok(Executed::Replayed(Err(codec::decode(outcome.as_bytes())?))),
            Begin::Replay(_) => Err(Error::OutcomeUnknown),
            Begin::InProgress { retry_after } => Err(Error::InProgress { retry_after }),
            Begin::Mismatch(_) => Err(Error::FingerprintMismatch),
        }
    }
}
