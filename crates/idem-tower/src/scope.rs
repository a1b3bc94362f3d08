//! Deriving the [`Scope`] of a request.

use http::request::Parts;
use idem_core::Scope;
use idem_http::Rejection;

/// The scope of a request derived from an extension that an authentication
/// layer (placed *outside* the idempotency layer) put in the request.
///
/// # Behavior
/// Calls `to_scope` with the request's `T` extension; a request without one
/// is rejected with 401 (problem+json, `about:blank`), nothing claimed.
///
/// ```
/// use idem_core::Scope;
/// #[derive(Clone)]
/// struct User { tenant: String, id: String }
/// let scope = idem_tower::scope_from_extension(|u: &User| {
///     Scope::tenant(u.tenant.clone()).with_principal(u.id.clone())
/// });
/// # let _ = scope;
/// ```
pub fn scope_from_extension<T, F>(
    to_scope: F,
) -> impl Fn(&Parts) -> Result<Scope, Rejection> + Clone + Send + Sync + 'static
where
    T: Send + Sync + 'static,
    F: Fn(&T) -> Scope + Clone + Send + Sync + 'static,
{
    move |parts: &Parts| {
        parts
            .extensions
            .get::<T>()
            .map(&to_scope)
            .ok_or_else(Rejection::unauthenticated)
    }
}

/// One scope for every request: [`Scope::global`].
///
/// # Behavior
/// **Only for services with a single client.** Keys from different clients
/// share one namespace: two clients that happen to send the same key get
/// each other's responses (replay across clients) or 422s. Prefer
/// [`scope_from_extension`] or a function of the authenticated principal.
pub fn single_client_scope(_: &Parts) -> Result<Scope, Rejection> {
    Ok(Scope::global())
}
