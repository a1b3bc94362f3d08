//! The writer thread: owns the store's connection and runs every primitive,
//! committing concurrent calls together (group commit).

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, mpsc};

use idem_core::{Inserted, RecordKey, Revision, Swapped, Timestamp, Versioned};
use rusqlite::Connection;
use rusqlite::types::ToSql;
use tokio::sync::oneshot;

use crate::SqliteError;
use crate::row::{self, Columns, ts};
use crate::sql::Statements;

/// One store primitive, with everything it needs (owned: it crosses threads).
#[derive(Debug)]
pub(crate) enum Op {
    Insert {
        key: RecordKey,
        record: Versioned,
        now: Timestamp,
    },
    Get {
        digest: [u8; 32],
        now: Timestamp,
    },
    Cas {
        digest: [u8; 32],
        expected: Revision,
        record: Versioned,
        now: Timestamp,
    },
    Delete {
        digest: [u8; 32],
        expected: Revision,
        now: Timestamp,
    },
    Purge {
        now: Timestamp,
        limit: usize,
    },
}

impl Op {
    /// Whether the primitive may write (and so needs the write lock).
    fn writes(&self) -> bool {
        !matches!(self, Self::Get { .. })
    }
}

/// What a primitive returned.
#[derive(Debug)]
pub(crate) enum Reply {
    Inserted(Inserted),
    Got(Option<Versioned>),
    Swapped(Swapped),
    Deleted(bool),
    Purged(u64),
}

type ReplyTx = oneshot::Sender<Result<Reply, SqliteError>>;
type Job = Box<dyn FnOnce(&mut Connection) + Send>;

// Commands are moved once into the channel; boxing the large variant would
// add an allocation per call for nothing.
#[allow(clippy::large_enum_variant)]
enum Command {
    Op(Op, ReplyTx),
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
            Self::Op(op, _) => f.debug_tuple("Op").field(op).finish(),
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

    /// Runs one primitive on the writer thread.
    pub(crate) async fn call(&self, op: Op) -> Result<Reply, SqliteError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Op(op, tx))
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
            Command::Op(op, reply) => {
                let mut batch = Vec::with_capacity(8);
                batch.push((op, reply));
                while batch.len() < max_batch {
                    match rx.try_recv() {
                        Ok(Command::Op(op, reply)) => batch.push((op, reply)),
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
fn run_batch(conn: &Connection, sql: &Statements, batch: Vec<(Op, ReplyTx)>) {
    let writes = batch.iter().any(|(op, _)| op.writes());
    let begin = if writes { "BEGIN IMMEDIATE" } else { "BEGIN" };
    if let Err(e) = exec(conn, begin) {
        for (_, reply) in batch {
            let _ = reply.send(Err(e.clone()));
        }
        return;
    }
    let mut results = Vec::with_capacity(batch.len());
    let mut aborted: Option<SqliteError> = None;
    for (op, reply) in batch {
        if aborted.is_some() {
            results.push((reply, None));
            continue;
        }
        let result = execute(conn, sql, op);
        if let Err(e) = &result
            && conn.is_autocommit()
        {
            aborted = Some(e.clone());
        }
        results.push((reply, Some(result)));
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
    for (reply, result) in results {
        let result = match (&committed, result) {
            (Ok(()), Some(result)) => result,
            (Err(e), _) => Err(e.clone()),
            // Skipped primitives exist only in an aborted batch.
            (Ok(()), None) => Err(SqliteError::Closed),
        };
        let _ = reply.send(result);
    }
}

/// Runs a statement without parameters (cached).
fn exec(conn: &Connection, statement: &str) -> Result<(), SqliteError> {
    conn.prepare_cached(statement)?.execute([])?;
    Ok(())
}

/// Runs one primitive inside the batch's transaction.
fn execute(conn: &Connection, sql: &Statements, op: Op) -> Result<Reply, SqliteError> {
    match op {
        Op::Insert { key, record, now } => {
            let digest = &key.digest()[..];
            let now = ts(now);
            // Read first. An insert always runs in a `BEGIN IMMEDIATE` batch
            // (`Op::writes`), which holds the database's write lock for every
            // connection and process, so nothing can change between this
            // read and the insert below. A replay (the key is live) costs
            // one indexed read instead of an insert attempt and a read; a
            // new key, one index probe more.
            if let Some(existing) = get(conn, sql, digest, now)? {
                return Ok(Reply::Inserted(Inserted::Exists(existing)));
            }
            let cols = Columns::of(&record);
            let scope = key.scope();
            let (tenant, principal, operation, ikey) = (
                scope.tenant_id(),
                scope.principal(),
                scope.operation(),
                key.key().as_str(),
            );
            let mut params: Vec<&dyn ToSql> = Vec::with_capacity(16);
            params.extend_from_slice(&[&digest, &tenant, &principal, &operation, &ikey]);
            params.extend_from_slice(&cols.params());
            params.push(&now);
            let wrote = conn
                .prepare_cached(&sql.insert)?
                .query(params.as_slice())?
                .next()?
                .is_some();
            if wrote {
                return Ok(Reply::Inserted(Inserted::Inserted));
            }
            // The read found no live record and the insert found one that is
            // not expired either: the row's expiry cannot be read
            // consistently.
            Err(SqliteError::CorruptRow {
                table: sql.table.clone(),
                why: "the record is neither live nor expired".to_string(),
            })
        }
        Op::Get { digest, now } => get(conn, sql, &digest, ts(now)).map(Reply::Got),
        Op::Cas {
            digest,
            expected,
            record,
            now,
        } => {
            let cols = Columns::of(&record);
            let (digest, expected, now) = (&digest[..], expected.as_i64(), ts(now));
            let mut params: Vec<&dyn ToSql> = Vec::with_capacity(13);
            params.extend_from_slice(&[&digest, &expected]);
            params.extend_from_slice(&cols.params());
            params.push(&now);
            let wrote = conn
                .prepare_cached(&sql.cas)?
                .query(params.as_slice())?
                .next()?
                .is_some();
            if wrote {
                return Ok(Reply::Swapped(Swapped::Swapped));
            }
            get(conn, sql, digest, now).map(|current| Reply::Swapped(Swapped::Conflict(current)))
        }
        Op::Delete {
            digest,
            expected,
            now,
        } => {
            let deleted = conn
                .prepare_cached(&sql.delete)?
                .execute(rusqlite::params![&digest[..], expected.as_i64(), ts(now)])?;
            Ok(Reply::Deleted(deleted == 1))
        }
        Op::Purge { now, limit } => {
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            if limit == 0 {
                return Ok(Reply::Purged(0));
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
            Ok(Reply::Purged(purged as u64))
        }
    }
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
