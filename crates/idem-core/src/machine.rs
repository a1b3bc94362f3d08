//! The key state machine and its conflict rules, as pure functions.
//!
//! [`decide`] says what a request meets at a key; the transitions on
//! [`Record`] ([`new_claim`](Record::new_claim), [`reclaim`](Record::reclaim),
//! [`check_holder`](Record::check_holder), [`complete`](Record::complete),
//! [`fail`](Record::fail), [`extend`](Record::extend),
//! [`checkpoint`](Record::checkpoint)) build the next record,
//! or refuse with [`Fenced`]. None of them touches a store or a clock: the
//! engine feeds them what the store returned and the time its clock read, and
//! the model check (`idem-model`) and the conformance suite replay them as
//! the reference. The full table is in docs/design.md.
//!
//! Applications do not need this module: the [`Engine`](crate::Engine)
//! applies it. [`Fenced`] reaches them as the source of
//! [`Error::LeaseLost`](crate::Error::LeaseLost).

use std::time::Duration;

use crate::store::{Checkpoint, FencingToken, Record, State};
use crate::{FailureKind, Fingerprint, Outcome, Policy, Timestamp};

/// Why a key that exists may be claimed again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReclaimReason {
    /// The holder's lease lapsed (it crashed or stalled): take over with a new token.
    LeaseExpired,
    /// The last attempt failed in a retryable way.
    RetryableFailure,
}

/// What a request with a given fingerprint meets at a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The key is absent or expired: insert a new claim.
    Claim,
    /// The key exists and may be claimed again (compare-and-swap a new claim over it).
    Reclaim(ReclaimReason),
    /// Another request holds a live lease; it lapses after `retry_after`.
    InProgress {
        /// Time left on the holder's lease.
        retry_after: Duration,
    },
    /// The key finished (completed, failed permanently, or ended with its
    /// outcome unknown): replay what is stored.
    Replay,
    /// The key is bound to a different request.
    Mismatch,
}

/// The conflict rules: what a request with `fingerprint` meets, at `now`, at a
/// key whose stored record is `existing`.
///
/// # Behavior
/// | record at `now` | same fingerprint | different fingerprint |
/// |---|---|---|
/// | absent or expired | `Claim` | `Claim` |
/// | in flight, lease live (`now < lease_deadline`) | `InProgress` | `Mismatch` |
/// | in flight, lease lapsed | `Reclaim(LeaseExpired)` | `Mismatch` |
/// | completed | `Replay` | `Mismatch` |
/// | failed, permanent | `Replay` | `Mismatch` |
/// | failed, outcome unknown | `Replay` | `Mismatch` |
/// | failed, retryable | `Reclaim(RetryableFailure)` | `Mismatch` |
pub fn decide(existing: Option<&Record>, fingerprint: &Fingerprint, now: Timestamp) -> Decision {
    let Some(record) = existing.filter(|r| !r.is_expired(now)) else {
        return Decision::Claim;
    };
    if record.fingerprint != *fingerprint {
        return Decision::Mismatch;
    }
    match &record.state {
        State::InFlight { lease_deadline, .. } if now < *lease_deadline => Decision::InProgress {
            retry_after: lease_deadline.since(now),
        },
        State::InFlight { .. } => Decision::Reclaim(ReclaimReason::LeaseExpired),
        State::Failed {
            kind: FailureKind::Retryable,
            ..
        } => Decision::Reclaim(ReclaimReason::RetryableFailure),
        // Completed, failed permanently, outcome unknown: final.
        State::Completed { .. } | State::Failed { .. } => Decision::Replay,
    }
}

/// Why a holder's transition was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Fenced {
    /// The record is in flight under another token: the lease was taken over.
    #[error("the lease was taken over by another claim")]
    TakenOver,
    /// The record already finished (completed or failed).
    #[error("the claim already finished as {state}")]
    Finished {
        /// The state name ([`State::name`]).
        state: &'static str,
        /// Whether it was finished by the same token.
        by_holder: bool,
    },
    /// The record expired.
    #[error("the record expired")]
    Expired,
    /// A checkpoint that does not move forward: its sequence number is not
    /// above the stored one's (a holder replaying an older step).
    #[error("checkpoint {offered} does not move past the stored checkpoint {stored}")]
    Backwards {
        /// The stored checkpoint's sequence number.
        stored: u32,
        /// The offered checkpoint's sequence number.
        offered: u32,
    },
}

