//! Completion inside the caller's transaction: [`PostgresStore::apply_in`].

use idem_core::machine::Fenced;
use idem_core::{Error, Transition};
use sqlx::AssertSqlSafe;
use sqlx::postgres::PgConnection;

use super::{PostgresStore, bind_record};
use crate::PostgresError;
use crate::row::{self, Columns, ts};

impl PostgresStore {
    /// Applies `transition` (from [`Engine::prepare_complete`] or
    /// [`Engine::prepare_fail`]) on `conn`, typically the caller's open
    /// transaction (`&mut *tx`), so that the business write and the
    /// idempotency record commit together.
    ///
    /// # Behavior
    /// - One statement: `UPDATE … WHERE digest = $1 AND state = 'in_flight'
    ///   AND token = $2 AND <live at the transition's time>`. It checks the
    ///   fencing token, not the revision, so a heartbeat that extended the
    ///   lease meanwhile does not make it fail.
    /// - The record is replaced only if the live record is in flight under
    ///   the transition's token; otherwise nothing changes and the result is
    ///   [`Error::LeaseLost`] (taken over, finished, or expired; one more
    ///   `SELECT` on `conn` tells which). Roll the transaction back then: the
    ///   business write must not commit without its record.
    /// - The write takes effect only if the caller's transaction commits.
    ///   **If it rolls back, the key stays claimed**, in flight under the
    ///   same lease, exactly as before the call: retries of the key get
    ///   "in progress" until the holder releases it with
    ///   [`Engine::release`] (then a retry runs at once) or until the lease
    ///   lapses (then a retry takes over with a new token). The business
    ///   write rolled back too, so either way the operation runs once.
    /// - The updated row stays locked until the transaction ends: keep the
    ///   transaction short. A concurrent heartbeat or takeover of this key
    ///   waits for it.
    /// - The statement runs under the caller's isolation level. Under
    ///   `REPEATABLE READ`/`SERIALIZABLE`, a record changed after the
    ///   transaction's snapshot raises a serialization failure, reported as a
    ///   transient [`StoreError::Unavailable`](idem_core::StoreError::Unavailable); retry the whole transaction.
    /// - No timeout is applied here: the caller owns the connection.
    ///
    /// [`Engine::prepare_complete`]: idem_core::Engine::prepare_complete
    /// [`Engine::prepare_fail`]: idem_core::Engine::prepare_fail
    /// [`Engine::release`]: idem_core::Engine::release
    ///
    /// ```no_run
    /// # use idem_core::{Begin, Engine, Fingerprint, IdempotencyKey, Outcome, Scope};
    /// # use idem_postgres::PostgresStore;
    /// # async fn charge(engine: &Engine<PostgresStore>, scope: &Scope, key: &IdempotencyKey)
    /// #     -> Result<(), Box<dyn std::error::Error>> {
    /// if let Begin::Proceed(lease) = engine.begin(scope, key, Fingerprint::of(b"1000 EUR")).await? {
    ///     let store = engine.store();
    ///     let mut tx = store.pool().begin().await?;
    ///     sqlx::query("INSERT INTO payments (idempotency_key, amount) VALUES ($1, $2)")
    ///         .bind(key.as_str())
    ///         .bind(1000_i64)
    ///         .execute(&mut *tx)
    ///         .await?;
    ///     let done = engine.prepare_complete(&lease, Outcome::new(&b"paid"[..]))?;
    ///     store.apply_in(&mut tx, &done).await?; // LeaseLost: tx rolls back on drop
    ///     tx.commit().await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn apply_in(
        &self,
        conn: &mut PgConnection,
        transition: &Transition,
    ) -> Result<(), Error> {
        let table = &self.inner.table;
        let cols = Columns::of(&transition.next);
        self.check_size(&cols)?;
        let now = transition.next.record.updated_at;
        let digest = &transition.key.digest()[..];
        let token = transition.token.to_be_bytes();
        let done = bind_record(
            sqlx::query(AssertSqlSafe(self.inner.sql.apply.clone()))
                .bind(digest)
                .bind(&token[..]),
            &cols,
        )
        .bind(ts(now))
        .execute(&mut *conn)
        .await
        .map_err(|e| PostgresError::driver(e, table))?;
        if done.rows_affected() == 1 {
            return Ok(());
        }
        let row = sqlx::query(AssertSqlSafe(self.inner.sql.get.clone()))
            .bind(digest)
            .bind(ts(now))
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| PostgresError::driver(e, table))?;
        let current = row
            .map(|row| row::decode(&row, 0, table.table()))
            .transpose()?;
        Err(match current {
            None => Error::LeaseLost(Fenced::Expired),
            Some(current) => match current.record.check_holder(transition.token, now) {
                Err(fenced) => Error::LeaseLost(fenced),
                // Still ours, yet the update found nothing: the row changed
                // between the two statements. Transient.
                Ok(()) => Error::Contention,
            },
        })
    }
}
