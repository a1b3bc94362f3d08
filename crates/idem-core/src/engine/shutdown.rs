//! Graceful shutdown: [`Engine::shutdown`] stops new claims and ends the
//! running ones.

use std::time::Duration;

use futures_util::future::select;

use crate::Clock;
use crate::engine::{Ending, Engine};
use crate::store::Store;

/// What [`Engine::shutdown`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Shutdown {
    /// Claims still running when the shutdown began.
    pub running: usize,
    /// Of those, how many finished by themselves within the grace period.
    pub finished: usize,
    /// Claims still running after the grace period, finished as
    /// [`FailureKind::Unknown`](crate::FailureKind::Unknown) (never run again; retries get "outcome unknown").
    pub marked_unknown: usize,
    /// Claims that could not be marked (the store failed): they stay in
    /// flight until their lease lapses, and a retry then runs them again.
    pub left_in_flight: usize,
}

impl<S: Store, C: Clock> Engine<S, C> {
    /// Stops taking new claims and waits up to `grace` for the running ones
    /// (claims made by this engine or its clones, through `begin` or
    /// `execute`) to finish.
    ///
    /// # Behavior
    /// - From the call on, [`begin`](Self::begin) fails with
    ///   [`Error::ShuttingDown`](crate::Error::ShuttingDown) (transient: HTTP 503 with `Retry-After`).
    /// - Nothing that ran is released. Claims still unfinished after `grace`
    ///   are finished as [`FailureKind::Unknown`](crate::FailureKind::Unknown) (their [`Lease::lost`](crate::Lease::lost)
    ///   fires): the process is about to stop them, and a retry must not run
    ///   them again. A claim whose mark cannot be written stays in flight
    ///   until its lease lapses.
    /// - `grace` is measured on the engine's clock.
    pub async fn shutdown(&self, grace: Duration) -> Shutdown {
        let claims = &self.shared.claims;
        let clock = &self.shared.clock;
        claims.close();
        let running = claims.unfinished().len();
        let until = clock.now().plus(grace);
        loop {
            let listener = claims.changed.listen();
            if claims.unfinished().is_empty() {
                return Shutdown {
                    running,
                    finished: running,
                    ..Shutdown::default()
                };
            }
            let now = clock.now();
            if now >= until {
                break;
            }
            let nap = clock.sleep(until.since(now));
            let _ = select(std::pin::pin!(listener), nap).await;
        }
        let open = claims.unfinished();
        let mut report = Shutdown {
            running,
            finished: running.saturating_sub(open.len()),
            ..Shutdown::default()
        };
        for lease in open {
            lease.mark_lost();
            let until = clock.now().plus(self.policy.lease / 10);
            match self.settle_until(&lease, Ending::Unknown, until).await {
                Ok(_) => report.marked_unknown += 1,
                Err(_) if lease.is_finished() => report.finished += 1,
                Err(e) => {
                    tracing::error!(error = %e, key = ?lease.key(), "idem: shutdown could not mark a running claim; it stays in flight until its lease lapses");
                    report.left_in_flight += 1;
                }
            }
        }
        tracing::info!(?report, "idem: shutdown");
        report
    }
}
