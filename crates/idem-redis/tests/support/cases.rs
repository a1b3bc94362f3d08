//! Redis-specific cases, run by both targets (standalone and cluster) through
//! the conformance harness, so that the skip rules apply.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use idem_conformance::{StoreFactory, open_store};
use idem_core::store::{
    Checkpoint, Coverage, FencingToken, InsertOutcome, Record, Revision, State, Store, StoreError,
    SwapOutcome, Versioned, codec,
};
use idem_core::{
    Begin, Clock, Engine, FailureKind, Fingerprint, IdempotencyKey, ManualClock, Outcome, Policy,
    RecordKey, Scope, Timestamp,
};
use idem_faults::{Fault, FaultProxy};
use idem_redis::{RedisStore, RedisStoreBuilder, WritePath};
use idem_testkit::fixtures::{T0, begin, proceed, race, replays};
use idem_testkit::redis::{Deployment, Keyed, node};
use idem_testkit::{StoreUrl, chain};
use redis::Value;

use super::{Factory, deployment};

const INSERT_LUA: &str = concat!(
    include_str!("../../src/lua/head.lua"),
    include_str!("../../src/lua/insert.lua")
);
const CAS_LUA: &str = concat!(
    include_str!("../../src/lua/head.lua"),
    include_str!("../../src/lua/cas.lua")
);

fn rkey(name: &str) -> RecordKey {
    RecordKey::new(
        &Scope::tenant("idem-redis-tests"),
        &IdempotencyKey::parse(name).expect("valid test key"),
    )
}

fn claim(rev: u64, token: u128, now: Timestamp) -> Versioned {
    Versioned {
        revision: Revision::from_u64(rev),
        record: Record::new_claim(
            Fingerprint::of(b"request"),
            FencingToken::from_u128(token),
            now,
            &Policy::default(),
        ),
    }
}

fn completed(rev: u64, token: u128, now: Timestamp, outcome_len: usize) -> Versioned {
    let claim = claim(rev, token, now);
    Versioned {
        revision: Revision::from_u64(rev + 1),
        record: claim
            .record
            .complete(
                FencingToken::from_u128(token),
                Outcome::new(vec![0xA5; outcome_len]),
                now,
                &Policy::default(),
            )
            .expect("holder completes"),
    }
}

/// The stored bytes of `v` written by a call with write id `id` (layout v1).
fn envelope(v: &Versioned, id: u64) -> Vec<u8> {
    let mut out = vec![1u8];
    out.extend_from_slice(&v.record.expires_at.as_millis().to_be_bytes());
    out.extend_from_slice(&v.revision.as_u64().to_be_bytes());
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&codec::encode_record(&v.record).expect("encode"));
    out
}

/// A fresh store of the case (its keys are deleted after the case).
async fn open(f: &Factory) -> RedisStore {
    (*open_store(f).await.expect("open")).clone()
}

/// A fresh store of the case and a connection that routes by key.
async fn open_with_admin(f: &Factory) -> (RedisStore, Keyed) {
    let store = open(f).await;
    let admin = deployment(f).keyed().await.expect("admin connection");
    (store, admin)
}

/// A store builder with `prefix` and the test stores' short timeouts.
fn builder(prefix: &str) -> RedisStoreBuilder {
    RedisStore::builder()
        .with_prefix(prefix)
        .with_connection_timeout(Duration::from_millis(500))
        .with_response_timeout(Duration::from_secs(5))
        .with_reconnect_attempts(2)
}

/// `cmd` sent to the node owning its key.
async fn query<T: redis::FromRedisValue>(admin: &mut Keyed, cmd: &redis::Cmd) -> T {
    admin.query(cmd).await.expect("admin command")
}

async fn flush_scripts(masters: &[String]) {
    for master in masters {
        let mut conn = node(master).await.expect("admin connection");
        let ok: String = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut conn)
            .await
            .expect("SCRIPT FLUSH");
        assert_eq!(ok, "OK");
    }
}

/// `SCRIPT FLUSH` on every master before and while the store works: every
/// primitive keeps working, with exact results under a 32-way race.
pub async fn script_flush_mid_run(f: Arc<Factory>) {
    let store = open(&f).await;
    let masters = deployment(&f).masters().await.expect("masters");
    for round in 0..4u64 {
        let k = rkey(&format!("flush-{round}"));
        flush_scripts(&masters).await;
        // 32 racers and a flusher, released together.
        let results = {
            let (store, k, masters) = (store.clone(), k.clone(), masters.clone());
            race(33, move |i| {
                let (store, k, masters) = (store.clone(), k.clone(), masters.clone());
                async move {
                    if i == 32 {
                        flush_scripts(&masters).await;
                        flush_scripts(&masters).await;
                        return None;
                    }
                    let mine = claim(round * 1000 + i as u64 + 1, i as u128 + 1, T0);
                    let result = store.insert_if_absent(&k, &mine, T0).await.expect("insert");
                    Some((mine, result))
                }
            })
            .await
        };
        let (mut winners, mut seen) = (Vec::new(), Vec::new());
        for (mine, result) in results.into_iter().flatten() {
            match result {
                InsertOutcome::Inserted => winners.push(mine),
                InsertOutcome::Exists(theirs) => seen.push(theirs),
            }
        }
        assert_eq!(winners.len(), 1, "exactly one insert wins");
        let winner = winners.remove(0);
        assert_eq!(seen.len(), 31);
        assert!(seen.iter().all(|v| *v == winner), "losers see the winner");

        flush_scripts(&masters).await;
        assert_eq!(store.get(&k, T0).await.expect("get"), Some(winner.clone()));
        let next = claim(round * 1000 + 500, 99, T0);
        flush_scripts(&masters).await;
        assert_eq!(
            store
                .compare_and_swap(&k, &winner, &next, T0)
                .await
                .expect("cas"),
            SwapOutcome::Swapped
        );
        flush_scripts(&masters).await;
        assert!(!store.delete_if(&k, &winner, T0).await.expect("delete"));
        assert!(store.delete_if(&k, &next, T0).await.expect("delete"));
        assert_eq!(store.get(&k, T0).await.expect("get"), None);
    }
}

/// The client address in a `MONITOR` line (`<ts> [<db> <addr>] "CMD" …`).
fn monitor_addr(line: &str) -> Option<String> {
    let inside = line.get(line.find('[')? + 1..line.find(']')?)?;
    let addr = inside.split_whitespace().nth(1)?;
    (addr != "lua" && addr.contains(':')).then(|| addr.to_string())
}

