//! `sqlite://…`: [`SqliteUrl`], its parameters, and opening it.

use std::path::PathBuf;
use std::time::Duration;

use crate::StoreUrlError;
use crate::params::{Ctx, Param, show_duration};
use crate::url::present;

/// `sqlite://PATH?…`: a SQLite file (see the [crate docs](crate) for the
/// parameters; `None` means the store's default).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SqliteUrl {
    /// The database file; `None` (`sqlite://`) for a file in a new
    /// temporary directory, removed with the store.
    pub path: Option<PathBuf>,
    /// `table`: the records table.
    pub table: Option<String>,
    /// `durability`: `full` or `normal`.
    pub durability: Option<Durability>,
    /// `busy_timeout`: how long to wait for another writer's lock.
    pub busy_timeout: Option<Duration>,
    /// `max_batch`: the most primitives committed together.
    pub max_batch: Option<usize>,
    /// `max_record_bytes`: the largest record accepted.
    pub max_record_bytes: Option<usize>,
    /// `page_cache_bytes`: the page cache of each connection.
    pub page_cache_bytes: Option<usize>,
}

/// `durability=` of a SQLite URL (`idem_sqlite::Durability`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Durability {
    /// `full`: durable through power loss (the store's default).
    Full,
    /// `normal`: durable through process crashes only.
    Normal,
}

const SQLITE_PARAMS: &str =
    "table, durability, busy_timeout, max_batch, max_record_bytes, page_cache_bytes";

impl SqliteUrl {
    pub(crate) fn parse(ctx: &Ctx, rest: &str) -> Result<Self, StoreUrlError> {
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut url = Self {
            path: (!path.is_empty()).then(|| PathBuf::from(path)),
            ..Self::default()
        };
        for Param { name, value, .. } in ctx.split(query)? {
            let n = name.as_str();
            match n {
                "table" => ctx.set(&mut url.table, n, || ctx.name(n, &value))?,
                "durability" => {
                    let choices = [("full", Durability::Full), ("normal", Durability::Normal)];
                    ctx.set(&mut url.durability, n, || ctx.choice(n, &value, &choices))?;
                }
                "busy_timeout" => ctx.set(&mut url.busy_timeout, n, || ctx.duration(n, &value))?,
                "max_batch" => ctx.set(&mut url.max_batch, n, || ctx.number(n, &value, 1))?,
                "max_record_bytes" => {
                    ctx.set(&mut url.max_record_bytes, n, || ctx.number(n, &value, 1))?
                }
                "page_cache_bytes" => {
                    ctx.set(&mut url.page_cache_bytes, n, || ctx.number(n, &value, 0))?
                }
                _ => return Err(ctx.unknown("sqlite", n, SQLITE_PARAMS)),
            }
        }
        Ok(url)
    }

    pub(crate) fn params(&self) -> Vec<(&'static str, String)> {
        let number = |n: Option<usize>| n.map(|n| n.to_string());
        present([
            ("table", self.table.clone()),
            (
                "durability",
                self.durability.map(|d| match d {
                    Durability::Full => "full".to_string(),
                    Durability::Normal => "normal".to_string(),
                }),
            ),
            ("busy_timeout", self.busy_timeout.map(show_duration)),
            ("max_batch", number(self.max_batch)),
            ("max_record_bytes", number(self.max_record_bytes)),
            ("page_cache_bytes", number(self.page_cache_bytes)),
        ])
    }
}

#[cfg(feature = "sqlite")]
pub(crate) use open::open;

#[cfg(feature = "sqlite")]
mod open {
    use idem_sqlite::{Durability, SqliteStore, SqliteStoreBuilder as B, TableName};

    use crate::open::{AnyStore, Opened, Optionally, failed, refused};
    use crate::{OpenError, SqliteUrl, StoreUrl};

    pub(crate) fn open(url: &StoreUrl, u: &SqliteUrl) -> Result<Opened, OpenError> {
        let table = u.table.as_deref().map(TableName::new).transpose();
        let durability = u.durability.map(|durability| match durability {
            crate::Durability::Normal => Durability::Normal,
            _ => Durability::Full,
        });
        let builder = SqliteStore::builder()
            .optionally(table.map_err(|e| refused(url, "table", e))?, B::with_table)
            .optionally(durability, B::with_durability)
            .optionally(u.busy_timeout, B::with_busy_timeout)
            .optionally(u.max_batch, B::with_max_batch)
            .optionally(u.max_record_bytes, B::with_max_record_bytes)
            .optionally(u.page_cache_bytes, B::with_page_cache_bytes);
        let (path, temp_dir) = match &u.path {
            Some(path) => (path.clone(), None),
            None => {
                let dir = tempfile::Builder::new()
                    .prefix("idem-")
                    .tempdir()
                    .map_err(|e| failed(url, false, e))?;
                (dir.path().join("idem.db"), Some(dir))
            }
        };
        let store = builder
            .open(&path)
            .map_err(|e| failed(url, e.is_transient(), e))?;
        let mut opened = Opened::new(AnyStore::Sqlite(store));
        opened.temp_dir = temp_dir;
        Ok(opened)
    }
}
