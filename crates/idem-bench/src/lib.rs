//! # idem-bench
//!
//! The benchmarks of idem: every backend measured side by side against the
//! raw store commands that bound any idempotency layer (one atomic write to
//! claim a key, one to store the outcome, one read to replay), issued by the
//! same driver, pool and process in the same run. Run it with
//! `cargo xtask bench [--quick]`; docs/benchmarks.md explains every figure.
//!
//! The library is the harness: [`harness::run_concurrent`] runs N tokio tasks
//! for a fixed duration or operation count with a latency histogram; [`run`]
//! runs every workload for the backends of a [`Config`] and returns a
//! [`Report`] (JSON-serializable, with a printable table). The HTTP
//! measurement ([`http_bench`]) puts the same stores behind `idem-tower` on
//! an axum server and compares it with the bare endpoint.
//!
//! ```no_run
//! # #[tokio::main] async fn main() {
//! use idem_bench::{BackendKind, Config, Mode};
//! let config = Config::new(Mode::Tiny).with_backends(vec![BackendKind::Memory.into()]);
//! let report = idem_bench::run(&config).await;
//! println!("{}", report.table());
//! # }
//! ```
#![forbid(unsafe_code)]

pub mod backend;
mod backends;
pub mod core_bench;
mod cpu;
pub mod harness;
pub mod http_bench;
pub mod report;
mod scenario;

use std::time::{Duration, Instant};

pub use harness::{Budget, Stats};
pub use idem_testkit::BackendKind;
pub use report::Report;

/// Why a measurement could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BenchError {
    /// The backend's server could not be reached: the backend is skipped.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// A measurement failed.
    #[error("{0}")]
    Failed(String),
}

/// How long and how large the run is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A few operations of everything: the self-test of the harness (seconds, in debug builds).
    Tiny,
    /// Every figure, shorter and smaller (under 2 minutes).
    Quick,
    /// The figures quoted in docs/benchmarks.md (under about 10 minutes).
    Full,
}

impl Mode {
    /// The mode's name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Self::Tiny => "tiny",
            Self::Quick => "quick",
            Self::Full => "full",
        }
    }
}

/// What a run measures: a store backend ([`BackendKind`], with the servers
/// the environment names), or a variant of one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// The backend with the store's defaults: memory, sqlite (a temporary
    /// file), postgres (a schema of its own; the store's default claim
    /// mode), redis and redis-cluster (a key prefix of its own).
    Backend(BackendKind),
    /// `idem-postgres` in [`ClaimMode::ReadFirst`](idem_postgres::ClaimMode::ReadFirst)
    /// (fresh, replay and hot key only: the rest does not depend on the mode).
    PostgresReadFirst,
    /// `idem-postgres` in
    /// [`ClaimMode::SingleStatement`](idem_postgres::ClaimMode::SingleStatement),
    /// the default of earlier releases (fresh, replay and hot key only).
    PostgresSingleStatement,
    /// `idem-redis` on the Valkey server at `IDEM_VALKEY_URL` (Valkey ≥ 8.1
    /// has native conditional writes); skipped when the variable is unset
    /// or the server cannot be reached.
    Valkey,
    /// The backend with the engine's finished-record cache
    /// ([`Engine::with_finished_cache`](idem_core::Engine::with_finished_cache),
    /// [`FINISHED_CACHE_BYTES`]): fresh, replay and hot key only. The raw
    /// side is the backend's raw commands, so a replay compares a cache hit
    /// with the raw store read.
    Cached(Cacheable),
}

/// The backends measured with the engine's finished-record cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cacheable {
    /// `sqlite+cache`.
    Sqlite,
    /// `postgres+cache` (default claim mode).
    Postgres,
    /// `redis+cache` (the server at `IDEM_REDIS_URL`).
    Redis,
}

impl Cacheable {
    /// The backend under the cache.
    pub fn kind(self) -> BackendKind {
        match self {
            Self::Sqlite => BackendKind::Sqlite,
            Self::Postgres => BackendKind::Postgres,
            Self::Redis => BackendKind::Redis,
        }
    }
}

/// The byte budget of the finished-record cache in the `+cache` targets:
/// room for every record the replay workload cycles through (10,000 records
/// of about 1.1 KiB in a full run).
pub const FINISHED_CACHE_BYTES: usize = 64 << 20;

