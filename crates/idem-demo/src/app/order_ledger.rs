//! The orders' ledger: stock, reservations and receipts, the
//! [`OrderLedger`] trait the stores implement (see
//! [`backend`](crate::backend)), and the rows it lists.

use async_trait::async_trait;
use idem_core::Transition;
use serde::{Deserialize, Serialize};

use super::{CrashPlan, LedgerError};

/// The result of an order's `reserve` phase, as recorded in its checkpoint:
/// everything the later phases need (a resumed order has no request body).
///
/// Its encoding is stored in live keys: change it only compatibly.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// The order: `ord_` and 24 hex digits derived from the reservation's
    /// key, so every attempt of one order names it the same.
    pub order_id: String,
    /// The sku reserved.
    pub sku: String,
    /// How many.
    pub quantity: u32,
    /// The amount to charge, in cents.
    pub amount_cents: u64,
}

/// A reservation to write.
#[derive(Clone, Debug)]
pub struct NewReservation {
    /// The tenant (the key's scope).
    pub tenant: String,
    /// The client's idempotency key.
    pub idempotency_key: String,
    /// The reservation's own key (the `reserve` phase's downstream key):
    /// unique in the ledger, so writing it twice reserves once.
    pub reservation_key: String,
    /// What to reserve.
    pub reservation: Reservation,
}

/// A receipt to write: the `receipt` phase.
#[derive(Clone, Debug)]
pub struct Receipt {
    /// The tenant.
    pub tenant: String,
    /// The order (unique among receipts: writing it twice records one).
    pub order_id: String,
    /// `rcpt_` and 24 hex digits derived from the key.
    pub receipt_id: String,
    /// The card network's charge.
    pub charge_id: String,
}

/// A reservation and its receipt, as listed by `GET /orders`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderRow {
    /// The order.
    pub order_id: String,
    /// The client's idempotency key.
    pub idempotency_key: String,
    /// The sku reserved.
    pub sku: String,
    /// How many.
    pub quantity: u32,
    /// The amount, in cents.
    pub amount_cents: u64,
    /// The receipt, once written.
    pub receipt_id: Option<String>,
    /// The charge the receipt records, once written.
    pub charge_id: Option<String>,
}

/// A sku's stock, as listed by `GET /stock`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stock {
    /// The sku.
    pub sku: String,
    /// The stock it was seeded with (on its first reservation).
    pub initial: u64,
    /// What is left.
    pub available: u64,
}

/// Where orders are recorded.
///
/// # Behavior
/// - A *transactional* ledger shares the idempotency store's database
///   (SQLite, PostgreSQL): [`reserve`](Self::reserve) and
///   [`receipt`](Self::receipt) apply the given [`Transition`] (the phase's
///   checkpoint, the key's completion) in their own transaction.
/// - Every write is idempotent by its key whatever the ledger: a
///   reservation by its `reservation_key` (inserted if absent; the stock is
///   decremented only when it is inserted), a receipt by its order.
#[async_trait]
pub trait OrderLedger: Send + Sync + 'static {
    /// Whether the ledger's transactions can apply the store's transitions.
    fn transactional(&self) -> bool;

    /// Inserts the reservation unless one with its key exists, decrementing
    /// the sku's stock (seeded on first use) when it is inserted, and
    /// applies `checkpoint` in the same transaction; returns the stored
    /// reservation. [`LedgerError::OutOfStock`] (nothing written) if the
    /// stock is short. [`OrderCrashPoint::InReserve`](super::OrderCrashPoint)
    /// of `crash` applies before the commit.
    async fn reserve(
        &self,
        new: &NewReservation,
        checkpoint: Option<&Transition>,
        crash: CrashPlan,
    ) -> Result<Reservation, LedgerError>;

    /// Inserts the receipt unless its order has one, and applies
    /// `completion` in the same transaction.
    /// [`OrderCrashPoint::InReceipt`](super::OrderCrashPoint) of `crash`
    /// applies before the commit.
    async fn receipt(
        &self,
        receipt: &Receipt,
        completion: Option<&Transition>,
        crash: CrashPlan,
    ) -> Result<(), LedgerError>;

    /// The tenant's reservations with their receipts, oldest first.
    async fn orders(&self, tenant: &str) -> Result<Vec<OrderRow>, LedgerError>;

    /// Every sku's stock, by sku.
    async fn stock(&self) -> Result<Vec<Stock>, LedgerError>;
}
