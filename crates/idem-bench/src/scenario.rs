//! The workloads, run for one backend: fresh, replay, hot key, architecture
//! variants, scaling, purge and memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use idem_core::store::{FencingToken, Record, Revision, Store, Versioned};
use idem_core::{
    Begin, Engine, Fingerprint, IdempotencyKey, Outcome, Policy, RecordKey, Scope, Timestamp,
};
use tokio::sync::Barrier;

use crate::backend::{Backend, Instance, Raw};
use crate::core_bench::payload;
use crate::harness::{
    Latencies, OpFn, Stats, median, median_stats, min_max, op, run_concurrent, run_measured,
};
use crate::report::{
    BackendReport, Compared, FinishedCache, HotKey, HotKeyPair, Memory, Purge, Scaling, Spread,
    Status, Variant, VariantRow,
};
use crate::{BenchError, Plan, Sides, Workload};

/// The engine every measurement drives.
pub(crate) type BenchEngine = Engine<Arc<dyn Store>>;

/// How long the benchmark's records live: long enough for any run, short
/// enough that a crashed run's keys vanish from Redis by themselves.
pub(crate) const RECORD_TTL: Duration = Duration::from_secs(60 * 60);

/// The raw baselines write their values with this time to live.
pub(crate) const RAW_TTL_MS: u64 = 60 * 60 * 1000;

/// When a raw value written now expires, in ms since the Unix epoch.
pub(crate) fn raw_expiry() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or_default();
    now.saturating_add(RAW_TTL_MS as i64)
}

/// Size of the raw claim marker (about what an encoded in-flight record takes).
pub(crate) const RAW_CLAIM_BYTES: usize = 80;

/// Key spaces of the raw baseline.
#[derive(Clone, Copy)]
enum KeySpace {
    Fresh = 1,
    Replay = 2,
    Hot = 3,
    Fill = 4,
}

/// A random-looking 32-byte raw key, as spread as a record digest.
fn raw_key(salt: u64, space: KeySpace, id: u64) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&salt.to_le_bytes());
    h.update(&[space as u8]);
    h.update(&id.to_le_bytes());
    *h.finalize().as_bytes()
}

/// What the operations share: the request body, the outcome, the scope.
struct Work {
    engine: Arc<BenchEngine>,
    raw: Arc<dyn Raw>,
    scope: Scope,
    body: Bytes,
    outcome: Outcome,
    claim_value: Bytes,
    salt: u64,
    ids: Arc<AtomicU64>,
}

fn err(e: impl std::fmt::Display) -> BenchError {
    BenchError::Failed(e.to_string())
}

fn begin_name(b: &Begin) -> &'static str {
    match b {
        Begin::Proceed(_) => "Proceed",
        Begin::Replay(_) => "Replay",
        Begin::InProgress { .. } => "InProgress",
        Begin::Mismatch(_) => "Mismatch",
    }
}

