-- ListTasks by SCHEDULED or QUEUED reads this index newest first instead of
-- walking every task by seq: without it, a page of an old backlog read all the
-- finished history enqueued after it (57-58 ms per page behind 200,000 finished
-- tasks in a probe, growing with the retained history; 0.9 ms with it).
--
-- 0006 dropped an index of open tasks on (state) alone, which the planner chose
-- for claims; no claim or deadline query orders by seq, and
-- tests/test_pg_migrate.py checks that each of them still reads its own index.
-- ASSIGNED is left out: every update of a task row writes a new entry in each
-- index whose predicate the row meets, so a task makes one entry here instead
-- of two (ListTasks by ASSIGNED reads a leases' index and sorts: leases are as
-- many as agents hold, never a backlog).
CREATE INDEX tasks_waiting ON tasks (state, seq) WHERE state IN (1, 2);

-- The same for ListSessions by PENDING or RUNNING: 0003's index of open sessions
-- had no order, so a page of them was read newest first through every session.
DROP INDEX sessions_open;
CREATE INDEX sessions_open ON sessions (state, seq) WHERE state IN (1, 2);
