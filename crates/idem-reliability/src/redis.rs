//! Redis behind a fault proxy: a [`FaultProxy`] in front of the standalone
//! test server (`IDEM_REDIS_URL`, read by [`idem_testkit::env`]) and stores
//! whose connection goes through it.

use std::net::SocketAddr;
use std::time::Duration;

use idem_faults::FaultProxy;
use idem_redis::RedisStore;

/// The standalone server's socket address (`IDEM_REDIS_URL`, parsed by the
/// driver).
pub async fn server_addr() -> SocketAddr {
    let url = idem_testkit::env::redis_url();
    let info = redis::IntoConnectionInfo::into_connection_info(url.as_str())
        .unwrap_or_else(|e| panic!("IDEM_REDIS_URL is not a Redis URL: {e}"));
    let redis::ConnectionAddr::Tcp(host, port) = info.addr() else {
        panic!(
            "IDEM_REDIS_URL is not a plain TCP address: {:?}",
            info.addr()
        )
    };
    tokio::net::lookup_host((host.as_str(), *port))
        .await
        .expect("resolve the Redis server")
        .next()
        .expect("an address for the Redis server")
}

/// A [`FaultProxy`] in front of the standalone server.
pub async fn proxy() -> FaultProxy {
    FaultProxy::start(server_addr().await)
        .await
        .expect("start the fault proxy")
}

/// How long [`store_via`] keeps trying to connect through the proxy.
const CONNECT_WITHIN: Duration = Duration::from_secs(20);

/// A store under `prefix` whose connection goes through `proxy`, with
/// connection and response timeouts of `timeout` and one reconnect attempt.
///
/// # Behavior
/// `timeout` is short (the fault tests want calls under a fault to fail
/// fast), so on a loaded machine the first connection (and the loading of
/// the scripts) may miss it: a transient failure is retried for
/// for 20 seconds before the test fails.
pub async fn store_via(proxy: &FaultProxy, prefix: &str, timeout: Duration) -> RedisStore {
    let url = format!("redis://{}", proxy.addr());
    let builder = RedisStore::builder()
        .with_prefix(prefix)
        .with_connection_timeout(timeout)
        .with_response_timeout(timeout)
        .with_reconnect_attempts(1);
    idem_testkit::wait::until_ok(
        "connect through the proxy",
        CONNECT_WITHIN,
        idem_redis::RedisError::is_transient,
        || builder.connect(&url),
    )
    .await
    .unwrap_or_else(|e| panic!("connect through the proxy: {}", idem_testkit::chain(&e)))
}
