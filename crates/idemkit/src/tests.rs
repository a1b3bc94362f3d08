//! The parser: good URLs, bad URLs, redaction, round trips.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::time::Duration;

use crate::{ClaimMode, Durability, PostgresUrl, RedisUrl, SqliteUrl, StoreUrl, StoreUrlError};

fn parse(url: &str) -> StoreUrl {
    StoreUrl::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"))
}

/// What a SQLite URL holds, or the test fails.
fn sqlite_url(url: StoreUrl) -> SqliteUrl {
    match url {
        StoreUrl::Sqlite(url) => url,
        other => panic!("not sqlite: {other}"),
    }
}

/// What a PostgreSQL URL holds, or the test fails.
fn postgres_url(url: StoreUrl) -> PostgresUrl {
    match url {
        StoreUrl::Postgres(url) => url,
        other => panic!("not postgres: {other}"),
    }
}

/// What a Redis URL holds, or the test fails.
fn redis_url(url: StoreUrl) -> RedisUrl {
    match url {
        StoreUrl::Redis(url) => url,
        other => panic!("not redis: {other}"),
    }
}

fn error(url: &str) -> StoreUrlError {
    match StoreUrl::parse(url) {
        Ok(parsed) => panic!("{url} parsed as {parsed}"),
        Err(e) => e,
    }
}

#[test]
fn memory() {
    assert_eq!(parse("memory://"), StoreUrl::Memory);
    assert_eq!(parse("MEMORY://"), StoreUrl::Memory);
    assert_eq!(parse("memory://").backend(), "memory");
    assert!(matches!(
        error("memory://x"),
        StoreUrlError::Malformed { .. }
    ));
}

#[test]
fn sqlite_paths() {
    assert_eq!(parse("sqlite://"), StoreUrl::sqlite_temp());
    assert_eq!(
        parse("sqlite://data/app.db"),
        StoreUrl::sqlite("data/app.db")
    );
    assert_eq!(
        parse("sqlite:///tmp/app.db"),
        StoreUrl::sqlite("/tmp/app.db")
    );
    assert_eq!(parse("SQLite://x.db").backend(), "sqlite");
}

#[test]
fn sqlite_parameters() {
    let url = sqlite_url(parse(
        "sqlite://app.db?table=keys&durability=normal&busy_timeout=250ms&max_batch=8&max_record_bytes=1024&page_cache_bytes=0",
    ));
    assert_eq!(url.path, Some(PathBuf::from("app.db")));
    assert_eq!(url.table.as_deref(), Some("keys"));
    assert_eq!(url.durability, Some(Durability::Normal));
    assert_eq!(url.busy_timeout, Some(Duration::from_millis(250)));
    assert_eq!(url.max_batch, Some(8));
    assert_eq!(url.max_record_bytes, Some(1024));
    assert_eq!(url.page_cache_bytes, Some(0));
    let temp = sqlite_url(parse("sqlite://?durability=FULL"));
    assert_eq!(temp.path, None);
    assert_eq!(temp.durability, Some(Durability::Full));
}

#[test]
fn postgres() {
    let url = parse(
        "postgresql://app:pw@db.example:5433/app?schema=billing&table=keys&timeout=2s&claim_mode=read_first&max_connections=4&acquire_timeout=1m&migrate=no&sslmode=require&max_record_bytes=99",
    );
    assert_eq!(url.backend(), "postgres");
    let pg = postgres_url(url.clone());
    assert_eq!(pg.schema.as_deref(), Some("billing"));
    assert_eq!(pg.table.as_deref(), Some("keys"));
    assert_eq!(pg.timeout, Some(Duration::from_secs(2)));
    assert_eq!(pg.claim_mode, Some(ClaimMode::ReadFirst));
    assert_eq!(pg.max_connections, Some(4));
    assert_eq!(pg.acquire_timeout, Some(Duration::from_secs(60)));
    assert_eq!(pg.max_record_bytes, Some(99));
    assert!(!pg.migrate);
    // The driver gets its own parameters, not idem's.
    assert_eq!(
        pg.connection_url(),
        "postgres://app:pw@db.example:5433/app?sslmode=require"
    );
    let plain = postgres_url(parse("postgres://postgres@127.0.0.1:5432/test"));
    assert!(plain.migrate);
    assert_eq!(plain.schema, None);
    assert_eq!(
        plain.connection_url(),
        "postgres://postgres@127.0.0.1:5432/test"
    );
    // A socket directory or a default host: no host in the authority.
    assert!(StoreUrl::parse("postgres:///test?host=/var/run/postgresql").is_ok());
}

