"""How late the event loop runs what is due: the stall every call in flight waits out.

Every server's work (each RPC, stream message, commit answer and timer) runs on
one event loop, so anything that holds it (a long computation, a blocking call,
a garbage-collector pause, the process descheduled) delays all of it at once. A
timer asks to run every `interval_s`; how much later than asked it runs is the
loop's lag at that moment. Each lag goes to `opscore_event_loop_lag_seconds` when
metrics are on, and a lag of `warn_s` or more is logged (at most once every
`repeat_s`), since an operator should hear of a loop that stalls for seconds
even without a dashboard.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger("opscore.server")

INTERVAL_S = 0.1
WARN_S = 1.0
WARN_EVERY_S = 60.0


class LoopLagProbe:
    def __init__(
        self,
        observe: Callable[[float], None] | None,
        *,
        interval_s: float = INTERVAL_S,
        warn_s: float = WARN_S,
        repeat_s: float = WARN_EVERY_S,
    ) -> None:
        self.observe = observe
        self.interval_s = interval_s
        self.warn_s = warn_s
        self.repeat_s = repeat_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0
        self._warned: float | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._arm(self._loop.time())

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _arm(self, now: float) -> None:
        assert self._loop is not None
        self._due = now + self.interval_s
        self._handle = self._loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        lag = max(0.0, now - self._due)
        try:
            if self.observe is not None:
                self.observe(lag)
            if lag >= self.warn_s and (self._warned is None or now - self._warned >= self.repeat_s):
                self._warned = now
                log.warning(
                    "the event loop was held up: every call in flight waited this long",
                    extra={"lag_s": round(lag, 3)},
                )
        finally:
            self._arm(now)
