//! What an engine does around idem-core's pure functions: the claim loop of
//! `Engine::begin` (store calls and [`decide`]), the heartbeat, settling a
//! claim when the handler ends, and ending a request; with the bookkeeping
//! the properties judge (violations, effects per life, named windows).

use idem_core::machine::{Decision, Fenced, ReclaimReason, decide};
use idem_core::store::{FencingToken, Record, State};
use idem_core::{FailureKind, Timestamp};

use super::state::{SAT, fingerprint};
use super::{
    Client, Ending, Hb, Held, Life, ModelState, Oid, Phase, ProtocolModel, RState, Rec, Task,
    V_FOREIGN, V_REPLAY, V_STALE,
};
use crate::config::Variant;

enum Write {
    /// The store could not be reached.
    Unreachable,
    /// The store refused: the lease is lost.
    Lost,
    /// Written.
    Done,
}

/// What a request's client is told.
enum Answer {
    /// A final answer, possibly carrying a stored or fresh outcome.
    Final,
    /// Try again (409, 503, lost lease, contention).
    Retry,
}

impl ProtocolModel {
    fn answer(s: &mut ModelState, client: Option<u8>, answer: &Answer) {
        if let Some(c) = client {
            s.clients[usize::from(c)] = match answer {
                Answer::Final => Client::Done,
                Answer::Retry => Client::Idle,
            };
        }
    }

    /// The client of task `t` gets `oid` (fresh or replayed).
    fn deliver(&self, s: &mut ModelState, t: &Task, oid: Oid, replay: bool) {
        if t.client.is_none() {
            return;
        }
        if (oid.scope, oid.body) != (t.scope, t.body) {
            s.violations |= V_FOREIGN;
        }
        if replay && s.lives[self.task_rk(t)].first != Some(oid) {
            s.violations |= V_REPLAY;
        }
    }

    fn fresh_token(s: &ModelState) -> u8 {
        let mut max = 0;
        let mut see = |t: u8| max = max.max(t);
        for r in s.store.iter().flatten() {
            see(r.token());
            if let RState::Completed { outcome, .. } | RState::Failed { outcome, .. } = r.state {
                see(outcome.token);
            }
        }
        for l in &s.lives {
            if let Some(o) = l.first {
                see(o.token);
            }
        }
        for t in &s.tasks {
            if let Some(h) = t.held {
                see(h.token);
            }
            if let Phase::Begin { seen: Some(r), .. } = t.phase {
                see(r.token());
            }
        }
        max + 1
    }

    pub(super) fn new_life(&self, s: &mut ModelState, rk: usize) {
        s.lives[rk] = Life::default();
        for i in 0..s.tasks.len() {
            if self.task_rk(&s.tasks[i]) == rk && s.tasks[i].held.is_some() {
                s.tasks[i].old_life = true;
            }
        }
    }

    /// A claim of `rk` takes over from `old` (its lease lapsed): does that
    /// fall in a named window?
    fn takeover(&self, s: &mut ModelState, rk: usize, old: u8) {
        let holder = s.tasks.iter().find(|t| {
            self.task_rk(t) == rk && !t.old_life && t.held.is_some_and(|h| h.token == old)
        });
        let excused = holder.is_some_and(|t| {
            matches!(t.phase, Phase::Orphan { killed: true })
                || t.held.is_some_and(|h| h.cut_off && h.cut_seen)
        });
        if excused {
            let life = &mut s.lives[rk];
            life.windows = (life.windows + 1).min(SAT);
        }
    }

    fn claimed(&self, s: &mut ModelState, ti: usize, rec: Rec) {
        let rk = self.task_rk(&s.tasks[ti]);
        s.store[rk] = Some(rec);
        let (token, deadline) = match rec.state {
            RState::InFlight { token, deadline } => (token, deadline),
            _ => (0, 0),
        };
        let t = &mut s.tasks[ti];
        t.old_life = false;
        t.phase = Phase::Running {
            hold: 0,
            hb: Hb::Active,
            hung: false,
        };
        t.held = Some(Held {
            token,
            deadline,
            due: false,
            cut_off: true,
            cut_now: false,
            cut_seen: false,
            required: false,
        });
    }

