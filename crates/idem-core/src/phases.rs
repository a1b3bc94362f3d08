//! Multi-step operations: [`Phases`] runs an operation as named phases,
//! each recorded in the key's checkpoint once it took effect, so that a
//! later holder (a client's retry after a crash, or the
//! [`Completer`](crate::Completer)) resumes after the last recorded phase
//! instead of starting over.
//!
//! The guide is docs/phases.md.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::store::codec;
use crate::store::{Checkpoint, Store};
use crate::{Clock, Engine, Error, Lease, RecordKey, Timestamp, Transition};

/// A boxed future borrowing its inputs (the object-safe form of
/// [`CheckpointWriter::checkpoint`]).
pub type WriteFuture<'a> = Pin<Box<dyn Future<Output = Result<Checkpoint, Error>> + Send + 'a>>;

/// What [`Phases`] needs from an engine, without its type parameters
/// (implemented by every [`Engine`]; integrations hold it as
/// `Arc<dyn CheckpointWriter>`).
pub trait CheckpointWriter: Send + Sync + 'static {
    /// [`Engine::checkpoint`].
    fn checkpoint<'a>(&'a self, lease: &'a Lease, step: &'a str, state: Bytes) -> WriteFuture<'a>;
    /// [`Engine::prepare_checkpoint`].
    fn prepare_checkpoint(
        &self,
        lease: &Lease,
        step: &str,
        state: Bytes,
    ) -> Result<Transition, Error>;
}

impl<S: Store, C: Clock> CheckpointWriter for Engine<S, C> {
    fn checkpoint<'a>(&'a self, lease: &'a Lease, step: &'a str, state: Bytes) -> WriteFuture<'a> {
        Box::pin(Engine::checkpoint(self, lease, step, state))
    }
    fn prepare_checkpoint(
        &self,
        lease: &Lease,
        step: &str,
        state: Bytes,
    ) -> Result<Transition, Error> {
        Engine::prepare_checkpoint(self, lease, step, state)
    }
}

/// The idempotency key a phase sends downstream: derived from the record
/// key, the record's creation time and the phase's name only, so every
/// attempt of the operation (every holder, before and after a crash) sends
/// the same key to the provider.
///
/// # Behavior
/// - `idem-` followed by 32 lowercase hex digits of a BLAKE3 hash of the
///   record key's digest, `created_at` and the phase name: 37 ASCII
///   characters, a valid `Idempotency-Key` for any provider that accepts 40.
/// - Different keys, scopes or phase names give different keys.
/// - `created_at` ([`Record::created_at`](crate::store::Record::created_at))
///   is kept by every takeover and retry of a record, and is new when a key
///   is used again after its record expired: a new operation under a reused
///   key never meets the provider's answer to the old one.
pub fn downstream_key(key: &RecordKey, created_at: Timestamp, phase: &str) -> String {
    let mut hasher = blake3::Hasher::new_derive_key("idem 2026 downstream idempotency key");
    hasher.update(key.digest());
    hasher.update(&created_at.as_millis().to_be_bytes());
    hasher.update(phase.as_bytes());
    let hash = hasher.finalize();
    let hex = hash.to_hex();
    format!("idem-{}", &hex[..32])
}

/// Why a phase did not produce its result.
#[non_exhaustive]
pub enum PhaseError<E> {
    /// The phase's own work failed; nothing was recorded for it.
    Failed {
        /// The phase's name.
        phase: String,
        /// The work's error.
        source: E,
    },
    /// The phase's result could not be recorded or read back (lease lost,
    /// store error, codec error). For an external phase the effect may have
    /// happened: whoever resumes calls it again with the same downstream
    /// key.
    Idem(Error),
}

impl<E> From<Error> for PhaseError<E> {
    fn from(e: Error) -> Self {
        Self::Idem(e)
    }
}

impl<E: fmt::Debug> fmt::Debug for PhaseError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Failed { phase, source } => f
                .debug_struct("Failed")
                .field("phase", phase)
                .field("source", source)
                .finish(),
            Self::Idem(e) => f.debug_tuple("Idem").field(e).finish(),
        }
    }
}

