//! The middleware: which requests it protects, their key, and the re-send
//! loop.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Extensions, HeaderMap, HeaderName, Method, StatusCode, Version};
use reqwest::{Request, Response, Url};
use reqwest_middleware::{Middleware, Next};
use tokio::time::Instant;

use crate::error::{Failure, IdempotencyError};
use crate::info::{AttemptEvent, IdempotencyInfo};
use crate::key::{Key, KeyError};
use crate::policy::{self, RetryPolicy};
use crate::problem::{Problem, Verdict, verdict};

/// The default key header, `Idempotency-Key`.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// The header that marks a replayed answer, `Idempotent-Replayed` (value
/// `true`), as `idem-tower` and the best-known payment APIs send it.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// The default limit of [`IdempotencyMiddlewareBuilder::max_buffered_body`]:
/// 1 MiB.
pub const DEFAULT_MAX_BUFFERED_BODY: u64 = 1024 * 1024;

/// Request extension: protect this request whatever its method (add a key,
/// re-send on failure). Set it with `RequestBuilder::with_extension(Protected)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Protected;

/// Request extension: leave this request alone whatever its method (no key
/// added, no re-send). Wins over [`Protected`] and a [`Key`] extension.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Unprotected;

type Observer = Arc<dyn Fn(&AttemptEvent<'_>) + Send + Sync>;

struct Config {
    policy: RetryPolicy,
    methods: Vec<Method>,
    header: HeaderName,
    max_buffered_body: u64,
    observer: Option<Observer>,
    rng: Mutex<fastrand::Rng>,
}

/// A `reqwest-middleware` middleware that sends each protected request with
/// an idempotency key and re-sends it, with the same key, until it gets a
/// final answer — the client side of docs/http-contract.md.
///
/// # Behavior
///
/// **Which requests are protected.** `POST` and `PATCH` by default (the
/// methods the server honours keys on by default; `GET`, `PUT` and `DELETE`
/// are idempotent by HTTP and are left to a general retry policy), changed
/// with [`methods`](IdempotencyMiddlewareBuilder::methods). Per request,
/// the [`Protected`] extension (or a [`Key`] extension) protects any method
/// and [`Unprotected`] opts out. An unprotected request passes through
/// untouched: no key added, no re-send, no [`IdempotencyInfo`].
///
/// **The key.** One per logical request, the same on every re-send:
/// - a [`Key`] in the request's extensions (`with_extension(key)`), sent as
///   an RFC 8941 string (`Idempotency-Key: "…"`);
/// - else an `Idempotency-Key` header the caller set, kept byte for byte
///   (it must parse as a key, quoted or bare; if a `Key` extension is also
///   set they must agree);
/// - else a fresh random UUID v4 ([`Key::random`]).
///
/// A caller that wants to retry the operation later, after its own crash or
/// a spent budget, supplies the key (and stores it); the key of a generated
/// one is in the answer's [`IdempotencyInfo`] and in the error.
///
/// **When it re-sends** (after the [`RetryPolicy`]'s backoff, never sooner
/// than the answer's `Retry-After`):
///
/// | attempt got | re-sent? | why (docs/http-contract.md) |
/// |---|---|---|
/// | connection refused or cut, reply lost, timeout, body broken off | yes | "no answer at all" |
/// | 409 + `Retry-After` (`request-in-progress`) | yes | "Wait `Retry-After`, retry with the same key" |
/// | 429 | yes | "429 or 503 from a gateway or rate limiter" |
/// | 503 (`store-unavailable`, `shutting-down`, a gateway's) | yes | nothing was executed |
/// | 500 (`store-failed`, or the API's own), 502, 504 | yes | "any other 5xx from the API": the key makes the re-send safe — the server runs the operation at most once and answers the rest with the first answer or `outcome-unknown` |
/// | 400 `body-unreadable` | yes | the server did not get the whole body; nothing ran |
/// | 500 `outcome-unknown`, `response-not-stored`, `corrupt-record` | **no** | "Do not retry with this key" |
/// | 422 `key-reused` and every other 4xx, 409 without `Retry-After` | **no** | "`4xx` answers are final"; a re-send gets the same answer |
/// | any answer with `Idempotent-Replayed: true` | **no** | the key's stored answer |
/// | 2xx, 3xx, 501, 505 and up | **no** | final |
///
/// **What the caller gets.** A final answer is `Ok(response)`, including a
/// 422 `key-reused` or a 500 `outcome-unknown`, with an
/// [`IdempotencyInfo`] (key, attempts, replayed, recognised problem) in its
/// extensions ([`IdempotencyResponseExt`](crate::IdempotencyResponseExt)).
/// No final answer is an error: `reqwest_middleware::Error::Middleware`
/// holding an [`IdempotencyError`] (budget spent, attempts exhausted, body
/// not re-sendable, bad caller key) with the key and the last attempt's
/// [`Failure`]; get it with [`IdempotencyError::of`]. Errors that do not
/// come from the exchange (a reqwest builder or redirect-policy error, an
/// inner middleware's error) are returned unchanged, without re-send.
///
/// **Bodies.** The request body must be re-sendable (bytes, JSON, a form):
/// a streaming body (`reqwest::Request::try_clone` gives `None`) is sent
/// once and, if that attempt is not final, the error is
/// [`IdempotencyError::NotResendable`]. Response bodies with a known length
/// up to [`max_buffered_body`](IdempotencyMiddlewareBuilder::max_buffered_body)
/// are read inside the attempt, so a connection cut while the answer
/// arrives is re-sent like a lost reply and the caller gets a complete
/// body; longer or chunked bodies are handed over unread (an error reading
/// them is then the caller's: re-send with the same key from
/// [`IdempotencyInfo::key`] to get the replay).
///
/// **Time.** Waits use `tokio::time::sleep` (a Tokio runtime is required).
/// Each attempt is bounded by what is left of the budget and by the
/// policy's `attempt_timeout`.
///
/// **Placement.** Put it outermost (first `with`), and do not stack a
/// general retry middleware around it for the same requests: that would
/// re-send without the bookkeeping here (a retry middleware *inside* it is
/// harmless but redundant).
///
/// ```
/// use std::time::Duration;
/// use idem_client::{IdempotencyMiddleware, RetryPolicy, reqwest_middleware::ClientBuilder};
///
/// let middleware = IdempotencyMiddleware::builder()
///     .policy(RetryPolicy::default().budget(Duration::from_secs(30)))
///     .on_attempt(|event| {
///         if event.failure.is_some() {
///             eprintln!("attempt {} of key {} failed", event.attempt, event.key);
///         }
///     })
///     .build();
/// let client = ClientBuilder::new(reqwest::Client::new()).with(middleware).build();
/// # let _ = client;
/// ```
#[derive(Clone)]
pub struct IdempotencyMiddleware {
    config: Arc<Config>,
}

impl Default for IdempotencyMiddleware {
    fn default() -> Self {
        Self::builder().build()
    }
}

impl fmt::Debug for IdempotencyMiddleware {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyMiddleware")
            .field("policy", &self.config.policy)
            .field("methods", &self.config.methods)
            .field("header", &self.config.header)
            .field("max_buffered_body", &self.config.max_buffered_body)
            .field("observer", &self.config.observer.is_some())
            .finish_non_exhaustive()
    }
}

