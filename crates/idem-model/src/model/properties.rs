//! The properties checked: the safety invariants, the reachability checks
//! that keep the model from being vacuous, and the liveness goals (checked
//! by [`check()`](crate::check()) on the whole state graph).

use stateright::Property;

use super::{Client, Hb, ModelState, Phase, ProtocolModel, RState, V_FOREIGN, V_REPLAY, V_STALE};

impl ProtocolModel {
    pub(super) fn property_list(&self) -> Vec<Property<Self>> {
        vec![
            Property::always(TX_ONCE, |_: &Self, s: &ModelState| {
                s.lives.iter().all(|l| l.tx <= 1)
            }),
            Property::always(EXT_ONCE, |_: &Self, s: &ModelState| {
                s.lives.iter().all(|l| l.ext <= 1 + l.windows)
            }),
            Property::always(REPLAY_FIRST, |_: &Self, s: &ModelState| {
                s.violations & V_REPLAY == 0
            }),
            Property::always(NO_FOREIGN, |_: &Self, s: &ModelState| {
                s.violations & V_FOREIGN == 0
            }),
            Property::always(FENCED, |_: &Self, s: &ModelState| {
                s.violations & V_STALE == 0
            }),
            Property::sometimes(SOMETIMES_REPLAYABLE, |_: &Self, s: &ModelState| {
                s.store
                    .iter()
                    .flatten()
                    .any(|r| matches!(r.state, RState::Completed { .. }))
                    && s.clients.iter().filter(|c| **c == Client::Done).count() >= 2
            }),
            Property::sometimes(SOMETIMES_WINDOW, |_: &Self, s: &ModelState| {
                s.lives.iter().any(|l| l.ext >= 2)
            }),
        ]
    }
}

/// Safety: a transactional effect commits at most once per record life.
pub const TX_ONCE: &str = "transactional effect commits at most once per (scope, key)";
/// Safety: an external effect happens at most once, except in named windows.
pub const EXT_ONCE: &str = "external effect at most once outside the named windows";
/// Safety: every replay returns the first completion's outcome.
pub const REPLAY_FIRST: &str = "every replay returns the first completion";
/// Safety: no answer carries another request's outcome.
pub const NO_FOREIGN: &str = "another fingerprint or scope never gets that outcome";
/// Safety: a stale token never changes a record.
pub const FENCED: &str = "a stale fencing token never changes a record";
/// Liveness: every client that keeps retrying gets a final answer.
pub const LIVE_ANSWER: &str = "every retrying client eventually gets a final answer";
/// Liveness: nothing stays in flight forever.
pub const LIVE_SETTLED: &str = "no key stays in flight forever";
/// Sanity (must be reachable): a completed key replayed to a second client.
pub const SOMETIMES_REPLAYABLE: &str = "(reachable) a completed key answers two clients";
/// Sanity (must be reachable): an effect repeated inside a named window.
pub const SOMETIMES_WINDOW: &str = "(reachable) an external effect repeats inside a named window";

/// The liveness goals: every client done.
pub fn all_answered(_: &ProtocolModel, s: &ModelState) -> bool {
    s.clients.iter().all(|c| *c == Client::Done)
}

/// The liveness goal: no record is kept in flight by a heartbeat.
pub fn settled(m: &ProtocolModel, s: &ModelState) -> bool {
    !s.tasks
        .iter()
        .any(|t| matches!(t.phase, Phase::Running { hb: Hb::Active, .. }) && m.holds_key(s, t))
}
