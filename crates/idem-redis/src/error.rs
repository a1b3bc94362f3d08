//! The crate's error type, [`RedisError`], and which `redis` driver errors
//! are transient: the classification behind every [`StoreError`] this store
//! returns (the table is in the crate docs, "Error classification").

use idem_core::store::{BoxError, StoreError, codec::CodecError};
use redis::ErrorKind;

use crate::Topology;

/// The store's name in errors, for one server.
pub(crate) const STANDALONE: &str = "redis";

/// The store's name in errors, for a Redis Cluster.
pub(crate) const CLUSTER: &str = "redis-cluster";

/// An error of the Redis store: connecting, a driver error, or a value,
/// configuration or reply it refuses.
///
/// # Behavior
/// - [`is_transient`](Self::is_transient) tells the errors worth retrying
///   later (connection lost, refused or timed out, and the passing server
///   states: `OOM`, `NOREPLICAS`, `READONLY`, `LOADING`, `CLUSTERDOWN`, …)
///   from permanent ones (credentials, a foreign value at a record key, a
///   prefix with a hash tag, …).
/// - Converted to [`StoreError`] (and from there to [`idem_core::Error`]):
///   transient errors become [`StoreError::Unavailable`], unreadable values
///   and other Redis types at a record key [`StoreError::Corrupt`], values
///   above the server's limit, unencodable records and refused
///   configurations [`StoreError::Rejected`], anything else
///   [`StoreError::Generic`], with this error as the source. The
///   classification of every driver error is the table in the crate docs,
///   "Error classification".
/// - [`Driver`](Self::Driver) and [`ClusterDriver`](Self::ClusterDriver) show
///   the driver's message as their own; they differ in how a redirection
///   (`MOVED`, `ASK`) is classified, and in the store's name in the
///   [`StoreError`] (`"redis"` or `"redis-cluster"`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedisError {
    /// The driver failed on a connection to one server.
    #[error(transparent)]
    Driver(redis::RedisError),
    /// The driver failed on a Redis Cluster connection.
    #[error(transparent)]
    ClusterDriver(redis::RedisError),
    /// The value at `key` is not a record this version can read.
    #[error("the value at `{key}` is not a readable idem record: {reason}")]
    Unreadable {
        /// The Redis key, as `redis-cli` prints it.
        key: String,
        /// What is wrong with it.
        reason: String,
        /// The decoding error, if the record bytes failed to decode.
        #[source]
        source: Option<CodecError>,
    },
    /// A record could not be encoded.
    #[error(transparent)]
    Unencodable(CodecError),
    /// The key prefix holds a Redis Cluster hash tag.
    #[error(
        "key prefix {prefix:?} contains a Redis Cluster hash tag: every record would land in one slot"
    )]
    HashTagInPrefix {
        /// The refused prefix.
        prefix: String,
    },
    /// No cluster node was given.
    #[error("no Redis Cluster node URL was given")]
    NoClusterNodes,
    /// Redis answered something the store does not expect (a foreign script
    /// under the same SHA, a proxy rewriting replies).
    #[error("unexpected reply to {command}: {reply}")]
    UnexpectedReply {
        /// The command or script.
        command: &'static str,
        /// The reply, abbreviated.
        reply: String,
    },
}

impl RedisError {
    /// Whether retrying later may succeed (the table is in the crate docs,
    /// "Error classification").
    pub fn is_transient(&self) -> bool {
        self.class() == Class::Unavailable
    }

    /// A driver error on a connection of `topology`.
    pub(crate) fn driver(e: redis::RedisError, topology: Topology) -> Self {
        match topology {
            Topology::Standalone => Self::Driver(e),
            Topology::Cluster => Self::ClusterDriver(e),
        }
    }

    /// The [`StoreError`] variant this error becomes.
    pub(crate) fn class(&self) -> Class {
        match self {
            Self::Driver(e) => classify(e, Topology::Standalone),
            Self::ClusterDriver(e) => classify(e, Topology::Cluster),
            Self::Unreadable { .. } => Class::Corrupt,
            Self::Unencodable(_) | Self::HashTagInPrefix { .. } | Self::NoClusterNodes => {
                Class::Rejected
            }
            Self::UnexpectedReply { .. } => Class::Generic,
        }
    }

    /// The [`StoreError`] of this error, naming the store `store`.
    pub(crate) fn into_store_error(self, store: &'static str) -> StoreError {
        self.class().error(store, self)
    }
}

/// The store's name is `"redis-cluster"` for the errors only a cluster
/// raises ([`RedisError::ClusterDriver`], [`RedisError::NoClusterNodes`]),
/// `"redis"` otherwise. (The store itself names every error of a cluster
/// store `"redis-cluster"`.)
impl From<RedisError> for StoreError {
    fn from(e: RedisError) -> Self {
        let store = match e {
            RedisError::ClusterDriver(_) | RedisError::NoClusterNodes => CLUSTER,
            _ => STANDALONE,
        };
        e.into_store_error(store)
    }
}

