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

use std::hash::{Hash, Hasher};
use std::time::Duration;

use idem_core::{
    Decision, FailureKind, Fenced, FencingToken, Fingerprint, Outcome, Policy, ReclaimReason,
    Record, State, Timestamp, decide,
};
use stateright::{Model, Property};

use crate::config::{Config, Variant};

/// Milliseconds per tick.
pub const TICK_MS: u64 = 1_000;
/// The model's "now" on the slowest clock, in milliseconds.
const BASE_MS: u64 = 1_000_000_000;
/// "Later than anything the model does", in ticks (an unbounded TTL).
const FAR_TICKS: u64 = 10_000;
/// A relative time too far away to matter.
pub const INF: u8 = u8::MAX;
/// Counters saturate here (they only need to tell 0, 1 and "more").
const SAT: u8 = 7;

/// The absolute timestamp of a time `rel` ticks after the model's now.
pub(crate) fn ts(rel: u8) -> Timestamp {
    let ticks = if rel == INF {
        FAR_TICKS
    } else {
        u64::from(rel)
    };
    Timestamp::from_millis(BASE_MS + ticks * TICK_MS)
}

/// How many ticks after the model's now `t` is (0 for the past, `INF` for far).
pub(crate) fn rel(t: Timestamp) -> u8 {
    let ticks = t.as_millis().saturating_sub(BASE_MS) / TICK_MS;
    u8::try_from(ticks).unwrap_or(INF)
}

fn shift(r: u8) -> u8 {
    if r == INF { INF } else { r.saturating_sub(1) }
}

fn fingerprint(id: u8) -> Fingerprint {
    Fingerprint::from_bytes([id.wrapping_add(1); 32])
}

fn fingerprint_id(fp: &Fingerprint) -> u8 {
    fp.as_bytes()[0].wrapping_sub(1)
}

/// What a finished claim stored, identified by who produced it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Oid {
    /// The claim (fencing token) whose work produced it.
    pub token: u8,
    /// The scope of the request that produced it.
    pub scope: u8,
    /// The body of the request that produced it.
    pub body: u8,
    /// 0: a result; 1: outcome unknown; 2: "nothing happened".
    pub kind: u8,
}

impl Oid {
    fn outcome(self) -> Outcome {
        Outcome::new(vec![self.token, self.scope, self.body, self.kind])
    }
    fn from_outcome(o: &Outcome) -> Self {
        let b = o.as_bytes();
        let at = |i: usize| b.get(i).copied().unwrap_or(0);
        Self {
            token: at(0),
            scope: at(1),
            body: at(2),
            kind: at(3),
        }
    }
}

/// The compact form of a record's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RState {
    /// In flight under `token` until `deadline`.
    InFlight {
        /// The holder's token.
        token: u8,
        /// The lease deadline (relative).
        deadline: u8,
    },
    /// Completed with `outcome`.
    Completed {
        /// The token that completed it.
        token: u8,
        /// The stored outcome.
        outcome: Oid,
    },
    /// Failed.
    Failed {
        /// The token that failed it.
        token: u8,
        /// The kind of failure.
        kind: FailureKind,
        /// The stored outcome.
        outcome: Oid,
    },
}

/// The compact form of a [`Record`]: what the decisions depend on. Creation
/// and update times and the attempt count are not kept (nothing decides on
/// them); revisions are modelled by comparing whole records (a new record
/// always differs from an older one: tokens are unique and deadlines only
/// move later).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rec {
    /// The fingerprint id (0: body A, 1: body B).
    pub fp: u8,
    /// The state.
    pub state: RState,
    /// When it expires (relative ticks; `INF`: beyond the model).
    pub expires: u8,
}

impl Rec {
    /// The real record.
    pub fn to_record(&self) -> Record {
        let state = match self.state {
            RState::InFlight { token, deadline } => State::InFlight {
                token: FencingToken::from_u128(u128::from(token)),
                lease_deadline: ts(deadline),
            },
            RState::Completed { token, outcome } => State::Completed {
                token: FencingToken::from_u128(u128::from(token)),
                outcome: outcome.outcome(),
            },
            RState::Failed {
                token,
                kind,
                outcome,
            } => State::Failed {
                token: FencingToken::from_u128(u128::from(token)),
                kind,
                outcome: outcome.outcome(),
            },
        };
        Record {
            fingerprint: fingerprint(self.fp),
            state,
            created_at: ts(0),
            updated_at: ts(0),
            expires_at: ts(self.expires),
            attempts: 1,
        }
    }

    /// The compact form of a real record.
    pub fn from_record(r: &Record) -> Self {
        let tok = |t: FencingToken| u8::try_from(t.as_u128()).unwrap_or(u8::MAX);
        let state = match &r.state {
            State::InFlight {
                token,
                lease_deadline,
            } => RState::InFlight {
                token: tok(*token),
                deadline: rel(*lease_deadline),
            },
            State::Completed { token, outcome } => RState::Completed {
                token: tok(*token),
                outcome: Oid::from_outcome(outcome),
            },
            State::Failed {
                token,
                kind,
                outcome,
            } => RState::Failed {
                token: tok(*token),
                kind: *kind,
                outcome: Oid::from_outcome(outcome),
            },
        };
        Self {
            fp: fingerprint_id(&r.fingerprint),
            state,
            expires: rel(r.expires_at),
        }
    }