/// Finds the store's connections with `MONITOR` on every master and kills
/// them with `CLIENT KILL ADDR`; fails unless one was killed at least.
pub async fn kill_store_connections(f: &Factory, store: &RedisStore) {
    let masters = deployment(f).masters().await.expect("masters");
    let mut monitors = Vec::new();
    for master in &masters {
        let client = redis::Client::open(master.as_str()).expect("url");
        monitors.push((
            master.clone(),
            client.get_async_monitor().await.expect("MONITOR"),
        ));
    }
    // Make the store talk to every master (64 keys cover 3 masters with
    // overwhelming probability; the loop below fails loudly otherwise).
    for i in 0..64 {
        store
            .get(&rkey(&format!("probe-{i}")), T0)
            .await
            .expect("probe");
    }
    let mut killed = 0;
    for (master, monitor) in monitors {
        let mut lines = monitor.into_on_message::<String>();
        let mut addrs = BTreeSet::new();
        while addrs.is_empty() {
            let line = tokio::time::timeout(Duration::from_secs(20), lines.next())
                .await
                .unwrap_or_else(|_| panic!("no traffic of the store seen on {master}"))
                .expect("monitor stream ended");
            if line.contains(store.prefix()) {
                addrs.extend(monitor_addr(&line));
            }
        }
        let mut conn = node(&master).await.expect("admin connection");
        for addr in addrs {
            let n: usize = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("ADDR")
                .arg(&addr)
                .query_async(&mut conn)
                .await
                .expect("CLIENT KILL");
            killed += n;
        }
    }
    assert!(killed >= 1, "killed nothing");
}

