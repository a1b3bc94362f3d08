#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Bad input (issue 9, item 4): whatever bytes arrive, the parsers and the
//! record decoder return a clear error and never panic; the HTTP layer answers
//! 4xx problem+json (never 5xx), never calls the handler for a request it
//! refuses, and stores nothing for it; huge bodies get 413 and huge responses
//! are handled as documented.
//!
//! Property tests run `IDEM_PROPTEST_CASES` cases each (defaults below keep the
//! file to a few seconds). HTTP tests run on a real loopback port, over the
//! in-memory store and SQLite (no server needed).

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderValue, Request};
use idem_core::store::codec::{self, CodecError, DECODE_LIMIT, FORMAT_V1, FORMAT_V2};
use idem_core::store::{FencingToken, Record, State as KeyState, Versioned};
use idem_core::{
    FailureKind, Fingerprint, IdempotencyKey, KeyError, MAX_KEY_LEN, MemoryStore, Outcome, Policy,
    Scope, Timestamp,
};
use idem_reliability::http::{Reply, Server as HttpServer, serve};
use idem_reliability::pay::PayApp;
use idem_testkit::{BackendKind, Isolated};
use idem_tower::{
    KeyHeaderError, PROBLEM_JSON, ProblemType, QuotingError, parse_key_header, parse_key_value,
};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use tower::ServiceExt as _;

// ---------------------------------------------------------------------------
// Property-test plumbing
// ---------------------------------------------------------------------------

/// Cases per property: `IDEM_PROPTEST_CASES` if set, else `default`.
fn cases(default: u32) -> u32 {
    std::env::var("IDEM_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// Bytes that exercise every branch of the header parser far more often than
/// uniform bytes would: quotes, backslashes, whitespace, control and
/// non-ASCII bytes, commas and semicolons among visible ASCII.
fn tricky_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        4 => 0x21u8..=0x7e,
        2 => Just(b'"'),
        2 => Just(b'\\'),
        1 => Just(b' '),
        1 => Just(b'\t'),
        1 => Just(b','),
        1 => Just(b';'),
        1 => Just(0x00u8),
        1 => Just(0x7fu8),
        1 => 0x80u8..=0xff,
        1 => any::<u8>(),
    ]
}

/// Mostly tricky bytes, sometimes uniform ones; lengths around the 255-byte limit too.
fn header_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => proptest::collection::vec(tricky_byte(), 0..40),
        1 => proptest::collection::vec(tricky_byte(), 240..270),
        2 => proptest::collection::vec(any::<u8>(), 0..300),
        // A well-formed quoted key with one byte changed somewhere.
        2 => ("[!-~]{0,60}", any::<prop::sample::Index>(), tricky_byte()).prop_map(|(k, at, b)| {
            let mut v = quote(k.as_bytes());
            let i = at.index(v.len());
            v[i] = b;
            v
        }),
    ]
}

/// The canonical RFC 8941 quoting of `key`: escape `"` and `\`, quote the rest as is.
fn quote(key: &[u8]) -> Vec<u8> {
    let mut out = vec![b'"'];
    for &b in key {
        if b == b'"' || b == b'\\' {
            out.push(b'\\');
        }
        out.push(b);
    }
    out.push(b'"');
    out
}

/// The key rules, written independently of `IdempotencyKey::parse_bytes`.
fn key_model(raw: &[u8]) -> Result<(), KeyError> {
    if raw.is_empty() {
        return Err(KeyError::Empty);
    }
    if raw.len() > MAX_KEY_LEN {
        return Err(KeyError::TooLong { len: raw.len() });
    }
    match raw.iter().position(|b| !(0x21..=0x7e).contains(b)) {
        Some(position) => Err(KeyError::InvalidByte {
            position,
            byte: raw[position],
        }),
        None => Ok(()),
    }
}

/// Asserts that a key error's message names the rule it enforces.
fn assert_key_message(e: &KeyError) {
    let msg = e.to_string();
    match e {
        KeyError::Empty => assert!(msg.contains("empty"), "{msg}"),
        KeyError::TooLong { len } => {
            assert!(msg.contains(&format!("{len} bytes")), "{msg}");
            assert!(msg.contains("at most 255"), "{msg}");
        }
        KeyError::InvalidByte { position, byte } => {
            assert!(msg.contains(&format!("0x{byte:02x}")), "{msg}");
            assert!(msg.contains(&format!("position {position}")), "{msg}");
            assert!(msg.contains("visible ASCII (0x21-0x7E)"), "{msg}");
        }
        other => panic!("a KeyError variant this test does not know: {other:?}; extend it"),
    }
}

