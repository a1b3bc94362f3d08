//! Request and response bodies: the request payload read for the contract,
//! and a handler's response body kept up to the outcome limit.

use std::error::Error as StdError;
use std::future::poll_fn;
use std::pin::Pin;
use std::task::{Context, Poll};

use actix_web::body::{BodySize, MessageBody};
use actix_web::dev::Payload;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt as _;
use futures_util::future::LocalBoxFuture;
use idem_http::{ReadBody, ReadError};

/// The request payload, as the contract reads it: whole, up to the limit.
pub(crate) struct Incoming(pub(crate) Payload);

impl ReadBody for Incoming {
    type Read = LocalBoxFuture<'static, Result<Bytes, ReadError>>;

    fn read(self, limit: usize) -> Self::Read {
        let Self(mut payload) = self;
        Box::pin(async move {
            let mut read = BytesMut::new();
            while let Some(chunk) = payload.next().await {
                let chunk = chunk.map_err(|e| ReadError::Unreadable(Box::new(e)))?;
                if chunk.len() > limit.saturating_sub(read.len()) {
                    return Err(ReadError::TooLarge);
                }
                read.extend_from_slice(&chunk);
            }
            Ok(read.freeze())
        })
    }
}

/// Why a response body was not kept whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cut {
    /// It is longer than the outcome limit.
    TooLarge,
    /// It failed mid-stream.
    Failed,
}

/// Reads `body` into memory, up to `limit` bytes: the whole body, or why
/// not and the body to send instead (what was read, then the rest).
pub(crate) async fn keep<B: MessageBody>(
    body: B,
    limit: usize,
) -> Result<Bytes, (Cut, Resumed<B>)> {
    let size = body.size();
    let body = match body.try_into_bytes() {
        Ok(whole) if whole.len() <= limit => return Ok(whole),
        Ok(whole) => return Err((Cut::TooLarge, Resumed::new(whole, None, size))),
        Err(body) => body,
    };
    let mut body = Box::pin(body);
    if matches!(size, BodySize::Sized(len) if len > limit as u64) {
        return Err((Cut::TooLarge, Resumed::new(Bytes::new(), Some(body), size)));
    }
    let mut read = BytesMut::new();
    while let Some(chunk) = poll_fn(|cx| body.as_mut().poll_next(cx)).await {
        match chunk {
            Ok(chunk) => {
                read.extend_from_slice(&chunk);
                if read.len() > limit {
                    return Err((Cut::TooLarge, Resumed::new(read.freeze(), Some(body), size)));
                }
            }
            Err(error) => {
                let mut failed = Resumed::new(read.freeze(), None, BodySize::Stream);
                failed.error = Some(error.into());
                return Err((Cut::Failed, failed));
            }
        }
    }
    Ok(read.freeze())
}

/// A response body sent on after [`keep`] stopped: the bytes it read, then
/// the rest of the body, or the error it failed with.
pub(crate) struct Resumed<B> {
    read: Bytes,
    rest: Option<Pin<Box<B>>>,
    error: Option<Box<dyn StdError>>,
    size: BodySize,
}

impl<B> Resumed<B> {
    fn new(read: Bytes, rest: Option<Pin<Box<B>>>, size: BodySize) -> Self {
        Self {
            read,
            rest,
            error: None,
            size,
        }
    }
}

impl<B: MessageBody> MessageBody for Resumed<B> {
    type Error = Box<dyn StdError>;

    /// The size of the whole body (what was read is part of it).
    fn size(&self) -> BodySize {
        self.size
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        let this = self.get_mut();
        if !this.read.is_empty() {
            return Poll::Ready(Some(Ok(std::mem::take(&mut this.read))));
        }
        if let Some(error) = this.error.take() {
            return Poll::Ready(Some(Err(error)));
        }
        match &mut this.rest {
            Some(rest) => rest
                .as_mut()
                .poll_next(cx)
                .map(|next| next.map(|chunk| chunk.map_err(Into::into))),
            None => Poll::Ready(None),
        }
    }
}
