-- Issue 14: retention. What has expired is found oldest first through these
-- indexes, a small batch at a time (opscore/storage/sqlite/retention.py). The
-- partial ones hold only finished rows, so open tasks and running sessions
-- cost them nothing; a task enters tasks_finished once, when it finishes.
CREATE INDEX tasks_finished ON tasks (finish_time) WHERE state IN (4, 5, 6);
CREATE INDEX sessions_finished ON sessions (finish_time) WHERE state IN (3, 4, 5);
CREATE INDEX agent_transitions_by_record_time ON agent_transitions (record_time);
