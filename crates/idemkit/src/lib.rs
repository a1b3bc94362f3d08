//! # idemkit
//!
//! **One dependency for idempotency keys.** idemkit re-exports idem's
//! application API (the [`Engine`], keys, scopes, fingerprints, policies, the
//! [`store`] contract), and, behind cargo features, the backends, the HTTP
//! integrations (tower/axum/tonic, actix-web) and the client; and it opens any store from a URL with
//! [`store_from_url`], the one parser of store URLs that the demo, the
//! operator CLI and the tests share.
//!
//! ```toml
//! [dependencies]
//! idemkit = { version = "0.1", features = ["tower"] }
//! ```
//!
//! ```no_run
//! # #[cfg(feature = "tower")]
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use idemkit::{Engine, Scope, tower::{IdempotencyLayer, scope_from_extension}};
//! # #[derive(Clone)] struct Tenant(String);
//! # let charge = || async { "charged once" };
//! let engine = Engine::new(idemkit::store_from_url("sqlite://idem.db").await?);
//! let scope = scope_from_extension(|t: &Tenant| Scope::tenant(t.0.clone()));
//! let app = axum::Router::new()
//!     .route("/payments", axum::routing::post(charge))
//!     .layer(IdempotencyLayer::new(engine, scope));
//! # let _: axum::Router = app; Ok(()) }
//! # #[cfg(not(feature = "tower"))] fn main() {}
//! ```
//!
//! ## Features
//!
//! | feature | brings | as |
//! |---|---|---|
//! | `sqlite` (default) | `idem-sqlite`: the embedded store, `sqlite://` URLs | [`sqlite`](mod@sqlite) |
//! | `postgres` | `idem-postgres`: `postgres://` URLs, completion inside your transaction | `postgres` |
//! | `redis` | `idem-redis`: `redis://` and `redis+cluster://` URLs | `redis` |
//! | `tower` | `idem-tower`: the `Idempotency-Key` layer for axum and tower | `tower` |
//! | `tonic` | `idem-tower`'s `tonic::GrpcLayer` for tonic servers (implies `tower`) | `tower::tonic` |
//! | `actix` | `idem-actix`: the `Idempotency-Key` middleware for actix-web | `actix` |
//! | `client` | `idem-client`: the `reqwest` middleware that retries with one key | `client` |
//!
//! Everything at the root of `idem_core` is at the root here
//! ([`Engine`], [`IdempotencyKey`], [`Scope`], [`Fingerprint`], [`Policy`],
//! [`Error`], …), with its modules ([`store`] for backend authors,
//! [`machine`] for the pure state machine).
//!
//! [`store_from_url`] returns the store type-erased; [`StoreUrl::open`]
//! returns it of its concrete type ([`AnyStore`]) for what only that type
//! offers (`SqliteStore::transaction`, `PostgresStore::pool`, …);
//! [`StoreUrl::parse`] only parses.
//!
//! ## URLs
//!
//! | URL | store | cargo feature |
//! |---|---|---|
//! | `memory://` | `idem_core::MemoryStore`, in this process | always |
//! | `sqlite://PATH` (relative), `sqlite:///ABS/PATH` | `idem_sqlite::SqliteStore` in the file (created if absent) | `sqlite` (default) |
//! | `sqlite://` | the same, in a new temporary directory removed with the store | `sqlite` (default) |
//! | `postgres://[USER[:PASS]@]HOST[:PORT]/DB` (also `postgresql://`) | `idem_postgres::PostgresStore`, migrated on open | `postgres` |
//! | `redis://[USER[:PASS]@]HOST[:PORT][/DB]`, `rediss://…` (TLS) | `idem_redis::RedisStore` on one server | `redis` |
//! | `redis+cluster://[USER[:PASS]@]HOST:PORT,HOST:PORT,…`, `rediss+cluster://…` | `idem_redis::RedisStore` on a Redis Cluster (any nodes; the rest are discovered) | `redis` |
//!
//! The scheme is case-insensitive. A SQLite path ends at the first `?`.
//!
//! ## Parameters
//!
//! Options are query parameters: `?name=value&name=value`, values
//! percent-encoded. Durations are a whole number and a unit: `250ms`, `3s`,
//! `2m`, `1h`. An unknown parameter, one given twice or a bad value is a
//! [`StoreUrlError`] naming it; a parameter left out keeps the store's
//! default.
//!
//! | store | parameter | value | store option |
//! |---|---|---|---|
//! | sqlite | `table` | records table (default `idem_records`) | `SqliteStoreBuilder::with_table` |
//! | sqlite | `durability` | `full` (default) or `normal` | `with_durability` |
//! | sqlite | `busy_timeout` | duration | `with_busy_timeout` |
//! | sqlite | `max_batch` | primitives per commit, ≥ 1 | `with_max_batch` |
//! | sqlite | `max_record_bytes` | bytes, ≥ 1 | `with_max_record_bytes` |
//! | sqlite | `page_cache_bytes` | bytes | `with_page_cache_bytes` |
//! | postgres | `schema` | schema of the table (default `idem`) | `PostgresStoreBuilder::with_table` |
//! | postgres | `table` | table (default `idempotency_records`) | `with_table` |
//! | postgres | `timeout` | duration, bound on every call | `with_timeout` |
//! | postgres | `max_record_bytes` | bytes, ≥ 1 | `with_max_record_bytes` |
//! | postgres | `claim_mode` | `adaptive` (default), `single-statement` or `read-first` | `with_claim_mode` |
//! | postgres | `max_connections` | pool size, ≥ 1 (default 10) | `PgPoolOptions::max_connections` |
//! | postgres | `acquire_timeout` | duration (default 5 s); also bounds the first connection | `PgPoolOptions::acquire_timeout` |
//! | postgres | `migrate` | `true` (default) or `false` | `PostgresStore::migrate` on open |
//! | redis | `prefix` | key prefix (default `idem:`) | `RedisStoreBuilder::with_prefix` |
//! | redis | `expiry_grace` | duration | `with_expiry_grace` |
//! | redis | `connection_timeout` | duration | `with_connection_timeout` |
//! | redis | `response_timeout` | duration | `with_response_timeout` |
//! | redis | `reconnect_attempts` | count | `with_reconnect_attempts` |
//!
//! The drivers' own parameters pass through to them: PostgreSQL's
//! `sslmode`, `sslrootcert`, `sslcert`, `sslkey`, `application_name`,
//! `options`, `host`, `port`, `dbname`, `user`, `password`,
//! `statement-cache-capacity`; Redis's `protocol` and the `#insecure`
//! fragment.
//!
//! ## Passwords
//!
//! [`StoreUrl`]'s `Display` and `Debug`, and every error, show a password
//! (in the user info or PostgreSQL's `password` parameter) as `***`.
#![forbid(unsafe_code)]

mod error;
mod open;
mod params;
mod url;

pub use idem_core::*;

#[cfg(feature = "sqlite")]
#[doc(no_inline)]
pub use idem_sqlite as sqlite;

#[cfg(feature = "postgres")]
#[doc(no_inline)]
pub use idem_postgres as postgres;

#[cfg(feature = "redis")]
#[doc(no_inline)]
pub use idem_redis as redis;

#[cfg(feature = "tower")]
#[doc(no_inline)]
pub use idem_tower as tower;

#[cfg(feature = "actix")]
#[doc(no_inline)]
pub use idem_actix as actix;

#[cfg(feature = "client")]
#[doc(no_inline)]
pub use idem_client as client;

pub use error::{OpenError, StoreUrlError};
pub use open::{AnyStore, Opened, store_from_url};
pub use url::StoreUrl;
pub use url::postgres::{ClaimMode, PostgresUrl};
pub use url::redis::RedisUrl;
pub use url::sqlite::{Durability, SqliteUrl};

#[cfg(test)]
mod tests;
