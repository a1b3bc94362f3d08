//! Keeping a claim alive while its work runs: [`Engine::keep_alive`] and
//! [`Engine::run_with_heartbeat`].

use std::future::Future;
use std::time::Duration;

use futures_util::future::{Either, select};

use crate::engine::{Ending, Engine};
use crate::machine::Fenced;
use crate::store::Store;
use crate::{Clock, Error, Lease};

impl<S: Store, C: Clock> Engine<S, C> {
    /// Extends `lease` every third of the policy's lease duration until the
    /// lease is finished (returns `Ok`) or lost (returns the error).
    ///
    /// # Behavior
    /// - Run it beside long work (`select`/`join`): a slow but live holder is
    ///   then never taken over.
    /// - Any store error (transient or not) is retried, every twelfth of the
    ///   lease: only the store can say that the lease is lost, and a stopped
    ///   heartbeat would let a duplicate take over and run the work again.
    ///   If the deadline passes before an extension succeeds,
    ///   [`Lease::lost`] fires (a duplicate may take over from then on) but
    ///   the heartbeat keeps trying; it returns only when the store reports
    ///   the lease lost ([`Error::LeaseLost`]) or the lease is finished.
    /// - With [`Policy::max_hold`](crate::Policy::max_hold), once the claim has been held that long the
    ///   key is finished as [`FailureKind::Unknown`](crate::FailureKind::Unknown), [`Lease::lost`] fires and
    ///   the heartbeat returns [`Error::LeaseLost`].
    pub async fn keep_alive(&self, lease: &Lease) -> Result<(), Error> {
        let clock = &self.shared.clock;
        let beat = (self.policy.lease / 3).max(Duration::from_millis(1));
        let retry = (self.policy.lease / 12).max(Duration::from_millis(1));
        let mut wait = beat;
        loop {
            clock.sleep(wait).await;
            if lease.is_finished() {
                return Ok(());
            }
            let now = clock.now();
            if let Some(hold) = self.policy.max_hold
                && now >= lease.claimed_at().plus(hold)
            {
                tracing::error!(
                    held_ms = u64::try_from(now.since(lease.claimed_at()).as_millis())
                        .unwrap_or(u64::MAX),
                    "idem: the work held its key past the policy's max_hold; finishing it as outcome unknown"
                );
                lease.mark_lost();
                return match self.settle(lease, Ending::Unknown).await {
                    Ok(_) => Err(Error::LeaseLost(Fenced::Finished {
                        state: "failed_unknown",
                        by_holder: true,
                    })),
                    Err(e) => Err(e),
                };
            }
            match self.extend(lease).await {
                Ok(()) => wait = beat,
                Err(_) if lease.is_finished() => return Ok(()),
                Err(e @ Error::LeaseLost(_)) => {
                    lease.mark_lost();
                    return Err(e);
                }
                Err(e) => {
                    if clock.now() >= lease.deadline() {
                        tracing::error!(error = %e, "idem: heartbeat failed past the lease deadline; a duplicate may take the key over");
                        lease.mark_lost();
                    } else {
                        tracing::warn!(error = %e, "idem: heartbeat failed; retrying");
                    }
                    wait = retry;
                }
            }
        }
    }

    /// Runs `work` with a heartbeat beside it ([`keep_alive`](Self::keep_alive)).
    ///
    /// # Behavior
    /// If the heartbeat ends first (the lease was lost), the work still runs
    /// to its end; completing it will be refused by the fencing token.
    pub async fn run_with_heartbeat<T>(&self, lease: &Lease, work: impl Future<Output = T>) -> T {
        let work = std::pin::pin!(work);
        let beat = std::pin::pin!(self.keep_alive(lease));
        match select(work, beat).await {
            Either::Left((value, _)) => value,
            Either::Right((_, work)) => work.await,
        }
    }
}
