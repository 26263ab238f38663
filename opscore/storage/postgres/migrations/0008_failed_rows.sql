-- Mirrors opscore/storage/sqlite/migrations/0006_failed_rows.sql: ListTasks and
-- ListSessions by FAILED or CANCELLED walk these backwards by seq instead of
-- every row. A row that completes never enters them.
CREATE INDEX tasks_failed_or_cancelled ON tasks (state, seq) WHERE state IN (5, 6);
CREATE INDEX sessions_failed_or_cancelled ON sessions (state, seq) WHERE state IN (4, 5);