#[test]
fn redis() {
    let url = parse(
        "redis://:pw@127.0.0.1:6379/2?prefix=app%3Aidem%3A&response_timeout=500ms&connection_timeout=1s&expiry_grace=2m&reconnect_attempts=0&protocol=resp3",
    );
    assert_eq!(url.backend(), "redis");
    let r = redis_url(url.clone());
    assert!(!r.is_cluster());
    assert_eq!(r.prefix.as_deref(), Some("app:idem:"));
    assert_eq!(r.response_timeout, Some(Duration::from_millis(500)));
    assert_eq!(r.connection_timeout, Some(Duration::from_secs(1)));
    assert_eq!(r.expiry_grace, Some(Duration::from_secs(120)));
    assert_eq!(r.reconnect_attempts, Some(0));
    assert_eq!(
        r.node_urls(),
        ["redis://:pw@127.0.0.1:6379/2?protocol=resp3"]
    );
    let tls = redis_url(parse("rediss://h:6380#insecure"));
    assert_eq!(tls.node_urls(), ["rediss://h:6380#insecure"]);
}

#[test]
fn redis_cluster() {
    let url = parse("redis+cluster://u:pw@127.0.0.1:7000,127.0.0.1:7001/?prefix=t:");
    assert_eq!(url.backend(), "redis-cluster");
    let r = redis_url(url.clone());
    assert!(r.is_cluster());
    assert_eq!(r.prefix.as_deref(), Some("t:"));
    assert_eq!(
        r.node_urls(),
        [
            "redis://u:pw@127.0.0.1:7000/",
            "redis://u:pw@127.0.0.1:7001/"
        ]
    );
    // From the node list of IDEM_REDIS_CLUSTER_URLS.
    let listed =
        StoreUrl::redis_cluster(["redis://127.0.0.1:7000", " redis://127.0.0.1:7001"]).unwrap();
    assert_eq!(
        listed.to_string(),
        "redis+cluster://127.0.0.1:7000,127.0.0.1:7001"
    );
    assert_eq!(
        listed,
        parse("redis+cluster://127.0.0.1:7000,127.0.0.1:7001")
    );
    assert!(StoreUrl::redis_cluster(Vec::<String>::new()).is_err());
    assert!(StoreUrl::redis_cluster(["postgres://h/db"]).is_err());
    assert!(parse("rediss+cluster://h:1,h:2").backend() == "redis-cluster");
}

#[test]
fn bad_urls_name_what_is_wrong() {
    let cases: &[(&str, &str)] = &[
        ("payments.db", "no scheme"),
        ("mysql://h/db", "unknown scheme `mysql`"),
        ("sqlite://x.db?busy_timeout=5", "`busy_timeout`"),
        ("sqlite://x.db?durability=paranoid", "`durability`"),
        ("sqlite://x.db?max_batch=0", "`max_batch`"),
        (
            "sqlite://x.db?tabel=x",
            "unknown parameter `tabel` for sqlite",
        ),
        ("sqlite://x.db?table=", "`table`"),
        (
            "sqlite://x.db?table=a&table=b",
            "`table` is given more than once",
        ),
        ("postgres://h/db?claim_mode=sometimes", "`claim_mode`"),
        (
            "postgres://h/db?claimmode=read-first",
            "unknown parameter `claimmode`",
        ),
        ("postgres://h/db?max_connections=0", "`max_connections`"),
        ("postgres://h/db?migrate=maybe", "`migrate`"),
        ("postgres://h/db?timeout=1d", "`timeout`"),
        ("redis://h?prefx=a", "unknown parameter `prefx` for redis"),
        ("redis://h?response_timeout=-1s", "`response_timeout`"),
        ("redis://a:1,b:2", "redis+cluster://"),
        ("redis+cluster://a:1,,b:2", "no host"),
        ("redis+cluster://a:1?sslmode=x", "for redis-cluster"),
        ("redis://", "no host"),
    ];
    for (url, needle) in cases {
        let message = error(url).to_string();
        assert!(
            message.contains(needle),
            "{url}: {message:?} lacks {needle:?}"
        );
    }
}

#[test]
fn passwords_never_show() {
    for url in [
        "postgres://bob:secret@h:5432/db?schema=s",
        "postgres://bob@h/db?password=secret&sslmode=disable",
        "redis://:secret@h:6379",
        "redis+cluster://bob:secret@a:1,b:2?prefix=x",
    ] {
        let parsed = parse(url);
        for shown in [parsed.to_string(), format!("{parsed:?}")] {
            assert!(!shown.contains("secret"), "{shown}");
            assert!(shown.contains("***"), "{shown}");
        }
    }
    assert_eq!(
        parse("postgres://bob:secret@h:5432/db").to_string(),
        "postgres://bob:***@h:5432/db"
    );
    // Refused URLs too.
    for url in [
        "ftp://bob:secret@h/",
        "postgres://bob:secret@h/db?nope=1",
        "redis://:secret@h?timeout=x",
        "postgres://h/db?password=secret&claim_mode=x",
    ] {
        let message = error(url).to_string();
        assert!(!message.contains("secret"), "{message}");
    }
}

