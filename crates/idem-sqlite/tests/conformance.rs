//! The full conformance suite against `SqliteStore`, each case on its own
//! temporary database FILE (idem-testkit's isolated stores); `reopen` is a
//! second store on the same file, as a second process would open it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use async_trait::async_trait;
use idem_core::{Error, RecordKey, Transition};
use idem_sqlite::{SqliteError, SqliteStore};
use idem_testkit::runner::TransactionEnd;
use idem_testkit::{BackendKind, Factory, Hooks, Unavailable};

/// Corrupts rows through a connection of its own; applies transitions in
/// the store's own transaction.
struct Sqlite;

fn unavailable(e: impl std::fmt::Display) -> Unavailable {
    Unavailable(format!("sqlite: {e}"))
}

/// How the transaction of [`Sqlite::apply_transition`] ended, when not
/// committed.
enum NotCommitted {
    /// Rolled back as asked, after applying succeeded.
    RolledBack,
    /// Applying failed (rolled back).
    Refused(Error),
    /// The transaction itself failed.
    Sqlite(SqliteError),
}

impl From<SqliteError> for NotCommitted {
    fn from(e: SqliteError) -> Self {
        Self::Sqlite(e)
    }
}

#[async_trait]
impl Hooks for Sqlite {
    type Store = SqliteStore;

    fn can_corrupt(&self) -> bool {
        true
    }

    async fn corrupt(&self, store: &SqliteStore, key: &RecordKey) -> Result<(), Unavailable> {
        // Through a connection of its own, as a bad disk or a foreign writer
        // would: a state name idem does not know and a 3-byte fingerprint.
        let conn = store.connect().map_err(unavailable)?;
        let sql = format!(
            "UPDATE \"{}\" SET state = 'bogus', fingerprint = x'010203' WHERE digest = ?1",
            store.table()
        );
        match conn
            .execute(&sql, [&key.digest()[..]])
            .map_err(unavailable)?
        {
            1 => Ok(()),
            changed => Err(unavailable(format!("{changed} rows matched the key"))),
        }
    }

    fn can_apply_transition(&self) -> bool {
        true
    }

    /// `store.transaction` around `store.apply_in`; an error returned from
    /// the closure rolls it back.
    async fn apply_transition(
        &self,
        store: &SqliteStore,
        transition: &Transition,
        end: TransactionEnd,
    ) -> Result<Result<(), Error>, Unavailable> {
        let (s, transition) = (store.clone(), transition.clone());
        let ended = store
            .transaction(move |tx| match s.apply_in(tx, &transition) {
                Ok(()) if end == TransactionEnd::Commit => Ok(()),
                Ok(()) => Err(NotCommitted::RolledBack),
                Err(e) => Err(NotCommitted::Refused(e)),
            })
            .await;
        match ended {
            Ok(()) | Err(NotCommitted::RolledBack) => Ok(Ok(())),
            Err(NotCommitted::Refused(e)) => Ok(Err(e)),
            Err(NotCommitted::Sqlite(e)) => Err(unavailable(e)),
        }
    }
}

idem_conformance::conformance_main!(Factory::new(BackendKind::Sqlite, Sqlite));
