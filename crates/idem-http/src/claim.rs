//! The claim handed to the handler in the request extensions.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use idem_core::store::Store;
use idem_core::{
    CheckpointWriter, Clock, Engine, Error, IdempotencyKey, Lease, Outcome, Phases, RecordKey,
    Scope, Transition,
};

use crate::effect::NoEffectFlag;
use crate::stored::{HeaderFilter, Origin, StoredResponse};

/// What the claim needs from the engine, without its type parameters.
pub(crate) trait Prepare: CheckpointWriter {
    fn prepare_complete(&self, lease: &Lease, outcome: Outcome) -> Result<Transition, Error>;
}

impl<S: Store, C: Clock> Prepare for Engine<S, C> {
    fn prepare_complete(&self, lease: &Lease, outcome: Outcome) -> Result<Transition, Error> {
        Engine::prepare_complete(self, lease, outcome)
    }
}

/// The claim on the request's idempotency key, put in the request's
/// extensions by the layer (or middleware) for the handler to use.
///
/// With axum, take it as `Extension<IdempotencyClaim>` (or
/// `Option<Extension<IdempotencyClaim>>` on routes that may be called without
/// a key); with actix-web as `web::ReqData<IdempotencyClaim>`; with tonic
/// from `request.extensions()`. It is present exactly when the handler runs
/// under a fresh claim.
///
/// # Behavior
/// The main use is **completing the key inside the handler's own database
/// transaction**, so that the business write and the stored response commit
/// together (or not at all):
///
/// 1. do the business writes in a transaction;
/// 2. build the response's status, headers and body;
/// 3. [`prepare_response`](Self::prepare_response) them into a [`Transition`];
/// 4. apply it in the same transaction (`idem_sqlite`/`idem_postgres`
///    `apply_in`), commit;
/// 5. return exactly that status, headers and body.
///
/// The layer then finds the key already completed by this claim and does not
/// store the response again; retries replay what the handler prepared. If the
/// transaction rolls back, nothing was stored and the layer stores (or
/// releases) the response the handler returns, as for any handler.
///
/// The prepared outcome is encoded exactly as the layer encodes a response it
/// stores itself (same header filtering), so a replay is the same either way.
/// Headers added by layers between this one and the handler are in the
/// layer's own copy but not in the handler's: put such layers outside this
/// one, or add those headers in the handler.
///
/// ```no_run
/// use http::{HeaderMap, HeaderValue, StatusCode, header};
/// use idem_http::IdempotencyClaim;
///
/// async fn create_payment(
///     claim: IdempotencyClaim, // axum: Extension(claim): Extension<IdempotencyClaim>
/// ) -> Result<(StatusCode, HeaderMap, Vec<u8>), StatusCode> {
///     // let mut tx = pool.begin().await?;   … business writes in `tx` …
///     let body = br#"{"id":"pay_1"}"#.to_vec();
///     let mut headers = HeaderMap::new();
///     headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
///     let done = claim
///         .prepare_response(StatusCode::CREATED, &headers, &body)
///         .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
///     // store.apply_in(&mut tx, &done).await?;   // same transaction
///     // tx.commit().await?;
///     # let _ = done;
///     Ok((StatusCode::CREATED, headers, body))
/// }
/// ```
#[derive(Clone)]
pub struct IdempotencyClaim {
    lease: Lease,
    engine: Arc<dyn Prepare>,
    filter: Arc<HeaderFilter>,
    no_effect: NoEffectFlag,
    origin: Origin,
}

impl IdempotencyClaim {
    pub(crate) fn new(
        lease: Lease,
        engine: Arc<dyn Prepare>,
        filter: Arc<HeaderFilter>,
        no_effect: NoEffectFlag,
        origin: Origin,
    ) -> Self {
        Self {
            lease,
            engine,
            filter,
            no_effect,
            origin,
        }
    }

    /// Declares that this request took no effect (so far): if the handler
    /// then ends without a response the layer stores (an error, a panic, a
    /// 5xx, a body that fails mid-stream), the key is released and a retry
    /// runs the handler afresh, instead of finishing it as `outcome-unknown`.
    ///
    /// # Behavior
    /// Call it just before returning an error that you know happened before
    /// any effect; it cannot be undone, so do not call it and then start an
    /// effect. A response the layer stores is stored as usual. For a response,
    /// the [`NoEffect`](crate::NoEffect) extension says the same.
    pub fn declare_no_effect(&self) {
        self.no_effect.set();
    }

