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
/// point of the charge, with a probability.
///
/// # Behavior
/// - `in_charge`: inside the ledger transaction, after the payment row was
///   written and before the commit (the transaction never commits).
/// - `after_charge`: after the ledger commit, before the answer. With the
///   SQLite and PostgreSQL stores the idempotency record committed with the
///   charge; with Redis it is not completed yet (the at-least-once window).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CrashPlan {
    /// Probability of aborting inside the ledger transaction.
    pub in_charge: f64,
    /// Probability of aborting after the ledger commit, before the answer.
    pub after_charge: f64,
}

impl CrashPlan {
    /// Aborts the process with probability `probability`.
    pub(crate) fn maybe_crash(probability: f64, point: &str) {
        if probability > 0.0 && fastrand::f64() < probability {
            eprintln!("idem-demo: injected crash {point}");
            std::process::abort();
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
