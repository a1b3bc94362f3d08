//! A simulated card network: `idem-demo card-network`, the downstream
//! provider that `POST /orders` charges.
//!
//! It honours its own `Idempotency-Key` with its **own** small
//! implementation (a map and a per-key lock, not idem), so the order tests
//! can use its charge log as an independent oracle: one line per charge,
//! whatever the service did.
//!
//! # `POST /charges`
//!
//! Headers: `Idempotency-Key` (required, 1 to [`MAX_KEY_LEN`] visible ASCII
//! characters). Body: `{"order": "<id>", "amount_cents": <n>}` (`order`: 1
//! to [`MAX_ORDER_LEN`] visible ASCII characters, `amount_cents` positive).
//!
//! | request | answer | charge log |
//! |---|---|---|
//! | a key seen for the first time | `201 {"charge_id": "ch_…"}` | one line `<key> <charge id> <order> <amount>` appended before the answer |
//! | the same key and body again | `201` with the same `charge_id`, `Idempotent-Replayed: true` | nothing |
//! | the same key, another body | `422` | nothing |
//! | no key, or a malformed body | `400` | nothing |
//!
//! Concurrent requests with one key wait for each other (a lock per key):
//! one charges, the others answer its charge. The log is read back at start,
//! so a restarted network still honours the keys it charged.
//!
//! # Faults (to exercise the caller's retries)
//!
//! - `fail_rate`: answer `503` before charging (nothing logged).
//! - `drop_rate`: charge (the line is logged), then answer `502` as if the
//!   answer had been lost on the way back; a retry with the same key gets
//!   the charge.
//! - `delay`: up to this long (at random) before charging and again before
//!   answering.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::DemoError;

/// The longest `Idempotency-Key` the card network accepts.
pub const MAX_KEY_LEN: usize = 255;

/// The longest `order` the card network accepts.
pub const MAX_ORDER_LEN: usize = 100;

/// How the card network behaves.
#[derive(Clone, Debug)]
pub struct CardNetworkOptions {
    /// The charge log: one line per charge (appended; lines already there
    /// are charges the network remembers).
    pub log: PathBuf,
    /// Probability of answering `503` before charging.
    pub fail_rate: f64,
    /// Probability of answering `502` after charging (the answer is lost).
    pub drop_rate: f64,
    /// The longest random delay before charging, and again before answering.
    pub delay: Duration,
}

impl CardNetworkOptions {
    /// A network logging to `log`, without faults or delays.
    pub fn new(log: impl Into<PathBuf>) -> Self {
        Self {
            log: log.into(),
            fail_rate: 0.0,
            drop_rate: 0.0,
            delay: Duration::ZERO,
        }
    }
}

/// One line of the charge log: `<key> <charge id> <order> <amount>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChargeLine {
    /// The `Idempotency-Key` of the request that charged.
    pub key: String,
    /// `ch_` and 24 hex digits.
    pub charge_id: String,
    /// The order charged.
    pub order: String,
    /// The amount charged, in cents.
    pub amount_cents: u64,
}

impl ChargeLine {
    /// Parses one line (without its newline); `None` if it is not four
    /// fields with a numeric amount.
    pub fn parse(line: &str) -> Option<Self> {
        let mut fields = line.split(' ');
        let (Some(key), Some(charge_id), Some(order), Some(amount), None) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            return None;
        };
        Some(Self {
            key: key.to_string(),
            charge_id: charge_id.to_string(),
            order: order.to_string(),
            amount_cents: amount.parse().ok()?,
        })
    }

    /// The lines of a charge log; `Err` with the offending line if one does
    /// not parse or is not terminated by a newline.
    pub fn parse_log(text: &str) -> Result<Vec<Self>, String> {
        text.split_inclusive('\n')
            .map(|line| {
                line.strip_suffix('\n')
                    .and_then(Self::parse)
                    .ok_or_else(|| line.to_string())
            })
            .collect()
    }
}

/// The request body of `POST /charges`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChargeRequest {
    /// The order charged.
    pub order: String,
    /// The amount, in cents.
    pub amount_cents: u64,
}

