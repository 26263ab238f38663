"""The SQLite store's group commit hands the writer thread a second batch while a
first one commits: the thread starts the next commit as soon as one ends. These
tests pin down what that must not change: replies wait for their own commit and
every one before it, batches end in order, and a batch handed over behind a
commit that fails is never written (it was built on changes that were not
stored).

Another connection holding SQLite's write lock stands in for a slow disk: the
writer waits on the lock (busy_timeout) as it would on fsync.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from opscore.errors import OpsCoreError
from opscore.models import RetryPolicy, Task, TaskState
from opscore.storage.sqlite import Store
from tests.conftest import eventually


def task(name: str) -> Task:
    now = datetime.now(UTC)
    return Task(
        task_id=f"task-{name}",
        name=name,
        capability="c",
        agent_id="",
        input=None,
        priority=0,
        retry_policy=RetryPolicy(),
        timeout=timedelta(seconds=300),
        heartbeat_timeout=None,
        idempotency_key="",
        state=TaskState.QUEUED,
        create_time=now,
        update_time=now,
        ready_seq=1,
    )


def stored_names(db: Path) -> set[str]:
    conn = sqlite3.connect(db)
    try:
        return {name for (name,) in conn.execute("SELECT name FROM tasks")}
    finally:
        conn.close()


def poison_inserts_of(db: Path) -> None:
    """Inserting a task named "poison" fails (its whole transaction with it)."""
    conn = sqlite3.connect(db)
    conn.execute(
        "CREATE TRIGGER poison BEFORE INSERT ON tasks WHEN NEW.name = 'poison' "
        "BEGIN SELECT RAISE(ABORT, 'injected'); END"
    )
    conn.commit()
    conn.close()


@contextmanager
def write_lock_held(db: Path) -> Iterator[None]:
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        blocker.execute("COMMIT")
        blocker.close()


async def in_flight(store: Store, n: int) -> None:
    """Until `n` batches have been handed to the writer thread."""
    await eventually(lambda: len(store._flights) == n, what=f"{n} batches handed over")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = Store(tmp_path / "commit.db")
    await s.open()
    yield s
    await s.close()


async def test_commits_end_in_order_and_an_empty_one_waits_for_those_before_it(
    store: Store, tmp_path: Path
):
    ended: list[str] = []
    with write_lock_held(tmp_path / "commit.db"):
        store.put_task(task("a"))
        first = store.commit()
        first.add_done_callback(lambda _: ended.append("a"))
        await in_flight(store, 1)
        store.put_task(task("b"))
        second = store.commit()
        second.add_done_callback(lambda _: ended.append("b"))
        await in_flight(store, 2)
        # Nothing new: it still means "everything recorded so far is durable".
        third = store.commit()
        third.add_done_callback(lambda _: ended.append("nothing new"))
        # Both handed over and the loop has turned many times meanwhile; with the
        # write lock held none of them may have ended.
        assert ended == [] and stored_names(tmp_path / "commit.db") == set()
    await asyncio.wait_for(asyncio.gather(first, second, third), 10)
    assert ended == ["a", "b", "nothing new"]
    assert stored_names(tmp_path / "commit.db") == {"a", "b"}
    assert store.commits == 2


async def test_a_batch_behind_a_failed_commit_is_not_written(store: Store, tmp_path: Path):
    db = tmp_path / "commit.db"
    poison_inserts_of(db)
    failures: list[OpsCoreError] = []
    store.on_failure = failures.append
    with write_lock_held(db):
        store.put_task(task("poison"))
        first = store.commit()
        await in_flight(store, 1)
        # Handed over while the first is still committing: built on top of it.
        store.put_task(task("behind"))
        second = store.commit()
        await in_flight(store, 2)
    with pytest.raises(OpsCoreError, match="injected"):
        await asyncio.wait_for(first, 10)
    with pytest.raises(OpsCoreError, match="injected"):
        await asyncio.wait_for(second, 10)
    assert len(failures) == 1, "one failure, one rebuild"
    assert stored_names(db) == set()
    # What is recorded after the failure is written again.
    store.put_task(task("after"))
    await asyncio.wait_for(store.commit(), 10)
    assert stored_names(db) == {"after"}


async def test_nothing_new_behind_a_failed_commit_hears_the_failure(store: Store, tmp_path: Path):
    """A commit() with nothing new recorded promises that everything before it is
    durable: behind a commit that fails, that promise is broken."""
    db = tmp_path / "commit.db"
    poison_inserts_of(db)
    with write_lock_held(db):
        store.put_task(task("poison"))
        first = store.commit()
        await in_flight(store, 1)
        nothing_new = store.commit()
        await in_flight(store, 2)
    with pytest.raises(OpsCoreError, match="injected"):
        await asyncio.wait_for(first, 10)
    with pytest.raises(OpsCoreError, match="injected"):
        await asyncio.wait_for(nothing_new, 10)
