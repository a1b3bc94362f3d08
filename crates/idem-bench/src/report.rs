//! The results: a serde structure written as JSON, and the printed table.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::core_bench::CoreReport;
use crate::harness::Stats;

/// Everything one run measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    /// Version of this JSON layout.
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
    /// `memory`, `sqlite`, `postgres`, `redis`, `redis-cluster`.
    pub name: String,
    /// Measured or skipped.
    pub status: Status,
    /// Why it was skipped.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
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
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Compared {
    /// Concurrent tasks.
    pub concurrency: usize,
    /// Through the engine and the store (medians over repetitions).
    pub idem: Stats,
    /// The raw commands (medians over repetitions).
    pub raw: Stats,
    /// `idem.ops_per_sec / raw.ops_per_sec`.
    pub ratio: f64,
    /// ops/s of each idem repetition.
    pub idem_reps: Vec<f64>,
    /// ops/s of each raw repetition.
    pub raw_reps: Vec<f64>,
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
    /// The measured figure.
    pub value: f64,
    /// Whether the target was met in this run.
    pub met: bool,
}

/// "client+server" CPU µs per operation, or "-".
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
            let floor = match b.name.as_str() {
                "redis" | "redis-cluster" | "postgres" | "postgres-read-first" => Some(0.85),
                "sqlite" => Some(0.80),
                _ => None,
            };
            if let Some(floor) = floor {
                for (what, rows) in [("fresh", &b.fresh), ("replay", &b.replay)] {
                    for row in rows {
                        checks.push(TargetCheck {
                            name: format!("{} {what} c={} idem/raw", b.name, row.concurrency),
                            target: format!(">= {floor:.2}"),
                            value: row.ratio,
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
                    met: s.ratio >= 0.90,
                });
            }
            if b.name == "redis"
                && let Some(m) = &b.memory
            {
                checks.push(TargetCheck {
                    name: "redis bytes per record beyond the outcome".into(),
                    target: "<= 200".into(),
                    value: m.idem_overhead_bytes,
                    met: m.idem_overhead_bytes <= 200.0,
                });
            }
        }
        if let Some(core) = &self.core {
            checks.push(TargetCheck {
                name: "core path ns/op (1 KiB request and outcome)".into(),
                target: "<= 3000".into(),
                value: core.total_ns,
                met: core.total_ns <= 3000.0,
            });
        }
        self.targets = checks;
    }

    /// The report as a human-readable table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "idem benchmarks ({} mode, {} cores, {} runtime threads, {:.0} s; outcome {} B; medians of {} repetitions of {:.2} s)",
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
            let _ = writeln!(out, "\n== {} ==", b.name);
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
                    "  {what:<24} {:>4} {:>10} {:>10} {:>6} {:>8} {:>8} {:>8} {:>8} {:>13} {:>13}",
                    "c",
                    "idem op/s",
                    "raw op/s",
                    "ratio",
                    "idem p50",
                    "raw p50",
                    "idem p99",
                    "raw p99",
                    "idem cpu c+s",
                    "raw cpu c+s"
                );
                for r in rows {
                    let _ = writeln!(
                        out,
                        "  {:<24} {:>4} {:>10.0} {:>10.0} {:>6.2} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>13} {:>13}{}",
                        "",
                        r.concurrency,
                        r.idem.ops_per_sec,
                        r.raw.ops_per_sec,
                        r.ratio,
                        r.idem.p50_us,
                        r.raw.p50_us,
                        r.idem.p99_us,
                        r.raw.p99_us,
                        cpu(&r.idem),
                        cpu(&r.raw),
                        if r.idem.errors + r.raw.errors > 0 {
                            format!("  ERRORS idem {} raw {}", r.idem.errors, r.raw.errors)
                        } else {
                            String::new()
                        }
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
            for n in &b.notes {
                let _ = writeln!(out, "  note: {n}");
            }
            for e in &b.errors {
                let _ = writeln!(out, "  ERROR: {e}");
            }
        }
        if !self.targets.is_empty() {
            let _ = writeln!(out, "\ntargets");
            for t in &self.targets {
                let _ = writeln!(
                    out,
                    "  [{}] {:<52} {:>10.2} (target {})",
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
