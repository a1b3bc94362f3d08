//! The measurement harness: N concurrent tokio tasks issuing operations for a
//! fixed duration or operation count, with a latency histogram.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::sync::Barrier;

use crate::BenchError;

/// A boxed, sendable future.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// One benchmarked operation: called with a unique, increasing operation id.
pub type OpFn = Arc<dyn Fn(u64) -> BoxFuture<Result<(), BenchError>> + Send + Sync>;

/// Wraps a closure returning a future as an [`OpFn`].
pub fn op<F, Fut>(f: F) -> OpFn
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), BenchError>> + Send + 'static,
{
    Arc::new(move |id| Box::pin(f(id)))
}

/// How long one measurement runs.
///
/// # Behavior
/// Tasks stop starting operations when `duration` has passed or, if set,
/// once `max_ops` operations were started, whichever comes first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// Wall-clock length of the measurement.
    pub duration: Duration,
    /// Upper bound on the number of operations.
    pub max_ops: Option<u64>,
}

impl Budget {
    /// A budget of `duration`, without an operation bound.
    pub const fn time(duration: Duration) -> Self {
        Self {
            duration,
            max_ops: None,
        }
    }

    /// The same budget, stopping after at most `max` operations.
    #[must_use]
    pub const fn with_max_ops(mut self, max: u64) -> Self {
        self.max_ops = Some(max);
        self
    }
}

/// Throughput and latency of one measurement.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Operations that succeeded.
    pub ops: u64,
    /// Operations that returned an error (not counted in `ops`).
    pub errors: u64,
    /// The first error seen, if any.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub first_error: Option<String>,
    /// Wall-clock seconds from the first operation to the last one finishing.
    pub seconds: f64,
    /// `ops / seconds`.
    pub ops_per_sec: f64,
    /// Median latency of one operation, in microseconds.
    pub p50_us: f64,
    /// 99th percentile latency, in microseconds.
    pub p99_us: f64,
    /// Mean latency, in microseconds.
    pub mean_us: f64,
    /// CPU time of this process (the client: engine, store code, driver)
    /// per operation, in microseconds (Linux only).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub client_cpu_us: Option<f64>,
    /// CPU time of the local server processes per operation, in
    /// microseconds (when the server runs on this machine).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub server_cpu_us: Option<f64>,
}

/// A latency histogram in nanoseconds (1 ns to 10 min, 3 significant digits).
pub(crate) struct Latencies(Histogram<u64>);

impl Latencies {
    pub(crate) fn new() -> Result<Self, BenchError> {
        Histogram::new_with_bounds(1, 600_000_000_000, 3)
            .map(Self)
            .map_err(|e| BenchError::Failed(format!("histogram: {e}")))
    }

    pub(crate) fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1);
        self.0.saturating_record(ns);
    }

    pub(crate) fn merge(&mut self, other: &Self) -> Result<(), BenchError> {
        self.0
            .add(&other.0)
            .map_err(|e| BenchError::Failed(format!("histogram merge: {e}")))
    }

    pub(crate) fn count(&self) -> u64 {
        self.0.len()
    }

    /// The `q` quantile in microseconds (0 with nothing recorded).
    fn quantile_us(&self, q: f64) -> f64 {
        if self.count() == 0 {
            return 0.0;
        }
        self.0.value_at_quantile(q) as f64 / 1_000.0
    }

    pub(crate) fn p50_us(&self) -> f64 {
        self.quantile_us(0.5)
    }

    pub(crate) fn p99_us(&self) -> f64 {
        self.quantile_us(0.99)
    }

    /// The mean in microseconds (0 with nothing recorded).
    pub(crate) fn mean_us(&self) -> f64 {
        self.0.mean() / 1_000.0
    }
}

struct TaskResult {
    latencies: Latencies,
    errors: u64,
    first_error: Option<String>,
}

