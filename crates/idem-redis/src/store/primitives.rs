//! The [`Store`] primitives of [`RedisStore`]: the native claim
//! (`SET … NX GET PX`) with its script fallback, `GET`, and the scripts of
//! compare-and-swap and delete.

use std::sync::atomic::Ordering;

use async_trait::async_trait;
use idem_core::store::{
    Capabilities, Census, CensusSupport, InsertOutcome, Store, StoreError, SwapOutcome, Versioned,
};
use idem_core::{RecordKey, Timestamp};
use redis::{Cmd, Value};

use super::RedisStore;
use super::conditional::Native as Conditional;
use crate::envelope;
use crate::error::{self, Class};
use crate::scripts::{self, Reply};

/// What the native `SET … NX GET PX` of `insert_if_absent` settled.
// One value per call, returned once: boxing the record would allocate on
// every claim to save a move.
#[allow(clippy::large_enum_variant)]
enum Native {
    /// The answer.
    Settled(InsertOutcome),
    /// An expired record is in place: the script replaces it (or finds what
    /// replaced it meanwhile).
    Expired,
    /// The server refuses every write for now (`OOM`, `NOREPLICAS`), even
    /// one that `NX` would skip: the script reads first, so a live record is
    /// still answered (a replay works), and only a write fails.
    WritesRefused,
    /// The server refused the command (Redis before 7.0); the driver error.
    Refused(redis::RedisError),
}

impl RedisStore {
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
        let reply = match self.inner.conn.query(&cmd).await {
            Ok(reply) => reply,
            // `ERR syntax error` from Redis 6.2 (no `NX` with `GET`) and
            // older, or a proxy's refusal of an unknown form; not the `ERR`
            // replies that carry a passing state (too many clients, …).
            Err(e)
                if e.code() == Some("ERR")
                    && error::classify(&e, self.topology()) == Class::Generic =>
            {
                return Ok(Native::Refused(e));
            }
            Err(e) if matches!(e.code(), Some("OOM" | "NOREPLICAS")) => {
                return Ok(Native::WritesRefused);
            }
            Err(e) => return Err(self.map_key_err(redis_key, e)),
        };
        match reply {
            Value::Nil => Ok(Native::Settled(InsertOutcome::Inserted)),
            Value::BulkString(bytes) => {
                let head =
                    envelope::header(&bytes).map_err(|why| self.unreadable(redis_key, why))?;
                if head.expires_at <= now {
                    return Ok(Native::Expired);
                }
                // This call's own bytes: a re-send after a lost reply
                // (revisions and tokens are random per write).
                if bytes == value {
                    return Ok(Native::Settled(InsertOutcome::Inserted));
                }
                self.decode(redis_key, &bytes)
                    .map(|current| Native::Settled(InsertOutcome::Exists(current)))
            }
            other => Err(self.unexpected("SET NX GET", &other)),
        }
    }
}

#[async_trait]
impl Store for RedisStore {
    /// Native expiry (`PX`); no size limit of its own (Redis refuses values
    /// beyond `proto-max-bulk-len`, 512 MB by default); a sampled census
    /// and the search for abandoned records (both `SCAN`).
    fn capabilities(&self) -> Capabilities {
        Capabilities::new()
            .with_native_expiry(true)
            .with_census(CensusSupport::Sampled)
            .with_abandoned(true)
    }

