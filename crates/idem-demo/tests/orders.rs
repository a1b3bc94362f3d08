//! `POST /orders` on each store: the HTTP contract (fresh, replay, key
//! reused with another body, out of stock, validation), concurrent
//! duplicates (one reservation, one charge), and the completer: orders whose
//! server died after a phase are finished by a restarted server with
//! `--completer`, with no client retry, charged once, and a later retry gets
//! the same answer, replayed.
//!
//! The card network is the crate's simulated one, in this process; its
//! charge log is the independent count of charges. Each store is
//! idem-testkit's isolated one: SQLite always runs, PostgreSQL and Redis are
//! IGNORED with a banner when unreachable and FAIL under `CI=true` /
//! `IDEM_REQUIRE_BACKENDS=1`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use idem_core::store::Store;
use idem_core::{Clock, IdempotencyKey, RecordKey, SystemClock, downstream_key};
use idem_demo::app::CHARGE;
use idem_demo::{
    Backend, BackendOptions, CardNetworkOptions, ChargeLine, Order, OrderCrashPoint, OrderRow,
    RunningCardNetwork, RunningServer, Stock, StoreUrl, order_scope,
};
use idem_testkit::runner::Suite;
use idem_testkit::{BackendKind, Isolated, wait};
use libtest_mimic::Failed;
use reqwest::StatusCode;
use serde_json::Value;
use tempfile::TempDir;

fn main() -> std::process::ExitCode {
    Suite::new("idem-demo (orders)")
        .with_default_test_threads(support::cores())
        .each(&support::BACKENDS, "api", |kind| async move {
            support::passed(api(kind).await);
        })
        .each(
            &support::BACKENDS,
            "concurrent_duplicates",
            |kind| async move {
                support::passed(concurrent_duplicates(kind).await);
            },
        )
        .each(&support::BACKENDS, "completer", |kind| async move {
            support::passed(completer(kind).await);
        })
        .test("without_a_card_network", || async {
            support::passed(without_a_card_network().await);
        })
        .run()
}

/// The charge log's lines.
fn charges(log: &Path) -> Vec<ChargeLine> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    ChargeLine::parse_log(&text).unwrap()
}

/// The card network's key for the charge of `tenant`'s order `key`: derived
/// from the record key and the record's creation time, read from `store`.
async fn charge_key(store: &dyn Store, tenant: &str, key: &str) -> String {
    let key = RecordKey::new(&order_scope(tenant), &IdempotencyKey::parse(key).unwrap());
    let record = store
        .get(&key, SystemClock.now())
        .await
        .unwrap()
        .expect("the order's record");
    downstream_key(&key, record.record.created_at, CHARGE)
}

/// A client of a demo server.
#[derive(Clone)]
struct Client {
    http: reqwest::Client,
    base: String,
}

/// One answer: status, `Idempotent-Replayed: true`, body.
struct Answer {
    status: StatusCode,
    replayed: bool,
    body: String,
}

impl Answer {
    fn order(&self) -> Order {
        assert_eq!(self.status, StatusCode::CREATED, "{}", self.body);
        serde_json::from_str(&self.body).unwrap()
    }

    fn problem_type(&self) -> String {
        let v: Value = serde_json::from_str(&self.body).unwrap();
        v["type"].as_str().unwrap().to_string()
    }
}

impl Client {
    fn new(base: String) -> Self {
        Self {
            http: reqwest::Client::new(),
            base,
        }
    }

    async fn try_order(&self, tenant: &str, key: &str, body: &str) -> reqwest::Result<Answer> {
        let response = self
            .http
            .post(format!("{}/orders", self.base))
            .bearer_auth(tenant)
            .header("Idempotency-Key", key)
            .header("content-type", "application/json")
            .body(body.to_string())
            .timeout(Duration::from_secs(30))
            .send()
            .await?;
        let status = response.status();
        let replayed = response
            .headers()
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true");
        Ok(Answer {
            status,
            replayed,
            body: response.text().await?,
        })
    }

    async fn order(&self, tenant: &str, key: &str, body: &str) -> Answer {
        self.try_order(tenant, key, body).await.unwrap()
    }

    /// Retries (409 while another attempt holds the key, 503) until 201.
    async fn order_until_created(&self, tenant: &str, key: &str, body: &str) -> Answer {
        wait::until("a 201", Duration::from_secs(30), || async move {
            let answer = self.order(tenant, key, body).await;
            match answer.status {
                StatusCode::CREATED => Some(answer),
                StatusCode::CONFLICT | StatusCode::SERVICE_UNAVAILABLE => None,
                other => panic!("unexpected {other}: {}", answer.body),
            }
        })
        .await
    }

    async fn orders(&self, tenant: &str) -> Vec<OrderRow> {
        let response = self
            .http
            .get(format!("{}/orders", self.base))
            .bearer_auth(tenant)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        response.json().await.unwrap()
    }