/// `CLIENT KILL` of the store's connections between the steps of a request,
/// and before a 32-way race: every next call succeeds after reconnecting, no
/// claim is lost and none is made twice.
pub async fn client_kill_reconnects(f: Arc<Factory>) {
    let store = open(&f).await;
    let clock = ManualClock::new(T0);
    let engine = Arc::new(Engine::with_clock(store.clone(), clock.clone()));

    // Claim, lose the connection, complete, replay.
    let lease = proceed(&engine, "kill-a").await;
    kill_store_connections(&f, &store).await;
    engine
        .complete(&lease, Outcome::new(b"done a".to_vec()))
        .await
        .expect("complete after the connection was killed");
    replays(&engine, "kill-a", b"done a").await;

    // Lose the connection, then 32 requests race for one key.
    kill_store_connections(&f, &store).await;
    let begun = {
        let engine = engine.clone();
        race(32, move |_| {
            let engine = engine.clone();
            async move { begin(&engine, "kill-b").await }
        })
        .await
    };
    let (mut leases, mut in_progress) = (Vec::new(), 0);
    for b in begun {
        match b {
            Begin::Proceed(lease) => leases.push(lease),
            Begin::InProgress { .. } => in_progress += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(leases.len(), 1, "exactly one claim");
    assert_eq!(in_progress, 31);
    let lease = leases.remove(0);

    // A second instance sees that one claim; the holder completes it after
    // yet another kill.
    let other = f
        .reopen(&store)
        .await
        .expect("reopen")
        .expect("shared instances");
    let stored = other
        .get(lease.key(), clock.now())
        .await
        .expect("get")
        .expect("the claim is stored");
    assert_eq!(stored.record.state.token(), lease.token());
    assert_eq!(stored.record.attempts, 1);
    kill_store_connections(&f, &store).await;
    engine
        .complete(&lease, Outcome::new(b"done b".to_vec()))
        .await
        .expect("complete after the connection was killed");
    let done = other
        .get(lease.key(), clock.now())
        .await
        .expect("get")
        .expect("stored");
    assert!(matches!(done.record.state, State::Completed { .. }));
    assert_eq!(done.record.state.token(), lease.token());
}

/// A proxy in front of the standalone server, and a store through it
/// under the prefix of a fresh isolated store of the case (its keys are
/// deleted after the case), with `response_timeout` and one reconnect
/// attempt; the first record is already written.
async fn proxied(
    f: &Factory,
    response_timeout: Duration,
    k: &RecordKey,
    rec: &Versioned,
) -> (FaultProxy, RedisStore) {
    let Deployment::Standalone(url) = deployment(f) else {
        panic!("the fault proxy stands in front of one server")
    };
    let info = redis::Client::open(url)
        .expect("url")
        .get_connection_info()
        .clone();
    let addr: SocketAddr = match info.addr() {
        redis::ConnectionAddr::Tcp(host, port) => tokio::net::lookup_host((host.as_str(), *port))
            .await
            .expect("resolve")
            .next()
            .expect("an address"),
        other => panic!("the fault proxy needs a TCP URL, not {other:?}"),
    };
    let proxy = FaultProxy::start(addr).await.expect("proxy");
    // The first record goes in directly, with the default timeouts: the
    // short ones are for the fault, not for a busy machine's set-up.
    let direct = open(f).await;
    assert_eq!(
        direct.insert_if_absent(k, rec, T0).await.expect("insert"),
        InsertOutcome::Inserted
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let store = loop {
        match builder(direct.prefix())
            .with_response_timeout(response_timeout)
            .with_reconnect_attempts(1)
            .connect(&format!("redis://{}", proxy.addr()))
            .await
        {
            Ok(store) => break store,
            Err(e) => {
                assert!(
                    e.is_transient() && Instant::now() < deadline,
                    "connect through the proxy: {}",
                    chain(&e)
                );
                tokio::task::yield_now().await;
            }
        }
    };
    assert_eq!(until_recovered(&store, k).await.as_ref(), Some(rec));
    (proxy, store)
}

fn is_corrupt<T>(r: &Result<T, StoreError>) -> bool {
    matches!(r, Err(StoreError::Corrupt { .. }))
}

fn assert_unavailable(result: Result<impl std::fmt::Debug, StoreError>) {
    match result {
        Err(e @ StoreError::Unavailable { .. }) => assert!(e.is_transient()),
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

/// Polls `get` until it succeeds (the store recovered by itself), with a deadline.
async fn until_recovered(store: &RedisStore, k: &RecordKey) -> Option<Versioned> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match store.get(k, T0).await {
            Ok(found) => return found,
            Err(e) => {
                assert!(e.is_transient(), "{}", chain(&e));
                assert!(Instant::now() < deadline, "did not recover: {}", chain(&e));
                tokio::task::yield_now().await;
            }
        }
    }
}

/// The server goes away (connections cut, new ones refused): calls fail with
/// `Unavailable`, not a hang; when it is back, the same store works again.
pub async fn server_gone_then_back(f: Arc<Factory>) {
    let (k, rec) = (rkey("gone"), claim(1, 1, T0));
    let (proxy, store) = proxied(&f, Duration::from_millis(500), &k, &rec).await;

    proxy.set(Fault::Refuse);
    proxy.cut_all();
    let hang_guard = Duration::from_secs(30);
    assert_unavailable(
        tokio::time::timeout(hang_guard, store.get(&k, T0))
            .await
            .expect("an error, not a hang"),
    );
    assert_unavailable(
        tokio::time::timeout(hang_guard, store.insert_if_absent(&k, &claim(2, 2, T0), T0))
            .await
            .expect("an error, not a hang"),
    );

    proxy.heal();
    assert_eq!(until_recovered(&store, &k).await, Some(rec.clone()));
    let next = claim(3, 3, T0);
    assert_eq!(
        store
            .compare_and_swap(&k, &rec, &next, T0)
            .await
            .expect("cas"),
        SwapOutcome::Swapped
    );
}

/// The connection goes silent (a black-holed network): the call times out
/// with `Unavailable`; once the network heals the store uses a fresh
/// connection instead of waiting on the dead one.
pub async fn silent_connection_times_out_then_recovers(f: Arc<Factory>) {
    let (k, rec) = (rkey("silent"), claim(1, 1, T0));
    let (proxy, store) = proxied(&f, Duration::from_millis(300), &k, &rec).await;
    let dialled = proxy.accepted_connections();

    proxy.set(Fault::BlackHole);
    assert_unavailable(
        tokio::time::timeout(Duration::from_secs(30), store.get(&k, T0))
            .await
            .expect("an error, not a hang"),
    );
    proxy.heal();
    assert_eq!(until_recovered(&store, &k).await, Some(rec));
    assert!(
        proxy.accepted_connections() > dialled,
        "a fresh connection replaced the silent one"
    );
}

/// Values that are not records are `Corrupt` for every primitive, and are
/// never overwritten.
pub async fn corrupt_values_are_reported_and_kept(f: Arc<Factory>) {
    let (store, mut admin) = open_with_admin(&f).await;
    let live = T0.plus(Duration::from_secs(3600));
    let good = claim(7, 7, T0);
    let mut damaged_body = envelope(&good, 1);
    damaged_body.truncate(30);
    let mut other_expiry = envelope(&good, 1);
    other_expiry[1..9].copy_from_slice(&live.as_millis().to_be_bytes());
    let mut unknown_layout = envelope(&good, 1);
    unknown_layout[0] = 2;
    // (what, bytes, whether the header is readable)
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("foreign string", b"hello, world".to_vec(), false),
        ("empty string", Vec::new(), false),
        ("truncated header", vec![1, 0, 0], false),
        ("unknown layout", unknown_layout, false),
        ("damaged record", damaged_body, true),
        ("header and record disagree", other_expiry, true),
    ];
    for (i, (what, bytes, header_ok)) in cases.into_iter().enumerate() {
        let k = rkey(&format!("corrupt-{i}"));
        let rk = store.redis_key(&k);
        let () = query(&mut admin, redis::cmd("SET").arg(&rk).arg(&bytes)).await;
        let got = store.get(&k, T0).await;
        assert!(is_corrupt(&got), "{what}: get gave {got:?}");
        let msg = chain(got.as_ref().expect_err("error"));
        assert!(
            msg.contains(store.prefix()),
            "{what}: the error names the key: {msg}"
        );
        let ins = store.insert_if_absent(&k, &claim(8, 8, T0), T0).await;
        assert!(is_corrupt(&ins), "{what}: insert gave {ins:?}");
        let cas = store
            .compare_and_swap(&k, &claim(1234, 1234, T0), &claim(9, 9, T0), T0)
            .await;
        assert!(is_corrupt(&cas), "{what}: cas gave {cas:?}");
        let del = store.delete_if(&k, &claim(1234, 1234, T0), T0).await;
        if header_ok {
            // delete_if reads only the header: another revision is not deleted.
            assert!(!del.expect("delete"), "{what}");
        } else {
            assert!(is_corrupt(&del), "{what}: delete gave {del:?}");
        }
        let kept: Vec<u8> = query(&mut admin, redis::cmd("GET").arg(&rk)).await;
        assert_eq!(kept, bytes, "{what}: the value was not overwritten");
    }

    // Another Redis type at a record key.
    let k = rkey("corrupt-hash");
    let rk = store.redis_key(&k);
    let _: i64 = query(&mut admin, redis::cmd("HSET").arg(&rk).arg("f").arg("v")).await;
    assert!(is_corrupt(&store.get(&k, T0).await));
    assert!(is_corrupt(
        &store.insert_if_absent(&k, &claim(1, 1, T0), T0).await
    ));
    let other = claim(2, 2, T0);
    let expected = claim(1, 1, T0);
    let cas = store.compare_and_swap(&k, &expected, &other, T0);
    assert!(is_corrupt(&cas.await));
    assert!(is_corrupt(&store.delete_if(&k, &claim(1, 1, T0), T0).await));
    let kind: String = query(&mut admin, redis::cmd("TYPE").arg(&rk)).await;
    assert_eq!(kind, "hash");

    // The documented exception: an intact header that says "expired" decides,
    // whatever follows it.
    let k = rkey("corrupt-expired");
    let rk = store.redis_key(&k);
    let mut expired = envelope(&claim(5, 5, T0), 1);
    expired[1..9].copy_from_slice(&(T0.as_millis() - 1).to_be_bytes());
    expired.truncate(27);
    let () = query(&mut admin, redis::cmd("SET").arg(&rk).arg(&expired)).await;
    assert_eq!(store.get(&k, T0).await.expect("get"), None);
    let fresh = claim(6, 6, T0);
    assert_eq!(
        store
            .insert_if_absent(&k, &fresh, T0)
            .await
            .expect("insert"),
        InsertOutcome::Inserted
    );
    assert_eq!(store.get(&k, T0).await.expect("get"), Some(fresh));
}

/// Redis keeps a record for its remaining logical lifetime plus the grace
/// (`PX`, relative to the engine's `now`), and logical expiry wins before that.
pub async fn physical_expiry_follows_logical_expiry(f: Arc<Factory>) {
    let grace = Duration::from_secs(5);
    let store = f
        .open_with(|url| {
            if let StoreUrl::Redis(r) = url {
                r.expiry_grace = Some(grace);
            }
        })
        .await
        .expect("open");
    let mut admin = deployment(&f).keyed().await.expect("admin connection");
    let policy = Policy::default()
        .with_ttl(Duration::from_secs(10))
        .with_lease(Duration::from_secs(5));
    let record = |rev: u64, now: Timestamp, policy: &Policy| Versioned {
        revision: Revision::from_u64(rev),
        record: Record::new_claim(
            Fingerprint::of(b"request"),
            FencingToken::from_u128(u128::from(rev)),
            now,
            policy,
        ),
    };

    let k = rkey("ttl");
    let rk = store.redis_key(&k);
    let first = record(1, T0, &policy);
    assert_eq!(first.record.expires_at, T0.plus(Duration::from_secs(10)));
    store
        .insert_if_absent(&k, &first, T0)
        .await
        .expect("insert");
    let pttl: i64 = query(&mut admin, redis::cmd("PTTL").arg(&rk)).await;
    assert!(
        (10_000 - 5_000..=15_000).contains(&pttl),
        "PX = remaining 10 s + grace 5 s, got {pttl} ms"
    );

    // A compare-and-swap sets the new record's physical expiry.
    let longer = record(2, T0, &policy.clone().with_ttl(Duration::from_secs(100)));
    assert_eq!(
        store
            .compare_and_swap(&k, &first, &longer, T0)
            .await
            .expect("cas"),
        SwapOutcome::Swapped
    );
    let pttl: i64 = query(&mut admin, redis::cmd("PTTL").arg(&rk)).await;
    assert!(
        (100_000 - 5_000..=105_000).contains(&pttl),
        "PX = remaining 100 s + grace 5 s, got {pttl} ms"
    );

    // Logically expired (engine time) while Redis still holds it.
    let later = longer.record.expires_at;
    assert_eq!(store.get(&k, later).await.expect("get"), None);
    let exists: i64 = query(&mut admin, redis::cmd("EXISTS").arg(&rk)).await;
    assert_eq!(exists, 1, "physically still there");
    assert!(!store.delete_if(&k, &longer, later).await.expect("delete"));

    // A record already expired when written lives only for the grace.
    let k2 = rkey("ttl-expired");
    let stale = record(3, T0, &policy);
    let now = stale.record.expires_at.plus(Duration::from_secs(1));
    assert_eq!(
        store
            .insert_if_absent(&k2, &stale, now)
            .await
            .expect("insert"),
        InsertOutcome::Inserted
    );
    let pttl: i64 = query(&mut admin, redis::cmd("PTTL").arg(store.redis_key(&k2))).await;
    assert!(
        (1..=5_000).contains(&pttl),
        "PX = grace only, got {pttl} ms"
    );
    assert_eq!(store.get(&k2, now).await.expect("get"), None);
}

/// The documented key and value layout, and the memory one record takes.
pub async fn layout_and_memory_per_record(f: Arc<Factory>) {
    // A production-sized prefix (5 bytes), unique to this case; its keys are
    // deleted at the end.
    let prefix = format!("{:04x}:", std::process::id() as u16 ^ rand_u16());
    let deployment = deployment(&f);
    let store = deployment.connect(&builder(&prefix)).await.expect("open");
    let mut admin = deployment.keyed().await.expect("admin connection");
    let mut keys = Vec::new();
    let mut report = Vec::new();
    for (i, outcome_len) in [0usize, 100, 1_000, 10_000].into_iter().enumerate() {
        let k = rkey(&format!("layout-{i}"));
        let rk = store.redis_key(&k);
        assert_eq!(rk, [prefix.as_bytes(), k.digest()].concat());
        // A token as the engine draws them (a random seed in the high half).
        let token = (0x9e37_79b9_7f4a_7c15_u128 << 64) | i as u128;
        let rec = completed(10 * i as u64, token, T0, outcome_len);
        store.insert_if_absent(&k, &rec, T0).await.expect("insert");
        let raw: Vec<u8> = query(&mut admin, redis::cmd("GET").arg(&rk)).await;
        assert_eq!(raw[0], 1, "layout tag");
        assert_eq!(raw[1..9], rec.record.expires_at.as_millis().to_be_bytes());
        assert_eq!(raw[9..17], rec.revision.as_u64().to_be_bytes());
        assert_eq!(
            codec::decode_record(&raw[25..]).expect("record"),
            rec.record
        );
        let memory: usize = query(
            &mut admin,
            redis::cmd("MEMORY")
                .arg("USAGE")
                .arg(&rk)
                .arg("SAMPLES")
                .arg(0),
        )
        .await;
        report.push((outcome_len, raw.len(), rk.len(), memory));
        keys.push(rk);
    }
    for &(outcome_len, value_len, key_len, memory) in &report {
        eprintln!(
            "idem-redis memory: outcome {outcome_len} B -> value {value_len} B, key {key_len} B, MEMORY USAGE {memory} B ({} B beyond the outcome)",
            memory - outcome_len
        );
    }
    for rk in &keys {
        let _: i64 = query(&mut admin, redis::cmd("UNLINK").arg(rk)).await;
    }
    // Fixed costs: record and header, the key, Redis's per-key overhead (16 B
    // more in cluster mode, which links every key into its slot); plus the
    // allocator's rounding of the value (size classes 25 % apart).
    let fixed = if deployment.is_cluster() { 216 } else { 200 };
    for (outcome_len, _, _, memory) in report {
        assert!(
            memory <= fixed + outcome_len + outcome_len / 4,
            "{memory} B for an outcome of {outcome_len} B"
        );
    }
}

fn rand_u16() -> u16 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(std::time::SystemTime::now()) as u16
}

/// A write re-sent after a lost reply finds its own write id and reports
/// success; a different write with the same revision does not.
pub async fn resent_write_is_recognised(f: Arc<Factory>) {
    let (store, mut admin) = open_with_admin(&f).await;
    let k = rkey("resent");
    let rk = store.redis_key(&k);
    // The scripts as the store sends them: the time, the expected
    // revision (swaps), the value, PX.
    let eval = |script: &str, args: &[&[u8]]| {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(script)
            .arg(1)
            .arg(&rk)
            .arg(&T0.as_millis().to_be_bytes()[..]);
        for arg in args {
            cmd.arg(*arg);
        }
        cmd.arg("600000");
        cmd
    };
    let insert = |value: &[u8]| eval(INSERT_LUA, &[value]);
    let cas = |expected: Revision, value: &[u8]| {
        eval(CAS_LUA, &[&expected.as_u64().to_be_bytes(), value])
    };

    let first = claim(11, 1, T0);
    let sent = envelope(&first, 0xAAAA);
    let resent = insert(&sent);
    assert_eq!(query::<Value>(&mut admin, &resent).await, Value::Int(1));
    assert_eq!(
        query::<Value>(&mut admin, &resent).await,
        Value::Int(1),
        "the re-sent insert is recognised"
    );
    assert_eq!(
        query::<Value>(&mut admin, &insert(&envelope(&first, 0xBBBB))).await,
        Value::BulkString(sent.clone()),
        "another write with the same revision is not"
    );
    assert_eq!(
        store
            .insert_if_absent(&k, &claim(12, 2, T0), T0)
            .await
            .expect("insert"),
        InsertOutcome::Exists(first.clone())
    );

    let second = claim(13, 3, T0);
    let swapped = envelope(&second, 0xCCCC);
    let cas_sent = cas(first.revision, &swapped);
    assert_eq!(query::<Value>(&mut admin, &cas_sent).await, Value::Int(1));
    assert_eq!(
        query::<Value>(&mut admin, &cas_sent).await,
        Value::Int(1),
        "the re-sent swap is recognised"
    );
    assert_eq!(store.get(&k, T0).await.expect("get"), Some(second.clone()));
    let stale = cas(first.revision, &envelope(&claim(14, 4, T0), 0xDDDD));
    assert_eq!(
        query::<Value>(&mut admin, &stale).await,
        Value::BulkString(swapped),
        "a stale swap still conflicts"
    );
}

/// A prefix with a hash tag would put every record in one cluster slot: refused.
pub async fn hash_tag_prefix_is_rejected(f: Arc<Factory>) {
    let result = deployment(&f)
        .connect(&builder("{idem}:"))
        .await
        .map_err(StoreError::from);
    assert!(
        matches!(result, Err(StoreError::Rejected { .. })),
        "{result:?}"
    );
}

/// Records spread over every master of the cluster.
pub async fn keys_spread_over_all_masters(f: Arc<Factory>) {
    let store = open(&f).await;
    for i in 0..64 {
        let k = rkey(&format!("spread-{i}"));
        assert_eq!(
            store
                .insert_if_absent(&k, &claim(i + 1, 1, T0), T0)
                .await
                .expect("insert"),
            InsertOutcome::Inserted
        );
    }
    let per_master = deployment(&f)
        .keys_per_master(store.prefix())
        .await
        .expect("scan");
    eprintln!("idem-redis cluster: records per master: {per_master:?}");
    assert!(
        per_master.len() >= 3,
        "a cluster of 3 masters or more: {per_master:?}"
    );
    assert!(
        per_master.values().all(|&n| n > 0),
        "every master holds records: {per_master:?}"
    );
    assert_eq!(per_master.values().sum::<u64>(), 64);
    // And each reads back through the cluster client.
    for i in 0..64 {
        let k = rkey(&format!("spread-{i}"));
        assert_eq!(
            store.get(&k, T0).await.expect("get"),
            Some(claim(i + 1, 1, T0))
        );
    }
}

/// The census reads every master, counts only this store's records (not
/// those of a store whose prefix extends its own), skips values under its
/// prefix that are not records instead of failing, stops at its sample,
/// and counts records Redis still holds past their logical expiry as
/// expired.
pub async fn census_counts_every_master_and_only_its_records(f: Arc<Factory>) {
    let (store, mut admin) = open_with_admin(&f).await;
    for i in 0..200_u64 {
        let k = rkey(&format!("census-{i}"));
        let v = if i % 2 == 0 {
            claim(i + 1, 1, T0)
        } else {
            completed(i + 1, 1, T0, 16)
        };
        assert_eq!(
            store.insert_if_absent(&k, &v, T0).await.expect("insert"),
            InsertOutcome::Inserted
        );
    }
    let nested = deployment(&f)
        .connect(&builder(&format!("{}x:", store.prefix())))
        .await
        .expect("a store under a longer prefix");
    for i in 0..5_u64 {
        let k = rkey(&format!("nested-{i}"));
        nested
            .insert_if_absent(&k, &claim(i + 1, 1, T0), T0)
            .await
            .expect("insert");
    }
    let foreign = store.redis_key(&rkey("census-foreign"));
    let () = query(&mut admin, redis::cmd("SET").arg(&foreign).arg("hello")).await;
    let hash = store.redis_key(&rkey("census-hash"));
    let _: i64 = query(&mut admin, redis::cmd("HSET").arg(&hash).arg("f").arg("v")).await;

    let census = store.census(T0, 10_000).await.expect("census");
    assert_eq!(census.coverage, Coverage::Exact);
    assert_eq!(
        (census.in_flight, census.completed, census.expired),
        (100, 100, 0),
        "200 records, on every master; not the nested store's 5, not the 2 foreign values"
    );
    assert_eq!(census.expiry.iter().sum::<u64>(), 200);
    assert_eq!(
        census.unreadable, 1,
        "the foreign string is unreadable; the hash is another type, not counted"
    );

    let census = store.census(T0, 200).await.expect("census");
    assert_eq!(
        (census.coverage, census.total()),
        (Coverage::Exact, 200),
        "a sample of exactly every record is the whole"
    );
    for sample in [0, 1, 50, 199] {
        let census = store.census(T0, sample).await.expect("census");
        assert_eq!(
            (census.coverage, census.total()),
            (
                Coverage::Sampled {
                    limit: sample as u64
                },
                sample as u64
            ),
            "sample {sample}"
        );
    }

    // Past the records' logical expiry (the engine's clock), Redis still
    // holds them (`PX` counts from the write, plus the grace).
    let later = claim(1, 1, T0)
        .record
        .expires_at
        .max(completed(2, 1, T0, 16).record.expires_at);
    let census = store.census(later, 10_000).await.expect("census");
    assert_eq!((census.live(), census.expired), (0, 200));
}

/// `major.minor` of the server's Valkey version, from `INFO server`; `None`
/// on Redis.
async fn valkey_version(admin: &mut Keyed) -> Option<(u32, u32)> {
    let info = info_text(admin, "server").await;
    let version = info
        .lines()
        .find_map(|l| l.trim().strip_prefix("valkey_version:"))?;
    let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??))
}

