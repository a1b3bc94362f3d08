//! [`RedisStore`]: the [`Store`] over standalone Redis or Redis Cluster.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use idem_core::{
    Capabilities, Inserted, RecordKey, Revision, Store, StoreError, Swapped, Timestamp, Versioned,
};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Client, Cmd, ErrorKind, RedisError, ServerErrorKind, Value};

use crate::envelope::{self, Unreadable};
use crate::error::{self, Class};
use crate::{RedisConfig, RedisStoreError};

/// The longest physical TTL set, in ms (about 2,200 years): records whose
/// logical expiry lies further out are kept that long, i.e. for good.
const MAX_PX: u64 = 1 << 46;

/// One Lua script: its source and its SHA1, computed once.
struct Lua {
    name: &'static str,
    source: &'static str,
    sha: String,
}

impl Lua {
    fn new(name: &'static str, source: &'static str) -> Self {
        Self {
            name,
            source,
            sha: redis::Script::new(source).get_hash().to_string(),
        }
    }
}

static INSERT: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        "insert_if_absent",
        concat!(include_str!("lua/head.lua"), include_str!("lua/insert.lua")),
    )
});
static CAS: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        "compare_and_swap",
        concat!(include_str!("lua/head.lua"), include_str!("lua/cas.lua")),
    )
});
static DELETE: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        "delete_if",
        concat!(include_str!("lua/head.lua"), include_str!("lua/delete.lua")),
    )
});

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

struct Current {
    generation: u64,
    conn: Conn,
}

/// Unique ids for writes: a random per-store seed and a counter, mixed.
struct WriteIds {
    seed: u64,
    counter: AtomicU64,
}

impl WriteIds {
    fn new() -> Self {
        // `RandomState` keys come from the operating system's randomness.
        let seed = std::collections::hash_map::RandomState::new()
            .hash_one((std::process::id(), std::time::SystemTime::now()));
        Self {
            seed,
            counter: AtomicU64::new(0),
        }
    }

    fn next(&self) -> u64 {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        // splitmix64: a bijection of the counter, keyed by the seed.
        let mut z = self
            .seed
            .wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

struct Inner {
    name: &'static str,
    topology: Topology,
    prefix: String,
    grace_ms: u64,
    dialer: Dialer,
    current: Mutex<Current>,
    write_ids: WriteIds,
    /// Whether `insert_if_absent` tries the native `SET … NX GET PX` first;
    /// cleared (for the life of the store) when a server refuses it (Redis
    /// before 7.0, a proxy that does not know it).
    native_insert: AtomicBool,
}

/// An idem [`Store`] in Redis: standalone or Redis Cluster, one atomic
/// server-side step per primitive.
///
/// # Behavior
/// - Each record is one Redis string at [`redis_key`](Self::redis_key) =
///   `{prefix}{digest}` (the 32 raw bytes of `RecordKey::digest`). The value
///   layout, the scripts, and how physical expiry relates to logical expiry
///   are in the crate docs.
/// - `insert_if_absent` is one native `SET key value NX GET PX ms` (the
///   Lua script only when an expired record is still in place, or on a
///   server before Redis 7.0); `compare_and_swap` and `delete_if` are each
///   one Lua script over exactly that one key, run by SHA (`EVALSHA`); after a
///   `SCRIPT FLUSH` or a server restart the script is sent again with `EVAL`
///   transparently. `get` is one `GET`. One round trip on the happy path.
/// - Every write carries a fresh write id, so a write the driver re-sends
///   after losing the reply is recognised and reported as done instead of
///   as a conflict with itself.
/// - Connection loss, timeouts and the passing server states (`OOM`,
///   `NOREPLICAS`, `READONLY`, `LOADING`, `CLUSTERDOWN`, …) are
///   [`StoreError::Unavailable`] (the table is in the crate docs, "Error
///   classification"); the connection is re-established by itself.
///   A call whose connection broke or went silent (timed out), or (standalone)
///   that a replica answered, is sent once more on a fresh connection before
///   the error is returned.
/// - Undecodable values, and values of another Redis type at a record key,
///   are [`StoreError::Corrupt`] and are never overwritten.
/// - Clones share the connection.
///
/// ```no_run
/// use idem_core::{Engine, Executed, Fingerprint, IdempotencyKey, Scope};
/// use idem_redis::{RedisConfig, RedisStore};
///
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = RedisStore::connect(
///     "redis://127.0.0.1:6379",
///     RedisConfig::new().with_prefix("payments:idem:"),
/// )
/// .await?;
/// let engine = Engine::new(store);
/// let scope = Scope::tenant("acme").with_operation("payments.create");
/// let key = IdempotencyKey::parse("8e03978e-40d5-43e8-bc93-6894a57f9324")?;
/// let request = Fingerprint::of(br#"{"amount":1000}"#);
/// let first = engine.execute(&scope, &key, request, || async { 42_u64 }).await?;
/// let again = engine.execute(&scope, &key, request, || async { 0_u64 }).await?;
/// assert_eq!(first, Executed::Fresh(42));
/// assert_eq!(again, Executed::Replayed(42));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("topology", &self.inner.topology)
            .field("prefix", &self.inner.prefix)
            .field("grace_ms", &self.inner.grace_ms)
            .finish_non_exhaustive()
    }
}

fn rejected(store: &'static str, e: RedisStoreError) -> StoreError {
    StoreError::Rejected {
        store,
        source: Box::new(e),
    }
}

/// Whether a failed call can be sent again on a fresh connection: the old
/// connection broke (not: the server refused to be dialled).
fn is_broken_connection(e: &RedisError) -> bool {
    e.is_connection_dropped() && !e.is_connection_refusal()
}

/// Whether a server that answers as a replica (`READONLY` to a write,
/// `MASTERDOWN` to a read with `replica-serve-stale-data no`) sent `e`.
fn is_replica_reply(e: &RedisError) -> bool {
    matches!(
        e.kind(),
        ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown)
    )
}

