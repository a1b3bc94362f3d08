//! The [`Store`] primitives of [`SqliteStore`]: each one a [`Request`] to
//! the writer thread, answered through a reply typed to it.

use async_trait::async_trait;
use idem_core::store::{
    Capabilities, Census, CensusSupport, InsertOutcome, Store, StoreError, SwapOutcome, Versioned,
};
use idem_core::{RecordKey, Timestamp};

use super::SqliteStore;
use crate::writer::Request;

#[async_trait]
impl Store for SqliteStore {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new()
            .with_max_record_bytes(Some(self.inner.options.max_record_bytes))
            .with_census(CensusSupport::Exact)
            .with_abandoned(true)
    }

    async fn insert_if_absent(
        &self,
        key: &RecordKey,
        record: &Versioned,
        now: Timestamp,
    ) -> Result<InsertOutcome, StoreError> {
        self.check_size(record)?;
        let (key, record) = (key.clone(), record.clone());
        let request = |reply| Request::Insert {
            key,
            record,
            now,
            reply,
        };
        Ok(self.inner.writer.call(request).await?)
    }

    async fn get(&self, key: &RecordKey, now: Timestamp) -> Result<Option<Versioned>, StoreError> {
        let digest = *key.digest();
        let request = |reply| Request::Get { digest, now, reply };
        Ok(self.inner.writer.call(request).await?)
    }

    async fn compare_and_swap(
        &self,
        key: &RecordKey,
        expected: &Versioned,
        record: &Versioned,
        now: Timestamp,
    ) -> Result<SwapOutcome, StoreError> {
        self.check_size(record)?;
        let (digest, record) = (*key.digest(), record.clone());
        let request = |reply| Request::Cas {
            digest,
            expected: expected.revision,
            record,
            now,
            reply,
        };
        Ok(self.inner.writer.call(request).await?)
    }

    async fn delete_if(
        &self,
        key: &RecordKey,
        expected: &Versioned,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let digest = *key.digest();
        let request = |reply| Request::Delete {
            digest,
            expected: expected.revision,
            now,
            reply,
        };
        Ok(self.inner.writer.call(request).await?)
    }

    async fn purge_expired(&self, now: Timestamp, limit: usize) -> Result<u64, StoreError> {
        if limit == 0 {
            return Ok(0);
        }
        let request = |reply| Request::Purge { now, limit, reply };
        Ok(self.inner.writer.call(request).await?)
    }

    /// Exact, whatever `sample`: one aggregate query over the table (see the
    /// crate docs), run on the writer thread between batches.
    ///
    /// # Behavior
    /// - Reads every row once (`state` and `expires_at`), in the statement's
    ///   own read transaction: not under the write lock, so other
    ///   connections and processes keep writing (WAL); this store's other
    ///   calls wait for it on the writer thread.
    /// - A row whose `state` is not a record's is counted as `unreadable`
    ///   (and logged at `warn`): an operator's census does not fail on one
    ///   damaged row.
    async fn census(&self, now: Timestamp, sample: usize) -> Result<Census, StoreError> {
        let _ = sample;
        let sql = self.inner.sql.clone();
        let counted = self
            .inner
            .writer
            .run(move |conn| crate::census::count(conn, &sql, now))
            .await?;
        Ok(counted?)
    }

    /// One indexed query, in a read transaction of the writer thread (no
    /// write lock).
    ///
    /// # Behavior
    /// - `SELECT … WHERE state = 'in_flight' AND checkpoint IS NOT NULL AND
    ///   lease_deadline <= now AND <live> ORDER BY lease_deadline LIMIT
    ///   limit`: a range scan of the partial index `<table>_abandoned`,
    ///   which holds only in-flight records with a checkpoint, in its order
    ///   (sorted only for a `now` of 2^63 ms or more).
    /// - Only this store's table; expired records are skipped (those not
    ///   purged yet are still read from the index, so keep the purger
    ///   running).
    /// - A row that does not decode is skipped and logged (`warn`), so one
    ///   damaged record cannot stop the completer for every other key;
    ///   [`get`](Store::get) still reports it as [`StoreError::Corrupt`].
    async fn abandoned(&self, now: Timestamp, limit: usize) -> Result<Vec<Versioned>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let request = |reply| Request::Abandoned { now, limit, reply };
        Ok(self.inner.writer.call(request).await?)
    }
}
