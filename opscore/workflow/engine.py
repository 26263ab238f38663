"""The workflow engine: definitions, sessions, DAG sequencing, fallbacks, watch.

Session tasks are ordinary dispatch tasks carrying `session_id`; the engine reacts
to their events synchronously (a dispatch listener), so a task's result and its
effect on the session land in the same commit and are applied exactly once.

A running session's live state (its plan and per-task counters of unfinished
dependencies) is built from its rows by this engine and kept by storage
(opscore.storage.api): a completion costs time proportional to the task's
dependents, never to the size of the session.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import sys
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf import struct_pb2
from opscore_proto.v1 import common_pb2, workflow_pb2

from opscore import limits
from opscore import validation as v
from opscore.clock import utcnow
from opscore.dispatch import CANCELLED_ERROR_TYPE, DispatchEngine
from opscore.errors import (
    AlreadyExists,
    ConfigError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OpsCoreError,
    Unavailable,
)
from opscore.events import Broadcast, FellBehind
from opscore.ids import new_id
from opscore.models import Page, Task, TaskError, TaskState
from opscore.observability.observer import NO_OBSERVER, EngineObserver
from opscore.payload import Payload
from opscore.storage.api import Storage, Tx
from opscore.taskspec import TaskSpec
from opscore.workflow.definitions import Definition, Plan, content_hash, parse_source, validate
from opscore.workflow.models import (
    TERMINAL_EVENTS,
    EventType,
    RunState,
    Session,
    SessionState,
    StoredEvent,
    TaskRun,
)
from opscore.workflow.source_parser import SourceParser

log = logging.getLogger("opscore.workflow")

T = TypeVar("T")

INLINE_DEFINITION_ID = "inline"


@dataclass(slots=True)
class _Live:
    """A running session with the state the engine needs to drive it."""

    session: Session
    plan: Plan
    pending: dict[str, int]
    open_nodes: int
    event_seq: int
    by_task: dict[str, str] = field(default_factory=dict)


# Definitions this large are parsed and validated on a worker thread, so the event
# loop keeps serving (a health check must answer while a 10,000-task YAML loads).
_OFF_LOOP_TASKS = 200
_OFF_LOOP_SOURCE_BYTES = 64 * 1024


class WorkflowEngine:
    def __init__(
        self,
        storage: Storage,
        dispatch: DispatchEngine,
        *,
        encode_event: Callable[[StoredEvent], bytes] = lambda e: e.body,
        response_budget: int = limits.DEFAULT_MAX_MESSAGE_BYTES - 64 * 1024,
        observer: EngineObserver = NO_OBSERVER,
    ) -> None:
        self.storage = storage
        self.dispatch = dispatch
        self.response_budget = response_budget
        self.observer = observer
        self._encode_event = encode_event
        self._definition_lock = asyncio.Lock()
        # One thread: big definitions queue behind each other instead of taking
        # every core (and the GIL) at once.
        self._parser = ThreadPoolExecutor(max_workers=1, thread_name_prefix="opscore-defs")
        self._plans: OrderedDict[str, Plan] = OrderedDict()
        self._source_parser = SourceParser()
        self._closed = False
        self._watchers: dict[str, Broadcast[StoredEvent]] = {}
        dispatch.listeners.append(self._on_task_event)
        storage.build_session = self._build_live
        storage.subscribe("session_event", self._on_event_elsewhere)

    def reset(self, error: OpsCoreError) -> None:
        """End every watch with `error` (state is rebuilt under them)."""
        for b in list(self._watchers.values()):
            b.close(error)
        self._watchers = {}

    def stop(self) -> None:
        self._parser.shutdown(wait=False, cancel_futures=True)
        self._source_parser.close()

    # ------------------------------------------------------------------ plans

    async def _off_loop(self, big: bool, fn: Callable[..., T], *args: Any) -> T:
        if not big:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(
            self._parser, _yielding_gil, fn, *args
        )

    async def plan_for(self, definition: Definition, digest: str = "") -> Plan:
        """The validated plan of a definition, cached by content (definitions are
        immutable, so a digest names one plan for good)."""
        if digest:
            plan = self._plans.get(digest)
            if plan is not None:
                self._plans.move_to_end(digest)
                return plan
        plan = await self._off_loop(len(definition.tasks) > _OFF_LOOP_TASKS, validate, definition)
        if digest:
            self._plans[digest] = plan
            while len(self._plans) > 64:
                self._plans.popitem(last=False)
        return plan

    async def parse(self, source: str, origin: str = "source") -> Definition:
        """A definition from JSON/YAML source text (off the loop when it is large)."""
        if len(source) > limits.MAX_DEFINITION_SOURCE_BYTES:
            raise InvalidArgument(
                f"source is {len(source)} characters; at most {limits.MAX_DEFINITION_SOURCE_BYTES}",
                field="source",
            )
        # Anchors can make a short text expand to the node limit: parse those off
        # the loop too, in the worker process (see source_parser).
        if len(source) > _OFF_LOOP_SOURCE_BYTES or "&" in source:
            return await self._source_parser.parse(source, origin)
        return parse_source(source, origin=origin)

    # ------------------------------------------------------------------ start

    async def _build_live(self, session: Session, body: bytes, last_seq: int) -> _Live:
        """A running session's live state from its rows (storage calls it)."""
        definition = Definition.FromString(body)
        plan = await self.plan_for(definition, hashlib.sha256(body).hexdigest())
        live = _Live(session, plan, {}, 0, last_seq)
        for tid, pt in plan.tasks.items():
            run = session.runs[tid]
            if run.task_id:
                live.by_task[run.task_id] = tid
            if pt.replaces:
                continue
            if not self._resolved(live, tid):
                live.open_nodes += 1
            live.pending[tid] = sum(not self._resolved(live, d) for d in pt.depends_on)
        return live

    async def load_directory(self, directory: str) -> int:
        """Create every definition in DIR; refuse (ConfigError) on the first bad file."""
        files = await asyncio.to_thread(_read_definition_files, directory)
        for name, text in files:
            try:
                await self.create_definition(await self.parse(text, origin=name))
            except OpsCoreError as exc:
                raise ConfigError(f"workflow file {name}: {exc.message}") from None
        log.info("workflow definitions loaded", extra={"dir": directory, "files": len(files)})
        return len(files)

    def close_watchers(self) -> None:
        self._closed = True
        for b in list(self._watchers.values()):
            b.close(Unavailable("server is shutting down; reconnect to resume the watch"))

    # ------------------------------------------------------------------ definitions

    async def create_definition(self, definition: Definition) -> tuple[Definition, bool]:
        self._check_accepting()
        await self._off_loop(len(definition.tasks) > _OFF_LOOP_TASKS, validate, definition)
        digest = content_hash(definition)

        async def op(tx: Tx) -> tuple[Definition, bool]:
            # Serializes creations of one id, across servers too.
            await tx.lock_definition(definition.id)
            if definition.version:
                existing = await tx.definition(definition.id, definition.version)
                if existing is not None:
                    body, stored_hash = existing
                    if stored_hash == digest:
                        return Definition.FromString(body), False
                    raise AlreadyExists(
                        f"workflow {definition.id!r} version {definition.version} already "
                        "exists with different content; definitions are immutable: use a new "
                        "version (or version 0 for the next one)",
                        reason="DEFINITION_VERSION_EXISTS",
                    )
                version = definition.version
            else:
                latest = await tx.definition(definition.id, 0)
                if latest is not None:
                    body, stored_hash = latest
                    if stored_hash == digest:
                        return Definition.FromString(body), False
                    latest_version = Definition.FromString(body).version
                    if latest_version >= limits.MAX_DEFINITION_VERSION:
                        raise FailedPrecondition(
                            f"workflow {definition.id!r} is at version {latest_version}, the "
                            "highest a version can be; there is no next one: create it under "
                            "a new id",
                            reason="DEFINITION_VERSIONS_EXHAUSTED",
                        )
                    version = latest_version + 1
                else:
                    version = 1
            stored = Definition()
            stored.CopyFrom(definition)
            stored.version = version
            stored.create_time.FromDatetime(utcnow())
            tx.put_definition(
                stored.id, version, stored.SerializeToString(deterministic=True), digest, utcnow()
            )
            return stored, True

        async with self._definition_lock:
            return await self.storage.run(op)

    async def get_definition(self, definition_id: str, version: int = 0) -> Definition:
        return (await self._stored_definition(definition_id, version))[0]

    async def _stored_definition(self, definition_id: str, version: int) -> tuple[Definition, str]:
        """A stored definition and its content hash."""
        v.require_id(definition_id, "definition_id", what="definition id")
        if version < 0:
            raise InvalidArgument("version must not be negative", field="version")
        found = await self.storage.get_definition(definition_id, version)
        if found is None:
            which = f" version {version}" if version else ""
            raise NotFound(
                f"workflow definition {definition_id!r}{which} does not exist",
                reason="DEFINITION_NOT_FOUND",
            )
        return Definition.FromString(found[0]), found[1]

    def _check_accepting(self) -> None:
        if self.dispatch.draining:
            raise Unavailable("server is shutting down; retry against the restarted server")
        self.storage.check_writable()

    async def list_definitions(self, page_size: int, page_token: str) -> Page[Definition]:
        bodies, token = await self.storage.list_definitions(
            page_size, page_token, self.response_budget
        )
        return Page([Definition.FromString(b) for b in bodies], token)

    async def delete_definition(self, definition_id: str, version: int = 0) -> int:
        v.require_id(definition_id, "definition_id", what="definition id")
        self._check_accepting()

        async def op(tx: Tx) -> int:
            await tx.lock_definition(definition_id)
            versions = await tx.definition_versions(definition_id)
            doomed = versions if version == 0 else [x for x in versions if x == version]
            if not doomed:
                which = f" version {version}" if version else ""
                raise NotFound(
                    f"workflow definition {definition_id!r}{which} does not exist",
                    reason="DEFINITION_NOT_FOUND",
                )
            for x in doomed:
                tx.delete_definition(definition_id, x)
            return len(doomed)

        async with self._definition_lock:
            return await self.storage.run(op)

    # ------------------------------------------------------------------ sessions

    async def start_workflow(
        self,
        *,
        definition_id: str = "",
        version: int = 0,
        inline: Definition | None = None,
        input: Payload = None,
        agent_id: str = "",
        idempotency_key: str = "",
    ) -> tuple[Session, bool]:
        self._check_accepting()
        if bool(definition_id) == (inline is not None):
            raise InvalidArgument(
                "set exactly one of definition_id and definition", field="definition_id"
            )
        v.payload_size(input, "input")
        v.max_len(idempotency_key, "idempotency_key", limits.MAX_IDEMPOTENCY_KEY_CHARS)
        if agent_id:
            v.require_id(agent_id, "agent_id")
        if inline is not None:
            definition = Definition()
            definition.CopyFrom(inline)
            definition.ClearField("create_time")  # output only: ignored in requests
            if not definition.id:
                definition.id = INLINE_DEFINITION_ID
            plan = await self.plan_for(definition)
        else:
            definition, digest = await self._stored_definition(definition_id, version)
            plan = await self.plan_for(definition, digest)

        async def op(tx: Tx) -> tuple[Session, bool]:
            if agent_id:
                agent = await tx.agent(agent_id)
                if agent is None or agent.deregistered:
                    raise NotFound(
                        f"agent_id {agent_id!r} is not a registered agent",
                        reason="AGENT_NOT_FOUND",
                    )
            if idempotency_key:
                prior = await tx.session_by_key(idempotency_key)
                if prior is not None:
                    return self._snapshot(prior), False
            self._check_accepting()  # again: the reads above may have waited
            with tx.atomic():
                session = await self._start_session(
                    tx, definition, plan, input, agent_id, idempotency_key
                )
                return session, True

        return await self.storage.run(op)

    async def _start_session(
        self,
        tx: Tx,
        definition: Definition,
        plan: Plan,
        input: Payload,
        agent_id: str,
        idempotency_key: str,
    ) -> Session:
        now = utcnow()
        session = Session(
            session_id=new_id(),
            definition_id=definition.id,
            definition_version=definition.version,
            state=SessionState.RUNNING,
            input=input,
            agent_id=agent_id,
            idempotency_key=idempotency_key,
            create_time=now,
            update_time=now,
            runs={tid: TaskRun(tid, plan.tasks[tid].position) for tid in plan.order},
        )
        session.trace_context = self.observer.session_started(session)
        live = _Live(
            session,
            plan,
            pending={k: len(t.depends_on) for k, t in plan.tasks.items() if not t.replaces},
            open_nodes=sum(not t.replaces for t in plan.tasks.values()),
            event_seq=0,
        )
        tx.add_session(session.session_id, live)
        tx.put_session(session)
        tx.put_session_definition(
            session.session_id, definition.SerializeToString(deterministic=True)
        )
        for run in session.runs.values():
            tx.put_run(session.session_id, run)
        self._event(tx, live, EventType.SESSION_STARTED)
        for tid in plan.roots:
            await self._start_task(tx, live, tid)
        return self._snapshot(session)

    async def get_session(self, session_id: str) -> Session:
        v.require_id(session_id, "session_id", what="session id")
        found = await self.storage.get_session(session_id)
        if found is None:
            raise NotFound(f"session {session_id} does not exist", reason="SESSION_NOT_FOUND")
        return found

    async def list_sessions(
        self, state: int, definition_id: str, page_size: int, page_token: str
    ) -> Page[Session]:
        try:
            SessionState(state)
        except ValueError:
            raise InvalidArgument(
                f"state {state} is not a known SessionState", field="state"
            ) from None
        items, token = await self.storage.list_sessions(
            state, definition_id, page_size, page_token, self.response_budget
        )
        return Page(items, token)

    async def cancel_session(self, session_id: str, reason: str = "") -> Session:
        v.require_id(session_id, "session_id", what="session id")
        v.max_len(reason, "reason", limits.MAX_REASON_CHARS)
        self._check_accepting()
        why = reason or "session cancelled"

        async def op(tx: Tx) -> Session:
            live = await tx.session(session_id)
            if live is None:
                stored = await self.get_session(session_id)
                if stored.state == SessionState.CANCELLED:
                    return stored
                raise FailedPrecondition(
                    f"session {session_id} already finished as {stored.state.name}",
                    reason="SESSION_FINISHED",
                )
            assert isinstance(live, _Live)
            with tx.atomic():
                # Kept where GetSession shows it, as the session's error.
                live.session.error = TaskError(why, CANCELLED_ERROR_TYPE)
                await self._finish_session(
                    tx, live, SessionState.CANCELLED, EventType.SESSION_CANCELLED, why
                )
                return self._snapshot(live.session)

        return await self.storage.run(op)

    # ------------------------------------------------------------------ watch

    async def watch(
        self,
        session_id: str,
        after: int = 0,
        on_ready: Callable[[], Awaitable[None]] | None = None,
    ) -> AsyncIterator[bytes]:
        """Every event after `after`, then live ones, ending after the terminal one,
        each encoded for the wire. `on_ready` is awaited once the live subscription
        is in place."""
        await self.get_session(session_id)  # NOT_FOUND before anything streams
        if after < 0:
            raise InvalidArgument("after_sequence must not be negative", field="after_sequence")
        broadcast = self._watchers.get(session_id)
        if broadcast is None:
            broadcast = self._watchers[session_id] = Broadcast(self._encode_event)
            if self._closed:
                broadcast.close(Unavailable("server is shutting down"))
        watcher = broadcast.watch()  # subscribe before reading, so nothing falls between
        last = after
        try:
            if on_ready is not None:
                await on_ready()
            while True:  # the stored history, a bounded slice at a time
                rows = await self.storage.list_session_events(
                    session_id, last, self.response_budget
                )
                if not rows:
                    break
                for seq, body in rows:
                    event = _stored(session_id, seq, body)
                    yield self._encode_event(event)
                    last = seq
                    if event.terminal:
                        return
            async for event, data in watcher:
                if event.sequence <= last:
                    continue
                yield data
                last = event.sequence
                if event.terminal:
                    return
        except FellBehind as exc:
            raise FellBehind(
                f"{exc.message}; watch again with after_sequence={last} to resume"
            ) from None
        finally:
            watcher.close()
            if not len(broadcast) and self._watchers.get(session_id) is broadcast:
                del self._watchers[session_id]

    # ------------------------------------------------------------------ engine core

    async def _start_task(self, tx: Tx, live: _Live, tid: str, *, replacing: str = "") -> None:
        """Enqueue workflow task `tid` with its input built from its upstream."""
        s = live.session
        pt = live.plan.tasks[tid]
        deps = pt.depends_on
        if pt.replaces:
            # A fallback receives the upstream of the task it ultimately replaces.
            principal = replacing
            while live.plan.tasks[principal].replaces:
                principal = live.plan.tasks[principal].replaces
            deps = live.plan.tasks[principal].depends_on
        composed = self._task_input(live, pt.parameters, deps)
        spec = TaskSpec(
            name=f"{s.definition_id}/{tid}",
            # Routing uses agent_id when set; the capability stays on pinned tasks as
            # information, so an agent with several handlers knows which to run.
            capability=pt.capability,
            agent_id=s.agent_id or pt.agent_id,
            input=composed,
            priority=pt.priority,
            timeout=pt.timeout,
            heartbeat_timeout=pt.heartbeat_timeout,
            session_id=s.session_id,
            workflow_task_id=tid,
            trace_parent=s.trace_context,
        )
        if len(composed) > limits.MAX_COMPOSED_INPUT_BYTES:
            # No agent could receive it: fail it for good now rather than send it
            # into a reject-and-resend loop.
            error = TaskError(
                f"task {tid!r}: its input (parameters, session input and upstream outputs) "
                f"is {len(composed)} bytes, more than the {limits.MAX_COMPOSED_INPUT_BYTES} "
                "an assignment may carry; make the upstream outputs smaller",
                "InputTooLarge",
            )
            task = self.dispatch.create_failed_task(tx, spec, pt.retry_policy, error)
        else:
            task = await self.dispatch.create_task(tx, spec, pt.retry_policy, None)
        run = s.runs[tid]
        run.task_id = task.task_id
        run.state = RunState.RUNNING
        run.start_time = utcnow()
        live.by_task[task.task_id] = tid
        tx.put_run(s.session_id, run)
        kind = EventType.FALLBACK_STARTED if replacing else EventType.TASK_QUEUED
        self._event(tx, live, kind, tid, task_id=task.task_id)
        if task.state == TaskState.FAILED:
            await self._on_task_event(tx, "failed", task)
            return
        # The assignment may already have happened inside create_task; its event
        # was recorded then, before TASK_QUEUED. Keep the story in order.
        if task.state == TaskState.ASSIGNED and run.attempt == 0:
            run.attempt = task.attempt
            self._event(
                tx,
                live,
                EventType.TASK_ASSIGNED,
                tid,
                task_id=task.task_id,
                attempt=task.attempt,
                agent_id=task.assigned_agent_id,
            )

    def _task_input(self, live: _Live, parameters: Payload, deps: tuple[str, ...]) -> bytes:
        s = struct_pb2.Struct()
        # All three keys are always present (as objects), so handlers need no checks.
        params = s.fields["parameters"].struct_value
        params.SetInParent()
        if parameters:
            params.MergeFromString(parameters)
        inp = s.fields["input"].struct_value
        inp.SetInParent()
        if live.session.input:
            inp.MergeFromString(live.session.input)
        upstream = s.fields["upstream"].struct_value
        upstream.SetInParent()
        for dep in deps:
            out = self._resolved_output(live, dep)
            slot = upstream.fields[dep]
            if out:
                slot.struct_value.MergeFromString(out)
            else:
                slot.struct_value.SetInParent()
        return s.SerializeToString(deterministic=True)

    def _resolved(self, live: _Live, tid: str) -> bool:
        """Has principal `tid` (or its fallback chain) completed?"""
        run = live.session.runs[tid]
        while run.state == RunState.REPLACED:
            run = live.session.runs[live.plan.tasks[run.workflow_task_id].fallback]
        return run.state == RunState.COMPLETED

    def _resolved_output(self, live: _Live, tid: str) -> Payload:
        run = live.session.runs[tid]
        while run.state == RunState.REPLACED:
            run = live.session.runs[live.plan.tasks[run.workflow_task_id].fallback]
        return run.output

    async def _on_task_event(self, tx: Tx, kind: str, task: Task) -> None:
        live = await tx.session(task.session_id)
        if live is None:
            return
        assert isinstance(live, _Live)
        tid = live.by_task.get(task.task_id)
        if tid is None:
            return
        s = live.session
        run = s.runs[tid]
        run.attempt = task.attempt
        if kind == "assigned":
            if run.task_id:  # else _start_task records it once the run is linked
                self._event(
                    tx,
                    live,
                    EventType.TASK_ASSIGNED,
                    tid,
                    task_id=task.task_id,
                    attempt=task.attempt,
                    agent_id=task.assigned_agent_id,
                )
            tx.put_run(s.session_id, run)
            return
        if kind == "retrying":
            run.error = task.last_error
            tx.put_run(s.session_id, run)
            self._event(
                tx,
                live,
                EventType.TASK_RETRYING,
                tid,
                task_id=task.task_id,
                attempt=task.attempt,
                error=task.last_error,
            )
            return
        run.finish_time = utcnow()
        if kind == "completed":
            run.state, run.output = RunState.COMPLETED, task.output
            tx.put_run(s.session_id, run)
            self._event(
                tx,
                live,
                EventType.TASK_COMPLETED,
                tid,
                task_id=task.task_id,
                attempt=task.attempt,
                output=task.output,
            )
            if not s.is_final:
                await self._resolve(tx, live, tid)
            return
        if kind == "cancelled":
            run.state, run.error = RunState.CANCELLED, task.last_error
            tx.put_run(s.session_id, run)
            self._event(
                tx,
                live,
                EventType.TASK_CANCELLED,
                tid,
                task_id=task.task_id,
                attempt=task.attempt,
                error=task.last_error,
            )
            if not s.is_final:
                # Cancelled on its own (CancelTask), not by the session's end.
                why = task.last_error.message if task.last_error else "cancelled"
                s.error = TaskError(f"task {tid!r} was cancelled: {why}", CANCELLED_ERROR_TYPE)
                await self._finish_session(
                    tx,
                    live,
                    SessionState.FAILED,
                    EventType.SESSION_FAILED,
                    f"session failed: task {tid}",
                )
            return
        # failed permanently
        run.state, run.error = RunState.FAILED, task.last_error
        tx.put_run(s.session_id, run)
        self._event(
            tx,
            live,
            EventType.TASK_FAILED,
            tid,
            task_id=task.task_id,
            attempt=task.attempt,
            error=task.last_error,
        )
        if s.is_final:
            return
        fallback = live.plan.tasks[tid].fallback
        if fallback:
            run.state = RunState.REPLACED
            tx.put_run(s.session_id, run)
            await self._start_task(tx, live, fallback, replacing=tid)
            return
        err = task.last_error or TaskError("failed")
        await self._fail_session(tx, live, tid, err)

    async def _resolve(self, tx: Tx, live: _Live, tid: str) -> None:
        """Task `tid` completed: credit the principal it stands for, start what is ready."""
        principal = tid
        while live.plan.tasks[principal].replaces:
            principal = live.plan.tasks[principal].replaces
        live.open_nodes -= 1
        for dependent in live.plan.tasks[principal].dependents:
            live.pending[dependent] -= 1
            if live.pending[dependent] == 0:
                await self._start_task(tx, live, dependent)
        if live.open_nodes == 0:
            out = struct_pb2.Struct()
            for sink in live.plan.sinks:
                slot = out.fields[sink]
                value = self._resolved_output(live, sink)
                if value:
                    slot.struct_value.MergeFromString(value)
                else:
                    slot.struct_value.SetInParent()
            output = out.SerializeToString(deterministic=True)
            if len(output) > limits.MAX_COMPOSED_INPUT_BYTES:
                live.session.error = TaskError(
                    f"the session's output (the outputs of its final tasks "
                    f"{list(live.plan.sinks)[:5]}) is {len(output)} bytes, more than the "
                    f"{limits.MAX_COMPOSED_INPUT_BYTES} a session may return; make those "
                    "outputs smaller",
                    "OutputTooLarge",
                )
                await self._finish_session(
                    tx,
                    live,
                    SessionState.FAILED,
                    EventType.SESSION_FAILED,
                    "session output too large",
                )
                return
            live.session.output = output
            await self._finish_session(
                tx, live, SessionState.COMPLETED, EventType.SESSION_COMPLETED
            )

    async def _fail_session(self, tx: Tx, live: _Live, tid: str, err: TaskError) -> None:
        live.session.error = TaskError(f"task {tid!r} failed: {err.message}", err.type, err.details)
        await self._finish_session(
            tx, live, SessionState.FAILED, EventType.SESSION_FAILED, f"session failed: task {tid}"
        )

    async def _finish_session(
        self, tx: Tx, live: _Live, state: SessionState, event: EventType, reason: str = ""
    ) -> None:
        s = live.session
        now = utcnow()
        s.state = state
        s.finish_time = s.update_time = now
        # Why the runs that will not run now were cancelled.
        cancelled = TaskError(reason, CANCELLED_ERROR_TYPE) if reason else None
        # Mark final first: the cancellations below come back as task events.
        for run in s.runs.values():
            if run.state == RunState.RUNNING:
                task = await tx.task(run.task_id)
                if task is not None and not task.is_final:
                    await self.dispatch.cancel_open(tx, task, reason)
                if run.state == RunState.RUNNING:
                    run.state, run.error = RunState.CANCELLED, cancelled
                    run.finish_time = now
                    tx.put_run(s.session_id, run)
            elif run.state == RunState.WAITING:
                is_fallback = live.plan.tasks[run.workflow_task_id].replaces
                if is_fallback and state == SessionState.COMPLETED:
                    run.state = RunState.SKIPPED
                else:
                    run.state, run.error = RunState.CANCELLED, cancelled
                tx.put_run(s.session_id, run)
        tx.put_session(s)
        self.observer.session_finished(s)
        self._event(
            tx,
            live,
            event,
            output=s.output if state == SessionState.COMPLETED else None,
            error=s.error if state != SessionState.COMPLETED else None,
        )
        tx.session_done(s.session_id)

    # ------------------------------------------------------------------ events

    def _event(
        self,
        tx: Tx,
        live: _Live,
        kind: EventType,
        tid: str = "",
        *,
        task_id: str = "",
        attempt: int = 0,
        agent_id: str = "",
        output: Payload = None,
        error: TaskError | None = None,
    ) -> None:
        live.event_seq += 1
        s = live.session
        msg = workflow_pb2.SessionEvent(
            session_id=s.session_id,
            sequence=live.event_seq,
            event_type=int(kind),  # type: ignore[arg-type]
            workflow_task_id=tid,
            task_id=task_id,
            attempt=attempt,
            agent_id=agent_id,
            session_state=int(s.state),  # type: ignore[arg-type]
        )
        msg.event_time.FromDatetime(utcnow())
        if output:
            msg.output.MergeFromString(output)
        if error is not None:
            msg.error.CopyFrom(common_pb2.TaskError(message=error.message, type=error.type))
            if error.details:
                msg.error.details.MergeFromString(error.details)
        body = msg.SerializeToString()
        tx.add_session_event(s.session_id, live.event_seq, body)
        stored = StoredEvent(s.session_id, live.event_seq, body, kind in TERMINAL_EVENTS)
        # Published once committed, whether or not anyone watches now: a watcher
        # that subscribes before the commit but reads storage before it lands
        # would otherwise miss the event. Other servers read it back from storage.
        tx.after_commit(lambda: self._publish(stored))
        tx.publish("session_event", f"{s.session_id} {live.event_seq}")

    def _publish(self, event: StoredEvent) -> None:
        b = self._watchers.get(event.session_id)
        if b is not None:
            b.publish(event)

    def _on_event_elsewhere(self, payload: str) -> None:
        """Another server committed a session event: watchers here read it back."""
        session_id, _, seq = payload.partition(" ")
        b = self._watchers.get(session_id)
        if b is None:
            return

        async def relay() -> None:
            for got, body in await self.storage.list_session_events(
                session_id, int(seq) - 1, self.response_budget
            ):
                if got == int(seq):
                    self._publish(_stored(session_id, got, body))

        self.storage.spawn_read(relay(), what="relay a session event")

    # ------------------------------------------------------------------ introspection

    def open_watches(self) -> int:
        """WatchSession streams open now (for metrics scrapes)."""
        return sum(len(b) for b in self._watchers.values())

    @staticmethod
    def _snapshot(session: Session) -> Session:
        return dataclasses.replace(
            session, runs={k: dataclasses.replace(r) for k, r in session.runs.items()}
        )


def _yielding_gil(fn: Callable[..., T], *args: Any) -> T:
    """Run CPU-bound parsing on the worker thread while handing the GIL back to the
    event loop often: at the default 5 ms switch interval, a health check that
    needs several handoffs can wait longer than its 100 ms budget."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(min(before, 0.0005))
    try:
        return fn(*args)
    finally:
        sys.setswitchinterval(before)


def _stored(session_id: str, seq: int, body: bytes) -> StoredEvent:
    kind = workflow_pb2.SessionEvent.FromString(body).event_type
    return StoredEvent(session_id, seq, body, EventType(kind) in TERMINAL_EVENTS)


def _read_definition_files(directory: str) -> list[tuple[str, str]]:
    root = Path(directory)
    if not root.is_dir():
        raise ConfigError(f"--workflows-dir {directory} is not a directory")
    out = []
    for path in sorted(root.iterdir()):
        if path.suffix in (".json", ".yaml", ".yml") and path.is_file():
            try:
                out.append((str(path), path.read_text()))
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"workflow file {path}: cannot read: {exc}") from None
    return out
