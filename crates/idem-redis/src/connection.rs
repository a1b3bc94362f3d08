//! The store's connection: dialling one server or a cluster, sending a
//! command, and replacing a connection that broke, went silent or reached a
//! replica (then sending the command once more on the fresh one).

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo, SingleNodeRoutingInfo};
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

/// A server a command can be sent to explicitly (a keyless command such as
/// `SCAN`, whose answer depends on the node).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Node {
    /// The one server of a standalone connection.
    Server,
    /// A cluster node, by the address the cluster client knows it under.
    Address {
        /// Its host, as in the cluster's slot map.
        host: String,
        /// Its port.
        port: u16,
    },
}

/// Where a command goes.
#[derive(Clone, Copy, Debug)]
enum Target<'a> {
    /// Where the driver routes it (by its key on a cluster).
    Routed,
    /// Every master: the one server, or each master of a cluster (the
    /// reply is then a map from each node's address to its reply).
    Masters,
    /// One node.
    Node(&'a Node),
}

/// A live connection of either kind. Clones share the underlying connection.
#[derive(Clone)]
enum Conn {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    /// Sends `cmd` to `target`; an error reply is an `Err`, like a transport
    /// error.
    async fn query(&mut self, cmd: &Cmd, target: Target<'_>) -> Result<Value, RedisError> {
        let reply = match (self, target) {
            (Self::Standalone(c), _) => c.req_packed_command(cmd).await,
            (Self::Cluster(c), Target::Routed) => c.req_packed_command(cmd).await,
            (Self::Cluster(c), Target::Masters) => {
                let routing = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
                c.route_command(cmd.clone(), routing).await
            }
            (Self::Cluster(c), Target::Node(Node::Address { host, port })) => {
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port: *port,
                });
                c.route_command(cmd.clone(), routing).await
            }
            (Self::Cluster(_), Target::Node(Node::Server)) => Err(RedisError::from((
                ErrorKind::Client,
                "a cluster connection has no single server",
            ))),
        }?;
        match reply {
            Value::ServerError(e) => Err(e.into()),
            reply => Ok(reply),
        }
    }
}

/// How many masters own slots, from a `CLUSTER SLOTS` reply: entries
/// `[start, end, [host, port, id, …], replicas…]`, a master counted once by
/// its id (by `host:port` where the id is missing).
fn slot_owners(reply: Value) -> Result<usize, RedisError> {
    let ranges: Vec<Vec<Value>> = redis::from_redis_value(reply)?;
    let mut owners = std::collections::HashSet::new();
    for range in ranges {
        let Some(Value::Array(master)) = range.get(2) else {
            return Err(RedisError::from((
                ErrorKind::Client,
                "unexpected CLUSTER SLOTS reply",
            )));
        };
        // Host, port and (where the server sends it) id.
        owners.insert(format!("{:?}", master.get(..3).unwrap_or(master)));
    }
    Ok(owners.len())
}

/// The replies of a command sent to every master, by node: the cluster
/// driver answers a map from `host:port` to each node's reply (an error
/// reply of any node fails the whole).
fn by_node(reply: Value) -> Result<Vec<(Node, Value)>, RedisError> {
    let unexpected = |what: &str| {
        RedisError::from((
            ErrorKind::Client,
            "unexpected fan-out reply",
            what.to_string(),
        ))
    };
    let Value::Map(entries) = reply else {
        return Err(unexpected("not a map"));
    };
    let mut out = Vec::with_capacity(entries.len());
    for (address, value) in entries {
        let address: String = redis::from_redis_value(address)?;
        let (host, port) = address
            .rsplit_once(':')
            .and_then(|(host, port)| Some((host.to_string(), port.parse().ok()?)))
            .ok_or_else(|| unexpected(&address))?;
        if let Value::ServerError(e) = value {
            return Err(e.into());
        }
        out.push((Node::Address { host, port }, value));
    }
    Ok(out)
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
    /// connection: every write is idempotent under re-sending (a write finds
    /// its own bytes),
    /// and a replica ran nothing.
    pub(crate) async fn query(&self, cmd: &Cmd) -> Result<Value, RedisError> {
        self.send(cmd, Target::Routed).await
    }

    /// The masters, to send a keyless read (`SCAN`) to each: the one
    /// server, or every master of a cluster, by the address the cluster
    /// client knows it under.
    ///
    /// # Behavior
    /// On a cluster, `PING` goes to every master the client has a
    /// connection to, and `CLUSTER SLOTS` says how many masters own slots.
    /// Fewer reached than own slots (the client skips a master it has no
    /// connection to) is a transient `ClusterConnectionNotFound`, never a
    /// silently partial list.
    pub(crate) async fn masters(&self) -> Result<Vec<Node>, RedisError> {
        if self.topology == Topology::Standalone {
            return Ok(vec![Node::Server]);
        }
        let reached = by_node(self.send(&redis::cmd("PING"), Target::Masters).await?)?;
        let mut slots = redis::cmd("CLUSTER");
        slots.arg("SLOTS");
        let owners = slot_owners(self.send(&slots, Target::Routed).await?)?;
        if reached.len() < owners {
            return Err(RedisError::from((
                ErrorKind::ClusterConnectionNotFound,
                "not every master is connected",
                format!("{} of {owners} masters reached", reached.len()),
            )));
        }
        Ok(reached.into_iter().map(|(node, _)| node).collect())
    }

    /// Sends the read-only `cmd` to `node` (one of [`masters`](Self::masters)),
    /// re-sent once as [`query`](Self::query) does.
    pub(crate) async fn query_node(&self, node: &Node, cmd: &Cmd) -> Result<Value, RedisError> {
        self.send(cmd, Target::Node(node)).await
    }

    async fn send(&self, cmd: &Cmd, target: Target<'_>) -> Result<Value, RedisError> {
        let mut resent = false;
        loop {
            let (generation, mut conn) = self.current();
            let err = match conn.query(cmd, target).await {
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
    fn fan_out_replies_name_their_nodes() {
        let reply = Value::Map(vec![
            (
                Value::BulkString(b"127.0.0.1:7000".to_vec()),
                Value::SimpleString("PONG".into()),
            ),
            (
                Value::BulkString(b"::1:7001".to_vec()),
                Value::SimpleString("PONG".into()),
            ),
        ]);
        let nodes: Vec<Node> = by_node(reply)
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(
            nodes,
            [
                Node::Address {
                    host: "127.0.0.1".into(),
                    port: 7000
                },
                Node::Address {
                    host: "::1".into(),
                    port: 7001
                },
            ]
        );
        assert!(by_node(Value::Nil).is_err());
        let bad = Value::Map(vec![(
            Value::BulkString(b"no-port".to_vec()),
            Value::SimpleString("PONG".into()),
        )]);
        assert!(by_node(bad).is_err());
    }

    #[test]
    fn slot_owners_counts_each_master_once() {
        let master = |port: i64, id: &str| {
            Value::Array(vec![
                Value::BulkString(b"127.0.0.1".to_vec()),
                Value::Int(port),
                Value::BulkString(id.as_bytes().to_vec()),
            ])
        };
        let range = |start: i64, end: i64, owner: Value| {
            Value::Array(vec![Value::Int(start), Value::Int(end), owner])
        };
        let reply = Value::Array(vec![
            range(0, 99, master(7000, "a")),
            range(100, 199, master(7001, "b")),
            range(200, 16383, master(7000, "a")),
        ]);
        assert_eq!(slot_owners(reply).unwrap(), 2);
        assert!(slot_owners(Value::Array(vec![Value::Array(vec![Value::Int(0)])])).is_err());
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
