//! The liveness search: the whole reachable state graph ([`Graph`]), the
//! states from which a goal is unreachable, and the lasso (a path into a
//! bottom component and a loop in it) shown as the counterexample.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;

use stateright::Model;

use crate::model::{Action, ModelState, ProtocolModel};

/// A liveness goal: whether it holds in a state.
pub(super) type Goal = fn(&ProtocolModel, &ModelState) -> bool;

/// The whole reachable state graph, by state fingerprint, with the edges
/// and, per state, which goals hold there.
///
/// Liveness is checked as "from every reachable state, a goal state is
/// reachable" (AG EF goal). In a finite graph that is what "eventually,
/// under fairness" means: a fair run cannot avoid forever a state that stays
/// reachable, and an unfair one (a client that stops retrying, a store that
/// never comes back) is not a counterexample. Time is relative (see the
/// model), so the graph is finite and runs that loop are explored in full.
pub(super) struct Graph {
    parent: Vec<Option<(u32, Action)>>,
    goals: Vec<u8>,
    offsets: Vec<u32>,
    edges: Vec<u32>,
    labels: Vec<Action>,
}

impl Graph {
    pub(super) fn explore(model: &ProtocolModel, goals: &[(&'static str, Goal)]) -> Self {
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

    pub(super) fn len(&self) -> usize {
        self.parent.len()
    }

    /// The first state (in breadth-first order, so with a shortest path)
    /// from which no state satisfying goal `g` is reachable.
    pub(super) fn stuck(&self, g: usize) -> Option<u32> {
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
    pub(super) fn actions_to(&self, id: u32) -> Vec<Action> {
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
    pub(super) fn lasso(&self, stuck: u32) -> (u32, Vec<Action>) {
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
pub(super) fn replay(
    model: &ProtocolModel,
    actions: &[Action],
) -> Vec<(ModelState, Option<Action>)> {
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
