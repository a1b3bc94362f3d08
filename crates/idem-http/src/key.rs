//! The `Idempotency-Key` header grammar: a pure function of the header values.

use http::{HeaderMap, HeaderName};
use idem_core::{IdempotencyKey, KeyError};

/// Why an `Idempotency-Key` header was refused (HTTP 400, problem type
/// [`ProblemType::InvalidKey`](crate::ProblemType::InvalidKey)).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyHeaderError {
    /// The header appeared more than once (or as a comma-separated list).
    #[error("the idempotency key header appears {count} times; send it exactly once")]
    Multiple {
        /// How many header lines carried it.
        count: usize,
    },
    /// The value starts with `"` but is not a valid Structured Field String.
    #[error("the quoted idempotency key is malformed: {0}")]
    Quoting(#[from] QuotingError),
    /// The key itself breaks a rule (empty, longer than 255 bytes, a byte
    /// outside visible ASCII).
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// How a quoted (RFC 8941 Structured Field String) key is malformed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QuotingError {
    /// No closing `"`.
    #[error("the string has no closing quote")]
    Unterminated,
    /// A backslash followed by something other than `"` or `\`.
    #[error("byte {position}: only \\\" and \\\\ may be escaped")]
    BadEscape {
        /// Byte offset of the backslash in the header value.
        position: usize,
    },
    /// A byte not allowed inside a string (control characters, non-ASCII).
    #[error("byte {position}: 0x{byte:02x} is not allowed in a string")]
    InvalidByte {
        /// Byte offset in the header value.
        position: usize,
        /// The refused byte.
        byte: u8,
    },
    /// Something follows the closing quote (parameters, a list, garbage).
    #[error("byte {position}: nothing may follow the closing quote")]
    TrailingData {
        /// Byte offset of the first byte after the closing quote.
        position: usize,
    },
}

/// Parses one `Idempotency-Key` header value.
///
/// # Behavior
/// - Leading and trailing spaces and tabs are ignored.
/// - A value starting with `"` is an RFC 8941 Structured Field String (the
///   IETF draft's form): characters `0x20..=0x7E`, with `\"` and `\\` as the
///   only escapes, closed by `"` and followed by nothing (parameters are
///   refused). The key is the unescaped content.
/// - Any other value is taken as a bare token (the form most SDKs send).
/// - Either way the key must then pass [`IdempotencyKey::parse_bytes`]: 1 to
///   255 bytes of visible ASCII. So `"abc"` and `abc` are the same key, and a
///   quoted key containing a space is refused.
/// - Never panics, whatever the bytes.
///
/// ```
/// use idem_http::parse_key_value;
/// assert_eq!(parse_key_value(br#""abc""#)?, parse_key_value(b"abc")?);
/// assert!(parse_key_value(br#""abc"#).is_err()); // unterminated
/// assert!(parse_key_value(b"").is_err());
/// # Ok::<(), idem_http::KeyHeaderError>(())
/// ```
pub fn parse_key_value(raw: &[u8]) -> Result<IdempotencyKey, KeyHeaderError> {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = raw.iter().position(|b| !is_ows(b)).unwrap_or(raw.len());
    let end = raw
        .iter()
        .rposition(|b| !is_ows(b))
        .map_or(start, |i| i + 1);
    let value = raw.get(start..end).unwrap_or_default();
    if value.first() != Some(&b'"') {
        return Ok(IdempotencyKey::parse_bytes(value)?);
    }
    let mut out = Vec::with_capacity(value.len());
    let mut i = 1;
    loop {
        let Some(&byte) = value.get(i) else {
            return Err(QuotingError::Unterminated.into());
        };
        match byte {
            b'\\' => match value.get(i + 1) {
                Some(&escaped @ (b'"' | b'\\')) => {
                    out.push(escaped);
                    i += 2;
                }
                Some(_) => {
                    return Err(QuotingError::BadEscape {
                        position: start + i,
                    }
                    .into());
                }
                None => return Err(QuotingError::Unterminated.into()),
            },
            b'"' => {
                if i + 1 < value.len() {
                    return Err(QuotingError::TrailingData {
                        position: start + i + 1,
                    }
                    .into());
                }
                return Ok(IdempotencyKey::parse_bytes(&out)?);
            }
            0x20..=0x7e => {
                out.push(byte);
                i += 1;
            }
            _ => {
                return Err(QuotingError::InvalidByte {
                    position: start + i,
                    byte,
                }
                .into());
            }
        }
    }
}

