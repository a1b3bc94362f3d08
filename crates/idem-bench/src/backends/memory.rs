//! [`MemoryStore`], against a mutex-guarded hash map as its raw baseline.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use bytes::Bytes;
use idem_core::store::Store;
use idem_core::{IdempotencyKey, MemoryStore, RecordKey, Scope, Timestamp};

use crate::BenchError;
use crate::backend::{Backend, Instance, Raw};

pub(crate) struct MemoryBackend;

#[async_trait]
impl Backend for MemoryBackend {
    fn name(&self) -> &'static str {
        "memory"
    }
    async fn open(&self) -> Result<Box<dyn Instance>, BenchError> {
        Ok(Box::new(MemoryInstance {
            store: MemoryStore::new(),
            raw: Arc::new(MemoryRaw::default()),
        }))
    }
}

struct MemoryInstance {
    store: MemoryStore,
    raw: Arc<MemoryRaw>,
}

/// The floor of an in-process store: one lock and one hash map operation.
#[derive(Default)]
struct MemoryRaw(Mutex<HashMap<[u8; 32], Bytes>>);

#[async_trait]
impl Raw for MemoryRaw {
    async fn claim(&self, key: &[u8; 32], value: &Bytes) -> Result<bool, BenchError> {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match map.entry(*key) {
            std::collections::hash_map::Entry::Occupied(_) => Ok(false),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(value.clone());
                Ok(true)
            }
        }
    }
    async fn complete(&self, key: &[u8; 32], value: &Bytes) -> Result<(), BenchError> {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        map.insert(*key, value.clone());
        Ok(())
    }
    async fn read(&self, key: &[u8; 32]) -> Result<Option<usize>, BenchError> {
        let map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(map.get(key).map(Bytes::len))
    }
    async fn fill(&self, n: u64, value: &Bytes) -> Result<(), BenchError> {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let base = map.len() as u64;
        for i in base..base + n {
            map.insert(*blake3::hash(&i.to_le_bytes()).as_bytes(), value.clone());
        }
        Ok(())
    }
    async fn data_bytes(&self) -> Result<Option<u64>, BenchError> {
        Ok(None)
    }
}

#[async_trait]
impl Instance for MemoryInstance {
    fn store(&self) -> Arc<dyn Store> {
        Arc::new(self.store.clone())
    }
    async fn raw(&self) -> Result<Arc<dyn Raw>, BenchError> {
        Ok(self.raw.clone())
    }
    async fn live_records(&self) -> Result<u64, BenchError> {
        Ok(self.store.len() as u64)
    }
    async fn clone_records(&self, template: &RecordKey, n: u64) -> Result<(), BenchError> {
        let now = Timestamp::EPOCH;
        let Some(record) = self
            .store
            .get(template, now)
            .await
            .map_err(|e| BenchError::Failed(e.to_string()))?
        else {
            return Err(BenchError::Failed("template record not found".into()));
        };
        let scope = Scope::tenant("idem-bench").with_operation("clone");
        let base = self.store.len() as u64;
        for i in 0..n {
            let key = IdempotencyKey::parse(&format!("clone-{}", base + i))
                .map_err(|e| BenchError::Failed(e.to_string()))?;
            self.store
                .insert_if_absent(&RecordKey::new(&scope, &key), &record, now)
                .await
                .map_err(|e| BenchError::Failed(e.to_string()))?;
        }
        Ok(())
    }
    async fn data_bytes(&self) -> Result<Option<u64>, BenchError> {
        Ok(None)
    }
    fn notes(&self) -> Vec<String> {
        vec!["raw baseline: one Mutex<HashMap> insert/replace/get per step".into()]
    }
    async fn close(self: Box<Self>) -> Result<(), BenchError> {
        Ok(())
    }
}
