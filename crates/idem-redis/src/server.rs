//! What the server can do natively: read from `INFO server` at connect, and
//! which path each conditional write takes ([`WritePaths`]).

use redis::Value;

use crate::connection::Connection;

/// How a store sends one kind of conditional write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum WritePath {
    /// One native command whose compare the server does itself
    /// (`SET … NX GET`, `SET … IFEQ … GET`, `DELIFEQ`).
    Native,
    /// A Lua script (`EVALSHA`), on servers without the native command.
    Script,
}

/// The path each conditional write of a store takes, as of now.
///
/// # Behavior
/// - Read once at connect from `INFO server` (every master of a cluster:
///   a path is native only if every master has the command):
///   `insert_if_absent` is native on Redis ≥ 7.0 and Valkey (`SET … NX
///   GET`); `compare_and_swap` on Valkey ≥ 8.1 (`SET … IFEQ … GET`);
///   `delete_if` on Valkey ≥ 9.0 (`DELIFEQ`). Redis 8.4's conditional
///   `SET`/`DELEX` are not used yet: on Redis, both stay scripts.
/// - A native command the server refuses later (a reconnect to an older
///   node, a proxy that does not know it) is sent again as the script, and
///   that path is a script from then on, for the life of the store. A
///   refused command changed nothing, so nothing runs twice.
/// - A server whose `INFO` cannot be read (renamed or disabled) gets the
///   scripts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct WritePaths {
    /// `insert_if_absent`.
    pub insert_if_absent: WritePath,
    /// `compare_and_swap`.
    pub compare_and_swap: WritePath,
    /// `delete_if`.
    pub delete_if: WritePath,
}

/// The conditional writes a server has natively.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Features {
    /// `SET key value IFEQ old GET` (Valkey ≥ 8.1).
    pub(crate) set_ifeq: bool,
    /// `DELIFEQ key value` (Valkey ≥ 9.0).
    pub(crate) delifeq: bool,
}

impl Features {
    /// What both `self` and `other` have.
    fn and(self, other: Self) -> Self {
        Self {
            set_ifeq: self.set_ifeq && other.set_ifeq,
            delifeq: self.delifeq && other.delifeq,
        }
    }
}

/// `major.minor` of a version string (`9.1.2`).
fn major_minor(version: &str) -> Option<(u32, u32)> {
    let mut parts = version.trim().split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next().map_or(Some(0), |m| m.parse().ok())?;
    Some((major, minor))
}

/// The features of one server, from the text of its `INFO server`.
pub(crate) fn parse_info(info: &str) -> Features {
    let field = |name: &str| {
        info.lines().find_map(|line| {
            line.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix(':'))
                .map(str::trim)
        })
    };
    if field("server_name") != Some("valkey") {
        return Features::default();
    }
    match field("valkey_version").and_then(major_minor) {
        Some(version) => Features {
            set_ifeq: version >= (8, 1),
            delifeq: version >= (9, 0),
        },
        None => Features::default(),
    }
}

/// The features every master of `conn` has; none when a master's `INFO`
/// cannot be read.
pub(crate) async fn detect(conn: &Connection) -> Features {
    let masters = match conn.masters().await {
        Ok(masters) => masters,
        Err(e) => {
            tracing::debug!(error = %e, "idem-redis: cannot list the masters; using the scripts");
            return Features::default();
        }
    };
    let mut common: Option<Features> = None;
    for node in &masters {
        let mut info = redis::cmd("INFO");
        info.arg("server");
        let text = match conn.query_node(node, &info).await {
            Ok(Value::BulkString(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
            Ok(Value::VerbatimString { text, .. }) => text,
            Ok(other) => {
                tracing::debug!(reply = ?other, "idem-redis: unexpected INFO reply; using the scripts");
                return Features::default();
            }
            Err(e) => {
                tracing::debug!(error = %e, "idem-redis: INFO refused; using the scripts");
                return Features::default();
            }
        };
        let here = parse_info(&text);
        common = Some(common.map_or(here, |c| c.and(here)));
    }
    common.unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valkey_versions_decide_the_native_commands() {
        let info = |name: &str, version: &str| {
            format!(
                "# Server\r\nredis_version:7.2.4\r\nserver_name:{name}\r\nvalkey_version:{version}\r\n"
            )
        };
        let both = Features {
            set_ifeq: true,
            delifeq: true,
        };
        assert_eq!(parse_info(&info("valkey", "9.1.2")), both);
        assert_eq!(parse_info(&info("valkey", "10.0.0")), both);
        assert_eq!(
            parse_info(&info("valkey", "8.1.0")),
            Features {
                set_ifeq: true,
                delifeq: false
            }
        );
        assert_eq!(parse_info(&info("valkey", "8.0.2")), Features::default());
        assert_eq!(parse_info(&info("valkey", "x")), Features::default());
        assert_eq!(
            parse_info("# Server\r\nredis_version:8.4.0\r\n"),
            Features::default()
        );
        assert_eq!(parse_info(""), Features::default());
        assert_eq!(both.and(Features::default()), Features::default());
    }
}