#[test]
fn display_parses_back() {
    for url in [
        "memory://",
        "sqlite://",
        "sqlite://data/app.db",
        "sqlite:///abs/app.db?table=t&durability=normal&busy_timeout=1500ms&max_batch=2",
        "postgres://u@h:5432/db?schema=s&table=t&timeout=3s&claim_mode=read-first&max_connections=3&acquire_timeout=2m&migrate=false&application_name=x",
        "postgres://h/db?claim_mode=adaptive",
        "postgres://h/db?claim_mode=single-statement",
        "redis://h:6379/1?prefix=a%26b%3D%20c&expiry_grace=1h&reconnect_attempts=2&protocol=resp3",
        "redis+cluster://a:1,b:2?connection_timeout=10ms",
        "rediss://h:1#insecure",
    ] {
        let parsed = parse(url);
        let again = parse(&parsed.to_string());
        assert_eq!(again, parsed, "{url} -> {parsed}");
    }
    let r = redis_url(parse("redis://h?prefix=a%26b%3D%20c"));
    assert_eq!(r.prefix.as_deref(), Some("a&b= c"));
}

#[test]
fn fields_can_be_adjusted_before_opening() {
    let mut url = parse("redis://127.0.0.1:6379?prefix=app:");
    if let StoreUrl::Redis(r) = &mut url {
        r.prefix = Some("test:1:".into());
    }
    assert_eq!(url.to_string(), "redis://127.0.0.1:6379?prefix=test:1:");
}

#[tokio::test]
async fn memory_opens_without_features() {
    let opened = parse("memory://").open().await.unwrap();
    assert!(opened.store().as_memory().is_some());
    assert!(opened.temp_dir().is_none());
}

/// `Opened` forwards the optional search for abandoned records (what a
/// `Completer` over an opened store needs), as the store declares it.
#[tokio::test]
async fn opened_forwards_abandoned() {
    use idem_core::store::{Checkpoint, FencingToken, Record, Revision, State, Store, Versioned};
    use idem_core::{Fingerprint, IdempotencyKey, RecordKey, Scope, Timestamp};

    let opened = parse("memory://").open().await.unwrap();
    assert!(opened.capabilities().abandoned);
    let key = RecordKey::new(&Scope::tenant("t"), &IdempotencyKey::parse("k").unwrap());
    let t0 = Timestamp::from_millis(1_000);
    let lapsed = Timestamp::from_millis(2_000);
    let record = Record::from_parts(
        Fingerprint::of(b"r"),
        State::InFlight {
            token: FencingToken::from_u128(1),
            lease_deadline: lapsed,
        },
        t0,
        t0,
        Timestamp::from_millis(60_000),
        1,
    )
    .with_checkpoint(Some(Checkpoint::new(&key, 1, "step", vec![1])));
    let v = Versioned {
        revision: Revision::from_u64(1),
        record,
    };
    opened.insert_if_absent(&key, &v, t0).await.unwrap();
    assert_eq!(opened.abandoned(t0, 10).await.unwrap(), Vec::new());
    assert_eq!(opened.abandoned(lapsed, 10).await.unwrap(), vec![v]);
}

#[cfg(feature = "sqlite")]
#[tokio::test]
async fn sqlite_opens_in_a_temporary_directory_removed_with_the_store() {
    let opened = parse("sqlite://?durability=normal&table=keys")
        .open()
        .await
        .unwrap();
    let dir = opened.temp_dir().unwrap().to_path_buf();
    let store = opened.store().as_sqlite().unwrap();
    assert_eq!(store.table().as_str(), "keys");
    assert_eq!(store.path(), Some(dir.join("idem.db").as_path()));
    drop(opened);
    assert!(!dir.exists(), "{} is left behind", dir.display());

    let erased = crate::store_from_url("sqlite://").await.unwrap();
    let _ = erased.capabilities();
}

#[cfg(feature = "sqlite")]
#[tokio::test]
async fn a_table_name_the_store_refuses_names_the_parameter() {
    let err = parse("sqlite://?table=sqlite_master")
        .open()
        .await
        .unwrap_err();
    assert!(
        matches!(&err, crate::OpenError::Url(StoreUrlError::InvalidParameter { name, .. }) if name == "table"),
        "{err:?}"
    );
}

#[cfg(not(feature = "postgres"))]
#[tokio::test]
async fn a_backend_left_out_of_the_build_says_which_feature() {
    let err = crate::store_from_url("postgres://u:secret@h/db")
        .await
        .err()
        .unwrap();
    let message = err.to_string();
    assert!(message.contains("`postgres` feature"), "{message}");
    assert!(!message.contains("secret"), "{message}");
}
