//! The holder's writes: [`complete`](Engine::complete),
//! [`fail`](Engine::fail), [`extend`](Engine::extend),
//! [`release`](Engine::release), and the transactional
//! [`prepare_complete`](Engine::prepare_complete) /
//! [`prepare_fail`](Engine::prepare_fail).

use crate::engine::Engine;
use crate::machine::Fenced;
use crate::store::{Record, State, Store, SwapOutcome, Versioned};
use crate::{Clock, Error, FailureKind, Lease, Outcome, Timestamp, Transition};

/// The failure kind actually stored: `Unknown` becomes `Retryable` for a
/// claim with progress ([`Lease::has_progress`]; see [`Engine::fail`]).
fn resumable(lease: &Lease, kind: FailureKind) -> FailureKind {
    if kind == FailureKind::Unknown && lease.has_progress() {
        FailureKind::Retryable
    } else {
        kind
    }
}

/// What one conditional write by the holder does to its lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum HolderWrite {
    /// The write ends the claim (complete, fail): on success the lease is
    /// finished, and finding the same final state already written by this
    /// holder (an earlier attempt whose reply was lost) counts as success.
    Finish,
    /// The write keeps the claim in flight (a heartbeat): the lease stays
    /// open.
    Extend,
}

impl HolderWrite {
    fn finishes(self) -> bool {
        matches!(self, Self::Finish)
    }
}

impl<S: Store, C: Clock> Engine<S, C> {
    /// Completes the claim with `outcome`: retries with the same fingerprint
    /// replay it until the record expires.
    ///
    /// # Behavior
    /// One store call. Fails with [`Error::LeaseLost`], changing nothing, if
    /// the lease was taken over, expired, or already finished otherwise, and
    /// with [`Error::OutcomeTooLarge`], writing nothing, if `outcome` is over
    /// [`outcome_limit`](Self::outcome_limit).
    /// Completing again with the same outcome succeeds, so retrying after a
    /// transient store error is safe: if the first call had taken effect, the
    /// retry sees this holder's own write and succeeds.
    pub async fn complete(&self, lease: &Lease, outcome: Outcome) -> Result<(), Error> {
        self.check_size(&outcome)?;
        let done = State::Completed {
            token: lease.token(),
            outcome: outcome.clone(),
        };
        if lease.is_finished() && lease.record().record.state == done {
            return Ok(());
        }
        self.holder_write(lease, HolderWrite::Finish, |record, now| {
            record.complete(lease.token(), outcome.clone(), now, &self.policy)
        })
        .await
    }

    /// Fails the claim, storing `outcome`; see [`FailureKind`].
    ///
    /// # Behavior
    /// As [`complete`](Self::complete). A claim with progress
    /// ([`Lease::has_progress`]: its record has a checkpoint, see
    /// [`checkpoint`](Self::checkpoint), or a [`Phases`](crate::Phases)
    /// phase started under it) is never finished as
    /// [`FailureKind::Unknown`]: the failure is stored as
    /// [`FailureKind::Retryable`], keeping the checkpoint, so that the next
    /// holder resumes after the recorded steps instead of leaving the
    /// operation half done.
    pub async fn fail(
        &self,
        lease: &Lease,
        kind: FailureKind,
        outcome: Outcome,
    ) -> Result<(), Error> {
        self.check_size(&outcome)?;
        let kind = resumable(lease, kind);
        let done = State::Failed {
            token: lease.token(),
            kind,
            outcome: outcome.clone(),
        };
        if lease.is_finished() && lease.record().record.state == done {
            return Ok(());
        }
        self.holder_write(lease, HolderWrite::Finish, |record, now| {
            record.fail(lease.token(), kind, outcome.clone(), now, &self.policy)
        })
        .await
    }

    /// Extends the lease to `now + policy.lease` (a heartbeat).
    ///
    /// # Behavior
    /// One store call; [`Error::LeaseLost`] if the lease is no longer held.
    pub async fn extend(&self, lease: &Lease) -> Result<(), Error> {
        self.holder_write(lease, HolderWrite::Extend, |record, now| {
            record.extend(lease.token(), now, &self.policy)
        })
        .await
    }

    /// Releases the claim without storing anything: the key becomes absent,
    /// and a retry runs the operation again. Only for work that declared that
    /// nothing took effect.
    ///
    /// # Behavior
    /// - One store call; [`Error::LeaseLost`], changing nothing, if the lease
    ///   is no longer held.
    /// - If the key is absent when the release looks (an earlier release of
    ///   ours whose reply was lost, the record expired, or, for a holder that
    ///   was taken over, the new holder released it too), the release returns
    ///   `Ok`: there is nothing to undo, and nothing is written. Only a
    ///   record that someone else holds or finished is reported as lost.
    /// - A claim with progress ([`Lease::has_progress`]) is not deleted
    ///   (steps took effect, and the record's creation time keys them
    ///   downstream): it is failed as [`FailureKind::Retryable`], keeping the
    ///   checkpoint, and a retry resumes from it.
    pub async fn release(&self, lease: &Lease) -> Result<(), Error> {
        if lease.has_progress() {
            // Steps took effect: deleting the record would lose them (and
            // its creation time, from which the downstream keys derive).
            return self
                .fail(lease, FailureKind::Retryable, Outcome::default())
                .await;
        }
        let store = &self.shared.store;
        for _ in 0..=self.policy.max_cas_retries {
            let current = lease.record();
            let now = self.shared.clock.now();
            if let Err(fenced) = current.record.check_holder(lease.token(), now) {
                lease.mark_lost();
                return Err(Error::LeaseLost(fenced));
            }
            if store.delete_if(lease.key(), &current, now).await? {
                self.evict_finished(lease.key());
                lease.set_finished();
                return Ok(());
            }
            match store.get(lease.key(), now).await? {
                // Our own heartbeat moved the revision: try again with it.
                Some(seen) if seen.record.check_holder(lease.token(), now).is_ok() => {
                    lease.observe(seen, false);
                }
                Some(seen) => {
                    lease.mark_lost();
                    return Err(Error::LeaseLost(
                        seen.record
                            .check_holder(lease.token(), now)
                            .err()
                            .unwrap_or(Fenced::TakenOver),
                    ));
                }
                None => {
                    // Absent: released by an earlier attempt of ours whose
                    // reply was lost, or expired.
                    lease.set_finished();
                    return Ok(());
                }
            }
        }
        Err(Error::Contention)
    }

