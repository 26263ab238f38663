"""In-process fan-out of events to streaming watchers (WatchAgents, WatchSession)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Generic, TypeVar

from opscore.errors import ResourceExhausted, Unavailable

T = TypeVar("T")

_CLOSED = object()


class Watcher(Generic[T]):
    """One watcher's queue. Iterate it; iteration ends when the broadcast closes it.

    A watcher that falls more than `limit` events behind is cut off with
    ResourceExhausted rather than letting memory grow without bound.
    """

    def __init__(self, owner: Broadcast[T], accept: Callable[[T], bool], limit: int) -> None:
        self._owner = owner
        self._accept = accept
        self._queue: asyncio.Queue[object] = asyncio.Queue(maxsize=limit + 1)
        self._limit = limit
        self._error: Exception | None = None

    def _offer(self, item: T) -> None:
        if not self._accept(item):
            return
        if self._queue.qsize() >= self._limit:
            self._finish(ResourceExhausted("watcher fell too far behind; reconnect"))
            return
        self._queue.put_nowait(item)

    def _finish(self, error: Exception | None) -> None:
        if self._error is None:
            self._error = error
        self._owner._watchers.discard(self)
        # Room was kept for the sentinel by sizing the queue limit + 1.
        if self._queue.full():
            return
        self._queue.put_nowait(_CLOSED)

    def close(self) -> None:
        self._owner._watchers.discard(self)

    async def __aiter__(self) -> AsyncIterator[T]:
        try:
            while True:
                item = await self._queue.get()
                if item is _CLOSED:
                    if self._error is not None:
                        raise self._error
                    return
                yield item  # type: ignore[misc]
        finally:
            self.close()


class Broadcast(Generic[T]):
    def __init__(self) -> None:
        self._watchers: set[Watcher[T]] = set()
        self.closed = False

    def watch(
        self, accept: Callable[[T], bool] = lambda _: True, limit: int = 10_000
    ) -> Watcher[T]:
        w = Watcher(self, accept, limit)
        if self.closed:
            w._finish(Unavailable("server is shutting down; reconnect"))
        else:
            self._watchers.add(w)
        return w

    def publish(self, item: T) -> None:
        for w in list(self._watchers):
            w._offer(item)

    def close(self, error: Exception | None = None) -> None:
        """End every watcher; with `error`, their iteration raises it."""
        self.closed = True
        for w in list(self._watchers):
            w._finish(error)

    def __len__(self) -> int:
        return len(self._watchers)
