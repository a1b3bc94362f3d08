//! `compare_and_swap` and `delete_if` as native commands, where the server
//! compares the stored value with the exact bytes of the expected record
//! itself: `SET key new IFEQ old PX ms GET` (Valkey ≥ 8.1) and
//! `DELIFEQ key old` (Valkey ≥ 9.0).
//!
//! The expected record's bytes are rebuilt by encoding it (the encoding is
//! deterministic). A stored value with the expected revision but other bytes
//! (written by an idem-redis that still put a random write id in the
//! header) is handed to the script, which compares revisions only.

use std::sync::atomic::{AtomicBool, Ordering};

use idem_core::store::{Store, StoreError, SwapOutcome, Versioned};
use idem_core::{RecordKey, Timestamp};
use redis::{Cmd, Value};

use super::RedisStore;
use crate::envelope;
use crate::error::{self, Class};

/// What a native conditional write settled.
pub(super) enum Native<T> {
    /// The answer.
    Settled(T),
    /// The script must answer: the stored value has the expected revision
    /// but other bytes, or the server refused the command.
    Script,
}

impl RedisStore {
    /// Whether `e` says the server does not know the command or its form
    /// (`ERR syntax error`, `ERR unknown command`): nothing ran.
    fn refuses_command(&self, e: &redis::RedisError) -> bool {
        e.code() == Some("ERR") && error::classify(e, self.topology()) == Class::Generic
    }

    /// Stops using a native command after the server refused it.
    fn give_up_native(&self, flag: &AtomicBool, primitive: &'static str, e: &redis::RedisError) {
        if flag.swap(false, Ordering::Relaxed) {
            tracing::info!(
                store = self.inner.name,
                primitive,
                error = %e,
                "idem-redis: the server refuses the native command; \
                 this primitive uses its script from now on"
            );
        }
    }

    /// `compare_and_swap` as `SET key value IFEQ old PX px GET`.
    ///
    /// - The stored value is `old`: swapped.
    /// - The stored value is `value`: this call already swapped it in (a
    ///   re-send after a lost reply): swapped.
    /// - Nothing stored, or a record expired at `now`: `Conflict(None)`.
    /// - Another record: `Conflict(Some(it))`, or the script if it has the
    ///   expected revision (another encoding of the same record).
    pub(super) async fn swap_native(
        &self,
        key: &RecordKey,
        redis_key: &[u8],
        expected: &Versioned,
        value: &[u8],
        px: u64,
        now: Timestamp,
    ) -> Result<Native<SwapOutcome>, StoreError> {
        if expected.record.expires_at <= now {
            // The expected record is not live: whatever is there, nothing
            // may be swapped; report what is live.
            let live = self.get(key, now).await?;
            return Ok(Native::Settled(SwapOutcome::Conflict(live)));
        }
        let old = self.encode(expected)?;
        let mut cmd = Cmd::with_capacity(8, redis_key.len() + value.len() + old.len() + 24);
        cmd.arg("SET")
            .arg(redis_key)
            .arg(value)
            .arg("IFEQ")
            .arg(&old)
            .arg("PX")
            .arg(px)
            .arg("GET");
        let reply = match self.inner.conn.query(&cmd).await {
            Ok(reply) => reply,
            Err(e) if self.refuses_command(&e) => {
                self.give_up_native(&self.inner.native_swap, "compare_and_swap", &e);
                return Ok(Native::Script);
            }
            Err(e) => return Err(self.map_key_err(redis_key, e)),
        };
        match reply {
            Value::Nil => Ok(Native::Settled(SwapOutcome::Conflict(None))),
            Value::BulkString(bytes) => {
                if bytes == old || bytes == value {
                    return Ok(Native::Settled(SwapOutcome::Swapped));
                }
                let head =
                    envelope::header(&bytes).map_err(|why| self.unreadable(redis_key, why))?;
                if head.expires_at <= now {
                    return Ok(Native::Settled(SwapOutcome::Conflict(None)));
                }
                if head.revision == expected.revision {
                    return Ok(Native::Script);
                }
                let current = self.decode(redis_key, &bytes)?;
                Ok(Native::Settled(SwapOutcome::Conflict(Some(current))))
            }
            other => Err(self.unexpected("SET IFEQ GET", &other)),
        }
    }

    /// `delete_if` as `DELIFEQ key old`.
    ///
    /// - Deleted: `true`.
    /// - Not deleted: `false`, unless the stored value's header has the
    ///   expected revision (other bytes; one `GET` tells): then the script.
    ///   An unreadable header is corrupt, as in the script.
    /// - The expected record expired at `now`: `false`, nothing sent.
    pub(super) async fn delete_native(
        &self,
        redis_key: &[u8],
        expected: &Versioned,
        now: Timestamp,
    ) -> Result<Native<bool>, StoreError> {
        if expected.record.expires_at <= now {
            return Ok(Native::Settled(false));
        }
        let old = self.encode(expected)?;
        let mut cmd = Cmd::with_capacity(3, redis_key.len() + old.len() + 8);
        cmd.arg("DELIFEQ").arg(redis_key).arg(&old);
        match self.inner.conn.query(&cmd).await {
            Ok(Value::Int(1)) => Ok(Native::Settled(true)),
            Ok(Value::Int(0)) => {
                // Like the script, judge by the header alone.
                let mut get = redis::cmd("GET");
                get.arg(redis_key);
                match self.inner.conn.query(&get).await {
                    Ok(Value::Nil) => Ok(Native::Settled(false)),
                    Ok(Value::BulkString(bytes)) => {
                        let head = envelope::header(&bytes)
                            .map_err(|why| self.unreadable(redis_key, why))?;
                        if head.expires_at > now && head.revision == expected.revision {
                            Ok(Native::Script)
                        } else {
                            Ok(Native::Settled(false))
                        }
                    }
                    Ok(other) => Err(self.unexpected("GET", &other)),
                    Err(e) => Err(self.map_key_err(redis_key, e)),
                }
            }
            Ok(other) => Err(self.unexpected("DELIFEQ", &other)),
            Err(e) if self.refuses_command(&e) => {
                self.give_up_native(&self.inner.native_delete, "delete_if", &e);
                Ok(Native::Script)
            }
            Err(e) => Err(self.map_key_err(redis_key, e)),
        }
    }
}
