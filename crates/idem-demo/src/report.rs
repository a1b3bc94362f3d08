//! What the storm observed, and the table it prints.

use std::fmt::Write as _;
use std::time::Duration;

use crate::storm::Scenario;

/// The counts of one scenario (or of the whole storm).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScenarioStats {
    /// Logical payments the clients meant to make (one per tenant and key).
    pub logical_payments: u64,
    /// HTTP requests sent.
    pub attempts: u64,
    /// Payments the server recorded for these keys.
    pub charges: u64,
    /// Responses carrying `Idempotent-Replayed: true`.
    pub replays: u64,
    /// 409 responses (the same key in flight).
    pub conflicts: u64,
    /// 422 responses (the key reused with another payload).
    pub mismatches: u64,
    /// 503 responses (transient failures; nothing charged).
    pub unavailable: u64,
    /// Requests the client gave up on (its timeout) or lost (connection error).
    pub timeouts: u64,
    /// Charges beyond the first of a logical payment.
    pub duplicates: u64,
    /// Logical payments never charged.
    pub lost: u64,
    /// Logical payments whose answers differed between attempts, or did not
    /// match the payment charged.
    pub inconsistent: u64,
}

impl ScenarioStats {
    fn add(&mut self, other: &Self) {
        self.logical_payments += other.logical_payments;
        self.attempts += other.attempts;
        self.charges += other.charges;
        self.replays += other.replays;
        self.conflicts += other.conflicts;
        self.mismatches += other.mismatches;
        self.unavailable += other.unavailable;
        self.timeouts += other.timeouts;
        self.duplicates += other.duplicates;
        self.lost += other.lost;
        self.inconsistent += other.inconsistent;
    }
}

/// What the storm observed.
#[derive(Clone, Debug, Default)]
pub struct StormReport {
    /// Per scenario, in [`Scenario::ALL`] order.
    pub scenarios: Vec<(Scenario, ScenarioStats)>,
    /// Payments the server recorded for the storm's tenants under keys the
    /// storm never sent (should be none).
    pub unexpected: u64,
    /// Median request latency.
    pub p50: Duration,
    /// 99th percentile request latency.
    pub p99: Duration,
    /// Wall time of the storm.
    pub elapsed: Duration,
}

impl StormReport {
    /// The sum over all scenarios.
    pub fn totals(&self) -> ScenarioStats {
        let mut total = ScenarioStats::default();
        for (_, stats) in &self.scenarios {
            total.add(stats);
        }
        total
    }

    /// The counts of `scenario`.
    pub fn scenario(&self, scenario: Scenario) -> ScenarioStats {
        self.scenarios
            .iter()
            .find(|(s, _)| *s == scenario)
            .map(|(_, stats)| stats.clone())
            .unwrap_or_default()
    }

    /// Whether every logical payment was charged exactly once, every answer
    /// was consistent, and nothing unexpected was charged.
    pub fn is_clean(&self) -> bool {
        let t = self.totals();
        t.duplicates == 0 && t.lost == 0 && t.inconsistent == 0 && self.unexpected == 0
    }

    /// The summary table and the per-scenario breakdown.
    pub fn table(&self) -> String {
        let t = self.totals();
        let rows: [(&str, String); 14] = [
            ("logical payments", t.logical_payments.to_string()),
            ("HTTP attempts", t.attempts.to_string()),
            ("charges made", t.charges.to_string()),
            ("replays (Idempotent-Replayed)", t.replays.to_string()),
            ("409 in progress", t.conflicts.to_string()),
            ("422 key reused", t.mismatches.to_string()),
            ("503 transient (not charged)", t.unavailable.to_string()),
            ("client timeouts", t.timeouts.to_string()),
            ("duplicates", t.duplicates.to_string()),
            ("lost", t.lost.to_string()),
            ("inconsistent answers", t.inconsistent.to_string()),
            ("unexpected charges", self.unexpected.to_string()),
            (
                "latency p50 / p99",
                format!("{} / {}", ms(self.p50), ms(self.p99)),
            ),
            ("elapsed", format!("{:.2} s", self.elapsed.as_secs_f64())),
        ];
        let line = "+-------------------------------+----------------------+\n";
        let mut out = String::from(line);
        for (name, value) in rows {
            let _ = writeln!(out, "| {name:<29} | {value:>20} |");
        }
        out.push_str(line);
        out.push('\n');
        let _ = writeln!(
            out,
            "{:<18} {:>8} {:>8} {:>8} {:>8} {:>6} {:>6} {:>6} {:>8} {:>5} {:>5}",
            "scenario",
            "payments",
            "attempts",
            "charges",
            "replays",
            "409",
            "422",
            "503",
            "timeouts",
            "dup",
            "lost"
        );
        for (scenario, s) in &self.scenarios {
            let _ = writeln!(
                out,
                "{:<18} {:>8} {:>8} {:>8} {:>8} {:>6} {:>6} {:>6} {:>8} {:>5} {:>5}",
                scenario.name(),
                s.logical_payments,
                s.attempts,
                s.charges,
                s.replays,
                s.conflicts,
                s.mismatches,
                s.unavailable,
                s.timeouts,
                s.duplicates,
                s.lost
            );
        }
        out.push('\n');
        if self.is_clean() {
            out.push_str(
                "OK: every logical payment was charged exactly once (duplicates = 0, lost = 0)\n",
            );
        } else {
            out.push_str(
                "FAILED: some payment was charged twice, lost, charged unexpectedly, or answered inconsistently\n",
            );
        }
        out
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}
