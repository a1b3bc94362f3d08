//! # idem-sqlite
//!
//! The SQLite [`Store`](idem_core::store::Store) for **idem**, and its zero-setup
//! default: durable idempotency in one file, no server. Several tasks,
//! several [`SqliteStore`] instances and several processes may share the
//! file. SQLite is bundled (rusqlite `bundled`): nothing to install.
//!
//! ```
//! use idem_core::{Engine, Executed, Fingerprint, IdempotencyKey, Scope};
//! use idem_sqlite::SqliteStore;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let store = SqliteStore::open(dir.path().join("idem.db"))?; // creates the file and the table
//! let engine = Engine::new(store);
//!
//! let scope = Scope::tenant("acme").with_operation("payments.create");
//! let key = IdempotencyKey::parse("8e03978e-40d5-43e8-bc93-6894a57f9324")?;
//! let request = Fingerprint::of(br#"{"amount":1000,"currency":"EUR"}"#);
//! let charge = || async { String::from("ch_1") }; // the side effect
//!
//! let first = engine.execute(&scope, &key, request, charge).await?;
//! let retry = engine.execute(&scope, &key, request, charge).await?;
//! assert_eq!(first, Executed::Fresh("ch_1".to_string()));
//! assert_eq!(retry, Executed::Replayed("ch_1".to_string()));
//! # Ok(()) }
//! ```
//!
//! ## Durability
//!
//! The file is in WAL mode. [`Durability`] picks `PRAGMA synchronous`:
//!
//! | setting | survives | cost |
//! |---|---|---|
//! | [`Durability::Full`] (**default**) | process crash, OS crash, power loss | one `fsync` of the WAL per commit |
//! | [`Durability::Normal`] | process crash | the last commits may be lost on OS crash or power loss |
//!
//! The default is `Full` because a completion that is lost makes the next
//! retry run the side effect again: the one thing idem exists to prevent.
//! `Normal` is a sound choice when the side effect is written to the same
//! database file in the same transaction as the record (see below): both are
//! then lost together or kept together. The writer commits concurrent calls
//! together (group commit), so `Full` costs one `fsync` per *batch* of calls,
//! not per call.
//!
//! ## Architecture: one writer thread, group commit
//!
//! Each store owns one connection, on a dedicated thread fed by a channel.
//! Every primitive is sent there and answered through a oneshot channel
//! typed to that primitive's result, so
//! the async runtime never blocks on SQLite: the happy path is one hop to the
//! writer thread per primitive. The thread takes the first waiting call and
//! every call already queued behind it (up to
//! [`SqliteStoreBuilder::with_max_batch`], default 64), runs them in one
//! `BEGIN IMMEDIATE` transaction, one after another, commits once, and then
//! answers them all. Statements are prepared once per connection and
//! cached.
//!
//! SQLite allows one writer at a time, so more connections only add lock
//! hand-offs (SQLite's busy handler sleeps while it waits); group commit
//! turns contention into batching instead. The measurements that chose
//! this design (against one commit per call and `spawn_blocking` over one
//! or several connections) are in docs/benchmarks.md ("SQLite: the writer
//! thread"); use `cargo xtask bench` for current numbers.
//!
//! **Page cache.** Each connection keeps up to
//! [`DEFAULT_PAGE_CACHE_BYTES`] (32 MiB) of pages in memory
//! ([`SqliteStoreBuilder::with_page_cache_bytes`]), where SQLite's own default is
//! 2 MiB: the records of about 1,500 keys with 1 KiB outcomes. Replays and
//! "in progress" answers read recent records, and a cache that holds them
//! serves those reads without a system call.
//!
//! **Several instances and processes.** Each [`SqliteStore`] has its own
//! writer connection. Every batch starts with `BEGIN IMMEDIATE`, which takes
//! the write lock before reading, so a read-modify-write never fails to
//! upgrade its lock; other connections wait for it up to the busy timeout
//! ([`DEFAULT_BUSY_TIMEOUT`], 5 s). Waiting longer than that is
//! [`StoreError::Unavailable`](idem_core::StoreError::Unavailable)
//! (transient): the call changed nothing and may be retried.
//!
//! ## Table
//!
//! [`SqliteStore::open`] creates or migrates the table itself (named by a
//! validated [`TableName`], default `idem_records`), in one `IMMEDIATE`
//! transaction, so concurrent openers take turns. Each table's schema version
//! is kept in `idem_schema`; migrations are numbered and shipped in the code,
//! and running them again changes nothing. A new database file gets
//! `PRAGMA application_id = 0x6964656d` (`"idem"`); idem refuses files of
//! other applications, and tables it did not create (see [`SqliteError`]). The
//! `user_version` pragma is left to the application.
//!
//! | column | type | |
//! |---|---|---|
//! | `digest` | `BLOB PRIMARY KEY` | [`RecordKey::digest`](idem_core::RecordKey::digest), 32 bytes |
//! | `tenant`, `principal`, `operation`, `key` | `TEXT` | the scope and the client's key, for operators |
//! | `state` | `TEXT` | [`State::name`](idem_core::store::State::name) |
//! | `fingerprint`, `token` | `BLOB` | 32 and 16 bytes ([`FencingToken::to_be_bytes`](idem_core::store::FencingToken::to_be_bytes)) |
//! | `lease_deadline` / `outcome` | `INTEGER` / `BLOB`, nullable | in flight / finished |
//! | `created_at`, `updated_at`, `expires_at` | `INTEGER` | ms of the engine's clock; index on `expires_at` |
//! | `attempts`, `revision` | `INTEGER` | ([`Revision::as_i64`](idem_core::store::Revision::as_i64)) |
//! | `checkpoint` | `BLOB`, nullable | the holder's [`Checkpoint`](idem_core::store::Checkpoint) ([`codec::encode_checkpoint`](idem_core::store::codec::encode_checkpoint)); partial index `<table>_abandoned` on `lease_deadline` of in-flight rows that have one (schema version 2) |
//!
//! The table is `STRICT`: SQLite enforces the column types. Timestamps are
//! u64 stored bit for bit, and the statements compare them as unsigned, so a
//! record expiring at the end of time stays live. A row that does not make a
//! record (unknown state, a blob of the wrong length, a missing outcome, a
//! checkpoint that does not decode, …)
//! is [`StoreError::Corrupt`](idem_core::StoreError::Corrupt), never a panic,
//! and is never overwritten while it is live.
//!
//! | primitive | statements, inside the batch's transaction |
//! |---|---|
//! | `insert_if_absent` | `SELECT` the live record (a replay stops here); only when there is none, `INSERT … ON CONFLICT (digest) DO UPDATE … WHERE <expired> RETURNING 1` |
//! | `get` | `SELECT … WHERE digest = ? AND <live>` |
//! | `compare_and_swap` | `UPDATE … WHERE digest = ? AND revision = ? AND <live> RETURNING 1`; only on a conflict, `SELECT` the live record |
//! | `delete_if` | `DELETE … WHERE digest = ? AND revision = ? AND <live>` |
//! | `purge_expired` | `DELETE … WHERE rowid IN (SELECT rowid … WHERE <expired, via the index> LIMIT ?)` |
//! | [`apply_in`](SqliteStore::apply_in) | `UPDATE … WHERE digest = ? AND state = 'in_flight' AND token = ? AND <live>`; for a checkpoint, first `SELECT checkpoint` of the holder's row (by primary key) to check that it moves forward |
//! | `abandoned` (declared in [`Capabilities`](idem_core::store::Capabilities)) | `SELECT … WHERE state = 'in_flight' AND checkpoint IS NOT NULL AND lease_deadline <= ? AND <live> ORDER BY lease_deadline LIMIT ?`: a range of the partial index `<table>_abandoned`, in a read transaction (no write lock) |
//! | `census` ([`CensusSupport::Exact`](idem_core::store::CensusSupport::Exact)) | not in a batch: alone on the writer thread between batches, in the statement's own read transaction (no write lock: other connections and processes keep writing; this store's other calls wait). One `SELECT COALESCE(SUM(s > 0 AND b < 0), 0), …, COALESCE(SUM(s > 0 AND b = 5), 0), … FROM (SELECT CASE state … END AS s, CASE WHEN <expired> THEN -1 WHEN expires_at <= now + 1m THEN 0 … ELSE 5 END AS b FROM … LIMIT -1)`: one pass over every row, no sort, no index; rows of an unknown state are counted as `unreadable` and logged |
//!
//! ## Expiry
//!
//! A record with `expires_at <= now` (the engine's `now`) is absent for every
//! primitive, whether or not it is still stored. [`purge_expired`](idem_core::store::Store::purge_expired)
//! deletes up to `limit` of them per call, through the expiry index;
//! [`SqliteStore::spawn_purger`] runs it in the background.
//!
//! ## Completion inside your transaction
//!
//! Keep your business tables in the same file, and the business write and
//! the idempotency record commit together, or not at all:
//!
//! ```
//! use idem_core::{Begin, Engine, Fingerprint, IdempotencyKey, Outcome, Scope};
//! use idem_sqlite::{SqliteError, SqliteStore};
//!
//! type BoxError = Box<dyn std::error::Error + Send + Sync>;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), BoxError> {
//! let dir = tempfile::tempdir()?;
//! let store = SqliteStore::open(dir.path().join("app.db"))?;
//! store
//!     .transaction(|tx| -> Result<(), SqliteError> {
//!         Ok(tx.execute_batch("CREATE TABLE payments (key TEXT, cents INTEGER)")?)
//!     })
//!     .await?;
//! let engine = Engine::new(store.clone());
//!
//! let scope = Scope::tenant("acme").with_operation("payments.create");
//! let key = IdempotencyKey::parse("pay-1")?;
//! match engine.begin(&scope, &key, Fingerprint::of(b"1000 EUR")).await? {
//!     Begin::Proceed(lease) => {
//!         let done = engine.prepare_complete(&lease, Outcome::new(&b"payment 1"[..]))?;
//!         let (s, k) = (store.clone(), key.to_string());
//!         let committed = store
//!             .transaction(move |tx| -> Result<(), BoxError> {
//!                 tx.execute("INSERT INTO payments VALUES (?1, 1000)", [&k])?;
//!                 s.apply_in(tx, &done)?; // LeaseLost: everything rolls back
//!                 Ok(())
//!             })
//!             .await;
//!         if committed.is_err() {
//!             engine.release(&lease).await?; // nothing was paid: let a retry run now
//!         }
//!     }
//!     Begin::Replay(replay) => println!("replayed: {:?}", replay.outcome),
//!     Begin::InProgress { retry_after } => println!("409, retry after {retry_after:?}"),
//!     Begin::Mismatch(_) => println!("422"),
//! }
//! # Ok(()) }
//! ```
//!
//! [`SqliteStore::transaction`] runs the closure on the store's own
//! connection (no lock contention with the store). With your own connection
//! to the same file ([`SqliteStore::connect`], or any rusqlite connection with
//! a busy timeout), begin the transaction with
//! `TransactionBehavior::Immediate` and call [`SqliteStore::apply_in`] (or
//! [`apply_transition`] for the default table) on it before committing.
//!
//! `apply_in` checks the fencing token, not the revision, so a heartbeat
//! meanwhile does not fail it. If the transaction rolls back, the key is left
//! claimed under the same lease: [`release`](idem_core::Engine::release) it
//! so that a retry runs at once (or let the lease lapse). Either way the
//! business write rolled back too, so the operation takes effect once. The
//! complete program is `examples/transactional.rs`.
//!
//! ## Multi-step operations: local phases and abandoned records
//!
//! A step of a multi-step operation whose writes live in this database is a
//! *local phase* ([`Phases`](idem_core::Phases), docs/phases.md): inside
//! [`SqliteStore::transaction`], write its rows, then apply
//! [`Phases::prepare_local`](idem_core::Phases::prepare_local) with
//! [`SqliteStore::apply_in`]; the rows and the phase's checkpoint commit
//! together, or neither does, and a holder whose lease was taken over cannot
//! commit either (see [`SqliteStore::apply_in`] for the example). After the
//! commit, [`Phases::applied`](idem_core::Phases::applied).
//!
//! [`Store::abandoned`](idem_core::store::Store::abandoned) (for the
//! [`Completer`](idem_core::Completer)) is one range scan of the partial
//! index `<table>_abandoned`, which holds only in-flight records that carry a
//! checkpoint: its cost grows with the number of abandoned records returned
//! (and of expired ones the purger has not removed yet), not with the
//! table.
//!
//! ## Error classification
//!
//! Every rusqlite error goes through one pure function (`error::classify`,
//! by the extended result code, unit-tested per code) and becomes
//! [`StoreError::Unavailable`](idem_core::StoreError::Unavailable)
//! (transient: retrying later may succeed; [`SqliteError::is_transient`]) or
//! a permanent variant, with the driver's error kept as the source. Every
//! error of this crate is one type, [`SqliteError`]; a bad table name is an
//! [`idem_core::store::TableNameError`] (the same as every SQL store's), which `?`
//! turns into [`SqliteError::InvalidTableName`].
//!
//! | driver error / code | meaning | class | why |
//! |---|---|---|---|
//! | `SQLITE_BUSY` (and `_RECOVERY`, `_SNAPSHOT`, `_TIMEOUT`), `SQLITE_LOCKED` | another connection or process held the lock past the busy timeout | transient `Unavailable` | nothing was written; the lock is released |
//! | `SQLITE_IOERR` (`_WRITE`, `_FSYNC`, `_SHORT_READ`, …) | the OS failed a read, write or sync | transient `Unavailable` | SQLite rolled the batch back; the file is intact, and a passing fault (NFS, a full queue) may clear |
//! | `SQLITE_IOERR_CORRUPTFS`, `SQLITE_IOERR_DATA` | the file system, or a checksum, found damaged pages | permanent `Corrupt` | |
//! | `SQLITE_FULL` | disk (or quota) full | transient `Unavailable` | nothing was written and the file is intact; the operator (or log rotation, the purger) frees space, and a heartbeat or completion retried within the lease then succeeds. Only a `max_page_count` the store never sets would make it permanent |
//! | `SQLITE_NOMEM`, `SQLITE_INTERRUPT`, `SQLITE_PROTOCOL`, `SQLITE_SCHEMA`, `SQLITE_ABORT` | out of memory; interrupted; WAL lock race; schema changed under a prepared statement; statement aborted by a rollback | transient `Unavailable` | nothing of the statement took effect; the same call succeeds later |
//! | `SQLITE_READONLY_RECOVERY`, `_CANTLOCK`, `_ROLLBACK` | a WAL or hot journal another connection must recover first | transient `Unavailable` | the next writer recovers it |
//! | `SQLITE_READONLY`, `_DIRECTORY`, `_CANTINIT`, `_DBMOVED` | file or directory not writable; the file was moved or deleted under the open connection | permanent `Generic` | needs an operator (permissions, restore the file and reopen the store) |
//! | `SQLITE_CANTOPEN` when opening | the path cannot be opened (missing directory, permissions, a directory) | permanent `Generic` | the same path fails the same way |
//! | `SQLITE_CANTOPEN` on a statement | a journal, WAL or temporary file cannot be opened: usually out of file descriptors | transient `Unavailable` | descriptors free up |
//! | `SQLITE_CORRUPT` (`_INDEX`, `_SEQUENCE`, …), `SQLITE_NOTADB` | damaged or foreign file | permanent `Corrupt` ([`SqliteError::NotADatabase`] when opening) | |
//! | `SQLITE_TOOBIG`, [`SqliteError::TooLarge`] | a value above SQLite's or the store's limit | permanent `Rejected` | the same record is refused again |
//! | `SQLITE_CONSTRAINT_TRIGGER`, `_COMMITHOOK`, `_FUNCTION` | an application's trigger, commit hook or function refused the write | permanent `Rejected` | the application's rule refuses it again |
//! | other `SQLITE_CONSTRAINT` (`_PRIMARYKEY`, `_UNIQUE`, `_NOTNULL`, `_CHECK`, `_DATATYPE`, `_FOREIGNKEY`) | a constraint violated | permanent `Generic` | the statements cannot violate the table's own constraints (`ON CONFLICT`, conditional updates, `STRICT` types): a bug, or a change made to the table |
//! | `SQLITE_ERROR`, `_MISUSE`, `_RANGE`, `_MISMATCH`, `_PERM`, `_AUTH`, `_INTERNAL`, other codes | SQL error (a dropped table), API misuse, denied | permanent `Generic` | |
//! | stored value of the wrong type or range (`FromSqlConversionFailure`, `InvalidColumnType`, `IntegralValueOutOfRange`, `Utf8Error`), [`SqliteError::CorruptRow`] | a row that does not make a record | permanent `Corrupt` | never overwritten while live |
//! | `ToSqlConversionFailure` | a value that cannot be bound | permanent `Rejected` | |
//! | [`SqliteError::ForeignDatabase`], [`ForeignTable`](SqliteError::ForeignTable), [`SchemaTooNew`](SqliteError::SchemaTooNew), [`InvalidTableName`](SqliteError::InvalidTableName) | the file or table is not idem's, or is newer | permanent `Rejected` | |
//! | [`SqliteError::Closed`], [`NoRuntime`](SqliteError::NoRuntime), [`InMemory`](SqliteError::InMemory), other rusqlite errors | the writer thread stopped; misuse | permanent `Generic` | |
//!
//! What the class changes: since issue 16 the engine's heartbeat retries
//! every store error, transient or not, until the lease is lost or its
//! deadline has passed, so the class does not stop a heartbeat. It decides
//! the caller-facing answer (`idem-tower`: 503 with `Retry-After` for a
//! transient error, 500 for a permanent one, and fail-open applies only to
//! transient errors) and the completion: a transient error is retried until
//! one lease after the lease's deadline, a permanent one makes the engine
//! store `outcome-unknown` instead of the outcome.
#![forbid(unsafe_code)]

mod builder;
mod census;
mod error;
mod purger;
mod row;
mod schema;
mod sql;
mod store;
mod writer;

pub use builder::{
    DEFAULT_BUSY_TIMEOUT, DEFAULT_MAX_BATCH, DEFAULT_MAX_RECORD_BYTES, DEFAULT_PAGE_CACHE_BYTES,
    Durability, SqliteStoreBuilder,
};
pub use error::SqliteError;
pub use purger::Purger;
/// The rusqlite this crate is built on (its `Connection` and `Transaction`).
pub use rusqlite;
pub use schema::{MAX_TABLE_LEN, SCHEMA_VERSION, TableName};
pub use store::{SqliteStore, apply_transition};

/// The store's name in errors.
pub(crate) const STORE: &str = "sqlite";
