//! Waiting for a condition: poll with a deadline, never a bare sleep.

use std::future::Future;
use std::time::{Duration, Instant};

/// The pause between two polls: short, so a condition is seen soon after it
/// holds; not zero, so a poll loop does not starve the servers it waits on
/// (2 shared cores).
pub const POLL: Duration = Duration::from_millis(10);

/// Polls `check` until it returns `Some`, and returns that value; fails the
/// test naming `what` if `within` passes first.
pub async fn until<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Polls `check` until it returns `true`; fails the test naming `what` if
/// `within` passes first.
pub async fn until_true<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    until(what, within, || {
        let fut = check();
        async move { fut.await.then_some(()) }
    })
    .await;
}

/// Calls `op` until it succeeds or fails with an error `transient` accepts,
/// then returns the result: `Ok`, or the first permanent error. Fails the
/// test if it is still failing transiently after `within` (a store that
/// does not recover).
pub async fn until_ok<T, E, F, Fut>(
    what: &str,
    within: Duration,
    transient: impl Fn(&E) -> bool,
    mut op: F,
) -> Result<T, E>
where
    E: std::fmt::Debug,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let deadline = Instant::now() + within;
    loop {
        match op().await {
            Err(e) if transient(&e) => {
                assert!(
                    Instant::now() < deadline,
                    "{what}: still failing after {within:?}: {e:?}"
                );
                tokio::time::sleep(POLL).await;
            }
            other => return other,
        }
    }
}

/// Polls `check` for the whole of `period` and fails the test naming `what`
/// the first time it returns `false`: for a promise that something does
/// *not* happen within a time another process owns (a broker's redelivery
/// timer), which no event announces.
pub async fn holds_for<F, Fut>(what: &str, period: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = Instant::now() + period;
    while Instant::now() < end {
        assert!(check().await, "{what} stopped holding within {period:?}");
        tokio::time::sleep(POLL).await;
    }
}