impl Work {
    fn new(engine: Arc<BenchEngine>, raw: Arc<dyn Raw>, plan: &Plan) -> Self {
        let salt = std::collections::hash_map::RandomState::new();
        let salt = std::hash::BuildHasher::hash_one(&salt, 0xbe4c_u64);
        Self {
            engine,
            raw,
            scope: Scope::tenant("idem-bench").with_operation(format!("run-{salt:016x}")),
            body: Bytes::from(payload(plan.outcome_bytes, 11)),
            outcome: Outcome::new(payload(plan.outcome_bytes, 12)),
            claim_value: Bytes::from(payload(RAW_CLAIM_BYTES, 13)),
            salt,
            ids: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Begin + complete on key `name`: what an integration does for a new request.
    fn idem_fresh(self: &Arc<Self>, prefix: &'static str) -> OpFn {
        let w = Arc::clone(self);
        op(move |id| {
            let w = Arc::clone(&w);
            async move {
                let key = IdempotencyKey::parse(&format!("{prefix}-{id}")).map_err(err)?;
                let fp = Fingerprint::of(&w.body);
                match w.engine.begin(&w.scope, &key, fp).await.map_err(err)? {
                    Begin::Proceed(lease) => w
                        .engine
                        .complete(&lease, w.outcome.clone())
                        .await
                        .map_err(err),
                    other => Err(BenchError::Failed(format!(
                        "fresh key {key}: expected Proceed, got {}",
                        begin_name(&other)
                    ))),
                }
            }
        })
    }

    /// Begin on one of `keys` completed keys named `replay-{i}`.
    fn idem_replay(self: &Arc<Self>, keys: u64) -> OpFn {
        let w = Arc::clone(self);
        op(move |id| {
            let w = Arc::clone(&w);
            async move {
                let key =
                    IdempotencyKey::parse(&format!("replay-{}", id % keys.max(1))).map_err(err)?;
                let fp = Fingerprint::of(&w.body);
                match w.engine.begin(&w.scope, &key, fp).await.map_err(err)? {
                    Begin::Replay(r) if r.outcome.len() == w.outcome.len() => Ok(()),
                    other => Err(BenchError::Failed(format!(
                        "replay key {key}: expected Replay, got {}",
                        begin_name(&other)
                    ))),
                }
            }
        })
    }

    fn raw_fresh_with(self: &Arc<Self>, raw: Arc<dyn Raw>, space: KeySpace) -> OpFn {
        let w = Arc::clone(self);
        op(move |id| {
            let (w, raw) = (Arc::clone(&w), Arc::clone(&raw));
            async move {
                let key = raw_key(w.salt, space, id);
                if !raw.claim(&key, &w.claim_value).await? {
                    return Err(BenchError::Failed("raw fresh key already present".into()));
                }
                raw.complete(&key, w.outcome.bytes()).await
            }
        })
    }

    fn raw_replay_with(self: &Arc<Self>, raw: Arc<dyn Raw>, keys: u64) -> OpFn {
        let w = Arc::clone(self);
        op(move |id| {
            let (w, raw) = (Arc::clone(&w), Arc::clone(&raw));
            async move {
                let key = raw_key(w.salt, KeySpace::Replay, id % keys.max(1));
                match raw.read(&key).await? {
                    Some(len) if len == w.outcome.len() => Ok(()),
                    other => Err(BenchError::Failed(format!(
                        "raw replay: expected {} bytes, got {other:?}",
                        w.outcome.len()
                    ))),
                }
            }
        })
    }

    /// Completes `keys` keys for the replay measurements, through idem and raw.
    async fn fill_replay_set(self: &Arc<Self>, keys: u64) -> Result<(), BenchError> {
        let w = Arc::clone(self);
        let fill_idem = op(move |i| {
            let w = Arc::clone(&w);
            async move {
                let key = IdempotencyKey::parse(&format!("replay-{i}")).map_err(err)?;
                match w
                    .engine
                    .begin(&w.scope, &key, Fingerprint::of(&w.body))
                    .await
                    .map_err(err)?
                {
                    Begin::Proceed(lease) => w
                        .engine
                        .complete(&lease, w.outcome.clone())
                        .await
                        .map_err(err),
                    Begin::Replay(_) => Ok(()),
                    other => Err(BenchError::Failed(format!(
                        "replay fill: {}",
                        begin_name(&other)
                    ))),
                }
            }
        });
        let w = Arc::clone(self);
        let fill_raw = op(move |i| {
            let w = Arc::clone(&w);
            async move {
                let key = raw_key(w.salt, KeySpace::Replay, i);
                w.raw.claim(&key, &w.claim_value).await?;
                w.raw.complete(&key, w.outcome.bytes()).await
            }
        });
        for f in [fill_idem, fill_raw] {
            run_all(keys, &Arc::new(AtomicU64::new(0)), &f)
                .await
                .map_err(|e| BenchError::Failed(format!("filling the replay set: {e}")))?;
        }
        Ok(())
    }
}

/// Runs `reps` pairs of `raw` and `idem`, alternating which goes first
/// (raw first in the first pair, idem first in the second, …), and compares
/// them pair by pair.
///
/// # Behavior
/// The ratio is the median of the pairs' ratios (idem ops/s ÷ raw ops/s of
/// the same pair, measured back to back), with their minimum and maximum;
/// each side's figures are the medians of its repetitions. With one side
/// only ([`Sides`]), the other's figures and the ratios are zero.
pub(crate) async fn compare(
    plan: &Plan,
    concurrency: usize,
    budget: crate::Budget,
    ids: &Arc<AtomicU64>,
    idem: &OpFn,
    raw: &OpFn,
    pids: &[u32],
) -> Result<Compared, BenchError> {
    let mut idem_reps = Vec::new();
    let mut raw_reps = Vec::new();
    let (b, c) = (budget, concurrency);
    let (run_idem, run_raw) = match plan.sides {
        Sides::Both => (true, true),
        Sides::Idem => (true, false),
        Sides::Raw => (false, true),
    };
    let repeats = plan.reps.max(1);
    for rep in 0..repeats {
        if rep % 2 == 0 && run_raw {
            raw_reps.push(run_measured(c, b, ids, raw, pids).await?);
        }
        if run_idem {
            idem_reps.push(run_measured(c, b, ids, idem, pids).await?);
        }
        if rep % 2 == 1 && run_raw {
            raw_reps.push(run_measured(c, b, ids, raw, pids).await?);
        }
    }
    Ok(compared(concurrency, repeats, &idem_reps, &raw_reps))
}

/// The comparison of `repeats` pairs of measurements (`idem_reps[i]` with
/// `raw_reps[i]`).
pub(crate) fn compared(
    concurrency: usize,
    repeats: usize,
    idem_reps: &[Stats],
    raw_reps: &[Stats],
) -> Compared {
    let ratios: Vec<f64> = idem_reps
        .iter()
        .zip(raw_reps)
        .map(|(i, r)| ratio(i.ops_per_sec, r.ops_per_sec))
        .collect();
    let (ratio_min, ratio_max) = min_max(&ratios);
    Compared {
        concurrency,
        ratio: median(&ratios),
        ratio_min,
        ratio_max,
        repeats,
        ratios,
        idem: median_stats(idem_reps),
        raw: median_stats(raw_reps),
        idem_reps: idem_reps.iter().map(|s| s.ops_per_sec).collect(),
        raw_reps: raw_reps.iter().map(|s| s.ops_per_sec).collect(),
        idem_spread: Spread::of(idem_reps),
        raw_spread: Spread::of(raw_reps),
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

/// What one hot-key attempt did.
enum Attempt {
    Executed,
    Lost,
}

type AttemptFn = Arc<
    dyn Fn(u64) -> crate::harness::BoxFuture<Result<Attempt, BenchError>> + Send + Sync + 'static,
>;

/// `tasks` duplicates released together on one new key per round.
async fn hot_key(tasks: usize, rounds: u64, attempt: AttemptFn) -> Result<HotKey, BenchError> {
    let start_line = Arc::new(Barrier::new(tasks));
    let finish_line = Arc::new(Barrier::new(tasks));
    let per_round: Arc<Vec<AtomicU64>> = Arc::new((0..rounds).map(|_| AtomicU64::new(0)).collect());
    let mut handles = Vec::with_capacity(tasks);
    let started = Instant::now();
    for _ in 0..tasks {
        let (start_line, finish_line, per_round, attempt) = (
            Arc::clone(&start_line),
            Arc::clone(&finish_line),
            Arc::clone(&per_round),
            Arc::clone(&attempt),
        );
        let mut winners = Latencies::new()?;
        let mut losers = Latencies::new()?;
        handles.push(tokio::spawn(async move {
            let mut errors = 0u64;
            let mut first_error = None;
            for round in 0..rounds {
                start_line.wait().await;
                let t = Instant::now();
                match attempt(round).await {
                    Ok(Attempt::Executed) => {
                        winners.record(t.elapsed());
                        if let Some(c) = per_round.get(round as usize) {
                            c.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    Ok(Attempt::Lost) => losers.record(t.elapsed()),
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| e.to_string());
                    }
                }
                finish_line.wait().await;
            }
            (winners, losers, errors, first_error)
        }));
    }
    let mut winners = Latencies::new()?;
    let mut losers = Latencies::new()?;
    let mut errors = 0;
    let mut first_error = None;
    for h in handles {
        let (w, l, e, fe) = h
            .await
            .map_err(|e| BenchError::Failed(format!("hot-key task panicked: {e}")))?;
        winners.merge(&w)?;
        losers.merge(&l)?;
        errors += e;
        if first_error.is_none() {
            first_error = fe;
        }
    }
    let seconds = started.elapsed().as_secs_f64().max(1e-9);
    let counts: Vec<u64> = per_round.iter().map(|c| c.load(Ordering::SeqCst)).collect();
    Ok(HotKey {
        rounds,
        tasks,
        executions: counts.iter().sum(),
        rounds_with_one_execution: counts.iter().filter(|&&c| c == 1).count() as u64,
        errors,
        first_error,
        winner_p50_us: winners.p50_us(),
        loser_p50_us: losers.p50_us(),
        loser_p99_us: losers.p99_us(),
        rounds_per_sec: rounds as f64 / seconds,
    })
}

async fn hot_key_pair(w: &Arc<Work>, plan: &Plan) -> Result<HotKeyPair, BenchError> {
    let wi = Arc::clone(w);
    let idem: AttemptFn = Arc::new(move |round| {
        let w = Arc::clone(&wi);
        Box::pin(async move {
            let key = IdempotencyKey::parse(&format!("hot-{round}")).map_err(err)?;
            match w
                .engine
                .begin(&w.scope, &key, Fingerprint::of(&w.body))
                .await
                .map_err(err)?
            {
                Begin::Proceed(lease) => {
                    w.engine
                        .complete(&lease, w.outcome.clone())
                        .await
                        .map_err(err)?;
                    Ok(Attempt::Executed)
                }
                Begin::InProgress { .. } | Begin::Replay(_) => Ok(Attempt::Lost),
                other => Err(BenchError::Failed(format!(
                    "hot key: unexpected {}",
                    begin_name(&other)
                ))),
            }
        })
    });
    let wr = Arc::clone(w);
    let raw: AttemptFn = Arc::new(move |round| {
        let w = Arc::clone(&wr);
        Box::pin(async move {
            let key = raw_key(w.salt, KeySpace::Hot, round);
            if w.raw.claim(&key, &w.claim_value).await? {
                w.raw.complete(&key, w.outcome.bytes()).await?;
                Ok(Attempt::Executed)
            } else {
                Ok(Attempt::Lost)
            }
        })
    });
    let raw = hot_key(plan.hot_tasks, plan.hot_rounds, raw).await?;
    let idem = hot_key(plan.hot_tasks, plan.hot_rounds, idem).await?;
    Ok(HotKeyPair {
        loser_p50_ratio: ratio(raw.loser_p50_us, idem.loser_p50_us),
        idem,
        raw,
    })
}

/// The engine over `instance`'s store, with a finished-record cache of
/// `cache_bytes` if given.
#[allow(clippy::expect_used)] // A constant policy: a record TTL of hours over the default lease.
pub(crate) fn engine_over(instance: &dyn Instance, cache_bytes: Option<usize>) -> Arc<BenchEngine> {
    let engine = Engine::new(instance.store())
        .with_policy(Policy::default().with_ttl(RECORD_TTL))
        .expect("RECORD_TTL is longer than the default lease");
    Arc::new(match cache_bytes {
        Some(bytes) => engine.with_finished_cache(bytes),
        None => engine,
    })
}

fn progress(backend: &dyn Backend, what: &str) {
    progress_of(backend.name(), what);
}

/// A progress line on stderr for `name`, with the seconds since the first one.
pub(crate) fn progress_of(name: &str, what: &str) {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let start = START.get_or_init(Instant::now);
    eprintln!(
        "idem-bench: [{:6.1} s] {name}: {what}",
        start.elapsed().as_secs_f64(),
    );
}

/// Whether `workload` runs on `backend` in this plan.
fn runs(backend: &dyn Backend, plan: &Plan, workload: Workload) -> bool {
    plan.runs(workload) && backend.measures(workload)
}

/// Runs every measurement of `backend`; a backend that cannot be reached is
/// reported as skipped.
pub(crate) async fn bench_backend(backend: &dyn Backend, plan: &Plan) -> BackendReport {
    let mut report = BackendReport {
        name: backend.name().to_string(),
        finished_cache_bytes: backend.finished_cache_bytes(),
        ..BackendReport::default()
    };
    let main = match backend.open().await {
        Ok(i) => i,
        Err(e) => {
            report.status = Status::Skipped;
            report.reason = Some(e.to_string());
            return report;
        }
    };
    report.server_version = main.server_version().await;
    report.notes.extend(main.notes());
    if let Some(bytes) = report.finished_cache_bytes {
        report.notes.push(format!(
            "engine with the finished-record cache ({} MiB); the raw side is unchanged: a replay compares a cache hit with the raw store read",
            bytes >> 20
        ));
    }
    noted(&mut report.errors, "settle", main.settle().await);
    if let Err(e) = main_measurements(backend, plan, main.as_ref(), &mut report).await {
        report.errors.push(e.to_string());
    }
    noted(&mut report.errors, "cleanup", main.close().await);
    progress(backend, "main workloads done");
    if runs(backend, plan, Workload::Scaling) {
        report.scaling = noted(&mut report.errors, "scaling", scaling(backend, plan).await);
        progress(backend, "scaling done");
    }
    if runs(backend, plan, Workload::Purge) {
        report.purge = noted(&mut report.errors, "purge", purge(backend, plan).await);
        progress(backend, "purge done");
    }
    if runs(backend, plan, Workload::Memory) {
        report.memory = noted(&mut report.errors, "memory", memory(backend, plan).await).flatten();
        progress(backend, "memory done");
    }
    report
}

/// The figures of a measurement that worked; the error of one that failed,
/// added to `errors` after `what`.
fn noted<T>(errors: &mut Vec<String>, what: &str, result: Result<T, BenchError>) -> Option<T> {
    result.map_err(|e| errors.push(format!("{what}: {e}"))).ok()
}

async fn main_measurements(
    backend: &dyn Backend,
    plan: &Plan,
    main: &dyn Instance,
    report: &mut BackendReport,
) -> Result<(), BenchError> {
    let engine = engine_over(main, backend.finished_cache_bytes());
    let raw = main.raw().await?;
    let w = Arc::new(Work::new(engine, Arc::clone(&raw), plan));
    let idem_fresh = w.idem_fresh("fresh");
    let raw_fresh = w.raw_fresh_with(Arc::clone(&raw), KeySpace::Fresh);
    // Warm up pools, statement caches and scripts on both sides.
    let warm = plan.warmup;
    let warm_c = backend.concurrencies(plan).into_iter().max().unwrap_or(1);
    run_concurrent(warm_c, warm, &w.ids, &raw_fresh).await?;
    run_concurrent(warm_c, warm, &w.ids, &idem_fresh).await?;
    if runs(backend, plan, Workload::Fresh) {
        report.fresh = compare_levels(
            backend,
            plan,
            main,
            &w.ids,
            "fresh",
            &idem_fresh,
            &raw_fresh,
        )
        .await?;
    }
    let idem_replay = w.idem_replay(plan.replay_keys);
    let raw_replay = w.raw_replay_with(Arc::clone(&raw), plan.replay_keys);
    if runs(backend, plan, Workload::Replay) || runs(backend, plan, Workload::Architecture) {
        w.fill_replay_set(plan.replay_keys).await?;
        run_concurrent(warm_c, warm, &w.ids, &raw_replay).await?;
        run_concurrent(warm_c, warm, &w.ids, &idem_replay).await?;
    }
    if runs(backend, plan, Workload::Replay) {
        report.replay = compare_levels(
            backend,
            plan,
            main,
            &w.ids,
            "replay",
            &idem_replay,
            &raw_replay,
        )
        .await?;
    }
    if runs(backend, plan, Workload::HotKey) {
        report.hot_key = noted(&mut report.errors, "hot key", hot_key_pair(&w, plan).await);
        progress(backend, "hot key done");
    }
    report.finished_cache = w.engine.finished_cache().map(|s| FinishedCache {
        hits: s.hits,
        misses: s.misses,
        entries: s.entries,
        bytes: s.bytes,
        max_bytes: s.max_bytes,
    });
    if !runs(backend, plan, Workload::Architecture) {
        return Ok(());
    }
    let levels = {
        let all = backend.concurrencies(plan);
        let mut levels = vec![1];
        if let Some(&max) = all.iter().max().filter(|&&m| m > 1) {
            levels.push(max);
        }
        levels
    };
    for (label, variant) in main.raw_variants().await? {
        // A variant works on the fair baseline's data: the replay set is there.
        let v_fresh = w.raw_fresh_with(Arc::clone(&variant), KeySpace::Fresh);
        let v_replay = w.raw_replay_with(Arc::clone(&variant), plan.replay_keys);
        run_concurrent(1, warm, &w.ids, &v_fresh).await?;
        let mut rows = Vec::new();
        for &c in &levels {
            for (workload, idem, raw, var) in [
                ("fresh", &idem_fresh, &raw_fresh, &v_fresh),
                ("replay", &idem_replay, &raw_replay, &v_replay),
            ] {
                let fair = compare(plan, c, plan.budget, &w.ids, idem, raw, &[]).await?;
                let v = median_stats(&repeat(plan, c, &w.ids, var).await?);
                rows.push(VariantRow {
                    workload: workload.into(),
                    concurrency: c,
                    variant: v,
                    raw: fair.raw,
                    idem: fair.idem,
                });
            }
        }
        report.architecture.push(Variant { label, rows });
        progress(backend, "architecture done");
    }
    Ok(())
}

/// [`compare`] at each of the backend's concurrency levels, with the CPU
/// time of the instance's server processes.
async fn compare_levels(
    backend: &dyn Backend,
    plan: &Plan,
    main: &dyn Instance,
    ids: &Arc<AtomicU64>,
    what: &str,
    idem: &OpFn,
    raw: &OpFn,
) -> Result<Vec<Compared>, BenchError> {
    let mut rows = Vec::new();
    for c in backend.concurrencies(plan) {
        let pids = main.server_pids().await;
        rows.push(compare(plan, c, plan.budget, ids, idem, raw, &pids).await?);
        progress(backend, &format!("{what} c={c} done"));
    }
    Ok(rows)
}

async fn repeat(
    plan: &Plan,
    concurrency: usize,
    ids: &Arc<AtomicU64>,
    f: &OpFn,
) -> Result<Vec<Stats>, BenchError> {
    let mut out = Vec::new();
    for _ in 0..plan.reps.max(1) {
        out.push(run_concurrent(concurrency, plan.budget, ids, f).await?);
    }
    Ok(out)
}

/// Writes one completed record through the engine, to be cloned in bulk.
async fn template(
    engine: &BenchEngine,
    body: &[u8],
    outcome: &Outcome,
) -> Result<RecordKey, BenchError> {
    let scope = Scope::tenant("idem-bench").with_operation("template");
    let key = IdempotencyKey::parse("template").map_err(err)?;
    match engine
        .begin(&scope, &key, Fingerprint::of(body))
        .await
        .map_err(err)?
    {
        Begin::Proceed(lease) => engine
            .complete(&lease, outcome.clone())
            .await
            .map_err(err)?,
        other => {
            return Err(BenchError::Failed(format!(
                "template: expected Proceed, got {}",
                begin_name(&other)
            )));
        }
    }
    Ok(RecordKey::new(&scope, &key))
}

/// `result`, after closing `inst` (whose failure is the error if `result`
/// is fine).
async fn closing<T>(
    inst: Box<dyn Instance>,
    result: Result<T, BenchError>,
) -> Result<T, BenchError> {
    let closed = inst.close().await;
    let value = result?;
    closed?;
    Ok(value)
}

async fn scaling(backend: &dyn Backend, plan: &Plan) -> Result<Scaling, BenchError> {
    let inst = backend.open().await?;
    let result = scaling_on(plan, inst.as_ref()).await;
    closing(inst, result).await
}

async fn scaling_on(plan: &Plan, inst: &dyn Instance) -> Result<Scaling, BenchError> {
    let engine = engine_over(inst, None);
    let raw = inst.raw().await?;
    let w = Arc::new(Work::new(Arc::clone(&engine), Arc::clone(&raw), plan));
    let (small_n, large_n) = plan.scaling_records;
    let template = template(&engine, &w.body, &w.outcome).await?;
    let have = inst.live_records().await?;
    inst.clone_records(&template, small_n.saturating_sub(have))
        .await?;
    raw.fill(small_n, w.outcome.bytes()).await?;
    inst.settle().await?;
    let fresh = w.idem_fresh("scale");
    let raw_fresh = w.raw_fresh_with(Arc::clone(&raw), KeySpace::Fresh);
    let c = plan.scaling_concurrency;
    let warmup = plan.warmup.with_max_ops((small_n / 4).max(10));
    run_concurrent(c, warmup, &w.ids, &raw_fresh).await?;
    run_concurrent(c, warmup, &w.ids, &fresh).await?;
    // Cap the operations so that the small measurement stays near its size
    // (each repetition adds at most as many records as there were).
    let budget = plan.budget.with_max_ops(small_n.max(100));
    let small_records = inst.live_records().await?;
    let small = compare(plan, c, budget, &w.ids, &fresh, &raw_fresh, &[]).await?;
    let have = inst.live_records().await?;
    let t = Instant::now();
    inst.clone_records(&template, large_n.saturating_sub(have))
        .await?;
    let load_seconds = t.elapsed().as_secs_f64();
    raw.fill(large_n.saturating_sub(small_n), w.outcome.bytes())
        .await?;
    inst.settle().await?;
    let large_records = inst.live_records().await?;
    run_concurrent(c, warmup, &w.ids, &raw_fresh).await?;
    run_concurrent(c, warmup, &w.ids, &fresh).await?;
    let large = compare(plan, c, budget, &w.ids, &fresh, &raw_fresh, &[]).await?;
    Ok(Scaling {
        concurrency: c,
        small_records,
        large_records,
        ratio: ratio(large.idem.ops_per_sec, small.idem.ops_per_sec),
        raw_ratio: ratio(large.raw.ops_per_sec, small.raw.ops_per_sec),
        small: small.idem,
        large: large.idem,
        raw_small: small.raw,
        raw_large: large.raw,
        load_seconds,
    })
}

async fn purge(backend: &dyn Backend, plan: &Plan) -> Result<Purge, BenchError> {
    let inst = backend.open().await?;
    let result = purge_on(plan, inst.as_ref()).await;
    closing(inst, result).await
}

async fn purge_on(plan: &Plan, inst: &dyn Instance) -> Result<Purge, BenchError> {
    let store = inst.store();
    let batch = plan.purge_batch;
    if store.capabilities().native_expiry {
        return Ok(Purge {
            native_expiry: true,
            batch,
            ..Purge::default()
        });
    }
    // One record that expires at T0 + 1 s, written directly at time T0, then cloned.
    let t0 = Timestamp::from_millis(1_000_000_000_000);
    let policy = Policy::default().with_ttl(Duration::from_secs(1));
    let token = FencingToken::from_u128(1);
    let fp = Fingerprint::of(b"purge");
    let record = Record::new_claim(
        fp,
        token,
        t0,
        &policy.clone().with_lease(Duration::from_secs(1)),
    )
    .complete(
        token,
        Outcome::new(payload(plan.outcome_bytes, 21)),
        t0,
        &policy,
    )
    .map_err(err)?;
    let key = RecordKey::new(
        &Scope::tenant("idem-bench").with_operation("purge"),
        &IdempotencyKey::parse("template").map_err(err)?,
    );
    let versioned = Versioned {
        revision: Revision::from_u64(1),
        record,
    };
    store
        .insert_if_absent(&key, &versioned, t0)
        .await
        .map_err(err)?;
    inst.clone_records(&key, plan.purge_records.saturating_sub(1))
        .await?;
    let records = inst.live_records().await?;
    inst.settle().await?;
    let later = t0.plus(Duration::from_secs(3600));
    let t = Instant::now();
    let mut removed = 0;
    loop {
        let n = store.purge_expired(later, batch).await.map_err(err)?;
        removed += n;
        if n < batch as u64 {
            break;
        }
    }
    let seconds = t.elapsed().as_secs_f64().max(1e-9);
    Ok(Purge {
        native_expiry: false,
        records,
        removed,
        batch,
        seconds,
        rows_per_sec: removed as f64 / seconds,
    })
}

/// Runs `f` `n` times from 16 tasks (no time limit); fails with the first
/// error if any call failed.
pub(crate) async fn run_all(n: u64, ids: &Arc<AtomicU64>, f: &OpFn) -> Result<(), BenchError> {
    let budget = crate::Budget::time(Duration::from_secs(3600)).with_max_ops(n);
    let stats = run_concurrent(16, budget, ids, f).await?;
    if stats.errors > 0 {
        return Err(BenchError::Failed(stats.first_error.unwrap_or_default()));
    }
    Ok(())
}

async fn memory(backend: &dyn Backend, plan: &Plan) -> Result<Option<Memory>, BenchError> {
    // idem records, in an instance of their own.
    let inst = backend.open().await?;
    let result = async {
        let w = Arc::new(Work::new(
            engine_over(inst.as_ref(), None),
            inst.raw().await?,
            plan,
        ));
        let Some(before) = inst.data_bytes().await? else {
            return Ok(None);
        };
        run_all(plan.memory_records, &w.ids, &w.idem_fresh("mem")).await?;
        let after = inst.data_bytes().await?.unwrap_or(before);
        Ok(Some(after.saturating_sub(before)))
    }
    .await;
    let Some(idem_bytes) = closing(inst, result).await? else {
        return Ok(None);
    };
    // Raw values, in another instance.
    let inst = backend.open().await?;
    let result = async {
        let engine = engine_over(inst.as_ref(), None);
        let raw = inst.raw().await?;
        let w = Arc::new(Work::new(engine, Arc::clone(&raw), plan));
        let before = raw.data_bytes().await?.unwrap_or(0);
        let fill = w.raw_fresh_with(raw.clone(), KeySpace::Fill);
        run_all(plan.memory_records, &w.ids, &fill).await?;
        let after = raw.data_bytes().await?.unwrap_or(before);
        Ok(after.saturating_sub(before))
    }
    .await;
    let raw_bytes = closing(inst, result).await?;
    let n = plan.memory_records.max(1) as f64;
    let per = |total: u64| total as f64 / n - plan.outcome_bytes as f64;
    Ok(Some(Memory {
        records: plan.memory_records,
        outcome_bytes: plan.outcome_bytes,
        idem_overhead_bytes: per(idem_bytes),
        raw_overhead_bytes: per(raw_bytes),
        idem_minus_raw_bytes: per(idem_bytes) - per(raw_bytes),
        method: backend_memory_method(backend.name()).into(),
    }))
}

fn backend_memory_method(name: &str) -> &'static str {
    match name {
        "sqlite" => "growth of (page_count - freelist_count) x page_size over the records",
        "postgres" => "growth of pg_total_relation_size (heap + TOAST + indexes) over the records",
        "redis" | "valkey" | "redis-cluster" => {
            "sum of MEMORY USAGE of the keys written, per record"
        }
        _ => "backend-specific",
    }
}
