//! The results: a serde structure written as JSON, and the printed table.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::core_bench::CoreReport;
use crate::harness::{Stats, min_max};
use crate::http_bench::HttpReport;

/// The version of the JSON layout this crate writes: 2 since ratios are the
/// median of repeated pairs, with their range (`ratio_min`, `ratio_max`,
/// `repeats`) and server versions.
pub const FORMAT: u32 = 2;

/// Everything one run measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    /// Version of this JSON layout ([`FORMAT`]).
    pub format: u32,
    /// `tiny`, `quick` or `full`.
    pub mode: String,
    /// When the run started (seconds since the Unix epoch).
    pub started_at_unix: u64,
    /// Wall-clock seconds the whole run took.
    pub total_seconds: f64,
    /// Where it ran.
    pub machine: Machine,
    /// The plan the run followed.
    pub plan: PlanSummary,
    /// The pure core micro-benchmark, if it ran.
    pub core: Option<CoreReport>,
    /// One entry per backend asked for, measured or skipped.
    pub backends: Vec<BackendReport>,
    /// The HTTP measurement (`idem-tower` on axum against the bare
    /// endpoint), if it ran.
    #[serde(default)]
    pub http: Option<HttpReport>,
    /// The targets, checked against this run.
    pub targets: Vec<TargetCheck>,
}

/// The machine the run measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Machine {
    /// Logical CPUs available to the process.
    pub cores: usize,
    /// `std::env::consts::OS` / `ARCH`.
    pub os: String,
    /// Threads of the tokio runtime the operations ran on.
    pub runtime_threads: usize,
}

/// The parameters of the run, as figures.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PlanSummary {
    /// Seconds per measurement.
    pub seconds_per_measurement: f64,
    /// Operation cap per measurement, if any.
    pub max_ops_per_measurement: Option<u64>,
    /// Repetitions of each measurement (raw and idem alternate; medians reported).
    pub repetitions: usize,
    /// Size of the outcome stored per key, and of the request body fingerprinted.
    pub outcome_bytes: usize,
    /// Completed keys the replay measurement cycles through.
    pub replay_keys: u64,
    /// Concurrent duplicates per hot-key round.
    pub hot_key_tasks: usize,
    /// Hot-key rounds.
    pub hot_key_rounds: u64,
    /// Live records of the scaling measurement: small, then large.
    pub scaling_records: (u64, u64),
    /// Expired records the purge measurement removes.
    pub purge_records: u64,
    /// Records written to measure bytes per record.
    pub memory_records: u64,
}

/// Whether a backend was measured.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Measured.
    #[default]
    Ok,
    /// Not measured: the server could not be reached (see `reason`).
    Skipped,
}

/// The figures of one backend.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BackendReport {
    /// The target's name: `memory`, `sqlite`, `postgres`, `redis`,
    /// `valkey`, `redis-cluster`, or a variant (`postgres-read-first`,
    /// `sqlite+cache`, …).
    pub name: String,
    /// Measured or skipped.
    pub status: Status,
    /// Why it was skipped.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
    /// The server's name and version (`redis 7.0.15`, `valkey 9.1.0`,
    /// `PostgreSQL 15.8`, `SQLite 3.50.2`), if it could be asked.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub server_version: Option<String>,
    /// The byte budget of the engine's finished-record cache, for the
    /// `+cache` targets.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub finished_cache_bytes: Option<usize>,
    /// What the finished-record cache did over the fresh, replay and hot-key
    /// measurements, for the `+cache` targets.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub finished_cache: Option<FinishedCache>,
    /// Begin + complete on distinct keys, per concurrency.
    pub fresh: Vec<Compared>,
    /// Begin on completed keys, per concurrency.
    pub replay: Vec<Compared>,
    /// Concurrent duplicates of one key.
    pub hot_key: Option<HotKeyPair>,
    /// Raw baselines with another connection model (the store's architecture cost).
    pub architecture: Vec<Variant>,
    /// Throughput with few and with many live records.
    pub scaling: Option<Scaling>,
    /// Removal of expired records.
    pub purge: Option<Purge>,
    /// Bytes per record beyond the outcome.
    pub memory: Option<Memory>,
    /// Remarks: pool sizes, pragmas, what was left out and why.
    pub notes: Vec<String>,
    /// Measurements that failed (the others still ran).
    pub errors: Vec<String>,
}

