//! The PostgreSQL order ledger: tables in the idempotency store's schema;
//! each phase's rows commit in the same transaction as its checkpoint or
//! the key's completion.

use async_trait::async_trait;
use idem_core::Transition;
use idem_postgres::sqlx::{self, AssertSqlSafe, PgPool, Row};
use idem_postgres::{PostgresStore, TableName as PgTableName};

use crate::app::{
    CrashPlan, LedgerError, NewReservation, OrderCrashPoint, OrderLedger, OrderRow, Receipt,
    Reservation, Stock,
};

fn int(value: u64, what: &str) -> Result<i64, LedgerError> {
    i64::try_from(value).map_err(|_| LedgerError::Row(format!("{what} out of range")))
}

fn uint<T: TryFrom<i64>>(value: i64, what: &str) -> Result<T, LedgerError> {
    T::try_from(value).map_err(|_| LedgerError::Row(format!("{what}: {value} out of range")))
}

/// The statements, over validated table names.
struct Sql {
    insert_reservation: String,
    seed_stock: String,
    take_stock: String,
    get_reservation: String,
    insert_receipt: String,
    list_orders: String,
    list_stock: String,
}

/// The order ledger in the idempotency store's PostgreSQL schema.
pub(super) struct PostgresOrders {
    pool: PgPool,
    store: PostgresStore,
    stock: u64,
    sql: Sql,
}

impl PostgresOrders {
    pub(super) async fn new(
        pool: PgPool,
        store: PostgresStore,
        schema: &str,
        stock: u64,
    ) -> Result<Self, crate::DemoError> {
        // Identifiers come from validated `TableName`s (quoted by Display).
        let stock_table = PgTableName::new(schema, "order_stock")?;
        let reservations = PgTableName::new(schema, "order_reservations")?;
        let receipts = PgTableName::new(schema, "order_receipts")?;
        let index = format!("\"{}_tenant\"", reservations.table());
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(reservations.to_string())
            .execute(&mut *tx)
            .await?;
        for ddl in [
            format!(
                "CREATE TABLE IF NOT EXISTS {stock_table} (\
                    sku TEXT PRIMARY KEY, \
                    initial BIGINT NOT NULL, \
                    available BIGINT NOT NULL)"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {reservations} (\
                    seq BIGSERIAL PRIMARY KEY, \
                    reservation_key TEXT NOT NULL UNIQUE, \
                    order_id TEXT NOT NULL, \
                    tenant TEXT NOT NULL, \
                    idempotency_key TEXT NOT NULL, \
                    sku TEXT NOT NULL, \
                    quantity BIGINT NOT NULL, \
                    amount_cents BIGINT NOT NULL, \
                    created_at TEXT NOT NULL)"
            ),
            format!("CREATE INDEX IF NOT EXISTS {index} ON {reservations} (tenant, seq)"),
            format!(
                "CREATE TABLE IF NOT EXISTS {receipts} (\
                    order_id TEXT PRIMARY KEY, \
                    receipt_id TEXT NOT NULL, \
                    charge_id TEXT NOT NULL, \
                    tenant TEXT NOT NULL, \
                    created_at TEXT NOT NULL)"
            ),
        ] {
            sqlx::query(AssertSqlSafe(ddl)).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        let sql = Sql {
            insert_reservation: format!(
                "INSERT INTO {reservations} \
                 (reservation_key, order_id, tenant, idempotency_key, sku, quantity, amount_cents, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (reservation_key) DO NOTHING"
            ),
            seed_stock: format!(
                "INSERT INTO {stock_table} (sku, initial, available) VALUES ($1, $2, $2) \
                 ON CONFLICT (sku) DO NOTHING"
            ),
            take_stock: format!(
                "UPDATE {stock_table} SET available = available - $2 \
                 WHERE sku = $1 AND available >= $2"
            ),
            get_reservation: format!(
                "SELECT order_id, sku, quantity, amount_cents FROM {reservations} \
                 WHERE reservation_key = $1"
            ),
            insert_receipt: format!(
                "INSERT INTO {receipts} (order_id, receipt_id, charge_id, tenant, created_at) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (order_id) DO NOTHING"
            ),
            list_orders: format!(
                "SELECT r.order_id, r.idempotency_key, r.sku, r.quantity, r.amount_cents, \
                 c.receipt_id, c.charge_id \
                 FROM {reservations} r LEFT JOIN {receipts} c ON c.order_id = r.order_id \
                 WHERE r.tenant = $1 ORDER BY r.seq"
            ),
            list_stock: format!("SELECT sku, initial, available FROM {stock_table} ORDER BY sku"),
        };
        Ok(Self {
            pool,
            store,
            stock,
            sql,
        })
    }
}

#[async_trait]
impl OrderLedger for PostgresOrders {
    fn transactional(&self) -> bool {
        true
    }

