//! A payments endpoint whose business write and idempotency record commit in
//! ONE SQLite transaction, in one database file.
//!
//! ```text
//! cargo run -p idem-sqlite --example transactional            # a temporary file
//! cargo run -p idem-sqlite --example transactional -- app.db  # your file
//! ```
//!
//! What it shows:
//! 1. A first request inserts a payment row and completes its key in the same
//!    transaction; a retry replays the stored response and pays nothing; the
//!    same key with another amount is refused (422).
//! 2. A request whose transaction rolls back leaves no payment, and leaves
//!    its key claimed until the handler releases it; the retry then pays,
//!    once.

use std::sync::Arc;

use idem_core::{Begin, Engine, Fingerprint, IdempotencyKey, Lease, Outcome, Scope};
use idem_sqlite::{SqliteError, SqliteStore};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the endpoint answers.
#[derive(Debug)]
enum Response {
    /// 201, fresh or replayed.
    Created { body: String, replayed: bool },
    /// 409: the same key is being processed right now.
    Conflict,
    /// 422: the key was used for another request.
    Unprocessable,
}

struct Payments {
    engine: Arc<Engine<SqliteStore>>,
}

impl Payments {
    /// `POST /payments` with an `Idempotency-Key`. `fail_after_insert`
    /// simulates an error after the payment row was written (the transaction
    /// rolls back).
    async fn create(
        &self,
        scope: &Scope,
        key: &IdempotencyKey,
        amount_cents: i64,
        fail_after_insert: bool,
    ) -> Result<Response, BoxError> {
        let request = Fingerprint::builder()
            .field("method", b"POST")
            .field("path", b"/payments")
            .field("amount_cents", &amount_cents.to_be_bytes())
            .finish();
        let lease = match self.engine.begin(scope, key, request).await? {
            Begin::Proceed(lease) => lease,
            Begin::Replay(replay) => {
                return Ok(Response::Created {
                    body: String::from_utf8_lossy(replay.outcome.as_bytes()).into_owned(),
                    replayed: true,
                });
            }
            Begin::InProgress { .. } => return Ok(Response::Conflict),
            Begin::Mismatch(_) => return Ok(Response::Unprocessable),
        };
        match self
            .charge(&lease, key, amount_cents, fail_after_insert)
            .await
        {
            Ok(body) => Ok(Response::Created {
                body,
                replayed: false,
            }),
            Err(e) => {
                // The transaction rolled back: nothing was paid, and the key
                // is still claimed by this lease. Release it so that the
                // client's retry runs at once (otherwise it would get 409
                // until the lease lapses).
                self.engine.release(&lease).await?;
                Err(e)
            }
        }
    }

    /// The payment row and the idempotency record, in one transaction on the
    /// store's own connection (its writer thread).
    async fn charge(
        &self,
        lease: &Lease,
        key: &IdempotencyKey,
        amount_cents: i64,
        fail_after_insert: bool,
    ) -> Result<String, BoxError> {
        // The closure runs on the store's writer thread: it owns what it uses.
        let (engine, lease, key) = (self.engine.clone(), lease.clone(), key.to_string());
        self.engine
            .store()
            .transaction(move |tx| -> Result<String, BoxError> {
                tx.execute(
                    "INSERT INTO payments (idempotency_key, amount_cents) VALUES (?1, ?2)",
                    (&key, amount_cents),
                )?;
                if fail_after_insert {
                    return Err("card network timed out".into()); // rolls back
                }
                let body = format!(
                    r#"{{"payment_id":{},"amount_cents":{amount_cents}}}"#,
                    tx.last_insert_rowid()
                );
                let done = engine.prepare_complete(&lease, Outcome::new(body.clone()))?;
                // Fails with LeaseLost, changing nothing, if the claim was
                // taken over meanwhile; the `?` then rolls the payment back.
                engine.store().apply_in(tx, &done)?;
                Ok(body)
            })
            .await
    }

    async fn count(&self) -> Result<i64, BoxError> {
        Ok(self
            .engine
            .store()
            .transaction(|tx| -> Result<i64, SqliteError> {
                Ok(tx.query_row("SELECT count(*) FROM payments", [], |r| r.get(0))?)
            })
            .await?)
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let dir = tempfile::tempdir()?;
    let path = std::env::args()
        .nth(1)
        .map_or_else(|| dir.path().join("app.db"), Into::into);
    // One file for the application's tables and the idempotency records.
    let store = SqliteStore::open(&path)?;
    store
        .transaction(|tx| -> Result<(), SqliteError> {
            tx.execute_batch(
                "CREATE TABLE IF NOT EXISTS payments (id INTEGER PRIMARY KEY, \
                 idempotency_key TEXT NOT NULL, amount_cents INTEGER NOT NULL)",
            )?;
            Ok(())
        })
        .await?;
    let app = Payments {
        engine: Arc::new(Engine::new(store)),
    };
    println!("database: {}", path.display());
    run(&app).await
}

async fn run(app: &Payments) -> Result<(), BoxError> {
    let scope = Scope::tenant("acme").with_operation("payments.create");
    let before = app.count().await?;

    // 1. Commit: payment and record together; the retry replays.
    let key = IdempotencyKey::parse(&format!("pay-{}-a", std::process::id()))?;
    let first = app.create(&scope, &key, 1000, false).await?;
    let retry = app.create(&scope, &key, 1000, false).await?;
    let other = app.create(&scope, &key, 9999, false).await?;
    println!("first:          {first:?}");
    println!("retry:          {retry:?}");
    println!("other request:  {other:?}");
    match (&first, &retry) {
        (
            Response::Created { body: paid, .. },
            Response::Created {
                body: replayed,
                replayed: true,
            },
        ) => assert_eq!(paid, replayed, "the retry gets the first response back"),
        _ => return Err("expected a payment and its replay".into()),
    }
    assert!(matches!(other, Response::Unprocessable));
    assert_eq!(app.count().await? - before, 1);

    // 2. Rollback: no payment; the key is released; the retry pays once.
    let key = IdempotencyKey::parse(&format!("pay-{}-b", std::process::id()))?;
    match app.create(&scope, &key, 2500, true).await {
        Err(e) => println!("failed attempt: {e} (rolled back, key released)"),
        Ok(r) => return Err(format!("the failing attempt succeeded: {r:?}").into()),
    }
    assert_eq!(
        app.count().await? - before,
        1,
        "the rolled-back payment is not there"
    );
    let retry = app.create(&scope, &key, 2500, false).await?;
    let again = app.create(&scope, &key, 2500, false).await?;
    println!("retry:          {retry:?}");
    println!("again:          {again:?}");
    assert!(matches!(
        retry,
        Response::Created {
            replayed: false,
            ..
        }
    ));
    assert!(matches!(again, Response::Created { replayed: true, .. }));
    assert!(!matches!(again, Response::Conflict));
    assert_eq!(app.count().await? - before, 2, "one payment per key");
    println!("payments: {} (one per key)", app.count().await? - before);
    Ok(())
}