/// One workload measured through idem and through the raw commands.
///
/// # Behavior
/// `repeats` pairs ran, raw and idem back to back, the order alternating
/// (raw first, then idem first, …). `ratio` is the median of the pairs'
/// ratios (`ratios`: idem ops/s ÷ raw ops/s of one pair), `ratio_min` and
/// `ratio_max` their range; `idem` and `raw` hold each side's medians.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Compared {
    /// Concurrent tasks.
    pub concurrency: usize,
    /// Through the engine and the store (medians over repetitions).
    pub idem: Stats,
    /// The raw commands (medians over repetitions).
    pub raw: Stats,
    /// Median over the pairs of idem ops/s ÷ raw ops/s (0 when one side did
    /// not run).
    pub ratio: f64,
    /// The smallest ratio of a pair.
    #[serde(default)]
    pub ratio_min: f64,
    /// The largest ratio of a pair.
    #[serde(default)]
    pub ratio_max: f64,
    /// Pairs measured.
    #[serde(default)]
    pub repeats: usize,
    /// The ratio of each pair, in run order.
    #[serde(default)]
    pub ratios: Vec<f64>,
    /// ops/s of each idem repetition.
    pub idem_reps: Vec<f64>,
    /// ops/s of each raw repetition.
    pub raw_reps: Vec<f64>,
    /// Range of the idem repetitions' throughput and latency.
    #[serde(default)]
    pub idem_spread: Spread,
    /// Range of the raw repetitions' throughput and latency.
    #[serde(default)]
    pub raw_spread: Spread,
}

/// The range of one side's figures over the repetitions of a measurement.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    /// Lowest ops/s of a repetition.
    pub ops_per_sec_min: f64,
    /// Highest ops/s of a repetition.
    pub ops_per_sec_max: f64,
    /// Lowest median latency of a repetition, microseconds.
    pub p50_us_min: f64,
    /// Highest median latency of a repetition, microseconds.
    pub p50_us_max: f64,
    /// Lowest 99th percentile latency of a repetition, microseconds.
    pub p99_us_min: f64,
    /// Highest 99th percentile latency of a repetition, microseconds.
    pub p99_us_max: f64,
}

impl Spread {
    /// The range of `reps` (all zero for none).
    pub fn of(reps: &[Stats]) -> Self {
        let range = |f: fn(&Stats) -> f64| min_max(&reps.iter().map(f).collect::<Vec<_>>());
        let (ops_per_sec_min, ops_per_sec_max) = range(|s| s.ops_per_sec);
        let (p50_us_min, p50_us_max) = range(|s| s.p50_us);
        let (p99_us_min, p99_us_max) = range(|s| s.p99_us);
        Self {
            ops_per_sec_min,
            ops_per_sec_max,
            p50_us_min,
            p50_us_max,
            p99_us_min,
            p99_us_max,
        }
    }
}

/// The counters of the engine's finished-record cache at the end of a
/// target's fresh, replay and hot-key measurements (`idem_core::CacheStats`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FinishedCache {
    /// `begin` calls answered from the cache.
    pub hits: u64,
    /// `begin` calls that went to the store.
    pub misses: u64,
    /// Entries held at the end.
    pub entries: usize,
    /// Their weight in bytes.
    pub bytes: u64,
    /// The byte budget.
    pub max_bytes: u64,
}

/// The hot-key measurement through idem and through the raw commands.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HotKeyPair {
    /// Through the engine.
    pub idem: HotKey,
    /// Raw claim (+ outcome write by the winner).
    pub raw: HotKey,
    /// `raw.loser_p50_us / idem.loser_p50_us` (higher is better for idem).
    pub loser_p50_ratio: f64,
}

/// Rounds of concurrent duplicates of one key.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HotKey {
    /// Rounds run (a new key each).
    pub rounds: u64,
    /// Duplicates per round.
    pub tasks: usize,
    /// Operations that ran, over all rounds: must equal `rounds`.
    pub executions: u64,
    /// Rounds in which exactly one duplicate executed.
    pub rounds_with_one_execution: u64,
    /// Attempts that failed with an error.
    pub errors: u64,
    /// The first error, if any.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub first_error: Option<String>,
    /// Winner latency (claim + outcome write), median, microseconds.
    pub winner_p50_us: f64,
    /// Losers' latency (the answer "in progress" or the replay), median, microseconds.
    pub loser_p50_us: f64,
    /// Losers' latency, 99th percentile, microseconds.
    pub loser_p99_us: f64,
    /// Rounds per second.
    pub rounds_per_sec: f64,
}

