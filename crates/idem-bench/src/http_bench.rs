//! The HTTP path: what protecting an axum endpoint with `idem-tower` costs
//! per request, against the same endpoint without the layer, in the same
//! run, process and runtime, by the same keep-alive client, over loopback.
//!
//! Two servers answer `POST /charge` with the same handler (it reads the
//! body, counts its executions and answers 201 with a small JSON body): the
//! baseline, a bare axum router; and the same router behind
//! [`idem_tower::IdempotencyLayer`] over a backend's store (the in-memory
//! store, and SQLite when the run measures it), on the engine the backend
//! workloads drive. Every figure is a pair, the baseline and the layered
//! server back to back in alternating order (as the backend workloads pair
//! idem with raw), so it is a ratio: `idem` is the layered server, `raw`
//! the baseline.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use bytes::Bytes;
use idem_testkit::BackendKind;
use idem_tower::{IdempotencyLayer, single_client_scope};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::backend::Instance;
use crate::harness::{OpFn, op, run_concurrent};
use crate::report::Compared;
use crate::scenario::{compare, engine_over, progress_of, run_all};
use crate::{BenchError, Plan, Target, backends};

/// The request body every call sends (a small JSON document).
pub const REQUEST_BODY: &str = r#"{"amount":1000,"currency":"EUR","reference":"idem-bench"}"#;

/// The path both servers serve.
const PATH: &str = "/charge";

/// How long a server may take to stop once told to.
const STOP_WAIT: Duration = Duration::from_secs(5);

/// The targets whose store the HTTP measurement puts under the layer, when
/// the run measures them: the ones that need no server (the others' store
/// cost is what their fresh and replay figures already tell).
pub const HTTP_TARGETS: [Target; 2] = [
    Target::Backend(BackendKind::Memory),
    Target::Backend(BackendKind::Sqlite),
];

/// The HTTP measurement: `idem-tower` on axum against the bare endpoint.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HttpReport {
    /// Bytes of the JSON request body of every call.
    pub request_bytes: usize,
    /// Completed keys the replay measurement cycles through.
    pub replay_keys: u64,
    /// One entry per store put under the layer.
    pub stores: Vec<HttpStore>,
    /// How the servers and the client are set up.
    pub notes: Vec<String>,
    /// Failures outside one store's measurements (the client, the baseline
    /// server).
    pub errors: Vec<String>,
}

/// The figures of the layer over one store.
///
/// # Behavior
/// In every [`Compared`] row, `idem` is the server with the layer and `raw`
/// the same server without it (the baseline), measured back to back;
/// `ratio` is layered ÷ baseline requests per second. The CPU time per
/// request is this process's: client, servers and store together.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HttpStore {
    /// The store's target name (`memory`, `sqlite`).
    pub name: String,
    /// A new key per request (the layer claims it, runs the handler and
    /// stores its response), per concurrency; the baseline runs the handler.
    pub fresh: Vec<Compared>,
    /// Keys answered before (the layer replays the stored response, the
    /// handler does not run), per concurrency; the baseline runs the handler.
    pub replay: Vec<Compared>,
    /// Handler executions on the layered server during the fresh
    /// measurements: one per request.
    pub fresh_handler_runs: u64,
    /// Handler executions on the layered server during the replay
    /// measurements: none.
    pub replay_handler_runs: u64,
    /// Measurements that failed (the others still ran).
    pub errors: Vec<String>,
}

fn err(e: impl std::fmt::Display) -> BenchError {
    BenchError::Failed(e.to_string())
}

/// The response body of the handler.
#[derive(Serialize)]
struct Charge {
    charge: u64,
    status: &'static str,
    bytes: usize,
}

/// The endpoint: reads the body, counts the execution, answers 201.
async fn charge(
    State(runs): State<Arc<AtomicU64>>,
    body: Bytes,
) -> (StatusCode, axum::Json<Charge>) {
    let n = runs.fetch_add(1, Ordering::Relaxed) + 1;
    (
        StatusCode::CREATED,
        axum::Json(Charge {
            charge: n,
            status: "charged",
            bytes: body.len(),
        }),
    )
}

/// The router of both servers, counting executions in `runs`.
fn app(runs: Arc<AtomicU64>) -> Router {
    Router::new().route(PATH, post(charge)).with_state(runs)
}

