//! The steps of the model: the [`Action`] alphabet and
//! [`ProtocolModel::step`], which applies one (the environment's steps here,
//! the engine's in `engine.rs`), including time passing.

use super::state::{INF, SAT, shift};
use super::{Client, Ending, Hb, ModelState, Phase, ProtocolModel, Relabel, Task};
use crate::config::Variant;

/// One step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// A client sends its request to an engine.
    Send {
        /// The client.
        client: u8,
        /// The engine.
        engine: u8,
    },
    /// A request in `begin` makes its next store call.
    Begin {
        /// The request.
        task: u8,
    },
    /// A heartbeat.
    Beat {
        /// The request.
        task: u8,
    },
    /// The handler makes its external call.
    Effect {
        /// The request.
        task: u8,
    },
    /// The handler ends.
    Return {
        /// The request.
        task: u8,
        /// How.
        ending: Ending,
    },
    /// The handler hangs.
    Hang {
        /// The request.
        task: u8,
    },
    /// The engine tries the finishing write.
    Settle {
        /// The request.
        task: u8,
    },
    /// The client stops waiting (timeout, disconnect: the future is dropped).
    Timeout {
        /// The client.
        client: u8,
    },
    /// The engine's process is killed and restarts empty.
    Crash {
        /// The engine.
        engine: u8,
    },
    /// The engine stalls.
    Pause {
        /// The engine.
        engine: u8,
    },
    /// The engine resumes.
    Resume {
        /// The engine.
        engine: u8,
    },
    /// The engine loses the store.
    StoreCut {
        /// The engine.
        engine: u8,
    },
    /// The engine reaches the store again.
    StoreBack {
        /// The engine.
        engine: u8,
    },
    /// Time advances one tick.
    Tick,
}

impl ProtocolModel {
    /// One step, and how it relabelled clients and engines (for traces).
    pub fn step(&self, last: &ModelState, action: Action) -> Option<(ModelState, Relabel)> {
        let mut s = last.clone();
        match action {
            Action::Send { client, engine } => {
                let spec = self.cfg.clients[usize::from(client)];
                s.clients[usize::from(client)] = Client::Waiting;
                s.tasks.push(Task {
                    engine,
                    client: Some(client),
                    scope: spec.scope,
                    body: spec.body,
                    old_life: false,
                    effect: false,
                    phase: Phase::Begin {
                        seen: None,
                        inserts: 0,
                        races: 0,
                    },
                    held: None,
                });
            }
            Action::Begin { task } => {
                self.begin(&mut s, usize::from(task));
            }
            Action::Beat { task } => self.heartbeat(&mut s, usize::from(task)),
            Action::Effect { task } => {
                let t = &mut s.tasks[usize::from(task)];
                t.effect = true;
                if !t.old_life {
                    let rk = self.record_key(t.scope);
                    let life = &mut s.lives[rk];
                    life.ext = (life.ext + 1).min(SAT);
                }
            }
            Action::Return { task, ending } => {
                let t = &mut s.tasks[usize::from(task)];
                if let Some(h) = t.held.as_mut() {
                    h.due = true;
                    t.phase = Phase::Finishing {
                        ending,
                        until: h.deadline.saturating_add(self.cfg.lease).min(INF - 1),
                    };
                }
            }
            Action::Hang { task } => {
                if let Phase::Running { hung, .. } = &mut s.tasks[usize::from(task)].phase {
                    *hung = true;
                }
                s.budget.hangs -= 1;
            }
            Action::Settle { task } => self.settle(&mut s, usize::from(task)),
            Action::Timeout { client } => {
                s.clients[usize::from(client)] = Client::Idle;
                if let Some(i) = s.tasks.iter().position(|t| t.client == Some(client)) {
                    s.tasks[i].client = None;
                    if self.variant() == Variant::ReleaseOnCancel
                        && matches!(s.tasks[i].phase, Phase::Running { .. })
                    {
                        self.release_on_cancel(&mut s, i);
                    }
                }
            }
            Action::Crash { engine } => {
                s.budget.crashes -= 1;
                s.engines[usize::from(engine)].paused = false;
                let mut i = 0;
                while i < s.tasks.len() {
                    let t = s.tasks[i];
                    if t.engine != engine || matches!(t.phase, Phase::Orphan { .. }) {
                        i += 1;
                    } else if self.holds_key(&s, &t) {
                        let task = &mut s.tasks[i];
                        task.client = None;
                        task.phase = Phase::Orphan { killed: true };
                        i += 1;
                    } else {
                        s.tasks.remove(i);
                    }
                }
            }
            Action::Pause { engine } | Action::StoreCut { engine } => {
                let e = &mut s.engines[usize::from(engine)];
                if matches!(action, Action::Pause { .. }) {
                    e.paused = true;
                    s.budget.pauses -= 1;
                } else {
                    e.outage = true;
                    s.budget.outages -= 1;
                }
                for t in s.tasks.iter_mut().filter(|t| t.engine == engine) {
                    if let Some(h) = t.held.as_mut() {
                        h.cut_now = true;
                        h.cut_seen = true;
                    }
                }
            }
            Action::Resume { engine } => s.engines[usize::from(engine)].paused = false,
            Action::StoreBack { engine } => s.engines[usize::from(engine)].outage = false,
            Action::Tick => self.tick(&mut s),
        }
        let relabel = self.normalize(&mut s);
        if s == *last { None } else { Some((s, relabel)) }
    }

    fn tick(&self, s: &mut ModelState) {
        let max_skew = self.cfg.max_skew();
        for rk in 0..s.store.len() {
            if let Some(r) = s.store[rk].as_mut() {
                r.tick();
                if r.expires == 0 {
                    // Expired on every clock: gone, and its life is over.
                    s.store[rk] = None;
                    self.new_life(s, rk);
                }
            }
        }
        for i in 0..s.tasks.len() {
            let engine = s.engines[usize::from(s.tasks[i].engine)];
            let t = &mut s.tasks[i];
            match &mut t.phase {
                Phase::Begin { seen, .. } => {
                    if let Some(r) = seen.as_mut() {
                        r.tick();
                    }
                }
                Phase::Running { hold, hb, .. } => {
                    if *hb == Hb::Active {
                        *hold = hold.saturating_add(1).min(self.cfg.max_hold.unwrap_or(0));
                    }
                }
                Phase::Finishing { until, .. } => *until = shift(*until),
                Phase::Orphan { .. } => {}
            }
            let orphan = matches!(t.phase, Phase::Orphan { .. });
            if let Some(h) = t.held.as_mut() {
                h.deadline = shift(h.deadline);
                if h.required {
                    h.cut_off &= h.cut_now;
                }
                h.required = h.deadline > max_skew;
                h.cut_now = engine.outage || engine.paused;
                h.cut_seen |= h.cut_now;
                h.due = !orphan;
            }
        }
    }
}
