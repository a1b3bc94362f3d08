//! Beginning a key without leaving an orphan claim: [`begin`] runs
//! `Engine::begin_key` to its end even when the request is dropped while the
//! store writes the claim.
//!
//! Without it, a client that gives up (or a connection that is cut) while
//! the claim is in flight to the store leaves a claim that nobody holds: the
//! handler never runs, and every retry gets `409` until the lease lapses
//! (60 s by default). With it, the rest of the `begin` runs in a task of its
//! own, and a claim it makes for a request that is gone is released at once
//! (nothing ran), so the next retry runs afresh.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use idem_core::store::Store;
use idem_core::{Begin, Clock, Engine, Error, Fingerprint, RecordKey};

type BeginFuture = Pin<Box<dyn Future<Output = Result<Begin, Error>> + Send>>;

/// `engine.begin_key(key, fingerprint)`, finished and released in the
/// background if the returned future is dropped before it completes.
pub(crate) fn begin<S: Store, C: Clock>(
    engine: &Arc<Engine<S, C>>,
    key: RecordKey,
    fingerprint: Fingerprint,
) -> Detached<S, C> {
    let owned = engine.clone();
    Detached {
        pending: Some(Box::pin(
            async move { owned.begin_key(key, fingerprint).await },
        )),
        engine: engine.clone(),
    }
}

/// See [`begin`].
pub(crate) struct Detached<S: Store, C: Clock> {
    pending: Option<BeginFuture>,
    engine: Arc<Engine<S, C>>,
}

impl<S: Store, C: Clock> Future for Detached<S, C> {
    type Output = Result<Begin, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let Some(pending) = this.pending.as_mut() else {
            // Polled after it completed: a caller bug, answered as
            // contention (the client retries) rather than a panic.
            return Poll::Ready(Err(Error::Contention));
        };
        let result = std::task::ready!(pending.as_mut().poll(cx));
        this.pending = None;
        Poll::Ready(result)
    }
}

impl<S: Store, C: Clock> Drop for Detached<S, C> {
    fn drop(&mut self) {
        let Some(pending) = self.pending.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(
                "idem: a request was dropped while claiming its key and no runtime is left; the claim, if made, lapses with its lease"
            );
            return;
        };
        let engine = self.engine.clone();
        runtime.spawn(async move {
            if let Ok(Begin::Proceed(lease)) = pending.await {
                tracing::debug!(key = ?lease.key(), "idem: the request was dropped while claiming its key; releasing the claim (nothing ran)");
                if let Err(e) = engine.release(&lease).await {
                    tracing::warn!(error = %e, "idem: could not release the claim of a dropped request; it lapses with its lease");
                }
            }
        });
    }
}
