//! gRPC: the contract's answers as gRPC statuses with rich error details,
//! and which gRPC statuses of a handler are stored.
//!
//! With [`Builder::grpc`](crate::Builder::grpc) ([`Dialect::Grpc`](crate::Dialect::Grpc))
//! the contract protects **unary** gRPC methods: the key is the
//! `idempotency-key` metadata entry (an HTTP/2 header), the fingerprint
//! covers the method (`POST`), the path (`/package.Service/Method`) and the
//! encoded request message as framed on the wire, and a response's gRPC
//! status decides what happens to the key.
//!
//! # Behavior
//!
//! A gRPC response is HTTP 200 with its status in the `grpc-status` trailer,
//! or in the headers of a *trailers-only* response (no message; the one
//! HEADERS frame ends the stream). Every response of a claimed request is
//! buffered with its trailers (up to the engine's outcome limit), then:
//!
//! | gRPC status of the handler's response | what happens to the key |
//! |---|---|
//! | `OK`, `INVALID_ARGUMENT`, `NOT_FOUND`, `ALREADY_EXISTS`, `PERMISSION_DENIED`, `FAILED_PRECONDITION`, `OUT_OF_RANGE`, `UNIMPLEMENTED`, `UNAUTHENTICATED` | **stored**: a final answer; retries replay it (status, message, headers and trailers, `-bin` metadata included) plus `idempotent-replayed: true` |
//! | `CANCELLED`, `UNKNOWN`, `DEADLINE_EXCEEDED`, `RESOURCE_EXHAUSTED`, `ABORTED`, `INTERNAL`, `UNAVAILABLE`, `DATA_LOSS`, any other code, no status, an HTTP status other than 200, a body that fails | **ambiguous**: the handler may have taken effect before it failed, so the key is finished as outcome unknown (retries get `UNKNOWN`, the handler never runs again with that key), or released if the handler declared no effect |
//!
//! The stored codes are the ones that say "this request was processed, and
//! this is its answer": the request was refused as it is, or the operation
//! ran. The others say something went wrong on the way, and a handler that
//! returns one after a side effect would be run twice if its key were
//! released. A handler that knows nothing happened (a rate limit answered
//! `RESOURCE_EXHAUSTED`, a dependency down before any write, a transaction
//! aborted) calls [`IdempotencyClaim::declare_no_effect`](crate::IdempotencyClaim::declare_no_effect)
//! before returning its error, and the retry runs afresh. (A `Status` has
//! no extensions, so the [`NoEffect`](crate::NoEffect) response extension is
//! of no use with tonic's error path: use the claim.)
//!
//! The contract's own answers are trailers-only responses:
//!
//! | problem | gRPC status | why this code |
//! |---|---|---|
//! | missing or invalid key, unreadable request body | `INVALID_ARGUMENT` | wrong whatever the state of the system; do not retry as is |
//! | key reused with another request | `FAILED_PRECONDITION` | the request is fine, the key's state forbids it: do not retry until that changes (a new key). Not `ALREADY_EXISTS`, which would tell the client that *its* operation happened |
//! | request with this key in progress | `ABORTED` + retry delay | a concurrency conflict (HTTP 409's code in `google.rpc.Code`); retry after the delay to get the original's answer |
//! | message too large ([`max_body_bytes`](crate::Builder::max_body_bytes)) | `RESOURCE_EXHAUSTED` | what gRPC servers answer for a message above their limit |
//! | store unavailable, shutting down | `UNAVAILABLE` + retry delay | nothing ran; the same call can be retried as is (gRPC's own advice for `UNAVAILABLE`) |
//! | store failed | `INTERNAL` | |
//! | stored record unreadable | `DATA_LOSS` | the stored result is lost; it was not run again |
//! | response too large to store (stored, replayed) | `INTERNAL` | the operation ran; do not run it again with this key |
//! | outcome unknown | `UNKNOWN` | it may or may not have taken effect; never run again with this key |
//!
//! Each answer carries:
//! - `grpc-status`, and the problem's detail in `grpc-message`
//!   (percent-encoded as the gRPC spec says: bytes outside `0x20..=0x7E`,
//!   and `%`);
//! - `grpc-status-details-bin`: a `google.rpc.Status` with the same code and
//!   message, and as details a `google.rpc.ErrorInfo` (`reason`: the
//!   [`reason`] of the problem, e.g. `REQUEST_IN_PROGRESS`; `domain`:
//!   [`ERROR_DOMAIN`]; `metadata`: `type`, the problem's
//!   [`uri`](crate::ProblemType::uri), and the problem's extension members
//!   such as `first_used_at`) and, with a retry delay, a
//!   `google.rpc.RetryInfo` (`retry_delay`). Base64, standard alphabet,
//!   unpadded, as gRPC sends binary metadata; tonic exposes it as
//!   `Status::details()` and `tonic-types` decodes it
//!   (`StatusExt::get_details_error_info`, `get_details_retry_info`);
//! - `idem-problem`: the problem's `type` URI, for clients that do not decode
//!   details;
//! - with a retry delay, `grpc-retry-pushback-ms` (honoured by gRPC clients'
//!   retry policies whose retryable codes include the answer's) and
//!   `retry-after` (whole seconds, for HTTP tooling).
//!
//! # Rejections of the scope function
//!
//! A [`Rejection`] that already is a gRPC response (it has a `grpc-status`
//! header, as one built with [`rejection`] has) is sent as it is. An HTTP
//! rejection ([`Rejection::new`], [`Rejection::unauthenticated`], any
//! response without `grpc-status`) is translated into a trailers-only gRPC
//! status, so that a client reads the scope function's intent and message
//! rather than a protocol error:
//!
//! | HTTP status of the rejection | gRPC status |
//! |---|---|
//! | 400 Bad Request | `INVALID_ARGUMENT` |
//! | 401 Unauthorized | `UNAUTHENTICATED` |
//! | 403 Forbidden | `PERMISSION_DENIED` |
//! | 404 Not Found | `NOT_FOUND` |
//! | 409 Conflict | `ABORTED` |
//! | 429 Too Many Requests | `RESOURCE_EXHAUSTED` |
//! | any other 4xx | `FAILED_PRECONDITION` |
//! | 501 Not Implemented | `UNIMPLEMENTED` |
//! | 502, 503, 504 | `UNAVAILABLE` |
//! | any other 5xx | `INTERNAL` |
//! | anything else (1xx, 2xx, 3xx) | `UNKNOWN` |
//!
//! This is `google.rpc.Code`'s documented HTTP mapping read backwards (the
//! codes whose HTTP equivalent the status is), not the table of gRPC's
//! `http-grpc-status-mapping.md`: that one is for *clients* that got a
//! response without `grpc-status` from an intermediary, and says servers
//! must not use it. Its 400 → `INTERNAL`, 404 → `UNIMPLEMENTED` and
//! 429 → `UNAVAILABLE` describe a transport that failed (a proxy that
//! could not read the gRPC framing, a route that does not exist, a proxy's
//! rate limit), while a rejection is the application's deliberate answer
//! about the caller. Other 4xx are `FAILED_PRECONDITION` rather than
//! `INVALID_ARGUMENT`: a scope function judges who calls and the state of
//! their account (suspended, gone, locked), not the message's arguments.
//! 502 to 504 are `UNAVAILABLE` because nothing ran: the call can be
//! retried as it is. What is taken from the rejection:
//! - `grpc-message`: the `detail` of a JSON (problem+json) body, else its
//!   `title`, else a `text/*` body, else the status's reason phrase (at
//!   most 1 KiB, percent-encoded);
//! - `grpc-status-details-bin`: a `google.rpc.Status` with that code and
//!   message and, when the rejection has a `Retry-After` in seconds, a
//!   `google.rpc.RetryInfo` (plus `grpc-retry-pushback-ms`);
//! - its other headers, as metadata (`www-authenticate`, `retry-after`…),
//!   except those that describe its body or the connection
//!   (`content-type` becomes `application/grpc`) and `grpc-*` ones.
//!
//! The body itself is dropped. Build the rejection with [`rejection`] to
//! choose the code yourself.
//!
//! # What to know about gRPC
//!
//! - **Unary methods only.** A streaming method's request is buffered whole
//!   before its handler runs and its response is buffered whole (up to the
//!   outcome limit) before the client sees any of it: a bidirectional stream
//!   would deadlock, a long server stream would hold the key and send
//!   nothing. Cover only the unary methods you protect, with
//!   [`unary_methods`] as the [`covers`](crate::Builder::covers)
//!   predicate: every other method then passes through untouched,
//!   streamed, key or not, and [`required(true)`](crate::Builder::required)
//!   applies to the listed methods only.
//! - **No key, no protection.** A request without `idempotency-key` passes
//!   through unprotected (unless keys are required): protection is the
//!   client's choice, as over HTTP.
//! - **Compression.** The fingerprint covers the request message as framed
//!   on the wire: compressed bytes and the compression flag. A retry that
//!   compresses differently (another `grpc-encoding`, or compression turned
//!   on or off) is another request and gets `FAILED_PRECONDITION`; keep a
//!   client's compression settings fixed across the retries of one key. A
//!   stored response is replayed as it was sent, with its `grpc-encoding`:
//!   a retry from a client that does not accept that encoding cannot read
//!   it.
//! - **Deadlines.** `grpc-timeout` is not part of the fingerprint (a retry
//!   has less time left) and does not stop the handler: when the deadline
//!   passes (tonic's server drops the request's future), the handler and
//!   the storing of its answer still run to completion, and the retry with
//!   the same key gets `ABORTED` while it runs, then its stored answer.
//!   [`release_on_cancel`](crate::Builder::release_on_cancel) changes that,
//!   only for handlers without external effects.
//! - **Message size.** [`max_body_bytes`](crate::Builder::max_body_bytes)
//!   (default 2 MiB) counts the framed message (5 bytes more than the
//!   message); tonic's own limit is 4 MiB by default. Set it to the limit
//!   your server decodes.
//! - **Authentication.** tonic's interceptors run inside the service, after
//!   the layer: what they put in the request is not there when the scope is
//!   derived. Derive the scope from the metadata (a verified token), or
//!   authenticate in a tower layer placed before (outside) this one.
//!
//! # With tonic
//!
//! `idem-tower`'s `idem_tower::tonic::GrpcLayer` (feature `tonic`) goes
//! straight on tonic's server, `Server::builder().layer(..)`, with this
//! dialect set; its documentation has the example, and `idem-tonic-tests`
//! runs it with a real server and client. The handler finds the claim in
//! `request.extensions().get::<IdempotencyClaim>()`. A client sends the key
//! as metadata, the same on every retry of one operation:
//! `request.metadata_mut().insert("idempotency-key", key.parse()?)`, with a
//! new key (a UUID) for each new operation.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};

