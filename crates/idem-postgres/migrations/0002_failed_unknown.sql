-- idem-postgres migration 2: the `failed_unknown` state (idem-core
-- `FailureKind::Unknown`: the work may have taken effect, its result is not
-- known, and it is never run again).
--
-- Replaces the state CHECK of migration 1 (whatever PostgreSQL named it) with
-- one that also admits `failed_unknown`. `{table}` as in migration 1.
DO $$
DECLARE
    old_check text;
BEGIN
    FOR old_check IN
        SELECT conname FROM pg_constraint
        WHERE conrelid = '{table}'::regclass
          AND contype = 'c'
          AND pg_get_constraintdef(oid) LIKE '%failed_permanent%'
    LOOP
        EXECUTE format('ALTER TABLE {table} DROP CONSTRAINT %I', old_check);
    END LOOP;
END
$$;

ALTER TABLE {table} ADD CONSTRAINT idem_state_check
    CHECK (state IN ('in_flight', 'completed', 'failed_retryable', 'failed_permanent', 'failed_unknown'));
