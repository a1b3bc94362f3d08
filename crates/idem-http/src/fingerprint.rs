//! The request fingerprint: what makes two requests with one key "the same
//! request", and the hook that chooses what it covers.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, HeaderName, Method};
use idem_core::Fingerprint;
use serde_json::value::RawValue;

/// A covered request as the hooks see it: its head, the path and query the
/// client sent, and its buffered body.
///
/// # Behavior
/// [`target`](Self::target) is what the client sent even behind a router
/// that strips a prefix (axum's `OriginalUri` in `idem-tower`, the full
/// path in `idem-actix`); [`parts`](Self::parts) is the request as the
/// handler will see it. With `idem-actix`, `parts` has no extensions (actix
/// keeps its own).
#[derive(Clone, Copy)]
pub struct RequestView<'a> {
    parts: &'a Parts,
    target: &'a str,
    body: &'a Bytes,
    fingerprint_headers: &'a [HeaderName],
}

impl<'a> RequestView<'a> {
    pub(crate) fn new(
        parts: &'a Parts,
        target: &'a str,
        body: &'a Bytes,
        fingerprint_headers: &'a [HeaderName],
    ) -> Self {
        Self {
            parts,
            target,
            body,
            fingerprint_headers,
        }
    }

    /// The request head.
    pub fn parts(&self) -> &'a Parts {
        self.parts
    }

    /// The method.
    pub fn method(&self) -> &'a Method {
        &self.parts.method
    }

    /// The headers.
    pub fn headers(&self) -> &'a HeaderMap {
        &self.parts.headers
    }

    /// The path and query the client sent.
    pub fn target(&self) -> &'a str {
        self.target
    }

    /// The path the client sent, without the query.
    pub fn path(&self) -> &'a str {
        self.target
            .split_once('?')
            .map_or(self.target, |(path, _)| path)
    }

    /// The buffered body (empty before it is read).
    pub fn body(&self) -> &'a Bytes {
        self.body
    }

    /// The default fingerprint, with `body` in place of the request's body:
    /// `method`, `target`, each
    /// [`fingerprint_header`](crate::Builder::fingerprint_header) (one field
    /// per value; absent headers add none), then `body`.
    ///
    /// # Behavior
    /// The building block of custom fingerprints that change only what the
    /// body contributes ([`Fingerprinter::canonical_json`]).
    pub fn fingerprint_with(&self, body: &[u8]) -> Fingerprint {
        let mut fp = Fingerprint::builder();
        fp.add("method", self.parts.method.as_str().as_bytes());
        fp.add("target", self.target.as_bytes());
        for name in self.fingerprint_headers {
            let field = format!("header:{name}");
            for value in self.parts.headers.get_all(name) {
                fp.add(&field, value.as_bytes());
            }
        }
        fp.add("body", body);
        fp.finish()
    }
}

impl fmt::Debug for RequestView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestView")
            .field("method", self.method())
            .field("target", &self.target)
            .field("body_len", &self.body.len())
            .finish_non_exhaustive()
    }
}

type FingerprintFn = dyn Fn(&RequestView<'_>) -> Fingerprint + Send + Sync;

/// Chooses what a request's fingerprint covers: two requests with one key
/// and different fingerprints are two operations (the second gets 422).
///
/// # Behavior
/// - [`request`](Self::request) (the default): method, target, the selected
///   headers and the body bytes.
/// - [`canonical_json`](Self::canonical_json): the same, with a JSON body
///   in canonical form (object keys sorted, insignificant whitespace
///   removed, string escapes resolved), so key order and formatting never
///   cause a 422. Numbers keep their text (`1` and `1.0` stay two requests;
///   two integers too large for a float never become one), and an object
///   with a key twice counts as its bytes: canonical JSON only ever makes
///   requests that mean the same the same, never two different ones.
/// - [`canonical_json_without`](Self::canonical_json_without): canonical
///   JSON without some fields (a client timestamp, a nonce).
/// - [`new`](Self::new): any function of the [`RequestView`].
///
/// Covering less than the whole request means a retry that differs only in
/// what is not covered gets the first request's answer: leave out only what
/// cannot change the operation.
///
/// ```
/// use idem_http::Fingerprinter;
/// // Ignore the client's `sent_at` field and JSON formatting.
/// let fingerprint = Fingerprinter::canonical_json_without(["/sent_at"]);
/// # let _ = fingerprint;
/// ```
#[derive(Clone)]
pub struct Fingerprinter(Arc<FingerprintFn>);

impl Fingerprinter {
    /// The default: method, target, selected headers, body bytes.
    pub fn request() -> Self {
        Self::new(|view| view.fingerprint_with(view.body()))
    }

    /// Any function of the request.
    pub fn new<F>(f: F) -> Self
    where
        F: Fn(&RequestView<'_>) -> Fingerprint + Send + Sync + 'static,
    {
        Self(Arc::new(f))
    }

    /// The default, with a JSON body in canonical form; a body that is not
    /// JSON counts as its bytes.
    pub fn canonical_json() -> Self {
        Self::canonical_json_without(std::iter::empty::<String>())
    }

    /// [`canonical_json`](Self::canonical_json) without the fields at the
    /// given JSON pointers (RFC 6901, e.g. `/sent_at`, `/meta/nonce`);
    /// absent fields are ignored.
    pub fn canonical_json_without<I>(pointers: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        let pointers: Vec<String> = pointers.into_iter().map(Into::into).collect();
        Self::new(move |view| match canonical(view.body(), &pointers) {
            Some(body) => view.fingerprint_with(&body),
            None => view.fingerprint_with(view.body()),
        })
    }

    /// The fingerprint of `view`.
    pub fn fingerprint(&self, view: &RequestView<'_>) -> Fingerprint {
        (self.0)(view)
    }
}

impl Default for Fingerprinter {
    fn default() -> Self {
        Self::request()
    }
}

impl fmt::Debug for Fingerprinter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Fingerprinter(..)")
    }
}

