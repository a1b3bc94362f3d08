//! Ending a claim whatever happens: [`Engine::settle`] retries the final
//! write for as long as it can matter, and [`SettleOnDrop`] ends a claim
//! whose work was dropped or panicked.

use std::time::Duration;

use crate::engine::Engine;
use crate::store::Store;
use crate::{Clock, Error, FailureKind, Lease, Outcome, Timestamp};

/// How a holder ends its claim; see [`Engine::settle`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Ending {
    /// The work finished with this result: store it for replay.
    Complete(Outcome),
    /// The work failed: store the failure (see [`FailureKind`]).
    Fail(FailureKind, Outcome),
    /// The work may have taken effect but its result is not known: finish
    /// the key as [`FailureKind::Unknown`].
    Unknown,
    /// The work declared that nothing took effect: delete the claim so that
    /// a retry runs it afresh.
    Release,
}

impl<S: Store, C: Clock> Engine<S, C> {
    /// Ends the claim as `ending` says, retrying store errors for as long as
    /// the write can still matter.
    ///
    /// # Behavior
    /// - `Complete` with an outcome over [`outcome_limit`](Self::outcome_limit),
    ///   or one the store refuses permanently, becomes `Unknown`: the work
    ///   ran, so the key is never left to run again.
    /// - Any other error but [`Error::LeaseLost`] is retried, backing off from
    ///   a fiftieth of the lease up to a third of it, until one lease after the
    ///   lease's deadline; then the last error is returned and the key stays
    ///   in flight until its lease lapses (a retry then runs the work again:
    ///   the window "store unreachable after the work" in docs/reliability.md).
    /// - `Unknown` and `Release` of a claim with progress
    ///   ([`Lease::has_progress`]: a checkpoint, or a started phase) become
    ///   `Fail(Retryable, empty)`, keeping the record and its checkpoint: the
    ///   next holder resumes after the recorded steps (see
    ///   [`Phases`](crate::Phases)).
    /// - Returns the ending actually written.
    pub async fn settle(&self, lease: &Lease, ending: Ending) -> Result<Ending, Error> {
        let until = lease.deadline().plus(self.policy.lease);
        self.settle_until(lease, ending, until).await
    }

    /// [`settle`](Self::settle), retrying only until `until` on the
    /// engine's clock (a time already past: one attempt, plus the switch to
    /// `Unknown` for a result the store refuses).
    pub async fn settle_until(
        &self,
        lease: &Lease,
        mut ending: Ending,
        until: Timestamp,
    ) -> Result<Ending, Error> {
        if matches!(ending, Ending::Unknown | Ending::Release) && lease.has_progress() {
            // Recorded steps took effect and each can be resumed: the next
            // holder goes on from the checkpoint (see `Engine::fail`).
            ending = Ending::Fail(FailureKind::Retryable, Outcome::default());
        }
        let clock = &self.shared.clock;
        let first = (self.policy.lease / 50).max(Duration::from_millis(1));
        let most = (self.policy.lease / 3).max(first);
        let mut wait = first;
        loop {
            let result = match &ending {
                Ending::Complete(outcome) => self.complete(lease, outcome.clone()).await,
                Ending::Fail(kind, outcome) => self.fail(lease, *kind, outcome.clone()).await,
                Ending::Unknown => {
                    self.fail(lease, FailureKind::Unknown, Outcome::default())
                        .await
                }
                Ending::Release => self.release(lease).await,
            };
            let error = match result {
                Ok(()) => return Ok(ending),
                Err(e @ Error::LeaseLost(_)) => return Err(e),
                Err(e) => e,
            };
            if matches!(ending, Ending::Complete(_) | Ending::Fail(..)) && !error.is_transient() {
                tracing::error!(error = %error, "idem: the result of the work cannot be stored; finishing the key as outcome unknown");
                ending = Ending::Unknown;
                continue;
            }
            let now = clock.now();
            if now >= until {
                tracing::error!(error = %error, "idem: could not end the claim; the key stays in flight until its lease lapses");
                return Err(error);
            }
            tracing::warn!(error = %error, "idem: ending the claim failed; retrying");
            clock.sleep(wait.min(until.since(now))).await;
            wait = wait.saturating_mul(2).min(most);
        }
    }
}

/// Ends a claim whose work started if the future running it is dropped (or
/// the work panics) before it could end the claim itself.
pub(super) struct SettleOnDrop<'a, S: Store, C: Clock> {
    engine: &'a Engine<S, C>,
    lease: Lease,
    pending: Option<Ending>,
}

impl<'a, S: Store, C: Clock> SettleOnDrop<'a, S, C> {
    pub(super) fn new(engine: &'a Engine<S, C>, lease: &Lease) -> Self {
        Self {
            engine,
            lease: lease.clone(),
            pending: Some(Ending::Unknown),
        }
    }
    pub(super) fn pending(&mut self, ending: Ending) {
        self.pending = Some(ending);
    }
    pub(super) fn disarm(&mut self) {
        self.pending = None;
    }
}

impl<S: Store, C: Clock> Drop for SettleOnDrop<'_, S, C> {
    fn drop(&mut self) {
        let Some(ending) = self.pending.take() else {
            return;
        };
        if self.lease.is_finished() {
            return;
        }
        spawn_settle(self.engine.clone(), self.lease.clone(), ending);
    }
}

#[cfg(feature = "tokio")]
fn spawn_settle<S: Store, C: Clock>(engine: Engine<S, C>, lease: Lease, ending: Ending) {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            tracing::warn!(key = ?lease.key(), "idem: the work was dropped or panicked after it started; ending its claim in the background");
            runtime.spawn(async move {
                if let Err(e) = engine.settle(&lease, ending).await {
                    tracing::error!(error = %e, key = ?lease.key(), "idem: could not end a dropped claim; it stays in flight until its lease lapses");
                }
            });
        }
        Err(_) => {
            tracing::error!(key = ?lease.key(), "idem: the work was dropped after it started and no runtime is left to end its claim; it stays in flight until its lease lapses")
        }
    }
}

#[cfg(not(feature = "tokio"))]
fn spawn_settle<S: Store, C: Clock>(engine: Engine<S, C>, lease: Lease, ending: Ending) {
    let _ = (engine, ending);
    tracing::error!(key = ?lease.key(), "idem: the work was dropped after it started; without the `tokio` feature its claim stays in flight until its lease lapses");
}