/// The answer of `POST /charges`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChargeAnswer {
    /// The charge.
    pub charge_id: String,
}

/// What a key charged.
#[derive(Clone, Debug)]
struct Charged {
    request: ChargeRequest,
    charge_id: String,
}

/// One key's slot: its lock, and its charge once made.
type Slot = Arc<tokio::sync::Mutex<Option<Charged>>>;

struct Network {
    options: CardNetworkOptions,
    log: Arc<File>,
    keys: Mutex<HashMap<String, Slot>>,
}

impl Network {
    fn open(options: CardNetworkOptions) -> Result<Self, DemoError> {
        let invalid = |what: String| DemoError::InvalidOption(format!("card network: {what}"));
        for (name, p) in [
            ("--fail-rate", options.fail_rate),
            ("--drop-rate", options.drop_rate),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(invalid(format!("{name} must be between 0 and 1")));
            }
        }
        let existing = match std::fs::read_to_string(&options.log) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(invalid(format!("{}: {e}", options.log.display()))),
        };
        let mut keys = HashMap::new();
        // A torn last line (a crash mid-write) is not a charge: skip it.
        for line in existing.lines().filter_map(ChargeLine::parse) {
            let charged = Charged {
                request: ChargeRequest {
                    order: line.order,
                    amount_cents: line.amount_cents,
                },
                charge_id: line.charge_id,
            };
            keys.insert(line.key, Arc::new(tokio::sync::Mutex::new(Some(charged))));
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&options.log)
            .map_err(|e| invalid(format!("{}: {e}", options.log.display())))?;
        Ok(Self {
            options,
            log: Arc::new(log),
            keys: Mutex::new(keys),
        })
    }

    fn slot(&self, key: &str) -> Slot {
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        keys.entry(key.to_string()).or_default().clone()
    }

    async fn pause(&self) {
        let most = u64::try_from(self.options.delay.as_millis()).unwrap_or(u64::MAX);
        if most > 0 {
            tokio::time::sleep(Duration::from_millis(fastrand::u64(0..=most))).await;
        }
    }

    /// Charges `request` under `key` unless the key charged already:
    /// `(charge id, replayed)`, or the refusal.
    #[allow(clippy::result_large_err)]
    async fn charge_once(
        &self,
        key: &str,
        request: ChargeRequest,
    ) -> Result<(String, bool), Response> {
        let slot = self.slot(key);
        let mut charged = slot.lock().await;
        match &*charged {
            Some(done) if done.request == request => Ok((done.charge_id.clone(), true)),
            Some(_) => Err(refuse(
                StatusCode::UNPROCESSABLE_ENTITY,
                "this Idempotency-Key was used for another charge",
            )),
            None => {
                let charge_id = format!("ch_{:016x}{:08x}", fastrand::u64(..), fastrand::u32(..));
                let line = format!(
                    "{key} {charge_id} {} {}\n",
                    request.order, request.amount_cents
                );
                if let Err(e) = self.append(line).await {
                    tracing::error!(error = %e, "card network: the charge log failed");
                    return Err(refuse(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "the charge could not be recorded",
                    ));
                }
                *charged = Some(Charged {
                    request,
                    charge_id: charge_id.clone(),
                });
                Ok((charge_id, false))
            }
        }
    }

    /// Appends the charge's line in one write (`O_APPEND`, no user-space
    /// buffer): in the file before the answer leaves.
    async fn append(&self, line: String) -> std::io::Result<()> {
        let file = self.log.clone();
        tokio::task::spawn_blocking(move || (&*file).write_all(line.as_bytes()))
            .await
            .map_err(std::io::Error::other)?
    }
}