/// `INFO section` as text: the one server's, or every node's of a cluster
/// (which answers a map from node to text), one after the other.
async fn info_text(admin: &mut Keyed, section: &str) -> String {
    let reply: Value = query(admin, redis::cmd("INFO").arg(section)).await;
    let text = |v: &Value| match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::VerbatimString { text, .. } => text.clone(),
        other => panic!("unexpected INFO reply {other:?}"),
    };
    match &reply {
        Value::Map(nodes) => nodes
            .iter()
            .map(|(_, v)| text(v))
            .collect::<Vec<_>>()
            .join("\n"),
        other => text(other),
    }
}

/// The write paths follow the server: `SET … NX GET` for the claim on every
/// server this crate supports; `SET … IFEQ … GET` and `DELIFEQ` only on
/// Valkey ≥ 8.1 and ≥ 9.0, scripts on Redis.
pub async fn write_paths_follow_the_server(f: Arc<Factory>) {
    let (store, mut admin) = open_with_admin(&f).await;
    let version = valkey_version(&mut admin).await;
    let paths = store.write_paths();
    let want = |native: bool| {
        if native {
            WritePath::Native
        } else {
            WritePath::Script
        }
    };
    assert_eq!(paths.insert_if_absent, WritePath::Native, "{paths:?}");
    assert_eq!(
        paths.compare_and_swap,
        want(version.is_some_and(|v| v >= (8, 1))),
        "server {version:?}: {paths:?}"
    );
    assert_eq!(
        paths.delete_if,
        want(version.is_some_and(|v| v >= (9, 0))),
        "server {version:?}: {paths:?}"
    );
}

