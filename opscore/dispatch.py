"""The dispatch engine: subscriptions, leases, retries.

Tasks live in storage (opscore.storage.api): this engine decides what happens to
them, in operations, and keeps only what belongs to this server process: the
open task streams, which of them have room, and which stream holds which lease.

Matching is event-driven. A task becoming ready goes straight to a stream here
that can take it, or into storage's ready queue of its capability (or of its
pinned agent), where streams of every server can claim it; a stream gaining room
claims the best ready task it can serve. Deadlines (schedule time, backoff,
lease expiry) are storage's, which calls `_due` when one passes.

RPC replies wait for the commit, and so do assignments and cancellations sent on
streams, so an agent never receives a lease that a crash could forget.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime

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
from opscore.ids import new_id
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
    copy_task,
)
from opscore.observability.observer import NO_OBSERVER, EngineObserver
from opscore.observability.tracecontext import attempt_traceparent
from opscore.payload import Payload
from opscore.storage.api import Storage, Tx, Want
from opscore.subscription import Assignment, Cancellation, StreamEnd, StreamItem, Subscription
from opscore.taskspec import TaskSpec

log = logging.getLogger("opscore.dispatch")


MAX_IN_FLIGHT = limits.MAX_IN_FLIGHT
# TaskError.type of a cancelled task (and of the attempt a cancellation ended).
CANCELLED_ERROR_TYPE = "Cancelled"
MAX_BATCH = limits.MAX_ENQUEUE_BATCH


# Task events for listeners (the workflow engine), awaited inside the operation
# that caused them, so their reactions land in the same commit.
TaskListener = Callable[[Tx, str, Task], Awaitable[None]]


class DispatchEngine:
    """Queues, subscriptions, leases, retries. The tasks themselves live in
    storage (opscore.storage.api); this engine keeps only what belongs to this
    server process: the open task streams, which of them have room, and which
    stream holds which lease here."""

    def __init__(
        self,
        storage: Storage,
        lifecycle: LifecycleEngine,
        *,
        max_subscriptions_per_agent: int = limits.DEFAULT_MAX_SUBSCRIPTIONS_PER_AGENT,
        response_budget: int = limits.DEFAULT_MAX_MESSAGE_BYTES - 64 * 1024,
        observer: EngineObserver = NO_OBSERVER,
    ) -> None:
        self.storage = storage
        self.lifecycle = lifecycle
        self.max_subscriptions_per_agent = max_subscriptions_per_agent
        self.response_budget = response_budget
        self.observer = observer
        self.listeners: list[TaskListener] = []
        self.draining = False
        # Streams whose slots wait to be filled at the end of a transaction, by
        # transaction: all of them then, in one claim (Tx.before_flush).
        self._pending_fills: dict[Tx, dict[Subscription, None]] = {}
        self._clear()
        lifecycle.listeners.append(self._on_agent_event)
        storage.on_task_due = self._due
        storage.subscribe("ready", self._on_ready_elsewhere)
        storage.subscribe("cancel", self._on_cancel_elsewhere)
        storage.subscribe("released", self._on_released_elsewhere)
        storage.subscribe("rescan", self._rescan)

    def _clear(self) -> None:
        self._subs_by_agent: dict[str, set[Subscription]] = {}
        self._available: dict[str, dict[Subscription, None]] = {}
        self._available_by_agent: dict[str, dict[Subscription, None]] = {}
        self._holder: dict[str, Subscription] = {}
        self._pending_fills = {}

    # ------------------------------------------------------------------ start / stop

    def close_streams(self) -> None:
        """Drain: end every subscription with UNAVAILABLE so clients reconnect."""
        self.draining = True
        for subs in list(self._subs_by_agent.values()):
            for sub in list(subs):
                self._end_stream(sub, Unavailable("server is shutting down; reconnect"))

    def reset(self, error: OpsCoreError) -> None:
        """Forget this process's streams (storage may be ahead of what they hold):
        end every one of them with `error`."""
        for subs in list(self._subs_by_agent.values()):
            for sub in list(subs):
                sub.closed = True
                self._end_stream(sub, error)
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

        async def op(tx: Tx) -> list[tuple[Task, bool]]:
            for i, spec in enumerate(specs):
                if spec.agent_id:
                    agent = await tx.agent(spec.agent_id)
                    if agent is None or agent.deregistered:
                        where = "" if single else f"tasks[{i}]."
                        raise NotFound(
                            f"{where}agent_id {spec.agent_id!r} is not a registered agent",
                            reason="AGENT_NOT_FOUND",
                        )
            keys = {s.idempotency_key for s in specs if s.idempotency_key}
            existing = await tx.tasks_by_keys(sorted(keys)) if keys else {}
            self._check_accepting()  # again: the reads above may have waited
            results: list[tuple[Task, bool]] = []
            batch_keys: dict[str, Task] = {}
            with tx.atomic():
                for spec, (policy, when) in zip(specs, checked, strict=True):
                    key = spec.idempotency_key
                    if key:
                        prior = batch_keys.get(key) or existing.get(key)
                        if prior is not None:
                            results.append((prior, False))
                            continue
                    task = await self.create_task(tx, spec, policy, when)
                    if key:
                        batch_keys[key] = task
                    results.append((task, True))
                return [(self.snapshot(t), created) for t, created in results]

        return await self.storage.run(op)

    def new_task(self, spec: TaskSpec, policy: RetryPolicy, state: TaskState) -> Task:
        now = utcnow()
        task = Task(
            task_id=new_id(),
            name=spec.name,
            capability=spec.capability,
            agent_id=spec.agent_id,
            input=spec.input,
            priority=spec.priority,
            retry_policy=policy,
            timeout=spec.timeout or DEFAULT_TASK_TIMEOUT,
            heartbeat_timeout=spec.heartbeat_timeout,
            idempotency_key=spec.idempotency_key,
            state=state,
            create_time=now,
            update_time=now,
            session_id=spec.session_id,
            workflow_task_id=spec.workflow_task_id,
        )
        task.trace_context = self.observer.task_enqueued(task, spec.trace_parent)
        return task

    async def create_task(
        self, tx: Tx, spec: TaskSpec, policy: RetryPolicy, when: datetime | None
    ) -> Task:
        """Create a validated task and record it (inside the caller's atomic change)."""
        task = self.new_task(spec, policy, TaskState.SCHEDULED)
        if when is not None and when > task.create_time:
            task.schedule_time = when
            tx.put_task(task)
        else:
            await self._make_ready(tx, task)
        return task

    def create_failed_task(
        self, tx: Tx, spec: TaskSpec, policy: RetryPolicy, error: TaskError
    ) -> Task:
        """Record a task that can never be sent to an agent (its input cannot be
        delivered) as FAILED at once, never looping. Caller reacts."""
        task = self.new_task(dataclasses.replace(spec, input=None), policy, TaskState.FAILED)
        task.idempotency_key = ""
        task.finish_time = task.create_time
        task.last_error = error
        tx.put_task(task)
        self.observer.task_finished(task)
        return task

    # ------------------------------------------------------------------ subscribe

    async def subscribe(
        self, agent_id: str, capabilities: list[str], max_in_flight: int
    ) -> Subscription:
        self._check_accepting()
        v.require_id(agent_id, "agent_id")
        if max_in_flight < 0 or max_in_flight > MAX_IN_FLIGHT:
            raise InvalidArgument(
                f"max_in_flight must be between 1 and {MAX_IN_FLIGHT} (0 for 1)",
                field="max_in_flight",
            )
        requested = frozenset(v.capabilities(capabilities, "capabilities"))

        async def op(tx: Tx) -> Subscription:
            agent = await self.lifecycle.get_for_update(tx, agent_id)
            if agent.deregistered:
                raise FailedPrecondition(
                    f"agent {agent_id!r} is deregistered; register it again first",
                    reason="AGENT_DEREGISTERED",
                )
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
            held = await tx.held_by(agent_id)
            with tx.atomic():
                return await self._open_subscription(tx, agent, requested, max_in_flight, held)

        return await self.storage.run(op)

    async def _open_subscription(
        self,
        tx: Tx,
        agent: Agent,
        requested: frozenset[str],
        max_in_flight: int,
        held: list[Task],
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
        for task in held:
            if task.task_id not in self._holder:
                self._holder[task.task_id] = sub
                sub.in_flight.add(task.task_id)
                sub.push((tx.committed, Assignment(self.snapshot(task))))
        await self.lifecycle.subscription_opened(tx, agent)
        self._refresh(sub)
        await self._fill(tx, sub)
        return sub

    def unsubscribe(self, sub: Subscription, undelivered: list[StreamItem]) -> None:
        """The stream ended. This process forgets it at once; assignments that
        never left the process go back to the queue (attempt number reused: no
        one can hold it), in an operation run right after."""
        if sub.closed and sub not in self._subs_by_agent.get(sub.agent.agent_id, ()):
            return  # ended by the engine (deregistered, drained, or state rebuilt)
        sub.closed = True
        self._subs_by_agent.get(sub.agent.agent_id, set()).discard(sub)
        self._refresh(sub)
        unsent = [
            (item.task.task_id, item.task.attempt)
            for _fut, item in [*undelivered, *sub.outbox]
            if isinstance(item, Assignment)
        ]
        sub.outbox.clear()
        held = [t for t in sub.in_flight if self._holder.get(t) is sub]
        for task_id in held:
            del self._holder[task_id]
        sub.in_flight.clear()
        if self.draining:
            return  # the server is going: leases stay for the agent to reconnect

        async def op(tx: Tx) -> None:
            back = []
            for task_id, attempt in unsent:
                task = await tx.task(task_id)
                if (
                    task is not None
                    and task.state == TaskState.ASSIGNED
                    and task.attempt == attempt
                ):
                    back.append(task)
            with tx.atomic():
                for task in back:
                    task.attempt -= 1
                    task.lease_expire_time = task.attempt_deadline = None
                    await self._make_ready(tx, task, keep_seq=True)
                await self.lifecycle.subscription_closed(tx, sub.agent.agent_id)

        self.storage.spawn(op, what="close task stream")

    async def set_capacity_in(self, tx: Tx, sub: Subscription, max_in_flight: int) -> None:
        """How many tasks `sub` may hold from now on; 0 pauses it."""
        if not 0 <= max_in_flight <= MAX_IN_FLIGHT:
            raise InvalidArgument(
                f"max_in_flight must be between 0 and {MAX_IN_FLIGHT}",
                field="capacity.max_in_flight",
            )
        self._check_recovering()
        with tx.atomic():
            sub.max_in_flight = max_in_flight
            self._refresh(sub)
            await self._fill(tx, sub)

    def _end_stream(self, sub: Subscription, error: Exception | None) -> None:
        sub.push((None, StreamEnd(error)))

    # ------------------------------------------------------------------ results

    @staticmethod
    def _check_fence_args(task_id: str, agent_id: str, attempt: int) -> None:
        v.require_id(task_id, "task_id", what="task id")
        v.require_id(agent_id, "agent_id")
        if attempt <= 0:
            raise InvalidArgument(
                "attempt must be the attempt number of the assignment (>= 1)", field="attempt"
            )

    @staticmethod
    def _fenced(task: Task, agent_id: str, attempt: int) -> Task:
        """`task` if (agent_id, attempt) holds its current lease. Changes nothing."""
        if task.state != TaskState.ASSIGNED:
            raise FailedPrecondition(
                f"task {task.task_id} is {task.state.name}, not assigned; its attempt "
                f"{attempt} ended and the result is ignored",
                reason="LEASE_LOST",
            )
        if task.assigned_agent_id != agent_id or task.attempt != attempt:
            raise FailedPrecondition(
                f"task {task.task_id} is leased to another attempt, not to {agent_id!r} "
                f"attempt {attempt}; the result is ignored",
                reason="LEASE_LOST",
            )
        return task

    @staticmethod
    async def _stored(tx: Tx, task_id: str) -> Task:
        task = await tx.stored_task(task_id)
        if task is None:
            raise NotFound(f"task {task_id} does not exist", reason="TASK_NOT_FOUND")
        return task

    # The result calls below serve both shapes of the contract: a unary RPC awaits
    # the commit (`wait`); the work stream passes wait=False for every item of a
    # message and answers them all after one commit (acknowledgements are queued
    # behind the same commit future).

    async def complete(
        self, task_id: str, agent_id: str, attempt: int, output: Payload, *, wait: bool = True
    ) -> Task:
        return await self.storage.run(
            lambda tx: self.complete_in(tx, task_id, agent_id, attempt, output), wait=wait
        )

    async def complete_in(
        self, tx: Tx, task_id: str, agent_id: str, attempt: int, output: Payload
    ) -> Task:
        v.payload_size(output, "output")
        self._check_fence_args(task_id, agent_id, attempt)
        self._check_recovering()
        task = await tx.task(task_id)
        if task is None:
            stored = await self._stored(tx, task_id)
            if (
                stored.state == TaskState.COMPLETED
                and stored.assigned_agent_id == agent_id
                and stored.attempt == attempt
                and (stored.output or b"") == (output or b"")
            ):
                return self.snapshot(stored)
            raise self._final_error(stored, agent_id, attempt)
        self._fenced(task, agent_id, attempt)
        with tx.atomic():
            await self.lifecycle.touch(tx, agent_id)
            task.output = output
            now = utcnow()
            self._attempt_over(tx, task, AttemptOutcome.COMPLETED, None, now)
            await self._finish(tx, task, TaskState.COMPLETED, now)
            await self._emit(tx, "completed", task)
            return self.snapshot(task)

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
        return await self.storage.run(
            lambda tx: self.fail_in(tx, task_id, agent_id, attempt, error, non_retryable),
            wait=wait,
        )

    async def fail_in(
        self,
        tx: Tx,
        task_id: str,
        agent_id: str,
        attempt: int,
        error: TaskError,
        non_retryable: bool,
    ) -> Task:
        if not error.message:
            raise InvalidArgument("error.message is required", field="error.message")
        v.payload_size(error.details, "error.details", v.MAX_DETAILS)
        self._check_fence_args(task_id, agent_id, attempt)
        self._check_recovering()
        error = dataclasses.replace(
            error,
            message=error.message[: limits.MAX_ERROR_MESSAGE_CHARS],
            type=error.type[: limits.MAX_NAME_CHARS],
        )
        task = await tx.task(task_id)
        if (
            task is not None
            and task.state == TaskState.SCHEDULED
            and task.assigned_agent_id == agent_id
            and task.attempt == attempt
            and task.last_error == error
        ):
            return self.snapshot(task)  # a repeat of the failure that scheduled the retry
        if task is None:
            stored = await self._stored(tx, task_id)
            if (
                stored.state == TaskState.FAILED
                and stored.assigned_agent_id == agent_id
                and stored.attempt == attempt
                and stored.last_error == error
            ):
                return self.snapshot(stored)
            raise self._final_error(stored, agent_id, attempt)
        self._fenced(task, agent_id, attempt)
        with tx.atomic():
            await self.lifecycle.touch(tx, agent_id)
            await self._end_attempt(tx, task, error, retryable=not non_retryable)
            return self.snapshot(task)

    async def heartbeat(
        self, task_id: str, agent_id: str, attempt: int, progress: Payload, *, wait: bool = True
    ) -> tuple[datetime | None, bool]:
        return await self.storage.run(
            lambda tx: self.heartbeat_in(tx, task_id, agent_id, attempt, progress), wait=wait
        )

    async def heartbeat_in(
        self, tx: Tx, task_id: str, agent_id: str, attempt: int, progress: Payload
    ) -> tuple[datetime | None, bool]:
        v.payload_size(progress, "progress", v.MAX_DETAILS)
        self._check_fence_args(task_id, agent_id, attempt)
        self._check_recovering()
        task = await tx.task(task_id)
        if task is None:
            stored = await self._stored(tx, task_id)
            if (
                stored.state == TaskState.CANCELLED
                and stored.assigned_agent_id == agent_id
                and stored.attempt == attempt
            ):
                return None, True
            raise self._final_error(stored, agent_id, attempt)
        self._fenced(task, agent_id, attempt)
        with tx.atomic():
            await self.lifecycle.touch(tx, agent_id)
            now = utcnow()
            if progress is not None:
                task.progress = progress
            if task.heartbeat_timeout is not None and task.attempt_deadline is not None:
                task.lease_expire_time = min(task.attempt_deadline, now + task.heartbeat_timeout)
            task.update_time = now
            tx.put_task(task)
            return task.lease_expire_time, task.cancel_requested

    def _final_error(self, task: Task, agent_id: str, attempt: int) -> Exception:
        if task.state == TaskState.CANCELLED:
            return FailedPrecondition(
                f"task {task.task_id} was cancelled; the result is ignored",
                reason="TASK_CANCELLED",
            )
        if task.is_final:
            return FailedPrecondition(
                f"task {task.task_id} already finished as {task.state.name}; this result "
                f"for attempt {attempt} by {agent_id!r} is ignored",
                reason="TASK_FINISHED",
            )
        return FailedPrecondition(f"task {task.task_id} is not leased", reason="LEASE_LOST")

    async def cancel(self, task_id: str, reason: str = "") -> Task:
        v.require_id(task_id, "task_id", what="task id")
        v.max_len(reason, "reason", limits.MAX_REASON_CHARS)
        self._check_recovering()

        async def op(tx: Tx) -> Task:
            task = await tx.task(task_id)
            if task is None:
                stored = await self._stored(tx, task_id)
                if stored.state == TaskState.CANCELLED:
                    return self.snapshot(stored)
                raise FailedPrecondition(
                    f"task {task_id} already finished as {stored.state.name}; nothing to cancel",
                    reason="TASK_FINISHED",
                )
            with tx.atomic():
                await self.cancel_open(tx, task, reason or "cancelled by request")
                return self.snapshot(task)

        return await self.storage.run(op)

    async def cancel_open(self, tx: Tx, task: Task, reason: str) -> None:
        """Cancel an open task; the holder is told after commit.

        The reason stays visible: as the task's last_error (type "Cancelled"),
        and on the attempt it ended, in columns both backends already keep."""
        holder = self._holder.get(task.task_id)
        task.cancel_requested = True
        cancelled = TaskError(reason or "cancelled", CANCELLED_ERROR_TYPE)
        if task.state == TaskState.ASSIGNED and holder is not None and not holder.closed:
            # Before _finish frees the slot: the agent must hear of the cancellation
            # before it is sent the task that takes its place.
            holder.push((tx.committed, Cancellation(task.task_id, task.attempt, reason)))
        elif task.state == TaskState.ASSIGNED:
            # Held through another server: it tells its stream.
            tx.publish("cancel", f"{task.task_id} {task.attempt} {reason}")
        now = utcnow()
        if task.state == TaskState.ASSIGNED:
            self._attempt_over(tx, task, AttemptOutcome.CANCELLED, cancelled, now)
        task.last_error = cancelled
        await self._finish(tx, task, TaskState.CANCELLED, now)
        await self._emit(tx, "cancelled", task)

    # ------------------------------------------------------------------ reads

    async def get(self, task_id: str) -> Task:
        v.require_id(task_id, "task_id", what="task id")
        task = await self.storage.read_task(task_id)
        if task is None:
            raise NotFound(f"task {task_id} does not exist", reason="TASK_NOT_FOUND")
        return task

    async def list(self, flt: TaskFilter, page_size: int, page_token: str) -> Page[Task]:
        try:
            TaskState(flt.state)
        except ValueError:
            raise InvalidArgument(
                f"state {flt.state} is not a known TaskState", field="state"
            ) from None
        items, token = await self.storage.list_tasks(
            flt, page_size, page_token, self.response_budget
        )
        return Page(items, token)

    async def list_attempts(
        self, task_id: str, page_size: int, page_token: str
    ) -> Page[TaskAttempt]:
        """A task's attempts, newest first; the running one (no record yet) first."""
        task = await self.get(task_id)
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
        items, token = await self.storage.list_attempts(
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
        return copy_task(task)

    # ------------------------------------------------------------------ core moves

    def _check_accepting(self) -> None:
        if self.draining:
            raise Unavailable("server is shutting down; retry against the restarted server")
        self._check_recovering()

    def _check_recovering(self) -> None:
        self.storage.check_writable()

    async def _make_ready(self, tx: Tx, task: Task, keep_seq: bool = False) -> None:
        task.state = TaskState.QUEUED
        task.schedule_time = None
        if not keep_seq or not task.ready_seq:
            task.ready_seq = tx.next_ready_seq()
        task.update_time = utcnow()
        sub = self._pick_subscription(task)
        if sub is not None:
            await self._assign(tx, task, sub)
        else:
            tx.put_task(task)
            # Streams of other servers on the same database may take it.
            tx.publish("ready", f"@{task.agent_id}" if task.agent_id else task.capability)

    def _pick_subscription(self, task: Task) -> Subscription | None:
        pool = (
            self._available_by_agent.get(task.agent_id)
            if task.agent_id
            else self._available.get(task.capability)
        )
        if not pool:
            return None
        pending = self._pending_fills
        if pending:
            # A stream whose slots wait for its transaction's fill takes the best
            # ready task then, not this one ahead of older ones.
            return next((sub for sub in pool if not any(sub in p for p in pending.values())), None)
        return next(iter(pool))

    async def _assign(self, tx: Tx, task: Task, sub: Subscription) -> None:
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
        self.observer.task_assigned(task, waited)
        tx.put_task(task)
        sub.push((tx.committed, Assignment(self.snapshot(task))))
        self._refresh(sub, rotate=True)
        await self._emit(tx, "assigned", task)

    async def _release(self, tx: Tx, task: Task) -> None:
        """Detach an assigned task from its holder here; the holder may take more."""
        sub = self._holder.pop(task.task_id, None)
        if sub is not None:
            sub.in_flight.discard(task.task_id)
            if not sub.closed:
                self._refresh(sub)
                await self._fill(tx, sub)
        elif task.assigned_agent_id:
            # Held through another server's stream: its slot is freed there.
            tx.publish("released", task.task_id)

    async def _finish(self, tx: Tx, task: Task, state: TaskState, now: datetime) -> None:
        was_assigned = task.state == TaskState.ASSIGNED
        task.state = state
        task.finish_time = task.update_time = now
        task.lease_expire_time = None
        task.schedule_time = None
        tx.put_task(task)
        self.observer.task_finished(task)
        if was_assigned:
            await self._release(tx, task)

    def _attempt_over(
        self, tx: Tx, task: Task, outcome: AttemptOutcome, error: TaskError | None, now: datetime
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
        tx.put_attempt(record)
        self.observer.attempt_ended(task, record)

    async def _end_attempt(
        self,
        tx: Tx,
        task: Task,
        error: TaskError,
        retryable: bool = True,
        outcome: AttemptOutcome = AttemptOutcome.FAILED,
    ) -> None:
        """An attempt ended without success: retry after backoff, or fail for good."""
        task.last_error = error
        now = utcnow()
        self._attempt_over(tx, task, outcome, error, now)
        if retryable and task.attempt < task.retry_policy.max_attempts:
            task.state = TaskState.SCHEDULED
            task.lease_expire_time = None
            task.update_time = now
            await self._release(tx, task)
            when = now + task.retry_policy.backoff(task.attempt)
            self.observer.task_retrying(task)
            await self._emit(tx, "retrying", task)
            if when <= now:
                await self._make_ready(tx, task)
            else:
                task.schedule_time = when
                tx.put_task(task)
        else:
            await self._finish(tx, task, TaskState.FAILED, now)
            await self._emit(tx, "failed", task)

    # ------------------------------------------------------------------ availability

    @staticmethod
    def _eligible(sub: Subscription) -> bool:
        a = sub.agent
        return (
            not sub.closed
            and not a.deregistered
            and a.state in DISPATCHABLE_STATES
            and sub.has_room
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

    async def _fill(self, tx: Tx, sub: Subscription) -> None:
        """Give `sub` the best ready tasks it can take until it is full, at the end
        of the transaction: every stream waiting then is filled in one claim, not
        one claim per result (Tx.before_flush)."""
        pending = self._pending_fills.get(tx)
        if pending is None:
            pending = self._pending_fills[tx] = {}
            tx.before_flush(lambda: self._fill_pending(tx))
        pending[sub] = None

    async def _fill_pending(self, tx: Tx) -> None:
        pending = self._pending_fills.pop(tx, None)
        # Checked now, not when the fill was asked for: a stream closed, paused or
        # filled since (or freed by an operation refused after) asks for what it
        # can take now.
        subs = [sub for sub in pending or () if self._eligible(sub)]
        if not subs:
            return
        wants = [
            Want(sub.capabilities, sub.agent.agent_id, sub.max_in_flight - len(sub.in_flight))
            for sub in subs
        ]
        claimed = await tx.claim_many(wants)
        with tx.atomic():
            for sub, tasks in zip(subs, claimed, strict=True):
                for task in tasks:
                    if not self._eligible(sub):
                        tx.put_task(task)  # back in line, unchanged
                        continue
                    await self._assign(tx, task, sub)

    async def _on_agent_event(self, tx: Tx, event: AgentEventType, agent: Agent) -> None:
        subs = list(self._subs_by_agent.get(agent.agent_id, ()))
        for sub in subs:
            sub.agent = agent
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
            for task in await tx.held_by(agent.agent_id):
                if task.state == TaskState.ASSIGNED:
                    await self._end_attempt(
                        tx,
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
            await self._fill(tx, sub)

    # ------------------------------------------------------------------ other servers

    def _on_ready_elsewhere(self, payload: str) -> None:
        """A task became ready through another server (or a timer): streams here
        with room for it try to take it."""
        if payload.startswith("@"):
            subs = list(self._available_by_agent.get(payload[1:], ()))
        else:
            subs = list(self._available.get(payload, ()))
        if not subs:
            return

        async def op(tx: Tx) -> None:
            with tx.atomic():
                for sub in subs:
                    await self._fill(tx, sub)

        self.storage.spawn(op, what="take ready tasks")

    def _rescan(self, _payload: str) -> None:
        """Notifications may have been missed (the storage lost them while it
        reconnected): every stream here looks again at its agent and the queues."""
        subs = [s for group in self._subs_by_agent.values() for s in group if not s.closed]
        if not subs:
            return

        async def op(tx: Tx) -> None:
            with tx.atomic():
                for sub in subs:
                    agent = await tx.agent(sub.agent.agent_id, wait=False)
                    if agent is not None:
                        sub.agent = agent
                    self._refresh(sub)
                    await self._fill(tx, sub)

        self.storage.spawn(op, what="rescan after lost notifications")

    def _on_cancel_elsewhere(self, payload: str) -> None:
        """Another server cancelled a task whose lease a stream here holds."""
        task_id, attempt, reason = [*payload.split(" ", 2), "", ""][:3]
        holder = self._holder.get(task_id)
        if holder is not None and not holder.closed:
            holder.push((None, Cancellation(task_id, int(attempt), reason)))

    def _on_released_elsewhere(self, task_id: str) -> None:
        """Another server ended an attempt a stream here holds: free its slot."""
        sub = self._holder.pop(task_id, None)
        if sub is None:
            return
        sub.in_flight.discard(task_id)
        if sub.closed:
            return
        self._refresh(sub)

        async def op(tx: Tx) -> None:
            with tx.atomic():
                await self._fill(tx, sub)

        self.storage.spawn(op, what="refill a task stream")

    # ------------------------------------------------------------------ timers

    async def _due(self, tx: Tx, task_id: str, attempt: int) -> None:
        """Storage says a deadline of the task passed (its schedule time, backoff
        or lease). Re-checked here: it may have moved since."""
        task = await tx.task(task_id)
        if task is None or task.attempt != attempt:
            return
        now = utcnow()
        with tx.atomic():
            if task.state == TaskState.SCHEDULED:
                if task.schedule_time is not None and task.schedule_time > now:
                    tx.put_task(task)  # later than the storage thought: due again then
                    return
                await self._make_ready(tx, task)
            elif task.state == TaskState.ASSIGNED:
                lease = task.lease_expire_time
                if lease is not None and lease > now:
                    tx.put_task(task)  # extended by a heartbeat since
                    return
                log.info(
                    "lease expired",
                    extra={
                        "task_id": task_id,
                        "agent_id": task.assigned_agent_id,
                        "attempt": attempt,
                    },
                )
                await self._end_attempt(
                    tx,
                    task,
                    TaskError(
                        f"lease of attempt {attempt} expired without a result", "LeaseExpired"
                    ),
                    outcome=AttemptOutcome.LEASE_EXPIRED,
                )

    # ------------------------------------------------------------------ listeners

    async def _emit(self, tx: Tx, event: str, task: Task) -> None:
        if task.session_id:
            for listener in self.listeners:
                await listener(tx, event, task)

    # ------------------------------------------------------------------ introspection
    # Read-only accessors for observability (metrics scrapes, the no-agent watch).

    def ready_queues(self) -> dict[tuple[str, str], tuple[int, datetime]]:
        """Ready tasks by (capability, pinned agent id or ""): how many, and when
        the oldest became ready."""
        return self.storage.ready_queues()

    def unserved_ready(self) -> list[tuple[str, str]]:
        """(capability, pinned agent id or "") of ready queues that no connected
        agent can take from: no open task stream of an IDLE or ACTIVE agent
        serves the capability (or, for pinned tasks, belongs to the agent)."""
        caps, agents = self.connected()
        return [
            (cap, pinned)
            for cap, pinned in self.ready_queues()
            if not (pinned in agents if pinned else cap in caps)
        ]

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
