//! One soak run: the reliability suite's HTTP service
//! ([`idem_reliability::http`]: axum behind the `idem-tower` layer over a
//! store, on a loopback port), driven by many concurrent clients in the same process,
//! with the process's resident memory sampled every second and the store's
//! record count taken at the end.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::join_all;
use idem_core::store::Store;
use idem_core::{Clock, Engine, Policy};
use idem_reliability::http::{self, Service};
use idem_testkit::chain;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::SoakError;
use crate::backend::Opened;
use crate::rss;

/// Tenants the clients spread over (the scope is the bearer token).
const TENANTS: u64 = 8;
/// Requests sent at once with one new key in a "race".
const RACE_WIDTH: usize = 4;
/// Completed keys each client remembers for replays and mismatches.
const RECENT: usize = 32;
/// Pause between retries of a 409 (the original is still running).
const CONFLICT_PAUSE: Duration = Duration::from_millis(2);
/// A key still answered 409 after this long is stuck: an error.
const STUCK_AFTER: Duration = Duration::from_secs(30);
/// Unexpected answers quoted in the report.
const SAMPLES: usize = 10;

/// What one run does.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    /// How long the clients send requests.
    pub(crate) duration: Duration,
    /// Concurrent clients.
    pub(crate) clients: usize,
    /// The engine's TTL: finished records expire (and are purged) after it,
    /// so the stores' size, and the memory store's share of the process's
    /// memory, reach a steady state.
    pub(crate) ttl: Duration,
    /// From the start to the RSS reference sample.
    pub(crate) warmup: Duration,
    /// Only keys finished less than this long ago are replayed or reused
    /// with another body (they must still be live: a quarter of the TTL).
    pub(crate) replay_window: Duration,
}

impl Plan {
    /// The plan for a run of `secs` seconds with `clients` clients, whose
    /// TTL may not exceed `max_ttl`.
    ///
    /// # Behavior
    /// TTL: a fifth of the run, between 2 s and `max_ttl` (at least 2 s).
    /// Warm-up: the TTL plus 3 s (the first records have expired and been
    /// purged, so the store is at its steady size), at most half of the run.
    pub(crate) fn new(secs: u64, clients: usize, max_ttl: Duration) -> Self {
        let duration = Duration::from_secs(secs.max(2));
        let ttl = (duration / 5).clamp(Duration::from_secs(2), max_ttl.max(Duration::from_secs(2)));
        let warmup = (ttl + Duration::from_secs(3)).min(duration / 2);
        Self {
            duration,
            clients: clients.max(1),
            ttl,
            warmup,
            replay_window: ttl / 4,
        }
    }
}