/// Asserts that a header error's message names the rule it enforces.
fn assert_header_message(e: &KeyHeaderError) {
    let msg = e.to_string();
    match e {
        KeyHeaderError::Multiple { count } => {
            assert!(msg.contains(&format!("{count} times")), "{msg}");
            assert!(msg.contains("exactly once"), "{msg}");
        }
        KeyHeaderError::Quoting(q) => {
            assert!(
                msg.starts_with("the quoted idempotency key is malformed"),
                "{msg}"
            );
            match q {
                QuotingError::Unterminated => assert!(msg.contains("no closing quote"), "{msg}"),
                QuotingError::BadEscape { position } => {
                    assert!(msg.contains(&format!("byte {position}")), "{msg}");
                    assert!(msg.contains("may be escaped"), "{msg}");
                }
                QuotingError::InvalidByte { position, byte } => {
                    assert!(msg.contains(&format!("byte {position}")), "{msg}");
                    assert!(msg.contains(&format!("0x{byte:02x}")), "{msg}");
                    assert!(msg.contains("not allowed in a string"), "{msg}");
                }
                QuotingError::TrailingData { position } => {
                    assert!(msg.contains(&format!("byte {position}")), "{msg}");
                    assert!(
                        msg.contains("nothing may follow the closing quote"),
                        "{msg}"
                    );
                }
                other => panic!("a QuotingError variant this test does not know: {other:?}"),
            }
        }
        KeyHeaderError::Key(k) => {
            assert_eq!(msg, k.to_string());
            assert_key_message(k);
        }
        other => panic!("a KeyHeaderError variant this test does not know: {other:?}"),
    }
}

/// `raw` without leading and trailing spaces and tabs (HTTP OWS).
fn trim_ows(raw: &[u8]) -> &[u8] {
    let ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = raw.iter().position(|b| !ows(b)).unwrap_or(raw.len());
    let end = raw.iter().rposition(|b| !ows(b)).map_or(start, |i| i + 1);
    &raw[start..end]
}

// ---------------------------------------------------------------------------
// Key parser
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(1024)))]

    /// `IdempotencyKey::parse_bytes` on any bytes: accepted exactly when the
    /// rules allow, otherwise the error the rules predict, with a message
    /// naming the rule.
    #[test]
    fn key_parse_bytes_matches_the_rules(raw in header_bytes()) {
        match (IdempotencyKey::parse_bytes(&raw), key_model(&raw)) {
            (Ok(key), Ok(())) => prop_assert_eq!(key.as_str().as_bytes(), &raw[..]),
            (Err(got), Err(want)) => {
                prop_assert_eq!(&got, &want);
                assert_key_message(&got);
            }
            (got, want) => prop_assert!(false, "parse_bytes({raw:?}) = {got:?}, rules say {want:?}"),
        }
    }

    /// `IdempotencyKey::parse` (and `FromStr`) on any string, non-ASCII included.
    #[test]
    fn key_parse_str_matches_the_rules(raw in any::<String>()) {
        let got = IdempotencyKey::parse(&raw);
        prop_assert_eq!(got.clone().map(|_| ()), key_model(raw.as_bytes()));
        prop_assert_eq!(raw.parse::<IdempotencyKey>(), got.clone());
        if let Err(e) = &got {
            assert_key_message(e);
        }
    }
}

