//! Corrupted and foreign data (issue 9, item 4, corruption): bytes written
//! straight into a store's row or key, behind its back — the way a bad
//! migration, a foreign writer sharing the prefix, a newer version of idem or
//! a damaged disk would leave them.
//!
//! Two kinds of damage:
//!
//! - **The record itself** cannot be read (SQLite and PostgreSQL: a raw
//!   `UPDATE` of a typed column — truncated fingerprint, short token,
//!   `completed` without an outcome, `in_flight` without a deadline,
//!   attempts outside u32, an unknown state; Redis and Redis Cluster: a raw
//!   `SET` of garbage, an empty value, a list at the record's key (wrong
//!   type), an unknown layout tag, **an unknown codec version tag** on the
//!   record, a record truncated in its body or in its header, an expiry
//!   header that disagrees with the record, trailing bytes).
//!   - `engine::<damage>`: `Engine::begin` fails with
//!     `Error::Store(StoreError::Corrupt { store, .. })` naming the backend
//!     and saying the record "cannot be read" — never "absent", never a
//!     claim; permanent, not transient. `Store::get` and
//!     `Store::insert_if_absent` report the same, and the insert does not
//!     overwrite.
//!   - `http::<damage>`: through the `idem-tower` layer on a real port, the
//!     same request (and a different one) with that key is answered 500
//!     `corrupt-record` problem+json whose detail says it was not executed;
//!     the handler does not run; another key still works.
//! - **The stored outcome** is foreign (the record decodes, the bytes the
//!   integration stored in it do not: an unknown codec tag, truncated, a JSON
//!   document, empty) — on every backend, the memory store included (there
//!   through the `Store` API, which is the only way to write to it).
//!   - `engine::<damage>`: `Engine::execute` fails with `Error::Codec` (the
//!     exact `CodecError`), the work does not run.
//!   - `http::<damage>`: 500 `corrupt-record`, the handler does not run.
//!
//! In every case the damaged data is read back raw at the end (SQLite: every
//! column as a typed value; PostgreSQL: the whole row as text; Redis: `TYPE`,
//! `DUMP` and `PTTL`; memory: the record) and must be byte for byte what the
//! test wrote: nothing "repairs" it by overwriting.
//!
//! SQLite tables are `STRICT` and PostgreSQL has a `CHECK` on `state`, so a
//! value of the wrong SQL type, or an unknown state in PostgreSQL, cannot be
//! written at all; they are not cases here.
//!
//! Unreachable servers: IGNORED (FAILED under `CI=true` /
//! `IDEM_REQUIRE_BACKENDS=1`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use idem_core::store::codec::{self, CodecError, FORMAT_V1, FORMAT_V2};
use idem_core::store::{
    FencingToken, Record, Revision, State, Store, StoreError, SwapOutcome, Versioned,
};
use idem_core::{
    Begin, Clock, Engine, Error, Executed, Fingerprint, Outcome, Policy, RecordKey, Scope,
    SystemClock,
};
use idem_postgres::sqlx::{self, AssertSqlSafe};
use idem_reliability::engine::key;
use idem_reliability::http::{self, Service};
use idem_testkit::redis::Keyed;
use idem_testkit::runner::Suite;
use idem_testkit::{BackendKind, Isolated, chain};
use idem_tower::ProblemType;

const BODY: &str = r#"{"amount":1000,"currency":"EUR"}"#;
const OTHER_BODY: &str = r#"{"amount":9999,"currency":"USD"}"#;

/// One way to damage the data stored for a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Damage {
    // SQL rows (SQLite and PostgreSQL).
    TruncatedFingerprint,
    ShortToken,
    CompletedWithoutOutcome,
    InFlightWithoutDeadline,
    NegativeAttempts,
    AttemptsAboveU32,
    /// SQLite only (PostgreSQL's `CHECK` refuses it).
    UnknownState,
    // Redis values (standalone and cluster).
    Garbage,
    EmptyValue,
    WrongType,
    UnknownLayoutTag,
    UnknownCodecTag,
    TruncatedRecord,
    TruncatedHeader,
    ExpiryMismatch,
    TrailingBytes,
    // Stored outcomes (every backend).
    OutcomeUnknownTag,
    OutcomeTruncated,
    OutcomeForeign,
    OutcomeEmpty,
}

