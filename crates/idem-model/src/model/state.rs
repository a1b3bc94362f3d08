//! The state of the model: the compact record ([`Rec`]) and its conversion
//! to and from idem-core's [`Record`], the requests ([`Task`], [`Phase`],
//! [`Held`]), clients, engines, fault budgets, per-key lives, and the whole
//! [`ModelState`]; and model time (ticks relative to "now").

use idem_core::store::{FencingToken, Record, State};
use idem_core::{FailureKind, Fingerprint, Outcome, Timestamp};

/// Milliseconds per tick.
pub const TICK_MS: u64 = 1_000;
/// The model's "now" on the slowest clock, in milliseconds.
pub(super) const BASE_MS: u64 = 1_000_000_000;
/// "Later than anything the model does", in ticks (an unbounded TTL).
pub(super) const FAR_TICKS: u64 = 10_000;
/// A relative time too far away to matter.
pub const INF: u8 = u8::MAX;
/// Counters saturate here (they only need to tell 0, 1 and "more").
pub(super) const SAT: u8 = 7;

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

pub(super) fn shift(r: u8) -> u8 {
    if r == INF { INF } else { r.saturating_sub(1) }
}

pub(super) fn fingerprint(id: u8) -> Fingerprint {
    Fingerprint::from_bytes([id.wrapping_add(1); 32])
}

pub(super) fn fingerprint_id(fp: &Fingerprint) -> u8 {
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
    pub(super) fn outcome(self) -> Outcome {
        Outcome::new(vec![self.token, self.scope, self.body, self.kind])
    }
    pub(super) fn from_outcome(o: &Outcome) -> Self {
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
        Record::from_parts(
            fingerprint(self.fp),
            state,
            ts(0),
            ts(0),
            ts(self.expires),
            1,
        )
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

    pub(super) fn in_flight_under(&self, token: u8) -> bool {
        matches!(self.state, RState::InFlight { token: t, .. } if t == token)
    }

    pub(super) fn map_tokens(&mut self, f: &mut impl FnMut(u8) -> u8) {
        match &mut self.state {
            RState::InFlight { token, .. } => *token = f(*token),
            RState::Completed { token, outcome } | RState::Failed { token, outcome, .. } => {
                *token = f(*token);
                outcome.token = f(outcome.token);
            }
        }
    }

    pub(super) fn tick(&mut self) {
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