use crate::problem::{Problem, ProblemType, retry_after_secs};
use crate::rejection::Rejection;
use crate::reply::Reply;
use crate::stored::HeaderFilter;

/// The metadata entry carrying the problem's `type` URI.
pub const PROBLEM_METADATA: HeaderName = HeaderName::from_static("idem-problem");

/// The metadata entry carrying the encoded `google.rpc.Status`, base64.
pub const STATUS_DETAILS: HeaderName = HeaderName::from_static("grpc-status-details-bin");

/// The metadata entry with the retry delay in milliseconds (gRPC's
/// server pushback for retry policies).
pub const RETRY_PUSHBACK: HeaderName = HeaderName::from_static("grpc-retry-pushback-ms");

/// The `domain` of the `google.rpc.ErrorInfo` in every answer.
pub const ERROR_DOMAIN: &str = "idem.dev";

const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
const GRPC_CONTENT_TYPE: HeaderValue = HeaderValue::from_static("application/grpc");

/// The gRPC status codes (`google.rpc.Code`), as the numbers sent in
/// `grpc-status`.
pub mod code {
    /// Not an error.
    pub const OK: i32 = 0;
    /// Cancelled, typically by the caller.
    pub const CANCELLED: i32 = 1;
    /// Unknown error.
    pub const UNKNOWN: i32 = 2;
    /// The client specified an invalid argument.
    pub const INVALID_ARGUMENT: i32 = 3;
    /// The deadline expired before the operation could complete.
    pub const DEADLINE_EXCEEDED: i32 = 4;
    /// Some requested entity was not found.
    pub const NOT_FOUND: i32 = 5;
    /// The entity a client attempted to create already exists.
    pub const ALREADY_EXISTS: i32 = 6;
    /// The caller may not execute the operation.
    pub const PERMISSION_DENIED: i32 = 7;
    /// Some resource has been exhausted.
    pub const RESOURCE_EXHAUSTED: i32 = 8;
    /// The system is not in a state required for the operation.
    pub const FAILED_PRECONDITION: i32 = 9;
    /// The operation was aborted, typically by a concurrency issue.
    pub const ABORTED: i32 = 10;
    /// The operation was attempted past the valid range.
    pub const OUT_OF_RANGE: i32 = 11;
    /// The operation is not implemented or supported.
    pub const UNIMPLEMENTED: i32 = 12;
    /// An internal error.
    pub const INTERNAL: i32 = 13;
    /// The service is currently unavailable.
    pub const UNAVAILABLE: i32 = 14;
    /// Unrecoverable data loss or corruption.
    pub const DATA_LOSS: i32 = 15;
    /// The request lacks valid authentication credentials.
    pub const UNAUTHENTICATED: i32 = 16;
}