/// A raw baseline with another connection model.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Variant {
    /// What differs from the fair baseline.
    pub label: String,
    /// The measurements, per workload and concurrency.
    pub rows: Vec<VariantRow>,
}

/// One workload under the variant, the fair raw baseline and idem.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VariantRow {
    /// `fresh` or `replay`.
    pub workload: String,
    /// Concurrent tasks.
    pub concurrency: usize,
    /// The variant (medians).
    pub variant: Stats,
    /// The fair raw baseline, measured alongside (medians).
    pub raw: Stats,
    /// idem, measured alongside (medians).
    pub idem: Stats,
}

/// Throughput of fresh operations with few and with many live records.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Scaling {
    /// Concurrency of the measurement.
    pub concurrency: usize,
    /// Live records before the small measurement.
    pub small_records: u64,
    /// Fresh ops/s with `small_records` live (median).
    pub small: Stats,
    /// Live records before the large measurement.
    pub large_records: u64,
    /// Fresh ops/s with `large_records` live (median).
    pub large: Stats,
    /// `large.ops_per_sec / small.ops_per_sec` (1 = no growth of cost).
    pub ratio: f64,
    /// The raw baseline with as many rows of its own (medians).
    pub raw_small: Stats,
    /// The raw baseline with the large number of rows (medians).
    pub raw_large: Stats,
    /// `raw_large.ops_per_sec / raw_small.ops_per_sec`: how the backend
    /// itself scales with the number of keys.
    pub raw_ratio: f64,
    /// Seconds the bulk load of the large set took.
    pub load_seconds: f64,
}

/// Removal of expired records.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Purge {
    /// Whether the backend expires records itself (nothing to purge).
    pub native_expiry: bool,
    /// Expired records stored before the purge.
    pub records: u64,
    /// Records the purge reported removed.
    pub removed: u64,
    /// `limit` per `purge_expired` call.
    pub batch: usize,
    /// Seconds the purge took.
    pub seconds: f64,
    /// Removed records per second.
    pub rows_per_sec: f64,
}

/// Bytes per record beyond the stored outcome.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Memory {
    /// Records written (through the engine, and raw).
    pub records: u64,
    /// Outcome (value) size of each record.
    pub outcome_bytes: usize,
    /// Bytes per idem record beyond the outcome.
    pub idem_overhead_bytes: f64,
    /// Bytes per raw value beyond the value (the backend's own floor).
    pub raw_overhead_bytes: f64,
    /// `idem_overhead_bytes - raw_overhead_bytes`: what idem adds to a raw
    /// write of the same outcome.
    pub idem_minus_raw_bytes: f64,
    /// How the bytes were counted.
    pub method: String,
}

/// One target of the issue, checked.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TargetCheck {
    /// What is measured.
    pub name: String,
    /// The target, as text.
    pub target: String,
    /// The measured figure (for a ratio: the median over the repetitions).
    pub value: f64,
    /// The lowest reading over the repetitions, for a repeated measurement.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub min: Option<f64>,
    /// The highest reading over the repetitions, for a repeated measurement.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub max: Option<f64>,
    /// Whether the target was met in this run (by `value`).
    pub met: bool,
}

/// The floors of issue 23 for idem ÷ raw, fresh and replay, of the target
/// named `name` (a `+cache` variant: its backend's fresh floor, and a
/// replay at least 3 × the raw store read).
fn ratio_floors(name: &str) -> Option<(f64, f64)> {
    if let Some(base) = name.strip_suffix("+cache") {
        return ratio_floors(base).map(|(fresh, _)| (fresh, 3.0));
    }
    match name {
        "valkey" => Some((0.90, 0.90)),
        "redis" | "redis-cluster" => Some((0.75, 0.90)),
        "postgres" | "postgres-read-first" | "postgres-single-statement" => Some((0.85, 0.90)),
        "sqlite" => Some((0.90, 0.90)),
        _ => None,
    }
}

