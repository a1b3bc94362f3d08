//! `redis://…` and `redis+cluster://…`: [`RedisUrl`], its parameters, and
//! opening it.

use std::fmt;
use std::time::Duration;

use crate::params::{Ctx, Param, show_duration};
use crate::url::{Server, present};
use crate::{StoreUrl, StoreUrlError};

/// `redis://…?…` or `redis+cluster://…?…`: a Redis server or cluster (see
/// the [crate docs](crate) for the parameters; `None` means the store's
/// default).
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisUrl {
    pub(crate) server: Server,
    pub(crate) cluster: bool,
    /// `prefix`: the key prefix of the records.
    pub prefix: Option<String>,
    /// `expiry_grace`: how long after its logical expiry Redis may drop a record.
    pub expiry_grace: Option<Duration>,
    /// `connection_timeout`: the bound on dialling.
    pub connection_timeout: Option<Duration>,
    /// `response_timeout`: the bound on every command.
    pub response_timeout: Option<Duration>,
    /// `reconnect_attempts`: re-dials of a lost standalone connection.
    pub reconnect_attempts: Option<usize>,
}

const REDIS_PARAMS: &str =
    "prefix, expiry_grace, connection_timeout, response_timeout, reconnect_attempts";

/// The redis crate's own parameter (TCP URLs).
const REDIS_DRIVER: &[&str] = &["protocol"];

impl RedisUrl {
    pub(crate) fn parse(
        ctx: &Ctx,
        scheme: &str,
        rest: &str,
        cluster: bool,
    ) -> Result<Self, StoreUrlError> {
        let (server, params) = Server::parse(ctx, scheme, rest, true)?;
        if !cluster && server.hosts.contains(',') {
            return Err(ctx.malformed(
                "several hosts: use redis+cluster://host:port,host:port for a Redis Cluster",
            ));
        }
        let mut url = Self {
            server,
            cluster,
            prefix: None,
            expiry_grace: None,
            connection_timeout: None,
            response_timeout: None,
            reconnect_attempts: None,
        };
        for Param { name, value, raw } in params {
            let n = name.as_str();
            match n {
                // Any bytes (the store refuses a cluster hash tag itself).
                "prefix" => ctx.set(&mut url.prefix, n, || Ok(value))?,
                "expiry_grace" => ctx.set(&mut url.expiry_grace, n, || ctx.duration(n, &value))?,
                "connection_timeout" => {
                    ctx.set(&mut url.connection_timeout, n, || ctx.duration(n, &value))?
                }
                "response_timeout" => {
                    ctx.set(&mut url.response_timeout, n, || ctx.duration(n, &value))?
                }
                "reconnect_attempts" => {
                    ctx.set(&mut url.reconnect_attempts, n, || ctx.number(n, &value, 0))?
                }
                _ if REDIS_DRIVER.contains(&n) => url.server.passthrough.push(raw),
                _ => {
                    let backend = if cluster { "redis-cluster" } else { "redis" };
                    return Err(ctx.unknown(backend, n, REDIS_PARAMS));
                }
            }
        }
        Ok(url)
    }

    /// Whether this is a Redis Cluster (`redis+cluster://`).
    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    /// The URL of each node given, for the driver (one for a standalone
    /// server). **Hold the password**: never log them.
    pub fn node_urls(&self) -> Vec<String> {
        self.server
            .hosts
            .split(',')
            .map(|host| self.server.url(host, false))
            .collect()
    }

    pub(crate) fn params(&self) -> Vec<(&'static str, String)> {
        present([
            ("prefix", self.prefix.clone()),
            ("expiry_grace", self.expiry_grace.map(show_duration)),
            (
                "connection_timeout",
                self.connection_timeout.map(show_duration),
            ),
            ("response_timeout", self.response_timeout.map(show_duration)),
            (
                "reconnect_attempts",
                self.reconnect_attempts.map(|n| n.to_string()),
            ),
        ])
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&StoreUrl::Redis(self.clone()), f)
    }
}

#[cfg(feature = "redis")]
pub(crate) use open::open;

#[cfg(feature = "redis")]
mod open {
    use idem_redis::{RedisStore, RedisStoreBuilder as B};

    use crate::open::{AnyStore, Opened, Optionally, failed};
    use crate::{OpenError, RedisUrl, StoreUrl};

    pub(crate) async fn open(url: &StoreUrl, u: &RedisUrl) -> Result<Opened, OpenError> {
        let builder = RedisStore::builder()
            .optionally(u.prefix.clone(), B::with_prefix)
            .optionally(u.expiry_grace, B::with_expiry_grace)
            .optionally(u.connection_timeout, B::with_connection_timeout)
            .optionally(u.response_timeout, B::with_response_timeout)
            .optionally(u.reconnect_attempts, B::with_reconnect_attempts);
        let nodes = u.node_urls();
        let connected = if u.is_cluster() {
            builder.connect_cluster(&nodes).await
        } else {
            builder
                .connect(nodes.first().map_or("", String::as_str))
                .await
        };
        let store = connected.map_err(|e| failed(url, e.is_transient(), e))?;
        Ok(Opened::new(AnyStore::Redis(store)))
    }
}
