//! A payments endpoint whose business write and idempotency record commit in
//! ONE PostgreSQL transaction.
//!
//! ```text
//! cargo run -p idem-postgres --example payments_tx
//! IDEM_POSTGRES_URL=postgres://user@host/db cargo run -p idem-postgres --example payments_tx
//! ```
//!
//! It works in a schema of its own (`idem_example_<pid>`), dropped at the end.
//!
//! What it shows:
//! 1. A first request inserts a payment row and completes its key in the same
//!    transaction; a retry replays the stored response and pays nothing.
//! 2. A request whose transaction rolls back leaves no payment, and leaves its
//!    key claimed (retries hear "in progress") until the handler releases it;
//!    the retry then pays, once.

use idem_core::{Begin, Engine, Fingerprint, IdempotencyKey, Lease, Outcome, Scope};
use idem_postgres::sqlx::{self, AssertSqlSafe, PgPool};
use idem_postgres::{PostgresStore, TableName};

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
    engine: Engine<PostgresStore>,
    pool: PgPool,
    table: String,
}

impl Payments {
    /// `POST /payments` with an `Idempotency-Key`. `fail_after_insert`
    /// simulates an error after the payment row was written (the
    /// transaction rolls back).
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

    /// The payment row and the idempotency record, in one transaction.
    async fn charge(
        &self,
        lease: &Lease,
        key: &IdempotencyKey,
        amount_cents: i64,
        fail_after_insert: bool,
    ) -> Result<String, BoxError> {
        let mut tx = self.pool.begin().await?;
        let id: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "INSERT INTO {} (idempotency_key, amount_cents) VALUES ($1, $2) RETURNING id",
            self.table
        )))
        .bind(key.as_str())
        .bind(amount_cents)
        .fetch_one(&mut *tx)
        .await?;
        if fail_after_insert {
            return Err("card network timed out".into()); // `tx` drops: rollback
        }
        let body = format!(r#"{{"payment_id":{id},"amount_cents":{amount_cents}}}"#);
        let done = self
            .engine
            .prepare_complete(lease, Outcome::new(body.clone().into_bytes()))?;
        // Fails with LeaseLost, changing nothing, if the claim was taken over
        // meanwhile; the `?` then drops `tx` and the payment rolls back.
        self.engine.store().apply_in(&mut tx, &done).await?;
        tx.commit().await?;
        Ok(body)
    }

    async fn count(&self) -> Result<i64, BoxError> {
        let sql = format!("SELECT count(*) FROM {}", self.table);
        Ok(sqlx::query_scalar(AssertSqlSafe(sql))
            .fetch_one(&self.pool)
            .await?)
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let url = std::env::var("IDEM_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string());
    // One pool, shared by the application and the idempotency store.
    let pool = PostgresStore::pool_options()
        .max_connections(8)
        .connect(&url)
        .await?;
    let schema = format!("idem_example_{}", std::process::id());
    let store = PostgresStore::builder()
        .with_table(TableName::new(&schema, "idempotency_records")?)
        .open(pool.clone());
    store.migrate().await?; // creates the schema, the table and its index
    let table = format!("\"{schema}\".payments");
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE {table} (id BIGSERIAL PRIMARY KEY, idempotency_key TEXT NOT NULL, \
         amount_cents BIGINT NOT NULL)"
    )))
    .execute(&pool)
    .await?;

    let app = Payments {
        engine: Engine::new(store),
        pool: pool.clone(),
        table,
    };
    let result = run(&app).await;
    sqlx::query(AssertSqlSafe(format!("DROP SCHEMA \"{schema}\" CASCADE")))
        .execute(&pool)
        .await?;
    result
}

async fn run(app: &Payments) -> Result<(), BoxError> {
    let scope = Scope::tenant("acme").with_operation("payments.create");

    // 1. Commit: payment and record together; the retry replays.
    let key = IdempotencyKey::parse("8e03978e-40d5-43e8-bc93-6894a57f9324")?;
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
    assert_eq!(app.count().await?, 1);

    // 2. Rollback: no payment; the key is released; the retry pays once.
    let key = IdempotencyKey::parse("d3b07384-d9a0-4c1f-8f0e-2a1b5c6d7e8f")?;
    match app.create(&scope, &key, 2500, true).await {
        Err(e) => println!("failed attempt: {e} (rolled back, key released)"),
        Ok(r) => return Err(format!("the failing attempt succeeded: {r:?}").into()),
    }
    assert_eq!(
        app.count().await?,
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
    assert_eq!(app.count().await?, 2, "one payment per key");
    println!("payments: {} (one per key)", app.count().await?);
    Ok(())
}