/// The gRPC status code a problem is answered with (the table of the
/// [module docs](self)).
pub const fn status_code(kind: ProblemType) -> i32 {
    match kind {
        ProblemType::MissingKey | ProblemType::InvalidKey | ProblemType::BodyUnreadable => {
            code::INVALID_ARGUMENT
        }
        ProblemType::KeyReused => code::FAILED_PRECONDITION,
        ProblemType::RequestInProgress => code::ABORTED,
        ProblemType::BodyTooLarge => code::RESOURCE_EXHAUSTED,
        ProblemType::StoreUnavailable | ProblemType::ShuttingDown => code::UNAVAILABLE,
        ProblemType::OutcomeUnknown => code::UNKNOWN,
        ProblemType::CorruptRecord => code::DATA_LOSS,
        ProblemType::StoreFailed | ProblemType::ResponseNotStored => code::INTERNAL,
    }
}

/// The `reason` of the `google.rpc.ErrorInfo` a problem carries: a stable
/// `UPPER_SNAKE_CASE` name, unique within [`ERROR_DOMAIN`].
pub const fn reason(kind: ProblemType) -> &'static str {
    match kind {
        ProblemType::MissingKey => "MISSING_KEY",
        ProblemType::InvalidKey => "INVALID_KEY",
        ProblemType::KeyReused => "KEY_REUSED",
        ProblemType::RequestInProgress => "REQUEST_IN_PROGRESS",
        ProblemType::BodyTooLarge => "BODY_TOO_LARGE",
        ProblemType::BodyUnreadable => "BODY_UNREADABLE",
        ProblemType::StoreUnavailable => "STORE_UNAVAILABLE",
        ProblemType::StoreFailed => "STORE_FAILED",
        ProblemType::CorruptRecord => "CORRUPT_RECORD",
        ProblemType::ResponseNotStored => "RESPONSE_NOT_STORED",
        ProblemType::OutcomeUnknown => "OUTCOME_UNKNOWN",
        ProblemType::ShuttingDown => "SHUTTING_DOWN",
    }
}

/// Whether a handler's response with gRPC status `code` is a final answer
/// to store (see the [module docs](self)); every other code is ambiguous.
pub const fn is_final_code(code: i32) -> bool {
    matches!(
        code,
        code::OK
            | code::INVALID_ARGUMENT
            | code::NOT_FOUND
            | code::ALREADY_EXISTS
            | code::PERMISSION_DENIED
            | code::FAILED_PRECONDITION
            | code::OUT_OF_RANGE
            | code::UNIMPLEMENTED
            | code::UNAUTHENTICATED
    )
}

/// A `grpc-status` value: a decimal number of one or two digits without a
/// leading zero, as gRPC clients read it (anything else is not a status:
/// tonic reads it as `UNKNOWN`).
fn parse_status(value: &HeaderValue) -> Option<i32> {
    let bytes = value.as_bytes();
    let digits = bytes.iter().all(u8::is_ascii_digit);
    if !digits || bytes.is_empty() || bytes.len() > 2 || (bytes.len() == 2 && bytes[0] == b'0') {
        return None;
    }
    Some(bytes.iter().fold(0, |n, b| n * 10 + i32::from(b - b'0')))
}

/// The gRPC status a client sees in a response: from its headers for a
/// trailers-only response, else from its trailers. `None` if there is
/// none, or it is not a number.
pub fn grpc_status(headers: &HeaderMap, trailers: Option<&HeaderMap>) -> Option<i32> {
    let value = headers
        .get(&GRPC_STATUS)
        .or_else(|| trailers.and_then(|t| t.get(&GRPC_STATUS)))?;
    parse_status(value)
}