impl IdempotencyMiddleware {
    /// The middleware with every default (see [`IdempotencyMiddlewareBuilder`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// A builder, starting from the defaults.
    pub fn builder() -> IdempotencyMiddlewareBuilder {
        IdempotencyMiddlewareBuilder::default()
    }

    fn protects(&self, method: &Method, extensions: &Extensions) -> bool {
        if extensions.get::<Unprotected>().is_some() {
            return false;
        }
        extensions.get::<Protected>().is_some()
            || extensions.get::<Key>().is_some()
            || self.config.methods.contains(method)
    }

    /// The request's key (see the type's docs); puts it in the header unless
    /// the caller's header already carries it.
    fn key_for(
        &self,
        request: &mut Request,
        extensions: &Extensions,
    ) -> Result<Key, IdempotencyError> {
        let header = &self.config.header;
        let mut values = request.headers().get_all(header).iter();
        let from_header = match (values.next(), values.count()) {
            (None, _) => None,
            (Some(value), 0) => {
                Some(Key::from_header_value(value).map_err(IdempotencyError::InvalidKey)?)
            }
            (Some(_), more) => {
                return Err(IdempotencyError::InvalidKey(KeyError::Multiple {
                    count: more + 1,
                }));
            }
        };
        let from_extension = extensions.get::<Key>();
        let key = match (from_header, from_extension) {
            (Some(header), Some(extension)) if header != *extension => {
                return Err(IdempotencyError::ConflictingKeys {
                    header,
                    extension: extension.clone(),
                });
            }
            (Some(header), _) => return Ok(header),
            (None, Some(extension)) => extension.clone(),
            (None, None) => Key::random().map_err(IdempotencyError::KeyGeneration)?,
        };
        request
            .headers_mut()
            .insert(header.clone(), key.to_header_value());
        Ok(key)
    }

