-- Agents and their state history.
--
-- Conventions of every PostgreSQL migration (they mirror the SQLite schema's
-- meaning, opscore/storage/sqlite/migrations/, with PostgreSQL types):
--   times      bigint microseconds since the Unix epoch, UTC (as in SQLite), so
--              one codec serves both backends and google.protobuf.Timestamp's
--              whole range (years 1-9999) fits; never timestamptz
--   durations  bigint microseconds, in columns named *_us
--   enums      integer, the proto enum's number
--   flags      boolean
--   payloads   bytea (serialized google.protobuf.Struct or message)
-- Tables that rows are updated in place many times keep some free space per page
-- (fillfactor) so that updates which touch no indexed column stay HOT.

CREATE TABLE agents (
    agent_id             text PRIMARY KEY,
    name                 text NOT NULL,
    version              text NOT NULL,
    capabilities         text[] NOT NULL,
    contact_endpoint     text NOT NULL,
    metadata             jsonb NOT NULL,               -- object of strings
    state                integer NOT NULL,             -- AgentState
    state_details        bytea,
    register_time        bigint NOT NULL,
    state_change_time    bigint NOT NULL,
    -- Not indexed on purpose: it changes on every heartbeat, and an index would
    -- make each of those updates write every index of the row. Agents are few;
    -- a liveness scan reads them all.
    last_seen_time       bigint NOT NULL,
    deregistered         boolean NOT NULL DEFAULT false,
    state_before_offline integer NOT NULL DEFAULT 0,
    history_seq          bigint NOT NULL DEFAULT 0
) WITH (fillfactor = 80);

CREATE TABLE agent_transitions (
    agent_id     text NOT NULL,
    sequence     bigint NOT NULL,
    from_state   integer NOT NULL,
    to_state     integer NOT NULL,
    details      bytea,
    observe_time bigint NOT NULL,
    record_time  bigint NOT NULL,
    source       text NOT NULL,
    out_of_order boolean NOT NULL,
    PRIMARY KEY (agent_id, sequence)
);
