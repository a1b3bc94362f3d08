//! The lease of a claimed request while its handler runs: a live handler is
//! kept alive by its heartbeat however long it runs, and a handler that
//! lost its lease to a later request does not leave its answer on the key.
//!
//! Both cases run an engine with a 3 s lease ([`LEASE`]) and move its
//! [`TestClock`](crate::TestClock) by hand: no case waits for real time to
//! pass.

use std::time::Duration;

use idem_conformance::faulty::{Fault, FaultKind, Op};
use idem_core::store::State;
use idem_core::{Clock as _, Policy, Timestamp};
use libtest_mimic::Failed;
use tokio::time::timeout;

use super::flight::in_progress;
use crate::client::{Ctx, Reply, WAIT, ensure, ensure_eq, send, until};
use crate::fixture::{Adapter, Options};

/// The lease of the engine in the lease cases: short, so that a few steps
/// of the clock cross several lease periods.
pub const LEASE: Duration = Duration::from_secs(3);

/// The engine policy of the lease cases: the default with [`LEASE`].
fn policy() -> Policy {
    Policy::default().with_lease(LEASE)
}

/// The lease deadline and the attempt count of `key` while it is in
/// flight; `None` if it is absent or finished.
async fn in_flight(ctx: &Ctx, key: &str) -> Result<Option<(Timestamp, u32)>, Failed> {
    Ok(ctx
        .record(key)
        .await?
        .and_then(|current| match current.record.state {
            State::InFlight { lease_deadline, .. } => {
                Some((lease_deadline, current.record.attempts))
            }
            _ => None,
        }))
}

/// Sends a keyed request that must not run the handler (a second run would
/// wait at the closed gate of `/slow` for ever): races it against a second
/// entry into the handler, and returns its reply.
async fn without_a_run(ctx: &Ctx, key: &str, what: &str) -> Result<Reply, Failed> {
    let again = ctx.app().entered();
    tokio::select! {
        reply = ctx.send_post("/slow", Some(key), "{}") => reply,
        () = again => Err(Failed::from(format!("{what} ran the handler again"))),
    }
}

/// A handler that runs for three lease periods keeps its key: the
/// heartbeat extends the lease while it runs, so a duplicate is answered,
/// never run.
///
/// # Behavior
/// With a 3 s lease ([`LEASE`]), a request to `/slow` waits at its gate.
/// Nine times, once the heartbeat sleeps on the engine's clock, the case
/// moves the clock a third of the lease and waits (polling the store, with
/// a deadline) until the lease deadline is the clock's time plus a lease:
/// each beat is in the store, the attempt count stays 1. Then, long after
/// the first deadline:
/// - a duplicate gets 409 `request-in-progress` + `Retry-After` (1 or
///   2 s), and does not run the handler;
/// - once the gate opens, the first client gets the handler's 201
///   (`x-effect: 1`), and a retry gets it replayed;
/// - exactly one effect, one handler run.
///
/// The heartbeat is [`idem_http::Claimed::run`]: an adapter that runs the
/// handler without it fails at the first beat.
pub async fn heartbeat_keeps_the_key_held(adapter: &dyn Adapter) -> Result<(), Failed> {
    let ctx = Ctx::start_with(adapter, Options::default(), policy()).await?;
    let start = ctx.clock().now();
    let entered = ctx.app().entered();
    let first = tokio::spawn(send(ctx.post("/slow", Some("hb"), "{}")));
    timeout(WAIT, entered)
        .await
        .map_err(|_| Failed::from("the request never entered the handler"))?;
    ensure_eq!(
        in_flight(&ctx, "hb").await?,
        Some((start.plus(LEASE), 1)),
        "the claim (lease deadline, attempts)"
    );
    for beat in 1..=9 {
        ctx.sleeping(&format!(
            "heartbeat {beat} to wait on the engine's clock (a claimed handler runs with a \
             heartbeat beside it, Claimed::run)"
        ))
        .await?;
        ctx.clock().advance(LEASE / 3);
        let want = Some((ctx.clock().now().plus(LEASE), 1));
        until(
            &format!("heartbeat {beat} to extend the lease to the clock's time plus a lease"),
            WAIT,
            || async { Ok((in_flight(&ctx, "hb").await? == want).then_some(())) },
        )
        .await?;
    }
    ensure!(
        ctx.clock().now().since(start) >= LEASE * 3,
        "the handler ran for less than three leases"
    );
    let duplicate =
        without_a_run(&ctx, "hb", "a duplicate of a live, heartbeating request").await?;
    in_progress(&duplicate)?;
    ctx.app().open_gate();
    let first = timeout(WAIT, first)
        .await
        .map_err(|_| Failed::from("the request did not end once the gate opened"))?
        .map_err(|e| Failed::from(format!("the client task failed: {e}")))??;
    ensure_eq!(first.fresh(201)?, 1, "x-effect of the one run");
    ctx.send_post("/slow", Some("hb"), "{}")
        .await?
        .replay_of(&first)?;
    ensure_eq!(ctx.app().effects("/slow"), 1, "effects");
    ensure_eq!(ctx.app().runs("/slow"), 1, "handler runs");
    Ok(())
}

