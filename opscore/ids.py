"""Identifiers the server makes: time-ordered UUIDs (RFC 9562 version 7).

A task's rows are written several times while it is open (enqueued, leased,
finished) and its id keys the tasks table's primary-key index and every
attempt row. Random (version 4) ids put each open task on a page of its own,
so a group commit of n tasks rewrote about n pages per index; ids that grow
with time keep the open tasks in the few rightmost pages. They stay opaque
strings to clients: nothing may parse them.

The random bits come from the operating system's generator, read 4 KiB at a
time: one `getrandom` call per id (as `uuid.uuid4` makes) showed as 6% of the
event loop's samples at a few thousand tasks per second. Request ids
(`new_token`) come from the same buffer.
"""

from __future__ import annotations

import os
import time

_CHUNK = 4096
_ID_BYTES = 10  # 80 bits read, 74 kept
_buffer = b""
_offset = 0


def _reset() -> None:
    # A forked child must not hand out the parent's remaining bytes again.
    global _buffer, _offset
    _buffer, _offset = b"", 0


os.register_at_fork(after_in_child=_reset)

_VERSION_AND_VARIANT = 0x7 << 76 | 0x2 << 62
_RANDOM_MASK = ((1 << 80) - 1) & ~(0xF << 76) & ~(0x3 << 62)


def _random(n: int) -> bytes:
    global _buffer, _offset
    if _offset + n > len(_buffer):
        _buffer, _offset = os.urandom(_CHUNK), 0
    out = _buffer[_offset : _offset + n]
    _offset += n
    return out


def new_id() -> str:
    """A version 7 UUID: 48 bits of Unix milliseconds, then 74 random bits."""
    rand = int.from_bytes(_random(_ID_BYTES), "big")
    ms = time.time_ns() // 1_000_000 & 0xFFFF_FFFF_FFFF
    h = f"{ms << 80 | rand & _RANDOM_MASK | _VERSION_AND_VARIANT:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def new_token() -> str:
    """128 random bits as 32 hex digits (a request id: nothing is ordered by it)."""
    return _random(16).hex()
