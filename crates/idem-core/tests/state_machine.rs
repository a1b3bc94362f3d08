//! Property tests of the key state machine's invariants, on the pure model
//! (`decide` and the `Record` transitions), with no store and no runtime.
//!
//! Checkpoints (recovery points) are part of the model: a holder records
//! progress with `Record::checkpoint`, which only moves forward, only for
//! the holder, and is carried to the next holder by `reclaim` (after a lapse
//! or a retryable failure) until the key completes or fails for good.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::time::Duration;

use idem_core::machine::{Decision, Fenced, decide};
use idem_core::store::codec::{
    FORMAT_V2, decode_checkpoint, decode_record, encode_checkpoint, encode_record, record_size,
};
use idem_core::store::{Checkpoint, FencingToken, Record, State};
use idem_core::{
    FailureKind, Fingerprint, IdempotencyKey, Outcome, Policy, RecordKey, Scope, Timestamp,
};
use proptest::prelude::*;

/// Index of one of three fingerprints (no generated case is rejected).
#[derive(Clone, Copy, Debug)]
struct FpIdx(u8);
/// Index into the tokens issued so far (modulo their count).
#[derive(Clone, Copy, Debug)]
struct TokenIdx(u8);

/// How a failure is classified (modulo 3: retryable, permanent, unknown).
#[derive(Clone, Copy, Debug)]
struct KindIdx(u8);

impl KindIdx {
    fn kind(self) -> FailureKind {
        match self.0 % 3 {
            0 => FailureKind::Retryable,
            1 => FailureKind::Permanent,
            _ => FailureKind::Unknown,
        }
    }
}

#[derive(Clone, Debug)]
enum Op {
    Begin(FpIdx),
    Complete(TokenIdx, u8),
    Fail(TokenIdx, KindIdx),
    /// As the engine releases: a record with a checkpoint is failed
    /// retryably (keeping it), one without is deleted.
    Release(TokenIdx),
    Extend(TokenIdx),
    /// A checkpoint offered with the stored sequence number plus `delta`
    /// (1 when none is stored): zero or less is not forward.
    Checkpoint(TokenIdx, i8, u8),
    Advance(u32),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..3).prop_map(|f| Op::Begin(FpIdx(f))),
        2 => (any::<u8>(), any::<u8>()).prop_map(|(t, o)| Op::Complete(TokenIdx(t), o)),
        1 => (any::<u8>(), any::<u8>()).prop_map(|(t, k)| Op::Fail(TokenIdx(t), KindIdx(k))),
        1 => any::<u8>().prop_map(|t| Op::Release(TokenIdx(t))),
        1 => any::<u8>().prop_map(|t| Op::Extend(TokenIdx(t))),
        3 => (any::<u8>(), prop_oneof![3 => Just(1i8), 1 => -2i8..=3], any::<u8>())
            .prop_map(|(t, delta, s)| Op::Checkpoint(TokenIdx(t), delta, s)),
        2 => prop_oneof![Just(1_000u32), Just(5_000), Just(10_000), Just(60_000), 0u32..200_000]
            .prop_map(Op::Advance),
    ]
}

/// The key every checkpoint of the model belongs to.
fn model_key() -> RecordKey {
    RecordKey::new(
        &Scope::tenant("t").with_operation("orders.create"),
        &IdempotencyKey::parse("k").unwrap(),
    )
}

/// The checkpoint a holder offers: `seq`, and a step and state from `s`.
fn offered(seq: u32, s: u8) -> Checkpoint {
    Checkpoint::new(
        &model_key(),
        seq,
        format!("step-{}", s % 4),
        vec![s; usize::from(s % 9)],
    )
}

/// The sequence number `delta` away from the stored checkpoint's (1 after
/// none), clamped to `u32`.
fn offered_seq(stored: Option<&Checkpoint>, delta: i8) -> u32 {
    match stored {
        None => u32::try_from(delta.max(0)).unwrap(),
        Some(c) => {
            u32::try_from((i64::from(c.seq) + i64::from(delta)).clamp(0, i64::from(u32::MAX)))
                .unwrap()
        }
    }
}