/// An axum server on 127.0.0.1 (a port of its own), in this runtime.
struct Server {
    url: Arc<str>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start(router: Router) -> Result<Self, BenchError> {
        let listener = tokio::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .map_err(|e| BenchError::Failed(format!("binding 127.0.0.1: {e}")))?;
        let addr = listener.local_addr().map_err(err)?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await
        });
        Ok(Self {
            url: format!("http://{addr}{PATH}").into(),
            stop: Some(stop),
            task,
        })
    }

    /// Stops accepting, closes the idle connections and waits (at most
    /// [`STOP_WAIT`]) for the server to end; aborts it after that.
    async fn stop(mut self) -> Result<(), BenchError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match tokio::time::timeout(STOP_WAIT, &mut self.task).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(BenchError::Failed(format!("server: {e}"))),
            Ok(Err(e)) => Err(BenchError::Failed(format!("server task: {e}"))),
            Err(_) => {
                self.task.abort();
                Err(BenchError::Failed(format!(
                    "server did not stop within {} s; aborted",
                    STOP_WAIT.as_secs()
                )))
            }
        }
    }
}

/// Which key a call sends.
#[derive(Clone, Copy)]
enum Keys {
    /// `fresh-{id}`: a new key per call.
    Fresh,
    /// `replay-{id % n}`: one of the `n` keys filled before.
    Replay(u64),
    /// `replay-{id}`: the fill of the replay set.
    Fill,
}

impl Keys {
    fn key(self, id: u64) -> String {
        match self {
            Self::Fresh => format!("fresh-{id}"),
            Self::Replay(n) => format!("replay-{}", id % n.max(1)),
            Self::Fill => format!("replay-{id}"),
        }
    }
}

/// What a call must get back.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// 201 from the handler (not replayed).
    Executed,
    /// 201 replayed by the layer (`Idempotent-Replayed: true`).
    Replayed,
    /// 201, either way.
    Created,
}

/// One `POST` to `url` with the key of `keys`, the response read to its end
/// (so that the connection goes back to the pool) and checked.
fn call(client: &reqwest::Client, url: &Arc<str>, keys: Keys, expect: Expect) -> OpFn {
    let (client, url) = (client.clone(), Arc::clone(url));
    op(move |id| {
        let (client, url) = (client.clone(), Arc::clone(&url));
        async move {
            let key = keys.key(id);
            let response = client
                .post(&*url)
                .header(idem_tower::DEFAULT_HEADER, &key)
                .header("content-type", "application/json")
                .body(REQUEST_BODY)
                .send()
                .await
                .map_err(|e| BenchError::Failed(format!("POST {url} ({key}): {e}")))?;
            let status = response.status();
            let replayed = response
                .headers()
                .get(idem_tower::IDEMPOTENT_REPLAYED)
                .is_some_and(|v| v.as_bytes() == b"true");
            let body = response
                .bytes()
                .await
                .map_err(|e| BenchError::Failed(format!("POST {url} ({key}): body: {e}")))?;
            let ok = status == StatusCode::CREATED
                && !body.is_empty()
                && match expect {
                    Expect::Executed => !replayed,
                    Expect::Replayed => replayed,
                    Expect::Created => true,
                };
            if ok {
                Ok(())
            } else {
                Err(BenchError::Failed(format!(
                    "POST {url} ({key}): status {status}, replayed {replayed}, {} body bytes",
                    body.len()
                )))
            }
        }
    })
}

/// The keep-alive client of every call: HTTP/1.1, no proxy (loopback only),
/// idle connections kept for the whole run.
fn client() -> Result<reqwest::Client, BenchError> {
    reqwest::Client::builder()
        .no_proxy()
        .pool_idle_timeout(Duration::from_secs(3600))
        .tcp_nodelay(true)
        .build()
        .map_err(|e| BenchError::Failed(format!("HTTP client: {e}")))
}

