"""The server log's side of "ready work that no agent can take".

Every few seconds the watch asks the dispatch engine which ready queues no
connected agent serves (a cheap look per queue and per stream), and logs a
warning per capability (or pinned agent) once the condition has lasted a full
check interval, so an agent that is merely reconnecting is not reported. The
warning repeats at most every `repeat_s` while the condition lasts, and an INFO
line says when an agent can take the work again. The metric side is
`opscore_tasks_ready_without_agent` (metrics.EngineCollector).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opscore.dispatch import DispatchEngine

log = logging.getLogger("opscore.dispatch")

CHECK_INTERVAL_S = 10.0
WARN_EVERY_S = 300.0


class NoAgentWatch:
    def __init__(
        self,
        dispatch: DispatchEngine,
        *,
        interval_s: float | None = None,
        repeat_s: float | None = None,
    ) -> None:
        self.dispatch = dispatch
        self.interval_s = CHECK_INTERVAL_S if interval_s is None else interval_s
        self.repeat_s = WARN_EVERY_S if repeat_s is None else repeat_s
        # (capability, pinned agent id) -> (first seen unserved, last warned or None)
        self._state: dict[tuple[str, str], tuple[float, float | None]] = {}
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_later(self.interval_s, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        assert self._loop is not None
        try:
            self.check(self._loop.time())
        except Exception:  # a timer has no caller to tell; the next tick tries again
            log.exception("the no-agent check failed")
        self._handle = self._loop.call_later(self.interval_s, self._tick)

    def check(self, now: float) -> None:
        unserved = set(self.dispatch.unserved_ready())
        for key in list(self._state):
            if key not in unserved:
                first, warned = self._state.pop(key)
                if warned is not None:
                    cap, agent_id = key
                    log.info(
                        "ready tasks can be taken again",
                        extra={"capability": cap or None, "pinned_agent_id": agent_id or None},
                    )
        for key in unserved:
            first, warned = self._state.get(key, (now, None))
            due = now - first >= self.interval_s and (
                warned is None or now - warned >= self.repeat_s
            )
            if due:
                warned = now
                cap, agent_id = key
                if agent_id:
                    message = (
                        f"tasks pinned to agent {agent_id} are ready but it has no open task "
                        "stream in state IDLE or ACTIVE"
                    )
                else:
                    message = (
                        f"tasks with capability {cap!r} are ready but no connected agent has "
                        "that capability (no open task stream of an IDLE or ACTIVE agent serves it)"
                    )
                log.warning(
                    message,
                    extra={
                        "capability": cap or None,
                        "pinned_agent_id": agent_id or None,
                        "waiting_s": round(now - first, 1),
                    },
                )
            self._state[key] = (first, warned)
