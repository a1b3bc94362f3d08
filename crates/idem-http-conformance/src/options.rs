//! The options a case sets on the adapter under test, applied the same
//! way to every adapter through the shared [`idem_http::Builder`].

use std::time::Duration;

use http::{HeaderName, HeaderValue};
use idem_http::{Builder, Fingerprinter, Integration, KeySource};

use crate::fixture::{TestClock, TestStore};

/// A case's options; the defaults are the adapter's defaults.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct Options {
    /// [`Builder::required`].
    pub required: bool,
    /// [`Builder::max_body_bytes`], if set.
    pub max_body_bytes: Option<usize>,
    /// [`Builder::key_source`], if set.
    pub key_source: Option<KeySource>,
    /// [`Builder::fingerprint`], if set.
    pub fingerprint: Option<Fingerprinter>,
    /// [`Builder::fingerprint_header`]s.
    pub fingerprint_headers: Vec<HeaderName>,
    /// An [`Builder::on_replay`] hook adding `x-replay-hook: 1`.
    pub replay_hook: bool,
    /// [`Builder::fail_open`].
    pub fail_open: bool,
    /// [`Builder::release_on_cancel`].
    pub release_on_cancel: bool,
}

impl Options {
    /// Applies the options to `builder`.
    pub fn apply<I>(
        &self,
        mut builder: Builder<TestStore, TestClock, I>,
    ) -> Builder<TestStore, TestClock, I>
    where
        I: Integration<TestStore, TestClock>,
    {
        builder = builder
            .required(self.required)
            .fail_open(self.fail_open)
            .release_on_cancel(self.release_on_cancel)
            .store_retry_after(Duration::from_secs(1))
            .max_retry_after(Duration::from_secs(2));
        if let Some(limit) = self.max_body_bytes {
            builder = builder.max_body_bytes(limit);
        }
        if let Some(source) = &self.key_source {
            builder = builder.key_source(source.clone());
        }
        if let Some(fingerprint) = &self.fingerprint {
            builder = builder.fingerprint(fingerprint.clone());
        }
        for name in &self.fingerprint_headers {
            builder = builder.fingerprint_header(name.clone());
        }
        if self.replay_hook {
            builder = builder.on_replay(|_, reply| {
                reply
                    .headers
                    .insert("x-replay-hook", HeaderValue::from_static("1"));
            });
        }
        builder
    }
}
