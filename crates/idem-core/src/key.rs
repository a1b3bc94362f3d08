//! Idempotency keys, scopes, and the canonical storage key derived from both.
//!
//! A client sends an [`IdempotencyKey`]; the server decides the [`Scope`] it
//! belongs to (tenant, principal, operation). The pair is one logical
//! operation, identified in every store by its [`RecordKey`].

use std::fmt;

use serde::{Deserialize, Serialize};

/// The longest key accepted, in bytes (the limit of the best-known payment APIs).
pub const MAX_KEY_LEN: usize = 255;

/// Why a string was refused as an [`IdempotencyKey`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The key was empty.
    #[error("idempotency key is empty")]
    Empty,
    /// The key was longer than [`MAX_KEY_LEN`] bytes.
    #[error("idempotency key is {len} bytes long; at most {max} are allowed", max = MAX_KEY_LEN)]
    TooLong {
        /// The length of the refused key, in bytes.
        len: usize,
    },
    /// The key held a byte outside visible ASCII (`0x21..=0x7E`).
    #[error(
        "idempotency key has a byte 0x{byte:02x} at position {position}; only visible ASCII (0x21-0x7E) is allowed"
    )]
    InvalidByte {
        /// Zero-based byte offset of the first refused byte.
        position: usize,
        /// The refused byte.
        byte: u8,
    },
}

/// A client-chosen idempotency key.
///
/// # Behavior
/// - Accepted: 1 to [`MAX_KEY_LEN`] bytes, each visible ASCII (`0x21..=0x7E`):
///   UUIDs, ULIDs and the tokens widely used SDKs send all qualify.
/// - Refused, with a [`KeyError`] naming the rule broken: empty keys, longer
///   keys, spaces, control characters and any non-ASCII byte.
/// - Keys are compared byte for byte: `ABC` and `abc` are different keys.
///
/// ```
/// use idem_core::IdempotencyKey;
/// let key = IdempotencyKey::parse("8e03978e-40d5-43e8-bc93-6894a57f9324")?;
/// assert_eq!(key.as_str().len(), 36);
/// assert!(IdempotencyKey::parse("").is_err());
/// assert!(IdempotencyKey::parse("has space").is_err());
/// # Ok::<(), idem_core::KeyError>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct IdempotencyKey(Box<str>);

impl IdempotencyKey {
    /// Validates `raw` and wraps it as a key.
    pub fn parse(raw: &str) -> Result<Self, KeyError> {
        Self::parse_bytes(raw.as_bytes())
    }

    /// Validates raw bytes (for example an HTTP header value) and wraps them as a key.
    pub fn parse_bytes(raw: &[u8]) -> Result<Self, KeyError> {
        if raw.is_empty() {
            return Err(KeyError::Empty);
        }
        if raw.len() > MAX_KEY_LEN {
            return Err(KeyError::TooLong { len: raw.len() });
        }
        if let Some(position) = raw.iter().position(|b| !(0x21..=0x7e).contains(b)) {
            return Err(KeyError::InvalidByte {
                position,
                byte: raw[position],
            });
        }
        // Every byte is ASCII, so this conversion cannot fail; map the
        // impossible error rather than unwrap it.
        let text = std::str::from_utf8(raw).map_err(|e| KeyError::InvalidByte {
            position: e.valid_up_to(),
            byte: raw.get(e.valid_up_to()).copied().unwrap_or_default(),
        })?;
        Ok(Self(text.into()))
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for IdempotencyKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        Self::parse(&raw).map_err(serde::de::Error::custom)
    }
}

impl std::str::FromStr for IdempotencyKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        Self::parse(s)
    }
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdempotencyKey({:?})", self.0)
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Who an idempotency key belongs to: the same key sent by two scopes is two
/// different operations.
///
/// # Behavior
/// - A scope has a tenant and, optionally, a principal (user, API key) and an
///   operation name. Each part is any UTF-8 string, separators included: no
///   choice of parts can make two different scopes look alike, because the
///   [`RecordKey`] encodes each part with its length.
/// - A part that is absent differs from a part that is present but empty.
/// - Choose operation names as stable string literals (`"payments.create"`),
///   never from type or function names: renaming code must not change them,
///   or every stored key silently stops matching.
///
/// ```
/// use idem_core::Scope;
/// let a = Scope::tenant("acme").with_principal("user-1").with_operation("payments.create");
/// let b = Scope::tenant("globex").with_principal("user-1").with_operation("payments.create");
/// assert_ne!(a, b);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Scope {
    tenant: String,
    principal: Option<String>,
    operation: Option<String>,
}

impl Scope {
    /// A scope owned by `tenant`, with no principal and no operation.
    pub fn tenant(tenant: impl Into<String>) -> Self {
        Self {
            tenant: tenant.into(),
            principal: None,
            operation: None,
        }
    }

    /// One scope shared by every caller: only for services with a single
    /// client. Keys from different clients would collide in it.
    pub fn global() -> Self {
        Self::tenant("")
    }

    /// The same scope narrowed to one principal (user, API key, service account).
    #[must_use]
    pub fn with_principal(mut self, principal: impl Into<String>) -> Self {
        self.principal = Some(principal.into());
        self
    }

