//! The Lua scripts (one per primitive that needs one): their text, loading
//! them into the server's script cache, and running them by SHA with the
//! `EVAL` fallback after `NOSCRIPT`.

use std::sync::LazyLock;

use redis::{Cmd, ErrorKind, RedisError, ServerErrorKind, Value};

use crate::connection::Connection;

/// One Lua script: its source and its SHA1, computed once.
pub(crate) struct Lua {
    /// The primitive it implements, for logs and errors.
    pub(crate) name: &'static str,
    source: &'static str,
    sha: String,
}

impl Lua {
    fn new(name: &'static str, source: &'static str) -> Self {
        Self {
            name,
            source,
            sha: redis::Script::new(source).get_hash().to_string(),
        }
    }
}

/// `insert_if_absent` over an expired record, or on a server that refuses
/// `SET … NX GET`.
pub(crate) static INSERT: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        "insert_if_absent",
        concat!(include_str!("lua/head.lua"), include_str!("lua/insert.lua")),
    )
});

/// `compare_and_swap`.
pub(crate) static CAS: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        "compare_and_swap",
        concat!(include_str!("lua/head.lua"), include_str!("lua/cas.lua")),
    )
});

/// `delete_if`.
pub(crate) static DELETE: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        "delete_if",
        concat!(include_str!("lua/head.lua"), include_str!("lua/delete.lua")),
    )
});

/// What a script answered.
pub(crate) enum Reply {
    /// `1`: written / swapped / deleted.
    Done,
    /// `0`: absent or expired.
    Absent,
    /// The live value.
    Live(Vec<u8>),
}

/// A script's answer that is not a [`Reply`].
pub(crate) enum Refusal {
    /// The script found a value it cannot read (`{"corrupt", why}`).
    Corrupt(String),
    /// A reply of another shape (a foreign script under the same SHA, a
    /// proxy rewriting replies).
    Unexpected(Value),
}

/// Loads the scripts (on every node of a cluster), so that the first calls
/// run by SHA.
pub(crate) async fn load(conn: &Connection) -> Result<(), RedisError> {
    for lua in [&*INSERT, &*CAS, &*DELETE] {
        let mut cmd = redis::cmd("SCRIPT");
        cmd.arg("LOAD").arg(lua.source);
        conn.query(&cmd).await?;
    }
    Ok(())
}

/// Runs `lua` over `key` by SHA (`EVALSHA`), falling back to `EVAL` with the
/// script's text after `NOSCRIPT` (which caches it again on that node).
pub(crate) async fn eval(
    conn: &Connection,
    lua: &Lua,
    key: &[u8],
    args: &[&[u8]],
) -> Result<Value, RedisError> {
    let build = |verb: &str, body: &str| {
        // Sized up front: the value (1 KiB and more) is copied once.
        let data = verb.len() + body.len() + 1 + key.len();
        let data = data + args.iter().map(|a| a.len()).sum::<usize>();
        let mut cmd = Cmd::with_capacity(4 + args.len(), data);
        cmd.arg(verb).arg(body).arg(1).arg(key);
        for arg in args {
            cmd.arg(*arg);
        }
        cmd
    };
    match conn.query(&build("EVALSHA", &lua.sha)).await {
        Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
            tracing::debug!(
                script = lua.name,
                "idem-redis: script not cached on the server; sending it again"
            );
            conn.query(&build("EVAL", lua.source)).await
        }
        other => other,
    }
}

/// Reads a script's answer: `1`, `0`, the live value, or
/// `{"corrupt", why}`.
pub(crate) fn parse(reply: Value) -> Result<Reply, Refusal> {
    match reply {
        Value::Int(1) => Ok(Reply::Done),
        Value::Int(0) => Ok(Reply::Absent),
        Value::BulkString(bytes) => Ok(Reply::Live(bytes)),
        Value::Array(items) => match items.as_slice() {
            [Value::BulkString(tag), why] if tag.as_slice() == b"corrupt" => {
                Err(Refusal::Corrupt(match why {
                    Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                    other => format!("{other:?}"),
                }))
            }
            _ => Err(Refusal::Unexpected(Value::Array(items))),
        },
        other => Err(Refusal::Unexpected(other)),
    }
}
