//! [`RedisStore`]: the store's handle (connecting, its key layout, the
//! mapping of stored values and errors to records and [`StoreError`]s). The
//! [`Store`](idem_core::store::Store) primitives are in `store/primitives.rs`; the
//! connection, the scripts, the server's native commands and the errors
//! have modules of their own.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use idem_core::store::{StoreError, Versioned};
use idem_core::{RecordKey, Timestamp};
use redis::cluster::ClusterClient;
use redis::{Client, Value};

use crate::RedisStoreBuilder;

mod abandoned;
mod census;
mod conditional;
mod primitives;
mod scan;
use crate::connection::{Connection, Topology};
use crate::envelope::{self, Unreadable};
use crate::error::{self, CLUSTER, Class, RedisError, STANDALONE};
use crate::scripts::{self, Lua, Refusal, Reply};
use crate::server::{self, WritePath, WritePaths};

/// The longest physical TTL set, in ms (about 2,200 years): records whose
/// logical expiry lies further out are kept that long, i.e. for good.
const MAX_PX: u64 = 1 << 46;

struct Inner {
    name: &'static str,
    prefix: String,
    grace_ms: u64,
    conn: Connection,
    /// Whether `insert_if_absent` tries the native `SET … NX GET PX` first;
    /// cleared (for the life of the store) when a server refuses it (Redis
    /// before 7.0, a proxy that does not know it).
    native_insert: AtomicBool,
    /// Whether `compare_and_swap` is `SET … IFEQ … GET` (Valkey ≥ 8.1);
    /// cleared when a server refuses it.
    native_swap: AtomicBool,
    /// Whether `delete_if` is `DELIFEQ` (Valkey ≥ 9.0); cleared when a
    /// server refuses it.
    native_delete: AtomicBool,
}

/// An idem [`Store`](idem_core::store::Store) in Redis: standalone or Redis Cluster, one atomic
/// server-side step per primitive.
///
/// # Behavior
/// - Each record is one Redis string at [`redis_key`](Self::redis_key) =
///   `{prefix}{digest}` (the 32 raw bytes of `RecordKey::digest`). The value
///   layout, the scripts, and how physical expiry relates to logical expiry
///   are in the crate docs.
/// - `insert_if_absent` is one native `SET key value NX GET PX ms` (the
///   Lua script only when an expired record is still in place, or on a
///   server before Redis 7.0). On Valkey ≥ 8.1 `compare_and_swap` is one
///   native `SET key new IFEQ old PX ms GET`, and on Valkey ≥ 9.0
///   `delete_if` one `DELIFEQ key old`: the server compares the whole stored
///   value with the exact bytes of the expected record. Elsewhere each is one
///   Lua script over exactly that one key, run by SHA (`EVALSHA`); after a
///   `SCRIPT FLUSH` or a server restart the script is sent again with `EVAL`
///   transparently. [`write_paths`](Self::write_paths) says which path each
///   takes. `get` is one `GET`. One round trip on the happy path.
/// - Values are encoded deterministically and every write has a fresh
///   random revision, so a write the driver re-sends after losing the reply
///   is recognised by its bytes and reported as done instead of as a
///   conflict with itself.
/// - Connection loss, timeouts and the passing server states (`OOM`,
///   `NOREPLICAS`, `READONLY`, `LOADING`, `CLUSTERDOWN`, …) are
///   [`StoreError::Unavailable`] (the table is in the crate docs, "Error
///   classification"); the connection is re-established by itself.
///   A call whose connection broke or went silent (timed out), or (standalone)
///   that a replica answered, is sent once more on a fresh connection before
///   the error is returned.
/// - Undecodable values, and values of another Redis type at a record key,
///   are [`StoreError::Corrupt`] and are never overwritten (a census and
///   the search for abandoned records skip them instead, see
///   [`Store::census`](idem_core::store::Store::census)).
/// - [`Store::abandoned`](idem_core::store::Store::abandoned) is a scan of
///   the store's own keys, O(records under the prefix) per call; nothing is
///   added to the write path (crate docs, "Finding abandoned records").
/// - Clones share the connection.
///
/// ```no_run
/// use idem_core::{Engine, Executed, Fingerprint, IdempotencyKey, Scope};
/// use idem_redis::RedisStore;
///
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = RedisStore::builder()
///     .with_prefix("payments:idem:")
///     .connect("redis://127.0.0.1:6379")
///     .await?;
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
            .field("topology", &self.topology())
            .field("prefix", &self.inner.prefix)
            .field("grace_ms", &self.inner.grace_ms)
            .finish_non_exhaustive()
    }
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

/// A store over one server (or a primary behind a stable address), through
/// `client`.
pub(crate) async fn standalone(
    client: Client,
    config: &RedisStoreBuilder,
) -> Result<RedisStore, RedisError> {
    config.validate()?;
    let conn = Connection::standalone(STANDALONE, client, config)
        .await
        .map_err(|e| RedisError::driver(e, Topology::Standalone))?;
    RedisStore::start(STANDALONE, config, conn).await
}