/// On Valkey 9, compare-and-swap and delete are one native command each: no
/// script runs for a claim, a completion, a conflict and a release.
///
/// What ran is read from `MONITOR`, filtered to this store's prefix: the
/// server-wide `INFO commandstats` counters also count the scripts of the
/// cases running next to this one.
pub async fn native_commands_do_the_swaps(f: Arc<Factory>) {
    let (store, mut admin) = open_with_admin(&f).await;
    let version = valkey_version(&mut admin).await;
    assert!(
        version.is_some_and(|v| v >= (9, 0)),
        "this target needs Valkey ≥ 9.0 at IDEM_VALKEY_URL, found {version:?}"
    );
    let paths = store.write_paths();
    assert_eq!(
        (
            paths.insert_if_absent,
            paths.compare_and_swap,
            paths.delete_if
        ),
        (WritePath::Native, WritePath::Native, WritePath::Native)
    );
    let masters = deployment(&f).masters().await.expect("masters");
    let [server] = masters.as_slice() else {
        panic!("this case watches one server, found {masters:?}");
    };
    let mut monitor = redis::Client::open(server.as_str())
        .expect("server url")
        .get_async_monitor()
        .await
        .expect("MONITOR")
        .into_on_message::<String>();

    let k = rkey("native");
    let first = claim(21, 1, T0);
    let done = completed(21, 1, T0, 1024);
    assert_eq!(
        store
            .insert_if_absent(&k, &first, T0)
            .await
            .expect("insert"),
        InsertOutcome::Inserted
    );
    assert_eq!(
        store
            .compare_and_swap(&k, &first, &done, T0)
            .await
            .expect("swap"),
        SwapOutcome::Swapped
    );
    assert_eq!(
        store
            .compare_and_swap(&k, &first, &claim(40, 4, T0), T0)
            .await
            .expect("stale swap"),
        SwapOutcome::Conflict(Some(done.clone())),
        "a stale swap conflicts with the live record"
    );
    assert!(
        !store.delete_if(&k, &first, T0).await.expect("stale delete"),
        "a stale delete changes nothing"
    );
    assert!(store.delete_if(&k, &done, T0).await.expect("delete"));
    assert_eq!(store.get(&k, T0).await.expect("get"), None);
    assert_eq!(
        store
            .compare_and_swap(&k, &done, &claim(41, 5, T0), T0)
            .await
            .expect("swap on absent"),
        SwapOutcome::Conflict(None),
        "no upsert"
    );

    // The server shows commands in the order it ran them: once the marker
    // sent after the last operation is seen, every operation has been.
    let marker = format!("{}monitor-end", store.prefix());
    let _: Value = query(&mut admin, redis::cmd("EXISTS").arg(&marker)).await;
    let quoted_prefix = format!("\"{}", store.prefix());
    let quoted_marker = format!("\"{marker}\"");
    let mut ran = Vec::new();
    let seen = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = monitor.next().await {
            if line.contains(&quoted_marker) {
                return true;
            }
            if line.contains(&quoted_prefix) {
                ran.push(line);
            }
        }
        false
    })
    .await;
    assert_eq!(seen, Ok(true), "MONITOR showed the marker; ran: {ran:#?}");
    let command = |line: &str| {
        let (_, rest) = line.split_once("] \"")?;
        Some(rest.split('"').next()?.to_ascii_uppercase())
    };
    let scripted: Vec<&String> = ran
        .iter()
        .filter(|line| {
            line.contains(" lua]")
                || command(line).is_some_and(|c| {
                    [
                        "EVAL",
                        "EVALSHA",
                        "EVAL_RO",
                        "EVALSHA_RO",
                        "FCALL",
                        "FCALL_RO",
                    ]
                    .contains(&c.as_str())
                })
        })
        .collect();
    assert!(scripted.is_empty(), "no script ran: {scripted:#?}");
    let count = |name: &str| {
        ran.iter()
            .filter(|line| command(line).as_deref() == Some(name))
            .count()
    };
    assert_eq!(
        count("DELIFEQ"),
        2,
        "the stale and the live delete: {ran:#?}"
    );
    assert!(
        ran.iter()
            .filter(|line| command(line).as_deref() == Some("SET") && line.contains("\"IFEQ\""))
            .count()
            >= 2,
        "the swap and the stale swap are SET … IFEQ: {ran:#?}"
    );
}

