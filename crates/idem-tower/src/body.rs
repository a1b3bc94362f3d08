//! The response body type of the layer.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    /// The body of every response the layer returns.
    ///
    /// # Behavior
    /// - Requests the layer does not handle (other methods, no key) get the
    ///   inner service's body untouched, streamed.
    /// - Fresh responses that are stored were buffered to store them, and
    ///   are returned from that buffer, byte for byte, trailers included.
    /// - Replays and the layer's own problem responses are buffered bytes.
    /// - A fresh response too large to store is returned as the buffered
    ///   prefix followed by the rest of the inner body, streamed.
    /// - If the inner body failed while being buffered, the bytes read so far
    ///   are returned, then the inner body's error.
    pub struct ResponseBody<B: Body> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B: Body> {
        Inner { #[pin] body: B },
        Full { data: Option<Bytes>, trailers: Option<HeaderMap> },
        Chain { prefix: VecDeque<Bytes>, rest: Pin<Box<B>> },
        Failed { prefix: VecDeque<Bytes>, error: Option<B::Error> },
    }
}

impl<B: Body> ResponseBody<B> {
    /// The inner service's body, passed through.
    pub fn inner(body: B) -> Self {
        Self {
            kind: Kind::Inner { body },
        }
    }

    /// A body of buffered bytes.
    pub fn full(data: impl Into<Bytes>) -> Self {
        Self::full_with_trailers(data.into(), None)
    }

    pub(crate) fn full_with_trailers(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        Self {
            kind: Kind::Full {
                data: Some(data),
                trailers,
            },
        }
    }

    pub(crate) fn chain(prefix: VecDeque<Bytes>, rest: Pin<Box<B>>) -> Self {
        Self {
            kind: Kind::Chain { prefix, rest },
        }
    }

    pub(crate) fn failed(prefix: VecDeque<Bytes>, error: B::Error) -> Self {
        Self {
            kind: Kind::Failed {
                prefix,
                error: Some(error),
            },
        }
    }
}

impl<B: Body> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Inner { .. } => "inner",
            Kind::Full { .. } => "full",
            Kind::Chain { .. } => "chain",
            Kind::Failed { .. } => "failed",
        };
        f.debug_struct("ResponseBody").field("kind", &kind).finish()
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            KindProj::Inner { body } => body.poll_frame(cx),
            KindProj::Full { data, trailers } => {
                if let Some(data) = data.take().filter(|d| !d.is_empty()) {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
            KindProj::Chain { prefix, rest } => match prefix.pop_front() {
                Some(chunk) => Poll::Ready(Some(Ok(Frame::data(chunk)))),
                None => rest.as_mut().poll_frame(cx),
            },
            KindProj::Failed { prefix, error } => match prefix.pop_front() {
                Some(chunk) => Poll::Ready(Some(Ok(Frame::data(chunk)))),
                None => Poll::Ready(error.take().map(Err)),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body } => body.is_end_stream(),
            Kind::Full { data, trailers } => {
                data.as_ref().is_none_or(Bytes::is_empty) && trailers.is_none()
            }
            Kind::Chain { prefix, rest } => prefix.is_empty() && rest.is_end_stream(),
            Kind::Failed { prefix, error } => prefix.is_empty() && error.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body } => body.size_hint(),
            Kind::Full { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Chain { prefix, rest } => {
                let buffered: u64 = prefix.iter().map(|c| c.len() as u64).sum();
                let rest = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower().saturating_add(buffered));
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper.saturating_add(buffered));
                }
                hint
            }
            Kind::Failed { .. } => SizeHint::new(),
        }
    }
}

/// What buffering a response body gave.
pub(crate) enum Buffered<B: Body> {
    /// The whole body, within the limit.
    Complete {
        data: Bytes,
        trailers: Option<HeaderMap>,
    },
    /// More than the limit: what was read, and the rest.
    TooLarge {
        prefix: VecDeque<Bytes>,
        rest: Pin<Box<B>>,
    },
    /// The body failed: what was read, and the error.
    Failed {
        prefix: VecDeque<Bytes>,
        error: B::Error,
    },
}

/// Reads `body` into memory, up to `limit` bytes of data.
pub(crate) async fn buffer<B>(body: B, limit: usize) -> Buffered<B>
where
    B: Body<Data = Bytes>,
{
    use http_body_util::BodyExt as _;
    let mut body = Box::pin(body);
    let mut chunks: VecDeque<Bytes> = VecDeque::new();
    if body.size_hint().lower() > limit as u64 {
        return Buffered::TooLarge {
            prefix: chunks,
            rest: body,
        };
    }
    let mut len = 0usize;
    let mut trailers: Option<HeaderMap> = None;
    loop {
        match body.frame().await {
            None => break,
            Some(Err(error)) => {
                return Buffered::Failed {
                    prefix: chunks,
                    error,
                };
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    len = len.saturating_add(data.len());
                    if !data.is_empty() {
                        chunks.push_back(data);
                    }
                    if len > limit {
                        return Buffered::TooLarge {
                            prefix: chunks,
                            rest: body,
                        };
                    }
                }
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        match &mut trailers {
                            Some(all) => all.extend(t),
                            None => trailers = Some(t),
                        }
                    }
                }
            },
        }
    }
    let data = match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop_front().unwrap_or_default(),
        _ => {
            let mut all = Vec::with_capacity(len);
            for chunk in &chunks {
                all.extend_from_slice(chunk);
            }
            Bytes::from(all)
        }
    };
    Buffered::Complete { data, trailers }
}

/// A reply of the contract as the layer's response.
pub(crate) fn reply<B: Body>(reply: idem_http::Reply) -> http::Response<ResponseBody<B>> {
    let (response, trailers) = reply.into_response();
    response.map(|data| ResponseBody::full_with_trailers(data, trailers))
}