/// `body` as canonical JSON without the fields at `pointers`, or `None`
/// if it is not JSON or cannot be put in a canonical form without doubt.
///
/// Numbers keep their text (`1`, `1.0` and `1e0` stay three requests, and
/// two integers too large for a float never become one); strings are
/// compared by their value (`"\u0041"` is `"A"`); an object with a key
/// twice is not canonicalized (parsers disagree on which value counts), so
/// its bytes count.
fn canonical(body: &[u8], pointers: &[String]) -> Option<Vec<u8>> {
    let raw: &RawValue = serde_json::from_slice(body).ok()?;
    let mut out = Vec::with_capacity(body.len());
    write_canonical(raw, "", pointers, &mut out)?;
    Some(out)
}

/// Writes the value `raw`, found at the JSON pointer `path`, in canonical
/// form: object members sorted by key, no insignificant whitespace, the
/// members and items at `pointers` left out.
fn write_canonical(
    raw: &RawValue,
    path: &str,
    pointers: &[String],
    out: &mut Vec<u8>,
) -> Option<()> {
    let text = raw.get();
    match text.as_bytes().first()? {
        b'{' => {
            let Members(mut members) = serde_json::from_str(text).ok()?;
            members.sort_by(|a, b| a.0.cmp(&b.0));
            if members.windows(2).any(|pair| pair[0].0 == pair[1].0) {
                return None;
            }
            out.push(b'{');
            let mut first = true;
            for (name, value) in &members {
                let at = format!("{path}/{}", name.replace('~', "~0").replace('/', "~1"));
                if pointers.contains(&at) {
                    continue;
                }
                if !first {
                    out.push(b',');
                }
                first = false;
                out.extend_from_slice(serde_json::to_string(name).ok()?.as_bytes());
                out.push(b':');
                write_canonical(value, &at, pointers, out)?;
            }
            out.push(b'}');
        }
        b'[' => {
            let items: Vec<&RawValue> = serde_json::from_str(text).ok()?;
            out.push(b'[');
            let mut first = true;
            for (i, item) in items.iter().enumerate() {
                let at = format!("{path}/{i}");
                if pointers.contains(&at) {
                    continue;
                }
                if !first {
                    out.push(b',');
                }
                first = false;
                write_canonical(item, &at, pointers, out)?;
            }
            out.push(b']');
        }
        b'"' => {
            let value: String = serde_json::from_str(text).ok()?;
            out.extend_from_slice(serde_json::to_string(&value).ok()?.as_bytes());
        }
        // Numbers, `true`, `false`, `null`: their text, as sent (a raw
        // value holds no surrounding whitespace).
        _ => out.extend_from_slice(text.as_bytes()),
    }
    Some(())
}

/// The members of a JSON object in the order sent, duplicates kept (a map
/// would keep one of them silently).
struct Members<'a>(Vec<(String, &'a RawValue)>);

