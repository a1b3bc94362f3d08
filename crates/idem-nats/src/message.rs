//! [`Message`]: a delivery as the handler and the observer see it, and where
//! its key comes from.

use std::sync::Arc;

use async_nats::jetstream;
use async_nats::{HeaderMap, HeaderValue, header};
use bytes::Bytes;

use crate::Config;

/// A delivered JetStream message, without the means to acknowledge it (the
/// [`Consumer`](crate::Consumer) does that once the engine settled). Cheap
/// to clone.
#[derive(Clone, Debug)]
pub struct Message {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    key: Option<String>,
    key_source: KeySource,
    subject: String,
    payload: Bytes,
    headers: HeaderMap,
    stream: Option<String>,
    stream_sequence: Option<u64>,
    delivered: Option<i64>,
}

/// Where a message's key was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeySource {
    /// The key header ([`Config::with_key_header`]).
    Header,
    /// The `Nats-Msg-Id` header (JetStream's publish-deduplication id), the
    /// fallback ([`Config::with_msg_id_fallback`]).
    MsgId,
    /// Nowhere: the message is dead-lettered unrun.
    Missing,
}

impl Message {
    /// The view of `message` under `config`: where its key comes from.
    ///
    /// # Behavior
    /// The key is, in this order: the key header (exact name first, then
    /// ignoring ASCII case; present but empty, it is still the key, which the
    /// engine refuses as invalid); else, with the fallback on, a non-empty
    /// `Nats-Msg-Id`; else none.
    pub fn new(message: &jetstream::Message, config: &Config) -> Self {
        let headers = message.headers.clone().unwrap_or_default();
        let (key, key_source) = match header_value(&headers, &config.key_header) {
            Some(value) => (Some(value.as_str().to_string()), KeySource::Header),
            None => match headers.get(header::NATS_MESSAGE_ID) {
                Some(id) if config.msg_id_fallback && !id.as_str().is_empty() => {
                    (Some(id.as_str().to_string()), KeySource::MsgId)
                }
                _ => (None, KeySource::Missing),
            },
        };
        let info = message.info().ok();
        Self {
            inner: Arc::new(Inner {
                key,
                key_source,
                subject: message.subject.as_str().to_string(),
                payload: message.payload.clone(),
                headers,
                stream: info.as_ref().map(|i| i.stream.to_string()),
                stream_sequence: info.as_ref().map(|i| i.stream_sequence),
                delivered: info.as_ref().map(|i| i.delivered),
            }),
        }
    }

    /// The idempotency key (`None` only for a message that had none: such a
    /// message reaches the observer, never the handler).
    pub fn key(&self) -> Option<&str> {
        self.inner.key.as_deref()
    }

    /// Where the key came from.
    pub fn key_source(&self) -> KeySource {
        self.inner.key_source
    }

    /// The subject it was published to.
    pub fn subject(&self) -> &str {
        &self.inner.subject
    }

    /// The payload.
    pub fn payload(&self) -> &Bytes {
        &self.inner.payload
    }

    /// Every header (empty when the message had none).
    pub fn headers(&self) -> &HeaderMap {
        &self.inner.headers
    }

    /// The first value of header `name` (exact name first, then ignoring
    /// ASCII case); `None` for an absent header or a name NATS cannot carry.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name: header::HeaderName = name.parse().ok()?;
        header_value(&self.inner.headers, &name).map(HeaderValue::as_str)
    }

    /// The stream it is stored in (from its acknowledgement subject).
    pub fn stream(&self) -> Option<&str> {
        self.inner.stream.as_deref()
    }

    /// Its sequence number in the stream.
    pub fn stream_sequence(&self) -> Option<u64> {
        self.inner.stream_sequence
    }

    /// How many times JetStream delivered it, this delivery included (1 for
    /// the first).
    pub fn delivered(&self) -> Option<i64> {
        self.inner.delivered
    }

    /// Whether JetStream delivered it before (a delivery count above 1).
    pub fn is_redelivery(&self) -> bool {
        self.inner.delivered.is_some_and(|d| d > 1)
    }
}

/// The first value of `name`: an exact match, else a match ignoring ASCII
/// case.
fn header_value<'a>(headers: &'a HeaderMap, name: &header::HeaderName) -> Option<&'a HeaderValue> {
    headers.get(name.clone()).or_else(|| {
        let wanted: &str = name.as_ref();
        headers
            .iter()
            .find(|(n, _)| {
                let n: &str = n.as_ref();
                n.eq_ignore_ascii_case(wanted)
            })
            .and_then(|(_, values)| values.first())
    })
}
