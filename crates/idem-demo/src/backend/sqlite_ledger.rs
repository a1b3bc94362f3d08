//! The SQLite ledgers: one in the idempotency store's own file (same
//! transaction as the key's completion), one in a file of its own (with the
//! Redis and memory stores: the charge commits before the key completes).

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use idem_core::Transition;
use idem_sqlite::rusqlite::{Connection, OptionalExtension, TransactionBehavior};
use idem_sqlite::{SqliteError, SqliteStore};

use crate::app::{CrashPlan, Ledger, LedgerError, Payment};

const SQLITE_LEDGER_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS payments (\
        seq INTEGER PRIMARY KEY, \
        id TEXT NOT NULL UNIQUE, \
        tenant TEXT NOT NULL, \
        idempotency_key TEXT NOT NULL, \
        amount INTEGER NOT NULL, \
        currency TEXT NOT NULL, \
        customer TEXT NOT NULL, \
        created_at TEXT NOT NULL); \
    CREATE INDEX IF NOT EXISTS payments_tenant ON payments (tenant, seq);";

fn sqlite_insert(conn: &Connection, tenant: &str, p: &Payment) -> Result<(), LedgerError> {
    let amount = i64::try_from(p.amount).map_err(|_| LedgerError::Row("amount".into()))?;
    conn.execute(
        "INSERT INTO payments (id, tenant, idempotency_key, amount, currency, customer, created_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        (
            &p.id,
            tenant,
            &p.idempotency_key,
            amount,
            &p.currency,
            &p.customer,
            &p.created_at,
        ),
    )?;
    Ok(())
}

fn sqlite_list(conn: &Connection, tenant: &str) -> Result<Vec<Payment>, LedgerError> {
    let mut statement = conn.prepare_cached(
        "SELECT id, amount, currency, customer, idempotency_key, created_at \
         FROM payments WHERE tenant = ?1 ORDER BY seq",
    )?;
    let rows = statement.query_map([tenant], |row| {
        Ok((
            row.get::<_, String>(0)?,
            row.get::<_, i64>(1)?,
            row.get::<_, String>(2)?,
            row.get::<_, String>(3)?,
            row.get::<_, String>(4)?,
            row.get::<_, String>(5)?,
        ))
    })?;
    let mut payments = Vec::new();
    for row in rows {
        let (id, amount, currency, customer, idempotency_key, created_at) = row?;
        payments.push(Payment {
            amount: u64::try_from(amount)
                .map_err(|_| LedgerError::Row(format!("payment {id}: negative amount")))?,
            id,
            currency,
            customer,
            idempotency_key,
            created_at,
        });
    }
    Ok(payments)
}

/// The ledger in the idempotency store's own SQLite file, written through
/// the store's writer connection, one transaction per charge.
pub(super) struct SqliteLedger {
    store: SqliteStore,
}

impl SqliteLedger {
    pub(super) async fn new(store: SqliteStore) -> Result<Self, LedgerError> {
        store
            .transaction(|tx| -> Result<(), SqliteError> {
                Ok(tx.execute_batch(SQLITE_LEDGER_SCHEMA)?)
            })
            .await?;
        Ok(Self { store })
    }
}

#[async_trait]
impl Ledger for SqliteLedger {
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
        // The card network call happens before the transaction: SQLite has
        // one writer, and a transaction held open for `delay` would hold up
        // every other request.
        tokio::time::sleep(delay).await;
        let (store, tenant, payment, completion) = (
            self.store.clone(),
            tenant.to_string(),
            payment.clone(),
            completion.cloned(),
        );
        self.store
            .transaction(move |tx| -> Result<(), LedgerError> {
                sqlite_insert(tx, &tenant, &payment)?;
                CrashPlan::maybe_crash(crash.in_charge, "inside the charge transaction");
                if let Some(completion) = &completion {
                    store.apply_in(tx, completion)?;
                }
                Ok(())
            })
            .await
    }

    async fn list(&self, tenant: &str) -> Result<Vec<Payment>, LedgerError> {
        let tenant = tenant.to_string();
        self.store
            .transaction(move |tx| sqlite_list(tx, &tenant))
            .await
    }
}

/// A ledger in a SQLite file of its own (with the Redis store): the charge
/// commits on its own, before the key is completed in Redis.
pub(super) struct FileLedger {
    conn: Arc<Mutex<Connection>>,
}

impl FileLedger {
    pub(super) async fn open(path: &Path) -> Result<Self, LedgerError> {
        let path = path.to_path_buf();
        let conn = tokio::task::spawn_blocking(move || -> Result<Connection, LedgerError> {
            let conn = Connection::open(&path)?;
            conn.busy_timeout(Duration::from_secs(5))?;
            let _mode: Option<String> = conn
                .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
                .optional()?;
            conn.execute_batch("PRAGMA synchronous = FULL;")?;
            conn.execute_batch(SQLITE_LEDGER_SCHEMA)?;
            Ok(conn)
        })
        .await??;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    async fn with_conn<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<R, LedgerError> + Send + 'static,
    ) -> Result<R, LedgerError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
            f(&mut conn)
        })
        .await?
    }
}

#[async_trait]
impl Ledger for FileLedger {
    fn transactional(&self) -> bool {
        false
    }

    async fn charge(
        &self,
        tenant: &str,
        payment: &Payment,
        _completion: Option<&Transition>,
        delay: Duration,
        crash: CrashPlan,
    ) -> Result<(), LedgerError> {
        tokio::time::sleep(delay).await;
        let (tenant, payment) = (tenant.to_string(), payment.clone());
        self.with_conn(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            sqlite_insert(&tx, &tenant, &payment)?;
            CrashPlan::maybe_crash(crash.in_charge, "inside the charge transaction");
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn list(&self, tenant: &str) -> Result<Vec<Payment>, LedgerError> {
        let tenant = tenant.to_string();
        self.with_conn(move |conn| sqlite_list(conn, &tenant)).await
    }
}