// ---------------------------------------------------------------------------
// Header parser
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(2048)))]

    /// `parse_key_value` on any bytes: never panics; a bare value is exactly a
    /// key parse of the trimmed bytes; an accepted quoted value is the
    /// canonical quoting of its key (so no two spellings of one quoted key
    /// exist); every error names its rule.
    #[test]
    fn header_value_parser_on_arbitrary_bytes(raw in header_bytes()) {
        let got = parse_key_value(&raw);
        let value = trim_ows(&raw);
        if value.first() == Some(&b'"') {
            match &got {
                Ok(key) => prop_assert_eq!(quote(key.as_str().as_bytes()), value.to_vec()),
                Err(e) => assert_header_message(e),
            }
        } else {
            match (&got, IdempotencyKey::parse_bytes(value)) {
                (Ok(a), Ok(b)) => prop_assert_eq!(a, &b),
                (Err(KeyHeaderError::Key(a)), Err(b)) => {
                    prop_assert_eq!(a, &b);
                    assert_key_message(a);
                }
                (got, want) => prop_assert!(false, "bare {raw:?}: {got:?} vs {want:?}"),
            }
        }
        if let Ok(key) = &got {
            prop_assert_eq!(key_model(key.as_str().as_bytes()), Ok(()));
        }
    }

    /// Through a `HeaderMap`: one value parses as `parse_key_value`; two
    /// values (the same or not) are refused as `Multiple`.
    #[test]
    fn header_map_parser(a in header_bytes(), b in header_bytes()) {
        let name = http::HeaderName::from_static("idempotency-key");
        let (Ok(va), Ok(vb)) = (HeaderValue::from_bytes(&a), HeaderValue::from_bytes(&b)) else {
            return Ok(()); // http refuses it before any parser sees it
        };
        let mut headers = http::HeaderMap::new();
        headers.insert(&name, va);
        prop_assert_eq!(parse_key_header(&headers, &name), parse_key_value(&a).map(Some));
        headers.append(&name, vb);
        let two = parse_key_header(&headers, &name);
        prop_assert_eq!(&two, &Err(KeyHeaderError::Multiple { count: 2 }));
        assert_header_message(&two.unwrap_err());
    }
}

/// The scope of every HTTP test in this file.
fn scope() -> Scope {
    Scope::tenant("bad-input")
}

/// The layer itself, driven with arbitrary header bytes (everything
/// `http::HeaderValue` lets through): a key the parser accepts runs the
/// handler once and is stored; any other value is a 400 `invalid-key`
/// problem whose detail is the parser's message, the handler is not called
/// and nothing is stored. Never 5xx.
#[test]
fn layer_on_arbitrary_key_headers() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut runner = TestRunner::new(ProptestConfig::with_cases(cases(256)));
    let result = runner.run(&header_bytes(), |raw| {
        let Ok(value) = HeaderValue::from_bytes(&raw) else {
            return Ok(());
        };
        rt.block_on(async {
            let store = MemoryStore::new();
            let app = PayApp::new(Arc::new(store.clone()), scope(), Policy::default(), 1024);
            let request = Request::post("/pay")
                .header("idempotency-key", value)
                .header("content-type", "application/json")
                .body(Body::from(r#"{"amount":1,"currency":"EUR"}"#))
                .unwrap();
            let r = Reply::of_response(app.router().oneshot(request).await.unwrap()).await;
            prop_assert!(r.status < 500, "{r} for {raw:?}");
            match parse_key_value(&raw) {
                Ok(key) => {
                    prop_assert_eq!(r.status, 201);
                    prop_assert_eq!(app.executions(), 1);
                    let stored = app.stored(key.as_str()).await.map(|v| v.record.state);
                    prop_assert!(
                        matches!(stored, Some(KeyState::Completed { .. })),
                        "accepted key not completed"
                    );
                }
                Err(e) => {
                    prop_assert_eq!(r.status, 400, "{:?}", raw);
                    prop_assert_eq!(r.header("content-type"), Some(PROBLEM_JSON));
                    let json = r.json();
                    prop_assert_eq!(json["type"].as_str(), Some(ProblemType::InvalidKey.uri()));
                    prop_assert_eq!(json["status"].as_u64(), Some(400));
                    let detail = e.to_string();
                    prop_assert_eq!(json["detail"].as_str(), Some(detail.as_str()));
                    prop_assert_eq!(app.inner_calls(), 0, "inner service called for {:?}", raw);
                    prop_assert!(store.is_empty(), "something stored for {:?}", raw);
                }
            }
            Ok(())
        })
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

// ---------------------------------------------------------------------------
// Record decoder
// ---------------------------------------------------------------------------

fn arb_state() -> impl Strategy<Value = KeyState> {
    let token = any::<u128>().prop_map(FencingToken::from_u128);
    let outcome = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..64),
        proptest::collection::vec(any::<u8>(), 100..2000),
    ]
    .prop_map(Outcome::new);
    prop_oneof![
        (token.clone(), any::<u64>()).prop_map(|(token, d)| KeyState::InFlight {
            token,
            lease_deadline: Timestamp::from_millis(d),
        }),
        (token.clone(), outcome.clone())
            .prop_map(|(token, outcome)| KeyState::Completed { token, outcome }),
        (token, any::<bool>(), outcome).prop_map(|(token, retry, outcome)| KeyState::Failed {
            token,
            kind: if retry {
                FailureKind::Retryable
            } else {
                FailureKind::Permanent
            },
            outcome,
        }),
    ]
}

fn arb_record() -> impl Strategy<Value = Record> {
    (
        proptest::collection::vec(any::<u8>(), 0..16),
        arb_state(),
        any::<[u64; 3]>(),
        any::<u32>(),
    )
        .prop_map(|(fp, state, [c, u, e], attempts)| {
            Record::from_parts(
                Fingerprint::of(&fp),
                state,
                Timestamp::from_millis(c),
                Timestamp::from_millis(u),
                Timestamp::from_millis(e),
                attempts,
            )
        })
}

/// How a stored record was damaged.
#[derive(Clone, Debug)]
enum Damage {
    Truncate(prop::sample::Index),
    Append(Vec<u8>),
    Flip(prop::sample::Index, u8),
    Splice(prop::sample::Index, Vec<u8>),
    Tag(u8),
}

fn arb_damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        any::<prop::sample::Index>().prop_map(Damage::Truncate),
        proptest::collection::vec(any::<u8>(), 1..16).prop_map(Damage::Append),
        (any::<prop::sample::Index>(), 1u8..=255).prop_map(|(i, x)| Damage::Flip(i, x)),
        (
            any::<prop::sample::Index>(),
            proptest::collection::vec(any::<u8>(), 1..16)
        )
            .prop_map(|(i, b)| Damage::Splice(i, b)),
        any::<u8>()
            .prop_filter("not a record tag", |t| *t != FORMAT_V1 && *t != FORMAT_V2)
            .prop_map(Damage::Tag),
    ]
}

