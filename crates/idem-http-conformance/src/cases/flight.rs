//! Requests that meet a key already in use: concurrent duplicates, a key
//! reused with another request, a client that goes away mid-handler.

use std::sync::Arc;

use idem_http::ProblemType;
use libtest_mimic::Failed;
use tokio::sync::{Barrier, mpsc};
use tokio::time::timeout;

use crate::client::{Ctx, Reply, WAIT, ensure, ensure_eq, holds_for, send, until};
use crate::fixture::{Adapter, Options};

/// Checks a 409 `request-in-progress` with a `Retry-After` of 1 or 2
/// seconds (the suite sets `max_retry_after` to 2 s).
#[track_caller]
pub(crate) fn in_progress(reply: &Reply) -> Result<(), Failed> {
    reply.problem(ProblemType::RequestInProgress)?;
    let after = reply.retry_after()?;
    ensure!((1..=2).contains(&after), "Retry-After {after} of a 409");
    Ok(())
}

/// Eight clients send the same keyed request at once (behind a barrier) to
/// `/slow`, whose handler waits at a gate: exactly one runs; while it waits
/// the seven others are answered 409 `request-in-progress` + `Retry-After`;
/// once the gate opens the one that ran gets 201, and every retry then gets
/// that answer replayed. One effect in all.
pub async fn concurrent_duplicates(adapter: &dyn Adapter) -> Result<(), Failed> {
    const N: usize = 8;
    let ctx = Ctx::start(adapter, Options::default()).await?;
    let barrier = Arc::new(Barrier::new(N));
    let (done, mut replies) = mpsc::unbounded_channel();
    for _ in 0..N {
        let request = ctx.post("/slow", Some("race"), "{}");
        let (barrier, done) = (barrier.clone(), done.clone());
        tokio::spawn(async move {
            barrier.wait().await;
            let _ = done.send(send(request).await);
        });
    }
    drop(done);
    let mut early = Vec::new();
    for i in 1..N {
        let reply = timeout(WAIT, replies.recv())
            .await
            .map_err(|_| {
                Failed::from(format!(
                    "only {} of {} duplicates were answered while the original ran",
                    i - 1,
                    N - 1
                ))
            })?
            .ok_or_else(|| Failed::from("a client task died"))??;
        early.push(reply);
    }
    ensure_eq!(
        ctx.app().effects("/slow"),
        1,
        "effects while the original runs"
    );
    for reply in &early {
        in_progress(reply)?;
    }
    ctx.app().open_gate();
    let first = timeout(WAIT, replies.recv())
        .await
        .map_err(|_| Failed::from("the original did not finish after the gate opened"))?
        .ok_or_else(|| Failed::from("a client task died"))??;
    ensure_eq!(first.fresh(201)?, 1, "x-effect of the one that ran");
    let retries: Vec<_> = (0..N)
        .map(|_| tokio::spawn(send(ctx.post("/slow", Some("race"), "{}"))))
        .collect();
    for retry in retries {
        let reply = retry
            .await
            .map_err(|e| Failed::from(format!("a retry task failed: {e}")))??;
        reply.replay_of(&first)?;
    }
    ensure_eq!(
        ctx.app().effects("/slow"),
        1,
        "effects of one key sent 16 times"
    );
    ensure_eq!(ctx.app().runs("/slow"), 1, "handler runs");
    Ok(())
}

