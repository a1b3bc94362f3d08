//! Symmetry reduction: [`ProtocolModel::normalize`] puts every state in a
//! canonical-ish form (orphans dropped, fencing tokens renumbered, requests
//! ordered, interchangeable clients and engines relabelled), and [`Relabel`]
//! records the renaming so traces can follow it.

use std::hash::{Hash, Hasher};

use super::{Client, ModelState, Phase, ProtocolModel, Task};

/// How a step renamed interchangeable clients and engines (old id → new id).
#[derive(Clone, Debug)]
pub struct Relabel {
    /// Per old client id, its new id.
    pub clients: Vec<u8>,
    /// Per old engine id, its new id.
    pub engines: Vec<u8>,
    /// Fencing tokens renumbered: (old, new).
    pub tokens: Vec<(u8, u8)>,
}

impl ProtocolModel {
    /// Puts a state in a canonical-ish form, so that equal situations are
    /// equal states: drops orphans that no longer hold their key, renumbers
    /// fencing tokens by first appearance, orders the requests, and relabels
    /// interchangeable clients (same request) and engines (same clock). Each
    /// step maps a state to an equivalent one, so the reduction is sound; it
    /// is not guaranteed to be complete.
    pub(super) fn normalize(&self, s: &mut ModelState) -> Relabel {
        let keep: Vec<bool> = s
            .tasks
            .iter()
            .map(|t| !matches!(t.phase, Phase::Orphan { .. }) || self.holds_key(s, t))
            .collect();
        let mut it = keep.iter();
        s.tasks.retain(|_| it.next().copied().unwrap_or(true));
        // Once no engine can be cut off or stall any more, the bookkeeping
        // of a holder that was never cut off since its last write cannot
        // excuse anything: forget it.
        if s.budget.pauses == 0 && s.budget.outages == 0 {
            for t in &mut s.tasks {
                let e = s.engines[usize::from(t.engine)];
                let orphan = matches!(t.phase, Phase::Orphan { .. });
                if let Some(h) = t.held.as_mut() {
                    if !h.cut_seen && !e.paused && !e.outage {
                        h.cut_off = false;
                        h.required = false;
                    }
                    if orphan {
                        h.due = false;
                    }
                }
            }
        }
        let first = Self::renumber_tokens(s);
        if s.tasks.len() > 1 {
            let keys: Vec<u64> = s.tasks.iter().map(|t| self.task_key(s, t)).collect();
            let mut order: Vec<usize> = (0..s.tasks.len()).collect();
            order.sort_by_key(|&i| keys[i]);
            s.tasks = order.iter().map(|&i| s.tasks[i]).collect();
        }
        let clients = self.relabel_clients(s);
        let engines = self.relabel_engines(s);
        let second = Self::renumber_tokens(s);
        let tokens = first
            .iter()
            .map(|&(old, mid)| {
                let new = second
                    .iter()
                    .find(|(m, _)| *m == mid)
                    .map_or(mid, |&(_, n)| n);
                (old, new)
            })
            .collect();
        Relabel {
            clients,
            engines,
            tokens,
        }
    }

    /// A key to order requests by that ignores which of several
    /// interchangeable clients or engines they belong to.
    fn task_key(&self, s: &ModelState, t: &Task) -> u64 {
        let mut h = std::hash::DefaultHasher::new();
        let mut t = *t;
        let client = t
            .client
            .map(|c| (self.client_group(c), s.clients.get(usize::from(c)).copied()));
        t.client = None;
        let engine = (
            self.skew(t.engine),
            s.engines.get(usize::from(t.engine)).copied(),
        );
        t.engine = 0;
        (t, client, engine).hash(&mut h);
        h.finish()
    }

    /// The first client sending the same request as client `c`.
    fn client_group(&self, c: u8) -> u8 {
        let spec = self.cfg.clients.get(usize::from(c));
        let first = self.cfg.clients.iter().position(|x| Some(x) == spec);
        first.and_then(|i| u8::try_from(i).ok()).unwrap_or(c)
    }

