//! The store's connection: dialling one server or a cluster, sending a
//! command, and replacing a connection that broke, went silent or reached a
//! replica (then sending the command once more on the fresh one).

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Client, Cmd, ErrorKind, RedisError, ServerErrorKind, Value};

use crate::RedisStoreBuilder;

/// Whether a store talks to one Redis server or to a Redis Cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Topology {
    /// One server (or a primary behind a stable address), through a
    /// reconnecting multiplexed connection.
    Standalone,
    /// A Redis Cluster, through the `redis` crate's async cluster client.
    Cluster,
}

/// A live connection of either kind. Clones share the underlying connection.
#[derive(Clone)]
enum Conn {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    /// Sends `cmd`; an error reply is an `Err`, like a transport error.
    async fn query(&mut self, cmd: &Cmd) -> Result<Value, RedisError> {
        let reply = match self {
            Self::Standalone(c) => c.req_packed_command(cmd).await,
            Self::Cluster(c) => c.req_packed_command(cmd).await,
        }?;
        match reply {
            Value::ServerError(e) => Err(e.into()),
            reply => Ok(reply),
        }
    }
}

/// What it takes to dial a fresh connection (after a timeout).
enum Dialer {
    Standalone {
        client: Client,
        config: ConnectionManagerConfig,
    },
    Cluster {
        client: ClusterClient,
        connection_timeout: Duration,
        response_timeout: Duration,
    },
}

impl Dialer {
    fn cluster_config(connection_timeout: Duration, response_timeout: Duration) -> ClusterConfig {
        ClusterConfig::new()
            .set_connection_timeout(connection_timeout)
            .set_response_timeout(response_timeout)
    }

    /// A connection that dials on first use.
    fn lazy(&self) -> Result<Conn, RedisError> {
        match self {
            Self::Standalone { client, config } => Ok(Conn::Standalone(
                ConnectionManager::new_lazy_with_config(client.clone(), config.clone())?,
            )),
            Self::Cluster {
                client,
                connection_timeout,
                response_timeout,
            } => Ok(Conn::Cluster(
                client.get_pending_async_connection_with_config(Self::cluster_config(
                    *connection_timeout,
                    *response_timeout,
                )),
            )),
        }
    }
}

/// The connection in use, and how many times it was replaced.
struct Current {
    generation: u64,
    conn: Conn,
}

/// The store's connection to one server or a cluster, replaced by a fresh
/// one when a call finds it broken, silent or on a replica.
pub(crate) struct Connection {
    /// The store's name, for logs.
    name: &'static str,
    topology: Topology,
    dialer: Dialer,
    current: Mutex<Current>,
}

