//! The named cases. Each is a plain `async fn` over a [`StoreFactory`].
// This module is test code: a failed expectation is a failed case, reported
// by the harness with its message.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::sync::Arc;

use idem_core::{
    FencingToken, Fingerprint, IdempotencyKey, Inserted, Policy, Record, RecordKey, Revision,
    Scope, Store, Timestamp, Versioned,
};

use crate::{Case, Requires, StoreFactory};

/// Every case of the suite, in order.
pub fn all<F: StoreFactory>() -> Vec<Case<F>> {
    vec![
        Case::new("store::insert_on_absent", Requires::Always, |f| {
            Box::pin(insert_on_absent(f))
        }),
        Case::new(
            "store::insert_on_existing_returns_it",
            Requires::Always,
            |f| Box::pin(insert_on_existing_returns_it(f)),
        ),
    ]
}

const T0: Timestamp = Timestamp::from_millis(1_800_000_000_000);

fn key(name: &str) -> RecordKey {
    let key = IdempotencyKey::parse(name).expect("test keys are valid");
    RecordKey::new(&Scope::tenant("conformance"), &key)
}

fn claim(rev: u64, token: u128, now: Timestamp) -> Versioned {
    Versioned {
        revision: Revision::from_u64(rev),
        record: Record::new_claim(
            Fingerprint::of(b"request"),
            FencingToken::from_u128(token),
            now,
            &Policy::default(),
        ),
    }
}

/// Insert on an absent key writes the record, and `get` reads it back.
pub async fn insert_on_absent<F: StoreFactory>(factory: Arc<F>) {
    let store = factory.open().await.expect("open");
    let k = key("absent");
    let rec = claim(1, 1, T0);
    assert_eq!(store.get(&k, T0).await.expect("get"), None);
    assert_eq!(
        store.insert_if_absent(&k, &rec, T0).await.expect("insert"),
        Inserted::Inserted
    );
    assert_eq!(store.get(&k, T0).await.expect("get"), Some(rec));
}

/// Insert on a live key writes nothing and returns the live record.
pub async fn insert_on_existing_returns_it<F: StoreFactory>(factory: Arc<F>) {
    let store = factory.open().await.expect("open");
    let k = key("existing");
    let first = claim(1, 1, T0);
    let second = claim(2, 2, T0);
    store
        .insert_if_absent(&k, &first, T0)
        .await
        .expect("insert");
    assert_eq!(
        store
            .insert_if_absent(&k, &second, T0)
            .await
            .expect("insert"),
        Inserted::Exists(first.clone())
    );
    assert_eq!(store.get(&k, T0).await.expect("get"), Some(first));
}
