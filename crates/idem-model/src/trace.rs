//! Counterexamples as readable step-by-step traces.

use std::fmt::Write as _;

use idem_core::FailureKind;

use crate::config::body_name;
use crate::model::{
    Action, Client, Ending, Hb, INF, ModelState, Phase, ProtocolModel, RState, Rec, Relabel, Task,
};

fn rel_name(r: u8) -> String {
    if r == INF {
        "∞".to_string()
    } else {
        format!("+{r}")
    }
}

fn rec_name(r: &Rec, n: &Names) -> String {
    let state = match r.state {
        RState::InFlight { token, deadline } => {
            format!(
                "in flight #{} (lease until {})",
                n.token(token),
                rel_name(deadline)
            )
        }
        RState::Completed { token, outcome } => format!(
            "completed by #{} (outcome of #{}, s{}{})",
            n.token(token),
            n.token(outcome.token),
            outcome.scope,
            body_name(outcome.body)
        ),
        RState::Failed {
            token,
            kind,
            outcome,
        } => {
            let kind = match kind {
                FailureKind::Retryable => "retryable",
                FailureKind::Permanent => "permanent",
                _ => "outcome unknown",
            };
            format!(
                "failed ({kind}) by #{} (outcome of #{}, s{}{})",
                n.token(token),
                n.token(outcome.token),
                outcome.scope,
                body_name(outcome.body)
            )
        }
    };
    format!(
        "{state}, body {}, expires {}",
        body_name(r.fp),
        rel_name(r.expires)
    )
}

/// The original names of the clients and engines of a state along a trace
/// (the model relabels interchangeable ones as it goes).
#[derive(Clone, Debug)]
pub(crate) struct Names {
    clients: Vec<u8>,
    engines: Vec<u8>,
    /// (token in the state, token as shown): shown tokens count claims in
    /// the order they were made.
    tokens: Vec<(u8, u8)>,
    next_token: u8,
}

impl Names {
    fn identity(s: &ModelState) -> Self {
        let ids = |n: usize| (0..n).map(|i| u8::try_from(i).unwrap_or(u8::MAX)).collect();
        Self {
            clients: ids(s.clients.len()),
            engines: ids(s.engines.len()),
            tokens: Vec::new(),
            next_token: 1,
        }
    }
    fn token(&self, t: u8) -> u8 {
        self.tokens
            .iter()
            .find(|(now, _)| *now == t)
            .map_or(t, |&(_, shown)| shown)
    }
    fn client(&self, c: u8) -> u8 {
        self.clients.get(usize::from(c)).copied().unwrap_or(c)
    }
    fn engine(&self, e: u8) -> u8 {
        self.engines.get(usize::from(e)).copied().unwrap_or(e)
    }
    fn after(&self, relabel: &Relabel) -> Self {
        let apply = |names: &[u8], map: &[u8]| {
            let mut out = names.to_vec();
            for (old, &new) in map.iter().enumerate() {
                if let (Some(slot), Some(name)) = (out.get_mut(usize::from(new)), names.get(old)) {
                    *slot = *name;
                }
            }
            out
        };
        let mut next_token = self.next_token;
        let tokens = relabel
            .tokens
            .iter()
            .map(|&(old, new)| {
                let shown = self
                    .tokens
                    .iter()
                    .find(|(now, _)| *now == old)
                    .map(|&(_, shown)| shown)
                    .unwrap_or_else(|| {
                        next_token += 1;
                        next_token - 1
                    });
                (new, shown)
            })
            .collect();
        Self {
            clients: apply(&self.clients, &relabel.clients),
            engines: apply(&self.engines, &relabel.engines),
            tokens,
            next_token,
        }
    }
}

fn task_name(t: &Task, n: &Names) -> String {
    let who = t.client.map_or_else(
        || "abandoned".to_string(),
        |c| format!("client {}", n.client(c)),
    );
    format!(
        "request s{}{} of {who} on engine {}",
        t.scope,
        body_name(t.body),
        n.engine(t.engine)
    )
}

