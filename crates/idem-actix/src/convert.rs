//! Between actix-web's types (`http` 0.2) and the `http` 1 types of
//! [`idem_http`], by bytes and strings: both versions share one grammar for
//! methods, URIs, header names and values, so a conversion never fails for
//! a request actix parsed or a response it can send; where the types still
//! say it could, the failure is handled without a panic.

use actix_web::HttpResponse;
use actix_web::body::BoxBody;
use actix_web::dev::ServiceRequest;
use actix_web::http::{StatusCode as ActixStatus, Version as ActixVersion, header as actix_header};
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, Version, request, response,
};
use idem_http::Reply;

/// `method` as an `http` 1 method.
pub(crate) fn method(method: &actix_web::http::Method) -> Option<Method> {
    Method::from_bytes(method.as_str().as_bytes()).ok()
}

/// The head of `req` (method, URI, version, headers; no extensions).
pub(crate) fn request_head(req: &ServiceRequest) -> Option<request::Parts> {
    let (mut head, ()) = http::Request::new(()).into_parts();
    head.method = method(req.method())?;
    head.uri = Uri::try_from(req.uri().to_string()).ok()?;
    head.version = version(req.version());
    head.headers = headers(req.headers());
    Some(head)
}

/// The status and headers of `res` (no extensions: actix's are not
/// `http`'s).
pub(crate) fn response_head<B>(res: &HttpResponse<B>) -> response::Parts {
    let (mut head, ()) = http::Response::new(()).into_parts();
    head.status = status(res.status());
    head.headers = headers(res.headers());
    head
}

/// `status` as an `http` 1 status.
pub(crate) fn status(status: ActixStatus) -> StatusCode {
    StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

fn version(v: ActixVersion) -> Version {
    if v == ActixVersion::HTTP_09 {
        Version::HTTP_09
    } else if v == ActixVersion::HTTP_10 {
        Version::HTTP_10
    } else if v == ActixVersion::HTTP_2 {
        Version::HTTP_2
    } else if v == ActixVersion::HTTP_3 {
        Version::HTTP_3
    } else {
        Version::HTTP_11
    }
}

/// actix headers as `http` 1 headers, every value in order.
pub(crate) fn headers(from: &actix_header::HeaderMap) -> HeaderMap {
    let mut to = HeaderMap::with_capacity(from.len());
    for (name, value) in from.iter() {
        match (
            HeaderName::from_bytes(name.as_str().as_bytes()),
            HeaderValue::from_bytes(value.as_bytes()),
        ) {
            (Ok(name), Ok(value)) => {
                to.append(name, value);
            }
            _ => {
                tracing::warn!(header = %name, "idem: a header does not convert to http 1; left out")
            }
        }
    }
    to
}

/// A reply of the contract as an actix response.
///
/// # Behavior
/// Status, headers and body as they are; actix adds `content-length` and
/// `date`. Trailers are not sent: actix-web cannot send HTTP trailers, and
/// a reply has some only under gRPC, which actix-web does not serve.
pub(crate) fn response(reply: Reply) -> HttpResponse<BoxBody> {
    let status =
        ActixStatus::from_u16(reply.status.as_u16()).unwrap_or(ActixStatus::INTERNAL_SERVER_ERROR);
    let mut res = HttpResponse::with_body(status, BoxBody::new(reply.body));
    let to = res.headers_mut();
    for (name, value) in &reply.headers {
        match (
            actix_header::HeaderName::from_bytes(name.as_str().as_bytes()),
            actix_header::HeaderValue::from_bytes(value.as_bytes()),
        ) {
            (Ok(name), Ok(value)) => to.append(name, value),
            _ => {
                tracing::warn!(header = %name, "idem: a header does not convert to actix; left out")
            }
        }
    }
    res
}