/// What one run measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Measured {
    /// Seconds the clients sent requests.
    pub(crate) secs: f64,
    /// HTTP requests sent (retries included).
    pub(crate) requests: u64,
    /// 201, first execution.
    pub(crate) fresh: u64,
    /// 201 with `Idempotent-Replayed: true`, the original's body.
    pub(crate) replayed: u64,
    /// 409: a duplicate while the original ran (retried until final).
    pub(crate) conflicts: u64,
    /// 422: a key reused with another body.
    pub(crate) mismatches: u64,
    /// 400: an invalid key.
    pub(crate) invalid: u64,
    /// Anything else: other statuses, transport errors, wrong bodies, keys
    /// stuck in flight, a replay that differs from the original.
    pub(crate) unexpected: u64,
    /// The first few unexpected answers, quoted.
    pub(crate) unexpected_samples: Vec<String>,
    /// Distinct keys that must run exactly once (fresh and raced keys).
    pub(crate) keys: u64,
    /// Times the handler ran.
    pub(crate) executions: u64,
    /// Keys that got more than one first-execution answer.
    pub(crate) double_executions: u64,
    /// Keys that got no first-execution answer at all.
    pub(crate) lost: u64,
    /// Expired records the purger removed (0 for Redis: it expires keys itself).
    pub(crate) purged: u64,
    /// RSS when the run started, bytes.
    pub(crate) rss_start: u64,
    /// RSS at the end of the warm-up, bytes.
    pub(crate) rss_warm: u64,
    /// The plateau: the highest RSS sampled in the first half of the
    /// measured period (from the end of the warm-up to halfway to the end),
    /// bytes. The reference of the growth check: the store's size follows
    /// the request rate, which varies on a shared machine, and a hash table
    /// grows by doubling, so the RSS may still step up once after the
    /// warm-up; what must not happen is growth in the second half.
    pub(crate) rss_plateau: u64,
    /// RSS after the last request, bytes.
    pub(crate) rss_end: u64,
    /// Highest RSS sampled after the warm-up, bytes.
    pub(crate) rss_peak: u64,
    /// Every sample: seconds since the start, RSS bytes.
    pub(crate) rss_samples: Vec<(f64, u64)>,
    /// Records the store held right after the last request (expired ones
    /// not yet removed included).
    pub(crate) records_end: u64,
    /// The most it may hold: the keys created in the last
    /// `records_window_secs` of the run. More means records outlive their
    /// expiry: the store grows without bound.
    pub(crate) records_bound: u64,
    /// TTL + the store's expiry lag + 1 s, seconds.
    pub(crate) records_window_secs: f64,
}

/// Counters the clients share.
#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    fresh: AtomicU64,
    replayed: AtomicU64,
    conflicts: AtomicU64,
    mismatches: AtomicU64,
    invalid: AtomicU64,
    unexpected: AtomicU64,
    keys: AtomicU64,
    double: AtomicU64,
    lost: AtomicU64,
    samples: Mutex<Vec<String>>,
}

impl Counters {
    fn unexpected(&self, what: String) {
        self.unexpected.fetch_add(1, Ordering::Relaxed);
        let mut samples = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        if samples.len() < SAMPLES {
            samples.push(what);
        }
    }
}

/// xorshift64: cheap, deterministic per client, good enough to pick actions.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A key that finished, for replays and mismatches.
struct Done {
    key: String,
    tenant: u64,
    amount: u64,
    body: Bytes,
    at: Instant,
}

impl Done {
    fn new(key: String, tenant: u64, amount: u64, body: Bytes) -> Self {
        let at = Instant::now();
        Self {
            key,
            tenant,
            amount,
            body,
            at,
        }
    }
}

/// One answer.
struct Answer {
    status: u16,
    replayed: bool,
    body: Bytes,
}

struct Client {
    server: Arc<http::Server>,
    counters: Arc<Counters>,
}

