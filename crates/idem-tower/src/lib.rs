//! # idem-tower
//!
//! A [`tower::Layer`] that makes HTTP endpoints idempotent by the
//! `Idempotency-Key` request header, following the IETF HTTPAPI draft "The
//! Idempotency-Key HTTP Header Field" and the conventions of the best-known
//! payment APIs. It runs on [`idem_core::Engine`] over any
//! [`Store`](idem_core::store::Store), so of any number of concurrent or retried
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
//! [`ResponseBody`] around the inner service's body. On a tonic server,
//! use `tonic::GrpcLayer` (feature `tonic`; see [gRPC](#grpc-tonic)).
//!
//! # Behavior
//!
//! Requests whose method is not covered (default: `POST` and `PATCH`), or
//! that the [`covers`](IdempotencyLayerBuilder::covers) predicate refuses
//! when one is set, pass through untouched. For covered requests:
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
//! | same key, different request | 422 [`key-reused`](ProblemType::KeyReused), saying when the key was first used and, once it finished, for which method and path (never the body) | no |
//! | store unreachable | 503 [`store-unavailable`](ProblemType::StoreUnavailable) + `Retry-After` | **no** (fail closed) |
//! | stored record unreadable | 500 [`corrupt-record`](ProblemType::CorruptRecord) | no |
//! | the handler outlived its lease and a later request took the key over | 409 [`request-in-progress`](ProblemType::RequestInProgress) + `Retry-After`; this handler's response is not sent, the retry gets the key's one answer | it ran (so did the later request) |
//! | same key, same request, ended without a known result (see below) | 500 [`outcome-unknown`](ProblemType::OutcomeUnknown) | no, never again |
//! | the layer is shutting down ([`IdempotencyLayer::shutdown`]) | 503 [`shutting-down`](ProblemType::ShuttingDown) + `Retry-After` | no |
//!
//! - **Key**: the header value may be an RFC 8941 string (`"abc"`, the draft's
//!   form) or a bare token (`abc`, what most SDKs send); both are the same
//!   key. See [`parse_key_value`].
//! - **Scope**: a function of the request (authenticated principal, tenant,
//!   API key) decides whose key it is. The same key from two scopes is two
//!   operations, and a response is never replayed across scopes.
//! - **Fingerprint**: method, the path and query **the client sent**, the
//!   selected [`fingerprint_header`](IdempotencyLayerBuilder::fingerprint_header)s
//!   and the body, hashed with blake3 (see [`idem_core::Fingerprint`] for
//!   the layout). In a router mounted with axum's `Router::nest` or
//!   `nest_service`, the layer sees a stripped path; it fingerprints axum's
//!   `OriginalUri` instead (feature `axum`, on by default), so
//!   `/accounts/A/transfers` and `/accounts/B/transfers` are never one
//!   request. With another framework that strips prefixes, put the layer
//!   outside the nesting. The body is buffered (up to the limit) and handed
//!   on intact.
//! - **What is stored**: by default every response with a status below 500.
//! - **Ambiguous endings**: a response the layer does not store (by default a
//!   5xx), an error of the inner service, a panic, or a response body that
//!   fails mid-stream may come *after* the handler's effect. The key is then
//!   finished as **outcome unknown**: the client that is still there gets
//!   what the handler produced, and every retry gets 500
//!   [`outcome-unknown`](ProblemType::OutcomeUnknown); the handler is never
//!   run again with that key. A handler that knows nothing happened says so,
//!   and the key is released for a fresh retry instead: the [`NoEffect`]
//!   response extension, or [`IdempotencyClaim::declare_no_effect`] before an
//!   error or panic. Change what is stored with
//!   [`store_response_if`](IdempotencyLayerBuilder::store_response_if).
//! - **What is replayed**: the original status, headers and body (and
//!   trailers), minus hop-by-hop headers, `content-length` (recomputed) and
//!   the deny list (default `set-cookie` and `date`), plus
//!   `Idempotent-Replayed: true`.
//! - **Run to completion**: the handler, the buffering of its response and
//!   the storing of it run in a task of their own, so a client that
//!   disconnects or an outer timeout (`tower_http::timeout`) cannot stop them
//!   half-way: the response is stored and a retry gets it (meanwhile 409 +
//!   `Retry-After`). A stored response is written before it is returned.
//! - **Long handlers**: the lease is extended (heartbeat, every third of the
//!   engine's lease) while the handler runs and while its response body is
//!   buffered, so a slow but live request is never taken over.
//! - **Cancellation opt-in**: with
//!   [`release_on_cancel(true)`](IdempotencyLayerBuilder::release_on_cancel),
//!   a dropped request stops its handler and releases the key, so a retry
//!   runs at once. Only for handlers without external effects.
//! - **Panics** of the handler end the key as outcome unknown, then resume
//!   unwinding (the layer does not change how your stack handles panics).
//!   **Errors** of the inner service end it the same way and are returned
//!   unchanged.
//! - **Lost lease**: [`IdempotencyClaim::lost`] resolves when the request can
//!   no longer count on its key (its heartbeat could not reach the store
//!   before the lease deadline, the engine's `max_hold` ended it, or a
//!   shutdown gave up on it): stop before starting an effect.
//! - **Graceful shutdown**: after the server stops accepting connections
//!   (axum's `with_graceful_shutdown`), call [`IdempotencyLayer::shutdown`]:
//!   new keyed requests get 503 `shutting-down`, running handlers get a grace
//!   period to finish and store their answers, and those still running after
//!   it end as outcome unknown. Nothing that ran is released.
//! - **Responses too large to store** (above
//!   [`Engine::outcome_limit`](idem_core::Engine::outcome_limit): the smaller
//!   of the policy's `max_outcome_bytes` and the store's record limit) are
//!   returned to the first client in full, streamed;
//!   the key is completed with a 500
//!   [`response-not-stored`](ProblemType::ResponseNotStored) marker, so the
//!   operation is never run twice with that key.
//! - **Store failure after the handler ran**: the response is still returned
//!   (the work happened); storing is tried once inline, then retried in the
//!   background until one lease after the lease deadline (409 to retries
//!   meanwhile). A store that refuses the record permanently gets the key
//!   ended as outcome unknown instead. Only if the store stays unreachable
//!   for the whole lease does a retry run the operation again: the window W1
//!   of docs/reliability.md ("Every way a request ends"), closed by
//!   completing in the business transaction (below).
//! - **Fail-open** ([`fail_open`](IdempotencyLayerBuilder::fail_open)) runs
//!   the handler unprotected while the store is unreachable. Off by default;
//!   unsafe for anything that must happen once.
//!
//! # Hooks
//!
//! On the builder (the shared [`idem_http::Builder`], the same in every
//! integration): [`key_source`](IdempotencyLayerBuilder::key_source) takes
//! the key from another header, the request head or the buffered body
//! ([`KeySource::json_field`] for a webhook's event id);
//! [`fingerprint`](IdempotencyLayerBuilder::fingerprint) chooses what makes
//! two requests the same ([`Fingerprinter::canonical_json`]: key order and
//! whitespace never cause a 422); [`on_replay`](IdempotencyLayerBuilder::on_replay)
//! edits every replayed response.
//!
//! # gRPC (tonic)
//!
//! With [`grpc()`](IdempotencyLayerBuilder::grpc) the layer protects unary
//! gRPC methods: the key is the `idempotency-key` metadata entry, the
//! contract's answers are gRPC statuses, and the handler's gRPC status
//! decides what is stored (the tables are in [`grpc`]). On a tonic server
//! use `tonic::GrpcLayer` (feature `tonic`), which is this layer in the gRPC
//! dialect for tonic's request bodies, straight on
//! `Server::builder().layer(..)`; cover the unary methods only, with
//! [`covers(grpc::unary_methods([..]))`](grpc::unary_methods). (Without the
//! feature, the same layer works behind a `map_request` that turns
//! `tonic::body::Body` into `axum::body::Body`.)
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
//! The `idem` tracing span per covered request and the metrics
//! (`idem_requests_total{outcome}`, `idem_released_total{reason}`,
//! `idem_outcome_unknown_total{reason}`, …) are those of every integration:
//! see [`idem_http`]'s "Observability" for the names and labels.
#![forbid(unsafe_code)]

mod body;
mod claimed;
mod layer;
mod scope;
mod service;
#[cfg(feature = "tonic")]
pub mod tonic;

/// The engine this layer runs on.
pub use idem_core;
/// The framework-neutral contract this layer adapts.
pub use idem_http;
/// gRPC: the statuses, the stored codes, [`grpc::unary_methods`] and
/// [`grpc::rejection`].
pub use idem_http::grpc;

pub use body::ResponseBody;
pub use idem_http::{
    ALWAYS_DROPPED, DEFAULT_DENIED, DEFAULT_HEADER, DEFAULT_MAX_BODY_BYTES, Fingerprinter,
    IDEMPOTENT_REPLAYED, IdempotencyClaim, KeyHeaderError, KeySource, MAX_RETRY_AFTER, NoEffect,
    PROBLEM_JSON, ProblemType, QuotingError, Rejection, parse_key_header, parse_key_value,
};
pub use layer::{IdempotencyLayer, IdempotencyLayerBuilder, Tower};
pub use scope::{scope_from_extension, single_client_scope};
pub use service::{Idempotency, ResponseFuture};
