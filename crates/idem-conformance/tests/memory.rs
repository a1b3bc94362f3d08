//! The conformance suite against `MemoryStore`.

use async_trait::async_trait;
use idem_conformance::{StoreFactory, Unavailable};
use idem_core::MemoryStore;

struct Memory;

#[async_trait]
impl StoreFactory for Memory {
    type Store = MemoryStore;
    fn name(&self) -> &'static str {
        "memory"
    }
    async fn open(&self) -> Result<MemoryStore, Unavailable> {
        Ok(MemoryStore::new())
    }
    async fn reopen(&self, store: &MemoryStore) -> Result<Option<MemoryStore>, Unavailable> {
        // Clones share the records: the closest a process-local store comes
        // to a second instance.
        Ok(Some(store.clone()))
    }
}

idem_conformance::conformance_main!(Memory);
