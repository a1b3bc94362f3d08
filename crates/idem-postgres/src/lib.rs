//! # idem-postgres
//!
//! A PostgreSQL [`Store`](idem_core::store::Store) for **idem**, on sqlx, with
//! completion **inside the caller's transaction**: the business write and the
//! idempotency record commit together, or not at all.
//!
//! ```no_run
//! use idem_core::{Begin, Engine, Fingerprint, IdempotencyKey, Outcome, Scope};
//! use idem_postgres::PostgresStore;
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = PostgresStore::pool_options()
//!     .connect("postgres://postgres@127.0.0.1:5432/app")
//!     .await?;
//! let store = PostgresStore::builder().open(pool.clone()); // shares the application's pool
//! store.migrate().await?;
//! let engine = Engine::new(store);
//!
//! let scope = Scope::tenant("acme").with_operation("payments.create");
//! let key = IdempotencyKey::parse("8e03978e-40d5-43e8-bc93-6894a57f9324")?;
//! match engine.begin(&scope, &key, Fingerprint::of(b"1000 EUR to bob")).await? {
//!     Begin::Proceed(lease) => {
//!         let mut tx = pool.begin().await?;
//!         sqlx::query("INSERT INTO payments (idempotency_key, amount_cents) VALUES ($1, $2)")
//!             .bind(key.as_str())
//!             .bind(1000_i64)
//!             .execute(&mut *tx)
//!             .await?;
//!         let done = engine.prepare_complete(&lease, Outcome::new(&b"payment 1 created"[..]))?;
//!         engine.store().apply_in(&mut tx, &done).await?;
//!         tx.commit().await?; // payment row and idempotency record, together
//!     }
//!     Begin::Replay(replay) => println!("replayed: {:?}", replay.outcome),
//!     Begin::InProgress { retry_after } => println!("409, retry after {retry_after:?}"),
//!     Begin::Mismatch(_) => println!("422"),
//! }
//! # Ok(()) }
//! ```
//!
//! The complete program is `examples/payments_tx.rs`.
//!
//! ## Table
//!
//! [`PostgresStore::migrate`] runs the migrations shipped in `migrations/`
//! (with sqlx's migrator, bookkept in `<table>_migrations`) to create the
//! schema and table named by a validated [`TableName`] (default
//! `idem.idempotency_records`):
//!
//! | column | type | |
//! |---|---|---|
//! | `digest` | `BYTEA PRIMARY KEY` | [`RecordKey::digest`](idem_core::RecordKey::digest) |
//! | `tenant`, `principal`, `operation`, `key` | `TEXT` | the scope and the client's key, for operators |
//! | `state` | `TEXT` + `CHECK` | [`State::name`](idem_core::store::State::name) |
//! | `fingerprint`, `token` | `BYTEA` | 32 and 16 bytes |
//! | `lease_deadline` / `outcome` | `BIGINT` / `BYTEA`, nullable | in flight / finished |
//! | `created_at`, `updated_at`, `expires_at` | `BIGINT` | ms of the engine's clock; index on `expires_at` |
//! | `attempts`, `revision` | `BIGINT` | |
//! | `checkpoint` | `BYTEA`, nullable | the holder's [`Checkpoint`](idem_core::store::Checkpoint) ([`codec::encode_checkpoint`](idem_core::store::codec::encode_checkpoint)); partial index on `lease_deadline` of in-flight rows that have one, `<table>_lease_deadline_idx` (migration 3) |
//!
//! u64 values (timestamps, revisions) are stored bit for bit, so every real
//! timestamp reads as itself; the statements compare timestamps with the
//! sign bit flipped (`(expires_at # x) > ($now # x)`), so even expiries
//! beyond 2^63 ms order correctly. A row that does not make a record (a
//! fingerprint of the wrong length, an unknown state, a finished state
//! without outcome, a checkpoint that does not decode, …) is [`StoreError::Corrupt`](idem_core::StoreError::Corrupt)
//! and is never overwritten while it is live.
//!
//! ## Statements and round trips
//!
//! Each primitive takes **one statement** on its happy path, hence one round
//! trip once sqlx has prepared it on the connection (the first use of a
//! statement on a connection adds one for `Parse`/`Describe`; sqlx caches it
//! afterwards). The claim takes one for what the traffic mostly brings
//! (see [`ClaimMode`]). No explicit transaction on the hot path: each
//! statement is atomic on its own. Statements are plain
//! `INSERT`/`UPDATE`/`SELECT`: a data-modifying CTE costs the server about
//! a quarter more than the plain insert when it inserts and 1.7 times a
//! `SELECT` when it only reads (docs/benchmarks.md), so only
//! [`ClaimMode::SingleStatement`] uses one.
//!
//! | primitive | statement |
//! |---|---|
//! | `insert_if_absent` ([`ClaimMode::Adaptive`], default, inserting first) | `INSERT … SELECT $1, … WHERE NOT EXISTS (SELECT 1 … WHERE digest = $1) ON CONFLICT (digest) DO NOTHING`; only if it inserted nothing, the read-first claim below |
//! | `insert_if_absent` ([`ClaimMode::ReadFirst`], and [`ClaimMode::Adaptive`] reading first) | the `get` statement; if it finds nothing, `INSERT … VALUES … ON CONFLICT (digest) DO UPDATE SET … WHERE <expired> RETURNING 1` |
//! | `insert_if_absent` ([`ClaimMode::SingleStatement`]) | `WITH existing AS (SELECT … live) , inserted AS (INSERT … SELECT … WHERE NOT EXISTS (existing) ON CONFLICT (digest) DO UPDATE SET … WHERE <expired>) SELECT …` |
//! | `get` | `SELECT … WHERE digest = $1 AND <live>` |
//! | `compare_and_swap` | `UPDATE … WHERE digest = $1 AND revision = $2 AND <live>`; only if it matched nothing, the `get` statement, to report the conflict |
//! | `delete_if` | `DELETE … WHERE digest = $1 AND revision = $2 AND <live>` |
//! | `purge_expired` | `DELETE … WHERE ctid = ANY(ARRAY(SELECT ctid … <expired> LIMIT $n FOR UPDATE SKIP LOCKED)) AND <expired>` |
//! | [`apply_in`](PostgresStore::apply_in) | `UPDATE … WHERE digest = $1 AND state = 'in_flight' AND token = $2 AND <live>`; for a checkpoint, first `SELECT checkpoint … FOR UPDATE` of the holder's row (by primary key) to check that it moves forward |
//! | `abandoned` (declared in [`Capabilities`](idem_core::store::Capabilities)) | `SELECT … WHERE state = 'in_flight' AND checkpoint IS NOT NULL AND lease_deadline <= $1 AND <live> ORDER BY lease_deadline LIMIT $2`: a range of the partial index, read-only |
//! | `census` ([`CensusSupport::Exact`](idem_core::store::CensusSupport::Exact)) | `SELECT count(*) FILTER (WHERE s > 0 AND b < 0), …, count(*) FILTER (WHERE s > 0 AND b = 5), … FROM (SELECT CASE state … END AS s, CASE WHEN <expired> THEN -1 WHEN expires_at <= now + 1m THEN 0 … ELSE 5 END AS b FROM … OFFSET 0)`: one sequential scan of every row, one row of counts, bounded by the store's timeout |
//!
//! Through the [`Engine`](idem_core::Engine), that makes:
//!
//! | step | round trips |
//! |---|---|
//! | claim of a new key (`begin`) | 1 (2 with [`ClaimMode::ReadFirst`], and in [`ClaimMode::Adaptive`] while most claims find a record) |
//! | replay of a finished key, or "in progress" (`begin`) | **read-only** in every mode: no row lock, no WAL, no commit flush. 1 (a plain `SELECT` with [`ClaimMode::ReadFirst`], and in [`ClaimMode::Adaptive`] while most claims find a record; the claim CTE with [`ClaimMode::SingleStatement`]); 2 in [`ClaimMode::Adaptive`] while most claims carry new keys (the insert, which inserts nothing, then the `SELECT`) |
//! | claim over an expired record (`begin`) | 1 with [`ClaimMode::SingleStatement`], 2 reading first, 3 inserting first |
//! | takeover of a lapsed lease or retryable failure (`begin`) | the claim's statements for a live record (it reads the record), then 1 compare-and-swap |
//! | `complete`, `fail`, `extend` (heartbeat) | 1 (2 when the lease was lost meanwhile: the `SELECT` that reports the conflict) |
//! | `release` | 1 |
//! | `apply_in` in the caller's transaction | 1 (plus 1 `SELECT` only when the lease was lost); 2 for a checkpoint (a local phase) |
//! | `abandoned` (the [`Completer`](idem_core::Completer)) | 1 |
//! | `purge_expired` | 1 per batch |
//! | `census` | 1 (reads the whole table) |
//!
//! Pools built with sqlx's defaults ping every connection they hand out
//! (`test_before_acquire`): one more round trip per call, on the caller's
//! path. [`PostgresStore::pool_options`] turns that off. (sqlx 0.9 also
//! pings a connection when it goes back to the pool; that happens in a
//! background task after the call returned, off the caller's path.)
//!
//! The test `store::one_statement_per_step` (in `tests/postgres.rs`) counts
//! the statements of each step above from sqlx's own statement log.
//!
//! ## Isolation: why single statements are enough under READ COMMITTED
//!
//! The store's own statements run in autocommit, at the server's default
//! isolation, READ COMMITTED. Two facts of READ COMMITTED drive the design:
//!
//! 1. A statement's snapshot cannot see a row committed by another
//!    transaction after the statement started.
//! 2. Writes (`INSERT … ON CONFLICT`, `UPDATE`, `DELETE`, `FOR UPDATE`) do not
//!    use the snapshot to decide: they wait for a concurrent writer of the row
//!    and re-check their condition against its latest committed version.
//!
//! So every decision is made by a write, and the snapshot is only used to
//! *report* what blocked it:
//!
//! - **Claim.** If the snapshot shows a live record, that record is returned
//!   and nothing is written (the replay path is read-only). Otherwise the
//!   insert runs; the unique index settles a race between concurrent
//!   inserters (exactly one inserts), and `ON CONFLICT … DO UPDATE … WHERE
//!   <expired>` replaces an expired record but never a live one, judged on
//!   the latest version. The loser of a race whose winner committed after its
//!   snapshot gets no row at all: the live record is invisible to it (fact 1).
//!   It then runs the statement again; the new statement's snapshot shows
//!   the winner. That second round trip happens only in such races.
//! - **Read-first claim** ([`ClaimMode::ReadFirst`]). A live record in the
//!   `SELECT`'s snapshot is reported as it is (it was live during the call).
//!   Otherwise the plain `INSERT … ON CONFLICT … DO UPDATE … WHERE
//!   <expired>` decides on the latest version, as above; if a live record
//!   committed after the `SELECT` is in its way, it returns no row (and
//!   holds that row's lock until its own statement ends: only in such a
//!   race), and the store reads again.
//! - **Insert-first claim** ([`ClaimMode::Adaptive`] while most claims
//!   carry new keys). The insert runs only if its snapshot shows no row at
//!   all under the key, and `ON CONFLICT DO NOTHING` gives way to a row
//!   committed after the snapshot: it inserts only where nothing was, so it
//!   can never overwrite a record. The snapshot of a duplicate shows the
//!   row (committed before the duplicate came), so it writes nothing, locks
//!   nothing and waits for no transaction (not even the caller's, open
//!   between [`apply_in`](PostgresStore::apply_in) and its commit). If it
//!   inserted nothing, the read-first claim above reports the live record or
//!   replaces the expired one.
//! - **Compare-and-swap.** The `UPDATE` matches the expected revision on the
//!   latest version (fact 2), so of N concurrent swaps at most one wins. When
//!   it matches nothing, a `SELECT` reports the live record; being a new
//!   statement, its snapshot includes the write that beat the update. Should
//!   it still show the expected revision, the update runs again rather than
//!   report a conflict with the revision the caller expected.
//! - **Delete** and **purge** decide in the `DELETE` itself; purge re-checks
//!   expiry on the row it deletes, so a record claimed again meanwhile is
//!   never removed, and skips rows locked by other writers.
//!
//! Every statement is linearizable per key: a write takes effect at its
//! commit, and a reported record was live in a snapshot taken during the
//! call. Under `REPEATABLE READ` or `SERIALIZABLE` as the *server default*,
//! the races above surface as serialization failures; these (like deadlocks)
//! are reported as transient [`StoreError::Unavailable`](idem_core::StoreError::Unavailable).
//! The statements use prepared statements: behind PgBouncer use session
//! pooling, or transaction pooling with prepared-statement support
//! (PgBouncer ≥ 1.21).
//!
//! ## Completion inside the caller's transaction
//!
//! [`PostgresStore::apply_in`] applies a [`Transition`](idem_core::Transition)
//! prepared by [`Engine::prepare_complete`](idem_core::Engine::prepare_complete)
//! or [`Engine::prepare_fail`](idem_core::Engine::prepare_fail) on the
//! caller's connection, normally `&mut *tx` of an open transaction. It checks
//! the fencing token (not the revision, so a heartbeat meanwhile does not
//! fail it) and reports [`Error::LeaseLost`](idem_core::Error::LeaseLost) if
//! the claim is no longer held, changing nothing.
//!
//! **Rollback semantics:** if the transaction rolls back, the key is left
//! **claimed**, under the same lease, exactly as before. The holder may
//! [`release`](idem_core::Engine::release) it (a retry then runs the
//! operation at once) or let the lease lapse (a retry then takes over).
//! Either way the business write rolled back too, so the operation takes
//! effect exactly once.
//!
//! ## Multi-step operations: local phases and abandoned records
//!
//! A step of a multi-step operation whose writes live in this database is a
//! *local phase* ([`Phases`](idem_core::Phases), docs/phases.md): in the
//! caller's transaction, write its rows, then apply
//! [`Phases::prepare_local`](idem_core::Phases::prepare_local) with
//! [`PostgresStore::apply_in`]; the rows and the phase's checkpoint commit
//! together, or neither does, and a holder whose lease was taken over
//! cannot commit either (see [`PostgresStore::apply_in`] for the example).
//! After the commit, [`Phases::applied`](idem_core::Phases::applied).
//!
//! [`Store::abandoned`](idem_core::store::Store::abandoned) (for the
//! [`Completer`](idem_core::Completer)) is one range scan of a partial index
//! that holds only in-flight rows with a checkpoint: its cost grows with the
//! number of abandoned records returned (and of expired ones not purged
//! yet), not with the table.
//!
//! ## Errors
//!
//! An unreachable server, a closed or exhausted pool, a broken connection, a
//! store call over its timeout ([`PostgresStoreBuilder::with_timeout`], default
//! 10 s), and the transient SQLSTATEs (failover, shutdown, resources, lock
//! and serialization conflicts) are [`StoreError::Unavailable`](idem_core::StoreError::Unavailable),
//! with the driver's error as the source. A missing table says to run
//! `migrate()`. A record above the size limit
//! ([`PostgresStoreBuilder::with_max_record_bytes`], default 64 MiB) is
//! [`StoreError::Rejected`](idem_core::StoreError::Rejected). The full table
//! follows.
//!
//! Every error of this crate is one type, [`PostgresError`]: the store's
//! primitives return it converted to a [`StoreError`](idem_core::StoreError)
//! (it stays the source), while [`PostgresStore::connect`] and
//! [`PostgresStore::migrate`] return it as it is;
//! [`PostgresError::is_transient`] tells whether a retry can help, and `?`
//! converts it into a `StoreError` or an [`idem_core::Error`]. A bad schema or
//! table name is an [`idem_core::store::TableNameError`], as in every SQL store.
//!
//! ## Error classification
//!
//! Every sqlx error goes through one pure function (`error::classify`, and
//! `error::classify_sqlstate` for server errors, unit-tested per code) and,
//! as a [`PostgresError`], becomes [`StoreError::Unavailable`](idem_core::StoreError::Unavailable)
//! (transient: retrying later may succeed) or a permanent variant, with the
//! driver's error kept as the source. Server errors are classified by their
//! SQLSTATE.
//!
//! | driver error / SQLSTATE | meaning | class | why |
//! |---|---|---|---|
//! | `Io` | server unreachable, connection reset or closed | transient `Unavailable` | the connection is closed and the pool dials a new one |
//! | store timeout ([`PostgresStoreBuilder::with_timeout`]) | no answer in time | transient `Unavailable` | the connection is closed; the statement's effect is unknown, and every primitive is conditional |
//! | `PoolTimedOut` | every connection busy, or none could be opened | transient `Unavailable` | connections free up |
//! | `PoolClosed` | the application closed the pool | transient `Unavailable` | it closes its pool when it shuts down: the request ran nothing, and a retry elsewhere or after the restart succeeds, so 503 + `Retry-After` is the right answer, not 500 |
//! | `Protocol` | unexpected bytes: a connection desynchronised or cut by a proxy | transient `Unavailable` | the connection is closed and replaced; its effect is unknown, as for a lost reply. (An authentication method sqlx does not support is also `Protocol`; it shows when the pool first connects) |
//! | `WorkerCrashed` | a driver worker died | transient `Unavailable` | the connection is replaced |
//! | `Tls` | a certificate or TLS setting refused, or TLS not built in | permanent `Generic` | the same handshake fails the same way until an operator acts; a network failure during the handshake is `Io` |
//! | `Configuration`, `InvalidArgument` | malformed URL or options | permanent `Generic` | |
//! | class `08` (08000, 08001, 08003, 08004, 08006, 08007, 08P01) | connection exception | transient `Unavailable` | a new connection may work |
//! | 40001 `serialization_failure`, 40P01 `deadlock_detected`, 40000, 40003 | a concurrent transaction won (REPEATABLE READ / SERIALIZABLE server defaults, the caller's transaction) | transient `Unavailable` | nothing was written; the same statement succeeds once the other finished |
//! | 40002 `transaction_integrity_constraint_violation` | a deferred constraint failed at commit | permanent `Generic` | |
//! | class `53` (53000, 53100 `disk_full`, 53200 `out_of_memory`, 53300 `too_many_connections`, 53400) | insufficient resources | transient `Unavailable` | resources free up (connections close, space is freed) |
//! | 55P03 `lock_not_available` | `lock_timeout` expired | transient `Unavailable` | the lock is released |
//! | 57014 `query_canceled` | `statement_timeout`, `pg_cancel_backend` | transient `Unavailable` | nothing was written |
//! | 57P01 `admin_shutdown`, 57P02 `crash_shutdown`, 57P03 `cannot_connect_now`, 57P05 `idle_session_timeout`, 57000 | restart, failover, recovery, an idle session closed | transient `Unavailable` | the server comes back, or the pool dials the new primary |
//! | 57P04 `database_dropped` | the database is gone | permanent `Generic` | needs an operator |
//! | 25006 `read_only_sql_transaction` | the node became a standby (failover), or the server is read-only | transient `Unavailable` | connections to the new primary succeed; a heartbeat must not stop on it |
//! | 25P03 `idle_in_transaction_session_timeout` | the caller's transaction was idle too long | transient `Unavailable` | retry the whole transaction |
//! | 58000 `system_error`, 58030 `io_error` | the server's disk or OS failed | transient `Unavailable` | nothing was written; it may pass (58P01, 58P02 missing or duplicate file: permanent `Generic`) |
//! | 72000 `snapshot_too_old` | `old_snapshot_threshold` | transient `Unavailable` | a new statement gets a new snapshot |
//! | 42P01 `undefined_table`, 3F000 `invalid_schema_name`, 42703 `undefined_column` | table, schema or column missing | permanent `Generic`, saying to run `migrate()` | the schema is missing or older than this crate |
//! | other class `42` (42601 syntax, 42501 `insufficient_privilege`, …) | a bug, or privileges missing | permanent `Generic` | grant the privileges; the same statement fails the same way |
//! | class `22` (22001, 22003, 22021, 22P02, …) | data exception: the server refuses a value of the record | permanent `Rejected` | the same record is refused again |
//! | class `54` (54000 `program_limit_exceeded`, …) | a value or row beyond a server limit | permanent `Rejected` | |
//! | class `23` (23505 `unique_violation`, 23514 `check_violation`, 23502, 23503, …) | a constraint refused the write | permanent `Generic` | the statements cannot violate the table's own constraints (`ON CONFLICT`, conditional updates): a bug, or a constraint or trigger added to the table |
//! | class `28` (28000, 28P01) | authentication failed | permanent `Generic` | fix credentials or `pg_hba.conf` |
//! | 3D000 `invalid_catalog_name` | no such database | permanent `Generic` | |
//! | XX001 `data_corrupted`, XX002 `index_corrupted` | the table's files are damaged | permanent `Corrupt` | |
//! | XX000 `internal_error`, 0A000, P0001, any other SQLSTATE, no SQLSTATE | | permanent `Generic` | |
//! | `Decode`, `ColumnDecode` | a stored value of the wrong type; a row that does not make a record | permanent `Corrupt` | never overwritten while live |
//! | `Encode` | a value could not be encoded | permanent `Rejected` | |
//! | `RowNotFound`, `ColumnNotFound`, `TypeNotFound`, other sqlx errors | a bug | permanent `Generic` | |
//!
//! What the class changes: since issue 16 the engine's heartbeat retries
//! every store error, transient or not, until the lease is lost or its
//! deadline has passed, so a failover (25006, 57P01) no longer stops a
//! heartbeat whatever its class. The class decides the caller-facing answer
//! (`idem-tower`: 503 with `Retry-After` for a transient error, 500 for a
//! permanent one, and fail-open applies only to transient errors) and the
//! completion: a transient error is retried until one lease after the
//! lease's deadline, a permanent one makes the engine store
//! `outcome-unknown` instead of the outcome. A server error leaves its
//! connection in the pool: after a failover, a pooled connection still open
//! to the old primary answers 25006 until the server closes it or the pool
//! retires it (`max_lifetime`); most failover tools restart the old primary,
//! which closes its connections (57P01).

#![forbid(unsafe_code)]

mod adaptive;
mod builder;
mod census;
mod error;
mod names;
mod row;
mod sql;
mod store;

pub use builder::{
    ClaimMode, DEFAULT_MAX_RECORD_BYTES, DEFAULT_TIMEOUT, MAX_RECORD_BYTES_CEILING,
    PostgresStoreBuilder,
};
pub use error::PostgresError;
pub use names::{MAX_TABLE_LEN, TableName};
/// The sqlx this crate is built on (its [`PgPool`](sqlx::PgPool),
/// [`PgConnection`](sqlx::PgConnection) and `Transaction`).
pub use sqlx;
pub use store::PostgresStore;

/// The store's name in errors.
pub(crate) const STORE: &str = "postgres";