    fn unit(&self) -> f64 {
        self.config
            .rng
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .f64()
    }

    fn observe(&self, event: &AttemptEvent<'_>) {
        if let Some(observer) = &self.config.observer {
            observer(event);
        }
    }

    async fn protect(
        &self,
        mut request: Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<Response> {
        let key = self
            .key_for(&mut request, extensions)
            .map_err(reqwest_middleware::Error::middleware)?;
        let policy = extensions
            .get::<RetryPolicy>()
            .cloned()
            .unwrap_or_else(|| self.config.policy.clone());
        let budget = policy.total_budget();
        let started = Instant::now();
        // A budget too large for the clock is no budget at all.
        let deadline = started
            .checked_add(budget)
            .unwrap_or_else(|| far_future(started));
        let max_body = self.config.max_buffered_body;
        let mut attempt: u32 = 0;
        loop {
            attempt = attempt.saturating_add(1);
            let spare = request.try_clone();
            let attempt_started = Instant::now();
            let remaining = deadline.saturating_duration_since(attempt_started);
            let limit = policy
                .attempt_limit()
                .map_or(remaining, |limit| limit.min(remaining));
            let sent = tokio::time::timeout(limit, async {
                let response = next.clone().run(request, extensions).await?;
                Ok::<_, reqwest_middleware::Error>(inspect(response, max_body).await)
            })
            .await;
            let elapsed = attempt_started.elapsed();
            let (failure, retry_after, seen) = match sent {
                Err(_) => (Failure::TimedOut(limit), None, Seen::default()),
                Ok(Err(reqwest_middleware::Error::Reqwest(e))) if resendable(&e) => {
                    (Failure::Transport(e), None, Seen::default())
                }
                Ok(Err(other)) => return Err(other),
                Ok(Ok(Err(body_broke_off))) => {
                    (Failure::Transport(body_broke_off), None, Seen::default())
                }
                Ok(Ok(Ok(answer))) => {
                    let seen = Seen {
                        status: Some(answer.status),
                        replayed: answer.replayed,
                        problem: answer.problem,
                    };
                    match verdict(
                        answer.status,
                        answer.replayed,
                        answer.problem,
                        answer.retry_after,
                    ) {
                        Verdict::Final => {
                            self.observe(&AttemptEvent {
                                key: &key,
                                attempt,
                                elapsed,
                                status: seen.status,
                                replayed: seen.replayed,
                                problem: seen.problem,
                                failure: None,
                                last: true,
                                extensions,
                            });
                            let mut response = answer.response;
                            response.extensions_mut().insert(IdempotencyInfo {
                                key,
                                attempts: attempt,
                                replayed: answer.replayed,
                                problem: answer.problem,
                            });
                            return Ok(response);
                        }
                        Verdict::Retry => (
                            Failure::Status {
                                status: answer.status,
                                problem: answer.problem,
                                retry_after: answer.retry_after,
                                body: answer.body.unwrap_or_default(),
                            },
                            answer.retry_after,
                            seen,
                        ),
                    }
                }
            };
            let step = if spare.is_none() {
                Step::NotResendable
            } else if attempt >= policy.attempts_allowed() {
                Step::Exhausted
            } else {
                let delay = policy.delay(attempt, retry_after, self.unit());
                if delay >= deadline.saturating_duration_since(Instant::now()) {
                    Step::BudgetSpent
                } else {
                    Step::Resend(delay)
                }
            };
            self.observe(&AttemptEvent {
                key: &key,
                attempt,
                elapsed,
                status: seen.status,
                replayed: seen.replayed,
                problem: seen.problem,
                failure: Some(&failure),
                last: !matches!(step, Step::Resend(..)),
                extensions,
            });
            let error = match step {
                Step::Resend(delay) => match spare {
                    Some(spare) => {
                        tracing::debug!(
                            key = %key, attempt, ?delay, failure = %failure,
                            "idempotent request not answered; re-sending with the same key"
                        );
                        tokio::time::sleep(delay).await;
                        request = spare;
                        continue;
                    }
                    // Not reached: a re-send is chosen only with a copy.
                    None => IdempotencyError::NotResendable {
                        key,
                        attempts: attempt,
                        last: failure,
                    },
                },
                Step::NotResendable => IdempotencyError::NotResendable {
                    key,
                    attempts: attempt,
                    last: failure,
                },
                Step::Exhausted => IdempotencyError::AttemptsExhausted {
                    key,
                    attempts: attempt,
                    last: failure,
                },
                Step::BudgetSpent => IdempotencyError::BudgetSpent {
                    key,
                    attempts: attempt,
                    budget,
                    last: failure,
                },
            };
            tracing::debug!(error = %error, "idempotent request given up");
            return Err(reqwest_middleware::Error::middleware(error));
        }
    }
}

#[async_trait::async_trait]
impl Middleware for IdempotencyMiddleware {
    async fn handle(
        &self,
        request: Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<Response> {
        if !self.protects(request.method(), extensions) {
            return next.run(request, extensions).await;
        }
        self.protect(request, extensions, next).await
    }
}

/// What happens after an attempt without a final answer.
enum Step {
    Resend(Duration),
    NotResendable,
    Exhausted,
    BudgetSpent,
}

/// What an attempt's answer said, for the observer.
#[derive(Default)]
struct Seen {
    status: Option<StatusCode>,
    replayed: bool,
    problem: Option<Problem>,
}

/// About a century after `start`.
fn far_future(start: Instant) -> Instant {
    let century = Duration::from_secs(100 * 365 * 24 * 60 * 60);
    start.checked_add(century).unwrap_or(start)
}

/// Whether a reqwest error is a failure of the exchange (re-send) rather
/// than of the request itself (builder, redirect policy, decoding: the same
/// request would fail the same way).
fn resendable(error: &reqwest::Error) -> bool {
    !(error.is_builder() || error.is_redirect() || error.is_status() || error.is_decode())
}

/// One attempt's answer, its body buffered when it is short enough.
struct Answer {
    response: Response,
    status: StatusCode,
    replayed: bool,
    problem: Option<Problem>,
    retry_after: Option<Duration>,
    body: Option<Bytes>,
}

fn is_replayed(headers: &HeaderMap) -> bool {
    headers
        .get(IDEMPOTENT_REPLAYED)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

/// Reads the answer's headers and, if its length is known and at most
/// `max_body`, its body (then rebuilds the response around the bytes).
async fn inspect(mut response: Response, max_body: u64) -> Result<Answer, reqwest::Error> {
    let status = response.status();
    let replayed = is_replayed(response.headers());
    let retry_after = policy::retry_after(response.headers(), SystemTime::now());
    if response.content_length().is_none_or(|n| n > max_body) {
        return Ok(Answer {
            response,
            status,
            replayed,
            problem: None,
            retry_after,
            body: None,
        });
    }
    let extensions = std::mem::take(response.extensions_mut());
    let headers = response.headers().clone();
    let url = response.url().clone();
    let version = response.version();
    let body = response.bytes().await?;
    let problem = crate::problem::of_response(status, &headers, &body);
    let response = rebuild(status, version, headers, extensions, url, body.clone());
    Ok(Answer {
        response,
        status,
        replayed,
        problem,
        retry_after,
        body: Some(body),
    })
}

/// A reqwest response with these parts and a body of `body`.
fn rebuild(
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    extensions: Extensions,
    url: Url,
    body: Bytes,
) -> Response {
    let mut response = http::Response::new(reqwest::Body::from(body));
    *response.status_mut() = status;
    *response.version_mut() = version;
    *response.headers_mut() = headers;
    *response.extensions_mut() = extensions;
    // The response URL travels as a private extension that only reqwest's
    // builder extension can set.
    let with_url = reqwest::ResponseBuilderExt::url(http::Response::builder(), url).body(());
    if let Ok(with_url) = with_url {
        response
            .extensions_mut()
            .extend(with_url.into_parts().0.extensions);
    }
    Response::from(response)
}

/// Configures an [`IdempotencyMiddleware`].
///
/// | option | default |
/// |---|---|
/// | [`policy`](Self::policy) | [`RetryPolicy::default()`] |
/// | [`methods`](Self::methods) | `POST`, `PATCH` |
/// | [`header_name`](Self::header_name) | `Idempotency-Key` |
/// | [`max_buffered_body`](Self::max_buffered_body) | 1 MiB |
/// | [`on_attempt`](Self::on_attempt) | none |
/// | [`jitter_seed`](Self::jitter_seed) | random |
#[must_use]
pub struct IdempotencyMiddlewareBuilder {
    policy: RetryPolicy,
    methods: Vec<Method>,
    header: HeaderName,
    max_buffered_body: u64,
    observer: Option<Observer>,
    seed: Option<u64>,
}

impl Default for IdempotencyMiddlewareBuilder {
    fn default() -> Self {
        Self {
            policy: RetryPolicy::default(),
            methods: vec![Method::POST, Method::PATCH],
            header: IDEMPOTENCY_KEY,
            max_buffered_body: DEFAULT_MAX_BUFFERED_BODY,
            observer: None,
            seed: None,
        }
    }
}

impl fmt::Debug for IdempotencyMiddlewareBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyMiddlewareBuilder")
            .field("policy", &self.policy)
            .field("methods", &self.methods)
            .field("header", &self.header)
            .field("max_buffered_body", &self.max_buffered_body)
            .field("observer", &self.observer.is_some())
            .field("seed", &self.seed)
            .finish()
    }
}

impl IdempotencyMiddlewareBuilder {
    /// The retry policy of every protected request (a [`RetryPolicy`] in a
    /// request's extensions replaces it for that request).
    pub fn policy(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The methods protected by default (replacing `POST`, `PATCH`). Match
    /// the server's setting: a method it does not honour keys on gains
    /// nothing from a key, and its re-sends are not deduplicated.
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.methods = methods.into_iter().collect();
        self
    }