impl<'de: 'a, 'a> serde::Deserialize<'de> for Members<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visit<'a> {
            type Value = Members<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut map: M,
            ) -> Result<Self::Value, M::Error> {
                let mut members = Vec::new();
                while let Some(entry) = map.next_entry::<String, &'a RawValue>()? {
                    members.push(entry);
                }
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(Visit(std::marker::PhantomData))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http::Request;

    fn fp(f: &Fingerprinter, body: &str) -> Fingerprint {
        let (parts, ()) = Request::post("/p").body(()).unwrap().into_parts();
        let body = Bytes::from(body.to_owned());
        f.fingerprint(&RequestView::new(&parts, "/p", &body, &[]))
    }

    #[test]
    fn canonical_json_ignores_order_and_whitespace_only() {
        let f = Fingerprinter::canonical_json();
        let a = fp(&f, r#"{"a":1,"b":{"y":[1,2],"x":"s"}}"#);
        assert_eq!(
            a,
            fp(&f, "{ \"b\": {\"x\": \"s\", \"y\": [1, 2]},\n \"a\": 1 }")
        );
        assert_ne!(a, fp(&f, r#"{"a":2,"b":{"y":[1,2],"x":"s"}}"#));
        assert_ne!(a, fp(&f, r#"{"a":1,"b":{"y":[2,1],"x":"s"}}"#));
        // Not JSON: the bytes count.
        assert_ne!(fp(&f, "a=1"), fp(&f, "a=2"));
        let raw = Fingerprinter::request();
        assert_ne!(fp(&raw, r#"{"a":1,"b":2}"#), fp(&raw, r#"{"b":2,"a":1}"#));
    }

    #[test]
    fn numbers_keep_their_text_and_doubtful_objects_count_as_bytes() {
        let f = Fingerprinter::canonical_json();
        // Two integers a float cannot tell apart stay two requests.
        assert_ne!(
            fp(&f, r#"{"amount":12345678901234567890123}"#),
            fp(&f, r#"{"amount":12345678901234567890124}"#)
        );
        assert_ne!(fp(&f, r#"{"a":1}"#), fp(&f, r#"{"a":1.0}"#));
        // Escapes are the same string.
        assert_eq!(fp(&f, r#"{"a":"\u0041"}"#), fp(&f, r#"{"a":"A"}"#));
        // A key sent twice: the bytes count, so another order is another
        // request, and neither is the object with one of the values.
        let twice = fp(&f, r#"{"a":1,"a":2}"#);
        assert_ne!(twice, fp(&f, r#"{"a":2,"a":1}"#));
        assert_ne!(twice, fp(&f, r#"{"a":2}"#));
        assert_ne!(twice, fp(&f, r#"{"a":1}"#));
        // Nested arrays and objects, and removal inside arrays.
        let g = Fingerprinter::canonical_json_without(["/items/0/at", "/tags/1"]);
        assert_eq!(
            fp(&g, r#"{"items":[{"at":1,"id":"x"}],"tags":["a","b"]}"#),
            fp(
                &g,
                r#"{ "tags": ["a", "c"], "items": [ {"id": "x", "at": 2} ] }"#
            )
        );
        assert_ne!(
            fp(&g, r#"{"items":[{"at":1,"id":"x"}],"tags":["a","b"]}"#),
            fp(&g, r#"{"items":[{"at":1,"id":"y"}],"tags":["a","b"]}"#)
        );
    }

    #[test]
    fn ignored_fields_do_not_count() {
        let f = Fingerprinter::canonical_json_without(["/sent_at", "/meta/nonce", "/absent/x"]);
        let a = fp(&f, r#"{"amount":5,"sent_at":1,"meta":{"nonce":"a","k":1}}"#);
        assert_eq!(
            a,
            fp(&f, r#"{"amount":5,"sent_at":2,"meta":{"nonce":"b","k":1}}"#)
        );
        assert_ne!(
            a,
            fp(&f, r#"{"amount":6,"sent_at":1,"meta":{"nonce":"a","k":1}}"#)
        );
    }

    #[test]
    fn the_method_and_target_always_count() {
        let f = Fingerprinter::canonical_json();
        let (post, ()) = Request::post("/p").body(()).unwrap().into_parts();
        let (patch, ()) = Request::patch("/p").body(()).unwrap().into_parts();
        let body = Bytes::from_static(b"{}");
        assert_ne!(
            f.fingerprint(&RequestView::new(&post, "/p", &body, &[])),
            f.fingerprint(&RequestView::new(&patch, "/p", &body, &[]))
        );
        assert_ne!(
            f.fingerprint(&RequestView::new(&post, "/p", &body, &[])),
            f.fingerprint(&RequestView::new(&post, "/q", &body, &[]))
        );
    }
}