impl From<RedisError> for idem_core::Error {
    fn from(e: RedisError) -> Self {
        Self::Store(e.into())
    }
}

/// What a driver error means for the caller: the [`StoreError`] variant it
/// becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Class {
    /// Retrying later may succeed: [`StoreError::Unavailable`].
    Unavailable,
    /// The value at the key is not a record: [`StoreError::Corrupt`].
    Corrupt,
    /// The server refused the record: [`StoreError::Rejected`].
    Rejected,
    /// Any other permanent error: [`StoreError::Generic`].
    Generic,
}

impl Class {
    /// The [`StoreError`] of this class, of the store `store`, caused by
    /// `source`.
    pub(crate) fn error(self, store: &'static str, source: impl Into<BoxError>) -> StoreError {
        let error = match self {
            Self::Unavailable => StoreError::unavailable,
            Self::Corrupt => StoreError::corrupt,
            Self::Rejected => StoreError::rejected,
            Self::Generic => StoreError::generic,
        };
        error(store, source.into())
    }
}

/// The class of an error reply, by its code (the first word: `OOM`,
/// `READONLY`, …) and the rest of its text.
///
/// # Behavior
/// Pure. Codes are matched exactly (`BUSY` is not `BUSYKEY`). `ERR` is
/// looked into, because Redis sends a few transient conditions under it,
/// and because Redis before 7.0 wraps the error of a command run by a script
/// as `ERR Error running script (…): @user_script:N: … -CODE text`: the
/// embedded code decides. On a [`Topology::Standalone`] connection `MOVED` and
/// `ASK` never go away (the server is a cluster node): permanent.
pub(crate) fn classify_reply(code: &str, detail: &str, topology: Topology) -> Class {
    match code {
        // Memory full under `noeviction`; not enough replicas for
        // `min-replicas-to-write`; writes stopped after a failed RDB save;
        // loading the dataset; a long script running; a replica whose master
        // is down, or a node demoted to replica by a failover; the cluster
        // resharding or down; the script cache emptied.
        "OOM" | "NOREPLICAS" | "MISCONF" | "LOADING" | "BUSY" | "MASTERDOWN" | "READONLY"
        | "TRYAGAIN" | "CLUSTERDOWN" | "NOSCRIPT" => Class::Unavailable,
        "MOVED" | "ASK" => match topology {
            Topology::Cluster => Class::Unavailable,
            Topology::Standalone => Class::Generic,
        },
        "WRONGTYPE" => Class::Corrupt,
        "ERR" => classify_err(detail, topology),
        // NOAUTH, WRONGPASS, NOPERM, CROSSSLOT, EXECABORT, NOPROTO, unknown
        // codes: the same call fails the same way until someone changes the
        // configuration or the code.
        _ => Class::Generic,
    }
}

/// The class of an `ERR` reply, by its text.
fn classify_err(detail: &str, topology: Topology) -> Class {
    if let Some(embedded) = script_error_code(detail) {
        // A command of a script failed (Redis before 7.0 sends its code
        // inside `ERR`); `ERR` inside `ERR` cannot loop: it is Generic below.
        if embedded != "ERR" {
            return classify_reply(embedded, "", topology);
        }
    }
    if detail.contains("max number of clients reached") || detail.contains("Script killed by user")
    {
        // Too many connections right now; a script stopped by `SCRIPT KILL`
        // before it wrote anything.
        Class::Unavailable
    } else if detail.contains("invalid bulk length")
        || detail.contains("exceeds maximum allowed size")
    {
        // A value above `proto-max-bulk-len` (512 MB by default).
        Class::Rejected
    } else {
        // Syntax and argument errors, unknown commands, script errors of
        // the script itself: a bug or a server too old, not a passing state.
        Class::Generic
    }
}

/// The code of the command error a pre-7.0 script error wraps:
/// `Error running script (call to f_…): @user_script:1: @user_script: 1: -OOM …`
/// gives `OOM`.
fn script_error_code(detail: &str) -> Option<&str> {
    if !detail.starts_with("Error running script") {
        return None;
    }
    let at = detail.find(": -")?;
    let rest = &detail[at + 3..];
    let code = rest.split(|c: char| !c.is_ascii_alphanumeric()).next()?;
    (!code.is_empty() && code.bytes().all(|b| b.is_ascii_uppercase())).then_some(code)
}