/// Whether a gRPC response with these headers and trailers is a final
/// answer to store: it has a status, and every `grpc-status` it carries (in
/// its headers and in its trailers) is [final](is_final_code). A response
/// that carries none, an unreadable one, or contradictory ones is
/// ambiguous.
pub(crate) fn is_final(headers: &HeaderMap, trailers: Option<&HeaderMap>) -> bool {
    let mut statuses = headers
        .get_all(&GRPC_STATUS)
        .iter()
        .chain(
            trailers
                .into_iter()
                .flat_map(|t| t.get_all(&GRPC_STATUS).iter()),
        )
        .peekable();
    statuses.peek().is_some() && statuses.all(|v| parse_status(v).is_some_and(is_final_code))
}

/// Bytes percent-encoded in `grpc-message`: the gRPC spec leaves
/// `0x20..=0x7E` except `%` as they are and encodes every other byte (the
/// encoder always encodes bytes above `0x7E`; `CONTROLS` adds `0x00..=0x1F`
/// and `0x7F`).
const MESSAGE: &AsciiSet = &CONTROLS.add(b'%');

/// `message` as a `grpc-message` value.
fn encode_message(message: &str) -> HeaderValue {
    let encoded = utf8_percent_encode(message, MESSAGE).to_string();
    // Only visible ASCII and spaces remain: always a valid header value.
    HeaderValue::from_str(&encoded).unwrap_or(HeaderValue::from_static(""))
}

/// The messages of `grpc-status-details-bin`, from googleapis'
/// google/rpc/status.proto, error_details.proto and protobuf's any.proto,
/// duration.proto.
mod proto {
    use std::collections::BTreeMap;

    /// `google.rpc.Status`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct Status {
        #[prost(int32, tag = "1")]
        pub(super) code: i32,
        #[prost(string, tag = "2")]
        pub(super) message: String,
        #[prost(message, repeated, tag = "3")]
        pub(super) details: Vec<Any>,
    }

    /// `google.protobuf.Any`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct Any {
        #[prost(string, tag = "1")]
        pub(super) type_url: String,
        #[prost(bytes = "vec", tag = "2")]
        pub(super) value: Vec<u8>,
    }

    /// `google.rpc.ErrorInfo`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct ErrorInfo {
        #[prost(string, tag = "1")]
        pub(super) reason: String,
        #[prost(string, tag = "2")]
        pub(super) domain: String,
        #[prost(btree_map = "string, string", tag = "3")]
        pub(super) metadata: BTreeMap<String, String>,
    }

    /// `google.rpc.RetryInfo`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct RetryInfo {
        #[prost(message, optional, tag = "1")]
        pub(super) retry_delay: Option<Duration>,
    }

    /// `google.protobuf.Duration`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct Duration {
        #[prost(int64, tag = "1")]
        pub(super) seconds: i64,
        #[prost(int32, tag = "2")]
        pub(super) nanos: i32,
    }

    pub(super) const ERROR_INFO: &str = "type.googleapis.com/google.rpc.ErrorInfo";
    pub(super) const RETRY_INFO: &str = "type.googleapis.com/google.rpc.RetryInfo";
}

/// `message` packed in a `google.protobuf.Any`.
fn any(type_url: &str, message: &impl prost::Message) -> proto::Any {
    proto::Any {
        type_url: type_url.to_owned(),
        value: message.encode_to_vec(),
    }
}

