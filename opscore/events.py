"""In-process fan-out of events to streaming watchers (WatchAgents, WatchSession).

An event is encoded once, when it is published, and every watcher queues the same
bytes: 2,000 watchers cost one serialization, not 2,000. Each watcher has a
budget (events and bytes queued); one that falls behind it, because its client
reads slowly or not at all, is ended with RESOURCE_EXHAUSTED instead of letting
the server's memory grow with it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Generic, TypeVar

from opscore import limits
from opscore.errors import OpsCoreError, ResourceExhausted, Unavailable

T = TypeVar("T")


class FellBehind(ResourceExhausted):
    """A watcher's client did not keep up; the message says how to resume."""

    reason = "WATCHER_FELL_BEHIND"


class Watcher(Generic[T]):
    """One watcher's queue. Iterate it for (event, encoded) pairs; iteration ends
    when the broadcast closes it, raising the error it was closed with."""

    def __init__(
        self, owner: Broadcast[T], accept: Callable[[T], bool], max_events: int, max_bytes: int
    ) -> None:
        self._owner = owner
        self._accept = accept
        self._queue: deque[tuple[T, bytes]] = deque()
        self._bytes = 0
        self._max_events = max_events
        self._max_bytes = max_bytes
        self._ready = asyncio.Event()
        self._done = False
        self._error: OpsCoreError | None = None

    def _offer(self, item: T, data: bytes) -> None:
        if self._done or not self._accept(item):
            return
        if len(self._queue) >= self._max_events or self._bytes + len(data) > self._max_bytes:
            self._finish(
                FellBehind(
                    f"this watch fell behind: {len(self._queue)} events ({self._bytes} bytes) "
                    "were waiting to be read, the most one watch may hold"
                )
            )
            return
        self._queue.append((item, data))
        self._bytes += len(data)
        self._ready.set()

    def _finish(self, error: OpsCoreError | None) -> None:
        if self._done:
            return
        self._done = True
        self._error = error
        if error is not None:
            # Nothing queued is worth delivering after a gap; free it now.
            self._queue.clear()
            self._bytes = 0
        self._owner._watchers.discard(self)
        self._ready.set()

    def close(self) -> None:
        self._done = True
        self._owner._watchers.discard(self)

    async def __aiter__(self) -> AsyncIterator[tuple[T, bytes]]:
        try:
            while True:
                while self._queue:
                    item, data = self._queue.popleft()
                    self._bytes -= len(data)
                    yield item, data
                if self._done:
                    if self._error is not None:
                        raise self._error
                    return
                self._ready.clear()
                await self._ready.wait()
        finally:
            self.close()


class Broadcast(Generic[T]):
    def __init__(self, encode: Callable[[T], bytes]) -> None:
        self._encode = encode
        self._watchers: set[Watcher[T]] = set()
        self.closed: OpsCoreError | None = None

    def watch(
        self,
        accept: Callable[[T], bool] = lambda _: True,
        *,
        max_events: int = limits.WATCHER_MAX_EVENTS,
        max_bytes: int = limits.WATCHER_MAX_BYTES,
    ) -> Watcher[T]:
        w = Watcher(self, accept, max_events, max_bytes)
        if self.closed is not None:
            w._finish(self.closed)
        else:
            self._watchers.add(w)
        return w

    def publish(self, item: T) -> None:
        if not self._watchers:
            return
        data = self._encode(item)
        for w in list(self._watchers):
            w._offer(item, data)

    def close(self, error: OpsCoreError | None = None) -> None:
        """End every watcher; with `error`, their iteration raises it. A closed
        broadcast ends new watchers at once (with `error`, or UNAVAILABLE)."""
        self.closed = error or Unavailable("server is shutting down; reconnect")
        for w in list(self._watchers):
            w._finish(error)

    def end_all(self, error: OpsCoreError) -> None:
        """End the current watchers with `error` but keep accepting new ones."""
        for w in list(self._watchers):
            w._finish(error)

    def __len__(self) -> int:
        return len(self._watchers)
