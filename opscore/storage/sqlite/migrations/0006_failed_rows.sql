-- ListTasks by FAILED or CANCELLED, and ListSessions by FAILED or CANCELLED, read
-- these indexes newest first (their entries end in the rowid) instead of every
-- row to find the few that failed. Not COMPLETED: that is the usual end, a page
-- of it is found at once without an index, and an entry per completed task would
-- cost every commit that completes one (opscore/storage/rows.py).
CREATE INDEX tasks_failed_or_cancelled ON tasks (state) WHERE state IN (5, 6);
CREATE INDEX sessions_failed_or_cancelled ON sessions (state) WHERE state IN (4, 5);
