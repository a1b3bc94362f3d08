//! [`RedisStoreBuilder`]: key prefix, expiry grace and timeouts, and the
//! ways to connect.

use std::time::Duration;

use redis::Client;
use redis::cluster::{ClusterClient, ClusterClientBuilder};

use crate::store;
use crate::{RedisError, RedisStore, Topology};

/// How a [`RedisStore`] names its keys and talks to Redis; start with
/// [`RedisStore::builder`].
///
/// # Behavior
/// - [`prefix`](Self::with_prefix): every record lives at `{prefix}{digest}`
///   (the 32 bytes of `RecordKey::digest`). Default `"idem:"`; short prefixes
///   save memory on every record. A prefix may hold any
///   bytes except a Redis Cluster hash tag (`{…}` with something between the
///   braces): that would put every record in one slot, so connecting with
///   such a prefix fails with [`RedisError::HashTagInPrefix`]
///   ([`StoreError::Rejected`](idem_core::StoreError::Rejected) once converted).
///   Choose it once and keep it: records under another prefix are invisible.
/// - [`expiry grace`](Self::with_expiry_grace): how long after its logical
///   expiry Redis may drop a record (physical expiry); see the crate docs.
///   Default 60 s.
/// - [`connection timeout`](Self::with_connection_timeout) (default 1 s) and
///   [`response timeout`](Self::with_response_timeout) (default 3 s): a server
///   that does not answer in time gives
///   [`StoreError::Unavailable`](idem_core::StoreError::Unavailable), never a hang.
/// - [`reconnect attempts`](Self::with_reconnect_attempts) (default 3): how
///   many times a lost standalone connection is re-dialled, with exponential
///   backoff from 50 ms, before the pending call fails; the next call tries again.
///
/// - The terminal methods connect: [`connect`](Self::connect) (one server),
///   [`connect_cluster`](Self::connect_cluster) (a Redis Cluster), or
///   [`from_client`](Self::from_client) /
///   [`from_cluster_client`](Self::from_cluster_client) with a client built
///   by the caller (TLS, credentials, RESP3, …).
///
/// ```
/// use std::time::Duration;
/// use idem_redis::RedisStore;
/// let builder = RedisStore::builder()
///     .with_prefix("payments:idem:")
///     .with_response_timeout(Duration::from_millis(500));
/// assert_eq!(builder.prefix(), "payments:idem:");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisStoreBuilder {
    prefix: String,
    expiry_grace: Duration,
    connection_timeout: Duration,
    response_timeout: Duration,
    reconnect_attempts: usize,
}

impl RedisStoreBuilder {
    /// The default prefix.
    pub const DEFAULT_PREFIX: &'static str = "idem:";

    /// The defaults: prefix `"idem:"`, grace 60 s, timeouts 1 s / 3 s, 3
    /// reconnect attempts (as [`RedisStore::builder`]).
    fn new() -> Self {
        Self {
            prefix: Self::DEFAULT_PREFIX.to_string(),
            expiry_grace: Duration::from_secs(60),
            connection_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(3),
            reconnect_attempts: 3,
        }
    }

    /// Sets the key prefix.
    #[must_use]
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Sets how long after logical expiry Redis may drop a record.
    #[must_use]
    pub fn with_expiry_grace(mut self, grace: Duration) -> Self {
        self.expiry_grace = grace;
        self
    }

