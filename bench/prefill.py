"""BENCH-ONLY: fill an Ops-Core database with finished tasks, fast.

The server creates the schema itself (we start `opscore serve` once on the empty
file and stop it with SIGTERM), then this module inserts COMPLETED rows straight
into the `tasks` table (and their attempt into `task_attempts`) with sqlite3, in
large transactions, bypassing the server.
Every NOT NULL column of opscore/storage/sqlite/migrations/0002_dispatch.sql is filled the
way the server fills it for a completed no-op task (values copied from a real run:
default retry policy, 300 s timeout, attempt 1, the input/output Structs the load
generators send). This is not how a user fills a database; it only stands in for a
long history, so that scenario 5 can ask whether history slows dispatch down.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from pathlib import Path

from google.protobuf import struct_pb2

COLUMNS = (
    "task_id, name, capability, agent_id, input, priority, max_attempts, "
    "initial_backoff_us, backoff_multiplier, max_backoff_us, timeout_us, "
    "heartbeat_timeout_us, idempotency_key, session_id, workflow_task_id, create_time, "
    "state, attempt, assigned_agent_id, lease_expire_time, attempt_deadline, "
    "schedule_time, output, error_message, error_type, error_details, progress, "
    "cancel_requested, update_time, finish_time, ready_seq"
)
COMPLETED = 4  # TaskState.COMPLETED
ATTEMPT_COMPLETED = 2  # AttemptOutcome.COMPLETED
ATTEMPT_COLUMNS = (
    "task_id, attempt, agent_id, outcome, assign_time, end_time, error_message, error_type, "
    "error_details, progress"
)


def _struct(**fields: object) -> bytes:
    s = struct_pb2.Struct()
    s.update(fields)
    return s.SerializeToString(deterministic=True)


def fill(db: Path, rows: int, chunk: int = 100_000) -> float:
    """Insert `rows` completed tasks; returns the seconds it took."""
    t_start = time.monotonic()
    conn = sqlite3.connect(db, isolation_level=None)
    # Bench-only speed-ups for the bulk load. journal_mode stays WAL (the server's),
    # the file is checkpointed and closed cleanly before the server opens it.
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA cache_size=-262144")
    outputs = _struct(ok=True)
    agents = [f"prefill-agent-{i:03d}" for i in range(256)]
    now_us = int(time.time() * 1e6) - rows * 1000  # history: one task per ms, ending now
    start_seq = conn.execute("SELECT COALESCE(MAX(ready_seq), 0) FROM tasks").fetchone()[0]
    inputs = [_struct(seq=i, t0=float(i)) for i in range(1000)]
    placeholders = ", ".join("?" * 31)
    sql = f"INSERT INTO tasks ({COLUMNS}) VALUES ({placeholders})"
    # The server also writes one task_attempts row per finished attempt (since
    # migration 0004); a history without them would be smaller than a real one.
    attempts_sql = f"INSERT INTO task_attempts ({ATTEMPT_COLUMNS}) VALUES ({', '.join('?' * 10)})"
    for base in range(0, rows, chunk):
        batch = []
        attempts = []
        for i in range(base, min(rows, base + chunk)):
            created = now_us + i * 1000
            task_id = str(uuid.uuid4())
            attempts.append(
                (
                    task_id,
                    1,
                    agents[i % 256],
                    ATTEMPT_COMPLETED,
                    created + 400,
                    created + 800,
                    None,
                    None,
                    None,
                    None,
                )
            )
            batch.append(
                (
                    task_id,
                    "noop",
                    "bench",
                    "",
                    inputs[i % 1000],
                    0,
                    3,
                    1_000_000,
                    2.0,
                    60_000_000,
                    300_000_000,
                    None,
                    None,
                    "",
                    "",
                    created,
                    COMPLETED,
                    1,
                    agents[i % 256],
                    None,
                    created + 300_000_000,
                    None,
                    outputs,
                    None,
                    None,
                    None,
                    None,
                    0,
                    created + 800,
                    created + 800,
                    start_seq + i + 1,
                )
            )
        conn.execute("BEGIN")
        conn.executemany(sql, batch)
        conn.executemany(attempts_sql, attempts)
        conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return time.monotonic() - t_start
