#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::error::Error as _;

use idem_core::store::codec::RECORD_OVERHEAD;
use idem_core::store::{FencingToken, Revision, State};
use idem_core::{FailureKind, MemoryStore, Outcome};

use super::*;
use crate::cases::{T0, claim, completed, key};

fn store() -> FaultyStore<MemoryStore> {
    FaultyStore::new(MemoryStore::new())
}

/// Makes the next call of `op` take effect and then fail with `kind` (a
/// lost reply).
fn lose_next_reply(s: &FaultyStore<MemoryStore>, op: Op, kind: FaultKind) {
    s.inject(Fault::new(op, kind).after_apply().next(1));
}

fn injected(e: &StoreError) -> &InjectedFault {
    e.source()
        .and_then(|s| s.downcast_ref::<InjectedFault>())
        .unwrap_or_else(|| panic!("not an injected fault: {e:?}"))
}

#[tokio::test]
async fn without_faults_it_is_transparent_and_counts() {
    let s = store();
    let k = key("t");
    let rec = claim(1, 1, T0, 60);
    assert_eq!(
        s.insert_if_absent(&k, &rec, T0).await.unwrap(),
        InsertOutcome::Inserted
    );
    assert_eq!(s.get(&k, T0).await.unwrap(), Some(rec.clone()));
    let next = completed(2, 1, T0, 60, b"ok");
    assert_eq!(
        s.compare_and_swap(&k, &rec, &next, T0).await.unwrap(),
        SwapOutcome::Swapped
    );
    assert!(s.delete_if(&k, &next, T0).await.unwrap());
    assert_eq!(s.purge_expired(T0, 10).await.unwrap(), 0);
    assert_eq!(s.census(T0, 10).await.unwrap().total(), 0);
    assert_eq!(s.abandoned(T0, 10).await.unwrap(), Vec::new());
    for op in Op::ALL {
        assert_eq!(s.calls(op), 1, "{op}");
        assert_eq!(s.injected(op), 0, "{op}");
    }
    assert_eq!(s.capabilities(), MemoryStore::new().capabilities());
}

