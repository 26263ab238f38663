"""The commit process's side: the child that owns the SQLite connection group
commits write through (the server's side, and why, are in commitproc.py).

It reads (generation, work) frames from its socket and answers each with one
frame, in order: ("ok", seconds), ("not written",) or ("error", sqlite3 class
name, message, error code, error name). Frames are a 4-byte length, a 1-byte
codec and the body (marshal for plain rows, pickle for anything marshal cannot
carry). The first frame it reads is its setup (path, pragmas, the statements
that get multi-row forms); the first it writes is ("ready", its settings).

It runs as a script (`python -E -s commitchild.py FD`), so it imports nothing
beyond the standard library, and little of that: it starts with every server.
"""

from __future__ import annotations

import marshal
import os
import pickle
import signal
import socket
import sqlite3
import struct
import sys
import time
from typing import Any

Work = list[tuple[str, list[tuple[Any, ...]]]]

HEAD = struct.Struct("!IB")
_MARSHAL, _PICKLE = 0, 1

# Rows per multi-row INSERT, largest first. One statement for many rows costs a
# third less per row than executemany's one step per row (measured on the tasks
# table: 10.3 against 15.9 us), and fixed sizes keep the prepared statements few
# (sqlite3 caches them per connection). 64 rows of the widest table bind 2,048
# parameters, far below SQLite's limit of 32,766.
_CHUNKS = (64, 16, 4)


class NotWritten(Exception):
    """A batch handed over after one before it failed: built on changes that
    were never stored, so it is not written either."""


# --------------------------------------------------------------------------- the transaction


def multi_row(sql: str, rows: int) -> str:
    """`sql` (an INSERT with one VALUES group) inserting `rows` rows at once."""
    head, _, tail = sql.partition(" VALUES (")
    group, _, rest = tail.partition(")")
    return f"{head} VALUES " + ", ".join([f"({group})"] * rows) + rest


class Transactions:
    """Writes batches on one connection, one transaction each."""

    def __init__(self, conn: sqlite3.Connection, multi_row_sql: tuple[str, ...]) -> None:
        self.conn = conn
        self.multi = {sql: {n: multi_row(sql, n) for n in _CHUNKS} for sql in multi_row_sql}
        # The generation of the last batch that failed: a batch of that
        # generation or older was handed over before the server heard of it.
        self.failed = -1

    def write(self, work: Work, generation: int) -> float:
        """One transaction for a whole batch; the seconds it took."""
        if generation <= self.failed:
            raise NotWritten()
        started = time.perf_counter()
        conn = self.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            for sql, rows in work:
                self._rows(sql, rows)
            conn.execute("COMMIT")
        except BaseException:
            self.failed = generation
            # Some errors (a full database, an I/O error) roll the transaction
            # back by themselves; a ROLLBACK then would raise and hide the real one.
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return time.perf_counter() - started

    def _rows(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        multi = self.multi.get(sql)
        if multi is None or len(rows) < _CHUNKS[-1]:
            self.conn.executemany(sql, rows)
            return
        start = 0
        for size in _CHUNKS:
            statement = multi[size]
            while len(rows) - start >= size:
                chunk = rows[start : start + size]
                self.conn.execute(statement, [value for row in chunk for value in row])
                start += size
        if start < len(rows):
            self.conn.executemany(sql, rows[start:])


# --------------------------------------------------------------------------- framing


def frame(obj: Any) -> bytes:
    try:
        body, codec = marshal.dumps(obj), _MARSHAL
    except ValueError:  # a value marshal does not know (e.g. a bytearray)
        body, codec = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), _PICKLE
    return HEAD.pack(len(body), codec) + body


def unframe(codec: int, body: bytes) -> Any:
    return marshal.loads(body) if codec == _MARSHAL else pickle.loads(body)


# --------------------------------------------------------------------------- the child


def _read_exactly(stream: Any, n: int) -> bytes | None:
    data = stream.read(n)
    return data if len(data) == n else None


def _child(fd: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    stream = sock.makefile("rb", buffering=1 << 16)

    def receive() -> Any:
        head = _read_exactly(stream, HEAD.size)
        if head is None:
            return None
        size, codec = HEAD.unpack(head)
        body = _read_exactly(stream, size)
        return None if body is None else unframe(codec, body)

    def reply(obj: Any) -> None:
        sock.sendall(frame(obj))

    setup = receive()
    if setup is None:
        return
    path, pragmas, multi_row_sql = setup
    conn = sqlite3.connect(path, isolation_level=None)
    for pragma in pragmas:
        conn.execute(pragma)
    tx = Transactions(conn, tuple(multi_row_sql))
    reply(
        (
            "ready",
            {
                "pid": os.getpid(),
                "journal_mode": conn.execute("PRAGMA journal_mode").fetchone()[0],
                "synchronous": conn.execute("PRAGMA synchronous").fetchone()[0],
                "max_page_count": conn.execute("PRAGMA max_page_count").fetchone()[0],
                "temp_store": conn.execute("PRAGMA temp_store").fetchone()[0],
            },
        )
    )
    while True:
        message = receive()
        if message is None:
            break  # end of file: the server closed us or is gone
        generation, work = message
        try:
            out: tuple[Any, ...] = ("ok", tx.write(work, generation))
        except NotWritten:
            out = ("not written",)
        except sqlite3.Error as exc:
            out = (
                "error",
                type(exc).__name__,
                str(exc),
                getattr(exc, "sqlite_errorcode", None),
                getattr(exc, "sqlite_errorname", None),
            )
        except Exception as exc:  # a bug: the server logs it and rebuilds
            out = ("error", "", f"{type(exc).__name__}: {exc}", None, None)
        try:
            reply(out)
        except OSError:
            break  # the server is gone
    conn.close()


if __name__ == "__main__":
    _child(int(sys.argv[1]))
