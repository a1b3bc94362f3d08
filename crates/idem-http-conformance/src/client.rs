//! What the cases use: a case's server and client ([`Ctx`]), a response
//! read in full ([`Reply`]), checks that fail a case instead of panicking
//! (`ensure!`, `ensure_eq!`), and waiting for a condition with a deadline.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use idem_conformance::faulty::{Fault, FaultKind, Op};
use idem_core::store::{Store as _, Versioned};
use idem_core::{Clock as _, Engine, IdempotencyKey, Policy, RecordKey, Scope, SystemClock};
use idem_http::{PROBLEM_JSON, ProblemType};
use libtest_mimic::Failed;

use crate::fixture::{Adapter, App, Options, Server, Setup, TestClock, TestStore};

/// Fails the case with a message (and where) unless the condition holds.
macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err($crate::client::failure(format!($($arg)+)));
        }
    };
}

/// Fails the case unless both sides are equal, showing both.
macro_rules! ensure_eq {
    ($got:expr, $want:expr, $($arg:tt)+) => {
        match (&$got, &$want) {
            (got, want) => {
                if got != want {
                    return Err($crate::client::failure(format!(
                        "{}: got {:?}, want {:?}",
                        format!($($arg)+),
                        got,
                        want
                    )));
                }
            }
        }
    };
}

pub(crate) use {ensure, ensure_eq};

/// A failure, located at the case's line (the checks of [`Reply`] are
/// `#[track_caller]`).
#[track_caller]
pub(crate) fn failure(message: String) -> Failed {
    let at = std::panic::Location::caller();
    Failed::from(format!("{}:{}: {message}", at.file(), at.line()))
}

/// How long a case waits for something the server must do by itself.
pub(crate) const WAIT: Duration = Duration::from_secs(10);

/// The pause between two polls.
const POLL: Duration = Duration::from_millis(10);