#[tokio::test]
async fn next_n_fails_the_next_calls_only() {
    let s = store();
    let k = key("n");
    let id = s.inject(Fault::new(Op::Get, FaultKind::Unavailable).next(2));
    for call in 1..=2 {
        let e = s.get(&k, T0).await.unwrap_err();
        assert!(e.is_transient());
        assert_eq!(
            injected(&e),
            &InjectedFault {
                op: Op::Get,
                call,
                phase: Phase::BeforeApply
            }
        );
    }
    assert_eq!(s.get(&k, T0).await.unwrap(), None);
    assert_eq!(
        (s.hits(id), s.calls(Op::Get), s.injected(Op::Get)),
        (2, 3, 2)
    );
    // Other primitives are untouched.
    s.insert_if_absent(&k, &claim(1, 1, T0, 60), T0)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_window_fails_calls_k_to_m_counted_from_injection() {
    let s = store();
    let k = key("w");
    s.get(&k, T0).await.unwrap();
    let id = s.inject(Fault::new(Op::Get, FaultKind::Generic).calls(2..=3));
    let mut results = Vec::new();
    for _ in 0..5 {
        results.push(s.get(&k, T0).await.is_ok());
    }
    assert_eq!(results, [true, false, false, true, true]);
    assert_eq!(s.hits(id), 2);
    assert_eq!(s.calls(Op::Get), 6);
}

#[tokio::test]
async fn always_until_removed() {
    let s = store();
    let k = key("a");
    let id = s.inject(Fault::new(Op::DeleteIf, FaultKind::Rejected));
    for _ in 0..3 {
        assert!(matches!(
            s.delete_if(&k, &claim(1, 1, T0, 60), T0).await,
            Err(StoreError::Rejected {
                store: "faulty",
                ..
            })
        ));
    }
    assert!(s.remove(id));
    assert!(!s.remove(id));
    assert!(!s.delete_if(&k, &claim(1, 1, T0, 60), T0).await.unwrap());
    assert_eq!(s.hits(id), 3, "hits survive removal");
    let again = s.inject(Fault::new(Op::PurgeExpired, FaultKind::Corrupt));
    assert!(matches!(
        s.purge_expired(T0, 1).await,
        Err(StoreError::Corrupt { .. })
    ));
    s.clear();
    assert_eq!(s.purge_expired(T0, 1).await.unwrap(), 0);
    assert_eq!(s.hits(again), 1);
}

#[tokio::test]
async fn before_apply_writes_nothing_after_apply_writes() {
    let s = store();
    let k = key("phase");
    let rec = claim(1, 1, T0, 60);
    s.inject(Fault::new(Op::InsertIfAbsent, FaultKind::Unavailable).next(1));
    s.insert_if_absent(&k, &rec, T0).await.unwrap_err();
    assert_eq!(s.inner().get(&k, T0).await.unwrap(), None);

    lose_next_reply(&s, Op::InsertIfAbsent, FaultKind::Unavailable);
    let e = s.insert_if_absent(&k, &rec, T0).await.unwrap_err();
    assert_eq!(injected(&e).phase, Phase::AfterApply);
    assert_eq!(s.inner().get(&k, T0).await.unwrap(), Some(rec.clone()));

    let next = completed(2, 1, T0, 60, b"done");
    lose_next_reply(&s, Op::CompareAndSwap, FaultKind::Unavailable);
    s.compare_and_swap(&k, &rec, &next, T0).await.unwrap_err();
    assert_eq!(s.inner().get(&k, T0).await.unwrap(), Some(next.clone()));

    lose_next_reply(&s, Op::DeleteIf, FaultKind::Generic);
    s.delete_if(&k, &next, T0).await.unwrap_err();
    assert_eq!(s.inner().get(&k, T0).await.unwrap(), None);
    // The wrapped store's own answer wins over an after-apply fault when
    // it fails: here it conflicts (not an error), so the fault strikes.
    lose_next_reply(&s, Op::CompareAndSwap, FaultKind::Generic);
    s.compare_and_swap(&k, &rec, &next, T0).await.unwrap_err();
    assert_eq!(s.inner().get(&k, T0).await.unwrap(), None);
}

#[tokio::test]
async fn predicates_tell_heartbeats_from_completions() {
    let s = store();
    let k = key("p");
    let rec = claim(1, 1, T0, 60);
    s.insert_if_absent(&k, &rec, T0).await.unwrap();
    let beats = s.inject(
        Fault::new(Op::CompareAndSwap, FaultKind::Unavailable)
            .writing_in_flight()
            .calls(2..=2),
    );
    let mut current = rec;
    for (i, fails) in [(2, false), (3, true), (4, false)] {
        let mut beat = current.clone();
        beat.revision = Revision::from_u64(i);
        let got = s.compare_and_swap(&k, &current, &beat, T0).await;
        assert_eq!(got.is_err(), fails, "heartbeat {i}");
        if !fails {
            current = beat;
        }
    }
    assert_eq!(s.hits(beats), 1);
    let done = s.inject(
        Fault::new(Op::CompareAndSwap, FaultKind::Rejected)
            .writing_finished()
            .when(|c| c.writes_finished() && c.key.is_some_and(|k| k.key().as_str() == "p")),
    );
    let mut finished = completed(9, 1, T0, 60, b"x");
    finished.record.state = State::Failed {
        token: FencingToken::from_u128(1),
        kind: FailureKind::Unknown,
        outcome: Outcome::default(),
    };
    let e = s
        .compare_and_swap(&k, &current, &finished, T0)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Rejected { .. }));
    assert_eq!(s.hits(done), 1);
    assert_eq!(s.inner().get(&k, T0).await.unwrap(), Some(current));
}

#[test]
fn every_kind_maps_to_its_variant() {
    for kind in FaultKind::ALL {
        let e = kind.error(
            "x",
            InjectedFault {
                op: Op::Get,
                call: 1,
                phase: Phase::BeforeApply,
            },
        );
        let ok = matches!(
            (kind, &e),
            (FaultKind::Unavailable, StoreError::Unavailable { .. })
                | (FaultKind::Corrupt, StoreError::Corrupt { .. })
                | (FaultKind::Rejected, StoreError::Rejected { .. })
                | (FaultKind::Generic, StoreError::Generic { .. })
        );
        assert!(ok, "{kind:?} → {e:?}");
        assert_eq!(e.is_transient(), kind == FaultKind::Unavailable);
        assert!(injected(&e).to_string().contains("get call 1"));
    }
}

