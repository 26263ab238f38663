"""Failed authentications: every one counted, a bounded number logged.

A flood of bad keys must neither fill the disk nor slow the clients that hold
good ones, so the log is a token bucket: a burst of lines, then a steady trickle
(limits.AUTH_FAILURE_LOG_*). What is not logged is counted, and the count goes
out in one summary line per interval while a flood lasts. Lines name the peer,
the method and the reason, never the key.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable

from opscore import limits

log = logging.getLogger("opscore.security.audit")


class AuthFailures:
    def __init__(
        self,
        *,
        burst: int = limits.AUTH_FAILURE_LOG_BURST,
        per_second: float = limits.AUTH_FAILURE_LOG_PER_SECOND,
        summary_interval: float = limits.AUTH_FAILURE_SUMMARY_INTERVAL.total_seconds(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._burst = float(burst)
        self._rate = per_second
        self._interval = summary_interval
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()
        self._summary: asyncio.TimerHandle | None = None
        #: Every failed authentication since start, and by reason.
        self.total = 0
        self.by_reason: Counter[str] = Counter()
        #: Failures since the last line that were not logged one by one.
        self.unlogged = 0

    def record(self, reason: str, peer: str, method: str) -> None:
        self.total += 1
        self.by_reason[reason] += 1
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            log.warning(
                "authentication failed",
                extra={
                    "reason": reason,
                    "peer": peer,
                    "method": method,
                    "failed_total": self.total,
                },
            )
            return
        self.unlogged += 1
        if self._summary is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._summary = loop.call_later(self._interval, self._summarize)

    def _summarize(self) -> None:
        self._summary = None
        if not self.unlogged:
            return
        log.warning(
            "authentication failures not logged one by one (rate limit)",
            extra={
                "unlogged": self.unlogged,
                "failed_total": self.total,
                "by_reason": dict(self.by_reason),
            },
        )
        self.unlogged = 0

    def close(self) -> None:
        """At shutdown: say what was not logged yet."""
        if self._summary is not None:
            self._summary.cancel()
        self._summarize()
