//! SQLite fixtures: a store over a file in a temporary directory of its own.

use idem_sqlite::SqliteStore;
use tempfile::TempDir;

/// A fresh store in `<tempdir>/idem.db` (default table and durability), and
/// the directory, which must outlive the store.
pub fn store() -> (SqliteStore, TempDir) {
    let dir = tempfile::Builder::new()
        .prefix("idem-reliability-")
        .tempdir()
        .expect("create a temporary directory");
    let store = SqliteStore::open(dir.path().join("idem.db")).expect("open the SQLite store");
    (store, dir)
}

/// A raw connection to `store`'s file (busy timeout set like the store's),
/// for writing or reading rows behind the store's back.
pub fn raw(store: &SqliteStore) -> rusqlite::Connection {
    store
        .connect()
        .expect("a second connection to the SQLite file")
}
