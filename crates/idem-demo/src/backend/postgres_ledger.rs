//! The PostgreSQL ledger: a table in the idempotency store's schema; each
//! charge commits in the same transaction as its key's completion.

use std::time::Duration;

use async_trait::async_trait;
use idem_core::Transition;
use idem_postgres::sqlx::{self, AssertSqlSafe, PgPool, Row};
use idem_postgres::{PostgresStore, TableName as PgTableName};

use crate::app::{CrashPlan, Ledger, LedgerError, Payment};

/// The ledger in the idempotency store's PostgreSQL schema; each charge and
/// its idempotency record commit in one transaction.
pub(super) struct PostgresLedger {
    pool: PgPool,
    store: PostgresStore,
    insert: String,
    list: String,
}

impl PostgresLedger {
    pub(super) async fn new(
        pool: PgPool,
        store: PostgresStore,
        table: &PgTableName,
    ) -> Result<Self, LedgerError> {
        // Identifiers come from a validated `TableName` (quoted by Display).
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(table.to_string())
            .execute(&mut *tx)
            .await?;
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE IF NOT EXISTS {table} (\
                seq BIGSERIAL PRIMARY KEY, \
                id TEXT NOT NULL UNIQUE, \
                tenant TEXT NOT NULL, \
                idempotency_key TEXT NOT NULL, \
                amount BIGINT NOT NULL, \
                currency TEXT NOT NULL, \
                customer TEXT NOT NULL, \
                created_at TEXT NOT NULL)"
        )))
        .execute(&mut *tx)
        .await?;
        let index = format!("\"{}_tenant\"", table.table());
        sqlx::query(AssertSqlSafe(format!(
            "CREATE INDEX IF NOT EXISTS {index} ON {table} (tenant, seq)"
        )))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Self {
            pool,
            store,
            insert: format!(
                "INSERT INTO {table} (id, tenant, idempotency_key, amount, currency, customer, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)"
            ),
            list: format!(
                "SELECT id, amount, currency, customer, idempotency_key, created_at \
                 FROM {table} WHERE tenant = $1 ORDER BY seq"
            ),
        })
    }
}

#[async_trait]
impl Ledger for PostgresLedger {
    fn transactional(&self) -> bool {
        true
    }

    async fn charge(
        &self,
        tenant: &str,
        payment: &Payment,
        completion: Option<&Transition>,
        delay: Duration,
        crash: CrashPlan,
    ) -> Result<(), LedgerError> {
        let amount =
            i64::try_from(payment.amount).map_err(|_| LedgerError::Row("amount".into()))?;
        let mut tx = self.pool.begin().await?;
        sqlx::query(AssertSqlSafe(self.insert.clone()))
            .bind(&payment.id)
            .bind(tenant)
            .bind(&payment.idempotency_key)
            .bind(amount)
            .bind(&payment.currency)
            .bind(&payment.customer)
            .bind(&payment.created_at)
            .execute(&mut *tx)
            .await?;
        // The card network call, while the payment row is written but not
        // committed: a crash now rolls it back with the transaction.
        tokio::time::sleep(delay).await;
        CrashPlan::maybe_crash(crash.in_charge, "inside the charge transaction");
        if let Some(completion) = completion {
            self.store.apply_in(&mut tx, completion).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn list(&self, tenant: &str) -> Result<Vec<Payment>, LedgerError> {
        let rows = sqlx::query(AssertSqlSafe(self.list.clone()))
            .bind(tenant)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter()
            .map(|row| {
                let id: String = row.try_get(0)?;
                let amount: i64 = row.try_get(1)?;
                Ok(Payment {
                    amount: u64::try_from(amount)
                        .map_err(|_| LedgerError::Row(format!("payment {id}: negative amount")))?,
                    id,
                    currency: row.try_get(2)?,
                    customer: row.try_get(3)?,
                    idempotency_key: row.try_get(4)?,
                    created_at: row.try_get(5)?,
                })
            })
            .collect()
    }
}
