//! [`Trial`]: one test of a [`Runner`](super::Runner)(super::Runner).

use std::fmt::Display;
use std::future::Future;

use super::{Body, Hook};

/// What a trial does.
pub(super) enum Action {
    Run(Body),
    /// Something it needs could not be reached: ignored, or failed under CI.
    Unavailable {
        what: String,
        why: String,
    },
}

/// One test of a [`Runner`](super::Runner): an async body, what it requires, and an
/// optional teardown.
pub struct Trial {
    pub(super) name: String,
    pub(super) body: Action,
    pub(super) requires: Vec<String>,
    pub(super) teardown: Option<Hook>,
}

impl std::fmt::Debug for Trial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trial")
            .field("name", &self.name)
            .field("requires", &self.requires)
            .field("teardown", &self.teardown.is_some())
            .finish_non_exhaustive()
    }
}

impl Trial {
    /// A trial named `name` (shown as is: the runner adds no prefix) that
    /// runs `body` on the run's runtime; it passes unless `body` panics or
    /// hangs.
    pub fn test<F, Fut>(name: impl Into<String>, body: F) -> Self
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Self {
            name: name.into(),
            body: Action::Run(Box::new(move || Box::pin(body()))),
            requires: Vec::new(),
            teardown: None,
        }
    }

    /// A trial that cannot run because `what` could not be reached (`why`):
    /// reported ignored (`"<what> unavailable"`), or failed with `why` when
    /// [`backends_required`](super::backends_required). For suites that probe before they register
    /// their trials ([`Runner::probe`](super::Runner::probe)); otherwise use
    /// [`requires`](Self::requires).
    pub fn unavailable(
        name: impl Into<String>,
        what: impl Into<String>,
        why: impl Into<String>,
    ) -> Self {
        Self {
            name: name.into(),
            body: Action::Unavailable {
                what: what.into(),
                why: why.into(),
            },
            requires: Vec::new(),
            teardown: None,
        }
    }

    /// Runs the trial only if the [requirement](super::Runner::requirement) named
    /// `requirement` probed fine.
    #[must_use]
    pub fn requires(mut self, requirement: impl Into<String>) -> Self {
        self.requires.push(requirement.into());
        self
    }

    /// Runs `teardown` after the body, on the run's runtime, whether the body
    /// passed, panicked or timed out (then after its task was aborted). An
    /// error (or a panic, or a hang past the timeout) fails the trial; when
    /// the body failed too, both messages are reported. A trial that does not
    /// run (a requirement unreachable) is not torn down.
    #[must_use]
    pub fn with_teardown<F, Fut, E>(mut self, teardown: F) -> Self
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Display,
    {
        self.teardown = Some(Box::new(move || {
            Box::pin(async move { teardown().await.map_err(|e| e.to_string()) })
        }));
        self
    }

    /// The trial's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}