/// `d` as a `google.protobuf.Duration`.
fn duration(d: Duration) -> proto::Duration {
    proto::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        // Below 10^9: always fits.
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// The `google.rpc.Status` of `problem`, encoded (the bytes of
/// `grpc-status-details-bin` before base64).
///
/// # Behavior
/// `code` is [`status_code`], `message` the problem's detail, and `details`
/// a `google.rpc.ErrorInfo` (`reason`: [`reason`], `domain`:
/// [`ERROR_DOMAIN`], `metadata`: `type` = the problem's URI, then each
/// extension member: a string as it is, any other value as JSON text)
/// followed, when the problem has a retry delay, by a
/// `google.rpc.RetryInfo`.
pub fn status_details(problem: &Problem) -> Bytes {
    let kind = problem.kind();
    let mut metadata = BTreeMap::new();
    for (name, value) in problem.members() {
        let text = match value {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        metadata.insert(name.clone(), text);
    }
    metadata.insert("type".to_owned(), kind.uri().to_owned());
    let info = proto::ErrorInfo {
        reason: reason(kind).to_owned(),
        domain: ERROR_DOMAIN.to_owned(),
        metadata,
    };
    let mut details = vec![any(proto::ERROR_INFO, &info)];
    if let Some(after) = problem.retry_after_duration() {
        let retry = proto::RetryInfo {
            retry_delay: Some(duration(after)),
        };
        details.push(any(proto::RETRY_INFO, &retry));
    }
    let status = proto::Status {
        code: status_code(kind),
        message: problem.detail().to_owned(),
        details,
    };
    Bytes::from(prost::Message::encode_to_vec(&status))
}

/// `problem` as a trailers-only gRPC response (see the module docs).
pub(crate) fn render(problem: &Problem) -> Reply {
    let mut reply = trailers_only(status_code(problem.kind()), problem.detail());
    let headers = &mut reply.headers;
    let details = STANDARD_NO_PAD.encode(status_details(problem));
    if let Ok(value) = HeaderValue::from_str(&details) {
        headers.insert(STATUS_DETAILS, value);
    }
    headers.insert(
        PROBLEM_METADATA,
        HeaderValue::from_static(problem.kind().uri()),
    );
    if let Some(after) = problem.retry_after_duration() {
        let millis = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
        headers.insert(RETRY_PUSHBACK, HeaderValue::from(millis));
        headers.insert(
            http::header::RETRY_AFTER,
            HeaderValue::from(retry_after_secs(after)),
        );
    }
    reply
}

/// A trailers-only response: HTTP 200, `grpc-status` `code` and
/// `grpc-message` `message` in the headers, no body.
fn trailers_only(code: i32, message: &str) -> Reply {
    let mut reply = Reply::new(StatusCode::OK, Bytes::new());
    let headers = &mut reply.headers;
    headers.insert(http::header::CONTENT_TYPE, GRPC_CONTENT_TYPE);
    headers.insert(GRPC_STATUS, HeaderValue::from(code));
    if !message.is_empty() {
        headers.insert(GRPC_MESSAGE, encode_message(message));
    }
    reply
}

/// A [`Rejection`] for the scope function of a gRPC service: a
/// trailers-only response with status `code` (see [`code`]) and `message`.
///
/// # Behavior
/// Nothing is claimed and the handler is not called; the answer is sent as
/// it is. (An HTTP [`Rejection::new`] is translated instead, by the table
/// of the [module docs](self#rejections-of-the-scope-function): use this
/// to choose the code.)
///
/// ```
/// use idem_http::grpc;
/// let rejected = grpc::rejection(grpc::code::UNAUTHENTICATED, "no credentials");
/// let response = rejected.into_response();
/// assert_eq!(response.headers()["grpc-status"], "16");
/// ```
pub fn rejection(code: i32, message: &str) -> Rejection {
    let (response, _) = trailers_only(code, message).into_response();
    Rejection::from_response(response)
}

/// A [`covers`](crate::Builder::covers) predicate: the listed unary
/// methods (paths as `/package.Service/Method`) are covered, every other
/// request passes through untouched.
///
/// # Behavior
/// For servers whose streaming methods sit behind the same layer as the
/// unary ones they protect (the module docs say why streaming methods must
/// not be covered). A request is covered when its path is one of
/// `methods` exactly (a listed name without its leading `/` gets one).
/// Requests to other paths are not touched: no key is read, the body is
/// streamed both ways, and [`required(true)`](crate::Builder::required)
/// does not refuse them. On the listed methods the key is read as
/// configured (by default the `idempotency-key` metadata entry).
///
/// ```
/// use idem_http::grpc;
/// let covers = grpc::unary_methods(["/payments.v1.Payments/Charge"]);
/// let parts = |path: &str| http::Request::post(path).body(()).unwrap().into_parts().0;
/// assert!(covers(&parts("/payments.v1.Payments/Charge")));
/// assert!(!covers(&parts("/payments.v1.Payments/Watch")));
/// ```
pub fn unary_methods<I>(
    methods: I,
) -> impl Fn(&http::request::Parts) -> bool + Clone + Send + Sync + 'static
where
    I: IntoIterator,
    I::Item: Into<String>,
{
    let methods: Arc<[String]> = methods
        .into_iter()
        .map(|m| {
            let m: String = m.into();
            if m.starts_with('/') {
                m
            } else {
                format!("/{m}")
            }
        })
        .collect();
    move |parts: &http::request::Parts| methods.iter().any(|m| m == parts.uri.path())
}

/// The gRPC status code a scope function's HTTP rejection of `status` is
/// answered with (the table of the [module docs](self#rejections-of-the-scope-function)).
pub const fn rejection_code(status: StatusCode) -> i32 {
    match status.as_u16() {
        400 => code::INVALID_ARGUMENT,
        401 => code::UNAUTHENTICATED,
        403 => code::PERMISSION_DENIED,
        404 => code::NOT_FOUND,
        409 => code::ABORTED,
        429 => code::RESOURCE_EXHAUSTED,
        402..=499 => code::FAILED_PRECONDITION,
        501 => code::UNIMPLEMENTED,
        502..=504 => code::UNAVAILABLE,
        500..=599 => code::INTERNAL,
        _ => code::UNKNOWN,
    }
}

/// The longest `grpc-message` taken from a rejection, in bytes.
const MAX_REJECTION_MESSAGE: usize = 1024;

/// A scope function's rejection as a gRPC answer: as it is when it has a
/// `grpc-status`, else translated (see the module docs).
pub(crate) fn rejected(reply: Reply) -> Reply {
    if reply.headers.contains_key(&GRPC_STATUS) {
        return reply;
    }
    let code = rejection_code(reply.status);
    let message = rejection_message(&reply);
    let mut out = trailers_only(code, &message);
    let headers = &mut out.headers;
    // Hop-by-hop headers and `content-length` go; so do the body's type
    // and any `grpc-*` entry, which the answer sets itself.
    let passed = HeaderFilter::new(Vec::new());
    for (name, value) in passed.keep(&reply.headers) {
        if name != http::header::CONTENT_TYPE && !name.as_str().starts_with("grpc-") {
            headers.append(name.clone(), value.clone());
        }
    }
    let retry = reply
        .headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_secs);
    let mut details = Vec::new();
    if let Some(after) = retry {
        let millis = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
        headers.insert(RETRY_PUSHBACK, HeaderValue::from(millis));
        let info = proto::RetryInfo {
            retry_delay: Some(duration(after)),
        };
        details.push(any(proto::RETRY_INFO, &info));
    }
    let status = proto::Status {
        code,
        message,
        details,
    };
    let encoded = STANDARD_NO_PAD.encode(prost::Message::encode_to_vec(&status));
    if let Ok(value) = HeaderValue::from_str(&encoded) {
        headers.insert(STATUS_DETAILS, value);
    }
    out
}

/// What a rejection says: its JSON `detail`, else its JSON `title`, else
/// its `text/*` body, else its reason phrase; at most
/// [`MAX_REJECTION_MESSAGE`] bytes.
fn rejection_message(reply: &Reply) -> String {
    let json = || {
        let value: serde_json::Value = serde_json::from_slice(&reply.body).ok()?;
        ["detail", "title"].into_iter().find_map(|member| {
            value
                .get(member)?
                .as_str()
                .map(str::trim)
                .filter(|m| !m.is_empty())
                .map(str::to_owned)
        })
    };
    let text = || {
        let is_text = reply
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.trim_start().to_ascii_lowercase().starts_with("text/"));
        let text = std::str::from_utf8(&reply.body).ok()?.trim();
        (is_text && !text.is_empty()).then(|| text.to_owned())
    };
    let message = json()
        .or_else(text)
        .or_else(|| reply.status.canonical_reason().map(str::to_owned))
        .unwrap_or_else(|| format!("HTTP {}", reply.status.as_u16()));
    truncate(message, MAX_REJECTION_MESSAGE)
}

