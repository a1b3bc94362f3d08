//! Completion inside the caller's transaction: [`PostgresStore::apply_in`].

use idem_core::machine::Fenced;
use idem_core::store::{State, codec};
use idem_core::{Error, Transition};
use sqlx::postgres::PgConnection;
use sqlx::{AssertSqlSafe, Row};

use super::{PostgresStore, bind_record};
use crate::PostgresError;
use crate::row::{self, Columns, ts};

impl PostgresStore {
    /// Applies `transition` (from [`Engine::prepare_complete`],
    /// [`Engine::prepare_fail`], or a checkpoint from
    /// [`Engine::prepare_checkpoint`] / [`Phases::prepare_local`]) on
    /// `conn`, typically the caller's open transaction (`&mut *tx`), so that
    /// the business write and the idempotency record commit together.
    ///
    /// # Behavior
    /// - One statement (two for a checkpoint, below): `UPDATE … WHERE
    ///   digest = $1 AND state = 'in_flight' AND token = $2 AND <live at the
    ///   transition's time>`. It checks the
    ///   fencing token, not the revision, so a heartbeat that extended the
    ///   lease meanwhile does not make it fail.
    /// - A checkpoint keeps the record in flight under the same lease, with
    ///   the new checkpoint; it is applied only if it moves forward (its
    ///   sequence number above the stored checkpoint's), else
    ///   [`Error::LeaseLost`] with [`Fenced::Backwards`], changing nothing:
    ///   one more statement before the `UPDATE`, `SELECT checkpoint … FOR
    ///   UPDATE` of the holder's row. After the commit, call
    ///   [`Phases::applied`] (or [`Lease::mark_applied`]).
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
    /// [`Engine::prepare_checkpoint`]: idem_core::Engine::prepare_checkpoint
    /// [`Engine::release`]: idem_core::Engine::release
    /// [`Phases::prepare_local`]: idem_core::Phases::prepare_local
    /// [`Phases::applied`]: idem_core::Phases::applied
    /// [`Lease::mark_applied`]: idem_core::Lease::mark_applied
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
    ///
    /// A local phase of a multi-step operation ([`Phases`](idem_core::Phases)):
    /// its rows and its checkpoint commit together, or neither does.
    ///
    /// ```no_run
    /// # use idem_core::{Begin, Engine, Fingerprint, IdempotencyKey, Outcome, Scope};
    /// # use idem_postgres::PostgresStore;
    /// # async fn order(engine: &Engine<PostgresStore>, scope: &Scope, key: &IdempotencyKey)
    /// #     -> Result<(), Box<dyn std::error::Error>> {
    /// if let Begin::Proceed(lease) = engine.begin(scope, key, Fingerprint::of(b"sku-1")).await? {
    ///     let mut phases = engine.phases(&lease)?;
    ///     // Local phase "reserve": skipped if a previous holder committed it.
    ///     let reservation: i64 = match phases.result("reserve")? {
    ///         Some(id) => id,
    ///         None => {
    ///             let store = engine.store();
    ///             let mut tx = store.pool().begin().await?;
    ///             let id: i64 = sqlx::query_scalar(
    ///                 "INSERT INTO reservations (order_key, sku) VALUES ($1, 'sku-1') RETURNING id",
    ///             )
    ///             .bind(key.as_str())
    ///             .fetch_one(&mut *tx)
    ///             .await?;
    ///             let done = phases.prepare_local("reserve", &id)?;
    ///             store.apply_in(&mut tx, &done).await?; // lease lost: tx rolls back on drop
    ///             tx.commit().await?;
    ///             phases.applied(&done)?; // committed: the phase counts as recorded
    ///             id
    ///         }
    ///     };
    ///     // … external phases (`phases.external`), then the final outcome:
    ///     let outcome = Outcome::new(format!("reservation {reservation}").into_bytes());
    ///     engine.complete(phases.lease(), outcome).await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn apply_in(
        &self,
        conn: &mut PgConnection,
        transition: &Transition,
    ) -> Result<(), Error> {
        let table = &self.inner.table;
        self.check_size(&transition.next)?;
        let cols = Columns::of(&transition.next)?;
        let now = transition.next.record.updated_at;
        let digest = &transition.key.digest()[..];
        let token = transition.token.to_be_bytes();
        if let Some(backwards) = self
            .moves_back(conn, transition, digest, &token[..])
            .await?
        {
            return Err(Error::LeaseLost(backwards));
        }
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

    /// For a checkpoint (a transition that stays in flight with a
    /// checkpoint): [`Fenced::Backwards`] if the holder's stored checkpoint
    /// is not older than it (a transition prepared from an outdated record,
    /// or applied twice), so that progress only moves forward. One
    /// `SELECT … FOR UPDATE` by primary key on `conn`: the row stays locked
    /// until the caller's transaction ends, so nothing changes it before the
    /// update. `None` otherwise, including when the record is not the
    /// holder's (the update then finds nothing and says why).
    async fn moves_back(
        &self,
        conn: &mut PgConnection,
        transition: &Transition,
        digest: &[u8],
        token: &[u8],
    ) -> Result<Option<Fenced>, Error> {
        let offered = match (
            &transition.next.record.state,
            &transition.next.record.checkpoint,
        ) {
            (State::InFlight { .. }, Some(checkpoint)) => checkpoint.seq,
            _ => return Ok(None),
        };
        let table = &self.inner.table;
        let statement = &self.inner.sql.holder_checkpoint;
        let row = sqlx::query(AssertSqlSafe(statement.clone()))
            .bind(digest)
            .bind(token)
            .bind(ts(transition.next.record.updated_at))
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| PostgresError::driver(e, table))?;
        let Some(row) = row else {
            return Ok(None);
        };
        let corrupt = |why: String| PostgresError::CorruptRow {
            table: table.table().to_string(),
            why,
        };
        let stored: Option<Vec<u8>> = row
            .try_get(0)
            .map_err(|e| corrupt(format!("column checkpoint: {e}")))?;
        let Some(stored) = stored else {
            return Ok(None);
        };
        let stored = codec::decode_checkpoint(&stored)
            .map_err(|e| corrupt(format!("column checkpoint does not decode: {e}")))?;
        Ok((stored.seq >= offered).then_some(Fenced::Backwards {
            stored: stored.seq,
            offered,
        }))
    }
}
