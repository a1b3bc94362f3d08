//! Counting records: the optional [`Store::census`](super::Store::census)
//! capability behind operator tools (`idem stats`) and dashboards.
//!
//! A census is a tally of the records a store holds *physically*: live
//! records by state and by time left until they expire, plus records that
//! have expired but are still stored (a purge removes them). A store counts
//! either every record ([`Coverage::Exact`], SQL stores with an aggregate
//! query) or a sample ([`Coverage::Sampled`], stores that can only iterate,
//! such as Redis); every store that iterates tallies with [`Census::tally`],
//! so the buckets mean the same everywhere.

use std::time::Duration;

use super::record::{Record, State};
use crate::{FailureKind, Timestamp};

/// The upper bounds (inclusive) of the expiry histogram's buckets: a live
/// record expiring within 1 minute, 1 hour, 1 day, 7 days, 30 days, and
/// (the last bucket, [`EXPIRY_BUCKETS`]` + 1`-th) later than that.
pub const EXPIRY_BUCKETS: [Duration; 5] = [
    Duration::from_secs(60),
    Duration::from_secs(3_600),
    Duration::from_secs(86_400),
    Duration::from_secs(7 * 86_400),
    Duration::from_secs(30 * 86_400),
];

/// Labels of the expiry histogram's buckets, in order (one more than
/// [`EXPIRY_BUCKETS`]: the last is open-ended).
pub const EXPIRY_BUCKET_LABELS: [&str; 6] = ["≤ 1m", "≤ 1h", "≤ 1d", "≤ 7d", "≤ 30d", "> 30d"];

/// How much of the store a [`Census`] looked at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Coverage {
    /// Every record the store holds was counted.
    Exact,
    /// Only the first `limit` records of an iteration were counted and the
    /// store holds more: the counts are a sample, good for proportions, not
    /// totals.
    Sampled {
        /// The sample size asked for (= the records counted).
        limit: u64,
    },
}

/// A tally of stored records.
///
/// # Behavior
/// - Every readable record counted is in exactly one of `in_flight`, `completed`,
///   `failed_retryable`, `failed_permanent`, `failed_unknown` (live) or
///   `expired` (stored, no longer live at `now`).
/// - `expiry[i]` counts live records whose time left (`expires_at - now`)
///   is at most [`EXPIRY_BUCKETS`]`[i]` and more than the bucket before it;
///   the last entry counts the rest. The histogram sums to [`live`](Self::live).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Census {
    /// Whether every record was counted.
    pub coverage: Coverage,
    /// Live records whose lease is held (or lapsed, not yet taken over).
    pub in_flight: u64,
    /// Live completed records.
    pub completed: u64,
    /// Live records of a failure a retry may run again.
    pub failed_retryable: u64,
    /// Live records of a permanent failure (replayed).
    pub failed_permanent: u64,
    /// Live records of a failure whose effect is unknown (replayed as ambiguous).
    pub failed_unknown: u64,
    /// Records still stored that expired at or before `now` (a purge removes them).
    pub expired: u64,
    /// Live records by time left until expiry; see the type's `# Behavior`.
    pub expiry: [u64; 6],
    /// Stored items under the store's name (its table, prefix) that are not
    /// readable records (corrupt, foreign, written by a newer version): not
    /// counted anywhere else. `get` reports such a key as
    /// [`StoreError::Corrupt`](crate::StoreError::Corrupt); a census counts
    /// them here instead of failing, so that an operator sees them.
    pub unreadable: u64,
}

impl Census {
    /// An empty tally of the given coverage.
    pub const fn new(coverage: Coverage) -> Self {
        Self {
            coverage,
            in_flight: 0,
            completed: 0,
            failed_retryable: 0,
            failed_permanent: 0,
            failed_unknown: 0,
            expired: 0,
            expiry: [0; 6],
            unreadable: 0,
        }
    }

    /// Counts one stored record as of `now`.
    pub fn tally(&mut self, record: &Record, now: Timestamp) {
        if record.is_expired(now) {
            self.expired += 1;
            return;
        }
        match &record.state {
            State::InFlight { .. } => self.in_flight += 1,
            State::Completed { .. } => self.completed += 1,
            State::Failed { kind, .. } => match kind {
                FailureKind::Retryable => self.failed_retryable += 1,
                FailureKind::Permanent => self.failed_permanent += 1,
                FailureKind::Unknown => self.failed_unknown += 1,
            },
        }
        self.expiry[expiry_bucket(record.expires_at.since(now))] += 1;
    }

    /// Live records counted.
    pub fn live(&self) -> u64 {
        self.in_flight
            + self.completed
            + self.failed_retryable
            + self.failed_permanent
            + self.failed_unknown
    }

    /// Every record counted, live or expired.
    pub fn total(&self) -> u64 {
        self.live() + self.expired
    }
}

/// The index in [`Census::expiry`] of a live record with `left` until it expires.
pub fn expiry_bucket(left: Duration) -> usize {
    EXPIRY_BUCKETS
        .iter()
        .position(|bound| left <= *bound)
        .unwrap_or(EXPIRY_BUCKETS.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Fingerprint;
    use crate::store::FencingToken;

    fn record(state: State, expires_at: Timestamp) -> Record {
        let t0 = Timestamp::from_millis(0);
        Record::from_parts(Fingerprint::of(b"x"), state, t0, t0, expires_at, 1)
    }

    #[test]
    fn buckets_are_inclusive_upper_bounds() {
        assert_eq!(expiry_bucket(Duration::from_millis(1)), 0);
        assert_eq!(expiry_bucket(Duration::from_secs(60)), 0);
        assert_eq!(expiry_bucket(Duration::from_millis(60_001)), 1);
        assert_eq!(expiry_bucket(Duration::from_secs(86_400)), 2);
        assert_eq!(expiry_bucket(Duration::from_secs(30 * 86_400)), 4);
        assert_eq!(expiry_bucket(Duration::from_secs(30 * 86_400 + 1)), 5);
        assert_eq!(EXPIRY_BUCKET_LABELS.len(), EXPIRY_BUCKETS.len() + 1);
    }

    #[test]
    fn tally_counts_each_record_once() {
        let now = Timestamp::from_millis(1_000_000);
        let token = FencingToken::from_u128(1);
        let mut census = Census::new(Coverage::Exact);
        let in_flight = State::InFlight {
            token,
            lease_deadline: now,
        };
        census.tally(
            &record(in_flight.clone(), now.plus(Duration::from_secs(5))),
            now,
        );
        census.tally(&record(in_flight, now), now); // expires exactly now: expired
        census.tally(
            &record(
                State::Failed {
                    token,
                    kind: FailureKind::Unknown,
                    outcome: crate::Outcome::new(Vec::new()),
                },
                now.plus(Duration::from_secs(7_200)),
            ),
            now,
        );
        assert_eq!(census.in_flight, 1);
        assert_eq!(census.failed_unknown, 1);
        assert_eq!(census.expired, 1);
        assert_eq!(census.live(), 2);
        assert_eq!(census.total(), 3);
        assert_eq!(census.expiry, [1, 0, 1, 0, 0, 0]);
    }
}
