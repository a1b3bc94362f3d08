//! The [`Completer`]: finds keys whose holder died after recording a
//! checkpoint and drives them to completion without waiting for the client
//! to retry.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::{self, Either};
use futures_util::stream::{self, StreamExt};

use crate::engine::{Begin, Ending, Engine};
use crate::phases::Phases;
use crate::store::{Store, Versioned};
use crate::{BoxFuture, Clock, Error};

/// Resumes one operation from its phases and says how it ends.
type Resume = Arc<dyn Fn(Phases) -> BoxFuture<Ending> + Send + Sync>;

/// What one [`Completer::run_once`] pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Pass {
    /// Abandoned records the store returned.
    pub found: usize,
    /// Keys this completer claimed and resumed.
    pub resumed: usize,
    /// Of those, keys it ended (completed or failed, as the resume said).
    pub ended: usize,
    /// Keys left alone: no resume registered for their operation, or
    /// someone else (a client's retry, another completer) had them first.
    pub skipped: usize,
    /// Keys whose claim or ending failed (store errors, a lost lease, a
    /// panic in the resume); each is found again by a later pass while it
    /// stays abandoned.
    pub errors: usize,
}

/// Totals over a completer's life (see [`Completer::totals`]).
#[derive(Debug, Default)]
struct Totals {
    passes: AtomicU64,
    resumed: AtomicU64,
    ended: AtomicU64,
    errors: AtomicU64,
}

/// Totals of a completer's passes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CompleterTotals {
    /// Passes run.
    pub passes: u64,
    /// Keys resumed.
    pub resumed: u64,
    /// Keys ended.
    pub ended: u64,
    /// Claims or endings that failed.
    pub errors: u64,
}

/// An opt-in background task that finds keys abandoned mid-way (in
/// flight, lease lapsed, with a checkpoint: [`Store::abandoned`]) and
/// drives them to completion without a client retry.
///
/// # Behavior
/// - Each pass asks the store for up to [`with_batch`](Self::with_batch)
///   abandoned records and, for each whose operation (the scope's
///   [`operation`](crate::Scope::operation)) has a resume registered with
///   [`operation`](Self::operation), claims the key like any retry would
///   ([`Engine::begin_key`] with the stored fingerprint: a takeover with a
///   new fencing token). At most
///   [`with_concurrency`](Self::with_concurrency) resumes run at once.
/// - The resume gets the key's [`Phases`] (recorded phases are not run
///   again) and returns the [`Ending`] to store, which is written with
///   [`Engine::settle`] while a heartbeat keeps the lease. A panicking
///   resume ends the key as outcome unknown, which a record with a
///   checkpoint stores as a retryable failure (the next retry resumes).
/// - It coexists with client retries: whoever claims the key first holds
///   it; the other meets `InProgress` (the client gets `409`, then the
///   completer's answer) or, for the completer, skips it. Fencing makes a
///   late or stale completer harmless.
/// - Counts `idem_completer_keys_total{result}` (`resumed`, `ended`,
///   `skipped`, `error`) and logs each resume at `info` with the key's
///   operation and last recorded step.
/// - Needs a store with [`Capabilities::abandoned`](crate::store::Capabilities::abandoned):
///   otherwise every pass fails with
///   [`StoreError::Unsupported`](crate::StoreError::Unsupported).
pub struct Completer<S, C> {
    engine: Engine<S, C>,
    resumes: HashMap<Option<String>, Resume>,
    batch: usize,
    concurrency: usize,
    interval: Duration,
    totals: Arc<Totals>,
}

impl<S, C> std::fmt::Debug for Completer<S, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Completer")
            .field("operations", &self.resumes.keys().collect::<Vec<_>>())
            .field("batch", &self.batch)
            .field("concurrency", &self.concurrency)
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

impl<S: Store, C: Clock> Completer<S, C> {
    /// A completer for `engine`'s store, with no operation registered yet;
    /// batches of 64, 8 resumes at once, a pass every quarter of the lease.
    pub fn new(engine: Engine<S, C>) -> Self {
        let interval = (engine.policy().lease / 4).max(Duration::from_millis(10));
        Self {
            engine,
            resumes: HashMap::new(),
            batch: 64,
            concurrency: 8,
            interval,
            totals: Arc::default(),
        }
    }

    /// Registers how to resume keys of `operation` (the scope's operation;
    /// `None` for scopes without one).
    #[must_use]
    pub fn operation<F, Fut>(mut self, operation: Option<&str>, resume: F) -> Self
    where
        F: Fn(Phases) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Ending> + Send + 'static,
    {
        let resume: Resume = Arc::new(move |phases| Box::pin(resume(phases)));
        self.resumes.insert(operation.map(str::to_string), resume);
        self
    }

    /// At most `n` (at least 1) records per pass.
    #[must_use]
    pub fn with_batch(mut self, n: usize) -> Self {
        self.batch = n.max(1);
        self
    }

