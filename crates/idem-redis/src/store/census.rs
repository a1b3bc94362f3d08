//! [`Store::census`](idem_core::store::Store::census) on Redis: `SCAN` the
//! store's keys on every master, `MGET` their values, tally them with
//! [`Census::tally`], and stop after the sample.

use std::collections::HashSet;

use idem_core::Timestamp;
use idem_core::store::{Census, Coverage, StoreError};
use redis::Value;

use super::{RedisStore, printable_key};
use crate::connection::Node;
use crate::envelope;

/// `SCAN … COUNT`: how many slots of the keyspace each `SCAN` call looks
/// at (a hint; Redis returns about as many keys, fewer when other keys share
/// the database).
const SCAN_COUNT: usize = 1_000;

/// The most keys read by one `MGET`.
const MGET_KEYS: usize = 1_000;

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

/// A census in progress.
struct Tally {
    census: Census,
    now: Timestamp,
    /// The sample size asked for.
    sample: usize,
    /// Records counted.
    counted: usize,
    /// The digests of the keys already looked at (`SCAN` may return a key
    /// twice, and a key may be on two masters while a slot migrates).
    seen: HashSet<[u8; 32]>,
    /// Values that are not records, and one of their keys (for the log).
    skipped: u64,
    skipped_example: Option<String>,
}

impl Tally {
    /// Whether another record may still be counted.
    fn full(&self) -> bool {
        self.counted >= self.sample
    }
}

impl RedisStore {
    /// The census behind [`Store::census`](idem_core::store::Store::census);
    /// see its docs in `primitives.rs`.
    pub(super) async fn scan_census(
        &self,
        now: Timestamp,
        sample: usize,
    ) -> Result<Census, StoreError> {
        let nodes = self
            .inner
            .conn
            .masters()
            .await
            .map_err(|e| self.map_err(e))?;
        let mut tally = Tally {
            census: Census::new(Coverage::Exact),
            now,
            sample,
            counted: 0,
            seen: HashSet::new(),
            skipped: 0,
            skipped_example: None,
        };
        let pattern = match_pattern(self.prefix());
        let mut complete = true;
        for node in &nodes {
            if !self.scan_node(node, &pattern, &mut tally).await? {
                complete = false;
                break;
            }
        }
        if tally.skipped > 0 {
            tracing::warn!(
                store = self.inner.name,
                values = tally.skipped,
                example = tally.skipped_example.as_deref().unwrap_or_default(),
                "idem-redis: census found values under the store's prefix that are not records (counted as unreadable)"
            );
        }
        tally.census.unreadable = tally.skipped;
        if !complete {
            tally.census.coverage = Coverage::Sampled {
                limit: u64::try_from(sample).unwrap_or(u64::MAX),
            };
        }
        Ok(tally.census)
    }

    /// Scans `node` to the end, counting into `tally`; `false` if it stopped
    /// because the sample was full and another record was found.
    async fn scan_node(
        &self,
        node: &Node,
        pattern: &[u8],
        tally: &mut Tally,
    ) -> Result<bool, StoreError> {
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
            let prefix = self.prefix().as_bytes();
            let fresh: Vec<Vec<u8>> = keys
                .into_iter()
                .filter(|key| {
                    let digest = key
                        .strip_prefix(prefix)
                        .and_then(|d| <[u8; 32]>::try_from(d).ok());
                    digest.is_some_and(|d| tally.seen.insert(d))
                })
                .collect();
            let mut rest = &fresh[..];
            while !rest.is_empty() {
                // Read no more than the sample needs (plus one, to learn
                // whether more remain); nil or unreadable values ask for more.
                let want = (tally.sample - tally.counted.min(tally.sample))
                    .saturating_add(1)
                    .min(MGET_KEYS)
                    .min(rest.len());
                let (chunk, tail) = rest.split_at(want);
                rest = tail;
                if !self.count_values(chunk, tally).await? {
                    return Ok(false);
                }
            }
            if next == 0 {
                return Ok(true);
            }
            cursor = next;
        }
    }

    /// Reads `keys` (one `MGET`; the cluster client splits it by slot) and
    /// tallies their records; `false` if a record was found with the sample
    /// already full.
    async fn count_values(&self, keys: &[Vec<u8>], tally: &mut Tally) -> Result<bool, StoreError> {
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
                tally.skipped += 1;
                tally
                    .skipped_example
                    .get_or_insert_with(|| printable_key(key));
                continue;
            };
            if tally.full() {
                return Ok(false);
            }
            tally.census.tally(&versioned.record, tally.now);
            tally.counted += 1;
        }
        Ok(true)
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
