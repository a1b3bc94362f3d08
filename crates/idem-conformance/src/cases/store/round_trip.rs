//! Records round-trip exactly (every field, extreme values, large outcomes),
//! and distinct keys and scopes never collide.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use idem_core::store::{
    FencingToken, InsertOutcome, Revision, State, Store, SwapOutcome, Versioned,
};
use idem_core::{FailureKind, Fingerprint, IdempotencyKey, Outcome, RecordKey, Scope, Timestamp};

use super::super::{T0, at, claim, completed, key, must, noise, open, same_bytes, secs, stale};
use crate::StoreFactory;

/// Builds records with extreme and distinct values in every field, one per
/// state.
fn extreme_records() -> Vec<(&'static str, Versioned)> {
    let all_bytes: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
    let mut fp = [0u8; 32];
    for (i, b) in fp.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(37) ^ 0x80;
    }
    let base = |rev: u64, state: State, attempts: u32| Versioned {
        revision: Revision::from_u64(rev),
        record: idem_core::store::Record::from_parts(
            Fingerprint::from_bytes(fp),
            state,
            Timestamp::from_millis(1),
            at(123),
            at(secs(60) + 7),
            attempts,
        ),
    };
    vec![
        (
            "in flight, max revision, max token, max attempts",
            base(
                u64::MAX,
                State::InFlight {
                    token: FencingToken::from_u128(u128::MAX),
                    lease_deadline: at(secs(30) + 1),
                },
                u32::MAX,
            ),
        ),
        (
            "completed with every byte value, revision with the top bit set",
            base(
                1 << 63,
                State::Completed {
                    token: FencingToken::from_u128(1),
                    outcome: Outcome::new(all_bytes.clone()),
                },
                1,
            ),
        ),
        (
            "failed retryable with an empty outcome, revision 0",
            base(
                0,
                State::Failed {
                    token: FencingToken::from_u128(1 << 127),
                    kind: FailureKind::Retryable,
                    outcome: Outcome::default(),
                },
                2,
            ),
        ),
        (
            "failed permanent with a NUL outcome, revision i64::MAX",
            base(
                i64::MAX as u64,
                State::Failed {
                    token: FencingToken::from_u128(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210),
                    kind: FailureKind::Permanent,
                    outcome: Outcome::new(vec![0u8]),
                },
                0,
            ),
        ),
        (
            "completed with invalid UTF-8 and a zero token",
            base(
                42,
                State::Completed {
                    token: FencingToken::from_u128(0),
                    outcome: Outcome::new(vec![0xff, 0xfe, 0xc3, 0x28, 0x00, b'\'', b'"', b'\\']),
                },
                3,
            ),
        ),
    ]
}

/// Every field of every state reads back exactly, through each path a
/// record comes back by: `get`, `InsertOutcome::Exists`, `SwapOutcome::Conflict`,
/// and after a CAS.
pub async fn records_round_trip_every_field<F: StoreFactory>(factory: Arc<F>) {
    let store = open(&*factory).await;
    let s = must(&store);
    let now = at(100);
    let other = claim(999, 999, now, 60);
    for (i, (what, rec)) in extreme_records().into_iter().enumerate() {
        // Written by insert.
        let k = key(&format!("inserted-{i}"));
        s.insert(&k, &rec, now).await;
        assert_eq!(
            s.get(&k, now).await,
            Some(rec.clone()),
            "get after insert must return every field exactly ({what})"
        );
        assert_eq!(
            s.insert(&k, &other, now).await,
            InsertOutcome::Exists(rec.clone()),
            "InsertOutcome::Exists must carry every field exactly ({what})"
        );
        assert_eq!(
            s.swap(&k, &stale(&rec, rec.revision.as_u64() ^ 1), &other, now)
                .await,
            SwapOutcome::Conflict(Some(rec.clone())),
            "SwapOutcome::Conflict must carry every field exactly ({what})"
        );
        // Written by CAS.
        let k = key(&format!("swapped-{i}"));
        s.insert(&k, &other, now).await;
        assert_eq!(s.swap(&k, &other, &rec, now).await, SwapOutcome::Swapped);
        assert_eq!(
            s.get(&k, now).await,
            Some(rec.clone()),
            "get after CAS must return every field exactly ({what})"
        );
        assert!(
            s.delete(&k, &rec, now).await,
            "delete_if must match the revision as written ({what})"
        );
    }
}

