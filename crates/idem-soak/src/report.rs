//! The per-backend report, its verdict, and the table.

use serde::{Deserialize, Serialize};

use crate::load::Measured;

/// How much the process's RSS may grow in the second half of the run, over
/// its plateau.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RssBound {
    /// Growth always tolerated, MiB.
    pub(crate) mib: u64,
    /// Growth tolerated as a share of the plateau, percent.
    pub(crate) percent: u64,
}

impl RssBound {
    /// The growth allowed over a plateau of `plateau` bytes: the larger of
    /// the two terms.
    pub(crate) fn allowed(self, plateau: u64) -> u64 {
        (self.mib << 20).max(plateau / 100 * self.percent)
    }
}

/// What happened to one backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Status {
    /// Ran, and every check held.
    Pass,
    /// Ran, and a check failed (or the run broke).
    Fail,
    /// Not run: the server is unreachable.
    Skipped,
}

/// One backend's result.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Report {
    /// The backend.
    pub(crate) backend: String,
    /// Pass, fail or skipped.
    pub(crate) status: Status,
    /// Why it failed or was skipped.
    pub(crate) failures: Vec<String>,
    /// Setup remarks.
    pub(crate) notes: Vec<String>,
    /// Concurrent clients.
    pub(crate) clients: usize,
    /// The engine's TTL, seconds.
    pub(crate) ttl_secs: f64,
    /// The warm-up, seconds.
    pub(crate) warmup_secs: f64,
    /// The RSS bound applied.
    pub(crate) rss_bound: RssBound,
    /// The measurements (absent when skipped or broken before measuring).
    pub(crate) measured: Option<Measured>,
}

impl Report {
    /// Requests per second.
    pub(crate) fn rate(&self) -> f64 {
        self.measured
            .as_ref()
            .filter(|m| m.secs > 0.0)
            .map_or(0.0, |m| m.requests as f64 / m.secs)
    }
}

/// Every check a measured run must pass; empty when it passed.
///
/// # Behavior
/// - no unexpected answer (anything but 201/409/422/400 where each is due);
/// - no key ran twice, none never ran, and the handler ran exactly once per
///   distinct key (`executions == keys == fresh answers`);
/// - the RSS after the last request is at most the plateau (the highest RSS
///   of the first half after the warm-up) plus [`RssBound::allowed`]: the
///   process's memory levels off;
/// - the store holds no more records than the keys created in the last
///   TTL + expiry lag + 1 s (older records must have expired and been
///   removed: otherwise the store grows without bound).
pub(crate) fn verdict(m: &Measured, bound: RssBound) -> Vec<String> {
    let mut failures = Vec::new();
    if m.requests == 0 {
        failures.push("no request was sent".into());
    }
    if m.unexpected > 0 {
        failures.push(format!("{} unexpected answers", m.unexpected));
    }
    if m.double_executions > 0 {
        failures.push(format!("{} keys ran more than once", m.double_executions));
    }
    if m.lost > 0 {
        failures.push(format!("{} keys got no first-execution answer", m.lost));
    }
    if m.executions != m.keys {
        failures.push(format!(
            "the handler ran {} times for {} distinct keys",
            m.executions, m.keys
        ));
    }
    if m.fresh != m.keys {
        failures.push(format!(
            "{} first-execution answers for {} distinct keys",
            m.fresh, m.keys
        ));
    }
    let growth = m.rss_end.saturating_sub(m.rss_plateau);
    let allowed = bound.allowed(m.rss_plateau);
    if growth > allowed {
        failures.push(format!(
            "RSS grew by {} in the second half of the run (from the plateau {} to {}); allowed {}",
            mib(growth),
            mib(m.rss_plateau),
            mib(m.rss_end),
            mib(allowed)
        ));
    }
    if m.records_end > m.records_bound {
        failures.push(format!(
            "the store holds {} records at the end, more than the {} keys created in its last {:.0} s: \
             records outlive their expiry",
            m.records_end, m.records_bound, m.records_window_secs
        ));
    }
    failures
}

/// Bytes as MiB with one decimal.
pub(crate) fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Signed growth from `from` to `to`, as MiB.
fn delta(from: u64, to: u64) -> String {
    if to >= from {
        format!("+{}", mib(to - from))
    } else {
        format!("-{}", mib(from - to))
    }
}

