//! The pure core micro-benchmark: what one request costs before any store
//! round trip (a tight `Instant` loop; no criterion, to keep builds short).

use std::hint::black_box;
use std::time::Instant;

use idem_core::machine::decide;
use idem_core::store::{FencingToken, Record, codec};
use idem_core::{Fingerprint, IdempotencyKey, Outcome, Policy, RecordKey, Scope, Timestamp};
use serde::{Deserialize, Serialize};

use crate::BenchError;
use crate::harness::median;

/// ns per operation of each pure part, and of all of them in sequence.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CoreReport {
    /// Iterations per sample.
    pub iterations: u64,
    /// Samples per part (the median is reported).
    pub samples: usize,
    /// Each part alone.
    pub parts: Vec<CorePart>,
    /// The parts one request goes through, in one loop: key parse, record
    /// key, fingerprint of the 1 KiB body, decide, encode and decode of the
    /// record holding the 1 KiB outcome.
    pub total_ns: f64,
}

/// One pure part.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CorePart {
    /// What it does.
    pub name: String,
    /// Median ns per operation.
    pub ns: f64,
}

/// A deterministic, incompressible byte string of `len` bytes.
pub fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut counter = 0u64;
    while out.len() < len {
        let mut h = blake3::Hasher::new();
        h.update(&seed.to_le_bytes());
        h.update(&counter.to_le_bytes());
        out.extend_from_slice(h.finalize().as_bytes());
        counter += 1;
    }
    out.truncate(len);
    out
}

fn ns_per_op(iterations: u64, samples: usize, mut f: impl FnMut(u64)) -> f64 {
    // Warm up caches and branch predictors.
    for i in 0..iterations.min(1_000) {
        f(i);
    }
    let mut per = Vec::with_capacity(samples);
    for _ in 0..samples {
        let t = Instant::now();
        for i in 0..iterations {
            f(i);
        }
        per.push(t.elapsed().as_nanos() as f64 / iterations.max(1) as f64);
    }
    median(&per)
}

/// Measures the pure parts with `body_len`-byte request bodies and outcomes.
///
/// # Behavior
/// Runs on the calling thread. Every result goes through
/// [`black_box`] so that nothing is optimised away; each part is timed over
/// `iterations` iterations `samples` times and the median is reported.
pub fn run(iterations: u64, samples: usize, body_len: usize) -> Result<CoreReport, BenchError> {
    let policy = Policy::default();
    let scope = Scope::tenant("acme")
        .with_principal("user-1")
        .with_operation("payments.create");
    let raw_key = "8e03978e-40d5-43e8-bc93-6894a57f9324";
    let body = payload(body_len, 1);
    let outcome = Outcome::new(payload(body_len, 2));
    let now = Timestamp::from_millis(1_800_000_000_000);
    let fp = Fingerprint::of(&body);
    let token = FencingToken::from_u128(7);
    let completed = Record::new_claim(fp, token, now, &policy)
        .complete(token, outcome, now, &policy)
        .map_err(|e| BenchError::Failed(format!("core setup: {e}")))?;
    let encoded = codec::encode_record(&completed)
        .map_err(|e| BenchError::Failed(format!("core setup: {e}")))?;
    let key = IdempotencyKey::parse(raw_key)
        .map_err(|e| BenchError::Failed(format!("core setup: {e}")))?;

    let mut parts = Vec::new();
    let mut part = |name: &str, ns: f64| {
        parts.push(CorePart {
            name: name.to_string(),
            ns,
        });
    };
    part(
        "key parse (36-byte UUID)",
        ns_per_op(iterations, samples, |_| {
            let _ = black_box(IdempotencyKey::parse(black_box(raw_key)));
        }),
    );
    part(
        "record key (canonical bytes + blake3)",
        ns_per_op(iterations, samples, |_| {
            black_box(RecordKey::new(black_box(&scope), black_box(&key)));
        }),
    );
    part(
        &format!("fingerprint of a {body_len} B body"),
        ns_per_op(iterations, samples, |_| {
            black_box(Fingerprint::of(black_box(&body)));
        }),
    );
    part(
        "decide (completed record, same fingerprint)",
        ns_per_op(iterations, samples, |_| {
            black_box(decide(
                Some(black_box(&completed)),
                black_box(&fp),
                black_box(now),
            ));
        }),
    );
    part(
        &format!("encode record with {body_len} B outcome"),
        ns_per_op(iterations, samples, |_| {
            let _ = black_box(codec::encode_record(black_box(&completed)));
        }),
    );
    part(
        &format!("decode record with {body_len} B outcome"),
        ns_per_op(iterations, samples, |_| {
            let _ = black_box(codec::decode_record(black_box(&encoded)));
        }),
    );
    let total_ns = ns_per_op(iterations, samples, |_| {
        let Ok(key) = IdempotencyKey::parse(black_box(raw_key)) else {
            return;
        };
        let record_key = RecordKey::new(black_box(&scope), &key);
        let fp = Fingerprint::of(black_box(&body));
        black_box(decide(Some(black_box(&completed)), &fp, black_box(now)));
        let bytes = codec::encode_record(black_box(&completed)).unwrap_or_default();
        let _ = black_box(codec::decode_record(black_box(&bytes)));
        black_box(record_key);
    });
    Ok(CoreReport {
        iterations,
        samples,
        parts,
        total_ns,
    })
}
