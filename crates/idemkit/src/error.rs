//! [`StoreUrlError`] (a URL refused by the parser) and [`OpenError`] (a
//! store that could not be opened).

/// Why [`StoreUrl::parse`](crate::StoreUrl::parse) refused a URL.
///
/// Every variant carries the URL with its password replaced by `***`; the
/// message names the scheme or the parameter at fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreUrlError {
    /// No `scheme://`.
    #[error(
        "store URL `{url}` has no scheme: expected memory://, sqlite://PATH, postgres://…, redis://… or redis+cluster://…"
    )]
    MissingScheme {
        /// The URL, password redacted.
        url: String,
    },
    /// A scheme no store answers to.
    #[error(
        "store URL `{url}`: unknown scheme `{scheme}` (expected memory, sqlite, postgres, postgresql, redis, rediss, redis+cluster or rediss+cluster)"
    )]
    UnknownScheme {
        /// The URL, password redacted.
        url: String,
        /// The scheme given.
        scheme: String,
    },
    /// A query parameter the store does not know (nor its driver).
    #[error(
        "store URL `{url}`: unknown parameter `{name}` for {backend} (idem's parameters: {known})"
    )]
    UnknownParameter {
        /// The URL, password redacted.
        url: String,
        /// `sqlite`, `postgres`, `redis` or `redis-cluster`.
        backend: &'static str,
        /// The parameter's name.
        name: String,
        /// The parameters the store takes, comma-separated.
        known: &'static str,
    },
    /// A parameter whose value is not valid.
    #[error("store URL `{url}`: parameter `{name}`: {reason}")]
    InvalidParameter {
        /// The URL, password redacted.
        url: String,
        /// The parameter's name.
        name: String,
        /// What was wrong and what is expected.
        reason: String,
    },
    /// A parameter given more than once.
    #[error("store URL `{url}`: parameter `{name}` is given more than once")]
    DuplicateParameter {
        /// The URL, password redacted.
        url: String,
        /// The parameter's name.
        name: String,
    },
    /// Something else is wrong with the URL's shape (no host, a path where
    /// none is allowed).
    #[error("store URL `{url}`: {reason}")]
    Malformed {
        /// The URL, password redacted.
        url: String,
        /// What is wrong.
        reason: String,
    },
}

/// Why a store could not be opened from its URL.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The URL was refused (also: a value only the store itself validates,
    /// such as a table name).
    #[error(transparent)]
    Url(#[from] StoreUrlError),
    /// The URL names a store this build of idemkit does not include.
    #[error("store URL `{url}` needs idemkit's `{feature}` feature")]
    FeatureDisabled {
        /// The URL, password redacted.
        url: String,
        /// The cargo feature to enable.
        feature: &'static str,
    },
    /// The store's server, file or driver failed.
    #[error("could not open the {backend} store at `{url}`: {source}")]
    Open {
        /// `sqlite`, `postgres`, `redis` or `redis-cluster`.
        backend: &'static str,
        /// The URL, password redacted.
        url: String,
        /// Whether it may work later unchanged: the server could not be
        /// reached or did not answer in time.
        unreachable: bool,
        /// The store's or driver's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
}

impl OpenError {
    /// Whether the server could not be reached or did not answer in time
    /// (retrying later, unchanged, may work), as opposed to a refused URL or
    /// option.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            Self::Open {
                unreachable: true,
                ..
            }
        )
    }
}
