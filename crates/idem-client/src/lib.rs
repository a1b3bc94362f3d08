//! # idem-client
//!
//! The client side of idem's HTTP contract (docs/http-contract.md): a
//! [`reqwest-middleware`](reqwest_middleware) middleware for Rust services
//! that call idempotent APIs — their own behind `idem-tower`, or others
//! that follow the IETF `Idempotency-Key` draft.
//!
//! An idempotency key protects a request only if the client uses it
//! correctly: one key per logical operation, **the same key on every
//! re-send**, backing off on `409` with `Retry-After`, stopping on `422`,
//! re-sending after a timeout or a `503`. [`IdempotencyMiddleware`] does
//! exactly that:
//!
//! - each protected request (`POST` and `PATCH` by default) gets a fresh
//!   random [`Key`] unless the caller supplied one (a [`Key`] extension or an
//!   `Idempotency-Key` header, which is kept);
//! - it is re-sent with that key on connection errors, lost replies,
//!   timeouts, `409` + `Retry-After`, `429`, `500`/`502`/`503`/`504`, with
//!   exponential backoff and full jitter, never sooner than `Retry-After`,
//!   within a total time budget ([`RetryPolicy`]);
//! - it is never re-sent after `422` or another `4xx`, after a replayed
//!   answer, or after the contract's final `500`s (`outcome-unknown`, …);
//! - the answer says how it came about ([`IdempotencyInfo`]: key, attempts,
//!   whether it is a replay, the layer's [`Problem`] type), and giving up
//!   says why ([`IdempotencyError`]).
//!
//! The full table of what is re-sent and why is on [`IdempotencyMiddleware`].
//!
//! ```no_run
//! use std::time::Duration;
//! use idem_client::{IdempotencyError, IdempotencyMiddleware, IdempotencyResponseExt, Key, RetryPolicy};
//! use idem_client::reqwest_middleware::ClientBuilder;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let client = ClientBuilder::new(reqwest::Client::new())
//!     .with(
//!         IdempotencyMiddleware::builder()
//!             .policy(RetryPolicy::default().budget(Duration::from_secs(30)))
//!             .build(),
//!     )
//!     .build();
//!
//! // A fresh key, re-sent with every retry of this one call.
//! let response = client
//!     .post("https://api.example.com/payments")
//!     .header("content-type", "application/json")
//!     .body(r#"{"amount": 1000, "currency": "EUR"}"#)
//!     .send()
//!     .await;
//! match response {
//!     Ok(response) => {
//!         let info = response.idempotency().expect("POST is protected");
//!         println!("{} after {} attempt(s), replayed: {}", response.status(), info.attempts, info.replayed);
//!     }
//!     Err(error) => match IdempotencyError::of(&error) {
//!         // No answer in time: the payment may or may not have happened.
//!         // Retry later with the same key to find out (and never pay twice).
//!         Some(gave_up) => println!("gave up: {gave_up}; key {:?}", gave_up.key()),
//!         None => println!("request failed: {error}"),
//!     },
//! }
//!
//! // A key the caller chose and stored with its job, so that a retry after
//! // the caller's own restart sends it again.
//! let key: Key = "job-8e03978e-payment".parse()?;
//! let response = client
//!     .post("https://api.example.com/payments")
//!     .with_extension(key)
//!     .body(r#"{"amount": 1000, "currency": "EUR"}"#)
//!     .send()
//!     .await?;
//! if response.idempotency().is_some_and(|info| info.key_reused()) {
//!     // 422: this key was already used for another request. Not re-sent.
//! }
//! # Ok(()) }
//! ```
//!
//! # Reading the outcome
//!
//! | the call returned | meaning | where to look |
//! |---|---|---|
//! | `Ok(response)` | the key's final answer (fresh or replayed, success or not) | `response.idempotency()`: [`IdempotencyInfo`] |
//! | `Ok` with [`Problem::KeyReused`] (422) | the key was used for another request; nothing ran; retrying stopped at once | [`IdempotencyInfo::key_reused`] |
//! | `Ok` with [`Problem::OutcomeUnknown`] (500) | the operation may have run; the server will never run it again with this key | look the result up; new key for a new attempt |
//! | `Err(Middleware(_))` | no final answer: [`IdempotencyError`] says why (budget spent, attempts exhausted, body not re-sendable, bad key) and carries the key | [`IdempotencyError::of`] |
//! | `Err(Reqwest(_))` | a request that could not be built or sent at all (not re-sent) | reqwest's error |
//!
//! Per request, in the middleware extensions (`RequestBuilder::with_extension`):
//! [`Protected`], [`Unprotected`], a [`Key`], a [`RetryPolicy`].
//! For metrics, [`IdempotencyMiddlewareBuilder::on_attempt`] sees every
//! attempt ([`AttemptEvent`]).
#![forbid(unsafe_code)]

mod error;
mod info;
mod key;
mod middleware;
mod policy;
mod problem;

pub use error::{Failure, IdempotencyError};
pub use info::{AttemptEvent, IdempotencyInfo, IdempotencyResponseExt};
pub use key::{Key, KeyError, MAX_KEY_LEN, RandomError};
pub use middleware::{
    DEFAULT_MAX_BUFFERED_BODY, IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED, IdempotencyMiddleware,
    IdempotencyMiddlewareBuilder, Protected, Unprotected,
};
pub use policy::{Jitter, RetryPolicy};
pub use problem::Problem;

/// The `reqwest` this crate is built against (its `Client`, `Request`,
/// `Response`).
pub use reqwest;
/// The `reqwest-middleware` this crate is built against
/// (`ClientBuilder`, `ClientWithMiddleware`, `Error`).
pub use reqwest_middleware;