    /// The token of the claim this record belongs to.
    pub fn token(&self) -> u8 {
        match self.state {
            RState::InFlight { token, .. }
            | RState::Completed { token, .. }
            | RState::Failed { token, .. } => token,
        }
    }

    fn in_flight_under(&self, token: u8) -> bool {
        matches!(self.state, RState::InFlight { token: t, .. } if t == token)
    }

    fn map_tokens(&mut self, f: &mut impl FnMut(u8) -> u8) {
        match &mut self.state {
            RState::InFlight { token, .. } => *token = f(*token),
            RState::Completed { token, outcome } | RState::Failed { token, outcome, .. } => {
                *token = f(*token);
                outcome.token = f(outcome.token);
            }
        }
    }

    fn tick(&mut self) {
        self.expires = shift(self.expires);
        if let RState::InFlight { deadline, .. } = &mut self.state {
            *deadline = shift(*deadline);
        }
    }
}

/// How a handler ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ending {
    /// It returned a result (2xx/4xx): store it.
    Ok,
    /// It ended ambiguously (panic, 5xx without a declaration, inner error,
    /// response body failing mid-stream, shutdown timeout): finish the key
    /// as outcome unknown.
    Ambiguous,
    /// It declared that nothing happened: release the key.
    NothingRelease,
    /// It declared that nothing happened: store a retryable failure.
    NothingRetryable,
}

/// The heartbeat of a running handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hb {
    /// Beating every tick.
    Active,
    /// Stopped after a store error (only the broken variant does this).
    Stopped,
    /// Stopped: the store said the lease is lost (taken over or finished).
    Lost,
    /// Stopped: the hold ceiling finished the key as outcome unknown.
    Ceiling,
}

/// Where a request is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// In `Engine::begin`: `seen` is the record the last store call returned.
    Begin {
        /// What the last store call returned (`None`: nothing, or absent).
        seen: Option<Rec>,
        /// Inserts tried.
        inserts: u8,
        /// Lost races counted against `max_cas_retries`.
        races: u8,
    },
    /// Holds the key; the handler runs with a heartbeat beside it.
    Running {
        /// Ticks held (for the hold ceiling).
        hold: u8,
        /// The heartbeat.
        hb: Hb,
        /// The handler hangs (never returns).
        hung: bool,
    },
    /// The handler ended; the engine settles the claim, retrying store
    /// errors until `until`.
    Finishing {
        /// How the handler ended.
        ending: Ending,
        /// When the engine gives up (relative, its own clock).
        until: u8,
    },
    /// Gone (killed, or gave up settling) while still holding the key: kept
    /// only to judge whether a takeover of its key falls in a named window.
    Orphan {
        /// Killed with its process (as opposed to: gave up settling).
        killed: bool,
    },
}

/// The claim a request holds, as its engine knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Held {
    /// The fencing token.
    pub token: u8,
    /// The lease deadline it last wrote (relative).
    pub deadline: u8,
    /// A store call (heartbeat or finishing write) is due this tick.
    pub due: bool,
    /// Since the last successful write, the holder's engine was cut off from
    /// the store (outage) or paused at some point in every tick in which the
    /// lease was still live for every engine. A takeover of such a holder is
    /// the named window "store unreachable (or process stalled) for a lease".
    pub cut_off: bool,
    /// Whether the engine was cut off or paused at some point this tick.
    pub cut_now: bool,
    /// Whether the engine was cut off or paused at all since the last
    /// successful write (so that a takeover is never excused by clock skew
    /// alone).
    pub cut_seen: bool,
    /// Whether this tick counts for `cut_off` (the lease is still live).
    pub required: bool,
}

/// One request: a client's attempt, run by an engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Task {
    /// The engine running it.
    pub engine: u8,
    /// The client waiting for its answer (`None`: gave up waiting).
    pub client: Option<u8>,
    /// The request's scope.
    pub scope: u8,
    /// The request's body.
    pub body: u8,
    /// Its key expired (and a new life began) since it started.
    pub old_life: bool,
    /// The handler made its external call.
    pub effect: bool,
    /// Where it is.
    pub phase: Phase,
    /// The claim it holds, once it holds one.
    pub held: Option<Held>,
}

/// A client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Client {
    /// About to send (again).
    Idle,
    /// Waiting for an answer.
    Waiting,
    /// Got a final answer.
    Done,
}

/// What happened to one record key during its life (until it expires).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Life {
    /// External effects made by claims of this life.
    pub ext: u8,
    /// Takeovers that fell in a named at-least-once window.
    pub windows: u8,
    /// Effects committed in the same transaction as the completion.
    pub tx: u8,
    /// The first final outcome stored.
    pub first: Option<Oid>,
}

/// An engine instance.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Engine {
    /// Stalled (a zombie when it resumes).
    pub paused: bool,
    /// Cannot reach the store.
    pub outage: bool,
}