fn policy() -> Policy {
    Policy::default()
        .with_lease(Duration::from_secs(10))
        .with_ttl(Duration::from_secs(60))
}

fn fingerprint(i: FpIdx) -> Fingerprint {
    Fingerprint::of(&[i.0 % 3])
}

/// The model of one key: the stored record (expired ones included, as a
/// store without native expiry would keep them), the clock, and every token
/// ever issued.
struct Model {
    record: Option<Record>,
    now: Timestamp,
    tokens: Vec<FencingToken>,
    /// The outcome a completion stored, while it lives.
    completed: Option<(FencingToken, Outcome)>,
    /// The fingerprint bound by the first claim of the current record.
    bound: Option<Fingerprint>,
}

impl Model {
    fn token(&self, i: TokenIdx) -> Option<FencingToken> {
        (!self.tokens.is_empty()).then(|| self.tokens[usize::from(i.0) % self.tokens.len()])
    }

    fn live(&self) -> Option<&Record> {
        self.record.as_ref().filter(|r| !r.is_expired(self.now))
    }

    fn holders(&self) -> BTreeSet<FencingToken> {
        let Some(record) = self.live() else {
            return BTreeSet::new();
        };
        let lease_live = matches!(record.state, State::InFlight { lease_deadline, .. } if self.now < lease_deadline);
        self.tokens
            .iter()
            .copied()
            .filter(|t| lease_live && record.check_holder(*t, self.now).is_ok())
            .collect()
    }

    /// Applies a holder transition; a refused one must change nothing.
    fn holder_step(
        &mut self,
        token: Option<FencingToken>,
        step: impl FnOnce(
            &Record,
            FencingToken,
            Timestamp,
        ) -> Result<Option<Record>, idem_core::machine::Fenced>,
    ) {
        let (Some(record), Some(token)) = (self.record.clone(), token) else {
            return;
        };
        let is_holder = record.check_holder(token, self.now).is_ok();
        match step(&record, token, self.now) {
            Ok(next) => {
                assert!(is_holder, "a non-holder's transition was accepted");
                self.record = next;
            }
            Err(_) => {
                assert!(!is_holder, "the holder's transition was refused");
                assert_eq!(
                    self.record.as_ref(),
                    Some(&record),
                    "a refused transition changed the record"
                );
            }
        }
    }