#[tokio::test]
async fn a_declared_limit_is_enforced_by_record_size() {
    let limit = RECORD_OVERHEAD + 100;
    let s = store().with_max_record_bytes(Some(limit));
    assert_eq!(s.capabilities().max_record_bytes, Some(limit));
    let k = key("l");
    let at = completed(1, 1, T0, 60, &[7; 100]);
    assert_eq!(record_size(&at.record), limit);
    s.insert_if_absent(&k, &at, T0).await.unwrap();
    let over = completed(2, 1, T0, 60, &[7; 101]);
    let k2 = key("l2");
    assert!(matches!(
        s.insert_if_absent(&k2, &over, T0).await,
        Err(StoreError::Rejected { .. })
    ));
    assert!(matches!(
        s.compare_and_swap(&k, &at, &over, T0).await,
        Err(StoreError::Rejected { .. })
    ));
    assert_eq!(s.get(&k2, T0).await.unwrap(), None);
    assert_eq!(s.get(&k, T0).await.unwrap(), Some(at));
    assert_eq!(s.oversized(Op::InsertIfAbsent), 1);
    assert_eq!(s.oversized(Op::CompareAndSwap), 1);
    // Never declares more than the wrapped store's own limit.
    let capped = FaultyStore::new(store().with_max_record_bytes(Some(500)))
        .with_max_record_bytes(Some(1000));
    assert_eq!(capped.capabilities().max_record_bytes, Some(500));
}

#[tokio::test]
async fn the_engine_sees_the_store_limit_and_the_faults() {
    let s = store().with_max_record_bytes(Some(RECORD_OVERHEAD + 64));
    let engine = idem_core::Engine::with_clock(s, idem_core::ManualClock::new(T0))
        .with_policy(crate::cases::policy())
        .unwrap();
    assert_eq!(engine.outcome_limit(), 64);
    engine
        .store()
        .inject(Fault::new(Op::InsertIfAbsent, FaultKind::Unavailable).next(1));
    let scope = crate::cases::scope();
    let k = crate::cases::ikey("e");
    let fp = idem_core::Fingerprint::of(b"r");
    let e = engine.begin(&scope, &k, fp).await.unwrap_err();
    assert!(e.is_transient(), "{e:?}");
    let idem_core::Begin::Proceed(lease) = engine.begin(&scope, &k, fp).await.unwrap() else {
        panic!("a fresh claim")
    };
    let ended = engine
        .settle_until(
            &lease,
            idem_core::Ending::Complete(Outcome::new(vec![1; 65])),
            T0,
        )
        .await
        .unwrap();
    assert_eq!(ended, idem_core::Ending::Unknown);
}

#[test]
fn a_store_with_a_declared_limit_passes_the_store_cases() {
    struct Limited;
    #[async_trait]
    impl crate::StoreFactory for Limited {
        type Store = FaultyStore<MemoryStore>;
        fn name(&self) -> &'static str {
            "faulty-limited"
        }
        async fn open(&self) -> Result<Self::Store, crate::Unavailable> {
            Ok(FaultyStore::new(MemoryStore::new()).with_max_record_bytes(Some(4 * 1024 * 1024)))
        }
    }
    let report = crate::Suite::new(Limited)
        .retain(|n| n.starts_with("store::"))
        .report();
    assert!(report.failed().is_empty(), "{report}");
    for case in [
        "store::oversized_record_is_rejected",
        "store::declared_record_limit_is_honest",
    ] {
        assert_eq!(
            report.verdict(case),
            Some(&crate::Verdict::Passed),
            "{report}"
        );
    }
}

#[tokio::test]
async fn abandoned_is_forwarded_and_can_fail() {
    let s = store();
    assert!(
        s.capabilities().abandoned,
        "MemoryStore's capability is kept"
    );
    let k = key("abandoned");
    let mut rec = claim(1, 1, T0, 60);
    rec.record.checkpoint = Some(idem_core::store::Checkpoint::new(&k, 1, "step", vec![1]));
    s.insert_if_absent(&k, &rec, T0).await.unwrap();
    let lapsed = T0.plus(std::time::Duration::from_secs(10));
    let id = s.inject(Fault::new(Op::Abandoned, FaultKind::Unavailable).next(1));
    let e = s.abandoned(lapsed, 10).await.unwrap_err();
    assert!(e.is_transient());
    assert_eq!(
        injected(&e),
        &InjectedFault {
            op: Op::Abandoned,
            call: 1,
            phase: Phase::BeforeApply
        }
    );
    assert_eq!(s.abandoned(lapsed, 10).await.unwrap(), vec![rec]);
    assert_eq!(s.abandoned(T0, 10).await.unwrap(), Vec::new(), "lease live");
    assert_eq!(
        (
            s.hits(id),
            s.calls(Op::Abandoned),
            s.injected(Op::Abandoned)
        ),
        (1, 3, 1)
    );
}