const SQL: [BackendKind; 2] = [BackendKind::Sqlite, BackendKind::Postgres];
const REDIS: [BackendKind; 2] = [BackendKind::Redis, BackendKind::RedisCluster];

impl Damage {
    /// Every damage, with its name in the test names.
    const ALL: [(Self, &'static str); 20] = [
        (Self::TruncatedFingerprint, "row_truncated_fingerprint"),
        (Self::ShortToken, "row_short_token"),
        (
            Self::CompletedWithoutOutcome,
            "row_completed_without_outcome",
        ),
        (
            Self::InFlightWithoutDeadline,
            "row_in_flight_without_deadline",
        ),
        (Self::NegativeAttempts, "row_negative_attempts"),
        (Self::AttemptsAboveU32, "row_attempts_above_u32"),
        (Self::UnknownState, "row_unknown_state"),
        (Self::Garbage, "value_garbage"),
        (Self::EmptyValue, "value_empty"),
        (Self::WrongType, "value_wrong_type_list"),
        (Self::UnknownLayoutTag, "value_unknown_layout_tag"),
        (Self::UnknownCodecTag, "value_unknown_codec_tag"),
        (Self::TruncatedRecord, "value_truncated_record"),
        (Self::TruncatedHeader, "value_truncated_header"),
        (Self::ExpiryMismatch, "value_expiry_mismatch"),
        (Self::TrailingBytes, "value_trailing_bytes"),
        (Self::OutcomeUnknownTag, "outcome_unknown_codec_tag"),
        (Self::OutcomeTruncated, "outcome_truncated"),
        (Self::OutcomeForeign, "outcome_foreign_json"),
        (Self::OutcomeEmpty, "outcome_empty"),
    ];

    fn backends(self) -> &'static [BackendKind] {
        match self {
            Self::UnknownState => &[BackendKind::Sqlite],
            Self::TruncatedFingerprint
            | Self::ShortToken
            | Self::CompletedWithoutOutcome
            | Self::InFlightWithoutDeadline
            | Self::NegativeAttempts
            | Self::AttemptsAboveU32 => &SQL,
            Self::Garbage
            | Self::EmptyValue
            | Self::WrongType
            | Self::UnknownLayoutTag
            | Self::UnknownCodecTag
            | Self::TruncatedRecord
            | Self::TruncatedHeader
            | Self::ExpiryMismatch
            | Self::TrailingBytes => &REDIS,
            Self::OutcomeUnknownTag
            | Self::OutcomeTruncated
            | Self::OutcomeForeign
            | Self::OutcomeEmpty => &BackendKind::ALL,
        }
    }

    /// Whether the record itself becomes unreadable (else: its outcome).
    fn breaks_record(self) -> bool {
        !matches!(
            self,
            Self::OutcomeUnknownTag
                | Self::OutcomeTruncated
                | Self::OutcomeForeign
                | Self::OutcomeEmpty
        )
    }

    /// The foreign outcome written in place of `outcome`.
    fn outcome(self, outcome: &[u8]) -> Vec<u8> {
        match self {
            Self::OutcomeUnknownTag => {
                assert_eq!(outcome.first(), Some(&FORMAT_V1));
                let mut o = outcome.to_vec();
                o[0] = 0x7f;
                o
            }
            Self::OutcomeTruncated => outcome[..outcome.len() / 2].to_vec(),
            Self::OutcomeForeign => br#"{"status":201,"body":"from another library"}"#.to_vec(),
            Self::OutcomeEmpty => Vec::new(),
            other => panic!("{other:?} does not damage an outcome"),
        }
    }