    fn relabel_clients(&self, s: &mut ModelState) -> Vec<u8> {
        let map = relabeling(
            s.clients.len(),
            |c| self.cfg.clients[usize::from(self.client_group(c))],
            s.tasks.iter().filter_map(|t| t.client),
            |c| match s.clients[usize::from(c)] {
                Client::Idle => 0,
                Client::Waiting => 1,
                Client::Done => 2,
            },
        );
        permute(&mut s.clients, &map);
        for t in &mut s.tasks {
            if let Some(c) = t.client.as_mut() {
                *c = map[usize::from(*c)].unwrap_or(*c);
            }
        }
        Self::identity_where_none(&map)
    }

    fn identity_where_none(map: &[Option<u8>]) -> Vec<u8> {
        map.iter()
            .enumerate()
            .map(|(i, m)| m.unwrap_or(u8::try_from(i).unwrap_or(u8::MAX)))
            .collect()
    }

    fn relabel_engines(&self, s: &mut ModelState) -> Vec<u8> {
        let map = relabeling(
            s.engines.len(),
            |e| self.skew(e),
            s.tasks.iter().map(|t| t.engine),
            |e| {
                let e = s.engines[usize::from(e)];
                (e.paused, e.outage)
            },
        );
        permute(&mut s.engines, &map);
        for t in &mut s.tasks {
            t.engine = map[usize::from(t.engine)].unwrap_or(t.engine);
        }
        Self::identity_where_none(&map)
    }

    /// Returns the renaming, as (old, new) pairs.
    fn renumber_tokens(s: &mut ModelState) -> Vec<(u8, u8)> {
        let mut map: Vec<u8> = Vec::new();
        let mut f = |t: u8| -> u8 {
            if t == 0 {
                return 0;
            }
            let pos = map.iter().position(|&m| m == t).unwrap_or_else(|| {
                map.push(t);
                map.len() - 1
            });
            u8::try_from(pos + 1).unwrap_or(u8::MAX)
        };
        for r in s.store.iter_mut().flatten() {
            r.map_tokens(&mut f);
        }
        for l in &mut s.lives {
            if let Some(o) = l.first.as_mut() {
                o.token = f(o.token);
            }
        }
        for t in &mut s.tasks {
            if let Some(h) = t.held.as_mut() {
                h.token = f(h.token);
            }
            if let Phase::Begin { seen: Some(r), .. } = &mut t.phase {
                r.map_tokens(&mut f);
            }
        }
        map.iter()
            .enumerate()
            .map(|(i, &old)| (old, u8::try_from(i + 1).unwrap_or(u8::MAX)))
            .collect()
    }
}

/// A renaming of `n` interchangeable things (clients, engines), old to new:
/// those the tasks name (`named`, in task order) first, then the others
/// ordered by `rank`; each takes the first free number of its `class`
/// (`None`: no free number).
fn relabeling<C: PartialEq, R: Ord>(
    n: usize,
    class: impl Fn(u8) -> C,
    named: impl Iterator<Item = u8>,
    rank: impl Fn(u8) -> R,
) -> Vec<Option<u8>> {
    let mut map: Vec<Option<u8>> = vec![None; n];
    let mut used = vec![false; n];
    let mut assign = |old: u8, map: &mut Vec<Option<u8>>| {
        if map[usize::from(old)].is_some() {
            return;
        }
        let class_of_old = class(old);
        let same = |i: usize| class(u8::try_from(i).unwrap_or(u8::MAX)) == class_of_old;
        if let Some(new) = (0..n).find(|&i| !used[i] && same(i)) {
            used[new] = true;
            map[usize::from(old)] = u8::try_from(new).ok();
        }
    };
    for old in named {
        assign(old, &mut map);
    }
    let mut rest: Vec<u8> = (0..n)
        .filter_map(|i| u8::try_from(i).ok())
        .filter(|&i| map[usize::from(i)].is_none())
        .collect();
    rest.sort_by_key(|&i| rank(i));
    for old in rest {
        assign(old, &mut map);
    }
    map
}

/// Moves each item to its new number under `map`.
fn permute<T: Clone>(items: &mut [T], map: &[Option<u8>]) {
    let old = items.to_vec();
    for (i, m) in map.iter().enumerate() {
        if let Some(new) = m {
            items[usize::from(*new)] = old[i].clone();
        }
    }
}
