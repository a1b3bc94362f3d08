//! The SQLite order ledgers: one in the idempotency store's own file (a
//! phase's rows commit with its checkpoint or the key's completion), one in
//! a file of its own (with the Redis and memory stores: every write is
//! idempotent by its key instead).

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use idem_core::Transition;
use idem_sqlite::rusqlite::{Connection, OptionalExtension, TransactionBehavior};
use idem_sqlite::{SqliteError, SqliteStore};

use crate::app::{
    CrashPlan, LedgerError, NewReservation, OrderCrashPoint, OrderLedger, OrderRow, Receipt,
    Reservation, Stock,
};

const ORDERS_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS order_stock (\
        sku TEXT PRIMARY KEY, \
        initial INTEGER NOT NULL, \
        available INTEGER NOT NULL); \
    CREATE TABLE IF NOT EXISTS order_reservations (\
        seq INTEGER PRIMARY KEY, \
        reservation_key TEXT NOT NULL UNIQUE, \
        order_id TEXT NOT NULL, \
        tenant TEXT NOT NULL, \
        idempotency_key TEXT NOT NULL, \
        sku TEXT NOT NULL, \
        quantity INTEGER NOT NULL, \
        amount_cents INTEGER NOT NULL, \
        created_at TEXT NOT NULL); \
    CREATE INDEX IF NOT EXISTS order_reservations_tenant ON order_reservations (tenant, seq); \
    CREATE TABLE IF NOT EXISTS order_receipts (\
        order_id TEXT PRIMARY KEY, \
        receipt_id TEXT NOT NULL, \
        charge_id TEXT NOT NULL, \
        tenant TEXT NOT NULL, \
        created_at TEXT NOT NULL);";

fn int(value: u64, what: &str) -> Result<i64, LedgerError> {
    i64::try_from(value).map_err(|_| LedgerError::Row(format!("{what} out of range")))
}

fn uint<T: TryFrom<i64>>(value: i64, what: &str) -> Result<T, LedgerError> {
    T::try_from(value).map_err(|_| LedgerError::Row(format!("{what}: {value} out of range")))
}

/// Inserts the reservation unless its key exists, decrementing the stock
/// (seeded with `initial`) when inserted; the stored reservation.
fn reserve_rows(
    conn: &Connection,
    new: &NewReservation,
    initial: u64,
) -> Result<Reservation, LedgerError> {
    let r = &new.reservation;
    let inserted = conn.execute(
        "INSERT INTO order_reservations \
         (reservation_key, order_id, tenant, idempotency_key, sku, quantity, amount_cents, created_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (reservation_key) DO NOTHING",
        (
            &new.reservation_key,
            &r.order_id,
            &new.tenant,
            &new.idempotency_key,
            &r.sku,
            i64::from(r.quantity),
            int(r.amount_cents, "amount_cents")?,
            crate::time::now_rfc3339(),
        ),
    )?;
    if inserted == 1 {
        let initial = int(initial, "stock")?;
        conn.execute(
            "INSERT INTO order_stock (sku, initial, available) VALUES (?1, ?2, ?2) \
             ON CONFLICT (sku) DO NOTHING",
            (&r.sku, initial),
        )?;
        let taken = conn.execute(
            "UPDATE order_stock SET available = available - ?2 WHERE sku = ?1 AND available >= ?2",
            (&r.sku, i64::from(r.quantity)),
        )?;
        if taken != 1 {
            return Err(LedgerError::OutOfStock { sku: r.sku.clone() });
        }
    }
    let (order_id, sku, quantity, amount_cents) = conn.query_row(
        "SELECT order_id, sku, quantity, amount_cents FROM order_reservations \
         WHERE reservation_key = ?1",
        [&new.reservation_key],
        |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, i64>(2)?,
                row.get::<_, i64>(3)?,
            ))
        },
    )?;
    Ok(Reservation {
        order_id,
        sku,
        quantity: uint(quantity, "quantity")?,
        amount_cents: uint(amount_cents, "amount_cents")?,
    })
}

fn receipt_row(conn: &Connection, receipt: &Receipt) -> Result<(), LedgerError> {
    conn.execute(
        "INSERT INTO order_receipts (order_id, receipt_id, charge_id, tenant, created_at) \
         VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (order_id) DO NOTHING",
        (
            &receipt.order_id,
            &receipt.receipt_id,
            &receipt.charge_id,
            &receipt.tenant,
            crate::time::now_rfc3339(),
        ),
    )?;
    Ok(())
}

fn list_orders(conn: &Connection, tenant: &str) -> Result<Vec<OrderRow>, LedgerError> {
    let mut statement = conn.prepare_cached(
        "SELECT r.order_id, r.idempotency_key, r.sku, r.quantity, r.amount_cents, \
         c.receipt_id, c.charge_id \
         FROM order_reservations r LEFT JOIN order_receipts c ON c.order_id = r.order_id \
         WHERE r.tenant = ?1 ORDER BY r.seq",
    )?;
    let rows = statement.query_map([tenant], |row| {
        Ok((
            row.get::<_, String>(0)?,
            row.get::<_, String>(1)?,
            row.get::<_, String>(2)?,
            row.get::<_, i64>(3)?,
            row.get::<_, i64>(4)?,
            row.get::<_, Option<String>>(5)?,
            row.get::<_, Option<String>>(6)?,
        ))
    })?;
    let mut orders = Vec::new();
    for row in rows {
        let (order_id, idempotency_key, sku, quantity, amount_cents, receipt_id, charge_id) = row?;
        orders.push(OrderRow {
            order_id,
            idempotency_key,
            sku,
            quantity: uint(quantity, "quantity")?,
            amount_cents: uint(amount_cents, "amount_cents")?,
            receipt_id,
            charge_id,
        });
    }
    Ok(orders)
}

