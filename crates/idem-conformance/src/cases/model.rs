//! The model-based test: random sequences of operations run through the
//! engine against the store under test, and through the pure core model
//! ([`decide`] and the `Record` transitions) over a plain map, compared after
//! every step.
//!
//! After each [`Op`] the test compares what the engine returned with what the
//! model says (the [`Begin`] variant with its exact outcome bytes, time left
//! or new record; `Ok` versus [`Error::LeaseLost`] for the holder's calls) and
//! then the whole visible state: every key is read back with `store.get` and
//! must equal the model's record field for field (state, token, fingerprint,
//! outcome bytes, attempts, deadlines). When the factory gives a second
//! instance, steps alternate between the two instances.
//!
//! The number of generated sequences is `IDEM_PROPTEST_CASES` (default
//! [`DEFAULT_CASES`]); `PROPTEST_RNG_SEED` fixes the generator. A failure is
//! shrunk to a minimal sequence, printed ready to paste as a regression case
//! (the `regression_*` and `rule_*` cases below run fixed sequences with
//! [`check`]).
//!
//! The model also mirrors what each lease holder knows (the record as it last
//! wrote it, and whether it finished), because the engine answers some calls
//! from that view without a store call: finishing again exactly as before is
//! `Ok`, and releasing a key that is already absent is `Ok`.
//!
//! Checkpoints are part of the model: a holder's [`Op::Checkpoint`] is
//! `Record::checkpoint` with the next sequence number, a takeover carries
//! the checkpoint, and (as the engine decides from the holder's view) an
//! unknown outcome or a release of a claim with a checkpoint is stored as a
//! retryable failure keeping it. [`Op::Abandoned`] compares the store's
//! `abandoned` with the model's records that `is_abandoned`.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::future::join_all;
use idem_core::machine::{Decision, decide};
use idem_core::store::{Checkpoint, FencingToken, Record, State, Store, StoreError, is_abandoned};
use idem_core::{
    Begin, Engine, Error, FailureKind, Fingerprint, IdempotencyKey, Lease, ManualClock, Outcome,
    RecordKey, Replay, ReplayKind, Scope, Timestamp,
};
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};

use super::{T0, engine_on, open, policy};
use crate::StoreFactory;

mod ops;
mod regressions;
pub use ops::*;
pub use regressions::*;

/// How many sequences [`matches_core_model`] generates unless
/// `IDEM_PROPTEST_CASES` says otherwise.
pub const DEFAULT_CASES: u32 = 256;

/// What a lease holder knows, mirrored from the engine's [`Lease`].
struct Held {
    slot: usize,
    token: FencingToken,
    /// The record as this holder last wrote it (or got it from `begin`).
    last: Record,
    /// Whether this holder completed, failed or released through the engine.
    finished: bool,
    lease: Lease,
}

/// The reference model: the core's pure functions over a map.
struct Model {
    now: Timestamp,
    /// Per (key, scope) slot, the stored record, expired ones included (as a
    /// store without native expiry keeps them until purged or replaced).
    records: Vec<Option<Record>>,
    held: Vec<Held>,
    tokens: HashSet<FencingToken>,
}

impl Model {
    fn live(&self, slot: usize) -> Option<&Record> {
        self.records[slot]
            .as_ref()
            .filter(|r| !r.is_expired(self.now))
    }
    fn pick(&self, i: LeaseIdx) -> Option<usize> {
        (!self.held.is_empty()).then(|| usize::from(i.0) % self.held.len())
    }
}

fn fingerprint(i: FpIdx) -> Fingerprint {
    Fingerprint::of(&[b'f', i.0 % FINGERPRINTS as u8])
}

fn complete_outcome(byte: u8) -> Outcome {
    Outcome::new(vec![byte; usize::from(byte % 4)])
}

fn fail_outcome(byte: u8) -> Outcome {
    Outcome::new(vec![b'f', byte])
}

