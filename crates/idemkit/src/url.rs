//! [`StoreUrl`]: which store, where, with which options.

use std::fmt;
use std::path::PathBuf;

pub(crate) mod postgres;
pub(crate) mod redis;
pub(crate) mod sqlite;

use crate::params::{Ctx, Param, encode};
use crate::{PostgresUrl, RedisUrl, SqliteUrl, StoreUrlError};

/// Where the idempotency records live, parsed from a URL; see the
/// [crate docs](crate) for every scheme and parameter.
///
/// # Behavior
/// - [`parse`](Self::parse) (also `str::parse`) accepts the URLs of the
///   crate-level table. The scheme is case-insensitive. Options are query
///   parameters (`?name=value&…`, percent-encoded); an unknown parameter, a
///   parameter given twice or a value out of range is a [`StoreUrlError`]
///   naming it. Parameters of the driver itself (PostgreSQL's `sslmode`,
///   `application_name`, …; Redis's `protocol`) are passed on to it.
/// - [`Display`](fmt::Display) writes a URL that parses back to the same
///   value, except that a password (in the user info, or PostgreSQL's
///   `password` parameter) is shown as `***`. `Debug` redacts it too.
/// - Parsing opens nothing; [`open`](Self::open) and
///   [`store_from_url`](crate::store_from_url) do.
///
/// ```
/// use idemkit::StoreUrl;
///
/// let url: StoreUrl = "postgres://app:s3cret@db:5432/app?schema=billing&claim_mode=read-first".parse()?;
/// assert_eq!(url.backend(), "postgres");
/// assert_eq!(url.to_string(), "postgres://app:***@db:5432/app?schema=billing&claim_mode=read-first");
///
/// let err = "sqlite://app.db?busy_timeout=5".parse::<StoreUrl>().unwrap_err();
/// assert!(err.to_string().contains("`busy_timeout`"), "{err}");
/// # Ok::<(), idemkit::StoreUrlError>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreUrl {
    /// `memory://`: `idem_core::MemoryStore`, in this process.
    Memory,
    /// `sqlite://…`.
    Sqlite(SqliteUrl),
    /// `postgres://…` or `postgresql://…`.
    Postgres(PostgresUrl),
    /// `redis://…`, `rediss://…`, `redis+cluster://…` or `rediss+cluster://…`.
    Redis(RedisUrl),
}

/// The server part of a network URL: what the driver gets.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Server {
    /// The driver's scheme (`postgres`, `redis`, `rediss`).
    pub(crate) scheme: String,
    /// `user` or `user:password`, without the `@`.
    pub(crate) userinfo: Option<String>,
    /// `host:port`, or several comma-separated for a cluster.
    pub(crate) hosts: String,
    /// `/db` or empty.
    pub(crate) path: String,
    /// The driver's own query parameters, raw.
    pub(crate) passthrough: Vec<String>,
    /// `#…` (Redis's `#insecure`), without the `#`.
    pub(crate) fragment: Option<String>,
}

impl StoreUrl {
    /// Parses `url`; see the [crate docs](crate) for the accepted URLs.
    pub fn parse(url: &str) -> Result<Self, StoreUrlError> {
        let ctx = Ctx::new(url);
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| StoreUrlError::MissingScheme {
                url: ctx.url.clone(),
            })?;
        match scheme.to_ascii_lowercase().as_str() {
            "memory" if rest.is_empty() || rest == "/" => Ok(Self::Memory),
            "memory" => Err(ctx.malformed("memory:// takes no path and no parameters")),
            "sqlite" => SqliteUrl::parse(&ctx, rest).map(Self::Sqlite),
            "postgres" | "postgresql" => PostgresUrl::parse(&ctx, rest).map(Self::Postgres),
            "redis" => RedisUrl::parse(&ctx, "redis", rest, false).map(Self::Redis),
            "rediss" => RedisUrl::parse(&ctx, "rediss", rest, false).map(Self::Redis),
            "redis+cluster" => RedisUrl::parse(&ctx, "redis", rest, true).map(Self::Redis),
            "rediss+cluster" => RedisUrl::parse(&ctx, "rediss", rest, true).map(Self::Redis),
            other => Err(StoreUrlError::UnknownScheme {
                url: ctx.url.clone(),
                scheme: other.to_string(),
            }),
        }
    }

    /// A SQLite file at `path`, with the store's defaults.
    pub fn sqlite(path: impl Into<PathBuf>) -> Self {
        Self::Sqlite(SqliteUrl {
            path: Some(path.into()),
            ..SqliteUrl::default()
        })
    }

    /// A SQLite file in a new temporary directory (`sqlite://`).
    pub fn sqlite_temp() -> Self {
        Self::Sqlite(SqliteUrl::default())
    }

    /// A Redis Cluster reached through `nodes` (`redis://host:port` each,
    /// as `IDEM_REDIS_CLUSTER_URLS` lists them): the same as
    /// `redis+cluster://host:port,host:port`. The user info, database and
    /// driver parameters are the first node's.
    pub fn redis_cluster<I, S>(nodes: I) -> Result<Self, StoreUrlError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let nodes: Vec<String> = nodes.into_iter().map(|s| s.as_ref().to_string()).collect();
        let shown = nodes.join(",");
        let ctx = Ctx::new(&shown);
        let mut hosts = Vec::new();
        let mut first = None;
        for node in &nodes {
            let Ok(Self::Redis(parsed)) = Self::parse(node.trim()) else {
                return Err(ctx.malformed(format!(
                    "`{}` is not a redis:// or rediss:// node URL",
                    redact(node)
                )));
            };
            hosts.push(parsed.server.hosts.clone());
            first.get_or_insert(parsed);
        }
        let mut url = first.ok_or_else(|| ctx.malformed("no cluster node given"))?;
        url.server.hosts = hosts.join(",");
        url.cluster = true;
        Ok(Self::Redis(url))
    }

    /// `memory`, `sqlite`, `postgres`, `redis` or `redis-cluster`.
    pub fn backend(&self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Sqlite(_) => "sqlite",
            Self::Postgres(_) => "postgres",
            Self::Redis(r) if r.cluster => "redis-cluster",
            Self::Redis(_) => "redis",
        }
    }
}

