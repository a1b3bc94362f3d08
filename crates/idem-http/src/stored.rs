//! The stored form of a response, and which headers are kept.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use idem_core::Outcome;
use idem_core::store::codec::{self, CodecError};
use serde::{Deserialize, Serialize};

/// The header added to every replayed response.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// Headers never stored nor replayed: hop-by-hop headers (RFC 9110 §7.6.1),
/// `content-length` (recomputed from the stored body), and the layer's own
/// `idempotent-replayed`.
pub const ALWAYS_DROPPED: [&str; 11] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "idempotent-replayed",
];

/// The default deny list: `set-cookie` (session secrets are not persisted in
/// the idempotency store, nor re-issued to whoever replays) and `date` (the
/// server adds a fresh one).
pub const DEFAULT_DENIED: [&str; 2] = ["set-cookie", "date"];

/// Which response headers are stored and replayed.
#[derive(Clone, Debug)]
pub(crate) struct HeaderFilter {
    deny: Vec<HeaderName>,
}

impl Default for HeaderFilter {
    /// The [`DEFAULT_DENIED`] list.
    fn default() -> Self {
        Self::new(
            DEFAULT_DENIED
                .iter()
                .map(|h| HeaderName::from_static(h))
                .collect(),
        )
    }
}

impl HeaderFilter {
    pub(crate) fn new(deny: Vec<HeaderName>) -> Self {
        Self { deny }
    }

    pub(crate) fn denied(&self) -> &[HeaderName] {
        &self.deny
    }

    /// Adds `name` to the deny list.
    pub(crate) fn deny(&mut self, name: HeaderName) {
        self.deny.push(name);
    }

    /// The headers of `headers` to keep, in order.
    pub(crate) fn keep<'a>(
        &'a self,
        headers: &'a HeaderMap,
    ) -> impl Iterator<Item = (&'a HeaderName, &'a HeaderValue)> + 'a {
        // Headers named in `Connection` are hop-by-hop too.
        let listed: Vec<&[u8]> = headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .map(|t| t.trim_ascii())
            .filter(|t| !t.is_empty())
            .collect();
        headers.iter().filter(move |(name, _)| {
            let n = name.as_str();
            !ALWAYS_DROPPED.contains(&n)
                && !self.deny.iter().any(|d| d == *name)
                && !listed.iter().any(|t| t.eq_ignore_ascii_case(n.as_bytes()))
        })
    }
}

#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
struct StoredHeader {
    name: String,
    #[serde(with = "serde_bytes")]
    value: Vec<u8>,
}

/// The request a stored response answered: its method and path (never its
/// query nor body), for the 422 that tells a client what its key was first
/// used for.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub(crate) struct Origin {
    pub(crate) method: String,
    pub(crate) path: String,
}

/// A response as stored in an [`Outcome`]: status, kept headers, body and
/// trailers, and the request's [`Origin`], encoded with
/// [`idem_core::store::codec`] (version-tagged).
///
/// Records written before the origin was kept hold the same fields without
/// it ([`StoredResponseV1`]); both decode.
#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
pub(crate) struct StoredResponse {
    status: u16,
    headers: Vec<StoredHeader>,
    body: Bytes,
    trailers: Vec<StoredHeader>,
    origin: Option<Origin>,
}

/// The layout of [`StoredResponse`] before it kept the [`Origin`].
#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
struct StoredResponseV1 {
    status: u16,
    headers: Vec<StoredHeader>,
    body: Bytes,
    trailers: Vec<StoredHeader>,
}

fn store_headers<'a>(
    it: impl Iterator<Item = (&'a HeaderName, &'a HeaderValue)>,
) -> Vec<StoredHeader> {
    it.map(|(name, value)| StoredHeader {
        name: name.as_str().to_owned(),
        value: value.as_bytes().to_vec(),
    })
    .collect()
}

/// Why a stored response could not be turned back into a response.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DecodeError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("stored status {0} is not a valid HTTP status")]
    Status(u16),
    #[error("stored header is invalid")]
    Header,
}

/// A decoded stored response.
#[derive(Debug)]
pub(crate) struct Decoded {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    pub(crate) trailers: Option<HeaderMap>,
}

impl StoredResponse {
    pub(crate) fn new(
        status: StatusCode,
        headers: &HeaderMap,
        body: Bytes,
        trailers: Option<&HeaderMap>,
        filter: &HeaderFilter,
        origin: Option<Origin>,
    ) -> Self {
        Self {
            status: status.as_u16(),
            headers: store_headers(filter.keep(headers)),
            body,
            trailers: trailers.map_or_else(Vec::new, |t| store_headers(filter.keep(t))),
            origin,
        }
    }

    /// The stored form, in the current layout or the one before it.
    fn read(outcome: &Outcome) -> Result<Self, CodecError> {
        match codec::decode::<Self>(outcome.as_bytes()) {
            Ok(stored) => Ok(stored),
            Err(current) => match codec::decode::<StoredResponseV1>(outcome.as_bytes()) {
                Ok(old) => Ok(Self {
                    status: old.status,
                    headers: old.headers,
                    body: old.body,
                    trailers: old.trailers,
                    origin: None,
                }),
                Err(_) => Err(current),
            },
        }
    }

