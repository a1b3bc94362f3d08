//! Exit codes ([`Exit`]) and what went wrong ([`Failure`]), reported as one
//! line on stderr.

use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use idem_core::StoreError;
use idemkit::{OpenError, StoreUrlError};

/// The process's exit code; see the crate docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Exit {
    /// 0: done.
    Done = 0,
    /// 1: no live record for the key.
    NotFound = 1,
    /// 2: bad input.
    Usage = 2,
    /// 3: the store failed.
    Store = 3,
    /// 4: not done (refused, declined, changed meanwhile, cannot count).
    NotDone = 4,
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> Self {
        ExitCode::from(exit as u8)
    }
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Failure {
    /// Bad input that clap did not catch (an empty tenant, …).
    #[error("{0}")]
    Usage(String),
    /// A store URL the parser refused.
    #[error(transparent)]
    Url(#[from] StoreUrlError),
    /// A malformed idempotency key.
    #[error("KEY `{key}`")]
    Key {
        /// The key as given, escaped.
        key: String,
        /// Why it was refused.
        #[source]
        source: idem_core::KeyError,
    },
    /// The store could not be opened.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// The store's server, file or driver failed while opening it.
    #[error("could not open the {backend} store at `{url}`")]
    Unopened {
        /// `sqlite`, `postgres`, `redis` or `redis-cluster`.
        backend: &'static str,
        /// The URL as given, password redacted.
        url: String,
        /// The store's or driver's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// There is no idem store where the URL points (and only `migrate`
    /// creates one).
    #[error("{0}")]
    NoStore(String),
    /// A store call failed.
    #[error("{what}")]
    Store {
        /// What was being done.
        what: String,
        /// The store's error.
        #[source]
        source: StoreError,
    },
    /// A database call outside the store contract (`migrate`'s bookkeeping)
    /// failed.
    #[error("{what}")]
    Database {
        /// What was being done.
        what: String,
        /// The driver's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// A store call took longer than `--timeout`.
    #[error("{what}: no answer within {limit:?} (--timeout)")]
    Timeout {
        /// What was being done.
        what: String,
        /// The limit.
        limit: Duration,
    },
    /// The command chose not to act, or could not.
    #[error("{0}")]
    NotDone(String),
    /// A terminal or system call failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl Failure {
    /// The exit code this failure ends the process with.
    pub(crate) fn exit(&self) -> Exit {
        match self {
            Self::Usage(_) | Self::Url(_) | Self::Key { .. } => Exit::Usage,
            Self::Open(OpenError::Url(_) | OpenError::FeatureDisabled { .. }) => Exit::Usage,
            Self::NotDone(_) => Exit::NotDone,
            Self::Store {
                source: StoreError::Unsupported { .. },
                ..
            } => Exit::NotDone,
            Self::Open(_)
            | Self::Unopened { .. }
            | Self::NoStore(_)
            | Self::Store { .. }
            | Self::Database { .. }
            | Self::Timeout { .. }
            | Self::Io { .. } => Exit::Store,
        }
    }
}

/// `e` and its sources on one line, joined by `: `; a source whose text the
/// line already holds (errors that print their source themselves) is not
/// repeated, and line breaks inside a message become spaces.
pub(crate) fn one_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut next = e.source();
    while let Some(source) = next {
        let text = source.to_string();
        if !text.is_empty() && !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        next = source.source();
    }
    line.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Writes `idem: error: …` on stderr, on one line.
pub(crate) fn report(failure: &Failure) {
    let _ = writeln!(std::io::stderr(), "idem: error: {}", one_line(failure));
}

/// Writes `idem: warning: …` on stderr.
pub(crate) fn warn(message: &str) {
    let _ = writeln!(std::io::stderr(), "idem: warning: {message}");
}

/// Reports a command line clap refused, on one line (help and version are
/// printed as clap prints them).
pub(crate) fn clap_error(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                Exit::Usage.into()
            } else {
                Exit::Done.into()
            }
        }
        _ => {
            let rendered = e.render().to_string();
            let message: Vec<&str> = rendered
                .lines()
                .map(str::trim)
                .take_while(|line| !line.starts_with("Usage:"))
                .filter(|line| !line.is_empty())
                .collect();
            let message = message.join(" ");
            let message = message.strip_prefix("error: ").unwrap_or(&message);
            let _ = writeln!(
                std::io::stderr(),
                "idem: error: {message} (see `idem --help`)"
            );
            Exit::Usage.into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer: {0}")]
    struct Repeats(#[source] std::io::Error);

    #[test]
    fn one_line_joins_causes_once() {
        let e = Failure::Store {
            what: "read the key".to_string(),
            source: StoreError::unavailable("redis", std::io::Error::other("refused\nnow")),
        };
        assert_eq!(
            one_line(&e),
            "read the key: store `redis` is unavailable: refused now"
        );
        let e = Repeats(std::io::Error::other("inner"));
        assert_eq!(one_line(&e), "outer: inner");
    }

    #[test]
    fn exit_codes() {
        assert_eq!(Failure::Usage(String::new()).exit(), Exit::Usage);
        let unsupported = Failure::Store {
            what: String::new(),
            source: StoreError::unsupported("x", "census"),
        };
        assert_eq!(unsupported.exit(), Exit::NotDone);
    }
}