/// `text` cut to at most `max` bytes, on a character boundary.
fn truncate(mut text: String, max: usize) -> String {
    let mut end = max.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use percent_encoding::percent_decode_str;
    use prost::Message as _;

    fn decode_details(reply: &Reply) -> proto::Status {
        let b64 = reply.headers[STATUS_DETAILS].to_str().unwrap();
        assert!(!b64.contains('='), "unpadded: {b64}");
        let bytes = STANDARD_NO_PAD.decode(b64).unwrap();
        proto::Status::decode(bytes.as_slice()).unwrap()
    }

    #[test]
    fn problems_are_trailers_only_statuses() {
        let r = render(
            &Problem::new(ProblemType::RequestInProgress, "busy 100%\n")
                .retry_after(Duration::from_millis(1500)),
        );
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.headers["content-type"], "application/grpc");
        assert_eq!(r.headers["grpc-status"], "10");
        assert_eq!(r.headers["grpc-message"], "busy 100%25%0A");
        assert_eq!(r.headers["grpc-retry-pushback-ms"], "1500");
        assert_eq!(r.headers["retry-after"], "2");
        assert_eq!(
            r.headers["idem-problem"],
            ProblemType::RequestInProgress.uri()
        );
        assert!(r.body.is_empty() && r.trailers.is_none());
    }

    #[test]
    fn every_problem_has_its_code() {
        use ProblemType as P;
        let table = [
            (P::MissingKey, code::INVALID_ARGUMENT),
            (P::InvalidKey, code::INVALID_ARGUMENT),
            (P::BodyUnreadable, code::INVALID_ARGUMENT),
            (P::KeyReused, code::FAILED_PRECONDITION),
            (P::RequestInProgress, code::ABORTED),
            (P::BodyTooLarge, code::RESOURCE_EXHAUSTED),
            (P::StoreUnavailable, code::UNAVAILABLE),
            (P::ShuttingDown, code::UNAVAILABLE),
            (P::StoreFailed, code::INTERNAL),
            (P::CorruptRecord, code::DATA_LOSS),
            (P::ResponseNotStored, code::INTERNAL),
            (P::OutcomeUnknown, code::UNKNOWN),
        ];
        assert_eq!(table.len(), P::ALL.len());
        for (kind, expected) in table {
            assert_eq!(status_code(kind), expected, "{kind:?}");
            let r = render(&Problem::new(kind, "d"));
            assert_eq!(grpc_status(&r.headers, None), Some(expected), "{kind:?}");
            assert_eq!(decode_details(&r).code, expected);
        }
        let mut reasons: Vec<_> = P::ALL.iter().map(|k| reason(*k)).collect();
        reasons.sort_unstable();
        reasons.dedup();
        assert_eq!(reasons.len(), P::ALL.len());
    }

    #[test]
    fn grpc_message_is_percent_encoded_as_the_spec_says() {
        // Every byte of 0x20..=0x7E but `%` is sent as it is.
        let plain: String = (0x20u8..=0x7e)
            .filter(|b| *b != b'%')
            .map(char::from)
            .collect();
        assert_eq!(encode_message(&plain), plain.as_str());
        let cases = [
            ("100%", "100%25"),
            ("a\tb\r\n", "a%09b%0D%0A"),
            ("\u{7f}", "%7F"),
            ("café ✓", "caf%C3%A9 %E2%9C%93"),
        ];
        for (raw, sent) in cases {
            let value = encode_message(raw);
            assert_eq!(value, sent, "{raw:?}");
            let back = percent_decode_str(value.to_str().unwrap())
                .decode_utf8()
                .unwrap();
            assert_eq!(back, raw);
        }
        // An empty detail sends no grpc-message at all.
        assert!(
            !trailers_only(code::INTERNAL, "")
                .headers
                .contains_key("grpc-message")
        );
    }

    #[test]
    fn details_carry_error_info_and_retry_info() {
        let problem = Problem::new(ProblemType::StoreUnavailable, "store down ✗")
            .retry_after(Duration::from_millis(2250));
        let status = decode_details(&render(&problem));
        assert_eq!(status.code, code::UNAVAILABLE);
        assert_eq!(status.message, "store down ✗");
        assert_eq!(status.details.len(), 2);
        assert_eq!(
            status.details[0].type_url,
            "type.googleapis.com/google.rpc.ErrorInfo"
        );
        let info = proto::ErrorInfo::decode(status.details[0].value.as_slice()).unwrap();
        assert_eq!(info.reason, "STORE_UNAVAILABLE");
        assert_eq!(info.domain, "idem.dev");
        assert_eq!(
            info.metadata["type"],
            "https://idem.dev/problems/store-unavailable"
        );
        assert_eq!(
            status.details[1].type_url,
            "type.googleapis.com/google.rpc.RetryInfo"
        );
        let retry = proto::RetryInfo::decode(status.details[1].value.as_slice()).unwrap();
        assert_eq!(
            retry.retry_delay,
            Some(proto::Duration {
                seconds: 2,
                nanos: 250_000_000
            })
        );
    }

    #[test]
    fn details_without_delay_have_no_retry_info_and_carry_members() {
        let problem = Problem::new(ProblemType::KeyReused, "reused")
            .member("first_used_at", "2030-01-01T00:00:00.000Z")
            .member("first_method", "POST")
            .member("attempts", 3);
        let status = decode_details(&render(&problem));
        assert_eq!(status.code, code::FAILED_PRECONDITION);
        assert_eq!(status.details.len(), 1);
        let info = proto::ErrorInfo::decode(status.details[0].value.as_slice()).unwrap();
        assert_eq!(info.reason, "KEY_REUSED");
        assert_eq!(info.metadata["first_used_at"], "2030-01-01T00:00:00.000Z");
        assert_eq!(info.metadata["first_method"], "POST");
        assert_eq!(info.metadata["attempts"], "3");
        assert_eq!(info.metadata["type"], ProblemType::KeyReused.uri());
    }

    #[test]
    fn details_are_standard_protobuf() {
        // RetryInfo { retry_delay: 1 s } by hand: field 1, length 2, then
        // Duration { seconds (field 1, varint) = 1 }.
        let retry = proto::RetryInfo {
            retry_delay: Some(duration(Duration::from_secs(1))),
        };
        assert_eq!(retry.encode_to_vec(), [0x0a, 0x02, 0x08, 0x01]);
        let status = proto::Status {
            code: 10,
            message: "m".into(),
            details: vec![],
        };
        assert_eq!(status.encode_to_vec(), [0x08, 0x0a, 0x12, 0x01, b'm']);
    }

    #[test]
    fn only_final_statuses_are_stored() {
        assert!(!is_final(&HeaderMap::new(), None));
        assert!(!is_final(&HeaderMap::new(), Some(&HeaderMap::new())));
        for code in 0..=20 {
            let value = HeaderValue::from(code);
            let mut t = HeaderMap::new();
            t.insert("grpc-status", value);
            let stored = is_final_code(code);
            assert_eq!(is_final(&HeaderMap::new(), Some(&t)), stored, "{code}");
            assert_eq!(is_final(&t, None), stored, "{code} trailers-only");
            assert_eq!(grpc_status(&HeaderMap::new(), Some(&t)), Some(code));
        }
        let stored: Vec<i32> = (0..=16).filter(|c| is_final_code(*c)).collect();
        assert_eq!(stored, [0, 3, 5, 6, 7, 9, 11, 12, 16]);
        for bad in ["x", "", " 0", "+0", "-1", "00", "05", "000", "0 "] {
            let mut t = HeaderMap::new();
            t.insert("grpc-status", HeaderValue::from_str(bad).unwrap());
            assert!(!is_final(&HeaderMap::new(), Some(&t)), "{bad:?}");
            assert_eq!(grpc_status(&HeaderMap::new(), Some(&t)), None, "{bad:?}");
        }
    }

    #[test]
    fn contradictory_statuses_are_ambiguous() {
        let status = |v: &'static str| {
            let mut m = HeaderMap::new();
            m.insert("grpc-status", HeaderValue::from_static(v));
            m
        };
        assert!(is_final(&status("0"), Some(&status("5"))));
        assert!(!is_final(&status("0"), Some(&status("13"))));
        assert!(!is_final(&status("13"), Some(&status("0"))));
        let mut twice = status("0");
        twice.append("grpc-status", HeaderValue::from_static("14"));
        assert!(!is_final(&HeaderMap::new(), Some(&twice)));
        // What a client sees: the headers' status first.
        assert_eq!(grpc_status(&status("13"), Some(&status("0"))), Some(13));
    }

    #[test]
    fn rejections_are_trailers_only() {
        let response = rejection(code::UNAUTHENTICATED, "no tenant").into_response();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["grpc-status"], "16");
        assert_eq!(response.headers()["grpc-message"], "no tenant");
        assert!(response.body().is_empty());
    }

    fn parts(path: &str) -> http::request::Parts {
        http::Request::post(path).body(()).unwrap().into_parts().0
    }

    #[test]
    fn only_the_listed_methods_are_covered() {
        let covers = unary_methods(["/p.S/Unary", "p.S/Other"]);
        assert!(covers(&parts("/p.S/Unary")));
        // A name without its leading slash gets one.
        assert!(covers(&parts("/p.S/Other")));
        assert!(!covers(&parts("/p.S/Stream")));
        assert!(!covers(&parts("/p.S/Unary/")));
        assert!(!covers(&parts("/p.S/UnaryX")));
        // The query is not part of the path.
        assert!(covers(&parts("/p.S/Unary?x=1")));
        let none = unary_methods(Vec::<String>::new());
        assert!(!none(&parts("/p.S/Unary")));
    }

    #[test]
    fn http_rejections_map_to_the_codes_of_their_intent() {
        let table = [
            (400, code::INVALID_ARGUMENT),
            (401, code::UNAUTHENTICATED),
            (403, code::PERMISSION_DENIED),
            (404, code::NOT_FOUND),
            (409, code::ABORTED),
            (429, code::RESOURCE_EXHAUSTED),
            (402, code::FAILED_PRECONDITION),
            (410, code::FAILED_PRECONDITION),
            (422, code::FAILED_PRECONDITION),
            (499, code::FAILED_PRECONDITION),
            (500, code::INTERNAL),
            (501, code::UNIMPLEMENTED),
            (502, code::UNAVAILABLE),
            (503, code::UNAVAILABLE),
            (504, code::UNAVAILABLE),
            (505, code::INTERNAL),
            (599, code::INTERNAL),
            (100, code::UNKNOWN),
            (200, code::UNKNOWN),
            (204, code::UNKNOWN),
            (302, code::UNKNOWN),
        ];
        for (status, expected) in table {
            let status = StatusCode::from_u16(status).unwrap();
            assert_eq!(rejection_code(status), expected, "{status}");
            let r = rejected(Rejection::new(status, "d").into_reply());
            assert_eq!(grpc_status(&r.headers, None), Some(expected), "{status}");
            assert_eq!(decode_details(&r).code, expected);
        }
    }

    #[test]
    fn an_http_rejection_becomes_a_trailers_only_status() {
        let mut rejection =
            Rejection::new(StatusCode::UNAUTHORIZED, "token expired ✗").into_response();
        let headers = rejection.headers_mut();
        headers.insert("www-authenticate", HeaderValue::from_static("Bearer"));
        headers.insert("connection", HeaderValue::from_static("close"));
        headers.insert("content-length", HeaderValue::from_static("99"));
        headers.insert("grpc-encoding", HeaderValue::from_static("gzip"));
        let r = rejected(Rejection::from_response(rejection).into_reply());
        assert_eq!(r.status, StatusCode::OK);
        assert!(r.body.is_empty() && r.trailers.is_none());
        assert_eq!(r.headers["content-type"], "application/grpc");
        assert_eq!(r.headers["grpc-status"], "16");
        // The problem's detail, percent-encoded.
        assert_eq!(r.headers["grpc-message"], "token expired %E2%9C%97");
        assert_eq!(r.headers["www-authenticate"], "Bearer");
        for gone in [
            "connection",
            "content-length",
            "grpc-encoding",
            "idem-problem",
        ] {
            assert!(!r.headers.contains_key(gone), "{gone}");
        }
        let status = decode_details(&r);
        assert_eq!(
            (status.code, status.message.as_str()),
            (16, "token expired ✗")
        );
        assert!(status.details.is_empty());
        assert!(!r.headers.contains_key("grpc-retry-pushback-ms"));
    }

    #[test]
    fn a_rejection_with_retry_after_carries_retry_info() {
        let mut rejection =
            Rejection::new(StatusCode::TOO_MANY_REQUESTS, "slow down").into_response();
        rejection
            .headers_mut()
            .insert("retry-after", HeaderValue::from_static("3"));
        let r = rejected(Rejection::from_response(rejection).into_reply());
        assert_eq!(r.headers["grpc-status"], "8");
        assert_eq!(r.headers["retry-after"], "3");
        assert_eq!(r.headers["grpc-retry-pushback-ms"], "3000");
        let status = decode_details(&r);
        assert_eq!(status.details.len(), 1);
        let retry = proto::RetryInfo::decode(status.details[0].value.as_slice()).unwrap();
        assert_eq!(retry.retry_delay, Some(duration(Duration::from_secs(3))));
        // An HTTP date is passed on, but is no delay.
        let mut dated = Rejection::new(StatusCode::SERVICE_UNAVAILABLE, "later").into_response();
        dated.headers_mut().insert(
            "retry-after",
            HeaderValue::from_static("Wed, 21 Oct 2037 07:28:00 GMT"),
        );
        let r = rejected(Rejection::from_response(dated).into_reply());
        assert_eq!(r.headers["grpc-status"], "14");
        assert!(r.headers.contains_key("retry-after"));
        assert!(!r.headers.contains_key("grpc-retry-pushback-ms"));
        assert!(decode_details(&r).details.is_empty());
    }

    #[test]
    fn the_message_is_the_rejections_own() {
        let message = |response: http::Response<Bytes>| {
            let r = rejected(Rejection::from_response(response).into_reply());
            decode_details(&r).message
        };
        let with = |status: u16, content_type: Option<&str>, body: &'static str| {
            let mut b = http::Response::builder().status(status);
            if let Some(t) = content_type {
                b = b.header("content-type", t);
            }
            b.body(Bytes::from_static(body.as_bytes())).unwrap()
        };
        // problem+json: detail, else title.
        assert_eq!(
            message(with(
                403,
                Some("application/problem+json"),
                r#"{"title":"Forbidden","detail":"not yours"}"#
            )),
            "not yours"
        );
        assert_eq!(
            message(with(
                403,
                Some("application/json"),
                r#"{"title":"Forbidden","detail":"  "}"#
            )),
            "Forbidden"
        );
        // Plain text, trimmed.
        assert_eq!(
            message(with(401, Some("Text/Plain; charset=utf-8"), " no token\n")),
            "no token"
        );
        // Neither: the reason phrase.
        assert_eq!(
            message(with(401, Some("application/octet-stream"), "no token")),
            "Unauthorized"
        );
        assert_eq!(message(with(401, None, "")), "Unauthorized");
        assert_eq!(message(with(599, None, "")), "HTTP 599");
        // At most 1 KiB, cut on a character boundary.
        let long: &'static str = "é".repeat(1000).leak();
        let cut = message(with(400, Some("text/plain"), long));
        assert_eq!(cut.len(), MAX_REJECTION_MESSAGE);
        assert!(cut.chars().all(|c| c == 'é'));
    }

    #[test]
    fn a_grpc_rejection_is_sent_as_it_is() {
        let original = rejection(code::PERMISSION_DENIED, "tenant suspended").into_reply();
        assert_eq!(rejected(original.clone()), original);
        // Any response with a grpc-status, even a strange one.
        let mut odd = Reply::new(StatusCode::UNAUTHORIZED, Bytes::from_static(b"x"));
        odd.headers
            .insert("grpc-status", HeaderValue::from_static("7"));
        assert_eq!(rejected(odd.clone()), odd);
    }

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncate("abc".into(), 5), "abc");
        assert_eq!(truncate("abc".into(), 2), "ab");
        assert_eq!(truncate("aé".into(), 2), "a");
        assert_eq!(truncate(String::new(), 0), "");
    }
}
