//! Completion inside the caller's transaction, for the backends that offer
//! it ([`Requires::Transactional`](crate::Requires::Transactional): the
//! factory's [`apply_transition`](crate::StoreFactory::apply_transition)).
//!
//! A [`Transition`] from
//! [`Engine::prepare_complete`](idem_core::Engine::prepare_complete) or
//! [`Engine::prepare_fail`](idem_core::Engine::prepare_fail) is applied in a
//! transaction of the backend: it replaces the record only if the live
//! record is in flight under the transition's fencing token (the token, not
//! the revision: a heartbeat meanwhile must not fail it), reports
//! [`Error::LeaseLost`] and changes nothing otherwise, and takes effect only
//! if the transaction commits.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::sync::Arc;

use idem_core::store::Versioned;
use idem_core::{
    Begin, Clock, Engine, Error, FailureKind, ManualClock, Outcome, ReplayKind, Transition,
};

use super::engine::{fp, lease_lost, proceed, replay, stored, take_over};
use super::{engine, ikey, must, open, policy, scope};
use crate::{StoreFactory, TransactionEnd};

/// A store of the factory, an engine over it, and its transactions.
struct Tx<F: StoreFactory> {
    factory: Arc<F>,
    store: Arc<F::Store>,
    engine: Engine<Arc<F::Store>, ManualClock>,
    clock: ManualClock,
}

impl<F: StoreFactory> Tx<F> {
    async fn open(factory: Arc<F>) -> Self {
        let store = open(&*factory).await;
        let (engine, clock) = engine(store.clone());
        Self {
            factory,
            store,
            engine,
            clock,
        }
    }

    /// Applies `transition` in a transaction that ends with `end`, failing
    /// the case if the factory could not run a transaction at all.
    async fn apply(&self, transition: &Transition, end: TransactionEnd) -> Result<(), Error> {
        let applied = self.factory.apply_transition(&self.store, transition, end);
        match applied.await {
            Ok(result) => result,
            Err(why) => panic!("factory.apply_transition() could not run a transaction: {why}"),
        }
    }

    /// Applies `transition` in a committed transaction: it must be refused
    /// with `LeaseLost` (`what`), and the key `name` must hold `want`
    /// afterwards (`why`).
    async fn refused(
        &self,
        transition: &Transition,
        what: &str,
        want: Option<Versioned>,
        why: &str,
    ) {
        lease_lost(self.apply(transition, TransactionEnd::Commit).await, what);
        let now = self.clock.now();
        assert_eq!(
            must(&self.store).get(&transition.key, now).await,
            want,
            "{why}"
        );
    }
}

/// A completion and a permanent failure, each applied in a committed
/// transaction, are stored exactly as prepared and replayed.
pub async fn commit_applies_complete_and_fail<F: StoreFactory>(factory: Arc<F>) {
    let tx = Tx::open(factory).await;
    let engine = &tx.engine;
    for (name, what, failure, bytes) in [
        ("tx-complete", "completion", None, &b"paid"[..]),
        (
            "tx-fail",
            "failure",
            Some(FailureKind::Permanent),
            &b"declined"[..],
        ),
    ] {
        let lease = proceed(engine, name, fp("a")).await;
        let (transition, kind) = match failure {
            None => (
                engine.prepare_complete(&lease, Outcome::new(bytes)),
                ReplayKind::Completed,
            ),
            Some(failure) => (
                engine.prepare_fail(&lease, failure, Outcome::new(bytes)),
                ReplayKind::Failed,
            ),
        };
        let transition = transition.expect("prepare");
        if let Err(e) = tx.apply(&transition, TransactionEnd::Commit).await {
            panic!("applying a held claim's {what} in a committed transaction must succeed: {e:?}");
        }
        lease.mark_applied(&transition).expect("mark_applied");
        assert_eq!(
            stored(engine, name).await,
            Some(transition.next.clone()),
            "the committed transition's record must be stored exactly ({name})"
        );
        let r = replay(engine, name, fp("a")).await;
        assert_eq!((r.kind, r.outcome.as_bytes()), (kind, bytes));
    }
}

