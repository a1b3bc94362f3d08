//! Checkpoints (a holder's recorded progress) round-trip exactly, on every
//! path a record comes back by, and whether a write adds, replaces or
//! drops one.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::sync::Arc;

use idem_core::store::{
    Checkpoint, FencingToken, InsertOutcome, Revision, State, SwapOutcome, Versioned,
};
use idem_core::{FailureKind, IdempotencyKey, Outcome, RecordKey, Scope};

use super::super::{T0, at, claim, completed, key, must, noise, open, same_bytes, stale};
use crate::StoreFactory;

/// `v` carrying a checkpoint of the record under `k`.
pub(crate) fn checkpointed(
    mut v: Versioned,
    k: &RecordKey,
    seq: u32,
    step: &str,
    state: Vec<u8>,
) -> Versioned {
    v.record.checkpoint = Some(Checkpoint::new(k, seq, step, state));
    v
}

/// Records with a checkpoint, each with the key it is stored under (the
/// checkpoint names its own record): extreme and distinct values in every
/// field of the checkpoint.
fn checkpointed_records() -> Vec<(&'static str, RecordKey, Versioned)> {
    let all_bytes: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
    let odd_scope = Scope::tenant("t:ü\0/%_*{x}")
        .with_principal("p|;'\"\\")
        .with_operation("orders.create");
    let odd_key = RecordKey::new(
        &odd_scope,
        &IdempotencyKey::parse(&(0x21u8..=0x7e).map(char::from).collect::<String>())
            .expect("valid key"),
    );
    let bare_key = RecordKey::new(
        &Scope::global(),
        &IdempotencyKey::parse("cp-bare").expect("valid key"),
    );
    let in_flight = key("cp-in-flight");
    let retryable = key("cp-retryable");
    let mut failed = claim(3, 3, T0, 60);
    failed.record.state = State::Failed {
        token: FencingToken::from_u128(3),
        kind: FailureKind::Retryable,
        outcome: Outcome::new(b"503".to_vec()),
    };
    vec![
        (
            "in flight, first checkpoint, every byte value as state",
            in_flight.clone(),
            checkpointed(claim(1, 1, T0, 60), &in_flight, 1, "charge", all_bytes),
        ),
        (
            "in flight, seq u32::MAX, Unicode step, empty state, odd scope and key",
            odd_key.clone(),
            checkpointed(
                claim(2, 2, T0, 60),
                &odd_key,
                u32::MAX,
                "étape 🦀 \0 '\"",
                Vec::new(),
            ),
        ),
        (
            "failed retryable, keeping its checkpoint for the next holder",
            retryable.clone(),
            checkpointed(failed, &retryable, 7, "", vec![0u8; 3]),
        ),
        (
            "global scope, NUL state",
            bare_key.clone(),
            checkpointed(claim(4, 4, T0, 60), &bare_key, 2, "reserve", vec![0]),
        ),
    ]
}

