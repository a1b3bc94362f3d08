//! Request fingerprints: what a key's first request looked like.

use std::fmt;
use std::sync::LazyLock;

use blake3::hazmat::HasherExt as _;
use serde::{Deserialize, Serialize};

/// The blake3 context string of fingerprint version 1 (see [`Fingerprint`]).
pub const FINGERPRINT_CONTEXT: &str = "idem 2026-11 request fingerprint v1";

/// The blake3 context key of [`FINGERPRINT_CONTEXT`], derived once.
static CONTEXT_KEY: LazyLock<blake3::hazmat::ContextKey> =
    LazyLock::new(|| blake3::hazmat::hash_derive_key_context(FINGERPRINT_CONTEXT));

/// A 32-byte digest of the request a key protects.
///
/// A retry with the same key must carry the same request: a different
/// fingerprint under a live key is a mismatch (HTTP 422), never a replay.
///
/// # Behavior
/// The digest is stable across versions of this library. It is blake3 in
/// key-derivation mode with the context [`FINGERPRINT_CONTEXT`], over the
/// fields in the order they were added:
///
/// ```text
/// field(name, value) = u32 big-endian len(name) ‖ name ‖ u64 big-endian len(value) ‖ value
/// digest = blake3::derive_key(FINGERPRINT_CONTEXT, field₁ ‖ field₂ ‖ …)
/// ```
///
/// Names and values are length-prefixed, so moving bytes from one field to the
/// next, or renaming a field, changes the digest. The integration chooses the
/// fields: `idem-tower` uses `method`, `target` (path and query), then each
/// selected header as `header:NAME`, then `body`.
///
/// ```
/// use idem_core::Fingerprint;
/// let a = Fingerprint::builder().field("method", b"POST").field("body", b"{}").finish();
/// let b = Fingerprint::builder().field("method", b"POST").field("body", b"{ }").finish();
/// assert_ne!(a, b);
/// assert_eq!(a, Fingerprint::builder().field("method", b"POST").field("body", b"{}").finish());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// Starts a fingerprint of several named fields.
    pub fn builder() -> FingerprintBuilder {
        // The same hasher as `Hasher::new_derive_key(FINGERPRINT_CONTEXT)`,
        // without hashing the context string again for every request.
        FingerprintBuilder(blake3::Hasher::new_from_context_key(&CONTEXT_KEY))
    }

    /// The fingerprint of one opaque value: the same as
    /// `Fingerprint::builder().field("value", bytes).finish()`.
    pub fn of(bytes: &[u8]) -> Self {
        Self::builder().field("value", bytes).finish()
    }

    /// Wraps a digest read back from a store.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The 32 digest bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint(")?;
        for byte in &self.0[..8] {
            write!(f, "{byte:02x}")?;
        }
        write!(f, "…)")
    }
}

/// Accumulates the fields of a [`Fingerprint`]; see its `# Behavior`.
#[derive(Clone, Debug)]
pub struct FingerprintBuilder(blake3::Hasher);

impl FingerprintBuilder {
    /// Adds one named field.
    #[must_use]
    pub fn field(mut self, name: &str, value: &[u8]) -> Self {
        self.add(name, value);
        self
    }

    /// Adds one named field, in place.
    pub fn add(&mut self, name: &str, value: &[u8]) -> &mut Self {
        let name_len = u32::try_from(name.len()).unwrap_or(u32::MAX);
        let value_len = u64::try_from(value.len()).unwrap_or(u64::MAX);
        self.0.update(&name_len.to_be_bytes());
        self.0.update(name.as_bytes());
        self.0.update(&value_len.to_be_bytes());
        self.0.update(value);
        self
    }

    /// The digest of the fields added so far.
    pub fn finish(&self) -> Fingerprint {
        Fingerprint(*self.0.finalize().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Freezes the byte layout: if this digest changes, stored records stop
    /// matching their retries after an upgrade.
    #[test]
    fn layout_is_stable() {
        let fp = Fingerprint::builder()
            .field("method", b"POST")
            .field("body", b"{\"amount\":100}")
            .finish();
        let mut manual = Vec::new();
        for (name, value) in [("method", &b"POST"[..]), ("body", b"{\"amount\":100}")] {
            manual.extend_from_slice(&(name.len() as u32).to_be_bytes());
            manual.extend_from_slice(name.as_bytes());
            manual.extend_from_slice(&(value.len() as u64).to_be_bytes());
            manual.extend_from_slice(value);
        }
        assert_eq!(
            fp.as_bytes(),
            &blake3::derive_key(FINGERPRINT_CONTEXT, &manual)
        );
    }

    #[test]
    fn moving_bytes_between_fields_changes_the_digest() {
        let a = Fingerprint::builder()
            .field("a", b"xy")
            .field("b", b"")
            .finish();
        let b = Fingerprint::builder()
            .field("a", b"x")
            .field("b", b"y")
            .finish();
        assert_ne!(a, b);
    }
}