/// `PX` for a record expiring at `expires_at`, written at `now`: its remaining
/// logical life plus the grace, at least 1 ms, at most [`MAX_PX`].
fn physical_ttl_ms(expires_at: Timestamp, now: Timestamp, grace_ms: u64) -> u64 {
    expires_at
        .as_millis()
        .saturating_sub(now.as_millis())
        .saturating_add(grace_ms)
        .clamp(1, MAX_PX)
}

/// A key as `redis-cli` prints it: printable ASCII as is, other bytes as `\xNN`.
pub(crate) fn printable_key(key: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(key.len() * 2);
    for &b in key {
        if b.is_ascii_graphic() && b != b'\\' && b != b'"' {
            out.push(char::from(b));
        } else {
            // Writing to a String cannot fail.
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

/// What the native `SET … NX GET PX` of `insert_if_absent` settled.
enum Native {
    /// The answer.
    Settled(Inserted),
    /// An expired record is in place: the script replaces it (or finds what
    /// replaced it meanwhile).
    Expired,
    /// The server refuses every write for now (`OOM`, `NOREPLICAS`), even
    /// one that `NX` would skip: the script reads first, so a live record is
    /// still answered (a replay works), and only a write fails.
    WritesRefused,
    /// The server refused the command (Redis before 7.0); the driver error.
    Refused(RedisError),
}

/// What a script answered.
enum Reply {
    /// `1`: written / swapped / deleted.
    Done,
    /// `0`: absent or expired.
    Absent,
    /// The live value.
    Live(Vec<u8>),
}

impl RedisStore {
    /// Connects to one Redis server at `url` (`redis://[user:pass@]host:port[/db]`,
    /// `rediss://` with a TLS feature of the `redis` crate).
    ///
    /// # Behavior
    /// Dials the server (re-dialling up to the configured attempts), loads
    /// the scripts, and fails with [`StoreError::Unavailable`] if the server
    /// cannot be reached, [`StoreError::Rejected`] for a prefix with a hash
    /// tag, [`StoreError::Generic`] for a malformed URL.
    pub async fn connect(url: &str, config: RedisConfig) -> Result<Self, StoreError> {
        let client =
            Client::open(url).map_err(|e| error::map_err("redis", Topology::Standalone, e))?;
        Self::with_client(client, config).await
    }

    /// Like [`connect`](Self::connect), with a `redis::Client` built by the
    /// caller (TLS, credentials, RESP3, …).
    pub async fn with_client(client: Client, config: RedisConfig) -> Result<Self, StoreError> {
        const NAME: &str = "redis";
        config.validate().map_err(|e| rejected(NAME, e))?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connection_timeout()))
            .set_response_timeout(Some(config.response_timeout()))
            .set_number_of_retries(config.reconnect_attempts())
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(1));
        let manager = ConnectionManager::new_with_config(client.clone(), manager_config.clone())
            .await
            .map_err(|e| error::map_err(NAME, Topology::Standalone, e))?;
        let store = Self::assemble(
            NAME,
            Topology::Standalone,
            &config,
            Dialer::Standalone {
                client,
                config: manager_config,
            },
            Conn::Standalone(manager),
        );
        store.load_scripts().await?;
        Ok(store)
    }

    /// Connects to a Redis Cluster through any of its nodes (`redis://host:port`
    /// each; the client discovers the rest and follows slot moves).
    ///
    /// # Behavior
    /// As [`connect`](Self::connect); every primitive touches one key, so no
    /// hash tags are needed and records spread over all masters.
    pub async fn connect_cluster<I, S>(nodes: I, config: RedisConfig) -> Result<Self, StoreError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        const NAME: &str = "redis-cluster";
        let nodes: Vec<String> = nodes.into_iter().map(|s| s.as_ref().to_string()).collect();
        if nodes.is_empty() {
            return Err(rejected(NAME, RedisStoreError::NoClusterNodes));
        }
        let client = ClusterClientBuilder::new(nodes)
            .connection_timeout(config.connection_timeout())
            .response_timeout(config.response_timeout())
            .build()
            .map_err(|e| error::map_err(NAME, Topology::Cluster, e))?;
        Self::with_cluster_client(client, config).await
    }

    /// Like [`connect_cluster`](Self::connect_cluster), with a `ClusterClient`
    /// built by the caller. The configured timeouts replace the client's.
    pub async fn with_cluster_client(
        client: ClusterClient,
        config: RedisConfig,
    ) -> Result<Self, StoreError> {
        const NAME: &str = "redis-cluster";
        config.validate().map_err(|e| rejected(NAME, e))?;
        let conn = client
            .get_async_connection_with_config(Dialer::cluster_config(
                config.connection_timeout(),
                config.response_timeout(),
            ))
            .await
            .map_err(|e| error::map_err(NAME, Topology::Cluster, e))?;
        let store = Self::assemble(
            NAME,
            Topology::Cluster,
            &config,
            Dialer::Cluster {
                client,
                connection_timeout: config.connection_timeout(),
                response_timeout: config.response_timeout(),
            },
            Conn::Cluster(conn),
        );
        store.load_scripts().await?;
        Ok(store)
    }

    fn assemble(
        name: &'static str,
        topology: Topology,
        config: &RedisConfig,
        dialer: Dialer,
        conn: Conn,
    ) -> Self {
        let grace_ms = u64::try_from(config.expiry_grace().as_millis()).unwrap_or(u64::MAX);
        Self {
            inner: Arc::new(Inner {
                name,
                topology,
                prefix: config.prefix().to_string(),
                grace_ms,
                dialer,
                current: Mutex::new(Current {
                    generation: 0,
                    conn,
                }),
                write_ids: WriteIds::new(),
                native_insert: AtomicBool::new(true),
            }),
        }
    }

    /// Loads the scripts (on every node of a cluster), so that the first
    /// calls run by SHA.
    async fn load_scripts(&self) -> Result<(), StoreError> {
        for lua in [&*INSERT, &*CAS, &*DELETE] {
            let mut cmd = redis::cmd("SCRIPT");
            cmd.arg("LOAD").arg(lua.source);
            self.query(&cmd).await.map_err(|e| self.map_err(e))?;
        }
        Ok(())
    }

    /// Standalone or cluster.
    pub fn topology(&self) -> Topology {
        self.inner.topology
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The Redis key of a record: the prefix followed by the 32 bytes of
    /// [`RecordKey::digest`] (binary; see the crate docs).
    pub fn redis_key(&self, key: &RecordKey) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.inner.prefix.len() + 32);
        out.extend_from_slice(self.inner.prefix.as_bytes());
        out.extend_from_slice(key.digest());
        out
    }

    /// Checks that Redis answers (`PING`; every node of a cluster).
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.query(&redis::cmd("PING"))
            .await
            .map(drop)
            .map_err(|e| self.map_err(e))
    }

    /// The physical TTL of a record written at `now`: until its logical
    /// expiry plus the grace, at least 1 ms.
    fn px(&self, expires_at: Timestamp, now: Timestamp) -> u64 {
        physical_ttl_ms(expires_at, now, self.inner.grace_ms)
    }

    /// Maps a driver error ([`error::classify`]).
    fn map_err(&self, e: RedisError) -> StoreError {
        error::map_err(self.inner.name, self.inner.topology, e)
    }

    /// Maps a driver error of a call on `key`: as [`map_err`](Self::map_err),
    /// but a corrupt value (`WRONGTYPE`) names the key.
    fn map_key_err(&self, key: &[u8], e: RedisError) -> StoreError {
        match error::classify(&e, self.inner.topology) {
            Class::Corrupt => self.corrupt(key, e.to_string(), None),
            _ => self.map_err(e),
        }
    }

    fn connection(&self) -> (u64, Conn) {
        let current = self
            .inner
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        (current.generation, current.conn.clone())
    }

    /// Replaces the connection of `generation` with a fresh one (once, however
    /// many calls timed out on it).
    fn redial(&self, generation: u64) {
        let mut current = self
            .inner
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if current.generation != generation {
            return;
        }
        match self.inner.dialer.lazy() {
            Ok(conn) => {
                current.conn = conn;
                current.generation += 1;
                tracing::debug!(
                    store = self.inner.name,
                    "idem-redis: redialling (a call timed out or reached a replica)"
                );
            }
            Err(e) => {
                tracing::warn!(store = self.inner.name, error = %e, "idem-redis: cannot redial")
            }
        }
    }

    /// Sends one command. If the connection broke, the call timed out, or
    /// (standalone) a replica answered `READONLY`/`MASTERDOWN` (the
    /// connection is then replaced), sends it once more on a fresh
    /// connection: every write is idempotent under re-sending (write ids),
    /// and a replica ran nothing.
    async fn query(&self, cmd: &Cmd) -> Result<Value, RedisError> {
        let mut resent = false;
        loop {
            let (generation, mut conn) = self.connection();
            let err = match conn.query(cmd).await {
                Ok(value) => return Ok(value),
                Err(e) => e,
            };
            let timed_out = err.is_timeout();
            // A standalone connection answered by a replica: the primary
            // moved (a failover behind a DNS name or a proxy), and only a
            // fresh dial finds it.
            let on_replica = self.inner.topology == Topology::Standalone && is_replica_reply(&err);
            if timed_out || on_replica {
                self.redial(generation);
            }
            if resent || !(timed_out || on_replica || is_broken_connection(&err)) {
                return Err(err);
            }
            tracing::debug!(
                store = self.inner.name,
                error = %err,
                "idem-redis: connection lost, silent or on a replica; sending the call once more"
            );
            resent = true;
        }
    }

    /// Runs `lua` over `key` by SHA, falling back to `EVAL` after `NOSCRIPT`.
    async fn eval(&self, lua: &Lua, key: &[u8], args: &[&[u8]]) -> Result<Reply, StoreError> {
        let build = |verb: &str, body: &str| {
            // Sized up front: the value (1 KiB and more) is copied once.
            let data = verb.len() + body.len() + 1 + key.len();
            let data = data + args.iter().map(|a| a.len()).sum::<usize>();
            let mut cmd = Cmd::with_capacity(4 + args.len(), data);
            cmd.arg(verb).arg(body).arg(1).arg(key);
            for arg in args {
                cmd.arg(*arg);
            }
            cmd
        };
        let reply = match self.query(&build("EVALSHA", &lua.sha)).await {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                tracing::debug!(
                    script = lua.name,
                    "idem-redis: script not cached on the server; sending it again"
                );
                self.query(&build("EVAL", lua.source)).await
            }
            other => other,
        }
        .map_err(|e| self.map_key_err(key, e))?;
        match reply {
            Value::Int(1) => Ok(Reply::Done),
            Value::Int(0) => Ok(Reply::Absent),
            Value::BulkString(bytes) => Ok(Reply::Live(bytes)),
            Value::Array(items) => match items.as_slice() {
                [Value::BulkString(tag), why] if tag.as_slice() == b"corrupt" => {
                    let why = match why {
                        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                        other => format!("{other:?}"),
                    };
                    Err(self.corrupt(key, why, None))
                }
                _ => Err(self.unexpected(lua.name, &Value::Array(items))),
            },
            other => Err(self.unexpected(lua.name, &other)),
        }
    }

    /// `insert_if_absent` as one native command, `SET key value NX GET PX
    /// px` (Redis 7.0 and later): writes `value` only if the key is absent
    /// and returns what was there, atomically.
    ///
    /// - nil: nothing was there, the value is written.
    /// - a live record: nothing is written; it is the answer (or this very
    ///   call's own write, re-sent after a lost reply: then "inserted").
    /// - an expired record: nothing is written; the script must replace it,
    ///   because only the script can compare `expires_at` with `now`
    ///   atomically with the write.
    /// - `OOM` or `NOREPLICAS` (Redis refuses `SET` even where `NX` would
    ///   write nothing): the script answers; it reads first, so a live record
    ///   is still returned (a replay works while Redis is full), and only a
    ///   write fails, transient.
    /// - anything unreadable, or another Redis type: corrupt, untouched.
    async fn insert_native(
        &self,
        redis_key: &[u8],
        value: &[u8],
        px: u64,
        now: Timestamp,
    ) -> Result<Native, StoreError> {
        let mut cmd = Cmd::with_capacity(7, redis_key.len() + value.len() + 24);
        cmd.arg("SET")
            .arg(redis_key)
            .arg(value)
            .arg("NX")
            .arg("GET")
            .arg("PX")
            .arg(px);
        let reply = match self.query(&cmd).await {
            Ok(reply) => reply,
            // `ERR syntax error` from Redis 6.2 (no `NX` with `GET`) and
            // older, or a proxy's refusal of an unknown form; not the `ERR`
            // replies that carry a passing state (too many clients, …).
            Err(e)
                if e.code() == Some("ERR")
                    && error::classify(&e, self.inner.topology) == Class::Generic =>
            {
                return Ok(Native::Refused(e));
            }
            Err(e) if matches!(e.code(), Some("OOM" | "NOREPLICAS")) => {
                return Ok(Native::WritesRefused);
            }
            Err(e) => return Err(self.map_key_err(redis_key, e)),
        };
        match reply {
            Value::Nil => Ok(Native::Settled(Inserted::Inserted)),
            Value::BulkString(bytes) => {
                let head =
                    envelope::header(&bytes).map_err(|why| self.unreadable(redis_key, why))?;
                if head.expires_at <= now {
                    return Ok(Native::Expired);
                }
                if envelope::same_write(&bytes, value) {
                    return Ok(Native::Settled(Inserted::Inserted));
                }
                self.decode(redis_key, &bytes)
                    .map(|current| Native::Settled(Inserted::Exists(current)))
            }
            other => Err(self.unexpected("SET NX GET", &other)),
        }
    }

    fn unexpected(&self, command: &'static str, reply: &Value) -> StoreError {
        let mut reply = format!("{reply:?}");
        reply.truncate(200);
        StoreError::Generic {
            store: self.inner.name,
            source: Box::new(RedisStoreError::UnexpectedReply { command, reply }),
        }
    }

    fn corrupt(
        &self,
        key: &[u8],
        reason: String,
        source: Option<idem_core::CodecError>,
    ) -> StoreError {
        StoreError::Corrupt {
            store: self.inner.name,
            source: Box::new(RedisStoreError::Unreadable {
                key: printable_key(key),
                reason,
                source,
            }),
        }
    }

    fn unreadable(&self, key: &[u8], why: Unreadable) -> StoreError {
        match why {
            Unreadable::Layout(reason) => self.corrupt(key, reason.to_string(), None),
            Unreadable::ExpiryMismatch => self.corrupt(
                key,
                "the header's expiry differs from the record's".to_string(),
                None,
            ),
            Unreadable::Codec(e) => {
                self.corrupt(key, "the record cannot be decoded".to_string(), Some(e))
            }
        }
    }

    fn decode(&self, key: &[u8], bytes: &[u8]) -> Result<Versioned, StoreError> {
        envelope::decode(bytes).map_err(|why| self.unreadable(key, why))
    }

    fn encode(&self, record: &Versioned) -> Result<Vec<u8>, StoreError> {
        envelope::encode(record, self.inner.write_ids.next()).map_err(|e| StoreError::Rejected {
            store: self.inner.name,
            source: Box::new(e),
        })
    }
}

