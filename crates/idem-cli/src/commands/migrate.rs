//! `idem migrate`: create or upgrade a SQL store's table.

use std::time::Duration;

use idemkit::StoreUrl;

use crate::cli::Migrate;
use crate::failure::{Exit, Failure};
use crate::format::out;
use crate::open::{Target, postgres_version, sqlite_table, sqlite_version};

pub(crate) async fn run(args: Migrate, timeout: Duration) -> Result<Exit, Failure> {
    let shown = StoreUrl::parse(&args.store.url)?;
    let mut url = shown.clone();
    match &mut url {
        StoreUrl::Sqlite(sqlite) => {
            let table = sqlite_table(sqlite.table.as_deref());
            let Some(path) = sqlite.path.clone() else {
                return Err(Failure::Usage(
                    "sqlite:// without a path is a temporary database: name the file to migrate"
                        .to_string(),
                ));
            };
            let before = crate::open::limit(
                "read the SQLite schema",
                timeout,
                sqlite_version(&path, &table),
            )
            .await?;
            // Opening creates or upgrades the table.
            let target = Target::open(url.clone(), url, timeout).await?;
            let after = crate::open::limit(
                "read the SQLite schema",
                timeout,
                sqlite_version(&path, &table),
            )
            .await?;
            report(&format!("table `{table}`"), before, after, &target.url);
        }
        StoreUrl::Postgres(pg) => {
            pg.migrate = false;
            let target = Target::open(url, shown, timeout).await?;
            let Some(store) = target.any().as_postgres() else {
                return Err(Failure::Usage(format!(
                    "{} did not open as a PostgreSQL store",
                    target.url
                )));
            };
            let before = target
                .limit("read the PostgreSQL schema", postgres_version(store))
                .await?;
            target
                .limit("migrate the PostgreSQL schema", async {
                    store.migrate().await.map_err(|e| Failure::Database {
                        what: format!("migrate {}", store.table()),
                        source: Box::new(e),
                    })
                })
                .await?;
            let after = target
                .limit("read the PostgreSQL schema", postgres_version(store))
                .await?;
            report(
                &format!("table {}", store.table()),
                before,
                after,
                &target.url,
            );
        }
        _ => {
            // Connect all the same: an unreachable store is still an error.
            let target = Target::open(url.clone(), url, timeout).await?;
            out!(
                "{} stores have no schema: nothing to migrate in {}",
                target.url.backend(),
                target.url
            );
        }
    }
    Ok(Exit::Done)
}

/// What the migration did to `what`, from its schema version before and after.
fn report(what: &str, before: Option<i64>, after: Option<i64>, url: &StoreUrl) {
    let after = after.map_or_else(|| "unknown".to_string(), |v| v.to_string());
    match before {
        None => out!("created {what} at schema version {after} in {url}"),
        Some(before) if before.to_string() == after => {
            out!("{what} in {url} is at schema version {after}, the current one: nothing to do")
        }
        Some(before) => {
            out!("upgraded {what} in {url} from schema version {before} to {after}")
        }
    }
}
