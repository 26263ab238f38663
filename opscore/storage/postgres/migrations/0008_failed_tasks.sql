-- Mirrors opscore/storage/sqlite/migrations/0006_failed_tasks.sql: ListTasks by
-- FAILED or CANCELLED walks this index backwards by seq instead of every task.
CREATE INDEX tasks_failed_or_cancelled ON tasks (state, seq) WHERE state IN (5, 6);