/// The table printed at the end of a soak.
pub(crate) fn table(reports: &[Report]) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{:<13} {:<7} {:>6} {:>9} {:>8} {:>6} {:>8} {:>10} {:>6} {:>10} {:>10} {:>10} {:>10} {:>11}\n",
        "backend",
        "result",
        "secs",
        "requests",
        "req/s",
        "errors",
        "keys",
        "executions",
        "double",
        "rss start",
        "rss warm",
        "plateau",
        "rss end",
        "late growth"
    ));
    for r in reports {
        let status = match r.status {
            Status::Pass => "PASS",
            Status::Fail => "FAIL",
            Status::Skipped => "skipped",
        };
        match &r.measured {
            Some(m) => out.push_str(&format!(
                "{:<13} {:<7} {:>6.1} {:>9} {:>8.0} {:>6} {:>8} {:>10} {:>6} {:>10} {:>10} {:>10} {:>10} {:>11}\n",
                r.backend,
                status,
                m.secs,
                m.requests,
                r.rate(),
                m.unexpected,
                m.keys,
                m.executions,
                m.double_executions,
                mib(m.rss_start),
                mib(m.rss_warm),
                mib(m.rss_plateau),
                mib(m.rss_end),
                delta(m.rss_plateau, m.rss_end),
            )),
            None => out.push_str(&format!("{:<13} {:<7}\n", r.backend, status)),
        }
    }
    out.push('\n');
    for r in reports {
        if let Some(m) = &r.measured {
            out.push_str(&format!(
                "{}: 201 fresh {}, 201 replayed {}, 409 {}, 422 {}, 400 {}; purged {}; \
                 records held at the end {} (at most {}: keys of the last {:.0} s); peak RSS after warm-up {}; \
                 TTL {:.0} s, warm-up {:.0} s, {} clients; late-growth bound {} or {}% of the plateau\n",
                r.backend,
                m.fresh,
                m.replayed,
                m.conflicts,
                m.mismatches,
                m.invalid,
                m.purged,
                m.records_end,
                m.records_bound,
                m.records_window_secs,
                mib(m.rss_peak),
                r.ttl_secs,
                r.warmup_secs,
                r.clients,
                mib(r.rss_bound.mib << 20),
                r.rss_bound.percent,
            ));
        }
        for note in &r.notes {
            out.push_str(&format!("{}: {note}\n", r.backend));
        }
        for failure in &r.failures {
            out.push_str(&format!(
                "{}: {status}: {failure}\n",
                r.backend,
                status = match r.status {
                    Status::Skipped => "SKIPPED",
                    _ => "FAIL",
                }
            ));
        }
        if let Some(m) = &r.measured {
            for sample in &m.unexpected_samples {
                out.push_str(&format!("{}:   unexpected: {sample}\n", r.backend));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> Measured {
        Measured {
            secs: 10.0,
            requests: 1000,
            fresh: 400,
            keys: 400,
            executions: 400,
            rss_start: 10 << 20,
            rss_warm: 90 << 20,
            rss_plateau: 100 << 20,
            rss_end: 110 << 20,
            records_end: 80,
            records_bound: 100,
            records_window_secs: 5.0,
            ..Measured::default()
        }
    }

    const BOUND: RssBound = RssBound {
        mib: 64,
        percent: 20,
    };

    #[test]
    fn a_clean_run_passes() {
        assert_eq!(verdict(&good(), BOUND), Vec::<String>::new());
    }

    /// A check's expected message and the change that must trip it.
    type Breakage = (&'static str, fn(&mut Measured));

    #[test]
    fn every_check_can_fail() {
        let cases: [Breakage; 8] = [
            ("unexpected", |m| m.unexpected = 1),
            ("more than once", |m| m.double_executions = 1),
            ("no first-execution", |m| m.lost = 1),
            ("handler ran 401", |m| m.executions = 401),
            ("first-execution answers", |m| m.fresh = 399),
            ("RSS grew", |m| m.rss_end = m.rss_plateau + (65 << 20)),
            ("no request", |m| m.requests = 0),
            ("outlive their expiry", |m| m.records_end = 101),
        ];
        for (needle, break_it) in cases {
            let mut m = good();
            break_it(&mut m);
            let failures = verdict(&m, BOUND);
            assert!(
                failures.iter().any(|f| f.contains(needle)),
                "{needle}: {failures:?}"
            );
        }
    }

    #[test]
    fn the_rss_bound_is_the_larger_term() {
        assert_eq!(BOUND.allowed(100 << 20), 64 << 20);
        assert_eq!(BOUND.allowed(1000 << 20), 200 << 20);
        let mut m = good();
        m.rss_plateau = 1000 << 20;
        m.rss_end = m.rss_plateau + (150 << 20);
        assert!(verdict(&m, BOUND).is_empty());
        m.rss_end = m.rss_plateau + (201 << 20);
        assert_eq!(verdict(&m, BOUND).len(), 1);
        // Growth between the warm-up and the plateau is not checked.
        m.rss_warm = 1 << 20;
        assert_eq!(verdict(&m, BOUND).len(), 1);
        m.rss_end = m.rss_plateau;
        assert!(verdict(&m, BOUND).is_empty());
        // Shrinking is fine.
        m.rss_end = 1;
        assert!(verdict(&m, BOUND).is_empty());
    }

    #[test]
    fn the_table_lists_every_backend() {
        let pass = Report {
            backend: "memory".into(),
            status: Status::Pass,
            failures: Vec::new(),
            notes: vec!["in process".into()],
            clients: 64,
            ttl_secs: 2.0,
            warmup_secs: 5.0,
            rss_bound: BOUND,
            measured: Some(good()),
        };
        let skipped = Report {
            backend: "redis".into(),
            status: Status::Skipped,
            failures: vec!["unreachable".into()],
            measured: None,
            ..pass.clone()
        };
        let text = table(&[pass, skipped]);
        assert!(text.contains("memory        PASS"), "{text}");
        assert!(text.contains("redis         skipped"), "{text}");
        assert!(text.contains("redis: SKIPPED: unreachable"), "{text}");
        assert!(text.contains("+10.0 MiB"), "{text}");
    }
}