#[async_trait]
impl Store for RedisStore {
    /// Native expiry (`PX`); no size limit of its own (Redis refuses values
    /// beyond `proto-max-bulk-len`, 512 MB by default).
    fn capabilities(&self) -> Capabilities {
        Capabilities::new().with_native_expiry(true)
    }

    /// One native `SET key value NX GET PX ms`; the script only for what it
    /// cannot settle (an expired record in place, an older server).
    async fn insert_if_absent(
        &self,
        key: &RecordKey,
        record: &Versioned,
        now: Timestamp,
    ) -> Result<Inserted, StoreError> {
        let redis_key = self.redis_key(key);
        let value = self.encode(record)?;
        let px = self.px(record.record.expires_at, now);
        let mut refused = None;
        if self.inner.native_insert.load(Ordering::Relaxed) {
            match self.insert_native(&redis_key, &value, px, now).await? {
                Native::Settled(inserted) => return Ok(inserted),
                Native::Expired | Native::WritesRefused => {}
                Native::Refused(e) => refused = Some(e),
            }
        }
        let px = px.to_string();
        let now = now.as_millis().to_be_bytes();
        let inserted = match self
            .eval(&INSERT, &redis_key, &[&now, &value, px.as_bytes()])
            .await?
        {
            Reply::Done => Inserted::Inserted,
            Reply::Live(bytes) => Inserted::Exists(self.decode(&redis_key, &bytes)?),
            Reply::Absent => return Err(self.unexpected(INSERT.name, &Value::Int(0))),
        };
        if let Some(e) = refused {
            // The script works where the native command does not: use the
            // script from now on.
            self.inner.native_insert.store(false, Ordering::Relaxed);
            tracing::info!(
                store = self.inner.name,
                error = %e,
                "idem-redis: the server refuses `SET … NX GET` (Redis before 7.0?); \
                 insert_if_absent uses its script from now on"
            );
        }
        Ok(inserted)
    }

