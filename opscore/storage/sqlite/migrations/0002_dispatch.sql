-- Dispatched tasks. Only open tasks (SCHEDULED, QUEUED, ASSIGNED) are loaded at
-- start; finished ones are read on demand, so their number costs nothing per task.
CREATE TABLE tasks (
    task_id              TEXT PRIMARY KEY,
    name                 TEXT NOT NULL,
    capability           TEXT NOT NULL,
    agent_id             TEXT NOT NULL,              -- pinned agent, '' when routed by capability
    input                BLOB,
    priority             INTEGER NOT NULL,
    max_attempts         INTEGER NOT NULL,
    initial_backoff_us   INTEGER NOT NULL,
    backoff_multiplier   REAL NOT NULL,
    max_backoff_us       INTEGER NOT NULL,
    timeout_us           INTEGER NOT NULL,
    heartbeat_timeout_us INTEGER,
    idempotency_key      TEXT,                       -- NULL when none
    session_id           TEXT NOT NULL,
    workflow_task_id     TEXT NOT NULL,
    create_time          INTEGER NOT NULL,
    -- Mutable part: the only columns an update rewrites.
    state                INTEGER NOT NULL,
    attempt              INTEGER NOT NULL,
    assigned_agent_id    TEXT NOT NULL,
    lease_expire_time    INTEGER,
    attempt_deadline     INTEGER,                    -- start of attempt + timeout
    schedule_time        INTEGER,
    output               BLOB,
    error_message        TEXT,
    error_type           TEXT,
    error_details        BLOB,
    progress             BLOB,
    cancel_requested     INTEGER NOT NULL,
    update_time          INTEGER NOT NULL,
    finish_time          INTEGER,
    ready_seq            INTEGER NOT NULL
);

CREATE UNIQUE INDEX tasks_by_idempotency_key ON tasks (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX tasks_open ON tasks (state) WHERE state IN (1, 2, 3);
CREATE INDEX tasks_by_session ON tasks (session_id);
CREATE INDEX tasks_by_capability ON tasks (capability);
CREATE INDEX tasks_by_pinned_agent ON tasks (agent_id);
CREATE INDEX tasks_by_assigned_agent ON tasks (assigned_agent_id);
