-- Looking idempotency keys up holds them first (PostgresStorage's _Tx.tasks_by_keys
-- says why). A lock and the read after it must be two statements, the read's
-- snapshot taken once the lock is held; a VOLATILE PL/pgSQL function gives each
-- statement its own snapshot, so the two cost one round trip instead of two.
-- A key held by another transaction returns one all-NULL row and locks nothing
-- more: the caller refuses that call and the retry finds what the other created.
CREATE FUNCTION opscore_tasks_by_keys(lock_space integer, keys text[])
RETURNS SETOF tasks
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM unnest(keys) AS k
               WHERE NOT pg_try_advisory_xact_lock(lock_space, hashtext(k))) THEN
        RETURN NEXT NULL::tasks;
        RETURN;
    END IF;
    RETURN QUERY SELECT * FROM tasks WHERE idempotency_key = ANY(keys);
END
$$;