/// A record that never expires in practice (`expires_at` at the end of
/// time, as an infinite TTL saturates to, or just past `i64::MAX`)
/// round-trips exactly and stays live, through get, `Exists` and CAS: a
/// backend that keeps timestamps in signed 64-bit columns must not wrap it
/// into the past (clamping the comparison column to `i64::MAX` is fine; the
/// record itself must keep the exact value).
pub async fn far_future_expiry_round_trips<F: StoreFactory>(factory: Arc<F>) {
    let store = open(&*factory).await;
    let s = must(&store);
    let century = Duration::from_secs(100 * 365 * 24 * 3600);
    for (i, expires_at) in [u64::MAX, i64::MAX as u64 + 1, i64::MAX as u64]
        .into_iter()
        .map(Timestamp::from_millis)
        .enumerate()
    {
        let k = key(&format!("forever-{i}"));
        let mut rec = completed(1, 1, T0, 60, b"kept");
        rec.record.expires_at = expires_at;
        s.insert(&k, &rec, T0).await;
        assert_eq!(
            s.get(&k, T0).await,
            Some(rec.clone()),
            "a record expiring at {expires_at:?} must read back exactly and be live"
        );
        assert_eq!(
            s.get(&k, T0.plus(century)).await,
            Some(rec.clone()),
            "a record expiring at {expires_at:?} is still live a century later"
        );
        assert_eq!(
            s.insert(&k, &claim(2, 2, T0, 60), T0).await,
            InsertOutcome::Exists(rec.clone()),
            "a record expiring at {expires_at:?} is live for insert"
        );
        let mut next = rec.clone();
        next.revision = Revision::from_u64(3);
        assert_eq!(
            s.swap(&k, &rec, &next, at(1)).await,
            SwapOutcome::Swapped,
            "a record expiring at {expires_at:?} is live for CAS"
        );
        assert_eq!(s.get(&k, at(1)).await, Some(next));
    }
}

/// Records with outcomes over 1 MiB round-trip byte-exact, written by insert
/// and by CAS.
pub async fn large_record_round_trips<F: StoreFactory>(factory: Arc<F>) {
    let store = open(&*factory).await;
    let s = must(&store);
    let k = key("large");
    let big = noise(1024 * 1024 + 17, 1);
    let rec = completed(1, 1, T0, 60, &big);
    s.insert(&k, &rec, T0).await;
    let got = s
        .get(&k, T0)
        .await
        .expect("the large record must be stored");
    check_outcome(&got, &big, "get after insert of a 1 MiB + 17 B outcome");
    assert_eq!(got, rec, "every other field too");

    let bigger = noise(2 * 1024 * 1024 + 3, 2);
    let mut next = completed(2, 1, at(1), 60, &[]);
    next.record.state = State::Failed {
        token: FencingToken::from_u128(1),
        kind: FailureKind::Permanent,
        outcome: Outcome::new(bigger.clone()),
    };
    assert_eq!(s.swap(&k, &rec, &next, at(1)).await, SwapOutcome::Swapped);
    let got = s
        .get(&k, at(1))
        .await
        .expect("the swapped record must be stored");
    check_outcome(&got, &bigger, "get after CAS of a 2 MiB + 3 B outcome");
    assert_eq!(got, next, "every other field too");
}

fn check_outcome(got: &Versioned, want: &[u8], what: &str) {
    let bytes = match &got.record.state {
        State::Completed { outcome, .. } | State::Failed { outcome, .. } => outcome.as_bytes(),
        State::InFlight { .. } => panic!("{what}: the record came back in flight"),
    };
    if let Err(diff) = same_bytes(what, bytes, want) {
        panic!("{diff}");
    }
}