    async fn stock(&self) -> Vec<Stock> {
        let response = self
            .http
            .get(format!("{}/stock", self.base))
            .bearer_auth("anyone")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        response.json().await.unwrap()
    }
}

/// A demo server in this process over an isolated store, with a card
/// network in this process.
struct Demo {
    client: Client,
    server: RunningServer,
    network: RunningCardNetwork,
    isolated: Isolated,
    _dir: TempDir,
}

impl Demo {
    async fn start(kind: BackendKind, stock: u64, card_network: bool) -> Self {
        let isolated = Isolated::fresh(kind).await;
        let dir = tempfile::tempdir().unwrap();
        let network = RunningCardNetwork::start(
            ([127, 0, 0, 1], 0).into(),
            CardNetworkOptions::new(dir.path().join("charges.log")),
        )
        .await
        .unwrap();
        let (url, options) = support::demo_store(&isolated, &dir.path().join("ledger.db"));
        let options = BackendOptions {
            stock,
            card_network: card_network.then(|| network.url()),
            ..options
        };
        let backend = Backend::open(&StoreUrl::parse(&url).unwrap(), &options)
            .await
            .unwrap();
        let server = RunningServer::start(([127, 0, 0, 1], 0).into(), backend)
            .await
            .unwrap();
        Self {
            client: Client::new(server.url()),
            server,
            network,
            isolated,
            _dir: dir,
        }
    }

    fn charges(&self) -> Vec<ChargeLine> {
        charges(self.network.log())
    }

    async fn stop(self) {
        self.server.shutdown().await;
        self.network.shutdown().await;
    }
}

fn order_body(sku: &str, quantity: u32, amount_cents: u64) -> String {
    serde_json::json!({"sku": sku, "quantity": quantity, "amount_cents": amount_cents}).to_string()
}

async fn api(kind: BackendKind) -> Result<(), Failed> {
    let demo = Demo::start(kind, 10, true).await;
    let c = &demo.client;
    let body = order_body("sku-1", 2, 1250);

    // Fresh: reserved, charged once at the card network, receipt written.
    let first = c.order("acme", "o-1", &body).await;
    assert!(!first.replayed);
    let order = first.order();
    assert!(order.order_id.starts_with("ord_"), "{order:?}");
    assert!(order.receipt_id.starts_with("rcpt_"), "{order:?}");
    assert_eq!((order.sku.as_str(), order.quantity), ("sku-1", 2));
    let charged = demo.charges();
    assert_eq!(
        charged,
        vec![ChargeLine {
            key: charge_key(&*demo.isolated.store(), "acme", "o-1").await,
            charge_id: order.charge_id.clone(),
            order: order.order_id.clone(),
            amount_cents: 1250,
        }]
    );

    // A retry replays the same body; nothing runs again.
    let again = c.order("acme", "o-1", &body).await;
    assert_eq!((again.status, again.replayed), (StatusCode::CREATED, true));
    assert_eq!(again.body, first.body);

    // The key with another body: 422 from the idempotency layer.
    let other = c.order("acme", "o-1", &order_body("sku-1", 3, 1250)).await;
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY);

    // Out of stock (8 left): a final 422, nothing reserved or charged.
    let short = order_body("sku-1", 9, 100);
    let refused = c.order("acme", "o-2", &short).await;
    assert_eq!(refused.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        refused.problem_type().ends_with("/out-of-stock"),
        "{}",
        refused.body
    );
    let replayed = c.order("acme", "o-2", &short).await;
    assert_eq!(
        (replayed.status, replayed.replayed),
        (StatusCode::UNPROCESSABLE_ENTITY, true)
    );

    // Another tenant, same key: an order of its own.
    let theirs = c.order("globex", "o-1", &body).await.order();
    assert_ne!(theirs.order_id, order.order_id);
    assert_ne!(theirs.charge_id, order.charge_id);

    // Validation: problems, nothing reserved.
    for (bad, status) in [
        ("{", StatusCode::BAD_REQUEST),
        ("[1]", StatusCode::BAD_REQUEST),
        (
            r#"{"sku":"a b","quantity":1,"amount_cents":1}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            r#"{"sku":"s","quantity":0,"amount_cents":1}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            r#"{"sku":"s","quantity":1}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
    ] {
        let answer = c.order("acme", &format!("bad-{}", bad.len()), bad).await;
        assert_eq!(answer.status, status, "{bad}: {}", answer.body);
    }
    let keyless = c
        .http
        .post(format!("{}/orders", c.base))
        .bearer_auth("acme")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(keyless.status(), StatusCode::BAD_REQUEST);
    let anonymous = c
        .http
        .post(format!("{}/orders", c.base))
        .header("Idempotency-Key", "o-9")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);

    // The ledger: one reservation per order, its receipt, the stock taken once.
    assert_eq!(
        c.orders("acme").await,
        vec![OrderRow {
            order_id: order.order_id.clone(),
            idempotency_key: "o-1".into(),
            sku: "sku-1".into(),
            quantity: 2,
            amount_cents: 1250,
            receipt_id: Some(order.receipt_id.clone()),
            charge_id: Some(order.charge_id.clone()),
        }]
    );
    assert_eq!(c.orders("globex").await.len(), 1);
    assert_eq!(
        c.stock().await,
        vec![Stock {
            sku: "sku-1".into(),
            initial: 10,
            available: 6
        }]
    );
    assert_eq!(demo.charges().len(), 2);
    demo.stop().await;
    Ok(())
}

