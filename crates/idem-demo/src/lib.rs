//! # idem-demo
//!
//! A payments service protected by [`idem_tower`], and a retry storm that
//! proves no payment is charged twice.
//!
//! ```text
//! cargo run --release -p idem-demo                      # server on SQLite in a temp dir + the storm
//! cargo run --release -p idem-demo -- storm --store postgres://postgres@127.0.0.1:5432/test
//! cargo run --release -p idem-demo -- serve --addr 127.0.0.1:3000 --store sqlite://payments.db
//! ```
//!
//! The crate is a library with a thin `main`, so the tests drive the same
//! code:
//!
//! - [`app`]: the axum service (`POST /payments`, `GET /payments`,
//!   `POST /orders`, `GET /orders`, `GET /stock`, `GET /health`), its
//!   ledgers, and the completer of abandoned orders.
//! - [`card_network`]: the simulated card network that orders are charged
//!   at (`idem-demo card-network`), with its own idempotency keys and
//!   charge log.
//! - [`backend`]: opening the store a URL names (`sqlite://`, `postgres://`,
//!   `redis://`, …, parsed by [`idemkit`]) and the ledger it goes with.
//! - [`server`]: binding and running the service.
//! - [`storm`]: the retry storm client.
//! - [`report`]: what the storm observed, and its table.
//! - [`cli`]: the command line.
//!
//! ## Guarantees per store
//!
//! | store | where the payments ledger lives | a crash between the charge and the stored response |
//! |---|---|---|
//! | SQLite | same database file, same transaction as the idempotency record | impossible: both commit or neither does |
//! | PostgreSQL | same database (schema `idem_demo`), same transaction | impossible: both commit or neither does |
//! | Redis | a separate SQLite file | **at-least-once window**: the charge committed, the record not yet completed; after the lease lapses a retry charges again |
//!
//! Orders (`POST /orders`) are written with idem's phases (reserve stock →
//! charge at the [`card_network`] with a downstream idempotency key → record
//! the receipt): on **every** store, stock is reserved once and the card
//! network charged once per order, through crashes between and inside the
//! phases, and an order abandoned mid-way is finished by a retry or by the
//! completer (`serve --completer`); `tests/orders_crash.rs` proves it with
//! SIGKILLs on SQLite, PostgreSQL and Redis.
//!
//! ```text
//! idem-demo card-network --listen 127.0.0.1:3001 --log charges.log
//! idem-demo serve --store redis://127.0.0.1:6379 --card-network http://127.0.0.1:3001 --completer
//! ```
#![forbid(unsafe_code)]

pub mod app;
pub mod backend;
pub mod card_network;
pub mod cli;
pub mod report;
pub mod server;
pub mod storm;
mod time;

pub use app::{
    CrashPlan, Ledger, LedgerError, Order, OrderCompleter, OrderCrashPoint, OrderRow, Payment,
    Stock, order_scope, scope_for,
};
pub use backend::{Backend, BackendOptions, StoreUrl};
pub use card_network::{CardNetworkOptions, ChargeLine, RunningCardNetwork};
pub use report::{ScenarioStats, StormReport};
pub use server::RunningServer;
pub use storm::{Scenario, StormConfig};

/// Everything that can go wrong while starting the demo or running the storm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DemoError {
    /// The `--store` URL is not one the demo understands.
    #[error(transparent)]
    InvalidStoreUrl(#[from] idemkit::StoreUrlError),
    /// An option is out of range.
    #[error("invalid option: {0}")]
    InvalidOption(String),
    /// The engine's policy built from the options is invalid.
    #[error(transparent)]
    Policy(#[from] idem_core::PolicyError),
    /// The idempotency store could not be opened.
    #[error(transparent)]
    Store(#[from] idemkit::OpenError),
    /// SQLite failed while opening the store or the ledger.
    #[error("SQLite: {0}")]
    Sqlite(#[from] idem_sqlite::SqliteError),
    /// PostgreSQL failed while connecting or migrating.
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] sqlx::Error),
    /// The PostgreSQL schema name is not a valid identifier.
    #[error("invalid PostgreSQL schema name: {0}")]
    SchemaName(#[from] idem_core::store::TableNameError),
    /// The ledger failed.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// Binding or serving failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The storm's HTTP client failed (not a single request: the client
    /// itself, or the final count of payments).
    #[error("storm client: {0}")]
    Http(#[from] reqwest::Error),
    /// The server answered the storm's final count with something unexpected.
    #[error("storm: {0}")]
    Storm(String),
}