/// The ratio of `row`: the median, with the range over the pairs when
/// there were several (`0.84 (0.80–0.88)`).
pub fn ratio_cell(row: &Compared) -> String {
    if row.repeats > 1 {
        format!(
            "{:.2} ({:.2}–{:.2})",
            row.ratio, row.ratio_min, row.ratio_max
        )
    } else {
        format!("{:.2}", row.ratio)
    }
}

/// A latency in µs with its range over the repetitions (`582.1 (560.0–601.3)`).
fn latency_cell(median: f64, min: f64, max: f64) -> String {
    format!("{median:.1} ({min:.1}–{max:.1})")
}

/// "client+server" CPU µs per operation, or "-".
/// One row of a compared table: concurrency, op/s, ratio, p50, p99 and CPU
/// of both sides, under a blank label `widths.0` wide and CPU cells
/// `widths.1` wide; errors, if any, named with `sides`.
fn compared_line(
    out: &mut String,
    r: &Compared,
    (label, cpu_width): (usize, usize),
    (idem, raw): (&str, &str),
) {
    let errors = if r.idem.errors + r.raw.errors > 0 {
        format!("  ERRORS {idem} {} {raw} {}", r.idem.errors, r.raw.errors)
    } else {
        String::new()
    };
    let _ = writeln!(
        out,
        "  {:<label$} {:>4} {:>10.0} {:>10.0} {:>18} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>cpu_width$} {:>cpu_width$}{errors}",
        "",
        r.concurrency,
        r.idem.ops_per_sec,
        r.raw.ops_per_sec,
        ratio_cell(r),
        r.idem.p50_us,
        r.raw.p50_us,
        r.idem.p99_us,
        r.raw.p99_us,
        cpu(&r.idem),
        cpu(&r.raw),
    );
}

fn cpu(s: &Stats) -> String {
    match (s.client_cpu_us, s.server_cpu_us) {
        (Some(c), Some(v)) => format!("{c:.1}+{v:.1}"),
        (Some(c), None) => format!("{c:.1}"),
        _ => "-".into(),
    }
}

impl Report {
    /// Checks the targets against the measured figures.
    pub fn check_targets(&mut self) {
        let mut checks = Vec::new();
        for b in self.backends.iter().filter(|b| b.status == Status::Ok) {
            if let Some((fresh, replay)) = ratio_floors(&b.name) {
                for (what, rows, floor) in
                    [("fresh", &b.fresh, fresh), ("replay", &b.replay, replay)]
                {
                    for row in rows {
                        let repeated = row.repeats > 1;
                        checks.push(TargetCheck {
                            name: format!("{} {what} c={} idem/raw", b.name, row.concurrency),
                            target: format!(">= {floor:.2}"),
                            value: row.ratio,
                            min: repeated.then_some(row.ratio_min),
                            max: repeated.then_some(row.ratio_max),
                            met: row.ratio >= floor,
                        });
                    }
                }
            }
            if let Some(s) = &b.scaling {
                checks.push(TargetCheck {
                    name: format!(
                        "{} ops/s with {} vs {} records (raw: {:.2})",
                        b.name, s.large_records, s.small_records, s.raw_ratio
                    ),
                    target: ">= 0.90".into(),
                    value: s.ratio,
                    min: None,
                    max: None,
                    met: s.ratio >= 0.90,
                });
            }
            if matches!(b.name.as_str(), "redis" | "valkey")
                && let Some(m) = &b.memory
            {
                checks.push(TargetCheck {
                    name: format!("{} bytes per record beyond the outcome", b.name),
                    target: "<= 200".into(),
                    value: m.idem_overhead_bytes,
                    min: None,
                    max: None,
                    met: m.idem_overhead_bytes <= 200.0,
                });
            }
        }
        if let Some(core) = &self.core {
            checks.push(TargetCheck {
                name: "core path ns/op (1 KiB request and outcome)".into(),
                target: "<= 2000".into(),
                value: core.total_ns,
                min: None,
                max: None,
                met: core.total_ns <= 2000.0,
            });
        }
        self.targets = checks;
    }