    /// The key header (default `Idempotency-Key`), for servers configured
    /// with another name.
    pub fn header_name(mut self, name: HeaderName) -> Self {
        self.header = name;
        self
    }

    /// The longest response body read inside an attempt (default 1 MiB; 0
    /// reads none, which also stops problem types from being recognised).
    /// See "Bodies" on [`IdempotencyMiddleware`].
    pub fn max_buffered_body(mut self, bytes: u64) -> Self {
        self.max_buffered_body = bytes;
        self
    }

    /// Calls `observer` after each attempt of a protected request (metrics,
    /// logs). It runs inline: keep it quick and do not block. An attempt
    /// that ends in an error the middleware returns unchanged (a reqwest
    /// builder or redirect-policy error, an inner middleware's error) is not
    /// reported.
    pub fn on_attempt<F>(mut self, observer: F) -> Self
    where
        F: Fn(&AttemptEvent<'_>) + Send + Sync + 'static,
    {
        self.observer = Some(Arc::new(observer));
        self
    }

    /// Seeds the jitter's random numbers (for reproducible tests; keys stay
    /// random).
    pub fn jitter_seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// The middleware.
    pub fn build(self) -> IdempotencyMiddleware {
        let rng = match self.seed {
            Some(seed) => fastrand::Rng::with_seed(seed),
            None => fastrand::Rng::new(),
        };
        IdempotencyMiddleware {
            config: Arc::new(Config {
                policy: self.policy,
                methods: self.methods,
                header: self.header,
                max_buffered_body: self.max_buffered_body,
                observer: self.observer,
                rng: Mutex::new(rng),
            }),
        }
    }
}
