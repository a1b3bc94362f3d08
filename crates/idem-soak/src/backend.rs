//! The soaked backends: each store opened isolated by the test kit
//! ([`Isolated`]: its own temporary file, schema or key prefix, on the
//! server the environment names), counted (how many records the store
//! holds) and cleaned up after the run.

use std::sync::Arc;
use std::time::Duration;

use idem_core::store::Store;
use idem_redis::RedisStore;
use idem_testkit::{BackendKind, Isolated, StoreUrl, Unavailable};

use crate::SoakError;

/// The longest engine TTL of a soak of `kind`.
///
/// # Behavior
/// 5 s for the memory store, 30 s for the others. The memory store lives
/// in the soak process, so its records count in the RSS the soak checks,
/// and its memory grows in steps (hash-table doubling, allocator arenas):
/// with the 24 s TTL of a 120 s run (~150k records) a one-time step of
/// ~45 MiB came at 40 s in one run and at the very end in another. A
/// short TTL keeps the store, and its steps, small (~23 MiB measured),
/// so the RSS check watches the layer and the engine rather than the
/// table's size.
pub(crate) fn max_ttl(kind: BackendKind) -> Duration {
    match kind {
        BackendKind::Memory => Duration::from_secs(5),
        _ => Duration::from_secs(30),
    }
}

/// The backends soaked when `--backends` is not given: memory, sqlite,
/// postgres, redis, and redis-cluster when `IDEM_REDIS_CLUSTER_URLS` is
/// set or every backend is `required` (it then fails when unset, as the
/// cluster test suites do).
pub(crate) fn defaults(required: bool) -> Vec<BackendKind> {
    let mut kinds = vec![
        BackendKind::Memory,
        BackendKind::Sqlite,
        BackendKind::Postgres,
        BackendKind::Redis,
    ];
    if required || idem_testkit::env::redis_cluster_urls().is_some() {
        kinds.push(BackendKind::RedisCluster);
    }
    kinds
}

/// Connections of the PostgreSQL pool.
const PG_POOL: u32 = 16;

/// How long an expired record may outlive its expiry where the soak purges:
/// the purge runs every second.
const PURGE_LAG: Duration = Duration::from_secs(2);

/// Redis's physical expiry lag after the logical one: the grace the soak
/// configures, plus a second for Redis's active expiry cycle.
const REDIS_GRACE: Duration = Duration::from_secs(2);

/// An isolated store of one backend.
pub(crate) struct Opened {
    /// The store.
    pub(crate) store: Arc<dyn Store>,
    /// What the report should say about the setup.
    pub(crate) notes: Vec<String>,
    /// How long after its logical expiry a record may still be held: the
    /// purge interval for the stores the soak purges, the expiry grace (plus
    /// Redis's own expiry lag) for Redis.
    pub(crate) expiry_lag: Duration,
    isolated: Isolated,
}

fn setup(what: &str, e: String) -> SoakError {
    SoakError::Setup {
        what: what.to_string(),
        source: e.into(),
    }
}

/// Opens an isolated store of `kind`; [`SoakError::Unreachable`] if its
/// server cannot be reached.
///
/// # Behavior
/// The server is probed first (a few seconds at most). PostgreSQL: a pool
/// of 16 connections with a 30 s acquire timeout. Redis: an expiry grace of
/// 2 s (so that the server's memory follows the soak's TTL) and the store's
/// own connection settings, not the test kit's shorter ones.
pub(crate) async fn open(kind: BackendKind) -> Result<Opened, SoakError> {
    let unreachable = |e: Unavailable| SoakError::Unreachable {
        backend: kind.name(),
        reason: e.to_string(),
    };
    kind.probe().await.map_err(unreachable)?;
    let mut url = kind.url().map_err(unreachable)?;
    let mut expiry_lag = PURGE_LAG;
    match &mut url {
        StoreUrl::Postgres(pg) => {
            pg.max_connections = Some(PG_POOL);
            pg.acquire_timeout = Some(Duration::from_secs(30));
        }
        StoreUrl::Redis(r) => {
            let defaults = RedisStore::builder();
            r.expiry_grace = Some(REDIS_GRACE);
            r.connection_timeout = Some(defaults.connection_timeout());
            r.response_timeout = Some(defaults.response_timeout());
            r.reconnect_attempts = Some(defaults.reconnect_attempts());
            expiry_lag = REDIS_GRACE + Duration::from_secs(1);
        }
        _ => {}
    }
    let isolated = Isolated::open_url(url).await.map_err(unreachable)?;
    let mut notes = vec![match kind {
        BackendKind::Memory => "records held in the soak process itself".to_string(),
        _ => format!("{} (removed afterwards)", isolated.url()),
    }];
    match kind {
        BackendKind::Sqlite => notes.push("WAL, synchronous=FULL, group commit".into()),
        BackendKind::RedisCluster => {
            if let Some(deployment) = isolated.redis_deployment() {
                let masters = deployment.masters().await.unwrap_or_default();
                notes.push(format!("{} masters: {}", masters.len(), masters.join(",")));
            }
        }
        _ => {}
    }
    Ok(Opened {
        store: isolated.store(),
        notes,
        expiry_lag,
        isolated,
    })
}

impl Opened {
    /// Removes everything the run created (temp file, schema, keys).
    pub(crate) async fn close(self) -> Result<(), SoakError> {
        drop(self.store);
        self.isolated.close().await.map_err(|e| setup("cleanup", e))
    }

    /// How many records the store holds now, expired ones not yet removed
    /// included (Redis: the keys under the prefix that Redis has not expired).
    pub(crate) async fn records(&self) -> Result<u64, SoakError> {
        self.isolated
            .records()
            .await
            .map_err(|e| setup("counting the records", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_the_command_line() {
        use clap::ValueEnum as _;
        for kind in BackendKind::value_variants() {
            let parsed = BackendKind::from_str(kind.name(), false);
            assert_eq!(parsed, Ok(*kind));
        }
        assert_eq!(defaults(true).last(), Some(&BackendKind::RedisCluster));
        assert!(defaults(false).starts_with(&[
            BackendKind::Memory,
            BackendKind::Sqlite,
            BackendKind::Postgres,
            BackendKind::Redis
        ]));
    }

    #[tokio::test]
    async fn serverless_backends_open_count_and_close() {
        for kind in [BackendKind::Memory, BackendKind::Sqlite] {
            let opened = open(kind).await.expect("no server needed");
            assert_eq!(opened.records().await.expect("counted"), 0, "{kind}");
            assert!(!opened.notes.is_empty(), "{kind}");
            assert_eq!(opened.expiry_lag, PURGE_LAG, "{kind}");
            opened.close().await.expect("cleaned up");
        }
    }
}
