"""The SQLite store commits through a child process (opscore/storage/sqlite/
commitproc.py). What that must not change: the durability settings, the one
server per file rule, and that nothing acknowledged is lost. What it adds: a
child that dies is replaced, and the calls of its batches in flight are told
that their outcome is unknown."""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from opscore_proto.v1 import dispatch_pb2 as pb
from opscore_proto.v1 import dispatch_pb2_grpc

from opscore.errors import ConfigError, OpsCoreError, Unavailable
from opscore.storage.sqlite import Store, commitproc
from opscore.storage.sqlite import lock as lock_mod
from tests.conftest import eventually
from tests.support.procserver import running_server
from tests.test_group_commit import in_flight, stored_names, task, write_lock_held


def children_of(pid: int) -> Iterator[int]:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # gone meanwhile
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            yield int(entry)


def commit_process_of(pid: int) -> int:
    found = [
        c for c in children_of(pid) if b"commitchild.py" in Path(f"/proc/{c}/cmdline").read_bytes()
    ]
    assert len(found) == 1, f"commit processes of {pid}: {found}"
    return found[0]


def alive(pid: int) -> bool:
    try:
        # A zombie has exited: it writes nothing and holds no descriptor.
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def test_the_commit_process_has_the_stores_durability_settings(tmp_path: Path):
    for sync, level in (("full", 2), ("normal", 1)):
        store = Store(tmp_path / f"{sync}.db", sync=sync, max_db_bytes=8 << 20)
        await store.open()
        try:
            committer = store.committer
            assert committer is not None
            await eventually(lambda c=committer: c.settings is not None, what="child ready")
            assert committer.settings is not None
            assert committer.settings["journal_mode"] == "wal"
            assert committer.settings["synchronous"] == level
            assert committer.settings["max_page_count"] == (8 << 20) // 4096
            assert committer.settings["temp_store"] == 2  # MEMORY
        finally:
            await store.close()
        assert committer.proc is None, "closed with the store"


async def test_a_commit_process_killed_mid_commit_is_replaced(tmp_path: Path):
    db = tmp_path / "commit.db"
    store = Store(db)
    await store.open()
    failures: list[OpsCoreError] = []
    store.on_failure = failures.append
    try:
        store.put_task(task("before"))
        await asyncio.wait_for(store.commit(), 10)
        assert store.committer is not None and store.committer.proc is not None
        first_child = store.committer.proc.pid
        with write_lock_held(db):
            store.put_task(task("lost-or-not"))
            pending = store.commit()
            await in_flight(store, 1)  # the child waits for the write lock
            os.kill(first_child, signal.SIGKILL)
            with pytest.raises(OpsCoreError, match="may or may not have been stored") as err:
                await asyncio.wait_for(pending, 10)
        assert isinstance(err.value, Unavailable)
        assert len(failures) == 1, "one failure, one rebuild of memory"
        # The next commit starts a new child, and it writes.
        store.put_task(task("after"))
        await asyncio.wait_for(store.commit(), 10)
        assert store.committer.starts == 2
        assert store.committer.proc is not None and store.committer.proc.pid != first_child
        # It was killed waiting for the lock: its transaction never began.
        assert stored_names(db) == {"before", "after"}
    finally:
        await store.close()


def _enqueue(stub: dispatch_pb2_grpc.DispatchServiceStub, name: str) -> str:
    resp = stub.EnqueueTask(pb.EnqueueTaskRequest(name=name, capability="c"), timeout=10)
    return resp.task.task_id


