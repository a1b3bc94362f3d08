//! Where a request's key comes from: the [`KeySource`] hook.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use http::HeaderName;
use http::request::Parts;
use idem_core::{IdempotencyKey, KeyError};

use crate::key::{KeyHeaderError, parse_key_header};

/// Why a request's key was refused (400
/// [`invalid-key`](crate::ProblemType::InvalidKey)); the message is the
/// problem's `detail`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidKey(String);

impl InvalidKey {
    /// A refusal with `detail` for the client.
    pub fn new(detail: impl Into<String>) -> Self {
        Self(detail.into())
    }
}

impl From<KeyHeaderError> for InvalidKey {
    fn from(e: KeyHeaderError) -> Self {
        Self(e.to_string())
    }
}

impl From<KeyError> for InvalidKey {
    fn from(e: KeyError) -> Self {
        Self(e.to_string())
    }
}

type PartsFn = dyn Fn(&Parts) -> Result<Option<IdempotencyKey>, InvalidKey> + Send + Sync;
type BodyFn = dyn Fn(&Parts, &Bytes) -> Result<Option<IdempotencyKey>, InvalidKey> + Send + Sync;

#[derive(Clone)]
enum Source {
    Header(HeaderName),
    Parts(Arc<PartsFn>),
    Body(Arc<BodyFn>),
}

/// Where a request's idempotency key comes from.
///
/// # Behavior
/// - [`header`](Self::header) (the default, `Idempotency-Key`): the header
///   grammar of [`parse_key_header`] (an RFC 8941 string or a bare token,
///   sent once).
/// - [`from_parts`](Self::from_parts): any function of the request head (a
///   path segment, another header, a query parameter).
/// - [`from_body`](Self::from_body) and [`json_field`](Self::json_field): a
///   function of the buffered body, e.g. the `id` of a webhook event. The
///   body is then read (up to the limit) before the key is known, also for
///   requests that turn out to have none.
///
/// An extractor returns `Ok(None)` for "no key" (400
/// [`missing-key`](crate::ProblemType::MissingKey) if keys are required,
/// else the request runs unprotected) and [`InvalidKey`] for a key it
/// refuses (400 [`invalid-key`](crate::ProblemType::InvalidKey)). Whatever
/// the source, a key is 1 to 255 bytes of visible ASCII
/// ([`IdempotencyKey`]); the handler never runs for a refused one.
///
/// ```
/// use idem_http::KeySource;
/// // Stripe-style webhooks: the event id is the key.
/// let source = KeySource::json_field("/id");
/// # let _ = source;
/// ```
#[derive(Clone)]
pub struct KeySource(Source);

impl KeySource {
    /// The key from the header `name`.
    pub fn header(name: HeaderName) -> Self {
        Self(Source::Header(name))
    }

    /// The key from a function of the request head.
    ///
    /// ```
    /// use idem_core::IdempotencyKey;
    /// use idem_http::KeySource;
    /// // `POST /webhooks/evt_42`: the last path segment is the key.
    /// let source = KeySource::from_parts(|parts| {
    ///     match parts.uri.path().rsplit('/').next().filter(|s| !s.is_empty()) {
    ///         Some(id) => Ok(Some(IdempotencyKey::parse(id)?)),
    ///         None => Ok(None),
    ///     }
    /// });
    /// # let _ = source;
    /// ```
    pub fn from_parts<F>(f: F) -> Self
    where
        F: Fn(&Parts) -> Result<Option<IdempotencyKey>, InvalidKey> + Send + Sync + 'static,
    {
        Self(Source::Parts(Arc::new(f)))
    }

    /// The key from a function of the request head and its buffered body
    /// (see [`json_field`](Self::json_field) for a JSON field).
    ///
    /// ```
    /// use idem_core::IdempotencyKey;
    /// use idem_http::{InvalidKey, KeySource};
    /// // A form body `id=…&…`: the `id` field is the key.
    /// let source = KeySource::from_body(|_, body| {
    ///     let text = std::str::from_utf8(body).map_err(|_| InvalidKey::new("the body is not UTF-8"))?;
    ///     match text.split('&').find_map(|pair| pair.strip_prefix("id=")) {
    ///         Some(id) => Ok(Some(IdempotencyKey::parse(id)?)),
    ///         None => Ok(None),
    ///     }
    /// });
    /// # let _ = source;
    /// ```
    pub fn from_body<F>(f: F) -> Self
    where
        F: Fn(&Parts, &Bytes) -> Result<Option<IdempotencyKey>, InvalidKey> + Send + Sync + 'static,
    {
        Self(Source::Body(Arc::new(f)))
    }

