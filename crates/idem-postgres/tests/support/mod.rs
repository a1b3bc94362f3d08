//! The PostgreSQL hooks of the conformance factory shared by the test
//! targets: stores, schemas, the server and clean-up are idem-testkit's
//! (`IDEM_POSTGRES_URL`; every store in a schema of its own, dropped after
//! its case, or at the end of the run).
#![allow(dead_code)]

use async_trait::async_trait;
use idem_core::{Error, RecordKey, Transition};
use idem_postgres::sqlx::{self, AssertSqlSafe};
use idem_postgres::{ClaimMode, PostgresStore};
use idem_testkit::runner::TransactionEnd;
use idem_testkit::{BackendKind, StoreUrl, Unavailable};

/// Corrupts rows with plain SQL; applies transitions in a transaction on
/// the store's pool.
pub(crate) struct Pg;

/// The factory of the PostgreSQL test targets.
pub(crate) type Factory = idem_testkit::Factory<Pg>;

/// Stores in the default claim mode, [`ClaimMode::Adaptive`].
pub(crate) fn factory() -> Factory {
    Factory::new(BackendKind::Postgres, Pg)
}

/// Stores in [`ClaimMode::SingleStatement`].
pub(crate) fn single_statement() -> Factory {
    factory().with_options("postgres-single-statement", |url| {
        if let StoreUrl::Postgres(pg) = url {
            pg.claim_mode = Some(idem_testkit::idemkit::ClaimMode::SingleStatement);
        }
    })
}

/// Stores in [`ClaimMode::ReadFirst`].
pub(crate) fn read_first() -> Factory {
    factory().with_options("postgres-read-first", |url| {
        if let StoreUrl::Postgres(pg) = url {
            pg.claim_mode = Some(idem_testkit::idemkit::ClaimMode::ReadFirst);
        }
    })
}

/// A store over `store`'s pool and table in `mode`.
pub(crate) fn with_mode(store: &PostgresStore, mode: ClaimMode) -> PostgresStore {
    PostgresStore::builder()
        .with_table(store.table().clone())
        .with_claim_mode(mode)
        .open(store.pool().clone())
}

fn unavailable(what: &str) -> impl Fn(sqlx::Error) -> Unavailable + '_ {
    move |e| Unavailable(format!("{what}: {e}"))
}

#[async_trait]
impl idem_testkit::Hooks for Pg {
    type Store = PostgresStore;

    fn can_corrupt(&self) -> bool {
        true
    }

    async fn corrupt(&self, store: &PostgresStore, key: &RecordKey) -> Result<(), Unavailable> {
        // A fingerprint of 3 bytes: typed columns, yet not a record.
        let sql = format!(
            "UPDATE {} SET fingerprint = '\\x0bad00'::bytea WHERE digest = $1",
            store.table()
        );
        let done = sqlx::query(AssertSqlSafe(sql))
            .bind(&key.digest()[..])
            .execute(store.pool())
            .await
            .map_err(unavailable("corrupt"))?;
        match done.rows_affected() {
            1 => Ok(()),
            n => Err(Unavailable(format!(
                "corrupt: no row under the key ({n} rows)"
            ))),
        }
    }

    fn can_apply_transition(&self) -> bool {
        true
    }

    /// A transaction on the store's pool around `store.apply_in`.
    async fn apply_transition(
        &self,
        store: &PostgresStore,
        transition: &Transition,
        end: TransactionEnd,
    ) -> Result<Result<(), Error>, Unavailable> {
        let mut tx = store.pool().begin().await.map_err(unavailable("begin"))?;
        let applied = store.apply_in(&mut tx, transition).await;
        if applied.is_ok() && end == TransactionEnd::Commit {
            tx.commit().await.map_err(unavailable("commit"))?;
        } else {
            tx.rollback().await.map_err(unavailable("rollback"))?;
        }
        Ok(applied)
    }
}
