//! [`Message`]: a delivery as the handler and the observer see it, and
//! where its key comes from.

use std::sync::Arc;

use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable};

/// A delivered message, without the means to acknowledge it (the consumer
/// does that once the engine settled). Cheap to clone.
#[derive(Clone, Debug)]
pub struct Message {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    key: Option<String>,
    key_source: KeySource,
    payload: Vec<u8>,
    exchange: String,
    routing_key: String,
    redelivered: bool,
    delivery_tag: u64,
    properties: BasicProperties,
}

/// Where a message's key was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeySource {
    /// The key header ([`Config::with_key_header`](crate::Config::with_key_header)).
    Header,
    /// The AMQP `message_id` property.
    MessageId,
    /// Nowhere: the message is dead-lettered unrun.
    Missing,
}

impl Message {
    pub(crate) fn of(delivery: &Delivery, header: &str, message_id_fallback: bool) -> Self {
        let (key, key_source) = match header_string(delivery.properties.headers().as_ref(), header)
        {
            Some(key) => (Some(key), KeySource::Header),
            None => match delivery.properties.message_id() {
                Some(id) if message_id_fallback && !id.as_str().is_empty() => {
                    (Some(id.as_str().to_string()), KeySource::MessageId)
                }
                _ => (None, KeySource::Missing),
            },
        };
        Self {
            inner: Arc::new(Inner {
                key,
                key_source,
                payload: delivery.data.clone(),
                exchange: delivery.exchange.as_str().to_string(),
                routing_key: delivery.routing_key.as_str().to_string(),
                redelivered: delivery.redelivered,
                delivery_tag: delivery.delivery_tag,
                properties: delivery.properties.clone(),
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

    /// The body.
    pub fn payload(&self) -> &[u8] {
        &self.inner.payload
    }

    /// The exchange it was published to (empty: the default exchange; a
    /// copy back from a delay queue: the default exchange too).
    pub fn exchange(&self) -> &str {
        &self.inner.exchange
    }

    /// Its routing key.
    pub fn routing_key(&self) -> &str {
        &self.inner.routing_key
    }

    /// RabbitMQ's `redelivered` flag: the broker delivered it before (to a
    /// consumer that died or requeued it). A copy back from a delay queue is
    /// a new message: see [`delays`](Self::delays).
    pub fn redelivered(&self) -> bool {
        self.inner.redelivered
    }

    /// How many times the message went through a delay queue
    /// ([`DELAYS_HEADER`](crate::DELAYS_HEADER)).
    pub fn delays(&self) -> u64 {
        header(
            self.inner.properties.headers().as_ref(),
            crate::DELAYS_HEADER,
        )
        .and_then(as_u64)
        .unwrap_or(0)
    }

    /// The delivery tag on the consumer's channel.
    pub fn delivery_tag(&self) -> u64 {
        self.inner.delivery_tag
    }

    /// The AMQP properties (headers included).
    pub fn properties(&self) -> &BasicProperties {
        &self.inner.properties
    }

    /// Header `name` as a string (an AMQP long or short string in UTF-8),
    /// matched ignoring ASCII case (an exact match wins).
    pub fn header_str(&self, name: &str) -> Option<String> {
        header_string(self.inner.properties.headers().as_ref(), name)
    }
}

/// Header `name` of `headers`: an exact match, else one ignoring ASCII case.
pub(crate) fn header<'a>(headers: Option<&'a FieldTable>, name: &str) -> Option<&'a AMQPValue> {
    let table = headers?.inner();
    table
        .iter()
        .find(|(k, _)| k.as_str() == name)
        .map(|(_, v)| v)
        .or_else(|| {
            table
                .iter()
                .find(|(k, _)| k.as_str().eq_ignore_ascii_case(name))
                .map(|(_, v)| v)
        })
}

/// Header `name` as a non-empty UTF-8 string.
fn header_string(headers: Option<&FieldTable>, name: &str) -> Option<String> {
    let bytes = match header(headers, name)? {
        AMQPValue::LongString(s) => s.as_bytes().to_vec(),
        AMQPValue::ShortString(s) => s.as_str().as_bytes().to_vec(),
        AMQPValue::ByteArray(b) => b.as_slice().to_vec(),
        _ => return None,
    };
    String::from_utf8(bytes).ok().filter(|s| !s.is_empty())
}

fn as_u64(value: &AMQPValue) -> Option<u64> {
    match *value {
        AMQPValue::LongLongInt(n) => u64::try_from(n).ok(),
        AMQPValue::LongInt(n) => u64::try_from(n).ok(),
        AMQPValue::LongUInt(n) => Some(u64::from(n)),
        AMQPValue::ShortInt(n) => u64::try_from(n).ok(),
        AMQPValue::ShortUInt(n) => Some(u64::from(n)),
        AMQPValue::ShortShortInt(n) => u64::try_from(n).ok(),
        AMQPValue::ShortShortUInt(n) => Some(u64::from(n)),
        AMQPValue::Timestamp(n) => Some(n),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{LongString, ShortString};

    fn delivery(headers: Option<FieldTable>, message_id: Option<&str>) -> Delivery {
        let mut d = Delivery::mock(7, "ex".into(), "rk".into(), false, b"body".to_vec());
        let mut props = BasicProperties::default();
        if let Some(h) = headers {
            props = props.with_headers(h);
        }
        if let Some(id) = message_id {
            props = props.with_message_id(ShortString::from(id));
        }
        d.properties = props;
        d
    }

    fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert((*k).into(), v.clone());
        }
        t
    }

    fn long(s: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(s))
    }

