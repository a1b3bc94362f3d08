//! Every way a claimed request ends (the exit table of docs/reliability.md),
//! the store going away, a graceful shutdown, and the claim in the
//! handler.

use std::time::Duration;

use http::Method;
use idem_conformance::faulty::{Fault, FaultKind, Op};
use idem_core::store::{Revision, State, Store as _, SwapOutcome, Versioned};
use idem_core::{Clock as _, Outcome, Policy};
use idem_http::ProblemType;
use libtest_mimic::Failed;
use tokio::time::timeout;

use crate::client::{Ctx, TENANT, WAIT, ensure, ensure_eq, record_key, send, until};
use crate::fixture::{Adapter, Options};

/// A 5xx the handler did not declare effect-free is ambiguous: the first
/// client gets the handler's 500, the key ends as outcome unknown, and
/// every retry gets 500 `outcome-unknown` without the handler running
/// again.
pub async fn server_error_is_outcome_unknown(adapter: &dyn Adapter) -> Result<(), Failed> {
    let ctx = Ctx::start(adapter, Options::default()).await?;
    let first = ctx.send_post("/fail", Some("e"), "{}").await?;
    ensure_eq!(first.fresh(500)?, 1, "x-effect of the failed first answer");
    for _ in 0..2 {
        ctx.send_post("/fail", Some("e"), "{}")
            .await?
            .problem(ProblemType::OutcomeUnknown)?;
    }
    ensure_eq!(
        ctx.app().runs("/fail"),
        1,
        "a retry after an ambiguous 5xx ran again"
    );
    Ok(())
}

/// A response carrying `NoEffect` releases the key: it is returned to the
/// client as is, nothing is stored, and a retry runs the handler afresh.
pub async fn no_effect_releases_the_key(adapter: &dyn Adapter) -> Result<(), Failed> {
    let ctx = Ctx::start(adapter, Options::default()).await?;
    for run in 1..=2 {
        let reply = ctx.send_post("/no-effect", Some("n"), "{}").await?;
        reply.fresh(503)?;
        ensure!(
            reply.body.is_empty(),
            "the handler's body was replaced: {reply:?}"
        );
        ensure_eq!(ctx.app().runs("/no-effect"), run, "the retry runs again");
    }
    ensure_eq!(ctx.app().effects("/no-effect"), 0, "effects");
    Ok(())
}

/// A handler that calls `claim.declare_no_effect()` and then fails (500)
/// releases the key: the retry runs the handler again (and gets its 500,
/// not `outcome-unknown`).
pub async fn declared_no_effect_releases_the_key(adapter: &dyn Adapter) -> Result<(), Failed> {
    let ctx = Ctx::start(adapter, Options::default()).await?;
    for run in 1..=2 {
        let reply = ctx.send_post("/declare-then-fail", Some("d"), "{}").await?;
        reply.fresh(500)?;
        ensure!(
            reply.header("content-type") != Some(idem_http::PROBLEM_JSON),
            "not the handler's answer: {reply:?}"
        );
        ensure_eq!(
            ctx.app().runs("/declare-then-fail"),
            run,
            "the retry runs again"
        );
    }
    Ok(())
}

/// A handler that panics after its effect: the panicking request gets a
/// 500 or a dropped connection (the adapter's choice), the key ends as
/// outcome unknown, and every retry gets 500 `outcome-unknown`; the
/// handler ran once.
pub async fn panic_is_outcome_unknown(adapter: &dyn Adapter) -> Result<(), Failed> {
    let ctx = Ctx::start(adapter, Options::default()).await?;
    // The adapter may also drop the connection (an error here).
    if let Ok(response) = ctx.post("/panic", Some("p"), "{}").send().await {
        let status = response.status().as_u16();
        ensure_eq!(status, 500, "status of the panicking request");
    }
    let retry = until("the panicked key to end", WAIT, || async {
        let reply = ctx.send_post("/panic", Some("p"), "{}").await?;
        Ok((reply.status != 409).then_some(reply))
    })
    .await?;
    retry.problem(ProblemType::OutcomeUnknown)?;
    ctx.send_post("/panic", Some("p"), "{}")
        .await?
        .problem(ProblemType::OutcomeUnknown)?;
    ensure_eq!(ctx.app().effects("/panic"), 1, "effects");
    ensure_eq!(ctx.app().runs("/panic"), 1, "handler runs");
    Ok(())
}