    /// The report as a human-readable table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "idem benchmarks ({} mode, {} cores, {} runtime threads, {:.0} s; outcome {} B; {} repetitions of {:.2} s, raw and idem alternating; ratio = median (min–max) over the pairs, other figures medians)",
            self.mode,
            self.machine.cores,
            self.machine.runtime_threads,
            self.total_seconds,
            self.plan.outcome_bytes,
            self.plan.repetitions,
            self.plan.seconds_per_measurement,
        );
        if let Some(core) = &self.core {
            let _ = writeln!(out, "\ncore (pure, one core): ns per operation");
            for part in &core.parts {
                let _ = writeln!(out, "  {:<44} {:>9.0} ns", part.name, part.ns);
            }
            let _ = writeln!(
                out,
                "  {:<44} {:>9.0} ns",
                "total (one fresh request)", core.total_ns
            );
        }
        for b in &self.backends {
            match &b.server_version {
                Some(v) => {
                    let _ = writeln!(out, "\n== {} == ({v})", b.name);
                }
                None => {
                    let _ = writeln!(out, "\n== {} ==", b.name);
                }
            }
            if b.status == Status::Skipped {
                let _ = writeln!(
                    out,
                    "  skipped (unreachable): {}",
                    b.reason.as_deref().unwrap_or("")
                );
                continue;
            }
            for (what, rows) in [
                ("fresh (begin+complete)", &b.fresh),
                ("replay (begin)", &b.replay),
            ] {
                if rows.is_empty() {
                    continue;
                }
                let _ = writeln!(
                    out,
                    "  {what:<24} {:>4} {:>10} {:>10} {:>18} {:>8} {:>8} {:>8} {:>8} {:>13} {:>13}",
                    "c",
                    "idem op/s",
                    "raw op/s",
                    "ratio (min–max)",
                    "idem p50",
                    "raw p50",
                    "idem p99",
                    "raw p99",
                    "idem cpu c+s",
                    "raw cpu c+s"
                );
                for r in rows {
                    compared_line(&mut out, r, (24, 13), ("idem", "raw"));
                }
            }
            for (what, rows) in [("fresh", &b.fresh), ("replay", &b.replay)] {
                for r in rows.iter().filter(|r| r.concurrency == 32 && r.repeats > 1) {
                    let _ = writeln!(
                        out,
                        "  {what} c=32 latency, us, median (min–max) over {} repetitions: p50 idem {} raw {}; p99 idem {} raw {}",
                        r.repeats,
                        latency_cell(
                            r.idem.p50_us,
                            r.idem_spread.p50_us_min,
                            r.idem_spread.p50_us_max
                        ),
                        latency_cell(
                            r.raw.p50_us,
                            r.raw_spread.p50_us_min,
                            r.raw_spread.p50_us_max
                        ),
                        latency_cell(
                            r.idem.p99_us,
                            r.idem_spread.p99_us_min,
                            r.idem_spread.p99_us_max
                        ),
                        latency_cell(
                            r.raw.p99_us,
                            r.raw_spread.p99_us_min,
                            r.raw_spread.p99_us_max
                        ),
                    );
                }
            }
            if let Some(h) = &b.hot_key {
                for (side, hk) in [("idem", &h.idem), ("raw", &h.raw)] {
                    let _ = writeln!(
                        out,
                        "  hot key {side:<5} {} rounds x {}: executions {} ({} rounds with exactly one), loser p50 {:.1} us p99 {:.1} us, winner p50 {:.1} us, {:.0} rounds/s{}",
                        hk.rounds,
                        hk.tasks,
                        hk.executions,
                        hk.rounds_with_one_execution,
                        hk.loser_p50_us,
                        hk.loser_p99_us,
                        hk.winner_p50_us,
                        hk.rounds_per_sec,
                        if hk.errors > 0 {
                            format!(", {} ERRORS", hk.errors)
                        } else {
                            String::new()
                        }
                    );
                }
            }
            for v in &b.architecture {
                let _ = writeln!(out, "  architecture: {}", v.label);
                for r in &v.rows {
                    let _ = writeln!(
                        out,
                        "    {:<6} c={:<3} variant {:>9.0} op/s p50 {:>8.1} us | fair raw {:>9.0} op/s p50 {:>8.1} us | idem {:>9.0} op/s p50 {:>8.1} us",
                        r.workload,
                        r.concurrency,
                        r.variant.ops_per_sec,
                        r.variant.p50_us,
                        r.raw.ops_per_sec,
                        r.raw.p50_us,
                        r.idem.ops_per_sec,
                        r.idem.p50_us,
                    );
                }
            }
            if let Some(s) = &b.scaling {
                let _ = writeln!(
                    out,
                    "  scaling c={}: {} records {:.0} op/s, {} records {:.0} op/s, ratio {:.2}; raw {:.0} -> {:.0} op/s, ratio {:.2} (bulk load {:.1} s)",
                    s.concurrency,
                    s.small_records,
                    s.small.ops_per_sec,
                    s.large_records,
                    s.large.ops_per_sec,
                    s.ratio,
                    s.raw_small.ops_per_sec,
                    s.raw_large.ops_per_sec,
                    s.raw_ratio,
                    s.load_seconds
                );
            }
            if let Some(p) = &b.purge {
                if p.native_expiry {
                    let _ = writeln!(out, "  purge: not needed (native expiry)");
                } else {
                    let _ = writeln!(
                        out,
                        "  purge: {} of {} expired records removed in {:.2} s = {:.0} rows/s (batch {})",
                        p.removed, p.records, p.seconds, p.rows_per_sec, p.batch
                    );
                }
            }
            if let Some(m) = &b.memory {
                let _ = writeln!(
                    out,
                    "  memory: {:.0} B per record beyond the {} B outcome (raw floor {:.0} B, so idem adds {:.0} B); {}",
                    m.idem_overhead_bytes,
                    m.outcome_bytes,
                    m.raw_overhead_bytes,
                    m.idem_minus_raw_bytes,
                    m.method
                );
            }
            if let Some(c) = &b.finished_cache {
                let _ = writeln!(
                    out,
                    "  finished-record cache: {} hits, {} misses; {} entries, {} of {} bytes",
                    c.hits, c.misses, c.entries, c.bytes, c.max_bytes
                );
            }
            for n in &b.notes {
                let _ = writeln!(out, "  note: {n}");
            }
            for e in &b.errors {
                let _ = writeln!(out, "  ERROR: {e}");
            }
        }
        if let Some(http) = &self.http {
            http_table(&mut out, http);
        }
        if !self.targets.is_empty() {
            let _ = writeln!(out, "\ntargets");
            for t in &self.targets {
                let range = match (t.min, t.max) {
                    (Some(lo), Some(hi)) => format!(" ({lo:.2}–{hi:.2})"),
                    _ => String::new(),
                };
                let _ = writeln!(
                    out,
                    "  [{}] {:<52} {:>10.2}{range} (target {})",
                    if t.met { "met " } else { "MISS" },
                    t.name,
                    t.value,
                    t.target
                );
            }
        }
        out
    }
}