    /// The key from a field of a JSON body, at a JSON pointer (RFC 6901,
    /// e.g. `/id` or `/event/id`).
    ///
    /// # Behavior
    /// A string field is the key as is; an integer (64 bits at most) is its
    /// decimal text. A body that is not JSON, or a field of another type
    /// (a float, a larger integer, an object…), is refused ([`InvalidKey`]);
    /// an absent or `null` field is no key.
    pub fn json_field(pointer: impl Into<String>) -> Self {
        let pointer = pointer.into();
        Self::from_body(move |_, body| {
            let value: serde_json::Value = serde_json::from_slice(body).map_err(|_| {
                InvalidKey::new(format!(
                    "the request body is not JSON, so it has no idempotency key at {pointer}"
                ))
            })?;
            match value.pointer(&pointer) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(IdempotencyKey::parse(s)?)),
                // An integer is its decimal text. Not a float, nor an integer
                // too large for 64 bits: those are read as floats, and two
                // different ids could become one key.
                Some(serde_json::Value::Number(n)) if n.is_u64() || n.is_i64() => {
                    Ok(Some(IdempotencyKey::parse(&n.to_string())?))
                }
                Some(_) => Err(InvalidKey::new(format!(
                    "the idempotency key at {pointer} must be a string or an integer"
                ))),
            }
        })
    }

    /// Whether the key is read from the body.
    pub fn needs_body(&self) -> bool {
        matches!(self.0, Source::Body(_))
    }

    /// The key of a request: `body` is its buffered body when
    /// [`needs_body`](Self::needs_body), else ignored.
    pub fn extract(
        &self,
        parts: &Parts,
        body: Option<&Bytes>,
    ) -> Result<Option<IdempotencyKey>, InvalidKey> {
        match &self.0 {
            Source::Header(name) => Ok(parse_key_header(&parts.headers, name)?),
            Source::Parts(f) => f(parts),
            Source::Body(f) => match body {
                Some(body) => f(parts, body),
                None => Ok(None),
            },
        }
    }

    /// How the key is sent, for the client's error messages.
    pub(crate) fn describe(&self) -> String {
        match &self.0 {
            Source::Header(name) => format!("an {name} header"),
            Source::Parts(_) | Source::Body(_) => "an idempotency key".to_owned(),
        }
    }

    /// The header, if the key comes from one.
    pub fn header_name(&self) -> Option<&HeaderName> {
        match &self.0 {
            Source::Header(name) => Some(name),
            Source::Parts(_) | Source::Body(_) => None,
        }
    }
}

impl fmt::Debug for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Source::Header(name) => f.debug_tuple("KeySource::Header").field(name).finish(),
            Source::Parts(_) => f.write_str("KeySource::Parts(..)"),
            Source::Body(_) => f.write_str("KeySource::Body(..)"),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http::Request;

    fn parts() -> Parts {
        Request::post("/p").body(()).unwrap().into_parts().0
    }

    #[test]
    fn another_header_and_a_function_of_the_head() {
        let mut parts = parts();
        parts
            .headers
            .insert("x-request-id", http::HeaderValue::from_static("\"r-1\""));
        let header = KeySource::header(HeaderName::from_static("x-request-id"));
        assert_eq!(
            header.extract(&parts, None).unwrap().unwrap().as_str(),
            "r-1"
        );
        assert!(!header.needs_body());
        parts
            .headers
            .append("x-request-id", http::HeaderValue::from_static("r-2"));
        assert!(header.extract(&parts, None).is_err(), "sent twice");

        // The last path segment: `/webhooks/evt_42` has the key `evt_42`.
        let segment = KeySource::from_parts(|parts| {
            match parts
                .uri
                .path()
                .rsplit('/')
                .next()
                .filter(|s| !s.is_empty())
            {
                Some(id) => Ok(Some(IdempotencyKey::parse(id)?)),
                None => Ok(None),
            }
        });
        let (at, ()) = Request::post("/webhooks/evt_42")
            .body(())
            .unwrap()
            .into_parts();
        assert_eq!(
            segment.extract(&at, None).unwrap().unwrap().as_str(),
            "evt_42"
        );
        let (root, ()) = Request::post("/webhooks/").body(()).unwrap().into_parts();
        assert_eq!(segment.extract(&root, None).unwrap(), None);
        let long = format!("/webhooks/{}", "a".repeat(256));
        let (bad, ()) = Request::post(long.as_str()).body(()).unwrap().into_parts();
        assert!(segment.extract(&bad, None).is_err());
        assert!(!segment.needs_body());
    }

    #[test]
    fn json_field() {
        let s = KeySource::json_field("/event/id");
        let get = |b: &'static str| s.extract(&parts(), Some(&Bytes::from_static(b.as_bytes())));
        assert_eq!(
            get(r#"{"event":{"id":"ev_1"}}"#).unwrap().unwrap().as_str(),
            "ev_1"
        );
        assert_eq!(
            get(r#"{"event":{"id":42}}"#).unwrap().unwrap().as_str(),
            "42"
        );
        assert_eq!(get(r#"{"event":{}}"#).unwrap(), None);
        assert!(get("not json").is_err());
        assert!(get(r#"{"event":{"id":"a b"}}"#).is_err());
        assert!(get(r#"{"event":{"id":[1]}}"#).is_err());
        assert!(get(r#"{"event":{"id":1.5}}"#).is_err());
        assert!(get(r#"{"event":{"id":12345678901234567890123}}"#).is_err());
        assert_eq!(
            get(r#"{"event":{"id":-7}}"#).unwrap().unwrap().as_str(),
            "-7"
        );
        assert!(s.needs_body());
    }
}
