"""Test harness: a real in-process grpc.aio server on an ephemeral port, with a real
SQLite file in tmp_path, or a fresh database of the suite's real PostgreSQL
cluster. Nothing of our own is mocked.

A module (or test) marked `@pytest.mark.backends("sqlite", "postgres")` runs on
each backend named; everything else runs on SQLite. A test inside such a module
that looks at one backend's internals narrows the mark again."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
import pytest
from opscore_proto.v1 import (
    dispatch_pb2_grpc,
    lifecycle_pb2,
    lifecycle_pb2_grpc,
    workflow_pb2_grpc,
)

from opscore.config import Config
from opscore.server import OpsCoreServer

# The throwaway PostgreSQL cluster (`pg`, `pg_url`), one per session.
pytest_plugins = ["tests.support.pg"]

T = TypeVar("T")


class Harness:
    """A running server plus stubs on one channel; restartable on the same file."""

    def __init__(self, config: Config, span_exporter: Any = None) -> None:
        self.config = config
        # An OpenTelemetry SpanExporter: tracing on, every span handed to it.
        self.span_exporter = span_exporter
        self.server: OpsCoreServer | None = None
        self.channel: grpc.aio.Channel | None = None

    async def start(self) -> Harness:
        self.server = OpsCoreServer(self.config, span_exporter=self.span_exporter)
        await self.server.start()
        # Keep the same port across restarts so clients can reconnect.
        self.config = replace(self.config, listen=f"127.0.0.1:{self.server.port}")
        self.channel = grpc.aio.insecure_channel(self.target, options=_CHANNEL_OPTIONS)
        self.lifecycle = lifecycle_pb2_grpc.LifecycleServiceStub(self.channel)
        self.dispatch = dispatch_pb2_grpc.DispatchServiceStub(self.channel)
        self.workflow = workflow_pb2_grpc.WorkflowServiceStub(self.channel)
        return self

    @property
    def target(self) -> str:
        assert self.server is not None
        return self.server.target

    async def stop(self) -> None:
        if self.channel is not None:
            await self.channel.close()
            self.channel = None
        if self.server is not None:
            await self.server.stop()
            self.server = None

    async def restart(self) -> Harness:
        await self.stop()
        return await self.start()

    def new_channel(self, **kwargs: Any) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(self.target, options=_CHANNEL_OPTIONS, **kwargs)

    async def register(
        self, agent_id: str, capabilities: list[str] | None = None, **kw: Any
    ) -> lifecycle_pb2.Agent:
        resp = await self.lifecycle.RegisterAgent(
            lifecycle_pb2.RegisterAgentRequest(
                agent_id=agent_id, capabilities=capabilities or [], **kw
            )
        )
        return resp.agent


_CHANNEL_OPTIONS = [("grpc.enable_retries", 0)]


def make_config(tmp_path: Path, **overrides: Any) -> Config:
    base = Config(listen="127.0.0.1:0", db=str(tmp_path / "opscore.db"), drain_grace=timedelta(1))
    return replace(base, **overrides)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "backends(*names): run the test on each storage backend named"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("backends")
    if marker is not None:
        metafunc.parametrize("backend", marker.args, indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """The storage backend under test: "sqlite" unless the test is parametrized."""
    return getattr(request, "param", "sqlite")


@pytest.fixture
def db_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """--db for the backend under test: a file in tmp_path, or a fresh migrated
    PostgreSQL database (dropped after the test)."""
    if backend == "postgres":
        return str(request.getfixturevalue("pg_migrated_url"))
    return str(tmp_path / "opscore.db")


@pytest.fixture
def config(tmp_path: Path, db_url: str) -> Config:
    return make_config(tmp_path, db=db_url)


@pytest.fixture
async def harness(config: Config) -> AsyncIterator[Harness]:
    h = Harness(config)
    await h.start()
    try:
        yield h
    finally:
        await h.stop()


@pytest.fixture
async def make_harness(
    tmp_path: Path, db_url: str
) -> AsyncIterator[Callable[..., Awaitable[Harness]]]:
    made: list[Harness] = []

    async def make(span_exporter: Any = None, **overrides: Any) -> Harness:
        overrides.setdefault("db", db_url)
        h = Harness(make_config(tmp_path, **overrides), span_exporter)
        made.append(h)
        return await h.start()

    try:
        yield make
    finally:
        for h in made:
            await h.stop()


async def eventually(
    probe: Callable[[], Awaitable[T] | T],
    *,
    timeout: float = 10.0,
    interval: float = 0.01,
    what: str = "condition",
) -> T:
    """Re-check `probe` until it returns a truthy value; fail after `timeout`.

    For conditions that change server-side without an event the test can await
    (timers firing). Each check is a real observation, not a sleep-and-hope.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Any = None
    while True:
        result = probe()
        if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        last = result
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        await asyncio.sleep(interval)


async def expect_error(
    call: Awaitable[Any], code: grpc.StatusCode, *contains: str
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    err = info.value
    assert err.code() == code, f"expected {code.name}, got {err.code().name}: {err.details()}"
    for text in contains:
        assert text in (err.details() or ""), f"{text!r} not in {err.details()!r}"
    return err


class StreamReader:
    """Reads a server stream in the background so tests can await messages."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.error: BaseException | None = None
        self.done = asyncio.Event()
        self._task = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        try:
            async for msg in self.call:
                await self.queue.put(msg)
        except BaseException as exc:  # recorded for the test to assert on
            self.error = exc
        finally:
            self.done.set()

    async def next(self, timeout: float = 10.0) -> Any:
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def expect_quiet(self, duration: float) -> None:
        """Assert that nothing arrives for `duration` seconds (used sparingly, to
        prove a negative: that a task is NOT delivered)."""
        with contextlib.suppress(TimeoutError):
            msg = await asyncio.wait_for(self.queue.get(), duration)
            raise AssertionError(f"unexpected message: {msg}")

    async def close(self) -> None:
        self.call.cancel()
        with contextlib.suppress(BaseException):
            await self._task
