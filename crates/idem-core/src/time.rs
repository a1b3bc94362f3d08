//! Time as a value: timestamps, and the injected [`Clock`] the engine reads.
//!
//! The core never reads a clock of its own. The engine asks its [`Clock`] for
//! `now` and passes it down to the store, so expiry is decided by the
//! application's clock, and tests drive time with a [`ManualClock`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch (UTC).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The Unix epoch.
    pub const EPOCH: Self = Self(0);

    /// A timestamp `millis` milliseconds after the Unix epoch.
    pub const fn from_millis(millis: u64) -> Self {
        Self(millis)
    }

    /// Milliseconds since the Unix epoch.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// `self + d`, saturating at the end of time.
    #[must_use]
    pub fn plus(self, d: Duration) -> Self {
        Self(self.0.saturating_add(duration_millis(d)))
    }

    /// The time from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Self) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

/// Whole milliseconds of `d`, rounded up so that a non-zero duration never
/// becomes zero, saturating at `u64::MAX`.
pub(crate) fn duration_millis(d: Duration) -> u64 {
    let millis = d.as_millis() + u128::from(!d.subsec_nanos().is_multiple_of(1_000_000));
    u64::try_from(millis).unwrap_or(u64::MAX)
}

/// A boxed, sendable future, as returned by [`Clock::sleep`].
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The source of time for the engine.
///
/// # Behavior
/// - `now` is wall-clock time shared by every instance of the application:
///   it decides lease deadlines and record expiry, and is compared with
///   timestamps written by other instances. Clock skew between instances
///   shortens or lengthens leases by the skew (see docs/design.md).
/// - `sleep` resolves once `d` has passed on this clock. The engine sleeps only
///   while waiting for another request's outcome and between heartbeats.
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> Timestamp;
    /// A future that resolves after `d` has passed on this clock.
    fn sleep(&self, d: Duration) -> BoxFuture<()>;
}

/// Wall-clock time (`SystemTime`) with tokio's timer for sleeping.
#[cfg(feature = "tokio")]
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

#[cfg(feature = "tokio")]
impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp(duration_millis(since_epoch))
    }

    fn sleep(&self, d: Duration) -> BoxFuture<()> {
        Box::pin(tokio::time::sleep(d))
    }
}

/// A clock that moves only when told to: simulated time for tests.
///
/// # Behavior
/// - `now` returns the time set by [`new`](Self::new), [`set`](Self::set) and
///   [`advance`](Self::advance); it never moves by itself.
/// - A `sleep(d)` resolves once the clock has been advanced to at least the
///   time it was started plus `d`. Sleepers are woken by `advance`/`set`.
///
/// Cloning shares the clock.
#[derive(Clone, Debug, Default)]
pub struct ManualClock {
    inner: std::sync::Arc<ManualInner>,
}

#[derive(Debug, Default)]
struct ManualInner {
    now: AtomicU64,
    sleepers: Mutex<Vec<(u64, Waker)>>,
}

impl ManualClock {
    /// A manual clock reading `start`.
    pub fn new(start: Timestamp) -> Self {
        let clock = Self::default();
        clock.inner.now.store(start.0, Ordering::SeqCst);
        clock
    }

    /// Moves the clock forward by `d` and wakes the sleepers that are due.
    pub fn advance(&self, d: Duration) {
        self.inner
            .now
            .fetch_add(duration_millis(d), Ordering::SeqCst);
        self.wake_due();
    }

    /// Sets the clock to `t` (backwards too, to simulate a skewed instance).
    pub fn set(&self, t: Timestamp) {
        self.inner.now.store(t.0, Ordering::SeqCst);
        self.wake_due();
    }

    /// How many sleeps are waiting for this clock to advance (lets a test
    /// wait until a task is parked on the clock before moving it).
    pub fn pending_sleepers(&self) -> usize {
        self.inner
            .sleepers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    fn wake_due(&self) {
        let now = self.inner.now.load(Ordering::SeqCst);
        let due: Vec<Waker> = {
            let mut sleepers = self
                .inner
                .sleepers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let (due, pending): (Vec<_>, Vec<_>) = sleepers
                .drain(..)
                .partition(|(deadline, _)| *deadline <= now);
            *sleepers = pending;
            due.into_iter().map(|(_, waker)| waker).collect()
        };
        due.into_iter().for_each(Waker::wake);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.inner.now.load(Ordering::SeqCst))
    }

    fn sleep(&self, d: Duration) -> BoxFuture<()> {
        let deadline = self.now().plus(d).0;
        Box::pin(ManualSleep {
            inner: self.inner.clone(),
            deadline,
        })
    }
}

struct ManualSleep {
    inner: std::sync::Arc<ManualInner>,
    deadline: u64,
}

impl Future for ManualSleep {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.inner.now.load(Ordering::SeqCst) >= self.deadline {
            return Poll::Ready(());
        }
        let mut sleepers = self
            .inner
            .sleepers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Re-check under the lock: an `advance` may have run in between.
        if self.inner.now.load(Ordering::SeqCst) >= self.deadline {
            return Poll::Ready(());
        }
        sleepers.push((self.deadline, cx.waker().clone()));
        Poll::Pending
    }
}

impl<C: Clock + ?Sized> Clock for std::sync::Arc<C> {
    fn now(&self) -> Timestamp {
        (**self).now()
    }
    fn sleep(&self, d: Duration) -> BoxFuture<()> {
        (**self).sleep(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_round_up_to_whole_millis() {
        assert_eq!(duration_millis(Duration::from_micros(1)), 1);
        assert_eq!(duration_millis(Duration::from_millis(5)), 5);
        assert_eq!(duration_millis(Duration::MAX), u64::MAX);
    }

    #[tokio::test]
    async fn manual_sleep_resolves_only_after_advance() {
        let clock = ManualClock::new(Timestamp::from_millis(1_000));
        let sleeper = tokio::spawn(clock.sleep(Duration::from_millis(10)));
        clock.advance(Duration::from_millis(9));
        tokio::task::yield_now().await;
        assert!(!sleeper.is_finished());
        clock.advance(Duration::from_millis(1));
        sleeper.await.unwrap();
        assert_eq!(clock.now(), Timestamp::from_millis(1_010));
    }
}
