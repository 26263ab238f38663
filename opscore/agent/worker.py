"""The Agent worker itself: registration, the connection in either shape
(work stream or SubscribeTasks), running handlers, delivering results, and the
shutdown (the package's docstring has the whole story)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import inspect
import logging
import os
import random
import signal
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from opscore_proto.v1 import common_pb2, dispatch_pb2, lifecycle_pb2

from opscore.agent.context import TaskContext
from opscore.agent.failures import NonRetryableError, failure_details
from opscore.agent.state import CLOSING_WAIT, StateReporter
from opscore.client import OpsCoreClient, TLSConfig
from opscore.client._tracing import handler_span, record_failure
from opscore.client._workstream import Outbox, WorkStream, error_from_result, on_refusal
from opscore.client.convert import Seconds, to_datetime, to_struct
from opscore.client.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    OpsCoreError,
    UnauthenticatedError,
    UnavailableError,
    connection_problem,
)

log = logging.getLogger("opscore.agent")

#: A task handler: takes the `TaskContext`, returns the output (sync or async).
Handler = Callable[["TaskContext"], Any]
H = TypeVar("H", bound=Handler)

_IDLE = lifecycle_pb2.AGENT_STATE_IDLE
_ACTIVE = lifecycle_pb2.AGENT_STATE_ACTIVE
_FINISHED = lifecycle_pb2.AGENT_STATE_FINISHED
# Finished attempts remembered against stale re-sent assignments (a re-send
# follows a reconnect by moments; this bounds the memory).
_FINISHED_REMEMBERED = 4096
#: The shapes an agent can work in (see DispatchService in the protos).
TRANSPORTS = ("connect", "subscribe")
# Errors that reconnecting cannot fix: `run()` raises them.
_FATAL = ("UNAUTHENTICATED", "PERMISSION_DENIED", "INVALID_ARGUMENT", "UNIMPLEMENTED")
# A result whose lease has passed by our clock is still sent (the server's
# clock decides): its answer is awaited at least this long.
_MIN_ANSWER_WAIT = 5.0


class _StreamGone(Exception):
    """The work stream has ended for good (deregistered, shut down): send the
    item with the unary call instead."""


class _DefaultHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """stderr for the `opscore` logger of an application that configured no
    logging; silent once a root handler exists (no line is printed twice)."""

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            return
        super().emit(record)


def _default_logging() -> None:
    root, ours = logging.getLogger(), logging.getLogger("opscore")
    if root.handlers or ours.handlers:
        return
    handler = _DefaultHandler()
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    ours.addHandler(handler)


def _seconds(value: Seconds) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


class _Backoff:
    """Jittered exponential waits: `next()` returns the next one in seconds."""

    def __init__(self, initial: float = 0.1, maximum: float = 10.0) -> None:
        self.initial, self.maximum = initial, maximum
        self._step = initial

    def next(self) -> float:
        step = self._step
        self._step = min(self.maximum, self._step * 2)
        return random.uniform(step / 2, step)

    def reset(self) -> None:
        self._step = self.initial


@dataclass(eq=False)
class _Held:
    ctx: TaskContext
    runner: asyncio.Task[None]


class Agent:
    """A worker that runs task handlers for Ops-Core.

    Register handlers with the `task` decorator, then `await agent.run()` (or
    `agent.run_sync()`); see the module documentation for what happens.

    `name`, `version`, `metadata` and `contact_endpoint` describe the agent in
    the registry. `agent_id` should be stable across restarts of the same
    agent (default `$OPSCORE_AGENT_ID`; when neither is set the server
    generates one on each start). `target` (HOST:PORT, or several replicas as a
    list or comma-separated: the agent moves to the next one when its replica is
    unavailable) and `api_key` default to `$OPSCORE_TARGET` and
    `$OPSCORE_API_KEY`, `tls` (a `TLSConfig`, True or False) to the
    `OPSCORE_TLS*` variables; pass `client` to use one you
    manage instead. `max_in_flight` is how many tasks run at once.
    `shutdown_timeout` is how long a graceful shutdown waits for running
    tasks. `liveness_interval` is how often the agent proves it is alive while
    it has no subscription open (finishing tasks during shutdown); keep it
    below the server's agent timeout (30 s by default). `startup_timeout` is
    how long `run()` waits for an unreachable server at start before raising
    `UnavailableError`: None (the default) waits for as long as it takes, so
    agents and server can start in any order; 0 gives up after the client's
    own retries (a few seconds). `transport` is the shape the agent works in:
    "connect" (the default: one work stream carries assignments, results,
    heartbeats and state reports) or "subscribe" (SubscribeTasks, with a unary
    call per result and heartbeat, for servers or proxies without
    bidirectional streams).
    """

    def __init__(
        self,
        name: str = "",
        *,
        agent_id: str | None = None,
        target: str | Sequence[str] | None = None,
        api_key: str | None = None,
        tls: bool | TLSConfig | None = None,
        version: str = "",
        metadata: Mapping[str, str] | None = None,
        contact_endpoint: str = "",
        max_in_flight: int = 1,
        shutdown_timeout: Seconds = 30.0,
        liveness_interval: Seconds = 10.0,
        startup_timeout: Seconds | None = None,
        client: OpsCoreClient | None = None,
        env: Mapping[str, str] | None = None,
        transport: str = "connect",
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, not {transport!r}")
        self.transport = transport
        env = os.environ if env is None else env
        self.name = name
        self.agent_id: str = agent_id or env.get("OPSCORE_AGENT_ID", "")
        self.version = version
        self.metadata = dict(metadata or {})
        self.contact_endpoint = contact_endpoint
        self.max_in_flight = max_in_flight
        self.shutdown_timeout = _seconds(shutdown_timeout)
        self.liveness_interval = _seconds(liveness_interval)
        self.startup_timeout = None if startup_timeout is None else _seconds(startup_timeout)
        self._joined_once = False
        self._client_args = (target, api_key, tls, env)
        self._given_client = client
        #: The client the agent talks through (created by `run()` unless given).
        self.client: OpsCoreClient = client or OpsCoreClient(
            target, api_key=api_key, tls=tls, env=env
        )
        self._handlers: dict[str, Handler] = {}
        self._held: dict[str, _Held] = {}
        # The last attempt of each task this agent finished, most recent last: an
        # assignment of one of them, re-sent after a reconnect, can arrive after
        # the result's answer (the unary answer and the task stream are separate
        # calls) and must not run the attempt again.
        self._finished: OrderedDict[str, int] = OrderedDict()
        self._running = False
        self._stopping = False
        self._forced = False
        self._deregistered = False
        self._stop_event: asyncio.Event | None = None
        self._done: asyncio.Event | None = None
        self._sub_task: asyncio.Task[Any] | None = None
        # The work stream: what the agent says on it, until answered; the stream
        # open now (None between streams); set when the agent half-closes.
        self._outbox: Outbox | None = None
        self._stream: WorkStream | None = None
        self._half_close = asyncio.Event()
        self._finished_reported = False
        self._reporter: StateReporter | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._stragglers: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ handlers

    def task(self, capability: str) -> Callable[[H], H]:
        """Decorator: run the function for tasks needing `capability`.

        The function takes a `TaskContext` and returns the output; it may be
        `async def` (runs on the event loop) or a plain function (runs in a
        thread). The agent registers every capability it has a handler for.
        """

        def register(fn: H) -> H:
            self.add_handler(capability, fn)
            return fn

        return register

    def add_handler(self, capability: str, handler: Handler) -> None:
        """Like the `task` decorator, as a call."""
        if not capability:
            raise ValueError("capability must not be empty")
        if capability in self._handlers:
            raise ValueError(f"a handler for {capability!r} is already registered")
        if self._running:
            raise RuntimeError("add handlers before the agent runs")
        self._handlers[capability] = handler

    @property
    def capabilities(self) -> list[str]:
        """The capabilities the agent registers: those it has handlers for."""
        return sorted(self._handlers)

    @property
    def in_flight(self) -> int:
        """How many tasks the agent holds right now."""
        return len(self._held)

    def _handler_for(self, task: dispatch_pb2.Task) -> Handler | None:
        # A task pinned to this agent may carry no capability: fall back to its
        # name, its workflow task id, or the only handler there is.
        for key in (task.capability, task.name, task.workflow_task_id):
            if key and key in self._handlers:
                return self._handlers[key]
        if not task.capability and len(self._handlers) == 1:
            return next(iter(self._handlers.values()))
        return None

    # ------------------------------------------------------------------ running

    def run_sync(self) -> None:
        """Run the agent until it is shut down (SIGTERM/SIGINT), blocking: the
        entry point of an agent script.

        When the server refuses the API key, or cannot be reached at start
        (with a `startup_timeout`), it exits the program with status 1 and one
        line on stderr saying what to fix, instead of a traceback. Use
        `await run()` to handle those errors yourself.
        """
        try:
            asyncio.run(self.run())
        except (UnauthenticatedError, UnavailableError) as exc:
            problem = connection_problem(exc, self.client.target) or str(exc)
            raise SystemExit(f"opscore agent {self.agent_id or self.name}: {problem}") from None

    async def run(self, *, handle_signals: bool = True) -> None:
        """Run until `shutdown()`, a signal (when `handle_signals` and on the main
        thread) or deregistration. Raises `OpsCoreError` for errors that
        retrying cannot fix (e.g. a rejected API key)."""
        if not self._handlers:
            raise ValueError("register at least one handler with @agent.task(...) first")
        if self._running:
            raise RuntimeError("the agent is already running")
        _default_logging()
        self._running = True
        self._done = asyncio.Event()
        if self._given_client is None and self.client.closed:
            target, api_key, tls, env = self._client_args
            self.client = OpsCoreClient(target, api_key=api_key, tls=tls, env=env)
        self._stop_event = asyncio.Event()
        if self._stopping:
            self._stop_event.set()
        self._outbox = Outbox() if self.transport == "connect" else None
        self._half_close = asyncio.Event()
        self._finished_reported = False
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.max_in_flight, thread_name_prefix="opscore-handler"
        )
        loop = asyncio.get_running_loop()
        signals = self._install_signals(loop) if handle_signals else []
        graceful_end = False
        try:
            if await self._join():
                assert self._reporter is not None
                self._reporter.start()
                await self._work()
            graceful_end = True
        finally:
            for sig in signals:
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(sig)
            await self._finish(graceful_end)

    def request_shutdown(self, *, graceful: bool = True) -> None:
        """Ask the agent to stop (callable from a signal handler or another
        task): stop taking work, finish held tasks, report FINISHED. Called
        again, or with `graceful=False`, it stops waiting for running tasks."""
        if self._stopping or not graceful:
            self._force()
        self._stopping = True
        if self._stop_event is not None:
            self._stop_event.set()
        if self._sub_task is not None and self.transport == "subscribe":
            self._sub_task.cancel()  # the work stream stays open to carry the results

    async def shutdown(self, *, graceful: bool = True) -> None:
        """`request_shutdown()`, then wait until `run()` has finished."""
        self.request_shutdown(graceful=graceful)
        if self._running and self._done is not None:
            await self._done.wait()

    def _force(self) -> None:
        self._forced = True
        for held in list(self._held.values()):
            held.ctx._cancel("agent shutting down", "shutdown")

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> list[signal.Signals]:
        if threading.current_thread() is not threading.main_thread():
            return []
        installed = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
            except (NotImplementedError, RuntimeError, ValueError):  # e.g. not on Unix
                continue
            installed.append(sig)
        return installed

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._stopping:
            log.warning("%s again: cancelling %d running task(s)", sig.name, len(self._held))
        else:
            log.info(
                "%s: no new work; finishing %d task(s), then exiting", sig.name, len(self._held)
            )
        self.request_shutdown()

    async def _pause(self, seconds: float) -> None:
        """Wait `seconds`, or less if a shutdown is requested."""
        assert self._stop_event is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_event.wait(), seconds)

    async def _join(self) -> bool:
        """Register (an upsert) and report IDLE, retrying while the server is
        unreachable. False if a shutdown came first or the agent is
        deregistered. A FINISHED agent from an earlier run gets no work until it
        reports IDLE, hence the report."""
        backoff = _Backoff()
        loop = asyncio.get_running_loop()
        give_up = (
            None
            if self._joined_once or self.startup_timeout is None
            else loop.time() + self.startup_timeout
        )
        while not self._stopping:
            try:
                agent = await self.client.register_agent(
                    self.agent_id,
                    name=self.name,
                    version=self.version,
                    capabilities=self.capabilities,
                    contact_endpoint=self.contact_endpoint,
                    metadata=self.metadata,
                )
                self.agent_id = agent.agent_id
                if self._reporter is None:
                    self._reporter = StateReporter(self)
                await self._reporter.send(_ACTIVE if self._held else _IDLE, unary=True)
            except (UnavailableError, NotFoundError) as exc:
                delay = backoff.next()
                if (
                    isinstance(exc, UnavailableError)
                    and give_up is not None
                    and loop.time() + delay > give_up
                ):
                    raise
                log.warning("server %s: %s; retrying in %.1fs", self.client.target, exc, delay)
                await self._pause(delay)
                continue
            except FailedPreconditionError as exc:  # deregistered meanwhile
                log.warning("cannot report IDLE: %s", exc)
                self._deregistered = True
                return False
            self._joined_once = True
            log.info(
                "agent %s registered with capabilities %s",
                self.agent_id,
                ", ".join(self.capabilities),
            )
            return True
        return False

    async def _work(self) -> None:
        """Work until shutdown or deregistration, in the agent's transport."""
        if self.transport == "subscribe":
            await self._work_subscribed()
        else:
            await self._work_connected()

    def _ended(self, exc: BaseException | None) -> bool:
        """Handle how a stream ended, the same for both shapes: True to open a
        new one. Raises the errors that retrying cannot fix."""
        if exc is None or isinstance(exc, FailedPreconditionError):
            if exc is None:
                log.info("agent %s was deregistered; stopping", self.agent_id)
            else:
                log.info("agent %s is deregistered: %s", self.agent_id, exc)
            self._deregistered = True
            self._force()
            return False
        if not isinstance(exc, OpsCoreError) or exc.code.name in _FATAL:
            raise exc
        return True

    async def _work_subscribed(self) -> None:
        """Hold a subscription open until shutdown or deregistration."""
        backoff = _Backoff()
        loop = asyncio.get_running_loop()
        while not self._stopping:
            started = loop.time()
            self._sub_task = asyncio.create_task(self._consume(), name="opscore-agent-stream")
            try:
                await asyncio.wait({self._sub_task})
            except asyncio.CancelledError:
                self._sub_task.cancel()
                raise
            sub, self._sub_task = self._sub_task, None
            if sub.cancelled():
                return  # shutdown requested: stop taking work
            exc = sub.exception()
            if loop.time() - started > 5.0:
                backoff.reset()
            if isinstance(exc, NotFoundError):
                log.warning("the server does not know agent %s; registering again", self.agent_id)
                if not await self._join():
                    return
                continue
            if not self._ended(exc):
                return
            delay = backoff.next()
            log.warning("task stream ended (%s); reconnecting in %.1fs", exc, delay)
            await self._pause(delay)

    async def _consume(self) -> str:
        stream = self.client.subscribe_tasks(self.agent_id, max_in_flight=self.max_in_flight)
        async with contextlib.aclosing(stream):
            async for message in stream:
                kind = message.WhichOneof("message")
                if kind == "assignment":
                    self._accept(message.assignment.task, message.assignment.trace_context)
                elif kind == "cancellation":
                    self._cancelled(message.cancellation)
        return "deregistered"

    def _cancelled(self, c: dispatch_pb2.TaskCancellation) -> None:
        held = self._held.get(c.task_id)
        if held is not None and held.ctx.attempt == c.attempt:
            log.info("task %s cancelled: %s", c.task_id, c.reason)
            held.ctx._cancel(c.reason or "cancelled", "server")

    # ------------------------------------------------------------------ work stream

    def _streaming(self) -> bool:
        """True while results go on the work stream (it may be reconnecting)."""
        return self._outbox is not None and not self._outbox.closed

    async def _work_connected(self) -> None:
        """Keep the work stream until shutdown or deregistration; on shutdown,
        end it gracefully (`_drain`)."""
        assert self._stop_event is not None
        connection = asyncio.create_task(self._connection(), name="opscore-agent-stream")
        self._sub_task = connection
        stop = asyncio.create_task(self._stop_event.wait())
        try:
            await asyncio.wait({connection, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not connection.done():
                await self._drain(connection)
            if connection.done():
                connection.result()  # raise what ended it
        finally:
            stop.cancel()
            connection.cancel()
            self._sub_task = None

    async def _connection(self) -> None:
        """Open the work stream, and again whenever it breaks, until the agent
        half-closes it or is deregistered. When it returns, nothing more goes on
        a stream: whatever waits for an answer is sent with unary calls."""
        assert self._outbox is not None
        backoff = _Backoff()
        loop = asyncio.get_running_loop()
        try:
            while not self._half_close.is_set():
                started = loop.time()
                try:
                    await self._stream_once()
                    exc: OpsCoreError | None = None
                except OpsCoreError as error:
                    exc = error
                if self._half_close.is_set():
                    return  # our own graceful end (or as good as it gets)
                if loop.time() - started > 5.0:
                    backoff.reset()
                if isinstance(exc, NotFoundError):
                    if self._stopping:
                        log.warning("the server no longer knows agent %s", self.agent_id)
                        return
                    log.warning(
                        "the server does not know agent %s; registering again", self.agent_id
                    )
                    if not await self._join():
                        return
                    continue
                if not self._ended(exc):
                    return
                delay = backoff.next()
                log.warning("work stream ended (%s); reconnecting in %.1fs", exc, delay)
                if self._stopping:
                    await asyncio.sleep(delay)  # results still to deliver: no shortcut
                else:
                    await self._pause(delay)
        finally:
            self._outbox.close()

    async def _stream_once(self) -> None:
        """One work stream, from hello to its end: returns when the server
        ended it with OK, raises how else it ended."""
        assert self._outbox is not None
        stream = self.client.connect(self.agent_id, max_in_flight=self.max_in_flight)
        writer: asyncio.Task[None] | None = None
        try:
            accepted = await stream.open()
            log.info(
                "agent %s work stream open (max_in_flight %d)",
                self.agent_id,
                accepted.max_in_flight,
            )
            self._stream = stream
            self._outbox.rewind()
            if self._stopping:
                self._pause_stream()
            writer = asyncio.create_task(self._write(stream), name="opscore-agent-writer")
            # Read without pause: the server stops reading an agent that does
            # not read, so nothing here may wait.
            while (messages := await stream.read()) is not None:
                for message in messages:
                    kind = message.WhichOneof("message")
                    if kind == "result":
                        self._outbox.resolve(message.result)
                    elif kind == "assignment":
                        self._accept(message.assignment.task, message.assignment.trace_context)
                    elif kind == "cancellation":
                        self._cancelled(message.cancellation)
        finally:
            self._stream = None
            if writer is not None:
                writer.cancel()
            stream.cancel()

    async def _write(self, stream: WorkStream) -> None:
        """Send whatever the outbox holds, all of it in one message, as soon as
        the previous write is done; half-close once the outbox has ended."""
        assert self._outbox is not None
        try:
            while batch := await self._outbox.take():
                await stream.send(batch)
            if self._half_close.is_set():
                await stream.done_writing()
        except OpsCoreError:
            pass  # the stream broke: its reader says how

    def _pause_stream(self) -> None:
        """Ask for no more assignments (capacity 0), ahead of anything queued."""
        assert self._outbox is not None
        item = dispatch_pb2.AgentMessage(capacity=dispatch_pb2.StreamCapacity(max_in_flight=0))
        on_refusal(
            self._outbox.submit(item, first=True),
            lambda exc: log.warning("the server refused to pause the work stream: %s", exc),
        )

    async def _ask(
        self, message: dispatch_pb2.AgentMessage, deadline: datetime | None = None
    ) -> dispatch_pb2.AgentMessageResult:
        """Send `message` on the work stream and wait for its answer; raise the
        error a unary call would have raised when it is refused. `deadline`:
        give up then (DeadlineExceededError), though never sooner than
        `_MIN_ANSWER_WAIT` from now (the server's clock decides, not ours).
        Raises `_StreamGone` when no stream will carry it."""
        assert self._outbox is not None
        if deadline is not None:
            deadline = max(deadline, datetime.now(UTC) + timedelta(seconds=_MIN_ANSWER_WAIT))
        future = self._outbox.submit(message)
        try:
            while not future.done():
                timeout = None
                if deadline is not None:
                    timeout = (deadline - datetime.now(UTC)).total_seconds()
                    if timeout <= 0:
                        raise DeadlineExceededError("no answer on the work stream in time")
                await asyncio.wait({future}, timeout=timeout)
        finally:
            if not future.done():
                self._outbox.withdraw(message.id)
        result = future.result()
        if result is None:
            raise _StreamGone
        error = error_from_result(result)
        if error is not None:
            raise error
        return result

    async def _drain(self, connection: asyncio.Task[None]) -> None:
        """The graceful end of the work stream: no new work, the held tasks
        finished and their results sent on it, FINISHED reported, half-closed,
        and the server's end of the stream awaited."""
        assert self._outbox is not None
        if self._stream is not None:
            self._pause_stream()
        await self._wait_for_running(graceful=True, keep_alive=False)
        if self._reporter is not None:
            await self._reporter.close()
        if not self._deregistered and not connection.done():
            report = dispatch_pb2.AgentMessage(
                state_report=dispatch_pb2.AgentStateReport(
                    state=_FINISHED, details=to_struct({"reason": "shutdown"}, "details")
                )
            )
            until = datetime.now(UTC) + timedelta(seconds=CLOSING_WAIT)
            try:
                await self._ask(report, until)
                self._finished_reported = True
                log.info("agent %s finished", self.agent_id)
            except (OpsCoreError, _StreamGone) as exc:
                log.debug("FINISHED not reported on the work stream: %r", exc)
        self._half_close.set()
        self._outbox.end()
        _, pending = await asyncio.wait({connection}, timeout=CLOSING_WAIT)
        if pending:
            log.warning("the server did not end the work stream; closing it")
            connection.cancel()
            await asyncio.wait({connection})

    async def _report_state(self, state: int, details: Mapping[str, Any] | None) -> None:
        if self._streaming():
            item = dispatch_pb2.AgentMessage(
                state_report=dispatch_pb2.AgentStateReport(
                    state=state,  # type: ignore[arg-type]
                    details=to_struct(details, "details"),
                )
            )
            with contextlib.suppress(_StreamGone):
                await self._ask(item)
                return
        await self.client.report_state(self.agent_id, state, details=details)

    # ------------------------------------------------------------------ tasks

    def _accept(
        self, task: dispatch_pb2.Task, trace_context: Mapping[str, str] | None = None
    ) -> None:
        if self._finished.get(task.task_id, 0) >= task.attempt:
            log.debug("task %s attempt %d: already finished here", task.task_id, task.attempt)
            return
        held = self._held.get(task.task_id)
        if held is not None:
            if held.ctx.attempt >= task.attempt:
                return  # a repeat of an assignment we already run
            held.ctx._cancel(f"superseded by attempt {task.attempt}", "server")
        ctx = TaskContext(self, task)
        ctx.trace_context = dict(trace_context or {})
        runner = asyncio.create_task(self._execute(ctx), name=f"opscore-task-{task.task_id}")
        self._held[task.task_id] = _Held(ctx, runner)
        self._load_changed()
        if self._forced:
            ctx._cancel("agent shutting down", "shutdown")

    def _load_changed(self) -> None:
        if self._reporter is not None and not self._stopping:
            self._reporter.want(_ACTIVE if self._held else _IDLE)

    async def _call(self, handler: Handler, ctx: TaskContext) -> Any:
        if inspect.iscoroutinefunction(handler):
            return await handler(ctx)
        loop = asyncio.get_running_loop()
        call = functools.partial(contextvars.copy_context().run, handler, ctx)
        result = await loop.run_in_executor(self._executor, call)
        if inspect.isawaitable(result):
            result = await result
        return result

    async def _execute(self, ctx: TaskContext) -> None:
        # With OpenTelemetry: the whole attempt (handler, heartbeats, result call)
        # runs in a child span of the attempt's span from the assignment.
        with handler_span(ctx.task, ctx.trace_context, self.agent_id):
            await self._run_attempt(ctx)

    async def _run_attempt(self, ctx: TaskContext) -> None:
        log.info("task %s (%s) attempt %d started", ctx.task_id, ctx.capability, ctx.attempt)
        heartbeats = asyncio.create_task(self._heartbeats(ctx), name=f"opscore-hb-{ctx.task_id}")
        try:
            handler = self._handler_for(ctx.task)
            if handler is None:
                await self._send_failure(
                    ctx,
                    f"agent {self.agent_id} has no handler for capability {ctx.capability!r}",
                    "NoHandler",
                    None,
                    non_retryable=True,
                )
                return
            work = asyncio.ensure_future(self._call(handler, ctx))
            ctx._work = work
            if ctx.cancelled:
                work.cancel()
            try:
                await asyncio.wait({work})
            finally:
                if not work.done():
                    work.cancel()  # the runner itself was cancelled: hard stop
            # Let a heartbeat in flight finish rather than cancel it: a cancelled
            # call can take concurrent calls down with it on the server.
            ctx._stop_heartbeats()
            await asyncio.wait({heartbeats}, timeout=2.0)
            if work.cancelled():
                if ctx._cancel_kind == "shutdown":
                    await self._send_failure(
                        ctx, "the agent shut down before the task finished", "AgentShutdown", None
                    )
                else:
                    log.info("task %s stopped: %s", ctx.task_id, ctx.cancel_reason)
                return
            exc = work.exception()
            if exc is not None:
                record_failure(exc)
                await self._report_exception(ctx, exc)
                return
            await self._send_output(ctx, work.result())
        finally:
            ctx._stop_heartbeats()
            if not heartbeats.done():
                self._stragglers.add(heartbeats)
                heartbeats.add_done_callback(self._stragglers.discard)
            held = self._held.get(ctx.task_id)
            if held is not None and held.ctx is ctx:
                del self._held[ctx.task_id]
            self._remember_finished(ctx.task_id, ctx.attempt)
            self._load_changed()

    def _remember_finished(self, task_id: str, attempt: int) -> None:
        finished = self._finished
        finished[task_id] = max(attempt, finished.pop(task_id, 0))
        if len(finished) > _FINISHED_REMEMBERED:
            finished.popitem(last=False)

    async def _report_exception(self, ctx: TaskContext, exc: BaseException) -> None:
        retryable = not isinstance(exc, NonRetryableError)
        extra = exc.details if isinstance(exc, NonRetryableError) else {}
        details = failure_details(exc, extra)
        if isinstance(exc, NonRetryableError):
            error_type = exc.error_type or type(exc).__name__
        else:
            error_type = type(exc).__name__
        message = str(exc) or error_type
        log.warning(
            "task %s (%s) attempt %d failed%s: %s: %s",
            ctx.task_id,
            ctx.capability or ctx.name,
            ctx.attempt,
            "" if retryable else " for good",
            error_type,
            message,
            exc_info=exc,
            extra={"task_id": ctx.task_id, "attempt": ctx.attempt},
        )
        await self._send_failure(
            ctx, message, error_type, details, non_retryable=isinstance(exc, NonRetryableError)
        )

    async def _send_output(self, ctx: TaskContext, result: Any) -> None:
        if result is None:
            output: dict[str, Any] | None = None
        elif isinstance(result, Mapping):
            output = dict(result)
        else:
            output = {"result": result}
        try:
            struct = to_struct(output, "output")
        except TypeError as exc:
            await self._invalid_output(ctx, f"the handler's output is not JSON-like: {exc}")
            return
        refused = await self._deliver(
            ctx,
            "result",
            lambda: dispatch_pb2.AgentMessage(
                completion=dispatch_pb2.TaskCompletion(
                    task_id=ctx.task_id, attempt=ctx.attempt, output=struct
                )
            ),
            lambda: self.client.complete_task(ctx.task_id, self.agent_id, ctx.attempt, struct),
        )
        if refused is None:
            log.info("task %s attempt %d completed", ctx.task_id, ctx.attempt)
        elif isinstance(refused, InvalidArgumentError):
            # JSON-like but still refused (too large, too deep): fail it, or the
            # attempt would linger until its lease ends.
            await self._invalid_output(
                ctx, f"the server refused the handler's output: {refused.message}"
            )

    async def _invalid_output(self, ctx: TaskContext, message: str) -> None:
        log.warning(
            "task %s (%s) attempt %d failed for good: %s",
            ctx.task_id,
            ctx.capability or ctx.name,
            ctx.attempt,
            message,
            extra={"task_id": ctx.task_id, "attempt": ctx.attempt},
        )
        await self._send_failure(ctx, message, "InvalidOutput", None, non_retryable=True)

    async def _send_failure(
        self,
        ctx: TaskContext,
        message: str,
        error_type: str,
        details: Mapping[str, Any] | None,
        *,
        non_retryable: bool = False,
    ) -> None:
        refused = await self._deliver(
            ctx,
            "failure",
            lambda: dispatch_pb2.AgentMessage(
                failure=dispatch_pb2.TaskFailure(
                    task_id=ctx.task_id,
                    attempt=ctx.attempt,
                    error=common_pb2.TaskError(
                        message=message,
                        type=error_type,
                        details=to_struct(details, "details"),
                    ),
                    non_retryable=non_retryable,
                )
            ),
            lambda: self.client.fail_task(
                ctx.task_id,
                self.agent_id,
                ctx.attempt,
                message,
                error_type=error_type,
                details=details,
                non_retryable=non_retryable,
            ),
        )
        if isinstance(refused, InvalidArgumentError):
            log.error("could not send failure of task %s: %s", ctx.task_id, refused)

    async def _deliver(
        self,
        ctx: TaskContext,
        what: str,
        item: Callable[[], dispatch_pb2.AgentMessage],
        call: Callable[[], Awaitable[Any]],
    ) -> OpsCoreError | None:
        """Send a result (the work stream's `item`, or the unary `call`),
        outlasting a server restart: keep trying while the lease may still hold
        (results are idempotent). A fenced answer means the attempt no longer
        counts. Returns None if the server took it, else why not (an
        InvalidArgumentError is the caller's to report)."""
        backoff = _Backoff(0.5, 5.0)
        while True:
            try:
                if self._streaming():
                    await self._ask(item(), ctx.lease_expire_time)
                else:
                    await call()
                return None
            except _StreamGone:
                continue  # the stream ended for good: the unary call, now
            except (FailedPreconditionError, NotFoundError) as exc:
                log.warning(
                    "%s of task %s attempt %d ignored by the server: %s",
                    what,
                    ctx.task_id,
                    ctx.attempt,
                    exc,
                )
                return exc
            except (UnavailableError, DeadlineExceededError) as exc:
                lease = ctx.lease_expire_time
                if self._forced or (lease is not None and lease <= datetime.now(UTC)):
                    log.error("could not send %s of task %s: %s", what, ctx.task_id, exc)
                    return exc
                log.warning("sending %s of task %s failed (%s); retrying", what, ctx.task_id, exc)
                await asyncio.sleep(backoff.next())
            except InvalidArgumentError as exc:
                return exc
            except OpsCoreError as exc:
                log.error("could not send %s of task %s: %s", what, ctx.task_id, exc)
                return exc

    async def _heartbeat(
        self, ctx: TaskContext, progress: dict[str, Any] | None
    ) -> tuple[datetime | None, bool]:
        """One heartbeat: the new end of the lease, and whether the task was
        cancelled."""
        if self._streaming():
            item = dispatch_pb2.AgentMessage(
                heartbeat=dispatch_pb2.TaskHeartbeat(
                    task_id=ctx.task_id,
                    attempt=ctx.attempt,
                    progress=to_struct(progress, "progress"),
                )
            )
            with contextlib.suppress(_StreamGone):
                result = await self._ask(item)
                return to_datetime(result, "lease_expire_time"), result.cancel_requested
        resp = await self.client.heartbeat_task(ctx.task_id, self.agent_id, ctx.attempt, progress)
        return to_datetime(resp, "lease_expire_time"), resp.cancel_requested

    async def _heartbeats(self, ctx: TaskContext) -> None:
        """Keep the lease alive and carry progress, until the runner cancels it."""
        timeout = ctx.heartbeat_timeout
        interval = max(0.05, timeout.total_seconds() / 3) if timeout else None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ctx._wake.wait(), interval)
            ctx._wake.clear()
            if ctx._handler_done:
                return
            progress = ctx._take_progress()
            try:
                lease, cancel_requested = await self._heartbeat(ctx, progress)
            except (FailedPreconditionError, NotFoundError) as exc:
                ctx._cancel(f"lease lost: {exc.message}", "server")
                return
            except OpsCoreError as exc:
                log.warning("heartbeat of task %s failed: %s", ctx.task_id, exc)
                ctx._restore_progress(progress)
                continue
            if cancel_requested:
                ctx._cancel("cancelled", "server")
                return
            if lease is not None:
                ctx.lease_expire_time = lease

    # ------------------------------------------------------------------ shutdown

    async def _keep_alive(self, stop: asyncio.Event) -> None:
        """Prove liveness while finishing tasks with no subscription open."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.liveness_interval)
            if stop.is_set():
                return
            with contextlib.suppress(OpsCoreError):
                await self.client.heartbeat(self.agent_id)

    async def _wait_for_running(self, *, graceful: bool, keep_alive: bool) -> None:
        """Let the held tasks finish (and send their results) for up to
        `shutdown_timeout`, then cancel them; at once unless `graceful`.
        `keep_alive`: prove liveness meanwhile (no stream is open)."""
        if not self._held:
            return
        if graceful and not self._forced:
            log.info("waiting for %d running task(s)", len(self._held))
        stop_keep_alive = asyncio.Event()
        keeper = asyncio.create_task(self._keep_alive(stop_keep_alive)) if keep_alive else None
        try:
            runners = {h.runner for h in self._held.values()}
            if not graceful:
                for held in list(self._held.values()):
                    held.runner.cancel()
            _, pending = await asyncio.wait(runners, timeout=self.shutdown_timeout)
            if pending:
                log.warning(
                    "%d task(s) still running after %.0fs; cancelling them",
                    len(pending),
                    self.shutdown_timeout,
                )
                self._force()
                await asyncio.wait(pending, timeout=10.0)
        finally:
            if keeper is not None:
                stop_keep_alive.set()
                await asyncio.wait({keeper}, timeout=2.0)

    async def _finish(self, graceful: bool) -> None:
        try:
            await self._wait_for_running(graceful=graceful, keep_alive=True)
            if self._reporter is not None:
                await self._reporter.close()
                if graceful and not self._deregistered and not self._finished_reported:
                    try:
                        await self._reporter.send(_FINISHED, {"reason": "shutdown"}, unary=True)
                        log.info("agent %s finished", self.agent_id)
                    except OpsCoreError as exc:
                        log.warning("could not report FINISHED: %s", exc)
        finally:
            if self._outbox is not None:
                self._outbox.close()
            for held in list(self._held.values()):
                held.runner.cancel()
            for task in list(self._stragglers):
                task.cancel()
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
            if self._given_client is None:
                await self.client.close()
            self._running = False
            if self._done is not None:
                self._done.set()