/// A value written with a random write id in its header (idem-redis before
/// the deterministic encoding) is still swapped and deleted by its revision:
/// the native compare misses, the script decides.
pub async fn values_with_a_write_id_are_still_swapped(f: Arc<Factory>) {
    let (store, mut admin) = open_with_admin(&f).await;
    let k = rkey("legacy");
    let rk = store.redis_key(&k);
    let old = claim(31, 1, T0);
    let set = |v: &Versioned| {
        let mut cmd = redis::cmd("SET");
        cmd.arg(&rk).arg(envelope(v, 0xABCD)).arg("PX").arg(600_000);
        cmd
    };
    let () = query(&mut admin, &set(&old)).await;
    assert_eq!(store.get(&k, T0).await.expect("get"), Some(old.clone()));
    let next = completed(31, 1, T0, 64);
    assert_eq!(
        store
            .compare_and_swap(&k, &old, &next, T0)
            .await
            .expect("swap"),
        SwapOutcome::Swapped
    );
    assert_eq!(store.get(&k, T0).await.expect("get"), Some(next));
    let () = query(&mut admin, &set(&old)).await;
    assert!(store.delete_if(&k, &old, T0).await.expect("delete"));
    assert_eq!(store.get(&k, T0).await.expect("get"), None);
}

/// `first` with a checkpoint of `k` at `seq` (step `step`, state `state`).
fn checkpointed(mut v: Versioned, k: &RecordKey, seq: u32, step: &str, state: &[u8]) -> Versioned {
    v.record.checkpoint = Some(Checkpoint::new(k, seq, step, state.to_vec()));
    v
}

