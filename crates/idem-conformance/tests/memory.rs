//! The conformance suite against `MemoryStore`.

idem_conformance::conformance_main!(idem_conformance::MemoryFactory);