    /// `record` (completed) with its outcome replaced by [`outcome`](Self::outcome).
    fn foreign_outcome(self, record: &Record) -> Record {
        let State::Completed { token, outcome } = &record.state else {
            panic!("not completed: {record:?}");
        };
        let mut record = record.clone();
        record.state = State::Completed {
            token: *token,
            outcome: Outcome::new(self.outcome(outcome.as_bytes())),
        };
        record
    }

    /// What decoding the damaged outcome must report.
    #[track_caller]
    fn assert_outcome_error(self, e: &CodecError) {
        let ok = match self {
            Self::OutcomeUnknownTag => matches!(e, CodecError::UnknownFormat(0x7f)),
            Self::OutcomeTruncated => matches!(e, CodecError::Malformed(_)),
            Self::OutcomeForeign => matches!(e, CodecError::UnknownFormat(b'{')),
            Self::OutcomeEmpty => matches!(e, CodecError::Empty),
            _ => false,
        };
        assert!(ok, "{self:?}: unexpected codec error {e:?}");
    }

    /// The `SET` clause of the raw `UPDATE` (SQLite, PostgreSQL).
    fn sql_set(self, backend: BackendKind) -> &'static str {
        match (self, backend) {
            (Self::TruncatedFingerprint, BackendKind::Sqlite) => {
                "fingerprint = substr(fingerprint, 1, 31)"
            }
            (Self::TruncatedFingerprint, _) => "fingerprint = substring(fingerprint from 1 for 31)",
            (Self::ShortToken, BackendKind::Sqlite) => "token = x'0102'",
            (Self::ShortToken, _) => r"token = '\x0102'::bytea",
            (Self::CompletedWithoutOutcome, _) => "outcome = NULL",
            (Self::InFlightWithoutDeadline, _) => "state = 'in_flight'",
            (Self::NegativeAttempts, _) => "attempts = -1",
            (Self::AttemptsAboveU32, _) => "attempts = 4294967296",
            (Self::UnknownState, _) => "state = 'zombie'",
            (other, _) => panic!("{other:?} is not a row damage"),
        }
    }
}

/// A raw snapshot of what is stored for one key, compared byte for byte.
#[derive(Debug, PartialEq)]
#[allow(clippy::large_enum_variant)] // a few per test
enum RawValue {
    /// The memory store's record.
    Memory(Option<Versioned>),
    /// Every column of the SQLite row, typed.
    Sqlite(Vec<rusqlite::types::Value>),
    /// The PostgreSQL row as text (`(t.*)::text`: bytea in hex).
    Postgres(Option<String>),
    /// The Redis key: type, `DUMP` (the serialized value), and `PTTL`
    /// with every positive value (a TTL counting down) as 1: -1 for a key
    /// without expiry (what a raw `SET` leaves), -2 for a missing key.
    Redis {
        kind: String,
        dump: Option<Vec<u8>>,
        pttl: i64,
    },
}

/// Typed raw access to one fixture's data, behind the store's back.
struct Raw<'a> {
    fixture: &'a Isolated,
    admin: Option<Keyed>,
}

const SQLITE_COLUMNS: &str = "digest, tenant, principal, operation, \"key\", state, fingerprint, \
     token, lease_deadline, outcome, created_at, updated_at, expires_at, attempts, revision";

impl<'a> Raw<'a> {
    async fn new(fixture: &'a Isolated) -> Self {
        let admin = match fixture.redis_deployment() {
            Some(redis) => Some(redis.keyed().await.expect("an admin connection to Redis")),
            None => None,
        };
        Self { fixture, admin }
    }

    /// A second connection to the SQLite file.
    fn sqlite(&self) -> rusqlite::Connection {
        self.fixture
            .sqlite()
            .connect()
            .expect("a second connection")
    }

    fn sqlite_table(&self) -> String {
        // A validated name (`idem_sqlite::TableName`).
        format!("\"{}\"", self.fixture.sqlite().table().as_str())
    }

