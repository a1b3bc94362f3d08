//! The [`Completer`] through the store: it finds keys abandoned mid-way
//! (lease lapsed with a checkpoint) and drives them to completion with no
//! client retry, leaving alone the operations it cannot resume.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::Ordering;

use idem_core::store::{State, Store};
use idem_core::{
    Begin, Completer, Ending, Engine, IdempotencyKey, ManualClock, Pass, Phases, RecordKey,
    ReplayKind, Scope,
};

use super::super::{engine, open, policy};
use super::checkpoint::{Shop, Until};
use super::{fp, replay, stored};
use crate::StoreFactory;

/// The operation (the scope's) whose keys the completer resumes in the
/// cases.
pub(crate) const OPERATION: &str = "cases";

/// A completer over `engine` that resumes [`OPERATION`] keys with the
/// shop's order flow, ending each as the flow says (complete, or unknown if
/// a phase failed).
pub(crate) fn completer<S: Store>(
    engine: &Engine<S, ManualClock>,
    shop: &Arc<Shop>,
) -> Completer<S, ManualClock> {
    let shop = shop.clone();
    Completer::new(engine.clone()).operation(Some(OPERATION), move |phases: Phases| {
        let shop = shop.clone();
        async move { resume(&shop, phases).await }
    })
}

/// Runs the order flow to its end on `phases`: the ending to store.
pub(crate) async fn resume(shop: &Shop, mut phases: Phases) -> Ending {
    match shop.order(&mut phases, Until::End).await {
        Ok(Some(outcome)) => Ending::Complete(outcome),
        _ => Ending::Unknown,
    }
}

/// Leaves `key` abandoned: a first attempt records reserve and charge, then
/// dies (the lease dropped, nothing settled). The caller lets the lease
/// lapse.
pub(crate) async fn abandon<S: Store>(
    engine: &Engine<S, ManualClock>,
    shop: &Shop,
    key: RecordKey,
) {
    let lease = match engine.begin_key(key, fp("a")).await {
        Ok(Begin::Proceed(lease)) => lease,
        other => panic!("the first attempt must proceed, got {other:?}"),
    };
    let mut phases = engine.phases(&lease).expect("phases");
    let ran = shop.order(&mut phases, Until::CrashAfterCharge).await;
    assert!(matches!(ran, Ok(None)), "the first attempt: {ran:?}");
}

/// A key whose holder died after recording its charge is completed by one
/// completer pass, with no client retry: the remaining phase runs once, the
/// recorded ones not again, and the client's later request replays the
/// completer's outcome. A second pass finds nothing.
pub async fn completer_drives_an_abandoned_key_to_completion<F: StoreFactory>(factory: Arc<F>) {
    let (engine, clock) = engine(open(&*factory).await);
    let shop = Arc::new(Shop::default());
    let name = "abandoned-order";
    abandon(&engine, &shop, super::rkey(name)).await;
    let completer = completer(&engine, &shop);
    // While the lease is live, nothing is abandoned.
    let pass = completer.run_once().await.expect("a pass");
    assert_eq!(pass, Pass::default(), "a live lease is not abandoned");
    clock.advance(policy().lease);
    let pass = completer.run_once().await.expect("a pass");
    assert_eq!(
        (
            pass.found,
            pass.resumed,
            pass.ended,
            pass.skipped,
            pass.errors
        ),
        (1, 1, 1, 0, 0),
        "one abandoned key found, resumed and ended: {pass:?}"
    );
    assert_eq!(
        (
            shop.reserved.load(Ordering::SeqCst),
            shop.charges.calls(),
            shop.receipts.calls()
        ),
        (1, 1, 1),
        "recorded phases are not run again; the remaining one runs once"
    );
    assert_eq!(shop.resumes.load(Ordering::SeqCst), 1);
    let done = stored(&engine, name).await.expect("stored");
    assert_eq!(
        done.record.state.name(),
        "completed",
        "the completer completed the key"
    );
    assert_eq!(
        done.record.attempts, 2,
        "the completer's claim is attempt 2"
    );
    // The client comes back: it gets the completer's outcome.
    let r = replay(&engine, name, fp("a")).await;
    assert_eq!(r.kind, ReplayKind::Completed);
    assert_eq!(
        r.outcome.as_bytes(),
        b"order: stock 7, charge 1, receipt 1",
        "the client's retry replays the completer's outcome"
    );
    let pass = completer.run_once().await.expect("a pass");
    assert_eq!(pass.found, 0, "nothing is left abandoned: {pass:?}");
    assert_eq!(completer.totals().ended, 1);
    assert_eq!(shop.runs.load(Ordering::SeqCst), 2);
}

/// Keys of an operation without a registered resume are skipped and left
/// exactly as they are (still abandoned, for a client retry to resume),
/// while the keys it can resume in the same pass are ended.
pub async fn completer_skips_operations_without_a_resume<F: StoreFactory>(factory: Arc<F>) {
    let (engine, clock) = engine(open(&*factory).await);
    let shop = Arc::new(Shop::default());
    let other_scope = Scope::tenant("conformance").with_operation("unregistered");
    let other = RecordKey::new(
        &other_scope,
        &IdempotencyKey::parse("unregistered-order").expect("valid key"),
    );
    abandon(&engine, &shop, other.clone()).await;
    abandon(&engine, &shop, super::rkey("registered-order")).await;
    clock.advance(policy().lease);
    let now = {
        use idem_core::Clock;
        clock.now()
    };
    let before = engine
        .store()
        .get(&other, now)
        .await
        .expect("get")
        .expect("stored");
    let completer = completer(&engine, &shop);
    let pass = completer.run_once().await.expect("a pass");
    assert_eq!(
        (
            pass.found,
            pass.resumed,
            pass.ended,
            pass.skipped,
            pass.errors
        ),
        (2, 1, 1, 1, 0),
        "one key resumed and ended, one skipped: {pass:?}"
    );
    assert_eq!(
        shop.resumes.load(Ordering::SeqCst),
        1,
        "only the registered operation is resumed"
    );
    assert_eq!(
        engine.store().get(&other, now).await.expect("get"),
        Some(before.clone()),
        "a skipped key is left exactly as it was"
    );
    let still = engine.store().abandoned(now, 10).await.expect("abandoned");
    assert_eq!(still, vec![before], "and is still abandoned");
    assert_eq!(
        stored(&engine, "registered-order")
            .await
            .map(|v| v.record.state.name()),
        Some("completed")
    );
    // A completer with no operation registered skips everything.
    let idle = Completer::new(engine.clone());
    let pass = idle.run_once().await.expect("a pass");
    assert_eq!(
        (pass.found, pass.skipped, pass.resumed),
        (1, 1, 0),
        "{pass:?}"
    );
    // The client's retry resumes the skipped key itself.
    let lease = match engine.begin(&other_scope, other.key(), fp("a")).await {
        Ok(Begin::Proceed(lease)) => lease,
        other => panic!("the client's retry must proceed, got {other:?}"),
    };
    let ending = resume(&shop, engine.phases(&lease).expect("phases")).await;
    engine.settle(&lease, ending).await.expect("settle");
    let done = engine.store().get(&other, now).await.expect("get");
    assert!(
        matches!(done.map(|v| v.record.state), Some(State::Completed { .. })),
        "the client's retry completed the skipped key"
    );
    assert_eq!(shop.charges.effects(), 2, "one charge per order");
    assert_eq!(shop.receipts.effects(), 2, "one receipt per order");
}
