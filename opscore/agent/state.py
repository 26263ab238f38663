"""The agent's ACTIVE/IDLE reports as its load changes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from opscore_proto.v1 import lifecycle_pb2

from opscore.client.errors import OpsCoreError

if TYPE_CHECKING:
    from opscore.agent.worker import Agent

log = logging.getLogger("opscore.agent")

_IDLE = lifecycle_pb2.AGENT_STATE_IDLE
# How long a graceful end waits for the server to answer FINISHED and to end
# the half-closed stream, each.
CLOSING_WAIT = 10.0


class StateReporter:
    """Reports ACTIVE/IDLE as the agent's load changes, one report at a time and at
    most one per `interval` seconds, so a busy agent does not flood its history."""

    def __init__(self, agent: Agent, interval: float = 0.5) -> None:
        self.agent = agent
        self.interval = interval
        self.wanted: int = _IDLE
        self.sent: int | None = None
        self._changed = asyncio.Event()
        self._closing = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    async def send(
        self, state: int, details: Mapping[str, Any] | None = None, *, unary: bool = False
    ) -> None:
        """Report `state`: on the work stream when the agent works on one, else
        (or with `unary`) with ReportState."""
        if unary:
            # Not behind the lock: at a re-registration the loop's report may be
            # waiting for the very stream that registering is to reopen.
            await self.agent.client.report_state(self.agent.agent_id, state, details=details)
            self.sent = state
            return
        async with self._lock:
            await self.agent._report_state(state, details)
            self.sent = state

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="opscore-agent-state")

    def want(self, state: int) -> None:
        if state != self.wanted:
            self.wanted = state
            self._changed.set()

    async def _loop(self) -> None:
        while not self._closing.is_set():
            await self._changed.wait()
            self._changed.clear()
            if self._closing.is_set():
                return
            if self.wanted != self.sent:
                try:
                    await self.send(self.wanted)
                except OpsCoreError as exc:
                    log.warning("could not report state: %s", exc)
                    self._changed.set()  # try again after the interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.interval)

    async def close(self) -> None:
        self._closing.set()
        self._changed.set()
        if self._task is not None and not self._task.done():
            # A report waiting for a stream that does not come back is given up.
            _, pending = await asyncio.wait({self._task}, timeout=CLOSING_WAIT)
            for task in pending:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