async fn concurrent_duplicates(kind: BackendKind) -> Result<(), Failed> {
    const CLICKS: usize = 8;
    let demo = Demo::start(kind, 100, true).await;
    let body = order_body("sku-9", 3, 700);
    let barrier = Arc::new(tokio::sync::Barrier::new(CLICKS));
    let tasks: Vec<_> = (0..CLICKS)
        .map(|_| {
            let (client, body, barrier) = (demo.client.clone(), body.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let first = client.order("acme", "dup-1", &body).await;
                if first.status == StatusCode::CREATED {
                    return (first.status, first);
                }
                // Another click holds the key: 409 until its answer is stored.
                let status = first.status;
                (
                    status,
                    client.order_until_created("acme", "dup-1", &body).await,
                )
            })
        })
        .collect();
    let mut bodies = Vec::new();
    let mut fresh = 0;
    for task in tasks {
        let (first_status, answer) = task.await.unwrap();
        assert!(
            [StatusCode::CREATED, StatusCode::CONFLICT].contains(&first_status),
            "{first_status}"
        );
        fresh += usize::from(!answer.replayed);
        bodies.push(answer.body);
    }
    assert_eq!(fresh, 1, "exactly one click ran the order");
    assert!(bodies.iter().all(|b| *b == bodies[0]), "{bodies:?}");
    let order: Order = serde_json::from_str(&bodies[0]).unwrap();
    let rows = demo.client.orders("acme").await;
    assert_eq!(rows.len(), 1, "one reservation: {rows:?}");
    assert_eq!(
        rows[0].receipt_id.as_deref(),
        Some(order.receipt_id.as_str())
    );
    let charged = demo.charges();
    assert_eq!(charged.len(), 1, "one charge: {charged:?}");
    assert_eq!(charged[0].charge_id, order.charge_id);
    assert_eq!(demo.client.stock().await[0].available, 97);
    demo.stop().await;
    Ok(())
}

async fn without_a_card_network() -> Result<(), Failed> {
    let demo = Demo::start(BackendKind::Sqlite, 10, false).await;
    let body = order_body("sku-1", 1, 1);
    let answer = demo.client.order("acme", "n-1", &body).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    // Nothing was done, and the key was released: the retry runs afresh.
    let again = demo.client.order("acme", "n-1", &body).await;
    assert_eq!(
        (again.status, again.replayed),
        (StatusCode::SERVICE_UNAVAILABLE, false)
    );
    assert!(demo.client.orders("acme").await.is_empty());
    demo.stop().await;
    Ok(())
}

/// The demo's server as a child process over `isolated`'s store.
struct Servers {
    base_args: Vec<String>,
    log: PathBuf,
    http: reqwest::Client,
}

impl Servers {
    async fn start(&self, extra: &[&str]) -> Result<(tokio::process::Child, Client), Failed> {
        let mut args = self.base_args.clone();
        args.extend(extra.iter().map(ToString::to_string));
        let (child, url) = support::child::start(&args, &self.log, &self.http).await?;
        Ok((child, Client::new(url)))
    }
}

/// Whether the completer finishes an order whose server died at `point`
/// (a checkpoint was written, and the key was not completed).
fn completer_finishes(kind: BackendKind, point: OrderCrashPoint) -> bool {
    let sql = kind != BackendKind::Redis;
    match point {
        OrderCrashPoint::InReserve => false,
        OrderCrashPoint::AfterReserve => sql,
        OrderCrashPoint::AfterReceipt => !sql,
        _ => true,
    }
}

