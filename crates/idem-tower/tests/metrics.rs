//! The `idem_requests_total{outcome}` counter separates every outcome.
//! One test in its own binary: it installs the process-wide recorder.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::http::Method;
use common::{engine, start, switch_off, test_store};
use metrics::{
    Counter, CounterFn, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};

type Counts = Arc<Mutex<HashMap<String, u64>>>;

struct Count(Counts, String);

impl CounterFn for Count {
    fn increment(&self, value: u64) {
        *self.0.lock().unwrap().entry(self.1.clone()).or_default() += value;
    }
    fn absolute(&self, value: u64) {
        self.0.lock().unwrap().insert(self.1.clone(), value);
    }
}

struct Rec(Counts);

impl Recorder for Rec {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        let name = format!("{}{{{}}}", key.name(), labels.join(","));
        Counter::from_arc(Arc::new(Count(self.0.clone(), name)))
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_are_counted_separately() {
    let counts = Counts::default();
    metrics::set_global_recorder(Rec(counts.clone())).unwrap();
    let store = test_store();
    let h = start(engine(store.clone()), |b| b).await;

    assert_eq!(h.post("/charge", Some("a"), "t", "1").await.status, 201); // fresh
    assert_eq!(h.post("/charge", Some("a"), "t", "1").await.status, 201); // replayed
    assert_eq!(h.post("/charge", Some("a"), "t", "2").await.status, 422); // mismatch
    assert_eq!(h.post("/charge", Some("a b"), "t", "1").await.status, 400); // invalid
    assert_eq!(h.post("/charge", None, "t", "1").await.status, 201); // passthrough
    let get = h
        .request(Method::GET, "/charge", None, "t", "")
        .send()
        .await;
    assert_eq!(get.unwrap().status(), 201); // not covered: not counted
    let slow = tokio::spawn({
        let req = h.request(Method::POST, "/slow", Some(b"s"), "t", "");
        async move { req.send().await.unwrap().status() }
    });
    h.app.entered.notified().await; // fresh
    assert_eq!(h.post("/slow", Some("s"), "t", "").await.status, 409); // conflict
    h.open.send(true).unwrap();
    assert_eq!(slow.await.unwrap(), 200);
    switch_off(&store);
    assert_eq!(h.post("/charge", Some("z"), "t", "1").await.status, 503); // store_error

    let counts = counts.lock().unwrap().clone();
    let outcome = |o: &str| {
        counts
            .get(&format!("idem_requests_total{{outcome={o}}}"))
            .copied()
            .unwrap_or(0)
    };
    assert_eq!(outcome("fresh"), 2, "{counts:?}");
    assert_eq!(outcome("replayed"), 1, "{counts:?}");
    assert_eq!(outcome("mismatch"), 1, "{counts:?}");
    assert_eq!(outcome("invalid"), 1, "{counts:?}");
    assert_eq!(outcome("passthrough"), 1, "{counts:?}");
    assert_eq!(outcome("conflict"), 1, "{counts:?}");
    assert_eq!(outcome("store_error"), 1, "{counts:?}");
    let total: u64 = counts
        .iter()
        .filter(|(k, _)| k.starts_with("idem_requests_total"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(total, 8, "{counts:?}");
}