impl Connection {
    /// Dials one server through `client` (re-dialling up to the configured
    /// attempts).
    pub(crate) async fn standalone(
        name: &'static str,
        client: Client,
        config: &RedisStoreBuilder,
    ) -> Result<Self, RedisError> {
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connection_timeout()))
            .set_response_timeout(Some(config.response_timeout()))
            .set_number_of_retries(config.reconnect_attempts())
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(1));
        let manager =
            ConnectionManager::new_with_config(client.clone(), manager_config.clone()).await?;
        Ok(Self::new(
            name,
            Topology::Standalone,
            Dialer::Standalone {
                client,
                config: manager_config,
            },
            Conn::Standalone(manager),
        ))
    }

    /// Connects to a cluster through `client`; `config`'s timeouts replace
    /// the client's.
    pub(crate) async fn cluster(
        name: &'static str,
        client: ClusterClient,
        config: &RedisStoreBuilder,
    ) -> Result<Self, RedisError> {
        let conn = client
            .get_async_connection_with_config(Dialer::cluster_config(
                config.connection_timeout(),
                config.response_timeout(),
            ))
            .await?;
        Ok(Self::new(
            name,
            Topology::Cluster,
            Dialer::Cluster {
                client,
                connection_timeout: config.connection_timeout(),
                response_timeout: config.response_timeout(),
            },
            Conn::Cluster(conn),
        ))
    }

    fn new(name: &'static str, topology: Topology, dialer: Dialer, conn: Conn) -> Self {
        Self {
            name,
            topology,
            dialer,
            current: Mutex::new(Current {
                generation: 0,
                conn,
            }),
        }
    }

    /// Standalone or cluster.
    pub(crate) fn topology(&self) -> Topology {
        self.topology
    }

    /// Sends one command. If the connection broke, the call timed out, or
    /// (standalone) a replica answered `READONLY`/`MASTERDOWN` (the
    /// connection is then replaced), sends it once more on a fresh
    /// connection: every write is idempotent under re-sending (write ids),
    /// and a replica ran nothing.
    pub(crate) async fn query(&self, cmd: &Cmd) -> Result<Value, RedisError> {
        let mut resent = false;
        loop {
            let (generation, mut conn) = self.current();
            let err = match conn.query(cmd).await {
                Ok(value) => return Ok(value),
                Err(e) => e,
            };
            let timed_out = err.is_timeout();
            // A standalone connection answered by a replica: the primary
            // moved (a failover behind a DNS name or a proxy), and only a
            // fresh dial finds it.
            let on_replica = self.topology == Topology::Standalone && is_replica_reply(&err);
            if timed_out || on_replica {
                self.redial(generation);
            }
            if resent || !(timed_out || on_replica || is_broken_connection(&err)) {
                return Err(err);
            }
            tracing::debug!(
                store = self.name,
                error = %err,
                "idem-redis: connection lost, silent or on a replica; sending the call once more"
            );
            resent = true;
        }
    }

    fn current(&self) -> (u64, Conn) {
        let current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        (current.generation, current.conn.clone())
    }

    /// Replaces the connection of `generation` with a fresh one (once, however
    /// many calls timed out on it).
    fn redial(&self, generation: u64) {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if current.generation != generation {
            return;
        }
        match self.dialer.lazy() {
            Ok(conn) => {
                current.conn = conn;
                current.generation += 1;
                tracing::debug!(
                    store = self.name,
                    "idem-redis: redialling (a call timed out or reached a replica)"
                );
            }
            Err(e) => {
                tracing::warn!(store = self.name, error = %e, "idem-redis: cannot redial")
            }
        }
    }
}

/// Whether a failed call can be sent again on a fresh connection: the old
/// connection broke (not: the server refused to be dialled).
pub(crate) fn is_broken_connection(e: &RedisError) -> bool {
    e.is_connection_dropped() && !e.is_connection_refusal()
}

/// Whether a server that answers as a replica (`READONLY` to a write,
/// `MASTERDOWN` to a read with `replica-serve-stale-data no`) sent `e`.
pub(crate) fn is_replica_reply(e: &RedisError) -> bool {
    matches!(
        e.kind(),
        ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broken_connections_are_told_from_refused_ones() {
        let io: RedisError = std::io::Error::from(std::io::ErrorKind::ConnectionReset).into();
        assert!(is_broken_connection(&io));
        let timeout: RedisError = std::io::Error::from(std::io::ErrorKind::TimedOut).into();
        assert!(timeout.is_timeout() && !is_broken_connection(&timeout));
        let refused: RedisError =
            std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into();
        assert!(!is_broken_connection(&refused));
        let response: RedisError = (ErrorKind::Client, "bad").into();
        assert!(!is_broken_connection(&response));
    }

    #[test]
    fn replica_replies_are_recognised() {
        let reply = |line: &str| {
            redis::parse_redis_value(format!("-{line}\r\n").as_bytes())
                .and_then(Value::extract_error)
                .unwrap_err()
        };
        assert!(is_replica_reply(&reply(
            "READONLY You can't write against a read only replica."
        )));
        assert!(is_replica_reply(&reply(
            "MASTERDOWN Link with MASTER is down"
        )));
        assert!(!is_replica_reply(&reply("OOM command not allowed")));
        assert!(!is_replica_reply(&reply("ERR syntax error")));
    }
}
