//! The kit against the real servers: isolated stores of every backend see
//! only their own records, a second instance sees the same ones, and
//! nothing is left once the handle is dropped.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use idem_core::store::Store;
use idem_core::{Clock, Engine, Fingerprint, IdempotencyKey, RecordKey, Scope, SystemClock};
use idem_testkit::redis::Deployment;
use idem_testkit::runner::Suite;
use idem_testkit::{BackendKind, Isolated, StoreUrl, postgres};

fn key(n: u8) -> (Scope, IdempotencyKey) {
    let key = IdempotencyKey::parse(&format!("key-{n}")).unwrap();
    (Scope::tenant("testkit"), key)
}

/// Runs one operation under key `n`: one record.
async fn write(store: Arc<dyn Store>, n: u8) {
    let (scope, key) = key(n);
    Engine::new(store)
        .execute(&scope, &key, Fingerprint::of(b"body"), || async {
            "done".to_string()
        })
        .await
        .unwrap();
}

async fn present(store: Arc<dyn Store>, n: u8) -> bool {
    let (scope, key) = key(n);
    let found = store
        .get(&RecordKey::new(&scope, &key), SystemClock.now())
        .await;
    found.unwrap().is_some()
}

fn main() -> std::process::ExitCode {
    Suite::new("idem-testkit")
        .each(
            &BackendKind::ALL,
            "isolated_counts_its_own_records",
            |kind| async move {
                let a = Isolated::fresh(kind).await;
                let b = Isolated::fresh(kind).await;
                write(a.store(), 1).await;
                write(a.store(), 2).await;
                write(b.store(), 1).await;
                assert_eq!(a.records().await.unwrap(), 2);
                assert_eq!(b.records().await.unwrap(), 1);
                let second = a.reopen().await.unwrap().erased();
                assert!(present(second.clone(), 2).await);
                assert!(!present(second, 3).await);
            },
        )
        .each(
            &BackendKind::DURABLE,
            "dropping_removes_everything",
            |kind| async move {
                let isolated = Isolated::fresh(kind).await;
                write(isolated.store(), 7).await;
                let url = isolated.url().clone();
                drop(isolated);
                match &url {
                    StoreUrl::Sqlite(s) => {
                        let dir = s.path.as_ref().unwrap().parent().unwrap().to_path_buf();
                        assert!(!dir.exists(), "{} is left behind", dir.display());
                    }
                    StoreUrl::Postgres(pg) => {
                        let mut conn =
                            postgres::connect(&pg.connection_url(), postgres::CONNECT_TIMEOUT)
                                .await
                                .unwrap();
                        let schema = pg.schema.clone().unwrap();
                        let n: i64 = idem_postgres::sqlx::query_scalar(
                        "SELECT count(*) FROM information_schema.schemata WHERE schema_name = $1",
                    )
                    .bind(&schema)
                    .fetch_one(&mut conn)
                    .await
                    .unwrap();
                        assert_eq!(n, 0, "schema {schema} is left behind");
                    }
                    StoreUrl::Redis(r) => {
                        let prefix = r.prefix.clone().unwrap();
                        let left = Deployment::of(r).count(&prefix).await.unwrap();
                        assert_eq!(left, 0, "keys under {prefix} are left behind");
                    }
                    other => panic!("unexpected {other}"),
                }
            },
        )
        .test("backend_names", || async {
            for kind in BackendKind::ALL {
                assert_eq!(BackendKind::parse(kind.name()), Some(kind));
            }
            assert_eq!(
                BackendKind::parse("redis_cluster"),
                Some(BackendKind::RedisCluster)
            );
            assert_eq!(BackendKind::parse("mysql"), None);
        })
        .run()
}
