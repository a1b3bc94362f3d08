//! Where the test servers are: the only place that reads
//! `IDEM_POSTGRES_URL`, `IDEM_REDIS_URL` and `IDEM_REDIS_CLUSTER_URLS`
//! (xtask sets the last one when it starts a throwaway cluster).
//!
//! An empty or blank variable counts as unset.

/// The local PostgreSQL (trust auth), when `IDEM_POSTGRES_URL` is unset.
pub const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The local Redis, when `IDEM_REDIS_URL` is unset.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

/// What to do when `IDEM_REDIS_CLUSTER_URLS` is unset.
pub const CLUSTER_UNSET: &str = "IDEM_REDIS_CLUSTER_URLS is not set: run `cargo xtask test`, which starts a throwaway 3-master Redis Cluster, or set it to the nodes of one (redis://127.0.0.1:7000,redis://127.0.0.1:7001,...)";

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// The PostgreSQL server: `IDEM_POSTGRES_URL` or [`DEFAULT_POSTGRES_URL`].
pub fn postgres_url() -> String {
    var("IDEM_POSTGRES_URL").unwrap_or_else(|| DEFAULT_POSTGRES_URL.to_string())
}

/// The standalone Redis server: `IDEM_REDIS_URL` or [`DEFAULT_REDIS_URL`].
pub fn redis_url() -> String {
    var("IDEM_REDIS_URL").unwrap_or_else(|| DEFAULT_REDIS_URL.to_string())
}

/// The Redis Cluster's seed nodes (`IDEM_REDIS_CLUSTER_URLS`,
/// comma-separated `redis://host:port`), or `None` when unset.
pub fn redis_cluster_urls() -> Option<Vec<String>> {
    let urls: Vec<String> = var("IDEM_REDIS_CLUSTER_URLS")?
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    (!urls.is_empty()).then_some(urls)
}