    /// Resolves when this request can no longer count on its key (see
    /// [`Lease::lost`]): taken over after its lease lapsed, ended by the
    /// engine's `max_hold` ceiling, or given up by a graceful shutdown.
    /// Work that has not started its effect should stop.
    pub async fn lost(&self) {
        self.lease.lost().await;
    }

    /// The client's idempotency key.
    pub fn key(&self) -> &IdempotencyKey {
        self.lease.key().key()
    }

    /// The scope the layer derived for this request.
    pub fn scope(&self) -> &Scope {
        self.lease.key().scope()
    }

    /// The store key of (scope, key).
    pub fn record_key(&self) -> &RecordKey {
        self.lease.key()
    }

    /// Which attempt this is: how many claims the key's record has had,
    /// this one included.
    ///
    /// # Behavior
    /// 1 for the first claim. One more for each claim made over the
    /// existing record: the takeover of an attempt whose lease lapsed (its
    /// process crashed, or lost the store for longer than the lease), and
    /// the retry of an attempt that ended in a retryable failure (a
    /// multi-step operation with a checkpoint, see [`phases`](Self::phases),
    /// or a handler's own `Engine::prepare_fail` with a retryable kind).
    /// A released key keeps no record ([`NoEffect`](crate::NoEffect),
    /// [`declare_no_effect`](Self::declare_no_effect), `release_on_cancel`),
    /// nor does an expired one, so their next request is attempt 1 again.
    /// Above 1, an earlier attempt may have taken effect in part: check for
    /// it (or resume after the recorded phases) before acting.
    pub fn attempt(&self) -> u32 {
        self.lease.attempt()
    }

    /// The phases of a multi-step operation under this claim (see
    /// [`Phases`] and docs/phases.md): on a retry that took over a crashed
    /// or failed attempt, the phases it recorded are not run again.
    ///
    /// # Behavior
    /// As [`Engine::phases`]. While the key has a checkpoint, an ending the
    /// layer would store as `outcome-unknown` (a 5xx, an error, a panic) is
    /// stored as a retryable failure instead, so that the next retry
    /// resumes after the recorded phases.
    pub fn phases(&self) -> Result<Phases, Error> {
        let writer: Arc<dyn CheckpointWriter> = self.engine.clone();
        Phases::new(writer, self.lease.clone())
    }

    /// The engine's lease (for `Engine::prepare_fail` and other direct uses).
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// Prepares the completion of the key with this response, for a store to
    /// apply inside the handler's database transaction.
    ///
    /// # Behavior
    /// Encodes `status`, `headers` (minus the hop-by-hop and denied ones,
    /// exactly as the layer would) and `body` as the stored response, then
    /// calls `Engine::prepare_complete`. Fails with
    /// [`Error::OutcomeTooLarge`] above the engine's `max_outcome_bytes`, and
    /// [`Error::LeaseLost`] if the lease is no longer held. Nothing is written
    /// until a store applies the [`Transition`].
    pub fn prepare_response(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<Transition, Error> {
        let stored = StoredResponse::new(
            status,
            headers,
            Bytes::copy_from_slice(body),
            None,
            &self.filter,
            Some(self.origin.clone()),
        );
        let outcome = stored.encode()?;
        self.engine.prepare_complete(&self.lease, outcome)
    }
}

impl IdempotencyClaim {
    /// Tells the layer that the handler applied `transition` (from
    /// [`prepare_response`](Self::prepare_response)) in its own transaction
    /// and the transaction committed.
    ///
    /// # Behavior
    /// The layer then neither stores the response again nor releases the
    /// key, and the heartbeat stops. Without this call the layer still finds
    /// the key completed by this holder and leaves it as is, at the cost of
    /// one or two more store round trips. See `Lease::mark_applied`.
    pub fn mark_applied(&self, transition: &Transition) -> Result<(), Error> {
        self.lease.mark_applied(transition)
    }
}

impl fmt::Debug for IdempotencyClaim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyClaim")
            .field("record", &self.lease.key().hex())
            .field("attempt", &self.lease.attempt())
            .finish_non_exhaustive()
    }
}