    #[test]
    fn the_key_comes_from_the_header_then_the_message_id() {
        let h = table(&[("Idempotency-Key", long("k-1"))]);
        let m = Message::of(&delivery(Some(h), Some("id-1")), "Idempotency-Key", true);
        assert_eq!((m.key(), m.key_source()), (Some("k-1"), KeySource::Header));

        let h = table(&[("idempotency-key", long("k-2"))]);
        let m = Message::of(&delivery(Some(h), None), "Idempotency-Key", true);
        assert_eq!(m.key(), Some("k-2"), "case-insensitive");

        let m = Message::of(&delivery(None, Some("id-3")), "Idempotency-Key", true);
        assert_eq!(
            (m.key(), m.key_source()),
            (Some("id-3"), KeySource::MessageId)
        );

        let m = Message::of(&delivery(None, Some("id-4")), "Idempotency-Key", false);
        assert_eq!((m.key(), m.key_source()), (None, KeySource::Missing));

        // Not a string, or empty: no key from the header.
        let h = table(&[("Idempotency-Key", AMQPValue::LongInt(5))]);
        let m = Message::of(&delivery(Some(h), None), "Idempotency-Key", true);
        assert_eq!(m.key(), None);
        let h = table(&[("Idempotency-Key", long(""))]);
        let m = Message::of(&delivery(Some(h), Some("")), "Idempotency-Key", true);
        assert_eq!(m.key(), None);
    }

    #[test]
    fn an_exact_header_match_wins() {
        let h = table(&[
            ("idempotency-key", long("lower")),
            ("Idempotency-Key", long("exact")),
        ]);
        let m = Message::of(&delivery(Some(h), None), "Idempotency-Key", true);
        assert_eq!(m.key(), Some("exact"));
    }

    #[test]
    fn the_delay_count_is_read_from_its_header() {
        let h = table(&[(crate::DELAYS_HEADER, AMQPValue::LongLongInt(3))]);
        let m = Message::of(&delivery(Some(h), None), "Idempotency-Key", true);
        assert_eq!(m.delays(), 3);
        assert_eq!(m.payload(), b"body");
        assert_eq!(
            (m.exchange(), m.routing_key(), m.delivery_tag()),
            ("ex", "rk", 7)
        );
    }
}
