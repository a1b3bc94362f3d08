//! Shared helpers for idem's reliability and security tests (`tests/`).
//!
//! This crate holds no library code of its own: it is where the tests that
//! cross crates live (store faults through the engine and the HTTP layer,
//! zombie workers, bad input, corrupted data, tenant isolation).
