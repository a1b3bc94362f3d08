//! Recovery points: [`Engine::checkpoint`] records a holder's progress in
//! its record, and [`Engine::prepare_checkpoint`] hands the same write to a
//! transactional store, to commit with the step's own writes.

use bytes::Bytes;

use crate::engine::Engine;
use crate::engine::holder::HolderWrite;
use crate::store::{Checkpoint, Store};
use crate::{Clock, Error, Lease, Transition};

impl<S: Store, C: Clock> Engine<S, C> {
    /// Records `step` and `state` as the holder's progress: if this holder
    /// dies or its lease lapses, the next holder of the key receives them
    /// ([`Lease::checkpoint`]) and resumes from there.
    ///
    /// # Behavior
    /// - One fenced compare-and-swap, like [`complete`](Self::complete):
    ///   [`Error::LeaseLost`], changing nothing, if the lease was taken over,
    ///   finished or expired.
    /// - The checkpoint gets the next sequence number (1 after none), so
    ///   progress only moves forward; it is also a heartbeat (the lease is
    ///   extended).
    /// - `state` counts against [`outcome_limit`](Self::outcome_limit)
    ///   ([`Error::OutcomeTooLarge`], writing nothing).
    /// - Returns the checkpoint written.
    pub async fn checkpoint(
        &self,
        lease: &Lease,
        step: &str,
        state: impl Into<Bytes>,
    ) -> Result<Checkpoint, Error> {
        let state = state.into();
        self.check_checkpoint_size(step, &state)?;
        let mut written = None;
        self.holder_write(lease, HolderWrite::Extend, |record, now| {
            let seq = next_seq(record.checkpoint.as_ref());
            let checkpoint = Checkpoint::new(lease.key(), seq, step, state.clone());
            let next = record.checkpoint(lease.token(), checkpoint, now, &self.policy)?;
            written.clone_from(&next.checkpoint);
            Ok(next)
        })
        .await?;
        written.ok_or(Error::Contention)
    }

    /// Prepares [`checkpoint`](Self::checkpoint) for a store to apply inside
    /// the caller's database transaction (`apply_in` of `idem-sqlite` and
    /// `idem-postgres`), so that a step's own writes and its recovery point
    /// commit together.
    ///
    /// # Behavior
    /// - The transition is fenced by the token like
    ///   [`prepare_complete`](Self::prepare_complete)'s; after the commit,
    ///   call [`Lease::mark_applied`]: the lease stays open (the claim is
    ///   still in flight) and later writes start from the checkpointed
    ///   record.
    /// - A transition that was not applied (rolled back) changes nothing;
    ///   preparing again gives the same sequence number.
    pub fn prepare_checkpoint(
        &self,
        lease: &Lease,
        step: &str,
        state: impl Into<Bytes>,
    ) -> Result<Transition, Error> {
        let state = state.into();
        self.check_checkpoint_size(step, &state)?;
        self.prepare(lease, |record, now| {
            let seq = next_seq(record.checkpoint.as_ref());
            let checkpoint = Checkpoint::new(lease.key(), seq, step, state);
            record.checkpoint(lease.token(), checkpoint, now, &self.policy)
        })
    }

    fn check_checkpoint_size(&self, step: &str, state: &Bytes) -> Result<(), Error> {
        let size = state.len().saturating_add(step.len());
        if size > self.outcome_limit {
            return Err(Error::OutcomeTooLarge {
                size,
                limit: self.outcome_limit,
            });
        }
        Ok(())
    }
}

fn next_seq(stored: Option<&Checkpoint>) -> u32 {
    stored.map_or(1, |c| c.seq.saturating_add(1))
}