/// Asserts a codec error's message names what is wrong.
fn assert_codec_message(e: &CodecError) {
    let msg = e.to_string();
    match e {
        CodecError::Empty => assert_eq!(msg, "stored value is empty"),
        CodecError::UnknownFormat(tag) => {
            assert!(msg.contains(&format!("unknown format tag {tag}")), "{msg}");
            assert!(
                msg.contains(&format!(
                    "writes tag {FORMAT_V1} for values and {FORMAT_V2} for records"
                )),
                "{msg}"
            );
        }
        CodecError::Malformed(source) => {
            assert_eq!(msg, "stored value is malformed");
            assert!(
                std::error::Error::source(e).is_some(),
                "malformed without a source"
            );
            assert!(!source.to_string().is_empty());
        }
        CodecError::TrailingBytes(n) => {
            assert!(*n > 0);
            assert_eq!(msg, format!("stored value has {n} trailing bytes"));
        }
        other => panic!("a CodecError variant this test does not know: {other:?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(2048)))]

    /// `decode_record` on any bytes: never panics; the error says which rule
    /// (empty, unknown tag, malformed, trailing bytes); anything it accepts
    /// round-trips through the encoder.
    #[test]
    fn decode_record_on_arbitrary_bytes(
        raw in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..200),
            // Starting with a record tag, to get past the first check.
            proptest::collection::vec(any::<u8>(), 0..200).prop_map(|mut v| { v.insert(0, FORMAT_V1); v }),
            proptest::collection::vec(any::<u8>(), 0..200).prop_map(|mut v| { v.insert(0, FORMAT_V2); v }),
        ]
    ) {
        match codec::decode_record(&raw) {
            Ok(record) => {
                let again = codec::encode_record(&record).unwrap();
                prop_assert_eq!(codec::decode_record(&again).unwrap(), record);
            }
            Err(e) => {
                match raw.first() {
                    None => prop_assert!(matches!(e, CodecError::Empty)),
                    Some(&tag) if tag != FORMAT_V1 && tag != FORMAT_V2 => {
                        prop_assert!(matches!(e, CodecError::UnknownFormat(t) if t == tag));
                    }
                    Some(_) => prop_assert!(matches!(
                        e,
                        CodecError::Malformed(_) | CodecError::TrailingBytes(_)
                    )),
                }
                assert_codec_message(&e);
            }
        }
        // The generic decoder with other target types, the versioned record too.
        let _ = codec::decode::<Versioned>(&raw);
        let _ = codec::decode::<Vec<u8>>(&raw);
        let _ = codec::decode::<String>(&raw);
        let _ = codec::decode::<Vec<String>>(&raw);
        let _ = codec::decode::<(u64, Option<Vec<u64>>, bool)>(&raw);
    }

    /// A valid record, damaged: never a panic; a truncated record is always
    /// an error, appended bytes are reported as exactly that many trailing
    /// bytes, another tag as an unknown format; other damage either fails
    /// clearly or decodes to a record that round-trips.
    #[test]
    fn decode_record_on_damaged_records(record in arb_record(), damage in arb_damage()) {
        let good = codec::encode_record(&record).unwrap();
        prop_assert_eq!(&codec::decode_record(&good).unwrap(), &record);
        let mut bad = good.clone();
        match &damage {
            Damage::Truncate(i) => bad.truncate(i.index(good.len())),
            Damage::Append(extra) => bad.extend_from_slice(extra),
            Damage::Flip(i, x) => bad[i.index(good.len())] ^= x,
            Damage::Splice(i, bytes) => {
                let at = i.index(good.len());
                bad.splice(at..at, bytes.iter().copied());
            }
            Damage::Tag(t) => bad[0] = *t,
        }
        let got = codec::decode_record(&bad);
        if let Err(e) = &got {
            assert_codec_message(e);
        }
        match damage {
            Damage::Truncate(_) => prop_assert!(got.is_err(), "a truncated record decoded"),
            Damage::Append(extra) => prop_assert!(
                matches!(got, Err(CodecError::TrailingBytes(n)) if n == extra.len()),
                "{got:?}"
            ),
            Damage::Tag(t) => prop_assert!(matches!(got, Err(CodecError::UnknownFormat(x)) if x == t)),
            Damage::Flip(..) | Damage::Splice(..) => {
                if let Ok(decoded) = got {
                    let again = codec::encode_record(&decoded).unwrap();
                    prop_assert_eq!(codec::decode_record(&again).unwrap(), decoded);
                }
            }
        }
    }
}