    /// The origin recorded in `outcome`, if it is a stored response that
    /// has one.
    pub(crate) fn origin_of(outcome: &Outcome) -> Option<Origin> {
        Self::read(outcome).ok().and_then(|stored| stored.origin)
    }

    pub(crate) fn encode(&self) -> Result<Outcome, CodecError> {
        codec::encode(self).map(Outcome::new)
    }

    pub(crate) fn decode(outcome: &Outcome, filter: &HeaderFilter) -> Result<Decoded, DecodeError> {
        let stored = Self::read(outcome)?;
        let status =
            StatusCode::from_u16(stored.status).map_err(|_| DecodeError::Status(stored.status))?;
        let to_map = |list: Vec<StoredHeader>| -> Result<HeaderMap, DecodeError> {
            let mut map = HeaderMap::with_capacity(list.len());
            for h in list {
                let name =
                    HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| DecodeError::Header)?;
                let value = HeaderValue::from_bytes(&h.value).map_err(|_| DecodeError::Header)?;
                map.append(name, value);
            }
            // The deny list may have grown since the record was written.
            let kept: HeaderMap = filter.keep(&map).map(|(n, v)| (n.clone(), v.clone())).fold(
                HeaderMap::with_capacity(map.len()),
                |mut acc, (n, v)| {
                    acc.append(n, v);
                    acc
                },
            );
            Ok(kept)
        };
        let headers = to_map(stored.headers)?;
        let trailers = if stored.trailers.is_empty() {
            None
        } else {
            Some(to_map(stored.trailers)?)
        };
        Ok(Decoded {
            status,
            headers,
            body: stored.body,
            trailers,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn filter() -> HeaderFilter {
        HeaderFilter::default()
    }

    #[test]
    fn round_trip_drops_hop_by_hop_and_denied() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.append("x-multi", HeaderValue::from_static("1"));
        headers.append("x-multi", HeaderValue::from_static("2"));
        headers.insert("connection", HeaderValue::from_static("close, x-private"));
        headers.insert("x-private", HeaderValue::from_static("secret"));
        headers.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        headers.insert("content-length", HeaderValue::from_static("2"));
        headers.insert("set-cookie", HeaderValue::from_static("sid=1"));
        headers.insert(
            "date",
            HeaderValue::from_static("Tue, 01 Jan 2030 00:00:00 GMT"),
        );
        headers.insert("x-bin", HeaderValue::from_bytes(&[0x80, b'a']).unwrap());
        let stored = StoredResponse::new(
            StatusCode::CREATED,
            &headers,
            Bytes::from_static(b"{}"),
            None,
            &filter(),
            Some(Origin {
                method: "POST".into(),
                path: "/p".into(),
            }),
        );
        let outcome = stored.encode().unwrap();
        let back = StoredResponse::decode(&outcome, &filter()).unwrap();
        assert_eq!(back.status, StatusCode::CREATED);
        assert_eq!(back.body, Bytes::from_static(b"{}"));
        let names: Vec<_> = back.headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["content-type", "x-multi", "x-bin"]);
        let multi: Vec<_> = back.headers.get_all("x-multi").iter().collect();
        assert_eq!(multi, ["1", "2"]);
        assert_eq!(back.headers["x-bin"].as_bytes(), &[0x80, b'a']);
        assert!(back.trailers.is_none());
        assert_eq!(StoredResponse::origin_of(&outcome).unwrap().path, "/p");
    }

    #[test]
    fn responses_stored_before_the_origin_still_decode() {
        let old = StoredResponseV1 {
            status: 201,
            headers: vec![],
            body: Bytes::from_static(b"ok"),
            trailers: vec![],
        };
        let outcome = Outcome::new(codec::encode(&old).unwrap());
        let back = StoredResponse::decode(&outcome, &filter()).unwrap();
        assert_eq!(back.status, StatusCode::CREATED);
        assert_eq!(back.body, Bytes::from_static(b"ok"));
        assert!(StoredResponse::origin_of(&outcome).is_none());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let f = filter();
        assert!(StoredResponse::decode(&Outcome::new(Vec::new()), &f).is_err());
        assert!(StoredResponse::decode(&Outcome::new(vec![1, 2, 3]), &f).is_err());
        assert!(StoredResponse::decode(&Outcome::new(vec![9; 40]), &f).is_err());
        let bad_status = StoredResponse {
            status: 1000,
            headers: vec![],
            body: Bytes::new(),
            trailers: vec![],
            origin: None,
        };
        assert!(matches!(
            StoredResponse::decode(&bad_status.encode().unwrap(), &f),
            Err(DecodeError::Status(1000))
        ));
        let bad_header = StoredResponse {
            status: 200,
            headers: vec![StoredHeader {
                name: "bad name".into(),
                value: vec![],
            }],
            body: Bytes::new(),
            trailers: vec![],
            origin: None,
        };
        assert!(matches!(
            StoredResponse::decode(&bad_header.encode().unwrap(), &f),
            Err(DecodeError::Header)
        ));
    }
}