impl std::str::FromStr for StoreUrl {
    type Err = StoreUrlError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// The parameters that are set, in order, for the URL's query string.
pub(crate) fn present<const N: usize>(
    params: [(&'static str, Option<String>); N],
) -> Vec<(&'static str, String)> {
    params
        .into_iter()
        .filter_map(|(name, value)| Some((name, value?)))
        .collect()
}

impl Server {
    /// Splits `rest` (after `scheme://`) into the server and the query's
    /// parameters.
    /// `require_host`: PostgreSQL may name the host in a parameter (`host=`)
    /// or default it; Redis may not.
    pub(crate) fn parse(
        ctx: &Ctx,
        scheme: &str,
        rest: &str,
        require_host: bool,
    ) -> Result<(Self, Vec<Param>), StoreUrlError> {
        let (rest, fragment) = match rest.split_once('#') {
            Some((rest, fragment)) => (rest, Some(fragment.to_string())),
            None => (rest, None),
        };
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => (Some(userinfo.to_string()), hosts),
            None => (None, authority),
        };
        if require_host && hosts.split(',').any(str::is_empty) {
            return Err(ctx.malformed("no host (expected host[:port] after ://)"));
        }
        let server = Self {
            scheme: scheme.to_string(),
            userinfo,
            hosts: hosts.to_string(),
            path: path.to_string(),
            passthrough: Vec::new(),
            fragment,
        };
        Ok((server, ctx.split(query)?))
    }

    /// `scheme://userinfo@host/path?passthrough#fragment` for `host`.
    pub(crate) fn url(&self, host: &str, redacted: bool) -> String {
        let mut out = format!("{}://", self.scheme);
        if let Some(userinfo) = &self.userinfo {
            out.push_str(&if redacted {
                redact_userinfo(userinfo)
            } else {
                userinfo.clone()
            });
            out.push('@');
        }
        out.push_str(host);
        out.push_str(&self.path);
        if !self.passthrough.is_empty() {
            out.push('?');
            let params: Vec<String> = self
                .passthrough
                .iter()
                .map(|p| if redacted { redact_param(p) } else { p.clone() })
                .collect();
            out.push_str(&params.join("&"));
        }
        if let Some(fragment) = &self.fragment {
            out.push('#');
            out.push_str(fragment);
        }
        out
    }
}

/// `user:***` for `user:password`; `user` unchanged.
fn redact_userinfo(userinfo: &str) -> String {
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => userinfo.to_string(),
    }
}

/// `password=***` for a `password=…` query parameter.
fn redact_param(raw: &str) -> String {
    match raw.split_once('=') {
        Some((name, _)) if name.eq_ignore_ascii_case("password") => format!("{name}=***"),
        _ => raw.to_string(),
    }
}

/// `url` with any password (user info, `password=` parameter) replaced by
/// `***`; works on URLs the parser refuses too.
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    if scheme.eq_ignore_ascii_case("sqlite") || scheme.eq_ignore_ascii_case("memory") {
        return url.to_string();
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => format!("{}@{hosts}", redact_userinfo(userinfo)),
        None => authority.to_string(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let (query, fragment) = match query.split_once('#') {
                Some((q, f)) => (q, format!("#{f}")),
                None => (query, String::new()),
            };
            let params: Vec<String> = query.split('&').map(redact_param).collect();
            format!("{path}?{}{fragment}", params.join("&"))
        }
        None => tail.to_string(),
    };
    format!("{scheme}://{authority}{tail}")
}

/// Writes `base`, then `?` and the idem parameters before any already in
/// `base` (the driver's).
fn write_with_params(
    f: &mut fmt::Formatter<'_>,
    base: &str,
    params: &[(&'static str, String)],
) -> fmt::Result {
    let (base, fragment) = match base.split_once('#') {
        Some((b, frag)) => (b, Some(frag)),
        None => (base, None),
    };
    let (base, driver) = match base.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (base, None),
    };
    f.write_str(base)?;
    let mut all: Vec<String> = params
        .iter()
        .map(|(name, value)| format!("{name}={}", encode(value)))
        .collect();
    all.extend(driver.map(String::from));
    if !all.is_empty() {
        write!(f, "?{}", all.join("&"))?;
    }
    if let Some(fragment) = fragment {
        write!(f, "#{fragment}")?;
    }
    Ok(())
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Memory => f.write_str("memory://"),
            Self::Sqlite(url) => {
                let base = match &url.path {
                    Some(path) => format!("sqlite://{}", path.display()),
                    None => "sqlite://".to_string(),
                };
                write_with_params(f, &base, &url.params())
            }
            Self::Postgres(url) => {
                write_with_params(f, &url.server.url(&url.server.hosts, true), &url.params())
            }
            Self::Redis(url) => {
                let mut base = url.server.url(&url.server.hosts, true);
                if url.cluster {
                    base = base.replacen("://", "+cluster://", 1);
                }
                write_with_params(f, &base, &url.params())
            }
        }
    }
}

impl fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreUrl({self})")
    }
}