fn phase_name(t: &Task, n: &Names) -> String {
    let token = t
        .held
        .map_or_else(String::new, |h| format!(" #{}", n.token(h.token)));
    let mut out = match t.phase {
        Phase::Begin { races, .. } => format!("claiming (races {races})"),
        Phase::Running { hb, hung, hold } => {
            let hb = match hb {
                Hb::Active => "heartbeat on",
                Hb::Stopped => "heartbeat STOPPED",
                Hb::Lost => "lease lost",
                Hb::Ceiling => "ended by the hold ceiling",
            };
            format!(
                "running{token}, {hb}{}{}",
                if hung { ", HUNG" } else { "" },
                if hold > 0 {
                    format!(", held {hold}")
                } else {
                    String::new()
                }
            )
        }
        Phase::Finishing { ending, .. } => format!("settling{token} as {ending:?}"),
        Phase::Orphan { killed: true } => format!("killed while holding{token}"),
        Phase::Orphan { killed: false } => format!("gave up settling{token}"),
    };
    if t.effect {
        out.push_str(", external call made");
    }
    out
}

impl ProtocolModel {
    /// One line of everything in `s`.
    pub(crate) fn summary(&self, s: &ModelState, n: &Names) -> String {
        let mut out = String::new();
        for (rk, r) in s.store.iter().enumerate() {
            let _ = write!(
                out,
                "key s{rk}: {}",
                r.as_ref()
                    .map_or_else(|| "absent".to_string(), |r| rec_name(r, n))
            );
            let l = s.lives[rk];
            let _ = write!(
                out,
                " [external calls {}, windows {}, tx commits {}]; ",
                l.ext, l.windows, l.tx
            );
        }
        for (e, engine) in s.engines.iter().enumerate() {
            let mut flags = Vec::new();
            if engine.paused {
                flags.push("PAUSED");
            }
            if engine.outage {
                flags.push("STORE UNREACHABLE");
            }
            if !flags.is_empty() {
                let e = n.engine(u8::try_from(e).unwrap_or(u8::MAX));
                let _ = write!(out, "engine {e} {}; ", flags.join(" "));
            }
        }
        let mut order: Vec<usize> = (0..s.clients.len()).collect();
        order.sort_by_key(|&i| n.client(u8::try_from(i).unwrap_or(u8::MAX)));
        let clients: Vec<String> = order
            .into_iter()
            .map(|i| (i, &s.clients[i]))
            .map(|(i, c)| {
                format!(
                    "c{} {}",
                    n.client(u8::try_from(i).unwrap_or(u8::MAX)),
                    match c {
                        Client::Idle => "idle",
                        Client::Waiting => "waiting",
                        Client::Done => "done",
                    }
                )
            })
            .collect();
        let _ = write!(out, "clients: {}", clients.join(", "));
        for t in &s.tasks {
            let _ = write!(
                out,
                "\n          · {}: {}",
                task_name(t, n),
                phase_name(t, n)
            );
        }
        out
    }

