//! [`RedisConfig`]: key prefix, expiry grace and timeouts.

use std::time::Duration;

use crate::RedisStoreError;

/// How a [`RedisStore`](crate::RedisStore) names its keys and talks to Redis.
///
/// # Behavior
/// - [`prefix`](Self::with_prefix): every record lives at `{prefix}{digest}`
///   (the 32 bytes of `RecordKey::digest`). Default `"idem:"`; short prefixes
///   save memory on every record. A prefix may hold any
///   bytes except a Redis Cluster hash tag (`{…}` with something between the
///   braces): that would put every record in one slot, so connecting with
///   such a prefix fails with [`StoreError::Rejected`](idem_core::StoreError::Rejected).
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
/// ```
/// use std::time::Duration;
/// use idem_redis::RedisConfig;
/// let config = RedisConfig::new()
///     .with_prefix("payments:idem:")
///     .with_response_timeout(Duration::from_millis(500));
/// assert_eq!(config.prefix(), "payments:idem:");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisConfig {
    prefix: String,
    expiry_grace: Duration,
    connection_timeout: Duration,
    response_timeout: Duration,
    reconnect_attempts: usize,
}

impl RedisConfig {
    /// The default prefix.
    pub const DEFAULT_PREFIX: &'static str = "idem:";

    /// The defaults: prefix `"idem:"`, grace 60 s, timeouts 1 s / 3 s, 3 reconnect attempts.
    pub fn new() -> Self {
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

    pub(crate) fn validate(&self) -> Result<(), RedisStoreError> {
        if has_hash_tag(self.prefix.as_bytes()) {
            return Err(RedisStoreError::HashTagInPrefix {
                prefix: self.prefix.clone(),
            });
        }
        Ok(())
    }
}

impl Default for RedisConfig {
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
        assert!(RedisConfig::new().with_prefix("{x}").validate().is_err());
        assert!(RedisConfig::new().with_prefix("x:{").validate().is_ok());
    }
}