    async fn get(&self, key: &RecordKey, now: Timestamp) -> Result<Option<Versioned>, StoreError> {
        let redis_key = self.redis_key(key);
        let mut cmd = redis::cmd("GET");
        cmd.arg(&redis_key);
        let reply = match self.query(&cmd).await {
            Ok(reply) => reply,
            Err(e) => return Err(self.map_key_err(&redis_key, e)),
        };
        match reply {
            Value::Nil => Ok(None),
            Value::BulkString(bytes) => {
                let head =
                    envelope::header(&bytes).map_err(|why| self.unreadable(&redis_key, why))?;
                if head.expires_at <= now {
                    return Ok(None);
                }
                self.decode(&redis_key, &bytes).map(Some)
            }
            other => Err(self.unexpected("GET", &other)),
        }
    }

    async fn compare_and_swap(
        &self,
        key: &RecordKey,
        expected: Revision,
        record: &Versioned,
        now: Timestamp,
    ) -> Result<Swapped, StoreError> {
        let redis_key = self.redis_key(key);
        let value = self.encode(record)?;
        let px = self.px(record.record.expires_at, now).to_string();
        let now = now.as_millis().to_be_bytes();
        let expected = expected.as_u64().to_be_bytes();
        match self
            .eval(&CAS, &redis_key, &[&now, &expected, &value, px.as_bytes()])
            .await?
        {
            Reply::Done => Ok(Swapped::Swapped),
            Reply::Absent => Ok(Swapped::Conflict(None)),
            Reply::Live(bytes) => Ok(Swapped::Conflict(Some(self.decode(&redis_key, &bytes)?))),
        }
    }