    fn pg_table(&self) -> String {
        // Validated, quoted, schema-qualified (`idem_postgres::TableName`).
        self.fixture.postgres().table().to_string()
    }

    async fn read(&mut self, rk: &RecordKey) -> RawValue {
        match self.fixture.kind() {
            BackendKind::Memory => RawValue::Memory(
                self.fixture
                    .store()
                    .get(rk, SystemClock.now())
                    .await
                    .unwrap(),
            ),
            BackendKind::Sqlite => {
                let conn = self.sqlite();
                let sql = format!(
                    "SELECT {SQLITE_COLUMNS} FROM {} WHERE digest = ?1",
                    self.sqlite_table()
                );
                let row = conn
                    .query_row(&sql, [&rk.digest()[..]], |row| {
                        (0..15)
                            .map(|i| row.get::<_, rusqlite::types::Value>(i))
                            .collect::<Result<Vec<_>, _>>()
                    })
                    .unwrap();
                RawValue::Sqlite(row)
            }
            BackendKind::Postgres => {
                let sql = format!(
                    "SELECT (t.*)::text FROM {} AS t WHERE digest = $1",
                    self.pg_table()
                );
                let row: Option<String> = sqlx::query_scalar(AssertSqlSafe(sql))
                    .bind(&rk.digest()[..])
                    .fetch_optional(self.fixture.postgres().pool())
                    .await
                    .unwrap();
                RawValue::Postgres(row)
            }
            BackendKind::Redis | BackendKind::RedisCluster | BackendKind::Valkey => {
                let key = self.fixture.redis().redis_key(rk);
                let admin = self.admin.as_mut().unwrap();
                let kind: String = admin.query(redis::cmd("TYPE").arg(&key)).await.unwrap();
                let dump: Option<Vec<u8>> =
                    admin.query(redis::cmd("DUMP").arg(&key)).await.unwrap();
                let pttl: i64 = admin.query(redis::cmd("PTTL").arg(&key)).await.unwrap();
                RawValue::Redis {
                    kind,
                    dump,
                    pttl: pttl.min(1),
                }
            }
        }
    }

    async fn redis_get(&mut self, key: &[u8]) -> Vec<u8> {
        let admin = self.admin.as_mut().unwrap();
        let value: Option<Vec<u8>> = admin.query(redis::cmd("GET").arg(key)).await.unwrap();
        value.expect("the record's value")
    }

    async fn redis_set(&mut self, key: &[u8], value: &[u8]) {
        let admin = self.admin.as_mut().unwrap();
        let () = admin
            .query(redis::cmd("SET").arg(key).arg(value))
            .await
            .unwrap();
    }

    /// Writes `damage` over the completed record under `rk`.
    async fn damage(&mut self, rk: &RecordKey, damage: Damage) {
        let backend = self.fixture.kind();
        if !damage.breaks_record() {
            return self.damage_outcome(rk, damage).await;
        }
        match backend {
            BackendKind::Sqlite | BackendKind::Postgres => {
                self.sql_update(rk, damage.sql_set(backend), None).await;
            }
            BackendKind::Redis | BackendKind::RedisCluster | BackendKind::Valkey => {
                let key = self.fixture.redis().redis_key(rk);
                let good = self.redis_get(&key).await;
                assert!(good.len() > 26, "a layout v1 value");
                let bad: Vec<u8> = match damage {
                    Damage::Garbage => b"garbage: not an idem record at all".to_vec(),
                    Damage::EmptyValue => Vec::new(),
                    Damage::WrongType => {
                        let admin = self.admin.as_mut().unwrap();
                        let _: i64 = admin.query(redis::cmd("DEL").arg(&key)).await.unwrap();
                        let n: i64 = admin
                            .query(redis::cmd("RPUSH").arg(&key).arg("a").arg(&good[..]))
                            .await
                            .unwrap();
                        assert_eq!(n, 2);
                        return;
                    }
                    Damage::UnknownLayoutTag => {
                        let mut v = good;
                        v[0] = 2;
                        v
                    }
                    Damage::UnknownCodecTag => {
                        // Byte 25: the record's codec format tag.
                        let mut v = good;
                        assert_eq!(v[25], FORMAT_V2);
                        v[25] = 0x7f;
                        v
                    }
                    Damage::TruncatedRecord => good[..good.len() - 7].to_vec(),
                    Damage::TruncatedHeader => good[..20].to_vec(),
                    Damage::ExpiryMismatch => {
                        // The header's expiry one millisecond later than the
                        // record's (still live).
                        let mut v = good;
                        v[8] ^= 1;
                        v
                    }
                    Damage::TrailingBytes => {
                        let mut v = good;
                        v.extend_from_slice(b"\0\0\x01");
                        v
                    }
                    other => panic!("{other:?} is not a Redis damage"),
                };
                self.redis_set(&key, &bad).await;
            }
            BackendKind::Memory => panic!("{damage:?}: the memory store has no bytes to damage"),
        }
    }