/// Polls `check` until it returns `Some`, and returns that value; fails
/// naming `what` if `within` passes first.
pub(crate) async fn until<T, F, Fut>(
    what: &str,
    within: Duration,
    mut check: F,
) -> Result<T, Failed>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>, Failed>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            return Err(Failed::from(format!(
                "timed out after {within:?} waiting for {what}"
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Polls `check` for the whole of `period` and fails naming `what` the
/// first time it returns `false`: for a promise that something does *not*
/// happen, which no event announces (a handler cancelled because its client
/// went away).
pub(crate) async fn holds_for(
    what: &str,
    period: Duration,
    mut check: impl FnMut() -> bool,
) -> Result<(), Failed> {
    let deadline = Instant::now() + period;
    loop {
        if !check() {
            return Err(Failed::from(format!(
                "{what}: broken after less than {period:?}"
            )));
        }
        if Instant::now() >= deadline {
            return Ok(());
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The tenant of every request unless a case says otherwise.
pub(crate) const TENANT: &str = "t1";

/// A running case: the adapter's server over the case's [`Setup`], and a
/// client.
pub(crate) struct Ctx {
    pub(crate) setup: Setup,
    pub(crate) http: reqwest::Client,
    base: String,
    // Dropped last: stops the server. (In a mutex only to make `Ctx`
    // `Sync`: the guard is `Send` only.)
    _server: std::sync::Mutex<Server>,
}

impl Ctx {
    /// Serves `options` with the default engine policy.
    pub(crate) async fn start(adapter: &dyn Adapter, options: Options) -> Result<Self, Failed> {
        Self::start_with(adapter, options, Policy::default()).await
    }

    /// Serves `options` over an engine with `policy`, on a [`TestClock`]
    /// started at the system time (a realistic `first_used_at`).
    pub(crate) async fn start_with(
        adapter: &dyn Adapter,
        options: Options,
        policy: Policy,
    ) -> Result<Self, Failed> {
        let store = TestStore::new(idem_core::MemoryStore::new()).with_name("conformance");
        let clock = TestClock::new(SystemClock.now());
        let engine = Engine::with_clock(store.clone(), clock)
            .with_policy(policy)
            .map_err(|e| Failed::from(format!("the case's policy is invalid: {e}")))?;
        let setup = Setup {
            engine: Arc::new(engine),
            app: App::with_store(store),
            options,
        };
        let server = adapter.serve(setup.clone()).await;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .map_err(|e| Failed::from(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            setup,
            http,
            base: server.base.trim_end_matches('/').to_owned(),
            _server: std::sync::Mutex::new(server),
        })
    }

    /// The application.
    pub(crate) fn app(&self) -> &App {
        &self.setup.app
    }

    /// The engine's store.
    pub(crate) fn store(&self) -> &TestStore {
        self.setup.engine.store()
    }

    /// The engine's clock: time passes only when the case advances it.
    pub(crate) fn clock(&self) -> &TestClock {
        self.setup.engine.clock()
    }

    /// Waits until something sleeps on the engine's clock (a heartbeat, a
    /// waiting duplicate, a background retry), so that advancing it wakes
    /// that sleep instead of running ahead of it; fails naming `what` after
    /// [`WAIT`].
    pub(crate) async fn sleeping(&self, what: &str) -> Result<(), Failed> {
        until(what, WAIT, || async {
            Ok((self.clock().pending_sleepers() > 0).then_some(()))
        })
        .await
    }

    /// The record of `key` (tenant [`TENANT`]) as the store holds it now,
    /// if any.
    pub(crate) async fn record(&self, key: &str) -> Result<Option<Versioned>, Failed> {
        let now = self.clock().now();
        self.store()
            .inner()
            .get(&record_key(key)?, now)
            .await
            .map_err(|e| Failed::from(format!("reading the record of {key:?}: {e}")))
    }

    /// Makes every call of the store fail as unavailable, until
    /// [`switch_on`](Self::switch_on).
    pub(crate) fn switch_off(&self) {
        for op in Op::ALL {
            self.store().inject(Fault::new(op, FaultKind::Unavailable));
        }
    }

    /// Undoes [`switch_off`](Self::switch_off).
    pub(crate) fn switch_on(&self) {
        self.store().clear();
    }

    /// The server's address (`127.0.0.1:port`).
    pub(crate) fn authority(&self) -> &str {
        self.base.strip_prefix("http://").unwrap_or(&self.base)
    }

    /// A request to `path` as tenant [`TENANT`].
    pub(crate) fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .header("x-tenant", TENANT)
    }

    /// A `POST` to `path` with `key` (if any) and `body`.
    pub(crate) fn post(
        &self,
        path: &str,
        key: Option<&str>,
        body: &str,
    ) -> reqwest::RequestBuilder {
        let request = self.request(Method::POST, path).body(body.to_owned());
        match key {
            Some(key) => request.header("idempotency-key", key),
            None => request,
        }
    }

    /// Sends a `POST` to `path` with `key` (if any) and `body`.
    pub(crate) async fn send_post(
        &self,
        path: &str,
        key: Option<&str>,
        body: &str,
    ) -> Result<Reply, Failed> {
        send(self.post(path, key, body)).await
    }
}

/// The store key of `key` for tenant [`TENANT`].
pub(crate) fn record_key(key: &str) -> Result<RecordKey, Failed> {
    let key = IdempotencyKey::parse(key).map_err(|e| Failed::from(e.to_string()))?;
    Ok(RecordKey::new(&Scope::tenant(TENANT), &key))
}

/// Sends `request` and reads the whole response.
pub(crate) async fn send(request: reqwest::RequestBuilder) -> Result<Reply, Failed> {
    let response = request
        .send()
        .await
        .map_err(|e| Failed::from(format!("the request failed: {e:?}")))?;
    Reply::of(response).await
}

/// A response read in full.
#[derive(Clone)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) headers: http::HeaderMap,
    pub(crate) body: Bytes,
}

impl fmt::Debug for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let body = String::from_utf8_lossy(&self.body);
        let body: String = body.chars().take(400).collect();
        f.debug_struct("Reply")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("body", &body)
            .finish()
    }
}

impl Reply {
    pub(crate) async fn of(response: reqwest::Response) -> Result<Self, Failed> {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response
            .bytes()
            .await
            .map_err(|e| Failed::from(format!("reading the response body failed: {e:?}")))?;
        Ok(Self {
            status,
            headers,
            body,
        })
    }

    /// A header as text (`None` if absent or not text).
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Whether it carries `Idempotent-Replayed: true`.
    pub(crate) fn replayed(&self) -> bool {
        self.header("idempotent-replayed") == Some("true")
    }

    /// The body as JSON.
    #[track_caller]
    pub(crate) fn json(&self) -> Result<serde_json::Value, Failed> {
        match serde_json::from_slice(&self.body) {
            Ok(json) => Ok(json),
            Err(e) => Err(failure(format!("the body is not JSON ({e}): {self:?}"))),
        }
    }

    /// Checks that this is the handler's own answer, run now: `status`, not
    /// a replay. Returns `x-effect`.
    #[track_caller]
    pub(crate) fn fresh(&self, status: u16) -> Result<usize, Failed> {
        ensure_eq!(self.status, status, "status of a fresh answer {self:?}");
        ensure!(
            !self.replayed(),
            "a fresh answer is marked replayed: {self:?}"
        );
        self.effect()
    }

    /// Checks that this is a replay of `first`: same status, body and
    /// `x-effect`, `Idempotent-Replayed: true`, no `set-cookie`, not the
    /// app's `date`.
    #[track_caller]
    pub(crate) fn replay_of(&self, first: &Reply) -> Result<(), Failed> {
        ensure_eq!(self.status, first.status, "status of the replay {self:?}");
        ensure!(
            self.replayed(),
            "not marked Idempotent-Replayed: true: {self:?}"
        );
        ensure_eq!(self.body, first.body, "body of the replay");
        ensure_eq!(
            self.header("x-effect"),
            first.header("x-effect"),
            "x-effect of the replay"
        );
        ensure_eq!(
            self.header("content-type"),
            first.header("content-type"),
            "content-type of the replay"
        );
        let multi = |r: &Reply| -> Vec<Vec<u8>> {
            r.headers
                .get_all("x-multi")
                .iter()
                .map(|v| v.as_bytes().to_vec())
                .collect()
        };
        ensure_eq!(
            multi(self),
            multi(first),
            "x-multi fields of the replay, in order"
        );
        ensure!(
            self.header("set-cookie").is_none(),
            "set-cookie was replayed: {self:?}"
        );
        ensure!(
            self.header("date") != Some(crate::app::APP_DATE),
            "the stored date was replayed: {self:?}"
        );
        if let Some(length) = self.header("content-length") {
            ensure_eq!(
                length,
                self.body.len().to_string().as_str(),
                "content-length of the replay"
            );
        }
        Ok(())
    }

    /// The `x-effect` header.
    #[track_caller]
    pub(crate) fn effect(&self) -> Result<usize, Failed> {
        match self.header("x-effect").and_then(|v| v.parse().ok()) {
            Some(effect) => Ok(effect),
            None => Err(failure(format!("no x-effect header: {self:?}"))),
        }
    }

    /// Checks that this is the contract's problem answer of `kind`: its
    /// status, `application/problem+json`, the `type` URI and the `status`
    /// member. Returns the problem object.
    #[track_caller]
    pub(crate) fn problem(&self, kind: ProblemType) -> Result<serde_json::Value, Failed> {
        ensure_eq!(
            self.status,
            kind.status().as_u16(),
            "status of a {} problem {self:?}",
            kind.uri()
        );
        ensure_eq!(
            self.header("content-type"),
            Some(PROBLEM_JSON),
            "content-type of a problem {self:?}"
        );
        let json = self.json()?;
        ensure_eq!(json["type"], kind.uri(), "problem type {self:?}");
        ensure_eq!(
            json["status"],
            kind.status().as_u16(),
            "problem status member"
        );
        ensure!(
            json["title"].is_string() && json["detail"].is_string(),
            "a problem has a title and a detail: {self:?}"
        );
        Ok(json)
    }

    /// `Retry-After` in seconds.
    #[track_caller]
    pub(crate) fn retry_after(&self) -> Result<u64, Failed> {
        match self.header("retry-after").and_then(|v| v.parse().ok()) {
            Some(after) => Ok(after),
            None => Err(failure(format!("no Retry-After in seconds: {self:?}"))),
        }
    }
}
