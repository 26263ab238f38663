-- Issue 13: every attempt of a task, and the trace context of tasks and sessions
-- (mirrors opscore/storage/sqlite/migrations/0004_observability.sql).

-- W3C traceparent of the task's enqueue span / the session's start span; NULL
-- when the server ran without tracing. Set once when the row is created.
ALTER TABLE tasks ADD COLUMN trace_context text;
ALTER TABLE sessions ADD COLUMN trace_context text;

-- One row per attempt that ended, written in the transaction that ended it. The
-- running attempt of an ASSIGNED task is not here: the task row describes it.
CREATE TABLE task_attempts (
    task_id        text NOT NULL,
    attempt        integer NOT NULL,
    agent_id       text NOT NULL,
    outcome        integer NOT NULL,                   -- AttemptOutcome / TaskAttemptOutcome
    assign_time    bigint NOT NULL,
    end_time       bigint NOT NULL,
    error_message  text,
    error_type     text,
    error_details  bytea,
    progress       bytea,
    PRIMARY KEY (task_id, attempt)
);
