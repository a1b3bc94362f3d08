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
///   after losing a compare-and-swap race before reporting contention.
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
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(24 * 60 * 60),
            lease: Duration::from_secs(60),
            in_flight: InFlightPolicy::Reject,
            max_outcome_bytes: 8 * 1024 * 1024,
            max_cas_retries: 8,
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
}
