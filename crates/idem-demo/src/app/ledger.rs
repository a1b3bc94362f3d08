//! The payments ledger: the [`Payment`] record, the [`Ledger`] trait the
//! stores implement (see [`backend`](crate::backend)), its [`LedgerError`],
//! and the test-only [`CrashPlan`] that aborts the server inside a charge.

use std::time::Duration;

use async_trait::async_trait;
use idem_core::{Error as IdemError, Transition};
use serde::{Deserialize, Serialize};

/// A payment, as answered by `POST /payments` and listed by `GET /payments`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payment {
    /// `pay_` and 24 hex digits.
    pub id: String,
    /// The amount, in the currency's minor unit.
    pub amount: u64,
    /// ISO 4217 code.
    pub currency: String,
    /// The customer charged.
    pub customer: String,
    /// The idempotency key the payment was created with.
    pub idempotency_key: String,
    /// When it was charged (RFC 3339, UTC).
    pub created_at: String,
}

/// Test-only fault injection: the server aborts (as `kill -9` would) at a
/// point of a payment's charge or of an order's phases, with a probability.
///
/// # Behavior
/// - `in_charge`: inside the ledger transaction, after the payment row was
///   written and before the commit (the transaction never commits).
/// - `after_charge`: after the ledger commit, before the answer. With the
///   SQLite and PostgreSQL stores the idempotency record committed with the
///   charge; with Redis it is not completed yet (the at-least-once window).
/// - `orders`: at each [`OrderCrashPoint`] an order passes (in a request or
///   in the completer), the probability of aborting there.
/// - `order_at`: abort every time an order reaches this point.
///
/// Each injected abort first writes one line to stderr: `idem-demo:
/// injected crash …` for a payment, `idem-demo: injected order crash
/// <point>` for an order.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CrashPlan {
    /// Probability of aborting inside the ledger transaction.
    pub in_charge: f64,
    /// Probability of aborting after the ledger commit, before the answer.
    pub after_charge: f64,
    /// Probability of aborting at each crash point of an order.
    pub orders: f64,
    /// The order crash point where the server always aborts, if any.
    pub order_at: Option<OrderCrashPoint>,
}

impl CrashPlan {
    /// Aborts the process with probability `probability`.
    pub(crate) fn maybe_crash(probability: f64, point: &str) {
        if probability > 0.0 && fastrand::f64() < probability {
            eprintln!("idem-demo: injected crash {point}");
            std::process::abort();
        }
    }

    /// Aborts the process if the plan says so at `point` of an order.
    pub(crate) fn order_point(&self, point: OrderCrashPoint) {
        let always = self.order_at == Some(point);
        if always || (self.orders > 0.0 && fastrand::f64() < self.orders) {
            eprintln!("idem-demo: injected order crash {}", point.name());
            std::process::abort();
        }
    }
}

/// Where an order's flow can be aborted by a [`CrashPlan`] (test only), in
/// the order an order passes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
#[non_exhaustive]
pub enum OrderCrashPoint {
    /// Inside the reservation's transaction, before its commit.
    InReserve,
    /// After the reservation committed: with SQLite and PostgreSQL its
    /// checkpoint committed with it; with Redis and memory, before the
    /// checkpoint is written.
    AfterReserve,
    /// After the card network answered the charge, before its checkpoint.
    AfterCardNetwork,
    /// After the charge's checkpoint.
    AfterCharge,
    /// Inside the receipt's transaction, before its commit.
    InReceipt,
    /// After the receipt committed (with SQLite and PostgreSQL in a request:
    /// with the key's completion), before the answer.
    AfterReceipt,
}

impl OrderCrashPoint {
    /// Every point, in flow order.
    pub const ALL: [Self; 6] = [
        Self::InReserve,
        Self::AfterReserve,
        Self::AfterCardNetwork,
        Self::AfterCharge,
        Self::InReceipt,
        Self::AfterReceipt,
    ];

    /// The point's name (as on the command line: `after-charge`, …).
    pub fn name(self) -> &'static str {
        match self {
            Self::InReserve => "in-reserve",
            Self::AfterReserve => "after-reserve",
            Self::AfterCardNetwork => "after-card-network",
            Self::AfterCharge => "after-charge",
            Self::InReceipt => "in-receipt",
            Self::AfterReceipt => "after-receipt",
        }
    }
}

/// A ledger failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    /// The idempotency claim was taken over (its lease lapsed) before the
    /// charge committed; nothing was charged.
    #[error("the idempotency lease was lost before the charge committed: {0}")]
    LeaseLost(#[source] IdemError),
    /// Completing the idempotency record in the transaction failed; nothing
    /// was charged.
    #[error("completing the idempotency record failed: {0}")]
    Completion(#[source] IdemError),
    /// SQLite failed.
    #[error("ledger (SQLite): {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The idem SQLite store failed.
    #[error("ledger (idem-sqlite): {0}")]
    SqliteStore(#[from] idem_sqlite::SqliteError),
    /// PostgreSQL failed.
    #[error("ledger (PostgreSQL): {0}")]
    Postgres(#[from] sqlx::Error),
    /// The blocking ledger task failed.
    #[error("ledger task: {0}")]
    Join(#[from] tokio::task::JoinError),
    /// A stored row does not make a payment.
    #[error("ledger row: {0}")]
    Row(String),
    /// Not enough stock of the sku for an order; nothing was reserved.
    #[error("not enough stock of {sku}")]
    OutOfStock {
        /// The sku.
        sku: String,
    },
}

impl From<IdemError> for LedgerError {
    fn from(e: IdemError) -> Self {
        match e {
            IdemError::LeaseLost(_) => Self::LeaseLost(e),
            other => Self::Completion(other),
        }
    }
}

/// Where payments are recorded.
#[async_trait]
pub trait Ledger: Send + Sync + 'static {
    /// Whether a charge commits together with its idempotency record (the
    /// handler then passes the completion to [`charge`](Self::charge)).
    fn transactional(&self) -> bool;

    /// Records `payment` for `tenant`, after a simulated card network call
    /// of `delay`. A transactional ledger applies `completion` in the same
    /// transaction; `in_charge` of `crash` applies inside the transaction.
    async fn charge(
        &self,
        tenant: &str,
        payment: &Payment,
        completion: Option<&Transition>,
        delay: Duration,
        crash: CrashPlan,
    ) -> Result<(), LedgerError>;

    /// The tenant's payments, oldest first.
    async fn list(&self, tenant: &str) -> Result<Vec<Payment>, LedgerError>;
}