@pytest.mark.slow
async def test_a_server_outlives_its_commit_process(tmp_path: Path):
    with running_server(tmp_path) as server:
        with grpc.insecure_channel(server.target) as channel:
            stub = dispatch_pb2_grpc.DispatchServiceStub(channel)
            before = await asyncio.to_thread(_enqueue, stub, "before")
            child = commit_process_of(server.pid)
            os.kill(child, signal.SIGKILL)
            await eventually(lambda: not alive(child), what="the child gone")

            # The server may refuse a call or two while it rebuilds, with a
            # retryable status; it must never die or answer INTERNAL.
            def enqueue_until_accepted() -> str:
                for _ in range(50):
                    try:
                        return _enqueue(stub, "after")
                    except grpc.RpcError as exc:
                        assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                raise AssertionError("never accepted again")

            after = await asyncio.to_thread(enqueue_until_accepted)
            assert commit_process_of(server.pid) != child
            for task_id in (before, after):
                got = stub.GetTask(pb.GetTaskRequest(task_id=task_id), timeout=10)
                assert got.task.state == pb.TASK_STATE_QUEUED
        assert server.terminate() == 0, server.log_tail()
    conn = sqlite3.connect(server.db_path)
    try:
        names = sorted(n for (n,) in conn.execute("SELECT name FROM tasks"))
    finally:
        conn.close()
    assert names == ["after", "before"]


@pytest.mark.slow
async def test_a_killed_servers_commit_process_holds_the_file_until_it_exits(tmp_path: Path):
    with running_server(tmp_path) as server:
        child = commit_process_of(server.pid)
        db = Path(server.db_path)
        # Stopped, it cannot read the end of file its parent's death leaves it.
        os.kill(child, signal.SIGSTOP)
        try:
            await asyncio.to_thread(server.kill)
            fd = os.open(f"{db}.lock", os.O_RDWR)
            try:
                with pytest.raises(BlockingIOError):
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(fd)
        finally:
            os.kill(child, signal.SIGCONT)
    await eventually(lambda: not alive(child), what="the orphan exits")
    # And the next server takes the file over.
    with running_server(tmp_path) as again:
        assert again.terminate() == 0, again.log_tail()


async def test_a_commit_process_that_cannot_start_fails_that_commit_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    db = tmp_path / "commit.db"
    store = Store(db)
    await store.open()
    try:
        assert store.committer is not None and store.committer.proc is not None
        child = store.committer.proc.pid
        os.kill(child, signal.SIGKILL)
        await eventually(lambda: store.committer is not None and store.committer.proc is None)
        monkeypatch.setattr(commitproc.sys, "executable", str(tmp_path / "no-such-python"))
        store.put_task(task("refused"))
        with pytest.raises(Unavailable, match="could not start the commit process"):
            await asyncio.wait_for(store.commit(), 10)
        monkeypatch.undo()
        store.put_task(task("stored"))
        await asyncio.wait_for(store.commit(), 10)
        assert stored_names(db) == {"stored"}
    finally:
        await store.close()


def test_an_in_memory_database_is_refused_with_what_to_do_instead():
    with pytest.raises(ConfigError, match="give a file path"):
        Store(":memory:")


HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0)
os.write(fd, sys.argv[2].encode() + b"\\n")
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_lock_recorded_for_a_dead_server_is_waited_for_then_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """What a dead server's orphaned commit process looks like to the next
    server: the lock held, the pid in the file no longer alive."""
    dead_pid = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_pid.wait()
    db = tmp_path / "x.db"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, f"{db}.lock", str(dead_pid.pid)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        # Never released: it waits the whole grace, then says who holds it.
        monkeypatch.setattr(lock_mod, "_ORPHAN_WAIT_S", 0.3)
        started = time.monotonic()
        with pytest.raises(
            ConfigError, match=f"in use by another Ops-Core server \\(pid {dead_pid.pid}\\)"
        ):
            lock_mod.DatabaseLock(str(db)).acquire()
        assert time.monotonic() - started >= 0.3
        # Released while waited for: taken.
        monkeypatch.setattr(lock_mod, "_ORPHAN_WAIT_S", 30.0)
        taken: list[BaseException | None] = []
        lock = lock_mod.DatabaseLock(str(db))

        def take() -> None:
            try:
                lock.acquire()
                taken.append(None)
            except BaseException as exc:
                taken.append(exc)

        waiter = threading.Thread(target=take)
        waiter.start()
        assert holder.stdin is not None
        holder.stdin.close()  # the holder exits, as the orphan does at end of file
        holder.wait(timeout=10)
        waiter.join(timeout=20)
        assert taken == [None]
        lock.release()
    finally:
        holder.kill()
        holder.wait()
