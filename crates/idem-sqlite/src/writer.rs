//! The writer thread: owns the store's connection and runs every primitive,
//! committing concurrent calls together (group commit). Each primitive is
//! a [`Request`] carrying a reply typed to that primitive.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, mpsc};

use idem_core::store::{InsertOutcome, Revision, SwapOutcome, Versioned};
use idem_core::{RecordKey, Timestamp};
use rusqlite::Connection;
use rusqlite::types::ToSql;
use tokio::sync::oneshot;

use crate::SqliteError;
use crate::row::{self, Columns, RECORD_COLUMN_COUNT, ts};
use crate::sql::Statements;

/// Where a primitive's answer goes: a reply typed to that primitive.
pub(crate) type Reply<T> = oneshot::Sender<Result<T, SqliteError>>;

/// One store primitive, with everything it needs (owned: it crosses
/// threads) and the reply its answer goes to.
#[derive(Debug)]
pub(crate) enum Request {
    Insert {
        key: RecordKey,
        record: Versioned,
        now: Timestamp,
        reply: Reply<InsertOutcome>,
    },
    Get {
        digest: [u8; 32],
        now: Timestamp,
        reply: Reply<Option<Versioned>>,
    },
    Cas {
        digest: [u8; 32],
        expected: Revision,
        record: Versioned,
        now: Timestamp,
        reply: Reply<SwapOutcome>,
    },
    Delete {
        digest: [u8; 32],
        expected: Revision,
        now: Timestamp,
        reply: Reply<bool>,
    },
    Purge {
        now: Timestamp,
        limit: usize,
        reply: Reply<u64>,
    },
    Abandoned {
        now: Timestamp,
        limit: usize,
        reply: Reply<Vec<Versioned>>,
    },
}

impl Request {
    /// Whether the primitive may write (and so needs the write lock).
    fn writes(&self) -> bool {
        !matches!(self, Self::Get { .. } | Self::Abandoned { .. })
    }

    /// Runs the primitive inside the batch's transaction. Its answer waits
    /// for the batch's commit.
    fn run(self, conn: &Connection, sql: &Statements) -> Ran {
        match self {
            Self::Insert {
                key,
                record,
                now,
                reply,
            } => Ran::Insert(reply, insert(conn, sql, &key, &record, now)),
            Self::Get { digest, now, reply } => Ran::Get(reply, get(conn, sql, &digest, ts(now))),
            Self::Cas {
                digest,
                expected,
                record,
                now,
                reply,
            } => Ran::Cas(reply, cas(conn, sql, &digest, expected, &record, now)),
            Self::Delete {
                digest,
                expected,
                now,
                reply,
            } => Ran::Delete(reply, delete(conn, sql, &digest, expected, now)),
            Self::Purge { now, limit, reply } => Ran::Purge(reply, purge(conn, sql, now, limit)),
            Self::Abandoned { now, limit, reply } => {
                Ran::Abandoned(reply, abandoned(conn, sql, now, limit))
            }
        }
    }

    /// Answers `e` without running: the batch failed before the primitive's
    /// turn.
    fn fail(self, e: &SqliteError) {
        match self {
            Self::Insert { reply, .. } => answer(reply, Err(e.clone())),
            Self::Get { reply, .. } => answer(reply, Err(e.clone())),
            Self::Cas { reply, .. } => answer(reply, Err(e.clone())),
            Self::Delete { reply, .. } => answer(reply, Err(e.clone())),
            Self::Purge { reply, .. } => answer(reply, Err(e.clone())),
            Self::Abandoned { reply, .. } => answer(reply, Err(e.clone())),
        }
    }
}

/// A primitive that ran, with its result, waiting for the batch's commit.
enum Ran {
    Insert(Reply<InsertOutcome>, Result<InsertOutcome, SqliteError>),
    Get(
        Reply<Option<Versioned>>,
        Result<Option<Versioned>, SqliteError>,
    ),
    Cas(Reply<SwapOutcome>, Result<SwapOutcome, SqliteError>),
    Delete(Reply<bool>, Result<bool, SqliteError>),
    Purge(Reply<u64>, Result<u64, SqliteError>),
    Abandoned(Reply<Vec<Versioned>>, Result<Vec<Versioned>, SqliteError>),
}