    fn apply(&mut self, op: &Op, policy: &Policy) {
        let before = self.live().cloned();
        match *op {
            Op::Begin(f) => {
                let fp = fingerprint(f);
                let decision = decide(self.record.as_ref(), &fp, self.now);
                if let Some(bound) = before.as_ref().map(|r| r.fingerprint) {
                    // A different fingerprint never proceeds or replays.
                    if bound != fp {
                        assert_eq!(decision, Decision::Mismatch);
                    }
                }
                // An expired record behaves exactly as an absent one.
                if before.is_none() {
                    assert_eq!(decision, decide(None, &fp, self.now));
                }
                // A checkpoint never changes what a request meets.
                if let Some(record) = &self.record {
                    for with in [None, Some(offered(7, 3)), record.checkpoint.clone()] {
                        for f in 0..3 {
                            let other = fingerprint(FpIdx(f));
                            assert_eq!(
                                decide(
                                    Some(&record.clone().with_checkpoint(with.clone())),
                                    &other,
                                    self.now
                                ),
                                decide(Some(record), &other, self.now),
                                "a checkpoint changed the decision"
                            );
                        }
                    }
                }
                let token = FencingToken::from_u128(self.tokens.len() as u128 + 1);
                match decision {
                    Decision::Claim => {
                        self.tokens.push(token);
                        let claim = Record::new_claim(fp, token, self.now, policy);
                        // A fresh claim (absent or expired key) starts with no
                        // progress, whatever an expired record carried.
                        assert_eq!(claim.checkpoint, None);
                        self.record = Some(claim);
                    }
                    Decision::Reclaim(_) => {
                        self.tokens.push(token);
                        let previous = self.record.as_ref().unwrap();
                        let record = previous.reclaim(token, self.now, policy);
                        // The next holder (after a lapse or a retryable
                        // failure) resumes from the last checkpoint, unchanged.
                        assert_eq!(
                            record.checkpoint, previous.checkpoint,
                            "a reclaim lost or changed the checkpoint"
                        );
                        self.record = Some(record);
                    }
                    Decision::Replay => {
                        // A replay returns exactly what was completed.
                        let state = &self.live().unwrap().state;
                        if let Some((token, outcome)) = &self.completed {
                            assert_eq!(
                                state,
                                &State::Completed {
                                    token: *token,
                                    outcome: outcome.clone()
                                }
                            );
                        } else {
                            assert!(matches!(
                                state,
                                State::Failed {
                                    kind: FailureKind::Permanent | FailureKind::Unknown,
                                    ..
                                }
                            ));
                        }
                    }
                    Decision::InProgress { retry_after } => {
                        assert!(retry_after > Duration::ZERO && retry_after <= policy.lease);
                    }
                    Decision::Mismatch => {}
                }
            }
            Op::Complete(t, o) => {
                let outcome = Outcome::new(vec![o; usize::from(o % 7)]);
                let token = self.token(t);
                let mut completed = None;
                self.holder_step(token, |r, tok, now| {
                    let next = r.complete(tok, outcome.clone(), now, policy)?;
                    assert_eq!(next.checkpoint, None, "a completion keeps no checkpoint");
                    completed = Some((tok, outcome.clone()));
                    Ok(Some(next))
                });
                if completed.is_some() {
                    self.completed = completed;
                }
            }
            Op::Fail(t, kind) => {
                let kind = kind.kind();
                let token = self.token(t);
                self.holder_step(token, |r, tok, now| {
                    let next = r.fail(tok, kind, Outcome::new(&b"failed"[..]), now, policy)?;
                    if kind == FailureKind::Retryable {
                        assert_eq!(
                            next.checkpoint, r.checkpoint,
                            "a retryable failure keeps the checkpoint for the next holder"
                        );
                    } else {
                        assert_eq!(next.checkpoint, None, "a final failure keeps no checkpoint");
                    }
                    Ok(Some(next))
                });
            }
            Op::Release(t) => {
                let token = self.token(t);
                self.holder_step(token, |r, tok, now| {
                    if r.checkpoint.is_some() {
                        // Recorded steps took effect: never deleted.
                        r.fail(tok, FailureKind::Retryable, Outcome::default(), now, policy)
                            .map(Some)
                    } else {
                        r.check_holder(tok, now).map(|()| None)
                    }
                });
            }
            Op::Extend(t) => {
                let token = self.token(t);
                self.holder_step(token, |r, tok, now| {
                    let next = r.extend(tok, now, policy)?;
                    assert_eq!(
                        next.checkpoint, r.checkpoint,
                        "a heartbeat keeps the checkpoint"
                    );
                    Ok(Some(next))
                });
            }
            Op::Checkpoint(t, delta, s) => self.checkpoint(self.token(t), delta, s, policy),
            Op::Advance(ms) => self.now = self.now.plus(Duration::from_millis(u64::from(ms))),
        }
        let after = self.live().cloned();
        // The fingerprint bound at the first claim never changes while the record lives.
        if let (Some(b), Some(a)) = (&before, &after)
            && b.created_at == a.created_at
        {
            assert_eq!(b.fingerprint, a.fingerprint);
        }
        match &after {
            None => {
                self.completed = None;
                self.bound = None;
            }
            Some(a) => {
                if let Some(bound) = self.bound
                    && before.is_some()
                {
                    assert_eq!(a.fingerprint, bound, "bound fingerprint changed");
                }
                self.bound = Some(a.fingerprint);
            }
        }
        // A completed record never changes until it expires.
        if let (
            Some(
                b @ Record {
                    state: State::Completed { .. },
                    ..
                },
            ),
            Some(a),
        ) = (&before, &after)
        {
            assert_eq!(a, b, "a completed record changed before expiring");
        }
        // Checkpoints only move forward while the record lives, and are
        // dropped only when the key completes or fails for good.
        if let (Some(b), Some(a)) = (&before, &after)
            && b.created_at == a.created_at
        {
            match (&b.checkpoint, &a.checkpoint) {
                (Some(old), Some(new)) => assert!(
                    new == old || new.seq > old.seq,
                    "a checkpoint moved backwards or was replaced at the same seq: {old:?} -> {new:?} ({op:?})"
                ),
                (Some(_), None) => assert!(
                    matches!(
                        a.state,
                        State::Completed { .. }
                            | State::Failed {
                                kind: FailureKind::Permanent | FailureKind::Unknown,
                                ..
                            }
                    ),
                    "a checkpoint was dropped by {op:?} leaving {:?}",
                    a.state
                ),
                (None, Some(_)) => assert!(
                    matches!(op, Op::Checkpoint(..)),
                    "{op:?} made up a checkpoint"
                ),
                (None, None) => {}
            }
            if a.checkpoint != b.checkpoint && a.checkpoint.is_some() {
                assert!(
                    matches!(op, Op::Checkpoint(..)),
                    "{op:?} changed the checkpoint"
                );
            }
        }
        // At most one live lease at any instant.
        assert!(self.holders().len() <= 1, "two holders of one key");
    }

