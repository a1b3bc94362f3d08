//! Completion inside a transaction: [`SqliteStore::transaction`] on the
//! store's own connection, [`SqliteStore::apply_in`] and
//! [`apply_transition`] on any connection to the file.

use std::sync::OnceLock;

use idem_core::machine::Fenced;
use idem_core::store::{State, codec};
use idem_core::{Error, Transition};
use rusqlite::types::{ToSql, ValueRef};
use rusqlite::{Connection, Transaction, TransactionBehavior};

use super::SqliteStore;
use crate::SqliteError;
use crate::builder::DEFAULT_MAX_RECORD_BYTES;
use crate::row::{Columns, RECORD_COLUMN_COUNT, record_size, ts};
use crate::schema::TableName;
use crate::sql::Statements;
use crate::writer;

impl SqliteStore {
    /// Runs `f` in an `IMMEDIATE` transaction on the store's own connection
    /// (on its writer thread, between batches), committing if `f` returns
    /// `Ok` and rolling back otherwise.
    ///
    /// # Behavior
    /// - Use it to make a business write and the idempotency record commit
    ///   together: inside `f`, write your rows and call
    ///   [`apply_in`](Self::apply_in) (or [`apply_transition`](crate::apply_transition))
    ///   with the [`Transition`] from
    ///   [`Engine::prepare_complete`](idem_core::Engine::prepare_complete),
    ///   or with a local phase's checkpoint from
    ///   [`Phases::prepare_local`](idem_core::Phases::prepare_local) (see
    ///   [`apply_in`](Self::apply_in) for an example).
    ///   If the lease was lost, `apply_in` fails with [`Error::LeaseLost`]
    ///   and returning that error rolls everything back.
    /// - If the transaction rolls back, the key stays claimed under the same
    ///   lease: [`release`](idem_core::Engine::release) it so that a retry
    ///   runs at once, or let the lease lapse.
    /// - Other calls on this store wait while `f` runs: keep it short, and do
    ///   no network I/O in it. A panic in `f` rolls back and is resumed in the
    ///   caller. Errors of `BEGIN`/`COMMIT` reach the caller as `E::from(SqliteError)`.
    /// - Works for in-memory stores too, and needs no second connection (no
    ///   lock contention with the store).
    /// - Once sent, `f` runs even if the returned future is dropped.
    ///
    /// ```
    /// use idem_core::{Begin, Engine, Fingerprint, IdempotencyKey, Outcome, Scope};
    /// use idem_sqlite::{SqliteError, SqliteStore};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    /// let store = SqliteStore::open_in_memory()?;
    /// store
    ///     .transaction(|tx| -> Result<(), SqliteError> {
    ///         Ok(tx.execute_batch("CREATE TABLE payments (key TEXT, cents INTEGER)")?)
    ///     })
    ///     .await?;
    /// let engine = Engine::new(store.clone());
    /// let key = IdempotencyKey::parse("pay-1")?;
    /// let scope = Scope::tenant("acme").with_operation("payments.create");
    /// if let Begin::Proceed(lease) = engine.begin(&scope, &key, Fingerprint::of(b"100")).await? {
    ///     let done = engine.prepare_complete(&lease, Outcome::new(&b"paid"[..]))?;
    ///     let s = store.clone();
    ///     store
    ///         .transaction(move |tx| -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    ///             tx.execute("INSERT INTO payments VALUES (?1, 100)", ["pay-1"])?;
    ///             s.apply_in(tx, &done)?; // payment and record commit together
    ///             Ok(())
    ///         })
    ///         .await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn transaction<R, E, F>(&self, f: F) -> Result<R, E>
    where
        F: FnOnce(&Transaction<'_>) -> Result<R, E> + Send + 'static,
        R: Send + 'static,
        E: From<SqliteError> + Send + 'static,
    {
        self.inner
            .writer
            .run(move |conn| {
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(|e| E::from(SqliteError::from(e)))?;
                let value = f(&tx)?;
                tx.commit().map_err(|e| E::from(SqliteError::from(e)))?;
                Ok(value)
            })
            .await
            .map_err(E::from)?
    }

    /// Applies `transition` (from
    /// [`Engine::prepare_complete`](idem_core::Engine::prepare_complete),
    /// [`prepare_fail`](idem_core::Engine::prepare_fail), or a checkpoint
    /// from [`Engine::prepare_checkpoint`](idem_core::Engine::prepare_checkpoint)
    /// / [`Phases::prepare_local`](idem_core::Phases::prepare_local)) on
    /// `conn`, normally inside the caller's open transaction, in the store's
    /// table.
    ///
    /// # Behavior
    /// - Replaces the record if the live record is in flight under the
    ///   transition's fencing token (the token, not the revision, so a
    ///   heartbeat meanwhile does not fail it): one `UPDATE`, which takes
    ///   effect only if the transaction commits.
    /// - A checkpoint keeps the record in flight under the same lease, with
    ///   the new checkpoint; it is applied only if it moves forward (its
    ///   sequence number above the stored checkpoint's), else
    ///   [`Error::LeaseLost`] with [`Fenced::Backwards`], changing nothing
    ///   (one more `SELECT`, by primary key, before the `UPDATE`). After
    ///   the commit, call [`Phases::applied`](idem_core::Phases::applied)
    ///   (or [`Lease::mark_applied`](idem_core::Lease::mark_applied)).
    /// - Otherwise changes nothing and returns [`Error::LeaseLost`] (taken
    ///   over, already finished, or expired); a record above the size limit
    ///   is [`StoreError::Rejected`](idem_core::StoreError::Rejected); SQL errors are [`Error::Store`].
    /// - `conn` may be the `tx` of [`transaction`](Self::transaction), or a
    ///   transaction on the application's own connection to the same file
    ///   (see [`connect`](Self::connect)). Begin those with
    ///   [`TransactionBehavior::Immediate`]: a deferred transaction that read
    ///   first cannot always upgrade to a write while the store writes, and
    ///   fails with `SQLITE_BUSY` instead of waiting.
    ///
    /// A local phase (its writes commit with its checkpoint, or neither
    /// does); [`Phases`](idem_core::Phases) is `Clone`, so a copy moves into
    /// the `'static` closure of [`transaction`](Self::transaction):
    ///
    /// ```
    /// use idem_core::{Begin, Engine, Fingerprint, IdempotencyKey, Outcome, Scope, Transition};
    /// use idem_sqlite::{SqliteError, SqliteStore};
    ///
    /// type BoxError = Box<dyn std::error::Error + Send + Sync>;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), BoxError> {
    /// let store = SqliteStore::open_in_memory()?;
    /// store
    ///     .transaction(|tx| -> Result<(), SqliteError> {
    ///         Ok(tx.execute_batch("CREATE TABLE reservations (order_key TEXT, sku TEXT)")?)
    ///     })
    ///     .await?;
    /// let engine = Engine::new(store.clone());
    /// let scope = Scope::tenant("acme").with_operation("orders.create");
    /// let key = IdempotencyKey::parse("order-1")?;
    /// if let Begin::Proceed(lease) = engine.begin(&scope, &key, Fingerprint::of(b"sku-1")).await? {
    ///     let mut phases = engine.phases(&lease)?;
    ///     // Local phase "reserve": skipped if a previous holder committed it.
    ///     let reservation: i64 = match phases.result("reserve")? {
    ///         Some(id) => id,
    ///         None => {
    ///             let (s, p, k) = (store.clone(), phases.clone(), key.to_string());
    ///             let (id, done) = store
    ///                 .transaction(move |tx| -> Result<(i64, Transition), BoxError> {
    ///                     tx.execute("INSERT INTO reservations VALUES (?1, 'sku-1')", [&k])?;
    ///                     let id = tx.last_insert_rowid();
    ///                     let done = p.prepare_local("reserve", &id)?;
    ///                     s.apply_in(tx, &done)?; // lease lost: the reservation rolls back
    ///                     Ok((id, done))
    ///                 })
    ///                 .await?;
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
    pub fn apply_in(&self, conn: &Connection, transition: &Transition) -> Result<(), Error> {
        self.check_size(&transition.next)?;
        apply(conn, &self.inner.sql, transition)
    }
}

/// Applies `transition` in the default table (`idem_records`) on `conn`:
/// [`SqliteStore::apply_in`] for stores opened with the default options.
///
/// ```
/// # fn f(tx: &rusqlite::Transaction<'_>, done: &idem_core::Transition) -> Result<(), idem_core::Error> {
/// idem_sqlite::apply_transition(tx, done)?; // inside the caller's transaction
/// # Ok(()) }
/// ```
pub fn apply_transition(conn: &Connection, transition: &Transition) -> Result<(), Error> {
    static DEFAULT: OnceLock<Statements> = OnceLock::new();
    let sql = DEFAULT.get_or_init(|| Statements::new(&TableName::default()));
    let size = record_size(&transition.next);
    if size > DEFAULT_MAX_RECORD_BYTES {
        return Err(SqliteError::TooLarge {
            size,
            limit: DEFAULT_MAX_RECORD_BYTES,
        }
        .into());
    }
    apply(conn, sql, transition)
}

fn apply(conn: &Connection, sql: &Statements, transition: &Transition) -> Result<(), Error> {
    let cols = Columns::of(&transition.next)?;
    let now = ts(transition.next.record.updated_at);
    let digest = &transition.key.digest()[..];
    let token = transition.token.to_be_bytes();
    let token = &token[..];
    if let Some(backwards) = moves_back(conn, sql, transition, digest, token, now)? {
        return Err(Error::LeaseLost(backwards));
    }
    let mut params: Vec<&dyn ToSql> = Vec::with_capacity(3 + RECORD_COLUMN_COUNT);
    params.extend_from_slice(&[&digest, &token]);
    params.extend_from_slice(&cols.params());
    params.push(&now);
    let updated = conn
        .prepare_cached(&sql.apply)
        .and_then(|mut stmt| stmt.execute(params.as_slice()))
        .map_err(SqliteError::from)?;
    if updated == 1 {
        return Ok(());
    }
    let current = writer::get(conn, sql, digest, now)?;
    Err(match current {
        None => Error::LeaseLost(Fenced::Expired),
        Some(current) => match current
            .record
            .check_holder(transition.token, transition.next.record.updated_at)
        {
            Err(fenced) => Error::LeaseLost(fenced),
            // Still ours, yet the update matched nothing: the row changed
            // between the two statements (a connection without a write lock).
            Ok(()) => Error::Contention,
        },
    })
}

/// For a checkpoint (a transition that stays in flight with a
/// checkpoint): [`Fenced::Backwards`] if the holder's stored checkpoint is
/// not older than it (a transition prepared from an outdated record, or
/// applied twice), so that progress only moves forward. One indexed read,
/// inside the caller's transaction (whose write lock, in an `IMMEDIATE`
/// transaction, keeps it true until the update). `None` otherwise,
/// including when the record is not the holder's (the update then finds
/// nothing and says why).
fn moves_back(
    conn: &Connection,
    sql: &Statements,
    transition: &Transition,
    digest: &[u8],
    token: &[u8],
    now: i64,
) -> Result<Option<Fenced>, SqliteError> {
    let offered = match (
        &transition.next.record.state,
        &transition.next.record.checkpoint,
    ) {
        (State::InFlight { .. }, Some(checkpoint)) => checkpoint.seq,
        _ => return Ok(None),
    };
    let statement = &sql.holder_checkpoint;
    let mut stmt = conn.prepare_cached(statement)?;
    let mut rows = stmt.query(rusqlite::params![digest, token, now])?;
    let Some(row) = rows.next()? else {
        return Ok(None);
    };
    let stored = match row.get_ref(0)? {
        ValueRef::Null => return Ok(None),
        ValueRef::Blob(bytes) => {
            codec::decode_checkpoint(bytes).map_err(|e| SqliteError::CorruptRow {
                table: sql.table.clone(),
                why: format!("column checkpoint does not decode: {e}"),
            })?
        }
        _ => {
            return Err(SqliteError::CorruptRow {
                table: sql.table.clone(),
                why: "column checkpoint holds no BLOB".to_string(),
            });
        }
    };
    Ok((stored.seq >= offered).then_some(Fenced::Backwards {
        stored: stored.seq,
        offered,
    }))
}
