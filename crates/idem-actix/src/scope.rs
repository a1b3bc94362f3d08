//! Deriving the [`Scope`] of a request.

use actix_web::{HttpMessage as _, HttpRequest};
use idem_core::Scope;
use idem_http::Rejection;

/// A scope function: whose key a request carries, from the actix
/// [`HttpRequest`] (its extensions, its headers), or the [`Rejection`] it
/// is answered with (nothing claimed, the handler not called).
///
/// # Behavior
/// Implemented by every `Fn(&HttpRequest) -> Result<Scope, Rejection>`
/// that is `Send + Sync + 'static`: [`scope_from_extension`],
/// [`single_client_scope`], or your own function of the principal your
/// authentication middleware put in the request.
pub trait ScopeFunction:
    Fn(&HttpRequest) -> Result<Scope, Rejection> + Send + Sync + 'static
{
}

impl<F> ScopeFunction for F where
    F: Fn(&HttpRequest) -> Result<Scope, Rejection> + Send + Sync + 'static
{
}

/// The scope of a request derived from an extension that an authentication
/// middleware (wrapped *outside* [`Idempotency`](crate::Idempotency), that
/// is registered after it with `App::wrap`) put in the request.
///
/// # Behavior
/// Calls `to_scope` with the request's `T` extension; a request without one
/// is rejected with 401 ([`Rejection::unauthenticated`]), nothing claimed.
///
/// ```
/// use idem_core::Scope;
/// #[derive(Clone)]
/// struct User { tenant: String, id: String }
/// let scope = idem_actix::scope_from_extension(|u: &User| {
///     Scope::tenant(u.tenant.clone()).with_principal(u.id.clone())
/// });
/// # let _ = scope;
/// ```
pub fn scope_from_extension<T, F>(
    to_scope: F,
) -> impl Fn(&HttpRequest) -> Result<Scope, Rejection> + Clone + Send + Sync + 'static
where
    T: 'static,
    F: Fn(&T) -> Scope + Clone + Send + Sync + 'static,
{
    move |req: &HttpRequest| match req.extensions().get::<T>() {
        Some(principal) => Ok(to_scope(principal)),
        None => Err(Rejection::unauthenticated()),
    }
}

/// One scope for every request: [`Scope::global`].
///
/// # Behavior
/// **Only for services with a single client.** Keys from different clients
/// share one namespace: two clients that happen to send the same key get
/// each other's responses (replay across clients) or 422s. Prefer
/// [`scope_from_extension`] or a function of the authenticated principal.
pub fn single_client_scope(_: &HttpRequest) -> Result<Scope, Rejection> {
    Ok(Scope::global())
}