/// Reads the key from the `name` header of `headers`.
///
/// # Behavior
/// `Ok(None)` if the header is absent; [`KeyHeaderError::Multiple`] if it
/// appears more than once; otherwise [`parse_key_value`] of its value.
pub fn parse_key_header(
    headers: &HeaderMap,
    name: &HeaderName,
) -> Result<Option<IdempotencyKey>, KeyHeaderError> {
    let mut values = headers.get_all(name).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    let more = values.count();
    if more > 0 {
        return Err(KeyHeaderError::Multiple { count: more + 1 });
    }
    parse_key_value(first.as_bytes()).map(Some)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;

    fn key(s: &str) -> IdempotencyKey {
        IdempotencyKey::parse(s).unwrap()
    }

    #[test]
    fn quoted_and_bare_are_the_same_key() {
        assert_eq!(parse_key_value(b"abc").unwrap(), key("abc"));
        assert_eq!(parse_key_value(br#""abc""#).unwrap(), key("abc"));
        assert_eq!(parse_key_value(b"  \"abc\"\t").unwrap(), key("abc"));
        assert_eq!(parse_key_value(b" abc ").unwrap(), key("abc"));
        let uuid = "8e03978e-40d5-43e8-bc93-6894a57f9324";
        assert_eq!(
            parse_key_value(format!("\"{uuid}\"").as_bytes()).unwrap(),
            key(uuid)
        );
    }

    #[test]
    fn escapes() {
        assert_eq!(parse_key_value(br#""a\"b""#).unwrap(), key("a\"b"));
        assert_eq!(parse_key_value(br#""a\\b""#).unwrap(), key("a\\b"));
        assert_eq!(
            parse_key_value(br#""a\nb""#),
            Err(KeyHeaderError::Quoting(QuotingError::BadEscape {
                position: 2
            }))
        );
        assert_eq!(
            parse_key_value(br#""ab\"#),
            Err(KeyHeaderError::Quoting(QuotingError::Unterminated))
        );
    }

    #[test]
    fn malformed_quoting() {
        assert_eq!(
            parse_key_value(br#""abc"#),
            Err(QuotingError::Unterminated.into())
        );
        assert_eq!(
            parse_key_value(b"\""),
            Err(QuotingError::Unterminated.into())
        );
        assert_eq!(
            parse_key_value(br#""abc";p=1"#),
            Err(QuotingError::TrailingData { position: 5 }.into())
        );
        assert_eq!(
            parse_key_value(br#""a", "b""#),
            Err(QuotingError::TrailingData { position: 3 }.into())
        );
        assert_eq!(
            parse_key_value(b"\"a\x01\""),
            Err(QuotingError::InvalidByte {
                position: 2,
                byte: 1
            }
            .into())
        );
        assert_eq!(
            parse_key_value("\"é\"".as_bytes()),
            Err(QuotingError::InvalidByte {
                position: 1,
                byte: 0xc3
            }
            .into())
        );
    }

    #[test]
    fn key_rules_apply_after_unquoting() {
        assert_eq!(parse_key_value(b""), Err(KeyError::Empty.into()));
        assert_eq!(parse_key_value(b"   "), Err(KeyError::Empty.into()));
        assert_eq!(parse_key_value(br#""""#), Err(KeyError::Empty.into()));
        assert!(matches!(
            parse_key_value(br#""a b""#),
            Err(KeyHeaderError::Key(KeyError::InvalidByte {
                byte: b' ',
                ..
            }))
        ));
        assert!(matches!(
            parse_key_value(b"a b"),
            Err(KeyHeaderError::Key(KeyError::InvalidByte { .. }))
        ));
        let long = "a".repeat(256);
        assert_eq!(
            parse_key_value(long.as_bytes()),
            Err(KeyError::TooLong { len: 256 }.into())
        );
        assert_eq!(
            parse_key_value(format!("\"{long}\"").as_bytes()),
            Err(KeyError::TooLong { len: 256 }.into())
        );
        assert!(parse_key_value("a".repeat(255).as_bytes()).is_ok());
        assert!(parse_key_value("é".as_bytes()).is_err());
    }

    #[test]
    fn header_map() {
        let name = HeaderName::from_static("idempotency-key");
        let mut headers = HeaderMap::new();
        assert_eq!(parse_key_header(&headers, &name), Ok(None));
        headers.insert(&name, HeaderValue::from_static("\"k1\""));
        assert_eq!(parse_key_header(&headers, &name), Ok(Some(key("k1"))));
        headers.append(&name, HeaderValue::from_static("k1"));
        assert_eq!(
            parse_key_header(&headers, &name),
            Err(KeyHeaderError::Multiple { count: 2 })
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(raw in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_key_value(&raw);
        }

        #[test]
        fn quoting_a_valid_key_round_trips(k in "[!-~]{1,200}") {
            let mut quoted = String::from("\"");
            for c in k.chars() {
                if c == '"' || c == '\\' {
                    quoted.push('\\');
                }
                quoted.push(c);
            }
            quoted.push('"');
            prop_assert_eq!(parse_key_value(quoted.as_bytes()).unwrap(), key(&k));
            if !k.starts_with('"') {
                prop_assert_eq!(parse_key_value(k.as_bytes()).unwrap(), key(&k));
            }
        }

        #[test]
        fn accepted_keys_are_valid(raw in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(k) = parse_key_value(&raw) {
                prop_assert!(IdempotencyKey::parse(k.as_str()).is_ok());
            }
        }
    }
}