    fn describe(
        &self,
        before: &ModelState,
        action: Action,
        after: &ModelState,
        n: &Names,
    ) -> String {
        let task = |i: u8| before.tasks.get(usize::from(i)).copied();
        match action {
            Action::Send { client, engine } => {
                let spec = self.cfg.clients[usize::from(client)];
                format!(
                    "client {} sends (scope s{}, body {}) to engine {}",
                    n.client(client),
                    spec.scope,
                    body_name(spec.body),
                    n.engine(engine)
                )
            }
            Action::Begin { task: i } => {
                let Some(t) = task(i) else {
                    return "?".into();
                };
                let mut probe = before.clone();
                let what = self.begin(&mut probe, usize::from(i));
                let rk = self.record_key(t.scope);
                match (
                    what.contains("CLAIM") || what.contains("TAKES"),
                    after.store[rk],
                ) {
                    (true, Some(_)) => {
                        format!("{}: {what} as #{}", task_name(&t, n), n.next_token)
                    }
                    _ => format!("{}: {what}", task_name(&t, n)),
                }
            }
            Action::Beat { task: i } => {
                let Some(t) = task(i) else {
                    return "?".into();
                };
                let after_t = after
                    .tasks
                    .iter()
                    .find(|n| n.held.is_some() && n.engine == t.engine && n.effect == t.effect);
                let result = match after_t.map(|n| n.phase) {
                    Some(Phase::Running { hb: Hb::Active, .. }) => {
                        if after.engines[usize::from(t.engine)].outage {
                            "heartbeat FAILS (store unreachable); will retry".to_string()
                        } else {
                            "heartbeat extends the lease".to_string()
                        }
                    }
                    Some(Phase::Running {
                        hb: Hb::Stopped, ..
                    }) => "heartbeat FAILS and STOPS for good".to_string(),
                    Some(Phase::Running { hb: Hb::Lost, .. }) => {
                        "heartbeat: the store says the lease is LOST".to_string()
                    }
                    Some(Phase::Running {
                        hb: Hb::Ceiling, ..
                    }) => {
                        "hold ceiling reached: the key is finished as outcome unknown".to_string()
                    }
                    _ => "heartbeat".to_string(),
                };
                format!("{}: {result}", task_name(&t, n))
            }
            Action::Effect { task: i } => task(i).map_or_else(
                || "?".into(),
                |t| {
                    format!(
                        "{}: the handler makes its EXTERNAL CALL (#{})",
                        task_name(&t, n),
                        t.held.map_or(0, |h| n.token(h.token))
                    )
                },
            ),
            Action::Return { task: i, ending } => task(i).map_or_else(
                || "?".into(),
                |t| {
                    let how = match ending {
                        Ending::Ok => "returns its result",
                        Ending::Ambiguous => {
                            "ends ambiguously (panic / 5xx / body error / inner error)"
                        }
                        Ending::NothingRelease => "declares nothing happened (release)",
                        Ending::NothingRetryable => "declares nothing happened (store retryable)",
                    };
                    format!("{}: the handler {how}", task_name(&t, n))
                },
            ),
            Action::Hang { task: i } => task(i).map_or_else(
                || "?".into(),
                |t| format!("{}: the handler HANGS", task_name(&t, n)),
            ),
            Action::Settle { task: i } => {
                let Some(t) = task(i) else {
                    return "?".into();
                };
                let rk = self.record_key(t.scope);
                let result = if before.engines[usize::from(t.engine)].outage {
                    if after.tasks.iter().any(|n| {
                        n.engine == t.engine
                            && n.held.map(|h| h.token) == t.held.map(|h| h.token)
                            && matches!(n.phase, Phase::Finishing { .. })
                    }) {
                        "finishing write FAILS (store unreachable); will retry".to_string()
                    } else {
                        "finishing write FAILS; GIVES UP, the key stays in flight".to_string()
                    }
                } else if before.store[rk] != after.store[rk] {
                    format!(
                        "finishing write stored: {}",
                        after.store[rk]
                            .as_ref()
                            .map_or_else(|| "key released".to_string(), |r| rec_name(r, n))
                    )
                } else {
                    "finishing write REFUSED (lease lost): client gets 409".to_string()
                };
                format!("{}: {result}", task_name(&t, n))
            }
            Action::Timeout { client } => format!(
                "client {} stops waiting (timeout / disconnect: its future is dropped)",
                n.client(client)
            ),
            Action::Crash { engine } => {
                format!("engine {} is KILLED and restarts empty", n.engine(engine))
            }
            Action::Pause { engine } => format!("engine {} STALLS (paused)", n.engine(engine)),
            Action::Resume { engine } => format!("engine {} resumes", n.engine(engine)),
            Action::StoreCut { engine } => {
                format!("engine {} loses the store", n.engine(engine))
            }
            Action::StoreBack { engine } => {
                format!("engine {} reaches the store again", n.engine(engine))
            }
            Action::Tick => "a tick passes".to_string(),
        }
    }

    /// A path (as returned by the checker) as numbered steps, each followed
    /// by the state it leads to. Clients and engines keep the names they
    /// had in the first state.
    pub fn explain(&self, path: &[(ModelState, Option<Action>)]) -> String {
        self.explain_marked(path, usize::MAX, "")
    }

    /// As [`explain`](Self::explain), with `mark` printed before step
    /// `before_step + 1`.
    pub fn explain_marked(
        &self,
        path: &[(ModelState, Option<Action>)],
        before_step: usize,
        mark: &str,
    ) -> String {
        let mut out = String::new();
        let mut now = 0;
        let Some((first, _)) = path.first() else {
            return out;
        };
        let mut names = Names::identity(first);
        let _ = writeln!(out, "   start: {}", self.summary(first, &names));
        for (i, window) in path.windows(2).enumerate() {
            let (before, action) = &window[0];
            let Some(action) = action else { continue };
            let Some((after, relabel)) = self.step(before, *action) else {
                continue;
            };
            if *action == Action::Tick {
                now += 1;
            }
            if i == before_step {
                let _ = writeln!(out, "{mark}");
            }
            let line = self.describe(before, *action, &after, &names);
            names = names.after(&relabel);
            let _ = writeln!(out, "{:>3}. [t={now}] {line}", i + 1);
            let _ = writeln!(out, "        ⇒ {}", self.summary(&after, &names));
        }
        out
    }
}
