//! The key, pass-through, scope and body limit: everything decided before
//! a claim.

use std::time::Duration;

use http::{HeaderValue, Method};
use idem_http::ProblemType;
use libtest_mimic::Failed;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::client::{Ctx, TENANT, ensure, ensure_eq, send};
use crate::fixture::{Adapter, Options};

/// A new key runs the handler once and answers its response; the same
/// request again gets that response replayed: same status, body,
/// `content-type` and `x-effect`, plus `Idempotent-Replayed: true`, without
/// `set-cookie` and without the stored `date` (the server's own or none),
/// with a `content-length` that fits the body. The handler ran once.
pub async fn fresh_then_replay(adapter: &dyn Adapter) -> Result<(), Failed> {
    let ctx = Ctx::start(adapter, Options::default()).await?;
    let first = ctx
        .send_post("/orders", Some("k-1"), r#"{"amount":100}"#)
        .await?;
    ensure_eq!(first.fresh(201)?, 1, "x-effect of the first answer");
    ensure_eq!(
        first.header("set-cookie"),
        Some("s=1"),
        "the first answer's cookie"
    );
    ensure_eq!(
        first.json()?["path"],
        "/orders",
        "the body of the first answer"
    );
    for _ in 0..2 {
        let again = ctx
            .send_post("/orders", Some("k-1"), r#"{"amount":100}"#)
            .await?;
        again.replay_of(&first)?;
    }
    ensure_eq!(ctx.app().effects("/orders"), 1, "effects of one key");
    ensure_eq!(ctx.app().runs("/orders"), 1, "handler runs of one key");
    Ok(())
}

/// Replays are byte-exact: a body of every byte value (not UTF-8) comes
/// back as the handler sent it, a response field sent twice (`x-multi: a`,
/// `x-multi: b`) is replayed twice in order, and a 204 without a body is
/// replayed as a 204 without a body.
pub async fn replay_is_exact(adapter: &dyn Adapter) -> Result<(), Failed> {
    let ctx = Ctx::start(adapter, Options::default()).await?;
    let bytes: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
    let echo = || {
        ctx.request(Method::POST, "/echo")
            .header("idempotency-key", "bin")
            .body(bytes.clone())
    };
    let first = send(echo()).await?;
    first.fresh(201)?;
    ensure!(
        first.body == bytes,
        "the handler's body did not come back as sent"
    );
    ensure_eq!(
        first.headers.get_all("x-multi").iter().count(),
        2,
        "x-multi fields of the first answer"
    );
    send(echo()).await?.replay_of(&first)?;
    let empty = ctx.send_post("/empty", Some("none"), "{}").await?;
    empty.fresh(204)?;
    let again = ctx.send_post("/empty", Some("none"), "{}").await?;
    again.replay_of(&empty)?;
    ensure!(
        again.body.is_empty(),
        "a 204 replayed with a body: {again:?}"
    );
    ensure_eq!(
        ctx.app().runs("/echo") + ctx.app().runs("/empty"),
        2,
        "handler runs"
    );
    Ok(())
}

/// `Idempotency-Key: "abc"` (an RFC 8941 string) and `Idempotency-Key: abc`
/// (a bare token) are the same key; so are `"a\"b"` and `a"b`.
pub async fn quoted_and_bare_key_are_one_key(adapter: &dyn Adapter) -> Result<(), Failed> {
    let ctx = Ctx::start(adapter, Options::default()).await?;
    let first = ctx.send_post("/q", Some("\"k-2\""), "{}").await?;
    first.fresh(201)?;
    ctx.send_post("/q", Some("k-2"), "{}")
        .await?
        .replay_of(&first)?;
    let escaped = ctx.send_post("/q", Some(r#""k\"3""#), "{}").await?;
    ensure_eq!(escaped.fresh(201)?, 2, "a new key runs");
    ctx.send_post("/q", Some(r#"k"3"#), "{}")
        .await?
        .replay_of(&escaped)?;
    ensure_eq!(ctx.app().effects("/q"), 2, "effects of two keys");
    Ok(())
}

/// The key header sent twice (two fields, even with one value) is 400
/// `invalid-key`, and the handler does not run.
pub async fn key_sent_twice_is_invalid(adapter: &dyn Adapter) -> Result<(), Failed> {
    let ctx = Ctx::start(adapter, Options::default()).await?;
    for (a, b) in [("k", "k"), ("k", "other")] {
        let twice = ctx
            .request(Method::POST, "/twice")
            .header("idempotency-key", a)
            .header("idempotency-key", b)
            .body("{}");
        send(twice).await?.problem(ProblemType::InvalidKey)?;
    }
    let list = ctx.send_post("/twice", Some("\"a\", \"b\""), "{}").await?;
    list.problem(ProblemType::InvalidKey)?;
    ensure_eq!(ctx.app().runs("/twice"), 0, "handler runs");
    Ok(())
}

/// Keys that are empty, longer than 255 bytes, not visible ASCII, badly
/// quoted or with parameters are 400 `invalid-key` and nothing runs; a key
/// of exactly 255 bytes is fine.
pub async fn invalid_keys_are_refused(adapter: &dyn Adapter) -> Result<(), Failed> {
    let ctx = Ctx::start(adapter, Options::default()).await?;
    let long = "a".repeat(256);
    let keys: [&[u8]; 8] = [
        b"",
        b"\"\"",
        long.as_bytes(),
        "cl\u{e9}".as_bytes(),
        b"\"unterminated",
        b"\"bad\\escape\"",
        b"\"has space\"",
        b"\"a\";param=1",
    ];
    for key in keys {
        let value = HeaderValue::from_bytes(key)
            .map_err(|e| Failed::from(format!("test key {key:?}: {e}")))?;
        let request = ctx
            .request(Method::POST, "/keys")
            .header("idempotency-key", value)
            .body("{}");
        let reply = send(request).await?;
        reply.problem(ProblemType::InvalidKey).map_err(|e| {
            Failed::from(format!(
                "key {:?}: {}",
                String::from_utf8_lossy(key),
                e.message().unwrap_or_default()
            ))
        })?;
    }
    ensure_eq!(ctx.app().runs("/keys"), 0, "handler runs for refused keys");
    let max = "a".repeat(255);
    ctx.send_post("/keys", Some(&max), "{}").await?.fresh(201)?;
    ensure_eq!(ctx.app().effects("/keys"), 1, "effects");
    Ok(())
}

/// Without a key (not required) a covered request runs unprotected: the
/// same request twice runs twice, neither answer is a replay.
pub async fn no_key_passes_through(adapter: &dyn Adapter) -> Result<(), Failed> {
    let ctx = Ctx::start(adapter, Options::default()).await?;
    ensure_eq!(
        ctx.send_post("/nokey", None, "{}").await?.fresh(201)?,
        1,
        "first"
    );
    ensure_eq!(
        ctx.send_post("/nokey", None, "{}").await?.fresh(201)?,
        2,
        "second"
    );
    ensure_eq!(
        ctx.app().effects("/nokey"),
        2,
        "without a key there is no protection"
    );
    Ok(())
}

/// With keys required, a covered request without one is 400 `missing-key`
/// and does not run; methods that are not covered still need none.
pub async fn required_key_is_missing(adapter: &dyn Adapter) -> Result<(), Failed> {
    let options = Options {
        required: true,
        ..Options::default()
    };
    let ctx = Ctx::start(adapter, options).await?;
    ctx.send_post("/req", None, "{}")
        .await?
        .problem(ProblemType::MissingKey)?;
    ensure_eq!(
        ctx.app().runs("/req"),
        0,
        "handler runs without the required key"
    );
    let get = send(ctx.request(Method::GET, "/req")).await?;
    get.fresh(201)?;
    let keyed = ctx.send_post("/req", Some("r"), "{}").await?;
    ensure_eq!(keyed.fresh(201)?, 2, "a keyed request runs");
    Ok(())
}

/// A method the middleware does not cover (`GET`, `PUT`) passes through
/// with or without a key: it runs every time and is never a replay;
/// `PATCH`, covered by default, is replayed.
pub async fn uncovered_method_passes_through(adapter: &dyn Adapter) -> Result<(), Failed> {
    let ctx = Ctx::start(adapter, Options::default()).await?;
    for (i, method) in [Method::GET, Method::GET, Method::PUT]
        .into_iter()
        .enumerate()
    {
        let request = ctx.request(method, "/open").header("idempotency-key", "g");
        ensure_eq!(send(request).await?.fresh(201)?, i + 1, "uncovered run {i}");
    }
    let patch = || {
        ctx.request(Method::PATCH, "/patch")
            .header("idempotency-key", "p")
            .body("{}")
    };
    let first = send(patch()).await?;
    first.fresh(201)?;
    send(patch()).await?.replay_of(&first)?;
    ensure_eq!(
        ctx.app().effects("/open"),
        3,
        "effects of uncovered requests"
    );
    ensure_eq!(ctx.app().effects("/patch"), 1, "effects of a covered PATCH");
    Ok(())
}

/// When the scope function refuses a keyed request (here: no `x-tenant`),
/// the answer is its rejection (401 problem+json, `about:blank`) and nothing
/// runs.
pub async fn scope_rejection(adapter: &dyn Adapter) -> Result<(), Failed> {
    let ctx = Ctx::start(adapter, Options::default()).await?;
    let url = format!("http://{}/scoped", ctx.authority());
    for _ in 0..2 {
        let anonymous = ctx
            .http
            .post(&url)
            .header("idempotency-key", "s")
            .body("{}");
        let reply = send(anonymous).await?;
        ensure_eq!(reply.status, 401, "status of a rejected scope {reply:?}");
        ensure_eq!(
            reply.header("content-type"),
            Some(idem_http::PROBLEM_JSON),
            "content-type of the rejection"
        );
        ensure_eq!(
            reply.json()?["type"],
            "about:blank",
            "type of the rejection"
        );
    }
    ensure_eq!(ctx.app().runs("/scoped"), 0, "handler runs without a scope");
    Ok(())
}

/// The same key from two tenants is two operations: both run, neither gets
/// the other's answer, and each tenant's retry replays its own.
pub async fn same_key_two_tenants(adapter: &dyn Adapter) -> Result<(), Failed> {
    let ctx = Ctx::start(adapter, Options::default()).await?;
    let a = send(replace_tenant(&ctx, "tenant-a")).await?;
    let b = send(replace_tenant(&ctx, "tenant-b")).await?;
    ensure_eq!(a.fresh(201)?, 1, "tenant a runs");
    ensure_eq!(b.fresh(201)?, 2, "tenant b runs, not replays a's answer");
    ensure_eq!(a.json()?["tenant"], "tenant-a", "a's body");
    ensure_eq!(b.json()?["tenant"], "tenant-b", "b's body");
    send(replace_tenant(&ctx, "tenant-a"))
        .await?
        .replay_of(&a)?;
    send(replace_tenant(&ctx, "tenant-b"))
        .await?
        .replay_of(&b)?;
    ensure_eq!(
        ctx.app().effects("/shared"),
        2,
        "effects of one key in two scopes"
    );
    Ok(())
}

/// A keyed `POST /shared` as `tenant`.
fn replace_tenant(ctx: &Ctx, tenant: &'static str) -> reqwest::RequestBuilder {
    let url = format!("http://{}/shared", ctx.authority());
    ctx.http
        .post(url)
        .header("x-tenant", tenant)
        .header("idempotency-key", "shared")
        .body("{}")
}

/// A body above `max_body_bytes` with a declared `Content-Length` is 413
/// `body-too-large` and nothing runs; a body at the limit reaches the
/// handler intact.
pub async fn body_too_large_declared(adapter: &dyn Adapter) -> Result<(), Failed> {
    let options = Options {
        max_body_bytes: Some(16),
        ..Options::default()
    };
    let ctx = Ctx::start(adapter, options).await?;
    let big = ctx.send_post("/limit", Some("b"), &"x".repeat(17)).await?;
    big.problem(ProblemType::BodyTooLarge)?;
    ensure_eq!(
        ctx.app().runs("/limit"),
        0,
        "handler runs for a body too large"
    );
    let ok = ctx.send_post("/limit", Some("b"), &"x".repeat(16)).await?;
    ok.fresh(201)?;
    ensure_eq!(ok.json()?["len"], 16, "the body the handler got");
    Ok(())
}

/// A chunked body without a length, above `max_body_bytes`, is 413
/// `body-too-large` and nothing runs; a chunked body at the limit reaches
/// the handler intact and is replayed like any other.
pub async fn body_too_large_chunked(adapter: &dyn Adapter) -> Result<(), Failed> {
    let options = Options {
        max_body_bytes: Some(16),
        ..Options::default()
    };
    let ctx = Ctx::start(adapter, options).await?;
    let (status, text) = chunked(&ctx, "c1", &["0123456789", "0123456789"]).await?;
    ensure_eq!(status, 413, "status of a chunked body too large: {text}");
    ensure!(
        text.contains(ProblemType::BodyTooLarge.uri()),
        "not a body-too-large problem: {text}"
    );
    ensure_eq!(
        ctx.app().runs("/chunked"),
        0,
        "handler runs for a body too large"
    );
    let (status, text) = chunked(&ctx, "c2", &["01234567", "89abcdef"]).await?;
    ensure_eq!(status, 201, "status of a chunked body at the limit: {text}");
    ensure!(
        text.contains("\"len\":16"),
        "the handler did not get 16 bytes: {text}"
    );
    let (status, text) = chunked(&ctx, "c2", &["01234567", "89abcdef"]).await?;
    ensure_eq!(status, 201, "status of the retry: {text}");
    ensure!(
        text.to_ascii_lowercase()
            .contains("idempotent-replayed: true"),
        "the retry of a chunked request is not a replay: {text}"
    );
    ensure_eq!(ctx.app().effects("/chunked"), 1, "effects");
    Ok(())
}

/// Sends `POST /chunked` with `key` and `chunks` in chunked transfer
/// encoding over a raw connection; returns the status and the whole
/// response as text.
async fn chunked(ctx: &Ctx, key: &str, chunks: &[&str]) -> Result<(u16, String), Failed> {
    let io = |e: std::io::Error| Failed::from(format!("raw connection: {e}"));
    let mut stream = tokio::net::TcpStream::connect(ctx.authority())
        .await
        .map_err(io)?;
    let mut request = format!(
        "POST /chunked HTTP/1.1\r\nhost: {}\r\nx-tenant: {TENANT}\r\nidempotency-key: {key}\r\n\
         transfer-encoding: chunked\r\nconnection: close\r\n\r\n",
        ctx.authority()
    );
    for chunk in chunks {
        request.push_str(&format!("{:x}\r\n{chunk}\r\n", chunk.len()));
    }
    request.push_str("0\r\n\r\n");
    stream.write_all(request.as_bytes()).await.map_err(io)?;
    let mut response = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), async {
        let mut buf = [0u8; 4096];
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            response.extend_from_slice(&buf[..n]);
            if complete(&response) {
                return Ok(());
            }
        }
    })
    .await;
    match read {
        Ok(Ok(())) => {}
        // The server may reset the connection after answering early.
        Ok(Err(e)) if !response.is_empty() => {
            let _ = e;
        }
        Ok(Err(e)) => return Err(io(e)),
        Err(_) => return Err(Failed::from("no complete response within 20 s")),
    }
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Failed::from(format!("not an HTTP response: {text:?}")))?;
    Ok((status, text))
}

/// Whether `response` holds a whole HTTP/1.1 response (head, and a body of
/// its `content-length` or a last chunk).
fn complete(response: &[u8]) -> bool {
    let text = String::from_utf8_lossy(response);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    let head = head.to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    match length {
        Some(length) => body.len() >= length,
        None if head.contains("transfer-encoding: chunked") => body.ends_with("0\r\n\r\n"),
        None => false,
    }
}