/// A 4xx is a final answer: stored and replayed (same status and body,
/// `Idempotent-Replayed: true`); the handler ran once.
pub async fn client_error_is_stored(adapter: &dyn Adapter) -> Result<(), Failed> {
    let ctx = Ctx::start(adapter, Options::default()).await?;
    let first = ctx.send_post("/reject", Some("x"), "{}").await?;
    first.fresh(400)?;
    ensure_eq!(first.json()?["error"], "no", "the handler's 400");
    ctx.send_post("/reject", Some("x"), "{}")
        .await?
        .replay_of(&first)?;
    ensure_eq!(ctx.app().runs("/reject"), 1, "handler runs");
    Ok(())
}

/// With an engine that keeps outcomes of at most 1 KiB: a 4 KiB response
/// goes to the first client whole, the key is completed with a marker, and
/// every retry gets 500 `response-not-stored` (marked replayed) without a
/// second effect. A 512-byte response is stored and replayed.
pub async fn response_too_large_is_not_stored(adapter: &dyn Adapter) -> Result<(), Failed> {
    let policy = Policy::default().with_max_outcome_bytes(1024);
    let ctx = Ctx::start_with(adapter, Options::default(), policy).await?;
    let big = || ctx.post("/big", Some("big"), "{}").header("x-size", "4096");
    let first = send(big()).await?;
    first.fresh(201)?;
    ensure_eq!(first.body.len(), 4096, "length of the first answer");
    ensure!(
        first.body.iter().all(|b| *b == b'x'),
        "the first answer's body is not the handler's"
    );
    for _ in 0..2 {
        let retry = send(big()).await?;
        retry.problem(ProblemType::ResponseNotStored)?;
        ensure!(
            retry.replayed(),
            "a response-not-stored marker is replayed: {retry:?}"
        );
    }
    ensure_eq!(
        ctx.app().effects("/big"),
        1,
        "effects of a response too large"
    );
    let small = || {
        ctx.post("/big", Some("small"), "{}")
            .header("x-size", "512")
    };
    let first = send(small()).await?;
    first.fresh(201)?;
    send(small()).await?.replay_of(&first)?;
    ensure_eq!(ctx.app().effects("/big"), 2, "effects");
    Ok(())
}

/// While the store is unreachable a keyed request is 503
/// `store-unavailable` + `Retry-After` and does not run (fail closed);
/// unkeyed requests still pass. Once the store is back, the retry runs
/// once and its answer is then replayed.
pub async fn store_outage_fails_closed(adapter: &dyn Adapter) -> Result<(), Failed> {
    let ctx = Ctx::start(adapter, Options::default()).await?;
    ctx.switch_off();
    for _ in 0..2 {
        let reply = ctx.send_post("/outage", Some("o"), "{}").await?;
        reply.problem(ProblemType::StoreUnavailable)?;
        ensure_eq!(
            reply.retry_after()?,
            1,
            "Retry-After of a 503 (store_retry_after 1 s)"
        );
    }
    ensure_eq!(
        ctx.app().runs("/outage"),
        0,
        "fail closed: the handler must not run"
    );
    ctx.send_post("/unkeyed", None, "{}").await?.fresh(201)?;
    ctx.switch_on();
    let first = ctx.send_post("/outage", Some("o"), "{}").await?;
    ensure_eq!(first.fresh(201)?, 1, "x-effect once the store is back");
    ctx.send_post("/outage", Some("o"), "{}")
        .await?
        .replay_of(&first)?;
    ensure_eq!(ctx.app().effects("/outage"), 1, "effects");
    Ok(())
}