    /// `token` offers a checkpoint `delta` past the stored one: only the
    /// holder, only forward, and it is a heartbeat too; anything refused
    /// changes nothing.
    fn checkpoint(&mut self, token: Option<FencingToken>, delta: i8, s: u8, policy: &Policy) {
        let (Some(record), Some(token)) = (self.record.clone(), token) else {
            return;
        };
        let seq = offered_seq(record.checkpoint.as_ref(), delta);
        let checkpoint = offered(seq, s);
        let holder = record.check_holder(token, self.now);
        let forward = record.checkpoint.as_ref().is_none_or(|c| seq > c.seq);
        match record.checkpoint(token, checkpoint.clone(), self.now, policy) {
            Ok(next) => {
                assert!(holder.is_ok(), "a non-holder checkpointed ({holder:?})");
                assert!(
                    forward,
                    "a checkpoint that does not move forward was accepted"
                );
                let extended = record.extend(token, self.now, policy).unwrap();
                assert_eq!(
                    next,
                    extended.with_checkpoint(Some(checkpoint)),
                    "a checkpoint is a heartbeat that records the checkpoint, nothing else"
                );
                self.record = Some(next);
            }
            Err(Fenced::Backwards { stored, offered }) => {
                assert!(
                    holder.is_ok(),
                    "a non-holder was told Backwards, not fenced"
                );
                assert!(!forward);
                assert_eq!(
                    (Some(stored), offered),
                    (record.checkpoint.as_ref().map(|c| c.seq), seq)
                );
            }
            Err(fenced) => {
                assert_eq!(holder, Err(fenced), "the holder's checkpoint was refused");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("IDEM_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512),
        ..ProptestConfig::default()
    })]

    #[test]
    fn invariants_hold_over_any_sequence(ops in proptest::collection::vec(op(), 1..60)) {
        let policy = policy();
        let mut model = Model {
            record: None,
            now: Timestamp::from_millis(1_700_000_000_000),
            tokens: Vec::new(),
            completed: None,
            bound: None,
        };
        for op in &ops {
            model.apply(op, &policy);
        }
    }

    #[test]
    fn record_key_encoding_is_injective(
        a in (".{0,6}", proptest::option::of(".{0,4}"), proptest::option::of(".{0,4}"), "[!-~]{1,6}"),
        b in (".{0,6}", proptest::option::of(".{0,4}"), proptest::option::of(".{0,4}"), "[!-~]{1,6}"),
    ) {
        let make = |(t, p, o, k): &(String, Option<String>, Option<String>, String)| {
            let mut scope = Scope::tenant(t.clone());
            if let Some(p) = p { scope = scope.with_principal(p.clone()); }
            if let Some(o) = o { scope = scope.with_operation(o.clone()); }
            RecordKey::new(&scope, &IdempotencyKey::parse(k).unwrap())
        };
        let (ka, kb) = (make(&a), make(&b));
        prop_assert_eq!(a == b, ka.canonical_bytes() == kb.canonical_bytes());
        prop_assert_eq!(a == b, ka.digest() == kb.digest());
    }

    #[test]
    fn key_parser_never_panics_and_accepts_exactly_visible_ascii(raw in proptest::collection::vec(any::<u8>(), 0..300)) {
        let ok = !raw.is_empty() && raw.len() <= 255 && raw.iter().all(|b| (0x21..=0x7e).contains(b));
        prop_assert_eq!(IdempotencyKey::parse_bytes(&raw).is_ok(), ok);
    }

    #[test]
    fn record_decoder_never_panics(raw in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = idem_core::store::codec::decode_record(&raw);
    }

    /// Any record, with any checkpoint or none, reads back exactly; its
    /// encoding is within `record_size`; a checkpoint alone round-trips;
    /// no prefix of an encoding decodes as a record (or panics).
    #[test]
    fn records_with_any_checkpoint_round_trip(record in arb_record()) {
        let bytes = encode_record(&record).unwrap();
        prop_assert_eq!(bytes[0], FORMAT_V2);
        prop_assert!(bytes.len() <= record_size(&record), "{} > {}", bytes.len(), record_size(&record));
        prop_assert_eq!(&decode_record(&bytes).unwrap(), &record);
        if let Some(checkpoint) = &record.checkpoint {
            let alone = encode_checkpoint(checkpoint).unwrap();
            prop_assert_eq!(&decode_checkpoint(&alone).unwrap(), checkpoint);
            prop_assert_eq!(
                checkpoint.record_key(),
                RecordKey::new(&checkpoint.scope, &checkpoint.key)
            );
        }
        for cut in [0, 1, bytes.len() / 2, bytes.len() - 1] {
            prop_assert!(decode_record(&bytes[..cut]).is_err(), "a prefix of {cut} bytes decoded");
        }
    }
}

/// Any checkpoint of any key: any sequence number, step (Unicode), state
/// bytes, and scope parts.
fn arb_checkpoint() -> impl Strategy<Value = Checkpoint> {
    (
        any::<u32>(),
        ".{0,12}",
        proptest::collection::vec(any::<u8>(), 0..2048),
        (
            ".{0,6}",
            proptest::option::of(".{0,4}"),
            proptest::option::of(".{0,4}"),
        ),
        "[!-~]{1,40}",
    )
        .prop_map(|(seq, step, state, (tenant, principal, operation), key)| {
            let mut scope = Scope::tenant(tenant);
            if let Some(p) = principal {
                scope = scope.with_principal(p);
            }
            if let Some(o) = operation {
                scope = scope.with_operation(o);
            }
            let key = RecordKey::new(&scope, &IdempotencyKey::parse(&key).unwrap());
            Checkpoint::new(&key, seq, step, state)
        })
}

/// Any record in any state, with any checkpoint or none.
fn arb_record() -> impl Strategy<Value = Record> {
    let token = any::<u128>().prop_map(FencingToken::from_u128);
    let outcome = proptest::collection::vec(any::<u8>(), 0..512).prop_map(Outcome::new);
    let state = prop_oneof![
        (token.clone(), any::<u64>()).prop_map(|(token, d)| State::InFlight {
            token,
            lease_deadline: Timestamp::from_millis(d),
        }),
        (token.clone(), outcome.clone())
            .prop_map(|(token, outcome)| State::Completed { token, outcome }),
        (token, 0u8..3, outcome).prop_map(|(token, k, outcome)| State::Failed {
            token,
            kind: KindIdx(k).kind(),
            outcome,
        }),
    ];
    (
        any::<[u8; 32]>(),
        state,
        (any::<u64>(), any::<u64>(), any::<u64>()),
        any::<u32>(),
        proptest::option::of(arb_checkpoint()),
    )
        .prop_map(
            |(fp, state, (created, updated, expires), attempts, checkpoint)| {
                Record::from_parts(
                    Fingerprint::from_bytes(fp),
                    state,
                    Timestamp::from_millis(created),
                    Timestamp::from_millis(updated),
                    Timestamp::from_millis(expires),
                    attempts,
                )
                .with_checkpoint(checkpoint)
            },
        )
}

/// A stale token never checkpoints: not after a takeover, not after the
/// key finished (by the new holder or by the stale one itself), not after
/// the record expired; and a holder cannot move its checkpoint backwards.
#[test]
fn stale_tokens_never_checkpoint() {
    let policy = policy();
    let t0 = Timestamp::from_millis(1_700_000_000_000);
    let (old, new) = (FencingToken::from_u128(1), FencingToken::from_u128(2));
    let claim = Record::new_claim(Fingerprint::of(b"r"), old, t0, &policy)
        .checkpoint(old, offered(1, 1), t0, &policy)
        .unwrap();
    // The lease lapses; another request takes over, carrying the progress.
    let lapsed = t0.plus(policy.lease);
    let taken = claim.reclaim(new, lapsed, &policy);
    assert_eq!(taken.checkpoint, claim.checkpoint);
    assert_eq!(
        taken.checkpoint(old, offered(2, 2), lapsed, &policy),
        Err(Fenced::TakenOver)
    );
    // Even a stale holder offering a lower seq is fenced, not `Backwards`.
    assert_eq!(
        taken.checkpoint(old, offered(0, 2), lapsed, &policy),
        Err(Fenced::TakenOver)
    );
    assert_eq!(
        taken.checkpoint(new, offered(1, 2), lapsed, &policy),
        Err(Fenced::Backwards {
            stored: 1,
            offered: 1
        })
    );
    let done = taken
        .complete(new, Outcome::new(&b"ok"[..]), lapsed, &policy)
        .unwrap();
    for token in [old, new] {
        assert!(matches!(
            done.checkpoint(token, offered(5, 5), lapsed, &policy),
            Err(Fenced::Finished { .. })
        ));
    }
    let failed = taken
        .fail(
            new,
            FailureKind::Retryable,
            Outcome::default(),
            lapsed,
            &policy,
        )
        .unwrap();
    assert!(matches!(
        failed.checkpoint(new, offered(5, 5), lapsed, &policy),
        Err(Fenced::Finished {
            by_holder: true,
            ..
        })
    ));
    let gone = claim.expires_at;
    assert_eq!(
        claim.checkpoint(old, offered(2, 2), gone, &policy),
        Err(Fenced::Expired)
    );
}

/// Separators inside parts cannot forge another scope (named regression of
/// the injectivity property for the classic `a:b` / `a`+`b` collision).
#[test]
fn separator_collisions_are_impossible() {
    let key = IdempotencyKey::parse("k").unwrap();
    let pairs = [
        (Scope::tenant("a:b"), Scope::tenant("a").with_principal("b")),
        (
            Scope::tenant("a").with_principal("b:c"),
            Scope::tenant("a").with_principal("b").with_operation("c"),
        ),
        (Scope::tenant(""), Scope::tenant("").with_principal("")),
        (
            Scope::tenant("a\u{0}"),
            Scope::tenant("a").with_operation(""),
        ),
    ];
    for (x, y) in pairs {
        assert_ne!(
            RecordKey::new(&x, &key).digest(),
            RecordKey::new(&y, &key).digest(),
            "{x:?} vs {y:?}"
        );
    }
    let k1 = IdempotencyKey::parse("b").unwrap();
    assert_ne!(
        RecordKey::new(&Scope::tenant("a"), &k1).digest(),
        RecordKey::new(&Scope::tenant("ab"), &IdempotencyKey::parse("k").unwrap()).digest()
    );
}
