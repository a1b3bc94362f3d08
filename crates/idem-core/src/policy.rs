//! The knobs of the engine: how long keys live, how long a claim holds, what
//! duplicates of an in-flight request get.

use std::time::Duration;

/// What a duplicate gets while the original request is still in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum InFlightPolicy {
    /// Answer at once with "in progress" and the time left on the lease
    /// (HTTP 409 with `Retry-After`).
    Reject,
    /// Wait up to `max` for the original to finish, checking every `poll`
    /// (backing off to 8 × `poll`), then return its outcome; still in flight
    /// after `max` → "in progress".
    Wait {
        /// The longest wait.
        max: Duration,
        /// The first interval between checks.
        poll: Duration,
    },
}

/// The engine's policy. Build it with [`Policy::default`] and the `with_*` methods.
///
/// # Behavior
/// - `ttl` (default 24 h): how long a finished record is kept, counted from when
///   it finished; a claim's record lives at least `ttl` from its creation and
///   never expires before its lease. Clients may safely retry within `ttl`.
/// - `lease` (default 60 s): how long a claim holds without a heartbeat. After
///   it lapses, a retry with the same fingerprint takes over with a new
///   fencing token (crash recovery). Keep it well above the handler's p99
///   duration, or use heartbeats ([`Engine::keep_alive`](crate::Engine::keep_alive)).
/// - `in_flight` (default [`InFlightPolicy::Reject`]).
/// - `max_outcome_bytes` (default 8 MiB): larger outcomes are refused with
///   [`Error::OutcomeTooLarge`](crate::Error::OutcomeTooLarge) and the claim is left to
///   its holder.
/// - `max_cas_retries` (default 8): how often the engine re-reads and retries
///   after losing a compare-and-swap or insert race before reporting
///   contention. Finding a key that exists is not a race: a replay, an
///   in-progress or a mismatch answer never counts.
/// - `max_hold` (default `None`): the longest a heartbeat
///   ([`Engine::keep_alive`](crate::Engine::keep_alive)) holds a claim. When a
///   holder is still running after it, the engine finishes the key as
///   [`FailureKind::Unknown`](crate::FailureKind::Unknown) (never run again;
///   retries get an "outcome unknown" answer) and signals the holder
///   ([`Lease::lost`](crate::Lease::lost)). `None`: a live holder keeps the
///   key for as long as it runs.
///
/// [`Policy::validate`] (called when an engine is built) refuses a zero
/// lease, a `ttl` shorter than the lease, a zero or unbounded wait, a zero
/// `max_hold` and durations too large to add to a timestamp.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// How long finished records are kept.
    pub ttl: Duration,
    /// How long a claim holds without a heartbeat.
    pub lease: Duration,
    /// What duplicates of an in-flight request get.
    pub in_flight: InFlightPolicy,
    /// The largest outcome stored, in bytes.
    pub max_outcome_bytes: usize,
    /// Compare-and-swap retries before [`Error::Contention`](crate::Error::Contention).
    pub max_cas_retries: u32,
    /// The longest a heartbeat holds a claim; `None` for no ceiling.
    pub max_hold: Option<Duration>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(24 * 60 * 60),
            lease: Duration::from_secs(60),
            in_flight: InFlightPolicy::Reject,
            max_outcome_bytes: 8 * 1024 * 1024,
            max_cas_retries: 8,
            max_hold: None,
        }
    }
}

impl Policy {
    /// Sets how long finished records are kept.
    #[must_use]
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }
    /// Sets how long a claim holds without a heartbeat.
    #[must_use]
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }
    /// Sets what duplicates of an in-flight request get.
    #[must_use]
    pub fn with_in_flight(mut self, in_flight: InFlightPolicy) -> Self {
        self.in_flight = in_flight;
        self
    }
    /// Sets the largest outcome stored.
    #[must_use]
    pub fn with_max_outcome_bytes(mut self, max: usize) -> Self {
        self.max_outcome_bytes = max;
        self
    }
    /// Sets the compare-and-swap retry bound.
    #[must_use]
    pub fn with_max_cas_retries(mut self, retries: u32) -> Self {
        self.max_cas_retries = retries;
        self
    }
    /// Sets the ceiling on how long a heartbeat holds a claim.
    #[must_use]
    pub fn with_max_hold(mut self, max_hold: Option<Duration>) -> Self {
        self.max_hold = max_hold;
        self
    }

    /// Checks that the policy can be used.
    ///
    /// # Behavior
    /// Refuses, naming the field: `lease` zero; `ttl` shorter than `lease`;
    /// with [`InFlightPolicy::Wait`], a zero `poll`, a `poll` longer than
    /// `max`, or a `max` over a day; `max_hold` zero or shorter than the
    /// lease; `max_outcome_bytes` zero; any duration over
    /// [`MAX_DURATION`] (about 292 million years is representable, but a
    /// duration that large is a mistake and would saturate timestamps).
    pub fn validate(&self) -> Result<(), PolicyError> {
        let bad = |field: &'static str, reason: &'static str| Err(PolicyError { field, reason });
        for (field, d) in [("ttl", self.ttl), ("lease", self.lease)]
            .into_iter()
            .chain(self.max_hold.map(|d| ("max_hold", d)))
        {
            if d > MAX_DURATION {
                return bad(field, "is longer than 100 years");
            }
        }
        if self.lease.is_zero() {
            return bad("lease", "must be longer than zero");
        }
        if self.ttl < self.lease {
            return bad("ttl", "must be at least the lease");
        }
        if let InFlightPolicy::Wait { max, poll } = self.in_flight {
            if poll.is_zero() {
                return bad("in_flight.poll", "must be longer than zero");
            }
            if max > MAX_WAIT {
                return bad("in_flight.max", "must be at most a day");
            }
            if poll > max {
                return bad("in_flight.poll", "must be at most in_flight.max");
            }
        }
        if let Some(hold) = self.max_hold
            && hold < self.lease
        {
            return bad("max_hold", "must be at least the lease");
        }
        if self.max_outcome_bytes == 0 {
            return bad("max_outcome_bytes", "must be more than zero");
        }
        Ok(())
    }
}

/// The longest duration a [`Policy`] accepts (100 years).
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// The longest [`InFlightPolicy::Wait`] a [`Policy`] accepts (a day).
pub const MAX_WAIT: Duration = Duration::from_secs(24 * 60 * 60);

/// A [`Policy`] that cannot be used (see [`Policy::validate`]). Permanent:
/// the configuration must change.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid idem policy: `{field}` {reason}")]
#[non_exhaustive]
pub struct PolicyError {
    /// The field that is wrong.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: &'static str,
}
