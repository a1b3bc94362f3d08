//! `postgres://…`: [`PostgresUrl`], its parameters, and opening it.

use std::fmt;
use std::time::Duration;

use crate::params::{Ctx, Param, show_duration};
use crate::url::{Server, present};
use crate::{StoreUrl, StoreUrlError};

/// `claim_mode=` of a PostgreSQL URL (`idem_postgres::ClaimMode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ClaimMode {
    /// `adaptive`: a plain insert or a plain `SELECT` first, whichever the
    /// recent traffic favours (the store's default).
    Adaptive,
    /// `single-statement`: one statement per claim.
    SingleStatement,
    /// `read-first`: a `SELECT` first, an insert only for a new key.
    ReadFirst,
}

/// `postgres://…?…`: a PostgreSQL database (see the [crate docs](crate)
/// for the parameters; `None` means the store's default).
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PostgresUrl {
    pub(crate) server: Server,
    /// `schema`: the schema of the records table.
    pub schema: Option<String>,
    /// `table`: the records table (without the schema).
    pub table: Option<String>,
    /// `timeout`: the bound on every store call.
    pub timeout: Option<Duration>,
    /// `max_record_bytes`: the largest record accepted.
    pub max_record_bytes: Option<usize>,
    /// `claim_mode`: `adaptive`, `single-statement` or `read-first`.
    pub claim_mode: Option<ClaimMode>,
    /// `max_connections`: the size of the pool (default 10).
    pub max_connections: Option<u32>,
    /// `acquire_timeout`: how long a call waits for a pooled connection,
    /// and how long opening waits for the server (default 5 s).
    pub acquire_timeout: Option<Duration>,
    /// `migrate`: whether opening creates or upgrades the table (default
    /// `true`).
    pub migrate: bool,
}

const POSTGRES_PARAMS: &str = "schema, table, timeout, max_record_bytes, claim_mode, max_connections, acquire_timeout, migrate";

/// sqlx's own parameters (sqlx-postgres `PgConnectOptions::parse_from_url`).
const POSTGRES_DRIVER: &[&str] = &[
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

impl PostgresUrl {
    pub(crate) fn parse(ctx: &Ctx, rest: &str) -> Result<Self, StoreUrlError> {
        let (server, params) = Server::parse(ctx, "postgres", rest, false)?;
        let mut url = Self {
            server,
            schema: None,
            table: None,
            timeout: None,
            max_record_bytes: None,
            claim_mode: None,
            max_connections: None,
            acquire_timeout: None,
            migrate: true,
        };
        let mut migrate = None;
        for Param { name, value, raw } in params {
            let n = name.as_str();
            match n {
                "schema" => ctx.set(&mut url.schema, n, || ctx.name(n, &value))?,
                "table" => ctx.set(&mut url.table, n, || ctx.name(n, &value))?,
                "timeout" => ctx.set(&mut url.timeout, n, || ctx.duration(n, &value))?,
                "max_record_bytes" => {
                    ctx.set(&mut url.max_record_bytes, n, || ctx.number(n, &value, 1))?
                }
                "claim_mode" => {
                    let choices = [
                        ("adaptive", ClaimMode::Adaptive),
                        ("single-statement", ClaimMode::SingleStatement),
                        ("read-first", ClaimMode::ReadFirst),
                    ];
                    ctx.set(&mut url.claim_mode, n, || ctx.choice(n, &value, &choices))?;
                }
                "max_connections" => {
                    ctx.set(&mut url.max_connections, n, || ctx.number(n, &value, 1))?
                }
                "acquire_timeout" => {
                    ctx.set(&mut url.acquire_timeout, n, || ctx.duration(n, &value))?
                }
                "migrate" => ctx.set(&mut migrate, n, || ctx.boolean(n, &value))?,
                _ if POSTGRES_DRIVER.contains(&n) || n.starts_with("options[") => {
                    url.server.passthrough.push(raw);
                }
                _ => return Err(ctx.unknown("postgres", n, POSTGRES_PARAMS)),
            }
        }
        url.migrate = migrate.unwrap_or(true);
        Ok(url)
    }

    /// The URL for the driver (sqlx): the server, database and driver
    /// parameters, without idem's. **Holds the password**: never log it.
    pub fn connection_url(&self) -> String {
        self.server.url(&self.server.hosts, false)
    }

    pub(crate) fn params(&self) -> Vec<(&'static str, String)> {
        present([
            ("schema", self.schema.clone()),
            ("table", self.table.clone()),
            ("timeout", self.timeout.map(show_duration)),
            (
                "max_record_bytes",
                self.max_record_bytes.map(|n| n.to_string()),
            ),
            (
                "claim_mode",
                self.claim_mode.map(|m| match m {
                    ClaimMode::Adaptive => "adaptive".to_string(),
                    ClaimMode::SingleStatement => "single-statement".to_string(),
                    ClaimMode::ReadFirst => "read-first".to_string(),
                }),
            ),
            (
                "max_connections",
                self.max_connections.map(|n| n.to_string()),
            ),
            ("acquire_timeout", self.acquire_timeout.map(show_duration)),
            ("migrate", (!self.migrate).then(|| "false".to_string())),
        ])
    }
}

impl fmt::Debug for PostgresUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&StoreUrl::Postgres(self.clone()), f)
    }
}

