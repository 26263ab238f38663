"""One open task stream as the dispatch engine sees it: its room (in flight
against max_in_flight) and its outbox of messages, each sent only once the
commit it follows has ended.

The outbox is bounded by the client's reading: above _OUTBOX_HIGH_WATER items
`drained` clears, and a work stream stops reading its agent's messages until
at most _OUTBOX_LOW_WATER are left.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime

from opscore.errors import OpsCoreError
from opscore.models import Agent, Task, TaskState


@dataclass(slots=True, frozen=True)
class Assignment:
    task: Task


@dataclass(slots=True, frozen=True)
class Cancellation:
    task_id: str
    attempt: int
    reason: str


@dataclass(slots=True, frozen=True)
class StreamEnd:
    """The engine ended the subscription; `error` None means a clean end (OK)."""

    error: Exception | None


@dataclass(slots=True, frozen=True)
class Ack:
    """The answer to one item an agent sent on its work stream (opscore.workstream)."""

    id: int
    error: OpsCoreError | None = None
    task_state: TaskState = TaskState.UNSPECIFIED
    lease_expire_time: datetime | None = None
    cancel_requested: bool = False


StreamMessage = Assignment | Cancellation | StreamEnd | Ack
StreamItem = tuple["asyncio.Future[None] | None", StreamMessage]

_sub_ids = itertools.count(1)


@dataclass(eq=False, slots=True)
class Subscription:
    agent: Agent
    capabilities: frozenset[str]
    requested: frozenset[str]
    max_in_flight: int
    sub_id: int = field(default_factory=lambda: next(_sub_ids))
    in_flight: set[str] = field(default_factory=set)
    outbox: deque[StreamItem] = field(default_factory=deque)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False

    @property
    def has_room(self) -> bool:
        return len(self.in_flight) < self.max_in_flight

    # Set whenever the outbox is short: a work stream stops reading its client
    # while the client is not reading what it is sent.
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    # The last commit whose completion wakes this stream (take()).
    watched: asyncio.Future[None] | None = None

    def push(self, item: StreamItem) -> None:
        self.outbox.append(item)
        commit = item[0]
        if commit is None or commit.done():
            self.wakeup.set()
        elif commit is not self.watched:
            # The stream wakes when the commit ends, not now: nothing can be
            # sent before. Items of one transaction share one callback.
            self.watched = commit
            commit.add_done_callback(self._committed)
        if len(self.outbox) > _OUTBOX_HIGH_WATER:
            self.drained.clear()

    def _committed(self, _commit: asyncio.Future[None]) -> None:
        self.wakeup.set()

    async def next(self) -> StreamItem:
        while not self.outbox:
            self.wakeup.clear()
            await self.wakeup.wait()
        item = self.outbox.popleft()
        if len(self.outbox) <= _OUTBOX_LOW_WATER:
            self.drained.set()
        return item

    async def take(self) -> list[StreamItem]:
        """The items at the head of the queue whose commit has ended, in order,
        waiting for at least one (never for more). The caller reads each
        commit's outcome with `result()` and never has to await it: a stream
        wakes once per commit instead of at the push and again at the commit
        (behind a shield, so that its cancellation cannot cancel a commit other
        calls wait on), which cost a loop turn and two futures per message."""
        outbox = self.outbox
        while not outbox or not _settled(outbox[0][0]):
            self.wakeup.clear()
            await self.wakeup.wait()
        items = []
        while outbox and _settled(outbox[0][0]):
            items.append(outbox.popleft())
        if len(outbox) <= _OUTBOX_LOW_WATER:
            self.drained.set()
        return items


def _settled(commit: asyncio.Future[None] | None) -> bool:
    return commit is None or commit.done()


_OUTBOX_HIGH_WATER = 2000
_OUTBOX_LOW_WATER = 500