async fn completer(kind: BackendKind) -> Result<(), Failed> {
    let isolated = Isolated::fresh(kind).await;
    let dir = tempfile::tempdir().unwrap();
    let network = RunningCardNetwork::start(
        ([127, 0, 0, 1], 0).into(),
        CardNetworkOptions::new(dir.path().join("charges.log")),
    )
    .await
    .unwrap();
    let mut base_args: Vec<String> = [
        "serve",
        "--addr",
        "127.0.0.1:0",
        // Short, so the orders of the killed servers are taken over soon;
        // long enough that the live completer server's own heartbeats (every
        // third of it) never let its requests' keys lapse on a loaded
        // machine.
        "--lease-ms",
        "2000",
        "--card-network",
    ]
    .map(String::from)
    .to_vec();
    base_args.push(network.url());
    base_args.extend(support::store_args(
        &isolated,
        &dir.path().join("ledger.db"),
    ));
    let servers = Servers {
        base_args,
        log: dir.path().join("server.log"),
        http: reqwest::Client::new(),
    };
    let tenant = "acme";

    // One order per crash point, each killing its server at that point.
    let mut orders = Vec::new();
    for (n, point) in OrderCrashPoint::ALL.into_iter().enumerate() {
        let (mut child, client) = servers.start(&["--crash-order-at", point.name()]).await?;
        let key = format!("c-{n}");
        let body = order_body("sku-c", 1 + n as u32, 100 + n as u64);
        let answer = client.try_order(tenant, &key, &body).await;
        assert!(
            answer.is_err(),
            "{}: the server should have died",
            point.name()
        );
        let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .map_err(|_| format!("{}: the server did not die", point.name()))?
            .unwrap();
        assert!(!status.success(), "{}: {status:?}", point.name());
        orders.push((point, key, body));
    }

    // A server with the completer, and no client retry: the orders with a
    // checkpoint are finished.
    let (mut child, client) = servers.start(&["--completer"]).await?;
    let expected: Vec<&(OrderCrashPoint, String, String)> = orders
        .iter()
        .filter(|(point, ..)| completer_finishes(kind, *point))
        .collect();
    let rows: HashMap<String, OrderRow> = wait::until(
        "the completer to finish the abandoned orders",
        Duration::from_secs(30),
        || async {
            let (client, expected) = (&client, &expected);
            let rows: HashMap<String, OrderRow> = client
                .orders(tenant)
                .await
                .into_iter()
                .map(|r| (r.idempotency_key.clone(), r))
                .collect();
            expected
                .iter()
                .all(|(_, key, _)| rows.get(key).is_some_and(|r| r.receipt_id.is_some()))
                .then_some(rows)
        },
    )
    .await;
    let log = std::fs::read_to_string(&servers.log).unwrap();
    let by_completer = log.matches("by the completer").count();
    assert_eq!(
        by_completer,
        expected.len(),
        "resumes by the completer; log:\n{log}"
    );
    for (point, key, _) in &expected {
        let row = &rows[key];
        let lines: Vec<ChargeLine> = charges(network.log())
            .into_iter()
            .filter(|l| l.order == row.order_id)
            .collect();
        assert_eq!(lines.len(), 1, "{}: charged once: {lines:?}", point.name());
        assert_eq!(
            lines[0].key,
            charge_key(&*isolated.store(), tenant, key).await
        );
        assert_eq!(row.charge_id.as_deref(), Some(lines[0].charge_id.as_str()));
    }

    // The clients come back: every order answers 201, the completed ones
    // replayed with the answer the handler would have given.
    for (point, key, body) in &orders {
        let answer = client.order_until_created(tenant, key, body).await;
        let order = answer.order();
        let completed_before =
            completer_finishes(kind, *point) || (*point == OrderCrashPoint::AfterReceipt);
        assert_eq!(answer.replayed, completed_before, "{}", point.name());
        let row = client
            .orders(tenant)
            .await
            .into_iter()
            .find(|r| r.idempotency_key == *key)
            .unwrap();
        assert_eq!(
            order,
            Order {
                order_id: row.order_id.clone(),
                sku: row.sku.clone(),
                quantity: row.quantity,
                charge_id: row.charge_id.clone().unwrap(),
                receipt_id: row.receipt_id.clone().unwrap(),
            },
            "{}",
            point.name()
        );
        let again = client.order(tenant, key, body).await;
        assert_eq!((again.replayed, &again.body), (true, &answer.body));
    }

    // Once each: one reservation and one charge per order, the stock taken once.
    let rows = client.orders(tenant).await;
    assert_eq!(rows.len(), orders.len(), "{rows:?}");
    let charged = charges(network.log());
    assert_eq!(charged.len(), orders.len(), "{charged:?}");
    for row in &rows {
        let lines = charged.iter().filter(|l| l.order == row.order_id).count();
        assert_eq!(lines, 1, "{row:?}");
    }
    let quantities: u64 = rows.iter().map(|r| u64::from(r.quantity)).sum();
    let stock = client.stock().await;
    assert_eq!(stock.len(), 1);
    assert_eq!(stock[0].initial - stock[0].available, quantities);

    child.start_kill().unwrap();
    let _ = child.wait().await;
    network.shutdown().await;
    Ok(())
}