/// The process's peak resident set (`VmHWM`), in bytes.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A corrupt length prefix (up to and beyond the decoder's 256 MiB limit) on
/// a few bytes of input is an error, and does not make the process touch
/// the memory it names.
#[test]
fn huge_length_prefixes_are_refused_without_touching_memory() {
    let before = peak_rss();
    // bincode's standard varint: 0xfb + u16, 0xfc + u32, 0xfd + u64.
    let lengths: [u64; 6] = [
        1 << 20,
        200 << 20,
        DECODE_LIMIT as u64,
        DECODE_LIMIT as u64 + 1,
        u64::from(u32::MAX),
        u64::MAX,
    ];
    for len in lengths {
        let mut raw = vec![FORMAT_V1, 0xfd];
        raw.extend_from_slice(&len.to_le_bytes());
        raw.extend_from_slice(b"abc");
        assert!(codec::decode::<Vec<u8>>(&raw).is_err(), "len {len}");
        assert!(codec::decode::<String>(&raw).is_err(), "len {len}");
        assert!(codec::decode::<Vec<String>>(&raw).is_err(), "len {len}");
        // Inside a record: a fingerprint (32 bytes), then the state's variant,
        // token, then the outcome's length.
        let record = Record::from_parts(
            Fingerprint::of(b"x"),
            KeyState::Completed {
                token: FencingToken::from_u128(1),
                outcome: Outcome::new(vec![7u8; 3]),
            },
            Timestamp::from_millis(1),
            Timestamp::from_millis(1),
            Timestamp::from_millis(1),
            1,
        );
        let good = codec::encode_record(&record).unwrap();
        // Find the outcome: its 3-byte length prefix followed by 7 7 7.
        let at = good.windows(4).position(|w| w == [3, 7, 7, 7]).unwrap();
        let mut bad = good[..at].to_vec();
        bad.push(0xfd);
        bad.extend_from_slice(&len.to_le_bytes());
        bad.extend_from_slice(&good[at + 1..]);
        let e = codec::decode_record(&bad).unwrap_err();
        assert!(matches!(e, CodecError::Malformed(_)), "{e:?}");
        assert_codec_message(&e);
    }
    if let (Some(before), Some(after)) = (before, peak_rss()) {
        // Every length above is at least 1 MiB and one is 256 MiB; had the
        // decoder filled what it reserved, the peak would have grown by it.
        assert!(
            after < before + (64 << 20),
            "peak RSS grew from {before} to {after} bytes while decoding 20-byte inputs"
        );
    }
}

