//! Opening the store a URL names, through idemkit, without changing any
//! schema (only `idem migrate` does), and bounding every call by
//! `--timeout`.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use idem_core::store::Store;
use idemkit::postgres::PostgresStore;
use idemkit::{AnyStore, OpenError, Opened, StoreUrl};

use crate::failure::Failure;

/// A store ready for commands.
pub(crate) struct Target {
    /// The URL, as shown (password redacted by its `Display`).
    pub(crate) url: StoreUrl,
    /// The opened store.
    pub(crate) opened: Opened,
    /// The bound on every call.
    pub(crate) timeout: Duration,
}

impl Target {
    /// Opens the store at `raw` (a URL) for a command that reads or deletes
    /// records: never creates a file, a schema or a table.
    ///
    /// # Behavior
    /// - SQLite: the file must exist and hold idem's table (the URL's
    ///   `table=`) at the current schema version, else [`Failure::NoStore`]
    ///   (a newer version is idem-sqlite's error when it opens).
    /// - PostgreSQL: opened with `migrate=false`; the table must exist
    ///   (its migrations bookkeeping table is looked for), else
    ///   [`Failure::NoStore`].
    pub(crate) async fn existing(raw: &str, timeout: Duration) -> Result<Self, Failure> {
        let shown = StoreUrl::parse(raw)?;
        let mut url = shown.clone();
        match &mut url {
            StoreUrl::Sqlite(sqlite) => {
                if let Some(path) = &sqlite.path {
                    let table = sqlite_table(sqlite.table.as_deref());
                    let version = limit(
                        "read the SQLite schema",
                        timeout,
                        sqlite_version(path, &table),
                    )
                    .await?;
                    match version {
                        None => {
                            return Err(Failure::NoStore(format!(
                                "no idem table `{table}` in {} (create it with `idem migrate`)",
                                describe(path)
                            )));
                        }
                        Some(v) if v < idemkit::sqlite::SCHEMA_VERSION => {
                            return Err(Failure::NoStore(format!(
                                "idem table `{table}` in {} is at schema version {v}, this idem reads version {} (upgrade it with `idem migrate`)",
                                describe(path),
                                idemkit::sqlite::SCHEMA_VERSION
                            )));
                        }
                        Some(_) => {}
                    }
                }
            }
            StoreUrl::Postgres(pg) => pg.migrate = false,
            _ => {}
        }
        let target = Self::open(url, shown, timeout).await?;
        if let Some(pg) = target.opened.store().as_postgres()
            && target
                .limit("read the PostgreSQL schema", postgres_version(pg))
                .await?
                .is_none()
        {
            return Err(Failure::NoStore(format!(
                "no idem table {} in the database of {} (create it with `idem migrate`)",
                pg.table(),
                target.url
            )));
        }
        Ok(target)
    }

    /// Opens `url` as it says (with `migrate=false` set by the caller for
    /// PostgreSQL; SQLite creates or upgrades its table on open), showing it
    /// as `shown` (the URL as given) in messages.
    pub(crate) async fn open(
        url: StoreUrl,
        shown: StoreUrl,
        timeout: Duration,
    ) -> Result<Self, Failure> {
        let what = format!("open the store {shown}");
        let opened = limit(&what, timeout, async {
            url.open().await.map_err(|e| match e {
                OpenError::Open {
                    backend, source, ..
                } => Failure::Unopened {
                    backend,
                    url: shown.to_string(),
                    source,
                },
                other => Failure::Open(other),
            })
        })
        .await?;
        Ok(Self {
            url: shown,
            opened,
            timeout,
        })
    }

    /// The store, type-erased.
    pub(crate) fn store(&self) -> Arc<dyn Store> {
        self.opened.erased()
    }

    /// The concrete store.
    pub(crate) fn any(&self) -> &AnyStore {
        self.opened.store()
    }

    /// `fut`, bounded by `--timeout`.
    pub(crate) async fn limit<T>(
        &self,
        what: &str,
        fut: impl Future<Output = Result<T, Failure>>,
    ) -> Result<T, Failure> {
        limit(what, self.timeout, fut).await
    }

    /// A store call, bounded by `--timeout`, its error said to be `what`'s.
    pub(crate) async fn call<T>(
        &self,
        what: &str,
        fut: impl Future<Output = Result<T, idem_core::StoreError>>,
    ) -> Result<T, Failure> {
        self.limit(what, async {
            fut.await.map_err(|source| Failure::Store {
                what: what.to_string(),
                source,
            })
        })
        .await
    }
}

/// `fut`, unless it takes longer than `timeout`.
pub(crate) async fn limit<T>(
    what: &str,
    timeout: Duration,
    fut: impl Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(result) => result,
        Err(_) => Err(Failure::Timeout {
            what: what.to_string(),
            limit: timeout,
        }),
    }
}

/// The SQLite records table the URL names (idem-sqlite's default if none).
pub(crate) fn sqlite_table(table: Option<&str>) -> String {
    table.map_or_else(
        || idemkit::sqlite::TableName::default().as_str().to_string(),
        str::to_string,
    )
}

/// A path for messages.
pub(crate) fn describe(path: &Path) -> String {
    path.display().to_string()
}

/// The schema version idem-sqlite recorded for `table` in the file at
/// `path`, read without writing anything: `None` if the file does not exist
/// or holds no idem table of that name.
pub(crate) async fn sqlite_version(path: &Path, table: &str) -> Result<Option<i64>, Failure> {
    use idemkit::sqlite::rusqlite::{Connection, OpenFlags, OptionalExtension as _};
    if !path.exists() {
        return Ok(None);
    }
    let shown = describe(path);
    let path = path.to_path_buf();
    let table = table.to_string();
    let read = move || -> Result<Option<i64>, idemkit::sqlite::rusqlite::Error> {
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let bookkept: bool = conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'idem_schema')",
            [],
            |row| row.get(0),
        )?;
        if !bookkept {
            return Ok(None);
        }
        conn.query_row(
            "SELECT version FROM idem_schema WHERE records_table = ?1",
            [&table],
            |row| row.get(0),
        )
        .optional()
    };
    match tokio::task::spawn_blocking(read).await {
        Ok(result) => result.map_err(|e| Failure::Database {
            what: format!("read the SQLite database {shown}"),
            source: Box::new(e),
        }),
        Err(e) => Err(Failure::Io {
            what: "read the SQLite database".to_string(),
            source: std::io::Error::other(e),
        }),
    }
}

/// The latest migration idem-postgres applied to `store`'s table (read from
/// its `<table>_migrations` bookkeeping table): `None` if the table was never
/// migrated.
pub(crate) async fn postgres_version(store: &PostgresStore) -> Result<Option<i64>, Failure> {
    use idemkit::postgres::sqlx;
    let table = store.table();
    // Validated identifiers (letters, digits, `_`): safe to quote.
    let bookkeeping = format!("\"{}\".\"{}_migrations\"", table.schema(), table.table());
    let failed = |e: sqlx::Error| Failure::Database {
        what: format!("read the migrations of {table}"),
        source: Box::new(e),
    };
    let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
        .bind(&bookkeeping)
        .fetch_one(store.pool())
        .await
        .map_err(failed)?;
    if exists.is_none() {
        return Ok(None);
    }
    let sql = format!("SELECT max(version) FROM {bookkeeping} WHERE success");
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .fetch_one(store.pool())
        .await
        .map_err(failed)
}