fn list_stock(conn: &Connection) -> Result<Vec<Stock>, LedgerError> {
    let mut statement =
        conn.prepare_cached("SELECT sku, initial, available FROM order_stock ORDER BY sku")?;
    let rows = statement.query_map([], |row| {
        Ok((
            row.get::<_, String>(0)?,
            row.get::<_, i64>(1)?,
            row.get::<_, i64>(2)?,
        ))
    })?;
    let mut stock = Vec::new();
    for row in rows {
        let (sku, initial, available) = row?;
        stock.push(Stock {
            sku,
            initial: uint(initial, "initial stock")?,
            available: uint(available, "available stock")?,
        });
    }
    Ok(stock)
}

/// The order ledger in the idempotency store's own SQLite file, written
/// through the store's writer connection: each phase's rows commit with
/// the transition given.
pub(super) struct SqliteOrders {
    store: SqliteStore,
    stock: u64,
}

impl SqliteOrders {
    pub(super) async fn new(store: SqliteStore, stock: u64) -> Result<Self, LedgerError> {
        store
            .transaction(|tx| -> Result<(), SqliteError> { Ok(tx.execute_batch(ORDERS_SCHEMA)?) })
            .await?;
        Ok(Self { store, stock })
    }
}

#[async_trait]
impl OrderLedger for SqliteOrders {
    fn transactional(&self) -> bool {
        true
    }

    async fn reserve(
        &self,
        new: &NewReservation,
        checkpoint: Option<&Transition>,
        crash: CrashPlan,
    ) -> Result<Reservation, LedgerError> {
        let (store, new, checkpoint, stock) = (
            self.store.clone(),
            new.clone(),
            checkpoint.cloned(),
            self.stock,
        );
        self.store
            .transaction(move |tx| -> Result<Reservation, LedgerError> {
                let stored = reserve_rows(tx, &new, stock)?;
                if let Some(checkpoint) = &checkpoint {
                    store.apply_in(tx, checkpoint)?;
                }
                crash.order_point(OrderCrashPoint::InReserve);
                Ok(stored)
            })
            .await
    }

    async fn receipt(
        &self,
        receipt: &Receipt,
        completion: Option<&Transition>,
        crash: CrashPlan,
    ) -> Result<(), LedgerError> {
        let (store, receipt, completion) =
            (self.store.clone(), receipt.clone(), completion.cloned());
        self.store
            .transaction(move |tx| -> Result<(), LedgerError> {
                receipt_row(tx, &receipt)?;
                if let Some(completion) = &completion {
                    store.apply_in(tx, completion)?;
                }
                crash.order_point(OrderCrashPoint::InReceipt);
                Ok(())
            })
            .await
    }

    async fn orders(&self, tenant: &str) -> Result<Vec<OrderRow>, LedgerError> {
        let tenant = tenant.to_string();
        self.store
            .transaction(move |tx| list_orders(tx, &tenant))
            .await
    }

    async fn stock(&self) -> Result<Vec<Stock>, LedgerError> {
        self.store.transaction(move |tx| list_stock(tx)).await
    }
}

/// The order ledger in a SQLite file of its own (with the Redis and memory
/// stores): each write commits on its own, idempotent by its key.
pub(super) struct FileOrders {
    conn: Arc<Mutex<Connection>>,
    stock: u64,
}

impl FileOrders {
    pub(super) async fn open(path: &Path, stock: u64) -> Result<Self, LedgerError> {
        let path = path.to_path_buf();
        let conn = tokio::task::spawn_blocking(move || -> Result<Connection, LedgerError> {
            let conn = Connection::open(&path)?;
            conn.busy_timeout(Duration::from_secs(5))?;
            let _mode: Option<String> = conn
                .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
                .optional()?;
            conn.execute_batch("PRAGMA synchronous = FULL;")?;
            conn.execute_batch(ORDERS_SCHEMA)?;
            Ok(conn)
        })
        .await??;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            stock,
        })
    }

    /// Runs `f` in an `IMMEDIATE` transaction, committing if it returns `Ok`.
    async fn transaction<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<R, LedgerError> + Send + 'static,
    ) -> Result<R, LedgerError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let value = f(&tx)?;
            tx.commit()?;
            Ok(value)
        })
        .await?
    }
}

#[async_trait]
impl OrderLedger for FileOrders {
    fn transactional(&self) -> bool {
        false
    }

    async fn reserve(
        &self,
        new: &NewReservation,
        _checkpoint: Option<&Transition>,
        crash: CrashPlan,
    ) -> Result<Reservation, LedgerError> {
        let (new, stock) = (new.clone(), self.stock);
        self.transaction(move |tx| {
            let stored = reserve_rows(tx, &new, stock)?;
            crash.order_point(OrderCrashPoint::InReserve);
            Ok(stored)
        })
        .await
    }

    async fn receipt(
        &self,
        receipt: &Receipt,
        _completion: Option<&Transition>,
        crash: CrashPlan,
    ) -> Result<(), LedgerError> {
        let receipt = receipt.clone();
        self.transaction(move |tx| {
            receipt_row(tx, &receipt)?;
            crash.order_point(OrderCrashPoint::InReceipt);
            Ok(())
        })
        .await
    }

    async fn orders(&self, tenant: &str) -> Result<Vec<OrderRow>, LedgerError> {
        let tenant = tenant.to_string();
        self.transaction(move |tx| list_orders(tx, &tenant)).await
    }

    async fn stock(&self) -> Result<Vec<Stock>, LedgerError> {
        self.transaction(list_stock).await
    }
}