impl<E: fmt::Display> fmt::Display for PhaseError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Failed { phase, source } => write!(f, "phase `{phase}` failed: {source}"),
            Self::Idem(e) => write!(f, "the phase's progress could not be recorded: {e}"),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for PhaseError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Failed { source, .. } => Some(source),
            Self::Idem(e) => Some(e),
        }
    }
}

/// The results of the phases recorded so far, as kept in the checkpoint's
/// state.
type Recorded = BTreeMap<String, serde_bytes::ByteBuf>;

/// An operation run as named phases under one claim.
///
/// # Behavior
/// - Built from a [`Lease`] ([`Engine::phases`]); a lease that took over a
///   lapsed claim or a retryable failure starts with the phases its
///   predecessors recorded.
/// - [`external`](Self::external) runs a phase's work unless its result is
///   already recorded, then records the result (one fenced checkpoint);
///   the work receives the phase's [`downstream_key`], the same on every
///   attempt. Use it for calls to providers that honour an idempotency key,
///   and for local writes made idempotent by that key (a unique constraint)
///   where no transaction is shared with the store (Redis).
/// - [`prepare_local`](Self::prepare_local) / [`applied`](Self::applied)
///   record a phase inside the caller's database transaction (SQLite,
///   PostgreSQL `apply_in`): the phase's writes and its record commit
///   together, so a phase committed is never run again and a phase rolled
///   back left nothing.
/// - Results are serialized with the store codec (bincode); a phase's
///   result type must stay decodable by later versions of the code while
///   keys live.
/// - Phases run one at a time: each record starts from the results known
///   to this value. A clone is for moving into a transaction closure
///   ([`prepare_local`](Self::prepare_local)), not for running phases
///   concurrently (two clones recording at once would each drop the
///   other's result from the checkpoint, and the dropped phase would run
///   again on resume).
/// - The final result is stored as usual (complete the lease, or return the
///   response through `idem-tower`).
/// - Once a phase started under the claim (or its record has a
///   checkpoint), an ambiguous ending (outcome unknown, release) is stored
///   as a retryable failure instead, keeping the record and its checkpoint:
///   the next holder resumes with the same downstream keys (see
///   docs/phases.md).
pub struct Phases {
    writer: Arc<dyn CheckpointWriter>,
    lease: Lease,
    recorded: Recorded,
    resumed_from: Option<String>,
}

impl Clone for Phases {
    /// A copy sharing the claim (for a transaction closure that must own
    /// what it uses: call [`prepare_local`](Self::prepare_local) on it, and
    /// [`applied`](Self::applied) on the original after the commit).
    fn clone(&self) -> Self {
        Self {
            writer: Arc::clone(&self.writer),
            lease: self.lease.clone(),
            recorded: self.recorded.clone(),
            resumed_from: self.resumed_from.clone(),
        }
    }
}

impl fmt::Debug for Phases {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Phases")
            .field("key", self.lease.key())
            .field("recorded", &self.recorded.keys().collect::<Vec<_>>())
            .field("resumed_from", &self.resumed_from)
            .finish_non_exhaustive()
    }
}

impl<S: Store, C: Clock> Engine<S, C> {
    /// The phases of the operation `lease` holds; see [`Phases`].
    ///
    /// # Behavior
    /// [`Error::Codec`] if the record's checkpoint was not written by
    /// [`Phases`] (a raw [`checkpoint`](Self::checkpoint) with other
    /// state).
    pub fn phases(&self, lease: &Lease) -> Result<Phases, Error> {
        Phases::new(Arc::new(self.clone()), lease.clone())
    }
}

impl Phases {
    /// The phases of `lease`, recorded through `writer`.
    ///
    /// # Behavior
    /// As [`Engine::phases`].
    pub fn new(writer: Arc<dyn CheckpointWriter>, lease: Lease) -> Result<Self, Error> {
        let checkpoint = lease.checkpoint();
        let recorded = match &checkpoint {
            Some(c) => codec::decode::<Recorded>(&c.state)?,
            None => Recorded::new(),
        };
        Ok(Self {
            writer,
            lease,
            recorded,
            resumed_from: checkpoint.map(|c| c.step),
        })
    }

