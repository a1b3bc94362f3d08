//! The protocol as a `stateright` model: a store, engines, clients, handlers,
//! time, and the faults between them.
//!
//! Every decision and every record transition is made by idem-core's own pure
//! functions ([`decide`], [`Record::new_claim`], [`Record::reclaim`],
//! [`Record::complete`], [`Record::fail`], [`Record::extend`],
//! [`Record::check_holder`], [`Record::is_expired`]): the model keeps a compact
//! copy of each record (times relative to "now", tokens renumbered) and turns
//! it into a real [`Record`] for every call. What the model adds is what the
//! engine and the integration do around those functions (the claim loop, the
//! heartbeat, settling a claim, run to completion) and the environment.
//!
//! Time advances in ticks. Engine steps take no time; a tick can pass only
//! once every engine that is not paused has made the store calls it owes (a
//! claim in progress, a due heartbeat, a due finishing write). A paused
//! engine owes nothing: that is how a zombie is made.
//!
//! [`decide`]: idem_core::machine::decide
//! [`Record`]: idem_core::store::Record
//! [`Record::new_claim`]: idem_core::store::Record::new_claim
//! [`Record::reclaim`]: idem_core::store::Record::reclaim
//! [`Record::complete`]: idem_core::store::Record::complete
//! [`Record::fail`]: idem_core::store::Record::fail
//! [`Record::extend`]: idem_core::store::Record::extend
//! [`Record::check_holder`]: idem_core::store::Record::check_holder
//! [`Record::is_expired`]: idem_core::store::Record::is_expired
//!
//! # Layout
//!
//! One model, [`ProtocolModel`], whose `impl` blocks are split by concern:
//! this module holds the model, its configuration-derived queries and the
//! [`stateright::Model`] impl (which actions are offered where); `state.rs`
//! the state types; `action.rs` the [`Action`]s and [`ProtocolModel::step`];
//! `engine.rs` what an engine does (begin, heartbeat, settle); `normalize.rs`
//! the symmetry reduction; `properties.rs` the properties checked. Every
//! public item is re-exported here, at its `model::` path.

mod action;
mod engine;
mod normalize;
mod properties;
mod state;

use std::time::Duration;

use idem_core::{Policy, Timestamp};
use stateright::{Model, Property};

use crate::config::{Config, Variant};
pub use action::Action;
pub use normalize::Relabel;
pub use properties::{
    EXT_ONCE, FENCED, LIVE_ANSWER, LIVE_SETTLED, NO_FOREIGN, REPLAY_FIRST, SOMETIMES_REPLAYABLE,
    SOMETIMES_WINDOW, TX_ONCE, all_answered, settled,
};
pub use state::{
    Budget, Client, Ending, Engine, Hb, Held, INF, Life, ModelState, Oid, Phase, RState, Rec,
    TICK_MS, Task, V_FOREIGN, V_REPLAY, V_STALE,
};
use state::{FAR_TICKS, ts};

/// The model of one configuration.
#[derive(Clone, Debug)]
pub struct ProtocolModel {
    /// What is explored.
    pub cfg: Config,
    policy: Policy,
}

impl ProtocolModel {
    /// The model of `cfg`.
    pub fn new(cfg: Config) -> Self {
        let ttl = cfg.ttl.map_or(FAR_TICKS, u64::from);
        let policy = Policy::default()
            .with_lease(Duration::from_millis(u64::from(cfg.lease) * TICK_MS))
            .with_ttl(Duration::from_millis(ttl * TICK_MS))
            .with_max_cas_retries(u32::from(cfg.max_cas_retries))
            .with_max_hold(
                cfg.max_hold
                    .map(|h| Duration::from_millis(u64::from(h) * TICK_MS)),
            );
        Self { cfg, policy }
    }

    /// The policy the engines use (lease and TTL in ticks of [`TICK_MS`]).
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    fn variant(&self) -> Variant {
        self.cfg.variant
    }

    /// The engine's now.
    fn now(&self, engine: u8) -> Timestamp {
        ts(self.skew(engine))
    }

    fn skew(&self, engine: u8) -> u8 {
        self.cfg
            .skews
            .get(usize::from(engine))
            .copied()
            .unwrap_or(0)
    }

    /// The now the store uses to decide expiry for a call from `engine`.
    fn store_now(&self, engine: u8) -> Timestamp {
        if self.variant() == Variant::ServerClockExpiry {
            ts(self.cfg.server_clock_ahead)
        } else {
            self.now(engine)
        }
    }

    /// The record key a request maps to.
    pub fn record_key(&self, scope: u8) -> usize {
        if self.variant() == Variant::KeyIgnoresScope {
            0
        } else {
            usize::from(scope)
        }
    }

    /// The fingerprint id a request maps to.
    fn fp_id(&self, body: u8) -> u8 {
        if self.variant() == Variant::FingerprintIgnoresBody {
            0
        } else {
            body
        }
    }

    fn live(&self, s: &ModelState, rk: usize, engine: u8) -> Option<Rec> {
        let at = self.store_now(engine);
        s.store[rk].filter(|r| !r.to_record().is_expired(at))
    }

    fn n_keys(&self) -> usize {
        if self.variant() == Variant::KeyIgnoresScope {
            1
        } else {
            usize::from(self.cfg.clients.iter().map(|c| c.scope).max().unwrap_or(0)) + 1
        }
    }

    fn task_rk(&self, t: &Task) -> usize {
        self.record_key(t.scope)
    }