impl Ran {
    /// The primitive's error, if it failed.
    fn error(&self) -> Option<&SqliteError> {
        match self {
            Self::Insert(_, r) => r.as_ref().err(),
            Self::Get(_, r) => r.as_ref().err(),
            Self::Cas(_, r) => r.as_ref().err(),
            Self::Delete(_, r) => r.as_ref().err(),
            Self::Purge(_, r) => r.as_ref().err(),
            Self::Abandoned(_, r) => r.as_ref().err(),
        }
    }

    /// Sends the result if the batch committed, the batch's error otherwise.
    fn answer(self, committed: &Result<(), SqliteError>) {
        match self {
            Self::Insert(reply, r) => answer(reply, settled(r, committed)),
            Self::Get(reply, r) => answer(reply, settled(r, committed)),
            Self::Cas(reply, r) => answer(reply, settled(r, committed)),
            Self::Delete(reply, r) => answer(reply, settled(r, committed)),
            Self::Purge(reply, r) => answer(reply, settled(r, committed)),
            Self::Abandoned(reply, r) => answer(reply, settled(r, committed)),
        }
    }
}

/// A primitive's result once its batch committed (or failed to).
fn settled<T>(
    result: Result<T, SqliteError>,
    committed: &Result<(), SqliteError>,
) -> Result<T, SqliteError> {
    match committed {
        Ok(()) => result,
        Err(e) => Err(e.clone()),
    }
}

/// Sends `result` to the caller; a caller that stopped waiting is fine.
fn answer<T>(reply: Reply<T>, result: Result<T, SqliteError>) {
    let _ = reply.send(result);
}

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

// Commands are moved once into the channel; boxing the large variant would
// add an allocation per call for nothing.
#[allow(clippy::large_enum_variant)]
enum Command {
    Request(Request),
    Run(Job),
}

/// The handle of a writer thread. The thread stops when every handle is
/// dropped (after finishing what was sent), closing the connection.
#[derive(Debug)]
pub(crate) struct Writer {
    tx: mpsc::Sender<Command>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Request(request) => f.debug_tuple("Request").field(request).finish(),
            Self::Run(_) => f.write_str("Run"),
        }
    }
}

impl Writer {
    /// Starts the thread over `conn`.
    pub(crate) fn spawn(
        conn: Connection,
        sql: Arc<Statements>,
        max_batch: usize,
    ) -> Result<Self, SqliteError> {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("idem-sqlite-writer".to_string())
            .spawn(move || run(conn, &sql, &rx, max_batch.max(1)))
            .map_err(|e| {
                tracing::error!(error = %e, "idem-sqlite: cannot start the writer thread");
                SqliteError::Closed
            })?;
        Ok(Self { tx })
    }

    /// Runs one primitive on the writer thread: `request` makes it from
    /// the reply its answer goes to.
    pub(crate) async fn call<T>(
        &self,
        request: impl FnOnce(Reply<T>) -> Request,
    ) -> Result<T, SqliteError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Request(request(tx)))
            .map_err(|_| SqliteError::Closed)?;
        rx.await.map_err(|_| SqliteError::Closed)?
    }

    /// Runs `f` on the writer thread's connection, alone (between batches).
    /// A panic in `f` is resumed in the caller; an open transaction left by
    /// `f` is rolled back.
    pub(crate) async fn run<R, F>(&self, f: F) -> Result<R, SqliteError>
    where
        F: FnOnce(&mut Connection) -> R + Send + 'static,
        R: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| f(conn)));
            let _ = tx.send(result);
        });
        self.tx
            .send(Command::Run(job))
            .map_err(|_| SqliteError::Closed)?;
        match rx.await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(panic)) => std::panic::resume_unwind(panic),
            Err(_) => Err(SqliteError::Closed),
        }
    }
}