/// Measures the layer over the store of each of `targets` (see
/// [`HTTP_TARGETS`]) against the bare endpoint.
///
/// # Behavior
/// One client and one baseline server serve the whole measurement; each
/// store gets a layered server of its own, stopped when its figures are in.
/// A store that cannot be opened or a measurement that fails is listed in
/// that store's `errors` and the others still run; a benchmark is not a
/// test, so nothing here fails the run.
pub(crate) async fn run(plan: &Plan, targets: &[Target]) -> HttpReport {
    let mut report = HttpReport {
        request_bytes: REQUEST_BODY.len(),
        replay_keys: plan.replay_keys,
        notes: vec![
            format!(
                "servers: axum 0.8 on 127.0.0.1 in this process and runtime; POST {PATH} with a {} B JSON body and an Idempotency-Key header (sent to the baseline too, where nothing reads it); the handler reads the body, counts its execution and answers 201 with a ~50 B JSON body",
                REQUEST_BODY.len()
            ),
            "client: one reqwest client, HTTP/1.1 keep-alive (a connection per concurrent task, reused), every response read to its end and checked (201; replayed or not as expected)".into(),
            "layer: IdempotencyLayer::new(engine, single_client_scope) with its defaults, over the engine of the backend workloads (record TTL 1 h); the baseline is the same router without it".into(),
            "cpu µs per request: this process, so client, both servers and the store together".into(),
        ],
        ..HttpReport::default()
    };
    let client = match client() {
        Ok(c) => c,
        Err(e) => {
            report.errors.push(e.to_string());
            return report;
        }
    };
    let baseline_runs = Arc::new(AtomicU64::new(0));
    let baseline = match Server::start(app(Arc::clone(&baseline_runs))).await {
        Ok(s) => s,
        Err(e) => {
            report.errors.push(format!("baseline server: {e}"));
            return report;
        }
    };
    for &target in targets {
        let name = target.name();
        progress_of("http", &format!("{name} ..."));
        let mut store = HttpStore {
            name: name.to_string(),
            ..HttpStore::default()
        };
        match backends::make(target).open().await {
            Ok(instance) => {
                if let Err(e) =
                    measure(plan, &client, &baseline.url, instance.as_ref(), &mut store).await
                {
                    store.errors.push(e.to_string());
                }
                if let Err(e) = instance.close().await {
                    store.errors.push(format!("cleanup: {e}"));
                }
            }
            Err(e) => store.errors.push(format!("open: {e}")),
        }
        progress_of("http", &format!("{name} done"));
        report.stores.push(store);
    }
    drop(client);
    if let Err(e) = baseline.stop().await {
        report.errors.push(format!("baseline server: {e}"));
    }
    report
}

/// Fresh and replay through the layer over `instance`'s store, each level
/// paired with the baseline at `baseline`.
async fn measure(
    plan: &Plan,
    client: &reqwest::Client,
    baseline: &Arc<str>,
    instance: &dyn Instance,
    report: &mut HttpStore,
) -> Result<(), BenchError> {
    let runs = Arc::new(AtomicU64::new(0));
    let layer = IdempotencyLayer::new(engine_over(instance, None), single_client_scope);
    let server = Server::start(app(Arc::clone(&runs)).layer(layer)).await?;
    let result = async {
        let ids = Arc::new(AtomicU64::new(0));
        let name = report.name.clone();
        let levels = &plan.concurrencies;
        let warm_c = levels.iter().copied().max().unwrap_or(1);

        let layered = call(client, &server.url, Keys::Fresh, Expect::Executed);
        let bare = call(client, baseline, Keys::Fresh, Expect::Executed);
        // Open the connections and warm both servers up.
        run_concurrent(warm_c, plan.warmup, &ids, &bare).await?;
        run_concurrent(warm_c, plan.warmup, &ids, &layered).await?;
        let before = runs.load(Ordering::Relaxed);
        for &c in levels {
            report
                .fresh
                .push(compare(plan, c, plan.budget, &ids, &layered, &bare, &[]).await?);
            progress_of("http", &format!("{name} fresh c={c} done"));
        }
        report.fresh_handler_runs = runs.load(Ordering::Relaxed) - before;

        let keys = plan.replay_keys.max(1);
        run_all(
            keys,
            &Arc::new(AtomicU64::new(0)),
            &call(client, &server.url, Keys::Fill, Expect::Created),
        )
        .await
        .map_err(|e| BenchError::Failed(format!("filling the replay set: {e}")))?;
        let layered = call(client, &server.url, Keys::Replay(keys), Expect::Replayed);
        let bare = call(client, baseline, Keys::Replay(keys), Expect::Executed);
        run_concurrent(warm_c, plan.warmup, &ids, &bare).await?;
        run_concurrent(warm_c, plan.warmup, &ids, &layered).await?;
        let before = runs.load(Ordering::Relaxed);
        for &c in levels {
            report
                .replay
                .push(compare(plan, c, plan.budget, &ids, &layered, &bare, &[]).await?);
            progress_of("http", &format!("{name} replay c={c} done"));
        }
        report.replay_handler_runs = runs.load(Ordering::Relaxed) - before;
        Ok(())
    }
    .await;
    let stopped = server.stop().await;
    result.and(stopped)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn keys_name_fresh_replay_and_fill_calls() {
        assert_eq!(Keys::Fresh.key(7), "fresh-7");
        assert_eq!(Keys::Replay(5).key(7), "replay-2");
        assert_eq!(Keys::Replay(0).key(7), "replay-0");
        assert_eq!(Keys::Fill.key(7), "replay-7");
        // Every key is one the layer accepts.
        for id in [0, 7, u64::MAX] {
            for keys in [Keys::Fresh, Keys::Replay(3), Keys::Fill] {
                assert!(idem_tower::parse_key_value(keys.key(id).as_bytes()).is_ok());
            }
        }
    }
}
