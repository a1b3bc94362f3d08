//! A fault-injecting TCP proxy for reliability tests.
//!
//! Put a [`FaultProxy`] between a store client and its server on loopback,
//! then switch [`Fault`]s on and off while the test runs: delay traffic, black-
//! hole it, lose the server's replies (the request reached the server, the
//! answer never came back), refuse new connections, or cut every open one.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use idem_faults::{Fault, FaultProxy};
//! let proxy = FaultProxy::start("127.0.0.1:6379".parse().unwrap()).await?;
//! let url = format!("redis://{}", proxy.addr()); // point the client here
//! proxy.set(Fault::DropReplies);                   // requests arrive, answers are lost
//! proxy.heal();                                    // back to normal
//! # let _ = url; Ok(()) }
//! ```
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy does to traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// Forward everything.
    #[default]
    None,
    /// Hold every chunk, in both directions, this long before forwarding it.
    Delay(Duration),
    /// Swallow every chunk in both directions; connections stay open and silent.
    BlackHole,
    /// Forward requests to the server, swallow its replies.
    DropReplies,
    /// Close new connections at once (existing ones keep working).
    Refuse,
}

#[derive(Debug)]
struct Shared {
    fault: Mutex<Fault>,
    cut: watch::Sender<u64>,
    open: AtomicUsize,
    accepted: AtomicU64,
    swallowed: AtomicU64,
}

impl Shared {
    fn fault(&self) -> Fault {
        *self.fault.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A TCP proxy on `127.0.0.1:<ephemeral>` in front of one upstream address.
///
/// # Behavior
/// - Faults apply to every connection, open or new, from the moment they are set.
/// - [`cut_all`](Self::cut_all) closes every open connection (both sides) at once.
/// - Dropping the proxy stops accepting and closes every connection.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy to `upstream`, listening on an ephemeral loopback port.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (cut, _) = watch::channel(0u64);
        let shared = Arc::new(Shared {
            fault: Mutex::new(Fault::None),
            cut,
            open: AtomicUsize::new(0),
            accepted: AtomicU64::new(0),
            swallowed: AtomicU64::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, upstream, shared.clone()));
        Ok(Self {
            addr,
            shared,
            accept,
        })
    }

    /// Where clients should connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Switches the fault for all traffic from now on.
    pub fn set(&self, fault: Fault) {
        *self
            .shared
            .fault
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = fault;
    }

    /// Back to forwarding everything.
    pub fn heal(&self) {
        self.set(Fault::None);
    }

    /// Closes every open connection now.
    pub fn cut_all(&self) {
        self.shared.cut.send_modify(|generation| *generation += 1);
    }

    /// Connections open right now.
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }

    /// Connections accepted since the start.
    pub fn accepted_connections(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Bytes swallowed by [`Fault::BlackHole`] and [`Fault::DropReplies`].
    pub fn swallowed_bytes(&self) -> u64 {
        self.shared.swallowed.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut_all();
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        if shared.fault() == Fault::Refuse {
            drop(client);
            continue;
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            shared.open.fetch_add(1, Ordering::SeqCst);
            let mut cut = shared.cut.subscribe();
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            let up = pump(
                client_read,
                server_write,
                shared.clone(),
                Direction::Request,
            );
            let down = pump(server_read, client_write, shared.clone(), Direction::Reply);
            tokio::select! {
                _ = async { tokio::join!(up, down) } => {}
                _ = cut.changed() => {}
            }
            shared.open.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Request,
    Reply,
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    shared: Arc<Shared>,
    direction: Direction,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let forward = match shared.fault() {
            Fault::None | Fault::Refuse => true,
            Fault::Delay(d) => {
                tokio::time::sleep(d).await;
                true
            }
            Fault::BlackHole => false,
            Fault::DropReplies => direction == Direction::Request,
        };
        if !forward {
            shared.swallowed.fetch_add(n as u64, Ordering::SeqCst);
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
