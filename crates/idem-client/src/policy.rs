//! How long and how often to re-send: [`RetryPolicy`], the backoff and
//! `Retry-After`.

use std::time::{Duration, SystemTime};

use http::HeaderMap;

/// How the backoff before a re-send is randomised.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Jitter {
    /// "Full jitter": a uniformly random wait between zero and the
    /// exponential ceiling, so that clients that failed together do not
    /// come back together.
    #[default]
    Full,
    /// No randomness: always the exponential ceiling (for tests and for
    /// callers that add their own).
    None,
}

/// When to stop re-sending, and how long to wait in between.
///
/// | setting | default | meaning |
/// |---|---|---|
/// | [`max_attempts`](Self::max_attempts) | 10 | sends per logical request, the first included |
/// | [`backoff`](Self::backoff) | 100 ms, 5 s | the wait before re-send *n* is up to `base · 2^(n-1)`, at most `max` |
/// | [`jitter`](Self::jitter) | [`Jitter::Full`] | how that wait is randomised |
/// | [`budget`](Self::budget) | 60 s | total time of a logical request, attempts and waits included |
/// | [`attempt_timeout`](Self::attempt_timeout) | none | the longest one attempt may take (response headers and buffered body); the reqwest client's own timeout also applies |
/// | [`retry_after_cap`](Self::retry_after_cap) | none | the longest `Retry-After` honoured in full |
///
/// # Behavior
/// - **Backoff**: before re-send *n* (*n* = 1 after the first attempt) the
///   middleware waits `max(backoff(n), Retry-After)`, where `backoff(n)` is
///   drawn by the [`Jitter`] below `min(max, base · 2^(n-1))`. So it never
///   re-sends sooner than the server's `Retry-After` asks.
/// - **`Retry-After`** (delta-seconds or an HTTP date) is honoured on every
///   re-sent answer that carries it (409 in progress, 429, 503, …). With a
///   [`retry_after_cap`](Self::retry_after_cap), longer values count as the
///   cap: for servers known to round a short wait up to whole seconds
///   (`idem-tower`'s 409 says at least `1`), and for tests. That deviates
///   from docs/http-contract.md ("honour `Retry-After`"); the default does not.
/// - **Budget**: the budget runs from the first send. An attempt is cut off
///   when the budget runs out (it counts as timed out), and no re-send is made
///   whose wait would end at or after the budget's end: the middleware stops
///   at once with [`IdempotencyError::BudgetSpent`](crate::IdempotencyError::BudgetSpent)
///   rather than sleep into a wait it cannot finish — including when the
///   server's `Retry-After` alone is longer than what is left.
/// - Out-of-range settings are clamped, never refused: `max_attempts(0)`
///   means 1, a `max` below `base` is raised to `base`.
/// - A policy in a request's extensions
///   (`RequestBuilder::with_extension(policy)`) replaces the middleware's for
///   that request.
///
/// ```
/// use std::time::Duration;
/// use idem_client::{Jitter, RetryPolicy};
///
/// let policy = RetryPolicy::default()
///     .max_attempts(5)
///     .backoff(Duration::from_millis(50), Duration::from_secs(2))
///     .budget(Duration::from_secs(20))
///     .attempt_timeout(Duration::from_secs(5))
///     .jitter(Jitter::Full);
/// # let _ = policy;
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    max_attempts: u32,
    base_backoff: Duration,
    max_backoff: Duration,
    budget: Duration,
    attempt_timeout: Option<Duration>,
    jitter: Jitter,
    retry_after_cap: Option<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 10,
            base_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            budget: Duration::from_secs(60),
            attempt_timeout: None,
            jitter: Jitter::Full,
            retry_after_cap: None,
        }
    }
}

impl RetryPolicy {
    /// One attempt, no re-send (the key is still added).
    pub fn no_retry() -> Self {
        Self::default().max_attempts(1)
    }

    /// Sends per logical request, the first included (default 10; 0 counts
    /// as 1).
    #[must_use]
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// The exponential backoff: up to `base · 2^(n-1)` before re-send *n*,
    /// never more than `max` (default 100 ms and 5 s; a `max` below `base`
    /// is raised to `base`).
    #[must_use]
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        self.base_backoff = base;
        self.max_backoff = max.max(base);
        self
    }

    /// The total time of one logical request, every attempt and wait
    /// included (default 60 s).
    #[must_use]
    pub fn budget(mut self, budget: Duration) -> Self {
        self.budget = budget;
        self
    }

    /// The longest one attempt may take, up to its response headers and its
    /// buffered body (default: none besides the budget and the reqwest
    /// client's timeout). An attempt cut off is re-sent like a lost reply.
    #[must_use]
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = Some(timeout);
        self
    }

    /// How the backoff is randomised (default [`Jitter::Full`]).
    #[must_use]
    pub fn jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// Honour `Retry-After` only up to `cap` (default: in full). See the
    /// type's docs for when this is reasonable.
    #[must_use]
    pub fn retry_after_cap(mut self, cap: Duration) -> Self {
        self.retry_after_cap = Some(cap);
        self
    }

    pub(crate) fn attempts_allowed(&self) -> u32 {
        self.max_attempts
    }

    pub(crate) fn total_budget(&self) -> Duration {
        self.budget
    }

    pub(crate) fn attempt_limit(&self) -> Option<Duration> {
        self.attempt_timeout
    }

    /// The ceiling of the backoff before re-send `retry` (1-based):
    /// `min(max, base · 2^(retry-1))`, saturating.
    pub(crate) fn ceiling(&self, retry: u32) -> Duration {
        let exponent = retry.saturating_sub(1).min(63);
        let factor = 1u64 << exponent;
        let factor = u32::try_from(factor).unwrap_or(u32::MAX);
        self.base_backoff
            .checked_mul(factor)
            .unwrap_or(Duration::MAX)
            .min(self.max_backoff)
    }

    /// The wait before re-send `retry` (1-based), given the server's
    /// `Retry-After` and a uniform random number `unit` in `[0, 1)`.
    pub(crate) fn delay(&self, retry: u32, retry_after: Option<Duration>, unit: f64) -> Duration {
        let ceiling = self.ceiling(retry);
        let backoff = match self.jitter {
            Jitter::Full => ceiling.mul_f64(unit.clamp(0.0, 1.0)),
            Jitter::None => ceiling,
        };
        let asked = retry_after.map(|asked| match self.retry_after_cap {
            Some(cap) => asked.min(cap),
            None => asked,
        });
        backoff.max(asked.unwrap_or_default())
    }
}