    /// Prepares the completion of `lease` for a store to apply inside the
    /// caller's database transaction; see [`Transition`].
    pub fn prepare_complete(&self, lease: &Lease, outcome: Outcome) -> Result<Transition, Error> {
        self.check_size(&outcome)?;
        self.prepare(lease, |record, now| {
            record.complete(lease.token(), outcome, now, &self.policy)
        })
    }

    /// A holder's write for a store to apply inside the caller's
    /// transaction: `step` builds the next record from the lease's current
    /// one, at the engine's `now`, under a new revision.
    pub(super) fn prepare(
        &self,
        lease: &Lease,
        step: impl FnOnce(&Record, Timestamp) -> Result<Record, Fenced>,
    ) -> Result<Transition, Error> {
        let current = lease.record();
        let record = step(&current.record, self.shared.clock.now()).map_err(Error::LeaseLost)?;
        Ok(Transition {
            key: lease.key().clone(),
            token: lease.token(),
            next: Versioned {
                revision: self.shared.ids.revision(),
                record,
            },
        })
    }

    /// Prepares a failure of `lease` for a store to apply inside the caller's
    /// database transaction; see [`Transition`].
    pub fn prepare_fail(
        &self,
        lease: &Lease,
        kind: FailureKind,
        outcome: Outcome,
    ) -> Result<Transition, Error> {
        self.check_size(&outcome)?;
        let kind = resumable(lease, kind);
        self.prepare(lease, |record, now| {
            record.fail(lease.token(), kind, outcome, now, &self.policy)
        })
    }

    fn check_size(&self, outcome: &Outcome) -> Result<(), Error> {
        if outcome.len() > self.outcome_limit {
            return Err(Error::OutcomeTooLarge {
                size: outcome.len(),
                limit: self.outcome_limit,
            });
        }
        Ok(())
    }

    /// One conditional write by the holder: `step` builds the next record from
    /// the current one; `write` says whether it ends the claim (see
    /// [`HolderWrite`]). A lost lease is signalled on [`Lease::lost`].
    pub(super) async fn holder_write(
        &self,
        lease: &Lease,
        write: HolderWrite,
        step: impl FnMut(&Record, Timestamp) -> Result<Record, Fenced>,
    ) -> Result<(), Error> {
        let result = self.holder_write_inner(lease, write, step).await;
        match &result {
            // This holder's final record is stored: keep it if it is final
            // and the cache of finished records is on.
            Ok(()) if write.finishes() && self.finished.is_some() => {
                self.fill_finished(lease.key(), &lease.record().record);
            }
            Err(Error::LeaseLost(_)) if !lease.is_finished() => lease.mark_lost(),
            _ => {}
        }
        result
    }

    async fn holder_write_inner(
        &self,
        lease: &Lease,
        write: HolderWrite,
        mut step: impl FnMut(&Record, Timestamp) -> Result<Record, Fenced>,
    ) -> Result<(), Error> {
        let mut current = lease.record();
        for _ in 0..=self.policy.max_cas_retries {
            let now = self.shared.clock.now();
            let next = Versioned {
                revision: self.shared.ids.revision(),
                record: step(&current.record, now).map_err(Error::LeaseLost)?,
            };
            match self
                .shared
                .store
                .compare_and_swap(lease.key(), &current, &next, now)
                .await?
            {
                SwapOutcome::Swapped => {
                    lease.observe(next, write.finishes());
                    return Ok(());
                }
                SwapOutcome::Conflict(None) => return Err(Error::LeaseLost(Fenced::Expired)),
                SwapOutcome::Conflict(Some(seen)) => {
                    match seen.record.check_holder(lease.token(), now) {
                        // Our own heartbeat (or a retried call of ours) moved
                        // the revision; try again from what is stored.
                        Ok(()) => {
                            lease.observe(seen.clone(), false);
                            current = seen;
                        }
                        Err(fenced) => {
                            if matches!(
                                fenced,
                                Fenced::Finished {
                                    by_holder: true,
                                    ..
                                }
                            ) {
                                // An earlier call of ours whose reply was lost
                                // already wrote exactly this: done.
                                let applied =
                                    write.finishes() && seen.record.state == next.record.state;
                                lease.observe(seen, true);
                                if applied {
                                    return Ok(());
                                }
                            }
                            return Err(Error::LeaseLost(fenced));
                        }
                    }
                }
            }
        }
        Err(Error::Contention)
    }
}