/// Deeply nested and oversized containers in the generic decoder: errors, no
/// stack overflow.
#[test]
fn nested_and_oversized_containers() {
    // 100 000 nested "Some" of a recursive type would recurse; bincode values
    // of our types are not recursive, so check the widest one instead: a
    // sequence claiming u32::MAX strings, each one byte.
    let mut raw = vec![FORMAT_V1, 0xfc];
    raw.extend_from_slice(&u32::MAX.to_le_bytes());
    raw.extend(std::iter::repeat_n(0u8, 10_000));
    assert!(codec::decode::<Vec<String>>(&raw).is_err());
    assert!(codec::decode::<Vec<Vec<u8>>>(&raw).is_err());
}

// ---------------------------------------------------------------------------
// HTTP: the app
// ---------------------------------------------------------------------------

const BACKENDS: [BackendKind; 2] = [BackendKind::Memory, BackendKind::Sqlite];

/// The app on a loopback port over `backend`.
struct Server {
    app: PayApp,
    http: HttpServer,
    _store: Isolated,
}

async fn start(backend: BackendKind, policy: Policy, max_body: usize) -> Server {
    let isolated = Isolated::fresh(backend).await;
    let app = PayApp::new(isolated.store(), scope(), policy, max_body);
    Server {
        http: serve(app.router()).await,
        app,
        _store: isolated,
    }
}

impl Server {
    async fn post(&self, path: &str, key: &str, body: impl Into<reqwest::Body>) -> Reply {
        let req = self
            .http
            .client()
            .post(format!("{}{path}", self.http.base()));
        let req = req
            .header("idempotency-key", key)
            .header("content-type", "application/json");
        self.http.send(req.body(body)).await
    }
}

// ---------------------------------------------------------------------------
// HTTP: huge bodies
// ---------------------------------------------------------------------------

const LIMIT: usize = 1024;

/// A JSON payment body of exactly `len` bytes (padded with spaces).
fn payment_of_len(len: usize) -> String {
    let mut s = String::from(r#"{"amount":1,"currency":"EUR"}"#);
    assert!(len >= s.len());
    s.insert_str(1, &" ".repeat(len - s.len()));
    assert_eq!(s.len(), len);
    s
}

/// Bodies above the limit, announced by `Content-Length`: 413 before the
/// body is read, handler not called, nothing stored; exactly the limit is
/// accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_the_limit_by_content_length_is_413() {
    for backend in BACKENDS {
        let server = start(backend, Policy::default(), LIMIT).await;
        for (i, len) in [LIMIT + 1, 64 * 1024, 4 * 1024 * 1024]
            .into_iter()
            .enumerate()
        {
            let key = format!("big-{i}");
            // Headers only: the layer must refuse on the announced length,
            // without waiting for (or reading) a body it will not accept.
            // (A client that streams the whole body may see its write cut
            // by the server's early answer, which is the point.)
            let head = format!(
                "POST /pay HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
                 Idempotency-Key: {key}\r\nContent-Type: application/json\r\n\
                 Content-Length: {len}\r\n\r\n"
            );
            let r = server.http.raw(head.as_bytes()).await;
            r.assert_problem(ProblemType::BodyTooLarge);
            assert!(
                server.app.stored(&key).await.is_none(),
                "{backend:?}: stored"
            );
        }
        assert_eq!(server.app.inner_calls(), 0, "{backend:?}");
        // Exactly the limit: accepted, executed once; then replayed.
        let ok = server.post("/pay", "at-limit", payment_of_len(LIMIT)).await;
        assert_eq!(ok.status, 201, "{backend:?}: {ok:?}");
        let again = server.post("/pay", "at-limit", payment_of_len(LIMIT)).await;
        assert!(again.replayed());
        assert_eq!(server.app.executions(), 1, "{backend:?}");
    }
}

/// A chunked body (no `Content-Length`) that grows past the limit: 413 once
/// the limit is crossed, handler not called, nothing stored; the same key then
/// works for a normal request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_body_over_the_limit_is_413() {
    for backend in BACKENDS {
        let server = start(backend, Policy::default(), LIMIT).await;
        let mut req = b"POST /pay HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
            Idempotency-Key: chunked-1\r\nContent-Type: application/json\r\n\
            Transfer-Encoding: chunked\r\n\r\n"
            .to_vec();
        for _ in 0..8 {
            req.extend_from_slice(format!("{:x}\r\n", 512).as_bytes());
            req.extend(std::iter::repeat_n(b' ', 512));
            req.extend_from_slice(b"\r\n");
        }
        req.extend_from_slice(b"0\r\n\r\n");
        let r = server.http.raw(&req).await;
        r.assert_problem(ProblemType::BodyTooLarge);
        assert_eq!(server.app.inner_calls(), 0);
        assert!(server.app.stored("chunked-1").await.is_none());
        let ok = server.post("/pay", "chunked-1", payment_of_len(100)).await;
        assert_eq!(ok.status, 201, "{backend:?}: {ok:?}");
        assert!(!ok.replayed());
        assert_eq!(server.app.executions(), 1);
    }
}