    async fn reserve(
        &self,
        new: &NewReservation,
        checkpoint: Option<&Transition>,
        crash: CrashPlan,
    ) -> Result<Reservation, LedgerError> {
        let r = &new.reservation;
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(AssertSqlSafe(self.sql.insert_reservation.clone()))
            .bind(&new.reservation_key)
            .bind(&r.order_id)
            .bind(&new.tenant)
            .bind(&new.idempotency_key)
            .bind(&r.sku)
            .bind(i64::from(r.quantity))
            .bind(int(r.amount_cents, "amount_cents")?)
            .bind(crate::time::now_rfc3339())
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if inserted == 1 {
            sqlx::query(AssertSqlSafe(self.sql.seed_stock.clone()))
                .bind(&r.sku)
                .bind(int(self.stock, "stock")?)
                .execute(&mut *tx)
                .await?;
            let taken = sqlx::query(AssertSqlSafe(self.sql.take_stock.clone()))
                .bind(&r.sku)
                .bind(i64::from(r.quantity))
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if taken != 1 {
                // Dropping `tx` rolls the reservation back.
                return Err(LedgerError::OutOfStock { sku: r.sku.clone() });
            }
        }
        let row = sqlx::query(AssertSqlSafe(self.sql.get_reservation.clone()))
            .bind(&new.reservation_key)
            .fetch_one(&mut *tx)
            .await?;
        let stored = Reservation {
            order_id: row.try_get(0)?,
            sku: row.try_get(1)?,
            quantity: uint(row.try_get(2)?, "quantity")?,
            amount_cents: uint(row.try_get(3)?, "amount_cents")?,
        };
        if let Some(checkpoint) = checkpoint {
            self.store.apply_in(&mut tx, checkpoint).await?;
        }
        crash.order_point(OrderCrashPoint::InReserve);
        tx.commit().await?;
        Ok(stored)
    }

    async fn receipt(
        &self,
        receipt: &Receipt,
        completion: Option<&Transition>,
        crash: CrashPlan,
    ) -> Result<(), LedgerError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(AssertSqlSafe(self.sql.insert_receipt.clone()))
            .bind(&receipt.order_id)
            .bind(&receipt.receipt_id)
            .bind(&receipt.charge_id)
            .bind(&receipt.tenant)
            .bind(crate::time::now_rfc3339())
            .execute(&mut *tx)
            .await?;
        if let Some(completion) = completion {
            self.store.apply_in(&mut tx, completion).await?;
        }
        crash.order_point(OrderCrashPoint::InReceipt);
        tx.commit().await?;
        Ok(())
    }

    async fn orders(&self, tenant: &str) -> Result<Vec<OrderRow>, LedgerError> {
        let rows = sqlx::query(AssertSqlSafe(self.sql.list_orders.clone()))
            .bind(tenant)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter()
            .map(|row| {
                Ok(OrderRow {
                    order_id: row.try_get(0)?,
                    idempotency_key: row.try_get(1)?,
                    sku: row.try_get(2)?,
                    quantity: uint(row.try_get(3)?, "quantity")?,
                    amount_cents: uint(row.try_get(4)?, "amount_cents")?,
                    receipt_id: row.try_get(5)?,
                    charge_id: row.try_get(6)?,
                })
            })
            .collect()
    }

    async fn stock(&self) -> Result<Vec<Stock>, LedgerError> {
        let rows = sqlx::query(AssertSqlSafe(self.sql.list_stock.clone()))
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter()
            .map(|row| {
                Ok(Stock {
                    sku: row.try_get(0)?,
                    initial: uint(row.try_get(1)?, "initial stock")?,
                    available: uint(row.try_get(2)?, "available stock")?,
                })
            })
            .collect()
    }
}
