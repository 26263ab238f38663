"""Work a backend starts and does not await (an operation spawned by a timer, a
read that feeds a cache): kept referenced until it ends, so asyncio does not
collect it half-way, and its failure logged, not lost."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from opscore.errors import OpsCoreError


class BackgroundTasks:
    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._tasks: set[asyncio.Task[Any]] = set()

    def keep(self, coro: Coroutine[Any, Any, Any], what: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=f"opscore: {what}")
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._done(t, what))

    def cancel(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    def _done(self, task: asyncio.Task[Any], what: str) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, OpsCoreError):  # refused (e.g. while rebuilding): expected
            self._log.debug("%s: %s", what, exc.message)
        elif exc is not None:
            self._log.error("%s failed", what, exc_info=exc)
