-- Issue 13: every attempt of a task, and the trace context of tasks and sessions.

-- W3C traceparent of the task's enqueue span / the session's start span; NULL
-- when the server ran without tracing. Set once when the row is created.
ALTER TABLE tasks ADD COLUMN trace_context TEXT;
ALTER TABLE sessions ADD COLUMN trace_context TEXT;

-- One row per attempt that ended, written in the transaction that ended it. The
-- running attempt of an ASSIGNED task is not here: the task row describes it.
CREATE TABLE task_attempts (
    task_id        TEXT NOT NULL,
    attempt        INTEGER NOT NULL,
    agent_id       TEXT NOT NULL,
    outcome        INTEGER NOT NULL,              -- AttemptOutcome / TaskAttemptOutcome
    assign_time    INTEGER NOT NULL,              -- microseconds since the epoch, UTC
    end_time       INTEGER NOT NULL,
    error_message  TEXT,
    error_type     TEXT,
    error_details  BLOB,
    progress       BLOB,
    PRIMARY KEY (task_id, attempt)
) WITHOUT ROWID;