    /// One native `SET key value NX GET PX ms`; the script only for what it
    /// cannot settle (an expired record in place, an older server).
    async fn insert_if_absent(
        &self,
        key: &RecordKey,
        record: &Versioned,
        now: Timestamp,
    ) -> Result<InsertOutcome, StoreError> {
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
            .eval(&scripts::INSERT, &redis_key, &[&now, &value, px.as_bytes()])
            .await?
        {
            Reply::Done => InsertOutcome::Inserted,
            Reply::Live(bytes) => InsertOutcome::Exists(self.decode(&redis_key, &bytes)?),
            Reply::Absent => return Err(self.unexpected(scripts::INSERT.name, &Value::Int(0))),
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
        let reply = match self.inner.conn.query(&cmd).await {
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
        expected: &Versioned,
        record: &Versioned,
        now: Timestamp,
    ) -> Result<SwapOutcome, StoreError> {
        let redis_key = self.redis_key(key);
        let value = self.encode(record)?;
        let px = self.px(record.record.expires_at, now);
        if self.inner.native_swap.load(Ordering::Relaxed)
            && let Conditional::Settled(outcome) = self
                .swap_native(key, &redis_key, expected, &value, px, now)
                .await?
        {
            return Ok(outcome);
        }
        let px = px.to_string();
        let now = now.as_millis().to_be_bytes();
        let expected = expected.revision.as_u64().to_be_bytes();
        match self
            .eval(
                &scripts::CAS,
                &redis_key,
                &[&now, &expected, &value, px.as_bytes()],
            )
            .await?
        {
            Reply::Done => Ok(SwapOutcome::Swapped),
            Reply::Absent => Ok(SwapOutcome::Conflict(None)),
            Reply::Live(bytes) => Ok(SwapOutcome::Conflict(Some(
                self.decode(&redis_key, &bytes)?,
            ))),
        }
    }

    async fn delete_if(
        &self,
        key: &RecordKey,
        expected: &Versioned,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let redis_key = self.redis_key(key);
        if self.inner.native_delete.load(Ordering::Relaxed)
            && let Conditional::Settled(deleted) =
                self.delete_native(&redis_key, expected, now).await?
        {
            return Ok(deleted);
        }
        let now = now.as_millis().to_be_bytes();
        let expected = expected.revision.as_u64().to_be_bytes();
        match self
            .eval(&scripts::DELETE, &redis_key, &[&now, &expected])
            .await?
        {
            Reply::Done => Ok(true),
            Reply::Absent => Ok(false),
            Reply::Live(_) => Err(self.unexpected(scripts::DELETE.name, &Value::Okay)),
        }
    }

    /// Redis drops expired records by itself (`PX`): nothing to do, returns 0
    /// without a round trip.
    async fn purge_expired(&self, now: Timestamp, limit: usize) -> Result<u64, StoreError> {
        let _ = (now, limit);
        Ok(0)
    }

    /// Sampled: `SCAN` the store's keys on every master, `MGET` their
    /// values, tally the records with [`Census::tally`], and stop after
    /// `sample` records.
    ///
    /// # Behavior
    /// - `SCAN cursor MATCH <prefix><32 × ?> COUNT 1000` on the server, or
    ///   on each master of a cluster in turn (a master the cluster client
    ///   is not connected to is a transient error, never a silently partial
    ///   census), then one `MGET` per batch of keys (split by slot on a
    ///   cluster). Only keys of exactly this store's layout (its prefix and
    ///   32 bytes) are read: not those of a store whose prefix extends it.
    /// - Stops at the first record beyond `sample`: then
    ///   [`Coverage::Sampled`](idem_core::store::Coverage::Sampled) with
    ///   `limit = sample`; when the scan ends first,
    ///   [`Coverage::Exact`](idem_core::store::Coverage::Exact). The sample
    ///   is the first records of `SCAN`'s order (the hash table's order,
    ///   unrelated to the records' age or state), the first master's first.
    /// - A key `SCAN` returns twice (it may) is counted once; a key deleted
    ///   or dropped by `PX` between `SCAN` and `MGET` is not counted.
    ///   Records expired at `now` but still held (`PX` includes the grace,
    ///   and `now` is the engine's clock) count as `expired`.
    /// - A string value under the prefix that is not a record (foreign or
    ///   damaged bytes) is counted as `unreadable` and logged at `warn` with
    ///   one such key: an operator's census does not fail on one bad key
    ///   ([`get`](Store::get) reports that key as [`StoreError::Corrupt`]).
    ///   A key of another Redis type is not counted at all.
    /// - Costs one `SCAN` per ~1,000 keys of the database (other
    ///   applications' keys included: `MATCH` filters after the scan) and
    ///   one `MGET` per ~1,000 of this store's keys; memory grows with the
    ///   keys looked at (32 bytes each, to count none twice).
    async fn census(&self, now: Timestamp, sample: usize) -> Result<Census, StoreError> {
        self.scan_census(now, sample).await
    }

    /// A scan, as for the census: `SCAN` the store's keys on every master,
    /// `MGET` their values, and keep the records
    /// [`is_abandoned`](idem_core::store::is_abandoned) at `now`, the
    /// `limit` whose lease lapsed first. Nothing is added to the write
    /// path (no index to maintain).
    ///
    /// # Behavior
    /// - `SCAN cursor MATCH <prefix><32 × ?> COUNT 1000` on the server, or
    ///   on each master of a cluster in turn (a master the cluster client
    ///   is not connected to is a transient error, never a silently partial
    ///   answer), then one `MGET` per batch of up to 1,000 keys (split by
    ///   slot on a cluster). Only keys of exactly this store's layout (its
    ///   prefix and 32 bytes) are read: not another prefix's, not those of
    ///   a store whose prefix extends it.
    /// - Returns the records in flight whose lease lapsed at or before
    ///   `now` and that carry a checkpoint, not expired at `now`, earliest
    ///   lapse first (ties in the order of their Redis keys), at most
    ///   `limit`; `limit = 0` returns nothing without a round trip.
    /// - Values under the prefix that are not records are skipped and
    ///   logged at `warn`, as the census does (which counts them as
    ///   `unreadable`); a key of another Redis type is not looked at. So is
    ///   an abandoned record whose checkpoint names another key than the
    ///   one it is stored at (a value copied by hand): the caller would
    ///   claim the other key.
    /// - A key `SCAN` returns twice is looked at once; a record written
    ///   meanwhile may or may not be found, and one found may have been
    ///   taken over since (the caller's conditional claim tells).
    /// - Cost: every call reads every record under the prefix, O(records
    ///   under the prefix): one `MGET` per ~1,000 records, each value
    ///   transferred and decoded in full (outcomes included), plus one
    ///   `SCAN` per ~1,000 keys of the database (other applications' keys
    ///   included: `MATCH` filters after the scan). Memory: 32 bytes per
    ///   key looked at (to look at none twice) and the `limit` records kept.
    ///   Measured (release build, server on loopback; the
    ///   `abandoned_search_cost` test case prints it): 10,000 records under
    ///   the prefix, 100 of them abandoned, 9,000 completed with 256-byte
    ///   outcomes (3.2 MiB of values): 24 to 37 ms a call on a standalone
    ///   Redis 7.0, 23 ms on Valkey 9.1, 130 ms on a 3-master Redis Cluster
    ///   (`MGET` split by slot); with 4 KiB outcomes (36 MiB) 140 ms
    ///   standalone. Meant for a background task every few seconds (the
    ///   [`Completer`](idem_core::Completer)), not for a request path.
    async fn abandoned(&self, now: Timestamp, limit: usize) -> Result<Vec<Versioned>, StoreError> {
        self.scan_abandoned(now, limit).await
    }
}
