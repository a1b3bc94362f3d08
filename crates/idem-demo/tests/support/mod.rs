//! What the demo's server test targets share: the demo's store inside an
//! isolated one (idem-testkit), and failing a test with a libtest message.
#![allow(dead_code)]

use std::path::Path;

use idem_demo::BackendOptions;
use idem_testkit::{BackendKind, Isolated, StoreUrl};
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
