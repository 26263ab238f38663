-- ListTasks by FAILED or CANCELLED reads this index, newest first (its entries
-- end in the rowid), instead of every task to find the few that failed. Not
-- COMPLETED: that is the usual end, a page of it is found at once without an
-- index, and an entry per completed task would cost every commit that completes
-- one (opscore/storage/rows.py, task_state_index_term).
CREATE INDEX tasks_failed_or_cancelled ON tasks (state) WHERE state IN (5, 6);
