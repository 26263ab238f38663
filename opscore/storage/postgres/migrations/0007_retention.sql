-- Issue 14: retention (mirrors opscore/storage/sqlite/migrations/0005_retention.sql).
-- What has expired is found oldest first through these indexes, a small batch
-- at a time (opscore/storage/postgres/retention.py). The partial ones hold only
-- finished rows: open tasks and running sessions cost them nothing, and a
-- finished task's index entry is written once, when it finishes.
CREATE INDEX tasks_finished ON tasks (finish_time) WHERE state IN (4, 5, 6);
CREATE INDEX sessions_finished ON sessions (finish_time) WHERE state IN (3, 4, 5);
CREATE INDEX agent_transitions_by_record_time ON agent_transitions (record_time);