/// The step name and state of [`Op::Checkpoint`].
fn checkpoint_step(byte: u8) -> (String, Vec<u8>) {
    (
        format!("step-{}", byte % 4),
        vec![byte; usize::from(byte % 5)],
    )
}

/// A namespace per sequence, so sequences sharing one store never meet.
fn namespace() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("model-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The (key, scope) pairs of one sequence: slot = key * SCOPES + scope.
fn universe(ns: &str) -> Vec<RecordKey> {
    let keys = ["k", "K"];
    let scopes = [Scope::tenant(ns), Scope::tenant(ns).with_principal("p")];
    let mut out = Vec::with_capacity(KEYS * SCOPES);
    for k in keys {
        for s in &scopes {
            out.push(RecordKey::new(
                s,
                &IdempotencyKey::parse(k).expect("valid key"),
            ));
        }
    }
    out
}

fn slot(key: KeyIdx, scope: ScopeIdx) -> usize {
    (usize::from(key.0) % KEYS) * SCOPES + usize::from(scope.0) % SCOPES
}

/// Runs `ops` through engines over `stores` (step i uses instance i mod n)
/// and through the model; `Err` describes the first disagreement.
pub async fn check_sequence<S: Store>(stores: &[Arc<S>], ops: &[Op]) -> Result<(), String> {
    let policy = policy();
    let clock = ManualClock::new(T0);
    let engines: Vec<Engine<Arc<S>, ManualClock>> = stores
        .iter()
        .map(|s| engine_on(s.clone(), &clock, policy.clone()))
        .collect();
    let keys = universe(&namespace());
    let mut model = Model {
        now: T0,
        records: vec![None; keys.len()],
        held: Vec::new(),
        tokens: HashSet::new(),
    };
    for (step, op) in ops.iter().enumerate() {
        let engine = &engines[step % engines.len()];
        let ctx = |msg: String| {
            format!(
                "step {step} ({op:?}) at T0 + {} ms: {msg}",
                model_ms(&clock)
            )
        };
        let now = model.now;
        match *op {
            Op::Begin { key, scope, fp } => {
                let slot = slot(key, scope);
                let fp = fingerprint(fp);
                let want = decide(model.live(slot), &fp, now);
                let got = engine
                    .begin_key(keys[slot].clone(), fp)
                    .await
                    .map_err(|e| ctx(format!("begin failed: {e} ({e:?})")))?;
                match (want, got) {
                    (Decision::Claim | Decision::Reclaim(_), Begin::Proceed(lease)) => {
                        let token = lease.token();
                        if !model.tokens.insert(token) {
                            return Err(ctx(format!("the engine reused the token {token:?}")));
                        }
                        let expect = match model.live(slot) {
                            Some(current) if want != Decision::Claim => {
                                current.reclaim(token, now, &policy)
                            }
                            _ => Record::new_claim(fp, token, now, &policy),
                        };
                        let got = lease.record().record;
                        if got != expect {
                            return Err(ctx(format!(
                                "the new lease's record differs:\n engine {got:?}\n  model {expect:?}"
                            )));
                        }
                        model.records[slot] = Some(expect.clone());
                        model.held.push(Held {
                            slot,
                            token,
                            last: expect,
                            finished: false,
                            lease,
                        });
                    }
                    (Decision::Replay, Begin::Replay(replay)) => {
                        let live = model.live(slot).expect("decide replays only a live record");
                        let Some(want) = model_replay(&live.state) else {
                            return Err(ctx(format!("model bug: replay of {:?}", live.state)));
                        };
                        if replay != want {
                            return Err(ctx(format!(
                                "replay differs: engine {:?} {:?}, model {:?} {:?}",
                                replay.kind,
                                replay.outcome.as_bytes(),
                                want.kind,
                                want.outcome.as_bytes()
                            )));
                        }
                    }
                    (
                        Decision::InProgress { retry_after: want },
                        Begin::InProgress { retry_after: got },
                    ) if want == got => {}
                    (Decision::Mismatch, Begin::Mismatch(bound)) => {
                        let live = model.live(slot).expect("decide refuses only a live record");
                        let finished = model_replay(&live.state);
                        if bound.first_used_at != live.created_at || bound.finished != finished {
                            return Err(ctx(format!(
                                "the mismatch differs: engine first used at {:?}, finished {}; \
                                 model first used at {:?}, finished {}",
                                bound.first_used_at,
                                describe_replay(bound.finished.as_ref()),
                                live.created_at,
                                describe_replay(finished.as_ref())
                            )));
                        }
                    }
                    (want, got) => {
                        return Err(ctx(format!(
                            "the core model decides {want:?}, the engine returned {}",
                            describe(&got)
                        )));
                    }
                }
            }
            Op::Complete { lease, outcome } => {
                finish(
                    &mut model,
                    engine,
                    lease,
                    Finish::Complete(complete_outcome(outcome)),
                )
                .await
                .map_err(ctx)?;
            }
            Op::Fail {
                lease,
                retryable,
                outcome,
            } => {
                let kind = if retryable {
                    FailureKind::Retryable
                } else {
                    FailureKind::Permanent
                };
                finish(
                    &mut model,
                    engine,
                    lease,
                    Finish::Fail(kind, fail_outcome(outcome)),
                )
                .await
                .map_err(ctx)?;
            }
            Op::FailUnknown { lease } => {
                finish(
                    &mut model,
                    engine,
                    lease,
                    Finish::Fail(FailureKind::Unknown, Outcome::default()),
                )
                .await
                .map_err(ctx)?;
            }
            Op::Extend { lease } => {
                if let Some(i) = model.pick(lease) {
                    let (slot, token) = (model.held[i].slot, model.held[i].token);
                    let next = model
                        .live(slot)
                        .and_then(|r| r.extend(token, now, &policy).ok());
                    let got = engine.extend(&model.held[i].lease).await;
                    match (next, got) {
                        (Some(next), Ok(())) => {
                            model.records[slot] = Some(next.clone());
                            model.held[i].last = next;
                        }
                        (None, Err(Error::LeaseLost(_))) => {}
                        (next, got) => {
                            return Err(ctx(format!(
                                "extend of lease {i}: the model expects {}, the engine returned {got:?}",
                                if next.is_some() { "Ok" } else { "LeaseLost" }
                            )));
                        }
                    }
                }
            }
            Op::Release { lease } => {
                if let Some(i) = model.pick(lease)
                    && model.held[i].last.checkpoint.is_some()
                {
                    // Recorded steps took effect: the engine fails the
                    // claim retryably instead of deleting it.
                    finish(&mut model, engine, lease, Finish::Release)
                        .await
                        .map_err(ctx)?;
                } else if let Some(i) = model.pick(lease) {
                    let held = &model.held[i];
                    let (slot, token) = (held.slot, held.token);
                    // The engine checks its own view first, then deletes the
                    // live record if it holds it; an absent key is already
                    // released.
                    let holds_own_view = held.last.check_holder(token, now).is_ok();
                    let live_holder = model.live(slot).map(|r| r.check_holder(token, now).is_ok());
                    let want_ok = holds_own_view && live_holder != Some(false);
                    let got = engine.release(&held.lease).await;
                    match (want_ok, got) {
                        (true, Ok(())) => {
                            if live_holder == Some(true) {
                                model.records[slot] = None;
                            }
                            model.held[i].finished = true;
                        }
                        (false, Err(Error::LeaseLost(_))) => {}
                        (want_ok, got) => {
                            return Err(ctx(format!(
                                "release of lease {i}: the model expects {}, the engine returned {got:?}",
                                if want_ok { "Ok" } else { "LeaseLost" }
                            )));
                        }
                    }
                }
            }
            Op::Checkpoint { lease, state } => {
                if let Some(i) = model.pick(lease) {
                    let (slot, token) = (model.held[i].slot, model.held[i].token);
                    let (step, bytes) = checkpoint_step(state);
                    let next = model.live(slot).and_then(|r| {
                        let seq = r.checkpoint.as_ref().map_or(1, |c| c.seq + 1);
                        let cp = Checkpoint::new(&keys[slot], seq, step.clone(), bytes.clone());
                        r.checkpoint(token, cp, now, &policy).ok()
                    });
                    let got = engine.checkpoint(&model.held[i].lease, &step, bytes).await;
                    match (next, got) {
                        (Some(next), Ok(written)) if next.checkpoint.as_ref() == Some(&written) => {
                            model.records[slot] = Some(next.clone());
                            model.held[i].last = next;
                        }
                        (None, Err(Error::LeaseLost(_))) => {}
                        (next, got) => {
                            return Err(ctx(format!(
                                "checkpoint by lease {i}: the model expects {:?}, the engine returned {got:?}",
                                next.map(|r| r.checkpoint)
                            )));
                        }
                    }
                }
            }
            Op::Abandoned => {
                let store = engine.store();
                let found = store.abandoned(now, 10_000).await;
                if store.capabilities().abandoned {
                    let found = found.map_err(|e| ctx(format!("abandoned failed: {e} ({e:?})")))?;
                    let deadlines: Vec<Timestamp> =
                        found.iter().map(|v| lapse(&v.record)).collect();
                    if deadlines.windows(2).any(|w| w[0] > w[1]) {
                        return Err(ctx(format!(
                            "abandoned is not ordered by lapse: {deadlines:?}"
                        )));
                    }
                    if let Some(v) = found.iter().find(|v| v.record.checkpoint.is_none()) {
                        return Err(ctx(format!(
                            "abandoned returned a record without a checkpoint: {v:?}"
                        )));
                    }
                    // The store is shared by every sequence: keep this one's keys.
                    let mut got: Vec<(usize, Record)> = found
                        .into_iter()
                        .filter_map(|v| {
                            let key = v.record.checkpoint.as_ref()?.record_key();
                            let slot = keys.iter().position(|k| *k == key)?;
                            Some((slot, v.record))
                        })
                        .collect();
                    got.sort_by_key(|(slot, _)| *slot);
                    let want: Vec<(usize, Record)> = (0..keys.len())
                        .filter_map(|slot| {
                            model
                                .live(slot)
                                .filter(|r| is_abandoned(r, now))
                                .map(|r| (slot, r.clone()))
                        })
                        .collect();
                    if got != want {
                        return Err(ctx(format!(
                            "abandoned differs:\n store {got:?}\n model {want:?}"
                        )));
                    }
                } else if !matches!(found, Err(StoreError::Unsupported { .. })) {
                    return Err(ctx(format!(
                        "a store declaring no `abandoned` must return Unsupported, got {found:?}"
                    )));
                }
            }
            Op::Advance { millis } => {
                let d = Duration::from_millis(u64::from(millis));
                clock.advance(d);
                model.now = model.now.plus(d);
            }
            Op::Purge => {
                engine
                    .store()
                    .purge_expired(now, 10_000)
                    .await
                    .map_err(|e| ctx(format!("purge_expired failed: {e} ({e:?})")))?;
                for record in &mut model.records {
                    if record.as_ref().is_some_and(|r| r.is_expired(now)) {
                        *record = None;
                    }
                }
            }
        }
        // The visible state, read through the other instance when there is one.
        let reader = engines[(step + 1) % engines.len()].store();
        let now = model.now;
        let reads = join_all(keys.iter().map(|k| reader.get(k, now))).await;
        for (slot, read) in reads.into_iter().enumerate() {
            let got = read
                .map_err(|e| ctx(format!("get failed: {e} ({e:?})")))?
                .map(|v| v.record);
            let want = model.live(slot).cloned();
            if got != want {
                return Err(ctx(format!(
                    "the visible state of key {} scope {} differs:\n store {got:?}\n model {want:?}",
                    slot / SCOPES,
                    slot % SCOPES
                )));
            }
        }
        for (i, held) in model.held.iter().enumerate() {
            let record = held.lease.record().record;
            if record != held.last || held.lease.is_finished() != held.finished {
                return Err(ctx(format!(
                    "lease {i} differs: engine (finished {}) {record:?}, model (finished {}) {:?}",
                    held.lease.is_finished(),
                    held.finished,
                    held.last
                )));
            }
        }
    }
    Ok(())
}

/// A `Begin` in a line (a lease's own `Debug` is long).
fn describe(begin: &Begin) -> String {
    match begin {
        Begin::Proceed(lease) => format!(
            "Proceed(token {:?}, attempt {}, record {:?})",
            lease.token(),
            lease.attempt(),
            lease.record().record
        ),
        Begin::Replay(replay) => format!(
            "Replay({:?}, outcome {:?})",
            replay.kind,
            replay.outcome.as_bytes()
        ),
        other => format!("{other:?}"),
    }
}

/// What the model replays of a record in `state`: `Some` for a final state.
fn model_replay(state: &State) -> Option<Replay> {
    let (kind, outcome) = match state {
        State::Completed { outcome, .. } => (ReplayKind::Completed, outcome),
        State::Failed {
            kind: FailureKind::Permanent,
            outcome,
            ..
        } => (ReplayKind::Failed, outcome),
        State::Failed {
            kind: FailureKind::Unknown,
            outcome,
            ..
        } => (ReplayKind::Unknown, outcome),
        _ => return None,
    };
    Some(Replay {
        outcome: outcome.clone(),
        kind,
    })
}

/// A replay in a line, or `None`.
fn describe_replay(replay: Option<&Replay>) -> String {
    replay.map_or_else(
        || "None".to_string(),
        |r| format!("{:?} {:?}", r.kind, r.outcome.as_bytes()),
    )
}

fn model_ms(clock: &ManualClock) -> u64 {
    use idem_core::Clock;
    clock.now().as_millis() - T0.as_millis()
}

/// How [`finish`] ends a claim.
enum Finish {
    /// `engine.complete` with this outcome.
    Complete(Outcome),
    /// `engine.fail` with this kind and outcome.
    Fail(FailureKind, Outcome),
    /// `engine.release` of a claim whose record has a checkpoint: a
    /// retryable failure with an empty outcome.
    Release,
}

/// The lapse of an in-flight record (its expiry otherwise).
fn lapse(record: &Record) -> Timestamp {
    match record.state {
        State::InFlight { lease_deadline, .. } => lease_deadline,
        _ => record.expires_at,
    }
}

/// `complete` or `fail` (or a release that fails) by lease `idx`, in the
/// engine and the model.
async fn finish<S: Store>(
    model: &mut Model,
    engine: &Engine<Arc<S>, ManualClock>,
    idx: LeaseIdx,
    how: Finish,
) -> Result<(), String> {
    let Some(i) = model.pick(idx) else {
        return Ok(());
    };
    let policy = engine.policy();
    let now = model.now;
    let held = &model.held[i];
    let (slot, token) = (held.slot, held.token);
    // What the engine stores: with a checkpoint in the holder's view, an
    // unknown outcome is a retryable failure (the next holder resumes).
    let (kind, outcome) = match &how {
        Finish::Complete(outcome) => (None, outcome.clone()),
        Finish::Fail(FailureKind::Unknown, outcome) if held.last.checkpoint.is_some() => {
            (Some(FailureKind::Retryable), outcome.clone())
        }
        Finish::Fail(kind, outcome) => (Some(*kind), outcome.clone()),
        Finish::Release => (Some(FailureKind::Retryable), Outcome::default()),
    };
    let target = match kind {
        None => State::Completed {
            token,
            outcome: outcome.clone(),
        },
        Some(kind) => State::Failed {
            token,
            kind,
            outcome: outcome.clone(),
        },
    };
    // Finishing again exactly as this holder already did succeeds without a
    // write (a retry after a lost reply).
    let repeat = held.finished && held.last.state == target;
    let next = model.live(slot).and_then(|r| {
        match kind {
            None => r.complete(token, outcome.clone(), now, policy),
            Some(kind) => r.fail(token, kind, outcome.clone(), now, policy),
        }
        .ok()
    });
    let (got, verb) = match how {
        Finish::Complete(outcome) => (engine.complete(&held.lease, outcome).await, "complete"),
        Finish::Fail(kind, outcome) => (engine.fail(&held.lease, kind, outcome).await, "fail"),
        Finish::Release => (
            engine.release(&held.lease).await,
            "release (with a checkpoint)",
        ),
    };
    match (repeat, next, got) {
        (true, None, Ok(())) => Ok(()),
        (false, Some(next), Ok(())) => {
            model.records[slot] = Some(next.clone());
            model.held[i].last = next;
            model.held[i].finished = true;
            Ok(())
        }
        (false, None, Err(Error::LeaseLost(_))) => Ok(()),
        (repeat, next, got) => Err(format!(
            "{verb} by lease {i}: the model expects {}, the engine returned {got:?}",
            if repeat || next.is_some() {
                "Ok"
            } else {
                "LeaseLost"
            }
        )),
    }
}

/// The stores a sequence runs against: the store, and a second instance
/// over its records when the backend has one.
async fn stores<F: StoreFactory>(factory: &F) -> Vec<Arc<F::Store>> {
    let first = open(factory).await;
    match factory.reopen(&first).await {
        Ok(Some(second)) => vec![first, Arc::new(second)],
        Ok(None) => vec![first],
        Err(why) => panic!("factory.reopen() failed: {why}"),
    }
}

/// How many sequences to generate: `IDEM_PROPTEST_CASES`, else [`DEFAULT_CASES`].
pub fn cases() -> u32 {
    std::env::var("IDEM_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(DEFAULT_CASES)
}

/// Random sequences of begin/complete/fail/release/extend/checkpoint/
/// abandoned/advance/purge over
/// a few keys, scopes and fingerprints: the engine over the store under test
/// must agree with the pure core model at every step. A failure is shrunk to
/// a minimal sequence and reported ready to paste as a regression case.
pub async fn matches_core_model<F: StoreFactory>(factory: Arc<F>) {
    let stores = stores(&*factory).await;
    let handle = tokio::runtime::Handle::current();
    // The sequences run off the case's task: carry its variant along.
    let probe = super::current_probe();
    let cases = cases();
    let result = tokio::task::spawn_blocking(move || {
        let mut runner = TestRunner::new(Config {
            cases,
            failure_persistence: None,
            max_shrink_time: 60_000,
            ..Config::default()
        });
        runner
            .run(&ops(), |ops| {
                handle
                    .block_on(super::in_probe(
                        probe.clone(),
                        check_sequence(&stores, &ops),
                    ))
                    .map_err(TestCaseError::fail)
            })
            .map_err(|e| match e {
                TestError::Fail(why, ops) => format!(
                    "the store (through the engine) disagrees with the core model.\n\
                     {why}\n\
                     Minimal failing sequence ({} ops), to pin as a regression case in \
                     crates/idem-conformance/src/cases/model/regressions.rs:\n\
                     check(factory, vec![\n{}]).await;\n",
                    ops.len(),
                    ops.iter()
                        .map(|op| format!("    {op:?},\n"))
                        .collect::<String>()
                ),
                TestError::Abort(why) => format!("the model test aborted: {why}"),
            })
    })
    .await
    .expect("the model test's thread");
    if let Err(message) = result {
        panic!("{message}");
    }
}

/// Runs one fixed sequence against `factory`'s store and the model; panics
/// with the first disagreement. Backends pin sequences that once failed on
/// them with it.
pub async fn check<F: StoreFactory>(factory: Arc<F>, ops: Vec<Op>) {
    let stores = stores(&*factory).await;
    if let Err(why) = check_sequence(&stores, &ops).await {
        panic!("{why}\nsequence: {ops:#?}");
    }
}