// ---------------------------------------------------------------------------
// HTTP: huge outcomes
// ---------------------------------------------------------------------------

/// A response larger than the engine's `max_outcome_bytes`: the first client
/// gets it in full; the key is completed with a small `response-not-stored`
/// marker (never the partial response), which every retry gets, replayed;
/// the handler ran once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcome_over_the_limit_is_returned_once_and_never_re_executed() {
    const MAX_OUTCOME: usize = 4096;
    for backend in BACKENDS {
        let policy = Policy::default().with_max_outcome_bytes(MAX_OUTCOME);
        let server = start(backend, policy, LIMIT).await;
        for (key, n) in [("huge-1", MAX_OUTCOME + 1), ("huge-2", 3 * 1024 * 1024)] {
            let before = server.app.executions();
            let first = server.post(&format!("/big/{n}"), key, "{}").await;
            assert_eq!(first.status, 201, "{backend:?}");
            assert_eq!(
                first.body.len(),
                n,
                "{backend:?}: the first client gets it all"
            );
            assert!(first.body.iter().all(|&b| b == b'x'));
            let stored = server.app.stored(key).await.expect("completed");
            let KeyState::Completed { outcome, .. } = &stored.record.state else {
                panic!("{backend:?}: {:?}", stored.record.state);
            };
            assert!(
                outcome.len() <= MAX_OUTCOME,
                "{backend:?}: {} bytes stored over a limit of {MAX_OUTCOME}",
                outcome.len()
            );
            for _ in 0..2 {
                let retry = server.post(&format!("/big/{n}"), key, "{}").await;
                retry.assert_problem(ProblemType::ResponseNotStored);
                assert!(retry.replayed(), "{backend:?}: {retry}");
            }
            assert_eq!(
                server.app.executions(),
                before + 1,
                "{backend:?}: ran twice"
            );
        }
        // Just under the limit is stored and replayed byte for byte.
        let n = MAX_OUTCOME - 512;
        let first = server.post(&format!("/big/{n}"), "fits", "{}").await;
        let retry = server.post(&format!("/big/{n}"), "fits", "{}").await;
        assert_eq!((first.status, retry.status), (201, 201));
        assert!(retry.replayed());
        assert_eq!(first.body, retry.body);
    }
}

// ---------------------------------------------------------------------------
// HTTP: garbage bodies and headers
// ---------------------------------------------------------------------------

/// Bodies the handler cannot parse: the router's 4xx (a processed request's
/// final answer) is stored and replayed, the business logic never runs, no
/// 5xx; the same key with a different (valid) body is a 422 mismatch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_json_bodies_get_a_stored_4xx_and_never_execute() {
    let deep = format!("{}{}", "[".repeat(100_000 / 2), "]".repeat(100_000 / 2));
    let bodies: Vec<Vec<u8>> = vec![
        Vec::new(),
        b"{".to_vec(),
        br#"{"amount":"#.to_vec(),
        br#"{"amount":-1,"currency":"EUR"}"#.to_vec(),
        br#"{"amount":1e999,"currency":"EUR"}"#.to_vec(),
        br#"{"amount":1,"currency":"EUR","#.to_vec(),
        b"\xff\xfe\x00garbage\x80".to_vec(),
        b"null".to_vec(),
        deep.into_bytes(),
    ];
    for backend in BACKENDS {
        let server = start(backend, Policy::default(), 256 * 1024).await;
        for (i, body) in bodies.iter().enumerate() {
            let key = format!("garbage-{i}");
            let first = server.post("/pay", &key, body.clone()).await;
            assert!(
                (400..500).contains(&first.status),
                "{backend:?} body {i}: {first:?}"
            );
            let again = server.post("/pay", &key, body.clone()).await;
            assert_eq!(again.status, first.status, "{backend:?} body {i}");
            assert!(again.replayed(), "{backend:?} body {i}: 4xx not stored");
            assert_eq!(again.body, first.body);
            let fixed = server
                .post("/pay", &key, r#"{"amount":1,"currency":"EUR"}"#)
                .await;
            fixed.assert_problem(ProblemType::KeyReused);
        }
        assert_eq!(server.app.executions(), 0, "{backend:?}");
        // The router ran once per key (the first request), never for replays.
        assert_eq!(server.app.inner_calls(), bodies.len(), "{backend:?}");
    }
}