    /// Sets how long one connection attempt may take.
    #[must_use]
    pub fn with_connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout;
        self
    }

    /// Sets how long a reply may take.
    #[must_use]
    pub fn with_response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// Sets how many times a lost standalone connection is re-dialled before a call fails.
    #[must_use]
    pub fn with_reconnect_attempts(mut self, attempts: usize) -> Self {
        self.reconnect_attempts = attempts;
        self
    }

    /// Connects to one Redis server at `url` (`redis://[user:pass@]host:port[/db]`,
    /// `rediss://` with a TLS feature of the `redis` crate).
    ///
    /// # Behavior
    /// Dials the server (re-dialling up to the configured attempts), loads
    /// the scripts, and fails with a transient [`RedisError`] if the server
    /// cannot be reached ([`StoreError::Unavailable`] once converted),
    /// [`RedisError::HashTagInPrefix`] for a prefix with a hash tag
    /// ([`StoreError::Rejected`]), a permanent driver error for a malformed
    /// URL ([`StoreError::Generic`]).
    ///
    /// [`StoreError::Unavailable`]: idem_core::StoreError::Unavailable
    /// [`StoreError::Rejected`]: idem_core::StoreError::Rejected
    /// [`StoreError::Generic`]: idem_core::StoreError::Generic
    pub async fn connect(&self, url: &str) -> Result<RedisStore, RedisError> {
        let client = Client::open(url).map_err(|e| RedisError::driver(e, Topology::Standalone))?;
        self.from_client(client).await
    }

    /// Like [`connect`](Self::connect), with a `redis::Client` built by the
    /// caller (TLS, credentials, RESP3, …).
    pub async fn from_client(&self, client: Client) -> Result<RedisStore, RedisError> {
        store::standalone(client, self).await
    }

    /// Connects to a Redis Cluster through any of its nodes (`redis://host:port`
    /// each; the client discovers the rest and follows slot moves).
    ///
    /// # Behavior
    /// As [`connect`](Self::connect); every primitive touches one key, so no
    /// hash tags are needed and records spread over all masters. No node at
    /// all is [`RedisError::NoClusterNodes`].
    pub async fn connect_cluster<I, S>(&self, nodes: I) -> Result<RedisStore, RedisError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let nodes: Vec<String> = nodes.into_iter().map(|s| s.as_ref().to_string()).collect();
        if nodes.is_empty() {
            return Err(RedisError::NoClusterNodes);
        }
        let client = ClusterClientBuilder::new(nodes)
            .connection_timeout(self.connection_timeout)
            .response_timeout(self.response_timeout)
            .build()
            .map_err(|e| RedisError::driver(e, Topology::Cluster))?;
        self.from_cluster_client(client).await
    }

    /// Like [`connect_cluster`](Self::connect_cluster), with a `ClusterClient`
    /// built by the caller. The configured timeouts replace the client's.
    pub async fn from_cluster_client(
        &self,
        client: ClusterClient,
    ) -> Result<RedisStore, RedisError> {
        store::cluster(client, self).await
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The expiry grace.
    pub fn expiry_grace(&self) -> Duration {
        self.expiry_grace
    }

    /// The connection timeout.
    pub fn connection_timeout(&self) -> Duration {
        self.connection_timeout
    }

    /// The response timeout.
    pub fn response_timeout(&self) -> Duration {
        self.response_timeout
    }

    /// The reconnect attempts.
    pub fn reconnect_attempts(&self) -> usize {
        self.reconnect_attempts
    }

    pub(crate) fn validate(&self) -> Result<(), RedisError> {
        if has_hash_tag(self.prefix.as_bytes()) {
            return Err(RedisError::HashTagInPrefix {
                prefix: self.prefix.clone(),
            });
        }
        Ok(())
    }
}

impl Default for RedisStoreBuilder {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether `prefix` holds a whole hash tag (Redis Cluster rule: the first
/// `{`, then the first `}` after it, with at least one byte between): then
/// every key with the prefix has that tag, whatever digest follows.
fn has_hash_tag(prefix: &[u8]) -> bool {
    let Some(open) = prefix.iter().position(|&b| b == b'{') else {
        return false;
    };
    prefix[open + 1..]
        .iter()
        .position(|&b| b == b'}')
        .is_some_and(|close| close > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_tags_follow_the_cluster_rule() {
        assert!(!has_hash_tag(b"idem:"));
        assert!(has_hash_tag(b"{idem}:"));
        assert!(has_hash_tag(b"a{b}c{d}"));
        assert!(!has_hash_tag(b"{}idem"));
        assert!(!has_hash_tag(b"idem{"));
        assert!(!has_hash_tag(b"}{"));
        assert!(
            RedisStoreBuilder::new()
                .with_prefix("{x}")
                .validate()
                .is_err()
        );
        assert!(
            RedisStoreBuilder::new()
                .with_prefix("x:{")
                .validate()
                .is_ok()
        );
    }
}