impl From<BackendKind> for Target {
    fn from(kind: BackendKind) -> Self {
        Self::Backend(kind)
    }
}

impl Target {
    /// Every target, in report order: each backend followed by its variants
    /// (`sqlite+cache`; `postgres-read-first`, `postgres-single-statement`,
    /// `postgres+cache`; `redis+cache`, then `valkey`), `redis-cluster` last.
    pub fn all() -> Vec<Self> {
        let mut all = Vec::with_capacity(BackendKind::ALL.len() + 6);
        for kind in BackendKind::ALL {
            all.push(Self::Backend(kind));
            match kind {
                BackendKind::Sqlite => all.push(Self::Cached(Cacheable::Sqlite)),
                BackendKind::Postgres => {
                    all.push(Self::PostgresReadFirst);
                    all.push(Self::PostgresSingleStatement);
                    all.push(Self::Cached(Cacheable::Postgres));
                }
                BackendKind::Redis => {
                    all.push(Self::Cached(Cacheable::Redis));
                    all.push(Self::Valkey);
                }
                _ => {}
            }
        }
        all
    }

    /// The backend measured (the store type: `valkey` is
    /// [`BackendKind::Redis`] on another server).
    pub fn kind(self) -> BackendKind {
        match self {
            Self::Backend(kind) => kind,
            Self::PostgresReadFirst | Self::PostgresSingleStatement => BackendKind::Postgres,
            Self::Valkey => BackendKind::Redis,
            Self::Cached(c) => c.kind(),
        }
    }

    /// The name in the report (`memory`, `sqlite`, `sqlite+cache`,
    /// `postgres`, `postgres-read-first`, `postgres-single-statement`,
    /// `postgres+cache`, `redis`, `redis+cache`, `valkey`, `redis-cluster`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Backend(kind) => kind.name(),
            Self::PostgresReadFirst => "postgres-read-first",
            Self::PostgresSingleStatement => "postgres-single-statement",
            Self::Valkey => "valkey",
            Self::Cached(Cacheable::Sqlite) => "sqlite+cache",
            Self::Cached(Cacheable::Postgres) => "postgres+cache",
            Self::Cached(Cacheable::Redis) => "redis+cache",
        }
    }

    /// Whether this is a variant of a backend (another store setting or
    /// engine option), measured on fresh, replay and hot key only.
    pub fn is_variant(self) -> bool {
        matches!(
            self,
            Self::PostgresReadFirst | Self::PostgresSingleStatement | Self::Cached(_)
        )
    }

    /// The targets a run of `mode` measures unless told otherwise: every
    /// one in a full run; without the variants ([`is_variant`](Self::is_variant))
    /// in the quick and tiny runs, which check that nothing broke (the
    /// variants' code paths are the conformance suite's).
    pub fn defaults(mode: Mode) -> Vec<Self> {
        Self::all()
            .into_iter()
            .filter(|t| mode == Mode::Full || !t.is_variant())
            .collect()
    }

    /// The target named `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::all().into_iter().find(|t| t.name() == name.trim())
    }
}

/// A part of a backend's measurements, to narrow a run (for profiling).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Workload {
    /// Begin + complete on distinct keys.
    Fresh,
    /// Begin on completed keys.
    Replay,
    /// Concurrent duplicates of one key.
    HotKey,
    /// Raw baselines with another connection model.
    Architecture,
    /// Few vs many live records.
    Scaling,
    /// Removal of expired records.
    Purge,
    /// Bytes per record.
    Memory,
}

impl Workload {
    /// Every workload, in run order.
    pub const ALL: [Self; 7] = [
        Self::Fresh,
        Self::Replay,
        Self::HotKey,
        Self::Architecture,
        Self::Scaling,
        Self::Purge,
        Self::Memory,
    ];

    /// The workload's name (`fresh`, `replay`, `hot-key`, `architecture`,
    /// `scaling`, `purge`, `memory`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Fresh => "fresh",
            Self::Replay => "replay",
            Self::HotKey => "hot-key",
            Self::Architecture => "architecture",
            Self::Scaling => "scaling",
            Self::Purge => "purge",
            Self::Memory => "memory",
        }
    }

    /// The workload named `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|w| w.name() == name.trim())
    }
}