/// Writes one distinct record per (scope, key) and reads each back: every
/// pair must land on its own record.
async fn assert_no_collisions<S: Store>(store: &S, pairs: &[(Scope, IdempotencyKey)], what: &str) {
    let mut seen: HashMap<[u8; 32], usize> = HashMap::new();
    for (i, (scope, k)) in pairs.iter().enumerate() {
        let rk = RecordKey::new(scope, k);
        if let Some(j) = seen.insert(*rk.digest(), i) {
            panic!("test bug: pairs {j} and {i} are equal ({scope:?}, {k:?})");
        }
    }
    let s = must(store);
    let record_of = |i: usize| {
        let mut v = completed(
            i as u64 + 1,
            i as u128 + 1,
            T0,
            60,
            &(i as u32).to_be_bytes(),
        );
        v.record.fingerprint = Fingerprint::of(&(i as u64).to_be_bytes());
        v
    };
    for (i, (scope, k)) in pairs.iter().enumerate() {
        let rk = RecordKey::new(scope, k);
        let rec = record_of(i);
        match s.insert(&rk, &rec, T0).await {
            InsertOutcome::Inserted => {}
            InsertOutcome::Exists(other) => {
                let j = other.revision.as_u64() as usize - 1;
                panic!(
                    "{what}: ({scope:?}, {k:?}) collided with pair {j} ({:?}): the store found its record",
                    pairs.get(j)
                );
            }
        }
    }
    for (i, (scope, k)) in pairs.iter().enumerate() {
        let rk = RecordKey::new(scope, k);
        assert_eq!(
            s.get(&rk, T0).await,
            Some(record_of(i)),
            "{what}: ({scope:?}, {k:?}) must read back its own record"
        );
    }
}

/// Keys using every allowed character (visible ASCII, 1 to 255 bytes),
/// including characters special to SQL `LIKE`, Redis globs and hash tags,
/// and keys that differ only in case, each get their own record.
pub async fn keys_with_every_allowed_character_never_collide<F: StoreFactory>(factory: Arc<F>) {
    let store = open(&*factory).await;
    let every: String = (0x21u8..=0x7e).map(char::from).collect();
    let mut keys: Vec<String> = (0x21u8..=0x7e).map(|b| char::from(b).to_string()).collect();
    keys.push(every.clone());
    keys.push(every.chars().rev().collect());
    keys.push(every.repeat(3)[..255].to_string());
    keys.push("~".repeat(255));
    keys.push("~".repeat(254));
    for k in [
        "ABC", "abc", "Abc", "a%", "a_", "a*", "a?", "[a]", "a\\b", "a'b", "a\"b", "a:b", "a/b",
        "{a}", "{a}b", "a{b}", "00", "0x0", "--", "';--", "%00", "\\x00", "??",
    ] {
        keys.push(k.to_string());
    }
    let scope = Scope::tenant("keys");
    let pairs: Vec<(Scope, IdempotencyKey)> = keys
        .iter()
        .map(|k| (scope.clone(), IdempotencyKey::parse(k).expect("valid key")))
        .collect();
    assert_no_collisions(&store, &pairs, "keys").await;
}

/// Scopes whose parts contain separators, NUL, newlines, any Unicode, or are
/// empty versus absent, never share a record.
pub async fn scopes_with_separators_never_collide<F: StoreFactory>(factory: Arc<F>) {
    let store = open(&*factory).await;
    let k = |s: &str| IdempotencyKey::parse(s).expect("valid key");
    fn t(tenant: &str) -> Scope {
        Scope::tenant(tenant)
    }
    let mut pairs = vec![
        (t("a:b"), k("c")),
        (t("a"), k("b:c")),
        (t("a").with_principal("b"), k("c")),
        (t("a").with_operation("b"), k("c")),
        (t("a").with_principal(""), k("c")),
        (t("a").with_operation(""), k("c")),
        (t("a").with_principal("").with_operation(""), k("c")),
        (t("a").with_principal("b").with_operation("c"), k("d")),
        (t("a").with_principal("c").with_operation("b"), k("d")),
        (t("a"), k("c")),
        (t(""), k("c")),
        (t("").with_principal(""), k("c")),
        (Scope::global().with_operation("a"), k("c")),
        (t("a\0b"), k("c")),
        (t("a\nb"), k("c")),
        (t("a b"), k("c")),
        (t("租户"), k("c")),
        (t("🦀"), k("c")),
        (t("e\u{301}"), k("c")),
        (t("\u{e9}"), k("c")),
        (t(&"x".repeat(10_000)), k("c")),
        (t(&"x".repeat(10_001)), k("c")),
    ];
    for sep in [
        "/", "|", ";", ",", "#", "{", "}", "%", "_", "*", "'", "\"", "\\", ".", "-",
    ] {
        pairs.push((t(&format!("a{sep}b")), k("c")));
        pairs.push((t("a").with_principal(format!("b{sep}c")), k("d")));
        pairs.push((t("a").with_principal("b").with_operation(sep), k("c")));
    }
    assert_no_collisions(&store, &pairs, "scopes").await;
}
