//! The raw SQLite baselines: `INSERT … ON CONFLICT DO NOTHING` + `UPDATE …
//! WHERE key = ?1` (and `SELECT`), with the store's pragmas.
//!
//! [`WriterRaw`] has the store's architecture: one thread owns the
//! connection, callers hop to it through a channel and get their answer on a
//! oneshot, and every statement already waiting joins one transaction (group
//! commit). [`InlineRaw`] runs each statement in autocommit on the caller's
//! thread under a mutex: no hop, no batching (what the architecture costs or
//! saves).

use std::path::Path;
use std::sync::{Mutex, PoisonError, mpsc};

use async_trait::async_trait;
use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension};
use tokio::sync::oneshot;

use crate::BenchError;
use crate::backend::Raw;
use crate::scenario::raw_expiry;

const CLAIM: &str =
    "INSERT INTO raw_bench (key, value, expires_at) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING";
const COMPLETE: &str = "UPDATE raw_bench SET value = ?2, expires_at = ?3 WHERE key = ?1";
const READ: &str = "SELECT value FROM raw_bench WHERE key = ?1";

pub(crate) fn failed(e: impl std::fmt::Display) -> BenchError {
    BenchError::Failed(format!("sqlite: {e}"))
}

/// Creates the raw table on `conn` (configured like the store's connection):
/// key, value, expiry, and an expiry index like the store's.
pub(crate) fn prepare(conn: Connection) -> Result<Connection, BenchError> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS raw_bench (key BLOB PRIMARY KEY NOT NULL, value BLOB NOT NULL, expires_at INTEGER NOT NULL) STRICT;
         CREATE INDEX IF NOT EXISTS raw_bench_expires_at ON raw_bench (expires_at);",
    )
    .map_err(failed)?;
    Ok(conn)
}

#[derive(Debug)]
enum Op {
    Claim([u8; 32], Bytes, i64),
    Complete([u8; 32], Bytes, i64),
    Read([u8; 32]),
    /// `n` rows with random keys.
    Fill(u64, Bytes, i64),
    /// Moves the write-ahead log into the database (after bulk loads).
    Checkpoint,
}

const FILL: &str = "WITH RECURSIVE g(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM g WHERE i < ?1) \
     INSERT INTO raw_bench (key, value, expires_at) SELECT randomblob(32), ?2, ?3 FROM g";

/// Splits a fill of `n` rows into calls of at most 100,000 rows.
fn fill_chunks(n: u64) -> impl Iterator<Item = u64> {
    let full = n / 100_000;
    std::iter::repeat_n(100_000, usize::try_from(full).unwrap_or(0))
        .chain(Some(n % 100_000).filter(|&r| r > 0))
}

#[derive(Debug)]
enum Answer {
    Wrote(usize),
    Read(Option<usize>),
}

fn execute(conn: &Connection, op: &Op) -> rusqlite::Result<Answer> {
    match op {
        Op::Claim(key, value, exp) => conn
            .prepare_cached(CLAIM)?
            .execute(rusqlite::params![&key[..], value.as_ref(), exp])
            .map(Answer::Wrote),
        Op::Complete(key, value, exp) => conn
            .prepare_cached(COMPLETE)?
            .execute(rusqlite::params![&key[..], value.as_ref(), exp])
            .map(Answer::Wrote),
        Op::Fill(n, value, exp) => conn
            .prepare_cached(FILL)?
            .execute(rusqlite::params![
                i64::try_from(*n).unwrap_or(i64::MAX),
                value.as_ref(),
                exp
            ])
            .map(Answer::Wrote),
        Op::Checkpoint => conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .map(|()| Answer::Wrote(0)),
        Op::Read(key) => conn
            .prepare_cached(READ)?
            // The value copied out, as a caller needs it (and as the
            // PostgreSQL and Redis raw reads do).
            .query_row([&key[..]], |row| row.get::<_, Vec<u8>>(0).map(|v| v.len()))
            .optional()
            .map(Answer::Read),
    }
}

type Reply = oneshot::Sender<Result<Answer, String>>;

/// The store's architecture: a writer thread with group commit.
pub(crate) struct WriterRaw {
    tx: Mutex<mpsc::Sender<(Op, Reply)>>,
    path: std::path::PathBuf,
}

impl WriterRaw {
    /// Starts the thread over `conn`, batching up to `max_batch` statements.
    pub(crate) fn spawn(
        conn: Connection,
        path: &Path,
        max_batch: usize,
    ) -> Result<Self, BenchError> {
        let (tx, rx) = mpsc::channel::<(Op, Reply)>();
        std::thread::Builder::new()
            .name("idem-bench-raw-writer".into())
            .spawn(move || writer(conn, &rx, max_batch.max(1)))
            .map_err(failed)?;
        Ok(Self {
            tx: Mutex::new(tx),
            path: path.to_path_buf(),
        })
    }

    async fn call(&self, op: Op) -> Result<Answer, BenchError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .send((op, tx))
            .map_err(|_| BenchError::Failed("raw writer stopped".into()))?;
        rx.await
            .map_err(|_| BenchError::Failed("raw writer stopped".into()))?
            .map_err(BenchError::Failed)
    }
}

