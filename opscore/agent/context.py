"""The handler's view of one task attempt: its input, cancellation, progress."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from opscore_proto.v1 import dispatch_pb2

from opscore.client.convert import to_datetime, to_dict, to_struct, to_timedelta

if TYPE_CHECKING:
    from opscore.agent.worker import Agent


class TaskContext:
    """What a handler gets: the task, its input, and ways to talk back.

    `input` is the task's input as a dict. For a workflow task
    (`session_id` set) the input holds `parameters` (from the definition),
    `input` (the session's input) and `upstream` (each dependency's output by
    task id), also available as `parameters`, `session_input` and `upstream`.
    """

    def __init__(self, agent: Agent, task: dispatch_pb2.Task) -> None:
        self.task: dispatch_pb2.Task = task
        self.agent_id: str = agent.agent_id
        self.task_id: str = task.task_id
        self.attempt: int = task.attempt
        self.capability: str = task.capability
        self.name: str = task.name
        self.session_id: str = task.session_id
        self.workflow_task_id: str = task.workflow_task_id
        self.input: dict[str, Any] = to_dict(task.input)
        #: When the lease ends unless extended (updated by each heartbeat).
        self.lease_expire_time: datetime | None = to_datetime(task, "lease_expire_time")
        self.heartbeat_timeout: timedelta | None = to_timedelta(task, "heartbeat_timeout")
        #: W3C trace context of this attempt's span (`traceparent`), from the
        #: assignment; empty when the server does not trace.
        self.trace_context: dict[str, str] = {}
        self._loop = asyncio.get_running_loop()
        self._progress: dict[str, Any] | None = None
        self._progress_lock = threading.Lock()
        # Wakes the heartbeat loop: progress to send, or the handler is done.
        self._wake = asyncio.Event()
        self._handler_done = False
        self._cancel_reason = ""
        self._cancel_kind = ""
        self._work: asyncio.Future[Any] | None = None

    @property
    def parameters(self) -> dict[str, Any]:
        """`input["parameters"]` of a workflow task ({} for a standalone task)."""
        return self._workflow_part("parameters")

    @property
    def session_input(self) -> dict[str, Any]:
        """`input["input"]`: the session's input, for a workflow task."""
        return self._workflow_part("input")

    @property
    def upstream(self) -> dict[str, Any]:
        """`input["upstream"]`: each dependency's output by workflow task id."""
        return self._workflow_part("upstream")

    def _workflow_part(self, key: str) -> dict[str, Any]:
        value = self.input.get(key) if self.session_id else None
        return value if isinstance(value, dict) else {}

    @property
    def cancelled(self) -> bool:
        """True once the task was cancelled, its lease lost, or the agent is
        giving up on it (forced shutdown). Sync handlers should check it."""
        return bool(self._cancel_kind)

    @property
    def cancel_reason(self) -> str:
        """Why the task was cancelled ("" while it is not)."""
        return self._cancel_reason

    def report_progress(self, progress: Mapping[str, Any]) -> None:
        """Record progress (a JSON-like dict); it is sent with a heartbeat at once.

        Callable from async and sync handlers alike (from any thread); it never
        blocks. Only the latest report is kept if several come before the
        heartbeat goes out.
        """
        snapshot = dict(progress)
        to_struct(snapshot, "progress")  # fail here, in the handler, if it is not JSON-like
        with self._progress_lock:
            self._progress = snapshot
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._wake.set()
        else:
            self._loop.call_soon_threadsafe(self._wake.set)

    def _take_progress(self) -> dict[str, Any] | None:
        with self._progress_lock:
            progress, self._progress = self._progress, None
        return progress

    def _stop_heartbeats(self) -> None:
        self._handler_done = True
        self._wake.set()

    def _restore_progress(self, progress: dict[str, Any] | None) -> None:
        with self._progress_lock:
            if self._progress is None:
                self._progress = progress

    def _cancel(self, reason: str, kind: str) -> None:
        """kind: "server" (cancelled or lease lost: send nothing) or "shutdown"
        (fail as retryable so it runs elsewhere)."""
        if self._cancel_kind:
            return
        self._cancel_reason, self._cancel_kind = reason, kind
        if self._work is not None and not self._work.done():
            self._work.cancel()
