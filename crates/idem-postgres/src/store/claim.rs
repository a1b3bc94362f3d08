//! The claim ([`Store::insert_if_absent`](idem_core::store::Store::insert_if_absent))
//! in each [`ClaimMode`]: which statements it runs, in which order (see the
//! crate docs for the statements and the isolation reasoning).

use std::borrow::Cow;
use std::sync::Arc;

use idem_core::store::{InsertOutcome, StoreError, Versioned};
use idem_core::{RecordKey, Timestamp};
use sqlx::pool::PoolConnection;
use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use sqlx::{AssertSqlSafe, Postgres};

use super::{Deadline, PostgresStore, ROUNDS, bind_record};
use crate::ClaimMode;
use crate::PostgresError;
use crate::row::{self, Columns, ts};

/// What a claim inserts: the key, its scope columns and the record.
struct Claim<'a> {
    key: &'a RecordKey,
    tenant: Cow<'a, str>,
    principal: Option<Cow<'a, str>>,
    operation: Option<Cow<'a, str>>,
    cols: Columns<'a>,
}

impl Claim<'_> {
    /// `sql` with `$1..$16` bound: the digest, the scope, the key and the
    /// record columns.
    fn bind<'q>(&'q self, sql: &Arc<str>) -> Query<'q, Postgres, PgArguments> {
        let query = sqlx::query(AssertSqlSafe(sql.clone()))
            .bind(&self.key.digest()[..])
            .bind(self.tenant.as_ref())
            .bind(self.principal.as_deref())
            .bind(self.operation.as_deref())
            .bind(self.key.key().as_str());
        bind_record(query, &self.cols)
    }
}

impl PostgresStore {
    /// The claim of `record` under `key` at `now`, in the store's mode.
    pub(super) async fn claim(
        &self,
        key: &RecordKey,
        record: &Versioned,
        now: Timestamp,
    ) -> Result<InsertOutcome, StoreError> {
        self.check_size(record)?;
        let cols = Columns::of(record)?;
        let scope = key.scope();
        let claim = Claim {
            key,
            tenant: row::text(scope.tenant_id()),
            principal: scope.principal().map(row::text),
            operation: scope.operation().map(row::text),
            cols,
        };
        let deadline = self.deadline();
        let mut conn = self.acquire(deadline).await?;
        let conn = &mut conn;
        match self.inner.claim {
            ClaimMode::SingleStatement => self.claim_in_one(conn, deadline, &claim, now).await,
            ClaimMode::ReadFirst => self.claim_reading_first(conn, deadline, &claim, now).await,
            ClaimMode::Adaptive => {
                let outcome = if self.inner.adaptive.reads_first() {
                    self.claim_reading_first(conn, deadline, &claim, now)
                        .await?
                } else {
                    self.claim_inserting_first(conn, deadline, &claim, now)
                        .await?
                };
                self.inner
                    .adaptive
                    .record(matches!(outcome, InsertOutcome::Exists(_)));
                Ok(outcome)
            }
        }
    }

    /// [`ClaimMode::SingleStatement`]: the claim statement (a data-modifying
    /// CTE), again only when a race hid the winner from its snapshot.
    async fn claim_in_one(
        &self,
        conn: &mut PoolConnection<Postgres>,
        deadline: Deadline,
        claim: &Claim<'_>,
        now: Timestamp,
    ) -> Result<InsertOutcome, StoreError> {
        for round in 1..=ROUNDS {
            let query = claim.bind(&self.inner.sql.insert).bind(ts(now));
            let result = self
                .limit(deadline, query.fetch_optional(&mut **conn))
                .await;
            match self.settle(conn, result)? {
                Some(row) if self.flag(&row)? => return Ok(InsertOutcome::Inserted),
                Some(row) => return Ok(InsertOutcome::Exists(self.decode(&row, 1)?)),
                // A live record was committed after this statement's
                // snapshot: the insert lost, but this statement cannot show
                // the winner. A new one can.
                None => tracing::debug!(round, "idem-postgres: insert lost a race; re-reading"),
            }
        }
        Err(unsettled())
    }

    /// [`ClaimMode::ReadFirst`] (and [`ClaimMode::Adaptive`] while reading
    /// first, or after its insert met a record): the `get` statement; if it
    /// finds nothing live, the insert that also replaces an expired record.
    async fn claim_reading_first(
        &self,
        conn: &mut PoolConnection<Postgres>,
        deadline: Deadline,
        claim: &Claim<'_>,
        now: Timestamp,
    ) -> Result<InsertOutcome, StoreError> {
        for round in 1..=ROUNDS {
            // A live record seen by this statement's snapshot was live
            // during the call: reporting it is linearizable. Absent or
            // expired: the insert below decides, on the latest version.
            if let Some(found) = self.read_live(conn, deadline, claim.key, now).await? {
                return Ok(InsertOutcome::Exists(found));
            }
            let query = claim.bind(&self.inner.sql.insert_only).bind(ts(now));
            let result = self
                .limit(deadline, query.fetch_optional(&mut **conn))
                .await;
            match self.settle(conn, result)? {
                Some(_) => return Ok(InsertOutcome::Inserted),
                // A live record was committed after the read: read again.
                None => tracing::debug!(round, "idem-postgres: insert lost a race; re-reading"),
            }
        }
        Err(unsettled())
    }

    /// [`ClaimMode::Adaptive`] while inserting first: a plain insert that
    /// writes nothing if any record holds the key; then, only if one does,
    /// the read-first claim, which reports a live record or replaces an
    /// expired one.
    async fn claim_inserting_first(
        &self,
        conn: &mut PoolConnection<Postgres>,
        deadline: Deadline,
        claim: &Claim<'_>,
        now: Timestamp,
    ) -> Result<InsertOutcome, StoreError> {
        let query = claim.bind(&self.inner.sql.insert_new);
        let result = self.limit(deadline, query.execute(&mut **conn)).await;
        if self.settle(conn, result)?.rows_affected() == 1 {
            return Ok(InsertOutcome::Inserted);
        }
        // `ON CONFLICT DO NOTHING` met a committed record (after waiting for
        // an uncommitted insert of the key, if any): live, expired, or
        // deleted since. The read, a new statement, sees it.
        self.claim_reading_first(conn, deadline, claim, now).await
    }
}

fn unsettled() -> StoreError {
    PostgresError::Unsettled {
        attempts: ROUNDS,
        operation: "insert_if_absent",
    }
    .into()
}