/// With the engine's `InFlightPolicy::Wait`, a duplicate sent while the
/// original runs is not answered 409: it waits (watched for 200 ms while
/// the engine's clock moves 10 ms per poll, so that it polls the key again
/// and again), and once the original finishes it gets the original's answer
/// replayed. One effect.
pub async fn duplicate_waits_for_the_original(adapter: &dyn Adapter) -> Result<(), Failed> {
    let policy = idem_core::Policy::default().with_in_flight(idem_core::InFlightPolicy::Wait {
        max: std::time::Duration::from_secs(20),
        poll: std::time::Duration::from_millis(10),
    });
    let ctx = Ctx::start_with(adapter, Options::default(), policy).await?;
    let entered = ctx.app().entered();
    let first = tokio::spawn(send(ctx.post("/slow", Some("w"), "{}")));
    timeout(WAIT, entered)
        .await
        .map_err(|_| Failed::from("the first request never entered the handler"))?;
    let duplicate = tokio::spawn(send(ctx.post("/slow", Some("w"), "{}")));
    let tick = std::time::Duration::from_millis(10);
    holds_for(
        "the duplicate waits for the original",
        std::time::Duration::from_millis(200),
        || {
            ctx.clock().advance(tick);
            !duplicate.is_finished()
        },
    )
    .await?;
    ctx.app().open_gate();
    let join = |e: tokio::task::JoinError| Failed::from(format!("a client task failed: {e}"));
    let first = first.await.map_err(join)??;
    ensure_eq!(first.fresh(201)?, 1, "the original's answer");
    // The duplicate sleeps on the engine's clock between two looks at the
    // key: move it until the duplicate has seen the stored answer.
    until("the duplicate to end after the original", WAIT, || async {
        ctx.clock().advance(tick);
        Ok(duplicate.is_finished().then_some(()))
    })
    .await?;
    let duplicate = duplicate.await.map_err(join)??;
    duplicate.replay_of(&first)?;
    ensure_eq!(ctx.app().runs("/slow"), 1, "handler runs");
    Ok(())
}

/// Checks that `first_used_at` is an RFC 3339 UTC time
/// (`YYYY-MM-DDTHH:MM:SS[.fff]Z`).
#[track_caller]
fn rfc3339(value: &serde_json::Value) -> Result<(), Failed> {
    let Some(text) = value.as_str() else {
        return Err(crate::client::failure(format!(
            "first_used_at is not a string: {value}"
        )));
    };
    let bytes = text.as_bytes();
    let digits = |range: std::ops::Range<usize>| {
        bytes
            .get(range)
            .is_some_and(|d| d.iter().all(u8::is_ascii_digit))
    };
    let shape = bytes.len() >= 20
        && digits(0..4)
        && bytes[4] == b'-'
        && digits(5..7)
        && bytes[7] == b'-'
        && digits(8..10)
        && (bytes[10] == b'T' || bytes[10] == b't')
        && digits(11..13)
        && bytes[13] == b':'
        && digits(14..16)
        && bytes[16] == b':'
        && digits(17..19)
        && (text.ends_with('Z') || text.ends_with("+00:00"));
    ensure!(shape, "first_used_at {text:?} is not RFC 3339 UTC");
    ensure!(
        text >= "2020",
        "first_used_at {text:?} is not a recent time"
    );
    Ok(())
}