/// A store over a Redis Cluster, through `client`; `config`'s timeouts
/// replace the client's.
pub(crate) async fn cluster(
    client: ClusterClient,
    config: &RedisStoreBuilder,
) -> Result<RedisStore, RedisError> {
    config.validate()?;
    let conn = Connection::cluster(CLUSTER, client, config)
        .await
        .map_err(|e| RedisError::driver(e, Topology::Cluster))?;
    RedisStore::start(CLUSTER, config, conn).await
}

impl RedisStore {
    /// Options for a store (prefix, expiry grace, timeouts, reconnect
    /// attempts), and the ways to connect; see [`RedisStoreBuilder`].
    pub fn builder() -> RedisStoreBuilder {
        RedisStoreBuilder::default()
    }

    /// Connects to one Redis server at `url` with the default options:
    /// `RedisStore::builder().connect(url)` (see
    /// [`RedisStoreBuilder::connect`]).
    pub async fn connect(url: &str) -> Result<Self, RedisError> {
        Self::builder().connect(url).await
    }

    /// The store over `conn`, once the scripts are loaded.
    async fn start(
        name: &'static str,
        config: &RedisStoreBuilder,
        conn: Connection,
    ) -> Result<Self, RedisError> {
        let grace_ms = u64::try_from(config.expiry_grace().as_millis()).unwrap_or(u64::MAX);
        let topology = conn.topology();
        let store = Self {
            inner: Arc::new(Inner {
                name,
                prefix: config.prefix().to_string(),
                grace_ms,
                conn,
                native_insert: AtomicBool::new(true),
                native_swap: AtomicBool::new(false),
                native_delete: AtomicBool::new(false),
            }),
        };
        // On every node of a cluster, so that the first calls run by SHA
        // (also on servers with the native commands: an expired record in
        // place, or a node that refuses them, needs the scripts).
        scripts::load(&store.inner.conn)
            .await
            .map_err(|e| RedisError::driver(e, topology))?;
        let features = server::detect(&store.inner.conn).await;
        store
            .inner
            .native_swap
            .store(features.set_ifeq, Ordering::Relaxed);
        store
            .inner
            .native_delete
            .store(features.delifeq, Ordering::Relaxed);
        tracing::debug!(
            store = name,
            paths = ?store.write_paths(),
            "idem-redis: connected"
        );
        Ok(store)
    }

    /// The path each conditional write takes on this store's connection:
    /// native commands or Lua scripts (see [`WritePaths`]).
    pub fn write_paths(&self) -> WritePaths {
        let path = |native: &AtomicBool| {
            if native.load(Ordering::Relaxed) {
                WritePath::Native
            } else {
                WritePath::Script
            }
        };
        WritePaths {
            insert_if_absent: path(&self.inner.native_insert),
            compare_and_swap: path(&self.inner.native_swap),
            delete_if: path(&self.inner.native_delete),
        }
    }

    /// Standalone or cluster.
    pub fn topology(&self) -> Topology {
        self.inner.conn.topology()
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
    ///
    /// # Behavior
    /// A server that does not answer is a transient [`RedisError`].
    pub async fn ping(&self) -> Result<(), RedisError> {
        self.inner
            .conn
            .query(&redis::cmd("PING"))
            .await
            .map(drop)
            .map_err(|e| RedisError::driver(e, self.topology()))
    }

    /// The physical TTL of a record written at `now`: until its logical
    /// expiry plus the grace, at least 1 ms.
    fn px(&self, expires_at: Timestamp, now: Timestamp) -> u64 {
        physical_ttl_ms(expires_at, now, self.inner.grace_ms)
    }

    /// Maps a driver error ([`error::classify`]).
    fn map_err(&self, e: redis::RedisError) -> StoreError {
        error::map_err(self.inner.name, self.topology(), e)
    }

    /// Maps a driver error of a call on `key`: as [`map_err`](Self::map_err),
    /// but a corrupt value (`WRONGTYPE`) names the key.
    fn map_key_err(&self, key: &[u8], e: redis::RedisError) -> StoreError {
        match error::classify(&e, self.topology()) {
            Class::Corrupt => self.corrupt(key, e.to_string(), None),
            _ => self.map_err(e),
        }
    }

    /// Runs `lua` over `key` (see [`scripts::eval`]) and reads its answer.
    async fn eval(&self, lua: &Lua, key: &[u8], args: &[&[u8]]) -> Result<Reply, StoreError> {
        let reply = scripts::eval(&self.inner.conn, lua, key, args)
            .await
            .map_err(|e| self.map_key_err(key, e))?;
        scripts::parse(reply).map_err(|refusal| match refusal {
            Refusal::Corrupt(why) => self.corrupt(key, why, None),
            Refusal::Unexpected(other) => self.unexpected(lua.name, &other),
        })
    }

    fn unexpected(&self, command: &'static str, reply: &Value) -> StoreError {
        let mut reply = format!("{reply:?}");
        reply.truncate(200);
        RedisError::UnexpectedReply { command, reply }.into_store_error(self.inner.name)
    }

    fn corrupt(
        &self,
        key: &[u8],
        reason: String,
        source: Option<idem_core::store::codec::CodecError>,
    ) -> StoreError {
        RedisError::Unreadable {
            key: printable_key(key),
            reason,
            source,
        }
        .into_store_error(self.inner.name)
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
        envelope::encode(record)
            .map_err(|e| RedisError::Unencodable(e).into_store_error(self.inner.name))
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
}