/// A handler that loses its lease while it runs (its heartbeat cannot
/// reach the store for longer than the lease, and a retry takes the key
/// over) does not answer for the key: its response is neither stored nor
/// sent, and every retry gets the new holder's answer.
///
/// # Behavior
/// This is window **W2** of docs/reliability.md ("Every way a request
/// ends", rows "heartbeat fails for longer than the lease" and "lease
/// taken over while the holder runs"): the work runs twice (2 effects),
/// the key keeps one answer. With a 3 s lease ([`LEASE`]), run twice, once
/// per order in which the two runs end:
/// - The first request to `/slow` (`x-gate: first`) waits at its gate; every
///   heartbeat of its claim (an in-flight write of attempt 1) fails as
///   unavailable while the case moves the engine's clock past its lease
///   deadline. The record is then still in flight, attempt 1, its
///   deadline not extended and passed.
/// - A retry (`x-gate: second`) takes the lapsed key over (attempt 2, a
///   fresh lease) and runs the handler: the second effect. The store is
///   reachable again from here on.
/// - Whichever ends first, the first holder's client gets 409
///   `request-in-progress` + `Retry-After` (docs/http-contract.md: "the
///   answer to a request that ran so long it lost its claim to a later
///   retry: its response is dropped"), not its handler's 201; the new
///   holder's client gets its handler's 201 (`x-effect: 2`). When the first
///   holder ends first, a retry meanwhile gets 409 and runs nothing.
/// - Every retry afterwards gets the new holder's 201 replayed.
/// - Exactly 2 effects and 2 handler runs.
pub async fn lease_taken_over_keeps_one_answer(adapter: &dyn Adapter) -> Result<(), Failed> {
    for first_ends_first in [true, false] {
        take_over(adapter, first_ends_first).await.map_err(|e| {
            let order = if first_ends_first {
                "the first holder ends first"
            } else {
                "the new holder ends first"
            };
            Failed::from(format!("{order}: {}", e.message().unwrap_or_default()))
        })?;
    }
    Ok(())
}

/// One run of [`lease_taken_over_keeps_one_answer`].
async fn take_over(adapter: &dyn Adapter, first_ends_first: bool) -> Result<(), Failed> {
    let ctx = Ctx::start_with(adapter, Options::default(), policy()).await?;
    let start = ctx.clock().now();
    // The first holder's heartbeats cannot reach the store; its claim (an
    // insert), the takeover (attempt 2) and every other write can.
    let cut =
        ctx.store().inject(
            Fault::new(Op::CompareAndSwap, FaultKind::Unavailable).when(|call| {
                call.writes_in_flight() && call.record.is_some_and(|v| v.record.attempts == 1)
            }),
        );
    let entered = ctx.app().entered();
    let first = tokio::spawn(send(
        ctx.post("/slow", Some("z"), "{}").header("x-gate", "first"),
    ));
    timeout(WAIT, entered)
        .await
        .map_err(|_| Failed::from("the first request never entered the handler"))?;
    let deadline = start.plus(LEASE);
    while ctx.clock().now() <= deadline {
        ctx.sleeping("the heartbeat to wait on the engine's clock")
            .await?;
        ctx.clock().advance(LEASE / 4);
    }
    until("the heartbeat to try to extend the lease", WAIT, || async {
        Ok((ctx.store().hits(cut) >= 1).then_some(()))
    })
    .await?;
    ensure_eq!(
        in_flight(&ctx, "z").await?,
        Some((deadline, 1)),
        "the lapsed claim (lease deadline, attempts)"
    );
    ensure!(ctx.clock().now() > deadline, "the lease has not lapsed");

    let entered = ctx.app().entered();
    let second = tokio::spawn(send(
        ctx.post("/slow", Some("z"), "{}")
            .header("x-gate", "second"),
    ));
    timeout(WAIT, entered)
        .await
        .map_err(|_| Failed::from("a retry did not take the lapsed key over"))?;
    ensure_eq!(
        in_flight(&ctx, "z").await?,
        Some((ctx.clock().now().plus(LEASE), 2)),
        "the takeover (lease deadline, attempts)"
    );
    ctx.store().remove(cut);
    ensure_eq!(ctx.app().effects("/slow"), 2, "effects of a lapsed lease");

    let join = |e: tokio::task::JoinError| Failed::from(format!("a client task failed: {e}"));
    let ended = |gate: &str, task: tokio::task::JoinHandle<Result<Reply, Failed>>| {
        ctx.app().open(gate);
        async move {
            timeout(WAIT, task)
                .await
                .map_err(|_| Failed::from("a request did not end once its gate opened"))?
                .map_err(join)?
        }
    };
    let (first, second) = if first_ends_first {
        let first = ended("first", first).await?;
        let meanwhile = without_a_run(&ctx, "z", "a retry while the new holder runs").await?;
        in_progress(&meanwhile)?;
        (first, ended("second", second).await?)
    } else {
        let second = ended("second", second).await?;
        (ended("first", first).await?, second)
    };
    in_progress(&first).map_err(|e| {
        Failed::from(format!(
            "the holder whose lease was taken over must answer 409, not its own response: {}",
            e.message().unwrap_or_default()
        ))
    })?;
    ensure_eq!(second.fresh(201)?, 2, "x-effect of the new holder's answer");
    for _ in 0..2 {
        ctx.send_post("/slow", Some("z"), "{}")
            .await?
            .replay_of(&second)?;
    }
    ensure_eq!(ctx.app().effects("/slow"), 2, "effects");
    ensure_eq!(ctx.app().runs("/slow"), 2, "handler runs");
    Ok(())
}
