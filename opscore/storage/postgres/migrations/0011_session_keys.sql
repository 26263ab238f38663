-- StartWorkflow's idempotency key, held and looked up in one round trip, as
-- 0009 does for tasks' (the comment above _key_busy in postgres/backend.py says
-- why keys are held).
-- A key held by another transaction returns one all-NULL row and locks nothing.
CREATE FUNCTION opscore_sessions_by_key(lock_space integer, key text)
RETURNS SETOF sessions
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF NOT pg_try_advisory_xact_lock(lock_space, hashtext(key)) THEN
        RETURN NEXT NULL::sessions;
        RETURN;
    END IF;
    RETURN QUERY SELECT * FROM sessions WHERE idempotency_key = key;
END
$$;
