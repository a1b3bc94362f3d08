//! [`Store::census`](idem_core::store::Store::census) on Redis: walk the
//! store's records (`store/scan.rs`), tally them with [`Census::tally`],
//! and stop after the sample.

use std::ops::ControlFlow;

use idem_core::Timestamp;
use idem_core::store::{Census, Coverage, StoreError, Versioned};

use super::RedisStore;
use super::scan::Sink;

/// A census in progress.
struct Tally {
    census: Census,
    now: Timestamp,
    /// The sample size asked for.
    sample: usize,
    /// Records counted.
    counted: usize,
}

impl Sink for Tally {
    fn room(&self) -> usize {
        self.sample - self.counted.min(self.sample)
    }

    fn take(&mut self, _key: &[u8], versioned: Versioned) -> ControlFlow<()> {
        if self.counted >= self.sample {
            return ControlFlow::Break(());
        }
        self.census.tally(&versioned.record, self.now);
        self.counted += 1;
        ControlFlow::Continue(())
    }
}

impl RedisStore {
    /// The census behind [`Store::census`](idem_core::store::Store::census);
    /// see its docs in `primitives.rs`.
    pub(super) async fn scan_census(
        &self,
        now: Timestamp,
        sample: usize,
    ) -> Result<Census, StoreError> {
        let mut tally = Tally {
            census: Census::new(Coverage::Exact),
            now,
            sample,
            counted: 0,
        };
        let walked = self.walk(&mut tally).await?;
        if walked.skipped > 0 {
            tracing::warn!(
                store = self.inner.name,
                values = walked.skipped,
                example = walked.skipped_example.as_deref().unwrap_or_default(),
                "idem-redis: census found values under the store's prefix that are not records (counted as unreadable)"
            );
        }
        let mut census = tally.census;
        census.unreadable = walked.skipped;
        if !walked.complete {
            census.coverage = Coverage::Sampled {
                limit: u64::try_from(sample).unwrap_or(u64::MAX),
            };
        }
        Ok(census)
    }
}
