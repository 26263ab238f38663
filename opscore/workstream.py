"""The work stream (DispatchService.Connect) without gRPC: what an agent's items
mean, and the answers they get.

Every item is handled by the same engine call as its unary RPC (CompleteTask,
FailTask, HeartbeatTask, ReportState), so every rule holds on both shapes; the
only difference is that a work stream handles all items of a message and lets
one commit cover them. Answers (Acks) are queued on the stream's subscription
behind the commit of the batch holding their effect, in the order the items
came, so an accepted result is durable before the agent hears of it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from opscore.dispatch import DispatchEngine
from opscore.errors import InvalidArgument, OpsCoreError
from opscore.models import TaskError
from opscore.payload import Payload
from opscore.storage.api import Tx
from opscore.subscription import Ack, Subscription

log = logging.getLogger("opscore.workstream")


@dataclass(slots=True, frozen=True)
class Completion:
    id: int
    task_id: str
    attempt: int
    output: Payload


@dataclass(slots=True, frozen=True)
class Failure:
    id: int
    task_id: str
    attempt: int
    error: TaskError
    non_retryable: bool


@dataclass(slots=True, frozen=True)
class Heartbeat:
    id: int
    task_id: str
    attempt: int
    progress: Payload


@dataclass(slots=True, frozen=True)
class StateReport:
    id: int
    state: int
    details: Payload
    observe_time: datetime | None


@dataclass(slots=True, frozen=True)
class Capacity:
    id: int
    max_in_flight: int


@dataclass(slots=True, frozen=True)
class Refused:
    """An item the edge could not even read (bad field values): answered with
    its error, in its place in the order."""

    id: int
    error: OpsCoreError


Item = Completion | Failure | Heartbeat | StateReport | Capacity | Refused


class WorkStream:
    """One agent's open work stream: its subscription, and its items' handling."""

    def __init__(self, engine: DispatchEngine, sub: Subscription) -> None:
        self.engine = engine
        self.sub = sub
        self.agent_id = sub.agent.agent_id
        self.received = 0  # items handled, for the stream's log line

    async def handle(self, items: list[Item]) -> None:
        """Apply `items` in order, in one operation; queue one Ack for each, behind
        the commit of that operation."""
        self.received += len(items)
        ids = [i.task_id for i in items if isinstance(i, Completion | Failure | Heartbeat)]
        # The slots these results free are filled once, at the end of the
        # transaction (DispatchEngine._fill), not once per result.
        await self.engine.storage.run(lambda tx: self._apply_each(tx, items), wait=False, tasks=ids)

    async def _apply_each(self, tx: Tx, items: list[Item]) -> None:
        for item in items:
            try:
                ack = await self._apply(tx, item)
            except OpsCoreError as exc:
                ack = Ack(item.id, exc)
            except Exception as exc:  # a bug; atomic sections already rebuild state
                log.exception("work stream item failed", extra={"agent_id": self.agent_id})
                ack = Ack(item.id, _internal(exc))
            self.sub.push((tx.committed, ack))

    async def _apply(self, tx: Tx, item: Item) -> Ack:
        engine, agent = self.engine, self.agent_id
        match item:
            case Completion():
                task = await engine.complete_in(tx, item.task_id, agent, item.attempt, item.output)
                return Ack(item.id, task_state=task.state)
            case Failure():
                task = await engine.fail_in(
                    tx, item.task_id, agent, item.attempt, item.error, item.non_retryable
                )
                return Ack(item.id, task_state=task.state)
            case Heartbeat():
                lease, cancelled = await engine.heartbeat_in(
                    tx, item.task_id, agent, item.attempt, item.progress
                )
                return Ack(item.id, lease_expire_time=lease, cancel_requested=cancelled)
            case StateReport():
                await engine.lifecycle.report_state_in(
                    tx, agent, item.state, item.details, item.observe_time
                )
                return Ack(item.id)
            case Capacity():
                await engine.set_capacity_in(tx, self.sub, item.max_in_flight)
                return Ack(item.id)
            case Refused():
                raise item.error
        raise InvalidArgument("empty message: set one of its kinds", field="message")


def _internal(exc: Exception) -> OpsCoreError:
    err = OpsCoreError("internal error; the server log has the details", reason="INTERNAL")
    err.__cause__ = exc
    return err