/// The store fails when the handler's response is to be stored (every
/// compare-and-swap unavailable; the engine's lease is 10 s): the client
/// still gets the handler's 201 (the work happened); a retry meanwhile gets
/// 409 and does not run it again; once the store is back the response is
/// stored in the background and the retry gets it replayed. (The background
/// retry backs off on the engine's clock: the case moves it 100 ms per
/// retry that still gets 409, well inside the lease.)
pub async fn completion_store_failure_still_answers(adapter: &dyn Adapter) -> Result<(), Failed> {
    let policy = Policy::default().with_lease(Duration::from_secs(10));
    let ctx = Ctx::start_with(adapter, Options::default(), policy).await?;
    let fault = ctx
        .store()
        .inject(Fault::new(Op::CompareAndSwap, FaultKind::Unavailable));
    let first = ctx.send_post("/late", Some("l"), "{}").await?;
    ensure_eq!(first.fresh(201)?, 1, "the handler's answer, not stored yet");
    let retry = ctx.send_post("/late", Some("l"), "{}").await?;
    retry.problem(ProblemType::RequestInProgress)?;
    ensure!(
        ctx.store().hits(fault) >= 1,
        "the store was never asked to complete the key"
    );
    ctx.switch_on();
    let replay = until(
        "the response to be stored in the background",
        WAIT,
        || async {
            let reply = ctx.send_post("/late", Some("l"), "{}").await?;
            if reply.status == 409 {
                ctx.clock().advance(Duration::from_millis(100));
                return Ok(None);
            }
            Ok(Some(reply))
        },
    )
    .await?;
    replay.replay_of(&first)?;
    ensure_eq!(ctx.app().runs("/late"), 1, "handler runs");
    Ok(())
}

/// A stored record that cannot be read (its outcome is not a stored
/// response) is 500 `corrupt-record` for the retry, and nothing runs again.
pub async fn corrupt_record_is_500(adapter: &dyn Adapter) -> Result<(), Failed> {
    let ctx = Ctx::start(adapter, Options::default()).await?;
    ctx.send_post("/corrupt", Some("c"), "{}")
        .await?
        .fresh(201)?;
    let record_key = record_key("c")?;
    let inner = ctx.store().inner();
    let now = ctx.setup.engine.clock().now();
    let current = inner
        .get(&record_key, now)
        .await
        .map_err(|e| Failed::from(format!("reading the record: {e}")))?
        .ok_or_else(|| Failed::from("the key has no record"))?;
    let State::Completed { token, .. } = current.record.state else {
        return Err(Failed::from(format!(
            "the key is {}, not completed",
            current.record.state.name()
        )));
    };
    let mut broken = current.record.clone();
    broken.state = State::Completed {
        token,
        outcome: Outcome::new(vec![1u8, 2, 3]),
    };
    let next = Versioned {
        revision: Revision::from_u64(u64::MAX / 2),
        record: broken,
    };
    let swapped = inner
        .compare_and_swap(&record_key, &current, &next, now)
        .await
        .map_err(|e| Failed::from(format!("corrupting the record: {e}")))?;
    ensure!(
        swapped == SwapOutcome::Swapped,
        "the record changed meanwhile"
    );
    ctx.send_post("/corrupt", Some("c"), "{}")
        .await?
        .problem(ProblemType::CorruptRecord)?;
    ensure_eq!(ctx.app().runs("/corrupt"), 1, "handler runs");
    Ok(())
}

