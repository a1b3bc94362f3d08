//! # idemkit
//!
//! Opens an [idem](idem_core) store from a URL: the one parser of store URLs
//! that the demo, the tests and operator tools share.
//!
//! ```no_run
//! # #[tokio::main] async fn main() -> Result<(), idemkit::OpenError> {
//! let store = idemkit::store_from_url("sqlite://data/idem.db?durability=normal").await?;
//! let engine = idem_core::Engine::new(store);
//! # let _ = engine; Ok(()) }
//! ```
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
//! | postgres | `claim_mode` | `single-statement` (default) or `read-first` | `with_claim_mode` |
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
mod postgres;
mod redis;
mod sqlite;
mod url;

pub use error::{OpenError, StoreUrlError};
pub use open::{AnyStore, Opened, store_from_url};
pub use postgres::{ClaimMode, PostgresUrl};
pub use redis::RedisUrl;
pub use sqlite::{Durability, SqliteUrl};
pub use url::StoreUrl;

#[cfg(test)]
mod tests;