    /// `UPDATE … SET <set> WHERE digest = <rk>` on the SQL row (`value`, if
    /// any, bound as the second parameter): exactly one row.
    async fn sql_update(&self, rk: &RecordKey, set: &str, value: Option<Vec<u8>>) {
        let digest = rk.digest().to_vec();
        let updated = if self.fixture.kind() == BackendKind::Sqlite {
            let sql = format!("UPDATE {} SET {set} WHERE digest = ?1", self.sqlite_table());
            let params = std::iter::once(digest).chain(value);
            let params = rusqlite::params_from_iter(params.map(rusqlite::types::Value::Blob));
            self.sqlite().execute(&sql, params).unwrap() as u64
        } else {
            let sql = format!("UPDATE {} SET {set} WHERE digest = $1", self.pg_table());
            let query = sqlx::query(AssertSqlSafe(sql)).bind(digest);
            let query = match value {
                Some(v) => query.bind(v),
                None => query,
            };
            let pool = self.fixture.postgres().pool();
            query.execute(pool).await.unwrap().rows_affected()
        };
        assert_eq!(updated, 1, "{set}");
    }

    async fn damage_outcome(&mut self, rk: &RecordKey, damage: Damage) {
        let digest = &rk.digest()[..];
        match self.fixture.kind() {
            BackendKind::Memory => {
                // No bytes behind this store: write the foreign outcome
                // through its API.
                let store = self.fixture.store();
                let now = SystemClock.now();
                let current = store.get(rk, now).await.unwrap().unwrap();
                let next = Versioned {
                    revision: Revision::from_u64(0x0bad_0bad),
                    record: damage.foreign_outcome(&current.record),
                };
                assert_eq!(
                    store
                        .compare_and_swap(rk, &current, &next, now)
                        .await
                        .unwrap(),
                    SwapOutcome::Swapped
                );
            }
            BackendKind::Sqlite => {
                let sql = format!(
                    "SELECT outcome FROM {} WHERE digest = ?1",
                    self.sqlite_table()
                );
                let outcome: Vec<u8> = self
                    .sqlite()
                    .query_row(&sql, [digest], |r| r.get(0))
                    .unwrap();
                let bad = damage.outcome(&outcome);
                self.sql_update(rk, "outcome = ?2", Some(bad)).await;
            }
            BackendKind::Postgres => {
                let sql = format!("SELECT outcome FROM {} WHERE digest = $1", self.pg_table());
                let outcome: Vec<u8> = sqlx::query_scalar(AssertSqlSafe(sql))
                    .bind(digest)
                    .fetch_one(self.fixture.postgres().pool())
                    .await
                    .unwrap();
                let bad = damage.outcome(&outcome);
                self.sql_update(rk, "outcome = $2", Some(bad)).await;
            }
            BackendKind::Redis | BackendKind::RedisCluster | BackendKind::Valkey => {
                // A well-formed value (same header) whose record carries the
                // foreign outcome.
                let key = self.fixture.redis().redis_key(rk);
                let good = self.redis_get(&key).await;
                let record = damage.foreign_outcome(&codec::decode_record(&good[25..]).unwrap());
                let mut bad = good[..25].to_vec();
                bad.extend_from_slice(&codec::encode_record(&record).unwrap());
                self.redis_set(&key, &bad).await;
            }
        }
    }
}

