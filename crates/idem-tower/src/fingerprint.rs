//! The request fingerprint: what makes two requests with one key "the same
//! request".

use http::HeaderName;
use http::request::Parts;
use idem_core::Fingerprint;

/// The URI the client sent: axum's `OriginalUri` when a router put it in
/// the extensions (a router nested with `nest`/`nest_service` sees a stripped
/// path), else the request's own.
fn original_uri(parts: &Parts) -> &http::Uri {
    #[cfg(feature = "axum")]
    if let Some(axum::extract::OriginalUri(uri)) = parts.extensions.get() {
        return uri;
    }
    &parts.uri
}

/// The request fingerprint: `method`, `target` (the path and query the
/// client sent, see [`original_uri`]), each selected `header:NAME` (one field
/// per value, absent headers add none), `body`.
pub(crate) fn fingerprint(parts: &Parts, headers: &[HeaderName], body: &[u8]) -> Fingerprint {
    let uri = original_uri(parts);
    let target = uri
        .path_and_query()
        .map_or_else(|| uri.path(), |pq| pq.as_str());
    let mut fp = Fingerprint::builder();
    fp.add("method", parts.method.as_str().as_bytes());
    fp.add("target", target.as_bytes());
    for name in headers {
        let field = format!("header:{name}");
        for value in parts.headers.get_all(name) {
            fp.add(&field, value.as_bytes());
        }
    }
    fp.add("body", body);
    fp.finish()
}
