//! The HTTP contract suite against `idem-actix`: an actix-web `HttpServer`
//! on 127.0.0.1:0, in a thread with an actix `System` of its own, whose
//! every method and path goes through the `Idempotency` middleware to one
//! handler that asks the suite's `App` what to do.
//!
//! `cargo test -p idem-http-conformance --test actix`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::process::ExitCode;

use actix_web::dev::ServerHandle;
use actix_web::http::{StatusCode, header};
use actix_web::{HttpMessage as _, HttpRequest, HttpResponse, HttpServer, web};
use futures_util::future::BoxFuture;
use idem_actix::{Idempotency, IdempotencyClaim, NoEffect};
use idem_http_conformance::{
    Adapter, Answer, App, Call, Handled, PLANNED_PANIC, Server, Setup, TestClock, TestStore,
};
use tokio::sync::oneshot;

/// idem-actix over actix-web.
struct ActixAdapter;

impl Adapter for ActixAdapter {
    fn serve(&self, setup: Setup) -> BoxFuture<'static, Server> {
        Box::pin(start(setup))
    }

    fn name(&self) -> &'static str {
        "actix"
    }
}

/// Builds the middleware for `setup` and starts a server behind it on a
/// thread of its own.
async fn start(setup: Setup) -> Server {
    let tenant = setup.clone();
    let scope = move |req: &HttpRequest| tenant.scope_of(&to_http(req.headers()));
    let idem = setup
        .configure(Idempotency::builder(setup.engine.clone(), scope))
        .build();
    let (started, ready) = oneshot::channel();
    let app = setup.app.clone();
    std::thread::Builder::new()
        .name("actix-server".into())
        .spawn(move || serve(idem, app, started))
        .expect("a thread for the actix server");
    let (addr, handle) = ready.await.expect("the actix server started");
    Server::new(format!("http://{addr}"), Stop(handle))
}

/// Runs the server on this thread, in an actix `System` of its own, until
/// it is stopped; sends its address and handle once it listens.
fn serve(
    idem: Idempotency<TestStore, TestClock>,
    app: App,
    started: oneshot::Sender<(SocketAddr, ServerHandle)>,
) -> std::io::Result<()> {
    actix_web::rt::System::new().block_on(async move {
        let app = web::Data::new(app);
        let server = HttpServer::new(move || {
            actix_web::App::new()
                .app_data(app.clone())
                // The middleware limits bodies; the handler takes them whole.
                .app_data(web::PayloadConfig::new(usize::MAX))
                .wrap(idem.clone())
                .default_service(web::to(handle))
        })
        .workers(1)
        // A client's EOF drops its request's future at once, as hyper does.
        .h1_allow_half_closed(false)
        .disable_signals()
        .shutdown_timeout(1)
        .bind(("127.0.0.1", 0))?;
        let addr = server.addrs()[0];
        let server = server.run();
        let _ = started.send((addr, server.handle()));
        server.await
    })
}

/// Stops the server when dropped (the stop command is sent at once).
struct Stop(ServerHandle);

impl Drop for Stop {
    fn drop(&mut self) {
        drop(self.0.stop(false));
    }
}

/// The one handler: the request as a [`Call`] to the app, and its
/// [`Handled`] as the response.
async fn handle(app: web::Data<App>, req: HttpRequest, body: web::Bytes) -> HttpResponse {
    let call = Call {
        claim: req.extensions().get::<IdempotencyClaim>().cloned(),
        method: http::Method::from_bytes(req.method().as_str().as_bytes()).unwrap(),
        path: req.path().to_owned(),
        headers: to_http(req.headers()),
        body,
    };
    match app.handle(call).await {
        Handled::Respond(answer) => respond(answer),
        Handled::Panic => panic!("{PLANNED_PANIC}"),
    }
}

fn respond(answer: Answer) -> HttpResponse {
    let status = StatusCode::from_u16(answer.status.as_u16()).unwrap();
    let mut response = HttpResponse::with_body(status, answer.body).map_into_boxed_body();
    for (name, value) in &answer.headers {
        response.headers_mut().append(
            header::HeaderName::from_bytes(name.as_str().as_bytes()).unwrap(),
            header::HeaderValue::from_bytes(value.as_bytes()).unwrap(),
        );
    }
    if answer.no_effect {
        response.extensions_mut().insert(NoEffect);
    }
    response
}

/// actix's (`http` 0.2) headers as `http` 1 headers.
fn to_http(headers: &header::HeaderMap) -> http::HeaderMap {
    headers
        .iter()
        .map(|(name, value)| {
            (
                http::HeaderName::from_bytes(name.as_str().as_bytes()).unwrap(),
                http::HeaderValue::from_bytes(value.as_bytes()).unwrap(),
            )
        })
        .collect()
}

fn main() -> ExitCode {
    idem_http_conformance::run(ActixAdapter)
}