#[cfg(feature = "postgres")]
pub(crate) use open::open;

#[cfg(feature = "postgres")]
mod open {
    use std::str::FromStr;
    use std::time::Duration;

    use idem_postgres::sqlx::Connection;
    use idem_postgres::sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions};
    use idem_postgres::{ClaimMode, PostgresStore, PostgresStoreBuilder as B, TableName};

    use crate::open::{AnyStore, Opened, Optionally, failed, refused};
    use crate::{OpenError, PostgresUrl, StoreUrl};

    /// How long opening waits for the server unless `acquire_timeout` says.
    const DEFAULT_ACQUIRE: Duration = Duration::from_secs(5);

    #[derive(Debug, thiserror::Error)]
    #[error("no answer within {0:?}")]
    struct TimedOut(Duration);

    pub(crate) async fn open(url: &StoreUrl, u: &PostgresUrl) -> Result<Opened, OpenError> {
        let default = TableName::default();
        let schema = u.schema.as_deref().unwrap_or(default.schema());
        // Schema first, with the default table, so that an error names the
        // parameter at fault.
        TableName::new(schema, default.table()).map_err(|e| refused(url, "schema", e))?;
        let table = TableName::new(schema, u.table.as_deref().unwrap_or(default.table()))
            .map_err(|e| refused(url, "table", e))?;
        let options =
            PgConnectOptions::from_str(&u.connection_url()).map_err(|e| failed(url, false, e))?;
        let acquire = u.acquire_timeout.unwrap_or(DEFAULT_ACQUIRE);
        // One direct connection first: it reports the real cause (refused,
        // unknown host, bad role), where a pool would only time out.
        match tokio::time::timeout(acquire, PgConnection::connect_with(&options)).await {
            Ok(Ok(conn)) => {
                let _ = conn.close().await;
            }
            Ok(Err(e)) => return Err(failed(url, true, e)),
            Err(_) => return Err(failed(url, true, TimedOut(acquire))),
        }
        let pool = PostgresStore::pool_options()
            .acquire_timeout(acquire)
            .optionally(u.max_connections, PgPoolOptions::max_connections);
        let claim_mode = u.claim_mode.map(|mode| match mode {
            crate::ClaimMode::ReadFirst => ClaimMode::ReadFirst,
            crate::ClaimMode::SingleStatement => ClaimMode::SingleStatement,
            crate::ClaimMode::Adaptive => ClaimMode::Adaptive,
        });
        let builder = PostgresStore::builder()
            .with_table(table)
            .optionally(u.timeout, |b, timeout| b.with_timeout(Some(timeout)))
            .optionally(u.max_record_bytes, B::with_max_record_bytes)
            .optionally(claim_mode, B::with_claim_mode);
        let store = builder.open(pool.connect_lazy_with(options));
        if u.migrate {
            store
                .migrate()
                .await
                .map_err(|e| failed(url, e.is_transient(), e))?;
        }
        Ok(Opened::new(AnyStore::Postgres(store)))
    }
}