/// The parameters of a run, derived from its [`Mode`].
#[derive(Clone, Debug)]
pub struct Plan {
    /// One measurement.
    pub budget: Budget,
    /// Warm-up before each workload.
    pub warmup: Budget,
    /// Repetitions of each measurement (`--repeat`: 3 in a full run, 1 in
    /// the quick and tiny ones). Each is a pair, raw and idem, whose order
    /// alternates (raw first, then idem first, …); the report keeps the
    /// median, minimum and maximum of the pairs' ratios.
    pub reps: usize,
    /// Concurrency levels of fresh and replay.
    pub concurrencies: Vec<usize>,
    /// Concurrency levels of fresh and replay on Redis.
    pub redis_concurrencies: Vec<usize>,
    /// Outcome and request body size.
    pub outcome_bytes: usize,
    /// Completed keys the replay workload cycles through.
    pub replay_keys: u64,
    /// Duplicates per hot-key round.
    pub hot_tasks: usize,
    /// Hot-key rounds.
    pub hot_rounds: u64,
    /// Live records of the scaling workload: small, large.
    pub scaling_records: (u64, u64),
    /// Concurrency of the scaling workload.
    pub scaling_concurrency: usize,
    /// Expired records for the purge workload.
    pub purge_records: u64,
    /// `limit` per purge call.
    pub purge_batch: usize,
    /// Records written for the bytes-per-record figure.
    pub memory_records: u64,
    /// Iterations per sample of the core micro-benchmark.
    pub core_iterations: u64,
    /// Samples of the core micro-benchmark.
    pub core_samples: usize,
    /// The workloads to run (all by default).
    pub workloads: Vec<Workload>,
    /// Which side fresh and replay measure (both by default; one side alone
    /// for profiling it).
    pub sides: Sides,
}

/// Which sides of a comparison run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sides {
    /// idem and the raw baseline, alternating.
    Both,
    /// Only through idem (the raw figures are left at zero).
    Idem,
    /// Only the raw baseline (the idem figures are left at zero).
    Raw,
}

impl Plan {
    /// Whether `workload` is part of the run.
    pub fn runs(&self, workload: Workload) -> bool {
        self.workloads.contains(&workload)
    }

    /// The plan of `mode`.
    pub fn of(mode: Mode) -> Self {
        let secs = |s: f64| Budget::time(Duration::from_secs_f64(s));
        let quick = Self {
            budget: secs(0.2),
            warmup: secs(0.1),
            reps: 1,
            concurrencies: vec![1, 8, 32],
            redis_concurrencies: vec![1, 8, 32, 128],
            outcome_bytes: 1024,
            replay_keys: 1_000,
            hot_tasks: 64,
            hot_rounds: 20,
            scaling_records: (10_000, 100_000),
            scaling_concurrency: 8,
            purge_records: 10_000,
            purge_batch: 1_000,
            memory_records: 1_000,
            core_iterations: 20_000,
            core_samples: 5,
            workloads: Workload::ALL.to_vec(),
            sides: Sides::Both,
        };
        match mode {
            Mode::Tiny => Self {
                budget: secs(10.0).with_max_ops(24),
                warmup: secs(10.0).with_max_ops(8),
                reps: 1,
                concurrencies: vec![1, 4],
                redis_concurrencies: vec![1, 4],
                replay_keys: 16,
                hot_rounds: 3,
                scaling_records: (40, 200),
                scaling_concurrency: 4,
                purge_records: 300,
                purge_batch: 100,
                memory_records: 50,
                core_iterations: 200,
                core_samples: 1,
                ..quick
            },
            Mode::Quick => quick,
            Mode::Full => Self {
                budget: secs(1.0),
                warmup: secs(0.3),
                reps: 3,
                replay_keys: 10_000,
                hot_rounds: 100,
                scaling_records: (10_000, 1_000_000),
                purge_records: 100_000,
                memory_records: 10_000,
                core_iterations: 200_000,
                core_samples: 7,
                ..quick
            },
        }
    }
}