    /// One store call of `Engine::begin`, and the decision on what it returned.
    pub(crate) fn begin(&self, s: &mut ModelState, ti: usize) -> &'static str {
        let t = s.tasks[ti];
        let Phase::Begin {
            mut seen,
            mut inserts,
            mut races,
        } = t.phase
        else {
            return "";
        };
        if s.engines[usize::from(t.engine)].outage {
            // Fail closed: 503 store-unavailable, the handler does not run.
            Self::answer(s, t.client, &Answer::Retry);
            self.end_task(s, ti);
            return "store unreachable: 503, the handler does not run; client will retry";
        }
        let now = self.now(t.engine);
        let fp = fingerprint(self.fp_id(t.body));
        let rk = self.task_rk(&t);
        let seen_record = seen.map(|r| r.to_record());
        match decide(seen_record.as_ref(), &fp, now) {
            Decision::Claim => {
                inserts = inserts.saturating_add(1);
                match self.live(s, rk, t.engine) {
                    None => {
                        // The caller's clock says whether the old record's
                        // life is over.
                        if s.store[rk].is_some_and(|r| r.to_record().is_expired(now)) {
                            self.new_life(s, rk);
                        }
                        let token = Self::fresh_token(s);
                        let claim = Record::new_claim(
                            fp,
                            FencingToken::from_u128(u128::from(token)),
                            now,
                            &self.policy,
                        );
                        self.claimed(s, ti, Rec::from_record(&claim));
                        return "insert_if_absent: CLAIMS the key";
                    }
                    Some(current) => {
                        seen = Some(current);
                        if inserts > 1 || self.variant() == Variant::ExistsCountsAsRace {
                            races = races.saturating_add(1);
                        }
                    }
                }
            }
            Decision::Reclaim(reason) => {
                let live = self.live(s, rk, t.engine);
                match (seen, live) {
                    (Some(expected), Some(current)) if expected == current => {
                        let token = Self::fresh_token(s);
                        let next = expected.to_record().reclaim(
                            FencingToken::from_u128(u128::from(token)),
                            now,
                            &self.policy,
                        );
                        if reason == ReclaimReason::LeaseExpired {
                            self.takeover(s, rk, expected.token());
                        }
                        self.claimed(s, ti, Rec::from_record(&next));
                        return if reason == ReclaimReason::LeaseExpired {
                            "compare-and-swap: TAKES OVER the lapsed lease"
                        } else {
                            "compare-and-swap: claims again after a retryable failure"
                        };
                    }
                    _ => {
                        seen = live;
                        races = races.saturating_add(1);
                    }
                }
            }
            // Only reached with a record seen: answered below.
            Decision::Replay | Decision::InProgress { .. } | Decision::Mismatch => {}
        }
        if u32::from(races) > self.policy.max_cas_retries {
            // Contention: 409, try again.
            Self::answer(s, t.client, &Answer::Retry);
            self.end_task(s, ti);
            return "more lost races than max_cas_retries: Contention (409); client will retry";
        }
        let seen_record = seen.map(|r| r.to_record());
        match decide(seen_record.as_ref(), &fp, now) {
            Decision::Claim | Decision::Reclaim(_) => {
                s.tasks[ti].phase = Phase::Begin {
                    seen,
                    inserts,
                    races,
                };
                "the store call found the key or lost a race; decides again"
            }
            Decision::Replay => {
                if let Some(RState::Completed { outcome, .. } | RState::Failed { outcome, .. }) =
                    seen.map(|r| r.state)
                {
                    self.deliver(s, &t, outcome, true);
                }
                Self::answer(s, t.client, &Answer::Final);
                self.end_task(s, ti);
                "REPLAY of the stored outcome"
            }
            Decision::InProgress { .. } => {
                Self::answer(s, t.client, &Answer::Retry);
                self.end_task(s, ti);
                "409 in progress; client will retry"
            }
            Decision::Mismatch => {
                Self::answer(s, t.client, &Answer::Final);
                self.end_task(s, ti);
                "422: the key is bound to another request"
            }
        }
    }

    /// A holder's conditional write: `step` builds the next record from the
    /// stored one (the real transition, which checks the fencing token).
    fn holder_write(
        &self,
        s: &mut ModelState,
        ti: usize,
        fenced: bool,
        step: impl Fn(&Record, FencingToken, Timestamp) -> Result<Option<Record>, Fenced>,
    ) -> Write {
        let t = s.tasks[ti];
        let Some(held) = t.held else {
            return Write::Lost;
        };
        if s.engines[usize::from(t.engine)].outage {
            return Write::Unreachable;
        }
        let rk = self.task_rk(&t);
        let Some(current) = self.live(s, rk, t.engine) else {
            return Write::Lost;
        };
        let now = self.now(t.engine);
        let token = FencingToken::from_u128(u128::from(held.token));
        let mut record = current.to_record();
        if !fenced {
            // The broken store: the token is not checked.
            record.state = State::InFlight {
                token,
                lease_deadline: now,
            };
        }
        match step(&record, token, now) {
            Ok(next) => {
                if !current.in_flight_under(held.token) {
                    s.violations |= V_STALE;
                }
                s.store[rk] = next.map(|r| Rec::from_record(&r));
                Write::Done
            }
            Err(_) => Write::Lost,
        }
    }

    fn oid(t: &Task, token: u8, kind: u8) -> Oid {
        Oid {
            token,
            scope: t.scope,
            body: t.body,
            kind,
        }
    }

    pub(super) fn heartbeat(&self, s: &mut ModelState, ti: usize) {
        let t = s.tasks[ti];
        let (Phase::Running { hold, .. }, Some(held)) = (t.phase, t.held) else {
            return;
        };
        let policy = &self.policy;
        let ceiling = self.variant() != Variant::NoHoldCeiling
            && self.cfg.max_hold.is_some_and(|h| hold >= h);
        let result = if ceiling {
            let oid = Self::oid(&t, held.token, 1);
            self.holder_write(s, ti, true, |r, tok, now| {
                r.fail(tok, FailureKind::Unknown, oid.outcome(), now, policy)
                    .map(Some)
            })
        } else {
            self.holder_write(s, ti, true, |r, tok, now| {
                r.extend(tok, now, policy).map(Some)
            })
        };
        let rk = self.task_rk(&t);
        let task = &mut s.tasks[ti];
        let Some(h) = task.held.as_mut() else { return };
        h.due = false;
        let mut hb = Hb::Active;
        match result {
            Write::Done if ceiling => {
                hb = Hb::Ceiling;
                let oid = Self::oid(&t, held.token, 1);
                if !t.old_life {
                    s.lives[rk].first.get_or_insert(oid);
                }
            }
            Write::Done => {
                if let Some(RState::InFlight { deadline, .. }) = s.store[rk].map(|r| r.state) {
                    h.deadline = deadline;
                }
                h.cut_off = true;
                h.cut_seen = false;
                h.required = false;
            }
            Write::Lost => hb = Hb::Lost,
            Write::Unreachable => {
                if self.variant() == Variant::HeartbeatStopsOnError {
                    hb = Hb::Stopped;
                }
            }
        }
        if let Phase::Running { hb: slot, .. } = &mut s.tasks[ti].phase {
            *slot = hb;
        }
    }

    pub(super) fn settle(&self, s: &mut ModelState, ti: usize) {
        let t = s.tasks[ti];
        let (Phase::Finishing { ending, until }, Some(held)) = (t.phase, t.held) else {
            return;
        };
        let policy = &self.policy;
        let fenced = self.variant() != Variant::NoFencingOnCompletion;
        let rk = self.task_rk(&t);
        let result = match ending {
            Ending::Ok => {
                let oid = Self::oid(&t, held.token, 0);
                self.holder_write(s, ti, fenced, |r, tok, now| {
                    r.complete(tok, oid.outcome(), now, policy).map(Some)
                })
            }
            Ending::Ambiguous => {
                let oid = Self::oid(&t, held.token, 1);
                self.holder_write(s, ti, fenced, |r, tok, now| {
                    r.fail(tok, FailureKind::Unknown, oid.outcome(), now, policy)
                        .map(Some)
                })
            }
            Ending::NothingRetryable => {
                let oid = Self::oid(&t, held.token, 2);
                self.holder_write(s, ti, fenced, |r, tok, now| {
                    r.fail(tok, FailureKind::Retryable, oid.outcome(), now, policy)
                        .map(Some)
                })
            }
            Ending::NothingRelease => self.holder_write(s, ti, true, |r, tok, now| {
                r.check_holder(tok, now).map(|()| None)
            }),
        };
        let fresh = |kind| Self::oid(&t, held.token, kind);
        match result {
            Write::Done => {
                match ending {
                    Ending::Ok => {
                        let oid = fresh(0);
                        if !t.old_life {
                            let life = &mut s.lives[rk];
                            life.tx = (life.tx + 1).min(SAT);
                            life.first.get_or_insert(oid);
                        }
                        self.deliver(s, &t, oid, false);
                        Self::answer(s, t.client, &Answer::Final);
                    }
                    Ending::Ambiguous => {
                        if !t.old_life {
                            s.lives[rk].first.get_or_insert(fresh(1));
                        }
                        Self::answer(s, t.client, &Answer::Final);
                    }
                    Ending::NothingRelease | Ending::NothingRetryable => {
                        Self::answer(s, t.client, &Answer::Retry);
                    }
                }
                self.end_task(s, ti);
            }
            Write::Lost => {
                // 409: the lease was lost; the retry gets what is stored.
                Self::answer(s, t.client, &Answer::Retry);
                self.end_task(s, ti);
            }
            Write::Unreachable => {
                let give_up =
                    self.variant() == Variant::CompletionTriedOnce || until <= self.skew(t.engine);
                if let Some(h) = s.tasks[ti].held.as_mut() {
                    h.due = false;
                }
                if give_up {
                    // The response goes out unstored (a result), or as an
                    // error; the key stays in flight.
                    match ending {
                        Ending::Ok => {
                            self.deliver(s, &t, fresh(0), false);
                            Self::answer(s, t.client, &Answer::Final);
                        }
                        Ending::Ambiguous => Self::answer(s, t.client, &Answer::Final),
                        Ending::NothingRelease | Ending::NothingRetryable => {
                            Self::answer(s, t.client, &Answer::Retry);
                        }
                    }
                    let task = &mut s.tasks[ti];
                    task.client = None;
                    task.phase = Phase::Orphan { killed: false };
                }
            }
        }
    }

    /// The request ends. If the store still has the key in flight under its
    /// token (its own clock says the record expired, or its last write
    /// failed), it is kept as an orphan, to judge a later takeover.
    fn end_task(&self, s: &mut ModelState, ti: usize) {
        let t = s.tasks[ti];
        if self.holds_key(s, &t) {
            let task = &mut s.tasks[ti];
            task.client = None;
            task.phase = Phase::Orphan { killed: false };
        } else {
            s.tasks.remove(ti);
        }
    }

    pub(super) fn release_on_cancel(&self, s: &mut ModelState, ti: usize) {
        let _ = self.holder_write(s, ti, true, |r, tok, now| {
            r.check_holder(tok, now).map(|()| None)
        });
        self.end_task(s, ti);
    }
}