    /// Whether `task` still holds the record of its key.
    fn holds_key(&self, s: &ModelState, t: &Task) -> bool {
        match (t.held, s.store[self.task_rk(t)]) {
            (Some(h), Some(r)) => r.in_flight_under(h.token),
            _ => false,
        }
    }

    fn urgent(&self, s: &ModelState, t: &Task) -> bool {
        if s.engines[usize::from(t.engine)].paused {
            return false;
        }
        match t.phase {
            Phase::Begin { .. } => true,
            Phase::Running { hb, .. } => hb == Hb::Active && t.held.is_some_and(|h| h.due),
            Phase::Finishing { .. } => t.held.is_some_and(|h| h.due),
            Phase::Orphan { .. } => false,
        }
    }

    fn engine_has_tasks(s: &ModelState, e: u8) -> bool {
        s.tasks
            .iter()
            .any(|t| t.engine == e && !matches!(t.phase, Phase::Orphan { .. }))
    }

    fn engine_has_holder(s: &ModelState, e: u8) -> bool {
        s.tasks.iter().any(|t| {
            t.engine == e && matches!(t.phase, Phase::Running { .. } | Phase::Finishing { .. })
        })
    }

    fn live_tasks(s: &ModelState) -> usize {
        s.tasks
            .iter()
            .filter(|t| !matches!(t.phase, Phase::Orphan { .. }))
            .count()
    }
}

impl Model for ProtocolModel {
    type State = ModelState;
    type Action = Action;

    fn init_states(&self) -> Vec<ModelState> {
        let keys = self.n_keys();
        vec![ModelState {
            store: vec![None; keys],
            lives: vec![Life::default(); keys],
            engines: vec![Engine::default(); self.cfg.skews.len()],
            tasks: Vec::new(),
            clients: vec![Client::Idle; self.cfg.clients.len()],
            budget: Budget {
                crashes: self.cfg.crashes,
                pauses: self.cfg.pauses,
                outages: self.cfg.outages,
                hangs: self.cfg.hangs,
            },
            violations: 0,
        }]
    }

    fn actions(&self, s: &ModelState, actions: &mut Vec<Action>) {
        let n_engines = u8::try_from(s.engines.len()).unwrap_or(0);
        let room = Self::live_tasks(s) < usize::from(self.cfg.max_tasks);
        for (c, client) in s.clients.iter().enumerate() {
            let client_id = u8::try_from(c).unwrap_or(0);
            match client {
                Client::Idle if room => {
                    for e in 0..n_engines {
                        if !s.engines[usize::from(e)].paused {
                            actions.push(Action::Send {
                                client: client_id,
                                engine: e,
                            });
                        }
                    }
                }
                Client::Waiting => {
                    let task = s.tasks.iter().find(|t| t.client == Some(client_id));
                    // A client gives up on a request whose handler runs (or
                    // settles) or that is gone (its engine crashed); a claim
                    // in progress answers within the tick unless its engine
                    // stalls, and then its client waits for it.
                    let may_give_up = task.is_none_or(|t| {
                        matches!(t.phase, Phase::Running { .. } | Phase::Finishing { .. })
                    });
                    if may_give_up {
                        actions.push(Action::Timeout { client: client_id });
                    }
                }
                _ => {}
            }
        }
        for (i, t) in s.tasks.iter().enumerate() {
            let task = u8::try_from(i).unwrap_or(0);
            if s.engines[usize::from(t.engine)].paused {
                continue;
            }
            match t.phase {
                Phase::Begin { .. } => actions.push(Action::Begin { task }),
                Phase::Running { hb, hung, .. } => {
                    if hb == Hb::Active && t.held.is_some_and(|h| h.due) {
                        actions.push(Action::Beat { task });
                    }
                    if !hung {
                        if !t.effect {
                            actions.push(Action::Effect { task });
                        }
                        // Declaring that nothing happened is possible only
                        // before the effect.
                        let nothing = (self.cfg.declare_nothing && !t.effect)
                            .then_some([Ending::NothingRelease, Ending::NothingRetryable]);
                        let endings = [Ending::Ok, Ending::Ambiguous]
                            .into_iter()
                            .chain(nothing.into_iter().flatten());
                        actions.extend(endings.map(|ending| Action::Return { task, ending }));
                        if s.budget.hangs > 0 {
                            actions.push(Action::Hang { task });
                        }
                    }
                }
                Phase::Finishing { .. } => {
                    if t.held.is_some_and(|h| h.due) {
                        actions.push(Action::Settle { task });
                    }
                }
                Phase::Orphan { .. } => {}
            }
        }
        for e in 0..n_engines {
            let engine = s.engines[usize::from(e)];
            if s.budget.crashes > 0 && Self::engine_has_tasks(s, e) {
                actions.push(Action::Crash { engine: e });
            }
            if engine.paused {
                actions.push(Action::Resume { engine: e });
            } else if s.budget.pauses > 0 && Self::engine_has_holder(s, e) {
                actions.push(Action::Pause { engine: e });
            }
            if engine.outage {
                actions.push(Action::StoreBack { engine: e });
            } else if s.budget.outages > 0 && Self::engine_has_tasks(s, e) {
                actions.push(Action::StoreCut { engine: e });
            }
        }
        if !s.tasks.iter().any(|t| self.urgent(s, t)) {
            actions.push(Action::Tick);
        }
    }

    fn next_state(&self, last: &ModelState, action: Action) -> Option<ModelState> {
        self.step(last, action).map(|(s, _)| s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        self.property_list()
    }

    fn format_action(&self, action: &Action) -> String {
        format!("{action:?}")
    }
}