    async fn delete_if(
        &self,
        key: &RecordKey,
        expected: Revision,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let redis_key = self.redis_key(key);
        let now = now.as_millis().to_be_bytes();
        let expected = expected.as_u64().to_be_bytes();
        match self.eval(&DELETE, &redis_key, &[&now, &expected]).await? {
            Reply::Done => Ok(true),
            Reply::Absent => Ok(false),
            Reply::Live(_) => Err(self.unexpected(DELETE.name, &Value::Okay)),
        }
    }

    /// Redis drops expired records by itself (`PX`): nothing to do, returns 0
    /// without a round trip.
    async fn purge_expired(&self, now: Timestamp, limit: usize) -> Result<u64, StoreError> {
        let _ = (now, limit);
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_print_like_redis_cli() {
        assert_eq!(
            printable_key(b"idem:\x00\x8f{a}\"\\"),
            "idem:\\x00\\x8f{a}\\x22\\x5c"
        );
    }

    #[test]
    fn physical_ttl_is_remaining_life_plus_grace() {
        let px = |expires: u64, now: u64, grace: u64| {
            physical_ttl_ms(
                Timestamp::from_millis(expires),
                Timestamp::from_millis(now),
                grace,
            )
        };
        assert_eq!(px(10_000, 4_000, 500), 6_500);
        assert_eq!(px(4_000, 10_000, 500), 500);
        assert_eq!(px(4_000, 10_000, 0), 1);
        assert_eq!(px(u64::MAX, 0, 60_000), MAX_PX);
    }

    #[test]
    fn write_ids_do_not_repeat() {
        let ids = WriteIds::new();
        let seen: std::collections::HashSet<u64> = (0..10_000).map(|_| ids.next()).collect();
        assert_eq!(seen.len(), 10_000);
    }

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