/// The class of any driver error.
///
/// # Behavior
/// Pure. Transient: every I/O error (connection refused, reset or dropped,
/// a broken pipe, a response or connection timeout, a server shutting down),
/// no connection to a cluster node, an unparsable reply (the connection is
/// replaced and the call's effect is unknown, as for a lost reply), and the
/// transient error replies ([`classify_reply`]). Permanent: authentication
/// failures, invalid client configuration, client-side errors.
pub(crate) fn classify(e: &redis::RedisError, topology: Topology) -> Class {
    if let Some(code) = e.code() {
        return classify_reply(code, e.detail().unwrap_or(""), topology);
    }
    match e.kind() {
        ErrorKind::Io
        | ErrorKind::ClusterConnectionNotFound
        | ErrorKind::Parse
        | ErrorKind::MasterNameNotFoundBySentinel
        | ErrorKind::NoValidReplicasFoundBySentinel => Class::Unavailable,
        // AuthenticationFailed, InvalidClientConfig, Client,
        // UnexpectedReturnType, RESP3NotSupported, …
        _ => Class::Generic,
    }
}

/// Maps a driver error to the [`StoreError`] of its [`classify`] class,
/// the driver error kept as the (transparent) source.
pub(crate) fn map_err(store: &'static str, topology: Topology, e: redis::RedisError) -> StoreError {
    RedisError::driver(e, topology).into_store_error(store)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use redis::{RedisError as DriverError, ServerErrorKind};

    use super::*;

    const S: Topology = Topology::Standalone;
    const C: Topology = Topology::Cluster;

    /// The error the driver makes of `reply`, a RESP error line as a server
    /// sends it (without `-` and CRLF).
    fn reply(reply: &str) -> DriverError {
        let wire = format!("-{reply}\r\n");
        redis::parse_redis_value(wire.as_bytes())
            .expect("a RESP error line")
            .extract_error()
            .expect_err("an error reply")
    }

    fn io(kind: std::io::ErrorKind) -> DriverError {
        std::io::Error::from(kind).into()
    }

    /// Replies as Redis 7.0.15 sends them (captured from a server), and as
    /// Redis 6 wraps a script's command error.
    #[test]
    fn error_replies_by_code() {
        let cases: &[(&str, Class)] = &[
            (
                "OOM command not allowed when used memory > 'maxmemory'.",
                Class::Unavailable,
            ),
            (
                "OOM command not allowed when used memory > 'maxmemory'. script: 16c4424ef9b40633467f71311dc8524eebbce0b4, on @user_script:1.",
                Class::Unavailable,
            ),
            (
                "NOREPLICAS Not enough good replicas to write.",
                Class::Unavailable,
            ),
            (
                "READONLY You can't write against a read only replica.",
                Class::Unavailable,
            ),
            (
                "LOADING Redis is loading the dataset in memory",
                Class::Unavailable,
            ),
            (
                "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
                Class::Unavailable,
            ),
            (
                "TRYAGAIN Multiple keys request during rehashing of slot",
                Class::Unavailable,
            ),
            ("CLUSTERDOWN The cluster is down", Class::Unavailable),
            (
                "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.",
                Class::Unavailable,
            ),
            (
                "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk.",
                Class::Unavailable,
            ),
            (
                "NOSCRIPT No matching script. Please use EVAL.",
                Class::Unavailable,
            ),
            ("ERR max number of clients reached", Class::Unavailable),
            (
                "ERR Script killed by user with SCRIPT KILL... script: 653db1ceb7ef061910af88dc7ebf80737358169d, on @user_script:1.",
                Class::Unavailable,
            ),
            (
                "ERR Error running script (call to f_8f55ae4a3be429c6d38c5d5db3e80edf89197b64): @user_script:41: @user_script: 41: -OOM command not allowed when used memory > 'maxmemory'.",
                Class::Unavailable,
            ),
            (
                "ERR Error running script (call to f_8f55ae4a3be429c6d38c5d5db3e80edf89197b64): @user_script:12: @user_script: 12: -NOREPLICAS Not enough good replicas to write.",
                Class::Unavailable,
            ),
            (
                "ERR Error running script (call to f_8f55ae4a3be429c6d38c5d5db3e80edf89197b64): @user_script:12: @user_script: 12: -READONLY You can't write against a read only replica.",
                Class::Unavailable,
            ),
            (
                "WRONGTYPE Operation against a key holding the wrong kind of value",
                Class::Corrupt,
            ),
            ("ERR Protocol error: invalid bulk length", Class::Rejected),
            (
                "ERR string exceeds maximum allowed size (proto-max-bulk-len)",
                Class::Rejected,
            ),
            ("ERR syntax error", Class::Generic),
            (
                "ERR wrong number of arguments for 'set' command",
                Class::Generic,
            ),
            (
                "ERR unknown command 'FOO', with args beginning with: ",
                Class::Generic,
            ),
            (
                "ERR user_script:1: Script attempted to access nonexistent global variable 'nosuch' script: 42dc45c3bdb4ebb96d4a67ea2ffd7cb381821db1, on @user_script:1.",
                Class::Generic,
            ),
            (
                "ERR Error running script (call to f_42dc45c3bdb4ebb96d4a67ea2ffd7cb381821db1): @user_script:1: Script attempted to access nonexistent global variable 'nosuch'",
                Class::Generic,
            ),
            (
                "ERR Error running script (call to f_42dc45c3bdb4ebb96d4a67ea2ffd7cb381821db1): @user_script:1: @user_script: 1: -ERR Unknown Redis command called from Lua script",
                Class::Generic,
            ),
            ("NOAUTH Authentication required.", Class::Generic),
            (
                "WRONGPASS invalid username-password pair or user is disabled.",
                Class::Generic,
            ),
            (
                "NOPERM this user has no permissions to run the 'set' command",
                Class::Generic,
            ),
            (
                "CROSSSLOT Keys in request don't hash to the same slot",
                Class::Generic,
            ),
            (
                "EXECABORT Transaction discarded because of previous errors.",
                Class::Generic,
            ),
            ("NOPROTO unsupported protocol version", Class::Generic),
            ("BUSYKEY Target key name already exists.", Class::Generic),
        ];
        for (line, class) in cases {
            for topology in [S, C] {
                assert_eq!(classify(&reply(line), topology), *class, "{line}");
            }
        }
    }

    #[test]
    fn redirections_are_transient_only_in_a_cluster() {
        for line in ["MOVED 3999 127.0.0.1:6381", "ASK 3999 127.0.0.1:6381"] {
            assert_eq!(classify(&reply(line), C), Class::Unavailable, "{line}");
            assert_eq!(classify(&reply(line), S), Class::Generic, "{line}");
        }
    }

    #[test]
    fn driver_errors_by_kind() {
        use std::io::ErrorKind as Io;
        for kind in [
            Io::ConnectionRefused,
            Io::ConnectionReset,
            Io::ConnectionAborted,
            Io::BrokenPipe,
            Io::UnexpectedEof,
            Io::NotConnected,
            Io::TimedOut,
            Io::WouldBlock,
            Io::Other,
        ] {
            assert_eq!(classify(&io(kind), S), Class::Unavailable, "{kind:?}");
        }
        let transient: [DriverError; 4] = [
            (ErrorKind::Io, "connection dropped").into(),
            (ErrorKind::ClusterConnectionNotFound, "No connections found").into(),
            (ErrorKind::Parse, "invalid reply").into(),
            (ErrorKind::Server(ServerErrorKind::ClusterDown), "down").into(),
        ];
        for e in transient {
            assert_eq!(classify(&e, C), Class::Unavailable, "{e}");
        }
        let permanent: [DriverError; 5] = [
            (
                ErrorKind::AuthenticationFailed,
                "Password authentication failed",
            )
                .into(),
            (ErrorKind::InvalidClientConfig, "Invalid node string").into(),
            (ErrorKind::Client, "bad").into(),
            (ErrorKind::UnexpectedReturnType, "expected string key").into(),
            (ErrorKind::RESP3NotSupported, "no RESP3").into(),
        ];
        for e in permanent {
            assert_eq!(classify(&e, C), Class::Generic, "{e}");
        }
    }

    #[test]
    fn map_err_builds_the_variant_of_the_class() {
        let oom = map_err("redis", S, reply("OOM command not allowed"));
        assert!(matches!(
            oom,
            StoreError::Unavailable { store: "redis", .. }
        ));
        assert!(oom.is_transient());
        assert!(matches!(
            map_err("redis", S, reply("WRONGTYPE wrong kind")),
            StoreError::Corrupt { .. }
        ));
        assert!(matches!(
            map_err("redis", S, reply("ERR Protocol error: invalid bulk length")),
            StoreError::Rejected { .. }
        ));
        let noperm = map_err("redis", S, reply("NOPERM no permissions"));
        assert!(matches!(noperm, StoreError::Generic { .. }));
        assert!(!noperm.is_transient());
        // The driver error stays the source.
        let source = std::error::Error::source(&noperm).expect("a source");
        assert!(source.to_string().contains("no permissions"), "{source}");
    }

    #[test]
    fn embedded_codes_are_read_only_from_script_errors() {
        assert_eq!(
            script_error_code(
                "Error running script (call to f_x): @user_script:1: @user_script: 1: -OOM x"
            ),
            Some("OOM")
        );
        assert_eq!(
            script_error_code("Error running script (call to f_x): @user_script:1: boom"),
            None
        );
        assert_eq!(script_error_code("syntax error: -OOM"), None);
    }
}
