//! How a handler declares that its request took no effect.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// A response extension by which a handler declares that **nothing took
/// effect**: the layer then releases the key instead of storing the response,
/// and a retry with the same key runs the handler afresh.
///
/// # Behavior
/// - Insert it in a response that must not be replayed because the operation
///   did not happen (a dependency was down before anything was written, a
///   rate limit, a lock not acquired). The response is returned to this
///   client as is; nothing is stored.
/// - Without it, a response the layer does not store (by default a 5xx, see
///   [`store_response_if`](crate::Builder::store_response_if)),
///   an error of the inner service, a panic, or a response body that fails
///   mid-stream is **ambiguous**: the work may have taken effect. The key is
///   then finished with an `outcome-unknown` answer
///   ([`ProblemType::OutcomeUnknown`](crate::ProblemType::OutcomeUnknown))
///   and never run again.
/// - Declaring it after an effect happened lets a retry run the effect
///   again: declare only what you know.
/// - For errors and panics, where no response can carry it, use
///   [`IdempotencyClaim::declare_no_effect`](crate::IdempotencyClaim::declare_no_effect).
///
/// ```
/// use http::{Response, StatusCode};
/// use idem_http::NoEffect;
///
/// fn processor_down() -> Response<&'static str> {
///     // Nothing was charged: let the client's retry run again.
///     let mut response = Response::new("processor down");
///     *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
///     response.extensions_mut().insert(NoEffect); // actix: HttpResponse::extensions_mut
///     response
/// }
/// # let _ = processor_down();
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NoEffect;

/// The flag a claim's [`declare_no_effect`](crate::IdempotencyClaim::declare_no_effect) sets.
#[derive(Clone, Debug, Default)]
pub(crate) struct NoEffectFlag(Arc<AtomicBool>);

impl NoEffectFlag {
    pub(crate) fn set(&self) {
        self.0.store(true, Ordering::Release);
    }
    pub(crate) fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}
