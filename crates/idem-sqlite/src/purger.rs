//! The optional background purger.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use idem_core::Clock;
use idem_core::store::Store;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::{SqliteError, SqliteStore};

/// The handle of a background purger started by
/// [`SqliteStore::spawn_purger`].
///
/// # Behavior
/// The task runs until [`stop`](Self::stop) is called or the handle is
/// dropped; it holds a clone of the store meanwhile.
#[derive(Debug)]
pub struct Purger {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    purged: Arc<AtomicU64>,
    rounds: Arc<AtomicU64>,
}

impl Purger {
    /// How many records it deleted so far.
    pub fn purged(&self) -> u64 {
        self.purged.load(Ordering::Acquire)
    }

    /// How many rounds it finished so far (a round purges until less than a
    /// batch is left, or until an error).
    pub fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::Acquire)
    }

    /// Stops the task and waits for it to finish its current batch.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Purger {
    fn drop(&mut self) {
        // Dropping the sender wakes the task, which then stops.
        self.stop.take();
    }
}

pub(crate) fn spawn<C: Clock>(
    store: SqliteStore,
    clock: C,
    every: Duration,
    batch: usize,
) -> Result<Purger, SqliteError> {
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| SqliteError::NoRuntime)?;
    let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
    let purged = Arc::new(AtomicU64::new(0));
    let rounds = Arc::new(AtomicU64::new(0));
    let batch = batch.max(1);
    let (count, done) = (purged.clone(), rounds.clone());
    let task = runtime.spawn(async move {
        loop {
            tokio::select! {
                _ = &mut stop_rx => break,
                () = clock.sleep(every) => {}
            }
            loop {
                match store.purge_expired(clock.now(), batch).await {
                    Ok(n) => {
                        count.fetch_add(n, Ordering::AcqRel);
                        if n < batch as u64 {
                            break;
                        }
                        tokio::task::yield_now().await;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "idem-sqlite: purge failed; retrying next round");
                        break;
                    }
                }
            }
            done.fetch_add(1, Ordering::AcqRel);
        }
    });
    Ok(Purger {
        stop: Some(stop_tx),
        task: Some(task),
        purged,
        rounds,
    })
}