impl Record {
    /// A new claim of an absent key.
    ///
    /// # Behavior
    /// In flight under `token` until `now + policy.lease`; expires at
    /// `now + policy.ttl`, but never before the lease deadline; 1 attempt.
    pub fn new_claim(
        fingerprint: Fingerprint,
        token: FencingToken,
        now: Timestamp,
        policy: &Policy,
    ) -> Self {
        let lease_deadline = now.plus(policy.lease);
        Self {
            fingerprint,
            state: State::InFlight {
                token,
                lease_deadline,
            },
            created_at: now,
            updated_at: now,
            expires_at: now.plus(policy.ttl).max(lease_deadline),
            attempts: 1,
            checkpoint: None,
        }
    }

    /// A new claim over this record (takeover of a lapsed lease, or retry of a
    /// retryable failure).
    ///
    /// # Behavior
    /// Keeps the fingerprint, the creation time and the checkpoint (the new
    /// holder resumes from it), counts one more attempt, and holds under the
    /// new `token` until `now + policy.lease`; the expiry only moves later.
    #[must_use]
    pub fn reclaim(&self, token: FencingToken, now: Timestamp, policy: &Policy) -> Self {
        let lease_deadline = now.plus(policy.lease);
        Self {
            fingerprint: self.fingerprint,
            state: State::InFlight {
                token,
                lease_deadline,
            },
            created_at: self.created_at,
            updated_at: now,
            expires_at: self.expires_at.max(lease_deadline),
            attempts: self.attempts.saturating_add(1),
            checkpoint: self.checkpoint.clone(),
        }
    }

    /// Checks that `token` holds this record's lease at `now`.
    ///
    /// # Behavior
    /// Holding means: in flight under `token` and not expired. A lapsed lease
    /// still held by the same token is held until somebody takes it over:
    /// nobody else ran, so finishing it is safe.
    pub fn check_holder(&self, token: FencingToken, now: Timestamp) -> Result<(), Fenced> {
        if self.is_expired(now) {
            return Err(Fenced::Expired);
        }
        match &self.state {
            State::InFlight { token: t, .. } if *t == token => Ok(()),
            State::InFlight { .. } => Err(Fenced::TakenOver),
            finished => Err(Fenced::Finished {
                state: finished.name(),
                by_holder: finished.token() == token,
            }),
        }
    }

    /// The holder `token` completes the claim with `outcome`.
    ///
    /// # Behavior
    /// Only the holder ([`check_holder`](Self::check_holder)); the record is
    /// then kept until `now + policy.ttl`, without its checkpoint (the
    /// outcome replaces it). Any other token changes nothing.
    pub fn complete(
        &self,
        token: FencingToken,
        outcome: Outcome,
        now: Timestamp,
        policy: &Policy,
    ) -> Result<Self, Fenced> {
        self.finish(token, State::Completed { token, outcome }, now, policy)
    }

    /// The holder `token` fails the claim, storing `outcome`.
    ///
    /// # Behavior
    /// As [`complete`](Self::complete). A `Retryable` failure lets the same
    /// request claim again and keeps the checkpoint for it; a `Permanent`
    /// (or `Unknown`) one is replayed.
    pub fn fail(
        &self,
        token: FencingToken,
        kind: FailureKind,
        outcome: Outcome,
        now: Timestamp,
        policy: &Policy,
    ) -> Result<Self, Fenced> {
        self.finish(
            token,
            State::Failed {
                token,
                kind,
                outcome,
            },
            now,
            policy,
        )
    }

    fn finish(
        &self,
        token: FencingToken,
        state: State,
        now: Timestamp,
        policy: &Policy,
    ) -> Result<Self, Fenced> {
        self.check_holder(token, now)?;
        let checkpoint = match state {
            State::Failed {
                kind: FailureKind::Retryable,
                ..
            } => self.checkpoint.clone(),
            _ => None,
        };
        Ok(Self {
            fingerprint: self.fingerprint,
            state,
            created_at: self.created_at,
            updated_at: now,
            expires_at: now.plus(policy.ttl),
            attempts: self.attempts,
            checkpoint,
        })
    }

