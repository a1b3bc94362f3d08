//! Running the checker: safety with stateright's breadth-first search,
//! liveness with a search of the whole state graph.

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt::Write as _;
use std::hash::BuildHasher;
use std::time::{Duration, Instant};

use stateright::{Checker, Expectation, HasDiscoveries, Model};

use crate::config::Config;
use crate::model::{
    Action, LIVE_ANSWER, LIVE_SETTLED, ModelState, ProtocolModel, all_answered, settled,
};

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

type Goal = fn(&ProtocolModel, &ModelState) -> bool;

/// The whole reachable state graph, by state fingerprint, with the edges
/// and, per state, which goals hold there.
///
/// Liveness is checked as "from every reachable state, a goal state is
/// reachable" (AG EF goal). In a finite graph that is what "eventually,
/// under fairness" means: a fair run cannot avoid forever a state that stays
/// reachable, and an unfair one (a client that stops retrying, a store that
/// never comes back) is not a counterexample. Time is relative (see the
/// model), so the graph is finite and runs that loop are explored in full.
struct Graph {
    parent: Vec<Option<(u32, Action)>>,
    goals: Vec<u8>,
    offsets: Vec<u32>,
    edges: Vec<u32>,
    labels: Vec<Action>,
}

impl Graph {
    fn explore(model: &ProtocolModel, goals: &[(&'static str, Goal)]) -> Self {
        let hasher = std::collections::hash_map::RandomState::new();
        let mut ids: HashMap<u64, u32> = HashMap::new();
        let mut graph = Graph {
            parent: Vec::new(),
            goals: Vec::new(),
            offsets: Vec::new(),
            edges: Vec::new(),
            labels: Vec::new(),
        };
        let mut queue = VecDeque::new();
        let goal_bits = |s: &ModelState| -> u8 {
            goals
                .iter()
                .enumerate()
                .filter(|(_, (_, g))| g(model, s))
                .fold(0, |acc, (i, _)| acc | (1 << i))
        };
        for init in model.init_states() {
            let id = u32::try_from(graph.parent.len()).unwrap_or(u32::MAX);
            if let Entry::Vacant(v) = ids.entry(hasher.hash_one(&init)) {
                v.insert(id);
                graph.parent.push(None);
                graph.goals.push(goal_bits(&init));
                queue.push_back(init);
            }
        }
        let mut actions = Vec::new();
        while let Some(state) = queue.pop_front() {
            let from = u32::try_from(graph.offsets.len()).unwrap_or(u32::MAX);
            graph
                .offsets
                .push(u32::try_from(graph.edges.len()).unwrap_or(u32::MAX));
            actions.clear();
            model.actions(&state, &mut actions);
            for &action in &actions {
                let Some(next) = model.next_state(&state, action) else {
                    continue;
                };
                let next_id = match ids.entry(hasher.hash_one(&next)) {
                    Entry::Occupied(o) => *o.get(),
                    Entry::Vacant(v) => {
                        let id = u32::try_from(graph.parent.len()).unwrap_or(u32::MAX);
                        v.insert(id);
                        graph.parent.push(Some((from, action)));
                        graph.goals.push(goal_bits(&next));
                        queue.push_back(next);
                        id
                    }
                };
                graph.edges.push(next_id);
                graph.labels.push(action);
            }
        }
        graph
            .offsets
            .push(u32::try_from(graph.edges.len()).unwrap_or(u32::MAX));
        graph
    }

    fn len(&self) -> usize {
        self.parent.len()
    }

    /// The first state (in breadth-first order, so with a shortest path)
    /// from which no state satisfying goal `g` is reachable.
    fn stuck(&self, g: usize) -> Option<u32> {
        let n = self.len();
        // Reverse edges.
        let mut in_deg = vec![0_u32; n + 1];
        for &t in &self.edges {
            in_deg[t as usize + 1] += 1;
        }
        for i in 0..n {
            in_deg[i + 1] += in_deg[i];
        }
        let mut fill = in_deg.clone();
        let mut rev = vec![0_u32; self.edges.len()];
        for from in 0..n {
            let (a, b) = (self.offsets[from] as usize, self.offsets[from + 1] as usize);
            for &to in &self.edges[a..b] {
                let slot = &mut fill[to as usize];
                rev[*slot as usize] = u32::try_from(from).unwrap_or(u32::MAX);
                *slot += 1;
            }
        }
        let mut reaches = vec![false; n];
        let mut stack: Vec<u32> = Vec::new();
        for (i, bits) in self.goals.iter().enumerate() {
            if bits & (1 << g) != 0 {
                reaches[i] = true;
                stack.push(u32::try_from(i).unwrap_or(u32::MAX));
            }
        }
        while let Some(s) = stack.pop() {
            let (a, b) = (in_deg[s as usize] as usize, in_deg[s as usize + 1] as usize);
            for &p in &rev[a..b] {
                if !reaches[p as usize] {
                    reaches[p as usize] = true;
                    stack.push(p);
                }
            }
        }
        reaches
            .iter()
            .position(|r| !r)
            .map(|i| u32::try_from(i).unwrap_or(u32::MAX))
    }

    /// The actions of the breadth-first path from the initial state to `id`.
    fn actions_to(&self, id: u32) -> Vec<Action> {
        let mut actions = Vec::new();
        let mut at = id;
        while let Some((from, action)) = self.parent[at as usize] {
            actions.push(action);
            at = from;
        }
        actions.reverse();
        actions
    }

    fn out(&self, id: u32) -> impl Iterator<Item = (u32, Action)> + '_ {
        let (a, b) = (
            self.offsets[id as usize] as usize,
            self.offsets[id as usize + 1] as usize,
        );
        self.edges[a..b]
            .iter()
            .copied()
            .zip(self.labels[a..b].iter().copied())
    }

    /// From `stuck`, the nearest state of a bottom strongly connected
    /// component (a set of states the run can never leave: where a fair run
    /// that misses the goal ends up), and a loop through it in which time
    /// passes or a client retries (empty: no step is possible there).
    fn lasso(&self, stuck: u32) -> (u32, Vec<Action>) {
        // Breadth-first order of the states reachable from `stuck`.
        let mut index: HashMap<u32, usize> = HashMap::new();
        let mut order = vec![stuck];
        index.insert(stuck, 0);
        let mut i = 0;
        while i < order.len() {
            for (to, _) in self.out(order[i]) {
                if let Entry::Vacant(v) = index.entry(to) {
                    v.insert(order.len());
                    order.push(to);
                }
            }
            i += 1;
        }
        let comp = self.components(&order, &index);
        // A component is bottom if no edge leaves it.
        let mut bottom = vec![true; comp.iter().max().map_or(0, |m| m + 1)];
        for (k, &u) in order.iter().enumerate() {
            for (to, _) in self.out(u) {
                if comp[index[&to]] != comp[k] {
                    bottom[comp[k]] = false;
                }
            }
        }
        let at = order
            .iter()
            .enumerate()
            .find(|(k, _)| bottom[comp[*k]])
            .map_or(stuck, |(_, &u)| u);
        (at, self.cycle_through(at).unwrap_or_default())
    }

    /// Strongly connected components (iterative Tarjan) of the states in
    /// `order`; returns each state's component number.
    fn components(&self, order: &[u32], index: &HashMap<u32, usize>) -> Vec<usize> {
        let n = order.len();
        let mut low = vec![0_usize; n];
        let mut num = vec![usize::MAX; n];
        let mut on_stack = vec![false; n];
        let mut stack = Vec::new();
        let mut comp = vec![usize::MAX; n];
        let mut next_num = 0;
        let mut next_comp = 0;
        for root in 0..n {
            if num[root] != usize::MAX {
                continue;
            }
            // (node, its successors, position in them)
            let mut work: Vec<(usize, Vec<usize>, usize)> = Vec::new();
            let succ =
                |k: usize| -> Vec<usize> { self.out(order[k]).map(|(to, _)| index[&to]).collect() };
            num[root] = next_num;
            low[root] = next_num;
            next_num += 1;
            stack.push(root);
            on_stack[root] = true;
            work.push((root, succ(root), 0));
            while let Some((v, next, pos)) = work.last_mut() {
                let v = *v;
                if *pos < next.len() {
                    let w = next[*pos];
                    *pos += 1;
                    if num[w] == usize::MAX {
                        num[w] = next_num;
                        low[w] = next_num;
                        next_num += 1;
                        stack.push(w);
                        on_stack[w] = true;
                        let succ_w = succ(w);
                        work.push((w, succ_w, 0));
                    } else if on_stack[w] {
                        low[v] = low[v].min(num[w]);
                    }
                } else {
                    work.pop();
                    if let Some((parent, _, _)) = work.last() {
                        let p = *parent;
                        low[p] = low[p].min(low[v]);
                    }
                    if low[v] == num[v] {
                        while let Some(w) = stack.pop() {
                            on_stack[w] = false;
                            comp[w] = next_comp;
                            if w == v {
                                break;
                            }
                        }
                        next_comp += 1;
                    }
                }
            }
        }
        comp
    }

    /// A shortest loop from `x` back to `x` with a tick or a send in it.
    fn cycle_through(&self, x: u32) -> Option<Vec<Action>> {
        let mut parent: HashMap<u32, (u32, Action)> = HashMap::new();
        let mut queue = VecDeque::from([x]);
        while let Some(u) = queue.pop_front() {
            for (to, action) in self.out(u) {
                if to == x {
                    let mut cycle = vec![action];
                    let mut at = u;
                    while at != x {
                        let (from, a) = parent[&at];
                        cycle.push(a);
                        at = from;
                    }
                    cycle.reverse();
                    if cycle
                        .iter()
                        .any(|a| matches!(a, Action::Tick | Action::Send { .. }))
                    {
                        return Some(cycle);
                    }
                } else if let Entry::Vacant(v) = parent.entry(to) {
                    v.insert((u, action));
                    queue.push_back(to);
                }
            }
        }
        None
    }
}

/// The path `actions` take from the initial state.
fn replay(model: &ProtocolModel, actions: &[Action]) -> Vec<(ModelState, Option<Action>)> {
    let mut path = Vec::new();
    let Some(mut state) = model.init_states().into_iter().next() else {
        return path;
    };
    for &action in actions {
        let Some(next) = model.next_state(&state, action) else {
            break;
        };
        path.push((state, Some(action)));
        state = next;
    }
    path.push((state, None));
    path
}
