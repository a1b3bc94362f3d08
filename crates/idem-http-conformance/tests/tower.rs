//! The HTTP contract suite against `idem-tower`: an axum server on
//! 127.0.0.1:0 whose every method and path goes through the
//! `IdempotencyLayer` to one handler that asks the suite's `App` what to do.
//!
//! `cargo test -p idem-http-conformance --test tower`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::ExitCode;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use http::request::Parts;
use idem_http_conformance::{Adapter, App, BoxFuture, Call, Handled, PLANNED_PANIC, Server, Setup};
use idem_tower::{IdempotencyClaim, IdempotencyLayer, NoEffect};

/// idem-tower over axum.
pub struct Tower;

impl Adapter for Tower {
    fn name(&self) -> &'static str {
        "tower"
    }

    fn serve(&self, setup: Setup) -> BoxFuture<'static, Server> {
        Box::pin(async move {
            let scope = setup.clone();
            let builder = IdempotencyLayer::builder(setup.engine.clone(), move |parts: &Parts| {
                scope.scope_of(&parts.headers)
            });
            let layer = setup.configure(builder).build();
            serve(app_router(setup.app.clone()).layer(layer)).await
        })
    }
}

/// Every method and path to one handler that asks `app` what to do.
pub fn app_router(app: App) -> Router {
    Router::new().fallback(move |request: Request| handle(app.clone(), request))
}

/// Turns the request into a [`Call`], asks the app, and answers what it
/// says.
async fn handle(app: App, request: Request) -> Response {
    let claim = request.extensions().get::<IdempotencyClaim>().cloned();
    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(body) => body,
        Err(e) => return (http::StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    let call = Call {
        method: parts.method,
        path: parts.uri.path().to_owned(),
        headers: parts.headers,
        body,
        claim,
    };
    match app.handle(call).await {
        Handled::Respond(answer) => {
            let mut response = Response::new(Body::from(answer.body));
            *response.status_mut() = answer.status;
            *response.headers_mut() = answer.headers;
            if answer.no_effect {
                response.extensions_mut().insert(NoEffect);
            }
            response
        }
        Handled::Panic => panic!("{PLANNED_PANIC}"),
    }
}

/// Stops the server when dropped.
struct Stop(tokio::task::JoinHandle<()>);

impl Drop for Stop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves `router` on 127.0.0.1:0 until the returned server is dropped.
pub async fn serve(router: Router) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local address");
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    Server::new(format!("http://{addr}"), Stop(task))
}

fn main() -> ExitCode {
    idem_http_conformance::run(Tower)
}
