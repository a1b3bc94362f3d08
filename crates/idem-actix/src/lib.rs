//! # idem-actix
//!
//! An [actix-web](actix_web) 4 middleware that makes HTTP endpoints
//! idempotent by the `Idempotency-Key` request header, following the IETF
//! HTTPAPI draft "The Idempotency-Key HTTP Header Field". It runs on
//! [`idem_core::Engine`] over any [`Store`](idem_core::store::Store), so of
//! any number of concurrent or retried requests with one key, the handler
//! runs once.
//!
//! It is a thin adapter over [`idem_http`], the contract it shares with
//! `idem-tower` (axum and other tower stacks): the same headers, status
//! codes, problem types, replay rules, options and metrics, checked by one
//! black-box suite (`idem-http-conformance`) against both.
//!
//! ```
//! use std::sync::Arc;
//! use actix_web::{App, web};
//! use idem_actix::{Idempotency, scope_from_extension};
//! use idem_core::{Engine, MemoryStore, Scope};
//!
//! /// Put in the request by your authentication middleware.
//! #[derive(Clone)]
//! struct Principal { tenant: String }
//!
//! let engine = Arc::new(Engine::new(MemoryStore::new()));
//! let scope = scope_from_extension(|p: &Principal| Scope::tenant(p.tenant.clone()));
//! let idem = Idempotency::new(engine, scope);
//! // In `HttpServer::new(move || ..)`, clone `idem` into each worker's App:
//! let app = App::new()
//!     .wrap(idem.clone())
//!     .route("/payments", web::post().to(|| async { "charged" }));
//! # let _ = app;
//! ```
//!
//! Build the middleware once and clone it into every worker's `App` (the
//! `HttpServer::new` closure runs once per worker): the clones share one
//! engine and one set of options. With actix-web the middleware registered
//! *last* with `wrap` runs *first*: register your authentication middleware
//! after [`Idempotency`], so that the scope function sees the principal,
//! and everything whose work must happen once before it.
//!
//! # Behavior
//!
//! Requests whose method is not covered (default: `POST` and `PATCH`) pass
//! through untouched. For covered methods the answers are those of the
//! table in the [`idem_http`] crate docs, for every adapter alike: the
//! handler's response stored and replayed with `Idempotent-Replayed: true`,
//! 409 + `Retry-After` while the first request runs, 422 for the same key
//! with a different request, 400 for a missing (when
//! [`required`](IdempotencyBuilder::required)) or invalid key, 413 above
//! [`max_body_bytes`](IdempotencyBuilder::max_body_bytes), 503 when the
//! store is unreachable (fail closed), 500 `outcome-unknown` for a retry of
//! a request that ended without a known result. What is adapter-specific:
//!
//! - **Scope**: a function of the [`HttpRequest`](actix_web::HttpRequest)
//!   ([`scope_from_extension`] reads an extension your authentication
//!   middleware put there; [`single_client_scope`] is for one-client
//!   services).
//! - **Fingerprint**: over the path and query the client sent
//!   (`HttpRequest::uri`, the whole path also under `web::scope`), the
//!   method, the selected headers and the body, as
//!   [`Fingerprinter`] says.
//! - **Request body**: buffered up to the limit (it is part of the
//!   fingerprint) and handed on to the handler intact, as the request's
//!   payload: extractors (`web::Bytes`, `web::Json`) read it as usual.
//! - **The claim**: a handler under a fresh claim finds an
//!   [`IdempotencyClaim`] in the request extensions: take it as
//!   `web::ReqData<IdempotencyClaim>` (or
//!   `Option<web::ReqData<IdempotencyClaim>>` on routes that may be called
//!   without a key). See below for completing inside the handler's
//!   transaction.
//! - **What is stored**: by default every response with a status below 500
//!   ([`store_response_if`](IdempotencyBuilder::store_response_if), whose
//!   predicate sees the status and headers; actix's response extensions are
//!   not `http`'s, so its `extensions` are empty). A stored response is
//!   buffered, stored, then sent from the buffer with a `content-length`.
//! - **Ambiguous endings**: a response the predicate refuses (a 5xx), an
//!   error of the inner service (returned unchanged), a panic (resumed once
//!   the key is finished) or a response body that fails mid-stream end the
//!   key as outcome unknown, never run again; unless the handler declared
//!   that nothing took effect: [`NoEffect`] in the response's extensions
//!   (`HttpResponse::extensions_mut().insert(NoEffect)`) or
//!   [`IdempotencyClaim::declare_no_effect`] before an error or panic, and
//!   the key is released for a fresh retry.
//! - **Run to completion**: the handler, the buffering of its response and
//!   the storing of it run in a task of their own on the worker's runtime
//!   (`actix_web::rt::spawn`, a local task: actix futures are not `Send`),
//!   so a dropped request cannot stop them half-way: the response is
//!   stored and a retry gets it (meanwhile 409 + `Retry-After`). actix-web
//!   drops a request when its connection ends: at once when the client
//!   disconnects with `HttpServer::h1_allow_half_closed(false)`, else when
//!   it next writes to the connection or shuts it down. With
//!   [`release_on_cancel(true)`](IdempotencyBuilder::release_on_cancel) a
//!   dropped request stops its handler and releases the key instead (only
//!   for handlers without external effects).
//! - **Responses too large to store** (above
//!   [`Engine::outcome_limit`](idem_core::Engine::outcome_limit)) are sent to
//!   the first client in full (what was buffered, then the rest, streamed);
//!   the key is completed with a
//!   [`response-not-stored`](ProblemType::ResponseNotStored) marker.
//! - **Trailers**: actix-web cannot send HTTP trailers. The contract's
//!   replies carry some only under gRPC
//!   ([`Builder::grpc`](idem_http::Builder::grpc)), which actix-web does not
//!   serve: do not use `grpc()` with this middleware.
//! - **Hooks**: where the key comes from
//!   ([`key_source`](IdempotencyBuilder::key_source)), what the fingerprint
//!   covers ([`fingerprint`](IdempotencyBuilder::fingerprint)) and edits of
//!   replays ([`on_replay`](IdempotencyBuilder::on_replay)) are options of
//!   the shared builder, as in every integration.
//! - **Observability**: the `idem` tracing span, the
//!   `idem_requests_total{outcome}` counter and the other metrics of
//!   [`idem_http`], named and recorded there for every adapter.
//!
//! # The claim in a handler: completing inside its transaction
//!
//! [`IdempotencyClaim::prepare_response`] encodes a response exactly as the
//! middleware stores it and returns an [`idem_core::Transition`] for
//! `idem_sqlite`/`idem_postgres` `apply_in`, so that the business write and
//! the stored response commit together; the middleware then sees the key
//! completed by its own claim and does not store again. It takes `http` 1
//! status and headers; actix-web's are `http` 0.2 types, so use
//! [`ClaimExt::prepare_actix_response`], which takes the actix response the
//! handler is about to return:
//!
//! ```no_run
//! use actix_web::http::{StatusCode, header};
//! use actix_web::{HttpResponse, web};
//! use idem_actix::{ClaimExt as _, IdempotencyClaim};
//!
//! async fn create_payment(
//!     claim: web::ReqData<IdempotencyClaim>,
//!     body: web::Bytes,
//! ) -> actix_web::Result<HttpResponse<String>> {
//!     // let mut tx = pool.begin().await?;   … business writes in `tx` …
//!     let mut response = HttpResponse::with_body(StatusCode::CREATED, format!(
//!         r#"{{"id":"pay_1","attempt":{},"bytes":{}}}"#, claim.attempt(), body.len()
//!     ));
//!     response.headers_mut().insert(
//!         header::CONTENT_TYPE,
//!         header::HeaderValue::from_static("application/json"),
//!     );
//!     let done = claim
//!         .prepare_actix_response(&response)
//!         .map_err(actix_web::error::ErrorInternalServerError)?;
//!     // store.apply_in(&mut tx, &done).await?;   // same transaction
//!     // tx.commit().await?;
//!     # let _ = done;
//!     Ok(response)
//! }
//! ```
//!
//! # Declaring that nothing took effect
//!
//! ```
//! use actix_web::HttpResponse;
//! use idem_actix::NoEffect;
//!
//! fn processor_down() -> HttpResponse {
//!     // Nothing was charged: let the client's retry run again.
//!     let mut response = HttpResponse::ServiceUnavailable().body("processor down");
//!     response.extensions_mut().insert(NoEffect);
//!     response
//! }
//! # let _ = processor_down();
//! ```
//!
//! # Graceful shutdown
//!
//! On the stop signal, call [`Idempotency::shutdown`] *before* stopping the
//! server: new keyed requests get 503 `shutting-down`, running handlers get
//! a grace period to finish and store their answers, and those still
//! running after it end as outcome unknown. Stop the server afterwards:
//! actix-web ends its workers' runtimes, and with them the handlers' tasks,
//! when it stops. See [`Idempotency::shutdown`] for an example.
#![forbid(unsafe_code)]

mod body;
mod claim;
mod claimed;
mod convert;
mod scope;
mod service;
mod transform;

/// The engine this middleware runs on.
pub use idem_core;
/// The framework-neutral contract this middleware adapts.
pub use idem_http;

pub use claim::ClaimExt;
pub use idem_http::{
    ALWAYS_DROPPED, DEFAULT_DENIED, DEFAULT_HEADER, DEFAULT_MAX_BODY_BYTES, Fingerprinter,
    IDEMPOTENT_REPLAYED, IdempotencyClaim, KeyHeaderError, KeySource, MAX_RETRY_AFTER, NoEffect,
    PROBLEM_JSON, ProblemType, QuotingError, Rejection, parse_key_header, parse_key_value,
};
pub use scope::{ScopeFunction, scope_from_extension, single_client_scope};
pub use service::IdempotencyMiddleware;
pub use transform::{Actix, Idempotency, IdempotencyBuilder};
