//! Running the checker: safety with stateright's breadth-first search,
//! liveness with a search of the whole state graph (in `check/graph.rs`).

mod graph;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use stateright::{Checker, Expectation, HasDiscoveries, Model};

use crate::config::Config;
use crate::model::{LIVE_ANSWER, LIVE_SETTLED, ProtocolModel, all_answered, settled};
use graph::{Goal, Graph, replay};

/// What a property came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// It holds in every state explored (safety, liveness), or an example
    /// was found (a reachability check).
    Holds,
    /// A counterexample was found; here it is, step by step.
    Fails(String),
    /// The reachability check found no example (the model may be vacuous).
    NotReached,
    /// The search stopped early (at the first counterexample of another
    /// property): nothing is known.
    Unchecked,
}

impl Verdict {
    /// Whether a counterexample was found.
    pub fn is_counterexample(&self) -> bool {
        matches!(self, Verdict::Fails(_))
    }
}

/// One property's result.
#[derive(Clone, Debug)]
pub struct PropertyResult {
    /// The property's name.
    pub name: &'static str,
    /// "safety", "liveness" or "reachable".
    pub kind: &'static str,
    /// The verdict.
    pub verdict: Verdict,
}

/// The result of checking one configuration.
#[derive(Clone, Debug)]
pub struct Report {
    /// The configuration checked.
    pub config: Config,
    /// Unique states stateright explored (safety and reachability).
    pub safety_states: usize,
    /// The time it took.
    pub safety_time: Duration,
    /// States of the whole graph (liveness), when checked.
    pub liveness_states: Option<usize>,
    /// The time it took.
    pub liveness_time: Duration,
    /// Every property's verdict.
    pub results: Vec<PropertyResult>,
}

impl Report {
    /// The verdict of property `name`.
    pub fn verdict(&self, name: &str) -> Option<&Verdict> {
        self.results
            .iter()
            .find(|r| r.name == name)
            .map(|r| &r.verdict)
    }

    /// Names of the properties with a counterexample.
    pub fn failures(&self) -> Vec<&'static str> {
        self.results
            .iter()
            .filter(|r| r.verdict.is_counterexample())
            .map(|r| r.name)
            .collect()
    }

    /// A readable summary: the bound, the figures, each verdict, and every
    /// counterexample's trace.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "== {} [{}]: {}",
            self.config.name,
            self.config.variant,
            self.config.bound()
        );
        let _ = writeln!(
            out,
            "   safety: {} states in {:.2?}{}",
            self.safety_states,
            self.safety_time,
            self.liveness_states.map_or_else(String::new, |n| format!(
                "; liveness: {n} states in {:.2?}",
                self.liveness_time
            ))
        );
        for r in &self.results {
            let verdict = match &r.verdict {
                Verdict::Holds if r.kind == "reachable" => "reached",
                Verdict::Holds => "holds",
                Verdict::Fails(_) => "COUNTEREXAMPLE",
                Verdict::NotReached => "NOT REACHED",
                Verdict::Unchecked => "not checked (search stopped early)",
            };
            let _ = writeln!(out, "   {:<9} {:<68} {verdict}", r.kind, r.name);
        }
        for r in &self.results {
            if let Verdict::Fails(trace) = &r.verdict {
                let _ = writeln!(out, "\n   Counterexample to \"{}\":\n{trace}", r.name);
            }
        }
        out
    }
}

/// Checks `config`. With `stop_at`, the search stops at the first
/// counterexample of that property (for the broken variants); liveness is
/// checked only if the configuration asks for it and `stop_at` is not a
/// safety property.
pub fn check(config: &Config, stop_at: Option<&'static str>) -> Report {
    check_with_threads(config, stop_at, 1)
}

/// [`check`] with `threads` threads for the safety search (the liveness
/// search is single-threaded).
pub fn check_with_threads(
    config: &Config,
    stop_at: Option<&'static str>,
    threads: usize,
) -> Report {
    let model = ProtocolModel::new(config.clone());
    let properties = model.properties();
    let stop_at_liveness = stop_at.is_some_and(|p| p == LIVE_ANSWER || p == LIVE_SETTLED);

    let mut results = Vec::new();
    let mut safety_states = 0;
    let mut safety_time = Duration::ZERO;
    if !stop_at_liveness {
        let started = Instant::now();
        let mut builder = model.clone().checker().threads(threads.max(1));
        if let Some(p) = stop_at {
            builder = builder.finish_when(HasDiscoveries::AnyOf(BTreeSet::from([p])));
        }
        let checker = builder.spawn_bfs().join();
        safety_time = started.elapsed();
        safety_states = checker.unique_state_count();
        let complete = stop_at.is_none();
        let mut discoveries = checker.discoveries();
        for p in &properties {
            let found = discoveries.remove(p.name);
            let (kind, verdict) = match (&p.expectation, found) {
                (Expectation::Sometimes, Some(_)) => ("reachable", Verdict::Holds),
                (Expectation::Sometimes, None) if complete => ("reachable", Verdict::NotReached),
                (Expectation::Sometimes, None) => ("reachable", Verdict::Unchecked),
                (_, Some(path)) => ("safety", Verdict::Fails(model.explain(&path.into_vec()))),
                (_, None) if complete || stop_at == Some(p.name) => ("safety", Verdict::Holds),
                (_, None) => ("safety", Verdict::Unchecked),
            };
            results.push(PropertyResult {
                name: p.name,
                kind,
                verdict,
            });
        }
    }

    let mut liveness_states = None;
    let mut liveness_time = Duration::ZERO;
    if config.liveness && (stop_at.is_none() || stop_at_liveness) {
        let started = Instant::now();
        let goals: [(&'static str, Goal); 2] =
            [(LIVE_ANSWER, all_answered), (LIVE_SETTLED, settled)];
        let graph = Graph::explore(&model, &goals);
        liveness_time = started.elapsed();
        liveness_states = Some(graph.len());
        for (g, (name, _)) in goals.iter().enumerate() {
            let verdict = match graph.stuck(g) {
                None => Verdict::Holds,
                Some(id) => {
                    let (at, cycle) = graph.lasso(id);
                    let mut actions = graph.actions_to(at);
                    let loop_from = actions.len();
                    actions.extend(cycle);
                    let path = replay(&model, &actions);
                    let mut trace = format!(
                        "   From the state after step {} on, no sequence of steps (however fair: \
                         every client retrying, every engine resuming, the store coming back) \
                         reaches \"{name}\".\n",
                        graph.actions_to(id).len()
                    );
                    trace.push_str(&model.explain_marked(
                        &path,
                        loop_from,
                        "   ... and from here on this loop repeats forever:",
                    ));
                    Verdict::Fails(trace)
                }
            };
            results.push(PropertyResult {
                name,
                kind: "liveness",
                verdict,
            });
        }
    }

    Report {
        config: config.clone(),
        safety_states,
        safety_time,
        liveness_states,
        liveness_time,
        results,
    }
}
