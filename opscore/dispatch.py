"""The dispatch engine: queues, subscriptions, leases, retries, timers.

Open tasks (SCHEDULED, QUEUED, ASSIGNED) live in memory and are rebuilt from
storage at start; finished tasks are read from storage on demand, so the number
of finished tasks costs nothing per dispatched task.

Matching is event-driven. A task becoming ready goes straight to a subscription
that can take it, or into the ready heap of its capability (or of its pinned
agent). A subscription gaining room pulls the best ready task across the heaps it
can serve. Timers (schedule time, backoff, lease expiry) are asyncio deadline
handles, one per task, re-armed lazily when a lease is extended.

Every change is recorded in storage as it happens; RPC replies wait for the
commit, and so do assignments and cancellations sent on streams, so an agent
never receives a lease that a crash could forget.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import itertools
import logging
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from opscore import limits
from opscore import validation as v
from opscore.clock import utcnow
from opscore.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OpsCoreError,
    ResourceExhausted,
    Unavailable,
)
from opscore.lifecycle import LifecycleEngine
from opscore.models import (
    DEFAULT_TASK_TIMEOUT,
    DISPATCHABLE_STATES,
    Agent,
    AgentEventType,
    AttemptOutcome,
    Page,
    RetryPolicy,
    Task,
    TaskAttempt,
    TaskError,
    TaskFilter,
    TaskState,
)
from opscore.observability.observer import NO_OBSERVER, EngineObserver
from opscore.observability.tracecontext import attempt_traceparent
from opscore.payload import Payload
from opscore.storage import Store

log = logging.getLogger("opscore.dispatch")

MAX_IN_FLIGHT = limits.MAX_IN_FLIGHT
MAX_BATCH = limits.MAX_ENQUEUE_BATCH


# --------------------------------------------------------------------------- specs


@dataclass(slots=True, frozen=True)
class RetryPolicySpec:
    """A retry policy as requested: zero/None fields take the defaults."""

    max_attempts: int = 0
    initial_backoff: timedelta | None = None
    backoff_multiplier: float = 0.0
    max_backoff: timedelta | None = None

    def resolve(self, field: str = "retry_policy") -> RetryPolicy:
        d = RetryPolicy()
        if not 0 <= self.max_attempts <= limits.MAX_ATTEMPTS:
            raise InvalidArgument(
                f"{field}.max_attempts must be between 1 and {limits.MAX_ATTEMPTS} "
                "(0 for the default 3)",
                field=f"{field}.max_attempts",
            )
        v.duration(self.initial_backoff, f"{field}.initial_backoff", limits.MAX_BACKOFF)
        v.duration(self.max_backoff, f"{field}.max_backoff", limits.MAX_BACKOFF)
        m = self.backoff_multiplier
        if m != 0.0 and not 1.0 <= m <= limits.MAX_BACKOFF_MULTIPLIER:  # NaN fails both
            raise InvalidArgument(
                f"{field}.backoff_multiplier must be between 1.0 and "
                f"{limits.MAX_BACKOFF_MULTIPLIER:g} (0 for the default 2.0), got {m!r}",
                field=f"{field}.backoff_multiplier",
            )
        initial = d.initial_backoff if self.initial_backoff is None else self.initial_backoff
        maximum = d.max_backoff if self.max_backoff is None else self.max_backoff
        if self.max_backoff is not None and maximum < initial:
            raise InvalidArgument(
                f"{field}.max_backoff must not be smaller than initial_backoff",
                field=f"{field}.max_backoff",
            )
        return RetryPolicy(
            max_attempts=self.max_attempts or d.max_attempts,
            initial_backoff=initial,
            backoff_multiplier=self.backoff_multiplier or d.backoff_multiplier,
            max_backoff=max(maximum, initial),
        )


@dataclass(slots=True, frozen=True)
class TaskSpec:
    """What a caller asks to enqueue, before validation and defaults."""

    name: str = ""
    capability: str = ""
    agent_id: str = ""
    input: Payload = None
    priority: int = 0
    schedule_time: datetime | None = None
    delay: timedelta | None = None
    retry_policy: RetryPolicySpec = RetryPolicySpec()
    timeout: timedelta | None = None
    heartbeat_timeout: timedelta | None = None
    idempotency_key: str = ""
    session_id: str = ""
    workflow_task_id: str = ""
    # The traceparent the task's spans go under ("": the enqueuing call's).
    trace_parent: str = ""


# --------------------------------------------------------------------------- streams


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

    def push(self, item: StreamItem) -> None:
        self.outbox.append(item)
        self.wakeup.set()
        if len(self.outbox) > _OUTBOX_HIGH_WATER:
            self.drained.clear()

    async def next(self) -> StreamItem:
        while not self.outbox:
            self.wakeup.clear()
            await self.wakeup.wait()
        item = self.outbox.popleft()
        if len(self.outbox) <= _OUTBOX_LOW_WATER:
            self.drained.set()
        return item

    async def take(self) -> list[StreamItem]:
        """Everything queued now, waiting for at least one item (never for more)."""
        while not self.outbox:
            self.wakeup.clear()
            await self.wakeup.wait()
        items = list(self.outbox)
        self.outbox.clear()
        self.drained.set()
        return items


_OUTBOX_HIGH_WATER = 2000
_OUTBOX_LOW_WATER = 500


# Task events for listeners (the workflow engine), called synchronously so their
# reactions land in the same commit.
TaskListener = Callable[[str, Task], None]


class DispatchEngine:
    def __init__(
        self,
        store: Store,
        lifecycle: LifecycleEngine,
        *,
        max_subscriptions_per_agent: int = limits.DEFAULT_MAX_SUBSCRIPTIONS_PER_AGENT,
        response_budget: int = limits.DEFAULT_MAX_MESSAGE_BYTES - 64 * 1024,
        observer: EngineObserver = NO_OBSERVER,
    ) -> None:
        self.store = store
        self.lifecycle = lifecycle
        self.max_subscriptions_per_agent = max_subscriptions_per_agent
        self.response_budget = response_budget
        self.observer = observer
        self.listeners: list[TaskListener] = []
        self.draining = False
        self._clear()
        lifecycle.listeners.append(self._on_agent_event)

    def _clear(self) -> None:
        self.tasks: dict[str, Task] = {}
        self._ready: dict[str, list[tuple[int, int, str]]] = {}
        self._ready_pinned: dict[str, list[tuple[int, int, str]]] = {}
        self._ready_seq = 0
        self._subs_by_agent: dict[str, set[Subscription]] = {}
        self._available: dict[str, dict[Subscription, None]] = {}
        self._available_by_agent: dict[str, dict[Subscription, None]] = {}
        self._holder: dict[str, Subscription] = {}
        self._assigned_by_agent: dict[str, set[str]] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._keys: dict[str, str] = {}
        self._key_lookups = 0
        self._deferred_key_drops: list[str] = []

    # ------------------------------------------------------------------ start / stop

    async def start(self) -> None:
        self._ready_seq = await self.store.max_ready_seq()
        for task in await self.store.load_open_tasks():
            self.tasks[task.task_id] = task
            if task.idempotency_key:
                self._keys[task.idempotency_key] = task.task_id
            if task.state == TaskState.QUEUED:
                self._push_ready(task)
            elif task.state == TaskState.SCHEDULED:
                self._arm(task, task.schedule_time)
            elif task.state == TaskState.ASSIGNED:
                # Held by an agent that has yet to reconnect: it keeps the lease
                # until the deadline or until it goes OFFLINE.
                self._assigned_by_agent.setdefault(task.assigned_agent_id, set()).add(task.task_id)
                self._arm(task, task.lease_expire_time)
        log.info("dispatch state loaded", extra={"open_tasks": len(self.tasks)})

    def close_streams(self) -> None:
        """Drain: end every subscription with UNAVAILABLE so clients reconnect."""
        self.draining = True
        for subs in list(self._subs_by_agent.values()):
            for sub in list(subs):
                self._end_stream(sub, Unavailable("server is shutting down; reconnect"))

    def stop(self) -> None:
        for h in self._timers.values():
            h.cancel()
        self._timers.clear()

    def reset(self, error: OpsCoreError) -> None:
        """Forget all in-memory state (it may be ahead of the database): end every
        stream with `error`, cancel every timer. `start()` then reloads."""
        for subs in list(self._subs_by_agent.values()):
            for sub in list(subs):
                sub.closed = True
                self._end_stream(sub, error)
        self.stop()
        self._clear()

    # ------------------------------------------------------------------ enqueue

    def _validate(self, spec: TaskSpec, prefix: str = "") -> tuple[RetryPolicy, datetime | None]:
        if bool(spec.capability) == bool(spec.agent_id):
            raise InvalidArgument(
                f"set exactly one of {prefix}capability and {prefix}agent_id "
                "(route by capability, or pin to an agent)",
                field=f"{prefix}capability",
            )
        if spec.capability:
            v.capability(spec.capability, f"{prefix}capability")
        else:
            v.require_id(spec.agent_id, f"{prefix}agent_id")
            agent = self.lifecycle.agents.get(spec.agent_id)
            if agent is None or agent.deregistered:
                raise NotFound(
                    f"{prefix}agent_id {spec.agent_id!r} is not a registered agent",
                    reason="AGENT_NOT_FOUND",
                )
        v.max_len(spec.name, f"{prefix}name", limits.MAX_NAME_CHARS)
        v.max_len(
            spec.idempotency_key, f"{prefix}idempotency_key", limits.MAX_IDEMPOTENCY_KEY_CHARS
        )
        v.payload_size(spec.input, f"{prefix}input")
        if not -(2**31) <= spec.priority < 2**31:
            raise InvalidArgument(
                f"{prefix}priority must fit in 32 bits", field=f"{prefix}priority"
            )
        if spec.schedule_time is not None and spec.delay is not None:
            raise InvalidArgument(
                f"set at most one of {prefix}schedule_time and {prefix}delay",
                field=f"{prefix}delay",
            )
        v.duration(spec.delay, f"{prefix}delay", limits.MAX_DELAY)
        v.duration(spec.timeout, f"{prefix}timeout", limits.MAX_TASK_TIMEOUT, positive=True)
        v.duration(
            spec.heartbeat_timeout,
            f"{prefix}heartbeat_timeout",
            limits.MAX_TASK_TIMEOUT,
            positive=True,
        )
        policy = spec.retry_policy.resolve(f"{prefix}retry_policy")
        now = utcnow()
        when = spec.schedule_time
        if when is not None and when > now + limits.MAX_DELAY:
            raise InvalidArgument(
                f"{prefix}schedule_time is more than {limits.MAX_DELAY.days} days ahead",
                field=f"{prefix}schedule_time",
            )
        if spec.delay is not None:
            when = now + spec.delay
        return policy, when

    async def enqueue(self, spec: TaskSpec) -> tuple[Task, bool]:
        results = await self.enqueue_many([spec])
        return results[0]

    async def enqueue_many(self, specs: list[TaskSpec]) -> list[tuple[Task, bool]]:
        if not specs:
            raise InvalidArgument("tasks must not be empty", field="tasks")
        if len(specs) > MAX_BATCH:
            raise InvalidArgument(
                f"at most {MAX_BATCH} tasks per call, got {len(specs)}", field="tasks"
            )
        self._check_accepting()
        single = len(specs) == 1
        checked = [self._validate(s, "" if single else f"tasks[{i}].") for i, s in enumerate(specs)]
        existing = await self._existing_by_key([s.idempotency_key for s in specs])
        self._check_accepting()  # again: the lookup above awaited
        results: list[tuple[Task, bool]] = []
        batch_keys: dict[str, Task] = {}
        with self.store.atomic():
            for spec, (policy, when) in zip(specs, checked, strict=True):
                key = spec.idempotency_key
                if key:
                    prior = batch_keys.get(key) or self._task_for_key(key) or existing.get(key)
                    if prior is not None:
                        results.append((prior, False))
                        continue
                task = self.create_task(spec, policy, when)
                if key:
                    batch_keys[key] = task
                results.append((task, True))
            snaps = [(self.snapshot(t), created) for t, created in results]
        await self.store.commit()
        return snaps

    async def _existing_by_key(self, keys: Iterable[str]) -> dict[str, Task]:
        found: dict[str, Task] = {}
        wanted = [k for k in set(keys) if k and k not in self._keys]
        if not wanted:
            return found
        # While a lookup awaits storage, keys of tasks finishing meanwhile stay in
        # memory: otherwise the lookup could miss both and create a duplicate.
        self._key_lookups += 1
        try:
            for key in wanted:
                task = await self.store.get_task_by_idempotency_key(key)
                if task is not None:
                    found[key] = task
        finally:
            self._key_lookups -= 1
            if not self._key_lookups:
                for key in self._deferred_key_drops:
                    task_id = self._keys.get(key)
                    if task_id is not None and task_id not in self.tasks:
                        del self._keys[key]
                self._deferred_key_drops.clear()
        return found

    def _forget(self, task: Task) -> None:
        del self.tasks[task.task_id]
        if task.idempotency_key:
            if self._key_lookups:
                self._deferred_key_drops.append(task.idempotency_key)
            else:
                self._keys.pop(task.idempotency_key, None)

    def _task_for_key(self, key: str) -> Task | None:
        task_id = self._keys.get(key)
        return self.tasks.get(task_id) if task_id else None

    def create_task(self, spec: TaskSpec, policy: RetryPolicy, when: datetime | None) -> Task:
        """Create a validated task in memory and record it. Caller commits."""
        now = utcnow()
        task = Task(
            task_id=str(uuid.uuid4()),
            name=spec.name,
            capability=spec.capability,
            agent_id=spec.agent_id,
            input=spec.input,
            priority=spec.priority,
            retry_policy=policy,
            timeout=spec.timeout or DEFAULT_TASK_TIMEOUT,
            heartbeat_timeout=spec.heartbeat_timeout,
            idempotency_key=spec.idempotency_key,
            state=TaskState.SCHEDULED,
            create_time=now,
            update_time=now,
            session_id=spec.session_id,
            workflow_task_id=spec.workflow_task_id,
        )
        task.trace_context = self.observer.task_enqueued(task, spec.trace_parent)
        self.tasks[task.task_id] = task
        if task.idempotency_key:
            self._keys[task.idempotency_key] = task.task_id
        if when is not None and when > now:
            task.schedule_time = when
            self.store.put_task(task)
            self._arm(task, when)
        else:
            self._make_ready(task)
        return task

    def create_failed_task(self, spec: TaskSpec, policy: RetryPolicy, error: TaskError) -> Task:
        """Record a task that can never be sent to an agent (its input cannot be
        delivered) as FAILED at once, never looping. Caller commits and reacts."""
        now = utcnow()
        task = Task(
            task_id=str(uuid.uuid4()),
            name=spec.name,
            capability=spec.capability,
            agent_id=spec.agent_id,
            input=None,
            priority=spec.priority,
            retry_policy=policy,
            timeout=spec.timeout or DEFAULT_TASK_TIMEOUT,
            heartbeat_timeout=spec.heartbeat_timeout,
            idempotency_key="",
            state=TaskState.FAILED,
            create_time=now,
            update_time=now,
            finish_time=now,
            last_error=error,
            session_id=spec.session_id,
            workflow_task_id=spec.workflow_task_id,
        )
        task.trace_context = self.observer.task_enqueued(task, spec.trace_parent)
        self.store.put_task(task)
        self.observer.task_finished(task)
        return task

    # ------------------------------------------------------------------ subscribe

    async def subscribe(
        self, agent_id: str, capabilities: list[str], max_in_flight: int
    ) -> Subscription:
        self._check_accepting()
        agent = self.lifecycle.get(agent_id)
        if agent.deregistered:
            raise FailedPrecondition(
                f"agent {agent_id!r} is deregistered; register it again first",
                reason="AGENT_DEREGISTERED",
            )
        if max_in_flight < 0 or max_in_flight > MAX_IN_FLIGHT:
            raise InvalidArgument(
                f"max_in_flight must be between 1 and {MAX_IN_FLIGHT} (0 for 1)",
                field="max_in_flight",
            )
        requested = frozenset(v.capabilities(capabilities, "capabilities"))
        unknown = sorted(requested - set(agent.capabilities))
        if unknown:
            raise InvalidArgument(
                f"capabilities {unknown} were not registered by agent {agent_id!r}; "
                "register them first or leave capabilities empty",
                field="capabilities",
            )
        if len(self._subs_by_agent.get(agent_id, ())) >= self.max_subscriptions_per_agent:
            raise ResourceExhausted(
                f"agent {agent_id!r} already holds {self.max_subscriptions_per_agent} open "
                "task streams, the most one agent may (--max-subscriptions-per-agent); "
                "close one first, or raise max_in_flight on one stream instead",
                reason="TOO_MANY_SUBSCRIPTIONS",
            )
        with self.store.atomic():
            sub = self._open_subscription(agent, requested, max_in_flight)
        await self.store.commit()
        return sub

    def _open_subscription(
        self, agent: Agent, requested: frozenset[str], max_in_flight: int
    ) -> Subscription:
        agent_id = agent.agent_id
        sub = Subscription(
            agent=agent,
            capabilities=requested or frozenset(agent.capabilities),
            requested=requested,
            max_in_flight=max_in_flight or 1,
        )
        sub.drained.set()
        self._subs_by_agent.setdefault(agent_id, set()).add(sub)
        # Leases the agent kept across a reconnect count against the new stream and
        # are sent again, same attempt: a restarted agent process picks them up at
        # once instead of leaving them to their lease deadline; one that is still
        # working on (task_id, attempt) ignores the repeat.
        for task_id in sorted(self._assigned_by_agent.get(agent_id, ())):
            if task_id not in self._holder:
                self._holder[task_id] = sub
                sub.in_flight.add(task_id)
                sub.push((self.store.batch(), Assignment(self.snapshot(self.tasks[task_id]))))
        self.lifecycle.subscription_opened(agent)
        self._refresh(sub)
        self._fill(sub)
        return sub

    def unsubscribe(self, sub: Subscription, undelivered: list[StreamItem]) -> None:
        """The stream ended. Assignments that never left the process go back to the
        queue with their attempt number reused (no one can hold it)."""
        if sub.closed and sub not in self._subs_by_agent.get(sub.agent.agent_id, ()):
            return  # ended by the engine (deregistered, drained, or state rebuilt)
        with self.store.atomic():
            self._close_subscription(sub, undelivered)
        self.store.batch()

    def _close_subscription(self, sub: Subscription, undelivered: list[StreamItem]) -> None:
        sub.closed = True
        self._subs_by_agent.get(sub.agent.agent_id, set()).discard(sub)
        self._refresh(sub)
        for _fut, item in [*undelivered, *sub.outbox]:
            if isinstance(item, Assignment):
                task = self.tasks.get(item.task.task_id)
                if (
                    task is not None
                    and task.state == TaskState.ASSIGNED
                    and task.attempt == item.task.attempt
                ):
                    self._release(task)
                    task.attempt -= 1
                    task.lease_expire_time = task.attempt_deadline = None
                    self._make_ready(task, keep_seq=True)
        sub.outbox.clear()
        for task_id in sub.in_flight:
            if self._holder.get(task_id) is sub:
                del self._holder[task_id]
        sub.in_flight.clear()
        if not self.draining:
            self.lifecycle.subscription_closed(sub.agent)

    def set_capacity(self, sub: Subscription, max_in_flight: int) -> None:
        """How many tasks `sub` may hold from now on; 0 pauses it."""
        if not 0 <= max_in_flight <= MAX_IN_FLIGHT:
            raise InvalidArgument(
                f"max_in_flight must be between 0 and {MAX_IN_FLIGHT}",
                field="capacity.max_in_flight",
            )
        self._check_recovering()
        with self.store.atomic():
            sub.max_in_flight = max_in_flight
            self._refresh(sub)
            self._fill(sub)

    def _end_stream(self, sub: Subscription, error: Exception | None) -> None:
        sub.push((None, StreamEnd(error)))

    # ------------------------------------------------------------------ results

    def _fenced(self, task_id: str, agent_id: str, attempt: int) -> Task:
        """The task if (agent_id, attempt) holds its current lease. Changes nothing."""
        v.require_id(task_id, "task_id", what="task id")
        v.require_id(agent_id, "agent_id")
        if attempt <= 0:
            raise InvalidArgument(
                "attempt must be the attempt number of the assignment (>= 1)", field="attempt"
            )
        self._check_recovering()
        task = self.tasks.get(task_id)
        if task is None or task.is_final:
            raise _NeedStored()
        if task.state != TaskState.ASSIGNED:
            raise FailedPrecondition(
                f"task {task_id} is {task.state.name}, not assigned; its attempt "
                f"{attempt} ended and the result is ignored",
                reason="LEASE_LOST",
            )
        if task.assigned_agent_id != agent_id or task.attempt != attempt:
            raise FailedPrecondition(
                f"task {task_id} is leased to agent {task.assigned_agent_id!r} attempt "
                f"{task.attempt}, not {agent_id!r} attempt {attempt}; the result is ignored",
                reason="LEASE_LOST",
            )
        return task

    def _touch(self, agent_id: str) -> None:
        agent = self.lifecycle.agents.get(agent_id)
        if agent is not None:
            self.lifecycle.touch(agent)

    async def _stored_final(self, task_id: str) -> Task:
        task = self.tasks.get(task_id) or await self.store.get_task(task_id)
        if task is None:
            raise NotFound(f"task {task_id} does not exist", reason="TASK_NOT_FOUND")
        return task

    # The result calls below serve both shapes of the contract: a unary RPC awaits
    # the commit (`wait`); the work stream passes wait=False for every item of a
    # message and answers them all after one commit (acknowledgements are queued
    # behind the same batch future).

    async def complete(
        self, task_id: str, agent_id: str, attempt: int, output: Payload, *, wait: bool = True
    ) -> Task:
        v.payload_size(output, "output")
        try:
            task = self._fenced(task_id, agent_id, attempt)
        except _NeedStored:
            task = await self._stored_final(task_id)
            if (
                task.state == TaskState.COMPLETED
                and task.assigned_agent_id == agent_id
                and task.attempt == attempt
                and (task.output or b"") == (output or b"")
            ):
                return self.snapshot(task)
            raise self._final_error(task, agent_id, attempt) from None
        with self.store.atomic():
            self._touch(agent_id)
            task.output = output
            now = utcnow()
            self._attempt_over(task, AttemptOutcome.COMPLETED, None, now)
            self._finish(task, TaskState.COMPLETED, now)
            self._emit("completed", task)
            snap = self.snapshot(task)
        await self._commit_final(task, wait)
        return snap

    async def fail(
        self,
        task_id: str,
        agent_id: str,
        attempt: int,
        error: TaskError,
        non_retryable: bool,
        *,
        wait: bool = True,
    ) -> Task:
        if not error.message:
            raise InvalidArgument("error.message is required", field="error.message")
        v.payload_size(error.details, "error.details", v.MAX_DETAILS)
        error = dataclasses.replace(
            error,
            message=error.message[: limits.MAX_ERROR_MESSAGE_CHARS],
            type=error.type[: limits.MAX_NAME_CHARS],
        )
        held = self.tasks.get(task_id)
        if (
            held is not None
            and held.state == TaskState.SCHEDULED
            and held.assigned_agent_id == agent_id
            and held.attempt == attempt
            and held.last_error == error
        ):
            return self.snapshot(held)  # a repeat of the failure that scheduled the retry
        try:
            task = self._fenced(task_id, agent_id, attempt)
        except _NeedStored:
            task = await self._stored_final(task_id)
            if (
                task.state == TaskState.FAILED
                and task.assigned_agent_id == agent_id
                and task.attempt == attempt
                and task.last_error == error
            ):
                return self.snapshot(task)
            raise self._final_error(task, agent_id, attempt) from None
        with self.store.atomic():
            self._touch(agent_id)
            self._end_attempt(task, error, retryable=not non_retryable)
            snap = self.snapshot(task)
        await self._commit_final(task, wait)
        return snap

    async def heartbeat(
        self, task_id: str, agent_id: str, attempt: int, progress: Payload, *, wait: bool = True
    ) -> tuple[datetime | None, bool]:
        v.payload_size(progress, "progress", v.MAX_DETAILS)
        try:
            task = self._fenced(task_id, agent_id, attempt)
        except _NeedStored:
            task = await self._stored_final(task_id)
            if (
                task.state == TaskState.CANCELLED
                and task.assigned_agent_id == agent_id
                and task.attempt == attempt
            ):
                return None, True
            raise self._final_error(task, agent_id, attempt) from None
        with self.store.atomic():
            self._touch(agent_id)
            now = utcnow()
            if progress is not None:
                task.progress = progress
            if task.heartbeat_timeout is not None and task.attempt_deadline is not None:
                task.lease_expire_time = min(task.attempt_deadline, now + task.heartbeat_timeout)
            task.update_time = now
            self.store.put_task(task)
            lease = task.lease_expire_time
        if wait:
            await self.store.commit()
        return lease, task.cancel_requested

    def _final_error(self, task: Task, agent_id: str, attempt: int) -> Exception:
        if task.state == TaskState.CANCELLED:
            return FailedPrecondition(
                f"task {task.task_id} was cancelled; the result is ignored",
                reason="TASK_CANCELLED",
            )
        if task.is_final:
            return FailedPrecondition(
                f"task {task.task_id} already finished as {task.state.name} (attempt "
                f"{task.attempt} by {task.assigned_agent_id!r}); this result for attempt "
                f"{attempt} by {agent_id!r} is ignored",
                reason="TASK_FINISHED",
            )
        return FailedPrecondition(f"task {task.task_id} is not leased", reason="LEASE_LOST")

    async def cancel(self, task_id: str, reason: str = "") -> Task:
        v.require_id(task_id, "task_id", what="task id")
        v.max_len(reason, "reason", limits.MAX_REASON_CHARS)
        task = self.tasks.get(task_id)
        if task is None or task.is_final:
            task = await self._stored_final(task_id)
            if task.state == TaskState.CANCELLED:
                return self.snapshot(task)
            raise FailedPrecondition(
                f"task {task_id} already finished as {task.state.name}; nothing to cancel",
                reason="TASK_FINISHED",
            )
        self._check_recovering()
        with self.store.atomic():
            self.cancel_open(task, reason or "cancelled by request")
            snap = self.snapshot(task)
        await self._commit_final(task)
        return snap

    def cancel_open(self, task: Task, reason: str) -> None:
        """Cancel an open task in memory; the holder is told after commit."""
        holder = self._holder.get(task.task_id)
        task.cancel_requested = True
        if task.state == TaskState.ASSIGNED and holder is not None and not holder.closed:
            # Before _finish frees the slot: the agent must hear of the cancellation
            # before it is sent the task that takes its place.
            holder.push((self.store.batch(), Cancellation(task.task_id, task.attempt, reason)))
        now = utcnow()
        if task.state == TaskState.ASSIGNED:
            self._attempt_over(task, AttemptOutcome.CANCELLED, None, now)
        self._finish(task, TaskState.CANCELLED, now)
        self._emit("cancelled", task)

    # ------------------------------------------------------------------ reads

    async def get(self, task_id: str) -> Task:
        v.require_id(task_id, "task_id", what="task id")
        task = self.tasks.get(task_id)
        if task is not None:
            return self.snapshot(task)
        return await self._stored_final(task_id)

    async def list(self, flt: TaskFilter, page_size: int, page_token: str) -> Page[Task]:
        try:
            TaskState(flt.state)
        except ValueError:
            raise InvalidArgument(
                f"state {flt.state} is not a known TaskState", field="state"
            ) from None
        items, token = await self.store.list_tasks(flt, page_size, page_token, self.response_budget)
        # Open tasks may be ahead of the last commit in memory.
        items = [
            self.snapshot(self.tasks[t.task_id]) if t.task_id in self.tasks else t for t in items
        ]
        return Page(items, token)

    async def list_attempts(
        self, task_id: str, page_size: int, page_token: str
    ) -> Page[TaskAttempt]:
        """A task's attempts, newest first; the running one (no record yet) first."""
        v.require_id(task_id, "task_id", what="task id")
        task = self.tasks.get(task_id) or await self._stored_final(task_id)
        running = None
        if task.state == TaskState.ASSIGNED:
            running = TaskAttempt(
                task_id=task.task_id,
                attempt=task.attempt,
                agent_id=task.assigned_agent_id,
                outcome=AttemptOutcome.RUNNING,
                assign_time=task.assign_time or task.update_time,
                end_time=None,
                progress=task.progress,
            )
        items, token = await self.store.list_attempts(
            task_id, page_size, page_token, self.response_budget, running
        )
        if task.trace_context:
            items = [
                dataclasses.replace(
                    a, trace_context=attempt_traceparent(task.trace_context, a.attempt)
                )
                for a in items
            ]
        return Page(items, token)

    @staticmethod
    def snapshot(task: Task) -> Task:
        return dataclasses.replace(task)

    # ------------------------------------------------------------------ core moves

    def _check_accepting(self) -> None:
        if self.draining:
            raise Unavailable("server is shutting down; retry against the restarted server")
        self._check_recovering()

    def _check_recovering(self) -> None:
        self.store.check_writable()

    def _make_ready(self, task: Task, keep_seq: bool = False) -> None:
        task.state = TaskState.QUEUED
        task.schedule_time = None
        if not keep_seq or not task.ready_seq:
            self._ready_seq += 1
            task.ready_seq = self._ready_seq
        task.update_time = utcnow()
        sub = self._pick_subscription(task)
        if sub is not None:
            self._assign(task, sub)
        else:
            self._push_ready(task)
            self.store.put_task(task)

    def _push_ready(self, task: Task) -> None:
        entry = (-task.priority, task.ready_seq, task.task_id)
        if task.agent_id:
            heapq.heappush(self._ready_pinned.setdefault(task.agent_id, []), entry)
        else:
            heapq.heappush(self._ready.setdefault(task.capability, []), entry)

    def _pick_subscription(self, task: Task) -> Subscription | None:
        pool = (
            self._available_by_agent.get(task.agent_id)
            if task.agent_id
            else self._available.get(task.capability)
        )
        if not pool:
            return None
        return next(iter(pool))

    def _assign(self, task: Task, sub: Subscription) -> None:
        now = utcnow()
        # A QUEUED task's update_time is when it became ready: its wait ends here.
        waited = (now - task.update_time).total_seconds()
        task.state = TaskState.ASSIGNED
        task.attempt += 1
        task.assigned_agent_id = sub.agent.agent_id
        task.attempt_deadline = now + task.timeout
        task.lease_expire_time = (
            min(task.attempt_deadline, now + task.heartbeat_timeout)
            if task.heartbeat_timeout is not None
            else task.attempt_deadline
        )
        task.progress = None
        task.update_time = now
        sub.in_flight.add(task.task_id)
        self._holder[task.task_id] = sub
        self._assigned_by_agent.setdefault(sub.agent.agent_id, set()).add(task.task_id)
        self.observer.task_assigned(task, waited)
        self.store.put_task(task)
        self._arm(task, task.lease_expire_time)
        sub.push((self.store.batch(), Assignment(self.snapshot(task))))
        self._refresh(sub, rotate=True)
        self._emit("assigned", task)

    def _release(self, task: Task) -> None:
        """Detach an assigned task from its holder; the holder may take more."""
        agent_tasks = self._assigned_by_agent.get(task.assigned_agent_id)
        if agent_tasks is not None:
            agent_tasks.discard(task.task_id)
            if not agent_tasks:
                del self._assigned_by_agent[task.assigned_agent_id]
        sub = self._holder.pop(task.task_id, None)
        if sub is not None:
            sub.in_flight.discard(task.task_id)
            if not sub.closed:
                self._refresh(sub)
                self._fill(sub)

    def _finish(self, task: Task, state: TaskState, now: datetime) -> None:
        was_assigned = task.state == TaskState.ASSIGNED
        task.state = state
        task.finish_time = task.update_time = now
        task.lease_expire_time = None
        task.schedule_time = None
        self._disarm(task)
        self.store.put_task(task)
        self.observer.task_finished(task)
        if was_assigned:
            self._release(task)

    def _attempt_over(
        self, task: Task, outcome: AttemptOutcome, error: TaskError | None, now: datetime
    ) -> None:
        """The current attempt of an ASSIGNED task ended: keep its record, in the
        same commit as the change that ended it."""
        record = TaskAttempt(
            task_id=task.task_id,
            attempt=task.attempt,
            agent_id=task.assigned_agent_id,
            outcome=outcome,
            assign_time=task.assign_time or now,
            end_time=now,
            error=error,
            progress=task.progress,
        )
        self.store.put_attempt(record)
        self.observer.attempt_ended(task, record)

    def _end_attempt(
        self,
        task: Task,
        error: TaskError,
        retryable: bool = True,
        outcome: AttemptOutcome = AttemptOutcome.FAILED,
    ) -> None:
        """An attempt ended without success: retry after backoff, or fail for good."""
        task.last_error = error
        now = utcnow()
        self._attempt_over(task, outcome, error, now)
        if retryable and task.attempt < task.retry_policy.max_attempts:
            self._disarm(task)
            task.state = TaskState.SCHEDULED
            task.lease_expire_time = None
            task.update_time = now
            self._release(task)
            when = now + task.retry_policy.backoff(task.attempt)
            self.observer.task_retrying(task)
            self._emit("retrying", task)
            if when <= now:
                self._make_ready(task)
            else:
                task.schedule_time = when
                self.store.put_task(task)
                self._arm(task, when)
        else:
            self._finish(task, TaskState.FAILED, now)
            self._emit("failed", task)

    async def _commit_final(self, task: Task, wait: bool = True) -> None:
        if wait:
            await self.store.commit()
            self.evict_finished([task])
        else:
            self.store.batch().add_done_callback(
                lambda f, t=task: f.cancelled() or f.exception() or self.evict_finished([t])
            )

    def evict_finished(self, tasks: Iterable[Task]) -> None:
        """Forget finished tasks once durable: storage answers for them from then on."""
        for task in tasks:
            if task.is_final and self.tasks.get(task.task_id) is task:
                self._forget(task)

    # ------------------------------------------------------------------ availability

    def _eligible(self, sub: Subscription) -> bool:
        a = sub.agent
        return (
            not sub.closed
            and not a.deregistered
            and a.state in DISPATCHABLE_STATES
            and sub.has_room
            and self.lifecycle.agents.get(a.agent_id) is a
        )

    def _refresh(self, sub: Subscription, rotate: bool = False) -> None:
        """Keep the availability indexes in step with one subscription."""
        eligible = self._eligible(sub)
        pools = [self._available.setdefault(c, {}) for c in sub.capabilities]
        pools.append(self._available_by_agent.setdefault(sub.agent.agent_id, {}))
        for pool in pools:
            if eligible:
                if rotate or sub not in pool:
                    pool.pop(sub, None)
                    pool[sub] = None  # to the back: round robin among subscriptions
            else:
                pool.pop(sub, None)

    def _fill(self, sub: Subscription) -> None:
        """Give `sub` the best ready tasks it can take until it is full."""
        while self._eligible(sub):
            heaps = [self._ready.get(c) for c in sub.capabilities]
            heaps.append(self._ready_pinned.get(sub.agent.agent_id))
            best: list[tuple[int, int, str]] | None = None
            for h in heaps:
                while h:
                    _, seq, task_id = h[0]
                    t = self.tasks.get(task_id)
                    if t is not None and t.state == TaskState.QUEUED and t.ready_seq == seq:
                        break
                    heapq.heappop(h)  # stale entry: cancelled, assigned or re-queued
                if h and (best is None or h[0] < best[0]):
                    best = h
            if best is None:
                return
            _, _, task_id = heapq.heappop(best)
            self._assign(self.tasks[task_id], sub)

    def _on_agent_event(self, event: AgentEventType, agent: Agent) -> None:
        subs = list(self._subs_by_agent.get(agent.agent_id, ()))
        if event in (AgentEventType.OFFLINE, AgentEventType.DEREGISTERED):
            kind = "AgentOffline" if event == AgentEventType.OFFLINE else "AgentDeregistered"
            outcome = (
                AttemptOutcome.AGENT_OFFLINE
                if event == AgentEventType.OFFLINE
                else AttemptOutcome.AGENT_DEREGISTERED
            )
            for sub in subs:
                sub.closed = True
                self._refresh(sub)
                if event == AgentEventType.DEREGISTERED:
                    self._end_stream(sub, None)
            for task_id in list(self._assigned_by_agent.get(agent.agent_id, ())):
                task = self.tasks.get(task_id)
                if task is not None and task.state == TaskState.ASSIGNED:
                    self._end_attempt(
                        task,
                        TaskError(f"agent {agent.agent_id} went {kind[5:].lower()}", kind),
                        outcome=outcome,
                    )
            return
        for sub in subs:
            if event in (AgentEventType.UPDATED, AgentEventType.REGISTERED):
                caps = set(agent.capabilities)
                for c in sub.capabilities - caps:
                    self._available.get(c, {}).pop(sub, None)
                sub.capabilities = frozenset(sub.requested & caps if sub.requested else caps)
            self._refresh(sub)
            self._fill(sub)

    # ------------------------------------------------------------------ timers

    def _arm(self, task: Task, when: datetime | None) -> None:
        self._disarm(task)
        if when is None:
            return
        delay = max(0.0, (when - utcnow()).total_seconds())
        loop = asyncio.get_running_loop()
        self._timers[task.task_id] = loop.call_later(delay, self._due, task.task_id, task.attempt)

    def _disarm(self, task: Task) -> None:
        handle = self._timers.pop(task.task_id, None)
        if handle is not None:
            handle.cancel()

    def _due(self, task_id: str, attempt: int) -> None:
        # A timer has no caller to tell: a failure half-way rebuilds state (atomic)
        # and is logged there; the event loop must not see it.
        with contextlib.suppress(Exception), self.store.atomic():
            self._fire(task_id, attempt)

    def _fire(self, task_id: str, attempt: int) -> None:
        self._timers.pop(task_id, None)
        task = self.tasks.get(task_id)
        if task is None or task.attempt != attempt:
            return
        now = utcnow()
        if task.state == TaskState.SCHEDULED:
            if task.schedule_time is not None and task.schedule_time > now:
                self._arm(task, task.schedule_time)
                return
            self._make_ready(task)
        elif task.state == TaskState.ASSIGNED:
            lease = task.lease_expire_time
            if lease is not None and lease > now:
                self._arm(task, lease)  # extended by a heartbeat since
                return
            log.info(
                "lease expired",
                extra={"task_id": task_id, "agent_id": task.assigned_agent_id, "attempt": attempt},
            )
            self._end_attempt(
                task,
                TaskError(f"lease of attempt {attempt} expired without a result", "LeaseExpired"),
                outcome=AttemptOutcome.LEASE_EXPIRED,
            )
        else:
            return
        fut = self.store.batch()
        fut.add_done_callback(lambda f, t=task: f.exception() or self.evict_finished([t]))

    # ------------------------------------------------------------------ listeners

    def _emit(self, event: str, task: Task) -> None:
        if task.session_id:
            for listener in self.listeners:
                listener(event, task)

    # ------------------------------------------------------------------ introspection
    # Read-only accessors for observability (metrics scrapes, the no-agent watch).

    def ready_queues(self) -> dict[tuple[str, str], tuple[int, datetime]]:
        """Ready tasks by (capability, pinned agent id or ""): how many, and when
        the oldest became ready. One step per heap entry: for scrapes, not per task."""
        out: dict[tuple[str, str], tuple[int, datetime]] = {}
        for pinned, heaps in ((False, self._ready), (True, self._ready_pinned)):
            for key, heap in heaps.items():
                for _, seq, task_id in heap:
                    t = self.tasks.get(task_id)
                    if t is None or t.state != TaskState.QUEUED or t.ready_seq != seq:
                        continue  # stale entry
                    k = (t.capability, key) if pinned else (key, "")
                    n, oldest = out.get(k, (0, t.update_time))
                    out[k] = (n + 1, min(oldest, t.update_time))
        return out

    def unserved_ready(self) -> list[tuple[str, str]]:
        """(capability, pinned agent id or "") of ready queues that no connected
        agent can take from: no open task stream of an IDLE or ACTIVE agent
        serves the capability (or, for pinned tasks, belongs to the agent). Costs
        one look per queue and per stream."""
        caps, agents = self.connected()
        out = []
        for pinned, heaps in ((False, self._ready), (True, self._ready_pinned)):
            for key, heap in heaps.items():
                if key in (agents if pinned else caps):
                    continue
                for _, seq, task_id in heap:
                    t = self.tasks.get(task_id)
                    if t is not None and t.state == TaskState.QUEUED and t.ready_seq == seq:
                        out.append((t.capability, key) if pinned else (key, ""))
                        break
        return out

    def connected(self) -> tuple[set[str], set[str]]:
        """Capabilities served by, and ids of, agents that hold an open task stream
        and are IDLE or ACTIVE (so can be sent work once they have room)."""
        caps: set[str] = set()
        agents: set[str] = set()
        for agent_id, subs in self._subs_by_agent.items():
            for sub in subs:
                a = sub.agent
                if not sub.closed and not a.deregistered and a.state in DISPATCHABLE_STATES:
                    caps |= sub.capabilities
                    agents.add(agent_id)
        return caps, agents

    def open_subscriptions(self) -> int:
        return sum(len(subs) for subs in self._subs_by_agent.values())

    def in_flight_by_subscription(self) -> dict[int, tuple[str, int, int]]:
        return {
            s.sub_id: (s.agent.agent_id, len(s.in_flight), s.max_in_flight)
            for subs in self._subs_by_agent.values()
            for s in subs
        }


class _NeedStored(Exception):
    """Internal: the task is not open in memory; look at its stored final state."""
