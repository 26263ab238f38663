"""The asyncio client: one method per RPC, Python-native arguments, typed errors."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Generic, TypeVar

import grpc
import grpc.aio
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opscore_proto.v1 import (
    common_pb2,
    dispatch_pb2,
    dispatch_pb2_grpc,
    lifecycle_pb2,
    lifecycle_pb2_grpc,
    workflow_pb2,
    workflow_pb2_grpc,
)

from opscore.client._resume import AgentWatchState
from opscore.client._tracing import trace_metadata
from opscore.client._workstream import WorkStream, hello
from opscore.client.convert import (
    Seconds,
    enum_value,
    to_duration,
    to_struct,
    to_timestamp,
)
from opscore.client.errors import ResourceExhaustedError, UnavailableError, error_from_rpc
from opscore.client.tls import TLSConfig, resolve_tls

log = logging.getLogger("opscore.client")

# UNAVAILABLE reasons that come from a healthy server: retried, not failed over.
_SERVER_FINE = frozenset({"IDEMPOTENCY_KEY_BUSY", "DEFINITION_BUSY"})

T = TypeVar("T")
Req = TypeVar("Req")
Resp = TypeVar("Resp")

DEFAULT_TARGET = "127.0.0.1:50051"

#: Structs given as dicts or as messages.
StructLike = Mapping[str, Any] | struct_pb2.Struct

# Client keepalive, kept within what the server permits (opscore.config: the server
# pings every 30 s, waits 10 s for the ack, and accepts client pings no more often
# than every 10 s, cutting off a client after 2 "ping strikes" with GOAWAY
# ENHANCE_YOUR_CALM). We ping every 30 s (>= 10 s), allow pings on an idle
# connection (the server permits it: keepalive_permit_without_calls), and never
# limit pings without data (max_pings_without_data 0) so a quiet task stream is
# still checked. Reconnect backoff starts low so a restarted server is found fast.
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 5_000),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
)


@dataclass(frozen=True, slots=True)
class RetryConfig:
    """How the client retries a call that failed with UNAVAILABLE.

    Only calls that are safe to repeat are retried (see `OpsCoreClient`). The
    n-th wait is drawn uniformly between half and all of
    `initial_backoff * multiplier**(n-1)`, capped at `max_backoff` ("equal
    jitter"), so many clients do not come back in lockstep.
    `RetryConfig(max_attempts=1)` turns retries off.
    """

    #: Total attempts, the first included.
    max_attempts: int = 6
    initial_backoff: timedelta = timedelta(milliseconds=100)
    multiplier: float = 2.0
    max_backoff: timedelta = timedelta(seconds=5)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.multiplier < 1.0:
            raise ValueError("multiplier must be at least 1.0")

    def delays(self, *, forever: bool = False) -> Iterator[float]:
        """The jittered waits, in seconds, before each retry: `max_attempts - 1`
        of them, or with `forever` an endless series (streams that reconnect
        until the consumer stops), each at most `max_backoff`."""
        base = self.initial_backoff.total_seconds()
        cap = self.max_backoff.total_seconds()
        n = 0
        while forever or n < self.max_attempts - 1:
            step = min(cap, base * self.multiplier ** min(n, 64))
            yield random.uniform(step / 2, step)
            n += 1


@dataclass(frozen=True, slots=True)
class TaskRetry:
    """The retry policy of a task (what the server does when an attempt fails).

    Fields left at their zero value take the server defaults: 3 attempts, 1 s
    initial backoff, multiplier 2.0, at most 60 s between attempts.
    """

    max_attempts: int = 0
    initial_backoff: Seconds | None = None
    backoff_multiplier: float = 0.0
    max_backoff: Seconds | None = None

    def to_proto(self) -> common_pb2.RetryPolicy:
        return common_pb2.RetryPolicy(
            max_attempts=self.max_attempts,
            initial_backoff=to_duration(self.initial_backoff),
            backoff_multiplier=self.backoff_multiplier,
            max_backoff=to_duration(self.max_backoff),
        )


@dataclass(slots=True)
class Page(Generic[T]):
    """One page of a list call: `items`, and `next_page_token` ("" on the last
    page). Iterating a page iterates its items."""

    items: list[T] = field(default_factory=list)
    next_page_token: str = ""

    def __iter__(self) -> Iterator[T]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


def _retry_policy(
    value: TaskRetry | common_pb2.RetryPolicy | None,
) -> common_pb2.RetryPolicy | None:
    if value is None or isinstance(value, common_pb2.RetryPolicy):
        return value
    return value.to_proto()


def _key(value: str | None) -> str:
    """None: a fresh key (so a retry cannot enqueue twice); "": no key."""
    return uuid.uuid4().hex if value is None else value


def enqueue_request(
    capability: str = "",
    *,
    agent_id: str = "",
    input: StructLike | None = None,
    name: str = "",
    priority: int = 0,
    schedule_time: datetime | None = None,
    delay: Seconds | None = None,
    retry_policy: TaskRetry | common_pb2.RetryPolicy | None = None,
    timeout: Seconds | None = None,
    heartbeat_timeout: Seconds | None = None,
    idempotency_key: str | None = None,
) -> dispatch_pb2.EnqueueTaskRequest:
    """Build an `EnqueueTaskRequest` (for `OpsCoreClient.enqueue_tasks`); the
    arguments are those of `OpsCoreClient.enqueue_task`."""
    return dispatch_pb2.EnqueueTaskRequest(
        name=name,
        capability=capability,
        agent_id=agent_id,
        input=to_struct(input, "input"),
        priority=priority,
        schedule_time=to_timestamp(schedule_time),
        delay=to_duration(delay),
        retry_policy=_retry_policy(retry_policy),
        timeout=to_duration(timeout),
        heartbeat_timeout=to_duration(heartbeat_timeout),
        idempotency_key=_key(idempotency_key),
    )


#: What `_stream(announce_ready=True)` yields once the stream is registered.
STREAM_READY = object()


def parse_targets(target: str | Sequence[str]) -> tuple[str, ...]:
    """`"a:1,b:2"` or `["a:1", "b:2"]` -> ("a:1", "b:2"); refuses an empty list."""
    items = target.split(",") if isinstance(target, str) else list(target)
    targets = tuple(t.strip() for t in items if t.strip())
    if not targets:
        raise ValueError(f"no server target in {target!r}: give HOST:PORT[,HOST:PORT...]")
    return targets


def _now_micros() -> int:
    return int(time.time() * 1_000_000)


class OpsCoreClient:
    """Asyncio client for an Ops-Core server.

        async with OpsCoreClient("127.0.0.1:50051", api_key="...") as client:
            task = await client.enqueue_task("text.summarize", input={"text": "..."})
            print(task.task_id, task.state)

    `target` is HOST:PORT; it defaults to `$OPSCORE_TARGET`, then
    `127.0.0.1:50051`. Several replicas of one deployment may be given, as a
    list or comma-separated (`"a:50051,b:50051"`): the client uses one at a time
    and moves to the next when a call or stream fails with UNAVAILABLE (the
    replica is down, draining, or cannot reach the database), so a retried call
    and a reconnecting stream land on another replica. One DNS name with several
    addresses works too: gRPC tries its addresses in turn.

    `api_key` defaults to `$OPSCORE_API_KEY`; it is sent on every call as
    `authorization: Bearer <key>`. `tls` takes a `TLSConfig` (CA, client
    certificate and key for mTLS), True for TLS with the system roots (or
    `root_certificates`), False for plaintext; by default the `OPSCORE_TLS*`
    variables decide (see `opscore.client.tls`). `timeout` is the deadline of
    each unary call (streams have none). `env` replaces `os.environ` for the
    defaults (tests).

    Every method raises an `opscore.client.errors.OpsCoreError` subclass on
    failure. A call that fails with UNAVAILABLE (server unreachable or
    draining) is retried with jittered exponential backoff (`retry`) when it
    is safe to repeat: every read, `register_agent` (an upsert),
    `report_state`, `heartbeat`, `complete_task`/`fail_task` (repeats are
    answered with the task unchanged), `heartbeat_task`, the cancels,
    `create_workflow_definition` (the same content returns the stored
    definition), and `enqueue_task`/`enqueue_tasks`/`start_workflow`, which
    always carry an idempotency key: when you pass none the client generates
    one (a UUID) per call, so a retry returns the task or session the first
    attempt created instead of making a second. Pass `idempotency_key=""` to
    send none (the call is then not retried). `deregister_agent` and
    `delete_workflow_definition` are never retried.

    The client creates its channel on first use, on the running event loop;
    use it from one event loop. `close()` (or leaving `async with`) closes it.
    """

    def __init__(
        self,
        target: str | Sequence[str] | None = None,
        *,
        api_key: str | None = None,
        tls: bool | TLSConfig | None = None,
        root_certificates: bytes | None = None,
        timeout: Seconds | None = 30.0,
        retry: RetryConfig | None = None,
        channel_options: Iterable[tuple[str, Any]] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        env = os.environ if env is None else env
        self.targets: tuple[str, ...] = parse_targets(
            target or env.get("OPSCORE_TARGET") or DEFAULT_TARGET
        )
        self._current = 0
        key = api_key if api_key is not None else env.get("OPSCORE_API_KEY", "")
        self._auth: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {key}"),) if key else ()
        )
        self._tls = resolve_tls(tls, root_certificates, env)
        self._timeout = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
        self.retry = retry or RetryConfig()
        self._options = [*CHANNEL_OPTIONS, *channel_options]
        # One channel per target, opened on first use and kept: calls still in
        # flight on a replica the client moved away from finish there.
        self._channels: dict[int, grpc.aio.Channel] = {}
        self._stubs_for = -1
        self._closed = False

    # ------------------------------------------------------------------ channel

    @property
    def target(self) -> str:
        """The target in use (one of `targets`)."""
        return self.targets[self._current]

    def _ensure_channel(self) -> int:
        """Open the current target's channel if need be; point the stubs at it.
        Returns the target's index, for `_failover`."""
        if self._closed:
            raise RuntimeError("the client is closed")
        index = self._current
        channel = self._channels.get(index)
        if channel is None:
            target = self.targets[index]
            if self._tls is not None:
                channel = grpc.aio.secure_channel(
                    target,
                    self._tls.credentials(),
                    options=[*self._options, *self._tls.channel_options()],
                )
            else:
                channel = grpc.aio.insecure_channel(target, options=self._options)
            self._channels[index] = channel
        if self._stubs_for != index:
            self._lifecycle = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
            self._dispatch = dispatch_pb2_grpc.DispatchServiceStub(channel)
            self._workflow = workflow_pb2_grpc.WorkflowServiceStub(channel)
            self._health = health_pb2_grpc.HealthStub(channel)
            self._stubs_for = index
        return index

    def _failover(self, index: int) -> None:
        """A call on target `index` failed with UNAVAILABLE: later calls go to the
        next target. Several calls failing together move the client once."""
        if len(self.targets) > 1 and index == self._current:
            self._current = (index + 1) % len(self.targets)
            log.info(
                "target %s is unavailable; moving to %s",
                self.targets[index],
                self.target,
                extra={"from_target": self.targets[index], "to_target": self.target},
            )

    @property
    def closed(self) -> bool:
        """True after `close()`."""
        return self._closed

    async def close(self) -> None:
        """Close the channels; calls in progress are cancelled. Idempotent."""
        self._closed = True
        channels, self._channels = list(self._channels.values()), {}
        self._stubs_for = -1
        for channel in channels:
            await channel.close()

    async def __aenter__(self) -> OpsCoreClient:
        self._ensure_channel()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _metadata(self, request_id: str) -> tuple[tuple[str, str], ...]:
        # The caller's trace context, if it traces: the server's span continues it.
        return (*self._auth, ("x-request-id", request_id), *trace_metadata())

    async def _unary(
        self,
        service: str,
        method: str,
        request: Any,
        *,
        retry: bool,
        timeout: Seconds | None = None,
    ) -> Any:
        """Call a unary RPC; translate errors; retry UNAVAILABLE when `retry`
        (on the next target, when there are several)."""
        request_id = uuid.uuid4().hex
        metadata = self._metadata(request_id)
        deadline = self._timeout if timeout is None else timeout
        if isinstance(deadline, timedelta):
            deadline = deadline.total_seconds()
        delays = self.retry.delays() if retry else iter(())
        attempt = 1
        while True:
            index = self._ensure_channel()
            stub_method: Callable[..., Awaitable[Any]] = getattr(getattr(self, service), method)
            try:
                return await stub_method(request, metadata=metadata, timeout=deadline)
            except grpc.aio.AioRpcError as err:
                error = error_from_rpc(err, request_id=request_id, method=method)
                # A key another replica is handling says nothing about this
                # target's health: retry here.
                if isinstance(error, UnavailableError) and error.reason not in _SERVER_FINE:
                    self._failover(index)
                delay = next(delays, None) if isinstance(error, UnavailableError) else None
                if delay is None:
                    raise error from err
                log.info(
                    "retrying %s after UNAVAILABLE (attempt %d): %s",
                    method,
                    attempt,
                    error.message,
                    extra={"method": method, "attempt": attempt, "request_id": request_id},
                )
                attempt += 1
                await asyncio.sleep(delay)

    async def _stream(
        self,
        service: str,
        method: str,
        request: Any,
        *,
        announce_ready: bool = False,
    ) -> AsyncGenerator[Any, None]:
        """Iterate a server stream; translate errors; cancel the call when the
        consumer stops early. With `announce_ready`, `STREAM_READY` comes first,
        once the server has registered the stream (its initial metadata
        arrived): everything that happens from then on reaches this stream."""
        index = self._ensure_channel()
        request_id = uuid.uuid4().hex
        call = getattr(getattr(self, service), method)(request, metadata=self._metadata(request_id))
        try:
            if announce_ready:
                await call.initial_metadata()
                if not call.done():
                    yield STREAM_READY
            async for message in call:
                yield message
        except grpc.aio.AioRpcError as err:
            error = error_from_rpc(err, request_id=request_id, method=method)
            if isinstance(error, UnavailableError):
                self._failover(index)
            raise error from err
        finally:
            call.cancel()

    async def _pages(
        self, fetch: Callable[[str], Awaitable[Page[T]]], limit: int | None
    ) -> AsyncGenerator[T, None]:
        token, seen = "", 0
        while True:
            page = await fetch(token)
            for item in page.items:
                if limit is not None and seen >= limit:
                    return
                seen += 1
                yield item
            token = page.next_page_token
            if not token:
                return

    # ------------------------------------------------------------------ health

    async def check_health(self, service: str = "") -> str:
        """The server's health for `service` ("" for the server as a whole, or a
        full service name such as "opscore.v1.DispatchService"): "SERVING",
        "NOT_SERVING" (draining) or "SERVICE_UNKNOWN". Needs no API key."""
        resp = await self._unary(
            "_health", "Check", health_pb2.HealthCheckRequest(service=service), retry=True
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))

    # ------------------------------------------------------------------ lifecycle

    async def register_agent(
        self,
        agent_id: str = "",
        *,
        name: str = "",
        version: str = "",
        capabilities: Iterable[str] = (),
        contact_endpoint: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> lifecycle_pb2.Agent:
        """Register an agent, or update it when `agent_id` is known. An empty
        `agent_id` makes the server generate one: keep `agent.agent_id`. A new
        agent starts INITIALIZING; re-registering keeps its state and
        `register_time`. `register_agent_response` also says whether the agent
        was new (`created`)."""
        resp = await self.register_agent_response(
            agent_id,
            name=name,
            version=version,
            capabilities=capabilities,
            contact_endpoint=contact_endpoint,
            metadata=metadata,
        )
        return resp.agent

    async def register_agent_response(
        self,
        agent_id: str = "",
        *,
        name: str = "",
        version: str = "",
        capabilities: Iterable[str] = (),
        contact_endpoint: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> lifecycle_pb2.RegisterAgentResponse:
        """`register_agent`, returning the whole response: `agent`, and
        `created` (False when an existing agent was updated)."""
        return await self._unary(  # type: ignore[no-any-return]
            "_lifecycle",
            "RegisterAgent",
            lifecycle_pb2.RegisterAgentRequest(
                agent_id=agent_id,
                name=name,
                version=version,
                capabilities=list(capabilities),
                contact_endpoint=contact_endpoint,
                metadata=dict(metadata or {}),
            ),
            retry=True,
        )

    async def deregister_agent(self, agent_id: str) -> lifecycle_pb2.Agent:
        """Remove an agent from dispatch; the tasks it holds are retried
        elsewhere and its history is kept. Not retried on UNAVAILABLE."""
        resp = await self._unary(
            "_lifecycle",
            "DeregisterAgent",
            lifecycle_pb2.DeregisterAgentRequest(agent_id=agent_id),
            retry=False,
        )
        return resp.agent  # type: ignore[no-any-return]

    async def get_agent(self, agent_id: str) -> lifecycle_pb2.Agent:
        """One agent. Raises `NotFoundError`."""
        resp = await self._unary(
            "_lifecycle", "GetAgent", lifecycle_pb2.GetAgentRequest(agent_id=agent_id), retry=True
        )
        return resp.agent  # type: ignore[no-any-return]

    async def list_agents(
        self,
        *,
        state: int | str | None = None,
        capability: str = "",
        page_size: int = 0,
        page_token: str = "",
    ) -> Page[lifecycle_pb2.Agent]:
        """One page of agents ordered by id, optionally only those in `state`
        (e.g. "idle" or `AgentState.AGENT_STATE_IDLE`) or with `capability`."""
        resp = await self._unary(
            "_lifecycle",
            "ListAgents",
            lifecycle_pb2.ListAgentsRequest(
                state=enum_value(lifecycle_pb2.AgentState, "AGENT_STATE_", state),  # type: ignore[arg-type]
                capability=capability,
                page_size=page_size,
                page_token=page_token,
            ),
            retry=True,
        )
        return Page(list(resp.agents), resp.next_page_token)

    def iter_agents(
        self,
        *,
        state: int | str | None = None,
        capability: str = "",
        limit: int | None = None,
        page_size: int = 0,
    ) -> AsyncIterator[lifecycle_pb2.Agent]:
        """Every agent matching the filters (at most `limit`), page after page."""
        return self._pages(
            lambda token: self.list_agents(
                state=state, capability=capability, page_size=page_size, page_token=token
            ),
            limit,
        )

    async def report_state(
        self,
        agent_id: str,
        state: int | str,
        *,
        details: StructLike | None = None,
        observe_time: datetime | None = None,
    ) -> lifecycle_pb2.Agent:
        """Report the agent's state ("idle", "active", "error", "finished"...).
        A report older (`observe_time`) than the current state is kept in the
        history but does not change the state. Returns the agent after it."""
        resp = await self._unary(
            "_lifecycle",
            "ReportState",
            lifecycle_pb2.ReportStateRequest(
                agent_id=agent_id,
                state=enum_value(lifecycle_pb2.AgentState, "AGENT_STATE_", state),  # type: ignore[arg-type]
                details=to_struct(details, "details"),
                observe_time=to_timestamp(observe_time),
            ),
            retry=True,
        )
        return resp.agent  # type: ignore[no-any-return]

    async def heartbeat(self, agent_id: str) -> lifecycle_pb2.Agent:
        """Mark the agent alive (for agents that hold no subscription open)."""
        resp = await self._unary(
            "_lifecycle", "Heartbeat", lifecycle_pb2.HeartbeatRequest(agent_id=agent_id), retry=True
        )
        return resp.agent  # type: ignore[no-any-return]

    async def list_state_transitions(
        self, agent_id: str, *, page_size: int = 0, page_token: str = ""
    ) -> Page[lifecycle_pb2.StateTransition]:
        """One page of the agent's history, newest first."""
        resp = await self._unary(
            "_lifecycle",
            "ListStateTransitions",
            lifecycle_pb2.ListStateTransitionsRequest(
                agent_id=agent_id, page_size=page_size, page_token=page_token
            ),
            retry=True,
        )
        return Page(list(resp.transitions), resp.next_page_token)

    def iter_state_transitions(
        self, agent_id: str, *, limit: int | None = None, page_size: int = 0
    ) -> AsyncIterator[lifecycle_pb2.StateTransition]:
        """The agent's whole history (at most `limit` entries), newest first."""
        return self._pages(
            lambda token: self.list_state_transitions(
                agent_id, page_size=page_size, page_token=token
            ),
            limit,
        )

    async def watch_agents(
        self,
        *,
        agent_ids: Iterable[str] = (),
        capability: str = "",
        event_types: Iterable[int | str] = (),
        reconnect: bool = False,
    ) -> AsyncGenerator[lifecycle_pb2.WatchAgentsResponse, None]:
        """Agent events as they happen (registered, updated, state changed,
        offline, deregistered), optionally filtered; `event_types` by name
        ("state_changed") or number. Only events after the stream opened.

        With `reconnect`, a stream ended by UNAVAILABLE (server draining,
        restarting or unreachable) or RESOURCE_EXHAUSTED (this watcher fell
        behind) is reopened with backoff, for as long as the iteration goes on;
        once the new stream is open, the events missed in the gap are replayed
        from the agents' histories (oldest first, each carrying the agent as it
        is now), and none is delivered twice. Re-registrations with new details
        (UPDATED) in the gap cannot be recovered. Without `reconnect`, the error
        is raised. Stop by breaking out of the loop.
        """
        request = lifecycle_pb2.WatchAgentsRequest(
            agent_ids=list(agent_ids),
            capability=capability,
            event_types=[
                enum_value(lifecycle_pb2.AgentEventType, "AGENT_EVENT_TYPE_", t)  # type: ignore[misc]
                for t in event_types
            ],
        )
        seen = AgentWatchState(set(request.agent_ids), request.capability, set(request.event_types))
        first = True
        delays = self.retry.delays(forever=True)
        while True:
            try:
                async with contextlib.aclosing(
                    self._stream("_lifecycle", "WatchAgents", request, announce_ready=reconnect)
                ) as stream:
                    async for event in stream:
                        if event is STREAM_READY:
                            delays = self.retry.delays(forever=True)
                            if first:
                                seen.watching_since(_now_micros())
                            else:
                                for missed in await seen.replay(self, _now_micros):
                                    yield missed
                            first = False
                        elif seen.accept(event):
                            yield event
                return
            except (UnavailableError, ResourceExhaustedError) as exc:
                if not reconnect:
                    raise
                delay = next(delays)
                log.info(
                    "agent watch broken (%s); reconnecting in %.1fs",
                    exc.code.name,
                    delay,
                    extra={"method": "WatchAgents"},
                )
                await asyncio.sleep(delay)

    # ------------------------------------------------------------------ dispatch

    async def enqueue_task(
        self,
        capability: str = "",
        *,
        agent_id: str = "",
        input: StructLike | None = None,
        name: str = "",
        priority: int = 0,
        schedule_time: datetime | None = None,
        delay: Seconds | None = None,
        retry_policy: TaskRetry | common_pb2.RetryPolicy | None = None,
        timeout: Seconds | None = None,
        heartbeat_timeout: Seconds | None = None,
        idempotency_key: str | None = None,
    ) -> dispatch_pb2.Task:
        """Queue a standalone task for any agent with `capability`, or pinned to
        `agent_id` (exactly one of the two).

        `input` is a JSON-like dict. `schedule_time` (aware datetime) or `delay`
        (timedelta or seconds) defers it. `timeout` bounds one attempt (server
        default 300 s); with `heartbeat_timeout` an attempt also ends when the
        agent sends no heartbeat for that long. `idempotency_key`: enqueueing
        again with the same key returns the first task; None generates a fresh
        key so that retries after UNAVAILABLE are safe, "" sends none.
        `enqueue_task_response` also says whether the task is new (`created`).
        """
        resp = await self.enqueue_task_response(
            capability,
            agent_id=agent_id,
            input=input,
            name=name,
            priority=priority,
            schedule_time=schedule_time,
            delay=delay,
            retry_policy=retry_policy,
            timeout=timeout,
            heartbeat_timeout=heartbeat_timeout,
            idempotency_key=idempotency_key,
        )
        return resp.task

    async def enqueue_task_response(
        self,
        capability: str = "",
        *,
        agent_id: str = "",
        input: StructLike | None = None,
        name: str = "",
        priority: int = 0,
        schedule_time: datetime | None = None,
        delay: Seconds | None = None,
        retry_policy: TaskRetry | common_pb2.RetryPolicy | None = None,
        timeout: Seconds | None = None,
        heartbeat_timeout: Seconds | None = None,
        idempotency_key: str | None = None,
    ) -> dispatch_pb2.EnqueueTaskResponse:
        """`enqueue_task`, returning the whole response: `task`, and `created`,
        False when `idempotency_key` matched an existing task (which is
        returned unchanged, whatever this call's other arguments say)."""
        request = enqueue_request(
            capability,
            agent_id=agent_id,
            input=input,
            name=name,
            priority=priority,
            schedule_time=schedule_time,
            delay=delay,
            retry_policy=retry_policy,
            timeout=timeout,
            heartbeat_timeout=heartbeat_timeout,
            idempotency_key=idempotency_key,
        )
        return await self._unary(  # type: ignore[no-any-return]
            "_dispatch", "EnqueueTask", request, retry=bool(request.idempotency_key)
        )

    async def enqueue_tasks(
        self, requests: Iterable[dispatch_pb2.EnqueueTaskRequest]
    ) -> list[dispatch_pb2.Task]:
        """Queue up to 1000 tasks in one call and one commit (build each with
        `enqueue_request(...)`). Nothing is queued if any entry is invalid.
        Retried on UNAVAILABLE only when every entry has an idempotency key
        (`enqueue_request` generates one unless told otherwise).
        `enqueue_tasks_response` also says which tasks are new."""
        resp = await self.enqueue_tasks_response(requests)
        return [r.task for r in resp.results]

    async def enqueue_tasks_response(
        self, requests: Iterable[dispatch_pb2.EnqueueTaskRequest]
    ) -> dispatch_pb2.EnqueueTasksResponse:
        """`enqueue_tasks`, returning the whole response: `results`, in request
        order, each with `task` and `created`."""
        batch = dispatch_pb2.EnqueueTasksRequest(tasks=list(requests))
        safe = all(r.idempotency_key for r in batch.tasks)
        return await self._unary(  # type: ignore[no-any-return]
            "_dispatch", "EnqueueTasks", batch, retry=safe
        )

    async def subscribe_tasks(
        self, agent_id: str, *, capabilities: Iterable[str] = (), max_in_flight: int = 1
    ) -> AsyncGenerator[dispatch_pb2.SubscribeTasksResponse, None]:
        """The raw task stream of an agent: each message is an `assignment` or a
        `cancellation`. The stream ends normally when the agent is deregistered
        and raises `UnavailableError` when the server drains (reconnect).
        `opscore.agent.Agent` does all of this for you."""
        request = dispatch_pb2.SubscribeTasksRequest(
            agent_id=agent_id, capabilities=list(capabilities), max_in_flight=max_in_flight
        )
        async with contextlib.aclosing(
            self._stream("_dispatch", "SubscribeTasks", request)
        ) as stream:
            async for message in stream:
                yield message

    def connect(
        self, agent_id: str, *, capabilities: Iterable[str] = (), max_in_flight: int = 1
    ) -> WorkStream:
        """The agent's work stream (DispatchService.Connect), not yet open:
        `await stream.open()` says hello and returns the server's
        `ConnectAccepted`; then `read()` the ServerMessages (assignments,
        cancellations, results) and `send()` AgentMessages. Nothing is retried:
        when it raises `UnavailableError`, open a new one. The proto comments
        give the rules; `opscore.agent.Agent` follows them for you."""
        index = self._ensure_channel()
        request_id = uuid.uuid4().hex
        call = self._dispatch.Connect(metadata=self._metadata(request_id))
        return WorkStream(
            call,
            request_id,
            hello(agent_id, capabilities, max_in_flight),
            on_unavailable=lambda: self._failover(index),
        )

    async def complete_task(
        self, task_id: str, agent_id: str, attempt: int, output: StructLike | None = None
    ) -> dispatch_pb2.Task:
        """Report the success of `attempt` (the fencing token from the
        assignment). Raises `FailedPreconditionError` when the attempt no
        longer holds the lease (the result is then ignored)."""
        resp = await self._unary(
            "_dispatch",
            "CompleteTask",
            dispatch_pb2.CompleteTaskRequest(
                task_id=task_id,
                agent_id=agent_id,
                attempt=attempt,
                output=to_struct(output, "output"),
            ),
            retry=True,
        )
        return resp.task  # type: ignore[no-any-return]

    async def fail_task(
        self,
        task_id: str,
        agent_id: str,
        attempt: int,
        message: str,
        *,
        error_type: str = "",
        details: StructLike | None = None,
        non_retryable: bool = False,
    ) -> dispatch_pb2.Task:
        """Report the failure of `attempt`. The task is retried after its
        backoff unless `non_retryable` or this was its last attempt."""
        resp = await self._unary(
            "_dispatch",
            "FailTask",
            dispatch_pb2.FailTaskRequest(
                task_id=task_id,
                agent_id=agent_id,
                attempt=attempt,
                error=common_pb2.TaskError(
                    message=message, type=error_type, details=to_struct(details, "details")
                ),
                non_retryable=non_retryable,
            ),
            retry=True,
        )
        return resp.task  # type: ignore[no-any-return]

    async def heartbeat_task(
        self, task_id: str, agent_id: str, attempt: int, progress: StructLike | None = None
    ) -> dispatch_pb2.HeartbeatTaskResponse:
        """Extend the lease of `attempt` and record `progress`. The response says
        the new `lease_expire_time` and whether the task was cancelled
        (`cancel_requested`: stop working on it)."""
        return await self._unary(  # type: ignore[no-any-return]
            "_dispatch",
            "HeartbeatTask",
            dispatch_pb2.HeartbeatTaskRequest(
                task_id=task_id,
                agent_id=agent_id,
                attempt=attempt,
                progress=to_struct(progress, "progress"),
            ),
            retry=True,
        )

    async def get_task(self, task_id: str) -> dispatch_pb2.Task:
        """One task. Raises `NotFoundError`."""
        resp = await self._unary(
            "_dispatch", "GetTask", dispatch_pb2.GetTaskRequest(task_id=task_id), retry=True
        )
        return resp.task  # type: ignore[no-any-return]

    async def list_tasks(
        self,
        *,
        state: int | str | None = None,
        capability: str = "",
        agent_id: str = "",
        session_id: str = "",
        page_size: int = 0,
        page_token: str = "",
    ) -> Page[dispatch_pb2.Task]:
        """One page of tasks, newest first, optionally filtered by `state`
        ("queued", "assigned"...), `capability`, `agent_id` or `session_id`."""
        resp = await self._unary(
            "_dispatch",
            "ListTasks",
            dispatch_pb2.ListTasksRequest(
                state=enum_value(dispatch_pb2.TaskState, "TASK_STATE_", state),  # type: ignore[arg-type]
                capability=capability,
                agent_id=agent_id,
                session_id=session_id,
                page_size=page_size,
                page_token=page_token,
            ),
            retry=True,
        )
        return Page(list(resp.tasks), resp.next_page_token)

    def iter_tasks(
        self,
        *,
        state: int | str | None = None,
        capability: str = "",
        agent_id: str = "",
        session_id: str = "",
        limit: int | None = None,
        page_size: int = 0,
    ) -> AsyncIterator[dispatch_pb2.Task]:
        """Every task matching the filters (at most `limit`), newest first."""
        return self._pages(
            lambda token: self.list_tasks(
                state=state,
                capability=capability,
                agent_id=agent_id,
                session_id=session_id,
                page_size=page_size,
                page_token=token,
            ),
            limit,
        )

    async def list_task_attempts(
        self, task_id: str, *, page_size: int = 0, page_token: str = ""
    ) -> Page[dispatch_pb2.TaskAttempt]:
        """One page of a task's attempts, newest first: the running one (outcome
        RUNNING) first, then ended ones with their agent, times, outcome, error
        (the SDK's Agent puts a handler's traceback in `error.details`) and last
        progress. Raises `NotFoundError`."""
        resp = await self._unary(
            "_dispatch",
            "ListTaskAttempts",
            dispatch_pb2.ListTaskAttemptsRequest(
                task_id=task_id, page_size=page_size, page_token=page_token
            ),
            retry=True,
        )
        return Page(list(resp.attempts), resp.next_page_token)

    def iter_task_attempts(
        self, task_id: str, *, limit: int | None = None, page_size: int = 0
    ) -> AsyncIterator[dispatch_pb2.TaskAttempt]:
        """Every attempt of a task (at most `limit`), newest first."""
        return self._pages(
            lambda token: self.list_task_attempts(task_id, page_size=page_size, page_token=token),
            limit,
        )

    async def cancel_task(self, task_id: str, reason: str = "") -> dispatch_pb2.Task:
        """Cancel a task that has not finished; an agent holding it is told.
        Raises `FailedPreconditionError` for a COMPLETED or FAILED task."""
        resp = await self._unary(
            "_dispatch",
            "CancelTask",
            dispatch_pb2.CancelTaskRequest(task_id=task_id, reason=reason),
            retry=True,
        )
        return resp.task  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ workflows

    async def create_workflow_definition(
        self,
        definition: workflow_pb2.WorkflowDefinition | Mapping[str, Any] | None = None,
        *,
        source: str | None = None,
    ) -> workflow_pb2.WorkflowDefinition:
        """Store a workflow definition, given as a message, as a dict (the JSON
        form: proto field names, or the earlier Ops-Core format), or as JSON or
        YAML `source` text. Creating the same content again returns the stored
        definition; different content under an existing (id, version) raises
        `AlreadyExistsError`. `create_workflow_definition_response` also says
        whether it was stored (`created`) or already there."""
        resp = await self.create_workflow_definition_response(definition, source=source)
        return resp.definition

    async def create_workflow_definition_response(
        self,
        definition: workflow_pb2.WorkflowDefinition | Mapping[str, Any] | None = None,
        *,
        source: str | None = None,
    ) -> workflow_pb2.CreateWorkflowDefinitionResponse:
        """`create_workflow_definition`, returning the whole response:
        `definition`, and `created`, False when the same content was already
        stored (nothing changed)."""
        if (definition is None) == (source is None):
            raise ValueError("pass exactly one of definition and source")
        if isinstance(definition, workflow_pb2.WorkflowDefinition):
            request = workflow_pb2.CreateWorkflowDefinitionRequest(definition=definition)
        else:
            text = source if source is not None else json.dumps(dict(definition or {}))
            request = workflow_pb2.CreateWorkflowDefinitionRequest(source=text)
        return await self._unary(  # type: ignore[no-any-return]
            "_workflow", "CreateWorkflowDefinition", request, retry=True
        )

    async def get_workflow_definition(
        self, definition_id: str, version: int = 0
    ) -> workflow_pb2.WorkflowDefinition:
        """A definition: the latest version unless `version` is given."""
        resp = await self._unary(
            "_workflow",
            "GetWorkflowDefinition",
            workflow_pb2.GetWorkflowDefinitionRequest(definition_id=definition_id, version=version),
            retry=True,
        )
        return resp.definition  # type: ignore[no-any-return]

    async def list_workflow_definitions(
        self, *, page_size: int = 0, page_token: str = ""
    ) -> Page[workflow_pb2.WorkflowDefinition]:
        """One page of definitions (the latest version of each), by id."""
        resp = await self._unary(
            "_workflow",
            "ListWorkflowDefinitions",
            workflow_pb2.ListWorkflowDefinitionsRequest(page_size=page_size, page_token=page_token),
            retry=True,
        )
        return Page(list(resp.definitions), resp.next_page_token)

    def iter_workflow_definitions(
        self, *, limit: int | None = None, page_size: int = 0
    ) -> AsyncIterator[workflow_pb2.WorkflowDefinition]:
        """Every definition (latest versions), by id."""
        return self._pages(
            lambda token: self.list_workflow_definitions(page_size=page_size, page_token=token),
            limit,
        )

    async def delete_workflow_definition(self, definition_id: str, version: int = 0) -> int:
        """Delete one version, or all when `version` is 0; returns how many were
        deleted. Running sessions are unaffected. Not retried on UNAVAILABLE."""
        resp = await self._unary(
            "_workflow",
            "DeleteWorkflowDefinition",
            workflow_pb2.DeleteWorkflowDefinitionRequest(
                definition_id=definition_id, version=version
            ),
            retry=False,
        )
        return int(resp.deleted_versions)

    async def start_workflow(
        self,
        definition_id: str = "",
        *,
        version: int = 0,
        definition: workflow_pb2.WorkflowDefinition | None = None,
        input: StructLike | None = None,
        agent_id: str = "",
        idempotency_key: str | None = None,
    ) -> workflow_pb2.Session:
        """Start a session of a stored definition (`definition_id`, latest
        version unless `version`) or of an inline `definition`. `input` reaches
        every task as `input["input"]`; `agent_id` pins every task to one agent.
        `idempotency_key` as in `enqueue_task` (None: generated, so a retry
        cannot start a second session). `start_workflow_response` also says
        whether the session is new (`created`)."""
        resp = await self.start_workflow_response(
            definition_id,
            version=version,
            definition=definition,
            input=input,
            agent_id=agent_id,
            idempotency_key=idempotency_key,
        )
        return resp.session

    async def start_workflow_response(
        self,
        definition_id: str = "",
        *,
        version: int = 0,
        definition: workflow_pb2.WorkflowDefinition | None = None,
        input: StructLike | None = None,
        agent_id: str = "",
        idempotency_key: str | None = None,
    ) -> workflow_pb2.StartWorkflowResponse:
        """`start_workflow`, returning the whole response: `session`, and
        `created`, False when `idempotency_key` matched an existing session
        (returned as it is, whatever this call's other arguments say)."""
        request = workflow_pb2.StartWorkflowRequest(
            definition_id=definition_id,
            version=version,
            definition=definition,
            input=to_struct(input, "input"),
            agent_id=agent_id,
            idempotency_key=_key(idempotency_key),
        )
        return await self._unary(  # type: ignore[no-any-return]
            "_workflow", "StartWorkflow", request, retry=bool(request.idempotency_key)
        )

    async def get_session(self, session_id: str) -> workflow_pb2.Session:
        """One session with its task runs. Raises `NotFoundError`."""
        resp = await self._unary(
            "_workflow",
            "GetSession",
            workflow_pb2.GetSessionRequest(session_id=session_id),
            retry=True,
        )
        return resp.session  # type: ignore[no-any-return]

    async def list_sessions(
        self,
        *,
        state: int | str | None = None,
        definition_id: str = "",
        page_size: int = 0,
        page_token: str = "",
    ) -> Page[workflow_pb2.Session]:
        """One page of sessions, newest first, without their task runs."""
        resp = await self._unary(
            "_workflow",
            "ListSessions",
            workflow_pb2.ListSessionsRequest(
                state=enum_value(workflow_pb2.SessionState, "SESSION_STATE_", state),  # type: ignore[arg-type]
                definition_id=definition_id,
                page_size=page_size,
                page_token=page_token,
            ),
            retry=True,
        )
        return Page(list(resp.sessions), resp.next_page_token)

    def iter_sessions(
        self,
        *,
        state: int | str | None = None,
        definition_id: str = "",
        limit: int | None = None,
        page_size: int = 0,
    ) -> AsyncIterator[workflow_pb2.Session]:
        """Every session matching the filters (at most `limit`), newest first."""
        return self._pages(
            lambda token: self.list_sessions(
                state=state, definition_id=definition_id, page_size=page_size, page_token=token
            ),
            limit,
        )

    async def cancel_session(self, session_id: str, reason: str = "") -> workflow_pb2.Session:
        """Cancel a session: its queued tasks end and agents holding its tasks are
        told. Raises `FailedPreconditionError` for a finished session."""
        resp = await self._unary(
            "_workflow",
            "CancelSession",
            workflow_pb2.CancelSessionRequest(session_id=session_id, reason=reason),
            retry=True,
        )
        return resp.session  # type: ignore[no-any-return]

    async def watch_session(
        self, session_id: str, *, after_sequence: int = 0, reconnect: bool = True
    ) -> AsyncGenerator[workflow_pb2.SessionEvent, None]:
        """The session's events: every event so far (after `after_sequence`),
        then live ones; the iteration ends after the terminal event.

        With `reconnect` (the default) a stream broken by UNAVAILABLE (server
        draining, restarting or unreachable) or RESOURCE_EXHAUSTED (this watcher
        fell behind) is resumed after the last event received, with backoff,
        for as long as the iteration goes on, so no event is lost or repeated.
        """
        last = after_sequence
        delays = self.retry.delays(forever=True)
        while True:
            request = workflow_pb2.WatchSessionRequest(session_id=session_id, after_sequence=last)
            try:
                async with contextlib.aclosing(
                    self._stream("_workflow", "WatchSession", request)
                ) as stream:
                    async for message in stream:
                        delays = self.retry.delays(forever=True)
                        if message.event.sequence <= last:
                            continue
                        last = message.event.sequence
                        yield message.event
                return
            except (UnavailableError, ResourceExhaustedError) as exc:
                if not reconnect:
                    raise
                delay = next(delays)
                log.info(
                    "session watch broken (%s); resuming after event %d in %.1fs",
                    exc.code.name,
                    last,
                    delay,
                    extra={"method": "WatchSession", "session_id": session_id},
                )
                await asyncio.sleep(delay)


__all__ = [
    "DEFAULT_TARGET",
    "OpsCoreClient",
    "Page",
    "RetryConfig",
    "TaskRetry",
    "enqueue_request",
]
