//! The application behind the middleware: what each path does, and the
//! effects it counts.
//!
//! | path | effect counted | answer |
//! |---|---|---|
//! | `/fail` | yes | 500, empty body |
//! | `/no-effect` | no | 503 with [`NoEffect`](idem_http::NoEffect) (`Answer::no_effect`) |
//! | `/declare-then-fail` | no | 500 after `claim.declare_no_effect()` |
//! | `/panic` | yes | panics ([`Handled::Panic`]) |
//! | `/slow` | yes, on entry | 201 `{"effect":n}` once [`App::open_gate`] (a call with `x-gate: g` also once `App::open("g")`, [`App::open`]); a call dropped before that is counted by [`App::cancelled`] |
//! | `/big` | yes | 201 with a body of `x-size` bytes (default 64 KiB) |
//! | `/reject` | yes | 400 `{"error":"no"}` (a final answer, stored) |
//! | `/claim` | yes | 201 `{"claim":bool,"attempt":n,"key":..,"tenant":..}`: whether the handler got the claim, and what it says (`null`s without one) |
//! | `/tx` | yes | with a claim: completes the key "inside the handler's transaction" (`claim.prepare_response`, applied to the store as a SQL store's `apply_in` would), then 201 with exactly that response; without one, 500 |
//! | `/echo` | yes | 201 with the request body as it came (any bytes), `content-type: application/octet-stream` |
//! | `/empty` | yes | 204, no body |
//! | any other path | yes | 201 JSON `{"effect":n,"path":..,"len":..,"tenant":..}` (`len`: the body's length as the handler got it) |
//!
//! Every answer carries `content-type: application/json` (but `/echo`),
//! `x-effect: n` (the path's effect count after this call), two
//! `x-multi` fields (`a` then `b`), `set-cookie: s=1` and
//! `date: Thu, 01 Jan 1970 00:00:00 GMT` (a value no server would send, so
//! that a replayed `date` is seen). Every call of the handler is counted
//! per path ([`App::runs`]), effect or not.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use idem_core::store::{Revision, Store, SwapOutcome};
use idem_core::{Error, Scope, Transition};
use idem_http::Rejection;
use tokio::sync::watch;

use crate::fixture::{Answer, Call, Handled, TestStore};

/// The `date` every answer of the [`App`] carries: never a real date, so
/// that a replay that carried it would be seen.
pub const APP_DATE: &str = "Thu, 01 Jan 1970 00:00:00 GMT";

/// Which gates of `/slow` are open.
#[derive(Debug, Default)]
struct Gates {
    /// Every call may finish ([`App::open_gate`]).
    all: bool,
    /// Calls with `x-gate: name` may finish, for these names ([`App::open`]).
    named: HashSet<String>,
}

impl Gates {
    fn lets_through(&self, name: Option<&str>) -> bool {
        self.all || name.is_some_and(|name| self.named.contains(name))
    }
}

/// The application: effect counters, and the gates of `/slow`.
#[derive(Clone)]
pub struct App {
    effects: Arc<Mutex<HashMap<String, usize>>>,
    runs: Arc<Mutex<HashMap<String, usize>>>,
    entered: watch::Sender<usize>,
    cancelled: Arc<std::sync::atomic::AtomicUsize>,
    gates: watch::Sender<Gates>,
    store: Option<TestStore>,
    applied: Arc<Mutex<Vec<Revision>>>,
}

impl Default for App {
    fn default() -> Self {
        Self {
            effects: Arc::default(),
            runs: Arc::default(),
            entered: watch::Sender::new(0),
            cancelled: Arc::default(),
            gates: watch::Sender::new(Gates::default()),
            store: None,
            applied: Arc::default(),
        }
    }
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").finish_non_exhaustive()
    }
}

fn get(map: &Mutex<HashMap<String, usize>>, path: &str) -> usize {
    map.lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(path)
        .copied()
        .unwrap_or(0)
}

fn bump(map: &Mutex<HashMap<String, usize>>, path: &str) -> usize {
    let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
    let n = map.entry(path.to_owned()).or_insert(0);
    *n += 1;
    *n
}

