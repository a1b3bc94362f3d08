//! The storm's final count: what the server charged (`GET /payments` per
//! tenant) against what the clients meant to pay and were answered.

use std::collections::{BTreeSet, HashMap};
use std::sync::PoisonError;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::client::Observed;
use super::{Plan, Scenario};
use crate::DemoError;
use crate::app::Payment;
use crate::report::{ScenarioStats, StormReport};

/// Counts, per scenario, the charges of every planned payment (duplicates,
/// lost ones, answers that differ from the charge), adds the clients'
/// counters and latencies, and makes the report.
///
/// # Errors
/// [`DemoError::Http`] or [`DemoError::Storm`] if a `GET /payments` fails.
pub(super) async fn count(
    client: &reqwest::Client,
    base: &str,
    plans: &[Plan],
    observed: &Observed,
    elapsed: Duration,
) -> Result<StormReport, DemoError> {
    // What the server charged, per tenant and key.
    let mut charged: HashMap<(String, String), Vec<Payment>> = HashMap::new();
    let tenants: BTreeSet<&str> = plans.iter().map(|p| p.tenant.as_str()).collect();
    for tenant in tenants {
        let response = client
            .get(format!("{base}/payments"))
            .bearer_auth(tenant)
            .send()
            .await?;
        if !response.status().is_success() {
            return Err(DemoError::Storm(format!(
                "GET /payments answered {}",
                response.status()
            )));
        }
        let payments: Vec<Payment> = response.json().await?;
        for p in payments {
            charged
                .entry((tenant.to_string(), p.idempotency_key.clone()))
                .or_default()
                .push(p);
        }
    }

    let answers = std::mem::take(
        &mut *observed
            .answers
            .lock()
            .unwrap_or_else(PoisonError::into_inner),
    );
    let mut stats: [ScenarioStats; 5] = Default::default();
    for plan in plans {
        let s = &mut stats[plan.scenario.index()];
        s.logical_payments += 1;
        let id = (plan.tenant.clone(), plan.key.clone());
        let rows = charged.remove(&id).unwrap_or_default();
        s.charges += rows.len() as u64;
        s.duplicates += rows.len().saturating_sub(1) as u64;
        if rows.is_empty() {
            s.lost += 1;
        }
        // The answer the client got is the payment charged, with the
        // original payload (never the changed one).
        let matches = match (rows.as_slice(), answers.get(&id)) {
            ([row], Some(answer)) => {
                row == answer && row.amount == plan.amount && row.customer == plan.customer
            }
            _ => false,
        };
        if !matches {
            s.inconsistent += 1;
        }
    }
    let unexpected = charged.values().map(|rows| rows.len() as u64).sum();

    for scenario in Scenario::ALL {
        let c = &observed.scenarios[scenario.index()];
        let s = &mut stats[scenario.index()];
        s.attempts = c.attempts.load(Ordering::SeqCst);
        s.replays = c.replays.load(Ordering::SeqCst);
        s.conflicts = c.conflicts.load(Ordering::SeqCst);
        s.mismatches = c.mismatches.load(Ordering::SeqCst);
        s.unavailable = c.unavailable.load(Ordering::SeqCst);
        s.timeouts = c.timeouts.load(Ordering::SeqCst);
        s.inconsistent += c.inconsistent.load(Ordering::SeqCst);
    }

    let mut latencies = std::mem::take(
        &mut *observed
            .latencies
            .lock()
            .unwrap_or_else(PoisonError::into_inner),
    );
    latencies.sort();
    let pick = |q: f64| {
        let last = latencies.len().saturating_sub(1) as f64;
        latencies
            .get((last * q).round() as usize)
            .copied()
            .unwrap_or_default()
    };
    Ok(StormReport {
        scenarios: Scenario::ALL
            .iter()
            .map(|s| (*s, stats[s.index()].clone()))
            .collect(),
        unexpected,
        p50: pick(0.5),
        p99: pick(0.99),
        elapsed,
    })
}