/// A finished key reused with another request (other body, path, query or
/// method; or the same JSON with other key order, since the default
/// fingerprint covers the body bytes) is 422 `key-reused` and nothing runs.
/// The 422 has `first_used_at` (RFC 3339), `first_request_state: finished`,
/// `first_method` and `first_path` (the path only, no query) and never
/// the first body. The first request's retry is still replayed.
pub async fn key_reused_after_finish(adapter: &dyn Adapter) -> Result<(), Failed> {
    let ctx = Ctx::start(adapter, Options::default()).await?;
    let secret = r#"{"card":"first-body-secret","amount":1}"#;
    let first = ctx.send_post("/orders?ref=7", Some("r"), secret).await?;
    first.fresh(201)?;
    let others = [
        ctx.post("/orders?ref=7", Some("r"), r#"{"card":"other","amount":1}"#),
        ctx.post(
            "/orders?ref=7",
            Some("r"),
            r#"{"amount":1,"card":"first-body-secret"}"#,
        ),
        ctx.post("/orders?ref=8", Some("r"), secret),
        ctx.post("/other", Some("r"), secret),
        ctx.request(http::Method::PATCH, "/orders?ref=7")
            .header("idempotency-key", "r")
            .body(secret),
    ];
    for (i, other) in others.into_iter().enumerate() {
        let reply = send(other).await?;
        let problem = reply.problem(ProblemType::KeyReused)?;
        rfc3339(&problem["first_used_at"])?;
        ensure_eq!(problem["first_request_state"], "finished", "state ({i})");
        ensure_eq!(problem["first_method"], "POST", "first_method ({i})");
        ensure_eq!(problem["first_path"], "/orders", "first_path ({i})");
        let text = String::from_utf8_lossy(&reply.body);
        ensure!(
            !text.contains("first-body-secret") && !text.contains("ref=7"),
            "the 422 reveals the first request's body or query: {text}"
        );
    }
    ctx.send_post("/orders?ref=7", Some("r"), secret)
        .await?
        .replay_of(&first)?;
    ensure_eq!(ctx.app().runs("/orders"), 1, "handler runs of /orders");
    ensure_eq!(ctx.app().runs("/other"), 0, "handler runs of /other");
    Ok(())
}

/// A key reused with another request while the first still runs is 422
/// `key-reused` with `first_used_at` and `first_request_state: unfinished`
/// (no method nor path: not known until it finishes), and nothing runs; the
/// first then finishes normally.
pub async fn key_reused_in_flight(adapter: &dyn Adapter) -> Result<(), Failed> {
    let ctx = Ctx::start(adapter, Options::default()).await?;
    let entered = ctx.app().entered();
    let first = tokio::spawn(send(ctx.post("/slow", Some("f"), "one")));
    timeout(WAIT, entered)
        .await
        .map_err(|_| Failed::from("the first request never entered the handler"))?;
    let other = ctx.send_post("/slow", Some("f"), "two").await?;
    let problem = other.problem(ProblemType::KeyReused)?;
    rfc3339(&problem["first_used_at"])?;
    ensure_eq!(problem["first_request_state"], "unfinished", "state");
    ensure!(
        problem.get("first_method").is_none() && problem.get("first_path").is_none(),
        "an in-flight key's method and path are not known: {other:?}"
    );
    let same = ctx.send_post("/slow", Some("f"), "one").await?;
    in_progress(&same)?;
    ctx.app().open_gate();
    let first = first
        .await
        .map_err(|e| Failed::from(format!("the first request's task failed: {e}")))??;
    first.fresh(201)?;
    ctx.send_post("/slow", Some("f"), "one")
        .await?
        .replay_of(&first)?;
    ensure_eq!(ctx.app().runs("/slow"), 1, "handler runs");
    Ok(())
}

/// A client that goes away while its handler runs (the request to `/slow`
/// is dropped after the handler entered) does not stop the handler: it is
/// not cancelled (watched for 300 ms, long enough for a server to notice a
/// closed connection), a retry meanwhile gets 409 and does not run it
/// again; once the gate opens the handler completes, its response is
/// stored, and the retry gets 201 replayed. One effect.
pub async fn client_disconnect_runs_to_completion(adapter: &dyn Adapter) -> Result<(), Failed> {
    let ctx = Ctx::start(adapter, Options::default()).await?;
    let entered = ctx.app().entered();
    let gone = tokio::spawn(send(ctx.post("/slow", Some("gone"), "{}")));
    timeout(WAIT, entered)
        .await
        .map_err(|_| Failed::from("the request never entered the handler"))?;
    gone.abort();
    let _ = gone.await;
    holds_for(
        "the handler of a request whose client went away is not cancelled",
        std::time::Duration::from_millis(300),
        || ctx.app().cancelled() == 0,
    )
    .await?;
    // The retry must not run the handler again: race it against a second
    // entry (which would wait at the closed gate for ever).
    let again = ctx.app().entered();
    tokio::select! {
        reply = send(ctx.post("/slow", Some("gone"), "{}")) => in_progress(&reply?)?,
        () = again => {
            return Err(Failed::from(
                "the retry ran the handler again while the abandoned one was running",
            ));
        }
    }
    ctx.app().open_gate();
    let replay = until("the retry to get the stored answer", WAIT, || async {
        let reply = ctx.send_post("/slow", Some("gone"), "{}").await?;
        Ok((reply.status != 409).then_some(reply))
    })
    .await?;
    ensure_eq!(replay.status, 201, "status of the retry {replay:?}");
    ensure!(replay.replayed(), "the retry is not a replay: {replay:?}");
    ensure_eq!(replay.effect()?, 1, "x-effect of the stored answer");
    ensure_eq!(ctx.app().cancelled(), 0, "handlers cancelled");
    ensure_eq!(ctx.app().effects("/slow"), 1, "effects");
    ensure_eq!(ctx.app().runs("/slow"), 1, "handler runs");
    Ok(())
}