/// The stored bytes of `v` with its record in the first record format
/// (codec tag 1, before checkpoints), as idem-redis wrote them then.
fn first_format_envelope(v: &Versioned) -> Vec<u8> {
    let r = &v.record;
    let record = codec::encode(&(
        r.fingerprint,
        r.state.clone(),
        r.created_at,
        r.updated_at,
        r.expires_at,
        r.attempts,
    ))
    .expect("encode");
    assert_eq!(record[0], codec::FORMAT_V1);
    let mut out = envelope(v, 0)[..25].to_vec();
    out.extend_from_slice(&record);
    out
}

/// Records written in the first record format (codec tag 1, no checkpoint)
/// still read back, are met by a claim, and are swapped and deleted on
/// every write path (the native compare misses the older bytes, the script
/// decides); the search for abandoned records reads them too.
pub async fn records_of_the_first_format_still_work(f: Arc<Factory>) {
    let (store, mut admin) = open_with_admin(&f).await;
    let policy = Policy::default();
    let k = rkey("first-format");
    let rk = store.redis_key(&k);
    let old = claim(41, 1, T0);
    let set = |v: &Versioned| {
        let mut cmd = redis::cmd("SET");
        cmd.arg(&rk)
            .arg(first_format_envelope(v))
            .arg("PX")
            .arg(600_000);
        cmd
    };
    let () = query(&mut admin, &set(&old)).await;
    assert_eq!(store.get(&k, T0).await.expect("get"), Some(old.clone()));
    assert_eq!(
        store
            .insert_if_absent(&k, &claim(42, 2, T0), T0)
            .await
            .expect("insert"),
        InsertOutcome::Exists(old.clone())
    );
    let later = T0.plus(policy.lease);
    assert_eq!(
        store.abandoned(later, 10).await.expect("abandoned"),
        Vec::new(),
        "read, and without a checkpoint not abandoned"
    );
    let next = Versioned {
        revision: Revision::from_u64(43),
        record: old
            .record
            .checkpoint(
                FencingToken::from_u128(1),
                Checkpoint::new(&k, 1, "reserve", b"stock".to_vec()),
                T0,
                &policy,
            )
            .expect("checkpoint"),
    };
    assert_eq!(
        store
            .compare_and_swap(&k, &old, &next, T0)
            .await
            .expect("swap"),
        SwapOutcome::Swapped
    );
    let raw: Vec<u8> = query(&mut admin, redis::cmd("GET").arg(&rk)).await;
    assert_eq!(raw[25], codec::FORMAT_V2, "rewritten in the current format");
    assert_eq!(store.get(&k, T0).await.expect("get"), Some(next));
    let () = query(&mut admin, &set(&old)).await;
    assert!(
        !store
            .delete_if(&k, &claim(44, 1, T0), T0)
            .await
            .expect("stale delete")
    );
    assert!(store.delete_if(&k, &old, T0).await.expect("delete"));
    assert_eq!(store.get(&k, T0).await.expect("get"), None);
}

/// A claim of `k` made at `at` under `policy`, revision `rev`.
fn claim_at(rev: u64, at: Timestamp, policy: &Policy) -> Versioned {
    Versioned {
        revision: Revision::from_u64(rev),
        record: Record::new_claim(
            Fingerprint::of(b"request"),
            FencingToken::from_u128(u128::from(rev)),
            at,
            policy,
        ),
    }
}