/// The `Retry-After` of `headers`: delta-seconds (`Retry-After: 2`) or an
/// HTTP date, as a duration from `now`.
///
/// # Behavior
/// `None` if absent, repeated, or not one of the two forms; a date in the
/// past is zero; a number of seconds too large for a `u64` saturates.
pub(crate) fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let mut values = headers.get_all(http::header::RETRY_AFTER).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    let text = value.to_str().ok()?.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        let secs = text.parse::<u64>().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(secs));
    }
    let date = httpdate::parse_http_date(text).ok()?;
    Some(date.duration_since(now).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http::HeaderValue;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn ceilings_double_up_to_the_cap() {
        let p = RetryPolicy::default().backoff(10 * MS, 100 * MS);
        let ceilings: Vec<Duration> = (1..=6).map(|n| p.ceiling(n)).collect();
        assert_eq!(
            ceilings,
            [10 * MS, 20 * MS, 40 * MS, 80 * MS, 100 * MS, 100 * MS]
        );
        // Huge retry numbers saturate instead of overflowing.
        assert_eq!(p.ceiling(u32::MAX), 100 * MS);
        let big = RetryPolicy::default().backoff(Duration::from_secs(1), Duration::MAX);
        assert_eq!(big.ceiling(200), Duration::from_secs(u64::from(u32::MAX)));
    }

    #[test]
    fn full_jitter_stays_below_the_ceiling() {
        let p = RetryPolicy::default().backoff(10 * MS, 100 * MS);
        assert_eq!(p.delay(3, None, 0.0), Duration::ZERO);
        assert_eq!(p.delay(3, None, 0.5), 20 * MS);
        assert!(p.delay(3, None, 0.999_999) < 40 * MS);
        // Out-of-range randomness is clamped.
        assert_eq!(p.delay(3, None, 7.0), 40 * MS);
        assert_eq!(p.delay(3, None, -1.0), Duration::ZERO);
        let fixed = p.clone().jitter(Jitter::None);
        assert_eq!(fixed.delay(3, None, 0.0), 40 * MS);
    }

    #[test]
    fn retry_after_is_a_floor_unless_capped() {
        let p = RetryPolicy::default().backoff(10 * MS, 100 * MS);
        let two = Duration::from_secs(2);
        // Never sooner than the server asks.
        assert_eq!(p.delay(1, Some(two), 0.3), two);
        // A longer backoff wins over a shorter Retry-After.
        let fixed = p.clone().jitter(Jitter::None);
        assert_eq!(fixed.delay(5, Some(MS), 0.0), 100 * MS);
        // With a cap, a long Retry-After counts as the cap.
        let capped = p.retry_after_cap(20 * MS);
        assert_eq!(capped.delay(1, Some(two), 0.0), 20 * MS);
        assert_eq!(capped.delay(1, Some(5 * MS), 0.0), 5 * MS);
    }

    #[test]
    fn settings_are_clamped() {
        let p = RetryPolicy::default()
            .max_attempts(0)
            .backoff(50 * MS, 10 * MS);
        assert_eq!(p.attempts_allowed(), 1);
        assert_eq!(p.ceiling(1), 50 * MS);
        assert_eq!(p.ceiling(4), 50 * MS);
        assert_eq!(RetryPolicy::no_retry().attempts_allowed(), 1);
    }

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(http::header::RETRY_AFTER, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn retry_after_parsing() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480); // 2015-10-21 07:28:00 GMT
        assert_eq!(retry_after(&headers(&[]), now), None);
        assert_eq!(
            retry_after(&headers(&["2"]), now),
            Some(Duration::from_secs(2))
        );
        assert_eq!(retry_after(&headers(&[" 0 "]), now), Some(Duration::ZERO));
        assert_eq!(
            retry_after(&headers(&["99999999999999999999999"]), now),
            Some(Duration::from_secs(u64::MAX))
        );
        assert_eq!(
            retry_after(&headers(&["Wed, 21 Oct 2015 07:28:30 GMT"]), now),
            Some(Duration::from_secs(30))
        );
        // A date in the past: retry now.
        assert_eq!(
            retry_after(&headers(&["Wed, 21 Oct 2015 07:27:00 GMT"]), now),
            Some(Duration::ZERO)
        );
        for bad in ["-1", "1.5", "soon", "", "2, 3"] {
            assert_eq!(retry_after(&headers(&[bad]), now), None, "{bad:?}");
        }
        assert_eq!(retry_after(&headers(&["1", "2"]), now), None);
    }
}
