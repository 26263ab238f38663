-- Agents and their state history.
CREATE TABLE agents (
    agent_id             TEXT PRIMARY KEY,
    name                 TEXT NOT NULL,
    version              TEXT NOT NULL,
    capabilities         TEXT NOT NULL,              -- JSON array of strings
    contact_endpoint     TEXT NOT NULL,
    metadata             TEXT NOT NULL,              -- JSON object of strings
    state                INTEGER NOT NULL,           -- AgentState
    state_details        BLOB,                       -- serialized google.protobuf.Struct
    register_time        INTEGER NOT NULL,           -- microseconds since the epoch, UTC
    state_change_time    INTEGER NOT NULL,
    last_seen_time       INTEGER NOT NULL,
    deregistered         INTEGER NOT NULL DEFAULT 0,
    state_before_offline INTEGER NOT NULL DEFAULT 0,
    history_seq          INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE agent_transitions (
    agent_id     TEXT NOT NULL,
    sequence     INTEGER NOT NULL,
    from_state   INTEGER NOT NULL,
    to_state     INTEGER NOT NULL,
    details      BLOB,
    observe_time INTEGER NOT NULL,
    record_time  INTEGER NOT NULL,
    source       TEXT NOT NULL,
    out_of_order INTEGER NOT NULL,
    PRIMARY KEY (agent_id, sequence)
) WITHOUT ROWID;