/// Runs `op` from `concurrency` tasks until `budget` is spent.
///
/// # Behavior
/// - Every call gets a distinct id drawn from `ids` (shared across
///   measurements, so ids never repeat within a run).
/// - All tasks are released together by a barrier and share one deadline;
///   the clock starts then and stops when the last task finished its last
///   operation (so a slow last operation counts).
/// - An operation that fails counts as an error and its latency is not
///   recorded; the run goes on.
pub async fn run_concurrent(
    concurrency: usize,
    budget: Budget,
    ids: &Arc<AtomicU64>,
    op: &OpFn,
) -> Result<Stats, BenchError> {
    let concurrency = concurrency.max(1);
    let started_ops = Arc::new(AtomicU64::new(0));
    let barrier = Arc::new(Barrier::new(concurrency + 1));
    // One deadline for every task, set once they are all spawned.
    let deadline = Arc::new(std::sync::OnceLock::<Instant>::new());
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let (ids, op, started_ops, barrier, deadline) = (
            Arc::clone(ids),
            Arc::clone(op),
            Arc::clone(&started_ops),
            Arc::clone(&barrier),
            Arc::clone(&deadline),
        );
        let mut latencies = Latencies::new()?;
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let deadline = *deadline.get_or_init(|| Instant::now() + budget.duration);
            let mut errors = 0;
            let mut first_error = None;
            loop {
                if Instant::now() >= deadline {
                    break;
                }
                if let Some(max) = budget.max_ops
                    && started_ops.fetch_add(1, Ordering::Relaxed) >= max
                {
                    break;
                }
                let id = ids.fetch_add(1, Ordering::Relaxed);
                let t = Instant::now();
                match op(id).await {
                    Ok(()) => latencies.record(t.elapsed()),
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| e.to_string());
                    }
                }
                // Operations that never wait (the in-memory store) would
                // otherwise run one task to its deadline before the next.
                tokio::task::consume_budget().await;
            }
            TaskResult {
                latencies,
                errors,
                first_error,
            }
        }));
    }
    barrier.wait().await;
    let start = *deadline.get_or_init(|| Instant::now() + budget.duration) - budget.duration;
    let mut all = Latencies::new()?;
    let mut errors = 0;
    let mut first_error = None;
    for task in tasks {
        let result = task
            .await
            .map_err(|e| BenchError::Failed(format!("benchmark task panicked: {e}")))?;
        all.merge(&result.latencies)?;
        errors += result.errors;
        if first_error.is_none() {
            first_error = result.first_error;
        }
    }
    let seconds = start.elapsed().as_secs_f64().max(1e-9);
    let ops = all.count();
    Ok(Stats {
        ops,
        errors,
        first_error,
        seconds,
        ops_per_sec: ops as f64 / seconds,
        p50_us: all.p50_us(),
        p99_us: all.p99_us(),
        mean_us: all.mean_us(),
        client_cpu_us: None,
        server_cpu_us: None,
    })
}

/// [`run_concurrent`], with the CPU time per operation of this process and
/// of the server processes `server_pids` (local servers only).
pub async fn run_measured(
    concurrency: usize,
    budget: Budget,
    ids: &Arc<AtomicU64>,
    op: &OpFn,
    server_pids: &[u32],
) -> Result<Stats, BenchError> {
    let before = crate::cpu::Reading::now(server_pids);
    let mut stats = run_concurrent(concurrency, budget, ids, op).await?;
    let after = crate::cpu::Reading::now(server_pids);
    let (client, server) = before.per_op(&after, stats.ops + stats.errors);
    stats.client_cpu_us = client;
    stats.server_cpu_us = server;
    Ok(stats)
}

/// The median of `values` (the mean of the two middle ones for an even count;
/// 0 for none).
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// The smallest and largest of the finite `values` (`(0, 0)` for none).
pub fn min_max(values: &[f64]) -> (f64, f64) {
    let mut finite = values.iter().copied().filter(|x| x.is_finite());
    let Some(first) = finite.next() else {
        return (0.0, 0.0);
    };
    finite.fold((first, first), |(lo, hi), x| (lo.min(x), hi.max(x)))
}

/// Reduces repeated measurements of one configuration to one: the median of
/// each figure, with the summed operation and error counts.
pub fn median_stats(reps: &[Stats]) -> Stats {
    let pick = |f: fn(&Stats) -> f64| median(&reps.iter().map(f).collect::<Vec<_>>());
    Stats {
        ops: reps.iter().map(|s| s.ops).sum(),
        errors: reps.iter().map(|s| s.errors).sum(),
        first_error: reps.iter().find_map(|s| s.first_error.clone()),
        seconds: reps.iter().map(|s| s.seconds).sum(),
        ops_per_sec: pick(|s| s.ops_per_sec),
        p50_us: pick(|s| s.p50_us),
        p99_us: pick(|s| s.p99_us),
        mean_us: pick(|s| s.mean_us),
        client_cpu_us: opt_median(reps.iter().map(|s| s.client_cpu_us)),
        server_cpu_us: opt_median(reps.iter().map(|s| s.server_cpu_us)),
    }
}

fn opt_median(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let v: Vec<f64> = values.flatten().collect();
    if v.is_empty() { None } else { Some(median(&v)) }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn min_max_ignores_what_is_not_finite() {
        assert_eq!(min_max(&[0.9, 0.7, f64::NAN, 1.1]), (0.7, 1.1));
        assert_eq!(min_max(&[0.8]), (0.8, 0.8));
        assert_eq!(min_max(&[]), (0.0, 0.0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn counts_every_operation_once() {
        let ids = Arc::new(AtomicU64::new(0));
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let s2 = Arc::clone(&seen);
        let f = op(move |id| {
            let seen = Arc::clone(&s2);
            async move {
                seen.lock().unwrap().push(id);
                if id % 10 == 9 {
                    Err(BenchError::Failed("every tenth".into()))
                } else {
                    Ok(())
                }
            }
        });
        let budget = Budget::time(Duration::from_secs(60)).with_max_ops(100);
        let stats = run_concurrent(8, budget, &ids, &f).await.unwrap();
        assert_eq!(stats.ops, 90);
        assert_eq!(stats.errors, 10);
        let mut seen = seen.lock().unwrap().clone();
        seen.sort_unstable();
        assert_eq!(seen, (0..100).collect::<Vec<_>>());
    }
}
