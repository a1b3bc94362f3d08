//! Property tests of the key state machine's invariants, on the pure model
//! (`decide` and the `Record` transitions), with no store and no runtime.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::time::Duration;

use idem_core::machine::{Decision, decide};
use idem_core::store::{FencingToken, Record, State};
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

#[derive(Clone, Debug)]
enum Op {
    Begin(FpIdx),
    Complete(TokenIdx, u8),
    Fail(TokenIdx, bool),
    Release(TokenIdx),
    Extend(TokenIdx),
    Advance(u32),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..3).prop_map(|f| Op::Begin(FpIdx(f))),
        2 => (any::<u8>(), any::<u8>()).prop_map(|(t, o)| Op::Complete(TokenIdx(t), o)),
        1 => (any::<u8>(), any::<bool>()).prop_map(|(t, r)| Op::Fail(TokenIdx(t), r)),
        1 => any::<u8>().prop_map(|t| Op::Release(TokenIdx(t))),
        1 => any::<u8>().prop_map(|t| Op::Extend(TokenIdx(t))),
        2 => prop_oneof![Just(1_000u32), Just(5_000), Just(10_000), Just(60_000), 0u32..200_000]
            .prop_map(Op::Advance),
    ]
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
                let token = FencingToken::from_u128(self.tokens.len() as u128 + 1);
                match decision {
                    Decision::Claim => {
                        self.tokens.push(token);
                        self.record = Some(Record::new_claim(fp, token, self.now, policy));
                    }
                    Decision::Reclaim(_) => {
                        self.tokens.push(token);
                        let record = self
                            .record
                            .as_ref()
                            .unwrap()
                            .reclaim(token, self.now, policy);
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
                                    kind: FailureKind::Permanent,
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
                    completed = Some((tok, outcome.clone()));
                    Ok(Some(next))
                });
                if completed.is_some() {
                    self.completed = completed;
                }
            }
            Op::Fail(t, retryable) => {
                let kind = if retryable {
                    FailureKind::Retryable
                } else {
                    FailureKind::Permanent
                };
                let token = self.token(t);
                self.holder_step(token, |r, tok, now| {
                    r.fail(tok, kind, Outcome::new(&b"failed"[..]), now, policy)
                        .map(Some)
                });
            }
            Op::Release(t) => {
                let token = self.token(t);
                self.holder_step(token, |r, tok, now| r.check_holder(tok, now).map(|()| None));
            }
            Op::Extend(t) => {
                let token = self.token(t);
                self.holder_step(token, |r, tok, now| r.extend(tok, now, policy).map(Some));
            }
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
        // At most one live lease at any instant.
        assert!(self.holders().len() <= 1, "two holders of one key");
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
