-- idem-postgres migration 1: the records table.
--
-- A template: `{table}` is the schema-qualified, quoted table name and
-- `{index}` the quoted name of its expiry index. Both are validated
-- identifiers (`TableName`), substituted by `PostgresStore::migrate`.
--
-- Every u64 of the core (timestamps in milliseconds, revisions) is stored
-- bit for bit as BIGINT: values below 2^63 read as themselves; the store
-- compares timestamps with the sign bit flipped so that the few larger
-- values (far-future expiries) still order correctly.
CREATE TABLE IF NOT EXISTS {table} (
    digest          BYTEA   NOT NULL PRIMARY KEY,  -- blake3 of (scope, key): RecordKey::digest
    tenant          TEXT    NOT NULL,
    principal       TEXT,
    operation       TEXT,
    "key"           TEXT    NOT NULL,              -- the client's idempotency key
    state           TEXT    NOT NULL
        CHECK (state IN ('in_flight', 'completed', 'failed_retryable', 'failed_permanent')),
    fingerprint     BYTEA   NOT NULL,              -- 32 bytes
    token           BYTEA   NOT NULL,              -- fencing token, 16 bytes big-endian
    lease_deadline  BIGINT,                        -- ms; in_flight only
    outcome         BYTEA,                         -- completed / failed only
    created_at      BIGINT  NOT NULL,              -- ms, engine clock
    updated_at      BIGINT  NOT NULL,              -- ms, engine clock
    expires_at      BIGINT  NOT NULL,              -- ms, engine clock
    attempts        BIGINT  NOT NULL,              -- u32
    revision        BIGINT  NOT NULL               -- Revision::as_i64
);

CREATE INDEX IF NOT EXISTS {index} ON {table} (expires_at);
