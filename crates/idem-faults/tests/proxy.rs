//! The proxy against a loopback echo server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use idem_faults::{Fault, FaultProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An echo server counting the bytes it received.
async fn echo() -> (std::net::SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = sock.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    counter.fetch_add(n as u64, Ordering::SeqCst);
                    if sock.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, received)
}

/// How long a roundtrip that must come back may take: far more than a
/// loaded machine needs, so only a broken proxy misses it.
const ECHOED: Duration = Duration::from_secs(5);
/// How long a roundtrip that must *not* come back is watched (no event
/// announces that nothing came): a slow machine cannot fail this look, and
/// a reply the proxy leaked would come within it on loopback.
const SILENT: Duration = Duration::from_millis(200);

/// Sends `msg` and reads as many bytes back within `within`; `None` if they
/// do not all come.
async fn roundtrip(sock: &mut TcpStream, msg: &[u8], within: Duration) -> Option<Vec<u8>> {
    sock.write_all(msg).await.ok()?;
    let mut buf = vec![0u8; msg.len()];
    match tokio::time::timeout(within, sock.read_exact(&mut buf)).await {
        Ok(Ok(_)) => Some(buf),
        _ => None,
    }
}

async fn wait_for(mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached"
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn forwards_loses_replies_and_cuts() {
    let (upstream, received) = echo().await;
    let proxy = FaultProxy::start(upstream).await.unwrap();
    let mut sock = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(
        roundtrip(&mut sock, b"ping", ECHOED).await.as_deref(),
        Some(&b"ping"[..])
    );

    // The request reaches the server; the reply is lost.
    proxy.set(Fault::DropReplies);
    assert_eq!(roundtrip(&mut sock, b"lost", SILENT).await, None);
    wait_for(|| received.load(Ordering::SeqCst) == 8).await;
    assert!(proxy.swallowed_bytes() >= 4);

    // Black hole: nothing reaches the server.
    proxy.set(Fault::BlackHole);
    let mut other = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(roundtrip(&mut other, b"void", SILENT).await, None);
    assert_eq!(received.load(Ordering::SeqCst), 8);

    // Healed: a fresh connection works again; cut_all closes every connection.
    proxy.heal();
    let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(
        roundtrip(&mut fresh, b"back", ECHOED).await.as_deref(),
        Some(&b"back"[..])
    );
    wait_for(|| proxy.open_connections() == 3).await;
    proxy.cut_all();
    let mut buf = [0u8; 4];
    let read = tokio::time::timeout(Duration::from_secs(5), fresh.read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    wait_for(|| proxy.open_connections() == 0).await;

    // Refuse: new connections are closed at once.
    proxy.set(Fault::Refuse);
    let mut refused = TcpStream::connect(proxy.addr()).await.unwrap();
    let read = tokio::time::timeout(Duration::from_secs(5), refused.read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}