/// The fault budgets left.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Budget {
    /// Crashes left.
    pub crashes: u8,
    /// Pauses left.
    pub pauses: u8,
    /// Outages left.
    pub outages: u8,
    /// Hangs left.
    pub hangs: u8,
}

/// A replay answered with an outcome that is not the first one stored.
pub const V_REPLAY: u8 = 1;
/// An answer carried an outcome produced for another scope or body.
pub const V_FOREIGN: u8 = 2;
/// A write by a token that does not hold the record changed it.
pub const V_STALE: u8 = 4;

/// The whole system at one instant.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ModelState {
    /// The store: one record per record key (scope).
    pub store: Vec<Option<Rec>>,
    /// Per record key: what happened during the record's life.
    pub lives: Vec<Life>,
    /// The engines.
    pub engines: Vec<Engine>,
    /// The requests in progress.
    pub tasks: Vec<Task>,
    /// The clients.
    pub clients: Vec<Client>,
    /// The faults left.
    pub budget: Budget,
    /// Violations seen (`V_*` bits).
    pub violations: u8,
}

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

/// The model of one configuration.
#[derive(Clone, Debug)]
pub struct ProtocolModel {
    /// What is explored.
    pub cfg: Config,
    policy: Policy,
}

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

    fn new_life(&self, s: &mut ModelState, rk: usize) {
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

    fn heartbeat(&self, s: &mut ModelState, ti: usize) {
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

    fn settle(&self, s: &mut ModelState, ti: usize) {
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

    fn release_on_cancel(&self, s: &mut ModelState, ti: usize) {
        let _ = self.holder_write(s, ti, true, |r, tok, now| {
            r.check_holder(tok, now).map(|()| None)
        });
        self.end_task(s, ti);
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

    /// Puts a state in a canonical-ish form, so that equal situations are
    /// equal states: drops orphans that no longer hold their key, renumbers
    /// fencing tokens by first appearance, orders the requests, and relabels
    /// interchangeable clients (same request) and engines (same clock). Each
    /// step maps a state to an equivalent one, so the reduction is sound; it
    /// is not guaranteed to be complete.
    fn normalize(&self, s: &mut ModelState) -> Relabel {
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
        let n = s.clients.len();
        let mut map: Vec<Option<u8>> = vec![None; n];
        let mut used = vec![false; n];
        let mut assign = |old: u8, map: &mut Vec<Option<u8>>| {
            if map[usize::from(old)].is_some() {
                return;
            }
            let group = self.client_group(old);
            let spec = self.cfg.clients[usize::from(group)];
            if let Some(new) = (0..n).find(|&i| !used[i] && self.cfg.clients[i] == spec) {
                used[new] = true;
                map[usize::from(old)] = u8::try_from(new).ok();
            }
        };
        for t in &s.tasks {
            if let Some(c) = t.client {
                assign(c, &mut map);
            }
        }
        let mut rest: Vec<u8> = (0..n)
            .filter_map(|i| u8::try_from(i).ok())
            .filter(|&i| map[usize::from(i)].is_none())
            .collect();
        rest.sort_by_key(|&i| match s.clients[usize::from(i)] {
            Client::Idle => 0,
            Client::Waiting => 1,
            Client::Done => 2,
        });
        for c in rest {
            assign(c, &mut map);
        }
        let old = s.clients.clone();
        for (i, m) in map.iter().enumerate() {
            if let Some(new) = m {
                s.clients[usize::from(*new)] = old[i];
            }
        }
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
        let n = s.engines.len();
        let mut map: Vec<Option<u8>> = vec![None; n];
        let mut used = vec![false; n];
        let mut assign = |old: u8, map: &mut Vec<Option<u8>>| {
            if map[usize::from(old)].is_some() {
                return;
            }
            let skew = self.skew(old);
            if let Some(new) =
                (0..n).find(|&i| !used[i] && self.skew(u8::try_from(i).unwrap_or(u8::MAX)) == skew)
            {
                used[new] = true;
                map[usize::from(old)] = u8::try_from(new).ok();
            }
        };
        for t in &s.tasks {
            assign(t.engine, &mut map);
        }
        let mut rest: Vec<u8> = (0..n)
            .filter_map(|i| u8::try_from(i).ok())
            .filter(|&i| map[usize::from(i)].is_none())
            .collect();
        rest.sort_by_key(|&i| {
            let e = s.engines[usize::from(i)];
            (e.paused, e.outage)
        });
        for e in rest {
            assign(e, &mut map);
        }
        let old = s.engines.clone();
        for (i, m) in map.iter().enumerate() {
            if let Some(new) = m {
                s.engines[usize::from(*new)] = old[i];
            }
        }
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
                        actions.push(Action::Return {
                            task,
                            ending: Ending::Ok,
                        });
                        actions.push(Action::Return {
                            task,
                            ending: Ending::Ambiguous,
                        });
                        if self.cfg.declare_nothing && !t.effect {
                            actions.push(Action::Return {
                                task,
                                ending: Ending::NothingRelease,
                            });
                            actions.push(Action::Return {
                                task,
                                ending: Ending::NothingRetryable,
                            });
                        }
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

    fn property_list(&self) -> Vec<Property<Self>> {
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
