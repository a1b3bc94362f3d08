//! [`MemoryStore`]: records in a map, for tests, examples and single-process services.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;

use crate::store::{
    Capabilities, Census, CensusSupport, Coverage, InsertOutcome, State, Store, StoreError,
    SwapOutcome, Versioned, is_abandoned,
};
use crate::{RecordKey, Timestamp};

/// An in-memory [`Store`](crate::store::Store).
///
/// # Behavior
/// Keeps the full store contract within one process: each primitive runs
/// under one lock, so concurrent calls on a key are linearizable. Clones share
/// the same records. Nothing survives the process; expired records are removed
/// by [`purge_expired`](Store::purge_expired) (or replaced when their key is
/// claimed again).
///
/// ```
/// use idem_core::{Engine, Executed, Fingerprint, IdempotencyKey, MemoryStore, Scope};
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idem_core::Error> {
/// let engine = Engine::new(MemoryStore::new());
/// let scope = Scope::tenant("acme");
/// let key = IdempotencyKey::parse("order-42")?;
/// let request = Fingerprint::of(b"create order 42");
/// let first = engine.execute(&scope, &key, request, || async { 42_u64 }).await?;
/// let again = engine.execute(&scope, &key, request, || async { 0_u64 }).await?;
/// assert_eq!(first, Executed::Fresh(42));
/// assert_eq!(again, Executed::Replayed(42));
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, Default)]
pub struct MemoryStore {
    records: Arc<Mutex<HashMap<[u8; 32], Versioned>>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many records are held, expired ones included.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no record is held.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<[u8; 32], Versioned>> {
        // A panic while holding the lock cannot leave a half-written record
        // (every write is one `insert`/`remove`), so a poisoned map is sound.
        self.records.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn live(entry: Option<&Versioned>, now: Timestamp) -> Option<&Versioned> {
    entry.filter(|v| !v.record.is_expired(now))
}

#[async_trait]
impl Store for MemoryStore {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new()
            .with_census(CensusSupport::Exact)
            .with_abandoned(true)
    }

    async fn insert_if_absent(
        &self,
        key: &RecordKey,
        record: &Versioned,
        now: Timestamp,
    ) -> Result<InsertOutcome, StoreError> {
        let mut records = self.lock();
        if let Some(existing) = live(records.get(key.digest()), now) {
            return Ok(InsertOutcome::Exists(existing.clone()));
        }
        records.insert(*key.digest(), record.clone());
        Ok(InsertOutcome::Inserted)
    }

    async fn get(&self, key: &RecordKey, now: Timestamp) -> Result<Option<Versioned>, StoreError> {
        Ok(live(self.lock().get(key.digest()), now).cloned())
    }

    async fn compare_and_swap(
        &self,
        key: &RecordKey,
        expected: &Versioned,
        record: &Versioned,
        now: Timestamp,
    ) -> Result<SwapOutcome, StoreError> {
        let mut records = self.lock();
        match live(records.get(key.digest()), now) {
            Some(current) if current.revision == expected.revision => {
                records.insert(*key.digest(), record.clone());
                Ok(SwapOutcome::Swapped)
            }
            current => Ok(SwapOutcome::Conflict(current.cloned())),
        }
    }

    async fn delete_if(
        &self,
        key: &RecordKey,
        expected: &Versioned,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let mut records = self.lock();
        match live(records.get(key.digest()), now) {
            Some(current) if current.revision == expected.revision => {
                records.remove(key.digest());
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn purge_expired(&self, now: Timestamp, limit: usize) -> Result<u64, StoreError> {
        let mut records = self.lock();
        let expired: Vec<[u8; 32]> = records
            .iter()
            .filter(|(_, v)| v.record.is_expired(now))
            .map(|(k, _)| *k)
            .take(limit)
            .collect();
        for key in &expired {
            records.remove(key);
        }
        Ok(expired.len() as u64)
    }

    async fn census(&self, now: Timestamp, _sample: usize) -> Result<Census, StoreError> {
        let mut census = Census::new(Coverage::Exact);
        for versioned in self.lock().values() {
            census.tally(&versioned.record, now);
        }
        Ok(census)
    }

    async fn abandoned(&self, now: Timestamp, limit: usize) -> Result<Vec<Versioned>, StoreError> {
        let mut found: Vec<Versioned> = self
            .lock()
            .values()
            .filter(|v| is_abandoned(&v.record, now))
            .cloned()
            .collect();
        found.sort_by_key(|v| match v.record.state {
            State::InFlight { lease_deadline, .. } => lease_deadline,
            _ => v.record.expires_at,
        });
        found.truncate(limit);
        Ok(found)
    }
}
