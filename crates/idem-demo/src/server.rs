//! Binding and running the service.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::DemoError;
use crate::backend::Backend;

/// How long [`RunningServer::shutdown`] waits for open connections.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The service, serving on a bound address in this process.
#[derive(Debug)]
pub struct RunningServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
    /// The completer of abandoned orders, running beside the server.
    completer: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
    backend: Backend,
}

impl RunningServer {
    /// Binds `addr` (port 0 for a free port) and serves `backend` on it,
    /// with the backend's [completer](Backend::completer) running beside it
    /// if it has one.
    pub async fn start(addr: SocketAddr, backend: Backend) -> Result<Self, DemoError> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let router = backend.router();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await
        });
        let completer = backend.completer().cloned().map(|completer| {
            let (stop, stopped) = oneshot::channel::<()>();
            let task = tokio::spawn(async move {
                completer
                    .run(async move {
                        let _ = stopped.await;
                    })
                    .await;
            });
            (stop, task)
        });
        Ok(Self {
            addr,
            stop: Some(stop),
            task,
            completer,
            backend,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The backend served.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// Waits until the server stops on its own (an I/O error of the listener).
    pub async fn wait(&mut self) -> Result<(), DemoError> {
        match (&mut self.task).await {
            Ok(result) => Ok(result?),
            Err(e) => Err(DemoError::Io(std::io::Error::other(e))),
        }
    }

    /// Stops the completer (after its pass under way) and accepting
    /// connections, and waits (up to 5 s each) for open ones.
    pub async fn shutdown(mut self) {
        if let Some((stop, mut task)) = self.completer.take() {
            let _ = stop.send(());
            if tokio::time::timeout(SHUTDOWN_GRACE, &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if tokio::time::timeout(SHUTDOWN_GRACE, &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
        }
    }
}