impl App {
    /// An application whose `/tx` path completes keys in `store` (the
    /// engine's store).
    pub fn with_store(store: TestStore) -> Self {
        Self {
            store: Some(store),
            ..Self::default()
        }
    }

    /// How many effects `path` has had.
    pub fn effects(&self, path: &str) -> usize {
        get(&self.effects, path)
    }

    /// How many effects all paths have had.
    pub fn total_effects(&self) -> usize {
        self.effects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .sum()
    }

    /// How many times the handler was called for `path`, effect or not.
    pub fn runs(&self, path: &str) -> usize {
        get(&self.runs, path)
    }

    /// How many `/slow` calls have entered the handler.
    pub fn slow_entries(&self) -> usize {
        *self.entered.borrow()
    }

    /// How many `/slow` calls were dropped (cancelled) before they
    /// finished: an adapter runs handlers to completion, so this stays 0.
    pub fn cancelled(&self) -> usize {
        self.cancelled.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Resolves when a `/slow` call has entered the handler after this call
    /// (call it before sending the request).
    pub fn entered(&self) -> impl std::future::Future<Output = ()> + '_ {
        let seen = *self.entered.borrow();
        let mut entries = self.entered.subscribe();
        async move {
            let _ = entries.wait_for(|n| *n > seen).await;
        }
    }

    /// Lets every `/slow` call (now and later) finish.
    pub fn open_gate(&self) {
        self.gates.send_modify(|gates| gates.all = true);
    }

    /// Lets the `/slow` calls sent with `x-gate: <gate>` (now and later)
    /// finish; the others keep waiting for [`open_gate`](Self::open_gate).
    ///
    /// # Behavior
    /// The gate header is not part of the default fingerprint: two calls
    /// that differ only in it are the same request for the middleware, so
    /// a case can let the run of one finish before another's.
    pub fn open(&self, gate: &str) {
        self.gates.send_modify(|gates| {
            gates.named.insert(gate.to_owned());
        });
    }

    /// The revisions `/tx` applied, in order.
    pub fn applied(&self) -> Vec<Revision> {
        self.applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn count(&self, path: &str) -> usize {
        bump(&self.effects, path)
    }

    /// What the handler does with `call`.
    pub async fn handle(&self, call: Call) -> Handled {
        let path = call.path.as_str();
        bump(&self.runs, path);
        let (n, status, body) = match path {
            "/no-effect" => (
                self.effects(path),
                StatusCode::SERVICE_UNAVAILABLE,
                Bytes::new(),
            ),
            "/declare-then-fail" => {
                if let Some(claim) = &call.claim {
                    claim.declare_no_effect();
                }
                (
                    self.effects(path),
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Bytes::new(),
                )
            }
            "/panic" => {
                self.count(path);
                return Handled::Panic;
            }
            "/fail" => (
                self.count(path),
                StatusCode::INTERNAL_SERVER_ERROR,
                Bytes::new(),
            ),
            "/reject" => (
                self.count(path),
                StatusCode::BAD_REQUEST,
                Bytes::from_static(b"{\"error\":\"no\"}"),
            ),
            "/slow" => {
                let n = self.count(path);
                self.entered.send_modify(|entries| *entries += 1);
                let mut dropped = CountIfDropped(Some(self.cancelled.clone()));
                let name = call.headers.get("x-gate").and_then(|v| v.to_str().ok());
                let mut gates = self.gates.subscribe();
                let _ = gates.wait_for(|gates| gates.lets_through(name)).await;
                dropped.0 = None;
                (
                    n,
                    StatusCode::CREATED,
                    Bytes::from(format!("{{\"effect\":{n}}}")),
                )
            }
            "/big" => {
                let size = call
                    .headers
                    .get("x-size")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(64 * 1024);
                (
                    self.count(path),
                    StatusCode::CREATED,
                    Bytes::from(vec![b'x'; size]),
                )
            }
            "/claim" => {
                let n = self.count(path);
                let claim = call.claim.as_ref();
                let body = serde_json::json!({
                    "claim": claim.is_some(),
                    "attempt": claim.map(idem_http::IdempotencyClaim::attempt),
                    "key": claim.map(|c| c.key().as_str().to_owned()),
                    "tenant": claim.map(|c| c.scope().tenant_id().to_owned()),
                });
                (n, StatusCode::CREATED, Bytes::from(body.to_string()))
            }
            "/tx" => return self.tx(&call).await,
            "/echo" => {
                let n = self.count(path);
                let mut headers = headers(n);
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                );
                return Handled::Respond(Answer {
                    status: StatusCode::CREATED,
                    headers,
                    body: call.body.clone(),
                    no_effect: false,
                });
            }
            "/empty" => (self.count(path), StatusCode::NO_CONTENT, Bytes::new()),
            _ => {
                let n = self.count(path);
                let body = serde_json::json!({
                    "effect": n,
                    "path": path,
                    "len": call.body.len(),
                    "tenant": tenant(&call.headers),
                });
                (n, StatusCode::CREATED, Bytes::from(body.to_string()))
            }
        };
        Handled::Respond(Answer {
            status,
            headers: headers(n),
            body,
            no_effect: path == "/no-effect",
        })
    }

