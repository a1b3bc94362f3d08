//! The complete minimal example of docs/backend-authors.md, compiled and run
//! against the whole suite: everything below the marker is the example,
//! verbatim (tests/docs.rs checks that the guide shows exactly this code).
// --- example ---
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use idem_conformance::{StoreFactory, Unavailable};
use idem_core::store::{
    Capabilities, InsertOutcome, Revision, Store, StoreError, SwapOutcome, Versioned, codec,
};
use idem_core::{RecordKey, Timestamp};

/// The backend's name in errors.
const NAME: &str = "mini";

/// One stored row, laid out as a SQL table would be: the expiry and the
/// revision in their own columns (so the store can compare them without
/// decoding), the record as one encoded blob.
struct Row {
    expires_at: Timestamp,
    revision: Revision,
    blob: Vec<u8>,
}

/// A minimal idem store: rows in a map under one lock. Clones share the rows.
#[derive(Clone, Default)]
pub struct MiniStore {
    rows: Arc<Mutex<HashMap<[u8; 32], Row>>>,
}

impl MiniStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn rows(&self) -> MutexGuard<'_, HashMap<[u8; 32], Row>> {
        // Every write is a single `insert`/`remove`: a panic elsewhere cannot
        // leave a half-written row, so a poisoned lock is still sound.
        self.rows.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Overwrites the blob stored under `key`, bypassing the codec (for the
    /// suite's corrupt-record case). Returns whether a row was there.
    pub fn overwrite_blob(&self, key: &RecordKey, blob: Vec<u8>) -> bool {
        match self.rows().get_mut(key.digest()) {
            Some(row) => {
                row.blob = blob;
                true
            }
            None => false,
        }
    }
}

/// Encodes a record into a row (before taking the lock).
fn encode(v: &Versioned) -> Result<Row, StoreError> {
    let blob = codec::encode_record(&v.record).map_err(|e| StoreError::Rejected {
        store: NAME,
        source: Box::new(e),
    })?;
    Ok(Row {
        expires_at: v.record.expires_at,
        revision: v.revision,
        blob,
    })
}

/// Decodes a row; undecodable bytes are `Corrupt`, never "absent".
fn decode(row: &Row) -> Result<Versioned, StoreError> {
    let record = codec::decode_record(&row.blob).map_err(|e| StoreError::corrupt(NAME, e))?;
    Ok(Versioned {
        revision: row.revision,
        record,
    })
}

/// The live row under `key`: a row with `expires_at <= now` is as good as
/// absent, whether or not it is still physically there.
fn live<'a>(rows: &'a HashMap<[u8; 32], Row>, key: &RecordKey, now: Timestamp) -> Option<&'a Row> {
    rows.get(key.digest()).filter(|row| row.expires_at > now)
}

#[async_trait]
impl Store for MiniStore {
    fn capabilities(&self) -> Capabilities {
        // No native expiry: `purge_expired` removes expired rows.
        Capabilities::new()
    }

    async fn insert_if_absent(
        &self,
        key: &RecordKey,
        record: &Versioned,
        now: Timestamp,
    ) -> Result<InsertOutcome, StoreError> {
        let new = encode(record)?;
        // Check and write under one lock: the primitive is atomic.
        let mut rows = self.rows();
        if let Some(existing) = live(&rows, key, now) {
            return Ok(InsertOutcome::Exists(decode(existing)?));
        }
        rows.insert(*key.digest(), new); // replaces an expired row, if any
        Ok(InsertOutcome::Inserted)
    }

    async fn get(&self, key: &RecordKey, now: Timestamp) -> Result<Option<Versioned>, StoreError> {
        live(&self.rows(), key, now).map(decode).transpose()
    }

    async fn compare_and_swap(
        &self,
        key: &RecordKey,
        expected: &Versioned,
        record: &Versioned,
        now: Timestamp,
    ) -> Result<SwapOutcome, StoreError> {
        let new = encode(record)?;
        let mut rows = self.rows();
        match live(&rows, key, now) {
            Some(current) if current.revision == expected.revision => {
                rows.insert(*key.digest(), new);
                Ok(SwapOutcome::Swapped)
            }
            Some(current) => Ok(SwapOutcome::Conflict(Some(decode(current)?))),
            None => Ok(SwapOutcome::Conflict(None)), // never an upsert
        }
    }

    async fn delete_if(
        &self,
        key: &RecordKey,
        expected: &Versioned,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let mut rows = self.rows();
        match live(&rows, key, now) {
            Some(current) if current.revision == expected.revision => {
                rows.remove(key.digest());
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn purge_expired(&self, now: Timestamp, limit: usize) -> Result<u64, StoreError> {
        let mut rows = self.rows();
        let expired: Vec<[u8; 32]> = rows
            .iter()
            .filter(|(_, row)| row.expires_at <= now)
            .map(|(key, _)| *key)
            .take(limit)
            .collect();
        for key in &expired {
            rows.remove(key);
        }
        Ok(expired.len() as u64)
    }
}

/// Hands the suite a fresh, isolated store per case.
struct MiniFactory;

#[async_trait]
impl StoreFactory for MiniFactory {
    type Store = MiniStore;

    fn name(&self) -> &'static str {
        "mini"
    }

    async fn open(&self) -> Result<MiniStore, Unavailable> {
        // A network backend connects here (through one pool, created on the
        // first call and cached in the factory: every case runs on the same
        // runtime), with its own key prefix or schema per store, and returns
        // `Unavailable` (naming the env var to set) when the server cannot be
        // reached. Drop that prefix or schema in `teardown`.
        Ok(MiniStore::new())
    }

    async fn reopen(&self, store: &MiniStore) -> Result<Option<MiniStore>, Unavailable> {
        // A second instance over the same rows (for a network backend: a new
        // pool over the same prefix or schema).
        Ok(Some(store.clone()))
    }

    fn can_corrupt(&self) -> bool {
        true
    }

    async fn corrupt(&self, store: &MiniStore, key: &RecordKey) -> Result<(), Unavailable> {
        store.overwrite_blob(key, vec![0xff, 0x00, 0x13]);
        Ok(())
    }
}

idem_conformance::conformance_main!(MiniFactory);