    /// The holder `token` records `checkpoint` as its progress.
    ///
    /// # Behavior
    /// - Only the holder ([`check_holder`](Self::check_holder)).
    /// - Only forward: `checkpoint.seq` must be above the stored
    ///   checkpoint's, else [`Fenced::Backwards`].
    /// - It is also a heartbeat: the lease is extended as by
    ///   [`extend`](Self::extend).
    pub fn checkpoint(
        &self,
        token: FencingToken,
        checkpoint: Checkpoint,
        now: Timestamp,
        policy: &Policy,
    ) -> Result<Self, Fenced> {
        if let Some(stored) = &self.checkpoint
            && checkpoint.seq <= stored.seq
        {
            self.check_holder(token, now)?;
            return Err(Fenced::Backwards {
                stored: stored.seq,
                offered: checkpoint.seq,
            });
        }
        let mut next = self.extend(token, now, policy)?;
        next.checkpoint = Some(checkpoint);
        Ok(next)
    }

    /// The holder `token` extends its lease to `now + policy.lease` (heartbeat).
    ///
    /// # Behavior
    /// Only the holder; the deadline and the expiry only move later.
    pub fn extend(
        &self,
        token: FencingToken,
        now: Timestamp,
        policy: &Policy,
    ) -> Result<Self, Fenced> {
        self.check_holder(token, now)?;
        let State::InFlight { lease_deadline, .. } = self.state else {
            return Err(Fenced::TakenOver);
        };
        let lease_deadline = lease_deadline.max(now.plus(policy.lease));
        Ok(Self {
            fingerprint: self.fingerprint,
            state: State::InFlight {
                token,
                lease_deadline,
            },
            created_at: self.created_at,
            updated_at: now,
            expires_at: self.expires_at.max(lease_deadline),
            attempts: self.attempts,
            checkpoint: self.checkpoint.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(b: u8) -> Fingerprint {
        Fingerprint::from_bytes([b; 32])
    }
    const T0: Timestamp = Timestamp::from_millis(1_000_000);

    #[test]
    fn table_rows() {
        let policy = Policy::default();
        let token = FencingToken::from_u128(1);
        assert_eq!(decide(None, &fp(1), T0), Decision::Claim);
        let claim = Record::new_claim(fp(1), token, T0, &policy);
        assert_eq!(
            decide(Some(&claim), &fp(1), T0),
            Decision::InProgress {
                retry_after: policy.lease
            }
        );
        assert_eq!(decide(Some(&claim), &fp(2), T0), Decision::Mismatch);
        let lapsed = T0.plus(policy.lease);
        assert_eq!(
            decide(Some(&claim), &fp(1), lapsed),
            Decision::Reclaim(ReclaimReason::LeaseExpired)
        );
        let done = claim
            .complete(token, Outcome::new(&b"ok"[..]), T0, &policy)
            .unwrap();
        assert_eq!(decide(Some(&done), &fp(1), T0), Decision::Replay);
        assert_eq!(decide(Some(&done), &fp(2), T0), Decision::Mismatch);
        assert_eq!(
            decide(Some(&done), &fp(2), T0.plus(policy.ttl)),
            Decision::Claim
        );
        let retry = claim
            .fail(
                token,
                FailureKind::Retryable,
                Outcome::default(),
                T0,
                &policy,
            )
            .unwrap();
        assert_eq!(
            decide(Some(&retry), &fp(1), T0),
            Decision::Reclaim(ReclaimReason::RetryableFailure)
        );
        let perm = claim
            .fail(
                token,
                FailureKind::Permanent,
                Outcome::default(),
                T0,
                &policy,
            )
            .unwrap();
        assert_eq!(decide(Some(&perm), &fp(1), T0), Decision::Replay);
    }

    #[test]
    fn stale_tokens_are_fenced() {
        let policy = Policy::default();
        let old = FencingToken::from_u128(1);
        let new = FencingToken::from_u128(2);
        let claim = Record::new_claim(fp(1), old, T0, &policy);
        let later = T0.plus(policy.lease);
        let taken = claim.reclaim(new, later, &policy);
        assert_eq!(taken.attempts, 2);
        assert_eq!(
            taken.complete(old, Outcome::default(), later, &policy),
            Err(Fenced::TakenOver)
        );
        assert_eq!(taken.extend(old, later, &policy), Err(Fenced::TakenOver));
        let done = taken
            .complete(new, Outcome::default(), later, &policy)
            .unwrap();
        assert_eq!(
            done.check_holder(new, later),
            Err(Fenced::Finished {
                state: "completed",
                by_holder: true
            })
        );
    }
}
