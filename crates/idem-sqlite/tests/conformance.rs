//! The full conformance suite against `SqliteStore`, each case on its own
//! temporary database FILE; `reopen` is a second store on the same file, as a
//! second process would open it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Mutex;

use async_trait::async_trait;
use idem_conformance::{StoreFactory, Unavailable};
use idem_core::RecordKey;
use idem_sqlite::SqliteStore;
use tempfile::TempDir;

/// Opens each store in a fresh temporary directory, kept until the run ends.
#[derive(Default)]
struct Sqlite {
    dirs: Mutex<Vec<TempDir>>,
}

fn unavailable(e: impl std::fmt::Display) -> Unavailable {
    Unavailable(format!("sqlite: {e}"))
}

#[async_trait]
impl StoreFactory for Sqlite {
    type Store = SqliteStore;

    fn name(&self) -> &'static str {
        "sqlite"
    }

    async fn open(&self) -> Result<SqliteStore, Unavailable> {
        let dir = tempfile::tempdir().map_err(unavailable)?;
        let store = SqliteStore::open(dir.path().join("idem.db")).map_err(unavailable)?;
        self.dirs.lock().unwrap().push(dir);
        Ok(store)
    }

    async fn reopen(&self, store: &SqliteStore) -> Result<Option<SqliteStore>, Unavailable> {
        let path = store.path().ok_or_else(|| unavailable("in-memory store"))?;
        SqliteStore::open(path).map(Some).map_err(unavailable)
    }

    fn can_corrupt(&self) -> bool {
        true
    }

    async fn corrupt(&self, store: &SqliteStore, key: &RecordKey) -> Result<(), Unavailable> {
        // Through a connection of its own, as a bad disk or a foreign writer
        // would: a state name idem does not know and a 3-byte fingerprint.
        let conn = store.connect().map_err(unavailable)?;
        let changed = conn
            .execute(
                &format!(
                    "UPDATE \"{}\" SET state = 'bogus', fingerprint = x'010203' WHERE digest = ?1",
                    store.table()
                ),
                [&key.digest()[..]],
            )
            .map_err(unavailable)?;
        if changed == 1 {
            Ok(())
        } else {
            Err(unavailable(format!("{changed} rows matched the key")))
        }
    }
}

idem_conformance::conformance_main!(Sqlite::default());