fn writer(conn: Connection, rx: &mpsc::Receiver<(Op, Reply)>, max_batch: usize) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        // A checkpoint cannot run inside a transaction: run it alone.
        if matches!(batch.first(), Some((Op::Checkpoint, _))) {
            for (op, reply) in batch {
                let _ = reply.send(execute(&conn, &op).map_err(|e| e.to_string()));
            }
            continue;
        }
        let writes = batch.iter().any(|(op, _)| !matches!(op, Op::Read(_)));
        let begin = if writes { "BEGIN IMMEDIATE" } else { "BEGIN" };
        if let Err(e) = conn.execute_batch(begin) {
            for (_, reply) in batch {
                let _ = reply.send(Err(e.to_string()));
            }
            continue;
        }
        let results: Vec<_> = batch
            .into_iter()
            .map(|(op, reply)| (execute(&conn, &op).map_err(|e| e.to_string()), reply))
            .collect();
        let committed = conn.execute_batch("COMMIT").map_err(|e| e.to_string());
        if committed.is_err() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        for (result, reply) in results {
            let _ = reply.send(match &committed {
                Ok(()) => result,
                Err(e) => Err(e.clone()),
            });
        }
    }
}

#[async_trait]
impl Raw for WriterRaw {
    async fn claim(&self, key: &[u8; 32], value: &Bytes) -> Result<bool, BenchError> {
        match self
            .call(Op::Claim(*key, value.clone(), raw_expiry()))
            .await?
        {
            Answer::Wrote(n) => Ok(n == 1),
            Answer::Read(_) => Err(BenchError::Failed("unexpected answer".into())),
        }
    }
    async fn complete(&self, key: &[u8; 32], value: &Bytes) -> Result<(), BenchError> {
        match self
            .call(Op::Complete(*key, value.clone(), raw_expiry()))
            .await?
        {
            Answer::Wrote(1) => Ok(()),
            other => Err(BenchError::Failed(format!("raw UPDATE: {other:?}"))),
        }
    }
    async fn read(&self, key: &[u8; 32]) -> Result<Option<usize>, BenchError> {
        match self.call(Op::Read(*key)).await? {
            Answer::Read(len) => Ok(len),
            Answer::Wrote(_) => Err(BenchError::Failed("unexpected answer".into())),
        }
    }
    async fn fill(&self, n: u64, value: &Bytes) -> Result<(), BenchError> {
        for chunk in fill_chunks(n) {
            self.call(Op::Fill(chunk, value.clone(), raw_expiry()))
                .await?;
        }
        self.call(Op::Checkpoint).await.map(drop)
    }
    async fn data_bytes(&self) -> Result<Option<u64>, BenchError> {
        file_bytes(&self.path).map(Some)
    }
}

/// Autocommit statements on the caller's thread, under a mutex.
pub(crate) struct InlineRaw {
    conn: Mutex<Connection>,
}

impl InlineRaw {
    pub(crate) fn new(conn: Connection) -> Self {
        Self {
            conn: Mutex::new(conn),
        }
    }

    fn call(&self, op: &Op) -> Result<Answer, BenchError> {
        let conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        execute(&conn, op).map_err(failed)
    }
}

#[async_trait]
impl Raw for InlineRaw {
    async fn claim(&self, key: &[u8; 32], value: &Bytes) -> Result<bool, BenchError> {
        match self.call(&Op::Claim(*key, value.clone(), raw_expiry()))? {
            Answer::Wrote(n) => Ok(n == 1),
            Answer::Read(_) => Err(BenchError::Failed("unexpected answer".into())),
        }
    }
    async fn complete(&self, key: &[u8; 32], value: &Bytes) -> Result<(), BenchError> {
        match self.call(&Op::Complete(*key, value.clone(), raw_expiry()))? {
            Answer::Wrote(1) => Ok(()),
            other => Err(BenchError::Failed(format!("raw UPDATE: {other:?}"))),
        }
    }
    async fn read(&self, key: &[u8; 32]) -> Result<Option<usize>, BenchError> {
        match self.call(&Op::Read(*key))? {
            Answer::Read(len) => Ok(len),
            Answer::Wrote(_) => Err(BenchError::Failed("unexpected answer".into())),
        }
    }
    async fn fill(&self, n: u64, value: &Bytes) -> Result<(), BenchError> {
        for chunk in fill_chunks(n) {
            self.call(&Op::Fill(chunk, value.clone(), raw_expiry()))?;
        }
        Ok(())
    }
    async fn data_bytes(&self) -> Result<Option<u64>, BenchError> {
        Ok(None)
    }
}

/// Bytes of the database file in use: `(page_count - freelist_count) x page_size`,
/// read on a connection of its own.
pub(crate) fn file_bytes(path: &Path) -> Result<u64, BenchError> {
    let conn = Connection::open(path).map_err(failed)?;
    let pragma = |name: &str| -> Result<i64, BenchError> {
        conn.query_row(&format!("PRAGMA {name}"), [], |r| r.get(0))
            .map_err(failed)
    };
    let used = pragma("page_count")? - pragma("freelist_count")?;
    Ok(u64::try_from(used * pragma("page_size")?).unwrap_or(0))
}
