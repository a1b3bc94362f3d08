//! `purge_expired`: only expired records, at most `limit` of them.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::sync::Arc;

use idem_core::RecordKey;
use idem_core::store::Versioned;

use super::super::{T0, at, claim, key, must, open, secs};
use crate::StoreFactory;

/// Purge never removes a live record (every backend; one with native expiry
/// may remove nothing).
pub async fn purge_keeps_live_records<F: StoreFactory>(factory: Arc<F>) {
    let store = open(&*factory).await;
    let s = must(&store);
    let live: Vec<(RecordKey, Versioned)> = (0..4)
        .map(|i| (key(&format!("live-{i}")), claim(i + 1, 1, T0, 60 + i)))
        .collect();
    for (k, rec) in &live {
        s.insert(k, rec, T0).await;
    }
    for i in 0..3 {
        let rec = claim(100 + i, 1, T0, 10);
        s.insert(&key(&format!("dead-{i}")), &rec, T0).await;
    }
    let now = at(secs(30));
    let removed = s.purge(now, 1000).await;
    assert!(
        removed <= 3,
        "purge removed {removed} records but only 3 were expired"
    );
    for (k, rec) in &live {
        assert_eq!(
            s.get(k, now).await,
            Some(rec.clone()),
            "purge must not touch a live record"
        );
    }
}

/// Purge removes exactly the records expired at `now` (`expires_at <= now`),
/// physically: afterwards even a `get` at an earlier `now` finds nothing,
/// while every live record is untouched.
pub async fn purge_removes_only_expired<F: StoreFactory>(factory: Arc<F>) {
    let store = open(&*factory).await;
    let s = must(&store);
    let ttls = [10, 20, 30, 30, 31, 40, 50];
    let recs: Vec<(RecordKey, Versioned)> = ttls
        .iter()
        .enumerate()
        .map(|(i, ttl)| (key(&format!("purge-{i}")), claim(i as u64 + 1, 1, T0, *ttl)))
        .collect();
    for (k, rec) in &recs {
        s.insert(k, rec, T0).await;
    }
    let now = at(secs(30));
    assert_eq!(
        s.purge(now, 1000).await,
        4,
        "4 records expire at or before now (TTL 10, 20, 30, 30 s of {ttls:?} at T0 + 30 s)"
    );
    assert_eq!(s.purge(now, 1000).await, 0, "nothing is left to purge");
    for ((k, rec), ttl) in recs.iter().zip(ttls) {
        let want = (ttl > 30).then(|| rec.clone());
        assert_eq!(
            s.get(k, T0).await,
            want,
            "after purge at T0 + 30 s, the record with TTL {ttl} s must be {}",
            if ttl > 30 { "kept" } else { "physically gone" }
        );
    }
}

/// Purge removes at most `limit` records per call; calling it until it
/// returns less than `limit` removes every expired record.
pub async fn purge_respects_its_limit<F: StoreFactory>(factory: Arc<F>) {
    let store = open(&*factory).await;
    let s = must(&store);
    for i in 0..5 {
        s.insert(&key(&format!("old-{i}")), &claim(i + 1, 1, T0, 10), T0)
            .await;
    }
    let live = claim(99, 1, T0, 60);
    s.insert(&key("young"), &live, T0).await;
    let now = at(secs(10));
    let mut rounds = Vec::new();
    loop {
        let n = s.purge(now, 2).await;
        rounds.push(n);
        if n < 2 || rounds.len() > 10 {
            break;
        }
    }
    assert_eq!(
        rounds,
        vec![2, 2, 1],
        "5 expired records purged 2 at a time must take rounds of 2, 2, 1"
    );
    assert_eq!(s.get(&key("young"), now).await, Some(live));
}
