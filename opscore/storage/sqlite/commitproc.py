"""The commit process: a child process that owns the SQLite connection the group
commit writes through, and the server's handle on it.

Why a process and not a thread: a transaction needs the GIL to start and again
after every statement, and a busy event loop holds it for milliseconds at a time
(Python's switch interval is 5 ms). Measured under the work-stream load (16
agents, max_in_flight 1), a commit of about 20 rows took 3.2-4.2 ms on a writer
thread against 0.35-0.62 ms with the GIL free, and every task waits for one.
In its own process the transaction never waits for our loop.

The protocol, over a private socket pair, in order both ways: the server sends
(generation, work) frames, `work` being the statements of one batch with their
rows; the child answers each with one frame: the seconds the transaction took,
"not written" (the batch was handed over behind a commit that failed, so it was
built on changes that were never stored), or the error it failed with. Frames are
a 4-byte length, a 1-byte codec and the body (marshal for plain rows, pickle for
anything marshal cannot carry).

Lifetime: the child holds the server's `flock` on `<db>.lock` (the descriptor
is inherited), so no other server can take the file while it might still write.
It exits when its socket reaches end of file: the server closed it, or died
(the kernel closes a dead process's descriptors). It ignores SIGINT and SIGTERM
so that a signal to the whole process group cannot cut it off mid-commit; the
server's own shutdown closes it after the last batch.

The child's side is commitchild.py, run as a script.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sqlite3
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from typing import Any

from opscore.storage.sqlite import commitchild
from opscore.storage.sqlite.commitchild import NotWritten, Work, frame, unframe

__all__ = ["CommitProcess", "CommitProcessDied", "NotWritten"]

# Room for a batch of thousands of rows without a partial send.
_SOCKET_BUFFER = 4 << 20
_HEAD = commitchild.HEAD
_CHILD = os.path.abspath(commitchild.__file__)


class CommitProcessDied(Exception):
    """The commit process ended with batches in flight: whether the oldest of
    them was stored is unknown."""


# --------------------------------------------------------------------------- the server's side


class CommitProcess:
    """The server's handle on its commit process. `submit` hands over a batch and
    returns the future of its outcome; outcomes arrive in the order of the
    submissions. A child that dies is started again at the next submission."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        path: str,
        *,
        pragmas: list[str],
        multi_row_sql: tuple[str, ...],
        keep_fds: tuple[int, ...] = (),
    ) -> None:
        self.loop = loop
        self.path = path
        self.pragmas = pragmas
        self.multi_row_sql = multi_row_sql
        self.keep_fds = keep_fds
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        # What the child reported once its connection was set up.
        self.settings: dict[str, Any] | None = None
        self._sock: socket.socket | None = None
        self._waiting: deque[asyncio.Future[float]] = deque()
        self._inbox = bytearray()
        self._outbox = bytearray()
        # Called with the exit code of a child that died (the next submit starts one).
        self.on_died: Callable[[int | None], None] | None = None

    def start(self) -> None:
        ours, theirs = socket.socketpair()
        for s in (ours, theirs):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
        setup = frame((self.path, self.pragmas, list(self.multi_row_sql)))
        try:
            theirs.setblocking(True)
            ours.sendall(setup)
            self.proc = subprocess.Popen(
                [sys.executable, "-E", "-s", _CHILD, str(theirs.fileno())],
                pass_fds=(theirs.fileno(), *self.keep_fds),
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.starts += 1
        self.settings = None
        ours.setblocking(False)
        self._sock = ours
        self._inbox.clear()
        self._outbox.clear()
        self.loop.add_reader(ours.fileno(), self._readable)

    def submit(self, generation: int, work: Work) -> asyncio.Future[float]:
        done: asyncio.Future[float] = self.loop.create_future()
        if self._sock is None:
            try:
                self.start()
            except Exception as exc:  # e.g. out of processes: this commit fails, the next retries
                done.set_exception(RuntimeError(f"could not start the commit process: {exc}"))
                return done
        self._waiting.append(done)
        self._send(frame((generation, work)))
        return done

    def _send(self, data: bytes) -> None:
        sock = self._sock
        assert sock is not None
        if not self._outbox:
            try:
                sent = sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._died()
                return
            if sent == len(data):
                return
            data = data[sent:]
            self.loop.add_writer(sock.fileno(), self._writable)
        self._outbox += data

    def _writable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            sent = sock.send(self._outbox)
        except BlockingIOError:
            return
        except OSError:
            self._died()
            return
        del self._outbox[:sent]
        if not self._outbox:
            self.loop.remove_writer(sock.fileno())

    def _readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            data = sock.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._died()
            return
        inbox = self._inbox
        inbox += data
        while len(inbox) >= _HEAD.size:
            size, codec = _HEAD.unpack_from(inbox)
            end = _HEAD.size + size
            if len(inbox) < end:
                break
            reply = unframe(codec, bytes(inbox[_HEAD.size : end]))
            del inbox[:end]
            self._answer(reply)

    def _answer(self, reply: tuple[Any, ...]) -> None:
        kind = reply[0]
        if kind == "ready":
            self.settings = reply[1]
            return
        done = self._waiting.popleft()
        if done.done():
            return
        if kind == "ok":
            done.set_result(reply[1])
        elif kind == "not written":
            done.set_exception(NotWritten())
        else:
            done.set_exception(_rebuilt(reply[1], reply[2], reply[3], reply[4]))

    def _died(self) -> None:
        """The child is gone: the oldest batch in flight may or may not have been
        stored; those behind it are reported as not written (memory is rebuilt
        from the database either way)."""
        code = self._stop_watching()
        waiting, self._waiting = self._waiting, deque()
        first = True
        for done in waiting:
            if done.done():
                continue
            if first:
                done.set_exception(CommitProcessDied(f"the commit process exited (code {code})"))
                first = False
            else:
                done.set_exception(NotWritten())
        if self.on_died is not None:
            self.on_died(code)

    def _stop_watching(self) -> int | None:
        sock, self._sock = self._sock, None
        if sock is not None:
            self.loop.remove_reader(sock.fileno())
            self.loop.remove_writer(sock.fileno())
            sock.close()
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        with contextlib.suppress(subprocess.TimeoutExpired):
            return proc.wait(timeout=1.0)  # it closed its end: it is exiting
        proc.kill()
        return proc.wait()

    async def close(self, timeout: float = 30.0) -> None:
        """Let the child finish what it was sent and exit (it reads end of file)."""
        sock, proc = self._sock, self.proc
        if sock is None or proc is None:
            return
        self.loop.remove_reader(sock.fileno())
        self.loop.remove_writer(sock.fileno())
        self._sock, self.proc = None, None
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        try:
            await asyncio.to_thread(proc.wait, timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)
        finally:
            sock.close()
        for done in self._waiting:
            if not done.done():
                done.set_exception(CommitProcessDied("the server closed the commit process"))
        self._waiting.clear()


def _rebuilt(kind: str, message: str, code: int | None, name: str | None) -> Exception:
    """The child's exception, as the same sqlite3 class where it was one (the
    store tells a full database by it)."""
    cls = getattr(sqlite3, kind, None)
    if not (isinstance(cls, type) and issubclass(cls, sqlite3.Error)):
        return RuntimeError(message)
    exc = cls(message)
    exc.sqlite_errorcode = code  # type: ignore[attr-defined]
    exc.sqlite_errorname = name  # type: ignore[attr-defined]
    return exc