/// Nasty `Idempotency-Key` headers over a real socket (bytes `http` would not
/// let a client send, lines hyper refuses itself, repeated headers, lists):
/// always a 4xx, never the handler, nothing stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nasty_key_headers_over_the_wire() {
    let long = "k".repeat(MAX_KEY_LEN + 1);
    let huge = "k".repeat(100 * 1024);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", b"Idempotency-Key: \r\n".to_vec()),
        ("spaces only", b"Idempotency-Key:    \t \r\n".to_vec()),
        (
            "too long",
            format!("Idempotency-Key: {long}\r\n").into_bytes(),
        ),
        (
            "way too long",
            format!("Idempotency-Key: {huge}\r\n").into_bytes(),
        ),
        ("obs-text", b"Idempotency-Key: k\xe9y\r\n".to_vec()),
        ("utf-8", "Idempotency-Key: clé\r\n".as_bytes().to_vec()),
        ("inner space", b"Idempotency-Key: a b\r\n".to_vec()),
        ("DEL", b"Idempotency-Key: a\x7fb\r\n".to_vec()),
        ("NUL", b"Idempotency-Key: a\x00b\r\n".to_vec()),
        ("unterminated", b"Idempotency-Key: \"abc\r\n".to_vec()),
        ("bad escape", b"Idempotency-Key: \"a\\nb\"\r\n".to_vec()),
        ("params", b"Idempotency-Key: \"abc\";p=1\r\n".to_vec()),
        ("list", b"Idempotency-Key: \"a\", \"b\"\r\n".to_vec()),
        (
            "twice",
            b"Idempotency-Key: same\r\nIdempotency-Key: same\r\n".to_vec(),
        ),
        (
            "twice, other case",
            b"idempotency-key: a\r\nIDEMPOTENCY-KEY: b\r\n".to_vec(),
        ),
        ("bare CR", b"Idempotency-Key: a\rb\r\n".to_vec()),
        ("folded", b"Idempotency-Key: a\r\n b\r\n".to_vec()),
    ];
    for backend in BACKENDS {
        let server = start(backend, Policy::default(), LIMIT).await;
        for (name, header) in &cases {
            let body = br#"{"amount":1,"currency":"EUR"}"#;
            let mut req = b"POST /pay HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
                Content-Type: application/json\r\n"
                .to_vec();
            req.extend_from_slice(header);
            req.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
            req.extend_from_slice(body);
            let r = server.http.raw(&req).await;
            assert!(
                (400..500).contains(&r.status),
                "{backend:?} {name}: {} {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            );
            if r.header("content-type") == Some(PROBLEM_JSON) {
                // Answered by the layer (not by hyper, which answers bare 400/431).
                r.assert_problem(ProblemType::InvalidKey);
            }
        }
        assert_eq!(server.app.inner_calls(), 0, "{backend:?}");
        assert_eq!(server.app.executions(), 0, "{backend:?}");
    }
}

/// The layer's own problem answers carry a detail that names the rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_key_details_name_the_rule() {
    let server = start(BackendKind::Memory, Policy::default(), LIMIT).await;
    let long = "k".repeat(MAX_KEY_LEN + 1);
    for (key, needle) in [
        (&b"a\xe9b"[..], "0xe9 at position 1"),
        (long.as_bytes(), "256 bytes long; at most 255"),
        (b"\"abc", "no closing quote"),
        (b"\"a\\nb\"", "may be escaped"),
        (b"\"a\";x", "nothing may follow the closing quote"),
        (b"\"a b\"", "0x20 at position 1"),
    ] {
        let value = HeaderValue::from_bytes(key).unwrap();
        let key = String::from_utf8_lossy(key);
        let req = server
            .http
            .client()
            .post(format!("{}/pay", server.http.base()));
        let r = server
            .http
            .send(req.header("idempotency-key", value).body("{}"))
            .await;
        assert_eq!(r.status, 400, "{key}");
        let json = r.json();
        let detail = json["detail"].as_str().unwrap();
        assert!(detail.contains(needle), "{key}: {detail}");
    }
    assert_eq!(server.app.inner_calls(), 0);
}
