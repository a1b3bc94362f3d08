//! The idempotency key as the client holds it: validation, generation, and
//! the header's wire forms.

use std::fmt;
use std::str::FromStr;

use http::HeaderValue;

/// The longest key, in bytes (docs/http-contract.md: "1 to 255 characters").
pub const MAX_KEY_LEN: usize = idem_core::MAX_KEY_LEN;

/// An idempotency key: 1 to [`MAX_KEY_LEN`] bytes of visible ASCII (`!` to
/// `~`), case-sensitive — the rule the server applies (docs/http-contract.md,
/// "The header").
///
/// # Behavior
/// - [`Key::random`] makes a fresh UUID v4 from the operating system's random
///   number generator (122 random bits), the form the contract recommends.
/// - On the wire a key is sent as an RFC 8941 Structured Field String
///   ([`to_header_value`](Self::to_header_value): `"8e03978e-…"`, with `"`
///   and `\` escaped), the IETF draft's form; [`from_header_value`](Self::from_header_value)
///   also accepts the bare token most SDKs send, as the server does.
/// - A caller that supplies its own key (as a request extension or an
///   `Idempotency-Key` header, see [`IdempotencyMiddleware`](crate::IdempotencyMiddleware))
///   should store it with the operation, so that a retry after the caller's
///   own crash sends it again.
///
/// ```
/// use idem_client::Key;
/// let key: Key = "order-42".parse()?;
/// assert_eq!(key.to_header_value(), "\"order-42\"");
/// assert_eq!(Key::from_header_value(&"order-42".parse().unwrap())?, key);
/// assert!(Key::new("two words").is_err());
/// # Ok::<(), idem_client::KeyError>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(String);

impl Key {
    /// Validates `key`.
    ///
    /// # Errors
    /// [`KeyError::Empty`], [`KeyError::TooLong`] or
    /// [`KeyError::InvalidByte`] (a byte outside `!`..=`~`).
    pub fn new(key: impl Into<String>) -> Result<Self, KeyError> {
        let key = key.into();
        validate(key.as_bytes())?;
        Ok(Self(key))
    }