    /// At most `n` (at least 1) resumes at once.
    #[must_use]
    pub fn with_concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Time between passes in [`run`](Self::run) (after a pass that found
    /// fewer records than the batch; a full batch starts the next pass at once).
    #[must_use]
    pub fn with_interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Totals since the completer was built.
    pub fn totals(&self) -> CompleterTotals {
        let t = &self.totals;
        CompleterTotals {
            passes: t.passes.load(Ordering::Relaxed),
            resumed: t.resumed.load(Ordering::Relaxed),
            ended: t.ended.load(Ordering::Relaxed),
            errors: t.errors.load(Ordering::Relaxed),
        }
    }

    /// One pass: find abandoned keys and drive each to its end.
    ///
    /// # Behavior
    /// See the type. Fails only if the store cannot list abandoned records
    /// (nothing was claimed); errors on single keys are counted in
    /// [`Pass::errors`].
    pub async fn run_once(&self) -> Result<Pass, Error> {
        let now = self.engine.clock().now();
        let found = self.engine.store().abandoned(now, self.batch).await?;
        self.totals.passes.fetch_add(1, Ordering::Relaxed);
        let mut pass = Pass {
            found: found.len(),
            ..Pass::default()
        };
        let results: Vec<KeyResult> = stream::iter(found)
            .map(|v| self.complete_one(v))
            .buffer_unordered(self.concurrency)
            .collect()
            .await;
        for result in results {
            let label = match result {
                KeyResult::Skipped => {
                    pass.skipped += 1;
                    "skipped"
                }
                KeyResult::Ended => {
                    pass.resumed += 1;
                    pass.ended += 1;
                    self.totals.resumed.fetch_add(1, Ordering::Relaxed);
                    self.totals.ended.fetch_add(1, Ordering::Relaxed);
                    "ended"
                }
                KeyResult::Error { resumed } => {
                    if resumed {
                        pass.resumed += 1;
                        self.totals.resumed.fetch_add(1, Ordering::Relaxed);
                    }
                    pass.errors += 1;
                    self.totals.errors.fetch_add(1, Ordering::Relaxed);
                    "error"
                }
            };
            ::metrics::counter!("idem_completer_keys_total", "result" => label).increment(1);
        }
        Ok(pass)
    }

    /// Runs passes until `stop` resolves (a pass under way finishes first).
    ///
    /// # Behavior
    /// A failed pass (store unreachable) is logged and retried after the
    /// interval; a full batch starts the next pass at once.
    pub async fn run(&self, stop: impl Future<Output = ()>) {
        let mut stop = std::pin::pin!(stop);
        loop {
            let full = match self.run_once().await {
                Ok(pass) => pass.found >= self.batch,
                Err(e) => {
                    tracing::warn!(error = %e, "idem completer: a pass failed");
                    false
                }
            };
            if full {
                if stop.as_mut().now_or_never().is_some() {
                    return;
                }
                continue;
            }
            let sleep = std::pin::pin!(self.engine.clock().sleep(self.interval));
            if let Either::Left(_) = future::select(stop.as_mut(), sleep).await {
                return;
            }
        }
    }

    async fn complete_one(&self, found: Versioned) -> KeyResult {
        let Some(checkpoint) = found.record.checkpoint.as_ref() else {
            return KeyResult::Skipped;
        };
        let key = checkpoint.record_key();
        let step = checkpoint.step.clone();
        let Some(resume) = self
            .resumes
            .get(&key.scope().operation().map(str::to_string))
        else {
            return KeyResult::Skipped;
        };
        let lease = match self.engine.begin_key(key, found.record.fingerprint).await {
            Ok(Begin::Proceed(lease)) => lease,
            Ok(_) => return KeyResult::Skipped,
            Err(e) => {
                tracing::warn!(error = %e, "idem completer: could not claim an abandoned key");
                return KeyResult::Error { resumed: false };
            }
        };
        tracing::info!(
            operation = ?lease.key().scope().operation(),
            step = %step,
            attempt = lease.attempt(),
            "idem completer: resuming an abandoned key"
        );
        let ending = match self.engine.phases(&lease) {
            Ok(phases) => {
                let work = AssertUnwindSafe(resume(phases)).catch_unwind();
                match self.engine.run_with_heartbeat(&lease, work).await {
                    Ok(ending) => ending,
                    Err(_) => {
                        tracing::error!(
                            "idem completer: a resume panicked; ending the key as outcome unknown"
                        );
                        Ending::Unknown
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "idem completer: the key's checkpoint is not readable as phases");
                Ending::Unknown
            }
        };
        match self.engine.settle(&lease, ending).await {
            Ok(_) => KeyResult::Ended,
            Err(e) => {
                tracing::warn!(error = %e, "idem completer: could not end a resumed key");
                KeyResult::Error { resumed: true }
            }
        }
    }
}

enum KeyResult {
    Skipped,
    Ended,
    Error { resumed: bool },
}
