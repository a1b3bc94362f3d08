//! Completing a key from an actix-web response, inside the handler's own
//! transaction.

use actix_web::HttpResponse;
use idem_core::{Error, Transition};
use idem_http::IdempotencyClaim;

use crate::convert;

/// [`IdempotencyClaim::prepare_response`] for an actix-web response, whose
/// status and headers are actix's (`http` 0.2) types.
///
/// Implemented for [`IdempotencyClaim`] only (sealed).
///
/// # Behavior
/// Encodes the response's status, headers (minus the hop-by-hop and denied
/// ones) and body exactly as the middleware stores a response, then calls
/// `Engine::prepare_complete`; errors as
/// [`prepare_response`](IdempotencyClaim::prepare_response). Headers that
/// actix adds when it sends the response (`content-length`, `date`) are
/// not stored either way. Return that same response from the handler.
///
/// ```no_run
/// use actix_web::http::{StatusCode, header};
/// use actix_web::{HttpResponse, web};
/// use idem_actix::{ClaimExt as _, IdempotencyClaim};
///
/// async fn create_payment(claim: web::ReqData<IdempotencyClaim>) -> actix_web::Result<HttpResponse<String>> {
///     // let mut tx = pool.begin().await?;   … business writes in `tx` …
///     let mut response = HttpResponse::with_body(StatusCode::CREATED, r#"{"id":"pay_1"}"#.to_owned());
///     response.headers_mut().insert(
///         header::CONTENT_TYPE,
///         header::HeaderValue::from_static("application/json"),
///     );
///     let done = claim
///         .prepare_actix_response(&response)
///         .map_err(actix_web::error::ErrorInternalServerError)?;
///     // store.apply_in(&mut tx, &done).await?;   // same transaction
///     // tx.commit().await?;
///     # let _ = done;
///     Ok(response)
/// }
/// ```
pub trait ClaimExt: sealed::Sealed {
    /// Prepares the completion of the key with `response` (see the trait
    /// docs), for a store to apply inside the handler's transaction.
    fn prepare_actix_response<B: AsRef<[u8]>>(
        &self,
        response: &HttpResponse<B>,
    ) -> Result<Transition, Error>;
}

impl ClaimExt for IdempotencyClaim {
    fn prepare_actix_response<B: AsRef<[u8]>>(
        &self,
        response: &HttpResponse<B>,
    ) -> Result<Transition, Error> {
        let head = convert::response_head(response);
        self.prepare_response(head.status, &head.headers, response.body().as_ref())
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for idem_http::IdempotencyClaim {}
}