fn payment(amount: u64) -> String {
    format!(r#"{{"amount":{amount},"currency":"EUR"}}"#)
}

impl Client {
    async fn send(&self, key: &str, tenant: u64, body: String) -> Result<Answer, String> {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let response = self
            .server
            .charge_request(&format!("tenant-{tenant}"), Some(key), &body)
            .header("content-type", "application/json")
            .send()
            .await
            .map_err(|e| format!("transport: {}", chain(&e)))?;
        let status = response.status().as_u16();
        let replayed = response
            .headers()
            .get("idempotent-replayed")
            .is_some_and(|v| v.as_bytes() == b"true");
        let body = response
            .bytes()
            .await
            .map_err(|e| format!("reading the body: {}", chain(&e)))?;
        Ok(Answer {
            status,
            replayed,
            body,
        })
    }

    /// Sends until the answer is final (not 409); `None` after an error
    /// (already counted).
    async fn until_final(&self, key: &str, tenant: u64, amount: u64) -> Option<Answer> {
        let started = Instant::now();
        loop {
            match self.send(key, tenant, payment(amount)).await {
                Ok(a) if a.status == 409 => {
                    self.counters.conflicts.fetch_add(1, Ordering::Relaxed);
                    if started.elapsed() > STUCK_AFTER {
                        self.counters
                            .unexpected(format!("key {key} still in flight after {STUCK_AFTER:?}"));
                        return None;
                    }
                    tokio::time::sleep(CONFLICT_PAUSE).await;
                }
                Ok(a) => return Some(a),
                Err(e) => {
                    self.counters.unexpected(format!("key {key}: {e}"));
                    return None;
                }
            }
        }
    }

    /// A new key, sent once: must run, once.
    async fn fresh(&self, key: String, tenant: u64, amount: u64) -> Option<Done> {
        self.counters.keys.fetch_add(1, Ordering::Relaxed);
        let answer = self.until_final(&key, tenant, amount).await;
        let Some(a) = answer else {
            self.counters.lost.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        if a.status == 201 && !a.replayed {
            self.counters.fresh.fetch_add(1, Ordering::Relaxed);
            Some(Done::new(key, tenant, amount, a.body))
        } else {
            self.counters.lost.fetch_add(1, Ordering::Relaxed);
            self.counters.unexpected(format!(
                "fresh key {key}: {} replayed={} {}",
                a.status,
                a.replayed,
                quote(&a.body)
            ));
            None
        }
    }

    /// A new key sent `RACE_WIDTH` times at once: exactly one runs, the
    /// others get 409 (retried) or the replay, all with the same body.
    async fn race(&self, key: String, tenant: u64, amount: u64) -> Option<Done> {
        self.counters.keys.fetch_add(1, Ordering::Relaxed);
        let answers =
            join_all((0..RACE_WIDTH).map(|_| self.until_final(&key, tenant, amount))).await;
        let mut fresh = 0u64;
        let mut first: Option<Bytes> = None;
        let mut ok = true;
        for a in answers.into_iter().flatten() {
            if a.status != 201 {
                ok = false;
                self.counters.unexpected(format!(
                    "raced key {key}: {} {}",
                    a.status,
                    quote(&a.body)
                ));
                continue;
            }
            if a.replayed {
                self.counters.replayed.fetch_add(1, Ordering::Relaxed);
            } else {
                fresh += 1;
                self.counters.fresh.fetch_add(1, Ordering::Relaxed);
            }
            match &first {
                None => first = Some(a.body),
                Some(body) if *body != a.body => {
                    ok = false;
                    self.counters.unexpected(format!(
                        "raced key {key}: two different bodies {} / {}",
                        quote(body),
                        quote(&a.body)
                    ));
                }
                Some(_) => {}
            }
        }
        match fresh {
            0 => {
                self.counters.lost.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .unexpected(format!("raced key {key}: no request ran it"));
                None
            }
            1 if ok => first.map(|body| Done::new(key, tenant, amount, body)),
            1 => None,
            n => {
                self.counters.double.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .unexpected(format!("raced key {key}: ran {n} times"));
                None
            }
        }
    }

    /// Sends `key` with `amount` and counts the answer in `counter` if `ok`
    /// holds, else as unexpected (after `what`).
    async fn check(
        &self,
        what: String,
        (key, tenant, amount): (&str, u64, u64),
        counter: &AtomicU64,
        ok: impl Fn(&Answer) -> bool,
    ) {
        match self.send(key, tenant, payment(amount)).await {
            Ok(a) if ok(&a) => {
                counter.fetch_add(1, Ordering::Relaxed);
            }
            Ok(a) => self.counters.unexpected(format!(
                "{what}: {} replayed={} {}",
                a.status,
                a.replayed,
                quote(&a.body)
            )),
            Err(e) => self.counters.unexpected(format!("{what}: {e}")),
        }
    }

    /// A finished key again: the original's body, marked replayed.
    async fn replay(&self, done: &Done) {
        let what = format!("replay of {} (original {})", done.key, quote(&done.body));
        let sent = (done.key.as_str(), done.tenant, done.amount);
        self.check(what, sent, &self.counters.replayed, |a| {
            a.status == 201 && a.replayed && a.body == done.body
        })
        .await;
    }

    /// A finished key with another body: 422.
    async fn mismatch(&self, done: &Done) {
        let what = format!("mismatch on {}", done.key);
        let sent = (done.key.as_str(), done.tenant, done.amount.wrapping_add(1));
        self.check(what, sent, &self.counters.mismatches, |a| a.status == 422)
            .await;
    }

    /// A key with a space: 400, never stored.
    async fn invalid(&self, n: u64, tenant: u64) {
        let key = format!("bad key {n}");
        let what = "invalid key".to_string();
        self.check(what, (&key, tenant, 1), &self.counters.invalid, |a| {
            a.status == 400
        })
        .await;
    }
}

fn quote(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    text.chars().take(160).collect()
}

/// One client: a mix of actions until `deadline`.
///
/// | share | action |
/// |---|---|
/// | 40 % | a new key, once |
/// | 15 % | a new key, 4 requests at once |
/// | 25 % | a recent key again (replay) |
/// | 12 % | a recent key with another body (422) |
/// | 8 % | an invalid key (400) |
async fn client_loop(client: Client, id: u64, run: String, deadline: Instant, window: Duration) {
    let mut rng = Rng::new(id + 1);
    let mut recent: VecDeque<Done> = VecDeque::with_capacity(RECENT);
    let mut seq = 0u64;
    while Instant::now() < deadline {
        let roll = rng.below(100);
        let pick = if recent.is_empty() {
            None
        } else {
            let i = rng.below(recent.len() as u64) as usize;
            recent.get(i).filter(|d| d.at.elapsed() < window)
        };
        match (roll, pick) {
            (55..80, Some(done)) => client.replay(done).await,
            (80..92, Some(done)) => client.mismatch(done).await,
            (92.., _) => client.invalid(seq, rng.below(TENANTS)).await,
            _ => {
                seq += 1;
                let key = format!("{run}-{id}-{seq}");
                let tenant = rng.below(TENANTS);
                let amount = rng.below(1_000_000);
                let done = if !(40..55).contains(&roll) {
                    client.fresh(key, tenant, amount).await
                } else {
                    client.race(key, tenant, amount).await
                };
                if let Some(done) = done {
                    if recent.len() == RECENT {
                        recent.pop_front();
                    }
                    recent.push_back(done);
                }
            }
        }
    }
}

/// Purges expired records every second until `stop` fires.
async fn purge_loop<S: Store, C: Clock>(
    engine: Arc<Engine<S, C>>,
    purged: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
) {
    const BATCH: usize = 10_000;
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        loop {
            match engine
                .store()
                .purge_expired(engine.clock().now(), BATCH)
                .await
            {
                Ok(n) => {
                    purged.fetch_add(n, Ordering::Relaxed);
                    if n < BATCH as u64 {
                        break;
                    }
                }
                Err(e) => {
                    eprintln!("idem-soak: purge failed: {}", chain(&e));
                    break;
                }
            }
        }
    }
}

/// Samples the RSS, and the number of keys created so far, every second
/// until `stop` fires.
async fn sample_loop(
    started: Instant,
    samples: Arc<Mutex<Vec<(f64, u64)>>>,
    keys: Arc<Mutex<Vec<(f64, u64)>>>,
    counters: Arc<Counters>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        let at = started.elapsed().as_secs_f64();
        let created = counters.keys.load(Ordering::Relaxed);
        keys.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((at, created));
        let rss = rss::resident_bytes().unwrap_or(0);
        samples
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((at, rss));
    }
}

