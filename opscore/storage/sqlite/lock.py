"""One server per SQLite file.

The SQLite backend keeps its hot state (queues, leases, timers) in memory, which
is only sound while one process owns the file: a second server on the same file
would lease the same tasks again. An exclusive `flock` on `<db>.lock`, held for
the life of the process, makes that ownership explicit. The kernel releases it
when the process dies, however it dies, so a crash never leaves a stale lock.

flock (not fcntl/lockf) because SQLite itself uses POSIX fcntl locks on the
database file, and those are per process: closing any descriptor of the file
would silently drop ours.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time

from opscore.errors import ConfigError

# How long a new server waits for a dead server's commit process to exit.
_ORPHAN_WAIT_S = 10.0


class DatabaseLock:
    def __init__(self, db_path: str) -> None:
        self.db_path = db_path
        self.path = f"{db_path}.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _lock(fd)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f" (pid {holder})" if holder else ""
            raise ConfigError(
                f"database {self.db_path} is in use by another Ops-Core server{who}; "
                "stop that server or give this one another --db"
            ) from None
        except OSError:
            os.close(fd)
            raise
        # Never unlinked: removing the file while another process waits on it would
        # let two processes lock two different files of the same name.
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    @property
    def fd(self) -> int:
        """The locked descriptor: a child process that inherits it holds the lock
        until it exits too (the commit process does)."""
        assert self._fd is not None
        return self._fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None


def _lock(fd: int) -> None:
    """Take the lock, or raise BlockingIOError. A server that died leaves its
    commit process holding the lock until it reads end of file and exits, a
    moment later: when the recorded holder is no longer alive, wait that out."""
    deadline = time.monotonic() + _ORPHAN_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            holder = _read_pid(fd)
            if holder is None or _alive(holder) or time.monotonic() > deadline:
                raise
        time.sleep(0.01)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _read_pid(fd: int) -> int | None:
    try:
        raw = os.pread(fd, 32, 0).decode().strip()
        return int(raw) if raw else None
    except (OSError, ValueError):
        return None