/// `abandoned` finds exactly the live records in flight whose lease lapsed
/// and that carry a checkpoint, on every master: not live leases, not
/// finished records (completed, or failed retryably with their checkpoint),
/// not records without a checkpoint, not expired ones, not another
/// prefix's, not values that are not records (skipped, no error), not a
/// record copied under another key; earliest lapse first, at most `limit`.
pub async fn abandoned_finds_exactly_the_lapsed_checkpoints(f: Arc<Factory>) {
    let (store, mut admin) = open_with_admin(&f).await;
    let policy = Policy::default()
        .with_lease(Duration::from_secs(10))
        .with_ttl(Duration::from_secs(3600));
    let now = T0.plus(Duration::from_secs(60));
    let insert = |k: RecordKey, v: Versioned, at: Timestamp| {
        let store = store.clone();
        async move {
            assert_eq!(
                store.insert_if_absent(&k, &v, at).await.expect("insert"),
                InsertOutcome::Inserted
            );
        }
    };

    // Abandoned: claimed at T0 + i s (lease lapsed at T0 + 10 s + i s),
    // inserted out of order; and one whose lease lapses exactly at `now`.
    let mut want = Vec::new();
    for i in [3_u64, 0, 7, 1, 5, 2, 6, 4] {
        let k = rkey(&format!("abandoned-{i}"));
        let at = T0.plus(Duration::from_secs(i));
        let v = checkpointed(claim_at(100 + i, at, &policy), &k, 1, "charge", b"ch");
        insert(k, v.clone(), at).await;
        want.push(v);
    }
    let k = rkey("abandoned-at-now");
    let at = T0.plus(Duration::from_secs(50));
    let v = checkpointed(claim_at(200, at, &policy), &k, 3, "receipt", b"r");
    insert(k, v.clone(), at).await;
    want.push(v);
    want.sort_by_key(|v| match v.record.state {
        State::InFlight { lease_deadline, .. } => lease_deadline,
        _ => unreachable!(),
    });

    // Not abandoned.
    let k = rkey("live-lease");
    let at = T0.plus(Duration::from_secs(59));
    insert(
        k.clone(),
        checkpointed(claim_at(300, at, &policy), &k, 1, "charge", b"ch"),
        at,
    )
    .await;
    insert(rkey("no-checkpoint"), claim_at(301, T0, &policy), T0).await;
    let k = rkey("completed");
    let ck = checkpointed(claim_at(302, T0, &policy), &k, 1, "charge", b"ch");
    let mut done = ck.clone();
    done.record = ck
        .record
        .complete(
            FencingToken::from_u128(302),
            Outcome::new(b"ok".to_vec()),
            T0,
            &policy,
        )
        .expect("complete");
    insert(k, done, T0).await;
    let k = rkey("failed-retryable");
    let ck = checkpointed(claim_at(303, T0, &policy), &k, 1, "charge", b"ch");
    let mut failed = ck.clone();
    failed.record = ck
        .record
        .fail(
            FencingToken::from_u128(303),
            FailureKind::Retryable,
            Outcome::new(b"later".to_vec()),
            T0,
            &policy,
        )
        .expect("fail");
    assert!(
        failed.record.checkpoint.is_some(),
        "kept for the next holder"
    );
    insert(k, failed, T0).await;
    // Expired (the lease lapsed, the TTL too) before T0, but still in
    // Redis (`PX` counts from the write, plus the grace).
    let short = policy.clone().with_ttl(Duration::from_secs(20));
    let (k, at) = (
        rkey("expired"),
        Timestamp::from_millis(T0.as_millis() - 30_000),
    );
    insert(
        k.clone(),
        checkpointed(claim_at(304, at, &short), &k, 1, "charge", b"ch"),
        at,
    )
    .await;
    // Another prefix's (one extending this store's), abandoned.
    let nested = deployment(&f)
        .connect(&builder(&format!("{}x:", store.prefix())))
        .await
        .expect("a store under a longer prefix");
    let k = rkey("nested");
    let v = checkpointed(claim_at(305, T0, &policy), &k, 1, "charge", b"ch");
    nested.insert_if_absent(&k, &v, T0).await.expect("insert");
    assert_eq!(
        nested.abandoned(now, 10).await.expect("abandoned"),
        vec![v],
        "the other store finds its own"
    );
    // Values that are not records, and an abandoned record copied under
    // another key.
    let foreign = store.redis_key(&rkey("foreign"));
    let () = query(&mut admin, redis::cmd("SET").arg(&foreign).arg("hello")).await;
    let hash = store.redis_key(&rkey("hash"));
    let _: i64 = query(&mut admin, redis::cmd("HSET").arg(&hash).arg("f").arg("v")).await;
    let copy = store.redis_key(&rkey("copied"));
    let () = query(
        &mut admin,
        redis::cmd("SET").arg(&copy).arg(envelope(&want[0], 0)),
    )
    .await;

    let found = store.abandoned(now, 100).await.expect("abandoned");
    assert_eq!(found, want, "exactly the abandoned records, earliest first");
    for v in &found {
        let k = v
            .record
            .checkpoint
            .as_ref()
            .expect("checkpoint")
            .record_key();
        assert_eq!(
            store.get(&k, now).await.expect("get").as_ref(),
            Some(v),
            "found under its checkpoint's key"
        );
    }
    for limit in [1, 3, 9] {
        assert_eq!(
            store.abandoned(now, limit).await.expect("abandoned"),
            want[..limit],
            "limit {limit}"
        );
    }
    assert_eq!(store.abandoned(now, 0).await.expect("abandoned"), vec![]);
    assert_eq!(
        store
            .abandoned(T0.plus(Duration::from_secs(10)), 100)
            .await
            .expect("abandoned"),
        want[..1],
        "at T0 + 10 s only the first lease has lapsed"
    );
    assert_eq!(store.abandoned(T0, 100).await.expect("abandoned"), vec![]);
}

/// What one `abandoned(now, 100)` costs with 10,000 records under the
/// prefix, 100 of them abandoned (printed; no timed assertion): 100
/// abandoned, 900 live leases with a checkpoint, 9,000 completed records
/// with a 256-byte outcome.
pub async fn abandoned_search_cost(f: Arc<Factory>) {
    const RECORDS: u64 = 10_000;
    const ABANDONED: u64 = 100;
    const LIVE: u64 = 900;
    let store = open(&f).await;
    let policy = Policy::default()
        .with_lease(Duration::from_secs(10))
        .with_ttl(Duration::from_secs(3600));
    let now = T0.plus(Duration::from_secs(60));
    let started = Instant::now();
    let sizes: Vec<usize> = futures_util::stream::iter(0..RECORDS)
        .map(|i| {
            let (store, policy) = (store.clone(), policy.clone());
            async move {
                let k = rkey(&format!("cost-{i}"));
                let v = if i < ABANDONED {
                    let at = T0.plus(Duration::from_millis(i));
                    checkpointed(claim_at(i + 1, at, &policy), &k, 1, "charge", &[7; 64])
                } else if i < ABANDONED + LIVE {
                    checkpointed(claim_at(i + 1, now, &policy), &k, 1, "charge", &[7; 64])
                } else {
                    let claim = claim_at(i + 1, T0, &policy);
                    Versioned {
                        revision: claim.revision,
                        record: claim
                            .record
                            .complete(
                                FencingToken::from_u128(u128::from(i + 1)),
                                Outcome::new(vec![0xA5; 256]),
                                T0,
                                &policy,
                            )
                            .expect("complete"),
                    }
                };
                assert_eq!(
                    store.insert_if_absent(&k, &v, T0).await.expect("insert"),
                    InsertOutcome::Inserted
                );
                25 + codec::encode_record(&v.record).expect("encode").len()
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    assert_eq!(sizes.len() as u64, RECORDS);
    let stored: usize = sizes.iter().sum();
    let loaded = started.elapsed();
    let mut times = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let found = store.abandoned(now, 100).await.expect("abandoned");
        times.push(started.elapsed());
        assert_eq!(found.len() as u64, ABANDONED);
    }
    let started = Instant::now();
    let census = store.census(now, usize::MAX).await.expect("census");
    let census_took = started.elapsed();
    assert_eq!(census.total(), RECORDS);
    times.sort();
    eprintln!(
        "idem-redis abandoned: {RECORDS} records ({ABANDONED} abandoned, {LIVE} live leases, {} completed with 256 B outcomes; {} KiB of values; loaded in {loaded:?}): abandoned(now, 100) took {:?} (median of 5; min {:?}, max {:?}); a full census {census_took:?}",
        RECORDS - ABANDONED - LIVE,
        stored / 1024,
        times[2],
        times[0],
        times[4],
    );
}
