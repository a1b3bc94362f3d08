//! The [`Store`] primitives of [`PostgresStore`]: one statement each on the
//! happy path (see the crate docs for the statements and the isolation
//! reasoning).

use async_trait::async_trait;
use idem_core::store::{
    Capabilities, Census, CensusSupport, InsertOutcome, Store, StoreError, SwapOutcome, Versioned,
};
use idem_core::{RecordKey, Timestamp};
use sqlx::AssertSqlSafe;

use super::{PostgresStore, ROUNDS, bind_record};
use crate::PostgresError;
use crate::row::{Columns, ts};

#[async_trait]
impl Store for PostgresStore {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new()
            .with_max_record_bytes(Some(self.inner.max_record_bytes))
            .with_census(CensusSupport::Exact)
            .with_abandoned(true)
    }

    async fn insert_if_absent(
        &self,
        key: &RecordKey,
        record: &Versioned,
        now: Timestamp,
    ) -> Result<InsertOutcome, StoreError> {
        // Each claim mode's statements are in `store/claim.rs`.
        self.claim(key, record, now).await
    }

    async fn get(&self, key: &RecordKey, now: Timestamp) -> Result<Option<Versioned>, StoreError> {
        let deadline = self.deadline();
        let mut conn = self.acquire(deadline).await?;
        self.read_live(&mut conn, deadline, key, now).await
    }

    async fn compare_and_swap(
        &self,
        key: &RecordKey,
        expected: &Versioned,
        record: &Versioned,
        now: Timestamp,
    ) -> Result<SwapOutcome, StoreError> {
        self.check_size(record)?;
        let cols = Columns::of(record)?;
        let deadline = self.deadline();
        let mut conn = self.acquire(deadline).await?;
        for round in 1..=ROUNDS {
            let query = sqlx::query(AssertSqlSafe(self.inner.sql.cas.clone()))
                .bind(&key.digest()[..])
                .bind(expected.revision.as_i64());
            let query = bind_record(query, &cols).bind(ts(now));
            let result = self.limit(deadline, query.execute(&mut *conn)).await;
            if self.settle(&mut conn, result)?.rows_affected() == 1 {
                return Ok(SwapOutcome::Swapped);
            }
            // No live row under `expected`, judged on the latest version.
            // The read is a new statement, so its snapshot includes any
            // write that beat the update.
            match self.read_live(&mut conn, deadline, key, now).await? {
                None => return Ok(SwapOutcome::Conflict(None)),
                Some(current) if current.revision != expected.revision => {
                    return Ok(SwapOutcome::Conflict(Some(current)));
                }
                // `expected` is back (the update's snapshot was older than
                // the record it expected): ask again.
                Some(_) => tracing::debug!(
                    round,
                    "idem-postgres: compare_and_swap saw a stale snapshot; retrying"
                ),
            }
        }
        Err(PostgresError::Unsettled {
            attempts: ROUNDS,
            operation: "compare_and_swap",
        }
        .into())
    }

    async fn delete_if(
        &self,
        key: &RecordKey,
        expected: &Versioned,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let deadline = self.deadline();
        let mut conn = self.acquire(deadline).await?;
        let query = sqlx::query(AssertSqlSafe(self.inner.sql.delete.clone()))
            .bind(&key.digest()[..])
            .bind(expected.revision.as_i64())
            .bind(ts(now));
        let result = self.limit(deadline, query.execute(&mut *conn)).await;
        Ok(self.settle(&mut conn, result)?.rows_affected() == 1)
    }

    async fn purge_expired(&self, now: Timestamp, limit: usize) -> Result<u64, StoreError> {
        if limit == 0 {
            return Ok(0);
        }
        let now = ts(now);
        let sql = if now >= 0 {
            &self.inner.sql.purge_low
        } else {
            &self.inner.sql.purge_high
        };
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let deadline = self.deadline();
        let mut conn = self.acquire(deadline).await?;
        let query = sqlx::query(AssertSqlSafe(sql.clone()))
            .bind(now)
            .bind(limit);
        let result = self.limit(deadline, query.execute(&mut *conn)).await;
        Ok(self.settle(&mut conn, result)?.rows_affected())
    }

    /// Exact, whatever `sample`: one aggregate statement over the table (see
    /// the crate docs), bounded by the store's timeout like every call.
    ///
    /// # Behavior
    /// - Scans every row once (one sequential scan, no parallel workers),
    ///   under READ COMMITTED: one snapshot, no lock beyond the scan's
    ///   `ACCESS SHARE`, nothing written.
    /// - On a large table the scan may take longer than the store's timeout
    ///   ([`with_timeout`](crate::PostgresStoreBuilder::with_timeout));
    ///   that is [`StoreError::Unavailable`], as for every call: give the
    ///   operator's store a longer timeout.
    async fn census(&self, now: Timestamp, sample: usize) -> Result<Census, StoreError> {
        let _ = sample;
        let [t0, t1, t2, t3, t4] = crate::census::thresholds(now);
        let deadline = self.deadline();
        let mut conn = self.acquire(deadline).await?;
        let query = sqlx::query(AssertSqlSafe(self.inner.sql.census.clone()))
            .bind(ts(now))
            .bind(t0)
            .bind(t1)
            .bind(t2)
            .bind(t3)
            .bind(t4);
        let result = self.limit(deadline, query.fetch_one(&mut *conn)).await;
        let row = self.settle(&mut conn, result)?;
        crate::census::from_row(&row, &self.inner.table)
    }

    /// One indexed statement, bounded by the store's timeout like every
    /// call.
    ///
    /// # Behavior
    /// - `SELECT … WHERE state = 'in_flight' AND checkpoint IS NOT NULL AND
    ///   lease_deadline <= $now AND <live> ORDER BY lease_deadline LIMIT
    ///   $limit`: a range scan of the partial index on `lease_deadline`,
    ///   which holds only in-flight rows with a checkpoint, in its order
    ///   (sorted only for a `now` of 2^63 ms or more). Read-only: no lock,
    ///   one snapshot.
    /// - Only this store's table (schema-qualified); expired records are
    ///   skipped (those not purged yet are still read from the index, so
    ///   keep purging).
    /// - A row that does not decode is skipped and logged (`warn`), so one
    ///   damaged record cannot stop the completer for every other key;
    ///   [`get`](Store::get) still reports it as [`StoreError::Corrupt`].
    async fn abandoned(&self, now: Timestamp, limit: usize) -> Result<Vec<Versioned>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let now = ts(now);
        let sql = if now >= 0 {
            &self.inner.sql.abandoned_low
        } else {
            &self.inner.sql.abandoned_high
        };
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let deadline = self.deadline();
        let mut conn = self.acquire(deadline).await?;
        let query = sqlx::query(AssertSqlSafe(sql.clone()))
            .bind(now)
            .bind(limit);
        let result = self.limit(deadline, query.fetch_all(&mut *conn)).await;
        Ok(self
            .settle(&mut conn, result)?
            .iter()
            .filter_map(|row| match self.decode(row, 0) {
                Ok(v) => Some(v),
                Err(e) => {
                    tracing::warn!(error = %e, "idem-postgres: skipping an abandoned record that cannot be read");
                    None
                }
            })
            .collect())
    }
}