    /// The same scope narrowed to one operation (a stable name such as `"payments.create"`).
    #[must_use]
    pub fn with_operation(mut self, operation: impl Into<String>) -> Self {
        self.operation = Some(operation.into());
        self
    }

    /// The tenant part.
    pub fn tenant_id(&self) -> &str {
        &self.tenant
    }

    /// The principal part, if any.
    pub fn principal(&self) -> Option<&str> {
        self.principal.as_deref()
    }

    /// The operation part, if any.
    pub fn operation(&self) -> Option<&str> {
        self.operation.as_deref()
    }
}

/// The canonical identity of one (scope, key) pair in every store.
///
/// # Behavior
/// [`RecordKey::canonical_bytes`] is injective: it is
///
/// ```text
/// b"idem/v1" ‖ part(tenant) ‖ opt(principal) ‖ opt(operation) ‖ part(key)
/// part(s)  = u32 big-endian byte length of s ‖ bytes of s
/// opt(None)    = 0x00
/// opt(Some(s)) = 0x01 ‖ part(s)
/// ```
///
/// so two different pairs never have the same canonical bytes, whatever
/// separators their parts contain. The [`digest`](RecordKey::digest) is the
/// 32-byte blake3 hash of those bytes: a fixed-size primary key for every
/// backend (SQL `BLOB`/`BYTEA`, Redis key suffix as [`hex`](RecordKey::hex)),
/// spread uniformly over Redis Cluster slots. Two pairs share a digest only if
/// blake3 has a collision. The encoding is frozen: changing it would orphan
/// every stored record, so a new layout would get a new `v` tag.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RecordKey {
    scope: Scope,
    key: IdempotencyKey,
    digest: [u8; 32],
}

impl RecordKey {
    /// Derives the record key of `key` within `scope`.
    pub fn new(scope: &Scope, key: &IdempotencyKey) -> Self {
        let digest = *blake3::hash(&canonical_bytes(scope, key)).as_bytes();
        Self {
            scope: scope.clone(),
            key: key.clone(),
            digest,
        }
    }

    /// The scope this record belongs to.
    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    /// The client's key.
    pub fn key(&self) -> &IdempotencyKey {
        &self.key
    }

    /// The injective encoding of (scope, key); see the type's `# Behavior`.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        canonical_bytes(&self.scope, &self.key)
    }

    /// The blake3 digest of [`canonical_bytes`](Self::canonical_bytes): the
    /// storage identity every backend uses.
    pub fn digest(&self) -> &[u8; 32] {
        &self.digest
    }

    /// The digest as 64 lowercase hexadecimal characters.
    pub fn hex(&self) -> String {
        use fmt::Write as _;
        let mut out = String::with_capacity(64);
        for byte in self.digest {
            // Writing to a String cannot fail.
            let _ = write!(out, "{byte:02x}");
        }
        out
    }
}

fn canonical_bytes(scope: &Scope, key: &IdempotencyKey) -> Vec<u8> {
    fn part(out: &mut Vec<u8>, s: &str) {
        // Parts longer than u32::MAX bytes cannot be built in practice; saturate
        // rather than truncate silently (the bytes that follow still differ).
        let len = u32::try_from(s.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    fn opt(out: &mut Vec<u8>, s: Option<&str>) {
        match s {
            None => out.push(0),
            Some(s) => {
                out.push(1);
                part(out, s);
            }
        }
    }
    let mut out = Vec::with_capacity(
        7 + 4 * 4
            + 3
            + scope.tenant.len()
            + scope.principal.as_ref().map_or(0, String::len)
            + scope.operation.as_ref().map_or(0, String::len)
            + key.as_str().len(),
    );
    out.extend_from_slice(b"idem/v1");
    part(&mut out, &scope.tenant);
    opt(&mut out, scope.principal.as_deref());
    opt(&mut out, scope.operation.as_deref());
    part(&mut out, key.as_str());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_bad_keys_with_the_rule_broken() {
        assert_eq!(IdempotencyKey::parse(""), Err(KeyError::Empty));
        assert_eq!(
            IdempotencyKey::parse(&"a".repeat(256)),
            Err(KeyError::TooLong { len: 256 })
        );
        assert_eq!(
            IdempotencyKey::parse("ab c"),
            Err(KeyError::InvalidByte {
                position: 2,
                byte: b' '
            })
        );
        assert_eq!(
            IdempotencyKey::parse("é"),
            Err(KeyError::InvalidByte {
                position: 0,
                byte: 0xc3
            })
        );
        assert!(IdempotencyKey::parse("\u{7f}").is_err());
        assert!(IdempotencyKey::parse(&"a".repeat(255)).is_ok());
        assert!(IdempotencyKey::parse("!~").is_ok());
    }

    #[test]
    fn separators_in_scopes_do_not_collide() {
        let key = IdempotencyKey::parse("k").unwrap();
        let a = RecordKey::new(&Scope::tenant("a:b"), &key);
        let b = RecordKey::new(&Scope::tenant("a").with_principal("b"), &key);
        let c = RecordKey::new(&Scope::tenant("a").with_principal(""), &key);
        let d = RecordKey::new(&Scope::tenant("a"), &key);
        assert_ne!(a.digest(), b.digest());
        assert_ne!(c.digest(), d.digest());
        assert_eq!(a.hex().len(), 64);
    }
}