fn scope() -> Scope {
    Scope::tenant("corruption").with_operation("charge")
}

#[track_caller]
fn assert_corrupt(e: &StoreError, backend: BackendKind, what: &str) {
    match e {
        StoreError::Corrupt { store, .. } => {
            let want = match backend {
                BackendKind::Sqlite => "sqlite",
                BackendKind::Postgres => "postgres",
                _ => "redis",
            };
            assert!(store.starts_with(want), "{what}: store `{store}`");
            let text = chain(e);
            assert!(text.contains("cannot be read"), "{what}: {text}");
            assert!(!e.is_transient(), "{what}: corruption is permanent");
        }
        other => panic!("{what}: expected StoreError::Corrupt, got {other:?}"),
    }
}

#[track_caller]
fn assert_engine_corrupt<T: std::fmt::Debug>(
    result: Result<T, Error>,
    backend: BackendKind,
    what: &str,
) {
    match result {
        Err(Error::Store(e)) => assert_corrupt(&e, backend, what),
        other => panic!("{what}: expected a corrupt-record error, got {other:?}"),
    }
}

/// Engine level.
async fn engine_case(backend: BackendKind, damage: Damage) {
    let fixture = Isolated::fresh(backend).await;
    let mut raw = Raw::new(&fixture).await;
    let engine = Engine::new(fixture.store())
        .with_policy(Policy::default())
        .expect("valid policy");
    let runs = Arc::new(AtomicU64::new(0));
    let k = key("order-1");
    let rk = RecordKey::new(&scope(), &k);
    let fp = Fingerprint::of(BODY.as_bytes());
    let work = |runs: &Arc<AtomicU64>| {
        let runs = runs.clone();
        move || async move {
            runs.fetch_add(1, Ordering::SeqCst);
            "ch_1".to_string()
        }
    };
    assert_eq!(
        engine.execute(&scope(), &k, fp, work(&runs)).await.unwrap(),
        Executed::Fresh("ch_1".to_string())
    );
    // A neighbour that must stay untouched.
    let nk = key("order-2");
    let nrk = RecordKey::new(&scope(), &nk);
    engine
        .execute(&scope(), &nk, fp, work(&runs))
        .await
        .unwrap();
    let neighbour = raw.read(&nrk).await;

    raw.damage(&rk, damage).await;
    let damaged = raw.read(&rk).await;
    let now = engine.clock().now();

    if damage.breaks_record() {
        for round in 0..2 {
            let begin = engine.begin(&scope(), &k, fp).await;
            assert_engine_corrupt(begin, backend, &format!("begin, round {round}"));
        }
        // A different request with the key: the same error, not a mismatch.
        let other = Fingerprint::of(OTHER_BODY.as_bytes());
        let begin = engine.begin(&scope(), &k, other).await;
        assert_engine_corrupt(begin, backend, "begin (other request)");
        let execute = engine.execute(&scope(), &k, fp, work(&runs)).await;
        assert_engine_corrupt(execute, backend, "execute");
        let store = fixture.store();
        let get = store.get(&rk, now).await;
        assert_corrupt(
            &get.expect_err("get must report corruption"),
            backend,
            "get",
        );
        let claim = Versioned {
            revision: Revision::from_u64(42),
            record: Record::new_claim(fp, FencingToken::from_u128(42), now, &Policy::default()),
        };
        let inserted = store.insert_if_absent(&rk, &claim, now).await;
        let e = inserted.expect_err("insert_if_absent must report corruption, never overwrite");
        assert_corrupt(&e, backend, "insert_if_absent");
    } else {
        // The record reads (the store reports what it holds), its outcome
        // does not decode.
        match engine.begin(&scope(), &k, fp).await.unwrap() {
            Begin::Replay(replay) => {
                let State::Completed { outcome, .. } = fixture
                    .store()
                    .get(&rk, now)
                    .await
                    .unwrap()
                    .unwrap()
                    .record
                    .state
                else {
                    panic!("still completed");
                };
                assert_eq!(replay.outcome, outcome);
            }
            other => panic!("the record must replay, got {other:?}"),
        }
        for round in 0..2 {
            match engine.execute(&scope(), &k, fp, work(&runs)).await {
                Err(Error::Codec(e)) => damage.assert_outcome_error(&e),
                other => panic!("execute, round {round}: expected a codec error, got {other:?}"),
            }
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2, "the work never ran again");
    assert_eq!(
        raw.read(&rk).await,
        damaged,
        "the damaged data was not overwritten"
    );
    assert_eq!(
        raw.read(&nrk).await,
        neighbour,
        "the neighbour is untouched"
    );
    // The neighbour still replays.
    assert_eq!(
        engine
            .execute(&scope(), &nk, fp, work(&runs))
            .await
            .unwrap(),
        Executed::Replayed("ch_1".to_string())
    );
}

/// HTTP level.
async fn http_case(backend: BackendKind, damage: Damage) {
    let fixture = Isolated::fresh(backend).await;
    let mut raw = Raw::new(&fixture).await;
    let engine = Arc::new(Engine::new(fixture.store()));
    let service = Service::new();
    let server = http::start(engine, &service).await;
    let first = server.charge("acme", "order-1", BODY).await;
    assert_eq!(first.status, 201, "{first}");
    let neighbour = server.charge("acme", "order-2", BODY).await;
    assert_eq!(neighbour.status, 201, "{neighbour}");
    assert_eq!(service.executions(), 2);
    let rk = http::record_key("acme", "order-1");
    let nrk = http::record_key("acme", "order-2");
    let neighbour_raw = raw.read(&nrk).await;

    raw.damage(&rk, damage).await;
    let damaged = raw.read(&rk).await;

    let mut bodies = vec![BODY, BODY];
    if damage.breaks_record() {
        // Unreadable: not even the fingerprint can be compared.
        bodies.push(OTHER_BODY);
    }
    for body in bodies {
        let r = server.charge("acme", "order-1", body).await;
        r.assert_problem(ProblemType::CorruptRecord);
        assert!(!r.replayed(), "{r}");
        let detail = r.json()["detail"].as_str().unwrap().to_string();
        assert!(detail.contains("cannot be read"), "{detail}");
        assert!(detail.contains("not executed"), "{detail}");
        assert_eq!(service.executions(), 2, "the handler must not run: {r}");
    }
    assert_eq!(
        raw.read(&rk).await,
        damaged,
        "the damaged data was not overwritten"
    );
    // The store still serves other keys; the neighbour is untouched.
    let again = server.charge("acme", "order-2", BODY).await;
    assert!(again.replayed(), "{again}");
    assert_eq!(again.body, neighbour.body);
    assert_eq!(raw.read(&nrk).await, neighbour_raw);
    let other = server.charge("acme", "order-3", BODY).await;
    assert_eq!((other.status, other.execution()), (201, Some(3)), "{other}");
    assert_eq!(service.executions(), 3);
}

fn main() -> std::process::ExitCode {
    let mut suite = Suite::new("corruption");
    for (damage, name) in Damage::ALL {
        let backends = damage.backends();
        suite = suite
            .each(backends, &format!("engine::{name}"), move |b| {
                engine_case(b, damage)
            })
            .each(backends, &format!("http::{name}"), move |b| {
                http_case(b, damage)
            });
    }
    suite.run()
}