/// What to run. The servers are the environment's (see
/// [`idem_testkit::env`]: `IDEM_POSTGRES_URL`, `IDEM_REDIS_URL`,
/// `IDEM_REDIS_CLUSTER_URLS`, or the local defaults).
#[derive(Clone, Debug)]
pub struct Config {
    /// The run's size.
    pub mode: Mode,
    /// Its parameters (from the mode unless changed).
    pub plan: Plan,
    /// The backends to measure, in order.
    pub backends: Vec<Target>,
    /// Whether to run the core micro-benchmark.
    pub core: bool,
    /// Whether to run the HTTP measurement ([`http_bench`]) over the
    /// backends of [`http_bench::HTTP_TARGETS`] that `backends` names.
    pub http: bool,
}

impl Config {
    /// Every default target ([`Target::defaults`]), the core benchmark and
    /// the HTTP measurement in `mode`.
    pub fn new(mode: Mode) -> Self {
        Self {
            mode,
            plan: Plan::of(mode),
            backends: Target::defaults(mode),
            core: true,
            http: true,
        }
    }

    /// The targets the HTTP measurement puts under the layer: those of
    /// [`http_bench::HTTP_TARGETS`] that [`backends`](Self::backends)
    /// names, in that order (none without [`http`](Self::http)).
    pub fn http_targets(&self) -> Vec<Target> {
        http_bench::HTTP_TARGETS
            .into_iter()
            .filter(|t| self.http && self.backends.contains(t))
            .collect()
    }

    /// The same configuration measuring only `backends`.
    #[must_use]
    pub fn with_backends(mut self, backends: Vec<Target>) -> Self {
        self.backends = backends;
        self
    }

    /// The same configuration running only `workloads` (for profiling).
    #[must_use]
    pub fn with_workloads(mut self, workloads: Vec<Workload>) -> Self {
        self.plan.workloads = workloads;
        self
    }

    /// The same configuration with other concurrency levels for fresh and
    /// replay (on every backend, Redis included).
    #[must_use]
    pub fn with_concurrencies(mut self, levels: Vec<usize>) -> Self {
        self.plan.concurrencies.clone_from(&levels);
        self.plan.redis_concurrencies = levels;
        self
    }

    /// The same configuration measuring only `sides` of fresh and replay.
    #[must_use]
    pub fn with_sides(mut self, sides: Sides) -> Self {
        self.plan.sides = sides;
        self
    }

    /// The same configuration with `seconds` per measurement.
    #[must_use]
    pub fn with_seconds(mut self, seconds: f64) -> Self {
        self.plan.budget.duration = Duration::from_secs_f64(seconds.max(0.001));
        self
    }

    /// The same configuration with `repeats` pairs (raw and idem) per
    /// measurement (at least 1).
    #[must_use]
    pub fn with_repeats(mut self, repeats: usize) -> Self {
        self.plan.reps = repeats.max(1);
        self
    }

    /// The same configuration with or without the core micro-benchmark.
    #[must_use]
    pub fn with_core(mut self, core: bool) -> Self {
        self.core = core;
        self
    }

    /// The same configuration with or without the HTTP measurement.
    #[must_use]
    pub fn with_http(mut self, http: bool) -> Self {
        self.http = http;
        self
    }
}

