//! # idem-tower
//!
//! A [`tower::Layer`] that makes HTTP endpoints idempotent by the
//! `Idempotency-Key` request header, following the IETF HTTPAPI draft "The
//! Idempotency-Key HTTP Header Field" and the conventions of the best-known
//! payment APIs. It runs on [`idem_core::Engine`] over any
//! [`Store`](idem_core::Store), so of any number of concurrent or retried
//! requests with one key, the handler runs once.
//!
//! ```
//! use std::sync::Arc;
//! use axum::{Router, routing::post};
//! use idem_core::{Engine, MemoryStore, Scope};
//! use idem_tower::{IdempotencyLayer, scope_from_extension};
//!
//! /// Put in the request by your authentication middleware.
//! #[derive(Clone)]
//! struct Principal { tenant: String }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let engine = Arc::new(Engine::new(MemoryStore::new()));
//! let scope = scope_from_extension(|p: &Principal| Scope::tenant(p.tenant.clone()));
//! let app: Router = Router::new()
//!     .route("/payments", post(|| async { "charged" }))
//!     .layer(IdempotencyLayer::new(engine, scope));
//! # let _ = app; }
//! ```
//!
//! Place the layer *inside* authentication (so the scope function sees the
//! principal) and outside everything whose work must happen once. The
//! request body type must implement `From<`[`Bytes`](bytes::Bytes)`>` (axum's
//! `Body` and `http_body_util::Full<Bytes>` do; with bare hyper, map
//! `Incoming` into `axum::body::Body::new(..)` first), because the buffered
//! body is handed on as a new body of the same type. The response body is
//! [`ResponseBody`] around the inner service's body.
//!
//! # Behavior
//!
//! Requests whose method is not covered (default: `POST` and `PATCH`) pass
//! through untouched. For covered methods:
//!
//! | situation | answer | handler runs |
//! |---|---|---|
//! | no key, not [`required`](IdempotencyLayerBuilder::required) | the handler's, unprotected | yes |
//! | no key, required | 400 [`missing-key`](ProblemType::MissingKey) | no |
//! | key empty, > 255 bytes, not visible ASCII, badly quoted, or sent twice | 400 [`invalid-key`](ProblemType::InvalidKey) | no |
//! | scope function rejects | its [`Rejection`] | no |
//! | body above [`max_body_bytes`](IdempotencyLayerBuilder::max_body_bytes) | 413 [`body-too-large`](ProblemType::BodyTooLarge) | no |
//! | new key | the handler's response, stored per policy | yes, once |
//! | same key, same request, completed | the stored response + `Idempotent-Replayed: true` | no |
//! | same key, same request, still in flight | 409 [`request-in-progress`](ProblemType::RequestInProgress) + `Retry-After` (or, with the engine's `InFlightPolicy::Wait`, the original's response once it finishes) | no |
//! | same key, different request | 422 [`key-reused`](ProblemType::KeyReused) | no |
//! | store unreachable | 503 [`store-unavailable`](ProblemType::StoreUnavailable) + `Retry-After` | **no** (fail closed) |
//! | stored record unreadable | 500 [`corrupt-record`](ProblemType::CorruptRecord) | no |
//! | the handler outlived its lease and a later request took the key over | 409 [`request-in-progress`](ProblemType::RequestInProgress) + `Retry-After`; this handler's response is not sent, the retry gets the key's one answer | it ran (so did the later request) |
//!
//! - **Key**: the header value may be an RFC 8941 string (`"abc"`, the draft's
//!   form) or a bare token (`abc`, what most SDKs send); both are the same
//!   key. See [`parse_key_value`].
//! - **Scope**: a function of the request (authenticated principal, tenant,
//!   API key) decides whose key it is. The same key from two scopes is two
//!   operations, and a response is never replayed across scopes.
//! - **Fingerprint**: method, path and query, the selected
//!   [`fingerprint_header`](IdempotencyLayerBuilder::fingerprint_header)s and
//!   the body, hashed with blake3 (see [`idem_core::Fingerprint`] for the
//!   layout). The body is buffered (up to the limit) and handed on intact.
//! - **What is stored**: by default every response with a status below 500.
//!   A 5xx, an error of the inner service or a panic **releases** the key, so
//!   a retry runs the handler again (clients are never stuck on a cached
//!   server error). Change it with
//!   [`store_response_if`](IdempotencyLayerBuilder::store_response_if).
//! - **What is replayed**: the original status, headers and body (and
//!   trailers), minus hop-by-hop headers, `content-length` (recomputed) and
//!   the deny list (default `set-cookie` and `date`), plus
//!   `Idempotent-Replayed: true`.
//! - **Completion before response**: a stored response is written before it
//!   is returned, in a task of its own, so a client that disconnects cannot
//!   leave the key half-finished.
//! - **Long handlers**: the lease is extended (heartbeat, every third of the
//!   engine's lease) while the handler runs and while its response body is
//!   buffered, so a slow but live request is never taken over.
//! - **Cancellation**: if the request's future is dropped while the handler
//!   runs (client gone, an outer timeout), the key is released in the
//!   background: the retry runs at once instead of after the lease lapses.
//! - **Panics** of the handler release the key, then resume unwinding (the
//!   layer does not change how your stack handles panics). **Errors** of the
//!   inner service release the key and are returned unchanged.
//! - **Responses too large to store** (above the engine's
//!   `max_outcome_bytes`) are returned to the first client in full, streamed;
//!   the key is completed with a 500
//!   [`response-not-stored`](ProblemType::ResponseNotStored) marker, so the
//!   operation is never run twice with that key.
//! - **Store failure after the handler ran**: the response is still returned
//!   (the work happened); storing is retried twice, then logged and counted.
//!   The key stays in flight until its lease lapses (409 to retries), after
//!   which a retry runs the operation again: a store outage between execution
//!   and completion is the one window where a retry can re-execute.
//! - **Fail-open** ([`fail_open`](IdempotencyLayerBuilder::fail_open)) runs
//!   the handler unprotected while the store is unreachable. Off by default;
//!   unsafe for anything that must happen once.
//!
//! # Completing inside the handler's transaction
//!
//! A handler under a fresh claim finds an [`IdempotencyClaim`] in the request
//! extensions. Its [`prepare_response`](IdempotencyClaim::prepare_response)
//! encodes a response exactly as the layer stores it and returns an
//! [`idem_core::Transition`] for `idem_sqlite`/`idem_postgres` `apply_in`, so
//! the business write and the stored response commit together. The layer
//! then sees the key completed by its own claim and does not store again.
//!
//! # Observability
//!
//! - A `tracing` span `idem` per covered request, with `method`, `key` (the
//!   first 16 hex digits of the scoped record key's blake3 digest: the
//!   client's key itself is never logged), `attempt` and `outcome`.
//! - `metrics` counter `idem_requests_total{outcome}` with `outcome` one of
//!   `fresh`, `replayed`, `conflict` (409), `mismatch` (422), `invalid`
//!   (400/413), `rejected` (scope), `store_error` (503/500), `passthrough`
//!   (no key), `fail_open`.
//! - `idem_released_total{reason}` (`status`, `error`, `panic`, `cancelled`,
//!   `body_error`, `unstorable`), `idem_completion_failures_total{reason}`
//!   (`store`, `lease_lost`, `release`), `idem_lease_lost_total`, and the
//!   histogram `idem_handler_duration_seconds`.
#![forbid(unsafe_code)]

mod body;
mod claim;
mod header;
mod layer;
mod problem;
mod scope;
mod stored;

/// The engine this layer runs on.
pub use idem_core;

pub use body::ResponseBody;
pub use claim::IdempotencyClaim;
pub use header::{KeyHeaderError, QuotingError, parse_key_header, parse_key_value};
pub use layer::{
    DEFAULT_HEADER, DEFAULT_MAX_BODY_BYTES, Idempotency, IdempotencyLayer, IdempotencyLayerBuilder,
    ResponseFuture,
};
pub use problem::{PROBLEM_JSON, ProblemType};
pub use scope::{Rejection, scope_from_extension, single_client_scope};
pub use stored::{ALWAYS_DROPPED, DEFAULT_DENIED, IDEMPOTENT_REPLAYED};

/// The README's Rust examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;