/// The thread's loop: takes the next command, and with it every primitive
/// already waiting (up to `max_batch`), runs them in one transaction and
/// commits once.
fn run(mut conn: Connection, sql: &Statements, rx: &mpsc::Receiver<Command>, max_batch: usize) {
    let mut next: Option<Command> = None;
    loop {
        let command = match next.take() {
            Some(command) => command,
            None => match rx.recv() {
                Ok(command) => command,
                Err(_) => break,
            },
        };
        match command {
            Command::Run(job) => {
                job(&mut conn);
                if !conn.is_autocommit()
                    && let Err(e) = conn.execute_batch("ROLLBACK")
                {
                    tracing::warn!(error = %e, "idem-sqlite: rollback after a job failed");
                }
            }
            Command::Request(request) => {
                let mut batch = Vec::with_capacity(8);
                batch.push(request);
                while batch.len() < max_batch {
                    match rx.try_recv() {
                        Ok(Command::Request(request)) => batch.push(request),
                        Ok(job) => {
                            next = Some(job);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                run_batch(&conn, sql, batch);
            }
        }
    }
    tracing::debug!("idem-sqlite: writer thread stopped");
}

/// Runs `batch` in one transaction (`IMMEDIATE` if any primitive may write,
/// so that several connections and processes take turns instead of failing
/// to upgrade a read lock), and replies once it committed.
///
/// # Behavior
/// - A primitive that fails on its own (a statement error that leaves the
///   transaction open, an undecodable row) gets its error; the others
///   commit.
/// - If SQLite rolled the whole transaction back (I/O error, full disk), or
///   the commit fails, every primitive of the batch gets that error, and
///   nothing of the batch took effect.
fn run_batch(conn: &Connection, sql: &Statements, batch: Vec<Request>) {
    let writes = batch.iter().any(Request::writes);
    let begin = if writes { "BEGIN IMMEDIATE" } else { "BEGIN" };
    if let Err(e) = exec(conn, begin) {
        for request in batch {
            request.fail(&e);
        }
        return;
    }
    let mut ran = Vec::with_capacity(batch.len());
    let mut skipped = Vec::new();
    let mut aborted: Option<SqliteError> = None;
    for request in batch {
        if aborted.is_some() {
            skipped.push(request);
            continue;
        }
        let done = request.run(conn, sql);
        if let Some(e) = done.error()
            && conn.is_autocommit()
        {
            aborted = Some(e.clone());
        }
        ran.push(done);
    }
    let committed = match aborted {
        Some(e) => Err(e),
        None => exec(conn, "COMMIT"),
    };
    if committed.is_err()
        && !conn.is_autocommit()
        && let Err(e) = exec(conn, "ROLLBACK")
    {
        tracing::warn!(error = %e, "idem-sqlite: rollback of a failed batch failed");
    }
    for done in ran {
        done.answer(&committed);
    }
    // Skipped primitives exist only in an aborted batch: they get its error.
    if let Err(e) = &committed {
        for request in skipped {
            request.fail(e);
        }
    }
}

/// Runs a statement without parameters (cached).
fn exec(conn: &Connection, statement: &str) -> Result<(), SqliteError> {
    conn.prepare_cached(statement)?.execute([])?;
    Ok(())
}

/// `insert_if_absent`, inside the batch's transaction.
fn insert(
    conn: &Connection,
    sql: &Statements,
    key: &RecordKey,
    record: &Versioned,
    now: Timestamp,
) -> Result<InsertOutcome, SqliteError> {
    let digest = &key.digest()[..];
    let now = ts(now);
    // Read first. An insert always runs in a `BEGIN IMMEDIATE` batch
    // (`Request::writes`), which holds the database's write lock for every
    // connection and process, so nothing can change between this read and
    // the insert below. A replay (the key is live) costs one indexed read
    // instead of an insert attempt and a read; a new key, one index probe
    // more.
    if let Some(existing) = get(conn, sql, digest, now)? {
        return Ok(InsertOutcome::Exists(existing));
    }
    let cols = Columns::of(record)?;
    let scope = key.scope();
    let (tenant, principal, operation, ikey) = (
        scope.tenant_id(),
        scope.principal(),
        scope.operation(),
        key.key().as_str(),
    );
    let mut params: Vec<&dyn ToSql> = Vec::with_capacity(6 + RECORD_COLUMN_COUNT);
    params.extend_from_slice(&[&digest, &tenant, &principal, &operation, &ikey]);
    params.extend_from_slice(&cols.params());
    params.push(&now);
    let wrote = conn
        .prepare_cached(&sql.insert)?
        .query(params.as_slice())?
        .next()?
        .is_some();
    if wrote {
        return Ok(InsertOutcome::Inserted);
    }
    // The read found no live record and the insert found one that is not
    // expired either: the row's expiry cannot be read consistently.
    Err(SqliteError::CorruptRow {
        table: sql.table.clone(),
        why: "the record is neither live nor expired".to_string(),
    })
}

/// `compare_and_swap`, inside the batch's transaction.
fn cas(
    conn: &Connection,
    sql: &Statements,
    digest: &[u8; 32],
    expected: Revision,
    record: &Versioned,
    now: Timestamp,
) -> Result<SwapOutcome, SqliteError> {
    let cols = Columns::of(record)?;
    let (digest, expected, now) = (&digest[..], expected.as_i64(), ts(now));
    let mut params: Vec<&dyn ToSql> = Vec::with_capacity(3 + RECORD_COLUMN_COUNT);
    params.extend_from_slice(&[&digest, &expected]);
    params.extend_from_slice(&cols.params());
    params.push(&now);
    let wrote = conn
        .prepare_cached(&sql.cas)?
        .query(params.as_slice())?
        .next()?
        .is_some();
    if wrote {
        return Ok(SwapOutcome::Swapped);
    }
    get(conn, sql, digest, now).map(SwapOutcome::Conflict)
}

/// `delete_if`, inside the batch's transaction.
fn delete(
    conn: &Connection,
    sql: &Statements,
    digest: &[u8; 32],
    expected: Revision,
    now: Timestamp,
) -> Result<bool, SqliteError> {
    let deleted = conn
        .prepare_cached(&sql.delete)?
        .execute(rusqlite::params![&digest[..], expected.as_i64(), ts(now)])?;
    Ok(deleted == 1)
}

/// `purge_expired`, inside the batch's transaction.
fn purge(
    conn: &Connection,
    sql: &Statements,
    now: Timestamp,
    limit: usize,
) -> Result<u64, SqliteError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    if limit == 0 {
        return Ok(0);
    }
    let now = ts(now);
    let statement = if now >= 0 {
        &sql.purge_low
    } else {
        &sql.purge_high
    };
    let purged = conn
        .prepare_cached(statement)?
        .execute(rusqlite::params![now, limit])?;
    Ok(purged as u64)
}

/// `abandoned`, inside the batch's (read) transaction: one range scan of
/// the partial index of in-flight records with a checkpoint.
fn abandoned(
    conn: &Connection,
    sql: &Statements,
    now: Timestamp,
    limit: usize,
) -> Result<Vec<Versioned>, SqliteError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    if limit == 0 {
        return Ok(Vec::new());
    }
    let now = ts(now);
    let statement = if now >= 0 {
        &sql.abandoned_low
    } else {
        &sql.abandoned_high
    };
    let mut stmt = conn.prepare_cached(statement)?;
    let mut rows = stmt.query(rusqlite::params![now, limit])?;
    let mut found = Vec::new();
    while let Some(row) = rows.next()? {
        match row::decode(row, 0, &sql.table) {
            Ok(v) => found.push(v),
            // One damaged row must not stop the completer for every other
            // key; `get` still reports it as corrupt.
            Err(e) => {
                tracing::warn!(error = %e, table = %sql.table, "idem-sqlite: skipping an abandoned record that cannot be read")
            }
        }
    }
    Ok(found)
}

/// The live record under `digest`, decoded.
pub(crate) fn get(
    conn: &Connection,
    sql: &Statements,
    digest: &[u8],
    now: i64,
) -> Result<Option<Versioned>, SqliteError> {
    let mut stmt = conn.prepare_cached(&sql.get)?;
    let mut rows = stmt.query(rusqlite::params![digest, now])?;
    rows.next()?
        .map(|row| row::decode(row, 0, &sql.table))
        .transpose()
}