/// A graceful shutdown of the engine while a handler runs: new keyed
/// requests get 503 `shutting-down` + `Retry-After` and do not run, unkeyed
/// ones still pass; the running handler finishes and its client gets its
/// 201; the shutdown reports it finished, nothing marked unknown.
pub async fn shutdown_refuses_new_and_finishes_running(
    adapter: &dyn Adapter,
) -> Result<(), Failed> {
    let ctx = Ctx::start(adapter, Options::default()).await?;
    let entered = ctx.app().entered();
    let running = tokio::spawn(send(ctx.post("/slow", Some("a"), "{}")));
    timeout(WAIT, entered)
        .await
        .map_err(|_| Failed::from("the request never entered the handler"))?;
    let engine = ctx.setup.engine.clone();
    let shutdown = tokio::spawn(async move { engine.shutdown(Duration::from_secs(30)).await });
    until("the engine to begin its shutdown", WAIT, || async {
        Ok(ctx.setup.engine.is_shutting_down().then_some(()))
    })
    .await?;
    let refused = ctx.send_post("/new", Some("b"), "{}").await?;
    refused.problem(ProblemType::ShuttingDown)?;
    ensure!(refused.retry_after()? >= 1, "Retry-After of shutting-down");
    ensure_eq!(
        ctx.app().runs("/new"),
        0,
        "a request refused by the shutdown ran"
    );
    ctx.send_post("/new", None, "{}").await?.fresh(201)?;
    ctx.app().open_gate();
    let first = running
        .await
        .map_err(|e| Failed::from(format!("the running request's task failed: {e}")))??;
    ensure_eq!(first.fresh(201)?, 1, "the running request's answer");
    let report = timeout(WAIT, shutdown)
        .await
        .map_err(|_| Failed::from("the shutdown did not end once the handler finished"))?
        .map_err(|e| Failed::from(format!("the shutdown task failed: {e}")))?;
    ensure_eq!(
        (report.running, report.finished, report.marked_unknown),
        (1, 1, 0),
        "shutdown report (running, finished, marked unknown)"
    );
    ensure_eq!(ctx.app().effects("/slow"), 1, "effects");
    Ok(())
}

/// The handler of a keyed request finds the claim in its request (with the
/// client's key unquoted, the scope's tenant, attempt 1); requests without
/// a key, and uncovered methods, have none. A replay does not run the
/// handler.
pub async fn claim_in_handler(adapter: &dyn Adapter) -> Result<(), Failed> {
    let ctx = Ctx::start(adapter, Options::default()).await?;
    let first = ctx.send_post("/claim", Some("\"c-1\""), "{}").await?;
    first.fresh(201)?;
    let json = first.json()?;
    ensure_eq!(json["claim"], true, "claim in a keyed request {first:?}");
    ensure_eq!(json["attempt"], 1, "attempt");
    ensure_eq!(json["key"], "c-1", "the claim's key");
    ensure_eq!(json["tenant"], TENANT, "the claim's scope");
    ctx.send_post("/claim", Some("c-1"), "{}")
        .await?
        .replay_of(&first)?;
    let unkeyed = ctx.send_post("/claim", None, "{}").await?;
    ensure_eq!(
        unkeyed.json()?["claim"],
        false,
        "claim without a key {unkeyed:?}"
    );
    let get = send(
        ctx.request(Method::GET, "/claim")
            .header("idempotency-key", "g"),
    )
    .await?;
    ensure_eq!(
        get.json()?["claim"],
        false,
        "claim in an uncovered method {get:?}"
    );
    ensure_eq!(ctx.app().runs("/claim"), 3, "handler runs");
    Ok(())
}

/// A handler that completes its key inside its own "transaction" through
/// the claim (`prepare_response`, applied to the store): the middleware
/// does not store the response a second time (the record is the handler's
/// revision), and the retry replays exactly what the handler prepared.
pub async fn complete_in_handler_transaction(adapter: &dyn Adapter) -> Result<(), Failed> {
    let ctx = Ctx::start(adapter, Options::default()).await?;
    let first = ctx.send_post("/tx", Some("tx-1"), "pay").await?;
    first.fresh(201)?;
    ensure_eq!(first.json()?["tx"], true, "the handler's answer {first:?}");
    let applied = ctx.app().applied();
    ensure_eq!(applied.len(), 1, "transitions the handler applied");
    let record_key = record_key("tx-1")?;
    let now = ctx.setup.engine.clock().now();
    let record = ctx
        .store()
        .inner()
        .get(&record_key, now)
        .await
        .map_err(|e| Failed::from(format!("reading the record: {e}")))?
        .ok_or_else(|| Failed::from("the key has no record"))?;
    ensure!(
        matches!(record.record.state, State::Completed { .. }),
        "the key is not completed: {}",
        record.record.state.name()
    );
    ensure_eq!(
        record.revision,
        applied[0],
        "the middleware stored the response a second time"
    );
    ctx.send_post("/tx", Some("tx-1"), "pay")
        .await?
        .replay_of(&first)?;
    ensure_eq!(ctx.app().runs("/tx"), 1, "handler runs");
    Ok(())
}
