//! Writes a few idempotency records into a store, to try `idem` on:
//!
//! ```text
//! cargo run -p idem-cli --example seed -- sqlite:///tmp/idem-demo.db
//! idem stats --store sqlite:///tmp/idem-demo.db
//! ```
//!
//! In tenant `acme`, operation `payments.create`, relative to the system
//! clock: `ord_1001` completed, `ord_1002` in flight, `ord_1003` in flight
//! with a lease that lapsed 4 minutes ago, `ord_1004` failed permanently,
//! `ord_1005` to `ord_1009` completed with various lifetimes, and
//! `ord_0001` to `ord_0003` completed three days ago with a one-hour
//! lifetime (expired, waiting for a purge). A PostgreSQL store is migrated
//! on open.

use std::error::Error;
use std::sync::Arc;
use std::time::Duration;

use idem_core::store::Store;
use idem_core::{
    Begin, Clock, Engine, FailureKind, Fingerprint, IdempotencyKey, Lease, ManualClock, Outcome,
    Policy, Scope, SystemClock, Timestamp,
};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let url = std::env::args()
        .nth(1)
        .ok_or("usage: seed STORE_URL (sqlite://PATH, postgres://…, redis://…)")?;
    let store = idemkit::store_from_url(&url).await?;
    let now = SystemClock.now();
    let ago = |d: Duration| ManualClock::new(Timestamp::from_millis(now.as_millis() - ms(d)));
    let min = |m: u64| Duration::from_secs(60 * m);

    let e = engine(&store, SystemClock, Policy::default())?;
    let lease = claim(&e, "ord_1001").await?;
    let charge = br#"{"payment_id":"pay_8Qk2","status":"captured","amount":1000,"currency":"EUR","card":{"brand":"visa","last4":"4242"}}"#;
    e.complete(&lease, Outcome::new(&charge[..])).await?;

    let e = engine(&store, SystemClock, Policy::default().with_lease(min(2)))?;
    drop(claim(&e, "ord_1002").await?);

    let e = engine(&store, ago(min(5)), Policy::default())?;
    drop(claim(&e, "ord_1003").await?);

    let e = engine(&store, SystemClock, Policy::default())?;
    let lease = claim(&e, "ord_1004").await?;
    let declined = br#"{"type":"card_declined","status":402}"#;
    e.fail(&lease, FailureKind::Permanent, Outcome::new(&declined[..]))
        .await?;

    for (key, ttl) in [
        ("ord_1005", min(45)),
        ("ord_1006", min(24 * 60)),
        ("ord_1007", min(24 * 60)),
        ("ord_1008", min(3 * 24 * 60)),
        ("ord_1009", min(45 * 24 * 60)),
    ] {
        let e = engine(&store, SystemClock, Policy::default().with_ttl(ttl))?;
        let lease = claim(&e, key).await?;
        e.complete(&lease, Outcome::new(&br#"{"status":"captured"}"#[..]))
            .await?;
    }

    let e = engine(
        &store,
        ago(min(3 * 24 * 60)),
        Policy::default().with_ttl(min(60)),
    )?;
    for key in ["ord_0001", "ord_0002", "ord_0003"] {
        let lease = claim(&e, key).await?;
        e.complete(&lease, Outcome::new(&br#"{"status":"captured"}"#[..]))
            .await?;
    }
    println!("seeded 12 records (3 of them expired) in tenant acme, operation payments.create");
    Ok(())
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn engine<C: Clock>(
    store: &Arc<dyn Store>,
    clock: C,
    policy: Policy,
) -> Result<Engine<Arc<dyn Store>, C>> {
    Ok(Engine::with_clock(store.clone(), clock).with_policy(policy)?)
}

async fn claim<C: Clock>(e: &Engine<Arc<dyn Store>, C>, key: &str) -> Result<Lease> {
    let scope = Scope::tenant("acme").with_operation("payments.create");
    let request = Fingerprint::of(format!(r#"{{"order":"{key}","amount":1000}}"#).as_bytes());
    match e
        .begin(&scope, &IdempotencyKey::parse(key)?, request)
        .await?
    {
        Begin::Proceed(lease) => Ok(lease),
        other => {
            Err(format!("{key} is already in the store ({other:?}): seed an empty store").into())
        }
    }
}
