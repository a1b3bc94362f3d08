//! Shared by the test targets: where the servers are, whether they must be
//! there, unique names, and cleaning up what a test created (only that).
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use idem_postgres::sqlx::{self, AssertSqlSafe, Connection, PgConnection};
use libtest_mimic::{Completion, Failed};

/// The local PostgreSQL (trust auth), when `IDEM_POSTGRES_URL` is unset.
pub const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The local Redis, when `IDEM_REDIS_URL` is unset.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

/// How long a reachability check may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| default.to_string())
}

/// The PostgreSQL server of this run.
pub fn postgres_url() -> String {
    env_or("IDEM_POSTGRES_URL", DEFAULT_POSTGRES_URL)
}

/// The Redis server of this run.
pub fn redis_url() -> String {
    env_or("IDEM_REDIS_URL", DEFAULT_REDIS_URL)
}

/// A name no other test run uses: `<prefix>_<pid>_<random>`.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}_{:08x}", std::process::id(), fastrand::u32(..))
}

/// Whether PostgreSQL answers at `url`.
pub async fn postgres_reachable(url: &str) -> Result<(), String> {
    match tokio::time::timeout(PROBE_TIMEOUT, PgConnection::connect(url)).await {
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
            Ok(())
        }
        Ok(Err(e)) => Err(format!("PostgreSQL not reachable at {url}: {e}")),
        Err(_) => Err(format!("PostgreSQL not reachable at {url}: timed out")),
    }
}

/// Whether Redis answers `PING` at `url`.
pub async fn redis_reachable(url: &str) -> Result<(), String> {
    let probe = async {
        let client = redis::Client::open(url).map_err(|e| e.to_string())?;
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| e.to_string())?;
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map_err(|e| e.to_string())
    };
    match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("Redis not reachable at {url}: {e}")),
        Err(_) => Err(format!("Redis not reachable at {url}: timed out")),
    }
}

/// The outcome of a test whose server is unreachable: FAILED under
/// `CI=true` / `IDEM_REQUIRE_BACKENDS=1`, otherwise IGNORED with a banner.
pub fn unreachable(test: &str, why: &str) -> Result<Completion, Failed> {
    if idem_conformance::backends_required() {
        return Err(format!("{test}: {why} (required: CI or IDEM_REQUIRE_BACKENDS is set)").into());
    }
    eprintln!(
        "\n************************************************************************\n\
         * IGNORED {test}: {why}\n\
         * Start the server or set its URL; with CI=true or IDEM_REQUIRE_BACKENDS=1\n\
         * this is a failure.\n\
         ************************************************************************\n"
    );
    Ok(Completion::ignored_with(why))
}

/// Drops the schema `schema` (one this test created).
pub async fn drop_postgres_schema(url: &str, schema: &str) {
    assert!(
        schema.starts_with("idem_demo_test_") || schema.starts_with("idem_demo_crash_"),
        "refusing to drop {schema}"
    );
    if let Ok(mut conn) = PgConnection::connect(url).await {
        let _ = sqlx::query(AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
        )))
        .execute(&mut conn)
        .await;
        let _ = conn.close().await;
    }
}

/// Deletes every key under `prefix` (one this test used), with `SCAN`.
pub async fn delete_redis_prefix(url: &str, prefix: &str) -> usize {
    assert!(
        prefix.starts_with("idem-demo-"),
        "refusing to delete {prefix}*"
    );
    let Ok(client) = redis::Client::open(url) else {
        return 0;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return 0;
    };
    let mut deleted = 0;
    let mut cursor: u64 = 0;
    loop {
        let Ok((next, keys)) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async::<(u64, Vec<Vec<u8>>)>(&mut conn)
            .await
        else {
            return deleted;
        };
        if !keys.is_empty() {
            deleted += redis::cmd("DEL")
                .arg(&keys)
                .query_async::<usize>(&mut conn)
                .await
                .unwrap_or(0);
        }
        if next == 0 {
            return deleted;
        }
        cursor = next;
    }
}

/// A multi-threaded runtime for one trial.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}
