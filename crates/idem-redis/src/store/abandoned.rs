//! [`Store::abandoned`](idem_core::store::Store::abandoned) on Redis: walk
//! the store's records (`store/scan.rs`), keep those
//! [`is_abandoned`] says were abandoned, the `limit` whose lease lapsed
//! first.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::ops::ControlFlow;

use idem_core::Timestamp;
use idem_core::store::{State, StoreError, Versioned, is_abandoned};

use super::scan::Sink;
use super::{RedisStore, printable_key};

/// An abandoned record found, ordered by when its lease lapsed, then by its
/// Redis key (so that the order is total and the same on every call).
struct Found {
    lease_deadline: Timestamp,
    key: Vec<u8>,
    versioned: Versioned,
}

impl PartialEq for Found {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Found {}

impl PartialOrd for Found {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Found {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.lease_deadline, &self.key).cmp(&(other.lease_deadline, &other.key))
    }
}

/// A search in progress: the `limit` earliest abandoned records seen so
/// far, in a max-heap (the latest on top, the first to go).
struct Lapsed<'a> {
    store: &'a RedisStore,
    now: Timestamp,
    limit: usize,
    earliest: BinaryHeap<Found>,
    /// Abandoned records whose checkpoint names another key than the one
    /// they are stored at (a value copied or renamed by hand), and one of
    /// their keys (for the log).
    misplaced: u64,
    misplaced_example: Option<String>,
}

impl Sink for Lapsed<'_> {
    /// Every record: the earliest lapse may be the last one scanned.
    fn room(&self) -> usize {
        usize::MAX
    }

    fn take(&mut self, key: &[u8], versioned: Versioned) -> ControlFlow<()> {
        if !is_abandoned(&versioned.record, self.now) {
            return ControlFlow::Continue(());
        }
        let (State::InFlight { lease_deadline, .. }, Some(checkpoint)) =
            (&versioned.record.state, &versioned.record.checkpoint)
        else {
            return ControlFlow::Continue(());
        };
        // The caller claims the record again by its checkpoint's key: it
        // must be the key the record is stored at.
        if self.store.redis_key(&checkpoint.record_key()) != key {
            self.misplaced += 1;
            self.misplaced_example
                .get_or_insert_with(|| printable_key(key));
            return ControlFlow::Continue(());
        }
        let found = Found {
            lease_deadline: *lease_deadline,
            key: key.to_vec(),
            versioned,
        };
        if self.earliest.len() < self.limit {
            self.earliest.push(found);
        } else if self.earliest.peek().is_some_and(|latest| found < *latest) {
            self.earliest.pop();
            self.earliest.push(found);
        }
        ControlFlow::Continue(())
    }
}

impl RedisStore {
    /// The search behind
    /// [`Store::abandoned`](idem_core::store::Store::abandoned); see its
    /// docs in `primitives.rs`.
    pub(super) async fn scan_abandoned(
        &self,
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<Versioned>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut lapsed = Lapsed {
            store: self,
            now,
            limit,
            earliest: BinaryHeap::new(),
            misplaced: 0,
            misplaced_example: None,
        };
        let walked = self.walk(&mut lapsed).await?;
        if walked.skipped > 0 {
            tracing::warn!(
                store = self.inner.name,
                values = walked.skipped,
                example = walked.skipped_example.as_deref().unwrap_or_default(),
                "idem-redis: the search for abandoned records skipped values under the store's prefix that are not records"
            );
        }
        if lapsed.misplaced > 0 {
            tracing::warn!(
                store = self.inner.name,
                records = lapsed.misplaced,
                example = lapsed.misplaced_example.as_deref().unwrap_or_default(),
                "idem-redis: the search for abandoned records skipped records whose checkpoint names another key than the one they are stored at"
            );
        }
        Ok(lapsed
            .earliest
            .into_sorted_vec()
            .into_iter()
            .map(|found| found.versioned)
            .collect())
    }
}