/// A transition applied in a transaction that rolls back changes nothing:
/// the key stays claimed, in flight under the same lease, and the holder
/// can still finish it.
pub async fn rollback_leaves_the_claim_held<F: StoreFactory>(factory: Arc<F>) {
    let tx = Tx::open(factory).await;
    let engine = &tx.engine;
    let lease = proceed(engine, "tx-rollback", fp("a")).await;
    let before = stored(engine, "tx-rollback").await;
    let done = engine
        .prepare_complete(&lease, Outcome::new(&b"rolled back"[..]))
        .expect("prepare_complete");
    tx.apply(&done, TransactionEnd::Rollback)
        .await
        .expect("applying a held claim's completion must succeed (before the rollback)");
    assert_eq!(
        stored(engine, "tx-rollback").await,
        before,
        "a rolled-back transaction must leave the claim exactly as it was"
    );
    match engine.begin(&scope(), &ikey("tx-rollback"), fp("a")).await {
        Ok(Begin::InProgress { .. }) => {}
        other => panic!("after a rollback the key is still claimed (InProgress), got {other:?}"),
    }
    engine
        .complete(&lease, Outcome::new(&b"paid later"[..]))
        .await
        .expect("after a rollback the holder still holds its claim and completes it");
    let r = replay(engine, "tx-rollback", fp("a")).await;
    assert_eq!(r.outcome.as_bytes(), b"paid later");
}

/// A heartbeat between prepare and apply changes the record's revision, not
/// its holder: the apply checks the fencing token and succeeds.
pub async fn apply_checks_the_token_not_the_revision<F: StoreFactory>(factory: Arc<F>) {
    let tx = Tx::open(factory).await;
    let engine = &tx.engine;
    let lease = proceed(engine, "tx-heartbeat", fp("a")).await;
    let done = engine
        .prepare_complete(&lease, Outcome::new(&b"slow but done"[..]))
        .expect("prepare_complete");
    let claimed = stored(engine, "tx-heartbeat").await.expect("claimed");
    tx.clock.advance(policy().lease / 3);
    engine.extend(&lease).await.expect("the heartbeat");
    let extended = stored(engine, "tx-heartbeat").await.expect("claimed");
    assert_ne!(
        extended.revision, claimed.revision,
        "the heartbeat wrote a new revision"
    );
    tx.apply(&done, TransactionEnd::Commit).await.expect(
        "a heartbeat since the prepare must not fail the apply: check the token, not the revision",
    );
    lease.mark_applied(&done).expect("mark_applied");
    assert_eq!(stored(engine, "tx-heartbeat").await, Some(done.next));
}

/// A transition of a claim no longer held is refused with `LeaseLost` and
/// writes nothing: after a takeover (a zombie's completion), after the key
/// finished (a second completion), and after a release (never an upsert).
pub async fn lost_claim_is_refused_and_nothing_changes<F: StoreFactory>(factory: Arc<F>) {
    let tx = Tx::open(factory).await;
    let engine = &tx.engine;
    let prepare = |lease, outcome: &'static [u8]| {
        engine
            .prepare_complete(lease, Outcome::new(outcome))
            .expect("prepare_complete")
    };

    // Taken over: prepared while the lease was live, applied after.
    let zombie = proceed(engine, "tx-zombie", fp("a")).await;
    let late = prepare(&zombie, b"zombie");
    let holder = take_over(engine, "tx-zombie", &zombie).await;
    let claim = stored(engine, "tx-zombie").await;
    let what = "applying a zombie's completion after a takeover";
    tx.refused(
        &late,
        what,
        claim,
        "a refused transition must change nothing",
    )
    .await;

    // Finished: the first of two transitions wins, the second is refused.
    let first = prepare(&holder, b"first");
    let second = prepare(&holder, b"second");
    tx.apply(&first, TransactionEnd::Commit)
        .await
        .expect("the holder's first completion");
    let what = "applying a second completion to a finished key";
    let why = "a finished key must keep its first outcome";
    tx.refused(&second, what, Some(first.next), why).await;

    // Released: the key is absent, and applying must not write it back.
    let released = proceed(engine, "tx-released", fp("a")).await;
    let orphan = prepare(&released, b"orphan");
    engine.release(&released).await.expect("release");
    let what = "applying a completion of a released key";
    let why = "applying to an absent key must write nothing (never an upsert)";
    tx.refused(&orphan, what, None, why).await;
}