    /// A fresh random key: a UUID v4 in lowercase hex with dashes
    /// (`8e03978e-40d5-43e8-bc93-6894a57f9324`).
    ///
    /// # Errors
    /// [`RandomError`] if the operating system's random number generator
    /// fails (it practically never does; the middleware then sends nothing).
    pub fn random() -> Result<Self, RandomError> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).map_err(RandomError)?;
        Ok(Self::uuid_v4(bytes))
    }

    /// The UUID v4 made of `bytes` (version and variant bits set).
    pub(crate) fn uuid_v4(mut bytes: [u8; 16]) -> Self {
        bytes[6] = (bytes[6] & 0x0f) | 0x40;
        bytes[8] = (bytes[8] & 0x3f) | 0x80;
        let mut out = String::with_capacity(36);
        for (i, byte) in bytes.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                out.push('-');
            }
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0x0f)]));
        }
        Self(out)
    }

    /// The key.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The header value: the key as an RFC 8941 Structured Field String
    /// (`"…"`, with `"` and `\` escaped by a backslash).
    pub fn to_header_value(&self) -> HeaderValue {
        let mut quoted = Vec::with_capacity(self.0.len() + 2);
        quoted.push(b'"');
        for &byte in self.0.as_bytes() {
            if byte == b'"' || byte == b'\\' {
                quoted.push(b'\\');
            }
            quoted.push(byte);
        }
        quoted.push(b'"');
        // Visible ASCII, quoted and escaped: always a valid header value.
        HeaderValue::from_bytes(&quoted).unwrap_or_else(|_| HeaderValue::from_static("\"\""))
    }

    /// Reads a key from an `Idempotency-Key` header value, with the server's
    /// grammar: an RFC 8941 Structured Field String (`"abc"`, escapes `\"`
    /// and `\\` only, nothing after the closing quote) or a bare token
    /// (`abc`); surrounding spaces and tabs are ignored.
    ///
    /// # Errors
    /// [`KeyError`] naming the rule the value breaks.
    pub fn from_header_value(value: &HeaderValue) -> Result<Self, KeyError> {
        let key = idem_http::parse_key_value(value.as_bytes())?;
        Ok(Self(key.as_str().to_owned()))
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// The server's key rule ([`idem_core::IdempotencyKey`]), so that the
/// client refuses exactly what the server would.
fn validate(key: &[u8]) -> Result<(), KeyError> {
    idem_core::IdempotencyKey::parse_bytes(key)
        .map(|_| ())
        .map_err(KeyError::from)
}

impl From<idem_core::KeyError> for KeyError {
    fn from(e: idem_core::KeyError) -> Self {
        match e {
            idem_core::KeyError::TooLong { len } => Self::TooLong { len },
            idem_core::KeyError::InvalidByte { position, byte } => {
                Self::InvalidByte { position, byte }
            }
            // `Empty`, and any rule added later, reads as empty only if it
            // is; otherwise it is reported by its own message.
            idem_core::KeyError::Empty => Self::Empty,
            other => Self::Rule(other.to_string()),
        }
    }
}

impl From<idem_http::KeyHeaderError> for KeyError {
    fn from(e: idem_http::KeyHeaderError) -> Self {
        use idem_http::{KeyHeaderError, QuotingError};
        match e {
            KeyHeaderError::Multiple { count } => Self::Multiple { count },
            KeyHeaderError::Quoting(QuotingError::Unterminated) => Self::Unterminated,
            KeyHeaderError::Quoting(QuotingError::BadEscape { position }) => {
                Self::BadEscape { position }
            }
            KeyHeaderError::Quoting(QuotingError::TrailingData { position }) => {
                Self::TrailingData { position }
            }
            KeyHeaderError::Quoting(QuotingError::InvalidByte { position, byte }) => {
                Self::InvalidByte { position, byte }
            }
            KeyHeaderError::Key(e) => e.into(),
            other => Self::Rule(other.to_string()),
        }
    }
}

impl FromStr for Key {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for Key {
    type Error = KeyError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl TryFrom<&str> for Key {
    type Error = KeyError;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl AsRef<str> for Key {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({:?})", self.0)
    }
}

/// Why a key, or an `Idempotency-Key` header value, was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The key is empty.
    #[error("the idempotency key is empty")]
    Empty,
    /// The key is longer than [`MAX_KEY_LEN`] bytes.
    #[error("the idempotency key is {len} bytes long; at most 255 are allowed")]
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// A byte outside visible ASCII (`!` to `~`): a space, a control
    /// character, non-ASCII.
    #[error("byte {position} of the idempotency key (0x{byte:02x}) is not visible ASCII")]
    InvalidByte {
        /// Byte offset in the key.
        position: usize,
        /// The refused byte.
        byte: u8,
    },
    /// A quoted header value has no closing quote.
    #[error("the quoted idempotency key has no closing quote")]
    Unterminated,
    /// A quoted header value escapes something other than `"` or `\`.
    #[error("byte {position} of the header: only \\\" and \\\\ may be escaped")]
    BadEscape {
        /// Byte offset of the backslash in the header value.
        position: usize,
    },
    /// Something follows the closing quote (parameters, a list).
    #[error("byte {position} of the header: nothing may follow the closing quote")]
    TrailingData {
        /// Byte offset of the first byte after the closing quote.
        position: usize,
    },
    /// Another rule of the server's key grammar.
    #[error("{0}")]
    Rule(String),
    /// The request carries the key header more than once.
    #[error("the idempotency key header appears {count} times; send it exactly once")]
    Multiple {
        /// How many header lines carry it.
        count: usize,
    },
}

/// The operating system's random number generator failed, so no key could
/// be made.
#[derive(Debug, thiserror::Error)]
#[error("the operating system's random number generator failed")]
pub struct RandomError(#[source] getrandom::Error);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn random_keys_are_uuid_v4_and_distinct() {
        let a = Key::random().unwrap();
        let b = Key::random().unwrap();
        assert_ne!(a, b);
        for key in [&a, &b] {
            let s = key.as_str();
            assert_eq!(s.len(), 36);
            assert_eq!(s.as_bytes()[14], b'4', "{s}");
            assert!(matches!(s.as_bytes()[19], b'8' | b'9' | b'a' | b'b'), "{s}");
            let groups: Vec<usize> = s.split('-').map(str::len).collect();
            assert_eq!(groups, [8, 4, 4, 4, 12]);
        }
        assert_eq!(
            Key::uuid_v4([0xff; 16]).as_str(),
            "ffffffff-ffff-4fff-bfff-ffffffffffff"
        );
        assert_eq!(
            Key::uuid_v4([0; 16]).as_str(),
            "00000000-0000-4000-8000-000000000000"
        );
    }

    #[test]
    fn validation() {
        assert_eq!(Key::new(""), Err(KeyError::Empty));
        assert_eq!(
            Key::new("a".repeat(256)),
            Err(KeyError::TooLong { len: 256 })
        );
        assert!(Key::new("a".repeat(255)).is_ok());
        assert_eq!(
            Key::new("a b"),
            Err(KeyError::InvalidByte {
                position: 1,
                byte: b' '
            })
        );
        assert!(Key::new("é").is_err());
        assert!(Key::new("!~\"\\").is_ok());
    }

    fn header(s: &[u8]) -> HeaderValue {
        HeaderValue::from_bytes(s).unwrap()
    }

    #[test]
    fn header_round_trip_and_grammar() {
        for k in [
            "abc",
            "a\"b",
            "a\\b",
            "\"",
            "8e03978e-40d5-43e8-bc93-6894a57f9324",
        ] {
            let key = Key::new(k).unwrap();
            assert_eq!(Key::from_header_value(&key.to_header_value()).unwrap(), key);
        }
        assert_eq!(Key::new("a\"b").unwrap().to_header_value(), r#""a\"b""#);
        assert_eq!(
            Key::from_header_value(&header(b" \"abc\"\t")).unwrap(),
            Key::new("abc").unwrap()
        );
        assert_eq!(
            Key::from_header_value(&header(b"abc")).unwrap(),
            Key::new("abc").unwrap()
        );
        assert_eq!(
            Key::from_header_value(&header(b"\"abc")),
            Err(KeyError::Unterminated)
        );
        assert_eq!(
            Key::from_header_value(&header(br#""a\nb""#)),
            Err(KeyError::BadEscape { position: 2 })
        );
        assert_eq!(
            Key::from_header_value(&header(br#""a";p=1"#)),
            Err(KeyError::TrailingData { position: 3 })
        );
        assert_eq!(
            Key::from_header_value(&header(b"\"\"")),
            Err(KeyError::Empty)
        );
        assert!(Key::from_header_value(&header(b"\"a b\"")).is_err());
    }
}
