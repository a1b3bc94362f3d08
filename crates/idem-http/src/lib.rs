//! # idem-http
//!
//! The HTTP contract of idem, once, for every framework: the
//! `Idempotency-Key` header grammar (IETF HTTPAPI draft), the problem+json
//! answers and their stable `type` URIs, the stored-response format and its
//! replay rules, the exit decisions of docs/reliability.md ("Every way a
//! request ends"), the metric names, and the hooks integrators ask for (where
//! the key comes from, what the fingerprint covers, editing a replay).
//!
//! Applications use it through an adapter: `idem-tower` (axum, hyper, tonic
//! and any tower stack) or `idem-actix` (actix-web). Both are thin: they
//! turn their framework's request into [`http`] parts, hand the contract a
//! body it can buffer, run the handler, and report how it ended.
//!
//! # Writing an adapter
//!
//! 1. Build a [`Contract`] with [`Builder`] (your builder *is*
//!    `Builder<S, C, YourIntegration>`, so options exist once).
//! 2. For each request the contract [`covers_request`](Contract::covers_request),
//!    call [`Contract::admit`] with its head, the target the client sent, a
//!    scope function and a [`ReadBody`].
//! 3. On [`Admission::Answer`] send the [`Reply`]; on `Pass`/`FailOpen` call
//!    the handler unprotected; on [`Admission::Proceed`] put
//!    [`Claimed::claim`] in the request, run the handler under
//!    [`Claimed::run`] (in a task of its own, so a dropped request cannot
//!    stop it half-way), buffer its response up to
//!    [`Claimed::outcome_limit`], and report it to [`Claimed::finish`] as an
//!    [`Exit`].
//!
//! # Behavior
//!
//! The answers, for a covered method (default `POST`, `PATCH`):
//!
//! | situation | answer | handler runs |
//! |---|---|---|
//! | no key, not [`required`](Builder::required) | the handler's, unprotected | yes |
//! | no key, required | 400 [`missing-key`](ProblemType::MissingKey) | no |
//! | key empty, > 255 bytes, not visible ASCII, badly quoted, or sent twice | 400 [`invalid-key`](ProblemType::InvalidKey) | no |
//! | scope function rejects | its [`Rejection`] | no |
//! | body above [`max_body_bytes`](Builder::max_body_bytes) | 413 [`body-too-large`](ProblemType::BodyTooLarge) | no |
//! | new key | the handler's response, stored per policy | yes, once |
//! | same key, same request, completed | the stored response + `Idempotent-Replayed: true` (then [`on_replay`](Builder::on_replay)) | no |
//! | same key, same request, still in flight | 409 [`request-in-progress`](ProblemType::RequestInProgress) + `Retry-After` | no |
//! | same key, different request | 422 [`key-reused`](ProblemType::KeyReused), saying when the key was first used and, once it finished, for which method and path (never the body) | no |
//! | store unreachable | 503 [`store-unavailable`](ProblemType::StoreUnavailable) + `Retry-After` | **no** (fail closed) |
//! | stored record unreadable | 500 [`corrupt-record`](ProblemType::CorruptRecord) | no |
//! | the handler outlived its lease and a later request took the key over | 409 + `Retry-After`; this handler's response is not sent | it ran (so did the later request) |
//! | same key, same request, ended without a known result | 500 [`outcome-unknown`](ProblemType::OutcomeUnknown) | no, never again |
//! | shutting down | 503 [`shutting-down`](ProblemType::ShuttingDown) + `Retry-After` | no |
//!
//! The 422 carries extension members `first_used_at` (RFC 3339),
//! `first_request_state` (`finished`, or `unfinished`: still running, or failed in a way that lets the same request run again) and, for a finished
//! key whose response was stored by this version or later, `first_method`
//! and `first_path` (the path only, never the query nor the body). An
//! in-flight key's method and path are not known: the record holds only a
//! digest of the request until it finishes.
//!
//! Under gRPC ([`Builder::grpc`]) the same answers are gRPC statuses; see
//! the [`grpc`] module.
//! # Observability
//!
//! - A `tracing` span `idem` per covered request (the adapter opens it
//!   with [`Contract::span`]), with `method`, `key` (the first 16 hex digits
//!   of the scoped record key's blake3 digest: the client's key itself is
//!   never logged), `attempt` and `outcome`.
//! - `metrics` counter `idem_requests_total{outcome}` with `outcome` one of
//!   `fresh`, `replayed`, `conflict` (409), `mismatch` (422), `invalid`
//!   (400/413), `rejected` (scope), `store_error` (503/500), `passthrough`
//!   (no key), `fail_open`, `unknown` (a replayed outcome-unknown),
//!   `shutting_down`.
//! - `idem_released_total{reason}` (`no_effect`, `status`, `error`, `panic`,
//!   `body_error` for handlers that declared no effect; `cancelled` with
//!   `release_on_cancel`), `idem_outcome_unknown_total{reason}` (`status`,
//!   `error`, `panic`, `body_error`, `unstorable`, `complete` when storing
//!   was refused), `idem_completion_failures_total{reason}`
//!   (`store`, `lease_lost`), `idem_lease_lost_total`, and the
//!   histogram `idem_handler_duration_seconds`.
#![forbid(unsafe_code)]

mod admit;
mod begin;
mod claim;
mod claimed;
mod contract;
mod effect;
mod extract;
mod fingerprint;
pub mod grpc;
mod key;
mod metrics;
mod problem;
mod rejection;
mod reply;
mod settle;
mod stored;

pub use admit::{Admission, PassBody, ReadBody, ReadError};
pub use claim::IdempotencyClaim;
pub use claimed::{Claimed, Exit, Finished, ReleaseGuard};
pub use contract::{
    Builder, Contract, DEFAULT_HEADER, DEFAULT_MAX_BODY_BYTES, Dialect, Integration,
    MAX_RETRY_AFTER,
};
pub use effect::NoEffect;
pub use extract::{InvalidKey, KeySource};
pub use fingerprint::{Fingerprinter, RequestView};
pub use key::{KeyHeaderError, QuotingError, parse_key_header, parse_key_value};
pub use problem::{PROBLEM_JSON, Problem, ProblemType, retry_after_secs};
pub use rejection::Rejection;
pub use reply::Reply;
pub use stored::{ALWAYS_DROPPED, DEFAULT_DENIED, IDEMPOTENT_REPLAYED};
