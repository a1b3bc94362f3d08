//! Shared by the Redis test targets: the conformance factory's Redis hook
//! (stores, key prefixes, servers and clean-up are idem-testkit's: every
//! store under a prefix of its own, its keys deleted after its case, one
//! key per command on a cluster), and the Redis-specific cases.
#![allow(dead_code, unreachable_pub)]

pub mod cases;

use async_trait::async_trait;
use idem_conformance::Suite;
use idem_core::RecordKey;
use idem_redis::RedisStore;
use idem_testkit::redis::Deployment;
use idem_testkit::{BackendKind, Unavailable};

/// The Redis of the test target; corrupts records behind the store's back.
pub struct Redis(Result<Deployment, Unavailable>);

/// The factory of the Redis test targets.
pub type Factory = idem_testkit::Factory<Redis>;

/// The conformance suite on `kind` (standalone or cluster), with the
/// target's own cases still to add.
pub fn suite(kind: BackendKind) -> Suite<Factory> {
    let deployment = kind.url().and_then(|url| {
        Deployment::of_store_url(&url).ok_or_else(|| Unavailable(format!("not Redis: {url}")))
    });
    Suite::new(Factory::new(kind, Redis(deployment)))
}

/// The server or cluster the factory's stores live on.
pub fn deployment(f: &Factory) -> Deployment {
    f.hooks().0.clone().expect("the runner probed the backend")
}

#[async_trait]
impl idem_testkit::Hooks for Redis {
    type Store = RedisStore;

    fn can_corrupt(&self) -> bool {
        true
    }

    /// Keeps the 25-byte header and replaces the record bytes with ones of an
    /// unknown codec format tag, as a newer version of idem would write them.
    async fn corrupt(&self, store: &RedisStore, key: &RecordKey) -> Result<(), Unavailable> {
        let fail = |e: redis::RedisError| Unavailable(format!("corrupt: {e}"));
        let rk = store.redis_key(key);
        let mut conn = self.0.clone()?.keyed().await.map_err(fail)?;
        let mut value: Vec<u8> = conn.query(redis::cmd("GET").arg(&rk)).await.map_err(fail)?;
        if value.len() < 25 {
            return Err(Unavailable(format!("no record to corrupt at {rk:?}")));
        }
        value.truncate(25);
        value.extend_from_slice(&[0xEE, 1, 2, 3, 4, 5]);
        let () = conn
            .query(redis::cmd("SET").arg(&rk).arg(value).arg("KEEPTTL"))
            .await
            .map_err(fail)?;
        Ok(())
    }
}