/// The highest RSS sampled from `warm` to halfway between `warm` and `end`
/// (seconds since the start); `rss_warm` if no sample falls there.
fn plateau(samples: &[(f64, u64)], warm: f64, end: f64, rss_warm: u64) -> u64 {
    let mid = warm + (end - warm) / 2.0;
    samples
        .iter()
        .filter(|(t, _)| *t >= warm && *t <= mid)
        .map(|(_, rss)| *rss)
        .chain([rss_warm])
        .max()
        .unwrap_or(rss_warm)
}

/// The keys created after `cutoff` seconds, at most: `total` minus the count
/// of the last sample taken at or before `cutoff` (0 if none).
fn created_since(key_samples: &[(f64, u64)], cutoff: f64, total: u64) -> u64 {
    let before = key_samples
        .iter()
        .take_while(|(t, _)| *t <= cutoff)
        .last()
        .map_or(0, |(_, n)| *n);
    total.saturating_sub(before)
}

/// Runs `plan` against the store of `opened`.
pub(crate) async fn run(opened: &Opened, plan: &Plan) -> Result<Measured, SoakError> {
    let store: Arc<dyn Store> = opened.store.clone();
    let rss_start = rss::resident_bytes()?;
    // A short TTL exercises expiry; the lease may not exceed it
    // (`Policy::validate`), and the heartbeat keeps slow requests held.
    let policy = Policy::default()
        .with_ttl(plan.ttl)
        .with_lease(plan.ttl.min(Policy::default().lease));
    let engine =
        Arc::new(
            Engine::new(store)
                .with_policy(policy)
                .map_err(|e| SoakError::Setup {
                    what: "building the engine".into(),
                    source: Box::new(e),
                })?,
        );
    // `POST /charge`, scope from `Authorization: Bearer <tenant>`; a key
    // is required (a request without one is refused, never run).
    let service = Service::new();
    let server = Arc::new(http::start(engine.clone(), &service).await);

    let (stop, stop_rx) = watch::channel(false);
    let purged = Arc::new(AtomicU64::new(0));
    let purger = tokio::spawn(purge_loop(engine.clone(), purged.clone(), stop_rx.clone()));
    let counters = Arc::new(Counters::default());
    let started = Instant::now();
    let samples = Arc::new(Mutex::new(Vec::new()));
    let key_samples = Arc::new(Mutex::new(Vec::new()));
    let sampler = tokio::spawn(sample_loop(
        started,
        samples.clone(),
        key_samples.clone(),
        counters.clone(),
        stop_rx,
    ));

    let run_tag = idem_testkit::run_id();
    let deadline = started + plan.duration;
    let clients: Vec<_> = (0..plan.clients as u64)
        .map(|id| {
            let client = Client {
                server: server.clone(),
                counters: counters.clone(),
            };
            tokio::spawn(client_loop(
                client,
                id,
                run_tag.to_string(),
                deadline,
                plan.replay_window,
            ))
        })
        .collect();
    for client in clients {
        if let Err(e) = client.await {
            counters.unexpected(format!("a client task failed: {e}"));
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let rss_end = rss::resident_bytes()?;
    // Counted while the purger still runs, as it ran during the soak.
    let records_end = opened.records().await;

    let _ = stop.send(true);
    let _ = purger.await;
    let _ = sampler.await;
    // The server stops when dropped.
    drop(server);

    let records_end = records_end?;
    let window = plan.ttl + opened.expiry_lag + Duration::from_secs(1);
    let key_samples =
        std::mem::take(&mut *key_samples.lock().unwrap_or_else(PoisonError::into_inner));
    let keys_total = counters.keys.load(Ordering::Relaxed);
    let records_bound = created_since(&key_samples, secs - window.as_secs_f64(), keys_total);
    let samples = std::mem::take(&mut *samples.lock().unwrap_or_else(PoisonError::into_inner));
    let warm_secs = plan.warmup.as_secs_f64();
    let rss_warm = samples
        .iter()
        .find(|(t, _)| *t >= warm_secs)
        .map_or(rss_end, |(_, rss)| *rss);
    let rss_plateau = plateau(&samples, warm_secs, secs, rss_warm);
    let rss_peak = samples
        .iter()
        .filter(|(t, _)| *t >= warm_secs)
        .map(|(_, rss)| *rss)
        .chain([rss_end])
        .max()
        .unwrap_or(rss_end);
    let c = &counters;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    Ok(Measured {
        secs,
        requests: load(&c.requests),
        fresh: load(&c.fresh),
        replayed: load(&c.replayed),
        conflicts: load(&c.conflicts),
        mismatches: load(&c.mismatches),
        invalid: load(&c.invalid),
        unexpected: load(&c.unexpected),
        unexpected_samples: std::mem::take(
            &mut *c.samples.lock().unwrap_or_else(PoisonError::into_inner),
        ),
        keys: load(&c.keys),
        executions: service.executions(),
        double_executions: load(&c.double),
        lost: load(&c.lost),
        purged: purged.load(Ordering::Relaxed),
        rss_start,
        rss_warm,
        rss_plateau,
        rss_end,
        rss_peak,
        rss_samples: samples,
        records_end,
        records_bound,
        records_window_secs: window.as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_scale_with_the_run() {
        let max = Duration::from_secs(30);
        let short = Plan::new(10, 64, max);
        assert_eq!(short.ttl, Duration::from_secs(2));
        assert_eq!(short.warmup, Duration::from_secs(5));
        assert_eq!(short.replay_window, Duration::from_millis(500));
        let long = Plan::new(120, 64, max);
        assert_eq!(long.ttl, Duration::from_secs(24));
        assert_eq!(long.warmup, Duration::from_secs(27));
        let huge = Plan::new(3600, 1, max);
        assert_eq!(huge.ttl, Duration::from_secs(30));
        assert_eq!(huge.warmup, Duration::from_secs(33));
        // The memory store's cap.
        let capped = Plan::new(120, 64, Duration::from_secs(5));
        assert_eq!(capped.ttl, Duration::from_secs(5));
        assert_eq!(capped.warmup, Duration::from_secs(8));
        assert_eq!(
            Plan::new(120, 64, Duration::ZERO).ttl,
            Duration::from_secs(2)
        );
        // The replay window stays well inside the TTL.
        for secs in [2, 10, 60, 120, 3600] {
            for max in [Duration::from_secs(5), max] {
                let p = Plan::new(secs, 1, max);
                assert!(p.replay_window * 2 < p.ttl);
                assert!(p.warmup <= p.duration);
            }
        }
    }

    #[test]
    fn the_plateau_is_the_first_half_after_the_warm_up() {
        // A step after the warm-up (a table doubling), then flat.
        let samples = [(1.0, 10), (5.0, 100), (6.0, 150), (7.0, 160), (9.0, 170)];
        assert_eq!(plateau(&samples, 5.0, 10.0, 100), 160);
        // Growth only in the second half is not part of the plateau.
        let leak = [(5.0, 100), (6.0, 101), (8.0, 150), (9.0, 200)];
        assert_eq!(plateau(&leak, 5.0, 10.0, 100), 101);
        assert_eq!(plateau(&[], 5.0, 10.0, 42), 42);
    }

    #[test]
    fn keys_created_since_a_cutoff() {
        let samples = [(1.0, 10), (2.0, 25), (3.0, 40)];
        // The last sample at or before the cutoff is the baseline.
        assert_eq!(created_since(&samples, 2.5, 50), 25);
        assert_eq!(created_since(&samples, 2.0, 50), 25);
        assert_eq!(created_since(&samples, 3.0, 50), 10);
        // Before every sample (or a window longer than the run): everything.
        assert_eq!(created_since(&samples, 0.5, 50), 50);
        assert_eq!(created_since(&samples, -4.0, 50), 50);
        assert_eq!(created_since(&[], 9.0, 7), 7);
    }

    #[test]
    fn rng_covers_its_range() {
        let mut rng = Rng::new(7);
        let mut seen = [false; 10];
        for _ in 0..1000 {
            seen[rng.below(10) as usize] = true;
        }
        assert!(seen.iter().all(|s| *s));
        assert_eq!(Rng::new(0).below(0), 0);
    }
}
