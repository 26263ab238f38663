-- What several Ops-Core replicas on one database need: who is alive, who leads,
-- who holds which agent's streams. (SQLite has no counterpart: there one process
-- owns the file.)

-- The database's clock, in the unit of every time column. Liveness and leases
-- between replicas are judged by this one clock, never by the replicas' own,
-- which may disagree.
CREATE FUNCTION opscore_now_us() RETURNS bigint
    LANGUAGE sql VOLATILE PARALLEL SAFE
    AS $$ SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint $$;

-- One row per running replica (per process start). A replica bumps its
-- heartbeat_time periodically; one whose heartbeat is older than the liveness
-- timeout is dead, and deleting its row releases its leases and stream records.
CREATE TABLE replicas (
    replica_id     text PRIMARY KEY,
    address        text NOT NULL,                      -- the gRPC target it serves, for operators
    host           text NOT NULL,
    pid            integer NOT NULL,
    version        text NOT NULL,                      -- Ops-Core version it runs
    start_time     bigint NOT NULL,
    heartbeat_time bigint NOT NULL DEFAULT opscore_now_us()
) WITH (fillfactor = 50);

-- Named leases, each held by one replica at a time (e.g. 'leader': timers,
-- liveness scans). Taken when absent or expired (by opscore_now_us()), renewed
-- by its holder before expire_time.
CREATE TABLE leases (
    lease_name   text PRIMARY KEY,
    replica_id   text NOT NULL REFERENCES replicas (replica_id) ON DELETE CASCADE,
    acquire_time bigint NOT NULL,
    expire_time  bigint NOT NULL
) WITH (fillfactor = 50);
CREATE INDEX leases_by_replica ON leases (replica_id);

-- Which replica holds how many open work streams for which agent: where to wake
-- an agent, and what a dead replica leaves to recover.
CREATE TABLE agent_streams (
    replica_id text NOT NULL REFERENCES replicas (replica_id) ON DELETE CASCADE,
    agent_id   text NOT NULL,
    streams    integer NOT NULL CHECK (streams > 0),
    PRIMARY KEY (replica_id, agent_id)
);
CREATE INDEX agent_streams_by_agent ON agent_streams (agent_id);