/// A record with a checkpoint reads back exactly (every field of the
/// checkpoint, byte for byte) through `get`, `InsertOutcome::Exists`,
/// `SwapOutcome::Conflict` and after a CAS; a CAS that adds, replaces or
/// drops the checkpoint is read back as written (a store keeping it in a
/// column of its own must clear it when the new record has none).
pub async fn checkpoint_round_trips_every_path<F: StoreFactory>(factory: Arc<F>) {
    let store = open(&*factory).await;
    let s = must(&*store);
    let now = at(100);
    for (what, k, rec) in checkpointed_records() {
        // Written by insert.
        s.insert(&k, &rec, now).await;
        assert_eq!(
            s.get(&k, now).await,
            Some(rec.clone()),
            "get after insert must return the checkpoint exactly ({what})"
        );
        let other = claim(999, 999, now, 60);
        assert_eq!(
            s.insert(&k, &other, now).await,
            InsertOutcome::Exists(rec.clone()),
            "InsertOutcome::Exists must carry the checkpoint exactly ({what})"
        );
        assert_eq!(
            s.swap(&k, &stale(&rec, rec.revision.as_u64() ^ 1), &other, now)
                .await,
            SwapOutcome::Conflict(Some(rec.clone())),
            "SwapOutcome::Conflict must carry the checkpoint exactly ({what})"
        );
        // Replaced by a CAS with a later checkpoint.
        let mut later = rec.clone();
        later.revision = Revision::from_u64(rec.revision.as_u64() + 100);
        let cp = later.record.checkpoint.as_mut().expect("a checkpoint");
        cp.seq = cp.seq.wrapping_add(1).max(1);
        cp.step.push_str("-next");
        cp.state.extend_from_slice(b"more");
        assert_eq!(
            s.swap(&k, &rec, &later, now).await,
            SwapOutcome::Swapped,
            "{what}"
        );
        assert_eq!(
            s.get(&k, now).await,
            Some(later.clone()),
            "get after a CAS that replaced the checkpoint must return the new one ({what})"
        );
        // Dropped by a CAS (a completion).
        let mut done = completed(later.revision.as_u64() + 1, 5, now, 60, b"done");
        done.record.fingerprint = later.record.fingerprint;
        assert_eq!(
            s.swap(&k, &later, &done, now).await,
            SwapOutcome::Swapped,
            "{what}"
        );
        assert_eq!(
            s.get(&k, now).await,
            Some(done.clone()),
            "a CAS to a record without a checkpoint must drop the stored one ({what})"
        );
        // Added by a CAS (a holder's first checkpoint).
        let plain_key = RecordKey::new(k.scope(), &IdempotencyKey::parse("cp-plain").unwrap());
        let plain = claim(10, 10, now, 60);
        s.insert(&plain_key, &plain, now).await;
        let mut first = checkpointed(plain.clone(), &plain_key, 1, "first", b"s".to_vec());
        first.revision = Revision::from_u64(11);
        assert_eq!(
            s.swap(&plain_key, &plain, &first, now).await,
            SwapOutcome::Swapped
        );
        assert_eq!(
            s.get(&plain_key, now).await,
            Some(first.clone()),
            "get after a CAS that added a checkpoint must return it ({what})"
        );
        assert!(s.delete(&plain_key, &first, now).await, "{what}");
    }
}

/// A checkpoint whose state is large (64 KiB written by insert, 256 KiB by
/// CAS) round-trips byte for byte.
pub async fn large_checkpoint_round_trips<F: StoreFactory>(factory: Arc<F>) {
    let store = open(&*factory).await;
    let s = must(&*store);
    let k = key("large-checkpoint");
    let big = noise(64 * 1024, 11);
    let rec = checkpointed(claim(1, 1, T0, 60), &k, 1, "reserve", big.clone());
    s.insert(&k, &rec, T0).await;
    let got = s
        .get(&k, T0)
        .await
        .expect("the record with a 64 KiB checkpoint must be stored");
    check_state(&got, &big, "get after insert of a 64 KiB checkpoint");
    assert_eq!(got, rec, "every other field too");

    let bigger = noise(256 * 1024 + 3, 12);
    let mut next = checkpointed(claim(2, 1, at(1), 60), &k, 2, "charge", bigger.clone());
    next.record.created_at = rec.record.created_at;
    assert_eq!(s.swap(&k, &rec, &next, at(1)).await, SwapOutcome::Swapped);
    let got = s
        .get(&k, at(1))
        .await
        .expect("the swapped record must be stored");
    check_state(&got, &bigger, "get after CAS of a 256 KiB + 3 B checkpoint");
    assert_eq!(got, next, "every other field too");
}

fn check_state(got: &Versioned, want: &[u8], what: &str) {
    let Some(cp) = &got.record.checkpoint else {
        panic!("{what}: the record came back without its checkpoint");
    };
    if let Err(diff) = same_bytes(what, &cp.state, want) {
        panic!("{diff}");
    }
}
