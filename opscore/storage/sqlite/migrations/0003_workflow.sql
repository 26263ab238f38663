-- Workflow definitions (immutable per id and version) and sessions.
CREATE TABLE workflow_definitions (
    definition_id TEXT NOT NULL,
    version       INTEGER NOT NULL,
    body          BLOB NOT NULL,                     -- serialized opscore.v1.WorkflowDefinition
    content_hash  TEXT NOT NULL,                     -- of the body without version/create_time
    create_time   INTEGER NOT NULL,
    PRIMARY KEY (definition_id, version)
) WITHOUT ROWID;

CREATE TABLE sessions (
    session_id         TEXT PRIMARY KEY,
    definition_id      TEXT NOT NULL,
    definition_version INTEGER NOT NULL,
    state              INTEGER NOT NULL,             -- SessionState
    input              BLOB,
    output             BLOB,
    error_message      TEXT,
    error_type         TEXT,
    error_details      BLOB,
    agent_id           TEXT NOT NULL,
    idempotency_key    TEXT,
    create_time        INTEGER NOT NULL,
    update_time        INTEGER NOT NULL,
    finish_time        INTEGER
);
CREATE UNIQUE INDEX sessions_by_idempotency_key ON sessions (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX sessions_open ON sessions (state) WHERE state IN (1, 2);
CREATE INDEX sessions_by_definition ON sessions (definition_id);

-- The definition a session runs, kept apart so that state updates of the
-- session row never rewrite it, and so that deleting a definition leaves
-- running sessions untouched.
CREATE TABLE session_definitions (
    session_id TEXT PRIMARY KEY,
    body       BLOB NOT NULL
);

CREATE TABLE session_task_runs (
    session_id       TEXT NOT NULL,
    workflow_task_id TEXT NOT NULL,
    position         INTEGER NOT NULL,               -- order in the definition
    task_id          TEXT NOT NULL,
    state            INTEGER NOT NULL,               -- TaskRunState
    attempt          INTEGER NOT NULL,
    output           BLOB,
    error_message    TEXT,
    error_type       TEXT,
    error_details    BLOB,
    start_time       INTEGER,
    finish_time      INTEGER,
    PRIMARY KEY (session_id, workflow_task_id)
) WITHOUT ROWID;

CREATE TABLE session_events (
    session_id TEXT NOT NULL,
    sequence   INTEGER NOT NULL,
    body       BLOB NOT NULL,                        -- serialized opscore.v1.SessionEvent
    PRIMARY KEY (session_id, sequence)
) WITHOUT ROWID;
