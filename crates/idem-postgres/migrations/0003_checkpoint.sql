-- idem-postgres migration 3: the checkpoint of multi-step operations and
-- the index that finds abandoned ones.
--
-- `checkpoint` holds the holder's last recovery point (idem-core
-- `Checkpoint`, as `codec::encode_checkpoint` encodes it); NULL for none.
-- A nullable column without a default: adding it rewrites nothing.
--
-- The partial index serves `Store::abandoned` (live in-flight records with
-- a checkpoint whose lease lapsed, earliest first): it holds only in-flight
-- rows that carry a checkpoint, so its size follows the operations under
-- way, not the table. PostgreSQL names it `<table>_lease_deadline_idx`.
-- `{table}` as in migration 1.
ALTER TABLE {table} ADD COLUMN checkpoint BYTEA;

CREATE INDEX ON {table} (lease_deadline)
    WHERE state = 'in_flight' AND checkpoint IS NOT NULL;