/// Runs the configured benchmarks and returns the report.
///
/// # Behavior
/// Backends run one after the other (never concurrently, so they do not
/// compete for the cores), then the HTTP measurement over those of them it
/// covers ([`Config::http_targets`]; with none, `http` stays `None`). A
/// backend that cannot be reached is reported with status `skipped` and its
/// reason; a measurement that fails is listed in its backend's (or HTTP
/// store's) `errors` and the others still run. Nothing here fails the run:
/// a benchmark is not a test.
pub async fn run(config: &Config) -> Report {
    let started = Instant::now();
    let plan = &config.plan;
    let mut report = Report {
        format: report::FORMAT,
        mode: config.mode.name().into(),
        started_at_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default(),
        machine: report::Machine {
            cores: std::thread::available_parallelism().map_or(1, usize::from),
            os: format!("{}/{}", std::env::consts::OS, std::env::consts::ARCH),
            runtime_threads: tokio::runtime::Handle::try_current()
                .map(|h| h.metrics().num_workers())
                .unwrap_or(1),
        },
        plan: report::PlanSummary {
            seconds_per_measurement: plan.budget.duration.as_secs_f64(),
            max_ops_per_measurement: plan.budget.max_ops,
            repetitions: plan.reps,
            outcome_bytes: plan.outcome_bytes,
            replay_keys: plan.replay_keys,
            hot_key_tasks: plan.hot_tasks,
            hot_key_rounds: plan.hot_rounds,
            scaling_records: plan.scaling_records,
            purge_records: plan.purge_records,
            memory_records: plan.memory_records,
        },
        ..Report::default()
    };
    if config.core {
        match core_bench::run(plan.core_iterations, plan.core_samples, plan.outcome_bytes) {
            Ok(core) => report.core = Some(core),
            Err(e) => eprintln!("idem-bench: core: {e}"),
        }
    }
    for &target in &config.backends {
        eprintln!("idem-bench: {} ...", target.name());
        let t = Instant::now();
        let backend = backends::make(target);
        let r = scenario::bench_backend(backend.as_ref(), plan).await;
        eprintln!(
            "idem-bench: {} {} in {:.1} s",
            target.name(),
            match r.status {
                report::Status::Ok => "done",
                report::Status::Skipped => "skipped",
            },
            t.elapsed().as_secs_f64()
        );
        report.backends.push(r);
    }
    let http_targets = config.http_targets();
    if !http_targets.is_empty() {
        eprintln!("idem-bench: http ...");
        let t = Instant::now();
        report.http = Some(http_bench::run(plan, &http_targets).await);
        eprintln!(
            "idem-bench: http done in {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }
    report.total_seconds = started.elapsed().as_secs_f64();
    report.check_targets();
    report
}

#[cfg(test)]
mod tests {
    use super::{BackendKind, Cacheable, Mode, Plan, Target};

    #[test]
    fn variants_run_by_default_only_in_full_runs() {
        assert_eq!(Target::defaults(Mode::Full), Target::all());
        assert_eq!(Target::all().len(), BackendKind::ALL.len() + 6);
        for mode in [Mode::Quick, Mode::Tiny] {
            let defaults = Target::defaults(mode);
            assert!(!defaults.contains(&Target::PostgresReadFirst));
            assert!(!defaults.iter().any(|t| matches!(t, Target::Cached(_))));
            assert!(
                defaults.contains(&Target::Valkey),
                "valkey is a server, not a variant"
            );
            assert_eq!(defaults.len(), BackendKind::ALL.len() + 1);
        }
        assert_eq!(
            Target::parse("postgres-read-first"),
            Some(Target::PostgresReadFirst)
        );
        assert_eq!(
            Target::parse("redis+cache"),
            Some(Target::Cached(Cacheable::Redis))
        );
        let names: Vec<&str> = Target::all().into_iter().map(Target::name).collect();
        assert_eq!(
            names,
            [
                "memory",
                "sqlite",
                "sqlite+cache",
                "postgres",
                "postgres-read-first",
                "postgres-single-statement",
                "postgres+cache",
                "redis",
                "redis+cache",
                "valkey",
                "redis-cluster"
            ]
        );
        for target in Target::all() {
            assert_eq!(Target::parse(target.name()), Some(target));
        }
        assert_eq!(Target::Valkey.kind(), BackendKind::Redis);
        assert_eq!(
            Target::Cached(Cacheable::Sqlite).kind(),
            BackendKind::Sqlite
        );
    }

    #[test]
    fn http_runs_over_the_named_memory_and_sqlite_targets() {
        let all = super::Config::new(Mode::Quick);
        assert_eq!(
            all.http_targets(),
            [
                Target::Backend(BackendKind::Memory),
                Target::Backend(BackendKind::Sqlite)
            ]
        );
        let sqlite = all.clone().with_backends(vec![
            Target::Backend(BackendKind::Sqlite),
            Target::Cached(Cacheable::Sqlite),
        ]);
        assert_eq!(
            sqlite.http_targets(),
            [Target::Backend(BackendKind::Sqlite)]
        );
        let redis = all.clone().with_backends(vec![BackendKind::Redis.into()]);
        assert!(redis.http_targets().is_empty());
        assert!(all.with_http(false).http_targets().is_empty());
    }

    #[test]
    fn repeats_default_to_three_in_full_runs_and_one_otherwise() {
        assert_eq!(Plan::of(Mode::Full).reps, 3);
        assert_eq!(Plan::of(Mode::Quick).reps, 1);
        assert_eq!(Plan::of(Mode::Tiny).reps, 1);
        let config = super::Config::new(Mode::Quick).with_repeats(0);
        assert_eq!(config.plan.reps, 1);
    }
}