    /// The claim the phases run under.
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// The last phase recorded before this claim began (by a holder that
    /// crashed, stalled or failed retryably), if any.
    pub fn resumed_from(&self) -> Option<&str> {
        self.resumed_from.as_deref()
    }

    /// Whether `phase` has its result recorded.
    pub fn is_recorded(&self, phase: &str) -> bool {
        self.recorded.contains_key(phase)
    }

    /// The phase's downstream idempotency key ([`downstream_key`] of this
    /// record).
    pub fn downstream_key(&self, phase: &str) -> String {
        downstream_key(
            self.lease.key(),
            self.lease.record().record.created_at,
            phase,
        )
    }

    /// The recorded result of `phase`, if it ran.
    ///
    /// # Behavior
    /// [`Error::Codec`] if the recorded bytes are not a `T`.
    pub fn result<T: DeserializeOwned>(&self, phase: &str) -> Result<Option<T>, Error> {
        self.recorded
            .get(phase)
            .map(|bytes| codec::decode::<T>(bytes))
            .transpose()
            .map_err(Error::from)
    }

    /// Runs `work` with the phase's downstream key unless the phase's result
    /// is recorded, records the result, and returns it.
    ///
    /// # Behavior
    /// - Recorded already (this claim or a predecessor): returns the
    ///   recorded result; `work` is not called.
    /// - `work` fails: [`PhaseError::Failed`]; nothing is recorded (a
    ///   resumed attempt calls it again, with the same key).
    /// - The result cannot be recorded: [`PhaseError::Idem`] (for example
    ///   [`Error::LeaseLost`]: another holder took over and will call the
    ///   phase again with the same downstream key).
    pub async fn external<T, E, F, Fut>(&mut self, phase: &str, work: F) -> Result<T, PhaseError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce(String) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        if let Some(done) = self.result::<T>(phase)? {
            return Ok(done);
        }
        self.lease.mark_phase_started();
        let value =
            work(self.downstream_key(phase))
                .await
                .map_err(|source| PhaseError::Failed {
                    phase: phase.to_string(),
                    source,
                })?;
        let state = self.state_with(phase, &value)?;
        let written = self.writer.checkpoint(&self.lease, phase, state).await?;
        self.recorded = codec::decode::<Recorded>(&written.state).map_err(Error::from)?;
        Ok(value)
    }

    /// Prepares the record of `phase` with its result `value`, for a store
    /// to apply inside the caller's transaction together with the phase's
    /// own writes (`idem_sqlite::SqliteStore::apply_in`,
    /// `idem_postgres::PostgresStore::apply_in`); after the commit, call
    /// [`applied`](Self::applied).
    ///
    /// # Behavior
    /// - Fenced like any holder's write: applied after the lease was taken
    ///   over, the store refuses it with [`Error::LeaseLost`] and the
    ///   transaction must roll back.
    /// - Check [`result`](Self::result) first: a recorded phase must not run
    ///   again.
    pub fn prepare_local<T: Serialize>(&self, phase: &str, value: &T) -> Result<Transition, Error> {
        self.lease.mark_phase_started();
        let state = self.state_with(phase, value)?;
        self.writer.prepare_checkpoint(&self.lease, phase, state)
    }

    /// Records that `transition` (from [`prepare_local`](Self::prepare_local))
    /// committed.
    ///
    /// # Behavior
    /// As [`Lease::mark_applied`]; then the phase counts as recorded.
    pub fn applied(&mut self, transition: &Transition) -> Result<(), Error> {
        self.lease.mark_applied(transition)?;
        if let Some(c) = &transition.next.record.checkpoint {
            self.recorded = codec::decode::<Recorded>(&c.state)?;
        }
        Ok(())
    }

    fn state_with<T: Serialize>(&self, phase: &str, value: &T) -> Result<Bytes, Error> {
        let mut recorded = self.recorded.clone();
        recorded.insert(
            phase.to_string(),
            serde_bytes::ByteBuf::from(codec::encode(value)?),
        );
        Ok(Bytes::from(codec::encode(&recorded)?))
    }
}
