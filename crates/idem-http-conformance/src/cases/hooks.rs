//! The integrator hooks: where the key comes from, what the fingerprint
//! covers, editing replays.

use http::HeaderName;
use idem_http::{Fingerprinter, KeySource, ProblemType};
use libtest_mimic::Failed;

use crate::client::{Ctx, ensure, ensure_eq, send};
use crate::fixture::{Adapter, Options};

/// `KeySource::json_field("/id")`: the key is the body's `id` (no header).
/// The same body again is a replay; the same id with another body is 422;
/// a body without the field runs unprotected (each time); a body that is
/// not JSON is 400 `invalid-key` and does not run.
pub async fn key_from_json_field(adapter: &dyn Adapter) -> Result<(), Failed> {
    let options = Options {
        key_source: Some(KeySource::json_field("/id")),
        ..Options::default()
    };
    let ctx = Ctx::start(adapter, options).await?;
    let event = r#"{"id":"ev_1","n":1}"#;
    let first = ctx.send_post("/events", None, event).await?;
    ensure_eq!(first.fresh(201)?, 1, "the first event");
    ctx.send_post("/events", None, event)
        .await?
        .replay_of(&first)?;
    ctx.send_post("/events", None, r#"{"id":"ev_1","n":2}"#)
        .await?
        .problem(ProblemType::KeyReused)?;
    ensure_eq!(
        ctx.send_post("/events", None, r#"{"n":3}"#)
            .await?
            .fresh(201)?,
        2,
        "no id"
    );
    ensure_eq!(
        ctx.send_post("/events", None, r#"{"n":3}"#)
            .await?
            .fresh(201)?,
        3,
        "no id"
    );
    ctx.send_post("/events", None, "not json")
        .await?
        .problem(ProblemType::InvalidKey)?;
    // The header is not where the key comes from any more.
    let header_only = ctx.send_post("/events", Some("ev_1"), r#"{"n":4}"#).await?;
    ensure_eq!(header_only.fresh(201)?, 4, "a header key is ignored");
    ensure_eq!(ctx.app().runs("/events"), 4, "handler runs");
    Ok(())
}

/// `Fingerprinter::canonical_json()`: the same JSON with other key order and
/// whitespace is the same request (a replay, not 422); another value is
/// another request (422).
pub async fn canonical_json_fingerprint(adapter: &dyn Adapter) -> Result<(), Failed> {
    let options = Options {
        fingerprint: Some(Fingerprinter::canonical_json()),
        ..Options::default()
    };
    let ctx = Ctx::start(adapter, options).await?;
    let first = ctx
        .send_post("/json", Some("j"), r#"{"a":1,"b":{"x":"s","y":[1,2]}}"#)
        .await?;
    first.fresh(201)?;
    let reordered = "{ \"b\": {\"y\": [1, 2], \"x\": \"s\"},\n  \"a\": 1 }";
    ctx.send_post("/json", Some("j"), reordered)
        .await?
        .replay_of(&first)?;
    for other in [
        r#"{"a":2,"b":{"x":"s","y":[1,2]}}"#,
        r#"{"a":1,"b":{"x":"s","y":[2,1]}}"#,
    ] {
        ctx.send_post("/json", Some("j"), other)
            .await?
            .problem(ProblemType::KeyReused)?;
    }
    ensure_eq!(ctx.app().runs("/json"), 1, "handler runs");
    Ok(())
}

/// `Fingerprinter::canonical_json_without(["/sent_at"])`: a retry that
/// differs only in `sent_at` (and formatting) is a replay; another amount
/// is 422.
pub async fn canonical_json_without_field(adapter: &dyn Adapter) -> Result<(), Failed> {
    let options = Options {
        fingerprint: Some(Fingerprinter::canonical_json_without(["/sent_at"])),
        ..Options::default()
    };
    let ctx = Ctx::start(adapter, options).await?;
    let first = ctx
        .send_post(
            "/pay",
            Some("w"),
            r#"{"amount":5,"sent_at":"2024-01-01T00:00:00Z"}"#,
        )
        .await?;
    first.fresh(201)?;
    ctx.send_post(
        "/pay",
        Some("w"),
        r#"{"sent_at":"2024-01-02T09:30:00Z", "amount":5}"#,
    )
    .await?
    .replay_of(&first)?;
    ctx.send_post(
        "/pay",
        Some("w"),
        r#"{"amount":6,"sent_at":"2024-01-01T00:00:00Z"}"#,
    )
    .await?
    .problem(ProblemType::KeyReused)?;
    ensure_eq!(ctx.app().runs("/pay"), 1, "handler runs");
    Ok(())
}

/// The `on_replay` hook (here: adds `x-replay-hook: 1`) edits replays only:
/// not the first answer, not the contract's problem answers; every replay
/// starts from the stored response.
pub async fn replay_hook(adapter: &dyn Adapter) -> Result<(), Failed> {
    let options = Options {
        replay_hook: true,
        ..Options::default()
    };
    let ctx = Ctx::start(adapter, options).await?;
    let first = ctx.send_post("/hooked", Some("h"), "{}").await?;
    first.fresh(201)?;
    ensure!(
        first.header("x-replay-hook").is_none(),
        "the hook ran on the first answer: {first:?}"
    );
    for _ in 0..2 {
        let replay = ctx.send_post("/hooked", Some("h"), "{}").await?;
        replay.replay_of(&first)?;
        ensure_eq!(
            replay.header("x-replay-hook"),
            Some("1"),
            "the hook's header on a replay"
        );
        ensure_eq!(
            replay.headers.get_all("x-replay-hook").iter().count(),
            1,
            "hook headers"
        );
    }
    let reused = ctx.send_post("/hooked", Some("h"), "other").await?;
    reused.problem(ProblemType::KeyReused)?;
    ensure!(
        reused.header("x-replay-hook").is_none(),
        "the hook ran on a 422: {reused:?}"
    );
    ensure_eq!(ctx.app().runs("/hooked"), 1, "handler runs");
    Ok(())
}

/// A `fingerprint_header` (`content-type`) is part of the request: the same
/// key with another value of it is 422; with the same value, a replay.
pub async fn fingerprint_header(adapter: &dyn Adapter) -> Result<(), Failed> {
    let options = Options {
        fingerprint_headers: vec![HeaderName::from_static("content-type")],
        ..Options::default()
    };
    let ctx = Ctx::start(adapter, options).await?;
    let with = |content_type: &'static str| {
        ctx.post("/typed", Some("t"), "{}")
            .header("content-type", content_type)
    };
    let first = send(with("application/json")).await?;
    first.fresh(201)?;
    send(with("text/plain"))
        .await?
        .problem(ProblemType::KeyReused)?;
    send(with("application/json")).await?.replay_of(&first)?;
    ensure_eq!(ctx.app().runs("/typed"), 1, "handler runs");
    Ok(())
}
