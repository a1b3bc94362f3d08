//! What the demo's server test targets share: the demo's store inside an
//! isolated one (idem-testkit), failing a test with a libtest message, and
//! (in `child`) starting `idem-demo` as a child process.
#![allow(dead_code)]

use std::fmt;
use std::path::Path;

use idem_core::store::State;
use idem_core::{Clock, RecordKey, SystemClock, Timestamp};
use idem_demo::BackendOptions;
use idem_postgres::sqlx::{self, AssertSqlSafe};
use idem_testkit::{AnyStore, BackendKind, Isolated, StoreUrl};
use libtest_mimic::Failed;

/// The backends the demo's servers are tested on.
pub(crate) const BACKENDS: [BackendKind; 3] = [
    BackendKind::Sqlite,
    BackendKind::Postgres,
    BackendKind::Redis,
];

/// The demo's `--store` URL for `isolated`'s server (**with any password:
/// never print it**), and the options that put the demo's records, and with
/// SQL its ledger, in `isolated`'s place (its file, schema or key prefix,
/// removed with it); a Redis ledger is the SQLite file `ledger`.
pub(crate) fn demo_store(isolated: &Isolated, ledger: &Path) -> (String, BackendOptions) {
    let place = isolated.place();
    let url = match isolated.url() {
        StoreUrl::Postgres(pg) => pg.connection_url(),
        StoreUrl::Redis(r) => r.node_urls().remove(0),
        _ => format!("sqlite://{place}"),
    };
    let options = BackendOptions {
        pg_schema: place.clone(),
        redis_prefix: place,
        ledger: Some(ledger.to_path_buf()),
        ..BackendOptions::default()
    };
    (url, options)
}

/// libtest's default number of test threads.
pub(crate) fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// Fails the test with `result`'s message.
pub(crate) fn passed(result: Result<(), Failed>) {
    if let Err(e) = result {
        panic!("{}", e.message().unwrap_or("failed"));
    }
}

pub(crate) mod child;

/// The `idem-demo serve` options that put the demo's records, and with SQL
/// its ledger, in `isolated`'s place (see [`demo_store`]; **the URL may
/// hold a password: never print them**).
pub(crate) fn store_args(isolated: &Isolated, ledger: &Path) -> Vec<String> {
    let (store, options) = demo_store(isolated, ledger);
    vec![
        "--store".into(),
        store,
        "--pg-schema".into(),
        options.pg_schema,
        "--pg-max-connections".into(),
        "8".into(),
        "--redis-prefix".into(),
        options.redis_prefix,
        "--ledger".into(),
        options.ledger.unwrap_or_default().display().to_string(),
    ]
}

/// (records in flight whose lease has lapsed, records in flight at all),
/// read from the store itself: every row of the SQL tables, and the
/// records of `keys` (every key the clients used) in Redis.
pub(crate) async fn in_flight_records(
    isolated: &Isolated,
    keys: &[RecordKey],
) -> Result<(u64, u64), Failed> {
    // (in flight past the lease at `now`, in flight) in `table`.
    let sql = |table: String, now: &str| {
        format!(
            "SELECT COALESCE(SUM(CASE WHEN lease_deadline < {now} THEN 1 ELSE 0 END), 0), \
             COUNT(*) FROM {table} WHERE state = 'in_flight'"
        )
    };
    let failed = |e: &dyn fmt::Display| format!("reading the records: {e}");
    let now = i64::try_from(SystemClock.now().as_millis()).unwrap_or(i64::MAX);
    let counts: (i64, i64) = match isolated.handle() {
        AnyStore::Sqlite(store) => {
            let store = store.clone();
            let sql = sql(format!("\"{}\"", store.table()), "?1");
            tokio::task::spawn_blocking(move || {
                let conn = store.connect().map_err(|e| failed(&e))?;
                conn.query_row(&sql, [now], |r| Ok((r.get(0)?, r.get(1)?)))
                    .map_err(|e| failed(&e))
            })
            .await
            .map_err(|e| format!("{e}"))??
        }
        AnyStore::Postgres(store) => {
            sqlx::query_as(AssertSqlSafe(sql(store.table().to_string(), "$1")))
                .bind(now)
                .fetch_one(store.pool())
                .await
                .map_err(|e| failed(&e))?
        }
        _ => {
            let now = Timestamp::from_millis(now.cast_unsigned());
            let (mut stuck, mut left) = (0, 0);
            for key in keys {
                let record = isolated
                    .store()
                    .get(key, now)
                    .await
                    .map_err(|e| format!("{e}"))?;
                if let Some(v) = record
                    && let State::InFlight { lease_deadline, .. } = v.record.state
                {
                    left += 1;
                    stuck += i64::from(lease_deadline < now);
                }
            }
            (stuck, left)
        }
    };
    Ok((counts.0.cast_unsigned(), counts.1.cast_unsigned()))
}
