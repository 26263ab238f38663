-- Replicas cache a running session's live state (its plan, counters and runs); a
-- version bumped by every transaction that changes the session tells a replica
-- whether its copy is still current, so that a session driven by one replica
-- costs no reload per step, and one driven by several reloads only when another
-- replica changed it.
ALTER TABLE sessions ADD COLUMN version bigint NOT NULL DEFAULT 0;

-- Every replica is equal: deadlines fire under row locks (FOR UPDATE SKIP LOCKED),
-- so no replica needs a named lease (0005's `leases`, never used).
DROP TABLE leases;

-- Nothing reads tasks by open state alone, and the planner preferred this index
-- to the ready ones for claims (reading every open task, then sorting).
DROP INDEX tasks_open;
