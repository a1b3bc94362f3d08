//! Walking the store's own records: `SCAN` the store's keys on every
//! master, `MGET` their values, decode them, and hand each record to a
//! [`Sink`] (the census, the search for abandoned records).

use std::collections::HashSet;
use std::ops::ControlFlow;

use idem_core::store::{StoreError, Versioned};
use redis::Value;

use super::{RedisStore, printable_key};
use crate::connection::Node;
use crate::envelope;

/// `SCAN … COUNT`: how many slots of the keyspace each `SCAN` call looks
/// at (a hint; Redis returns about as many keys, fewer when other keys share
/// the database).
pub(super) const SCAN_COUNT: usize = 1_000;

/// The most keys read by one `MGET`.
pub(super) const MGET_KEYS: usize = 1_000;

/// The `SCAN … MATCH` pattern of the store's own keys: the prefix with the
/// glob characters escaped, then exactly 32 bytes (the digest), so that a
/// store whose prefix extends this one's is not matched.
pub(crate) fn match_pattern(prefix: &str) -> Vec<u8> {
    let mut pattern = Vec::with_capacity(prefix.len() * 2 + 32);
    for &b in prefix.as_bytes() {
        if matches!(b, b'*' | b'?' | b'[' | b']' | b'\\') {
            pattern.push(b'\\');
        }
        pattern.push(b);
    }
    pattern.extend_from_slice(&[b'?'; 32]);
    pattern
}

/// Where a walk puts the records it reads.
pub(super) trait Sink {
    /// How many more records the sink takes (`usize::MAX`: every one); the
    /// walk reads no more values than that, plus one, per `MGET`.
    fn room(&self) -> usize;

    /// Takes the record stored at `key`; `Break` if the sink is full and
    /// did not take it: the walk stops there.
    fn take(&mut self, key: &[u8], record: Versioned) -> ControlFlow<()>;
}

/// How a walk ended.
pub(super) struct Walked {
    /// `true` if every key was looked at; `false` if the sink stopped it.
    pub(super) complete: bool,
    /// Values under the prefix that are not records (foreign or damaged
    /// bytes), skipped.
    pub(super) skipped: u64,
    /// One of their keys, printable (for the log).
    pub(super) skipped_example: Option<String>,
}

/// A walk in progress.
struct Walk<'a, S> {
    sink: &'a mut S,
    /// The digests of the keys already looked at (`SCAN` may return a key
    /// twice, and a key may be on two masters while a slot migrates).
    seen: HashSet<[u8; 32]>,
    skipped: u64,
    skipped_example: Option<String>,
}

impl RedisStore {
    /// Walks the store's records: `SCAN cursor MATCH <prefix><32 × ?>
    /// COUNT 1000` on the server, or on each master of a cluster in turn,
    /// then one `MGET` per batch of new keys (split by slot on a cluster),
    /// each record decoded and handed to `sink`, each key once.
    ///
    /// # Behavior
    /// - A master the cluster client is not connected to is a transient
    ///   error, never a silently partial walk.
    /// - A key gone between `SCAN` and `MGET`, or of another Redis type
    ///   (`MGET` answers nil for both), is not handed over; a string value
    ///   that is not a record is skipped and counted in [`Walked`].
    /// - Stops when `sink` refuses a record.
    pub(super) async fn walk<S: Sink>(&self, sink: &mut S) -> Result<Walked, StoreError> {
        let nodes = self
            .inner
            .conn
            .masters()
            .await
            .map_err(|e| self.map_err(e))?;
        let mut walk = Walk {
            sink,
            seen: HashSet::new(),
            skipped: 0,
            skipped_example: None,
        };
        let pattern = match_pattern(self.prefix());
        let mut complete = true;
        for node in &nodes {
            if self.walk_node(node, &pattern, &mut walk).await?.is_break() {
                complete = false;
                break;
            }
        }
        Ok(Walked {
            complete,
            skipped: walk.skipped,
            skipped_example: walk.skipped_example,
        })
    }

    /// Scans `node` to the end, or until the sink stops the walk.
    async fn walk_node<S: Sink>(
        &self,
        node: &Node,
        pattern: &[u8],
        walk: &mut Walk<'_, S>,
    ) -> Result<ControlFlow<()>, StoreError> {
        let prefix = self.prefix().as_bytes();
        let mut cursor: u64 = 0;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT);
            let reply = self
                .inner
                .conn
                .query_node(node, &scan)
                .await
                .map_err(|e| self.map_err(e))?;
            let (next, keys): (u64, Vec<Vec<u8>>) =
                redis::from_redis_value_ref(&reply).map_err(|_| self.unexpected("SCAN", &reply))?;
            let fresh: Vec<Vec<u8>> = keys
                .into_iter()
                .filter(|key| {
                    let digest = key
                        .strip_prefix(prefix)
                        .and_then(|d| <[u8; 32]>::try_from(d).ok());
                    digest.is_some_and(|d| walk.seen.insert(d))
                })
                .collect();
            let mut rest = &fresh[..];
            while !rest.is_empty() {
                // Read no more than the sink takes (plus one, to learn
                // whether more remain); nil or unreadable values ask for more.
                let want = walk
                    .sink
                    .room()
                    .saturating_add(1)
                    .min(MGET_KEYS)
                    .min(rest.len());
                let (chunk, tail) = rest.split_at(want);
                rest = tail;
                if self.read_values(chunk, walk).await?.is_break() {
                    return Ok(ControlFlow::Break(()));
                }
            }
            if next == 0 {
                return Ok(ControlFlow::Continue(()));
            }
            cursor = next;
        }
    }

    /// Reads `keys` (one `MGET`; the cluster client splits it by slot) and
    /// hands their records to the sink.
    async fn read_values<S: Sink>(
        &self,
        keys: &[Vec<u8>],
        walk: &mut Walk<'_, S>,
    ) -> Result<ControlFlow<()>, StoreError> {
        let mut mget = redis::cmd("MGET");
        for key in keys {
            mget.arg(key);
        }
        let reply = self
            .inner
            .conn
            .query(&mget)
            .await
            .map_err(|e| self.map_err(e))?;
        let values = match reply {
            Value::Array(values) if values.len() == keys.len() => values,
            other => return Err(self.unexpected("MGET", &other)),
        };
        for (key, value) in keys.iter().zip(values) {
            let record = match value {
                // Gone since the SCAN (deleted, or dropped by `PX`), or
                // another Redis type (`MGET` answers nil for those too).
                Value::Nil => continue,
                Value::BulkString(bytes) => envelope::decode(&bytes).ok(),
                _ => None,
            };
            let Some(versioned) = record else {
                walk.skipped += 1;
                walk.skipped_example
                    .get_or_insert_with(|| printable_key(key));
                continue;
            };
            if walk.sink.take(key, versioned).is_break() {
                return Ok(ControlFlow::Break(()));
            }
        }
        Ok(ControlFlow::Continue(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pattern_escapes_globs_and_fixes_the_length() {
        let mut want = b"a\\*b\\?c\\[d\\]e\\\\:".to_vec();
        want.extend_from_slice(&[b'?'; 32]);
        assert_eq!(match_pattern("a*b?c[d]e\\:"), want);
        assert_eq!(match_pattern("").len(), 32);
    }
}