/// The HTTP measurement's part of the table: per store, workload and
/// concurrency, the layered server against the bare endpoint.
fn http_table(out: &mut String, http: &HttpReport) {
    let _ = writeln!(
        out,
        "\n== http: idem-tower on axum vs the bare endpoint (loopback, keep-alive client, {} B request; ratio = with ÷ without) ==",
        http.request_bytes
    );
    for store in &http.stores {
        for (what, rows) in [
            ("fresh (new key)", &store.fresh),
            ("replay (stored answer)", &store.replay),
        ] {
            if rows.is_empty() {
                continue;
            }
            let _ = writeln!(
                out,
                "  {:<30} {:>4} {:>10} {:>10} {:>18} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
                format!("{} {what}", store.name),
                "c",
                "with op/s",
                "w/o op/s",
                "ratio (min–max)",
                "with p50",
                "w/o p50",
                "with p99",
                "w/o p99",
                "with cpu",
                "w/o cpu"
            );
            for r in rows {
                compared_line(out, r, (30, 8), ("with", "without"));
            }
        }
        let _ = writeln!(
            out,
            "  {}: handler runs behind the layer: {} during fresh (one per request), {} during replay",
            store.name, store.fresh_handler_runs, store.replay_handler_runs
        );
        for e in &store.errors {
            let _ = writeln!(out, "  ERROR ({}): {e}", store.name);
        }
    }
    for n in &http.notes {
        let _ = writeln!(out, "  note: {n}");
    }
    for e in &http.errors {
        let _ = writeln!(out, "  ERROR: {e}");
    }
}
