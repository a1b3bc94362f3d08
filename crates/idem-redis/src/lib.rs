//! # idem-redis
//!
//! The Redis store of **idem**: [`RedisStore`] implements
//! [`idem_core::store::Store`] over one Redis server or a Redis Cluster, with the
//! `redis` crate (1.x, tokio).
//!
//! ```no_run
//! use idem_core::Engine;
//! use idem_redis::RedisStore;
//!
//! # #[tokio::main] async fn main() -> Result<(), idem_redis::RedisError> {
//! // One server (a reconnecting multiplexed connection), default options:
//! let store = RedisStore::connect("redis://127.0.0.1:6379").await?;
//! // Or a cluster, through any of its nodes:
//! let cluster = RedisStore::builder()
//!     .with_prefix("payments:idem:")
//!     .connect_cluster(["redis://10.0.0.1:7000", "redis://10.0.0.2:7000"])
//!     .await?;
//! let engine = Engine::new(store);
//! # let _ = (engine, cluster); Ok(()) }
//! ```
//!
//! ## Key layout
//!
//! One Redis **string** per record, at `{prefix}{digest}`: the configured
//! prefix (default `"idem:"`) followed by the 32 raw bytes of
//! [`RecordKey::digest`](idem_core::RecordKey::digest), the blake3 digest of
//! the core's injective (scope, key) encoding. Tenants, principals and
//! operations therefore never collide however they are spelled, and keys
//! spread uniformly over cluster slots. [`RedisStore::redis_key`] gives the
//! key of a record; `redis-cli` shows the digest as `\xNN` escapes
//! (`redis-cli --scan --pattern 'idem:*'` lists the records). The value is
//!
//! ```text
//! offset  size  field
//!      0     1  layout tag 0x01
//!      1     8  expires_at (ms since the Unix epoch, u64 big-endian)
//!      9     8  revision (u64 big-endian)
//!     17     8  reserved: 0 (before round 5: a random write id; still read)
//!     25     …  the record, idem_core::store::codec::encode_record (its own format tag)
//! ```
//!
//! Why this shape: memory. A binary digest takes less than a hex one, and a
//! string per record less than a hash (a field over 64 bytes leaves the
//! compact listpack encoding); larger outcomes add their length, rounded up
//! to the allocator's size class. docs/benchmarks.md ("Memory per record")
//! has the measured figures; the `redis::layout_and_memory_per_record` test
//! prints them for the server at hand.
//!
//! Because the digest is binary it may contain `{` and `}`; Redis Cluster
//! then hashes the bytes between them. Those bytes are random too, so records
//! still spread over all slots, and each script touches one key, so nothing
//! depends on where a key lands.
//!
//! ## Scripts
//!
//! Every primitive is atomic on the server:
//!
//! | primitive | server side |
//! |---|---|
//! | `insert_if_absent` | one native `SET key value NX GET PX ms` (Redis ≥ 7.0): nil → inserted; a live record → returned, nothing written. Only if an expired record is still in place (within the grace) does the Lua script run: read header; live → return the value; else `SET … PX`. A server that refuses `SET … NX GET` (before 7.0) gets the script from then on |
//! | `get` | one `GET`; expiry and decoding checked in the client |
//! | `compare_and_swap` | Valkey ≥ 8.1: one native `SET key new IFEQ old PX ms GET`, `old` being the exact bytes of the expected record (re-encoded: the encoding is deterministic); the old value it returns is the answer (equal to `old` or to `new` → swapped; nil or expired → conflict with nothing; another record → conflict with it). Elsewhere Lua: read header; live and same revision → `SET … PX`; else return the live value (or nothing) |
//! | `delete_if` | Valkey ≥ 9.0: one native `DELIFEQ key old`; when it deletes nothing, one `GET` tells a stale revision from an older encoding. Elsewhere Lua: read header; live and same revision → `UNLINK` |
//! | `purge_expired` | nothing: Redis expires keys itself; returns 0 |
//! | `census` ([`CensusSupport::Sampled`](idem_core::store::CensusSupport::Sampled)) | not atomic (reads only; a key written meanwhile may or may not be counted): `SCAN cursor MATCH <prefix><32 × ?> COUNT 1000` on the server or on each master of a cluster in turn, then one `MGET` per batch of new keys (split by slot on a cluster); records tallied in the client with `Census::tally`, each key once, stopping at the first record beyond the sample. Values under the prefix that are not records are skipped (logged), not an error |
//! | `abandoned` ([`Capabilities::abandoned`](idem_core::store::Capabilities::abandoned)) | not atomic (reads only), the same scan as `census` over every record: each value decoded in the client and kept if [`is_abandoned`](idem_core::store::is_abandoned) at `now` (in flight, lease lapsed, a checkpoint, not expired), the `limit` earliest lapses returned in order. Values under the prefix that are not records are skipped (logged), as by `census`. O(records under the prefix) per call: see [Finding abandoned records](#finding-abandoned-records) |
//!
//! - `SET … NX GET` writes nothing when any value is in place, so it is
//!   atomic by itself; the client decodes what it returns (its own bytes
//!   → "inserted", a resend; an unreadable value → corrupt, untouched).
//! - [`RedisStore::write_paths`] says which path each conditional write
//!   takes; the server's `INFO server` decides it at connect (every master
//!   of a cluster), and a server that later refuses a native command (a
//!   reconnect to an older node, a proxy) gets the script from then on.
//!   Redis 8.4's conditional `SET`/`DELEX` are not used yet (untested here):
//!   on Redis, compare-and-swap and delete stay scripts. A value written by
//!   an idem-redis that still put a write id in its header has the expected
//!   revision but other bytes: the native compare misses and the script
//!   decides, so an upgrade in place needs nothing.
//! - The revision check and the write happen in the same script. Each script
//!   touches exactly one key (`KEYS[1]`), so it is valid on Redis Cluster with
//!   no hash tag. Scripts are static text; keys and arguments are passed as
//!   `KEYS`/`ARGV`, never spliced into Lua.
//! - Scripts are loaded once (`SCRIPT LOAD` when the store connects, on every
//!   node of a cluster) and run by SHA (`EVALSHA`). After `SCRIPT FLUSH`, a
//!   server restart or a failover to a node that never saw them, the call gets
//!   `NOSCRIPT` and is re-sent once as `EVAL` with the script text, which also
//!   caches the script again on that node.
//! - Expiry is decided by the engine's clock: every script compares the
//!   engine-supplied `now` with the stored `expires_at` (exactly, as two
//!   32-bit halves). A record with `expires_at <= now` is absent to every
//!   primitive, whether or not Redis still holds it.
//! - A record encodes to the same bytes every time, and every write has a
//!   fresh random revision (and a claim a fresh random token), so equal
//!   bytes mean the same write. If a connection breaks after the server
//!   ran a write but before the reply arrived, the driver (cluster client) or
//!   this store (standalone, once) sends it again; the store then finds its
//!   own bytes in place and answers "done" instead of reporting a
//!   conflict with itself. No claim is lost and none is made twice.
//! - Stored bytes that are not a record of this layout (foreign values,
//!   truncated or undecodable records, another Redis type at the key) are
//!   [`StoreError::Corrupt`](idem_core::StoreError::Corrupt) and are never
//!   overwritten. One exception is deliberate: a value whose header is intact
//!   and says it has expired is treated as expired (and may be replaced) even
//!   if its record bytes are damaged, because the header alone decides expiry.
//!
//! ## Finding abandoned records
//!
//! [`Store::abandoned`](idem_core::store::Store::abandoned), what the
//! [`Completer`](idem_core::Completer) asks for, is a scan: `SCAN` of the
//! store's own keys (`MATCH <prefix><32 × ?>`, on every master of a
//! cluster), one `MGET` per ~1,000 of them, every record decoded in the
//! client and filtered by [`is_abandoned`](idem_core::store::is_abandoned),
//! the `limit` whose lease lapsed first kept. No index is kept: the write
//! path is unchanged (a sorted set per prefix would cost every claim,
//! checkpoint and completion one more write, and a cluster a second key
//! per record in another slot, outside the one-key scripts).
//!
//! The price is paid by the search: each call costs O(records under the
//! prefix), every value transferred and decoded in full (outcomes
//! included), plus one `SCAN` step per ~1,000 keys of the database (other
//! applications' keys included). Measured with 10,000 records under the
//! prefix, 100 of them abandoned, 9,000 completed with 256-byte outcomes
//! (3.2 MiB of values), release build, server on loopback: one
//! `abandoned(now, 100)` takes 24 to 37 ms on a standalone Redis 7.0, 23 ms
//! on Valkey 9.1, 130 ms on a 3-master Redis Cluster (the `MGET` is split by
//! slot); with 4 KiB outcomes (36 MiB of values) 140 ms standalone. The test
//! case `abandoned_search_cost` prints the figures for the server at hand.
//! Run it from one background task every few seconds (the completer's
//! interval), not per request.
//!
//! ## Logical and physical expiry
//!
//! Logical expiry (`expires_at`, from the engine's policy and clock) decides
//! what every primitive sees. Physical expiry lets Redis reclaim memory: each
//! write sets `PX = max(expires_at − now, 0) + grace` (at least 1 ms), where
//! `now` is the engine's timestamp of that write and `grace` is
//! [`RedisStoreBuilder::with_expiry_grace`] (default 60 s). Because the TTL is
//! relative, clock offsets between the application and Redis do not matter:
//! a record stays in Redis for its remaining logical lifetime plus the grace,
//! measured by Redis's clock from the write. Consequences:
//! - In production (engine clock ≈ real time) Redis drops a record about
//!   `grace` after it expired logically. The grace absorbs clock skew between
//!   application instances; keep it above the skew you tolerate.
//! - A record can vanish while still logically live only if the engine's
//!   clock runs slower than real time by more than the grace (a frozen test
//!   clock over hours); vanishing then reads as expired, which is what the
//!   record was about to be.
//! - A compare-and-swap (completion, heartbeat, takeover) sets a new `PX` from
//!   the new record's `expires_at`.
//!
//! ## Redis Cluster
//!
//! [`RedisStoreBuilder::connect_cluster`] uses the `redis` crate's async cluster
//! client: it discovers the topology, routes each call to the master owning
//! the key's slot, follows `MOVED`/`ASK` during resharding and retries on
//! `TRYAGAIN`/`CLUSTERDOWN`. Do not put a hash tag (`{…}`) in the prefix: it
//! would put every record in one slot (refused with
//! [`RedisError::HashTagInPrefix`]).
//!
//! ## Connections, failures and recovery
//!
//! - Standalone uses a `ConnectionManager` (one multiplexed connection,
//!   re-dialled with backoff when it breaks). Cluster uses one multiplexed
//!   connection per node, managed by the cluster client.
//! - Which driver errors are transient, and which permanent, is the table
//!   in [Error classification](#error-classification).
//! - A call whose connection broke (`CLIENT KILL`, a server restart) is sent
//!   once more on the re-established connection. A call that timed out makes
//!   the store replace the connection it used (a connection that went silent,
//!   a lost peer or a black-holed network, never blocks later calls) and is
//!   sent once more on the fresh one. A standalone call answered by a
//!   replica (`READONLY`, `MASTERDOWN`: the primary moved in a failover
//!   behind a DNS name or a proxy) does the same, so a fresh dial finds the
//!   new primary. Write ids make the re-sends exact.
//!   Only then is the error returned; nothing needs restarting when Redis
//!   comes back.
//! - The fresh connection also gets the store out of a client that stopped
//!   making progress: the stalled call times out and the re-sent one, on
//!   the fresh connection, succeeds (docs/benchmarks.md, "Redis: driver
//!   notes", has the case seen with the cluster client).
//! - The rare cost of re-sending after a timeout: if the first attempt was
//!   only delayed, not lost, and the key was released in between, the late
//!   insert can leave a claim nobody holds. It errs on the safe side: retries
//!   get `InProgress` until its lease lapses, then take it over; nothing runs
//!   twice.
//! - Timeouts: [`RedisStoreBuilder::with_connection_timeout`] (1 s) and
//!   [`RedisStoreBuilder::with_response_timeout`] (3 s): a dead server yields an
//!   error, never a hang.
//!
//! ## What the guarantees need from Redis
//!
//! The store is exactly as durable as Redis is configured to be:
//! - An acknowledged write lives in memory only until it is persisted. With
//!   no persistence, or RDB snapshots only, a restart forgets recent claims
//!   and completions, and a retried request runs again. For idempotency you
//!   want `appendonly yes` with `appendfsync always` (no acknowledged write is
//!   lost on a crash) or `appendfsync everysec` (up to about one second lost).
//! - Replication is asynchronous: on failover, a replica promoted before it
//!   received a write loses it, even though the client was told it succeeded.
//!   `WAIT`/`min-replicas-to-write` narrow that window but do not close it.
//!   Where a lost record would mean a second side effect, pair the store with
//!   a business-level uniqueness check, or use the PostgreSQL store.
//! - Use a `maxmemory-policy` of `noeviction`: an evicted record is a
//!   forgotten key, and every idem record carries a TTL, so the `volatile-*`
//!   policies evict idem records first. Under `noeviction` a full Redis
//!   refuses writes (`OOM`, a transient `Unavailable` error) rather than
//!   forgetting.
//!
//! ## Error classification
//!
//! Every error of this crate is one type, [`RedisError`]: the store's
//! primitives return it converted to a [`StoreError`](idem_core::StoreError)
//! (it stays the source), while connecting ([`RedisStoreBuilder::connect`],
//! …) and [`RedisStore::ping`] return it as it is; [`RedisError::is_transient`]
//! tells whether a retry can help, and `?` converts it into a `StoreError` or
//! an [`idem_core::Error`].
//!
//! Every driver error goes through one pure function (`error::classify`,
//! unit-tested per code with replies captured from Redis 7.0) and becomes
//! [`StoreError::Unavailable`](idem_core::StoreError::Unavailable) (transient:
//! retrying later may succeed) or a permanent variant, with the driver's
//! error kept as the source. Error replies are classified by their code, the
//! first word of the reply (`redis::RedisError::code`); an `ERR` reply by its
//! text.
//!
//! | driver error / code | meaning | class | why |
//! |---|---|---|---|
//! | I/O error: connection refused, reset, aborted, broken pipe, EOF, DNS | server down, restarting, shutting down, network cut | transient `Unavailable` | the connection is re-dialled; a broken call is re-sent once first |
//! | I/O timeout (`TimedOut`) | no reply within the response timeout | transient `Unavailable` | the connection is replaced and the call re-sent once first |
//! | `ClusterConnectionNotFound` | no connection to the node owning the slot | transient `Unavailable` | the cluster client reconnects and refreshes slots |
//! | `Parse` (unparsable reply) | the byte stream is garbled (a proxy, a cut) | transient `Unavailable` | the driver drops the connection; the call's effect is unknown, as for a lost reply, and deterministic values make a re-send exact |
//! | `OOM` | `maxmemory` reached under `noeviction` | transient `Unavailable` | nothing was written; memory frees as records expire or the operator raises the limit. Replays still work: Redis refuses `SET … NX GET` even for a key that exists, so the claim falls back to its script, which reads first and writes only for a new key |
//! | `NOREPLICAS` | fewer replicas than `min-replicas-to-write` | transient `Unavailable` | nothing was written; a replica reconnecting ends it. Replays still work, as for `OOM` |
//! | `READONLY` | a node demoted to replica by a failover | transient `Unavailable` | the cluster client refreshes slots; standalone replaces the connection and re-sends once, so a fresh dial finds the new primary |
//! | `MASTERDOWN` | a replica lost its master (`replica-serve-stale-data no`) | transient `Unavailable` | failover in progress; standalone replaces the connection as for `READONLY` |
//! | `LOADING` | the server loads its dataset after a restart | transient `Unavailable` | ends when loading ends |
//! | `BUSY` | another client's script runs past `busy-reply-threshold` | transient `Unavailable` | ends with the script or `SCRIPT KILL` |
//! | `MISCONF` | writes stopped after a failed RDB save (`stop-writes-on-bgsave-error`) | transient `Unavailable` | resumes once a save succeeds (disk freed) |
//! | `TRYAGAIN`, `CLUSTERDOWN` | resharding, or the cluster lost a slot's master | transient `Unavailable` | the cluster client already retried; the cluster heals |
//! | `MOVED`, `ASK` | slot moved (the cluster client follows them first) | transient `Unavailable` on a cluster; permanent `Generic` on a standalone connection | a standalone connection to a cluster node gets them for ever: use `connect_cluster` |
//! | `NOSCRIPT` | script cache flushed (restart, failover, `SCRIPT FLUSH`) | transient `Unavailable` | handled: the call is re-sent as `EVAL` with the script text; it cannot surface after that |
//! | `ERR max number of clients reached` | `maxclients` reached | transient `Unavailable` | connections free up |
//! | `ERR … Script killed by user` | an operator's `SCRIPT KILL` | transient `Unavailable` | a killed script wrote nothing |
//! | `ERR Error running script … -CODE …` | Redis before 7.0 wraps a script's command error in `ERR` | as `CODE` | the embedded code decides (`-OOM`, `-NOREPLICAS`, `-READONLY`: transient) |
//! | `WRONGTYPE` | another Redis type at a record key | permanent `Corrupt` | the value is not a record; it is never overwritten |
//! | `ERR Protocol error: invalid bulk length`, `ERR … exceeds maximum allowed size` | a value above `proto-max-bulk-len` | permanent `Rejected` | the same record is refused again |
//! | `NOAUTH`, `WRONGPASS`, `NOPERM`, `AuthenticationFailed` | missing or rotated credentials, ACL forbids a command | permanent `Generic` | no retry helps until an operator fixes credentials or ACLs; fast 500s surface the misconfiguration instead of 503s that look like an outage |
//! | other `ERR` (syntax, arguments, unknown command, an error of the script itself) | a bug, or a server or proxy without a command | permanent `Generic` | the same call fails the same way |
//! | `CROSSSLOT`, `EXECABORT`, `NOPROTO`, other codes | not produced by this store's calls | permanent `Generic` | |
//! | `InvalidClientConfig`, `Client`, `UnexpectedReturnType`, `RESP3NotSupported` | bad URL or client options, driver misuse | permanent `Generic` | |
//! | value that does not decode | foreign or damaged bytes at a record key | permanent `Corrupt` | never overwritten |
//! | unexpected reply shape | a foreign script under the same SHA, a proxy rewriting replies | permanent `Generic` | |
//!
//! What the class changes: since issue 16 the engine's heartbeat retries
//! every store error, transient or not, until the lease is lost or its
//! deadline has passed, so the class does not stop a heartbeat. It decides
//! the caller-facing answer (`idem-tower`: 503 with `Retry-After` for a
//! transient error, 500 for a permanent one, and fail-open applies only to
//! transient errors) and the completion: a transient error is retried until
//! one lease after the lease's deadline, a permanent one makes the engine
//! store `outcome-unknown` instead of the outcome. Caveats: `redis` 1.8
//! reports any refused `AUTH` as `AuthenticationFailed` without the server's
//! reply, so `maxclients` reached during the handshake of a password-protected
//! connection reads as permanent; and `OOM` is transient on the assumption
//! that memory frees (records expire): a `maxmemory` too small for the live
//! records keeps answering 503 until an operator raises it.
#![forbid(unsafe_code)]

mod builder;
mod connection;
mod envelope;
mod error;
mod scripts;
mod server;
mod store;

pub use builder::RedisStoreBuilder;
pub use connection::Topology;
pub use error::RedisError;
pub use server::{WritePath, WritePaths};
pub use store::RedisStore;