/// The card network, serving on a bound address in this process.
#[derive(Debug)]
pub struct RunningCardNetwork {
    addr: SocketAddr,
    log: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl RunningCardNetwork {
    /// Binds `addr` (port 0 for a free port) and serves the card network.
    ///
    /// # Behavior
    /// Reads the charges already in `options.log` (so their keys are
    /// honoured), then appends to it. A rate outside 0..=1 or an unreadable
    /// log is [`DemoError::InvalidOption`].
    pub async fn start(addr: SocketAddr, options: CardNetworkOptions) -> Result<Self, DemoError> {
        let log = options.log.clone();
        let network = Arc::new(Network::open(options)?);
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, router(network))
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await
        });
        Ok(Self {
            addr,
            log,
            stop: Some(stop),
            task,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The charge log.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Waits until the server stops on its own (an I/O error of the listener).
    pub async fn wait(&mut self) -> Result<(), DemoError> {
        match (&mut self.task).await {
            Ok(result) => Ok(result?),
            Err(e) => Err(DemoError::Io(std::io::Error::other(e))),
        }
    }

    /// Stops accepting connections and waits (up to 5 s) for open ones.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if tokio::time::timeout(Duration::from_secs(5), &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
        }
    }
}

fn router(network: Arc<Network>) -> Router {
    Router::new()
        .route(
            "/health",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/charges", post(charge))
        .with_state(network)
}

fn refuse(status: StatusCode, detail: &str) -> Response {
    (status, Json(serde_json::json!({"error": detail}))).into_response()
}

/// A visible-ASCII token of 1 to `max` bytes (the log splits on spaces).
fn token(value: &str, max: usize) -> bool {
    !value.is_empty() && value.len() <= max && value.bytes().all(|b| b.is_ascii_graphic())
}

async fn charge(State(network): State<Arc<Network>>, headers: HeaderMap, body: Bytes) -> Response {
    let key = match headers.get("idempotency-key").map(HeaderValue::to_str) {
        Some(Ok(key)) if token(key, MAX_KEY_LEN) => key.to_string(),
        _ => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "an Idempotency-Key header (1 to 255 visible ASCII characters) is required",
            );
        }
    };
    let request: ChargeRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, &format!("not a charge: {e}")),
    };
    if !token(&request.order, MAX_ORDER_LEN) || request.amount_cents == 0 {
        return refuse(
            StatusCode::BAD_REQUEST,
            "`order` must be 1 to 100 visible ASCII characters and `amount_cents` positive",
        );
    }
    if network.options.fail_rate > 0.0 && fastrand::f64() < network.options.fail_rate {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "the card network is unavailable; nothing was charged",
        );
    }
    network.pause().await;
    // In a task of its own: a caller that disconnects (or dies) mid-charge
    // must not cancel it between the log line and the key's record.
    let charging = tokio::spawn({
        let network = network.clone();
        async move { network.charge_once(&key, request).await }
    });
    let (charge_id, replayed) = match charging.await {
        Ok(Ok(charged)) => charged,
        Ok(Err(refused)) => return refused,
        Err(e) => {
            tracing::error!(error = %e, "card network: the charge failed");
            return refuse(StatusCode::INTERNAL_SERVER_ERROR, "the charge failed");
        }
    };
    network.pause().await;
    if !replayed && network.options.drop_rate > 0.0 && fastrand::f64() < network.options.drop_rate {
        return refuse(
            StatusCode::BAD_GATEWAY,
            "the answer was lost on the way back (the charge was made)",
        );
    }
    let mut response = (StatusCode::CREATED, Json(ChargeAnswer { charge_id })).into_response();
    if replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    async fn post(
        http: &reqwest::Client,
        url: &str,
        key: Option<&str>,
        body: &str,
    ) -> (StatusCode, serde_json::Value, bool) {
        let mut request = http
            .post(format!("{url}/charges"))
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        let response = request.send().await.unwrap();
        let status = StatusCode::from_u16(response.status().as_u16()).unwrap();
        let replayed = response.headers().contains_key("idempotent-replayed");
        (status, response.json().await.unwrap(), replayed)
    }

    #[tokio::test]
    async fn charges_once_per_key_and_remembers_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("charges.log");
        let network =
            RunningCardNetwork::start(([127, 0, 0, 1], 0).into(), CardNetworkOptions::new(&log))
                .await
                .unwrap();
        let http = reqwest::Client::new();
        let url = network.url();
        let body = r#"{"order":"ord_1","amount_cents":1250}"#;
        let (status, first, replayed) = post(&http, &url, Some("k1"), body).await;
        assert_eq!((status, replayed), (StatusCode::CREATED, false));
        let id = first["charge_id"].as_str().unwrap().to_string();
        assert!(id.starts_with("ch_"));
        let (status, again, replayed) = post(&http, &url, Some("k1"), body).await;
        assert_eq!((status, replayed), (StatusCode::CREATED, true));
        assert_eq!(again["charge_id"], id.as_str());
        let other = r#"{"order":"ord_1","amount_cents":1}"#;
        assert_eq!(
            post(&http, &url, Some("k1"), other).await.0,
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            post(&http, &url, None, body).await.0,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            post(&http, &url, Some("k2"), "{").await.0,
            StatusCode::BAD_REQUEST
        );
        let bad = r#"{"order":"a b","amount_cents":1}"#;
        assert_eq!(
            post(&http, &url, Some("k2"), bad).await.0,
            StatusCode::BAD_REQUEST
        );

        // Concurrent requests with one key: one charge.
        let barrier = Arc::new(tokio::sync::Barrier::new(8));
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (http, url, barrier) = (http.clone(), url.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    let body = r#"{"order":"ord_2","amount_cents":5}"#;
                    post(&http, &url, Some("k3"), body).await
                })
            })
            .collect();
        let mut ids = std::collections::HashSet::new();
        for task in tasks {
            let (status, answer, _) = task.await.unwrap();
            assert_eq!(status, StatusCode::CREATED);
            ids.insert(answer["charge_id"].as_str().unwrap().to_string());
        }
        assert_eq!(ids.len(), 1);
        network.shutdown().await;

        let lines = ChargeLine::parse_log(&std::fs::read_to_string(&log).unwrap()).unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!(
            lines[0],
            ChargeLine {
                key: "k1".into(),
                charge_id: id.clone(),
                order: "ord_1".into(),
                amount_cents: 1250
            }
        );
        assert_eq!(lines[1].key, "k3");

        // A restarted network honours the keys it charged.
        let network =
            RunningCardNetwork::start(([127, 0, 0, 1], 0).into(), CardNetworkOptions::new(&log))
                .await
                .unwrap();
        let (status, again, replayed) = post(&http, &network.url(), Some("k1"), body).await;
        assert_eq!((status, replayed), (StatusCode::CREATED, true));
        assert_eq!(again["charge_id"], id.as_str());
        network.shutdown().await;
        assert_eq!(
            ChargeLine::parse_log(&std::fs::read_to_string(&log).unwrap())
                .unwrap()
                .len(),
            2
        );
    }

    #[tokio::test]
    async fn a_lost_answer_is_charged_and_a_failure_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("charges.log");
        let dropping = CardNetworkOptions {
            drop_rate: 1.0,
            ..CardNetworkOptions::new(&log)
        };
        let network = RunningCardNetwork::start(([127, 0, 0, 1], 0).into(), dropping)
            .await
            .unwrap();
        let http = reqwest::Client::new();
        let body = r#"{"order":"ord_1","amount_cents":7}"#;
        assert_eq!(
            post(&http, &network.url(), Some("k1"), body).await.0,
            StatusCode::BAD_GATEWAY
        );
        // The retry with the same key gets the charge (a replay is never dropped).
        let (status, _, replayed) = post(&http, &network.url(), Some("k1"), body).await;
        assert_eq!((status, replayed), (StatusCode::CREATED, true));
        network.shutdown().await;
        let failing = CardNetworkOptions {
            fail_rate: 1.0,
            ..CardNetworkOptions::new(&log)
        };
        let network = RunningCardNetwork::start(([127, 0, 0, 1], 0).into(), failing)
            .await
            .unwrap();
        let body = r#"{"order":"ord_2","amount_cents":7}"#;
        assert_eq!(
            post(&http, &network.url(), Some("k2"), body).await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        network.shutdown().await;
        let lines = ChargeLine::parse_log(&std::fs::read_to_string(&log).unwrap()).unwrap();
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(ChargeLine::parse("a b c"), None);
        assert_eq!(ChargeLine::parse("a b c d"), None);
        assert!(ChargeLine::parse_log("a b c 1").is_err(), "no newline");
    }
}