    /// `/tx`: the business write and the stored response commit together.
    async fn tx(&self, call: &Call) -> Handled {
        let failed = |n| {
            Handled::Respond(Answer {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                headers: headers(n),
                body: Bytes::new(),
                no_effect: false,
            })
        };
        let n = self.count("/tx");
        let (Some(claim), Some(store)) = (&call.claim, &self.store) else {
            return failed(n);
        };
        let headers = headers(n);
        let body = Bytes::from(format!("{{\"effect\":{n},\"tx\":true}}"));
        let Ok(done) = claim.prepare_response(StatusCode::CREATED, &headers, &body) else {
            return failed(n);
        };
        // BEGIN; business write; apply the transition; COMMIT.
        if apply(store, &done).await.is_err() {
            return failed(n);
        }
        self.applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(done.next.revision);
        Handled::Respond(Answer {
            status: StatusCode::CREATED,
            headers,
            body,
            no_effect: false,
        })
    }
}

/// Counts a handler dropped before it finished (while it holds `Some`).
struct CountIfDropped(Option<Arc<std::sync::atomic::AtomicUsize>>);

impl Drop for CountIfDropped {
    fn drop(&mut self) {
        if let Some(count) = self.0.take() {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// The headers of every answer of the app.
fn headers(n: usize) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert("x-effect", HeaderValue::from(n));
    headers.append("x-multi", HeaderValue::from_static("a"));
    headers.append("x-multi", HeaderValue::from_static("b"));
    headers.insert(header::SET_COOKIE, HeaderValue::from_static("s=1"));
    headers.insert(header::DATE, HeaderValue::from_static(APP_DATE));
    headers
}

fn tenant(headers: &HeaderMap) -> Option<String> {
    headers
        .get("x-tenant")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Applies a transition the way the SQL stores do inside a transaction:
/// replaces the record if it is in flight under the transition's token.
async fn apply(store: &TestStore, t: &Transition) -> Result<(), Error> {
    let (store, now) = (store.inner(), t.next.record.updated_at);
    let Some(current) = store.get(&t.key, now).await? else {
        return Err(Error::LeaseLost(idem_core::machine::Fenced::Expired));
    };
    current
        .record
        .check_holder(t.token, now)
        .map_err(Error::LeaseLost)?;
    match store
        .compare_and_swap(&t.key, &current, &t.next, now)
        .await?
    {
        SwapOutcome::Swapped => Ok(()),
        SwapOutcome::Conflict(_) => Err(Error::Contention),
    }
}

/// The scope of a request: its `x-tenant` header, or 401.
pub(crate) fn scope_of(headers: &HeaderMap) -> Result<Scope, Rejection> {
    match headers.get("x-tenant").and_then(|v| v.to_str().ok()) {
        Some(tenant) if !tenant.is_empty() => Ok(Scope::tenant(tenant.to_owned())),
        _ => Err(Rejection::new(
            StatusCode::UNAUTHORIZED,
            "no x-tenant header",
        )),
    }
}
